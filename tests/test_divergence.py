"""Divergence stops training with one clear line and publishes nothing (issue: reliability &
security, item 6).

- `argse train-expert --lr 1e6` (tiny pipeline, 2 epochs): exit 2, one line naming the epoch and
  the field (`train_expert.lr`), the store as it was;
- `argse train-gate` whose streamed posteriors turn NaN at epoch 1 (the stage's own ZarrSource,
  poisoned in-process): `GateDiverged` -> exit 2 naming epoch 1, nothing published;
- slow: `argse train-gate --set lr_gate=1e30` (optimizer blow-up, not poisoned data).
`train_gate` itself on NaN posteriors is tested in test_gate_train.py.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from _checks import assert_one_line_error, listing


@pytest.fixture(scope="module")
def tiny(tiny_pipe):
    return tiny_pipe("calibrate")


def test_train_expert_lr_1e6_diverges_and_publishes_nothing(tiny, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(tiny.store, store)
    before = listing(store)
    res = tiny.run("train-expert", "-c", str(tiny.cfg), "--loss", "ce", "--lr", "1e6",
                   "--epochs", "2", "-q", store=store)  # fmt: skip
    line = assert_one_line_error(res, ["train_expert.lr", "diverged at epoch", "NaN", "lower"])
    assert "nothing was published" in line
    assert listing(store) == before


def test_train_gate_nan_at_epoch_1_publishes_nothing(tiny, tmp_path, monkeypatch):
    import torch
    from typer.testing import CliRunner

    from argse_cli.cli import app
    from argse_cli.core import expert_data

    torch.set_num_threads(1)
    store = tmp_path / "store"
    shutil.copytree(tiny.store, store)
    before = listing(store)
    original = expert_data.ZarrSource.iter_epoch
    seen = []

    def poisoned(self, epoch):
        seen.append(epoch)
        for post, y, w in original(self, epoch):
            if epoch >= 1:
                post = post.clone()
                post[0, 0, 0] = float("nan")
            yield post, y, w

    monkeypatch.setattr(expert_data.ZarrSource, "iter_epoch", poisoned)
    env = {"ARGSE_STORE": str(store), "ARGSE_DATA": str(tiny.data)}
    # the selective recipe reads the streamed posteriors every epoch (the NLL recipe reads them once)
    res = CliRunner().invoke(app, ["train-gate", "-c", str(tiny.cfg), "--set", "gate_loss=selective", "-q"], env=env)
    assert res.exit_code == 2, res.output
    try:
        out = res.stderr  # click >= 8.2: stderr alone (res.output interleaves both)
    except ValueError:
        out = res.output
    err = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "NaN/inf at epoch 1" in err[0] and "fix:" in err[0], out
    assert 0 in seen and 1 in seen
    assert listing(store) == before  # no artifact, no temp dir, no lock / stage dir


@pytest.mark.slow
def test_train_gate_lr_1e30_diverges(tiny, tmp_path):
    """An optimizer blow-up (no poisoned data). If the trainer ever becomes robust to this lr,
    the published gate must at least be finite."""
    from argse_cli.store import Store

    store = tmp_path / "store"
    shutil.copytree(tiny.store, store)
    before = listing(store)
    res = tiny.run("train-gate", "-c", str(tiny.cfg), "--set", "lr_gate=1e30", "-q", store=store)
    if res.returncode == 0:
        (gate,) = [a for a in Store(store).list() if a.stage == "train-gate"]
        for name in gate.array_names():
            assert np.all(np.isfinite(gate.array(name))), name
        pytest.fail("lr_gate=1e30 no longer diverges: pick another way to force it")
    assert_one_line_error(res, ["train-gate", "NaN/inf at epoch", "lower lr_gate"])
    assert listing(store) == before
