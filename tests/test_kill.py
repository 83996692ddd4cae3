"""SIGKILL safety of every stage that publishes an artifact (issue: reliability & security, item 1).

Each scenario runs a real `argse <stage>` subprocess against a copy of a tiny store that lacks the
stage's artifact, SIGKILLs it at several points (a fixed delay during start-up, the moment its temp
directory appears, the moment its first Zarr chunk is on disk, mid-compute), and after every kill
asserts that no complete artifact exists for the key. It then reruns the stage to completion and
checks every array's xxh3 (whole and per row chunk) against the uninterrupted run's manifest,
runs `argse gc` and checks that no temp / `.old-*` / `.partial` / lock leftovers remain.

`split` is covered the same way in test_cli_split.py. The default suite runs ONE representative
scenario (export-logits killed after its first logits chunk); the per-stage matrix is
`@pytest.mark.slow`.

The tiny pipeline (synthetic CIFAR-10, IF = 10, ResNet-8, 1 epoch, two experts) is the session
fixture ``tiny_pipe`` (conftest.py, built by tests/_tiny.py), copied before anything is changed.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from _tiny import STAGES, Tiny, arrays_of, cli_env, complete_keys, kill_when, leftovers

from argse_cli.store import DATA, MARKER, Store


# ------------------------------------------------------------------------------ killing
def _tmp_dirs(store: Path, stage: str, pid: int | None = None) -> list[Path]:
    """Temp dirs of ``stage`` (of the writer ``pid`` only: ``.tmp-<key>-<pid>-<rand>``), and the
    pending dirs of resumable writers (train-expert: ``.pending-<key>``, pid in writer.json)."""
    dirs = list((store / stage).glob(".tmp-*"))
    out = [d for d in dirs if pid is None or d.name.split("-")[2] == str(pid)]
    for d in (store / stage).glob(".pending-*"):
        info: dict = {}
        with contextlib.suppress(OSError, ValueError):
            info = json.loads((d / "writer.json").read_text())
        if pid is None or info.get("pid") == pid:
            out.append(d)
    return out


def _chunks(store: Path, stage: str, pid: int, array: str | None) -> list[Path]:
    """Chunk files on disk in the temp dir of writer ``pid`` (of one array, or of any array)."""
    out = []
    for tmp in _tmp_dirs(store, stage, pid):
        base = tmp / DATA
        if array is not None:
            out += [p for p in (base / array / "c").rglob("*") if p.is_file()]
        else:
            out += [p for p in base.rglob("*") if p.is_file() and "c" in p.relative_to(base).parts]
    return out


def _side_files(store: Path, stage: str, pid: int) -> list[Path]:
    return [
        p for d in _tmp_dirs(store, stage, pid) for p in (d / "files").rglob("*") if p.is_file()
    ]


def _happened(point: str, store: Path, stage: str, pid: int, elapsed: float) -> bool:
    try:
        return _check_point(point, store, stage, pid, elapsed)
    except FileNotFoundError:  # a directory went away while it was listed (renamed at publish)
        return False


def _check_point(point: str, store: Path, stage: str, pid: int, elapsed: float) -> bool:
    kind, _, arg = point.partition(":")
    if kind == "delay":
        return elapsed >= float(arg)
    if kind == "tmp":
        return bool(_tmp_dirs(store, stage, pid))
    if kind == "chunk":
        return bool(_chunks(store, stage, pid, arg or None))
    if kind == "file":
        return bool(_side_files(store, stage, pid))
    raise ValueError(point)


def kill_at(
    t: Tiny, stage: str, store: Path, point: str, log: Path, timeout: float = 240
) -> tuple[float, int]:
    """Start ``stage`` and SIGKILL it when ``point`` happens; returns (seconds to the kill, pid).

    Points: ``delay:S`` (S seconds after start), ``tmp`` (its temp dir exists), ``chunk`` (a
    chunk of any array is on disk), ``chunk:ARRAY`` (a chunk of that array), ``file`` (a side
    file exists). Fails if the process finished before the point was reached.
    """
    p = t.popen(stage, store, log)
    try:
        dt = kill_when(p, lambda el: _happened(point, store, stage, p.pid, el), timeout)
    finally:
        p.log_fh.close()  # type: ignore[attr-defined]
    assert p.returncode == -signal.SIGKILL, (
        f"{stage} exited {p.returncode} before kill point {point!r} ({dt:.2f} s):\n"
        + log.read_text()[-2000:]
    )
    return dt, p.pid


def kill_scenario(t: Tiny, stage: str, points: list[str], work: Path) -> dict:
    """Kill ``stage`` at each point on one store copy, then rerun, compare, gc. Returns timings."""
    key = t.keys[stage]
    store = t.copy_without(stage, work / "store")
    before = complete_keys(store)
    stats: dict[str, float] = {}
    for i, point in enumerate(points):
        stats[point], pid = kill_at(t, stage, store, point, work / f"kill{i}.log")
        d = store / stage / key
        assert not d.exists(), f"{stage} killed at {point}: {d} exists"
        assert not (d / MARKER).exists()
        assert complete_keys(store) == before, f"{stage} killed at {point}: artifacts changed"
        if point.split(":")[0] in ("chunk", "file"):
            assert _tmp_dirs(store, stage, pid), "the dead writer's temp dir should remain (for gc)"
        res = t.run("ls", store=store)  # a killed writer is never listed
        assert res.returncode == 0 and key[:16] not in res.stdout
    res = t.run(*t.argv(stage), "-q", store=store)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert f"wrote {key}" in res.stdout, res.stdout
    want = arrays_of(t.store, stage, key)
    got = arrays_of(store, stage, key)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == want[name], f"{stage}:{name} differs from the uninterrupted run"
    assert Store(store).open(stage, key).verify() == []
    assert complete_keys(store) == before | {(stage, key)}
    res = t.run("gc", store=store)
    assert res.returncode == 0, res.stderr
    assert leftovers(store) == [], _explain(store, leftovers(store))
    assert Store(store).open(stage, key).verify() == []
    return stats


def _explain(store: Path, paths: list[str]) -> str:
    """What gc saw: each leftover's files, its writer.json, and what its pid is now."""
    out = []
    for rel in paths:
        p = store / rel
        info = {}
        with contextlib.suppress(OSError, ValueError):
            info = json.loads((p / "writer.json").read_text())
        pid = info.get("pid") or (p.name.split("-")[2] if p.name.startswith(".tmp-") else None)
        status = ""
        with contextlib.suppress(OSError, TypeError):
            status = Path(f"/proc/{int(pid)}/status").read_text().splitlines()[:4]
        kids = sorted(x.name for x in p.iterdir()) if p.is_dir() else []
        out.append(f"{rel}: files={kids} writer={info} pid-now={status}")
    return "\n".join(out)


