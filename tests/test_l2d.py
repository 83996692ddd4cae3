"""Learning to defer to several experts by EM: simulation, likelihood, EM, deferral curves."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.special import softmax

from argse_cli.l2d import (
    EMSettings,
    defer_curve,
    deferral_comparison,
    em_defer,
    human_loglik,
    observed_loglik,
    sample_from_model,
    simulate_humans,
)
from argse_cli.report.deferral_figures import plot_defer


# --------------------------------------------------------------------------- simulation
def test_simulate_humans_noise_rates():
    rng = np.random.default_rng(0)
    N, C = 20_000, 10
    y = rng.integers(0, C, N)
    m = simulate_humans(y, C, [0.3, 0.1], seed=1)
    assert m.shape == (2, N) and m.dtype == np.int64
    sd = math.sqrt(0.3 * 0.7 / N)
    assert abs((m[0] != y).mean() - 0.3) < 4 * sd
    assert abs((m[1] != y).mean() - 0.1) < 4 * sd
    # wrong answers are spread over the C - 1 other classes
    wrong = m[0] != y
    off = (m[0][wrong] - y[wrong]) % C
    counts = np.bincount(off, minlength=C)
    assert counts[0] == 0 and counts[1:].min() > 0.8 * counts[1:].mean()
    assert np.array_equal(m, simulate_humans(y, C, [0.3, 0.1], seed=1))
    # class-dependent: human 0 perfect on classes < 5, noise 0.5 on the others
    cd = np.array([[0.0] * 5 + [0.5] * 5, [0.2] * 10])
    mc = simulate_humans(y, C, None, class_dependent=cd, seed=2)
    assert (mc[0][y < 5] == y[y < 5]).all()
    assert abs((mc[0][y >= 5] != y[y >= 5]).mean() - 0.5) < 4 * math.sqrt(0.25 / (N / 2))


def test_sample_from_model_human_region_noise():
    rng = np.random.default_rng(1)
    N, C = 20_000, 5
    gp = np.tile([0.2, 0.5, 0.3], (N, 1))
    eta = softmax(rng.normal(size=(N, C)), axis=1)
    y, m, z = sample_from_model(gp, eta, [0.25, 0.05], C, seed=3)
    assert abs((z == 1).mean() - 0.5) < 0.02
    assert abs((m[0][z == 1] != y[z == 1]).mean() - 0.25) < 0.02
    assert abs((m[1][z == 2] != y[z == 2]).mean() - 0.05) < 0.01
    # outside its region a human is uninformative (agrees by chance, 1 / C)
    assert abs((m[0][z != 1] == y[z != 1]).mean() - 1 / C) < 0.02


# --------------------------------------------------------------------------- likelihood
def test_human_loglik_and_observed_loglik_hand():
    y = np.array([0, 2])
    m = np.array([[0, 1], [1, 2]])  # human 0 agrees on sample 0, human 1 on sample 1
    eps = np.array([0.2, 0.4])
    C = 3
    h = human_loglik(y, m, eps, C)
    want = np.log([[0.8, 0.4 / 2], [0.2 / 2, 0.6]])
    assert np.allclose(h, want)
    eta = np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    gp = np.array([[0.5, 0.25, 0.25], [0.2, 0.4, 0.4]])
    lik0 = 0.5 * 0.5 + 0.25 * 0.8 + 0.25 * 0.2
    lik1 = 0.2 * 0.8 + 0.4 * 0.1 + 0.4 * 0.6
    assert observed_loglik(gp, eta, m, y, eps, C) == pytest.approx(np.log(lik0) + np.log(lik1))


def _synthetic(seed: int, eps_true, N=20_000, C=10):
    """Well-specified problem: true gate = softmax regression on 2-d features."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(N, 2))
    A = np.array([[2.5, -1.5, -1.0], [0.0, 2.0, -2.0]])
    gp = softmax(X @ A + np.array([0.3, 0.0, 0.0]), axis=1)
    eta = softmax(3.0 * rng.normal(size=(N, C)), axis=1)
    y, m, z = sample_from_model(gp, eta, eps_true, C, seed=seed + 100)
    return X, eta, y, m, z, gp


# --------------------------------------------------------------------------- EM
@pytest.mark.parametrize("eps_true", [(0.3, 0.3), (0.3, 0.1)])
def test_em_monotone_and_recovers_noise_rates(eps_true):
    X, eta, y, m, z, gp = _synthetic(0, eps_true)
    res = em_defer(X, eta, m, y, 10, seed=0, em=EMSettings(n_iter=30))
    ll = np.asarray(res.loglik)
    assert ll.size == 31
    assert np.all(np.diff(ll) >= -1e-9 * np.abs(ll[1:]))  # non-decreasing (float tolerance)
    assert ll[-1] - ll[0] > 1000
    assert np.max(np.abs(res.eps - np.asarray(eps_true))) <= 0.02
    # final loglik agrees with the standalone formula at the fitted parameters
    assert ll[-1] == pytest.approx(observed_loglik(res.gate.predict(X), eta, m, y, res.eps, 10))
    # the gate recovers the true p(z | x)
    assert np.abs(res.gate.predict(X) - gp).mean() < 0.03
    # responsibilities are the posterior over z and point at the true source
    assert np.allclose(res.resp.sum(1), 1.0)
    assert (res.resp.argmax(1) == z).mean() > 0.8
    json.dumps(res.to_dict(), allow_nan=False)


def test_em_mlp_gate_monotone():
    X, eta, y, m, _, _ = _synthetic(1, (0.3, 0.2), N=2_000)
    res = em_defer(X, eta, m, y, 10, seed=0, em=EMSettings(n_iter=8, gate_hidden=6, m_steps=15))
    ll = np.asarray(res.loglik)
    assert np.all(np.diff(ll) >= -1e-9 * np.abs(ll[1:]))
    assert ll[-1] > ll[0]
    assert res.gate.predict(X).shape == (2_000, 3)


