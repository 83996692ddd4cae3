"""Selective-classification metrics: hand-computed cases and invariants."""

from __future__ import annotations

import numpy as np
import pytest

from argse_cli.metrics import (
    AURC_CONVENTION,
    COVERAGE_GRID,
    augrc,
    aurc,
    e_aurc,
    ece,
    errors_at_coverage,
    geifman_aurc,
    nll,
    optimal_aurc,
    rc_curve,
    selective_metrics,
    trapezoid_area,
)
from argse_cli.metrics.selective import (
    balanced_error,
    coverage,
    group_coverage,
    group_errors,
    min_group_coverage,
    selective_risk,
    worst_group_error,
)

# ---------------------------------------------------------------- hand-computed small example
# 4 classes -> groups [0, 0, 1, 1]; 6 samples.
#   i:      0    1    2    3    4    5
#   y:      0    1    2    3    0    2      group: 0 0 1 1 0 1
#   pred:   0    0    2    2    0    1      wrong: 1, 3, 5
#   accept: T    T    T    F    T    F
#   w:      1    2    1    3    1    2      total 10, accepted 5
# group 0 = {0, 1, 4}: accepted weight 4, error weight 2 -> e_0 = 0.5, cov_0 = 4/4
# group 1 = {2, 3, 5}: accepted weight 1 (i=2, correct) -> e_1 = 0,  cov_1 = 1/6
C2G = np.array([0, 0, 1, 1])
Y6 = np.array([0, 1, 2, 3, 0, 2])
P6 = np.array([0, 0, 2, 2, 0, 1])
A6 = np.array([1, 1, 1, 0, 1, 0], dtype=bool)
W6 = np.array([1.0, 2.0, 1.0, 3.0, 1.0, 2.0])
S6 = np.array([1.0, 0.5, 0.0, -1.0, 2.0, -0.5])  # accept iff score >= 0 gives A6


def test_hand_example_weighted():
    np.testing.assert_allclose(group_errors(A6, P6, Y6, C2G, W6), [0.5, 0.0])
    np.testing.assert_allclose(group_coverage(A6, Y6, C2G, W6), [1.0, 1 / 6])
    assert coverage(A6, W6) == pytest.approx(0.5)
    assert min_group_coverage(A6, Y6, C2G, W6) == pytest.approx(1 / 6)
    assert selective_risk(A6, P6, Y6, W6) == pytest.approx(2 / 5)
    assert balanced_error(A6, P6, Y6, C2G, W6) == pytest.approx(0.25)
    assert worst_group_error(A6, P6, Y6, C2G, W6) == pytest.approx(0.5)


def test_hand_example_unweighted():
    # group 0 accepted {0,1,4}: 1 error of 3; group 1 accepted {2}: 0 errors
    np.testing.assert_allclose(group_errors(A6, P6, Y6, C2G), [1 / 3, 0.0])
    np.testing.assert_allclose(group_coverage(A6, Y6, C2G), [1.0, 1 / 3])
    assert coverage(A6) == pytest.approx(4 / 6)
    assert selective_risk(A6, P6, Y6) == pytest.approx(1 / 4)


def test_selective_metrics_dict():
    m = selective_metrics(S6, P6, Y6, C2G, W6, threshold=0.0, view="bal")
    assert m["view"] == "bal"
    assert m["coverage"] == pytest.approx(0.5)
    np.testing.assert_allclose(m["group_coverage"], [1.0, 1 / 6])
    assert m["min_group_coverage"] == pytest.approx(1 / 6)
    assert m["risk"] == pytest.approx(0.4)
    np.testing.assert_allclose(m["group_error"], [0.5, 0.0])
    assert m["balanced_error"] == pytest.approx(0.25)
    assert m["worst_group_error"] == pytest.approx(0.5)


def test_nothing_accepted_is_error_one():
    none = np.zeros(6, dtype=bool)
    np.testing.assert_array_equal(group_errors(none, P6, Y6, C2G, W6), [1.0, 1.0])
    assert selective_risk(none, P6, Y6, W6) == 1.0
    assert coverage(none, W6) == 0.0
    m = selective_metrics(S6, P6, Y6, C2G, W6, threshold=10.0)
    assert m["risk"] == 1.0 and m["balanced_error"] == 1.0 and m["coverage"] == 0.0


