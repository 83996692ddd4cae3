"""Tests of the gate trainer (argse_cli/core/gate_fit.py): the pure pieces, both recipes, divergence."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from argse_cli.config import TrainGateConfig
from argse_cli.core.gate_fit import (
    GateDiverged,
    InMemorySource,
    dual_update,
    hard_rule_group_stats,
    nll_loss,
    selective_lagrangian,
    tau_schedule,
    train_gate,
)
from argse_cli.core.plugin_fit import eg_step

torch.set_num_threads(1)

G4 = np.array([0, 0, 1, 1])  # classes 0,1 head (group 0); 2,3 tail (group 1)


def cfg(**kw) -> TrainGateConfig:
    return TrainGateConfig.model_validate(kw).resolved()


def make_two_expert_problem(n: int, seed: int):
    """E=2, C=4: expert e is sharp and right on group e, and confidently wrong elsewhere.
    Posteriors [n, 2, 4] float32 on a long-tailed prior (0.4, 0.3, 0.2, 0.1)."""
    rng = np.random.default_rng(seed)
    C, E = 4, 2
    y = rng.choice(C, size=n, p=[0.4, 0.3, 0.2, 0.1])
    z = rng.normal(0.0, 0.5, (n, E, C))
    rows = np.arange(n)
    for e in range(E):
        own = G4[y] == e
        z[rows[own], e, y[own]] += rng.uniform(1.5, 4.0, own.sum())
        other = ~own
        wrong = (y[other] + rng.integers(1, C, other.sum())) % C
        z[rows[other], e, wrong] += rng.uniform(0.5, 2.5, other.sum())
        z[rows[other], e, y[other]] += rng.uniform(0.0, 1.5, other.sum())
    p = np.exp(z - z.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)).astype(np.float32), y


# ------------------------------------------------------------------ pure functions


def test_eg_step_raises_weight_of_worse_group():
    b = eg_step(np.array([0.5, 0.5]), np.array([0.1, 0.6]), 1.0)
    assert b[1] > b[0] and b.sum() == pytest.approx(1.0)


def test_tau_schedule_values():
    assert tau_schedule(0, 2.0, 10.0, 30) == 2.0
    assert tau_schedule(15, 2.0, 10.0, 30) == pytest.approx(6.0)
    assert tau_schedule(30, 2.0, 10.0, 30) == 10.0 and tau_schedule(99, 2.0, 10.0, 30) == 10.0
    assert tau_schedule(3, 2.0, 10.0, 0) == 10.0


def test_dual_update_clips_to_0_lambda_max():
    np.testing.assert_allclose(dual_update(np.array([0.0, 9.9]), np.array([-5.0, 50.0]), 0.1, 10.0), [0.0, 10.0])
    t = dual_update(torch.tensor([1.0]), torch.tensor([2.0]), 0.5, 10.0)
    assert float(t) == 2.0


def test_hard_rule_group_stats_and_empty_group():
    pred, acc = np.array([0, 1, 2, 3]), np.array([True, True, False, False])
    cov, gcov, gerr = hard_rule_group_stats(pred, acc, np.array([0, 0, 2, 3]), None, G4, 2)
    assert cov == 0.5 and list(gcov) == [1.0, 0.0] and list(gerr) == [0.5, 1.0]


def test_nll_loss_hand_computed():
    eta = torch.tensor([[0.7, 0.2, 0.1, 0.0], [0.1, 0.1, 0.6, 0.2]])
    loss = nll_loss(eta, torch.tensor([0, 2]), torch.tensor([3.0, 1.0]))
    assert float(loss) == pytest.approx(-(0.75 * math.log(0.7) + 0.25 * math.log(0.6)), rel=1e-6)


def test_selective_lagrangian_hand_computed():
    eta = torch.tensor([[0.7, 0.2, 0.1, 0.0], [0.1, 0.1, 0.6, 0.2], [0.25, 0.25, 0.25, 0.25]])
    y, w = torch.tensor([0, 2, 3]), torch.tensor([2.0, 1.0, 1.0])
    alpha, mu, beta = torch.tensor([1.2, 0.8]), torch.tensor([0.3, 0.0]), torch.tensor([0.5, 0.5])
    lam, c, tau = torch.tensor([0.4, 1.5]), 0.2, 3.0
    loss, cons, _ = selective_lagrangian(eta, y, w, alpha, mu, beta, lam, c, tau, torch.as_tensor(G4))
    e = eta.numpy().astype(np.float64)
    u = 2 * 0.5 / np.array([1.2, 0.8])
    uy = u[G4]
    m = (e * uy).max(1) - (e * (uy - np.array([0.3, 0.0])[G4])).sum(1) + c
    s = 1 / (1 + np.exp(-tau * m))
    wn, gy = np.array([0.5, 0.25, 0.25]), G4[[0, 2, 3]]
    ce = -np.log(e[[0, 1, 2], [0, 2, 3]])
    acc_k = 2 * np.array([(wn * s * (gy == k)).sum() for k in range(2)])
    exp_cons = np.array([1.2, 0.8]) - acc_k
    expected = (wn * s * u[gy] * ce).sum() + c * (wn * (1 - s)).sum() + (np.array([0.4, 1.5]) * exp_cons).sum()
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    np.testing.assert_allclose(cons.numpy(), exp_cons, rtol=1e-5)


def test_in_memory_source_shuffles_per_epoch_and_covers_all():
    post = np.random.default_rng(0).dirichlet(np.ones(4), size=(50, 1)).astype(np.float32)
    y = np.arange(50) % 4
    src = InMemorySource(post, y, None, batch_size=16, seed=3)
    ys0 = torch.cat([b[1] for b in src.iter_epoch(0)])
    ys1 = torch.cat([b[1] for b in src.iter_epoch(1)])
    assert sorted(ys0.tolist()) == sorted(y.tolist())
    assert torch.equal(ys0, torch.cat([b[1] for b in src.iter_epoch(0)])) and not torch.equal(ys0, ys1)


# ------------------------------------------------------------------ configs: inert fields


def test_inert_fields_are_refused_and_stay_out_of_the_key():
    from argse_cli.errors import ArgseError
    from argse_cli.pipeline import validate

    base = validate("train-gate", {}).resolved()
    assert base.rho is None and base.xi is None and base.gate_loss == "nll"
    for bad, field in [({"rho": 0.1}, "rho"), ({"tau_end": 6.0}, "tau_end"), ({"xi": 1.0}, "xi"),
                       ({"uniform_gate": True, "epochs": 3}, "epochs")]:
        with pytest.raises(ArgseError, match=rf"train_gate\.{field}: has no effect"):
            validate("train-gate", bad)
    sel = validate("train-gate", {"gate_loss": "selective", "rho": 0.2}).resolved()
    assert sel.rho == 0.2 and sel.tau_end == 10.0
    worst = validate("train-gate", {"beta": "worst"}).resolved()
    assert worst.xi == 1.0 and worst.T == 10
    uni = validate("train-gate", {"uniform_gate": True}).resolved()
    assert uni.epochs is None and uni.seed is None  # nothing trained: one key for every seed


# ------------------------------------------------------------------ divergence


class _NaNAtEpoch:
    def __init__(self, inner, bad: int):
        self.inner, self.bad = inner, bad

    def iter_epoch(self, epoch):
        for p, y, w in self.inner.iter_epoch(epoch):
            if epoch >= self.bad:
                p = p.clone()
                p[0, 0, 0] = float("nan")
            yield p, y, w


def test_nan_posteriors_raise_gate_diverged():
    """The selective recipe reads the posteriors every epoch: NaN from epoch 2 on names epoch 2."""
    post, y = make_two_expert_problem(300, 0)
    c = cfg(epochs=5, hidden=(8,), gate_loss="selective")
    with pytest.raises(GateDiverged) as info:
        train_gate(_NaNAtEpoch(InMemorySource(post, y, None, 128, 0), bad=2), (post[:100], y[:100], None), G4, c)
    assert info.value.epoch == 2 and "epoch 2" in str(info.value) and info.value.last_finite["epoch"] == 1


def test_nll_recipe_refuses_non_finite_training_rows_before_any_epoch():
    """The NLL recipe reads every training row once (its cache): a NaN row is named before training."""
    from argse_cli.errors import ArgseError

    post, y = make_two_expert_problem(300, 0)
    post[137, 1, 2] = np.nan
    with pytest.raises(ArgseError, match="training row 137 has non-finite"):
        train_gate(InMemorySource(post, y, None, 128, 0), (post[:100], y[:100], None), G4, cfg(epochs=2, hidden=(8,)))


def test_nll_from_the_label_column_equals_the_full_mixture_nll():
    from argse_cli.core.gate_fit import _nll_of

    post, y = make_two_expert_problem(64, 3)
    p = torch.from_numpy(post)
    gw = torch.softmax(torch.randn(64, 2), -1)
    full = nll_loss(torch.einsum("be,bec->bc", gw, p), torch.from_numpy(y), torch.ones(64))
    col = _nll_of(gw, p[torch.arange(64), :, torch.from_numpy(y)], torch.ones(64))
    assert float(full) == pytest.approx(float(col), rel=1e-6)


def test_huge_learning_rate_diverges_or_stays_finite():
    post, y = make_two_expert_problem(400, 1)
    try:
        fit = train_gate(InMemorySource(post, y, None, 64, 0), (post, y, None), G4,
                         cfg(epochs=4, lr_gate=1e6, hidden=(8,)))
    except GateDiverged as err:
        assert "epoch" in str(err)
    else:
        assert all(bool(torch.isfinite(v).all()) for v in fit.gate_state.values())


# ------------------------------------------------------------------ training runs


@pytest.fixture(scope="module")
def nll_run():
    post, y = make_two_expert_problem(3000, 0)
    pv, yv = make_two_expert_problem(1500, 1)
    fit = train_gate(InMemorySource(post, y, None, 256, 0), (pv, yv, None), G4,
                     cfg(epochs=20, hidden=(32, 16), patience=20))
    uni = train_gate(InMemorySource(post, y, None, 256, 0), (pv, yv, None), G4, cfg(uniform_gate=True))
    return post, y, pv, yv, fit, uni


def test_nll_gate_beats_the_uniform_gate_on_val_nll(nll_run):
    post, y, pv, yv, fit, uni = nll_run
    eta_g, eta_u = fit.model.mixture(pv), uni.model.mixture(pv)
    nll = lambda eta: float(nll_loss(torch.from_numpy(eta), torch.from_numpy(yv), torch.ones(len(yv))))  # noqa: E731
    assert nll(eta_g) < nll(eta_u) - 0.05
    np.testing.assert_allclose(eta_u, pv.mean(1), atol=1e-6)
    assert uni.gate_state is None and uni.history == {}


def test_chosen_epoch_is_the_val_nll_minimum_and_the_model_is_that_epoch(nll_run):
    post, y, pv, yv, fit, uni = nll_run
    crit = np.asarray(fit.history["val_criterion"])
    assert fit.chosen_epoch == int(np.argmin(crit)) and fit.criterion.startswith("val_small NLL")
    eta = torch.from_numpy(fit.model.mixture(pv))
    assert float(nll_loss(eta, torch.from_numpy(yv), torch.ones(len(yv)))) == pytest.approx(crit.min(), rel=1e-5)
    np.testing.assert_allclose(fit.model.weights(pv[:50]).sum(1), 1.0, atol=1e-5)


def test_early_stopping_is_announced():
    post, y = make_two_expert_problem(600, 2)
    pv, yv = make_two_expert_problem(300, 3)
    lines, steps = [], []

    class P:
        def __call__(self, m, n, stats):
            steps.append((m, n))

        def log(self, msg):
            lines.append(msg)

    fit = train_gate(InMemorySource(post, y, None, 128, 0), (pv, yv, None), G4,
                     cfg(epochs=60, patience=2, hidden=(8,), lr_gate=0.05), progress=P())
    n_run = len(fit.history["epoch"])
    assert [s[0] for s in steps] == list(range(1, n_run + 1)) and steps[0][1] == 60
    if n_run < 60:
        assert fit.stopped_early and any("early stop at epoch" in m for m in lines)


def test_selective_recipe_moves_beta_in_worst_mode():
    post, y = make_two_expert_problem(600, 2)
    pv, yv = make_two_expert_problem(300, 3)
    fit = train_gate(InMemorySource(post, y, None, 128, 0), (pv, yv, np.ones(len(yv))), G4,
                     cfg(gate_loss="selective", beta="worst", epochs=6, hidden=(8,), tau_warmup_epochs=2,
                         patience=10))
    betas = np.asarray(fit.history["beta"])
    np.testing.assert_allclose(betas.sum(1), 1.0)
    np.testing.assert_allclose(betas[0], [0.5, 0.5])
    np.testing.assert_allclose(betas[1], eg_step(betas[0], fit.history["group_error"][0], 1.0))
    mus = np.asarray(fit.history["mu"])
    assert np.all(mus[:, -1] == 0.0) and fit.rule_state is not None
    assert np.all(np.asarray(fit.history["lambda"]) >= 0)


def test_hard_routing_uses_one_expert_per_sample():
    post, y = make_two_expert_problem(400, 4)
    fit = train_gate(InMemorySource(post, y, None, 128, 0), (post, y, None), G4,
                     cfg(epochs=3, hard_routing=True, hidden=(8,)))
    w = fit.model.weights(post[:40])
    np.testing.assert_array_equal(np.sort(w, axis=1), np.tile([0.0, 1.0], (40, 1)))
    np.testing.assert_allclose(fit.model.mixture(post[:40]), post[np.arange(40), w.argmax(1)], atol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_posterior_entry_is_named_by_its_row(bad):
    from argse_cli.core.gate_fit import InMemorySource, NLLCache
    from argse_cli.errors import ArgseError

    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(6), size=(40, 2)).astype(np.float32)
    p[17, 1, 3] = bad
    with pytest.raises(ArgseError, match="training row 17 has non-finite"):
        NLLCache(InMemorySource(p, rng.integers(0, 6, 40)))
