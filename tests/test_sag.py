"""S-Aware Gating: hand-computed thresholds and the stream tolerance test.

Stated tolerances (synthetic stream of 20,000 samples, batches of 100, window 2,000; after the
warm-up of 20 batches): the pooled post-warm-up rate is within 0.03 of the target and the rate
over every run of 20 consecutive batches (2,000 samples) within 0.08 (full feedback) / 0.10
(labels only for rejected samples, p_rand = 0.2), for each mode, on a stationary and on a
drifting stream. (Over 12 seeds the worst deviations measured were 0.024 pooled, 0.061 / 0.065
over 2,000 samples; one 2,000-sample window holds ~500-1,000 errors, binomial sd ~0.013-0.019.)
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from argse_cli.report.deferral_figures import plot_sag
from argse_cli.sag import SAGReplay, batch_rate, sag_gamma, sag_stream

TARGETS = {"sensitivity": 0.9, "specificity": 0.8, "success": 0.95}
N, BATCH, WINDOW, ROLL = 20_000, 100, 2_000, 20


def _stream(kind: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores and correctness. stationary: s ~ U(0,1), P(err | s) = 1 - s. drift: the model
    improves along the stream, s = U^(1/(1 + 2 tau)) (scores move up), P(err | s) = 1 - s."""
    rng = np.random.default_rng(seed)
    u = rng.random(N)
    tau = np.linspace(0.0, 1.0, N)
    s = u if kind == "stationary" else u ** (1.0 / (1.0 + 2.0 * tau))
    correct = rng.random(N) < s
    return s, correct


