"""docs/RESULTS.md: the verdict counts Holm-corrected outcomes, a win needs the paired CI below 0,
and a section is replaced in place (other sections untouched)."""

from argse_cli.report.markdown import _verdict, write_section


def _row(a, b, stat, view, lo, hi, p=0.01, p_holm=0.02):
    outcome = "win" if hi < 0 else "loss" if lo > 0 else "tie"
    return {"a": a, "b": b, "stat": stat, "view": view, "diff": (lo + hi) / 2, "lo": lo, "hi": hi, "p": p,
            "p_holm": p_holm, "outcome": outcome, "outcome_holm": outcome if p_holm < 0.05 else "tie"}


def _doc(rows):
    return {"comparisons": rows, "verdict": {
        "n": len(rows), "wins": sum(r["outcome_holm"] == "win" for r in rows),
        "losses": sum(r["outcome_holm"] == "loss" for r in rows),
        "wins_raw": sum(r["outcome"] == "win" for r in rows), "losses_raw": sum(r["outcome"] == "loss" for r in rows)}}


def test_verdict_counts_holm_outcomes_and_names_the_beaten():
    rows = [
        _row("AR-GSE (worst)", "U-PI", "aurc_worst", "bal", -0.15, -0.01),  # a win
        _row("AR-GSE (worst)", "SB-PI", "aurc_worst", "bal", -0.11, -0.001, p_holm=0.2),  # raw win, not after Holm
        _row("AR-GSE (balanced)", "U-PI", "aurc_balanced", "lt", 0.01, 0.05),  # a loss
        _row("AR-GSE (balanced)", "SB-PI", "aurc_balanced", "lt", -0.02, 0.03, p=0.5, p_holm=1.0),
    ]
    text = "\n".join(_verdict(_doc(rows)))
    assert "significantly better in 1 and significantly worse in 1" in text
    assert "uncorrected 95% CIs: 2 better, 1 worse" in text
    assert "AR-GSE (worst) significantly beats (in at least one metric and view): U-PI." in text
    assert "AR-GSE (balanced) is significantly beaten by (in at least one metric and view): U-PI." in text
    assert text.count("| AR-GSE") == 4  # one table row per comparison


def test_sections_are_replaced_in_place(tmp_path):
    f = tmp_path / "RESULTS.md"
    write_section(f, "c100lt", "## A\nold")
    write_section(f, "c10lt", "## B\nb")
    write_section(f, "c100lt", "## A\nnew")
    t = f.read_text()
    assert t.startswith("# Results") and "new" in t and "old" not in t
    assert t.index("section:c100lt") < t.index("section:c10lt") and t.count("## B") == 1
