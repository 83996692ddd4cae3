"""Stage `report`: LaTeX (booktabs) tables, figures and paired comparisons from eval and baselines
artifacts, pooled over seeds and folds (:mod:`argse_cli.report.compare`).

Inputs: ``inputs["evals"]`` (one per AR-GSE variant, seed and fold) and ``inputs["baselines"]`` (one
per fold). Every (method, seed) is pooled over the folds (a holdout protocol has one fold); the
folds' test rows must be disjoint (asserted on source indices when recorded).

Files written (one table style, :func:`argse_cli.report.tables.table_env`: caption above, at most 3
lines, naming the view and the protocol; ``\\label``; booktabs; scaled down only when wider than the
text; the conventions in a note below; the config's ``banner`` under the caption):

- ``main.tex`` / ``main_balanced.tex``   refit view (the headline), ``w_lt`` / ``w_bal``
- ``sweep.tex`` / ``sweep_balanced.tex`` sweep view of the operating points (secondary)
- ``ablations.tex``, ``sensitivity.tex`` refit view, ``w_lt``, when present
- ``guarantees.tex``, ``sag.tex``, ``defer.tex`` risk control (with the target; "accepts nothing"
  for a rule that accepts nothing), SAG and learning to defer, when the evals have them
- ``figures.tex``  the RC figures with their captions
- ``summary.json``  every number: per-seed values, mean, std, seed-mean CI, bold, comparisons, the
  methods' kinds, warnings (the inputs' own, e.g. an L2D fit that did not converge), the banner
- ``rc_curves.json``  the figures' seed-mean curves and bands (``argse plot``)
- ``rc_{balanced,worst}_{lt,bal}.{pdf,png}``  refitted RC curves, mean over seeds (pooled folds),
  95% pointwise bootstrap bands (:mod:`argse_cli.report.bands`; ``bands``: headline / all / none)
- ``margin_<method>``, ``trajectories_<method>``, ``sag_<method>``, ``defer_<method>``  per AR-GSE
  variant (first seed, first fold)

Cells (``table_ci``): ``halfwidth`` = mean over seeds +- half-width of the seed-mean CI;
``column`` = mean +- std over seeds and a CI column after each AURC; ``none`` = mean +- std. CI: the
seed-mean statistic's class-stratified bootstrap 95% interval (``n_boot`` resamples of the pooled
test rows). Bold: the best mean whose paired-bootstrap CI of the difference to the runner-up lies
below 0. Comparisons: AR-GSE (balanced / worst) against U-PI, SB-PI, Plug-in[Worst] and the
CS-plug-in of each expert, with bootstrap p-values and Holm's correction across all comparisons.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

STAGE = "report"
VERSION = 8

VIEWS = ("lt", "bal")
COMPARE_STATS = ("aurc_balanced", "aurc_worst")
COMPARE_TARGETS = ("U-PI", "SB-PI", "Plug-in[Worst]")
"""The plug-in baselines AR-GSE is compared with (and every CS-plug-in); also the 'headline' bands."""
_PROTOCOL = {
    "refit": r"Refit view: the rule is re-fitted on validation data at each coverage and read on test "
             r"at that coverage (Chow-type rules: threshold sweep)",
    "sweep": r"Sweep view: each rule at its cost-matched operating point, a threshold swept over "
             r"its margin on test",
}


def _fold_of(art: Any) -> str:
    """The test set's identity: the export / import key the result was scored on."""
    if art.stage == "eval":
        return str(art.upstream("gate").upstream_keys["export"])
    return str(art.upstream_keys["export"])


def _eval_results(art: Any) -> list:
    from ..report.compare import Result, cached

    m = art.json("metrics.json")
    names = set(art.manifest.get("arrays", {}))

    def load() -> dict:
        d = {k: art.array(f"test/{k}") for k in ("score", "pred", "y", "w_lt", "w_bal")}
        d["class_to_group"] = art.array("class_to_group")
        d["source_index"] = art.array("test/source_index") if "test/source_index" in names else None
        d["refit"] = {v: (art.array(f"refit/{v}/score"), art.array(f"refit/{v}/pred")) for v in VIEWS}
        return d

    return [Result(name=str(m["method"]), method=str(m["method"]), seed=int(m.get("seed") or 0), kind="main",
                   setting=None, fold=_fold_of(art), source=f"eval/{art.key[:12]}", load=cached(load),
                   info={"operating_point": m.get("operating_point")},
                   gate=cached(lambda: art.upstream("gate")))]


