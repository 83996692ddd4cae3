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

from typing import Any

STAGE = "report"
VERSION = 13


def compute(cfg: Any, inputs: dict, out: Any, progress: Any) -> None:
    from ..errors import ArgseError
    from ..metrics.bootstrap import stat_names
    from ..report.compare import Methods, check_disjoint, comparisons, fold_order, pool
    from ..report.deferral_tables import deferral_tables
    from ..report.figure_set import report_figures
    from ..report.inputs import eval_warnings, fill_banner, gather
    from ..report.result_tables import StatsCache, jobs, new_summary, table_specs, write_table
    from ..report.sink import Sink

    results, levels = gather(inputs)
    if not results:
        raise ArgseError("report", "the inputs hold no results", "pass --eval KEY and/or --baselines KEY")
    folds = fold_order(results)  # content-defined: CIs do not move with the keys
    fold_info = check_disjoint(results, folds)
    progress.phase(f"loading results ({len(folds)} fold(s))")
    pooled, warnings = pool(results, folds, progress=progress)
    methods = Methods.of(pooled)
    cfg = cfg.model_copy(update={"banner": fill_banner(cfg.banner, inputs)})
    snames = stat_names(levels)
    sink = Sink(out, tuple(cfg.formats), new_summary(cfg, levels, folds, fold_info, inputs, warnings))
    doc = sink.doc
    if cfg.banner:
        progress.log(f"report banner: {cfg.banner}")
    stats = StatsCache(pooled, levels, cfg.n_boot)
    stats.prefill(jobs(methods), progress)
    for spec in table_specs(methods):
        write_table(sink, stats, spec, cfg, snames)
    comparisons(doc, stats, methods.evals, methods.targets, snames)
    report_figures(sink, pooled, methods, levels, cfg, warnings, progress)
    deferral_tables(inputs, sink, cfg)
    warnings += [w for w in eval_warnings(inputs) if w not in warnings]
    doc["warnings"] = warnings
    doc["methods"] = {n: {"kind": pooled[k].kind, "seeds": sorted(s for m, s in pooled if m == n)}
                      for k in sorted(pooled) for n in [k[0]]}
    out.json("summary.json", doc)
    sink.written.append("summary.json")
    out.meta.update(methods=methods.main, ablations=methods.ablations, sensitivity=len(methods.sensitivity),
                    n_folds=len(folds), seeds=sorted({k[1] for k in pooled}), levels=levels,
                    files=sorted(sink.written), warnings=warnings, verdict=doc.get("verdict"), banner=cfg.banner)
    for w in warnings:
        progress.warn(w)
    progress.log(f"report: {len(sink.written)} files, {len(methods.main)} methods, {len(folds)} fold(s)")


def summary(meta: dict) -> str:
    return (
        f"{len(meta.get('methods', []))} methods, seeds {meta.get('seeds')}, "
        f"{len(meta.get('files', []))} files"
    )
