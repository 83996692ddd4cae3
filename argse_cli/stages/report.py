"""Stage `report`: LaTeX (booktabs) tables, figures and paired comparisons from eval and baselines
artifacts, pooled over seeds and folds (:mod:`argse_cli.report.compare`).

Inputs: ``inputs["evals"]`` (one per AR-GSE variant, seed and fold) and ``inputs["baselines"]`` (one
per fold). Every (method, seed) is pooled over the folds (a holdout protocol has one fold); the
folds' test rows must be disjoint (asserted on source indices when recorded).

Files written (every table names its view and protocol in its caption):

- ``main.tex`` / ``main_balanced.tex``   refit view (the headline), ``w_lt`` / ``w_bal``
- ``sweep.tex`` / ``sweep_balanced.tex`` sweep view of the operating points (secondary)
- ``ablations.tex``, ``sensitivity.tex`` refit view, ``w_lt``, when present
- ``summary.json``  every number: per-seed values, mean, std, seed-mean CI, bold, comparisons
- ``rc_{balanced,worst}_{lt,bal}.{pdf,png}``  refitted RC curves (first seed, pooled folds)
- ``margin_<method>``, ``trajectories_<method>``  per AR-GSE variant (first seed, first fold)

Cells: mean +- std over seeds; CI: the seed-mean statistic's class-stratified bootstrap 95% interval
(``n_boot`` resamples of the pooled test rows). Bold: the best mean whose paired-bootstrap CI of the
difference to the runner-up lies below 0. Comparisons: AR-GSE (balanced / worst) against U-PI,
SB-PI, Plug-in[Worst] and the CS-plug-in of each expert, with bootstrap p-values and Holm's
correction across all comparisons.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

STAGE = "report"
VERSION = 7

VIEWS = ("lt", "bal")
COMPARE_STATS = ("aurc_balanced", "aurc_worst")
_PROTOCOL = {
    "refit": r"Refit view (the rule is re-fitted on validation data at each coverage and read on test "
             r"at that coverage; Chow-type rules: threshold sweep)",
    "sweep": r"Sweep view (each rule at its cost-matched operating point; a threshold is swept over "
             r"its margin on test)",
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
    pooled, warnings = pool(results, folds)
    names_of = lambda kinds: list(dict.fromkeys(k[0] for k in sorted(pooled, key=lambda k: (  # noqa: E731
        ["main", "baseline", "ablation", "sensitivity"].index(pooled[k].kind), k)) if pooled[k].kind in kinds))
    eval_names, base_names = names_of(("main",)), names_of(("baseline",))
    abl_names, sens_names = names_of(("ablation",)), names_of(("sensitivity",))
    title, formats = T.latex_escape(cfg.title), tuple(cfg.formats)
    cols, snames = T.default_columns(levels), stat_names(levels)
    doc: dict[str, Any] = {
        "title": cfg.title, "levels": levels, "aurc_convention": AURC_CONVENTION, "folds": fold_info,
        "fold_keys": folds, "bootstrap": {"n_boot": cfg.n_boot, "seed": 0, "ci": 0.95,
                                          "method": "class-stratified resamples of the pooled test rows; "
                                                    "CI of the seed-mean statistic"},
        "inputs": {"evals": [a.key for a in inputs.get("evals") or []],
                   "baselines": [a.key for a in inputs.get("baselines") or []]},
        "tables": {}, "comparisons": [], "figures": [], "warnings": warnings,
    }  # fmt: skip
    written: list[str] = []

    def write_tex(name: str, tex: str) -> None:
        out.file_path(name).write_text(tex)
        written.append(name)

    stats_cache: dict[tuple[str, str], dict] = {}

    def stats(view: str, protocol: str, names: list[str]) -> dict:
        have = stats_cache.setdefault((view, protocol), {})
        need = [n for n in names if n not in have]
        have.update(method_stats(pooled, need, view, protocol, levels, cfg.n_boot, progress=progress.log))
        return {n: have[n] for n in names if n in have}

    def table(key: str, fname: str, names: list[str], sections: list[list[str]], view: str, protocol: str,
              what: str) -> None:
        ms = stats(view, protocol, names)
        if not ms:
            return
        values = {n: {s: ms[n].est[:, j].tolist() for j, s in enumerate(snames)} for n in ms}
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
        caption = (f"{title}: {what}. {_PROTOCOL[protocol]}, {T.VIEW_PHRASE[view]}. Lower is better. "
                   f"{T.AURC_SENTENCE} Mean $\\pm$ std over seeds. {T.BOLD_RULE}")
        write_tex(fname, T.main_table(values, cols, bold, caption, f"tab:{key}", sections=sections))
        rows = {}
        for n, m in ms.items():
            lo, hi = interval(m.samples)
            rows[n] = {s: {"values": values[n][s], "seeds": m.seeds, "mean": float(m.est[:, j].mean()),
                           "std": float(m.est[:, j].std(ddof=1)) if len(m.seeds) > 1 else None,
                           "ci": [float(lo[j]), float(hi[j])]} for j, s in enumerate(snames)}
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
    _comparisons(doc, stats, eval_names, base_names, snames, compare, _holm)
    _figures(out, doc, written, formats, pooled, eval_names, main, levels, cfg, warnings)
    _deferral(inputs, out, formats, written, doc, write_tex, cfg, T)
    out.json("summary.json", doc)
    written.append("summary.json")
    out.meta.update(methods=main, ablations=abl_names, sensitivity=len(sens_names), n_folds=len(folds),
                    seeds=sorted({k[1] for k in pooled}), levels=levels, files=sorted(written),
                    warnings=warnings, verdict=doc.get("verdict"))
    progress.log(f"report: {len(written)} files, {len(main)} methods, {len(folds)} fold(s)")


def _comparisons(doc: dict, stats: Callable, eval_names: list[str], base_names: list[str], snames: list[str],
                 compare: Callable, holm: Callable) -> None:
    """AR-GSE (balanced / worst) against U-PI, SB-PI, Plug-in[Worst] and every CS-plug-in (refit view)."""
    import numpy as np

    targets = [n for n in base_names if n in ("U-PI", "SB-PI", "Plug-in[Worst]") or n.startswith("CS-plug-in")]
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


def _figures(out: Any, doc: dict, written: list, formats: tuple, pooled: dict, eval_names: list[str],
             main: list[str], levels: list[float], cfg: Any, warnings: list[str]) -> None:
    from ..metrics.rc import rc_curve
    from ..metrics.refit import refit_rc
    from ..report import figures as F

    first = {}
    for n in main:
        keys = sorted(k for k in pooled if k[0] == n)
        if keys:
            first[n] = pooled[keys[0]]
    for view in VIEWS:
        curves = {}
        for n, p in first.items():
            if p.refit is not None:
                S, P = p.refit[view]
                curves[n] = refit_rc(S, P, p.y, p.c2g, p.w[view], view=view).to_dict()
            else:
                curves[n] = rc_curve(*p.sweep, p.y, p.c2g, p.w[view], view=view).to_dict()
        for kind in ("balanced", "worst"):
            _figure(out, f"rc_{kind}_{view}", formats, written, doc,
                    lambda path, c=curves, k=kind, v=view: F.plot_rc_curves(c, k, v, path, formats, levels=levels,
                                                                             title=cfg.title))
    used: set[str] = set()
    for n in eval_names:
        p = first[n]
        slug = _slug(n)
        while slug in used:
            slug += "-x"
        used.add(slug)
        score, _ = p.sweep
        _figure(out, f"margin_{slug}", formats, written, doc,
                lambda path, p=p, s=score, n=n: F.plot_margin_hist(s, p.c2g[p.y], path, formats, weights=p.w["lt"],
                                                                    view="lt", title=n))
        r = p.parts[0]
        try:
            gate = r.gate()
            hist = gate.json("history.json")
        except Exception as ex:  # noqa: BLE001 - a missing gate only loses one figure
            warnings.append(f"{n}: no gate history ({ex.__class__.__name__}: {ex})")
            continue
        if hist.get("epoch"):
            _figure(out, f"trajectories_{slug}", formats, written, doc,
                    lambda path, h=hist, g=gate: F.plot_training(h, path, formats,
                                                                  chosen_epoch=g.meta.get("chosen_epoch")))


def _deferral(inputs: dict, out: Any, formats: tuple, written: list, doc: dict,
              write_tex: Callable, cfg: Any, T: Any) -> None:
    """Tables and figures of risk control, SAG and learning to defer (first eval per method)."""
    from ..report.deferral_figures import plot_defer, plot_sag

    def f(v: Any) -> str:
        return "--" if v is None else f"{float(v):.3f}"

    seen: set[str] = set()
    g_rows, s_rows, d_rows = [], [], []
    for art in inputs.get("evals") or []:
        m = art.json("metrics.json")
        name = str(m["method"])
        if name in seen:
            continue
        seen.add(name)
        esc, slug = T.latex_escape(name), _slug(name)
        if m.get("guarantees"):
            gm = m["guarantees"]
            for meth, d in gm.get("methods", {}).items():
                tv = d.get("test", {})
                g_rows.append(f"{esc} & {T.latex_escape(meth)} & {f(tv.get('unweighted', {}).get('risk'))} & "
                              f"{f(tv.get('unweighted', {}).get('coverage'))} & {f(tv.get('lt', {}).get('risk'))} & "
                              f"{f(tv.get('lt', {}).get('coverage'))} \\\\")
            doc.setdefault("guarantees", {})[name] = gm
        if m.get("sag"):
            r = m["sag"]
            s_rows.append(f"{esc} & {r['mode']} & {r['target']:.2f} & {f(r.get('post_warmup_rate'))} & "
                          f"{f(r.get('post_warmup_coverage'))} \\\\")
            _figure(out, f"sag_{slug}", formats, written, doc,
                    lambda p, r=r, n=name: plot_sag(r, p, formats, title=f"{n}: SAG {r['mode']}"))
        if m.get("l2d"):
            dd = m["l2d"]
            op = dd["l2d_operating_point"]
            d_rows.append(f"{esc} & {f(op['share_kept'])} & {f(op['accuracy'])} & "
                          f"{', '.join(f'{e:.3f}' for e in dd['fit']['eps'])} \\\\")
            _figure(out, f"defer_{slug}", formats, written, doc,
                    lambda p, dd=dd: plot_defer({"L2D (EM gate)": dd["l2d"], "AR-GSE rejection as deferral": dd["argse"]},
                                                p, formats, points={"L2D (EM gate)": dd["l2d_operating_point"]}))

    def table(fname: str, head: str, spec: str, rows: list, caption: str) -> None:
        if rows:
            write_tex(fname, "\\begin{table}[t]\\centering\n\\begin{tabular}{" + spec + "}\n\\toprule\n" + head
                      + " \\\\\n\\midrule\n" + "\n".join(rows) + "\n\\bottomrule\n\\end{tabular}\n\\caption{"
                      + caption + "}\n\\end{table}\n")

    table("guarantees.tex", "method & threshold rule & test risk & coverage & test risk (LT) & coverage (LT)",
          "llrrrr", g_rows, "Risk-controlled thresholds fitted on calib, achieved on test. LTT binomial: guarantee "
          "for the calib split as sampled (unweighted); weighted LTT: long-tailed view (bounded importance "
          "weights); per-group: Bonferroni over predicted-class groups; Mondrian: P(accept | error, group).")
    table("sag.tex", "method & mode & target & achieved (after warm-up) & coverage", "llrrr", s_rows,
          "SAG online thresholds on the test stream: the rate achieved after warm-up against its target.")
    table("defer.tex", "method & share kept (L2D gate) & system accuracy & fitted human noise", "lrrl", d_rows,
          "Learning to defer to simulated humans (EM on calib, test shown); system accuracy counts deferred "
          "samples by the chosen human's label.")


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
