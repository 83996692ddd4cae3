"""Training the AR-GSE gate: the mixture ``eta(x) = sum_e w_e(x) p_e(x)`` of the calibrated expert
posteriors ``p`` [B, E, C] (already on the training prior), with ``w = softmax(gate(features))``.

The rule (alpha, mu[, beta]) that turns eta into predictions and rejections is NOT chosen here: the
stage fits it on the trained mixture with the one core (:mod:`argse_cli.core.plugin_fit`, Algorithms
1 and 2), exactly as every baseline's rule is fitted. Two gate objectives (``gate_loss``):

**"nll"** (default) -- the weighted negative log-likelihood

    L = sum_i w_i (-log eta_{y_i}(x_i)) / sum_i w_i  +  lambda_ent * mean_i H(w(x_i)),

with ``w_i`` the training-prior weights (``w_lt``): a proper scoring rule, so eta is trained towards
P_train(y | x), the posterior for which Theorem 1 makes the plug-in rule Bayes-optimal. The epoch is
chosen by the same NLL on val_small (the rule's lambda is chosen by another criterion: the
selective objective at each coverage).

**"selective"** -- the primal-dual Lagrangian of the AR-GSE design, per batch (weights of the view
self-normalised in the batch, ``s_i = sigmoid(tau m(x_i))``, ``u_k = K beta_k / alpha_k``):

    L = sum_i w_i s_i u_[g(y_i)] CE_i + c sum_i w_i (1 - s_i)
        + sum_k lambda_k (alpha_k - K sum_i w_i s_i 1{g(y_i) = k}) + lambda_ent * mean_i H(w(x_i)),

Adam on the gate and on (alpha, mu_0..mu_[K-2]) (mu_[K-1] = 0 is the gauge), then
``alpha <- max(alpha, alpha_min)`` and the dual step ``lambda <- clip(lambda + rho cons, 0,
lambda_max)`` after every batch; ``alpha <- alpha_ema alpha_epoch_start + (1 - alpha_ema) alpha``
after every epoch; tau from tau_start (epoch 0) linearly to tau_end (epoch tau_warmup_epochs);
``beta <- EG(beta, e, xi)`` after every epoch for ``beta = worst`` (e: the hard rule's group
errors on val_small). The epoch is chosen by the soft selective risk (the first two terms of L) on
val_small.

Training stops when the criterion has not improved for ``patience`` epochs (announced).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from argse_cli.core.gate import (
    GatingNet,
    build_gating_features,
    feature_dim,
    mixture_posterior,
    straight_through_top1,
)
from argse_cli.core.plugin_fit import eg_step
from argse_cli.core.rule import acceptance_prob, group_weights_u, plugin_margin, plugin_predict
from argse_cli.errors import ArgseError

__all__ = [
    "BatchSource",
    "GateDiverged",
    "GateFit",
    "GateModel",
    "InMemorySource",
    "dual_update",
    "hard_rule_group_stats",
    "nll_loss",
    "selective_lagrangian",
    "tau_schedule",
    "train_gate",
]

_CE_EPS = 1e-12


class GateDiverged(ArgseError):
    """NaN/inf in the loss or the parameters; names the epoch and the last finite values."""

    def __init__(self, epoch: int, last_finite: dict[str, Any]):
        self.epoch = int(epoch)
        self.last_finite = dict(last_finite)
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in self.last_finite.items()) or "none"
        super().__init__(
            "train-gate",
            f"loss or parameters became NaN/inf at epoch {self.epoch} (last finite values: {shown})",
            "lower lr_gate (and lr_alpha_mu / rho for gate_loss=selective) and check the expert posteriors",
        )


def _fmt(v: Any) -> str:
    if isinstance(v, (list, tuple, np.ndarray)):
        return "[" + ", ".join(f"{float(x):.4g}" for x in np.ravel(v)) + "]"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# --------------------------------------------------------------------------------- pure math


def tau_schedule(epoch: int, tau_start: float, tau_end: float, warmup_epochs: int) -> float:
    """tau(epoch) = tau_start + (tau_end - tau_start) * min(epoch / warmup_epochs, 1) (0-based)."""
    if warmup_epochs <= 0:
        return float(tau_end)
    return float(tau_start + (tau_end - tau_start) * min(max(epoch, 0) / warmup_epochs, 1.0))


def dual_update(lam: Any, cons: Any, rho: float, lambda_max: float) -> Any:
    """lambda <- clip(lambda + rho * cons, 0, lambda_max) (numpy or torch, same kind out)."""
    if isinstance(lam, torch.Tensor):
        return (lam + rho * torch.as_tensor(cons, dtype=lam.dtype)).clamp(0.0, lambda_max)
    return np.clip(np.asarray(lam, np.float64) + rho * np.asarray(cons), 0.0, lambda_max)


def hard_rule_group_stats(pred: Any, accept: Any, y: Any, w: Any, class_to_group: Any,
                          num_groups: int) -> tuple[float, np.ndarray, np.ndarray]:
    """(coverage, group coverage [K], group error [K]) of a hard rule, weighted by ``w`` (float64);
    e_k = 1.0 when no sample of group k is accepted."""
    pred, a = np.asarray(pred).astype(np.int64), np.asarray(accept).astype(bool)
    y = np.asarray(y).astype(np.int64)
    w = np.ones(len(y)) if w is None else np.asarray(w, dtype=np.float64)
    g = np.asarray(class_to_group, dtype=np.int64)[y]
    wa = w * a
    tot = np.bincount(g, weights=w, minlength=num_groups)
    acc = np.bincount(g, weights=wa, minlength=num_groups)
    err = np.bincount(g, weights=wa * (pred != y), minlength=num_groups)
    coverage = float(wa.sum() / w.sum()) if w.sum() > 0 else 0.0
    gcov = np.where(tot > 0, acc / np.where(tot > 0, tot, 1.0), 0.0)
    gerr = np.where(acc > 0, err / np.where(acc > 0, acc, 1.0), 1.0)
    return coverage, gcov, gerr


def _ce(eta: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -eta.gather(1, y[:, None]).squeeze(1).clamp_min(_CE_EPS).log()


def _routing_entropy(gate_w: torch.Tensor | None) -> torch.Tensor:
    if gate_w is None:
        return torch.zeros(())
    return -(gate_w * gate_w.clamp_min(_CE_EPS).log()).sum(-1).mean()


def nll_loss(eta: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_i w_i (-log eta_{y_i}) / sum_i w_i (eta clamped at 1e-12)."""
    wn = w.float() / w.float().sum().clamp_min(1e-30)
    return (wn * _ce(eta, y)).sum()


