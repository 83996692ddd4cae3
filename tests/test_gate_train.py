"""Tests of the primal-dual gate / rule training (argse_cli/gate_train.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from argse_cli.gate_train import (
    GateDiverged,
    GateRecipe,
    InMemorySource,
    dual_update,
    eg_step,
    gate_batch_loss,
    hard_rule_group_stats,
    selective_objective,
    tau_schedule,
    train_gate,
)
from argse_cli.rejector import plugin_margin, plugin_predict

torch.set_num_threads(1)

G4 = np.array([0, 0, 1, 1])  # classes 0,1 head (group 0); 2,3 tail (group 1)


def make_two_expert_problem(n: int, seed: int):
    """E=2, C=4: expert e is sharp and right on group e, and confidently wrong elsewhere.

    Posteriors [n, 2, 4] float32 on a long-tailed prior (0.4, 0.3, 0.2, 0.1).
    """
    rng = np.random.default_rng(seed)
    C, E = 4, 2
    y = rng.choice(C, size=n, p=[0.4, 0.3, 0.2, 0.1])
    z = rng.normal(0.0, 0.5, (n, E, C))
    rows = np.arange(n)
    for e in range(E):
        own = G4[y] == e
        z[rows[own], e, y[own]] += rng.uniform(1.5, 4.0, own.sum())
        other = ~own
        wrong = (y[other] + rng.integers(1, C, other.sum())) % C  # a class != y
        z[rows[other], e, wrong] += rng.uniform(0.5, 2.5, other.sum())
        z[rows[other], e, y[other]] += rng.uniform(0.0, 1.5, other.sum())
    p = np.exp(z - z.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)).astype(np.float32), y


# ------------------------------------------------------------------ pure functions


def test_eg_step_raises_weight_of_worse_group():
    b = eg_step([0.5, 0.5], [0.1, 0.4], xi=1.0)
    expected1 = math.exp(0.4) / (math.exp(0.1) + math.exp(0.4))
    assert b[1] == pytest.approx(expected1)
    assert b[1] > 0.5 > b[0]
    assert b.sum() == pytest.approx(1.0)
    # equal errors leave beta unchanged; xi = 0 too
    np.testing.assert_allclose(eg_step([0.2, 0.3, 0.5], [0.3, 0.3, 0.3], 2.0), [0.2, 0.3, 0.5])
    np.testing.assert_allclose(eg_step([0.2, 0.8], [0.9, 0.0], 0.0), [0.2, 0.8])
    # an empty group's error 1.0 makes it the heaviest
    assert np.argmax(eg_step([1 / 3] * 3, [0.2, 1.0, 0.5], 1.0)) == 1


def test_tau_schedule_values():
    vals = [tau_schedule(e, 2.0, 10.0, 30) for e in (0, 15, 29, 30, 50)]
    np.testing.assert_allclose(vals, [2.0, 6.0, 2 + 8 * 29 / 30, 10.0, 10.0])
    assert tau_schedule(3, 2.0, 10.0, 0) == 10.0


def test_dual_update_clips_to_0_lambda_max():
    lam = dual_update(np.array([9.9, 0.05, 1.0]), np.array([100.0, -100.0, 10.0]), 0.01, 10.0)
    np.testing.assert_allclose(lam, [10.0, 0.0, 1.1])
    lam_t = dual_update(torch.tensor([9.9, 0.05]), torch.tensor([100.0, -100.0]), 0.01, 10.0)
    torch.testing.assert_close(lam_t, torch.tensor([10.0, 0.0]))


def test_hard_rule_group_stats_and_empty_group():
    # 6 samples: classes 0,1 -> group 0, classes 2,3 -> group 1
    y = np.array([0, 1, 0, 2, 3, 2])
    pred = np.array([0, 0, 0, 2, 2, 2])
    acc = np.array([True, True, False, False, False, False])  # no group-1 sample accepted
    w = np.array([1.0, 3.0, 1.0, 1.0, 1.0, 1.0])
    cov, gcov, gerr = hard_rule_group_stats(pred, acc, y, w, G4, 2)
    assert cov == pytest.approx(4 / 8)
    np.testing.assert_allclose(gcov, [4 / 5, 0.0])
    np.testing.assert_allclose(gerr, [3 / 4, 1.0])  # sample 1 wrong with weight 3; empty -> 1
    assert selective_objective([0.5, 0.5], gerr, 0.1, cov) == pytest.approx(
        0.5 * 0.75 + 0.5 * 1.0 + 0.1 * 0.5
    )


def test_gate_batch_loss_hand_computed():
    # one expert (eta given), 3 samples, K=2 groups; weights self-normalised
    eta = torch.tensor([[0.7, 0.2, 0.1, 0.0], [0.1, 0.1, 0.6, 0.2], [0.25, 0.25, 0.25, 0.25]])
    y = torch.tensor([0, 2, 3])
    w = torch.tensor([2.0, 1.0, 1.0])
    alpha = torch.tensor([1.2, 0.8])
    mu = torch.tensor([0.3, 0.0])
    beta = torch.tensor([0.5, 0.5])
    lam = torch.tensor([0.4, 1.5])
    c, tau = 0.2, 3.0
    g = torch.as_tensor(G4)
    loss, cons, _ = gate_batch_loss(eta, y, w, alpha, mu, beta, lam, c, tau, g)
    # independent numpy computation
    e = eta.numpy().astype(np.float64)
    u = 2 * 0.5 / np.array([1.2, 0.8])
    uy = u[G4]
    m = (e * uy).max(1) - (e * (uy - np.array([0.3, 0.0])[G4])).sum(1) + c
    s = 1 / (1 + np.exp(-tau * m))
    wn = np.array([0.5, 0.25, 0.25])
    gy = G4[[0, 2, 3]]
    ce = -np.log(e[[0, 1, 2], [0, 2, 3]])
    sel = (wn * s * u[gy] * ce).sum()
    rej = c * (wn * (1 - s)).sum()
    acc_k = 2 * np.array([(wn * s * (gy == k)).sum() for k in range(2)])
    exp_cons = np.array([1.2, 0.8]) - acc_k
    expected = sel + rej + (np.array([0.4, 1.5]) * exp_cons).sum()
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    np.testing.assert_allclose(cons.numpy(), exp_cons, rtol=1e-5)
    # the gate entropy term is added with its weight: uniform weights over 2 experts -> log 2
    gw = torch.full((3, 2), 0.5)
    loss2, _, parts = gate_batch_loss(
        eta, y, w, alpha, mu, beta, lam, c, tau, g, gate_w=gw, lambda_ent=0.1
    )
    assert float(loss2) == pytest.approx(expected + 0.1 * math.log(2), rel=1e-5)
    assert parts["entropy"] == pytest.approx(math.log(2), rel=1e-6)


def test_in_memory_source_shuffles_per_epoch_and_covers_all():
    post = np.random.default_rng(0).dirichlet(np.ones(4), size=(50, 1)).astype(np.float32)
    y = np.arange(50) % 4
    src = InMemorySource(post, y, None, batch_size=16, seed=3)
    assert len(src) == 4
    ys0 = torch.cat([b[1] for b in src.iter_epoch(0)])
    ys1 = torch.cat([b[1] for b in src.iter_epoch(1)])
    ys0_again = torch.cat([b[1] for b in src.iter_epoch(0)])
    assert sorted(ys0.tolist()) == sorted(y.tolist())
    assert torch.equal(ys0, ys0_again)
    assert not torch.equal(ys0, ys1)
    p, yb, wb = next(iter(src.iter_epoch(0)))
    assert p.dtype == torch.float32 and yb.dtype == torch.long and wb.dtype == torch.float32
    assert p.shape == (16, 1, 4)


# ------------------------------------------------------------------ divergence


class _NaNAtEpoch:
    """Wraps a source and poisons the posteriors from epoch ``bad`` on."""

    def __init__(self, inner, bad: int):
        self.inner, self.bad = inner, bad

    def iter_epoch(self, epoch):
        for p, y, w in self.inner.iter_epoch(epoch):
            if epoch >= self.bad:
                p = p.clone()
                p[0, 0, 0] = float("nan")
            yield p, y, w


def test_nan_posteriors_raise_gate_diverged():
    post, y = make_two_expert_problem(300, 0)
    val = (post[:100], y[:100], None)
    recipe = GateRecipe(epochs=5, tau_warmup_epochs=2, hidden=(8,))
    src = _NaNAtEpoch(InMemorySource(post, y, None, 128, 0), bad=2)
    with pytest.raises(GateDiverged) as info:
        train_gate(src, val, G4, recipe)
    err = info.value
    assert err.epoch == 2
    assert "epoch 2" in str(err)
    assert err.last_finite["epoch"] == 1
    assert all(np.isfinite(err.last_finite["alpha"])) and err.last_finite["mu"][-1] == 0.0
    # poisoned from the start: nothing finite from training yet, still a clean error
    bad = post.copy()
    bad[5, 1, 2] = np.inf
    with pytest.raises(GateDiverged, match="epoch 0"):
        train_gate(InMemorySource(bad, y, None, 512, 0), val, G4, recipe)


def test_huge_learning_rate_diverges_or_stays_finite():
    """lr 1e6: either a GateDiverged or finite results, never silent NaN."""
    post, y = make_two_expert_problem(400, 1)
    recipe = GateRecipe(epochs=4, tau_warmup_epochs=1, lr_gate=1e6, lr_alpha_mu=1e6, hidden=(8,))
    try:
        res = train_gate(InMemorySource(post, y, None, 64, 0), (post, y, None), G4, recipe)
    except GateDiverged as err:
        assert "epoch" in str(err)
    else:
        assert np.all(np.isfinite(res.alpha)) and np.all(np.isfinite(res.mu))
        assert all(bool(torch.isfinite(v).all()) for v in res.gate_state.values())


# ------------------------------------------------------------------ training runs


def _val_objective(res, post, y) -> float:
    """Hard-rule objective recomputed from the result's own helpers (uniform weights)."""
    pred, acc = res.predict(post)
    cov, _, gerr = hard_rule_group_stats(pred, acc, y, None, G4, 2)
    return selective_objective(res.beta, gerr, res.recipe.c, cov)  # res.c is the rule's threshold


