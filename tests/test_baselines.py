"""Tests of the baseline rejectors (Chow, CS-plug-in = Algorithm 1, Plug-in[Worst] = Algorithm 2)."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from argse_cli.baselines import (
    ChowRule,
    PluginRule,
    _fast_base,
    _group_stats,
    fit_chow,
    fit_cs_plugin,
    fit_plugin_worst,
    refit_at_coverages,
    rule_from_dict,
    split_S1_S2,
    sweep_curve_inputs,
    threshold_for_coverage,
)
from argse_cli.metrics.selective import balanced_error, coverage, group_errors
from argse_cli.rejector import chow_margin, plugin_margin, plugin_predict

# --------------------------------------------------------------------------- synthetic data


def make_problem(N, prior, strength_per_group, class_to_group, seed):
    """Long-tailed sample with a *true* posterior: a latent class z ~ prior sets logits
    (z's logit raised by its group's strength, plus log prior); eta = softmax; y ~ eta.
    So eta is P(y | x) under the sampled (training-prior) distribution: w_prior = 1.
    Returns eta (float32), y, balanced weights w_bal_i = N / (C n_(y_i))."""
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
    cum = np.cumsum(eta.astype(np.float64), axis=1)
    y = np.minimum((rng.random(N)[:, None] > cum).sum(1), C - 1)
    counts = np.bincount(y, minlength=C)
    w_bal = (N / (C * counts))[y]
    return eta, y, w_bal


C2G_2 = np.array([0, 0, 1, 1])
C2G_3 = np.array([0, 0, 1, 1, 2, 2])


@pytest.fixture(scope="module")
def two_group():
    eta, y, w_bal = make_problem(20_000, [0.4, 0.4, 0.1, 0.1], [3.0, 1.2], C2G_2, seed=0)
    fit = fit_cs_plugin(eta, y, w_bal, C2G_2, w_prior=np.ones(len(y)), target_coverage=0.8)
    return eta, y, w_bal, fit


@pytest.fixture(scope="module")
def three_group():
    prior = [0.35, 0.35, 0.1, 0.1, 0.05, 0.05]
    eta, y, w_bal = make_problem(4_000, prior, [3.0, 1.8, 1.0], C2G_3, seed=3)
    fit = fit_cs_plugin(
        eta, y, w_bal, C2G_3, w_prior=np.ones(len(y)), target_coverage=0.8, n_steps=60
    )
    return eta, y, w_bal, fit


def _bal_err(rule, eta, y, c2g, w):
    return balanced_error(rule.accept(eta), rule.predict(eta), y, c2g, w)


# --------------------------------------------------------------------------- rules, thresholds


def test_chow_rule_is_max_prob_thresholding():
    rng = np.random.default_rng(0)
    eta = rng.dirichlet(np.ones(7), size=500).astype(np.float32)
    rule = ChowRule(0.3)
    assert np.array_equal(rule.accept(eta), eta.max(1).astype(np.float64) >= 0.7)
    assert np.array_equal(rule.predict(eta), eta.argmax(1))
    np.testing.assert_allclose(rule.margin(eta), chow_margin(eta, 0.3), atol=1e-6)
    # the alpha = 1, mu = 0 plug-in rule is the same rule
    plug = PluginRule(np.ones(2), np.zeros(2), 0.3, None, [0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_allclose(plug.margin(eta), rule.margin(eta), atol=1e-6)
    assert np.array_equal(plug.predict(eta), rule.predict(eta))
    assert rule_from_dict(rule.to_dict()) == rule


def test_threshold_for_coverage_hand_cases():
    m = np.array([3.0, 1.0, 2.0, 0.0])
    s = threshold_for_coverage(m, None, 0.5)
    assert s == -2.0 and list(m + s >= 0) == [True, False, True, False]
    # weights [1, 3, 1, 1]: cumulative weight in margin order 1, 2, 5, 6; goal 0.5 * 6 = 3
    # is first reached by the third margin (1.0) -> coverage 5/6, the smallest >= 0.5
    s = threshold_for_coverage(m, np.array([1.0, 3.0, 1.0, 1.0]), 0.5)
    assert s == -1.0
    # ties are accepted together: coverage 3/4 although 2/4 was asked
    mt = np.array([1.0, 1.0, 1.0, 0.0])
    assert np.mean(mt + threshold_for_coverage(mt, None, 0.5) >= 0) == 0.75
    assert not np.any(m + threshold_for_coverage(m, None, 0.0) >= 0)
    assert np.all(m + threshold_for_coverage(m, None, 1.0) >= 0)


def _threshold_by_full_sort(m, w, target):
    """The definition in threshold_for_coverage's docstring, by a full stable sort."""
    order = np.argsort(-m, kind="stable")
    cw = np.cumsum(w[order])
    goal = min(target, 1.0) * cw[-1] * (1.0 - 1e-12)
    k = min(int(np.searchsorted(cw, goal, side="left")), m.size - 1)
    return float(-m[order[k]])


