"""Render a report artifact as one section of ``docs/RESULTS.md``: every number comes from the store.

``python -m argse_cli.report.markdown REPORT_KEY [--protocol protocol.json] [--store DIR]
[--command "make results-c100lt"] [--section NAME --into docs/RESULTS.md]`` prints the section, or
replaces the block between ``<!-- section:NAME -->`` and ``<!-- /section:NAME -->`` of the file
(appending it when absent), so several datasets share one document.

A section holds: the protocol in one paragraph, the data's provenance and caveats, head / tail
counts per split and fold, the experts' class-balanced accuracy, the refit-view main tables (mean
+- std over seeds, the seed-mean's bootstrap 95% CI), the verdict of the paired comparisons (with
Holm's correction), the sweep-view and ablation tables, and the wall time of each stage.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path
from typing import Any

VIEW_NAME = {"lt": "long-tailed weights (w_lt)", "bal": "balanced weights (w_bal)"}
STAT_NAME = {
    "aurc_balanced": "balanced AURC",
    "aurc_worst": "worst-group AURC",
    "aurc_standard": "standard AURC",
}


def _fmt(m: Any, s: Any) -> str:
    if m is None:
        return "–"
    return f"{m:.4f}" if not s or s < 5e-5 else f"{m:.4f} ± {s:.4f}"


def _table(tab: dict, levels: list[float]) -> list[str]:
    cols = (
        ["aurc_balanced", "aurc_worst"]
        + [f"balanced_error@{lv:g}" for lv in levels]
        + [f"worst_error@{lv:g}" for lv in levels]
    )
    head = [
        "method",
        "seeds",
        "bal. AURC",
        "95% CI",
        "worst AURC",
        "95% CI",
        *[f"bal. err @{lv:g}" for lv in levels],
        *[f"worst err @{lv:g}" for lv in levels],
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in tab["rows"].items():
        cells = [name, str(len(row[cols[0]]["seeds"]))]
        for c in cols:
            cell = _fmt(row[c]["mean"], row[c]["std"])
            if tab.get("bold", {}).get(c) == name:
                cell = f"**{cell}**"
            cells.append(cell)
            if c.startswith("aurc"):
                lo, hi = row[c]["ci"]
                cells.append(f"[{lo:.4f}, {hi:.4f}]")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _verdict(doc: dict) -> list[str]:
    rows = doc.get("comparisons") or []
    if not rows:
        return []
    v = doc["verdict"]
    n_a = len({r["a"] for r in rows})
    out = [
        f"**Verdict.** {v['n']} paired comparisons (AR-GSE's {n_a} variant(s) against U-PI, SB-PI, "
        "Plug-in[Worst] and the CS-plug-in of each expert; balanced and worst-group AURC of the refit view; "
        "both views): after Holm's correction over all of them, AR-GSE is significantly better in "
        f"{v['wins']} and significantly worse in {v['losses']}; the rest are not significant "
        f"(uncorrected 95% CIs: {v['wins_raw']} better, {v['losses_raw']} worse)."
    ]
    for a in sorted({r["a"] for r in rows}):
        beats = sorted({r["b"] for r in rows if r["a"] == a and r["outcome_holm"] == "win"})
        loses = sorted({r["b"] for r in rows if r["a"] == a and r["outcome_holm"] == "loss"})
        if beats:
            out.append(
                f"- {a} significantly beats (in at least one metric and view): {', '.join(beats)}."
            )
        if loses:
            out.append(
                f"- {a} is significantly beaten by (in at least one metric and view): {', '.join(loses)}."
            )
        if not beats and not loses:
            out.append(f"- {a}: no significant difference to any of them.")
    out += [
        "",
        "| A | B | view | metric | A − B | 95% CI | p (bootstrap) | p (Holm) | outcome |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['a']} | {r['b']} | {r['view']} | {STAT_NAME.get(r['stat'], r['stat'])} | "
            f"{r['diff']:+.4f} | [{r['lo']:+.4f}, {r['hi']:+.4f}] | {r['p']:.3f} | {r['p_holm']:.3f} | "
            f"{r['outcome_holm']} |"
        )
    return out


def _counts(protocol: dict) -> list[str]:
    c = protocol.get("counts")
    if not c:
        return []
    if isinstance(c, dict):  # one set of splits
        c = [c]
    head = ["fold" if len(c) > 1 else "set"] + [f"{s} (head / tail)" for s in c[0]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k, fold in enumerate(c):
        lines.append("| " + " | ".join([str(k)] + [f"{h} / {t}" for h, t in fold.values()]) + " |")
    return lines


def _experts(protocol: dict) -> list[str]:
    ex = protocol.get("experts")
    if not ex:
        return []
    rule = any(e.get("rule_acc") is not None for e in ex)
    extra = " balanced-prior rule | rule head | rule tail |" if rule else ""
    lines = [
        "| expert | ResNet | epochs | class-balanced accuracy | head | tail |"
        + extra
        + " rows | train (s) |",
        "|---|---|---|---|---|---|" + ("---|---|---|" if rule else "") + "---|---|",
    ]
    for e in ex:
        cells = [
            e["name"],
            str(e.get("depth", "")),
            str(e.get("epochs", "")),
            f"{e['balanced_acc']:.4f}",
            f"{e['group_acc'][0]:.4f}",
            f"{e['group_acc'][-1]:.4f}",
        ]
        if rule:
            r = e.get("rule_acc")
            cells += ([f"{r:.4f}", f"{e['rule_group_acc'][0]:.4f}", f"{e['rule_group_acc'][-1]:.4f}"]
                      if r is not None else ["(same)", "", ""])  # fmt: skip
        cells += [
            str(e["rows"]),
            f"{e.get('train_s', 0.0):.0f}" + (" (shared)" if e.get("shared") else ""),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _wall_times(report_art: Any) -> list[str]:
    """Seconds spent per stage over every artifact upstream of the report (manifests' duration)."""
    seen: set[str] = set()
    tot: dict[str, list[float]] = {}
    todo = [report_art]
    while todo:
        a = todo.pop()
        if a.key in seen:
            continue
        seen.add(a.key)
        tot.setdefault(a.stage, []).append(float(a.manifest.get("duration_s") or 0.0))
        for role in a.upstream_keys:
            ups = a.upstream(role)
            todo += ups if isinstance(ups, list) else [ups]
    lines = ["| stage | artifacts | total (s) | mean (s) |", "|---|---|---|---|"]
    for st, v in sorted(tot.items(), key=lambda kv: -sum(kv[1])):
        lines.append(f"| {st} | {len(v)} | {sum(v):.0f} | {sum(v) / len(v):.1f} |")
    lines.append(
        f"| all | {sum(len(v) for v in tot.values())} | {sum(map(sum, tot.values())):.0f} | |"
    )
    return lines


def _computed_at(report_art: Any) -> str:
    """The commit (and dirty flag) the report artifact was computed at, from its manifest."""
    g = report_art.manifest.get("git") or {}
    if not g.get("commit"):
        return "computed at an unknown commit"
    return f"computed at commit `{g['commit'][:7]}`" + (
        " (working tree dirty)" if g.get("dirty") else " (clean)"
    )


def _git(written: Path | None = None) -> str:
    """HEAD and whether tracked files differ from it (the file being written does not count)."""
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
            ).stdout.strip()
            or "unknown"
        )
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.splitlines()
    except OSError:
        return "commit unknown"
    skip = written.resolve() if written is not None else None
    dirty = any(
        skip is None or Path(line[3:].strip()).resolve() != skip for line in status if line.strip()
    )
    return f"commit `{commit}`" + (" (working tree dirty)" if dirty else " (clean)")