def test_rejecting_whole_group_cannot_lower_balanced_error():
    rng = np.random.default_rng(1)
    c2g = np.array([0, 0, 0, 1, 1, 2])
    for _ in range(20):
        n = 60
        y = rng.integers(0, 6, n)
        pred = np.where(rng.random(n) < 0.7, y, rng.integers(0, 6, n))
        w = rng.random(n)
        acc = rng.random(n) < 0.6
        base = balanced_error(acc, pred, y, c2g, w)
        for k in range(3):
            acc2 = acc & (c2g[y] != k)
            e = group_errors(acc2, pred, y, c2g, w)
            assert e[k] == 1.0
            assert balanced_error(acc2, pred, y, c2g, w) >= base - 1e-15
            assert worst_group_error(acc2, pred, y, c2g, w) == 1.0


# ---------------------------------------------------------------- rc curve
def test_tie_block_interpolation_four_samples():
    score = np.full(4, 0.3)
    y = np.array([0, 0, 1, 1])
    pred = np.array([0, 1, 1, 0])  # 2 wrong
    c = rc_curve(score, pred, y, np.array([0, 0]), coverages=[0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(c.risk, 0.5)
    np.testing.assert_allclose(c.balanced_risk, 0.5)
    np.testing.assert_allclose(c.coverage, [0.25, 0.5, 0.75, 1.0])
    assert aurc(rc_curve(score, pred, y, np.array([0, 0]))) == pytest.approx(0.5)


def test_rc_curve_distinct_scores_hand():
    # sorted by score: correct, wrong, correct, wrong
    score = np.array([4.0, 3.0, 2.0, 1.0])
    y = np.zeros(4, dtype=int)
    pred = np.array([0, 1, 0, 1])
    c = rc_curve(score, pred, y, np.array([0, 0]), coverages=[0.25, 0.375, 0.5, 0.75, 1.0])
    # 0.375 = 1.5 samples: half of the wrong sample -> 0.5 / 1.5
    np.testing.assert_allclose(c.risk, [0.0, 1 / 3, 0.5, 1 / 3, 0.5])


def test_rc_curve_weighted_hand():
    # scores 3 > 2 > 1, weights 1, 2, 1, the middle one wrong; total 4
    score = np.array([1.0, 3.0, 2.0])
    w = np.array([1.0, 1.0, 2.0])
    y = np.array([0, 0, 0])
    pred = np.array([0, 0, 1])
    c = rc_curve(score, pred, y, np.array([0, 0]), w=w, coverages=[0.25, 0.5, 0.75, 1.0])
    # 0.5 -> weight 2 = top sample + half of the weight-2 sample: E = 1, A = 2
    np.testing.assert_allclose(c.risk, [0.0, 0.5, 2 / 3, 0.5])


def test_rc_group_without_accepted_weight_is_one():
    score = np.array([4.0, 3.0, 2.0, 1.0])
    y = np.array([0, 0, 1, 1])  # groups 0, 0, 1, 1; all correct
    c = rc_curve(score, y, y, np.array([0, 1]), coverages=[0.25, 0.5, 0.625, 0.75, 1.0])
    np.testing.assert_allclose(c.risk, 0.0)
    np.testing.assert_allclose(c.group_error[:, 1], [1.0, 1.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(c.balanced_risk, [0.5, 0.5, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(c.worst_risk, [1.0, 1.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(c.group_coverage[:, 1], [0.0, 0.0, 0.25, 0.5, 1.0])


def test_default_grid_and_convention():
    assert COVERAGE_GRID.shape == (100,)
    assert COVERAGE_GRID[0] == 0.01 and COVERAGE_GRID[-1] == 1.0 and COVERAGE_GRID[69] == 0.7
    assert "0.01" in AURC_CONVENTION and "1.00" in AURC_CONVENTION


def test_aurc_and_augrc_hand():
    # 100 samples, the single error has the lowest score: risk 0 below c = 1, 1/100 at c = 1
    n = 100
    score = np.arange(n, 0, -1).astype(float)
    y = np.zeros(n, dtype=int)
    pred = np.zeros(n, dtype=int)
    pred[-1] = 1
    c2g = np.array([0, 0])
    c = rc_curve(score, pred, y, c2g)
    for kind in ("standard", "balanced", "worst"):
        assert aurc(c, kind) == pytest.approx(1e-4, abs=1e-15)
        assert augrc(c, kind) == pytest.approx(1e-4, abs=1e-15)
    assert aurc((score, pred, y, c2g)) == pytest.approx(1e-4, abs=1e-15)
    # all wrong: risk 1 everywhere, generalized risk = coverage
    c = rc_curve(score, np.ones(n, dtype=int), y, c2g)
    assert aurc(c) == 1.0
    assert augrc(c) == pytest.approx(0.505)
    with pytest.raises(ValueError):
        aurc(rc_curve(score, pred, y, c2g, coverages=[0.5, 1.0]))


def test_errors_at_coverage():
    score = np.array([4.0, 3.0, 2.0, 1.0])
    y = np.array([0, 0, 1, 1])
    pred = np.array([0, 1, 1, 0])  # group 0: ok, wrong; group 1: ok, wrong
    c = rc_curve(score, pred, y, np.array([0, 1]))
    e = errors_at_coverage(c, levels=(0.5, 0.75, 1.0))
    assert e["levels"] == [0.5, 0.75, 1.0]
    np.testing.assert_allclose(e["standard"], [0.5, 1 / 3, 0.5])
    # 0.5: group 0 {ok, wrong} -> 0.5, group 1 none -> 1.0
    np.testing.assert_allclose(e["balanced"], [0.75, 0.25, 0.5])
    np.testing.assert_allclose(e["worst"], [1.0, 0.5, 0.5])
    with pytest.raises(ValueError):
        errors_at_coverage(c, levels=(0.705,))


def _tied_problem(seed: int, n: int = 300):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 6, n)
    pred = np.where(rng.random(n) < 0.7, y, rng.integers(0, 6, n))
    score = rng.integers(0, 7, n).astype(float) + 0.5 * (pred == y)  # heavy ties
    w = rng.integers(1, 9, n) / 4.0  # dyadic: sums are exact in float64
    return score, pred, y, np.array([0, 0, 1, 1, 1, 2]), w


def _all_metrics(score, pred, y, c2g, w):
    c = rc_curve(score, pred, y, c2g, w)
    out = [c.coverage, c.risk, c.balanced_risk, c.worst_risk, c.group_error, c.group_coverage]
    for kind in ("standard", "balanced", "worst"):
        out += [aurc(c, kind), augrc(c, kind)]
    e = errors_at_coverage(c)
    out += [e["standard"], e["balanced"], e["worst"]]
    out += [geifman_aurc(score, pred, y), e_aurc(score, pred, y)]
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_permuting_tied_samples_changes_nothing(seed):
    score, pred, y, c2g, w = _tied_problem(seed)
    rng = np.random.default_rng(100 + seed)
    perm = np.arange(score.shape[0])
    for s in np.unique(score):  # shuffle samples among positions holding the same score
        pos = np.flatnonzero(score == s)
        perm[pos] = rng.permutation(pos)
    assert not np.array_equal(perm, np.arange(score.shape[0]))
    ref = _all_metrics(score, pred, y, c2g, w)
    new = _all_metrics(score[perm], pred[perm], y[perm], c2g, w[perm])
    for a, b in zip(ref, new, strict=True):
        np.testing.assert_array_equal(a, b)
    # non-dyadic weights: equal up to float rounding
    wr = np.random.default_rng(seed).random(score.shape[0])
    c1 = rc_curve(score, pred, y, c2g, wr)
    c2 = rc_curve(score[perm], pred[perm], y[perm], c2g, wr[perm])
    np.testing.assert_allclose(c1.balanced_risk, c2.balanced_risk, rtol=0, atol=1e-12)
    np.testing.assert_allclose(c1.worst_risk, c2.worst_risk, rtol=0, atol=1e-12)


def test_unit_weights_equal_unweighted():
    score, pred, y, c2g, _ = _tied_problem(3)
    ones = np.ones(score.shape[0])
    a = rc_curve(score, pred, y, c2g)
    b = rc_curve(score, pred, y, c2g, ones)
    for f in ("coverage", "risk", "balanced_risk", "worst_risk", "group_error", "group_coverage"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert geifman_aurc(score, pred, y) == geifman_aurc(score, pred, y, ones)
    m1 = selective_metrics(score, pred, y, c2g, None, threshold=3.0)
    m2 = selective_metrics(score, pred, y, c2g, ones, threshold=3.0)
    assert m1 == m2
    with pytest.raises(ValueError):
        geifman_aurc(score, pred, y, np.arange(score.shape[0]) + 1.0)


def test_balanced_equals_standard_for_mirrored_groups():
    # group 1 is an exact copy of group 0 (same scores, same correctness, same size)
    rng = np.random.default_rng(5)
    n = 150
    y0 = rng.integers(0, 3, n)
    p0 = np.where(rng.random(n) < 0.75, y0, rng.integers(0, 3, n))
    s0 = np.round(rng.normal(size=n), 1)  # ties inside and across groups
    y = np.concatenate([y0, y0 + 3])
    pred = np.concatenate([p0, p0 + 3])
    score = np.concatenate([s0, s0])
    c2g = np.array([0, 0, 0, 1, 1, 1])
    c = rc_curve(score, pred, y, c2g)
    np.testing.assert_allclose(c.balanced_risk, c.risk, atol=1e-12)
    np.testing.assert_allclose(c.worst_risk, c.risk, atol=1e-12)
    assert aurc(c, "balanced") == pytest.approx(aurc(c, "standard"), abs=1e-12)
    m = selective_metrics(score, pred, y, c2g, threshold=0.0)
    assert m["balanced_error"] == pytest.approx(m["risk"], abs=1e-12)


def test_selective_metrics_matches_rc_curve_at_its_coverage():
    rng = np.random.default_rng(7)
    n = 200
    y = rng.integers(0, 6, n)
    pred = np.where(rng.random(n) < 0.7, y, rng.integers(0, 6, n))
    score = rng.normal(size=n)
    c2g = np.array([0, 0, 1, 1, 2, 2])
    thr = np.sort(score)[::-1][119]  # accepts exactly the top 120
    m = selective_metrics(score, pred, y, c2g, threshold=thr)
    c = rc_curve(score, pred, y, c2g, coverages=[0.6])
    assert m["coverage"] == pytest.approx(0.6)
    assert m["risk"] == pytest.approx(c.risk[0])
    np.testing.assert_allclose(m["group_error"], c.group_error[0])
    np.testing.assert_allclose(m["group_coverage"], c.group_coverage[0])


# ---------------------------------------------------------------- Geifman AURC / E-AURC
def test_optimal_aurc_hand():
    # n = 4, r = 2: (1/4) * ((3-2)/3 + (4-2)/4) = 5/24
    assert optimal_aurc(2, 4) == pytest.approx(5 / 24)
    assert optimal_aurc(0, 10) == 0.0
    assert optimal_aurc(3, 3) == 1.0


def test_geifman_aurc_hand():
    score = np.array([4.0, 3.0, 2.0, 1.0])
    y = np.zeros(4, dtype=int)
    pred = np.array([0, 1, 0, 1])
    # top-k risks 0, 1/2, 1/3, 2/4
    assert geifman_aurc(score, pred, y) == pytest.approx((0 + 1 / 2 + 1 / 3 + 1 / 2) / 4)
    assert e_aurc(score, pred, y) == pytest.approx(1 / 3 - 5 / 24)
    # one tie block, 2 of 4 wrong: every top-k risk is 1/2 in expectation
    assert geifman_aurc(np.zeros(4), pred, y) == pytest.approx(0.5)


@pytest.mark.parametrize("n,acc", [(1, 1.0), (7, 0.0), (50, 0.8), (1000, 0.93), (997, 0.51)])
def test_perfect_scorer_e_aurc_exactly_zero(n, acc):
    rng = np.random.default_rng(n)
    y = rng.integers(0, 5, n)
    correct = rng.random(n) < acc
    pred = np.where(correct, y, (y + 1) % 5)
    r = int(np.sum(~correct))
    binary = correct.astype(float)  # two tie blocks
    ranked = np.where(correct, 1.0 + rng.random(n), rng.random(n))  # distinct scores
    partly = np.where(correct, 2.0, rng.integers(0, 2, n).astype(float))  # ties among wrong
    for score in (binary, ranked, partly):
        assert e_aurc(score, pred, y) == 0.0
        assert geifman_aurc(score, pred, y) == optimal_aurc(r, n)


def test_imperfect_scorer_positive_e_aurc():
    y = np.zeros(4, dtype=int)
    pred = np.array([0, 1, 0, 0])
    assert e_aurc(np.array([4.0, 3.0, 2.0, 1.0]), pred, y) > 0
    assert e_aurc(np.array([4.0, 0.0, 2.0, 1.0]), pred, y) == 0.0


# ---------------------------------------------------------------- trapezoid
def test_trapezoid_linear():
    x = np.array([0.0, 0.5, 1.0])
    assert trapezoid_area(x, x) == pytest.approx(0.5)
    assert trapezoid_area(x, x, 0.25, 0.75) == pytest.approx((0.75**2 - 0.25**2) / 2)
    assert trapezoid_area(x, x, 0.3, 0.3) == 0.0
    assert trapezoid_area(x, 2 * x) == pytest.approx(1.0)


def test_trapezoid_step_and_extension():
    x = np.array([0.0, 0.5, 0.5, 1.0])
    r = np.array([0.0, 0.0, 1.0, 1.0])
    assert trapezoid_area(x, r) == pytest.approx(0.5)
    assert trapezoid_area(x, r, 0.25, 0.75) == pytest.approx(0.25)
    assert trapezoid_area(x, r, 0.6, 0.9) == pytest.approx(0.3)
    # table on [0.2, 0.8], held constant outside: 0.1*0.2 + 0.4*0.6 + 0.7*0.2
    assert trapezoid_area([0.2, 0.8], [0.1, 0.7]) == pytest.approx(0.40)
    assert trapezoid_area([0.5], [0.3], 0.0, 1.0) == pytest.approx(0.3)
    # the grid curve of a constant risk
    assert trapezoid_area(COVERAGE_GRID, np.full(100, 0.2), 0.01, 1.0) == pytest.approx(0.2 * 0.99)
    with pytest.raises(ValueError):
        trapezoid_area([0.5, 0.2], [0.0, 0.0])
    with pytest.raises(ValueError):
        trapezoid_area(x, r, 0.8, 0.2)


# ---------------------------------------------------------------- calibration
PROBS = np.array(
    [[0.95, 0.05], [0.65, 0.35], [0.25, 0.75], [0.85, 0.15]], dtype=np.float32
)  # conf 0.95, 0.65, 0.75, 0.85 -> 10 bins: 9, 6, 7, 8 (one sample per bin)
Y4 = np.array([0, 1, 1, 0])  # correct, wrong, correct, correct


def test_ece_hand():
    assert ece(PROBS, Y4, n_bins=10) == pytest.approx((0.05 + 0.65 + 0.25 + 0.15) / 4, abs=1e-6)
    w = np.array([1.0, 1.0, 2.0, 0.0])
    assert ece(PROBS, Y4, n_bins=10, w=w) == pytest.approx((0.05 + 0.65 + 2 * 0.25) / 4, abs=1e-6)
    # both in bin (0.6, 0.7]: acc 0.5, mean conf 0.65
    p = np.array([[0.62, 0.38], [0.68, 0.32]])
    assert ece(p, np.array([0, 1]), n_bins=10) == pytest.approx(0.15)
    # one bin: |acc - mean conf| = |3/4 - 0.8|
    assert ece(PROBS, Y4, n_bins=1) == pytest.approx(abs(0.75 - 0.8), abs=1e-6)
    # upper-inclusive bins: conf 0.5 sits in bin 0 with n_bins=2 (acc 1 vs conf 0.5)
    assert ece(np.array([[0.5, 0.5], [1.0, 0.0]]), np.array([0, 0]), n_bins=2) == pytest.approx(
        0.25
    )


def test_nll_hand():
    expected = -(np.log(0.95) + np.log(0.35) + np.log(0.75) + np.log(0.85)) / 4
    assert nll(PROBS, Y4) == pytest.approx(expected, rel=1e-6)
    w = np.array([1.0, 0.0, 0.0, 3.0])
    assert nll(PROBS, Y4, w=w) == pytest.approx(-(np.log(0.95) + 3 * np.log(0.85)) / 4, rel=1e-6)
    assert nll(np.array([[1.0, 0.0]]), np.array([1])) == pytest.approx(-np.log(1e-12))