def selective_lagrangian(eta: torch.Tensor, y: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor,
                         mu: torch.Tensor, beta: torch.Tensor, lam: torch.Tensor, c: float, tau: float,
                         class_to_group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """(L, cons [K] detached, parts): the selective Lagrangian of the module docstring (without
    the routing-entropy term). ``cons_k = alpha_k - K sum_i w_i s_i 1{g(y_i)=k}``, w normalised."""
    K = alpha.shape[0]
    wn = w.float() / w.float().sum().clamp_min(1e-30)
    g_y = class_to_group[y]
    s = acceptance_prob(plugin_margin(eta, alpha, mu, c, class_to_group, beta), tau)
    u = group_weights_u(alpha, beta)
    sel = (wn * s * u[g_y] * _ce(eta, y)).sum()
    rej = c * (wn * (1.0 - s)).sum()
    cons = alpha - K * ((wn * s) @ torch.nn.functional.one_hot(g_y, K).to(s.dtype))
    constraint = (lam * cons).sum()
    parts = {"sel": float(sel.detach()), "rej": float(rej.detach()), "constraint": float(constraint.detach()),
             "soft_coverage": float((wn * s).sum().detach())}
    return sel + rej + constraint, cons.detach(), parts


# --------------------------------------------------------------------------------- data sources


@runtime_checkable
class BatchSource(Protocol):
    """Training batches: ``iter_epoch(epoch)`` yields (post [B, E, C] float32, y [B] long, w [B]
    float32); ``post`` calibrated expert posteriors on the training prior, ``w`` per-sample weights."""

    def iter_epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]: ...


