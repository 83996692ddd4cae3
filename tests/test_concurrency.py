"""Two `argse` processes on the same stage and config (issue: reliability & security, item 2).

Exactly one publishes; the other waits on the per-key lock or finds the cache and exits 0 with
`cached KEY`; `argse gc` run while a writer is alive (even SIGSTOPped mid-write, even before its
writer.json exists) keeps that writer's temp dir and lock, and after everything finished `gc`
leaves no temp dir, `.old-*`, `.partial`, `.tmp` file or lock file. Store-level races (two
finishers renaming, threads) are in test_store.py.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _tiny import arrays_of, leftovers

from argse_cli.store import Store


def _env(store: Path, data: Path) -> dict[str, str]:
    return {**os.environ, "ARGSE_STORE": str(store), "ARGSE_DATA": str(data),
            "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}  # fmt: skip


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    fh = open(log, "w")  # noqa: SIM115 - closed in _finish
    p = subprocess.Popen([sys.executable, "-m", "argse_cli.cli", *args], env=env, stdout=fh,
                         stderr=subprocess.STDOUT)  # fmt: skip
    p.log_fh = fh  # type: ignore[attr-defined]
    p.log = log  # type: ignore[attr-defined]
    return p


def _finish(p: subprocess.Popen, timeout: float = 300) -> str:
    try:
        p.wait(timeout=timeout)
    finally:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGCONT)
                os.kill(p.pid, signal.SIGKILL)
            p.wait(timeout=60)
        p.log_fh.close()  # type: ignore[attr-defined]
    return p.log.read_text()  # type: ignore[attr-defined]


def _wait_for(pred, p: subprocess.Popen, what: str, timeout: float = 120) -> None:
    t0 = time.time()
    while not pred():
        if p.poll() is not None:
            raise AssertionError(
                f"process ended (rc {p.returncode}) before {what}:\n{p.log.read_text()}"
            )
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


def _outcome(out: str) -> tuple[str, str]:
    lines = [
        ln.split() for ln in out.splitlines() if re.match(r"^(wrote|cached) [0-9a-f]{32}$", ln)
    ]
    assert len(lines) == 1, out
    return lines[0][0], lines[0][1]


def _gc(env: dict[str, str]) -> str:
    res = subprocess.run([sys.executable, "-m", "argse_cli.cli", "gc"], env=env, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_second_writer_waits_on_the_lock_and_gc_spares_the_live_writer(synthetic_cifar10, tmp_path):
    """P1 is frozen (SIGSTOP) the moment its temp dir exists; P2 must wait on the lock; `argse gc`
    meanwhile removes neither P1's temp dir nor its lock; then P1 publishes and P2 is a cache hit."""
    store = tmp_path / "store"
    env = _env(store, synthetic_cifar10)
    p1 = _start(["split", "-q"], env, tmp_path / "p1.log")
    p2 = None
    try:
        _wait_for(lambda: list(store.glob("split/.tmp-*")), p1, "P1's temp dir")
        os.kill(p1.pid, signal.SIGSTOP)
        (tmp,) = store.glob("split/.tmp-*")
        assert f"-{p1.pid}-" in tmp.name
        (lock,) = store.glob("split/.locks/*.lock")
        p2 = _start(["split", "-q"], env, tmp_path / "p2.log")
        _wait_for(lambda: "waiting for another writer" in p2.log.read_text(), p2, "P2 to wait")
        out = _gc(env)
        assert tmp.exists() and lock.exists(), out  # a live (stopped) writer is never touched
        assert str(tmp) not in out and "0 removed" in out
        assert p2.poll() is None  # still waiting
        assert not any(d.name[0] != "." for d in (store / "split").iterdir())  # nothing published
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p1.pid, signal.SIGCONT)
    out1 = _finish(p1)
    out2 = _finish(p2) if p2 is not None else ""
    assert p1.returncode == 0 and p2.returncode == 0, (out1, out2)
    what1, key = _outcome(out1)
    what2, key2 = _outcome(out2)
    assert (what1, what2) == ("wrote", "cached") and key2 == key
    assert f"waiting for another writer of {key}" in out2
    assert [a.key for a in Store(store).list()] == [key]
    assert sorted(p.name for p in (store / "split").iterdir() if not p.name.startswith(".")) == [
        key
    ]
    _gc(env)
    assert leftovers(store) == []
    assert Store(store).open("split", key).verify() == []


# round 0 is the default suite's race; repeating it (another interleaving) is slow-only
@pytest.mark.parametrize("round_", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_two_processes_started_at_once_publish_exactly_once(synthetic_cifar10, tmp_path, round_):
    store = tmp_path / "store"
    env = _env(store, synthetic_cifar10)
    ps = [_start(["split", "-q"], env, tmp_path / f"p{i}.log") for i in range(2)]
    outs = [_finish(p) for p in ps]
    assert [p.returncode for p in ps] == [0, 0], outs
    results = sorted(_outcome(o) for o in outs)
    assert [r[0] for r in results] == ["cached", "wrote"], outs
    key = results[0][1]
    assert results[1][1] == key
    assert [(a.stage, a.key) for a in Store(store).list()] == [("split", key)]
    _gc(env)
    assert leftovers(store) == []


def test_gc_cleans_what_killed_writers_leave(synthetic_cifar10, tmp_path):
    """A writer SIGKILLed while it holds the lock and fills its temp dir: gc removes the temp dir
    and the stale lock file; a rerun then publishes."""
    store = tmp_path / "store"
    env = _env(store, synthetic_cifar10)
    p = _start(["split", "-q"], env, tmp_path / "p.log")
    _wait_for(lambda: list(store.glob("split/.tmp-*")), p, "the temp dir")
    os.kill(p.pid, signal.SIGKILL)
    _finish(p)
    assert p.returncode == -signal.SIGKILL
    assert Store(store).list() == []
    assert leftovers(store)  # temp dir and lock file of the dead writer
    out = _gc(env)
    assert leftovers(store) == [], out
    res = subprocess.run([sys.executable, "-m", "argse_cli.cli", "split", "-q"], env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0 and _outcome(res.stdout)[0] == "wrote", res.stderr


@pytest.mark.slow
def test_two_export_logits_at_once(tiny_pipe, tmp_path):
    """A heavier stage (export-logits of the tiny pipeline): one publishes, one is a cache hit,
    and the arrays equal the uninterrupted single run's."""
    import shutil

    t = tiny_pipe("export-logits")
    key = t.keys["export-logits"]
    store = t.copy_without("export-logits", tmp_path / "store")
    env = _env(store, t.data)
    ps = [_start(t.argv("export-logits") + ["-q"], env, tmp_path / f"p{i}.log") for i in range(2)]
    outs = [_finish(p) for p in ps]
    assert [p.returncode for p in ps] == [0, 0], outs
    assert sorted(_outcome(o) for o in outs) == [("cached", key), ("wrote", key)]
    assert arrays_of(store, "export-logits", key) == arrays_of(t.store, "export-logits", key)
    _gc(env)
    assert leftovers(store) == []
    shutil.rmtree(store)
