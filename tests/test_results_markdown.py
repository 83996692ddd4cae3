"""docs/RESULTS.md's claims: 'A beats B' only where the paired-bootstrap CI excludes 0, and the
verdict says 'AR-GSE does not beat U-PI and SB-PI' unless one variant beats both on a metric/view."""

from argse_cli.report.markdown import _comparison_line, _verdict


def _row(a, b, stat, view, lo, hi):
    outcome = "win" if hi < 0 else "loss" if lo > 0 else "tie"
    return {"a": a, "b": b, "stat": stat, "view": view, "outcome": outcome,
            "diff": (lo + hi) / 2, "lo": lo, "hi": hi}  # fmt: skip


def test_comparison_line_names_the_winner_only_when_the_ci_excludes_zero():
    assert "AR-GSE (worst) beats U-PI" in _comparison_line(_row("AR-GSE (worst)", "U-PI", "aurc_worst", "bal", -0.15, -0.01))
    assert "U-PI beats AR-GSE (worst)" in _comparison_line(_row("AR-GSE (worst)", "U-PI", "aurc_worst", "bal", 0.01, 0.2))
    line = _comparison_line(_row("AR-GSE (worst)", "U-PI", "aurc_worst", "bal", -0.1, 0.0001))
    assert "no significant difference" in line and "beats" not in line


def test_verdict_needs_one_variant_to_beat_both_baselines():
    rows = [
        _row("AR-GSE (worst)", "U-PI", "aurc_worst", "bal", -0.15, -0.01),  # a win against U-PI only
        _row("AR-GSE (worst)", "SB-PI", "aurc_worst", "bal", -0.11, 0.04),
        _row("AR-GSE (balanced)", "SB-PI", "aurc_worst", "bal", -0.2, -0.05),  # other variant vs SB-PI
        _row("AR-GSE (balanced)", "U-PI", "aurc_balanced", "lt", 0.01, 0.05),  # a loss
    ]
    (text,) = _verdict(rows)
    assert "Of 4 paired comparisons" in text
    assert "significantly better in 2" in text and "significantly worse in 1" in text
    assert "not significantly different in 1" in text
    assert "does not beat U-PI and SB-PI" in text  # no single variant beats both on one metric/view
    rows[1] = _row("AR-GSE (worst)", "SB-PI", "aurc_worst", "bal", -0.11, -0.001)
    (text,) = _verdict(rows)
    assert "AR-GSE beats both U-PI and SB-PI for: AR-GSE (worst), aurc_worst" in text
    assert "does not beat" not in text
