"""Matplotlib figures of the report (PDF and PNG), drawn with the Agg canvas.

Matplotlib is imported inside the functions (object API: ``Figure`` + ``FigureCanvasAgg``, so no
global backend is switched and no window is ever opened). Every figure has labelled axes with
units (coverage and error as fractions in [0, 1]), a legend and a title naming its view
(long-tailed weights ``w_lt`` or balanced weights ``w_bal``). PDFs carry no creation date, so
the same inputs give the same bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "VIEW_TITLE",
    "guide_label",
    "line_style",
    "plot_margin_hist",
    "plot_rc_curves",
    "plot_sensitivity",
    "plot_training",
    "plot_trajectories",
]

VIEW_TITLE = {
    "lt": "long-tailed weights (w_lt)",
    "bal": "balanced weights (w_bal)",
}
_KIND = {
    "balanced": ("balanced_risk", "group-balanced error (fraction)", "Group-balanced error"),
    "worst": ("worst_risk", "worst-group error (fraction)", "Worst-group error"),
    "standard": ("risk", "selective risk (fraction)", "Selective risk"),
}
_STYLES = ("-", "--", "-.", ":")
_DPI = 150



def _wrap(title: str, width: int = 70) -> str:
    """A title broken into lines of at most ``width`` characters (long titles otherwise run off the axes)."""
    import textwrap

    return "\n".join(textwrap.wrap(title, width)) or title

def _view_title(view: str | None) -> str:
    return VIEW_TITLE.get(view or "", str(view))


def _group_names(K: int) -> list[str]:
    return ["head", "tail"] if K == 2 else [f"group {k}" for k in range(K)]


def _new_figure(figsize: tuple[float, float], nrows: int = 1, ncols: int = 1) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig: Any, path_stem: Path, formats: Sequence[str]) -> list[Path]:
    """Write ``path_stem.<fmt>`` for each format; returns the written paths."""
    path_stem = Path(path_stem)
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        if fmt not in ("pdf", "png"):
            raise ValueError(f"unsupported figure format {fmt!r} (pdf or png)")
        p = path_stem.parent / f"{path_stem.name}.{fmt}"
        meta = {"CreationDate": None} if fmt == "pdf" else {"Software": None}
        fig.savefig(p, format=fmt, dpi=_DPI, metadata=meta)
        written.append(p)
    return written


def _banner(fig: Any, banner: str | None) -> None:
    """The report's banner (e.g. "smoke recipe: ...") in red along the bottom of the figure."""
    if banner:
        fig.supxlabel(banner, color="C3", fontsize=9)


def _grid_aurc(cov: np.ndarray, risk: np.ndarray) -> float | None:
    """Mean risk over the grid 0.01..1.00 when the curve holds exactly that grid, else None."""
    grid = np.round(np.arange(1, 101) / 100, 2)
    if cov.shape == grid.shape and np.allclose(cov, grid, atol=1e-9):
        return float(np.mean(risk))
    return None


_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">", "h", "p")


def line_style(i: int) -> dict[str, Any]:
    """Matplotlib style of the i-th line: colour, dash pattern and marker all cycle with different
    periods (10, 4, 12), so lines that coincide stay distinguishable; markers are staggered
    (every 10th point, offset by i) so they do not sit on top of each other."""
    return {"color": f"C{i % 10}", "ls": _STYLES[i % len(_STYLES)], "marker": _MARKERS[i % len(_MARKERS)],
            "markevery": (i % 10, 10), "ms": 4, "lw": 1.4}


def guide_label(levels: Sequence[float]) -> str:
    return "dotted: coverages of the tables (" + ", ".join(f"{100 * lv:g}%" for lv in levels) + ")"


