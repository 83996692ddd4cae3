"""Risk-controlled thresholds (LTT: binomial, weighted, per group) and Mondrian conformal.

The simulation tests use a synthetic problem with analytic risk: s ~ U(0, 1) and
P(err | s) = a (1 - s), so the selective risk at threshold t in [0, 1] is
R(t) = E[a (1 - s) | s >= t] = a (1 - t) / 2, and for the errors P(s >= t | err) = (1 - t)^2.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from argse_cli.guarantees import (
    clopper_pearson_upper,
    hb_pvalue,
    ltt_threshold,
    ltt_threshold_weighted,
    ltt_thresholds_per_group,
    min_testable_n,
    mondrian_conformal,
    power_start_count,
    risk_control_report,
    weighted_risk_ucb,
    wsr_log_capital,
)


def slack(p: float, draws: int) -> float:
    """Monte-Carlo slack: 3 binomial standard deviations of a rate p over `draws` draws."""
    return 3.0 * math.sqrt(p * (1.0 - p) / draws)


# --------------------------------------------------------------------------- Clopper-Pearson
def test_clopper_pearson_hand_values():
    # k = 0: UCB = 1 - delta^(1/n)
    assert clopper_pearson_upper(0, 10, 0.1) == pytest.approx(1 - 0.1**0.1, abs=1e-12)
    assert clopper_pearson_upper(5, 5, 0.1) == 1.0
    assert clopper_pearson_upper(0, 0, 0.1) == 1.0
    # k = n - 1: P(Bin(n, u) <= n-1) = 1 - u^n = delta  ->  u = (1 - delta)^(1/n)
    assert clopper_pearson_upper(9, 10, 0.05) == pytest.approx(0.95**0.1, abs=1e-12)
    with pytest.raises(ValueError):
        clopper_pearson_upper(3, 2, 0.1)


def test_clopper_pearson_duality_and_exact_coverage():
    rng = np.random.default_rng(0)
    n = rng.integers(1, 300, 500)
    k = (rng.random(500) * (n + 1)).astype(int).clip(max=n)
    r = rng.random(500)
    ucb = clopper_pearson_upper(k, n, 0.1)
    cdf = stats.binom.cdf(k, n, r)
    far = np.abs(cdf - 0.1) > 1e-9
    assert np.array_equal((ucb <= r)[far], (cdf <= 0.1)[far])
    # exact: P_{k ~ Bin(n, p)}(UCB(k) < p) <= delta, summed over the pmf
    for n_, p in [(20, 0.1), (50, 0.05), (200, 0.3)]:
        ks = np.arange(n_ + 1)
        miss = clopper_pearson_upper(ks, np.full_like(ks, n_), 0.1) < p
        assert stats.binom.pmf(ks, n_, p)[miss].sum() <= 0.1 + 1e-12


def test_min_testable_and_power_start():
    for target, delta in [(0.05, 0.1), (0.1, 0.05), (0.02, 0.2)]:
        n = min_testable_n(target, delta)
        assert clopper_pearson_upper(0, n, delta) <= target < clopper_pearson_upper(0, n - 1, delta)
        j = power_start_count(target, delta)
        assert j >= n
        assert clopper_pearson_upper(math.floor(j * target / 2), j, delta) <= target


# --------------------------------------------------------------------------- binomial LTT
def test_ltt_hand_case_and_fixed_sequence_stop():
    # 10 samples at score 3 (0 errors), 10 at 2 (5 errors), 10 at 1 (10 errors)
    score = np.repeat([3.0, 2.0, 1.0], 10)
    err = np.concatenate([np.zeros(10), np.r_[np.ones(5), np.zeros(5)], np.ones(10)]).astype(bool)
    # t=3: (k, n) = (0, 10); t=2: (5, 20); t=1: (15, 30)
    assert stats.binom.cdf(0, 10, 0.5) <= 0.1 and stats.binom.cdf(5, 20, 0.5) <= 0.1
    assert stats.binom.cdf(15, 30, 0.5) > 0.1
    r = ltt_threshold(score, err, 0.5, 0.1, candidates=[1.0, 2.0, 3.0])
    assert r["threshold"] == 2.0
    assert (r["n_accepted"], r["n_errors"], r["n_rejected_nulls"]) == (20, 5, 2)
    assert r["calib_coverage"] == pytest.approx(20 / 30) and r["calib_risk"] == 0.25
    assert r["ucb"] == pytest.approx(stats.beta.ppf(0.9, 6, 15))
    assert r["distribution"].startswith("calib split")
    # the sequence stops at the first non-rejection even if a later candidate would pass:
    # candidate 4.0 accepts nothing (n = 0 -> UCB = 1), so nothing is accepted
    r2 = ltt_threshold(score, err, 0.5, 0.1, candidates=[4.0, 3.0, 2.0])
    assert math.isinf(r2["threshold"]) and r2["n_accepted"] == 0 and r2["calib_risk"] == 1.0


def _violation_rate_binomial(draws, n, target, delta, seed, candidates=None):
    rng = np.random.default_rng(seed)
    viol, thr = 0, []
    for _ in range(draws):
        s = rng.random(n)
        e = rng.random(n) < 1.0 - s
        t = ltt_threshold(s, e, target, delta, candidates)["threshold"]
        thr.append(t)
        viol += bool(np.isfinite(t) and (1.0 - t) / 2.0 > target)  # true risk R(t) = (1-t)/2
    return viol / draws, np.asarray(thr)


@pytest.mark.parametrize("grid", ["default", "fixed"])
def test_ltt_binomial_violation_rate(grid):
    """>= 200 calibration draws: P(true risk of the chosen threshold > target) <= delta + MC slack."""
    draws, n, target, delta = 400, 4000, 0.1, 0.1
    cand = None if grid == "default" else np.linspace(0.98, 0.0, 99)
    rate, thr = _violation_rate_binomial(draws, n, target, delta, seed=1, candidates=cand)
    assert rate <= delta + slack(delta, draws)
    # not trivially conservative: almost always accepts something, true risk near the target
    fin = np.isfinite(thr)
    assert fin.mean() >= 0.9
    assert np.mean((1.0 - thr[fin]) / 2.0) >= 0.06


# --------------------------------------------------------------------------- weighted LTT
def test_wsr_and_hb_are_valid_and_powerful():
    rng = np.random.default_rng(2)
    n, M, m, delta = 300, 2000, 0.2, 0.1
    null = (rng.random((n, M)) < m).astype(float)  # mean exactly m: H0 true
    rej = wsr_log_capital(null, m, delta) >= math.log(1 / delta)
    assert rej.mean() <= delta + slack(delta, M)
    alt = (rng.random((n, M)) < m - 0.1).astype(float)
    assert (wsr_log_capital(alt, m, delta) >= math.log(1 / delta)).mean() > 0.8
    # HB p-value under the null, exactly over the binomial pmf
    ks = np.arange(n + 1)
    p = hb_pvalue(ks / n, n, m)
    assert stats.binom.pmf(ks, n, m)[p <= delta].sum() <= delta
    assert hb_pvalue(m + 0.1, n, m) == pytest.approx(1.0)  # mean above m: no evidence
    # masked rows are skipped: same as running on the selected rows only
    z = rng.random((50, 1))
    mask = np.zeros((50, 1))
    mask[::2] = 1
    a = wsr_log_capital(z, 0.6, delta, mask=mask)
    b = wsr_log_capital(z[::2], 0.6, delta)
    assert a[0] == pytest.approx(b[0] if np.ndim(b) else b)


def test_weighted_scale_invariance_and_ucb():
    rng = np.random.default_rng(3)
    n = 3000
    s = rng.random(n)
    c = rng.integers(0, 2, n)
    e = rng.random(n) < (1.0 - s)
    w = np.where(c == 0, 1.8, 0.2)
    r1 = ltt_threshold_weighted(s, e, w, 0.1, 0.1, w_max=1.8)
    r2 = ltt_threshold_weighted(s, e, 5 * w, 0.1, 0.1, w_max=9.0)
    assert r1["threshold"] == r2["threshold"] and r1["ucb"] == pytest.approx(r2["ucb"])
    assert np.isfinite(r1["threshold"])
    acc = s >= r1["threshold"]
    emp = float((w * acc * e).sum() / (w * acc).sum())
    assert r1["calib_risk"] == pytest.approx(emp)
    assert emp <= r1["ucb"] <= 1.0
    # the bound tightens with a looser delta
    assert weighted_risk_ucb(acc, e, w, 1.8, 0.3) <= weighted_risk_ucb(acc, e, w, 1.8, 0.01)
    with pytest.raises(ValueError):
        ltt_threshold_weighted(s, e, w, 0.1, 0.1, w_max=1.0)


def test_ltt_weighted_lt_violation_rate():
    """Long-tailed view: calib classes 50/50, target distribution 90/10 -> w = (1.8, 0.2).

    P(err | s, class) = a_c (1 - s), a = (1.0, 0.4): R_lt(t) = (0.9 * 1.0 + 0.1 * 0.4)(1 - t)/2.
    The weighted LTT controls R_lt; the unweighted binomial LTT does not (its own risk is
    0.7 (1 - t)/2, so it picks thresholds that are too low for the long-tailed view).
    """
    draws, n, target, delta = 200, 4000, 0.1, 0.1
    a, w_cls = np.array([1.0, 0.4]), np.array([1.8, 0.2])
    t_lt = 1.0 - 2.0 * target / (0.9 * a[0] + 0.1 * a[1])  # lowest valid threshold
    rng = np.random.default_rng(4)
    viol_w = viol_b = acc_w = 0
    for _ in range(draws):
        s = rng.random(n)
        c = rng.integers(0, 2, n)
        e = rng.random(n) < a[c] * (1.0 - s)
        t = ltt_threshold_weighted(s, e, w_cls[c], target, delta, w_max=1.8)["threshold"]
        tb = ltt_threshold(s, e, target, delta)["threshold"]
        acc_w += bool(np.isfinite(t))
        viol_w += bool(np.isfinite(t) and t < t_lt)
        viol_b += bool(np.isfinite(tb) and tb < t_lt)
    assert viol_w / draws <= delta + slack(delta, draws)
    assert acc_w / draws >= 0.5  # has power
    assert viol_b / draws > 0.5  # the unweighted guarantee does not cover the lt view


# --------------------------------------------------------------------------- per group
def test_ltt_per_group_violation_rates():
    """Predicted groups 0 / 1: R_0(t) = (1-t)/2, R_1(t) = (1-t)/4; Bonferroni delta/2 each."""
    draws, n0, n1, target, delta = 400, 2800, 1200, 0.1, 0.1
    t_valid = [1.0 - 2 * target, 1.0 - 4 * target]
    rng = np.random.default_rng(5)
    viol = np.zeros((draws, 2), dtype=bool)
    finite = np.zeros((draws, 2), dtype=bool)
    for d in range(draws):
        g = np.r_[np.zeros(n0, int), np.ones(n1, int)]
        s = rng.random(n0 + n1)
        e = rng.random(n0 + n1) < np.where(g == 0, 1.0, 0.5) * (1.0 - s)
        res = ltt_thresholds_per_group(s, e, g, target, delta)
        assert res["delta_per_group"] == delta / 2
        for k in range(2):
            t = res["thresholds"][k]
            finite[d, k] = np.isfinite(t)
            viol[d, k] = np.isfinite(t) and t < t_valid[k]
    for k in range(2):
        assert viol[:, k].mean() <= delta / 2 + slack(delta / 2, draws)
    assert viol.any(axis=1).mean() <= delta + slack(delta, draws)
    assert finite.mean(axis=0).min() >= 0.8


# --------------------------------------------------------------------------- conformal
def test_mondrian_hand_case():
    # group 0: errors at scores 1..9 (n = 9), eps = 0.2 -> j = ceil(10 * 0.8) = 8
    score = np.r_[np.arange(1.0, 10.0), [0.5, 20.0], [3.0, 4.0]]
    err = np.r_[np.ones(9), [0, 0], [1, 0]].astype(bool)
    group = np.r_[np.zeros(11, int), [1, 1]]
    r = mondrian_conformal(score, err, group, 0.2)
    assert r["rank"][0] == 8 and r["n_errors"] == [9, 1]
    t0 = r["thresholds"][0]
    assert 8.0 < t0 < 8.0 + 1e-9  # accept iff s > 8
    acc_err = score[(group == 0) & err] >= t0
    assert acc_err.sum() == 1  # only the error at 9
    assert r["guaranteed_accept_given_error"][0] == pytest.approx(0.2)
    # group 1 has one error: (1 + 1)(0.8) = 1.6 -> j = 2 > 1 -> accept nothing
    assert math.isinf(r["thresholds"][1])


def test_mondrian_conformal_guarantee_simulation():
    """Mean over calib draws of P(s >= t_k | err, k) in [eps - 1/(n_k+1), eps] per group.

    Group 0: P(err | s) = 1 - s -> P(s >= t | err) = (1 - t)^2.
    Group 1: P(err | s) = 0.5 (1 - s)^2 -> P(s >= t | err) = (1 - t)^3.
    """
    draws, n0, n1, eps = 400, 2000, 800, 0.1
    tail = [lambda t: (1 - t) ** 2, lambda t: (1 - t) ** 3]
    rng = np.random.default_rng(6)
    cov = np.zeros((draws, 2))
    inv_n = np.zeros((draws, 2))
    for d in range(draws):
        g = np.r_[np.zeros(n0, int), np.ones(n1, int)]
        s = rng.random(n0 + n1)
        p = np.where(g == 0, 1.0 - s, 0.5 * (1.0 - s) ** 2)
        e = rng.random(n0 + n1) < p
        r = mondrian_conformal(s, e, g, eps)
        for k in range(2):
            t = r["thresholds"][k]
            cov[d, k] = 0.0 if not np.isfinite(t) else tail[k](min(t, 1.0))
            inv_n[d, k] = 1.0 / (r["n_errors"][k] + 1)
    for k in range(2):
        mc = 3 * cov[:, k].std() / math.sqrt(draws)
        assert cov[:, k].mean() <= eps + mc
        assert cov[:, k].mean() >= eps - inv_n[:, k].mean() - mc


# --------------------------------------------------------------------------- report
def _toy_split(rng, n, C=4):
    y = rng.integers(0, C, n)
    s = rng.random(n)
    wrong = rng.random(n) < 0.8 * (1.0 - s)
    pred = np.where(wrong, (y + rng.integers(1, C, n)) % C, y)
    w_lt = np.array([3.0, 2.0, 0.5, 0.25])[y]
    return {"score": s, "pred": pred, "y": y, "w_lt": w_lt, "w_bal": np.ones(n)}


def test_risk_control_report_consistent_and_json():
    rng = np.random.default_rng(7)
    c2g = np.array([0, 0, 1, 1])
    cal, tst = _toy_split(rng, 3000), _toy_split(rng, 3000)
    rep = risk_control_report(cal, tst, c2g, target=0.1, delta=0.1, epsilon=0.1)
    json.dumps(rep, allow_nan=False)  # strict JSON: no inf / nan
    m = rep["methods"]
    assert set(m) == {"ltt_binomial", "ltt_weighted_lt", "ltt_per_group", "mondrian_conformal"}
    # thresholds equal the direct calls
    err_c = cal["pred"] != cal["y"]
    direct = ltt_threshold(cal["score"], err_c, 0.1, 0.1)["threshold"]
    assert m["ltt_binomial"]["threshold"] == (direct if np.isfinite(direct) else None)
    # test risk / coverage recomputed by hand (unweighted and lt view)
    t = m["ltt_binomial"]["threshold"]
    acc = tst["score"] >= t
    err_t = tst["pred"] != tst["y"]
    assert m["ltt_binomial"]["test"]["unweighted"]["coverage"] == pytest.approx(acc.mean())
    assert m["ltt_binomial"]["test"]["unweighted"]["risk"] == pytest.approx(err_t[acc].mean())
    w = tst["w_lt"]
    assert m["ltt_binomial"]["test"]["lt"]["risk"] == pytest.approx(
        (w * acc * err_t).sum() / (w * acc).sum()
    )
    # per-group rule is routed by the PREDICTED class's group
    th = np.array([np.inf if x is None else x for x in m["ltt_per_group"]["thresholds"]])
    gp = c2g[tst["pred"]]
    acc_g = tst["score"] >= th[gp]
    sel = acc_g & (gp == 1)
    got = m["ltt_per_group"]["test"]["unweighted"]["pred_group_risk"][1]
    assert got == pytest.approx(err_t[sel].mean() if sel.any() else 1.0)
    # conformal: what it bounds is reported per predicted group
    thc = np.array([np.inf if x is None else x for x in m["mondrian_conformal"]["thresholds"]])
    ae = m["mondrian_conformal"]["test"]["unweighted"]["accept_given_error_pred_group"]
    for k in range(2):
        e_k = err_t & (gp == k)
        assert ae[k] == pytest.approx((tst["score"][e_k] >= thc[k]).mean())
    assert "unweighted" in m["ltt_binomial"]["guarantee"]
    assert "long-tailed" in m["ltt_weighted_lt"]["guarantee"]
