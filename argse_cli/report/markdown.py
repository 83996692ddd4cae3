"""Render a report artifact as Markdown (``docs/RESULTS.md``): every number comes from the store.

``python -m argse_cli.report.markdown REPORT_KEY [--protocol protocol.json] [--store DIR]
[--command "make results-c100lt"]`` prints the document: the main tables (sweep view, long-tailed
and balanced weights) as mean +- std over seeds with the first seed's bootstrap 95% CI, the refit
view, paired-bootstrap comparisons of AR-GSE with U-PI and SB-PI, per-split group counts and the
metric convention.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path
from typing import Any

VIEW_NAME = {"lt": "long-tailed weights (w_lt)", "bal": "balanced weights (w_bal)"}


def _fmt(m: Any, s: Any) -> str:
    if m is None:
        return "–"
    return f"{m:.4f}" if not s or s < 5e-5 else f"{m:.4f} ± {s:.4f}"


def _boot_of(report_art: Any) -> dict[tuple[str, str], dict]:
    """(method, view) -> bootstrap stats of the method's first seed."""
    out: dict[tuple[str, str], dict] = {}
    for role in ("evals", "baselines"):
        for a in report_art.upstream(role) if role in report_art.upstream_keys else []:
            if a.stage == "eval":
                m = a.json("metrics.json")
                items = [(m["method"], m.get("seed"), m["sweep"])]
            else:
                items = [(r["method"] + (f" [{r['setting']}]" if r.get("group") == "ablation" and r.get("setting")
                                         else ""), r.get("seed"), r["sweep"])
                         for r in a.json("baselines.json")["results"]]
            for name, _seed, sweep in items:
                for view, d in sweep["views"].items():
                    if "bootstrap" in d and (name, view) not in out:
                        out[(name, view)] = d["bootstrap"]["stats"]
    return out


