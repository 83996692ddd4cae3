"""Hypothesis property tests: no NaN, ranges and order relations for any finite input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from argse_cli.metrics import (
    augrc,
    aurc,
    bootstrap_rc,
    e_aurc,
    errors_at_coverage,
    geifman_aurc,
    optimal_aurc,
    rc_curve,
    selective_metrics,
    trapezoid_area,
)

SETTINGS = settings(max_examples=50, deadline=None)
TOL = 1e-12
SCORE_ATOMS = [-1e4, -1.0, 0.0, 0.5, 1.0, 1e4]


@st.composite
def problems(draw):
    """(score, pred, y, class_to_group, w): ties, extreme scores, empty groups, zero weights."""
    n = draw(st.integers(1, 30))
    C = draw(st.integers(1, 5))
    c2g = np.array(draw(st.lists(st.integers(0, 2), min_size=C, max_size=C)))
    y = np.array(draw(st.lists(st.integers(0, C - 1), min_size=n, max_size=n)))
    pred = np.array(draw(st.lists(st.integers(0, C - 1), min_size=n, max_size=n)))
    kind = draw(st.sampled_from(["atoms", "floats", "constant"]))
    if kind == "atoms":
        score = np.array(draw(st.lists(st.sampled_from(SCORE_ATOMS), min_size=n, max_size=n)))
    elif kind == "floats":
        score = np.array(
            draw(st.lists(st.floats(-1e4, 1e4, allow_nan=False), min_size=n, max_size=n))
        )
    else:
        score = np.full(n, draw(st.sampled_from(SCORE_ATOMS)))
    w = None
    if draw(st.booleans()):
        w = np.array(draw(st.lists(st.floats(0.0, 10.0), min_size=n, max_size=n)))
    return score, pred, y, c2g, w


def _in_unit(a) -> bool:
    a = np.asarray(a, dtype=float)
    return bool(np.all(np.isfinite(a)) and np.all(a >= 0.0) and np.all(a <= 1.0))


@SETTINGS
@given(problems())
def test_rc_curve_finite_and_in_range(p):
    score, pred, y, c2g, w = p
    c = rc_curve(score, pred, y, c2g, w)
    for a in (c.coverage, c.risk, c.balanced_risk, c.worst_risk, c.group_error, c.group_coverage):
        assert _in_unit(a)
    assert np.all(c.worst_risk >= c.balanced_risk - TOL)
    assert np.all(c.worst_risk >= c.risk - TOL)  # the standard risk is a mix of the e_k
    assert np.all(c.balanced_risk >= c.group_error.min(axis=1) - TOL)
    if w is None or np.sum(w) > 0:
        assert np.all(np.diff(c.group_coverage, axis=0) >= -TOL)  # non-decreasing per group
    vals = {k: aurc(c, k) for k in ("standard", "balanced", "worst")}
    gen = {k: augrc(c, k) for k in ("standard", "balanced", "worst")}
    assert _in_unit(list(vals.values())) and _in_unit(list(gen.values()))
    assert vals["worst"] >= vals["balanced"] - TOL
    assert vals["worst"] >= vals["standard"] - TOL
    for k in vals:
        assert gen[k] <= vals[k] + TOL  # generalized risk e_k cov_k <= e_k
    e = errors_at_coverage(c)
    assert _in_unit(e["standard"] + e["balanced"] + e["worst"])


@SETTINGS
@given(problems())
def test_constant_score_has_constant_risk(p):
    score, pred, y, c2g, w = p
    c = rc_curve(np.zeros_like(score), pred, y, c2g, w)
    assert np.allclose(c.risk, c.risk[-1], atol=1e-12)
    assert np.allclose(c.group_error, c.group_error[-1], atol=1e-12)


@pytest.mark.parametrize("w", [[5e-324], [1.0, 5e-324], [1.0, 1e-13]])
def test_constant_score_with_a_subnormal_weight_has_constant_risk(w):
    """The failing example: one right prediction of weight 5e-324 and a constant score -- the tie
    block's fractional acceptance underflowed, so the risk jumped from 1 (nothing accepted) to 0.
    The weights' domain: a subnormal weight, or one below 1e-12 x the largest, counts as 0."""
    n = len(w)
    y = np.array([1, 0][:n])
    c = rc_curve(np.zeros(n), y.copy(), y, np.array([0, 1]), np.asarray(w))
    assert np.allclose(c.risk, c.risk[-1], atol=1e-12)
    assert np.allclose(c.group_error, c.group_error[-1], atol=1e-12)


@SETTINGS
@given(problems(), st.sampled_from([-2e4, -1.0, 0.0, 0.25, 1.0, 2e4]))
def test_selective_metrics_finite(p, thr):
    score, pred, y, c2g, w = p
    m = selective_metrics(score, pred, y, c2g, w, threshold=thr)
    for key in ("coverage", "min_group_coverage", "risk", "balanced_error", "worst_group_error"):
        assert _in_unit(m[key]), key
    assert _in_unit(m["group_coverage"]) and _in_unit(m["group_error"])
    assert m["worst_group_error"] >= m["balanced_error"] - TOL
    if not np.any(score >= thr):
        assert m["group_error"] == [1.0] * len(m["group_error"]) and m["risk"] == 1.0


@SETTINGS
@given(problems())
def test_group_with_no_accepted_sample_is_one(p):
    score, pred, y, c2g, w = p
    g = c2g[y]
    k = int(g[0])
    s = np.where(g == k, -5e4, np.abs(score))  # group k strictly below every other sample
    m = selective_metrics(s, pred, y, c2g, w, threshold=-1e-9)
    assert m["group_error"][k] == 1.0
    assert m["group_coverage"][k] == 0.0
    assert m["worst_group_error"] == 1.0


@SETTINGS
@given(problems())
def test_geifman_aurc_at_least_optimal(p):
    score, pred, y, _, _ = p
    a = geifman_aurc(score, pred, y)
    assert _in_unit(a)
    opt = optimal_aurc(int(np.sum(pred != y)), y.shape[0])
    assert a >= opt - TOL
    assert abs(e_aurc(score, pred, y) - (a - opt)) <= TOL


@settings(max_examples=25, deadline=None)
@given(problems(), st.integers(0, 2**31 - 1))
def test_bootstrap_finite(p, seed):
    score, pred, y, c2g, w = p
    out = bootstrap_rc(score, pred, y, c2g, w, n_boot=8, seed=seed)
    for s in out["stats"].values():
        assert _in_unit([s["estimate"], s["lo"], s["hi"]])
        assert s["lo"] <= s["hi"]


@SETTINGS
@given(
    st.lists(st.floats(0.0, 1.0), min_size=1, max_size=20),
    st.floats(0.0, 1.0),
    st.floats(0.0, 1.0),
    st.floats(0.0, 1.0),
)
def test_trapezoid_bounds(risk, a, b, r):
    lo, hi = min(a, b), max(a, b)
    x = np.linspace(0.0, 1.0, len(risk))
    area = trapezoid_area(x, risk, lo, hi)
    assert min(risk) * (hi - lo) - TOL <= area <= max(risk) * (hi - lo) + TOL
    assert abs(trapezoid_area(x, np.full(len(risk), r), lo, hi) - r * (hi - lo)) <= TOL
