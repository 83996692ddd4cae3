"""Bad places (issue 19 item 8): a full disk, a read-only store, an unwritable or wrong `--out`.

Each failure is one line (`error: <field>: <problem> -- fix: <fix>`, exit 2, no traceback) saying
which path; for a full disk also how much the artifact needed (its temp dir so far) and how much is
free; nothing already stored is lost and no temp dir is left behind.

The real-filesystem cases mount a small tmpfs (they are skipped where mounting is not allowed);
the same code paths are also driven in-process by an OSError with the errno.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from _checks import assert_one_line_error
from conftest import run_cli

from argse_cli.errors import ArgseError
from argse_cli.store import Store


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                         capture_output=True, text=True)  # fmt: skip
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip()[:80]})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _remount_ro(path: Path) -> None:
    res = subprocess.run(["mount", "-o", "remount,ro", str(path)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot remount read-only ({res.stderr.strip()[:80]})")


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ------------------------------------------------------------------------- in-process errno
@pytest.fixture
def fake_stage(monkeypatch):
    from argse_cli import stages

    mod = types.ModuleType("argse_cli.stages._fake_places")
    mod.STAGE, mod.VERSION, mod.CODE = "fake", 1, ()
    mod.errno = errno.ENOSPC

    def compute(cfg, inputs, out, progress):
        out.array("v", np.random.default_rng(0).standard_normal((1000, 64)))  # ~0.5 MiB written
        raise OSError(mod.errno, os.strerror(mod.errno), str(out.tmp / "data.zarr" / "w"))

    mod.compute = compute
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setitem(stages.STAGE_MODULES, "fake", "_fake_places")
    return mod


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_write_errors_become_one_line_naming_the_path(store_root, fake_stage, code):
    from argse_cli.config import CalibrateConfig
    from argse_cli.stages import run_stage

    fake_stage.errno = code
    store = Store(store_root)
    with pytest.raises(ArgseError) as ei:
        run_stage("fake", CalibrateConfig(), {}, {}, store, quiet=True)
    msg = str(ei.value)
    assert msg.startswith("--store: ") and "\n" not in msg and "/data.zarr/w" in msg, msg
    if code == errno.ENOSPC:
        m = re.search(r"needed ([\d.]+) KiB on disk so far \(([\d.]+) KiB of array data given", msg)
        assert m and float(m.group(1)) > 100 and float(m.group(2)) == 500.0, msg
        assert re.search(r", [\d.]+ [KMG]iB free", msg), msg
    elif code == errno.EROFS:
        assert "read-only file system" in msg
    else:
        assert "permission denied" in msg
    assert not store_root.exists()  # the failed first run left nothing (temp dir, stage dir)


def test_a_full_disk_mid_write_waits_for_zarrs_other_writes_before_cleaning_up(
    tmp_path, monkeypatch
):
    """Zarr writes an array's chunks as concurrent tasks: when one hits ENOSPC its siblings are
    still writing. The writer must let them end before removing its temp dir, else a late write
    recreates the dir (left behind) or fails after the error was reported (a stray traceback)."""
    import threading
    import time

    import zarr.storage._local as zlocal

    from argse_cli.store import compute_key

    real_put, lock = zlocal._put, threading.Lock()
    state = {"calls": 0, "in_flight": 0, "max_in_flight": 0}

    def put(path, value, exclusive=False):
        with lock:
            state["calls"] += 1
            call = state["calls"]
            state["in_flight"] += 1
            state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
        try:
            if call == 3:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            time.sleep(0.2)  # the siblings are still writing when the error reaches the writer
            return real_put(path, value, exclusive=exclusive)
        finally:
            with lock:
                state["in_flight"] -= 1

    monkeypatch.setattr(zlocal, "_put", put)
    store = Store(tmp_path / "store")
    key = compute_key("split", 1, {}, {}, {})
    with pytest.raises(ArgseError) as err:
        with store.writer("split", key, config={}, upstream={}, upstream_stages={}, version=1) as w:
            w.array("x", np.arange(60), chunk_rows=5)  # 12 chunks written concurrently
    assert "no space left" in str(err.value)
    assert state["max_in_flight"] > 1  # the race was there to be lost
    assert state["in_flight"] == 0  # every sibling write had ended before the writer returned
    assert [p.name for p in (tmp_path / "store" / "split").iterdir()] == []
    assert store.list() == []


# ------------------------------------------------------------------------ real file systems
def test_full_disk_is_one_line_with_sizes_and_the_store_is_unchanged(tmp_path, synthetic_cifar10):
    with tmpfs(tmp_path / "small", "192k") as mnt:
        store = mnt / "store"
        env = {"ARGSE_STORE": str(store), "ARGSE_DATA": str(synthetic_cifar10)}
        res = run_cli(["split", "-q"], env=env)
        line = assert_one_line_error(res, ["--store", "no space left", "free", "needed"])
        assert re.search(r"needed [\d.]+ [KMG]iB on disk so far.*, [\d.]+ [KMG]iB free", line), line
        left = [p for p in _files(store) if ".tmp-" in p or ".pending-" in p] if store.exists() else []
        assert left == []
        assert Store(store).list() == []


def test_read_only_store_serves_cached_artifacts_and_refuses_writes(tmp_path, synthetic_cifar10):
    with tmpfs(tmp_path / "ro", "64m") as mnt:
        store = mnt / "store"
        env = {"ARGSE_STORE": str(store), "ARGSE_DATA": str(synthetic_cifar10)}
        res = run_cli(["split", "-q"], env=env)
        assert res.returncode == 0, res.stderr
        before = _files(store)
        _remount_ro(mnt)
        cached = run_cli(["split", "-q"], env=env)  # a cache hit writes nothing: fine
        assert cached.returncode == 0 and "cached" in cached.stdout, cached.stderr
        for args in (["ls"], ["verify"], ["gc"]):
            r = run_cli(args, env=env)
            assert r.returncode in (0, 2) and "Traceback" not in r.stderr, (args, r.stderr)
        new = run_cli(["split", "--seed", "1", "-q"], env=env)
        assert_one_line_error(new, ["--store", "read-only file system", str(store)])
        out = run_cli(["report", "--eval", "abcd", "--out", str(mnt / "out")], env=env)
        assert_one_line_error(out, ["--out", "read-only file system"])
        assert _files(store) == before


# ----------------------------------------------------------------------------------- --out
def test_out_that_is_a_file_or_a_directory_is_refused_before_any_work(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("keep")
    env = {"ARGSE_STORE": str(tmp_path / "store")}
    rep = run_cli(["report", "--eval", "0123abcd", "--out", str(f)], env=env)
    assert_one_line_error(rep, ["--out", "not a directory"])
    under = run_cli(["report", "--eval", "0123abcd", "--out", str(f / "sub")], env=env)
    assert_one_line_error(under, ["--out", "is a file"])
    d = tmp_path / "dir.npz"
    d.mkdir()
    app = run_cli(["apply", "0123abcd", "--logits", str(f), "--out", str(d)], env=env)
    assert_one_line_error(app, ["--out", "is a directory"])
    assert f.read_text() == "keep" and not (tmp_path / "store").exists()
