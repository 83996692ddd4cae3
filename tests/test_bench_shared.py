"""bench/bench_shared.py writes its JSON lines (stdout and --out) with the fields run_all.py and
bench/gpu_check.sh read (slow: the synthetic data set alone takes a while on 2 cores)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_shared_cpu_synthetic_lines(tmp_path):
    out = tmp_path / "shared.jsonl"
    p = subprocess.run(
        [sys.executable, "bench/bench_shared.py", "--device", "cpu", "--depth", "8", "--epochs", "1",
         "--synthetic", "--n-train", "600", "--n-test", "200", "--experts", "2", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")] == lines
    names = [d["name"] for d in lines]
    assert names == ["shared_train_throughput_E2_resnet8", "shared_acc_shortfall_E2_resnet8_1ep"]
    for d in lines:
        assert {"value", "unit", "reference", "ratio", "device", "commit", "data"} <= set(d)
    thr, acc = lines
    assert thr["ratio"] == pytest.approx(thr["value"] / thr["reference"], rel=1e-3)
    assert len(acc["bal_acc_shared"]) == len(acc["bal_acc_sequential"]) == 2
    assert acc["value"] == pytest.approx(
        max(s - h for s, h in zip(acc["bal_acc_sequential"], acc["bal_acc_shared"], strict=True)), abs=1e-3
    )