def test_em_penalised_objective_monotone_and_tol_stops():
    X, eta, y, m, _, _ = _synthetic(2, (0.2, 0.2), N=3_000)
    res = em_defer(X, eta, m, y, 10, em=EMSettings(n_iter=200, l2=1e-2, tol=1e-7))
    ll = np.asarray(res.loglik)
    assert np.all(np.diff(ll) >= -1e-9 * np.abs(ll[1:]))
    assert res.converged and res.n_iter < 200


# --------------------------------------------------------------------------- deferral
def test_defer_curve_hand_case():
    y = np.array([0, 1, 2, 3])
    pred = np.array([0, 1, 0, 0])  # model right on samples 0, 1
    m = np.array([[9, 1, 2, 9], [0, 9, 9, 3]])  # human 0 right on 1, 2; human 1 on 0, 3
    keep = np.array([0.9, 0.1, 0.5, 0.3])  # ranking: 0, 2, 3, 1
    to = np.array([0, 0, 0, 1])
    r = defer_curve(keep, pred, m, y, to, shares=[0.0, 0.25, 0.5, 0.75, 1.0])
    # share 0: humans answer: s0 h0 wrong, s1 h0 right, s2 h0 right, s3 h1 right -> 3/4
    # share .25: keep s0 (right) + s1 h0, s2 h0, s3 h1 right -> 4/4
    # share .5: keep s0, s2 (wrong) -> 1 + s1, s3 right -> 3/4
    # share .75: keep s0, s2, s3 (wrong) -> 1 + s1 -> 2/4; share 1: model 2/4
    assert r["accuracy"] == pytest.approx([0.75, 1.0, 0.75, 0.5, 0.5])
    assert r["share_kept"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    w = np.array([1.0, 1.0, 1.0, 5.0])
    rw = defer_curve(keep, pred, m, y, to, shares=[0.0], w=w)
    assert rw["accuracy"][0] == pytest.approx((0 + 1 + 1 + 5) / 8)


def test_deferral_comparison_and_plot(tmp_path):
    X, eta, y, m, _, _ = _synthetic(3, (0.3, 0.3), N=3_000)
    res = em_defer(X, eta, m, y, 10, em=EMSettings(n_iter=10))
    gp = res.gate.predict(X)
    margin = eta.max(1)  # a Chow-like stand-in for the AR-GSE margin
    out = deferral_comparison(gp, eta, m, y, margin, eta.argmax(1))
    json.dumps(out, allow_nan=False)
    for key in ("l2d", "argse"):
        acc = np.asarray(out[key]["accuracy"])
        assert acc.shape == (101,) and np.all((acc >= 0) & (acc <= 1))
    # share 1 = the model alone for both (same prediction here)
    assert out["l2d"]["accuracy"][-1] == pytest.approx((eta.argmax(1) == y).mean())
    # routing by the gate beats keeping by classifier confidence at the gate's own share
    op = out["l2d_operating_point"]
    assert 0.0 <= op["share_kept"] <= 1.0
    k = int(round(op["share_kept"] * 100))
    assert op["accuracy"] >= out["argse"]["accuracy"][k] - 0.02
    paths = plot_defer(
        {"L2D (EM)": out["l2d"], "AR-GSE rejection as deferral": out["argse"]},
        tmp_path / "defer",
        points={"L2D gate's own choice": op},
    )
    assert all(p.exists() and p.stat().st_size > 1000 for p in paths)


def test_em_diagnostics_hand_computed():
    from argse_cli.l2d import em_diagnostics

    # last relative increase (-99.5 - -100) / 100 = 5e-3 > 1e-6: not converged
    d = em_diagnostics([-120.0, -100.0, -99.5], [0.077, 0.003], [0.3, 0.3])
    assert d["converged"] is False and d["last_rel_increase"] == pytest.approx(5e-3)
    assert d["max_noise_gap"] == pytest.approx(0.297)
    assert len(d["warnings"]) == 2
    assert "not converged after 2 iterations" in d["warnings"][0]
    assert "0.077/0.003 vs simulated 0.3/0.3" in d["warnings"][1]
    # flat log-likelihood and fitted noise within 0.05 of the simulated: no warning
    ok = em_diagnostics([-120.0, -100.0, -100.0], [0.28, 0.33], [0.3, 0.3])
    assert ok["converged"] is True and ok["warnings"] == [] and ok["max_noise_gap"] == pytest.approx(0.03)
    # no simulated noise given: only convergence is judged
    assert em_diagnostics([-1.0, -1.0], [0.9])["warnings"] == []


def test_em_fit_of_independent_noisy_humans_is_flagged():
    """The eval's setting (humans = independent noisy label copies): EM's eps collapses (module
    docstring), which the diagnostics turn into a warning instead of a silent number."""
    from argse_cli.l2d import EMSettings, em_defer, em_diagnostics, simulate_humans

    rng = np.random.default_rng(0)
    C, N = 5, 600
    y = rng.integers(0, C, N)
    eta = np.full((N, C), 0.1)
    eta[np.arange(N), y] += 0.5
    eta /= eta.sum(1, keepdims=True)
    m = simulate_humans(y, C, [0.3, 0.3], seed=1)
    fit = em_defer(rng.normal(size=(N, 3)), eta, m, y, C, em=EMSettings(n_iter=20))
    d = em_diagnostics(fit.loglik, fit.eps, [0.3, 0.3])
    assert d["max_noise_gap"] > 0.05 and any("fitted human noise" in w for w in d["warnings"])
