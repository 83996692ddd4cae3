"""Results out of the store, for analysis in Python: tidy tables, figures, a gate's data.

- :func:`results` (``argse_cli.results(key)``): a tidy ``pandas.DataFrame`` of an eval or a
  report, one row per method x seed x view x protocol x metric (:data:`COLUMNS`);
  :func:`result_records` is the same as a list of dicts (no pandas needed);
- :func:`export_results` (``argse export-results KEY --format csv|parquet``);
- :func:`plot_rc` (``argse plot KEY``): the risk-coverage figure of an eval or a report;
- :func:`load_gate_split`: a stored gate's mixture eta, rule and labels / weights on one split.

CIs: an eval row carries its own bootstrap 95% CI (``ci_of = "bootstrap"``); a report row
carries the CI of its method's seed mean (``ci_of = "seed mean"``, the same on every seed row of
the method), and ``mean`` / ``std`` over seeds. pandas is an optional extra
(``pip install 'argse[results]'``).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from .errors import ArgseError

COLUMNS = ("source", "key", "method", "kind", "seed", "view", "protocol", "metric", "level", "value",
           "ci_lo", "ci_hi", "ci_of", "mean", "std", "n_seeds", "n_boot")
"""Columns of the tidy table, in order. ``source``: eval | report; ``kind``: main (AR-GSE evals),
baseline, ablation, sensitivity; ``view``: lt | bal; ``protocol``: refit | sweep; ``metric``:
``aurc_standard``, ``aurc_balanced``, ``aurc_worst``, ``balanced_error@L``, ``worst_error@L`` (and for
an eval's sweep view ``augrc``, ``ece``, ``nll``, ``coverage@margin0``); ``level``: L or empty."""

INSTALL_HINT = "pip install 'argse[results]' (pandas; parquet also needs pyarrow)"


def _store(store: Any) -> Any:
    from .store import Store

    return store if isinstance(store, Store) else Store(store)


def _open(key: str, store: Any) -> Any:
    s = _store(store)
    stage, full = s.resolve(key)
    if stage not in ("eval", "report"):
        raise ArgseError("key", f"{key} is a {stage} artifact", "pass an eval or a report key")
    return s.open(stage, full)


def _level(metric: str) -> float | None:
    """The coverage level of ``balanced_error@0.8`` (0.8); None for other metrics."""
    try:
        return float(metric.split("@", 1)[1]) if "@" in metric else None
    except ValueError:
        return None


def _row(**kw: Any) -> dict[str, Any]:
    r = dict.fromkeys(COLUMNS)
    r.update(kw)
    r["level"] = _level(r["metric"])
    return r


def _eval_rows(art: Any) -> list[dict[str, Any]]:
    from .metrics.bootstrap import stat_names

    m = art.json("metrics.json")
    levels = m.get("levels") or [0.7, 0.8, 0.9]
    names = stat_names(levels)
    base = {"source": "eval", "key": art.key, "method": m["method"], "kind": "main", "seed": m.get("seed"),
            "n_seeds": 1}
    rows = []
    for protocol in ("refit", "sweep"):
        for view, d in (m.get(protocol) or {}).get("views", {}).items():
            boot = (d.get("bootstrap") or {}).get("stats") or {}
            point = _point_stats(d, levels)
            for n in names:
                b = boot.get(n)
                value = b["estimate"] if b else point.get(n)
                if value is None:
                    continue
                rows.append(_row(**base, view=view, protocol=protocol, metric=n, value=float(value),
                                 ci_lo=b["lo"] if b else None, ci_hi=b["hi"] if b else None,
                                 ci_of="bootstrap" if b else None,
                                 n_boot=(d.get("bootstrap") or {}).get("n_boot") if b else None))
            if protocol == "sweep":
                extra = {"augrc": d.get("augrc"), "ece": d.get("ece"), "nll": d.get("nll"),
                         "coverage@margin0": (d.get("at_margin_0") or {}).get("coverage")}
                for n, v in extra.items():
                    if v is not None:
                        rows.append(_row(**base, view=view, protocol=protocol, metric=n, value=float(v)))
    return rows


def _point_stats(d: dict, levels: list[float]) -> dict[str, float]:
    """The statistics of a view without a bootstrap (n_boot = 0), from its AURCs and errors."""
    out = {f"aurc_{k}": v for k, v in (d.get("aurc") or {}).items()}
    e = d.get("errors_at_coverage") or {}
    bal = e.get("balanced_error", e.get("balanced"))
    worst = e.get("worst_group_error", e.get("worst"))
    for i, lv in enumerate(e.get("levels", levels)):
        if bal is not None:
            out[f"balanced_error@{lv:g}"] = bal[i]
        if worst is not None:
            out[f"worst_error@{lv:g}"] = worst[i]
    return out


def _report_rows(art: Any) -> list[dict[str, Any]]:
    doc = art.json("summary.json")
    kinds = {n: d.get("kind") for n, d in (doc.get("methods") or {}).items()}
    n_boot = (doc.get("bootstrap") or {}).get("n_boot")
    rows, seen = [], set()
    for t in doc.get("tables", {}).values():
        for method, stats in t["rows"].items():
            for metric, c in stats.items():
                for seed, v in zip(c["seeds"], c["values"], strict=True):
                    ident = (method, seed, t["view"], t["protocol"], metric)
                    if ident in seen:  # the ablation table repeats the AR-GSE rows
                        continue
                    seen.add(ident)
                    lo, hi = c.get("ci") or (None, None)
                    rows.append(_row(source="report", key=art.key, method=method, kind=kinds.get(method), seed=seed,
                                     view=t["view"], protocol=t["protocol"], metric=metric, value=v, ci_lo=lo,
                                     ci_hi=hi, ci_of="seed mean", mean=c.get("mean"), std=c.get("std"),
                                     n_seeds=len(c["seeds"]), n_boot=n_boot))
    return rows


def result_records(key: str, store: Any = None) -> list[dict[str, Any]]:
    """The tidy rows (dicts with :data:`COLUMNS`) of an eval or a report artifact (key or prefix)."""
    art = _open(key, store)
    return _eval_rows(art) if art.stage == "eval" else _report_rows(art)


def _pandas() -> Any:
    try:
        import pandas as pd
    except ImportError:
        raise ArgseError("pandas", "not installed (an optional extra)", INSTALL_HINT) from None
    return pd


def results(key: str, store: Any = None) -> Any:
    """Tidy ``pandas.DataFrame`` of an eval or a report: one row per method x seed x view x
    protocol x metric, with CIs where the artifact has them (see :data:`COLUMNS`)."""
    return _frame(result_records(key, store))


def _frame(rows: list[dict[str, Any]]) -> Any:
    pd = _pandas()
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    for c in ("level", "value", "ci_lo", "ci_hi", "mean", "std"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("float64")  # None -> NaN
    for c in ("seed", "n_seeds", "n_boot"):
        df[c] = df[c].astype("Int64")
    return df


def export_results(key: str, fmt: str = "csv", out: str | Path | None = None, store: Any = None) -> str:
    """Write the tidy table as plain CSV (no pandas needed) or Parquet; returns the path."""
    rows = result_records(key, store)
    art_key = rows[0]["key"] if rows else key
    out = Path(out) if out is not None else Path(f"results_{art_key[:12]}.{fmt}")
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        with open(out, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(COLUMNS))
            w.writeheader()
            for r in rows:
                w.writerow({k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else v)
                            for k, v in r.items()})
    elif fmt == "parquet":
        _pandas()
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ArgseError("--format", "parquet needs pyarrow (not installed)", INSTALL_HINT) from None
        _frame(rows).to_parquet(out, index=False)
    else:
        raise ArgseError("--format", f"{fmt!r} is not csv or parquet", "pass --format csv or --format parquet")
    return str(out)


# ------------------------------------------------------------------------------ figures
def rc_curves_of(art: Any) -> tuple[dict[str, dict], list[float], str]:
    """({view: {label: curve dict (with a band when stored)}}, levels, protocol note) of an eval
    (its refit and sweep curves) or a report (every method's seed-mean curve)."""
    if art.stage == "report":
        if "rc_curves.json" not in art.manifest.get("files", {}):
            raise ArgseError("key", f"report {art.key[:12]} predates stored RC curves",
                             "rerun `argse report ... --force` with this version")
        d = art.json("rc_curves.json")
        return d["views"], d.get("levels", [0.7, 0.8, 0.9]), "refit view"
    m = art.json("metrics.json")
    sweep = art.json("rc_curves.json")
    files = art.manifest.get("files", {})
    bands = art.json("rc_bands.json") if "rc_bands.json" in files else {}
    out: dict[str, dict] = {}
    for view, d in m["refit"]["views"].items():
        out[view] = {}
        for protocol, curve in (("refit", d["curve"]), ("sweep", sweep.get(view, {}).get(m["method"]))):
            if curve is None:
                continue
            c = dict(curve)
            b = bands.get(view, {}).get(protocol)
            if b:
                c["band"] = b
            out[view][f"{m['method']} ({protocol})"] = c
    return out, m.get("levels", [0.7, 0.8, 0.9]), "refit and sweep views"


def plot_rc(key: str, kind: str = "balanced", view: str = "lt", out: str | Path | None = None,
            store: Any = None) -> str:
    """Draw the risk-coverage figure of an eval or a report to ``out`` (.png or .pdf); returns it."""
    from .report.figures import plot_rc_curves

    art = _open(key, store)
    curves, levels, subtitle = rc_curves_of(art)
    if view not in curves:
        raise ArgseError("--view", f"{view!r} is not in the artifact ({', '.join(curves)})", "pass --view lt or bal")
    out = Path(out) if out is not None else Path(f"rc_{kind}_{view}_{art.key[:12]}.png")
    fmt = out.suffix.lower().lstrip(".")
    if fmt not in ("png", "pdf"):
        raise ArgseError("--out", f"{out} must end in .png or .pdf", "write e.g. --out rc.png")
    title = None
    banner = None
    if art.stage == "report":
        doc = art.json("summary.json")
        title, banner = doc.get("title"), doc.get("banner")
    paths = plot_rc_curves(curves[view], kind, view, out.with_suffix(""), (fmt,), levels=levels, title=title,
                           subtitle=subtitle, banner=banner)
    return str(paths[0])


# ------------------------------------------------------------------------------ data
def load_gate_split(key: str, split: str = "test", store: Any = None) -> dict[str, Any]:
    """A stored gate (train-gate key or prefix) on one held-out split of its logits.

    Returns ``eta`` [N, C] (the gate's mixture of the calibrated experts), ``post`` [N, E, C],
    ``logits`` (one raw [N, C] array per expert the gate uses, as stored), ``y``, ``w_lt``,
    ``w_bal``, ``group``, ``class_to_group``, and the operating-point rule: ``alpha``, ``mu``,
    ``beta`` (None = uniform) and ``c`` (accept iff ``plugin_margin(eta, alpha, mu, c, ...) >= 0``).
    """
    import numpy as np

    from .core.expert_data import load_posteriors
    from .core.gated import load_gate

    s = _store(store)
    art = s.open("train-gate", key)
    gr = load_gate(art)
    exp, cal = art.upstream("export"), art.upstream("calibrate")
    experts = art.meta.get("experts")
    names = set(exp.manifest.get("arrays", {}))
    if f"{split}/logits" not in names:
        have = sorted({n.split("/")[0] for n in names if n.endswith("/logits")})
        raise ArgseError("split", f"{split!r} is not a split of the gate's logits", f"one of {', '.join(have)}")
    d = load_posteriors(exp, cal, split, experts)
    raw = exp.array(f"{split}/logits")
    idx = list(experts) if experts is not None else list(range(raw.shape[1]))
    rule = gr.rule
    return {
        "eta": gr.mixture(d["post"]), "post": d["post"], "logits": [raw[:, e] for e in idx],
        "y": d["y"], "w_lt": d["w_lt"], "w_bal": d["w_bal"], "group": d["group"],
        "class_to_group": np.asarray(exp.array("class_to_group"), np.int64),
        "alpha": np.asarray(rule.alpha), "mu": np.asarray(rule.mu),
        "beta": None if art.meta.get("uniform_beta", True) else np.asarray(rule.beta), "c": float(rule.c),
        "gate_key": art.key, "export_key": exp.key,
    }