def _baseline_results(art: Any) -> list:
    from ..report.compare import Result, cached

    b = art.json("baselines.json")
    names = set(art.manifest.get("arrays", {}))
    fold = _fold_of(art)

    @cached
    def shared() -> dict:
        d = {k: art.array(f"test/{k}") for k in ("y", "w_lt", "w_bal")}
        d["class_to_group"] = art.array("class_to_group")
        d["source_index"] = art.array("test/source_index") if "test/source_index" in names else None
        return d

    out = []
    for r in b.get("results", []):
        slug, kind = str(r["slug"]), r.get("group", "baseline")
        name = str(r["method"]) + (f" [{r['setting']}]" if kind == "ablation" and r.get("setting") else "")

        def load(slug: str = slug, refit: bool = r.get("refit") is not None) -> dict:
            d = {**shared(), "score": art.array(f"m/{slug}/score"), "pred": art.array(f"m/{slug}/pred")}
            d["refit"] = ({v: (art.array(f"m/{slug}/refit/{v}/score"), art.array(f"m/{slug}/refit/{v}/pred"))
                           for v in VIEWS} if refit else None)
            return d

        info = {k: r[k] for k in ("expert", "operating_coverage", "chosen_epoch") if k in r}
        out.append(Result(name=name, method=str(r["method"]), seed=int(r.get("seed") or 0), kind=kind,
                          setting=r.get("setting"), fold=fold, source=f"baselines/{art.key[:12]}:{slug}",
                          load=cached(load), info=info))
    return out


def gather(inputs: dict) -> tuple[list, list[float]]:
    results: list = []
    levels = None
    for art in inputs.get("evals") or []:
        results += _eval_results(art)
        levels = levels or art.json("metrics.json").get("levels")
    for art in inputs.get("baselines") or []:
        results += _baseline_results(art)
        levels = levels or art.json("baselines.json").get("levels")
    return results, [float(v) for v in (levels or (0.7, 0.8, 0.9))]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "method"


