"""`argse train-expert` SIGKILLed mid-training resumes from its last checkpoint: the rerun says so in
one line and publishes weights bit-equal to an uninterrupted run's; the metrics log is readable
while it runs and published with the artifact (CPU, deterministic, tiny synthetic pipeline)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from _tiny import kill_when

from argse_cli.store import Store

EPOCHS = 4  # killed once epoch 2 is checkpointed; the rerun trains the epochs left
PIPE = {
    "split": {"dataset": "cifar10", "imbalance_factor": 10, "seed": 0},
    "train_expert": {"losses": ["balsoftmax"], "depth": 8, "epochs": EPOCHS, "warmup_epochs": 1,
                     "batch_size": 32, "device": "cpu", "aug": "plan"},
}  # fmt: skip


def _env(store: Path, data: Path) -> dict[str, str]:
    return {**os.environ, "ARGSE_STORE": str(store), "ARGSE_DATA": str(data), "PYTHONUNBUFFERED": "1",
            "OMP_WAIT_POLICY": "PASSIVE", "COLUMNS": "200"}  # fmt: skip


def _argse(store: Path, data: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "argse_cli.cli", *args], env=_env(store, data),
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def _epoch_rows(path: Path) -> list[dict]:
    rows = []
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                r = json.loads(line)
                if "epoch" in r and "event" not in r:
                    rows.append(r)
    return rows


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from argse_cli.data.synthetic import write_synthetic_cifar10

    root = tmp_path_factory.mktemp("resume")
    data = root / "data"
    write_synthetic_cifar10(data, n_train_per_class=50, n_test_per_class=20, seed=1)
    cfg = root / "pipe.yaml"
    cfg.write_text(yaml.safe_dump(PIPE))
    ref = root / "ref"
    res = _argse(ref, data, "split", "-c", str(cfg), "-q")
    assert res.returncode == 0, res.stderr
    key = _argse(ref, data, "train-expert", "-c", str(cfg), "--print-key").stdout.strip()
    split_only = root / "split_only"
    shutil.copytree(ref, split_only)
    res = _argse(ref, data, "train-expert", "-c", str(cfg))
    assert res.returncode == 0, res.stderr
    assert "metrics log: " in res.stderr and f".pending-{key}" in res.stderr  # path printed at start
    return {"root": root, "data": data, "cfg": cfg, "ref": ref, "split_only": split_only, "key": key}


@pytest.mark.slow  # ~20 s on 2 cores; the loop-level resume is tested by tests/test_loop.py
def test_sigkill_then_rerun_resumes_bit_equal(world, tmp_path):
    key, data = world["key"], world["data"]
    store = tmp_path / "store"
    shutil.copytree(world["split_only"], store)
    pending = store / "train-expert" / f".pending-{key}"
    log = tmp_path / "killed.log"
    with open(log, "w") as fh:
        p = subprocess.Popen([sys.executable, "-m", "argse_cli.cli", "train-expert", "-c", str(world["cfg"]), "-q"],
                             env=_env(store, data), stdout=fh, stderr=subprocess.STDOUT)  # fmt: skip

        def epoch_two_done(_elapsed: float) -> bool:
            # kill once epoch 2's row is in the live log (its checkpoint was written just after)
            if len(_epoch_rows(pending / "metrics.jsonl")) < 2:
                return False
            time.sleep(0.05)
            return True

        kill_when(p, epoch_two_done, 600, poll=0.01)
    assert p.returncode == -signal.SIGKILL, log.read_text()[-2000:]
    assert not Store(store).exists("train-expert", key)
    done = [r["epoch"] for r in _epoch_rows(pending / "metrics.jsonl")]
    assert 2 <= done[-1] < EPOCHS
    assert (pending / "scratch" / "checkpoint" / "checkpoint.safetensors").is_file()

    res = _argse(store, data, "train-expert", "-c", str(world["cfg"]), "-q")
    assert res.returncode == 0, res.stderr
    resume_lines = [ln for ln in res.stderr.splitlines() if "resuming" in ln]
    assert len(resume_lines) == 1, res.stderr
    k = int(resume_lines[0].split("after epoch ")[1].split("/")[0])
    assert 2 <= k <= done[-1] and f"/{EPOCHS}" in resume_lines[0]
    assert f"wrote {key}" in res.stdout
    assert not pending.exists()  # published: the pending dir became the artifact

    a, b = Store(world["ref"]).open("train-expert", key), Store(store).open("train-expert", key)
    from safetensors.torch import load

    wa, wb = load(a.read_bytes("model.safetensors")), load(b.read_bytes("model.safetensors"))
    assert wa.keys() == wb.keys() and all(wa[n].equal(wb[n]) for n in wa)  # bit-equal weights
    assert a.array("test/per_class_acc").tolist() == b.array("test/per_class_acc").tolist()
    # the same per-epoch losses (the timings differ): epochs before the kill come from the checkpoint
    assert [h["loss"] for h in a.json("history.json")] == [h["loss"] for h in b.json("history.json")]
    assert b.verify() == []
    rows = [json.loads(x) for x in b.read_bytes("metrics.jsonl").decode().splitlines()]
    epochs = [r["epoch"] for r in rows if "event" not in r]
    assert epochs == [*done, *range(k + 1, EPOCHS + 1)]  # the killed run's rows, then the rerun's
    assert any(r.get("event") == "resumed" for r in rows)
    assert [r.get("resumed_from") for r in rows if r.get("epoch") == k + 1][-1] == k
    first = next(r for r in rows if "event" not in r)
    assert {"epoch", "epochs", "loss", "lr", "img_per_s", "time_s", "elapsed_s"} <= set(first)
