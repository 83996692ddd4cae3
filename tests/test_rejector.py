"""Tests of the group-aware plug-in rule (argse_cli/rejector.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from argse_cli.core.rule import (
    acceptance_prob,
    chow_margin,
    fix_mu_gauge,
    group_weights_u,
    plugin_margin,
    plugin_predict,
)

torch.set_num_threads(1)


def _random_eta(n: int, C: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, (n, C))
    e = np.exp(z - z.max(1, keepdims=True))
    return (e / e.sum(1, keepdims=True)).astype(np.float32)


G6 = np.array([0, 0, 1, 1, 2, 2])


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_margin_equals_chow_at_alpha1_mu0_uniform_beta(kind):
    eta = _random_eta(200, 6, 0)
    c = 0.17
    args = (eta, np.ones(3), np.zeros(3))
    if kind == "torch":
        args = tuple(torch.as_tensor(a) for a in args)
    beta = np.full(3, 1 / 3) if kind == "numpy" else torch.full((3,), 1 / 3)
    m = plugin_margin(*args, c, G6, beta)
    chow = chow_margin(args[0], c)
    assert type(m) is type(chow)
    np.testing.assert_allclose(np.asarray(m), np.asarray(chow), atol=1e-6)
    # accept iff max eta >= 1 - c
    np.testing.assert_array_equal(np.asarray(m) >= -1e-7, eta.max(1) >= 1 - c - 1e-7)
    # and the prediction is the plain argmax
    np.testing.assert_array_equal(
        np.asarray(plugin_predict(args[0], args[1], G6, beta)), eta.argmax(1)
    )


def test_margin_hand_computed_3_classes():
    # classes 0,1 in group 0, class 2 in group 1; K=2, uniform beta -> u = 1/alpha
    eta = np.array([[0.5, 0.2, 0.3]], np.float32)
    g = np.array([0, 0, 1])
    alpha = np.array([1.0, 0.5])  # u = [1, 2]
    mu = np.array([0.4, 0.0])
    c = 0.1
    # u*eta = [0.5, 0.2, 0.6] -> max 0.6 (class 2)
    # sum (u - mu) eta = (1-0.4)*0.5 + (1-0.4)*0.2 + (2-0)*0.3 = 0.3 + 0.12 + 0.6 = 1.02
    # m = 0.6 - 1.02 + 0.1 = -0.32
    m = plugin_margin(eta, alpha, mu, c, g)
    np.testing.assert_allclose(m, [-0.32], atol=1e-6)
    assert plugin_predict(eta, alpha, g)[0] == 2


def test_prediction_favours_group_with_smaller_alpha():
    eta = np.array([[0.5, 0.5]], np.float32)
    g = np.array([0, 1])
    assert plugin_predict(eta, np.array([1.0, 0.5]), g)[0] == 1
    assert plugin_predict(eta, np.array([0.5, 1.0]), g)[0] == 0
    t = plugin_predict(torch.as_tensor(eta), torch.tensor([1.0, 0.5]), torch.as_tensor(g))
    assert int(t[0]) == 1


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    c1=st.floats(0.0, 1.0),
    dc=st.floats(0.0, 1.0),
)
def test_raising_c_never_lowers_coverage(seed, c1, dc):
    rng = np.random.default_rng(seed)
    eta = _random_eta(100, 6, seed)
    alpha = rng.uniform(0.2, 2.0, 3)
    mu = np.append(rng.normal(0, 0.5, 2), 0.0)
    beta = rng.dirichlet(np.ones(3))
    a1 = plugin_margin(eta, alpha, mu, c1, G6, beta) >= 0
    a2 = plugin_margin(eta, alpha, mu, c1 + dc, G6, beta) >= 0
    assert np.all(a2[a1])  # every accepted sample stays accepted
    assert a2.mean() >= a1.mean()


def test_raising_tau_sharpens_acceptance():
    m = np.array([-0.3, -0.01, 0.01, 0.3], np.float32)
    taus = [1.0, 2.0, 10.0, 100.0]
    for kind in ("numpy", "torch"):
        mm = m if kind == "numpy" else torch.as_tensor(m)
        s = np.stack([np.asarray(acceptance_prob(mm, t)) for t in taus])
        assert np.all(np.diff(s[:, m > 0], axis=0) > 0)  # increases toward 1
        assert np.all(np.diff(s[:, m < 0], axis=0) < 0)  # decreases toward 0
        assert s[-1, 3] > 0.999 and s[-1, 0] < 1e-3
    np.testing.assert_allclose(acceptance_prob(np.zeros(1, np.float32), 5.0), [0.5])


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_fix_mu_gauge_keeps_margins(kind):
    rng = np.random.default_rng(3)
    eta = _random_eta(300, 6, 1)
    alpha = rng.uniform(0.3, 2.0, 3)
    mu = rng.normal(0, 1, 3)
    c = 0.2
    if kind == "torch":
        eta, alpha, mu = (torch.as_tensor(a, dtype=torch.float64) for a in (eta, alpha, mu))
    m_before = np.asarray(plugin_margin(eta, alpha, mu, c, G6))
    mu2, c2 = fix_mu_gauge(mu, c)
    assert float(mu2[-1]) == 0.0
    np.testing.assert_allclose(
        np.asarray(plugin_margin(eta, alpha, mu2, c2, G6)), m_before, atol=1e-9
    )
    # idempotent on an already-gauged mu
    mu3, c3 = fix_mu_gauge(mu2, c2)
    assert c3 == pytest.approx(c2)
    np.testing.assert_allclose(np.asarray(mu3), np.asarray(mu2))


def test_beta_none_equals_uniform_beta():
    rng = np.random.default_rng(5)
    eta = _random_eta(150, 6, 2)
    alpha = rng.uniform(0.3, 2.0, 3)
    mu = np.array([0.3, -0.2, 0.0])
    np.testing.assert_allclose(group_weights_u(alpha), group_weights_u(alpha, np.full(3, 1 / 3)))
    np.testing.assert_allclose(
        plugin_margin(eta, alpha, mu, 0.1, G6),
        plugin_margin(eta, alpha, mu, 0.1, G6, np.full(3, 1 / 3)),
        atol=1e-6,
    )
    np.testing.assert_array_equal(
        plugin_predict(eta, alpha, G6), plugin_predict(eta, alpha, G6, np.full(3, 1 / 3))
    )


def test_fp16_input_gives_float32_output():
    eta = _random_eta(50, 6, 4)
    alpha, mu = np.array([1.0, 0.7, 0.4]), np.array([0.1, 0.2, 0.0])
    h = np.float16
    m_np = plugin_margin(eta.astype(h), alpha.astype(h), mu.astype(h), 0.1, G6)
    assert m_np.dtype == np.float32
    assert acceptance_prob(m_np, 5.0).dtype == np.float32
    assert chow_margin(eta.astype(np.float16), 0.1).dtype == np.float32
    t = torch.as_tensor(eta).half()
    m_t = plugin_margin(t, torch.as_tensor(alpha).half(), torch.as_tensor(mu).half(), 0.1, G6)
    assert m_t.dtype == torch.float32
    assert acceptance_prob(m_t, 5.0).dtype == torch.float32
    assert chow_margin(t, 0.1).dtype == torch.float32
    np.testing.assert_allclose(m_t.numpy(), m_np, atol=1e-6)
