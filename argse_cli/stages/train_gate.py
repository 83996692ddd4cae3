"""Stage `train-gate`: gating network + primal-dual AR-GSE on tuneV, early stopping on val_small.

Training rows stream from the export artifact (fp16 logits, row-chunked): each epoch the chunk
order is shuffled, ``buffer_chunks`` chunks at a time are read, cast to float32, calibrated
(temperatures and prior shift applied at read time) and shuffled within the buffer. At most
``buffer_chunks`` chunks are resident. val_small (small) is read whole.

Artifact: ``gate.safetensors`` (absent for the frozen uniform gate), arrays alpha, mu, lambda,
beta (the chosen epoch), ``history.json`` (per-epoch trajectories: loss, coverage, per-group
coverage and error on val_small, alpha, mu, lambda, beta), meta: tau, c, chosen epoch and the
constraint residuals |alpha_k - K P(accept, g(y)=k)| on tuneV and val_small (target view).
"""

from __future__ import annotations

from typing import Any

STAGE = "train-gate"
VERSION = 5
CODE = (
    "stages/train_gate.py", "gate_train.py", "nn/gate.py", "rejector.py", "stages/calibrate.py",
)


class ZarrSource:
    """Streams (post [B,E,C] float32, y, w) from an export artifact with bounded memory.

    ``max_resident_rows`` records the most rows held at once (for the streaming test).
    """

    def __init__(self, export_art: Any, calib_art: Any, split: str, view: str, batch_size: int,
                 seed: int, buffer_chunks: int = 4, experts: Any = None):
        from .calibrate import log_prior

        self.exp, self.split, self.view = export_art, split, view
        self.batch_size, self.seed, self.buffer_chunks = batch_size, seed, buffer_chunks
        self.experts = experts
        self.log_pi = log_prior(export_art)
        self.shift = calib_art.array("shift")
        self.T = calib_art.array("temperature")
        if experts is not None:
            self.shift, self.T = self.shift[list(experts)], self.T[list(experts)]
        self.n_chunks = export_art.n_chunks(f"{split}/logits")
        self.n_rows = int(export_art.manifest["arrays"][f"{split}/logits"]["shape"][0])
        self.max_resident_rows = 0

    def _chunks(self, name: str, order: Any) -> Any:
        return self.exp.iter_chunks(f"{self.split}/{name}", order=order)

    def iter_epoch(self, epoch: int):
        import numpy as np
        import torch

        from .calibrate import apply_calibration

        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.n_chunks)
        wname = "w_lt" if self.view == "lt" else "w_bal"
        info = self.exp.manifest["arrays"][f"{self.split}/logits"]
        cr, dtype = int(info["chunk_rows"]), np.dtype(info["dtype"])
        for b in range(0, len(order), self.buffer_chunks):
            sel = order[b : b + self.buffer_chunks]
            # the selected chunks decoded straight into one buffer (no list + concatenate copy)
            f = np.empty((sum(min(cr, self.n_rows - int(i) * cr) for i in sel), *info["shape"][1:]), dtype)
            at = 0
            for _, blk in self._chunks("logits", sel):
                f[at : at + len(blk)] = blk
                at += len(blk)
            if self.experts is not None:
                f = f[:, list(self.experts)]
            post = torch.from_numpy(apply_calibration(f, self.log_pi, self.shift, self.T))
            del f
            y = torch.from_numpy(np.concatenate([blk for _, blk in self._chunks("labels", sel)])).long()
            w = torch.from_numpy(np.concatenate([blk for _, blk in self._chunks(wname, sel)])).float()
            self.max_resident_rows = max(self.max_resident_rows, len(y))
            perm = torch.from_numpy(rng.permutation(len(y)))
            for i in range(0, len(perm), self.batch_size):
                idx = perm[i : i + self.batch_size]
                yield post[idx], y[idx], w[idx]
            del post, y, w


def recipe_from_config(cfg: Any) -> Any:
    from ..gate_train import GateRecipe

    return GateRecipe(
        c=cfg.c, epochs=cfg.epochs, batch_size=cfg.batch_size, lr_gate=cfg.lr_gate,
        lr_alpha_mu=cfg.lr_alpha_mu, rho=cfg.rho, lambda_max=cfg.lambda_max, alpha_min=cfg.alpha_min,
        alpha_ema=cfg.alpha_ema, tau_start=cfg.tau_start, tau_end=cfg.tau_end,
        tau_warmup_epochs=cfg.tau_warmup_epochs, lambda_ent=cfg.lambda_ent, hard_routing=cfg.hard_routing,
        beta_mode=cfg.beta, xi=cfg.xi, patience=cfg.patience, view=cfg.view, hidden=tuple(cfg.hidden),
        dropout=cfg.dropout, seed=cfg.seed, frozen_uniform_gate=cfg.uniform_gate,
        gate_loss=cfg.gate_loss, rule_update=cfg.rule_update, M=cfg.M,
    )