# ------------------------------------------------------------------------------ default suite
@pytest.fixture(scope="module")
def tiny_export(tiny_pipe) -> Tiny:
    return tiny_pipe("export-logits")


def test_export_logits_killed_after_first_chunk(tiny_export, tmp_path):
    """Representative fast scenario: killed as its temp dir appears, then after the first
    logits chunk of the first split (chunk_rows = 16: tuneV has 5 chunks, test 14)."""
    t = tiny_export
    info = Store(t.store).open("export-logits", t.keys["export-logits"]).manifest["arrays"]
    assert len(info["tuneV/logits"]["chunk_xxh3"]) >= 4  # several chunks: a real mid-array kill
    stats = kill_scenario(t, "export-logits", ["tmp", "chunk:tuneV/logits"], tmp_path)
    print(f"kill times: {stats}")


# ------------------------------------------------------------------------------ slow matrix
KILL_POINTS = {
    # train-expert writes its arrays in the last ~30 ms: "file" = model.safetensors is written
    "train-expert": ["delay:0.3", "tmp", "frac:0.5", "file"],
    "export-logits": ["delay:0.3", "tmp", "chunk:tuneV/logits", "chunk:test/logits"],
    "calibrate": ["delay:0.3", "tmp", "chunk"],
    "train-gate": ["delay:0.3", "tmp", "frac:0.5", "chunk"],
    "eval": ["delay:0.3", "tmp", "frac:0.5", "chunk"],
    "baselines": ["delay:0.3", "tmp", "chunk", "frac:0.6"],
    "report": ["delay:0.3", "tmp", "file"],
    "import-logits": ["delay:0.3", "tmp", "chunk:tuneV/logits", "chunk:test/logits"],
}


