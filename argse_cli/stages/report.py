"""Stage `report`: LaTeX (booktabs) tables and PDF/PNG figures from eval and baselines artifacts.

Inputs: ``inputs["evals"]`` (eval artifacts, one per AR-GSE variant and seed) and
``inputs["baselines"]`` (baselines artifacts); either list may be empty. Results are gathered by
method name across seeds (a cell = mean +- std over seeds, ddof 1).

Files written (every table names its view and protocol in its caption):

- ``main.tex``           sweep view, long-tailed weights ``w_lt`` (the default target view)
- ``main_balanced.tex``  sweep view, balanced weights ``w_bal``
- ``refit.tex`` / ``refit_balanced.tex``  refit view (alpha, mu refitted at each coverage), if any
- ``ablations.tex``      ablation rows (+ the AR-GSE rows for reference), ``w_lt``, if any
- ``sensitivity.tex``    sensitivity rows (method x setting), ``w_lt``, if any
- ``summary.json``       every number in the tables (values per seed, mean, std, bold, tests)
- ``rc_{balanced,worst}_{lt,bal}.{pdf,png}``  RC curves, all main-table methods, first seed
- ``margin_<method>.{pdf,png}``  test-margin histogram per group (eval methods, first seed)
- ``trajectories_<method>.{pdf,png}``  gate-training trajectories (eval methods, first seed)
- ``sensitivity_lt.{pdf,png}``  balanced AURC per sensitivity setting, if any

Bold (see :func:`argse_cli.report.tables.choose_bold`): the lowest mean of a column is bold iff a
paired class-stratified bootstrap (:data:`N_BOOT` resamples) on the first seed it shares with the
runner-up puts the CI of their difference entirely below 0.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STAGE = "report"
VERSION = 6
CODE = ("stages/report.py", "report/*.py")

N_BOOT = 1000
"""Paired-bootstrap resamples behind the bold rule."""
BOOT_SEED = 0
VIEWS = ("lt", "bal")
_PROTOCOL_SWEEP = (
    r"Sweep view (each rule fitted once on validation data; a threshold is swept over its "
    r"margin on the test set)"
)
_PROTOCOL_REFIT = (
    r"Refit view (at each coverage, $\alpha$ and $\mu$ are refitted on tuneV; the test "
    r"threshold is set from test margins alone)"
)


@dataclass
class Entry:
    """One (method, seed) result from an eval or baselines artifact."""

    name: str  # row label (method, or "method [setting]" for ablations)
    method: str
    seed: int
    kind: str  # "main" (eval) | "baseline" | "ablation" | "sensitivity"
    setting: str | None
    sweep: dict
    refit: dict | None
    curves: dict  # view -> RCCurve.to_dict()
    source: str
    arrays: Callable[[], dict] = field(repr=False)
    gate: Callable[[], Any] | None = field(default=None, repr=False)


def _cached(fn: Callable[[], Any]) -> Callable[[], Any]:
    box: list[Any] = []

    def get() -> Any:
        if not box:
            box.append(fn())
        return box[0]

    return get


def _files(art: Any) -> dict:
    return art.manifest.get("files", {})


def _eval_entries(art: Any) -> list[Entry]:
    m = art.json("metrics.json")
    method = str(m["method"])
    curves_all = art.json("rc_curves.json") if "rc_curves.json" in _files(art) else {}
    curves = {}
    for view, d in curves_all.items():
        if method in d:
            curves[view] = d[method]
        elif len(d) == 1:
            curves[view] = next(iter(d.values()))

    def arrays() -> dict:
        return {
            "score": art.array("test/score"),
            "pred": art.array("test/pred"),
            "y": art.array("test/y"),
            "class_to_group": art.array("class_to_group"),
            "w_lt": art.array("test/w_lt"),
            "w_bal": art.array("test/w_bal"),
        }

    def gate() -> Any:
        return art.upstream("gate")

    return [
        Entry(
            name=method,
            method=method,
            seed=int(m.get("seed", 0)),
            kind="main",
            setting=None,
            sweep=m["sweep"],
            refit=m.get("refit"),
            curves=curves,
            source=f"eval/{art.key[:12]}",
            arrays=_cached(arrays),
            gate=_cached(gate) if "gate" in art.upstream_keys else None,
        )
    ]


def _baseline_entries(art: Any) -> list[Entry]:
    b = art.json("baselines.json")
    curves_all = art.json("rc_curves.json") if "rc_curves.json" in _files(art) else {}

    @_cached
    def shared() -> dict:
        return {
            "y": art.array("test/y"),
            "class_to_group": art.array("class_to_group"),
            "w_lt": art.array("test/w_lt"),
            "w_bal": art.array("test/w_bal"),
        }

    out = []
    for r in b.get("results", []):
        slug = str(r["slug"])
        group = r.get("group", "baseline")
        kind = group if group in ("baseline", "ablation", "sensitivity") else "baseline"
        setting = r.get("setting")
        name = str(r["method"])
        if kind == "ablation" and setting:
            name = f"{name} [{setting}]"

        def arrays(slug: str = slug) -> dict:
            return {
                "score": art.array(f"m/{slug}/score"),
                "pred": art.array(f"m/{slug}/pred"),
                **shared(),
            }

        curves = {v: d[slug] for v, d in curves_all.items() if slug in d}
        out.append(
            Entry(
                name=name,
                method=str(r["method"]),
                seed=int(r.get("seed", 0)),
                kind=kind,
                setting=None if setting is None else str(setting),
                sweep=r["sweep"],
                refit=r.get("refit"),
                curves=curves,
                source=f"baselines/{art.key[:12]}:{slug}",
                arrays=_cached(arrays),
            )
        )
    return out


def gather(inputs: dict) -> tuple[list[Entry], list[float], list[str]]:
    """All entries (duplicates of (kind, name, setting, seed) dropped), the levels, warnings."""
    entries: list[Entry] = []
    warnings: list[str] = []
    levels: list[float] | None = None
    for art in inputs.get("evals") or []:
        entries += _eval_entries(art)
        levels = levels or art.json("metrics.json").get("levels")
    for art in inputs.get("baselines") or []:
        entries += _baseline_entries(art)
        levels = levels or art.json("baselines.json").get("levels")
    seen: dict[tuple, str] = {}
    kept = []
    for e in entries:
        k = (
            e.kind == "sensitivity",
            e.name,
            e.setting if e.kind == "sensitivity" else None,
            e.seed,
        )
        if k in seen:
            warnings.append(
                f"{e.name} seed {e.seed}: {e.source} duplicates {seen[k]}; kept the first"
            )
            continue
        seen[k] = e.source
        kept.append(e)
    return kept, [float(v) for v in (levels or (0.7, 0.8, 0.9))], warnings


def _level_index(levels: list[float], lv: float) -> int | None:
    for i, v in enumerate(levels):
        if abs(float(v) - lv) < 1e-9:
            return i
    return None


def sweep_values(sweep: dict, view: str, levels: list[float]) -> dict[str, float]:
    """Column values of the sweep view: AURCs (standard/balanced/worst) and errors at levels."""
    v = (sweep.get("views") or {}).get(view)
    if v is None:
        return {}
    out = {f"aurc_{k}": float(x) for k, x in v.get("aurc", {}).items()}
    eac = v.get("errors_at_coverage") or {}
    for lv in levels:
        i = _level_index(eac.get("levels", []), lv)
        if i is not None:
            out[f"balanced_error@{lv:g}"] = float(eac["balanced"][i])
            out[f"worst_error@{lv:g}"] = float(eac["worst"][i])
    return out


def refit_values(refit: dict | None, view: str, levels: list[float]) -> dict[str, float]:
    """Column values of the refit view: balanced / worst-group error at each level."""
    v = (refit or {}).get(view)
    if not v:
        return {}
    out = {}
    for lv in levels:
        for row in v.get("rows", []):
            if abs(float(row["coverage"]) - lv) < 1e-9:
                out[f"balanced_error@{lv:g}"] = float(row["balanced_error"])
                out[f"worst_error@{lv:g}"] = float(row["worst_group_error"])
                break
    return out


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "method"


def _by_name(entries: list[Entry]) -> dict[str, list[Entry]]:
    out: dict[str, list[Entry]] = {}
    for e in entries:
        out.setdefault(e.name, []).append(e)
    for v in out.values():
        v.sort(key=lambda e: e.seed)
    return out


def _table_values(groups: dict[str, list[Entry]], fn: Callable[[Entry], dict]) -> dict:
    """name -> {"seeds": [...], col: [values in seed order]} (only seeds that have the value)."""
    out: dict[str, dict] = {}
    for name, es in groups.items():
        cols: dict[str, list[float]] = {}
        seeds: dict[str, list[int]] = {}
        for e in es:
            for k, x in fn(e).items():
                if x is not None and math.isfinite(x):
                    cols.setdefault(k, []).append(x)
                    seeds.setdefault(k, []).append(e.seed)
        if cols:
            out[name] = {"values": cols, "seeds": seeds}
    return out


def _summarise(vals: dict, columns: list, bold: dict, tests: dict, **info: Any) -> dict:
    from ..report.tables import mean_std

    rows = {}
    for name, d in vals.items():
        rows[name] = {}
        for c in columns:
            v = d["values"].get(c.key, [])
            m, s = mean_std(v)
            rows[name][c.key] = {
                "values": v,
                "seeds": d["seeds"].get(c.key, []),
                "mean": m,
                "std": s,
            }
    return {**info, "columns": [c.key for c in columns], "rows": rows, "bold": bold, "tests": tests}


def compute(cfg: Any, inputs: dict, out: Any, progress: Any) -> None:
    from ..metrics import AURC_CONVENTION
    from ..report import figures as F
    from ..report import tables as T

    entries, levels, warnings = gather(inputs)
    if not entries:
        from ..errors import ArgseError

        raise ArgseError(
            "report", "the inputs hold no results", "pass --eval KEY and/or --baselines KEY"
        )
    title = T.latex_escape(cfg.title)
    formats = tuple(cfg.formats)
    cols = T.default_columns(levels)
    lv_txt = "/".join(f"{100 * v:g}" for v in levels)
    bold_txt = (
        f"{T.BOLD_RULE} Paired test: {N_BOOT} class-stratified resamples of the test set of the "
        r"first seed both methods share, same weights; bold only if the best is lower."
    )
    doc: dict[str, Any] = {
        "title": cfg.title,
        "levels": levels,
        "aurc_convention": AURC_CONVENTION,
        "bold_rule": {"n_boot": N_BOOT, "seed": BOOT_SEED, "ci": 0.95},
        "inputs": {
            "evals": [a.key for a in inputs.get("evals") or []],
            "baselines": [a.key for a in inputs.get("baselines") or []],
        },
        "tables": {},
        "figures": [],
        "warnings": warnings,
    }
    written: list[str] = []

    def write_tex(name: str, tex: str) -> None:
        out.file_path(name).write_text(tex)
        written.append(name)

    main_groups = _by_name([e for e in entries if e.kind in ("main", "baseline")])
    eval_names = list(_by_name([e for e in entries if e.kind == "main"]))
    base_names = [n for n in main_groups if n not in eval_names]
    abl_groups = _by_name([e for e in entries if e.kind in ("main", "ablation")])
    abl_names = [n for n in abl_groups if n not in eval_names]

    def arrays_of(groups: dict[str, list[Entry]]) -> dict:
        return {n: {e.seed: e.arrays for e in es} for n, es in groups.items()}

    def sweep_table(
        fname: str, tkey: str, groups: dict, sections: list, view: str, label: str, what: str
    ) -> None:
        vals = _table_values(groups, lambda e: sweep_values(e.sweep, view, levels))
        if not vals:
            return
        progress.log(f"report: {fname}: paired bootstrap for the bold rule ({view})")
        bold, tests = T.choose_bold(
            {n: d["values"] for n, d in vals.items()},
            arrays_of(groups),
            {c.key: c.stat for c in cols},
            view=view,
            levels=levels,
            n_boot=N_BOOT,
            seed=BOOT_SEED,
        )
        caption = (
            f"{title}: {what}. {_PROTOCOL_SWEEP}, {T.VIEW_PHRASE[view]}. Lower is better. "
            f"{T.AURC_SENTENCE} Errors at {lv_txt}\\% weighted coverage. Mean $\\pm$ std over "
            f"seeds. {bold_txt}"
        )
        write_tex(
            fname,
            T.main_table(
                {n: d["values"] for n, d in vals.items()},
                cols,
                bold,
                caption,
                label,
                sections=sections,
            ),
        )
        doc["tables"][tkey] = _summarise(
            vals, cols, bold, tests, file=fname, view=view, protocol="sweep"
        )

    for view, fname in (("lt", "main.tex"), ("bal", "main_balanced.tex")):
        sweep_table(
            fname,
            f"main_{view}",
            main_groups,
            [eval_names, base_names],
            view,
            f"tab:main-{view}",
            "selective classification on the test set",
        )
    if abl_names:
        sweep_table(
            "ablations.tex",
            "ablations_lt",
            abl_groups,
            [eval_names, abl_names],
            "lt",
            "tab:ablations-lt",
            "ablations (AR-GSE rows for reference)",
        )

    rcols = T.refit_columns(levels)
    for view, fname in (("lt", "refit.tex"), ("bal", "refit_balanced.tex")):
        vals = _table_values(main_groups, lambda e, v=view: refit_values(e.refit, v, levels))
        if not vals:
            continue
        caption = (
            f"{title}: coverage-matched comparison. {_PROTOCOL_REFIT}, {T.VIEW_PHRASE[view]}. "
            f"Errors at {lv_txt}\\% weighted coverage; lower is better. Mean $\\pm$ std over "
            r"seeds. No bold: the refitted rules are not stored, so no paired test is run."
        )
        write_tex(
            fname,
            T.main_table(
                {n: d["values"] for n, d in vals.items()},
                rcols,
                None,
                caption,
                f"tab:refit-{view}",
                sections=[eval_names, base_names],
            ),
        )
        doc["tables"][f"refit_{view}"] = _summarise(
            vals, rcols, {}, {}, file=fname, view=view, protocol="refit"
        )

    sens = [e for e in entries if e.kind == "sensitivity"]
    if sens:
        keys: list[tuple[str, str | None]] = []
        for e in sens:
            if (e.method, e.setting) not in keys:
                keys.append((e.method, e.setting))
        rows = []
        for m, s in keys:
            es = sorted((e for e in sens if e.method == m and e.setting == s), key=lambda e: e.seed)
            vals = _table_values({m: es}, lambda e: sweep_values(e.sweep, "lt", levels))
            d = vals.get(m, {"values": {}, "seeds": {}})
            rows.append({"method": m, "setting": s, "values": d["values"], "seeds": d["seeds"]})
        caption = (
            f"{title}: sensitivity. {_PROTOCOL_SWEEP}, {T.VIEW_PHRASE['lt']}. Lower is better. "
            f"{T.AURC_SENTENCE} Mean $\\pm$ std over seeds. No bold."
        )
        write_tex("sensitivity.tex", T.sensitivity_table(rows, cols, caption, "tab:sensitivity-lt"))
        doc["tables"]["sensitivity_lt"] = {
            "file": "sensitivity.tex",
            "view": "lt",
            "protocol": "sweep",
            "columns": [c.key for c in cols],
            "rows": [
                {
                    **r,
                    "mean": {k: T.mean_std(v)[0] for k, v in r["values"].items()},
                    "std": {k: T.mean_std(v)[1] for k, v in r["values"].items()},
                }
                for r in rows
            ],
        }
        _figure(
            out,
            "sensitivity_lt",
            formats,
            written,
            doc,
            lambda p: F.plot_sensitivity(
                rows, p, formats, key="aurc_balanced", view="lt", title=cfg.title
            ),
        )

    # ---- figures
    first = {n: es[0] for n, es in main_groups.items()}
    for view in VIEWS:
        curves = {n: e.curves[view] for n, e in first.items() if view in e.curves}
        if not curves:
            continue
        for kind in ("balanced", "worst"):
            _figure(
                out,
                f"rc_{kind}_{view}",
                formats,
                written,
                doc,
                lambda p, c=curves, k=kind, v=view: F.plot_rc_curves(
                    c, k, v, p, formats, levels=levels, title=cfg.title
                ),
            )
    used: set[str] = set()
    for n in eval_names:
        e = first[n]
        slug = _slug(n)
        while slug in used:
            slug += "-x"
        used.add(slug)
        a = e.arrays()
        group = a["class_to_group"][a["y"]]
        _figure(
            out,
            f"margin_{slug}",
            formats,
            written,
            doc,
            lambda p, a=a, g=group, n=n: F.plot_margin_hist(
                a["score"], g, p, formats, weights=a["w_lt"], view="lt", title=n
            ),
        )
        if e.gate is None:
            continue
        try:
            gate = e.gate()
            hist = gate.json("history.json")
        except Exception as ex:  # noqa: BLE001 - a missing gate only loses one figure
            warnings.append(f"{n}: no gate history ({ex.__class__.__name__}: {ex})")
            continue
        gview = gate.meta.get("view") or gate.config.get("view") or "lt"
        chosen = gate.meta.get("chosen_epoch")
        _figure(
            out,
            f"trajectories_{slug}",
            formats,
            written,
            doc,
            lambda p, h=hist, gv=gview, c=chosen, n=n: F.plot_trajectories(
                h, p, formats, view=gv, chosen_epoch=c, title=n
            ),
        )

    _deferral(inputs, out, formats, written, doc, write_tex, cfg, T)
    out.json("summary.json", doc)
    written.append("summary.json")
    out.meta.update(
        methods=list(main_groups),
        ablations=abl_names,
        sensitivity=len(sens),
        seeds=sorted({e.seed for e in entries}),
        levels=levels,
        files=sorted(written),
        bold_main_lt=doc["tables"].get("main_lt", {}).get("bold", {}),
        warnings=warnings,
    )
    progress.log(f"report: {len(written)} files, {len(main_groups)} methods")


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