def render(
    report_art: Any,
    protocol: dict | None,
    command: str,
    title: str | None = None,
    written: Path | None = None,
) -> str:
    from ..metrics import AURC_CONVENTION

    doc = report_art.json("summary.json")
    proto = protocol or {}
    levels = doc.get("levels", [0.7, 0.8, 0.9])
    out = [f"## {title or doc.get('title', 'argse')}", ""]
    if doc.get("banner"):
        out += [f"> **{doc['banner']}**", ""]
    out += [
        f"Generated by `{command}` (report artifact `{report_art.key[:16]}`, {_computed_at(report_art)}; "
        f"rendered at {_git(written)}); nothing below is "
        "typed by hand.",
        "",
    ]
    out += [
        "**Protocol.** " + (proto.get("text") or ""),
        "",
        "**Metric convention.** "
        + AURC_CONVENTION
        + " Group-balanced error = mean over the head and tail "
        "groups of the error among accepted samples of the group; worst-group error = the max; a group with "
        "no accepted sample counts as 1.0. Cells: mean ± std over gate seeds (deterministic baselines do not "
        f"vary). CI: {doc['bootstrap']['method']} ({doc['bootstrap']['n_boot']} resamples, 95%). Bold: the "
        "best mean whose paired-bootstrap CI of the difference to the runner-up lies below 0.",
        "",
    ]
    for cav in proto.get("caveats", []):
        out.append(f"- {cav}")
    if proto.get("caveats"):
        out.append("")
    if _counts(proto):
        out += ["### Head / tail rows per split", "", *_counts(proto), ""]
    if _experts(proto):
        out += ["### Experts", "", proto.get("experts_note", ""), "", *_experts(proto), ""]
    for key, title in (
        ("refit_lt", "Main table: refit view, long-tailed weights"),
        ("refit_bal", "Main table: refit view, balanced weights"),
    ):
        if key in doc["tables"]:
            out += [f"### {title}", "", *_table(doc["tables"][key], levels), ""]
    if doc.get("comparisons"):
        out += ["### Does AR-GSE beat the plug-in baselines?", "", *_verdict(doc), ""]
    for key, title in (
        ("ablations_lt", "Ablations (refit view, long-tailed weights)"),
        ("sweep_lt", "Secondary: sweep view of the operating points, long-tailed weights"),
        ("sweep_bal", "Secondary: sweep view of the operating points, balanced weights"),
    ):
        if key in doc["tables"]:
            out += [f"### {title}", "", *_table(doc["tables"][key], levels), ""]
    out += [
        "### Wall time per stage",
        "",
        "Summed from the artifacts' manifests (this machine, as run):",
        "",
        *_wall_times(report_art),
        "",
    ]
    if doc.get("warnings"):
        out += ["### Warnings", "", *[f"- {w}" for w in doc["warnings"]], ""]
    return "\n".join(out) + "\n"


def write_section(path: Path, name: str, text: str, title: str = "# Results") -> None:
    """Replace (or append) the block ``<!-- section:name --> ... <!-- /section:name -->`` of ``path``."""
    begin, end = f"<!-- section:{name} -->", f"<!-- /section:{name} -->"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    old = path.read_text() if path.exists() else f"{title}\n\n"
    pat = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    new = pat.sub(lambda _m: block, old) if pat.search(old) else old.rstrip() + "\n\n" + block
    path.write_text(new)


def main(argv: list[str] | None = None) -> None:
    from ..store import Store

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("report_key")
    ap.add_argument("--protocol", type=Path)
    ap.add_argument("--store", type=Path)
    ap.add_argument("--command", default="make results-c100lt")
    ap.add_argument("--title", help="the section's heading (default: the report's title)")
    ap.add_argument("--section", help="section name inside --into")
    ap.add_argument("--into", type=Path, help="the Markdown file whose section is replaced")
    a = ap.parse_args(argv)
    art = Store(a.store).open("report", a.report_key)
    proto = json.loads(a.protocol.read_text()) if a.protocol else None
    text = render(art, proto, a.command, a.title, a.into)
    if a.into is not None:
        write_section(a.into, a.section or "results", text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