def _rolling_pooled(res: dict, s: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Rate pooled over every run of ROLL consecutive post-warm-up batches.

    Each batch's rate is weighted by its denominator (errors / correct / all samples of the
    batch, recounted from the stream), so this is the pooled rate of those 2,000 samples.
    """
    mode, wb = res["mode"], res["warmup_batches"]
    rate = np.array(res["rate"], dtype=float)
    den = []
    for b in range(len(rate)):
        cb = c[b * BATCH : (b + 1) * BATCH]
        den.append({"sensitivity": (~cb).sum(), "specificity": cb.sum(), "success": cb.size}[mode])
    den = np.asarray(den, dtype=float)[wb:]
    num = np.nan_to_num(rate[wb:]) * den
    k = np.ones(ROLL)
    return np.convolve(num, k, "valid") / np.convolve(den, k, "valid")


# --------------------------------------------------------------------------- hand cases
def test_sag_gamma_hand_cases():
    err_s = np.array([0.1, 0.2, 0.3, 0.4])
    cor_s = np.array([0.9, 0.8, 0.7, 0.6])
    s = np.r_[err_s, cor_s]
    c = np.r_[np.zeros(4, bool), np.ones(4, bool)]
    # sensitivity 0.5: reject the 2 lowest error scores -> gamma just above 0.2
    g = sag_gamma(s, c, "sensitivity", 0.5)
    assert 0.2 < g < 0.2 + 1e-12
    assert batch_rate(s >= g, c, "sensitivity") == 0.5
    # with p_rand = 0.2 the random rejections already give 0.2: need (0.6 - 0.2)/0.8 = 0.5
    assert sag_gamma(s, c, "sensitivity", 0.6, p_rand=0.2) == g
    assert sag_gamma(s, c, "sensitivity", 0.1, p_rand=0.2) == -math.inf
    # specificity 0.75: accept the 3 highest correct scores -> gamma = 0.7
    assert sag_gamma(s, c, "specificity", 0.75) == 0.7
    # 0.75 / (1 - 0.5) > 1: unreachable with p_rand = 0.5 -> accept all
    assert sag_gamma(s, c, "specificity", 0.75, p_rand=0.5) == -math.inf
    # success 0.9: accepted errors must be <= 0.1 * 8 = 0.8 samples -> no error accepted:
    # smallest gamma with no error at or above it is 0.6 (the lowest correct score)
    assert sag_gamma(s, c, "success", 0.9) == 0.6
    # success 0.75: up to 2 accepted errors -> gamma = 0.3 (accepts errors 0.3, 0.4)
    assert sag_gamma(s, c, "success", 0.75) == 0.3
    assert batch_rate(s >= 0.3, c, "success") == 0.75
    # success 0.5: accepting everything is fine
    assert sag_gamma(s, c, "success", 0.5) == -math.inf
    # inverse-propensity weights: error 0.4 weighs 3 -> sensitivity 0.5 needs 0.1, 0.2, 0.3
    w = np.r_[1, 1, 1, 3, np.ones(4)]
    assert 0.3 < sag_gamma(s, c, "sensitivity", 0.5, weight=w) < 0.3 + 1e-12
    # nothing to learn from -> None (caller keeps gamma)
    assert sag_gamma(cor_s, np.ones(4, bool), "sensitivity", 0.9) is None


def test_batch_rate_definitions():
    a = np.array([1, 1, 0, 0, 1], bool)
    c = np.array([1, 0, 0, 1, 1], bool)
    assert batch_rate(a, c, "sensitivity") == 0.5  # errors at 1, 2; rejected: 2
    assert batch_rate(a, c, "specificity") == pytest.approx(2 / 3)  # correct 0, 3, 4
    assert batch_rate(a, c, "success") == pytest.approx((2 + 2) / 5)
    assert math.isnan(batch_rate(a, np.ones(5, bool), "sensitivity"))


# --------------------------------------------------------------------------- stream tolerance
@pytest.mark.parametrize("kind", ["stationary", "drift"])
@pytest.mark.parametrize("mode", ["sensitivity", "specificity", "success"])
@pytest.mark.parametrize("feedback,p_rand,tol_roll", [("all", 0.0, 0.08), ("rejected", 0.2, 0.10)])
def test_sag_stream_hits_target(kind, mode, feedback, p_rand, tol_roll):
    s, c = _stream(kind, seed=11)
    target = TARGETS[mode]
    res = sag_stream(s, c, mode, target, WINDOW, BATCH, p_rand=p_rand, seed=3,
                     replay=SAGReplay(feedback=feedback))
    assert res["warmup_batches"] == WINDOW // BATCH
    assert abs(res["post_warmup_rate"] - target) <= 0.03
    roll = _rolling_pooled(res, s, c)
    assert np.max(np.abs(roll - target)) <= tol_roll
    # random rejections do happen at rate p_rand (coverage can't exceed 1 - p_rand much)
    assert res["post_warmup_coverage"] <= 1.0 - p_rand + 0.02


def test_frozen_threshold_misses_on_drift():
    """The tolerance test can fail: a gamma frozen after the first window drifts off target."""
    s, c = _stream("drift", seed=11)
    g = sag_gamma(s[:WINDOW], c[:WINDOW], "sensitivity", 0.9)
    late = slice(N - WINDOW, N)
    assert abs(batch_rate(s[late] >= g, c[late], "sensitivity") - 0.9) > 0.15
    res = sag_stream(s, c, "sensitivity", 0.9, WINDOW, BATCH)
    assert abs(_rolling_pooled(res, s, c)[-1] - 0.9) <= 0.08


def test_sag_stream_order_and_json(tmp_path):
    rng = np.random.default_rng(0)
    s = rng.random(3000)
    c = rng.random(3000) < s
    order = np.arange(3000)[::-1]
    r1 = sag_stream(s, c, "success", 0.9, 500, 100, replay=SAGReplay(order=order))
    r2 = sag_stream(s[::-1], c[::-1], "success", 0.9, 500, 100)
    assert r1["rate"] == r2["rate"] and r1["gamma"] == r2["gamma"]
    assert r1["gamma"][0] is None  # gamma0 = +inf (query everything) before the first update
    assert r1["coverage"][0] == 0.0 and r1["rate"][0] == 1.0
    json.dumps(r1, allow_nan=False)
    paths = plot_sag(r1, tmp_path / "sag")
    assert [p.suffix for p in paths] == [".pdf", ".png"]
    assert all(p.stat().st_size > 1000 for p in paths)
    with pytest.raises(ValueError):
        sag_stream(s, c, "success", 0.9, 500, 100, p_rand=0.0,
                   replay=SAGReplay(feedback="rejected"))
    with pytest.raises(ValueError):
        sag_stream(s, c, "recall", 0.9, 500, 100)
