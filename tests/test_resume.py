"""Resumable pending artifacts: ``Store.writer(..., resumable=True)``.

A resumable writer works in ``<root>/<stage>/.pending-<key>/``. A SIGKILLed writer leaves it
behind; the next writer of the key finds its ``scratch/`` (checkpoints) and ``metrics.jsonl`` and
says ``resumed``; everything else there is discarded. Publishing removes the pending dir and the
metrics log becomes the checksummed side file ``metrics.jsonl`` of the artifact.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xxhash

from argse_cli.store import FILES, METRICS, SCRATCH, Store, compute_key

REPO = Path(__file__).resolve().parents[1]
KEY = compute_key("s", 1, {"resume": 1})

# A stage-like writer: 8 "epochs", a checkpoint in scratch/ after each, one metrics line per epoch
# (epoch 1's loss is NaN: written as null). Killed mode stops at epoch KILL_AT and waits to be
# SIGKILLed; the partial array "partial" exists on disk at that moment.
WORKER = r"""
import json, sys, time
import numpy as np
from argse_cli.store import Store
root, key, mode, replace = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
kill_at = 4
s = Store(root)
with s.lock("s", key):
    if s.exists("s", key) and not replace:
        print(json.dumps({"outcome": "cached"}), flush=True)
        raise SystemExit(0)
    with s.writer("s", key, config={"resume": 1}, upstream={}, upstream_stages={}, version=1,
                  replace=replace, resumable=True) as out:
        ck = out.scratch("ckpt/state.json")
        start = json.loads(ck.read_text())["epoch"] + 1 if ck.exists() else 0
        print(json.dumps({"resumed": out.resumed, "start": start, "pending": str(out.pending),
                          "metrics": str(out.metrics_path)}), flush=True)
        for epoch in range(start, 8):
            loss = float("nan") if epoch == 1 else 1.0 / (epoch + 1)
            out.log_metrics({"epoch": epoch, "loss": loss, "lr": np.float32(0.1)})
            ck.write_text(json.dumps({"epoch": epoch}))
            if mode == "kill" and epoch == kill_at:
                out.array("partial", np.arange(5))
                out.json("partial.json", {"half": True})
                print(json.dumps({"ready": True}), flush=True)
                time.sleep(120)
            if mode == "slow":
                time.sleep(0.05)
        out.array("x", np.arange(10) + (100 if replace else 0))
    print(json.dumps({"outcome": "wrote" if out.published else "cached"}), flush=True)