class InMemorySource:
    """In-memory :class:`BatchSource`; reshuffles every epoch with seed (seed, epoch)."""

    def __init__(self, posteriors: Any, y: Any, w: Any = None, batch_size: int = 256, seed: int = 0):
        self.post = torch.as_tensor(np.asarray(posteriors)).float()
        if self.post.ndim != 3:
            raise ValueError(f"posteriors must be [N, E, C], got {tuple(self.post.shape)}")
        n = self.post.shape[0]
        self.y = torch.as_tensor(np.asarray(y)).long()
        self.w = torch.ones(n) if w is None else torch.as_tensor(np.asarray(w)).float()
        if self.y.shape != (n,) or self.w.shape != (n,):
            raise ValueError("y and w must be [N] with N = posteriors.shape[0]")
        self.batch_size, self.seed = int(batch_size), int(seed)

    @property
    def n_rows(self) -> int:
        return int(self.post.shape[0])

    def iter_rows(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(post, y, w) in the stored order, in blocks of 4096 rows."""
        for i in range(0, self.n_rows, 4096):
            yield self.post[i : i + 4096], self.y[i : i + 4096], self.w[i : i + 4096]

    def iter_epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(epoch))
        perm = torch.randperm(self.post.shape[0], generator=gen)
        for i in range(0, len(perm), self.batch_size):
            idx = perm[i : i + self.batch_size]
            yield self.post[idx], self.y[idx], self.w[idx]


class NLLCache:
    """What the NLL objective needs of each training row, computed in ONE pass over the rows: the
    gate features (they do not depend on the gate's parameters) and p_e(y | x) for the row's label
    (the mixture's likelihood is eta_y = sum_e w_e(x) p_e(y | x)). Kept in temporary memory-mapped
    files (file-backed pages: the resident memory stays flat in N); every epoch then reads them in
    blocks of ``block_rows`` in a shuffled block order, rows shuffled within a block -- instead of
    re-reading and re-calibrating the [N, E, C] posteriors.

    ``source`` needs ``n_rows`` and ``iter_rows()`` (post, y, w) in the stored order."""

    def __init__(self, source: Any, block_rows: int = 4096):
        import tempfile

        self.n = int(source.n_rows)
        self.block_rows = int(block_rows)
        self._dir = tempfile.TemporaryDirectory(prefix="argse-nll-")
        at = 0
        self.feats = self.py = None
        for post_buf, y_buf, w_buf in source.iter_rows():
            for i in range(0, len(y_buf), 1024):  # the features' temporaries stay 1024-row sized
                post, y, w = post_buf[i : i + 1024].float(), y_buf[i : i + 1024], w_buf[i : i + 1024]
                f = build_gating_features(post)
                py = post[torch.arange(len(y)), :, y.long()]
                # a NaN anywhere in a row's posteriors makes its entropy NaN; an inf makes p NaN
                ok = torch.isfinite(f).all(1) & torch.isfinite(py).all(1)
                if not bool(ok.all()):
                    bad = at + int(torch.nonzero(~ok)[0])
                    raise ArgseError("train-gate", f"training row {bad} has non-finite expert posteriors",
                                     "recompute the export / check the experts' logits for NaN or inf")
                if self.feats is None:
                    self.feats = self._mm("feats", np.float32, (self.n, f.shape[1]))
                    self.py = self._mm("py", np.float32, (self.n, py.shape[1]))
                    self.w = self._mm("w", np.float32, (self.n,))
                b = len(y)
                self.feats[at : at + b], self.py[at : at + b] = f.numpy(), py.numpy()
                self.w[at : at + b] = w.numpy()
                at += b
        if at != self.n or self.feats is None:
            raise ValueError(f"the training source yielded {at} rows, not {self.n}")

    def _mm(self, name: str, dtype: Any, shape: tuple) -> np.ndarray:
        return np.lib.format.open_memmap(f"{self._dir.name}/{name}.npy", mode="w+", dtype=dtype, shape=shape)

    def iter_epoch(self, epoch: int, batch_size: int, seed: int):
        """(features, p_y, w) batches: blocks in a shuffled order, rows shuffled within a block."""
        rng = np.random.default_rng([seed, epoch])
        starts = np.arange(0, self.n, self.block_rows)
        for a in starts[rng.permutation(len(starts))]:
            b = min(self.n, a + self.block_rows)
            blk = [torch.from_numpy(np.array(x[a:b])) for x in (self.feats, self.py, self.w)]
            perm = torch.from_numpy(rng.permutation(b - a))
            for i in range(0, b - a, batch_size):
                idx = perm[i : i + batch_size]
                yield tuple(t[idx] for t in blk)

    def close(self) -> None:
        self._dir.cleanup()


# --------------------------------------------------------------------------------- the model


@dataclass
class GateModel:
    """The trained mixture: ``gate`` None is the frozen uniform gate w = 1/E; ``hard`` routes by
    top-1 (straight-through in training, one-hot at inference)."""

    gate: GatingNet | None
    num_experts: int
    hard: bool = False

    def weights_t(self, post: torch.Tensor) -> torch.Tensor:
        if self.gate is None:
            return torch.full((post.shape[0], self.num_experts), 1.0 / self.num_experts, device=post.device)
        soft = self.gate(build_gating_features(post))
        return straight_through_top1(soft) if self.hard else soft

    def _batched(self, post: Any, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 batch_size: int = 4096) -> np.ndarray:
        p_all = post if isinstance(post, torch.Tensor) else torch.as_tensor(np.asarray(post))
        if self.gate is not None:
            self.gate.eval()
        outs = []
        with torch.no_grad():
            for i in range(0, p_all.shape[0], batch_size):
                p = p_all[i : i + batch_size].float()
                outs.append(fn(p, self.weights_t(p)).cpu())
        return torch.cat(outs).numpy()

    def weights(self, post: Any) -> np.ndarray:
        """Gate weights [N, E] float32."""
        return self._batched(post, lambda p, gw: gw)

    def mixture(self, post: Any) -> np.ndarray:
        """eta = sum_e w_e p_e [N, C] float32 (for the uniform gate: the same einsum with w = 1/E)."""
        return self._batched(post, lambda p, gw: mixture_posterior(gw, p))


@dataclass
class GateFit:
    """Result of :func:`train_gate` at the chosen epoch. ``rule_state`` holds the selective
    recipe's learned (alpha, mu, lambda, beta, tau) at that epoch (None for the NLL recipe)."""

    gate_state: dict[str, torch.Tensor] | None
    in_dim: int
    num_experts: int
    chosen_epoch: int
    criterion: str
    history: dict[str, list]
    stopped_early: bool
    rule_state: dict[str, Any] | None = None
    model: GateModel | None = field(default=None, repr=False)


# --------------------------------------------------------------------------------- training


def _val_criterion(model: GateModel, post_val: torch.Tensor, y_val: np.ndarray, w_val: np.ndarray,
                   cfg: Any, rule: dict | None, g_t: torch.Tensor) -> tuple[float, dict]:
    """The epoch-selection criterion on val_small: the NLL (nll recipe) or the soft selective risk
    sum_i w_i s_i u CE_i + c sum_i w_i (1 - s_i) at the current (alpha, mu, beta, tau) (selective)."""
    eta = torch.from_numpy(model.mixture(post_val))
    y = torch.from_numpy(y_val)
    w = torch.from_numpy(w_val).float()
    if rule is None:
        return float(nll_loss(eta, y, w)), {}
    with torch.no_grad():
        _, _, parts = selective_lagrangian(eta, y, w, rule["alpha"], rule["mu"], rule["beta_t"],
                                           torch.zeros_like(rule["alpha"]), cfg.c, rule["tau"], g_t)
        m = plugin_margin(eta, rule["alpha"], rule["mu"], cfg.c, g_t, rule["beta_t"])
        pred = plugin_predict(eta, rule["alpha"], g_t, rule["beta_t"])
    K = int(rule["alpha"].shape[0])
    cov, gcov, gerr = hard_rule_group_stats(pred.numpy(), (m >= 0).numpy(), y_val, w_val, g_t.numpy(), K)
    return parts["sel"] + parts["rej"], {"coverage": cov, "group_coverage": gcov.tolist(),
                                         "group_error": gerr.tolist()}


def train_gate(source: BatchSource, val: tuple[Any, Any, Any], class_to_group: Any, cfg: Any,
               progress: Callable[..., None] | None = None, device: str = "cpu") -> GateFit:
    """Train the gate by ``cfg.gate_loss`` (a resolved :class:`~argse_cli.config.TrainGateConfig`);
    ``val = (post [Nv, E, C], y [Nv], w [Nv])`` on val_small (``w``: training-prior weights for the
    NLL, the view's weights for the selective recipe). Returns the chosen epoch's gate."""
    dev = torch.device(device)
    post_val = torch.as_tensor(np.asarray(val[0])).float()
    y_val = np.asarray(val[1]).astype(np.int64)
    w_val = np.ones(len(y_val)) if val[2] is None else np.asarray(val[2], np.float64)
    if post_val.ndim != 3:
        raise ValueError(f"val posteriors must be [Nv, E, C], got {tuple(post_val.shape)}")
    if not bool(torch.isfinite(post_val).all()):
        raise ArgseError("val posteriors", "contain NaN/inf", "recompute the val_small posteriors")
    _, E, C = post_val.shape
    g_np = np.asarray(class_to_group, np.int64)
    if g_np.shape != (C,):
        raise ValueError(f"class_to_group must have length C={C}, got {g_np.shape}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed or 0)
        gate = None if cfg.uniform_gate else GatingNet(feature_dim(E), E, cfg.hidden, cfg.dropout).to(dev)
        model = GateModel(gate, E, cfg.hard_routing)
        if gate is None:
            fit = GateFit(None, feature_dim(E), E, 0, "none (frozen uniform gate)", {}, False, None, model)
        elif cfg.gate_loss == "nll":
            fit = _train_nll(source, model, (post_val, y_val, w_val), cfg, progress, dev)
        else:
            fit = _train_selective(source, model, (post_val, y_val, w_val), g_np, cfg, progress, dev)
    return fit


def _run(model: GateModel, cfg: Any, epochs: int, step_epoch: Callable[[int], dict],
         evaluate: Callable[[int], tuple[float, dict]], progress: Any, extra_state: Callable[[], dict] | None = None):
    """The epoch loop both recipes share: train one epoch, score the criterion on val_small, keep
    the best state, stop after ``patience`` epochs without improvement (announced)."""
    history: dict[str, list] = {}
    best, best_val, stopped = None, math.inf, False
    for epoch in range(epochs):
        row = {"epoch": epoch, **step_epoch(epoch)}
        crit, more = evaluate(epoch)
        row.update(val_criterion=crit, **more)
        for k, v in row.items():
            history.setdefault(k, []).append(v)
        if not math.isfinite(crit):
            raise GateDiverged(epoch, {"val_criterion": crit})
        if crit < best_val - 1e-12:
            best_val = crit
            best = {"epoch": epoch, "gate_state": copy.deepcopy(model.gate.state_dict()),
                    "extra": extra_state() if extra_state else None}
        if progress is not None:
            progress(epoch + 1, epochs, {"loss": row.get("loss"), "val": crit})
        if best is not None and epoch - best["epoch"] >= cfg.patience and epoch + 1 < epochs:
            stopped = True
            if progress is not None and hasattr(progress, "log"):
                progress.log(f"early stop at epoch {epoch + 1}/{epochs}: val criterion not improved "
                             f"for {cfg.patience} epochs (best epoch {best['epoch'] + 1})")
            break
    assert best is not None  # the first finite epoch is always kept
    model.gate.load_state_dict(best["gate_state"])
    state = {k: v.detach().cpu() for k, v in best["gate_state"].items()}
    return state, best["epoch"], history, stopped, best["extra"]


def _check(loss: torch.Tensor, params: list[torch.Tensor], epoch: int, last: dict) -> None:
    if not bool(torch.isfinite(loss)) or not all(bool(torch.isfinite(p).all()) for p in params):
        raise GateDiverged(epoch, last)


def _train_nll(source: BatchSource, model: GateModel, val: tuple, cfg: Any, progress: Any,
               dev: torch.device) -> GateFit:
    opt = torch.optim.Adam(model.gate.parameters(), lr=cfg.lr_gate)
    last: dict[str, Any] = {"epoch": None}
    cache = NLLCache(source)
    post_val, y_val, w_val = val
    feats_val = build_gating_features(post_val)
    py_val = post_val[torch.arange(len(y_val)), :, torch.from_numpy(y_val)]
    w_val_t = torch.from_numpy(np.asarray(w_val)).float()

    def step_epoch(epoch: int) -> dict:
        nonlocal last
        model.gate.train()
        tot, n = 0.0, 0
        for f, py, w in cache.iter_epoch(epoch, cfg.batch_size, cfg.seed or 0):
            soft = model.gate(f.to(dev))
            gw = straight_through_top1(soft) if model.hard else soft
            loss = _nll_of(gw, py.to(dev), w.to(dev)) + cfg.lambda_ent * _routing_entropy(soft)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            _check(loss, list(model.gate.parameters()), epoch, last)
            last = {"epoch": epoch, "loss": float(loss.detach())}
            tot, n = tot + float(loss.detach()), n + 1
        if n == 0:
            raise ValueError(f"the training source yielded no batch at epoch {epoch}")
        return {"loss": tot / n}

    def evaluate(epoch: int) -> tuple[float, dict]:
        model.gate.eval()
        with torch.no_grad():
            soft = model.gate(feats_val)
            gw = straight_through_top1(soft) if model.hard else soft
            return float(_nll_of(gw, py_val, w_val_t)), {}

    try:
        state, ep, hist, stopped, _ = _run(model, cfg, cfg.epochs, step_epoch, evaluate, progress)
    finally:
        cache.close()
    return GateFit(state, model.gate.in_dim, model.num_experts, ep, "val_small NLL (w_lt)", hist,
                   stopped, None, model)


def _nll_of(gw: torch.Tensor, py: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_i w_i (-log eta_{y_i}) / sum_i w_i with eta_y = sum_e w_e p_e(y | x) (eta clamped at 1e-12):
    :func:`nll_loss` computed from the label's column only."""
    wn = w.float() / w.float().sum().clamp_min(1e-30)
    return -(wn * (gw * py).sum(-1).clamp_min(_CE_EPS).log()).sum()


def _train_selective(source: BatchSource, model: GateModel, val: tuple, g_np: np.ndarray, cfg: Any,
                     progress: Any, dev: torch.device) -> GateFit:
    K = int(g_np.max()) + 1
    g_t = torch.as_tensor(g_np, device=dev)
    prior = np.bincount(g_np[val[1]], weights=val[2], minlength=K) / val[2].sum()
    alpha = torch.nn.Parameter(torch.as_tensor(np.maximum(K * prior, cfg.alpha_min), dtype=torch.float32))
    mu_free = torch.nn.Parameter(torch.zeros(K - 1))
    zero = torch.zeros(1)
    lam = torch.zeros(K)
    beta = np.full(K, 1.0 / K)
    opt = torch.optim.Adam([{"params": model.gate.parameters(), "lr": cfg.lr_gate},
                            {"params": [alpha, mu_free], "lr": cfg.lr_alpha_mu}])
    last: dict[str, Any] = {"epoch": None}
    cur: dict[str, Any] = {}

    def rule_now(tau: float) -> dict:
        return {"alpha": alpha.detach().clone(), "mu": torch.cat([mu_free, zero]).detach(),
                "beta_t": torch.as_tensor(beta, dtype=torch.float32), "tau": tau}

    def step_epoch(epoch: int) -> dict:
        nonlocal lam, last
        tau = tau_schedule(epoch, cfg.tau_start, cfg.tau_end, cfg.tau_warmup_epochs)
        beta_t = torch.as_tensor(beta, dtype=torch.float32)
        alpha_start = alpha.detach().clone()
        model.gate.train()
        tot, cov, n = 0.0, 0.0, 0
        for post, y, w in source.iter_epoch(epoch):
            post, y, w = post.to(dev).float(), y.to(dev).long(), w.to(dev).float()
            soft = model.gate(build_gating_features(post))
            gw = straight_through_top1(soft) if model.hard else soft
            eta = mixture_posterior(gw, post)
            loss, cons, parts = selective_lagrangian(eta, y, w, alpha, torch.cat([mu_free, zero]), beta_t,
                                                     lam, cfg.c, tau, g_t)
            loss = loss + cfg.lambda_ent * _routing_entropy(soft)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                alpha.clamp_(min=cfg.alpha_min)
                lam = dual_update(lam, cons, cfg.rho, cfg.lambda_max)
            _check(loss, [alpha, mu_free, lam, *model.gate.parameters()], epoch, last)
            last = {"epoch": epoch, "loss": float(loss.detach()), "alpha": alpha.detach().tolist(),
                    "lambda": lam.tolist()}
            tot, cov, n = tot + float(loss.detach()), cov + parts["soft_coverage"], n + 1
        if n == 0:
            raise ValueError(f"the training source yielded no batch at epoch {epoch}")
        with torch.no_grad():
            alpha.copy_((cfg.alpha_ema * alpha_start + (1 - cfg.alpha_ema) * alpha).clamp_min(cfg.alpha_min))
        cur["rule"] = rule_now(tau)
        return {"loss": tot / n, "train_soft_coverage": cov / n, "tau": tau, "alpha": alpha.detach().tolist(),
                "mu": torch.cat([mu_free, zero]).detach().tolist(), "lambda": lam.tolist(), "beta": beta.tolist()}

    def evaluate(epoch: int) -> tuple[float, dict]:
        nonlocal beta
        crit, more = _val_criterion(model, val[0], val[1], val[2], cfg, cur["rule"], g_t)
        if cfg.beta == "worst":
            beta = eg_step(beta, more["group_error"], cfg.xi)
        return crit, more

    def extra() -> dict:
        r = cur["rule"]
        return {"alpha": r["alpha"].double().numpy(), "mu": r["mu"].double().numpy(), "lambda": lam.double().numpy(),
                "beta": r["beta_t"].double().numpy(), "tau": r["tau"]}

    state, ep, hist, stopped, rule_state = _run(model, cfg, cfg.epochs, step_epoch, evaluate, progress, extra)
    return GateFit(state, model.gate.in_dim, model.num_experts, ep, "val_small soft selective risk", hist,
                   stopped, rule_state, model)
