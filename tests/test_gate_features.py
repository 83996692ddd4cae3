"""Tests of the gating features, GatingNet, the mixture and straight-through routing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from argse_cli.core.gate import (
    FEATURES_PER_EXPERT,
    GatingNet,
    build_gating_features,
    feature_dim,
    mixture_posterior,
    straight_through_top1,
)

torch.set_num_threads(1)

# feature order per expert
ENT, TOPK, RES, PMAX, GAP, KL, COS = range(FEATURES_PER_EXPERT)


def _posteriors(B: int, E: int, C: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2, (B, E, C))
    p = np.exp(z - z.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)).astype(np.float32)


def test_feature_width_independent_of_C():
    f10 = build_gating_features(_posteriors(8, 3, 10))
    f100 = build_gating_features(_posteriors(8, 3, 100))
    assert f10.shape == f100.shape == (8, 21) == (8, feature_dim(3))
    assert f10.dtype == np.float32


def test_hand_checked_one_hot_and_uniform():
    C = 10
    one_hot = np.zeros((1, 1, C), np.float32)
    one_hot[0, 0, 3] = 1.0
    uniform = np.full((1, 1, C), 1 / C, np.float32)
    f1 = build_gating_features(one_hot)[0]
    fu = build_gating_features(uniform)[0]
    # one-hot: H = 0, top-5 mass 1, residual 0, max 1, gap 1; single expert -> KL 0, cos 1
    np.testing.assert_allclose(f1, [0, 1, 0, 1, 1, 0, 1], atol=1e-6)
    # uniform: H = log C, top-5 mass 5/C, residual 1 - 5/C, max 1/C, gap 0
    np.testing.assert_allclose(fu, [math.log(C), 0.5, 0.5, 0.1, 0, 0, 1], atol=1e-6)
    # C=3: k = min(5, C) = 3 -> top-k mass 1, residual 0
    f3 = build_gating_features(np.full((1, 1, 3), 1 / 3, np.float32))[0]
    np.testing.assert_allclose(f3[[TOPK, RES]], [1, 0], atol=1e-6)


def test_kl_and_cosine_to_the_mean_two_experts():
    # expert 0 one-hot on class 0, expert 1 uniform over 2 classes -> pbar = [0.75, 0.25]
    p = np.array([[[1.0, 0.0], [0.5, 0.5]]], np.float32)
    f = build_gating_features(p)[0].reshape(2, FEATURES_PER_EXPERT)
    kl0 = math.log(1 / 0.75)
    kl1 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    cos0 = 0.75 / math.hypot(0.75, 0.25)
    cos1 = (0.5 * 0.75 + 0.5 * 0.25) / (math.hypot(0.5, 0.5) * math.hypot(0.75, 0.25))
    np.testing.assert_allclose(f[:, KL], [kl0, kl1], atol=1e-6)
    np.testing.assert_allclose(f[:, COS], [cos0, cos1], atol=1e-6)
    np.testing.assert_allclose(f[:, GAP], [1.0, 0.0], atol=1e-6)


def test_numpy_torch_parity_and_fp16():
    p = _posteriors(16, 2, 12, seed=1)
    f_np = build_gating_features(p)
    f_t = build_gating_features(torch.as_tensor(p))
    assert isinstance(f_np, np.ndarray) and isinstance(f_t, torch.Tensor)
    assert f_np.shape == (16, feature_dim(2)) == (16, 14)
    assert f_t.dtype == torch.float32
    np.testing.assert_allclose(f_t.numpy(), f_np, atol=1e-6)
    f16 = build_gating_features(torch.as_tensor(p).half())
    assert f16.dtype == torch.float32
    with pytest.raises(ValueError):
        build_gating_features(p[0])


def test_gating_net_weights_sum_to_one():
    torch.manual_seed(0)
    net = GatingNet(feature_dim(3), 3, hidden=(16, 8), dropout=0.1)
    x = torch.as_tensor(build_gating_features(_posteriors(32, 3, 5)))
    w = net(x)
    assert w.shape == (32, 3)
    assert torch.all(w >= 0)
    torch.testing.assert_close(w.sum(-1), torch.ones(32))


def test_mixture_posterior_is_weighted_sum():
    p = _posteriors(4, 2, 3, seed=2)
    w = np.array([[1, 0], [0, 1], [0.5, 0.5], [0.25, 0.75]], np.float32)
    eta = mixture_posterior(w, p)
    assert eta.dtype == np.float32
    np.testing.assert_allclose(eta[0], p[0, 0], atol=1e-7)
    np.testing.assert_allclose(eta[1], p[1, 1], atol=1e-7)
    np.testing.assert_allclose(eta[3], 0.25 * p[3, 0] + 0.75 * p[3, 1], atol=1e-7)
    np.testing.assert_allclose(eta.sum(-1), 1.0, atol=1e-6)
    eta_t = mixture_posterior(torch.as_tensor(w), torch.as_tensor(p).half())
    assert eta_t.dtype == torch.float32


def test_straight_through_one_hot_forward_nonzero_gradient():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.5]], requires_grad=True)
    w = torch.softmax(logits, -1)
    hard = straight_through_top1(w)
    torch.testing.assert_close(hard.detach(), torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    # a loss that depends on the routed expert: gradient reaches the gate logits
    target = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    (hard * target).sum().backward()
    assert logits.grad is not None
    assert torch.all(torch.isfinite(logits.grad))
    assert logits.grad.abs().sum() > 0
