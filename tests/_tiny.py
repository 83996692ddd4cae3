"""The tiny pipeline shared by the store-level tests (kill, integrity, divergence, concurrency,
validation, harness): synthetic CIFAR-10 (IF = 10), ResNet-8 for 1 epoch, two experts, built once
per test session and copied by every test that changes it; plus the store checks those tests share.

conftest.py hands it out as the session fixture ``tiny_pipe``; this module holds no tests.
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

import yaml

from argse_cli.store import Store

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


def tiny_pipeline(base: Path, upto: tuple[str, ...] = ()) -> Tiny:
    """The tiny pipeline under ``base`` (the session's base temp dir), built up to ``upto``.

    Lives in ``<base>/tiny_pipeline``; a module that needs more stages builds them on demand (a
    stage already built is a cache hit). An exclusive lock on ``<base>/tiny_pipeline.lock`` makes
    concurrent builders (parallel test processes sharing ``base``) wait for one another instead of
    writing the same inputs twice. Tests never modify it: they copy the store.
    """
    root = base / "tiny_pipeline"
    t = Tiny(root)
    with open(base / "tiny_pipeline.lock", "a+") as fh:
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


def arrays_of(store: Path, stage: str, key: str) -> dict[str, tuple[str, list[str]]]:
    """Each array of an artifact: (xxh3 of the whole array, xxh3 of each row chunk)."""
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
    """(stage, key) of every complete artifact in the store."""
    return {(a.stage, a.key) for a in Store(store).list()}


def kill_when(p: subprocess.Popen, hit, timeout: float, poll: float = 0.001) -> float:
    """SIGKILL ``p`` as soon as ``hit(seconds since start)`` is true; stop watching when it exits or
    after ``timeout`` s. The process is always reaped (killed if still running). Returns the seconds
    watched."""
    t0 = time.perf_counter()
    try:
        while p.poll() is None and time.perf_counter() - t0 < timeout:
            if hit(time.perf_counter() - t0):
                os.kill(p.pid, signal.SIGKILL)
                break
            time.sleep(poll)
    finally:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=60)
    return time.perf_counter() - t0