@pytest.fixture(scope="module")
def small_runs():
    post, y = make_two_expert_problem(4000, 0)
    pv, yv = make_two_expert_problem(2000, 1)
    # The project recipe except: 25 epochs, 8 warm-up epochs, c=0.1, a smaller gate.
    common = dict(c=0.1, epochs=25, tau_warmup_epochs=8, hidden=(32, 16))
    runs = {}
    for frozen in (False, True):
        recipe = GateRecipe(frozen_uniform_gate=frozen, **common)
        src = InMemorySource(post, y, None, recipe.batch_size, 0)
        runs[frozen] = train_gate(src, (pv, yv, None), G4, recipe)
    return post, y, pv, yv, runs


def test_small_run_is_finite_and_gauged(small_runs):
    post, y, pv, yv, runs = small_runs
    res = runs[False]
    assert np.all(np.isfinite(res.alpha)) and np.all(res.alpha >= res.recipe.alpha_min)
    assert np.all(np.isfinite(res.mu)) and res.mu.shape == (2,) and res.mu[-1] == 0.0
    assert all(mu[-1] == 0.0 for mu in res.history["mu"])
    lam = np.asarray(res.history["lambda"])
    assert lam.min() >= 0.0 and lam.max() <= res.recipe.lambda_max
    # early stopping never chose a warm-up epoch
    assert res.chosen_epoch >= res.recipe.tau_warmup_epochs
    assert res.tau == res.recipe.tau_end
    # the result's helpers reproduce the val_small numbers logged at the chosen epoch
    obj = _val_objective(res, pv, yv)
    assert obj == pytest.approx(res.history["objective"][res.chosen_epoch], abs=1e-6)
    assert res.history["objective"][res.chosen_epoch] == pytest.approx(
        min(res.history["objective"][res.recipe.tau_warmup_epochs :])
    )
    eta = res.mixture(pv[:50])
    np.testing.assert_allclose(eta.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(res.weights(pv[:50]).sum(1), 1.0, atol=1e-5)


def test_gate_beats_frozen_uniform_gate(small_runs):
    post, y, pv, yv, runs = small_runs
    gate, frozen = runs[False], runs[True]
    assert frozen.gate_state is None
    np.testing.assert_allclose(frozen.weights(pv[:5]), 0.5)
    obj_gate = gate.history["objective"][gate.chosen_epoch]
    obj_frozen = frozen.history["objective"][frozen.chosen_epoch]
    print(f"val objective: gate {obj_gate:.4f}  frozen uniform {obj_frozen:.4f}")
    assert obj_gate <= obj_frozen + 0.01


def test_alpha_matches_K_times_accepted_group_mass_on_train(small_runs):
    post, y, pv, yv, runs = small_runs
    res = runs[False]
    pred, acc = res.predict(post)
    K = 2
    P = np.array([(acc & (G4[y] == k)).mean() for k in range(K)])  # lt view: uniform weights
    gap = np.abs(res.alpha - K * P)
    print(f"alpha {res.alpha}  K*P(accept, g=k) {K * P}  gap {gap}")
    assert gap.max() <= 0.02


def test_early_stopping_waits_for_warmup_and_worst_mode_moves_beta():
    post, y = make_two_expert_problem(600, 2)
    pv, yv = make_two_expert_problem(300, 3)
    seen = []
    recipe = GateRecipe(
        c=0.1, epochs=30, tau_warmup_epochs=6, patience=1, beta_mode="worst", hidden=(8,)
    )
    res = train_gate(
        InMemorySource(post, y, None, 128, 0),
        (pv, yv, np.ones(len(yv))),
        G4,
        recipe,
        progress=lambda e, n, st: seen.append((e, n, st["objective"])),
    )
    n_run = len(res.history["epoch"])
    assert res.chosen_epoch >= 6 and n_run >= 7 + 1  # not stopped before warm-up + patience
    assert [s[0] for s in seen] == list(range(1, n_run + 1)) and seen[0][1] == 30
    betas = np.asarray(res.history["beta"])
    np.testing.assert_allclose(betas.sum(1), 1.0)
    np.testing.assert_allclose(betas[0], [0.5, 0.5])
    errs = np.asarray(res.history["group_error"])
    # beta of epoch t+1 is the EG step of beta_t with the errors of epoch t
    np.testing.assert_allclose(betas[1], eg_step(betas[0], errs[0], 1.0))
    np.testing.assert_allclose(res.beta, betas[res.chosen_epoch])


def test_hard_routing_uses_one_expert_per_sample():
    post, y = make_two_expert_problem(400, 4)
    recipe = GateRecipe(epochs=3, tau_warmup_epochs=1, hard_routing=True, hidden=(8,))
    res = train_gate(InMemorySource(post, y, None, 128, 0), (post, y, None), G4, recipe)
    w = res.weights(post[:40])
    np.testing.assert_array_equal(np.sort(w, axis=1), np.tile([0.0, 1.0], (40, 1)))
    eta = res.mixture(post[:40])
    np.testing.assert_allclose(eta, post[np.arange(40), w.argmax(1)], atol=1e-6)


# ------------------------------------------------------------------ slow: paper optimum


def _single_expert_problem(n: int, seed: int):
    """Known eta (E=1, C=10, long-tailed, groups {0,1,2} / {3..9}); y ~ Cat(eta)."""
    rng = np.random.default_rng(seed)
    C = 10
    prior = np.exp(-0.5 * np.arange(C))
    prior /= prior.sum()
    k = rng.choice(C, size=n, p=prior)
    z = 3.0 * np.eye(C)[k] + rng.normal(0.0, 1.0, (n, C)) + np.log(prior)
    eta = np.exp(z - z.max(1, keepdims=True))
    eta /= eta.sum(1, keepdims=True)
    u = rng.random(n)[:, None]
    y = np.minimum((u > eta.cumsum(1)).sum(1), C - 1)
    g = np.array([0] * 3 + [1] * 7)
    return eta.astype(np.float32), y, g


def _balanced_error_at_coverage(eta, y, g, alpha, mu, coverage):
    """Group-balanced error (lt view, uniform weights) after shifting c so coverage is exact."""
    n = len(y)
    n_rej = int(round((1 - coverage) * n))
    m = plugin_margin(eta, alpha, mu, 0.0, g)
    thr = np.partition(m, n_rej)[n_rej]  # accept the n - n_rej largest margins
    acc = m >= thr
    pred = plugin_predict(eta, alpha, g)
    return hard_rule_group_stats(pred, acc, y, None, g, 2)[2].mean()


@pytest.mark.slow
def test_trained_rule_close_to_brute_force_optimum_at_coverage_08():
    eta, y, g = _single_expert_problem(20_000, 0)
    target = 0.8
    # Brute force: rules are invariant to (alpha, mu, c) -> (s alpha, mu / s, c / s) up to the
    # sign of the margin, so alpha = (r, 1), mu = (m, 0) and c chosen for coverage 0.8 span all.
    best = math.inf
    for r in np.exp(np.linspace(math.log(0.1), math.log(20.0), 41)):
        for m in np.linspace(-2.0, 2.0, 81):
            be = _balanced_error_at_coverage(
                eta, y, g, np.array([r, 1.0]), np.array([m, 0.0]), target
            )
            best = min(best, be)
    chow = _balanced_error_at_coverage(eta, y, g, np.ones(2), np.zeros(2), target)
    # Train the rule (E=1, frozen uniform gate) with the threshold at the training quantile for
    # coverage 0.8 (the fixed point + stationarity update; see gate_train's module docstring).
    post = eta[:, None, :]
    recipe = GateRecipe(
        c=0.1, epochs=3, frozen_uniform_gate=True, tau_warmup_epochs=1, target_coverage=target
    )
    res = train_gate(InMemorySource(post, y, None, 256, 0), (post, y, None), g, recipe)
    c, cov = res.c, res.history["coverage"][res.chosen_epoch]
    trained = _balanced_error_at_coverage(eta, y, g, res.alpha, res.mu, target)
    print(
        f"balanced error @0.8: brute-force {best:.4f}  Chow {chow:.4f}  trained {trained:.4f} "
        f"(c={c}, trained coverage {cov:.3f}, alpha {res.alpha}, mu {res.mu})"
    )
    assert trained <= best + 0.01


def test_uniform_gate_matches_cs_plugin_on_the_same_mixture():
    """Two solvers, one optimum: the gate trainer with a frozen uniform gate and the CS-plug-in
    baseline (Algorithm 1 on the uniform mixture) reach the same balanced error at coverage 0.8."""
    from argse_cli.baselines import fit_cs_plugin

    post, y = make_two_expert_problem(4000, 5)
    pv, yv = make_two_expert_problem(2000, 6)
    recipe = GateRecipe(epochs=3, tau_warmup_epochs=1, frozen_uniform_gate=True, target_coverage=0.8)
    res = train_gate(InMemorySource(post, y, None, 256, 0), (pv, yv, None), G4, recipe)
    eta_fit, eta_val = post.mean(1), pv.mean(1)
    fit = fit_cs_plugin(eta_fit, y, None, G4, eta_sel=eta_val, y_sel=yv, w_sel=None, target_coverage=0.8)

    def bal_err_at(margin, pred, cov=0.8):
        from argse_cli.metrics import rc_curve

        return rc_curve(margin, pred, yv, G4, None, coverages=[cov]).balanced_risk[0]

    e_gate = bal_err_at(res.margin(pv), res.predict(pv)[0])
    e_pi = bal_err_at(fit.rule.margin(eta_val), fit.rule.predict(eta_val))
    print(f"balanced error @0.8 on val: uniform-gate trainer {e_gate:.4f}  CS-plug-in {e_pi:.4f}")
    assert abs(e_gate - e_pi) <= 0.01