@pytest.fixture(scope="module")
def tiny_all(tiny_pipe) -> Tiny:
    return tiny_pipe(*STAGES[1:], "import-logits")


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(KILL_POINTS))
def test_kill_matrix(tiny_all, tmp_path, stage):
    t = tiny_all
    # "frac:F": F x the uninterrupted run's duration (mid-compute; a loaded machine only kills earlier)
    points = [
        f"delay:{t.seconds[stage] * float(p[5:]):.2f}" if p.startswith("frac:") else p
        for p in KILL_POINTS[stage]
    ]
    stats = kill_scenario(t, stage, points, tmp_path)
    print(f"{stage}: uninterrupted {t.seconds[stage]:.1f} s; kill times {stats}")


# ------------------------------------------------------------------ gc --keep killed (slow)
def _kill_gc_keep(t: Tiny, store: Path, keep: str, point: str, log: Path) -> bool:
    """Run `argse gc --keep KEEP` and SIGKILL it at ``point`` (``trash``: the moment an artifact
    has been renamed out of sight; ``delay:S``). True if it was killed (not finished first)."""
    fh = open(log, "w")  # noqa: SIM115 - closed below
    p = subprocess.Popen([sys.executable, "-m", "argse_cli.cli", "gc", "--keep", keep],
                         env=cli_env(store, t.data), stdout=fh, stderr=subprocess.STDOUT)  # fmt: skip
    kind, _, arg = point.partition(":")

    def hit(elapsed: float) -> bool:
        return bool(list(store.glob("*/.trash-*"))) if kind == "trash" else elapsed >= float(arg)

    try:
        kill_when(p, hit, 120, poll=0.0005)
    finally:
        fh.close()
    return p.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_gc_keep_killed_mid_removal(tiny_all, tmp_path):
    """issue 19 item 6: `gc --keep SPLIT` SIGKILLed while it removes the other artifacts. After
    each kill every artifact still listed (and called `cached` by a stage) verifies; a removed
    one is invisible at once (renamed to .trash-* before its deletion); `gc` then clears the
    debris and a rerun of a removed stage publishes it again."""
    t = tiny_all
    store = tmp_path / "store"
    shutil.copytree(t.store, store)
    before = complete_keys(store)
    keep = t.keys["split"]
    killed = []
    for i, point in enumerate(["trash", "trash", "delay:0.6", "trash"]):
        killed.append(_kill_gc_keep(t, store, keep, point, tmp_path / f"gc{i}.log"))
        now = complete_keys(store)
        assert now <= before and ("split", keep) in now
        for stage, key in now:
            assert Store(store).open(stage, key).verify() == [], (point, stage)
        for stage, key in before - now:  # removed: nothing of it is visible under its key
            assert not (store / stage / key).exists(), (point, stage)
        res = t.run("ls", store=store)
        assert res.returncode == 0 and "Traceback" not in res.stderr
    assert killed[0], "gc --keep finished before the first kill point"
    res = t.run("gc", "--keep", keep, store=store)
    assert res.returncode == 0, res.stderr
    assert complete_keys(store) == {("split", keep)}
    assert leftovers(store) == [], _explain(store, leftovers(store))
    res = t.run("train-expert", "-c", str(t.cfg), "--loss", "ce", "-q", store=store)
    assert res.returncode == 0 and f"wrote {t.keys['train-expert']}" in res.stdout, res.stderr
