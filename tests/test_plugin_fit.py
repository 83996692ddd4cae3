"""Tests of the one fitting core (argse_cli/core/plugin_fit.py): the coverage cut, Algorithm 1 and its
lambda search (tie rule, widening), the cost-matched operating point, Algorithm 2, curve scores."""

from __future__ import annotations

import numpy as np
import pytest

from argse_cli.core import plugin_fit as pf
from argse_cli.core.plugin_fit import (
    Split,
    choose_lambda,
    cost_operating_point,
    coverage_cut,
    curve_scores,
    eg_step,
    fit_at_coverage,
    fit_curve,
    fit_worst_curve,
    group_stats,
    lambda_grid,
)
from argse_cli.core.rule import PluginRule, chow_margin, plugin_margin, plugin_predict
from argse_cli.metrics.selective import balanced_error, coverage, group_errors

C2G_2 = np.array([0, 0, 1, 1])
C2G_3 = np.array([0, 0, 1, 1, 2, 2])


def make_problem(N, prior, strength_per_group, class_to_group, seed):
    """A sample whose eta IS P(y | x): latent z ~ prior sets logits (z's raised by its group's
    strength, plus log prior), eta = softmax, y ~ eta. Returns eta (float32), y, w_bal."""
    rng = np.random.default_rng(seed)
    prior = np.asarray(prior, float)
    c2g = np.asarray(class_to_group)
    C = prior.size
    z = rng.choice(C, N, p=prior)
    logits = rng.normal(0.0, 1.0, (N, C))
    logits[np.arange(N), z] += np.asarray(strength_per_group, float)[c2g[z]]
    logits += np.log(prior)
    eta = np.exp(logits - logits.max(1, keepdims=True))
    eta /= eta.sum(1, keepdims=True)
    eta = eta.astype(np.float32)
    y = np.minimum((rng.random(N)[:, None] > np.cumsum(eta.astype(np.float64), 1)).sum(1), C - 1)
    counts = np.bincount(y, minlength=C)
    return eta, y, (N / (C * counts))[y]


@pytest.fixture(scope="module")
def two_group():
    eta, y, w_bal = make_problem(6000, [0.4, 0.4, 0.1, 0.1], [3.0, 1.2], C2G_2, seed=0)
    ones = np.ones(len(y))
    fit = Split.from_eta(eta[:3000], y[:3000], C2G_2, w_bal[:3000], ones[:3000])
    sel = Split.from_eta(eta[3000:], y[3000:], C2G_2, w_bal[3000:], ones[3000:])
    return eta, y, w_bal, fit, sel


def _cut_by_full_sort(m, w, q):
    """The definition: sort decreasing; the smallest rank whose cumulative weight reaches q W."""
    order = np.argsort(-m, kind="stable")
    cw = np.cumsum(w[order].astype(np.float64))
    k = min(int(np.searchsorted(cw, min(q, 1.0) * cw[-1] * (1 - 1e-12), side="left")), m.size - 1)
    return m[order[k]]


# --------------------------------------------------------------------------- the coverage cut


def test_coverage_cut_hand_cases():
    m = np.array([[3.0, 1.0, 2.0, 0.0]], np.float32)
    assert coverage_cut(m, np.ones(4, np.float32), np.array([0.5]))[0] == 2.0
    # weights [1, 3, 1, 1]: cumulative in margin order 1, 2, 5, 6; goal 3 first reached at margin 1
    assert coverage_cut(m, np.array([1, 3, 1, 1], np.float32), np.array([0.5]))[0] == 1.0
    tied = np.array([[1.0, 1.0, 1.0, 0.0]], np.float32)  # ties accepted together: 3/4 for 1/2
    v = coverage_cut(tied, np.ones(4, np.float32), np.array([0.5]))[0]
    assert np.mean(tied[0] >= v) == 0.75
    assert np.isinf(coverage_cut(m, np.ones(4, np.float32), np.array([0.0]))[0])
    assert coverage_cut(m, np.ones(4, np.float32), np.array([1.0]))[0] == 0.0