def plot_rc_curves(
    curves: Mapping[str, Mapping[str, Any]],
    kind: str,
    view: str,
    path_stem: Path,
    formats: Sequence[str] = ("pdf", "png"),
    *,
    levels: Sequence[float] = (0.7, 0.8, 0.9),
    title: str | None = None,
    subtitle: str | None = None,
    banner: str | None = None,
) -> list[Path]:
    """Risk-coverage curves of several methods overlaid (one line per method).

    ``curves[method]`` is an ``RCCurve.to_dict()``-style dict with ``coverage`` and the risk of
    ``kind`` (``balanced`` -> ``balanced_risk``, ``worst`` -> ``worst_risk``, ``standard`` ->
    ``risk``), optionally ``band[<risk>] = {"lo": [...], "hi": [...]}``: a pointwise bootstrap
    band drawn shaded (:mod:`argse_cli.report.bands`). The legend (outside the axes, right) shows
    each method's AURC (mean risk over the grid 0.01..1.00) when the curve holds that grid; dotted
    verticals mark the coverage ``levels`` (explained in the legend). Every line has its own
    colour / dash / marker (:func:`line_style`). ``banner`` is drawn in red below the plot.
    """
    if kind not in _KIND:
        raise ValueError(f"kind must be one of {sorted(_KIND)}, got {kind!r}")
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    field, ylabel, name = _KIND[kind]
    fig, axes = _new_figure((8.6, 4.6))
    ax = axes[0, 0]
    for lv in levels:
        ax.axvline(lv, color="0.6", lw=0.8, ls=":", zorder=0)
    banded = False
    for i, (method, c) in enumerate(curves.items()):
        cov = np.asarray(c["coverage"], dtype=np.float64)
        risk = np.asarray(c[field], dtype=np.float64)
        a = _grid_aurc(cov, risk)
        label = method if a is None else f"{method} (AURC {a:.3f})"
        st = line_style(i)
        band = (c.get("band") or {}).get(field)
        if band is not None:
            ax.fill_between(np.asarray(band.get("coverage", cov), dtype=np.float64),
                            np.asarray(band["lo"], dtype=np.float64), np.asarray(band["hi"], dtype=np.float64),
                            color=st["color"], alpha=0.15, lw=0, zorder=1)
            banded = True
        ax.plot(cov, risk, label=label, zorder=2, **st)
    ax.set_xlabel("coverage (fraction of test weight accepted)")
    ax.set_ylabel(ylabel)
    ax.set_xlim(0.0, 1.0)
    lo, hi = ax.get_ylim()  # the data's range (not forced down to 0), inside [0, 1]
    ax.set_ylim(max(0.0, lo), min(1.02, hi))
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if levels:
        handles.append(Line2D([], [], color="0.6", lw=0.8, ls=":"))
        labels.append(guide_label(levels))
    if banded:
        handles.append(Patch(color="0.5", alpha=0.3, lw=0))
        labels.append("shaded: 95% pointwise bootstrap band")
    ax.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    head = f"{title}: " if title else ""
    tail = f" ({subtitle})" if subtitle else ""
    ax.set_title(_wrap(f"{head}{name.lower() if head else name} vs coverage{tail}, {_view_title(view)}"), fontsize=10)
    _banner(fig, banner)
    return _save(fig, path_stem, formats)


