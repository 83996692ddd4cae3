"""Fused multi-expert training (vmap over stacked ResNets) vs separate train_expert runs (CPU)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import argse_cli.experts.trainer as trainer_mod
from argse_cli.experts.fused import logit_adjusted_ce_stacked, train_experts_fused
from argse_cli.experts.trainer import TrainRecipe, predict_logits, train_expert

SPECS = ("ce", "logitadjust:2")


def _toy(n_per_class, seed: int):
    """4 classes; class c = a fixed mean colour (+ a bright square in quadrant c) + noise."""
    rng = np.random.default_rng(seed)
    means = np.array([[200, 60, 60], [60, 200, 60], [60, 60, 200], [200, 200, 60]], float)
    y = np.concatenate([np.full(k, c) for c, k in enumerate(n_per_class)])
    x = means[y][:, None, None, :] + rng.normal(0, 50, size=(len(y), 32, 32, 3))
    for c in range(4):
        r, q = divmod(c, 2)
        x[y == c, 16 * r : 16 * r + 8, 16 * q : 16 * q + 8] += 50
    return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)


def _bal_acc(pred, y) -> float:
    """Class-balanced accuracy = mean per-class recall."""
    return float(np.mean([np.mean(pred[y == c] == c) for c in np.unique(y)]))


@pytest.fixture(scope="module")
def runs():
    torch.set_num_threads(2)
    x, y = _toy([64, 48, 32, 16], seed=0)  # long-tailed: 160 images, 5 steps/epoch at 32
    xt, yt = _toy([40, 40, 40, 40], seed=1)
    counts = np.bincount(y, minlength=4)
    log_pi = np.log(counts / counts.sum()).astype(np.float32)
    recipe = TrainRecipe(depth=8, epochs=2, batch_size=32, warmup_epochs=1, seed=3)

    # unfused: record every step's loss by wrapping the trainer's loss factory
    unfused, unfused_losses = [], []
    for spec in SPECS:
        rec: list[float] = []
        orig = trainer_mod.loss_fn

        def recording(spec_, lp, _orig=orig, _rec=rec):
            f = _orig(spec_, lp)

            def g(logits, t):
                v = f(logits, t)
                _rec.append(float(v.detach()))
                return v

            return g

        trainer_mod.loss_fn = recording
        try:
            m, _ = train_expert(x, y, spec, recipe, log_pi)
        finally:
            trainer_mod.loss_fn = orig
        unfused.append(m)
        unfused_losses.append(rec)

    fused_losses: list[list[float]] = []
    hist: list = []
    fused = train_experts_fused(
        x, y, SPECS, recipe, log_pi, histories=hist,
        on_step=lambda s, ld: fused_losses.append(ld.tolist()),
    )  # fmt: skip
    return dict(
        x=x, y=y, xt=xt, yt=yt, log_pi=log_pi, unfused=unfused, fused=fused, hist=hist,
        ul=np.array(unfused_losses).T, fl=np.array(fused_losses),
    )  # fmt: skip


def test_per_step_losses_match_unfused(runs):
    ul, fl = runs["ul"], runs["fl"]  # [steps, E]
    assert ul.shape == fl.shape == (10, 2)
    # step 0: same init and same batch -> equal up to float summation order
    np.testing.assert_allclose(fl[0], ul[0], rtol=1e-5, atol=1e-6)
    # the two experts really differ (tau = 0 vs 2 on a long-tailed prior)
    assert abs(fl[0, 0] - fl[0, 1]) > 1e-2
    np.testing.assert_allclose(fl[:5], ul[:5], rtol=2e-3, atol=2e-4)


def test_final_accuracy_within_one_point(runs):
    yt = runs["yt"]
    for mf, mu in zip(runs["fused"], runs["unfused"], strict=True):
        af = _bal_acc(predict_logits(mf, runs["xt"]).argmax(1).numpy(), yt)
        au = _bal_acc(predict_logits(mu, runs["xt"]).argmax(1).numpy(), yt)
        assert au > 0.5  # the toy is learnable in 2 epochs (chance = 0.25)
        assert abs(af - au) <= 0.01, (af, au)
        print(f"bal acc fused {af:.4f} unfused {au:.4f}")


def test_batchnorm_buffers_are_per_expert(runs):
    for mf, mu in zip(runs["fused"], runs["unfused"], strict=True):
        bf, bu = dict(mf.named_buffers()), dict(mu.named_buffers())
        assert int(bf["bn1.num_batches_tracked"]) == 10 == int(bu["bn1.num_batches_tracked"])
        torch.testing.assert_close(
            bf["bn1.running_mean"], bu["bn1.running_mean"], rtol=1e-3, atol=1e-3
        )
    # different losses -> different statistics deeper in the net (not one shared buffer)
    a, b = (dict(m.named_buffers())["layer3.0.bn2.running_var"] for m in runs["fused"])
    assert not torch.allclose(a, b)


def test_histories_per_expert(runs):
    hist = runs["hist"]
    assert len(hist) == 2 and all(len(h) == 2 for h in hist)
    for e in range(2):
        # epoch loss = mean of that expert's step losses
        assert math.isclose(hist[e][0]["loss"], float(np.mean(runs["fl"][:5, e])), rel_tol=1e-5)


def test_stacked_loss_hand_case():
    """f = 0, pi = (0.8, 0.2): softmax(tau log pi) at tau = 1 is pi, at tau = 0 uniform."""
    log_pi = torch.log(torch.tensor([0.8, 0.2]))
    logits = torch.zeros(2, 2, 2)  # E = 2 experts, B = 2 samples
    y = torch.tensor([0, 1])
    got = logit_adjusted_ce_stacked(logits, y, log_pi, torch.tensor([0.0, 1.0]))
    want = torch.tensor([math.log(2.0), -(math.log(0.8) + math.log(0.2)) / 2])
    torch.testing.assert_close(got, want)
    soft = torch.tensor([[0.5, 0.5], [0.0, 1.0]])
    got = logit_adjusted_ce_stacked(logits, soft, log_pi, torch.tensor([1.0, 1.0]))
    v = (-(0.5 * math.log(0.8) + 0.5 * math.log(0.2)) - math.log(0.2)) / 2
    torch.testing.assert_close(got, torch.tensor([v, v]))


def test_decoupled_refused():
    x, y = _toy([4, 4, 4, 4], seed=0)
    with pytest.raises(ValueError, match="decoupled"):
        train_experts_fused(x, y, ["ce", "decoupled"], TrainRecipe(depth=8, epochs=1))
