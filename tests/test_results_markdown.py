"""docs/RESULTS.md's verdict: AR-GSE is said to beat (or lose to) a baseline only where the paired
bootstrap, after Holm's correction over all comparisons, says so; the counts add up; the report's
banner heads the section."""

import numpy as np

from argse_cli.metrics.bootstrap import stat_names
from argse_cli.report.compare import MethodStats, compare
from argse_cli.report.markdown import _verdict
from argse_cli.stages.report import _comparisons, _holm

SNAMES = stat_names([0.7])


def _stats(shift: dict[str, float], seed: int = 0) -> dict[str, MethodStats]:
    """Bootstrap samples [B, S]: a shared baseline curve plus a per-method shift (+ small noise)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0.5, 0.02, (400, len(SNAMES)))
    out = {}
    for name, d in shift.items():
        smp = base + d + rng.normal(0, 0.002, base.shape)
        out[name] = MethodStats([42], smp.mean(axis=0, keepdims=True), smp)
    return out


def test_verdict_claims_only_holm_significant_differences():
    ms = _stats({"AR-GSE (worst)": -0.1, "U-PI": 0.0, "SB-PI": -0.1, "CS-plug-in (ce)": -0.3})
    doc: dict = {}
    _comparisons(doc, lambda view, protocol, names: {n: ms[n] for n in names if n in ms}, ["AR-GSE (worst)"],
                 ["U-PI", "SB-PI", "CS-plug-in (ce)"], SNAMES, compare, _holm)
    rows = doc["comparisons"]
    assert len(rows) == 3 * 2 * 2  # 3 baselines x 2 views x 2 statistics
    by_b = {b: {r["outcome_holm"] for r in rows if r["b"] == b} for b in ("U-PI", "SB-PI", "CS-plug-in (ce)")}
    assert by_b == {"U-PI": {"win"}, "SB-PI": {"tie"}, "CS-plug-in (ce)": {"loss"}}
    v = doc["verdict"]
    assert (v["n"], v["wins"], v["losses"]) == (12, 4, 4)
    text = "\n".join(_verdict(doc))
    assert "12 paired comparisons" in text and "significantly better in 4 and significantly worse in 4" in text
    assert "- AR-GSE (worst) significantly beats (in at least one metric and view): U-PI." in text
    assert "- AR-GSE (worst) is significantly beaten by (in at least one metric and view): CS-plug-in (ce)." in text
    assert "SB-PI" not in text.split("|")[0].split("beats")[-1]  # a tie is never claimed
    assert _verdict({"comparisons": []}) == []


def test_section_carries_the_banner(tmp_path):
    from argse_cli.report.markdown import render

    class Art:
        key = "0" * 32
        stage, upstream_keys, manifest = "report", {}, {"duration_s": 1.0}

        def json(self, name):
            return {"title": "t", "banner": "smoke recipe: numbers are not meaningful", "levels": [0.7],
                    "bootstrap": {"method": "m", "n_boot": 10}, "tables": {}}

    text = render(Art(), None, "cmd")
    assert text.splitlines()[2] == "> **smoke recipe: numbers are not meaningful**"
