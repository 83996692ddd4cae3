import math

import pytest
import torch
import torch.nn.functional as F

from argse_cli.experts.losses import (
    logit_adjusted_ce,
    loss_fn,
    parse_loss,
    posterior_tau,
    train_tau,
)

PI = torch.tensor([0.7, 0.2, 0.1])
LOG_PI = PI.log()
LOGITS = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]])
Y = torch.tensor([0, 2])


def _hand_ce(z, y):
    """-log(e^{z_y} / sum e^z) averaged, in pure python."""
    tot = 0.0
    for row, t in zip(z.tolist(), y.tolist(), strict=True):
        tot += -(row[t] - math.log(sum(math.exp(v) for v in row)))
    return tot / len(z)


def test_parse_loss():
    assert parse_loss("ce") == ("ce", 0.0)
    assert parse_loss("balsoftmax") == ("balsoftmax", 1.0)
    assert parse_loss("logitadjust:1.5") == ("logitadjust", 1.5)
    assert parse_loss(" LogitAdjust:0 ") == ("logitadjust", 0.0)
    assert parse_loss("decoupled") == ("decoupled", 1.0)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "focal",
        "logitadjust",
        "logitadjust:",
        "logitadjust:abc",
        "logitadjust:nan",
        "logitadjust:-1",
        "logitadjust:inf",
        None,
    ],
)
def test_parse_loss_bad(bad):
    with pytest.raises(ValueError, match="expected"):
        parse_loss(bad)


def test_posterior_and_train_tau():
    assert posterior_tau("ce") == 0.0
    assert posterior_tau("balsoftmax") == 1.0
    assert posterior_tau("logitadjust:2") == 2.0
    assert posterior_tau("decoupled") == 1.0
    assert train_tau("decoupled") == 0.0 and train_tau("logitadjust:2") == 2.0


def test_tau_zero_is_ce_hand_computed():
    got = logit_adjusted_ce(LOGITS, Y, LOG_PI, 0.0).item()
    assert got == pytest.approx(_hand_ce(LOGITS, Y), rel=1e-6)
    assert got == pytest.approx(F.cross_entropy(LOGITS, Y).item(), rel=1e-6)


def test_logit_adjust_hand_computed():
    tau = 0.5
    z = LOGITS + tau * LOG_PI
    got = logit_adjusted_ce(LOGITS, Y, LOG_PI, tau).item()
    assert got == pytest.approx(_hand_ce(z, Y), rel=1e-6)
    # first row by hand: z = [1 + .5 ln .7, .5 ln .2, -1 + .5 ln .1]
    z0 = [1 + 0.5 * math.log(0.7), 0.5 * math.log(0.2), -1 + 0.5 * math.log(0.1)]
    row0 = -(z0[0] - math.log(sum(math.exp(v) for v in z0)))
    assert logit_adjusted_ce(LOGITS[:1], Y[:1], LOG_PI, tau).item() == pytest.approx(row0, rel=1e-6)


def test_balsoftmax_equals_logitadjust_1():
    a = loss_fn("balsoftmax", LOG_PI)(LOGITS, Y)
    b = loss_fn("logitadjust:1", LOG_PI)(LOGITS, Y)
    assert torch.equal(a, b)
    assert a.item() == pytest.approx(_hand_ce(LOGITS + LOG_PI, Y), rel=1e-6)
    # the adjustment changes the loss (tail target gets a smaller logit, larger loss)
    assert a.item() > loss_fn("ce", LOG_PI)(LOGITS, Y).item()


def test_decoupled_trains_with_plain_ce():
    assert torch.equal(loss_fn("decoupled", LOG_PI)(LOGITS, Y), loss_fn("ce", LOG_PI)(LOGITS, Y))


def test_soft_targets_match_hard_and_mix_linearly():
    onehot = F.one_hot(Y, 3).float()
    hard = logit_adjusted_ce(LOGITS, Y, LOG_PI, 1.0)
    soft = logit_adjusted_ce(LOGITS, onehot, LOG_PI, 1.0)
    assert soft.item() == pytest.approx(hard.item(), rel=1e-6)
    y_other = torch.tensor([1, 1])
    q = 0.3 * onehot + 0.7 * F.one_hot(y_other, 3).float()
    mixed = logit_adjusted_ce(LOGITS, q, LOG_PI, 1.0).item()
    # per-row linearity in q
    per_row = [
        0.3 * logit_adjusted_ce(LOGITS[i : i + 1], Y[i : i + 1], LOG_PI, 1.0).item()
        + 0.7 * logit_adjusted_ce(LOGITS[i : i + 1], y_other[i : i + 1], LOG_PI, 1.0).item()
        for i in range(2)
    ]
    assert mixed == pytest.approx(sum(per_row) / 2, rel=1e-6)


def test_fp16_logits_give_float32_loss():
    out = logit_adjusted_ce(LOGITS.half(), Y, LOG_PI, 1.0)
    assert out.dtype == torch.float32


def test_soft_target_shape_checked():
    with pytest.raises(ValueError):
        logit_adjusted_ce(LOGITS, torch.ones(2, 4) / 4, LOG_PI, 1.0)
