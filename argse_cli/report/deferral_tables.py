"""Tables and figures of risk control (``guarantees.tex``), SAG (``sag.tex``) and learning to
defer (``defer.tex``), from the first eval of each method that has them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import tables as T
from .sink import Sink, slug

_RULES = {
    "ltt_binomial": ("LTT (binomial)", "risk"),
    "ltt_weighted_lt": (r"LTT (weighted, $w_{\mathrm{lt}}$)", "risk"),
    "ltt_per_group": ("LTT per group", "group"),
    "mondrian_conformal": ("Mondrian conformal", "conformal"),
}


def _accepts_nothing(d: dict) -> bool:
    """A risk-control rule that accepts nothing: its threshold(s) are +inf (None), or it accepts
    no test sample."""
    thr = d.get("thresholds", [d.get("threshold")])
    cov = (d.get("test", {}).get("unweighted") or {}).get("coverage")
    return bool(d.get("accepts_nothing")) or all(t is None for t in thr) or cov == 0


def guarantee_rows(name: str, gm: dict) -> list[str]:
    """Rows of guarantees.tex for one method: rule, target, test risk / coverage (unweighted, w_lt);
    a rule that accepts nothing says so instead of printing risk 1 at coverage 0."""
    def f(v: Any) -> str:
        return "--" if v is None else f"{float(v):.3f}"

    def cov(v: Any) -> str:
        return "1.000 (all)" if v is not None and float(v) >= 1 - 1e-12 else f(v)

    rows, first = [], True
    order = list(_RULES)
    for meth, d in sorted(gm.get("methods", {}).items(), key=lambda kv: order.index(kv[0]) if kv[0] in order
                          else len(order)):
        label, kind = _RULES.get(meth, (T.latex_escape(meth), "risk"))
        target = {"risk": f"$R \\le {gm['target']:g}$", "group": f"$R_k \\le {gm['target']:g}$",
                  "conformal": f"$P(\\mathrm{{acc}} \\mid \\mathrm{{err}}) \\le {gm['epsilon']:g}$"}[kind]
        cells = [T.latex_escape(name) if first else "", label, target]
        if _accepts_nothing(d):
            cells.append(r"\multicolumn{4}{c}{accepts nothing}")
        else:
            tv = d.get("test", {})
            u, lt = tv.get("unweighted") or {}, tv.get("lt") or {}
            cells += [f(u.get("risk")), cov(u.get("coverage")), f(lt.get("risk")), cov(lt.get("coverage"))]
        rows.append(" & ".join(cells) + r" \\")
        first = False
    return rows


@dataclass
class _Rows:
    """Table rows collected over the evals; ``g_levels``: the (delta, n_calib) of the guarantees."""

    g_rows: list[str] = field(default_factory=list)
    s_rows: list[str] = field(default_factory=list)
    d_rows: list[str] = field(default_factory=list)
    g_levels: set[tuple] = field(default_factory=set)


def _f(v: Any) -> str:
    return "--" if v is None else f"{float(v):.3f}"


def deferral_tables(inputs: dict, sink: Sink, cfg: Any) -> None:
    """Tables and figures of risk control, SAG and learning to defer (first eval per method)."""
    rows = _Rows()
    seen: set[str] = set()
    for art in inputs.get("evals") or []:
        m = art.json("metrics.json")
        name = str(m["method"])
        if name in seen:
            continue
        seen.add(name)
        _add(rows, name, m, sink, cfg)
    _write(rows, sink, cfg)


def _add(rows: _Rows, name: str, m: dict, sink: Sink, cfg: Any) -> None:
    """One eval's rows (and its SAG / deferral figures)."""
    from ..l2d import em_diagnostics
    from .deferral_figures import plot_defer, plot_sag

    esc, stem = T.latex_escape(name), slug(name)
    formats = sink.formats
    if m.get("guarantees"):
        gm = m["guarantees"]
        if rows.g_rows:
            rows.g_rows.append(r"\midrule")
        rows.g_rows += guarantee_rows(name, gm)
        rows.g_levels.add((gm.get("delta"), gm.get("n_calib")))
        sink.doc.setdefault("guarantees", {})[name] = gm
    if m.get("sag"):
        r = m["sag"]
        rows.s_rows.append(f"{esc} & {r['mode']} & {r['target']:.2f} & {_f(r.get('post_warmup_rate'))} & "
                           f"{_f(r.get('post_warmup_coverage'))} \\\\")
        sink.figure(f"sag_{stem}", lambda p, r=r, n=name: plot_sag(r, p, formats, title=n, banner=cfg.banner))
    if m.get("l2d"):
        dd = m["l2d"]
        op, fit = dd["l2d_operating_point"], dd["fit"]
        diag = dd.get("diagnostics") or em_diagnostics(fit["loglik"], fit["eps"], dd.get("human_noise"))
        sim = dd.get("human_noise") or []
        rows.d_rows.append(f"{esc} & {_f(op['share_kept'])} & {_f(op['accuracy'])} & "
                           f"{'/'.join(f'{e:.3f}' for e in fit['eps'])} & {'/'.join(f'{e:g}' for e in sim) or '--'} & "
                           f"{'yes' if diag['converged'] else 'no'} \\\\")
        sink.figure(f"defer_{stem}", lambda p, dd=dd, n=name: plot_defer(
            {"L2D (EM gate)": dd["l2d"], "AR-GSE rejection as deferral": dd["argse"]}, p, formats,
            points={"L2D (EM gate)": dd["l2d_operating_point"]}, title=n, banner=cfg.banner))