@pytest.mark.parametrize("n", [50, 5000, 40000, 300000])
@pytest.mark.parametrize("kind", ["distinct", "ties", "sorted", "zero_weights", "heavy"])
def test_threshold_for_coverage_selection_equals_full_sort(n, kind):
    """The expected-O(N) selection (strided-sample bracket + weighted quickselect) returns the
    same shift as a full sort at every coverage, on inputs that defeat a naive bracket."""
    rng = np.random.default_rng(n)
    m = rng.normal(size=n)
    w = rng.choice([0.3, 1.0, 30.0], size=n)
    if kind == "ties":
        m = np.round(m, 1)
    elif kind == "sorted":  # the strided sample sees an ordered sequence
        m = np.sort(m)
        w = np.where(np.arange(n) < n // 2, 100.0, 0.01)
    elif kind == "zero_weights":
        w[rng.random(n) < 0.5] = 0.0
    elif kind == "heavy":  # one row holds most of the weight
        w[n // 3] = 1e6
    for target in [1e-4, 0.05, 0.31, 0.5, 0.7, 0.8, 0.9, 0.97, 0.99999, 1.0]:
        assert threshold_for_coverage(m, w, target) == _threshold_by_full_sort(m, w, target)
    u = np.ones(n)
    for target in [0.1, 0.5, 0.9]:
        assert threshold_for_coverage(m, None, target) == _threshold_by_full_sort(m, u, target)


@pytest.mark.parametrize("target", [0.1, 0.37, 0.5, 0.8, 0.999, 1.0])
def test_threshold_for_coverage_exact_on_distinct_scores(target):
    rng = np.random.default_rng(1)
    m = rng.normal(size=1000)
    s = threshold_for_coverage(m, None, target)
    assert coverage(m + s >= 0) == target  # target * 1000 is an integer
    # weighted: the smallest achievable coverage >= target
    w = rng.uniform(0.1, 3.0, size=1000)
    s = threshold_for_coverage(m, w, target)
    acc = m + s >= 0
    cov = coverage(acc, w)
    assert cov >= target - 1e-12
    worst_accepted = np.flatnonzero(acc)[np.argmin(m[acc])]
    acc[worst_accepted] = False
    assert coverage(acc, w) < target


def test_plugin_rule_gauge_and_roundtrip():
    rng = np.random.default_rng(2)
    eta = rng.dirichlet(np.ones(6), size=300).astype(np.float32)
    alpha, mu, c = np.array([1.4, 0.6, 0.3]), np.array([0.3, -0.1, 0.2]), 0.1
    rule = PluginRule(alpha, mu, c, np.array([0.2, 0.3, 0.5]), C2G_3)
    assert rule.mu[-1] == 0.0 and rule.c == pytest.approx(0.3)  # c absorbed mu_[K-1]
    ref = plugin_margin(eta.astype(np.float64), alpha, mu, c, C2G_3, rule.beta)
    np.testing.assert_allclose(rule.margin(eta), ref, atol=1e-6)
    back = PluginRule.from_dict(rule.to_dict())
    assert np.array_equal(back.margin(eta), rule.margin(eta))
    assert np.array_equal(rule_from_dict(rule.to_dict()).predict(eta), rule.predict(eta))


@pytest.mark.parametrize("beta", [None, np.array([0.6, 0.3, 0.1])])
def test_fast_group_margin_equals_plugin_margin(beta):
    rng = np.random.default_rng(3)
    eta = rng.dirichlet(0.3 * np.ones(6), size=400)
    alpha, mu = np.array([1.7, 0.5, 0.2]), np.array([-0.4, 0.7, 0.0])
    u = (1.0 / alpha) if beta is None else 3 * beta / alpha
    base, pred = _fast_base(_group_stats(eta, C2G_3), u, mu)
    np.testing.assert_allclose(base, plugin_margin(eta, alpha, mu, 0.0, C2G_3, beta), atol=1e-12)
    assert np.array_equal(pred, plugin_predict(eta, alpha, C2G_3, beta))


# --------------------------------------------------------------------------- Algorithm 1, K = 2


def test_cs_plugin_beats_chow_and_matches_brute_force(two_group):
    eta, y, w_bal, fit = two_group
    rule = fit.rule
    assert coverage(rule.accept(eta), w_bal) == pytest.approx(0.8, abs=1e-3)
    err_plugin = _bal_err(rule, eta, y, C2G_2, w_bal)
    chow = fit_chow(eta, w_bal, 0.8)
    assert coverage(chow.accept(eta), w_bal) == pytest.approx(0.8, abs=1e-3)
    err_chow = _bal_err(chow, eta, y, C2G_2, w_bal)
    assert err_plugin <= err_chow

    # brute force over the whole 2-group family: h uses alpha = [r, 1]; the margin's mu = [lam, 0]
    # (any other alpha scale is a rescaling of (lam, c)); c re-set for w_bal-coverage 0.8.
    eta64 = eta.astype(np.float64)
    head_mass = eta64[:, :2].sum(1)
    best = np.inf
    for r in np.geomspace(0.5, 40.0, 36):
        alpha = np.array([r, 1.0])
        base0 = plugin_margin(eta64, alpha, np.zeros(2), 0.0, C2G_2)
        pred = plugin_predict(eta64, alpha, C2G_2)
        for lam in np.linspace(-2.5, 1.5, 41):
            m = base0 + lam * head_mass
            acc = m + threshold_for_coverage(m, w_bal, 0.8) >= 0
            best = min(best, balanced_error(acc, pred, y, C2G_2, w_bal))
    print(f"balanced error @cov0.8: chow={err_chow:.4f} plugin={err_plugin:.4f} brute={best:.4f}")
    assert err_plugin <= best + 0.01


def test_cs_plugin_fixed_point(two_group):
    eta, y, w_bal, fit = two_group
    rule = fit.rule
    acc = rule.accept(eta)
    gy = C2G_2[y]
    p = np.bincount(gy, weights=acc.astype(float), minlength=2) / len(y)  # w_prior = 1
    assert np.all(np.abs(rule.alpha - 2 * p) <= 0.02), (rule.alpha, 2 * p)
    assert rule.mu[-1] == 0.0 and rule.mu.shape == (2,)
    assert fit.grid.shape == fit.objective.shape
    lam = rule.mu[0]
    assert fit.objective[np.argmin(np.abs(fit.grid - lam))] == pytest.approx(fit.objective.min())


def test_cs_plugin_grid_widening(two_group):
    eta, y, w_bal, _ = two_group
    eta, y, w_bal = eta[:8000], y[:8000], w_bal[:8000]
    narrow = np.linspace(-0.1, 0.1, 5)
    wide = fit_cs_plugin(
        eta, y, w_bal, C2G_2, w_prior=np.ones(len(y)), target_coverage=0.8, lambda_grid=narrow
    )
    assert wide.widened > 0
    lam = wide.rule.mu[0]
    assert wide.grid[0] < lam < wide.grid[-1]  # not on the final grid's edge
    assert not (-0.1 <= lam <= 0.1)  # the optimum was outside the initial grid
    assert np.allclose(np.diff(wide.grid), 0.05)  # resolution kept
    assert np.isclose(wide.grid, narrow[:, None]).any(axis=1).all()  # initial grid kept
    # no widening requested -> stays on the narrow grid, and does worse
    stuck = fit_cs_plugin(
        eta, y, w_bal, C2G_2, w_prior=np.ones(len(y)), target_coverage=0.8,
        lambda_grid=narrow, widen=False,
    )  # fmt: skip
    assert stuck.widened == 0 and stuck.grid.size == 5
    assert wide.objective.min() <= stuck.objective.min()


def test_cs_plugin_fixed_c_mode_and_argument_checks(two_group):
    eta, y, w_bal, _ = two_group
    sub = slice(0, 4000)
    fit = fit_cs_plugin(eta[sub], y[sub], w_bal[sub], C2G_2, w_prior=np.ones(4000), c=0.3)
    assert fit.rule.c == 0.3 and fit.rule.mu[-1] == 0.0
    with pytest.raises(ValueError):
        fit_cs_plugin(eta, y, w_bal, C2G_2)
    with pytest.raises(ValueError):
        fit_cs_plugin(eta, y, w_bal, C2G_2, c=0.3, target_coverage=0.8)


# --------------------------------------------------------------------------- Algorithm 1, K = 3


def test_cs_plugin_three_groups(three_group):
    eta, y, w_bal, fit = three_group
    rule = fit.rule
    assert fit.method == "gradient" and rule.mu.shape == (3,) and rule.mu[-1] == 0.0
    assert np.all(fit.grid[:, -1] == 0.0)
    assert fit.objective.min() <= fit.objective[0]  # never worse than mu = 0
    assert coverage(rule.accept(eta), w_bal) == pytest.approx(0.8, abs=1e-3)
    err = _bal_err(rule, eta, y, C2G_3, w_bal)
    assert err < _bal_err(fit_chow(eta, w_bal, 0.8), eta, y, C2G_3, w_bal)
    p = np.bincount(C2G_3[y], weights=rule.accept(eta).astype(float), minlength=3) / len(y)
    assert np.all(np.abs(rule.alpha - 3 * p) <= 0.02)
    # the gradient method on a K = 2 problem lands near the grid search
    eta2, y2, w2, fit2 = make_problem(4000, [0.4, 0.4, 0.1, 0.1], [3.0, 1.2], C2G_2, 5) + (None,)
    kw = {"w_prior": np.ones(4000), "target_coverage": 0.8}
    g = fit_cs_plugin(eta2, y2, w2, C2G_2, method="gradient", n_steps=60, **kw)
    s = fit_cs_plugin(eta2, y2, w2, C2G_2, **kw)
    assert g.objective.min() <= s.objective.min() + 0.01


# --------------------------------------------------------------------------- Algorithm 2


def test_split_S1_S2():
    y = np.repeat(np.arange(5), [400, 200, 50, 9, 1])
    a1, a2 = split_S1_S2(y.size, 0.5, seed=4, labels=y)
    assert np.intersect1d(a1, a2).size == 0 and np.union1d(a1, a2).size == y.size
    for cls, n in zip(range(4), [400, 200, 50, 9], strict=True):
        assert abs(np.sum(y[a1] == cls) - n / 2) <= 1  # stratified
    b1, _ = split_S1_S2(y.size, 0.5, seed=4, labels=y)
    assert np.array_equal(a1, b1)
    u1, u2 = split_S1_S2(101, 0.3, seed=0)
    assert u1.size == 30 and u2.size == 71


def test_plugin_worst_lowers_worst_group_error():
    eta, y, w_bal = make_problem(6000, [0.4, 0.4, 0.1, 0.1], [3.0, 1.2], C2G_2, seed=1)
    i1, i2 = split_S1_S2(len(y), 0.5, seed=0, labels=y)
    ones = np.ones(len(y))
    bal = fit_cs_plugin(eta[i1], y[i1], w_bal[i1], C2G_2, w_prior=ones[i1], target_coverage=0.8)
    e_bal = group_errors(
        bal.rule.accept(eta[i2]), bal.rule.predict(eta[i2]), y[i2], C2G_2, w_bal[i2]
    )
    worst = fit_plugin_worst(
        eta[i1], y[i1], w_bal[i1], eta[i2], y[i2], w_bal[i2], C2G_2,
        target_coverage=0.8, w_prior_S1=ones[i1], T=5, xi=1.0,
    )  # fmt: skip
    e_w = worst.errors[worst.best_round]
    r = worst.rule
    np.testing.assert_allclose(
        group_errors(r.accept(eta[i2]), r.predict(eta[i2]), y[i2], C2G_2, w_bal[i2]), e_w
    )
    print(
        f"worst-group error on S2: balanced CS-plug-in {e_bal.max():.4f} -> worst {e_w.max():.4f}"
    )
    assert e_w.max() <= e_bal.max() + 1e-12
    assert worst.betas.shape == (6, 2) and np.allclose(worst.betas.sum(1), 1.0)
    np.testing.assert_allclose(worst.betas[0], [0.5, 0.5])
    worse = int(np.argmax(e_bal))  # the tail group here
    assert worse == 1
    assert worst.betas[-1, worse] > 0.5 and worst.betas[1, worse] > 0.5
    assert all(rule.mu[-1] == 0.0 for rule in worst.rules)
    # EG step: beta^(1) ∝ beta^(0) exp(xi e^(1))
    b1 = np.exp(worst.errors[0]) / np.exp(worst.errors[0]).sum()
    np.testing.assert_allclose(worst.betas[1], b1)


# --------------------------------------------------------------------------- refit protocol


def test_refit_at_coverages_is_label_free_and_hits_coverage(two_group):
    eta, y, w_bal, _ = two_group
    params = list(inspect.signature(refit_at_coverages).parameters)
    assert not any(p.startswith("y") or "label" in p for p in params[params.index("eta_test") :])
    val, test = slice(0, 3000), slice(3000, 8000)
    seen = []

    def fit_fn(eta_v, y_v, w_v, q):
        seen.append((eta_v.shape[0], y_v.shape[0]))
        return fit_chow(eta_v, w_v, q)

    pts = refit_at_coverages(fit_fn, eta[val], y[val], w_bal[val], eta[test], [0.6, 0.9])
    assert seen == [(3000, 3000), (3000, 3000)]  # the fit only ever sees validation data
    for q, p in zip([0.6, 0.9], pts, strict=True):
        assert p.coverage == q
        assert coverage(p.test_margin >= 0) == pytest.approx(q, abs=1e-12)
        assert coverage(p.rule.accept(eta[val]), w_bal[val]) == pytest.approx(q, abs=2e-3)
        assert np.array_equal(p.test_pred, eta[test].argmax(1))
    # sweep inputs of a plug-in rule are its test margin and prediction
    rule = PluginRule([1.5, 0.2], [-1.0, 0.0], 0.5, None, C2G_2)
    m, pred = sweep_curve_inputs(rule, eta[test])
    assert np.array_equal(m, rule.margin(eta[test]))
    assert np.array_equal(pred, rule.predict(eta[test]))