def fit_gate(cfg: Any, export_art: Any, calib_art: Any, progress: Any = None) -> Any:
    """Train gate + rule from an export and a calibration (shared by the stage and ablations)."""
    from ..gate_train import train_gate
    from .calibrate import load_posteriors

    experts = list(cfg.experts) if cfg.experts is not None else None
    wname = "w_lt" if cfg.view == "lt" else "w_bal"
    val = load_posteriors(export_art, calib_art, "val_small", experts)
    src = ZarrSource(export_art, calib_art, "tuneV", cfg.view, cfg.batch_size, cfg.seed,
                     cfg.buffer_chunks, experts)
    c2g = export_art.array("class_to_group")
    return train_gate(src, (val["post"], val["y"], val[wname]), c2g, recipe_from_config(cfg), progress)


def constraint_residuals(result: Any, data: dict, wname: str) -> list[float]:
    """|alpha_k - K * P_w(accept, g(y) = k)| per group (hard rule, view weights self-normalised)."""
    import numpy as np

    pred, accept = result.predict(data["post"])
    w = data[wname] / data[wname].sum()
    K = len(result.alpha)
    p = np.bincount(data["group"], weights=w * accept, minlength=K)
    return [float(v) for v in np.abs(result.alpha - K * p)]


def compute(cfg: Any, inputs: dict, out: Any, progress: Any) -> None:
    import numpy as np

    from ..gate_train import GateDiverged
    from .calibrate import load_posteriors
    from .train_expert import pin_threads

    pin_threads()
    exp, cal = inputs["export"], inputs["calibrate"]
    try:
        res = fit_gate(cfg, exp, cal, progress)
    except GateDiverged:
        raise
    if res.gate_state is not None:
        from safetensors.numpy import save

        out.file_path("gate.safetensors").write_bytes(
            save({k: v.numpy() for k, v in res.gate_state.items()})
        )
    for name, v in (("alpha", res.alpha), ("mu", res.mu), ("lambda", res.lam), ("beta", res.beta)):
        out.array(name, np.asarray(v, np.float64))
    out.json("history.json", res.history)
    wname = "w_lt" if cfg.view == "lt" else "w_bal"
    experts = list(cfg.experts) if cfg.experts is not None else None
    diag = {}
    for s in ("tuneV", "val_small"):
        diag[s] = constraint_residuals(res, load_posteriors(exp, cal, s, experts), wname)
    h = res.history
    i = h["epoch"].index(res.chosen_epoch)
    out.meta.update(
        tau=float(res.tau), c=float(res.c), chosen_epoch=int(res.chosen_epoch), epochs_run=len(h["epoch"]),
        in_dim=int(res.in_dim), num_experts=int(res.num_experts), experts=experts,
        alpha=res.alpha.tolist(), mu=res.mu.tolist(), beta=res.beta.tolist(), view=cfg.view,
        val_objective=float(h["objective"][i]), val_coverage=float(h["coverage"][i]),
        val_group_error=list(h["group_error"][i]), constraint_residual=diag,
    )
    progress.log(
        f"train-gate ({cfg.beta}): chosen epoch {res.chosen_epoch}, val objective {h['objective'][i]:.4f}, "
        f"coverage {h['coverage'][i]:.3f}, alpha {np.round(res.alpha, 3).tolist()}, mu {np.round(res.mu, 3).tolist()}"
    )


def load_gate(art: Any) -> Any:
    """Rebuild the trained rule (GateResult) from a train-gate artifact (no code execution)."""
    import numpy as np

    from ..config import TrainGateConfig
    from ..gate_train import GateResult

    cfg = TrainGateConfig.model_validate(art.config)
    state = None
    if "gate.safetensors" in art.manifest.get("files", {}):
        from safetensors.torch import load

        state = load(art.read_bytes("gate.safetensors"))
    exp = art.upstream("export")
    return GateResult(
        gate_state=state, alpha=art.array("alpha"), mu=art.array("mu"), lam=art.array("lambda"),
        beta=art.array("beta"), tau=art.meta["tau"], c=art.meta["c"], chosen_epoch=art.meta["chosen_epoch"],
        history=art.json("history.json"), recipe=recipe_from_config(cfg),
        class_to_group=np.asarray(exp.array("class_to_group")), num_experts=art.meta["num_experts"],
        in_dim=art.meta["in_dim"],
    )


def summary(meta: dict) -> str:
    return f"epoch={meta.get('chosen_epoch')} obj={meta.get('val_objective', float('nan')):.4f}"