@pytest.mark.parametrize("kind", ["distinct", "ties", "negative", "zero_weights", "heavy"])
def test_coverage_cut_equals_the_full_sort_definition(kind):
    rng = np.random.default_rng(len(kind))
    R, N = 7, 3001
    m = rng.normal(size=(R, N)).astype(np.float32)
    w = rng.choice([0.3, 1.0, 30.0], size=N).astype(np.float32)
    if kind == "ties":
        m = np.round(m, 1)
    elif kind == "negative":
        m = -np.abs(m) * 1e3
    elif kind == "zero_weights":
        w[rng.random(N) < 0.5] = 0.0
    elif kind == "heavy":
        w[N // 3] = 1e6
    for q in [1e-4, 0.05, 0.31, 0.5, 0.8, 0.97, 1.0]:
        v = coverage_cut(m, w, np.full(R, q))
        for r in range(R):
            assert v[r] == _cut_by_full_sort(m[r], w, q)


def test_coverage_cut_is_exact_on_distinct_scores():
    rng = np.random.default_rng(1)
    m = rng.normal(size=(1, 1000)).astype(np.float32)
    for q in (0.1, 0.37, 0.5, 0.8, 1.0):
        assert np.mean(m[0] >= coverage_cut(m, np.ones(1000, np.float32), np.array([q]))[0]) == q


# --------------------------------------------------------------------------- statistics, margins


@pytest.mark.parametrize("beta", [None, np.array([0.6, 0.3, 0.1])])
def test_group_statistics_margins_equal_plugin_margin(beta):
    rng = np.random.default_rng(3)
    eta = rng.dirichlet(0.3 * np.ones(6), size=400)
    y = rng.integers(0, 6, 400)
    alpha, mu = np.array([1.7, 0.5, 0.2]), np.array([-0.4, 0.7, 0.0])
    s = Split.from_eta(eta, y, C2G_3)
    u = (1.0 / alpha) if beta is None else 3 * beta / alpha
    base, pred = pf._margins(s, u[None], mu[None], pred=True)
    np.testing.assert_allclose(base[0], plugin_margin(eta, alpha, mu, 0.0, C2G_3, beta), atol=1e-5)
    assert np.array_equal(pred[0], plugin_predict(eta, alpha, C2G_3, beta))
    Mx, A, E = group_stats(eta, C2G_3)
    assert np.allclose(E.sum(1), 1.0) and np.all(Mx <= E + 1e-12)


def test_alpha_one_mu_zero_is_chow():
    rng = np.random.default_rng(0)
    eta = rng.dirichlet(np.ones(7), size=500).astype(np.float32)
    plug = PluginRule(np.ones(2), np.zeros(2), 0.3, None, [0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_allclose(plug.margin(eta), chow_margin(eta, 0.3), atol=1e-6)
    assert np.array_equal(plug.predict(eta), eta.argmax(1))


def test_plugin_rule_gauge_and_roundtrip():
    rng = np.random.default_rng(2)
    eta = rng.dirichlet(np.ones(6), size=300).astype(np.float32)
    alpha, mu, c = np.array([1.4, 0.6, 0.3]), np.array([0.3, -0.1, 0.2]), 0.1
    rule = PluginRule(alpha, mu, c, np.array([0.2, 0.3, 0.5]), C2G_3)
    assert rule.mu[-1] == 0.0 and rule.c == pytest.approx(0.3)  # c absorbed mu_[K-1]
    np.testing.assert_allclose(rule.margin(eta), plugin_margin(eta.astype(np.float64), alpha, mu, c, C2G_3,
                                                               rule.beta), atol=1e-6)
    assert np.array_equal(PluginRule.from_dict(rule.to_dict()).margin(eta), rule.margin(eta))


# --------------------------------------------------------------------------- the lambda search


def test_lambda_tie_rule_goes_to_the_minimiser_closest_to_zero_then_the_smaller():
    lams = np.array([-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0])
    assert lams[choose_lambda(lams, [0.3, 0.1, 0.1, 0.2, 0.1, 0.1, 0.3])] == -0.25  # tied: closest to 0
    assert lams[choose_lambda(lams, [0.3, 0.1, 0.2, 0.2, 0.2, 0.1, 0.3])] == -0.5  # |-0.5| = |0.5|: smaller
    assert lams[choose_lambda(lams, [0.3, 0.1, 0.2, 0.0, 0.2, 0.1, 0.3])] == 0.0
    assert lams[choose_lambda(lams, [0.1] * 7)] == 0.0


def test_lambda_grid_and_widening_points():
    g = lambda_grid()
    assert g[0] == -1.0 and g[-1] == 1.0 and np.allclose(np.diff(g), 0.1) and 0.0 in g
    w = pf._widening(-1.0, pf.SEARCH)
    assert w.size == 10 and np.allclose(w, -1.0 - 0.1 * np.arange(1, 11))
    assert pf._widening(-64.0, pf.SEARCH).size == 0  # the bound
    assert np.allclose(pf._widening(2.0, pf.SEARCH)[-1], 4.0)


def test_widening_moves_an_edge_minimiser_inside(two_group, monkeypatch):
    """With a narrow initial grid the minimiser sits on its edge; the search widens on that side
    until it is interior (here the optimum needs |lambda| > 0.1)."""
    _, _, _, fit, sel = two_group
    spec = pf.with_spec(lambda_span=0.1, lambda_step=0.05)
    wide = fit_curve(fit, sel, [0.8], spec=spec)
    assert wide.widened[0] > 0 and not wide.at_bound[0]
    assert abs(wide.lam[0]) > 0.1
    stuck = fit_curve(fit, sel, [0.8], spec=pf.with_spec(lambda_span=0.1, lambda_step=0.05, lambda_bound=0.1))
    assert stuck.widened[0] == 0 and stuck.at_bound[0] and abs(stuck.lam[0]) == 0.1
    assert wide.objective[0] <= stuck.objective[0]


def test_lambda_bound_is_recorded_when_the_objective_keeps_falling(monkeypatch):
    """A selection score that falls without end towards lambda = -inf ends at the bound, flagged."""
    s = Split.from_eta(np.full((4, 4), 0.25), [0, 1, 2, 3], C2G_2)

    def fake(fit, sel, q, mu, beta, spec):
        R = len(q)
        return {"alpha": np.ones((R, 2)), "v": np.zeros(R), "obj": mu[:, 0].copy(), "e": np.zeros((R, 2))}

    monkeypatch.setattr(pf, "_solve", fake)
    cur = fit_curve(s, s, [0.5])
    assert cur.lam[0] == -pf.SEARCH.lambda_bound and cur.at_bound[0] and cur.widened[0] == 6


# --------------------------------------------------------------------------- Algorithm 1


def test_cs_plugin_hits_coverage_beats_chow_and_nears_brute_force(two_group):
    eta, y, w_bal, fit, sel = two_group
    rule = fit_at_coverage(fit, sel, 0.8)
    test = slice(3000, None)
    assert coverage(rule.accept(eta[:3000]), w_bal[:3000]) == pytest.approx(0.8, abs=2e-3)
    err = balanced_error(rule.accept(eta[:3000]), rule.predict(eta[:3000]), y[:3000], C2G_2, w_bal[:3000])
    chow = chow_margin(eta[:3000], 0.0)
    acc = chow >= coverage_cut(chow[None].astype(np.float32), w_bal[:3000].astype(np.float32), np.array([0.8]))[0]
    err_chow = balanced_error(acc, eta[:3000].argmax(1), y[:3000], C2G_2, w_bal[:3000])
    assert err <= err_chow
    # brute force over the 2-group family on the same (fit) rows: alpha = [r, 1], mu = [lam, 0]
    e64, best = eta[:3000].astype(np.float64), np.inf
    for r in np.geomspace(0.5, 40.0, 24):
        a = np.array([r, 1.0])
        b0, pred = plugin_margin(e64, a, np.zeros(2), 0.0, C2G_2), plugin_predict(e64, a, C2G_2)
        for lam in np.linspace(-2.5, 1.5, 33):
            m = (b0 + lam * e64[:, :2].sum(1)).astype(np.float32)
            acc = m >= coverage_cut(m[None], w_bal[:3000].astype(np.float32), np.array([0.8]))[0]
            best = min(best, balanced_error(acc, pred, y[:3000], C2G_2, w_bal[:3000]))
    assert err <= best + 0.02
    del test


def test_fixed_point_alpha_is_K_times_the_accepted_prior_mass(two_group):
    eta, y, w_bal, fit, sel = two_group
    cur = fit_curve(fit, sel, [0.6, 0.8])
    for i in range(2):
        rule = cur.rule(i)
        acc = rule.accept(eta[:3000])
        p = np.bincount(C2G_2[y[:3000]], weights=acc.astype(float), minlength=2) / 3000  # w_prior = 1
        assert np.all(np.abs(rule.alpha - 2 * p) <= 0.02), (rule.alpha, 2 * p)
        assert rule.mu[-1] == 0.0


def test_curve_row_equals_a_direct_fit_at_that_coverage(two_group):
    _, _, _, fit, sel = two_group
    qs = [0.3, 0.55, 0.8, 1.0]
    cur = fit_curve(fit, sel, qs)
    for i, q in enumerate(qs):
        one = fit_curve(fit, sel, [q])
        for k in ("alpha", "mu", "c", "lam", "objective"):
            assert np.array_equal(getattr(cur, k)[i], getattr(one, k)[0]), k


def test_cost_operating_point_minimises_objective_plus_cost(two_group):
    _, _, _, fit, sel = two_group
    cur = fit_curve(fit, sel, [0.5, 0.7, 0.9, 1.0])
    for c in (0.0, 0.05, 0.3, 1.0):
        i = cost_operating_point(cur, c)
        tot = cur.objective + c * (1 - cur.coverages)
        assert tot[i] <= tot.min() + 1e-12
    assert cur.coverages[cost_operating_point(cur, 10.0)] == 1.0  # rejecting costs more than any error
    # raising c never lowers the operating coverage
    qs = [cur.coverages[cost_operating_point(cur, c)] for c in np.linspace(0, 1, 21)]
    assert all(b >= a for a, b in zip(qs, qs[1:], strict=False))


def test_three_groups_gradient_search_never_worse_than_mu_zero():
    prior = [0.35, 0.35, 0.1, 0.1, 0.05, 0.05]
    eta, y, w_bal = make_problem(2000, prior, [3.0, 1.8, 1.0], C2G_3, seed=3)
    fit = Split.from_eta(eta[:1000], y[:1000], C2G_3, w_bal[:1000], np.ones(1000))
    sel = Split.from_eta(eta[1000:], y[1000:], C2G_3, w_bal[1000:], np.ones(1000))
    cur = fit_curve(fit, sel, [0.8], spec=pf.with_spec(n_steps=30))
    zero = pf._solve(fit, sel, np.array([0.8]), np.zeros((1, 3)), None, pf.SEARCH)
    assert cur.mu[0, -1] == 0.0 and cur.objective[0] <= zero["obj"][0] + 1e-12


# --------------------------------------------------------------------------- Algorithm 2


def test_eg_step_is_the_exponentiated_gradient():
    b = eg_step([0.5, 0.5], [0.1, 0.4], 1.0)
    np.testing.assert_allclose(b, np.exp([0.1, 0.4]) / np.exp([0.1, 0.4]).sum())
    assert b[1] > b[0]
    np.testing.assert_allclose(eg_step([[0.5, 0.5]] * 3, [[0.1, 0.4]] * 3, 1.0), [b] * 3)


def test_plugin_worst_lowers_the_worst_group_error_on_S2():
    eta, y, w_bal = make_problem(4000, [0.4, 0.4, 0.1, 0.1], [3.0, 1.2], C2G_2, seed=1)
    ones = np.ones(len(y))
    s1 = Split.from_eta(eta[:2000], y[:2000], C2G_2, w_bal[:2000], ones[:2000])
    s2 = Split.from_eta(eta[2000:], y[2000:], C2G_2, w_bal[2000:], ones[2000:])
    bal = fit_curve(s1, s2, [0.8])
    worst = fit_worst_curve(s1, s2, [0.8], T=5, xi=1.0)
    e_bal = pf.group_errors_at_coverage(bal, s2)[0]
    assert worst.sel_error[0].max() <= e_bal.max() + 1e-12
    betas = np.asarray(worst.info["round_betas"])[:, 0]  # [T, K]: beta used by each round
    np.testing.assert_allclose(betas[0], [0.5, 0.5])
    e1 = np.asarray(worst.info["round_s2_errors"])[0, 0]
    np.testing.assert_allclose(betas[1], np.exp(e1) / np.exp(e1).sum())  # one EG step
    assert betas[-1, int(np.argmax(e_bal))] > 0.5  # the worse group gains weight
    r = worst.rule(0)
    assert r.beta is not None and r.mu[-1] == 0.0
    acc = r.margin(eta[2000:]) >= 0
    e_direct = group_errors(acc, r.predict(eta[2000:]), y[2000:], C2G_2, w_bal[2000:])
    assert np.all(np.isfinite(e_direct))


# --------------------------------------------------------------------------- scoring on test


def test_curve_scores_hit_each_coverage_without_labels(two_group):
    eta, y, w_bal, fit, sel = two_group
    cur = fit_curve(fit, sel, [0.25, 0.5, 0.9])
    test = Split.from_eta(eta[:2000], np.zeros(2000, int), C2G_2, w_bal[:2000])  # labels blanked
    S, P = curve_scores(cur, test)
    for i, q in enumerate(cur.coverages):
        assert coverage(S[i] >= 0, w_bal[:2000]) == pytest.approx(q, abs=2e-3)
        assert np.array_equal(P[i], cur.rule(i).predict(eta[:2000]))
    test2 = Split.from_eta(eta[:2000], y[:2000], C2G_2, w_bal[:2000])  # the same with labels
    assert np.array_equal(curve_scores(cur, test2)[0], S)


def test_coverage_cut_of_shared_rows_equals_the_cut_of_the_expanded_rows():
    # the fixed point's first iteration sorts each distinct margin row once (rows=)
    from argse_cli.core.plugin_fit import coverage_cut

    rng = np.random.default_rng(3)
    base_u = np.round(rng.standard_normal((4, 300)), 1).astype(np.float32)  # ties included
    w = rng.integers(0, 3, 300).astype(np.float32)
    rows = rng.integers(0, 4, 50)
    q = np.concatenate([[0.0, 1.0, 1e-9], rng.uniform(0, 1, 47)])
    assert np.array_equal(coverage_cut(base_u, w, q, rows=rows), coverage_cut(base_u[rows], w, q))


@pytest.mark.parametrize("seed", range(6))
def test_equal_weights_cut_by_selection_equals_the_sorted_cut(seed):
    # with equal weights the cut position is known before sorting: np.partition, same value
    from argse_cli.core.plugin_fit import _coverage_cut_equal_weights, _coverage_cut_sorted

    rng = np.random.default_rng(seed)
    N = int(rng.integers(2, 400))
    base = np.round(rng.standard_normal((5, N)), int(rng.integers(0, 3))).astype(np.float32)  # ties
    rows = rng.integers(0, 5, 40)
    q = np.concatenate([[0.0, 1.0, 1.0 / N, 1e-9], rng.uniform(0, 1, 36)])
    for wv in (1.0, 0.3, 7.0):
        w = np.full(N, wv, np.float32)
        for r in (None, rows):
            qq = q[:5] if r is None else q
            assert np.array_equal(_coverage_cut_equal_weights(base, w, qq, r), _coverage_cut_sorted(base, w, qq, r))
