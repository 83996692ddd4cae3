"""Property tests (hypothesis) for the rejector chain (issue: reliability & security, item 4).

For any finite input -- ties, logits of +-1e4 stored as fp16, all-equal posteriors, a group with
no accepted sample -- nothing is NaN:
  logits -> calibrated posteriors (apply_calibration) -> plug-in margin / prediction /
  soft acceptance (rejector.py, numpy and torch) -> group statistics of the hard rule
  (e_k = 1.0 for a group with no accepted sample) -> fitted rules (CS-plug-in, Plug-in[Worst]) and
  coverage thresholds.
Metric-level properties (RC curves, AURC, bootstrap) are in test_metrics_properties.py.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from argse_cli.core.expert_data import apply_calibration
from argse_cli.core.gate_fit import hard_rule_group_stats
from argse_cli.core.plugin_fit import (
    SEARCH,
    Split,
    cost_operating_point,
    coverage_cut,
    fit_curve,
    fit_worst_curve,
)
from argse_cli.core.rule import (
    acceptance_prob,
    chow_margin,
    fix_mu_gauge,
    plugin_margin,
    plugin_predict,
)
from argse_cli.metrics.selective import balanced_error, group_errors, worst_group_error

torch.set_num_threads(1)
ALPHA_MIN = SEARCH.alpha_min
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ATOMS = [-1e4, -30.0, -1.0, 0.0, 0.5, 1.0, 30.0, 1e4]


@st.composite
def problems(draw, max_n: int = 24):
    """(eta float32 [n, C], y [n], class_to_group [C] with K >= 2 groups, logits fp16 [n, E, C])."""
    n = draw(st.integers(1, max_n))
    C = draw(st.integers(2, 6))
    E = draw(st.integers(1, 3))
    c2g = draw(st.lists(st.integers(0, 2), min_size=C, max_size=C))
    c2g[-1] = max(1, c2g[-1])  # K >= 2 (a middle group may be empty: no class maps to it)
    kind = draw(st.sampled_from(["atoms", "floats", "equal", "ties"]))
    if kind == "atoms":
        f = draw(st.lists(st.sampled_from(ATOMS), min_size=n * E * C, max_size=n * E * C))
    elif kind == "floats":
        f = draw(st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=16), min_size=n * E * C,
                          max_size=n * E * C))  # fmt: skip
    elif kind == "equal":  # all-equal logits: uniform posteriors, every class ties
        f = [draw(st.sampled_from(ATOMS))] * (n * E * C)
    else:  # two distinct values: many exact ties
        a, b = draw(st.sampled_from(ATOMS)), draw(st.sampled_from(ATOMS))
        f = draw(st.lists(st.sampled_from([a, b]), min_size=n * E * C, max_size=n * E * C))
    logits = np.asarray(f, dtype=np.float16).reshape(n, E, C)
    counts = np.asarray(draw(st.lists(st.integers(1, 5000), min_size=C, max_size=C)), np.float64)
    log_pi = np.log(counts / counts.sum()).astype(np.float32)
    shift = np.asarray(
        draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0]), min_size=E, max_size=E))
    )
    T = np.asarray(draw(st.lists(st.floats(0.05, 20.0), min_size=E, max_size=E)), np.float32)
    post = apply_calibration(logits, log_pi, shift, T)
    w_gate = np.asarray(draw(st.lists(st.floats(0.0, 1.0), min_size=E, max_size=E))) + 1e-3
    eta = np.einsum("e,nec->nc", (w_gate / w_gate.sum()).astype(np.float32), post)
    y = np.asarray(draw(st.lists(st.integers(0, C - 1), min_size=n, max_size=n)))
    return eta.astype(np.float32), y, np.asarray(c2g), post


@st.composite
def rules(draw, K: int):
    alpha = np.asarray(draw(st.lists(st.sampled_from([ALPHA_MIN, 0.01, 0.3, 1.0, 2.0, 1e3]) |
                                     st.floats(ALPHA_MIN, 1e3), min_size=K, max_size=K)))  # fmt: skip
    mu = np.asarray(draw(st.lists(st.floats(-50.0, 50.0), min_size=K, max_size=K)))
    c = draw(st.floats(0.0, 1.0))
    beta = None
    if draw(st.booleans()):
        b = np.asarray(draw(st.lists(st.floats(0.0, 1.0), min_size=K, max_size=K))) + 1e-6
        beta = b / b.sum()
    return alpha, mu, c, beta


def _finite(*xs) -> bool:
    return all(bool(np.all(np.isfinite(np.asarray(x, dtype=np.float64)))) for x in xs)


@SETTINGS
@given(problems())
def test_calibrated_posteriors_are_a_finite_simplex(p):
    _, _, _, post = p
    assert post.dtype == np.float32  # fp16 logits in, float32 posteriors out
    assert _finite(post) and post.min() >= 0.0
    np.testing.assert_allclose(post.sum(-1), 1.0, atol=1e-5)


@SETTINGS
@given(problems(), st.data())
def test_margin_prediction_acceptance_finite_numpy_and_torch(p, data):
    eta, y, c2g, _ = p
    K = int(c2g.max()) + 1
    alpha, mu, c, beta = data.draw(rules(K))
    C = eta.shape[1]
    m = plugin_margin(eta, alpha, mu, c, c2g, beta)
    h = plugin_predict(eta, alpha, c2g, beta)
    assert _finite(m) and np.all((h >= 0) & (h < C))
    tau = data.draw(st.sampled_from([0.1, 1.0, 10.0, 1e4]))
    s = acceptance_prob(m, tau)
    assert _finite(s) and np.all((s >= 0) & (s <= 1))
    # the same in torch
    tm = plugin_margin(torch.from_numpy(eta), torch.from_numpy(alpha), torch.from_numpy(mu), c,
                       torch.from_numpy(c2g), None if beta is None else torch.from_numpy(beta))  # fmt: skip
    assert bool(torch.isfinite(tm).all())
    assert bool(torch.isfinite(acceptance_prob(tm, tau)).all())
    # gauge: (mu, c) and (mu - mu_[K-1], c + mu_[K-1]) are the same rule (float32 arithmetic)
    mu2, c2 = fix_mu_gauge(mu, c)
    m2 = plugin_margin(eta, alpha, mu2, c2, c2g, beta)
    scale = 1.0 + np.abs(mu).max() + np.abs(1.0 / alpha).max()
    assert np.allclose(m, m2, atol=1e-5 * scale)


@SETTINGS
@given(problems())
def test_all_ones_alpha_zero_mu_is_chow(p):
    eta, _, c2g, _ = p
    K = int(c2g.max()) + 1
    for c in (0.0, 0.05, 1.0):
        m = plugin_margin(eta, np.ones(K), np.zeros(K), c, c2g)
        assert _finite(m)
        np.testing.assert_allclose(m, chow_margin(eta, c), atol=1e-5)


@SETTINGS
@given(problems(), st.data())
def test_group_stats_of_the_hard_rule(p, data):
    """e_k = 1.0 for a group with no accepted sample (here forced: nothing of group 0 accepted)."""
    eta, y, c2g, _ = p
    K = int(c2g.max()) + 1
    alpha, mu, c, beta = data.draw(rules(K))
    pred = plugin_predict(eta, alpha, c2g, beta)
    accept = plugin_margin(eta, alpha, mu, c, c2g, beta) >= 0
    accept &= c2g[y] != 0  # group 0 never accepted
    w = data.draw(st.none() | st.lists(st.floats(0.0, 10.0), min_size=len(y), max_size=len(y)))
    w = None if w is None else np.asarray(w)
    cov, gcov, gerr = hard_rule_group_stats(pred, accept, y, w, c2g, K)
    assert _finite(cov, gcov, gerr) and 0.0 <= cov <= 1.0
    assert gerr[0] == 1.0 and np.all((gerr >= 0) & (gerr <= 1))
    e = group_errors(accept, pred, y, c2g, w)
    assert e[0] == 1.0 and _finite(e)
    assert 0.0 <= balanced_error(accept, pred, y, c2g, w) <= 1.0
    assert worst_group_error(accept, pred, y, c2g, w) == 1.0


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(max_n=30), st.data())
def test_fitted_plugin_rules_are_finite(p, data):
    """Algorithm 1 (lambda grid for K = 2, gradient for K = 3) and Algorithm 2 on degenerate data:
    alpha >= alpha_min, mu / c / margins finite, even when a group is never accepted."""
    eta, y, c2g, _ = p
    c2g = np.unique(c2g, return_inverse=True)[1]  # the fits need every group to own a class
    if c2g.max() == 0:
        c2g[-1] = 1
    K = int(c2g.max()) + 1
    s = Split.from_eta(eta, y, c2g)
    spec = SEARCH.__class__(M=3, n_steps=5, lambda_bound=4.0)
    qs = [data.draw(st.sampled_from([0.3, 1.0])), 0.05]
    cur = fit_curve(s, s, qs, spec=spec)
    for i in range(len(qs)):
        r = cur.rule(i)
        assert np.all(r.alpha >= SEARCH.alpha_min * (1 - 1e-12)) and _finite(r.alpha, r.mu, r.c)
        assert r.mu[-1] == 0.0 and r.alpha.shape == (K,)
        assert _finite(r.margin(eta)) and np.all(r.predict(eta) < eta.shape[1])
    assert _finite(cur.objective) and 0 <= cost_operating_point(cur, 0.05) < len(qs)
    if K == 2 and len(y) >= 4:
        h = len(y) // 2
        wf = fit_worst_curve(s.subset(np.arange(h)), s.subset(np.arange(h, len(y))), [0.5], T=2, spec=spec)
        r = wf.rule(0)
        assert _finite(r.alpha, r.mu, r.c, r.margin(eta))
        assert all(_finite(b) and abs(float(np.sum(b)) - 1) < 1e-9 for b in np.asarray(wf.info["round_betas"])[:, 0])


@SETTINGS
@given(st.lists(st.sampled_from(ATOMS) | st.floats(-1e4, 1e4, width=32), min_size=1, max_size=40),
       st.floats(0.0, 1.0), st.booleans())  # fmt: skip
def test_coverage_cut_with_ties_and_extremes(m, target, weighted):
    m = np.asarray(m, np.float32)
    w = (np.linspace(0.5, 2.0, len(m)) if weighted else np.ones(len(m))).astype(np.float32)
    v = coverage_cut(m[None], w, np.array([target]))[0]
    cov = float(np.sum(w * (m >= v)) / w.sum())
    if target <= 0:
        assert cov == 0.0
    else:
        assert np.isfinite(v) and cov >= min(target, 1.0) - 1e-6  # the smallest achievable coverage >= target
