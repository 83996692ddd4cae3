import numpy as np
import pytest
import torch

from argse_cli.experts.calibration import (
    calibration_metrics,
    fit_temperature,
    weighted_nll_at_T,
)
from argse_cli.experts.posterior import train_prior_posterior


def _calibrated(n=20000, C=10, scale=2.0, seed=0):
    """z random, y ~ softmax(z): softmax(z) is calibrated by construction."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, C)) * scale
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    u = rng.random(n)[:, None]
    y = (p.cumsum(1) < u).sum(1).clip(0, C - 1)
    return z, y


def test_overconfident_by_5_gives_T_near_5():
    z, y = _calibrated()
    T = fit_temperature(5 * z, y, np.zeros(10), tau=0.0)
    assert T == pytest.approx(5.0, rel=0.05)


def test_with_tau_and_log_pi():
    # f = 5 z - tau log pi, so (f + tau log pi) / T = 5 z / T: T* ~ 5 again
    z, y = _calibrated(seed=1)
    log_pi = np.log(np.random.default_rng(2).dirichlet(np.ones(10)))
    tau = 1.0
    f = 5 * z - tau * log_pi
    T = fit_temperature(torch.tensor(f, dtype=torch.float16).float(), y, log_pi, tau)
    assert T == pytest.approx(5.0, rel=0.05)


def test_underconfident_gives_T_below_1():
    z, y = _calibrated(seed=3)
    T = fit_temperature(0.5 * z, y, np.zeros(10), 0.0)
    assert T == pytest.approx(0.5, rel=0.05)


@pytest.mark.parametrize("seed", range(6))
def test_fit_never_raises_nll_vs_T1(seed):
    rng = np.random.default_rng(seed)
    n, C = 300, 5
    f = rng.normal(size=(n, C)) * rng.uniform(0.1, 8)
    y = rng.integers(0, C, n)
    log_pi = np.log(rng.dirichlet(np.ones(C)))
    w = rng.uniform(0, 3, n) if seed % 2 else None
    tau = [0.0, 1.0, 0.5][seed % 3]
    T = fit_temperature(f, y, log_pi, tau, w=w)
    assert 0.05 <= T <= 20.0
    assert weighted_nll_at_T(f, y, log_pi, tau, T, w) <= weighted_nll_at_T(
        f, y, log_pi, tau, 1.0, w
    )


def test_importance_weights_matter():
    # two halves with different miscalibration; weight on one half picks its temperature
    za, ya = _calibrated(n=6000, seed=4)
    zb, yb = _calibrated(n=6000, seed=5)
    f = np.concatenate([2 * za, 8 * zb])
    y = np.concatenate([ya, yb])
    w_a = np.concatenate([np.ones(6000), np.zeros(6000)])
    assert fit_temperature(f, y, np.zeros(10), 0.0, w=w_a) == pytest.approx(2.0, rel=0.07)
    assert fit_temperature(f, y, np.zeros(10), 0.0, w=1 - w_a) == pytest.approx(8.0, rel=0.07)


def test_bounds_respected_and_validated():
    z, y = _calibrated(n=3000)
    assert fit_temperature(50 * z, y, np.zeros(10), 0.0, bounds=(0.5, 4.0)) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        fit_temperature(z, y, np.zeros(10), 0.0, bounds=(2.0, 1.0))


def test_nll_objective_matches_metrics_nll_and_metrics_improve():
    z, y = _calibrated(n=4000, seed=6)
    log_pi = np.log(np.full(10, 0.1))
    f = 4 * z
    p = train_prior_posterior(f, log_pi, 1.0, T=1.0)
    from argse_cli.metrics.calibration import nll

    assert weighted_nll_at_T(f, y, log_pi, 1.0, 1.0) == pytest.approx(nll(p, y), rel=1e-4)
    T = fit_temperature(f, y, log_pi, 1.0)
    before = calibration_metrics(f, y, log_pi, 1.0, T=1.0)
    after = calibration_metrics(f, y, log_pi, 1.0, T=T)
    assert after["nll"] < before["nll"] and after["ece"] < before["ece"]
