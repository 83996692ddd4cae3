"""Class-stratified (paired) bootstrap of the risk-coverage statistics."""

from __future__ import annotations

import numpy as np
import pytest

from argse_cli.metrics import (
    aurc,
    bootstrap_rc,
    class_stratified_indices,
    errors_at_coverage,
    paired_bootstrap_diff,
    rc_curve,
)
from argse_cli.metrics.bootstrap import stat_names

C2G = np.array([0, 0, 0, 1, 1, 1, 1, 1, 1, 1])


def _problem(n: int = 2000, seed: int = 0, informative: bool = True, ties: bool = False):
    rng = np.random.default_rng(seed)
    prior = np.exp(-0.3 * np.arange(10))
    y = rng.choice(10, size=n, p=prior / prior.sum())
    correct = rng.random(n) < np.where(C2G[y] == 0, 0.85, 0.65)
    pred = np.where(correct, y, (y + 1 + rng.integers(0, 9, n)) % 10)
    score = rng.normal(size=n) + (1.5 * correct if informative else 0.0)
    if ties:
        score = np.round(score, 1)
    w = 1.0 / np.bincount(y, minlength=10)[y] * n / 10  # a balanced view
    return score, pred, y, w


def test_stratified_indices_keep_class_counts():
    y = np.random.default_rng(0).integers(0, 7, 500)
    idx = class_stratified_indices(y, n_boot=40, seed=3)
    assert idx.shape == (40, 500) and idx.dtype == np.int64
    np.testing.assert_array_equal(y[idx], np.broadcast_to(y, idx.shape))  # column-wise class
    for row in idx:
        np.testing.assert_array_equal(np.bincount(y[row], minlength=7), np.bincount(y, minlength=7))
    # with replacement: some sample repeats in some row
    assert any(np.unique(row).size < row.size for row in idx)
    np.testing.assert_array_equal(idx, class_stratified_indices(y, n_boot=40, seed=3))
    assert not np.array_equal(idx, class_stratified_indices(y, n_boot=40, seed=4))


def test_point_estimates_match_rc_curve():
    score, pred, y, w = _problem(ties=True)
    out = bootstrap_rc(score, pred, y, C2G, w, n_boot=20, seed=0, view="bal")
    assert out["view"] == "bal" and list(out["stats"]) == stat_names()
    c = rc_curve(score, pred, y, C2G, w)
    e = errors_at_coverage(c)
    st = out["stats"]
    assert st["aurc_standard"]["estimate"] == pytest.approx(aurc(c, "standard"), abs=1e-12)
    assert st["aurc_balanced"]["estimate"] == pytest.approx(aurc(c, "balanced"), abs=1e-12)
    assert st["aurc_worst"]["estimate"] == pytest.approx(aurc(c, "worst"), abs=1e-12)
    for i, lv in enumerate((0.7, 0.8, 0.9)):
        assert st[f"balanced_error@{lv:g}"]["estimate"] == pytest.approx(
            e["balanced"][i], abs=1e-12
        )
        assert st[f"worst_error@{lv:g}"]["estimate"] == pytest.approx(e["worst"][i], abs=1e-12)


@pytest.mark.parametrize("weighted", [False, True])
def test_each_resample_equals_explicitly_resampled_data(weighted):
    score, pred, y, w = _problem(n=600, seed=1, ties=True)
    w = w if weighted else None
    idx = class_stratified_indices(y, n_boot=6, seed=9)
    out = bootstrap_rc(score, pred, y, C2G, w, indices=idx, return_samples=True)
    for b in range(idx.shape[0]):
        i = idx[b]
        c = rc_curve(score[i], pred[i], y[i], C2G, None if w is None else w[i])
        e = errors_at_coverage(c)
        expect = [aurc(c, "standard"), aurc(c, "balanced"), aurc(c, "worst")]
        for k in range(3):
            expect += [e["balanced"][k], e["worst"][k]]
        np.testing.assert_allclose(out["samples"][b], expect, rtol=0, atol=1e-12)


def test_seeded_resamples_equal_public_indices():
    score, pred, y, w = _problem(n=800, seed=2)
    a = bootstrap_rc(score, pred, y, C2G, w, n_boot=50, seed=11, return_samples=True)
    idx = class_stratified_indices(y, n_boot=50, seed=11)
    b = bootstrap_rc(score, pred, y, C2G, w, indices=idx, return_samples=True)
    np.testing.assert_allclose(a["samples"], b["samples"], rtol=0, atol=1e-12)


def test_identity_resamples_give_degenerate_interval():
    score, pred, y, w = _problem(n=300, seed=3)
    idx = np.tile(np.arange(300), (5, 1))
    out = bootstrap_rc(score, pred, y, C2G, w, indices=idx)
    for s in out["stats"].values():
        assert s["lo"] == pytest.approx(s["estimate"], abs=1e-12)
        assert s["hi"] == pytest.approx(s["estimate"], abs=1e-12)


def test_intervals_contain_point_estimate():
    score, pred, y, w = _problem(n=3000, seed=4)
    for ww in (None, w):
        out = bootstrap_rc(score, pred, y, C2G, ww, n_boot=300, seed=0)
        for name, s in out["stats"].items():
            assert s["lo"] <= s["estimate"] <= s["hi"], name
            assert s["hi"] - s["lo"] > 0, name
            assert 0.0 <= s["lo"] and s["hi"] <= 1.0


def test_unit_weights_equal_unweighted_bootstrap():
    score, pred, y, _ = _problem(n=500, seed=5, ties=True)
    a = bootstrap_rc(score, pred, y, C2G, None, n_boot=30, seed=1, return_samples=True)
    b = bootstrap_rc(score, pred, y, C2G, np.ones(500), n_boot=30, seed=1, return_samples=True)
    np.testing.assert_array_equal(a["samples"], b["samples"])


def test_paired_with_itself_is_zero():
    score, pred, y, w = _problem(n=1000, seed=6)
    args = (score, pred, y, C2G, w)
    d = paired_bootstrap_diff(args, args, n_boot=100, seed=0)
    for s in d["stats"].values():
        assert s["diff"] == 0.0 and s["lo"] == 0.0 and s["hi"] == 0.0
        assert s["excludes_0"] is False


def test_paired_detects_a_clear_difference():
    score, pred, y, w = _problem(n=2000, seed=7)
    noise = np.random.default_rng(0).normal(size=score.shape[0])  # uninformative scorer
    good = {"score": score, "pred": pred, "y": y, "class_to_group": C2G, "w": w}
    bad = dict(good, score=noise)
    d = paired_bootstrap_diff(good, bad, n_boot=200, seed=0)
    st = d["stats"]["aurc_standard"]
    assert st["diff"] < 0 and st["hi"] < 0 and st["excludes_0"] is True
    # same resamples: A's marginal equals its own bootstrap (same seed)
    a = bootstrap_rc(score, pred, y, C2G, w, n_boot=200, seed=0)
    assert d["stats"]["aurc_balanced"]["a"] == pytest.approx(
        a["stats"]["aurc_balanced"]["estimate"]
    )
    with pytest.raises(ValueError):
        paired_bootstrap_diff(good, dict(good, y=(y + 1) % 10), n_boot=5)
