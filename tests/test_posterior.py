import numpy as np
import pytest
import torch

from argse_cli.experts.posterior import balanced_posterior, train_prior_posterior


def test_worked_example_bayes_link():
    # balanced posterior known: logits = log eta_bal; pi = (0.6, 0.3, 0.1)
    eta_bal = np.array([[0.2, 0.3, 0.5]], dtype=np.float64)
    pi = np.array([0.6, 0.3, 0.1])
    # by hand: pi * eta_bal = (.12, .09, .05), sum .26
    expected = np.array([[0.12, 0.09, 0.05]]) / 0.26
    got = train_prior_posterior(np.log(eta_bal), np.log(pi), tau=1.0)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    np.testing.assert_allclose(balanced_posterior(np.log(eta_bal)), eta_bal, rtol=1e-6)


def test_tau_zero_and_temperature():
    f = np.array([[2.0, 0.0, -2.0]])
    lp = np.log([0.5, 0.3, 0.2])
    np.testing.assert_allclose(train_prior_posterior(f, lp, 0.0), balanced_posterior(f), rtol=1e-7)
    # T = 2 halves the logits: softmax([1, 0, -1])
    e = np.exp([1.0, 0.0, -1.0])
    np.testing.assert_allclose(balanced_posterior(f, T=2.0)[0], e / e.sum(), rtol=1e-6)
    z = f + 0.5 * lp
    e = np.exp(z[0] / 3.0)
    np.testing.assert_allclose(train_prior_posterior(f, lp, 0.5, T=3.0)[0], e / e.sum(), rtol=1e-6)


def test_torch_in_torch_out_and_fp16_promoted():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(6, 5)) * 4
    lp = np.log(rng.dirichlet(np.ones(5)))
    t = train_prior_posterior(torch.tensor(f).half(), torch.tensor(lp), 1.0, T=1.5)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    n = train_prior_posterior(f.astype(np.float16), lp, 1.0, T=1.5)
    assert isinstance(n, np.ndarray) and n.dtype == np.float32
    np.testing.assert_allclose(t.numpy(), n, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(n.sum(1), 1.0, rtol=1e-6)
    b = balanced_posterior(torch.tensor(f).half())
    assert b.dtype == torch.float32


def test_large_logits_stable_in_float32():
    f = np.array([[1000.0, 0.0], [-1000.0, -1001.0]], dtype=np.float32)
    p = balanced_posterior(f)
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(p[0], [1.0, 0.0], atol=1e-7)


def test_bad_temperature():
    with pytest.raises(ValueError):
        balanced_posterior(np.zeros((1, 2)), T=0.0)
