"""The shared training loop: checkpoint / resume (bit-equal to an uninterrupted run), the
metrics log, RNG capture, and checkpoints that must not be loaded (CPU, tiny models)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from argse_cli.experts.loop import DirCheckpoint, capture_rng, restore_rng
from argse_cli.experts.shared import train_experts_shared
from argse_cli.experts.trainer import TrainRecipe, train_expert

torch.set_num_threads(1)


class Killed(Exception):
    """Stands for a kill right after an epoch's checkpoint was written."""


def _toy(n=96, seed=0):
    """3 classes: the bright channel is the class (learnable in one epoch)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = (rng.random((n, 32, 32, 3)) * 80).astype(np.uint8)
    x[np.arange(n), :, :, y] += 150
    return x, y


def _recipe(**kw):
    base = dict(depth=8, epochs=4, batch_size=32, lr=0.1, warmup_epochs=1, seed=5, aug="plan")
    base.update(kw)
    return TrainRecipe(**base)


def _kill_after(k):
    def progress(epoch, total, rec):
        if epoch == k:
            raise Killed

    return progress


def _equal_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("every", [1, 2])
def test_single_expert_resume_is_bit_equal(tmp_path, every):
    x, y = _toy()
    ref, ref_hist = train_expert(x, y, "logitadjust:2", _recipe())
    ck = DirCheckpoint(tmp_path, every=every)
    with pytest.raises(Killed):
        train_expert(x, y, "logitadjust:2", _recipe(), checkpoint=ck, progress=_kill_after(3))
    assert ck.path.is_file()
    # the process dies: the global RNGs move on before the rerun, which must not matter
    torch.manual_seed(123)
    np.random.seed(7)
    random.seed(9)
    resumed_at = []
    model, hist = train_expert(
        x, y, "logitadjust:2", _recipe(), checkpoint=DirCheckpoint(tmp_path, every=every),
        on_resume=lambda e, n: resumed_at.append((e, n)),
    )  # fmt: skip
    last_saved = 3 if every == 1 else 2
    assert resumed_at == [(last_saved, 4)]
    assert _equal_state(model, ref)
    assert [h["loss"] for h in hist] == [h["loss"] for h in ref_hist]
    rows = _rows(tmp_path / "metrics.jsonl")
    # one row per epoch run: 1..3 (killed after 3), then the rerun's epochs from the checkpoint
    assert [r["epoch"] for r in rows] == [1, 2, 3, *range(last_saved + 1, 5)]
    assert [r.get("resumed_from") for r in rows] == [None, None, None, last_saved, None][: len(rows)]
    assert {"epoch", "epochs", "loss", "lr", "img_per_s", "time_s", "elapsed_s"} <= set(rows[0])
    assert rows[-1]["loss"] == ref_hist[-1]["loss"]


def test_uninterrupted_checkpointed_run_equals_plain_run(tmp_path):
    x, y = _toy()
    ref, _ = train_expert(x, y, "balsoftmax", _recipe(epochs=2))
    m, _ = train_expert(x, y, "balsoftmax", _recipe(epochs=2), checkpoint=DirCheckpoint(tmp_path))
    assert _equal_state(m, ref)
    # a rerun after the final checkpoint (killed while publishing) trains nothing and is equal
    calls = []
    m2, h2 = train_expert(
        x, y, "balsoftmax", _recipe(epochs=2), checkpoint=DirCheckpoint(tmp_path),
        progress=lambda *a: calls.append(a),
    )  # fmt: skip
    assert calls == [] and len(h2) == 2 and _equal_state(m2, ref)


def test_shared_backbone_resume_is_bit_equal(tmp_path):
    x, y = _toy()
    specs = ["ce", "balsoftmax", "logitadjust:2"]
    ref = train_experts_shared(x, y, specs, _recipe(epochs=3))
    with pytest.raises(Killed):
        train_experts_shared(
            x, y, specs, _recipe(epochs=3), checkpoint=DirCheckpoint(tmp_path), progress=_kill_after(1)
        )
    hist: list = []
    m = train_experts_shared(x, y, specs, _recipe(epochs=3), checkpoint=DirCheckpoint(tmp_path), histories=hist)
    assert _equal_state(m, ref)
    assert len(hist) == 3 and all(len(h) == 3 for h in hist)
    rows = _rows(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[1]["resumed_from"] == 1
    assert rows[0]["names"] == specs and len(rows[0]["losses"]) == 3


def test_crt_resume_is_bit_equal(tmp_path):
    x, y = _toy()
    base, _ = train_expert(x, y, "ce", _recipe(epochs=1))
    sd = {k: v.clone() for k, v in base.state_dict().items()}
    ref, _ = train_expert(x, y, "decoupled", _recipe(epochs=3), init_state=sd, classifier_only=True)
    with pytest.raises(Killed):
        train_expert(x, y, "decoupled", _recipe(epochs=3), init_state=sd, classifier_only=True,
                     checkpoint=DirCheckpoint(tmp_path), progress=_kill_after(2))  # fmt: skip
    m, _ = train_expert(x, y, "decoupled", _recipe(epochs=3), init_state=sd, classifier_only=True,
                        checkpoint=DirCheckpoint(tmp_path))  # fmt: skip
    assert _equal_state(m, ref)


def test_checkpoint_of_another_run_is_ignored(tmp_path):
    x, y = _toy()
    with pytest.raises(Killed):
        train_expert(x, y, "ce", _recipe(), checkpoint=DirCheckpoint(tmp_path), progress=_kill_after(1))
    notes, resumed = [], []
    ref, _ = train_expert(x, y, "balsoftmax", _recipe(epochs=2))
    m, _ = train_expert(
        x, y, "balsoftmax", _recipe(epochs=2), on_resume=lambda *a: resumed.append(a),
        checkpoint=DirCheckpoint(tmp_path, on_note=notes.append),
    )  # fmt: skip
    assert resumed == [] and len(notes) == 1 and "another run" in notes[0]
    assert _equal_state(m, ref)


def test_unreadable_checkpoint_starts_over(tmp_path):
    x, y = _toy()
    ck = DirCheckpoint(tmp_path, on_note=(notes := []).append)
    ck.path.parent.mkdir(parents=True, exist_ok=True)
    ck.path.write_bytes(b"\x00" * 100)  # torn / foreign bytes
    ref, _ = train_expert(x, y, "ce", _recipe(epochs=1))
    m, _ = train_expert(x, y, "ce", _recipe(epochs=1), checkpoint=ck)
    assert len(notes) == 1 and "unreadable" in notes[0]
    assert _equal_state(m, ref)


def test_checkpoint_file_is_safetensors_with_json_state(tmp_path):
    from safetensors import safe_open

    x, y = _toy()
    train_expert(x, y, "ce", _recipe(epochs=1), checkpoint=DirCheckpoint(tmp_path))
    with safe_open(str(tmp_path / DirCheckpoint.FILE), framework="pt") as f:
        info = json.loads(f.metadata()["state"])
        keys = set(f.keys())
    assert info["epoch"] == 1 and info["step"] == 3 and len(info["history"]) == 1
    assert {"rng.torch", "rng.gen", "loop.last_finite"} <= keys
    assert any(k.startswith("opt.") and k.endswith("momentum_buffer") for k in keys)
    assert "task.fc.weight" in keys
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary behind


def test_rng_capture_restore_round_trip():
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(4)
    t, js = capture_rng(g)
    json.dumps(js)  # JSON-able
    want = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=g))
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    g.manual_seed(99)
    restore_rng(t, js, g)
    got = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=g))
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    assert got[2] == want[2] and torch.equal(got[3], want[3])