def _table(tab: dict, boot: dict, view: str, ci_cols: tuple[str, ...]) -> list[str]:
    cols = tab["columns"]
    head = ["method"]
    for c in cols:
        head.append(c)
        if c in ci_cols:
            head.append(f"{c} 95% CI (first seed)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in tab["rows"].items():
        cells = [name]
        for c in cols:
            cell = _fmt(row[c]["mean"], row[c]["std"])
            if tab.get("bold", {}).get(c) == name:
                cell = f"**{cell}**"
            cells.append(cell)
            if c in ci_cols:
                st = boot.get((name, view), {}).get(c)
                cells.append(f"[{st['lo']:.4f}, {st['hi']:.4f}]" if st else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _comparisons(report_art: Any, view: str) -> list[str]:
    """Paired bootstrap (first shared seed) of AR-GSE (balanced) against U-PI and SB-PI."""
    from ..metrics import paired_bootstrap_diff

    arrays: dict[str, dict] = {}
    for a in report_art.upstream("evals") if "evals" in report_art.upstream_keys else []:
        m = a.json("metrics.json")
        if m["method"] not in arrays:
            arrays[m["method"]] = {k: a.array(f"test/{k}") for k in ("score", "pred", "y", "w_lt", "w_bal")}
            arrays[m["method"]]["c2g"] = a.array("class_to_group")
    for b in report_art.upstream("baselines") if "baselines" in report_art.upstream_keys else []:
        res = b.json("baselines.json")["results"]
        shared = {k: b.array(f"test/{k}") for k in ("y", "w_lt", "w_bal")}
        for r in res:
            if r["method"] in ("U-PI", "SB-PI") and r["method"] not in arrays:
                arrays[r["method"]] = {"score": b.array(f"m/{r['slug']}/score"), "pred": b.array(f"m/{r['slug']}/pred"),
                                       **shared, "c2g": b.array("class_to_group")}
    rows = []
    w = "w_lt" if view == "lt" else "w_bal"
    for a_name in ("AR-GSE (balanced)", "AR-GSE (worst)"):
        if a_name not in arrays:
            continue
        A = arrays[a_name]
        for b_name in ("U-PI", "SB-PI"):
            if b_name not in arrays:
                continue
            B = arrays[b_name]
            d = paired_bootstrap_diff((A["score"], A["pred"], A["y"], A["c2g"], A[w]),
                                      (B["score"], B["pred"], B["y"], B["c2g"], B[w]), n_boot=1000, seed=0, view=view)
            for stat in ("aurc_balanced", "aurc_worst"):
                s = d["stats"][stat]
                outcome = "win" if s["hi"] < 0 else "loss" if s["lo"] > 0 else "tie"
                rows.append({"stat": stat, "view": view, "a": a_name, "b": b_name, "outcome": outcome,
                             "diff": s["diff"], "lo": s["lo"], "hi": s["hi"]})
    return rows


def _comparison_line(r: dict) -> str:
    a, b = r["a"], r["b"]
    verdict = {"win": f"{a} beats {b}", "loss": f"{b} beats {a}"}.get(
        r["outcome"], f"no significant difference ({a} vs {b})")
    return (f"- {r['stat']} ({VIEW_NAME[r['view']]}): {a} − {b} = {r['diff']:+.4f}, "
            f"95% CI [{r['lo']:+.4f}, {r['hi']:+.4f}] → {verdict}")


def _verdict(rows: list[dict]) -> list[str]:
    """One paragraph counting the paired comparisons; 'AR-GSE beats U-PI and SB-PI' is claimed for a
    (metric, view) only when one AR-GSE variant's CI of the difference excludes 0 against both."""
    def name(r: dict) -> str:
        return f"{r['a']} vs {r['b']}, {r['stat']}, {VIEW_NAME[r['view']]}"

    wins = [r for r in rows if r["outcome"] == "win"]
    losses = [r for r in rows if r["outcome"] == "loss"]
    both = sorted({(r["a"], r["stat"], r["view"]) for r in wins
                   if {w["b"] for w in wins if (w["a"], w["stat"], w["view"]) == (r["a"], r["stat"], r["view"])}
                   >= {"U-PI", "SB-PI"}})
    text = (f"**Verdict.** Of {len(rows)} paired comparisons (AURC differences, 95% paired-bootstrap CI), "
            f"AR-GSE is significantly better in {len(wins)}" + (f" ({'; '.join(map(name, wins))})" if wins else "")
            + f", significantly worse in {len(losses)}" + (f" ({'; '.join(map(name, losses))})" if losses else "")
            + f", and not significantly different in {len(rows) - len(wins) - len(losses)}. ")
    if both:
        text += "AR-GSE beats both U-PI and SB-PI for: " + "; ".join(
            f"{a}, {stat}, {VIEW_NAME[v]}" for a, stat, v in both) + "."
    else:
        text += "**AR-GSE does not beat U-PI and SB-PI on this data** (no metric and view where one AR-GSE variant is significantly better than both)."
    return [text]


def render(report_art: Any, protocol: dict | None, command: str) -> str:
    from ..metrics import AURC_CONVENTION

    doc = report_art.json("summary.json")
    boot = _boot_of(report_art)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=5).stdout.strip()
    except OSError:
        commit = "unknown"
    out = [f"# Results: {doc.get('title', 'argse')}", "",
           f"Generated by `{command}` (report artifact `{report_art.key[:16]}`, commit `{commit}`); "
           "nothing below is typed by hand.", "",
           "**Metric convention.** " + AURC_CONVENTION, "",
           "Group-balanced error = mean over head/tail groups of the error among accepted samples of the group; "
           "worst-group error = the max; a group with no accepted sample counts as error 1.0. Cells: mean ± std "
           "over gate seeds (deterministic baselines do not vary); the CI column is the class-stratified "
           "bootstrap 95% interval (1,000 resamples) of the first seed. Bold: best mean whose paired-bootstrap "
           "CI of the difference to the runner-up excludes 0. Nothing is tuned on test.", "",
           "**Commands** (`scripts/results_c100lt.sh`, run by `make results-c100lt`): "
           "`python -m argse_cli.data.c100lt NPZ build/c100lt` (clean protocol) → `argse import-logits` → "
           "`argse calibrate` → for seeds 42–46: `argse train-gate --beta balanced` and "
           "`--beta worst --xi 1.0`, `argse eval` on each → `argse baselines` → `argse report` → "
           "`python -m argse_cli.report.markdown REPORT_KEY`. Views: *sweep* (each rule fitted once on "
           "validation, threshold swept over its margin on test) and *refit* (alpha, mu refitted on tuneV "
           "at each coverage, lambda chosen on val_small).", ""]
    if protocol:
        out += ["## Splits (clean protocol)", "",
                f"val_lt: {protocol['val_lt_rows']} rows → {protocol['val_lt_distinct']} distinct images; "
                f"test_lt: {protocol['test_lt_rows']} rows → {protocol['test_lt_distinct']} distinct, minus "
                f"{protocol['test_dropped_shared_with_val']} images shared with val_lt.", "",
                "| split | head | tail |", "|---|---|---|"]
        out += [f"| {s} | {c[0]} | {c[1]} |" for s, c in protocol["counts"].items()]
        out.append("")
    for key, title in (("main_lt", "Sweep view, long-tailed weights (main table)"),
                       ("main_bal", "Sweep view, balanced weights"),
                       ("refit_lt", "Refit view, long-tailed weights"), ("refit_bal", "Refit view, balanced weights")):
        tab = doc["tables"].get(key)
        if not tab:
            continue
        view = "lt" if key.endswith("lt") else "bal"
        out += [f"## {title}", ""]
        out += _table(tab, boot, view, ("aurc_balanced", "aurc_worst") if key.startswith("main") else ())
        out.append("")
    rows = {view: _comparisons(report_art, view) for view in ("lt", "bal")}
    if any(rows.values()):
        out += ["## Does AR-GSE beat U-PI and SB-PI?", "", *_verdict(rows["lt"] + rows["bal"]), ""]
    for view in ("lt", "bal"):
        if rows[view]:
            out += [f"## AR-GSE against U-PI and SB-PI ({VIEW_NAME[view]}; paired bootstrap, first seed)", "",
                    *map(_comparison_line, rows[view]), ""]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    from ..store import Store

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("report_key")
    ap.add_argument("--protocol", type=Path)
    ap.add_argument("--store", type=Path)
    ap.add_argument("--command", default="make results-c100lt")
    a = ap.parse_args(argv)
    art = Store(a.store).open("report", a.report_key)
    proto = json.loads(a.protocol.read_text()) if a.protocol else None
    print(render(art, proto, a.command), end="")


if __name__ == "__main__":
    main()
