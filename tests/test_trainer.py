import math

import numpy as np
import pytest
import torch

from argse_cli.experts.trainer import (
    TrainingDiverged,
    TrainRecipe,
    class_balanced_indices,
    load_model,
    lr_at,
    predict_logits,
    state_dict_to_safetensors_bytes,
    train_expert,
)

torch.set_num_threads(1)


def _toy(n=256, seed=0):
    """Learnable toy: class c in {0, 1, 2} = the bright colour channel."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = (rng.random((n, 32, 32, 3)) * 80).astype(np.uint8)
    x[np.arange(n), :, :, y] += 150
    return x, y


LOG_PI = np.log(np.full(3, 1 / 3))


def _recipe(**kw):
    base = dict(depth=8, epochs=2, batch_size=64, lr=0.1, warmup_epochs=0, seed=0)
    base.update(kw)
    return TrainRecipe(**base)


def test_lr_schedule():
    peak, S, W = 0.2, 100, 10
    lrs = [lr_at(s, S, W, peak) for s in range(S + 1)]
    assert lrs[0] == pytest.approx(peak / W)
    assert lrs[W - 1] == pytest.approx(peak) and lrs[W] == pytest.approx(peak)
    assert all(a <= b for a, b in zip(lrs[: W - 1], lrs[1:W], strict=True))
    assert all(a >= b for a, b in zip(lrs[W:-1], lrs[W + 1 :], strict=True))
    assert lrs[S] == pytest.approx(0.0, abs=1e-12)
    assert lrs[W + (S - W) // 2] == pytest.approx(peak / 2)
    assert TrainRecipe(batch_size=512, lr=0.1).peak_lr == pytest.approx(0.4)


def test_loss_finite_decreases_and_learns():
    x, y = _toy(192)
    seen = []
    xt, yt = _toy(150, seed=1)
    model, hist = train_expert(
        x,
        y,
        "ce",
        _recipe(epochs=3, eval_every=3),
        LOG_PI,
        progress=lambda e, n, d: seen.append((e, n, d)),
        eval_data=(xt, yt),
    )
    assert len(hist) == 3 and [s[0] for s in seen] == [1, 2, 3] and seen[0][1] == 3
    assert all(math.isfinite(h["loss"]) for h in hist)
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert {"loss", "acc", "lr", "img_per_s"} <= set(hist[0])
    acc = (predict_logits(model, xt).argmax(1).numpy() == yt).mean()
    assert acc > 0.8  # chance = 1/3
    assert "eval_bal_acc" not in hist[0] and hist[2]["eval_bal_acc"] > 0.8


def test_deterministic_two_runs_identical():
    x, y = _toy(128)
    r = _recipe(epochs=1, aug="plan")
    m1, h1 = train_expert(x, y, "balsoftmax", r, LOG_PI)
    m2, h2 = train_expert(x, y, "balsoftmax", r, LOG_PI)
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert h1[0]["loss"] == h2[0]["loss"]
    m3, _ = train_expert(x, y, "balsoftmax", _recipe(epochs=1, aug="plan", seed=1), LOG_PI)
    assert not torch.equal(m3.fc.weight, m1.fc.weight)


def test_class_balanced_sampler_draws_tail_as_often_as_head():
    y = torch.tensor([0] * 900 + [1] * 90 + [2] * 10)
    g = torch.Generator().manual_seed(0)
    idx = class_balanced_indices(y, 30000, g)
    frac = torch.bincount(y[idx], minlength=3).double() / 30000
    assert torch.allclose(frac, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.015)


def test_decoupled_changes_only_fc():
    x, y = _toy(128)
    base, _ = train_expert(x, y, "ce", _recipe(epochs=1), LOG_PI)
    sd0 = {k: v.clone() for k, v in base.state_dict().items()}
    crt, hist = train_expert(
        x, y, "decoupled", _recipe(epochs=2), LOG_PI, init_state=sd0, classifier_only=True
    )
    sd1 = crt.state_dict()
    for k in sd0:
        if k.startswith("fc."):
            assert not torch.equal(sd0[k], sd1[k]), k
        else:
            assert torch.equal(sd0[k], sd1[k]), k  # incl. BN running stats (eval-mode backbone)
    with pytest.raises(ValueError):
        train_expert(x, y, "decoupled", _recipe(epochs=1), LOG_PI)
    with pytest.raises(ValueError):
        train_expert(x, y, "ce", _recipe(epochs=1), LOG_PI, classifier_only=True)


def test_divergence_raises():
    x, y = _toy(128)
    with pytest.raises(TrainingDiverged, match=r"epoch \d+.*last finite loss") as ei:
        train_expert(x, y, "ce", _recipe(epochs=6, lr=1e6), LOG_PI)
    assert ei.value.epoch >= 0


def test_safetensors_round_trip_and_fp16_export(tmp_path):
    x, y = _toy(128)
    model, _ = train_expert(x, y, "ce", _recipe(epochs=1), LOG_PI)
    blob = state_dict_to_safetensors_bytes(model)
    assert isinstance(blob, bytes)
    a = predict_logits(model, x[:50])
    b = predict_logits(load_model(blob, 8, 3), x[:50])
    assert a.dtype == torch.float32 and a.shape == (50, 3)
    assert torch.equal(a, b)
    p = tmp_path / "m.safetensors"
    p.write_bytes(blob)
    assert torch.equal(predict_logits(load_model(p, 8, 3), x[:50]), a)
    torch.testing.assert_close(a.half().float(), a, rtol=1e-3, atol=1e-2)
    with pytest.raises(RuntimeError):
        load_model(blob, 20, 3)  # architecture mismatch is refused


def test_balanced_rule_logits_hand_computed():
    """pi = (0.8, 0.2), f = (0, 1): tau = 2 adds log pi (favours the head back: 0 + log .8 = -0.223 vs
    1 + log .2 = -0.609 -> class 0); tau = 1 is raw (class 1); tau = 0 subtracts log pi."""
    from argse_cli.experts.trainer import balanced_rule_logits

    log_pi = torch.log(torch.tensor([0.8, 0.2]))
    f = torch.tensor([[0.0, 1.0]])
    z2 = balanced_rule_logits(f, log_pi, 2.0)
    torch.testing.assert_close(z2, torch.tensor([[math.log(0.8), 1.0 + math.log(0.2)]]))
    assert int(z2.argmax()) == 0
    assert torch.equal(balanced_rule_logits(f, log_pi, 1.0), f)
    torch.testing.assert_close(
        balanced_rule_logits(f, log_pi, 0.0), torch.tensor([[-math.log(0.8), 1.0 - math.log(0.2)]])
    )