def _holm(pvals: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone)."""
    m = len(pvals)
    order = sorted(range(m), key=lambda i: pvals[i])
    adj, run = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        run = max(run, min(1.0, (m - rank) * pvals[i]))
        adj[i] = run
    return adj


def _jobs(eval_names: list[str], base_names: list[str], abl_names: list[str], sens_names: list[str],
          targets: list[str]) -> list[tuple[str, str, str]]:
    """Every (view, protocol, method) bootstrap the tables and comparisons need, once each, in order."""
    jobs: list[tuple[str, str, str]] = []
    main = eval_names + base_names
    for view in VIEWS:
        jobs += [(view, "refit", n) for n in main] + [(view, "sweep", n) for n in main]
    jobs += [("lt", "refit", n) for n in eval_names + abl_names + sens_names]
    jobs += [(v, "refit", n) for v in VIEWS for n in eval_names + targets]
    return list(dict.fromkeys(jobs))


def _note(protocol: str, cfg: Any, T: Any) -> str:
    """The conventions of a table (its note below the tabular)."""
    cells = {
        "halfwidth": r"Cells: mean over seeds $\pm$ half-width of the 95\% bootstrap CI of the seed mean "
                     f"({cfg.n_boot} class-stratified resamples of the pooled test rows; std over seeds "
                     r"in summary.json).",
        "column": r"Cells: mean $\pm$ std over seeds; 95\% CI: bootstrap CI of the seed mean "
                  f"({cfg.n_boot} class-stratified resamples of the pooled test rows).",
        "none": r"Cells: mean $\pm$ std over seeds (bootstrap CIs in summary.json).",
    }[cfg.table_ci]
    return f"{_PROTOCOL[protocol]}. {T.AURC_SENTENCE} {cells} {T.BOLD_RULE}"


def compute(cfg: Any, inputs: dict, out: Any, progress: Any) -> None:

    from ..errors import ArgseError
    from ..metrics import AURC_CONVENTION
    from ..metrics.bootstrap import stat_names
    from ..report import tables as T
    from ..report.compare import check_disjoint, compare, interval, method_stats, pool

    results, levels = gather(inputs)
    if not results:
        raise ArgseError("report", "the inputs hold no results", "pass --eval KEY and/or --baselines KEY")
    folds = sorted({r.fold for r in results})
    fold_info = check_disjoint(results, folds)
    progress.phase(f"loading results ({len(folds)} fold(s))")
    pooled, warnings = pool(results, folds, progress=progress)
    names_of = lambda kinds: list(dict.fromkeys(k[0] for k in sorted(pooled, key=lambda k: (  # noqa: E731
        ["main", "baseline", "ablation", "sensitivity"].index(pooled[k].kind), k)) if pooled[k].kind in kinds))
    eval_names, base_names = names_of(("main",)), names_of(("baseline",))
    abl_names, sens_names = names_of(("ablation",)), names_of(("sensitivity",))
    targets = [n for n in base_names if n in COMPARE_TARGETS or n.startswith("CS-plug-in")]
    title, formats = T.latex_escape(cfg.title), tuple(cfg.formats)
    cfg = cfg.model_copy(update={"banner": fill_banner(cfg.banner, inputs)})
    banner = T.latex_escape(cfg.banner) if cfg.banner else None
    cols, snames = T.default_columns(levels), stat_names(levels)
    doc: dict[str, Any] = {
        "title": cfg.title, "banner": cfg.banner, "levels": levels, "aurc_convention": AURC_CONVENTION,
        "folds": fold_info, "fold_keys": folds,
        "bootstrap": {"n_boot": cfg.n_boot, "seed": 0, "ci": 0.95,
                      "method": "class-stratified resamples of the pooled test rows; CI of the seed-mean statistic"},
        "table_ci": cfg.table_ci,
        "inputs": {"evals": [a.key for a in inputs.get("evals") or []],
                   "baselines": [a.key for a in inputs.get("baselines") or []]},
        "tables": {}, "comparisons": [], "figures": [], "warnings": warnings,
    }  # fmt: skip
    written: list[str] = []
    if cfg.banner:
        progress.log(f"report banner: {cfg.banner}")

    def write_tex(name: str, tex: str) -> None:
        out.file_path(name).write_text(tex)
        written.append(name)

    # every bootstrap up front, one progress step per (view, protocol, method)
    stats_cache: dict[tuple[str, str], dict] = {}
    jobs = [j for j in _jobs(eval_names, base_names, abl_names, sens_names, targets)
            if any(k[0] == j[2] for k in pooled)]
    progress.phase(f"bootstrap ({cfg.n_boot} resamples)")
    for i, (view, protocol, name) in enumerate(jobs, 1):
        stats_cache.setdefault((view, protocol), {}).update(
            method_stats(pooled, [name], view, protocol, levels, cfg.n_boot))
        progress(i, len(jobs), {"view": view, "protocol": protocol, "method": name})
    progress.phase(None)

    def stats(view: str, protocol: str, names: list[str]) -> dict:
        have = stats_cache.setdefault((view, protocol), {})
        need = [n for n in names if n not in have]
        have.update(method_stats(pooled, need, view, protocol, levels, cfg.n_boot))
        return {n: have[n] for n in names if n in have}

    def table(key: str, fname: str, names: list[str], sections: list[list[str]], view: str, protocol: str,
              what: str) -> None:
        ms = stats(view, protocol, names)
        if not ms:
            return
        values = {n: {s: ms[n].est[:, j].tolist() for j, s in enumerate(snames)} for n in ms}
        cis = {}
        for n, m in ms.items():
            lo, hi = interval(m.samples)
            cis[n] = {s: (float(lo[j]), float(hi[j])) for j, s in enumerate(snames)}
        bold, tests = {}, {}
        for j, s in enumerate(snames):
            ranked = sorted(ms, key=lambda n: float(ms[n].est[:, j].mean()))
            bold[s] = None
            if len(ranked) >= 2:
                c = compare(ms[ranked[0]], ms[ranked[1]])
                tests[s] = {"best": ranked[0], "runner_up": ranked[1], "diff": float(c["diff"][j]),
                            "lo": float(c["lo"][j]), "hi": float(c["hi"][j])}
                if c["hi"][j] < 0:
                    bold[s] = ranked[0]
        caption = f"{title}: {what} ({protocol} view, {T.VIEW_PHRASE[view]}); lower is better."
        write_tex(fname, T.main_table(values, cols, bold, caption, f"tab:{key}", sections=sections, ci=cis,
                                      ci_mode=cfg.table_ci, note=_note(protocol, cfg, T), banner=banner))
        rows = {}
        for n, m in ms.items():
            rows[n] = {s: {"values": values[n][s], "seeds": m.seeds, "mean": float(m.est[:, j].mean()),
                           "std": float(m.est[:, j].std(ddof=1)) if len(m.seeds) > 1 else None,
                           "ci": list(cis[n][s])} for j, s in enumerate(snames)}
        doc["tables"][key] = {"file": fname, "view": view, "protocol": protocol, "columns": snames,
                              "rows": rows, "bold": bold, "tests": tests}

    main = eval_names + base_names
    for view, suffix in (("lt", ""), ("bal", "_balanced")):
        table(f"refit_{view}", f"main{suffix}.tex", main, [eval_names, base_names], view, "refit",
              "selective classification on the test set")
        table(f"sweep_{view}", f"sweep{suffix}.tex", main, [eval_names, base_names], view, "sweep",
              "operating points swept over test (secondary view)")
    if abl_names:
        table("ablations_lt", "ablations.tex", eval_names + abl_names, [eval_names, abl_names], "lt", "refit",
              "ablations (AR-GSE rows for reference)")
    if sens_names:
        table("sensitivity_lt", "sensitivity.tex", sens_names, [sens_names], "lt", "refit", "sensitivity")
    _comparisons(doc, stats, eval_names, targets, snames, compare, _holm)
    _figures(out, doc, written, formats, pooled, eval_names, main, levels, cfg, warnings, progress, write_tex, T)
    _deferral(inputs, out, formats, written, doc, write_tex, cfg, T)
    warnings += [w for w in _eval_warnings(inputs) if w not in warnings]
    doc["warnings"] = warnings
    doc["methods"] = {n: {"kind": pooled[k].kind, "seeds": sorted(s for m, s in pooled if m == n)}
                      for k in sorted(pooled) for n in [k[0]]}
    out.json("summary.json", doc)
    written.append("summary.json")
    out.meta.update(methods=main, ablations=abl_names, sensitivity=len(sens_names), n_folds=len(folds),
                    seeds=sorted({k[1] for k in pooled}), levels=levels, files=sorted(written),
                    warnings=warnings, verdict=doc.get("verdict"), banner=cfg.banner)
    for w in warnings:
        progress.warn(w)
    progress.log(f"report: {len(written)} files, {len(main)} methods, {len(folds)} fold(s)")


def expert_epochs(inputs: dict) -> str:
    """The training epochs of the experts behind the inputs ("2", "2/200" when they differ, "?"
    for imported logits)."""
    seen: list[int] = []
    arts = list(inputs.get("baselines") or []) + [a.upstream("gate") for a in inputs.get("evals") or []]
    for a in arts:
        try:
            exp = a.upstream("export")
            experts = exp.upstream("experts") if "experts" in exp.upstream_keys else []
        except Exception:  # noqa: BLE001 - a missing upstream only loses the number
            continue
        seen += [int(e.config["epochs"]) for e in experts if "epochs" in e.config]
    vals = sorted(set(seen))
    return "/".join(map(str, vals)) if vals else "?"


def fill_banner(banner: str | None, inputs: dict) -> str | None:
    """The report config's banner with ``{expert_epochs}`` filled in (other text unchanged)."""
    if not banner or "{expert_epochs}" not in banner:
        return banner
    return banner.replace("{expert_epochs}", expert_epochs(inputs))


