"""The report's figures: seed-mean refitted RC curves with pointwise bootstrap bands (also in
``rc_curves.json`` for ``argse plot``, captions in ``figures.tex``), and per AR-GSE variant its
margin histogram and gate training curves (first seed, first fold)."""

from __future__ import annotations

from typing import Any

from . import tables as T
from .compare import COMPARE_TARGETS, VIEWS, Methods
from .sink import Sink, slug


def report_figures(sink: Sink, pooled: dict, methods: Methods, levels: list[float], cfg: Any, warnings: list[str],
                   progress: Any) -> None:
    """RC figures (seed-mean curves, pointwise bootstrap bands), margins and gate training; the RC
    curves and bands also go to ``rc_curves.json`` (``argse plot``) and the captions to figures.tex."""
    sets = {n: _unique_seeds(pooled, n) for n in methods.main}
    sets = {n: v for n, v in sets.items() if v}
    banded = {"all": set(sets), "none": set(),
              "headline": {n for n in sets if n.startswith("AR-GSE") or n in COMPARE_TARGETS}}[cfg.bands]
    store = _rc_curves(sets, banded, cfg, progress)
    sink.out.json("rc_curves.json", {"views": store, "levels": levels, "bands": cfg.bands,
                                     "note": "seed-mean curves of the refit view (Chow-type rules: threshold "
                                             "sweep); band: 95% pointwise percentile interval over "
                                             "class-stratified bootstrap resamples of the pooled test rows"})
    sink.written.append("rc_curves.json")
    _rc_figures(sink, store, levels, cfg, banded)
    _method_figures(sink, pooled, methods.evals, cfg, warnings)


def _rc_curves(sets: dict, banded: set, cfg: Any, progress: Any) -> dict[str, dict]:
    """{view: {method: seed-mean curves (and bands when banded)}} over each method's seeds."""
    from .bands import rc_band

    jobs = [(v, n) for v in VIEWS for n in sets]
    store: dict[str, dict] = {v: {} for v in VIEWS}
    progress.phase(f"RC curves and bands ({min(cfg.band_boot, cfg.n_boot)} resamples)")
    for i, (view, n) in enumerate(jobs, 1):
        ps = sets[n]
        arrs = [p.refit[view] if p.refit is not None else p.sweep for p in ps]
        p0 = ps[0]
        nb = min(cfg.band_boot, cfg.n_boot) if n in banded else 0
        b = rc_band(arrs, p0.y, p0.c2g, p0.w[view], n_boot=nb, kinds=("risk", "balanced_risk", "worst_risk"))
        c = {"coverage": b["risk"]["coverage"], **{k: b[k]["mean"] for k in b}, "seeds": [p.seed for p in ps],
             "protocol": "refit" if p0.refit is not None else "sweep"}
        if n in banded:
            c["band"] = {k: {"lo": b[k]["lo"], "hi": b[k]["hi"]} for k in ("balanced_risk", "worst_risk")}
            c["band_boot"] = nb
        store[view][n] = c
        progress(i, len(jobs), {"view": view, "method": n})
    progress.phase(None)
    return store


def _rc_figures(sink: Sink, store: dict, levels: list[float], cfg: Any, banded: set) -> None:
    """rc_{balanced,worst}_{lt,bal} and figures.tex (when a drawn format is asked for)."""
    from . import figures as F

    formats = sink.formats
    captions = []
    for view in VIEWS:
        for kind in ("balanced", "worst"):
            stem = f"rc_{kind}_{view}"
            sink.figure(stem, lambda path, c=store[view], k=kind, v=view: F.plot_rc_curves(
                c, k, v, path, formats, levels=levels, title=cfg.title, subtitle="refit view", banner=cfg.banner))
            captions.append((stem, _rc_caption(kind, view, cfg, levels, banded)))
    if any(f in formats for f in ("pdf", "png")):
        body = "\n".join(
            "\\begin{figure}[t]\n\\centering\n" f"\\includegraphics[width=\\linewidth]{{{stem}}}\n"
            f"\\caption{{{cap}}}\n\\label{{fig:{stem}}}\n\\end{{figure}}\n" for stem, cap in captions)
        sink.tex("figures.tex", "% requires \\usepackage{graphicx}; the figures' files sit beside this file\n"
                 + body)


def _method_figures(sink: Sink, pooled: dict, eval_names: list[str], cfg: Any, warnings: list[str]) -> None:
    """margin_<method> and trajectories_<method> of each AR-GSE variant (its first seed and fold)."""
    from . import figures as F

    formats = sink.formats
    used: set[str] = set()
    for n in eval_names:
        p = sorted(k for k in pooled if k[0] == n)
        if not p:
            continue
        p = pooled[p[0]]
        s = slug(n)
        while s in used:
            s += "-x"
        used.add(s)
        score, _ = p.sweep
        sink.figure(f"margin_{s}", lambda path, p=p, sc=score, n=n: F.plot_margin_hist(
            sc, p.c2g[p.y], path, formats, weights=p.w["lt"], view="lt", title=n, banner=cfg.banner))
        r = p.parts[0]
        try:
            gate = r.gate()
            hist = gate.json("history.json")
        except Exception as ex:  # noqa: BLE001 - a missing gate only loses one figure
            warnings.append(f"{n}: no gate history ({ex.__class__.__name__}: {ex})")
            continue
        if hist.get("epoch"):
            sink.figure(f"trajectories_{s}", lambda path, h=hist, g=gate, n=n: F.plot_training(
                h, path, formats, chosen_epoch=g.meta.get("chosen_epoch"), title=n, banner=cfg.banner))


def _unique_seeds(pooled: dict, name: str) -> list:
    """The pooled (method, seed) entries of ``name``, one per distinct set of source arrays (a
    deterministic baseline is listed once per gate seed with the same arrays: counted once)."""
    seen, out = set(), []
    for k in sorted(k for k in pooled if k[0] == name):
        src = tuple(r.source for r in pooled[k].parts)
        if src not in seen:
            seen.add(src)
            out.append(pooled[k])
    return out


def _rc_caption(kind: str, view: str, cfg: Any, levels: list[float], banded: set) -> str:
    """At most 3 lines: what is drawn, the view, the protocol, the bands and the guides."""
    what = {"balanced": "group-balanced", "worst": "worst-group"}[kind]
    lv = "/".join(f"{100 * x:g}" for x in levels)
    band = " Shaded: 95\\% pointwise bootstrap band." if banded else ""
    return (f"{T.latex_escape(cfg.title)}: {what} error vs coverage on test, {T.VIEW_PHRASE[view]}; refit view, "
            f"mean over seeds.{band} Dotted: the tables' coverages ({lv}\\%).")