def plot_margin_hist(
    margin: Any,
    group: Any,
    path_stem: Path,
    formats: Sequence[str] = ("pdf", "png"),
    *,
    weights: Any = None,
    view: str = "lt",
    bins: int = 60,
    title: str | None = None,
    banner: str | None = None,
) -> list[Path]:
    """Histogram of the plug-in margin m(x) per group (head / tail); accept iff m(x) >= 0.

    Each group's histogram is normalised to sum to 1 under ``weights`` (the view's sample
    weights; None = unit), so the bar heights are the fraction of that group's weight per bin.
    The legend gives each group's accepted fraction ``sum_{m >= 0} w / sum w``.
    """
    m = np.asarray(margin, dtype=np.float64).reshape(-1)
    g = np.asarray(group).reshape(-1).astype(np.int64)
    w = np.ones_like(m) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if not (m.shape == g.shape == w.shape):
        raise ValueError("margin, group and weights must have the same length")
    finite = np.isfinite(m)
    m, g, w = m[finite], g[finite], w[finite]
    K = int(g.max()) + 1 if g.size else 1
    lo, hi = (float(m.min()), float(m.max())) if m.size else (-1.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    fig, axes = _new_figure((6.4, 4.2))
    ax = axes[0, 0]
    for k, name in enumerate(_group_names(K)):
        sel = g == k
        tot = float(w[sel].sum())
        if not sel.any() or tot <= 0:
            continue
        acc = float(w[sel & (m >= 0)].sum()) / tot
        ax.hist(
            m[sel],
            bins=edges,
            weights=w[sel] / tot,
            histtype="stepfilled",
            alpha=0.35,
            color=f"C{k}",
            edgecolor=f"C{k}",
            lw=1.2,
            label=f"{name} (accepted {100 * acc:.1f}%)",
        )
    ax.axvline(0.0, color="k", lw=1.2, ls="--", label=r"threshold $m(x) = 0$")
    ax.set_xlabel(r"margin $m(x)$ (posterior units; accept iff $m(x) \geq 0$)")
    ax.set_ylabel("fraction of the group's weight per bin")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    head = f"{title}: " if title else ""
    ax.set_title(_wrap(f"{head}test margin per group, {_view_title(view)}"), fontsize=10)
    _banner(fig, banner)
    return _save(fig, path_stem, formats)


def _per_epoch(history: Mapping[str, Any], key: str) -> np.ndarray | None:
    v = history.get(key)
    if v is None or len(v) == 0:
        return None
    a = np.asarray(v, dtype=np.float64)
    return a[:, None] if a.ndim == 1 else a


def plot_trajectories(
    history: Mapping[str, Sequence[Any]],
    path_stem: Path,
    formats: Sequence[str] = ("pdf", "png"),
    *,
    view: str = "lt",
    chosen_epoch: int | None = None,
    title: str | None = None,
) -> list[Path]:
    """2 x 2 grid of gate-training trajectories per epoch (validation split ``val_small``).

    ``history`` keys: ``epoch`` [T], ``alpha`` [T][K], ``beta`` [T][K], ``coverage`` [T],
    ``group_coverage`` [T][K], ``group_error`` [T][K] (``lambda`` [T][K] is drawn dashed in the
    beta panel when present). Panels: alpha_k; beta_k (and lambda_k); coverage overall and per
    group; group error e_k. ``chosen_epoch`` is marked with a vertical line.
    """
    ep = np.asarray(history["epoch"], dtype=np.float64)
    alpha = _per_epoch(history, "alpha")
    K = alpha.shape[1] if alpha is not None else 1
    names = _group_names(K)
    fig, axes = _new_figure((9.6, 6.8), 2, 2)

    def lines(ax: Any, arr: np.ndarray | None, fmt: str, ls: str = "-") -> None:
        if arr is None:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
            return
        for k in range(arr.shape[1]):
            ax.plot(
                ep,
                arr[:, k],
                ls=ls,
                color=f"C{k}",
                marker="." if len(ep) < 40 else None,
                label=fmt.format(name=names[k] if k < len(names) else k, k=k),
            )

    ax = axes[0, 0]
    lines(ax, alpha, r"$\alpha_{k}$ ({name})")
    ax.set_ylabel(r"$\alpha_k$ (dimensionless)")
    ax.set_title(r"group scale $\alpha_k$", fontsize=10)
    ax = axes[0, 1]
    lines(ax, _per_epoch(history, "beta"), r"$\beta_{k}$ ({name})")
    lam = _per_epoch(history, "lambda")
    if lam is not None:
        lines(ax, lam, r"$\lambda_{k}$ ({name})", ls="--")
    ax.set_ylabel(r"$\beta_k$, $\lambda_k$ (dimensionless)")
    ax.set_title(r"group weights $\beta_k$ (solid), duals $\lambda_k$ (dashed)", fontsize=10)
    ax = axes[1, 0]
    cov = _per_epoch(history, "coverage")
    if cov is not None:
        ax.plot(ep, cov[:, 0], color="k", lw=2.0, label="overall")
    lines(ax, _per_epoch(history, "group_coverage"), "{name}", ls="--")
    ax.set_ylabel("coverage (fraction)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("coverage on val_small", fontsize=10)
    ax = axes[1, 1]
    lines(ax, _per_epoch(history, "group_error"), r"$e_{k}$ ({name})")
    ax.set_ylabel(r"group error $e_k$ (fraction)")
    ax.set_ylim(bottom=0.0)
    ax.set_title("group error on val_small", fontsize=10)
    for ax in axes.ravel():
        if chosen_epoch is not None:
            ax.axvline(
                chosen_epoch, color="0.5", lw=1.0, ls=":", label=f"chosen epoch {chosen_epoch}"
            )
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    head = f"{title}: " if title else ""
    fig.suptitle(_wrap(f"{head}gate training trajectories, {_view_title(view)}", 90), fontsize=11)
    return _save(fig, path_stem, formats)


def plot_training(
    history: Mapping[str, Sequence[Any]],
    path_stem: Path,
    formats: Sequence[str] = ("pdf", "png"),
    *,
    chosen_epoch: int | None = None,
    title: str | None = None,
    banner: str | None = None,
) -> list[Path]:
    """Gate training per epoch: the training loss and the epoch-selection criterion on val_small
    (the NLL or the soft selective risk); the selective recipe's alpha_k are added when recorded."""
    ep = np.asarray(history["epoch"], dtype=np.float64) + 1
    alpha = _per_epoch(history, "alpha")
    fig, axes = _new_figure((9.6, 3.4), 1, 3 if alpha is not None else 2)
    axes = np.atleast_1d(axes).ravel()
    axes[0].plot(ep, np.asarray(history["loss"], float), color="C0")
    axes[0].set_ylabel("training loss (nats)")
    axes[0].set_title("training objective", fontsize=10)
    crit = np.asarray(history["val_criterion"], float)
    axes[1].plot(ep, crit, color="C1")
    best = int(np.argmin(crit)) if chosen_epoch is None else chosen_epoch
    axes[1].axvline(ep[best], color="0.5", lw=1.0, ls=":", label=f"chosen epoch {int(ep[best])}")
    axes[1].set_ylabel("criterion on val_small")
    axes[1].set_title("epoch-selection criterion", fontsize=10)
    axes[1].legend(fontsize=7)
    if alpha is not None:
        for k in range(alpha.shape[1]):
            axes[2].plot(ep, alpha[:, k], color=f"C{k}", label=rf"$\alpha_{k}$")
        axes[2].set_ylabel(r"$\alpha_k$ (dimensionless)")
        axes[2].set_title("selective recipe: learned alpha", fontsize=10)
        axes[2].legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"{title}: gate training" if title else "gate training", fontsize=11)
    _banner(fig, banner)
    return _save(fig, path_stem, formats)


def plot_sensitivity(
    rows: Sequence[Mapping[str, Any]],
    path_stem: Path,
    formats: Sequence[str] = ("pdf", "png"),
    *,
    key: str = "aurc_balanced",
    view: str = "lt",
    title: str | None = None,
) -> list[Path]:
    """Bar chart of ``key`` (default balanced AURC) per setting, one bar colour per method.

    ``rows[i] = {"method", "setting", "values": {key: [values over seeds]}}``; bars show the mean
    over seeds, error bars the std (ddof = 1) when there are >= 2 seeds.
    """
    from .tables import mean_std

    settings: list[str] = []
    methods: list[str] = []
    for r in rows:
        s = str(r.get("setting") or "--")
        if s not in settings:
            settings.append(s)
        if r["method"] not in methods:
            methods.append(r["method"])
    fig, axes = _new_figure((max(6.4, 0.9 * len(settings) * max(1, len(methods)) + 2), 4.4))
    ax = axes[0, 0]
    width = 0.8 / max(1, len(methods))
    x = np.arange(len(settings), dtype=np.float64)
    for j, m in enumerate(methods):
        means, errs = np.full(len(settings), np.nan), np.zeros(len(settings))
        for r in rows:
            if r["method"] != m:
                continue
            mu, sd = mean_std(r.get("values", {}).get(key))
            i = settings.index(str(r.get("setting") or "--"))
            if mu is not None:
                means[i], errs[i] = mu, sd or 0.0
        ax.bar(
            x + (j - (len(methods) - 1) / 2) * width,
            means,
            width,
            yerr=errs,
            capsize=3,
            color=f"C{j % 10}",
            label=m,
        )
    ax.set_xticks(
        x,
        settings,
        rotation=30 if len(settings) > 4 else 0,
        ha="right" if len(settings) > 4 else "center",
    )
    ax.set_xlabel("setting")
    label = {
        "aurc_balanced": "balanced AURC (fraction)",
        "aurc_worst": "worst-group AURC (fraction)",
    }
    ax.set_ylabel(label.get(key, f"{key} (fraction)"))
    ax.set_ylim(bottom=0.0)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    head = f"{title}: " if title else ""
    ax.set_title(
        f"{head}sensitivity (mean $\\pm$ std over seeds), {_view_title(view)}", fontsize=10
    )
    return _save(fig, path_stem, formats)
