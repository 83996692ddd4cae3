"""The report's result tables and summary.json's numbers: every (view, protocol, method) bootstrap
once (:class:`StatsCache`), the tables (:func:`table_specs`, :func:`write_table`: values per seed,
seed-mean CIs, the bold rule) and the summary document (:func:`new_summary`)."""

from __future__ import annotations

from typing import Any, NamedTuple

from . import tables as T
from .compare import VIEWS, Methods, compare, interval, method_stats
from .sink import Sink

PROTOCOL = {
    "refit": r"Refit view: the rule is re-fitted on validation data at each coverage and read on test "
             r"at that coverage (Chow-type rules: threshold sweep)",
    "sweep": r"Sweep view: each rule at its cost-matched operating point, a threshold swept over "
             r"its margin on test",
}


def new_summary(cfg: Any, levels: list[float], folds: list[str], fold_info: dict, inputs: dict,
                warnings: list[str]) -> dict:
    """summary.json before its tables, comparisons and figures are filled in."""
    from ..metrics import AURC_CONVENTION

    return {
        "title": cfg.title, "banner": cfg.banner, "levels": levels, "aurc_convention": AURC_CONVENTION,
        "folds": fold_info, "fold_keys": folds,
        "bootstrap": {"n_boot": cfg.n_boot, "seed": 0, "ci": 0.95,
                      "method": "class-stratified resamples of the pooled test rows; CI of the seed-mean statistic"},
        "table_ci": cfg.table_ci,
        "inputs": {"evals": [a.key for a in inputs.get("evals") or []],
                   "baselines": [a.key for a in inputs.get("baselines") or []]},
        "tables": {}, "comparisons": [], "figures": [], "warnings": warnings,
    }  # fmt: skip


def jobs(m: Methods) -> list[tuple[str, str, str]]:
    """Every (view, protocol, method) bootstrap the tables and comparisons need, once each, in order."""
    out: list[tuple[str, str, str]] = []
    for view in VIEWS:
        out += [(view, "refit", n) for n in m.main] + [(view, "sweep", n) for n in m.main]
    out += [("lt", "refit", n) for n in m.evals + m.ablations + m.sensitivity]
    out += [(v, "refit", n) for v in VIEWS for n in m.evals + m.targets]
    return list(dict.fromkeys(out))


class StatsCache:
    """:func:`argse_cli.report.compare.method_stats` per (view, protocol, method), computed once."""

    def __init__(self, pooled: dict, levels: list[float], n_boot: int):
        self.pooled, self.levels, self.n_boot = pooled, levels, n_boot
        self.cache: dict[tuple[str, str], dict] = {}

    def prefill(self, todo: list[tuple[str, str, str]], progress: Any) -> None:
        """Every bootstrap of ``todo`` up front, one progress step per (view, protocol, method)."""
        todo = [j for j in todo if any(k[0] == j[2] for k in self.pooled)]
        progress.phase(f"bootstrap ({self.n_boot} resamples)")
        for i, (view, protocol, name) in enumerate(todo, 1):
            self.cache.setdefault((view, protocol), {}).update(
                method_stats(self.pooled, [name], view, protocol, self.levels, self.n_boot))
            progress(i, len(todo), {"view": view, "protocol": protocol, "method": name})
        progress.phase(None)

    def __call__(self, view: str, protocol: str, names: list[str]) -> dict:
        have = self.cache.setdefault((view, protocol), {})
        need = [n for n in names if n not in have]
        have.update(method_stats(self.pooled, need, view, protocol, self.levels, self.n_boot))
        return {n: have[n] for n in names if n in have}


class TableSpec(NamedTuple):
    """One result table: its summary key, file, rows, row sections, view, protocol and caption text."""

    key: str
    fname: str
    names: list[str]
    sections: list[list[str]]
    view: str
    protocol: str
    what: str


