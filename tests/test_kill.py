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

The tiny pipeline (synthetic CIFAR-10, IF = 10, ResNet-8, 1 epoch, two experts) is built once per
test session under the session's base temp dir (:func:`tiny_pipeline`), also by
test_integrity_inputs.py and test_divergence.py, and copied before anything is changed.
"""

from __future__ import annotations

import contextlib
import fcntl
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

from argse_cli.store import DATA, MARKER, Store

PIPE = {
    "split": {"dataset": "cifar10", "imbalance_factor": 10, "seed": 0},
    "train_expert": {"losses": ["ce", "balsoftmax"], "depth": 8, "epochs": 1, "warmup_epochs": 0,
                     "batch_size": 64, "device": "cpu"},
    "export_logits": {"chunk_rows": 16, "device": "cpu"},
    "calibrate": {},
    "train_gate": {"epochs": 4, "patience": 4, "batch_size": 64},
    "eval": {"n_boot": 10},
    "baselines": {"n_boot": 0, "seeds": [42], "gate_epochs": 2, "T": 2},
    "report": {"formats": ["png"]},
}  # fmt: skip
N_TRAIN, N_TEST = 50, 36  # per class: LT train ~ 230 images, held-out 360 rows (test: 216)
IMPORT_C, IMPORT_N = 10, 120  # import-logits: 10 classes, 120 rows per held-out split
STAGES = ("split", "train-expert", "export-logits", "calibrate", "train-gate", "eval", "baselines",
          "report")  # fmt: skip


def cli_env(store: Path, data: Path) -> dict[str, str]:
    return {
        **os.environ,
        "ARGSE_STORE": str(store),
        "ARGSE_DATA": str(data),
        "OMP_WAIT_POLICY": "PASSIVE",
        "PYTHONUNBUFFERED": "1",
        "COLUMNS": "200",
    }


class Tiny:
    """A tiny pipeline on disk: data root, pipeline files, a store and each stage's key."""

    def __init__(self, root: Path):
        self.root = root
        self.data = root / "data"
        self.store = root / "store"
        self.cfg = root / "pipe.yaml"
        self.imp_cfg = root / "import.yaml"
        self.keys: dict[str, str] = {}
        self.seconds: dict[str, float] = {}

    # ---- running the CLI -----------------------------------------------------------------
    def argv(self, stage: str) -> list[str]:
        """The command line of ``stage`` for this pipeline (without --store: env carries it)."""
        if stage == "import-logits":
            return ["import-logits", "-c", str(self.imp_cfg)]
        args = [stage, "-c", str(self.cfg)]
        if stage == "train-expert":
            args += ["--loss", "ce"]  # one key: the ce expert
        elif stage == "report":
            args += ["--eval", self.keys["eval"], "--baselines", self.keys["baselines"]]
        return args

    def run(self, *args: str, store: Path | None = None, timeout: float = 300):
        return subprocess.run(
            [sys.executable, "-m", "argse_cli.cli", *args],
            env=cli_env(store or self.store, self.data),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def popen(self, stage: str, store: Path, log: Path) -> subprocess.Popen:
        fh = open(log, "w")  # noqa: SIM115 - closed by kill_at (p.log_fh)
        p = subprocess.Popen(
            [sys.executable, "-m", "argse_cli.cli", *self.argv(stage), "-q"],
            env=cli_env(store, self.data),
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
        p.log_fh = fh  # type: ignore[attr-defined]
        return p

    # ---- building ------------------------------------------------------------------------
    def ensure(self, stage: str) -> str:
        """Run ``stage`` (and what it needs) unless cached; remember its key and duration."""
        if stage in self.keys:
            return self.keys[stage]
        needs = {
            "train-expert": ["split"], "export-logits": ["train-expert"], "calibrate": ["export-logits"],
            "train-gate": ["calibrate"], "eval": ["train-gate"], "baselines": ["train-gate"],
            "report": ["eval", "baselines"],
        }.get(stage, [])  # fmt: skip
        for up in needs:
            self.ensure(up)
        t0 = time.perf_counter()
        res = self.run(*self.argv(stage), "-q")
        self.seconds.setdefault(stage, time.perf_counter() - t0)
        assert res.returncode == 0, f"{stage}: {res.stdout[-2000:]}\n{res.stderr[-3000:]}"
        key = res.stdout.split()[-1]
        if (
            stage == "train-expert"
        ):  # both experts (export needs them); the ce key is the scenario's
            res = self.run("train-expert", "-c", str(self.cfg), "-q")
            assert res.returncode == 0, res.stderr[-3000:]
        assert Store(self.store).exists(stage, key), res.stdout
        self.keys[stage] = key
        self._save()
        return key

    def _save(self) -> None:
        (self.root / "keys.json").write_text(
            json.dumps({"keys": self.keys, "seconds": self.seconds})
        )

    def load(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            d = json.loads((self.root / "keys.json").read_text())
            self.keys, self.seconds = d["keys"], d["seconds"]

    def copy_without(self, stage: str, dest: Path) -> Path:
        """A copy of the store without ``stage``'s artifact (upstream artifacts kept)."""
        shutil.copytree(self.store, dest)
        shutil.rmtree(dest / stage / self.keys[stage])
        assert not Store(dest).exists(stage, self.keys[stage])
        return dest


def _write_inputs(t: Tiny) -> None:
    import numpy as np

    from argse_cli.config import HELDOUT_SPLITS
    from argse_cli.data.synthetic import write_synthetic_cifar10

    write_synthetic_cifar10(t.data, n_train_per_class=N_TRAIN, n_test_per_class=N_TEST, seed=1)
    t.cfg.write_text(yaml.safe_dump(PIPE))
    # import-logits: two foreign experts, npy files, 10 classes, rows per split > chunk_rows
    rng = np.random.default_rng(7)
    d = t.root / "foreign"
    d.mkdir()
    C = IMPORT_C
    counts = np.maximum(1, np.floor(300 * 10.0 ** (-np.arange(C) / (C - 1)))).astype(int)
    (d / "counts.json").write_text(json.dumps(counts.tolist()))
    experts = [{"name": f"x{e}", "loss": loss, "logits": {}} for e, loss in
               enumerate(("ce", "balsoftmax"))]  # fmt: skip
    labels = {}
    for s in HELDOUT_SPLITS:
        y = rng.permutation(np.arange(IMPORT_N) % C)
        np.save(d / f"y_{s}.npy", y)
        labels[s] = str(d / f"y_{s}.npy")
        for e, ex in enumerate(experts):
            f = rng.standard_normal((IMPORT_N, C)).astype(np.float32)
            f[np.arange(IMPORT_N), y] += 3.0 + e
            np.save(d / f"f{e}_{s}.npy", f)
            ex["logits"][s] = str(d / f"f{e}_{s}.npy")
    doc = {"import_logits": {"experts": experts, "labels": labels,
                             "class_counts": str(d / "counts.json"), "chunk_rows": 16,
                             "group_rule": "quantile:0.5"}}  # fmt: skip
    t.imp_cfg.write_text(yaml.safe_dump(doc))


def tiny_pipeline(tmp_path_factory, upto: tuple[str, ...] = ()) -> Tiny:
    """The session's tiny pipeline, built up to the stages in ``upto`` (shared by several modules).

    Lives in ``<basetemp>/tiny_pipeline``; a module that needs more stages builds them on demand
    (a stage already built is a cache hit). Tests never modify it: they copy the store.
    """
    root = tmp_path_factory.getbasetemp() / "tiny_pipeline"
    t = Tiny(root)
    lock = tmp_path_factory.getbasetemp() / "tiny_pipeline.lock"
    with open(lock, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        if not (root / "inputs.ok").exists():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            _write_inputs(t)
            (root / "inputs.ok").write_text("ok")
        t.load()
        for stage in upto:
            t.ensure(stage)
    return t


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
    t0 = time.perf_counter()
    try:
        while p.poll() is None and time.perf_counter() - t0 < timeout:
            if _happened(point, store, stage, p.pid, time.perf_counter() - t0):
                os.kill(p.pid, signal.SIGKILL)
                break
            time.sleep(0.001)
    finally:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=60)
        p.log_fh.close()  # type: ignore[attr-defined]
    dt = time.perf_counter() - t0
    assert p.returncode == -signal.SIGKILL, (
        f"{stage} exited {p.returncode} before kill point {point!r} ({dt:.2f} s):\n"
        + log.read_text()[-2000:]
    )
    return dt, p.pid


def arrays_of(store: Path, stage: str, key: str) -> dict[str, tuple[str, list[str]]]:
    m = Store(store).open(stage, key).manifest
    return {n: (i["xxh3"], i["chunk_xxh3"]) for n, i in m["arrays"].items()}


def leftovers(store: Path) -> list[str]:
    """Temp dirs, replaced-artifact / trash dirs, .partial / .tmp files and lock files under the store."""
    bad = []
    for p in store.rglob("*"):
        rel = str(p.relative_to(store))
        name = p.name
        if (name.startswith((".tmp-", ".old-", ".trash-")) or name.endswith((".partial", ".tmp"))
                or (p.parent.name == ".locks" and p.is_file())):  # fmt: skip
            bad.append(rel)
    return sorted(bad)


def complete_keys(store: Path) -> set[tuple[str, str]]:
    return {(a.stage, a.key) for a in Store(store).list()}


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
def tiny_export(tmp_path_factory) -> Tiny:
    return tiny_pipeline(tmp_path_factory, ("export-logits",))


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
def tiny_all(tmp_path_factory) -> Tiny:
    return tiny_pipeline(tmp_path_factory, (*STAGES[1:], "import-logits"))


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
    t0 = time.perf_counter()
    try:
        while p.poll() is None and time.perf_counter() - t0 < 120:
            kind, _, arg = point.partition(":")
            hit = (bool(list(store.glob("*/.trash-*"))) if kind == "trash"
                   else time.perf_counter() - t0 >= float(arg))  # fmt: skip
            if hit:
                os.kill(p.pid, signal.SIGKILL)
                break
            time.sleep(0.0005)
    finally:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=60)
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