def _eval_warnings(inputs: dict) -> list[str]:
    """Warnings of the evals (their own, and the L2D fit's diagnostics for evals made before they
    were recorded), each prefixed with the method and the eval key."""
    from ..l2d import em_diagnostics

    out: list[str] = []
    for art in inputs.get("evals") or []:
        m = art.json("metrics.json")
        ws = list(m.get("warnings") or [])
        if m.get("l2d") and "diagnostics" not in m["l2d"]:
            fit = m["l2d"]["fit"]
            ws += em_diagnostics(fit["loglik"], fit["eps"], m["l2d"].get("human_noise"))["warnings"]
        out += [f"{m['method']} (eval {art.key[:12]}): {w}" for w in ws]
    return list(dict.fromkeys(out))


def _comparisons(doc: dict, stats: Callable, eval_names: list[str], targets: list[str], snames: list[str],
                 compare: Callable, holm: Callable) -> None:
    """AR-GSE (balanced / worst) against U-PI, SB-PI, Plug-in[Worst] and every CS-plug-in (refit view)."""
    import numpy as np

    rows = []
    for view in VIEWS:
        ms = stats(view, "refit", eval_names + targets)
        for a in [n for n in eval_names if n.startswith("AR-GSE") and n in ms]:
            for b in [n for n in targets if n in ms]:
                c = compare(ms[a], ms[b])
                d = ms[a].samples - ms[b].samples
                for stat in COMPARE_STATS:
                    j = snames.index(stat)
                    p = float(min(1.0, 2 * min(np.mean(d[:, j] <= 0), np.mean(d[:, j] >= 0))))
                    rows.append({"a": a, "b": b, "view": view, "stat": stat, "diff": float(c["diff"][j]),
                                 "lo": float(c["lo"][j]), "hi": float(c["hi"][j]), "p": p})
    for r, ph in zip(rows, holm([r["p"] for r in rows]), strict=True):
        r["p_holm"] = ph
        r["outcome"] = "win" if r["hi"] < 0 else "loss" if r["lo"] > 0 else "tie"
        r["outcome_holm"] = r["outcome"] if ph < 0.05 else "tie"
    doc["comparisons"] = rows
    wins = [r for r in rows if r["outcome_holm"] == "win"]
    losses = [r for r in rows if r["outcome_holm"] == "loss"]
    doc["verdict"] = {"n": len(rows), "wins": len(wins), "losses": len(losses),
                      "wins_raw": sum(r["outcome"] == "win" for r in rows),
                      "losses_raw": sum(r["outcome"] == "loss" for r in rows)}


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


