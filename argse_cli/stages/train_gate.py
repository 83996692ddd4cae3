"""Stage `train-gate`: the AR-GSE gate (trained on tuneV, epoch chosen on val_small) and its rule
fitted by the one core on the trained mixture.

Training rows stream from the export artifact (fp16 logits, row-chunked, :class:`ZarrSource`);
val_small is read whole. After training, the mixture's per-group statistics on tuneV (streamed) and
val_small feed the core at every coverage 0.01..1.00 and for both views (Algorithm 1 for
``beta=balanced``, Algorithm 2 for ``beta=worst``); the artifact's rule is the cost-matched
operating point for ``c`` in the config's view.

Artifact: ``gate.safetensors`` (absent for the frozen uniform gate); arrays alpha, mu, beta (the
operating point's rule); ``curves.json`` (per view, per coverage: alpha, mu, beta, c, lambda, the
selection score, widenings); ``history.json`` (per epoch); meta: the operating point, the chosen
epoch and its criterion.
"""

from __future__ import annotations

from typing import Any

STAGE = "train-gate"
VERSION = 9


def compute(cfg: Any, inputs: dict, out: Any, progress: Any) -> None:
    import numpy as np

    from ..core.gated import fit_gate, gate_views
    from ..evaluation import fit_curves, operating_rule
    from ..runtime import pin_threads

    pin_threads()
    exp, cal = inputs["export"], inputs["calibrate"]
    experts = list(cfg.experts) if cfg.experts is not None else None
    fit = fit_gate(cfg, exp, cal, progress)
    if fit.gate_state is not None:
        from safetensors.numpy import save

        out.file_path("gate.safetensors").write_bytes(save({k: v.numpy() for k, v in fit.gate_state.items()}))
    progress.log(f"train-gate: fitting the rule at 100 coverages x 2 views "
                 f"({'Algorithm 2' if cfg.beta == 'worst' else 'Algorithm 1'})")
    splits = {s: gate_views(fit.model, exp, cal, s, experts) for s in ("tuneV", "val_small")}
    curves = fit_curves(splits, worst=cfg.beta == "worst", T=cfg.T or 10, xi=cfg.xi or 1.0)
    rule, q = operating_rule(curves, cfg.c, cfg.view)
    out.array("alpha", rule.alpha)
    out.array("mu", rule.mu)
    out.array("beta", rule.beta if rule.beta is not None else np.full(rule.K, 1.0 / rule.K))
    out.json("curves.json", {v: c.to_dict() for v, c in curves.items()})
    out.json("history.json", fit.history)
    out.meta.update(
        c=float(rule.c), cost=float(cfg.c), operating_coverage=q, view=cfg.view, uniform_beta=rule.beta is None,
        chosen_epoch=int(fit.chosen_epoch), criterion=fit.criterion, stopped_early=bool(fit.stopped_early),
        epochs_run=len(fit.history.get("epoch", [])), in_dim=int(fit.in_dim), num_experts=int(fit.num_experts),
        experts=experts, alpha=rule.alpha.tolist(), mu=rule.mu.tolist(),
        beta=None if rule.beta is None else rule.beta.tolist(),
        lambda_at_bound=int(sum(int(np.sum(c.at_bound)) for c in curves.values())),
        selective_rule=None if fit.rule_state is None else {k: np.asarray(v).tolist() if not isinstance(v, float)
                                                            else v for k, v in fit.rule_state.items()},
    )  # fmt: skip
    progress.log(
        f"train-gate ({cfg.beta}): epoch {fit.chosen_epoch + 1} by {fit.criterion}; operating point "
        f"q = {q:.2f} for c = {cfg.c:g}, alpha {np.round(rule.alpha, 3).tolist()}, mu {np.round(rule.mu, 3).tolist()}"
    )


def summary(meta: dict) -> str:
    return f"epoch={meta.get('chosen_epoch')} q*={meta.get('operating_coverage', float('nan')):.2f}"