"""


def _start(root: Path, mode: str, replace: bool = False, key: str = KEY) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, str(root), key, mode, "1" if replace else "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def _lines(p: subprocess.Popen, timeout: float = 120) -> list[dict]:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err[-3000:]
    return [json.loads(x) for x in out.splitlines()]


def _kill_at_ready(root: Path, replace: bool = False) -> dict:
    p = _start(root, "kill", replace)
    try:
        first = json.loads(p.stdout.readline())
        assert json.loads(p.stdout.readline()) == {"ready": True}
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL
    return first


def _metrics(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_killed_writer_resumes_from_scratch_and_keeps_its_metrics(store_root):
    store = Store(store_root)
    first = _kill_at_ready(store_root)
    assert first["resumed"] is False and first["start"] == 0
    pending = Path(first["pending"])
    assert pending == store_root / "s" / f".pending-{KEY}" == store.pending_dir("s", KEY)
    assert Path(first["metrics"]) == pending / METRICS
    # the kill left the pending dir: checkpoint, metrics so far, and a partial array / side file
    assert not store.exists("s", KEY) and store.list() == []
    assert json.loads((pending / SCRATCH / "ckpt" / "state.json").read_text()) == {"epoch": 4}
    before = _metrics(pending / METRICS)
    assert [r["epoch"] for r in before] == [0, 1, 2, 3, 4]
    assert before[1]["loss"] is None  # NaN -> null (allow_nan=False)
    assert before[0]["lr"] == pytest.approx(0.1)
    assert (pending / "data.zarr").exists() and (pending / FILES / "partial.json").exists()

    second = _lines(_start(store_root, "run"))
    assert second[0]["resumed"] is True and second[0]["start"] == 5
    assert second[-1] == {"outcome": "wrote"}
    assert not pending.exists()  # published: the pending dir became the artifact
    a = store.open("s", KEY)
    assert a.array_names() == ["x"]  # the partial array of the killed run was discarded
    assert set(a.manifest["files"]) == {METRICS}  # so was its side file; scratch never published
    assert not (a.path / SCRATCH).exists() and not (a.path / METRICS).exists()
    rows = [json.loads(x) for x in a.read_bytes(METRICS).decode().splitlines()]
    assert rows[:5] == before
    ev = rows[5]
    assert ev["event"] == "resumed" and ev["previous_pid"] != ev["pid"]
    assert [r["epoch"] for r in rows[6:]] == [5, 6, 7]
    assert a.manifest["files"][METRICS] == xxhash.xxh3_128_hexdigest(a.read_bytes(METRICS))
    assert a.verify() == []
    assert not list((store_root / "s").glob(".trash-*"))


def test_force_with_resumable_resumes_the_pending_dir_of_the_key(store_root):
    store = Store(store_root)
    assert _lines(_start(store_root, "run"))[-1] == {"outcome": "wrote"}
    assert store.open("s", KEY).array("x").tolist() == list(range(10))
    first = _kill_at_ready(store_root, replace=True)
    assert first["resumed"] is False
    assert store.open("s", KEY).array("x").tolist() == list(range(10))  # old one still served
    second = _lines(_start(store_root, "run", replace=True))
    assert second[0]["resumed"] is True and second[0]["start"] == 5
    a = store.open("s", KEY)
    assert a.array("x").tolist() == list(range(100, 110)) and a.verify() == []
    assert [e for e in _metrics(a.file(METRICS)) if "event" in e][0]["event"] == "resumed"
    assert not store.pending_dir("s", KEY).exists()
    assert sorted(p.name for p in (store_root / "s").iterdir() if p.name != ".locks") == [KEY]


def test_concurrent_resumable_writers_publish_one_artifact(store_root):
    ps = [_start(store_root, "slow") for _ in range(3)]
    outs = [_lines(p) for p in ps]
    outcomes = sorted(o[-1]["outcome"] for o in outs)
    assert outcomes == ["cached", "cached", "wrote"], outs
    store = Store(store_root)
    a = store.open("s", KEY)
    rows = _metrics(a.file(METRICS))
    assert [r["epoch"] for r in rows] == list(range(8))  # one writer's log, no resumed event
    assert a.verify() == [] and not store.pending_dir("s", KEY).exists()
    assert [b.key for b in store.list()] == [KEY]


def _writer(store: Store, key: str, **kw):
    return store.writer("s", key, config={"k": key[:4]}, upstream={}, upstream_stages={},
                        version=1, **kw)  # fmt: skip


def test_normal_publish_removes_the_pending_dir(store_root):
    store = Store(store_root)
    key = compute_key("s", 1, {"k": "norm"})
    with _writer(store, key, resumable=True) as out:
        assert out.resumed is False and out.pending.is_dir()
        out.scratch("c.bin").write_bytes(b"x")
        out.log_metrics({"epoch": 0, "acc": float("inf")})
        assert _metrics(out.metrics_path) == [{"epoch": 0, "acc": None}]  # readable while running
        out.array("v", np.arange(3))
    assert out.published and not out.pending.exists()
    a = store.open("s", key)
    assert _metrics(a.file(METRICS)) == [{"epoch": 0, "acc": None}] and a.verify() == []
    assert sorted(p.name for p in (store_root / "s").iterdir()) == [key]


def test_non_resumable_writer_logs_metrics_in_its_temp_dir(store_root):
    store = Store(store_root)
    key = compute_key("s", 1, {"k": "tmp"})
    with _writer(store, key) as out:
        assert out.pending is None and out.resumed is False
        assert out.metrics_path.parent == out.tmp and out.tmp.name.startswith(".tmp-")
        out.log_metrics({"step": 1, "loss": np.float64(0.5), "vec": np.arange(2)})
        out.scratch("sub/ck.pt").write_bytes(b"ck")
        out.array("v", np.arange(3))
    a = store.open("s", key)
    assert _metrics(a.file(METRICS)) == [{"step": 1, "loss": 0.5, "vec": [0, 1]}]
    assert set(a.manifest["files"]) == {METRICS} and not (a.path / SCRATCH).exists()
    assert store.temp_dirs() == [] and a.verify() == []


def test_a_raising_resumable_writer_keeps_its_pending_dir_only_with_scratch_state(store_root):
    store = Store(store_root)
    key = compute_key("s", 1, {"k": "raise"})
    with pytest.raises(RuntimeError), _writer(store, key, resumable=True) as out:
        out.log_metrics({"epoch": 0})
        raise RuntimeError("no checkpoint yet")
    assert not store.pending_dir("s", key).exists()  # nothing to resume from
    with pytest.raises(KeyboardInterrupt), _writer(store, key, resumable=True) as out:
        out.scratch("ck").write_text("1")
        out.log_metrics({"epoch": 1})
        raise KeyboardInterrupt
    assert (store.pending_dir("s", key) / SCRATCH / "ck").read_text() == "1"
    with _writer(store, key, resumable=True) as out:
        assert out.resumed and out.scratch("ck").read_text() == "1"
        out.array("v", np.arange(2))
    rows = _metrics(store.open("s", key).file(METRICS))
    assert rows[0] == {"epoch": 1} and rows[1]["event"] == "resumed" and len(rows) == 2


def test_half_written_metrics_line_is_cut_on_resume(store_root):
    store = Store(store_root)
    key = compute_key("s", 1, {"k": "half"})
    pending = store.pending_dir("s", key)
    (pending / SCRATCH).mkdir(parents=True)
    (pending / METRICS).write_text('{"epoch": 0}\n{"epoch": 1, "lo')  # killed mid-write
    with _writer(store, key, resumable=True) as out:
        assert out.resumed
        out.array("v", np.arange(2))
    rows = _metrics(store.open("s", key).file(METRICS))
    assert rows[0] == {"epoch": 0} and rows[1]["event"] == "resumed" and len(rows) == 2


def test_a_crafted_pending_link_is_not_followed(store_root, tmp_path):
    store = Store(store_root)
    key = compute_key("s", 1, {"k": "link"})
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep")
    (store_root / "s").mkdir(parents=True)
    store.pending_dir("s", key).symlink_to(outside, target_is_directory=True)
    with _writer(store, key, resumable=True) as out:
        assert not out.resumed
        out.array("v", np.arange(2))
    assert (outside / "precious.txt").read_text() == "keep"
    assert store.open("s", key).verify() == []