def _figures(out: Any, doc: dict, written: list, formats: tuple, pooled: dict, eval_names: list[str],
             main: list[str], levels: list[float], cfg: Any, warnings: list[str], progress: Any,
             write_tex: Callable, T: Any) -> None:
    """RC figures (seed-mean curves, pointwise bootstrap bands), margins and gate training; the RC
    curves and bands also go to ``rc_curves.json`` (``argse plot``) and the captions to figures.tex."""
    from ..report import figures as F
    from ..report.bands import rc_band

    sets = {n: _unique_seeds(pooled, n) for n in main}
    sets = {n: v for n, v in sets.items() if v}
    banded = {"all": set(sets), "none": set(),
              "headline": {n for n in sets if n.startswith("AR-GSE") or n in COMPARE_TARGETS}}[cfg.bands]
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
    out.json("rc_curves.json", {"views": store, "levels": levels, "bands": cfg.bands,
                                "note": "seed-mean curves of the refit view (Chow-type rules: threshold sweep); "
                                        "band: 95% pointwise percentile interval over class-stratified bootstrap "
                                        "resamples of the pooled test rows"})
    written.append("rc_curves.json")
    captions = []
    for view in VIEWS:
        for kind in ("balanced", "worst"):
            stem = f"rc_{kind}_{view}"
            _figure(out, stem, formats, written, doc,
                    lambda path, c=store[view], k=kind, v=view: F.plot_rc_curves(
                        c, k, v, path, formats, levels=levels, title=cfg.title, subtitle="refit view",
                        banner=cfg.banner))
            captions.append((stem, _rc_caption(kind, view, cfg, levels, banded, T)))
    if any(f in formats for f in ("pdf", "png")):
        body = "\n".join(
            "\\begin{figure}[t]\n\\centering\n" f"\\includegraphics[width=\\linewidth]{{{stem}}}\n"
            f"\\caption{{{cap}}}\n\\label{{fig:{stem}}}\n\\end{{figure}}\n" for stem, cap in captions)
        write_tex("figures.tex", "% requires \\usepackage{graphicx}; the figures' files sit beside this file\n"
                  + body)
    used: set[str] = set()
    for n in eval_names:
        p = sorted(k for k in pooled if k[0] == n)
        if not p:
            continue
        p = pooled[p[0]]
        slug = _slug(n)
        while slug in used:
            slug += "-x"
        used.add(slug)
        score, _ = p.sweep
        _figure(out, f"margin_{slug}", formats, written, doc,
                lambda path, p=p, s=score, n=n: F.plot_margin_hist(s, p.c2g[p.y], path, formats, weights=p.w["lt"],
                                                                    view="lt", title=n, banner=cfg.banner))
        r = p.parts[0]
        try:
            gate = r.gate()
            hist = gate.json("history.json")
        except Exception as ex:  # noqa: BLE001 - a missing gate only loses one figure
            warnings.append(f"{n}: no gate history ({ex.__class__.__name__}: {ex})")
            continue
        if hist.get("epoch"):
            _figure(out, f"trajectories_{slug}", formats, written, doc,
                    lambda path, h=hist, g=gate, n=n: F.plot_training(
                        h, path, formats, chosen_epoch=g.meta.get("chosen_epoch"), title=n, banner=cfg.banner))