def _write(rows: _Rows, sink: Sink, cfg: Any) -> None:
    """guarantees.tex, sag.tex, defer.tex (those with rows)."""
    banner = T.latex_escape(cfg.banner) if cfg.banner else None
    g_rows, s_rows, d_rows, g_levels = rows.g_rows, rows.s_rows, rows.d_rows, rows.g_levels
    delta = ", ".join(sorted({f"{d:g}" for d, _ in g_levels if d is not None}))
    if g_rows:
        head = [r" & & & \multicolumn{2}{c}{unweighted} & \multicolumn{2}{c}{long-tailed ($w_{\mathrm{lt}}$)} \\",
                r"\cmidrule(lr){4-5} \cmidrule(lr){6-7}",
                r"Method & Threshold rule & Target & Test risk & Coverage & Test risk & Coverage \\"]
        note = (f"Each LTT target holds with probability $\\ge 1 - \\delta$, $\\delta = {delta or '--'}$: binomial for "
                r"the calib split as sampled (unweighted), weighted for the long-tailed view (bounded importance "
                r"weights), per group with Bonferroni over predicted-class groups; Mondrian conformal bounds "
                r"$P(\mathrm{accept} \mid \mathrm{error}, \mathrm{group})$. ``Accepts nothing'': no threshold "
                r"passed the test on calib. Risk of a view: error among accepted samples under its weights.")
        sink.tex("guarantees.tex", T.table_env(
            "lllcccc", head, g_rows, f"{T.latex_escape(cfg.title)}: risk-controlled thresholds fitted on calib, "
            "achieved on test.", "tab:guarantees", note=note, banner=banner))
    if s_rows:
        sink.tex("sag.tex", T.table_env(
            "llccc", [r"Method & Mode & Target & Achieved after warm-up & Coverage \\"], s_rows,
            f"{T.latex_escape(cfg.title)}: SAG online thresholds on the test stream.", "tab:sag",
            note="The rate of the mode (sensitivity: share of errors rejected; specificity: share of correct "
                 "predictions accepted; success: correct outputs with rejections handled) after the warm-up "
                 "batches, against its target; coverage: share accepted after warm-up (--: the stream ended "
                 "within the warm-up).", banner=banner))
    if d_rows:
        sink.tex("defer.tex", T.table_env(
            "lccccc", [r"Method & Share kept & System acc. & Fitted $\epsilon_h$ & Simulated & EM converged \\"],
            d_rows, f"{T.latex_escape(cfg.title)}: learning to defer to simulated humans (EM on calib, test shown).",
            "tab:defer",
            note="Share kept: samples the L2D gate keeps for the model by itself; system accuracy counts deferred "
                 r"samples by the chosen human's label. $\epsilon_h$: each human's fitted noise rate against the "
                 "simulated one (they differ when independent noisy humans do not follow the mixture model); "
                 "EM converged: last relative log-likelihood increase $\\le 10^{-6}$.", banner=banner))