def table_specs(m: Methods) -> list[TableSpec]:
    """main / sweep tables per view, then ablations and sensitivity when present."""
    specs = []
    for view, suffix in (("lt", ""), ("bal", "_balanced")):
        specs.append(TableSpec(f"refit_{view}", f"main{suffix}.tex", m.main, [m.evals, m.baselines], view, "refit",
                               "selective classification on the test set"))
        specs.append(TableSpec(f"sweep_{view}", f"sweep{suffix}.tex", m.main, [m.evals, m.baselines], view, "sweep",
                               "operating points swept over test (secondary view)"))
    if m.ablations:
        specs.append(TableSpec("ablations_lt", "ablations.tex", m.evals + m.ablations, [m.evals, m.ablations], "lt",
                               "refit", "ablations (AR-GSE rows for reference)"))
    if m.sensitivity:
        specs.append(TableSpec("sensitivity_lt", "sensitivity.tex", m.sensitivity, [m.sensitivity], "lt", "refit",
                               "sensitivity"))
    return specs


def note(protocol: str, cfg: Any) -> str:
    """The conventions of a table (its note below the tabular)."""
    cells = {
        "halfwidth": r"Cells: mean over seeds $\pm$ half-width of the 95\% bootstrap CI of the seed mean "
                     f"({cfg.n_boot} class-stratified resamples of the pooled test rows; std over seeds "
                     r"in summary.json).",
        "column": r"Cells: mean $\pm$ std over seeds; 95\% CI: bootstrap CI of the seed mean "
                  f"({cfg.n_boot} class-stratified resamples of the pooled test rows).",
        "none": r"Cells: mean $\pm$ std over seeds (bootstrap CIs in summary.json).",
    }[cfg.table_ci]
    return f"{PROTOCOL[protocol]}. {T.AURC_SENTENCE} {cells} {T.BOLD_RULE}"


def write_table(sink: Sink, stats: StatsCache, spec: TableSpec, cfg: Any, snames: list[str]) -> None:
    """One result table (nothing when none of its methods is pooled) and its entry in
    ``doc["tables"]``: per method and statistic the seed values, mean, std and seed-mean CI; bold =
    the best mean whose paired CI of the difference to the runner-up lies below 0."""
    ms = stats(spec.view, spec.protocol, spec.names)
    if not ms:
        return
    values = {n: {s: ms[n].est[:, j].tolist() for j, s in enumerate(snames)} for n in ms}
    cis = {}
    for n, m in ms.items():
        lo, hi = interval(m.samples)
        cis[n] = {s: (float(lo[j]), float(hi[j])) for j, s in enumerate(snames)}
    bold, tests = _bold(ms, snames)
    banner = T.latex_escape(cfg.banner) if cfg.banner else None
    caption = (f"{T.latex_escape(cfg.title)}: {spec.what} ({spec.protocol} view, {T.VIEW_PHRASE[spec.view]}); "
               "lower is better.")
    sink.tex(spec.fname, T.main_table(values, T.default_columns(stats.levels), bold, caption, f"tab:{spec.key}",
                                      sections=spec.sections, ci=cis, ci_mode=cfg.table_ci,
                                      note=note(spec.protocol, cfg), banner=banner))
    rows = {}
    for n, m in ms.items():
        rows[n] = {s: {"values": values[n][s], "seeds": m.seeds, "mean": float(m.est[:, j].mean()),
                       "std": float(m.est[:, j].std(ddof=1)) if len(m.seeds) > 1 else None,
                       "ci": list(cis[n][s])} for j, s in enumerate(snames)}
    sink.doc["tables"][spec.key] = {"file": spec.fname, "view": spec.view, "protocol": spec.protocol,
                                    "columns": snames, "rows": rows, "bold": bold, "tests": tests}


def _bold(ms: dict, snames: list[str]) -> tuple[dict, dict]:
    """Per statistic: the bold method (or None) and the best-vs-runner-up paired test."""
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
    return bold, tests