def _rc_caption(kind: str, view: str, cfg: Any, levels: list[float], banded: set, T: Any) -> str:
    """At most 3 lines: what is drawn, the view, the protocol, the bands and the guides."""
    what = {"balanced": "group-balanced", "worst": "worst-group"}[kind]
    lv = "/".join(f"{100 * x:g}" for x in levels)
    band = " Shaded: 95\\% pointwise bootstrap band." if banded else ""
    return (f"{T.latex_escape(cfg.title)}: {what} error vs coverage on test, {T.VIEW_PHRASE[view]}; refit view, "
            f"mean over seeds.{band} Dotted: the tables' coverages ({lv}\\%).")


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


def guarantee_rows(name: str, gm: dict, T: Any) -> list[str]:
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


def _deferral(inputs: dict, out: Any, formats: tuple, written: list, doc: dict,
              write_tex: Callable, cfg: Any, T: Any) -> None:
    """Tables and figures of risk control, SAG and learning to defer (first eval per method)."""
    from ..l2d import em_diagnostics
    from ..report.deferral_figures import plot_defer, plot_sag

    def f(v: Any) -> str:
        return "--" if v is None else f"{float(v):.3f}"

    banner = T.latex_escape(cfg.banner) if cfg.banner else None
    seen: set[str] = set()
    g_rows: list[str] = []
    s_rows, d_rows = [], []
    g_levels: set[tuple] = set()
    for art in inputs.get("evals") or []:
        m = art.json("metrics.json")
        name = str(m["method"])
        if name in seen:
            continue
        seen.add(name)
        esc, slug = T.latex_escape(name), _slug(name)
        if m.get("guarantees"):
            gm = m["guarantees"]
            if g_rows:
                g_rows.append(r"\midrule")
            g_rows += guarantee_rows(name, gm, T)
            g_levels.add((gm.get("delta"), gm.get("n_calib")))
            doc.setdefault("guarantees", {})[name] = gm
        if m.get("sag"):
            r = m["sag"]
            s_rows.append(f"{esc} & {r['mode']} & {r['target']:.2f} & {f(r.get('post_warmup_rate'))} & "
                          f"{f(r.get('post_warmup_coverage'))} \\\\")
            _figure(out, f"sag_{slug}", formats, written, doc,
                    lambda p, r=r, n=name: plot_sag(r, p, formats, title=n, banner=cfg.banner))
        if m.get("l2d"):
            dd = m["l2d"]
            op, fit = dd["l2d_operating_point"], dd["fit"]
            diag = dd.get("diagnostics") or em_diagnostics(fit["loglik"], fit["eps"], dd.get("human_noise"))
            sim = dd.get("human_noise") or []
            d_rows.append(f"{esc} & {f(op['share_kept'])} & {f(op['accuracy'])} & "
                          f"{'/'.join(f'{e:.3f}' for e in fit['eps'])} & {'/'.join(f'{e:g}' for e in sim) or '--'} & "
                          f"{'yes' if diag['converged'] else 'no'} \\\\")
            _figure(out, f"defer_{slug}", formats, written, doc,
                    lambda p, dd=dd, n=name: plot_defer(
                        {"L2D (EM gate)": dd["l2d"], "AR-GSE rejection as deferral": dd["argse"]}, p, formats,
                        points={"L2D (EM gate)": dd["l2d_operating_point"]}, title=n, banner=cfg.banner))

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
        write_tex("guarantees.tex", T.table_env(
            "lllcccc", head, g_rows, f"{T.latex_escape(cfg.title)}: risk-controlled thresholds fitted on calib, "
            "achieved on test.", "tab:guarantees", note=note, banner=banner))
    if s_rows:
        write_tex("sag.tex", T.table_env(
            "llccc", [r"Method & Mode & Target & Achieved after warm-up & Coverage \\"], s_rows,
            f"{T.latex_escape(cfg.title)}: SAG online thresholds on the test stream.", "tab:sag",
            note="The rate of the mode (sensitivity: share of errors rejected; specificity: share of correct "
                 "predictions accepted; success: correct outputs with rejections handled) after the warm-up "
                 "batches, against its target; coverage: share accepted after warm-up (--: the stream ended "
                 "within the warm-up).", banner=banner))
    if d_rows:
        write_tex("defer.tex", T.table_env(
            "lccccc", [r"Method & Share kept & System acc. & Fitted $\epsilon_h$ & Simulated & EM converged \\"],
            d_rows, f"{T.latex_escape(cfg.title)}: learning to defer to simulated humans (EM on calib, test shown).",
            "tab:defer",
            note="Share kept: samples the L2D gate keeps for the model by itself; system accuracy counts deferred "
                 r"samples by the chosen human's label. $\epsilon_h$: each human's fitted noise rate against the "
                 "simulated one (they differ when independent noisy humans do not follow the mixture model); "
                 "EM converged: last relative log-likelihood increase $\\le 10^{-6}$.", banner=banner))


