"""Shared fixtures: synthetic / offline CIFAR-10, a store root, a CLI runner, the session's tiny
pipeline (tests/_tiny.py), the gpu-marker skip."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import settings

if TYPE_CHECKING:
    from _tiny import Tiny

REPO = Path(__file__).resolve().parents[1]

# Hypothesis profiles: "ci" (chosen when the CI env var is set) is derandomized -- the same
# examples on every run, no example database -- so a CI failure is reproducible as is; "dev"
# keeps Hypothesis' defaults (random examples, a local database under .hypothesis/).
# HYPOTHESIS_PROFILE picks one explicitly.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("dev", print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))
SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_CIFAR10 = SHARED / "data" / "cifar10"

# Synthetic CIFAR-10 sizes: n_max = 200 keeps IF = 100 valid (rarest class: floor(200/100) = 2
# images) and 100 test images per class give every held-out split of the paper protocol >= 10
# per class.
SYN_TRAIN_PER_CLASS = 200
SYN_TEST_PER_CLASS = 100


def run_cli(
    args: Sequence[str],
    env: dict[str, str] | None = None,
    timeout: float = 120,
    cwd: str | Path | None = None,
) -> subprocess.CompletedProcess:
    """Run ``python -m argse_cli.cli *args`` in a subprocess; ``env`` is merged over os.environ.

    Pass ARGSE_STORE / ARGSE_DATA in ``env``. stdout and stderr are captured as text.
    """
    full = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "argse_cli.cli", *map(str, args)],
        env=full,
        cwd=str(cwd) if cwd is not None else None,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def invoke(args: Sequence[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the CLI in-process (typer's CliRunner: no interpreter start); returns what
    :func:`run_cli` returns. An uncaught exception's traceback is appended to stderr, as the
    real command would print it."""
    import traceback

    from typer.testing import CliRunner

    from argse_cli.cli import app

    res = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200", **(env or {})})
    err = res.stderr
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        err += "".join(traceback.format_exception(res.exception))
    return subprocess.CompletedProcess(list(args), res.exit_code, res.stdout, err)


@pytest.fixture(scope="session")
def synthetic_cifar10(tmp_path_factory) -> Path:
    """Data root holding a synthetic CIFAR-10 in the official layout (cifar-10-batches-py/)."""
    from argse_cli.data.synthetic import write_synthetic_cifar10

    root = tmp_path_factory.mktemp("syn_cifar10")
    write_synthetic_cifar10(
        root, n_train_per_class=SYN_TRAIN_PER_CLASS, n_test_per_class=SYN_TEST_PER_CLASS, seed=0
    )
    return root


@pytest.fixture
def store_root(tmp_path) -> Path:
    """A fresh (not yet created) artifact store root."""
    return tmp_path / "store"


@pytest.fixture(scope="session")
def shared_cifar10(tmp_path_factory) -> Path:
    """Data root with the offline CIFAR-10 copy, built once per session (~10 s)."""
    if not SHARED_CIFAR10.is_dir():
        pytest.skip("../shared/data/cifar10 not present")
    root = tmp_path_factory.mktemp("offline_cifar10")
    res = subprocess.run(
        [sys.executable, str(SHARED_CIFAR10 / "build_cifar10.py"), str(root)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if res.returncode != 0:
        pytest.fail(f"building the offline CIFAR-10 copy failed:\n{res.stderr[-2000:]}")
    return root


@pytest.fixture
def argse(store_root, synthetic_cifar10) -> Callable[..., subprocess.CompletedProcess]:
    """``argse(*args, env=None)``: run_cli with ARGSE_STORE=store_root, ARGSE_DATA=synthetic."""

    def _run(*args: str, env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
        base = {"ARGSE_STORE": str(store_root), "ARGSE_DATA": str(synthetic_cifar10)}
        return run_cli(args, env={**base, **(env or {})}, **kw)

    return _run


@pytest.fixture(scope="session")
def tiny_pipe(tmp_path_factory) -> Callable[..., Tiny]:
    """``tiny_pipe(*stages)``: the session's tiny pipeline (tests/_tiny.py) with ``stages`` and
    what they need built (each stage once per session, later calls are cache hits)."""
    from _tiny import tiny_pipeline

    base = tmp_path_factory.getbasetemp()
    return lambda *stages: tiny_pipeline(base, stages)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Skip @pytest.mark.gpu tests without CUDA (torch is imported only if such a test is left)."""
    gpu_items = [it for it in items if it.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    try:
        import torch

        ok = bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - a broken torch install means: no GPU tests
        ok = False
    if not ok:
        skip = pytest.mark.skip(reason="CUDA not available (torch.cuda.is_available() is False)")
        for it in gpu_items:
            it.add_marker(skip)
