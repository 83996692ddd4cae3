"""Figures of the guarantees / deferral capabilities (PDF and PNG, Agg canvas).

- :func:`plot_sag`: SAG's achieved rate against its target over the stream (and coverage);
- :func:`plot_defer`: system accuracy against the share of samples the model keeps (L2D by EM
  vs AR-GSE's rejection read as deferral).

Matplotlib is imported inside the functions (object API, no global backend switch); PDFs carry
no creation date, so the same inputs give the same bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .figures import _banner, _new_figure, _save

__all__ = ["plot_defer", "plot_sag"]

_RATE_NAME = {
    "sensitivity": "sensitivity\n(share of model errors rejected)",
    "specificity": "specificity\n(share of correct predictions accepted)",
    "success": "success rate\n(correct outputs, rejected = handled)",
}


def _arr(x: Any) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in x], dtype=np.float64)


def _rolling(x: np.ndarray, k: int) -> np.ndarray:
    """Mean over the last k batches (nan-aware), same length as x."""
    out = np.full_like(x, np.nan)
    for i in range(x.size):
        seg = x[max(0, i - k + 1) : i + 1]
        if np.isfinite(seg).any():
            out[i] = np.nanmean(seg)
    return out


def plot_sag(
    result: Mapping[str, Any],
    path_stem: Path,
    formats: Sequence[str] = ("pdf", "png"),
    *,
    roll: int = 10,
    title: str | None = None,
    banner: str | None = None,
) -> list[Path]:
    """Achieved rate vs target over the stream, from :func:`argse_cli.sag.sag_stream`'s dict.

    Top: the mode's rate per batch (dots), its mean over the last ``roll`` batches, the
    cumulative rate, the target (dashed) and the warm-up (shaded). Bottom: the accepted share
    (coverage) per batch. x axis: samples seen.
    """
    x = np.asarray(result["batch_end"], dtype=np.float64)
    rate = _arr(result["rate"])
    cum = _arr(result["cumulative_rate"])
    cov = _arr(result["coverage"])
    target = float(result["target"])
    mode = str(result["mode"])
    wb = int(result.get("warmup_batches", 0))
    fig, axes = _new_figure((7.0, 5.6), nrows=2)
    ax, ax2 = axes[0, 0], axes[1, 0]
    if 0 < wb <= x.size:
        for a in (ax, ax2):
            a.axvspan(0, x[wb - 1], color="0.9", zorder=0, label="warm-up" if a is ax else None)
    ax.plot(x, rate, ".", ms=3, color="C0", alpha=0.45, label="per batch")
    ax.plot(x, _rolling(rate, roll), "-", color="C0", lw=1.6, label=f"mean of last {roll} batches")
    ax.plot(x, cum, "-", color="C2", lw=1.2, label="cumulative")
    ax.axhline(target, color="k", ls="--", lw=1.2, label=f"target {target:g}")
    ax.set_ylabel(f"achieved {_RATE_NAME.get(mode, mode)}", fontsize=8)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax2.plot(x, cov, "-", color="C1", lw=1.2, label="accepted share per batch")
    ax2.set_xlabel("stream position (samples seen)")
    ax2.set_ylabel("coverage (fraction accepted)")
    ax2.set_ylim(-0.02, 1.02)
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=7, loc="lower right")
    head = f"{title}: " if title else ""
    ax.set_title(
        f"{head}SAG {mode}, window {result.get('window')}, batch {result.get('batch_size')}, "
        f"p_rand {result.get('p_rand', 0):g}",
        fontsize=10,
    )
    _banner(fig, banner)
    return _save(fig, path_stem, formats)


def plot_defer(
    curves: Mapping[str, Mapping[str, Any]],
    path_stem: Path,
    formats: Sequence[str] = ("pdf", "png"),
    *,
    points: Mapping[str, Mapping[str, float]] | None = None,
    view: str = "unweighted",
    title: str | None = None,
    banner: str | None = None,
) -> list[Path]:
    """System accuracy vs share kept by the model, one line per method.

    ``curves[name]`` = ``{"share_kept": [...], "accuracy": [...]}`` (:func:`argse_cli.l2d.
    defer_curve`); ``points[name]`` = one ``{"share_kept", "accuracy"}`` operating point drawn as
    a marker (e.g. the share the L2D gate keeps by itself), in the colour of the curve of the same
    name, with its own legend entry. ``banner`` is drawn in red below the plot.
    """
    fig, axes = _new_figure((6.4, 4.6))
    ax = axes[0, 0]
    for i, (name, c) in enumerate(curves.items()):
        ax.plot(
            np.asarray(c["share_kept"], dtype=np.float64),
            np.asarray(c["accuracy"], dtype=np.float64),
            color=f"C{i % 10}",
            lw=1.6,
            label=name,
        )
    names = list(curves)
    for j, (name, p) in enumerate((points or {}).items()):
        # the point of a drawn curve takes its colour and its own legend entry (never the curve's label)
        col = f"C{names.index(name) % 10}" if name in names else f"C{(len(names) + j) % 10}"
        ax.plot([p["share_kept"]], [p["accuracy"]], "o", ms=7, color=col, mec="k",
                label=f"{name}: the gate's own deferral choice" if name in names else name)
    ax.set_xlabel("share of samples kept by the model (fraction; rest deferred to a human)")
    ax.set_ylabel(f"system accuracy (fraction, {view})")
    ax.set_xlim(0.0, 1.0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    head = f"{title}: " if title else ""
    ax.set_title(f"{head}deferral: system accuracy vs share kept", fontsize=10)
    _banner(fig, banner)
    return _save(fig, path_stem, formats)