def _figure(
    out: Any, stem: str, formats: tuple, written: list, doc: dict, draw: Callable[[Path], Any]
) -> None:
    """Register ``stem.<fmt>`` in the artifact and draw into the writer's files folder."""
    paths = [out.file_path(f"{stem}.{fmt}") for fmt in formats]
    if not paths:
        return
    draw(paths[0].parent / stem)
    names = [f"{stem}.{fmt}" for fmt in formats]
    written += names
    doc["figures"] += names


def summary(meta: dict) -> str:
    return (
        f"{len(meta.get('methods', []))} methods, seeds {meta.get('seeds')}, "
        f"{len(meta.get('files', []))} files"
    )


def export_to(art: Any, out_dir: Path) -> list[Path]:
    """Copy every file of a report artifact into ``out_dir`` (created); returns the copies.

    Copies out of the store are checksum-verified: every file is checked against the manifest
    before anything is written (a tampered file in the store is refused and nothing is copied),
    and each copy writes exactly the bytes that passed (temp file + rename)."""
    from ..store import check_out_dir, place_errno, place_error

    out_dir = check_out_dir(out_dir)
    names = sorted(art.manifest.get("files", {}))
    for name in names:
        art.read_bytes(name)  # IntegrityError (one line) on a tampered or missing file
    copied = []
    try:
        for name in names:
            dst = out_dir / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            art.copy_file(name, dst)
            copied.append(dst)
    except OSError as e:
        if place_errno(e) is None:
            raise
        raise place_error(e, "--out", out_dir) from None
    return copied
