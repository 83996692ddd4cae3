"""AR-GSE ablation and sensitivity gates retrained in-process for `baselines`: which variants
(:func:`variants`), each variant's train-gate config (:func:`variant_config`), the balanced-posterior
calibration (:func:`balanced_calibration`) and the trained gate's mixtures (:func:`variant_mixtures`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Variant:
    """One ablation / sensitivity gate: its table ``name``, ``group`` (ablation | sensitivity), the
    ``setting`` it changes, the train-gate config ``update`` and ``calib`` ("balanced" refits the
    temperatures for balanced posteriors; None keeps the calibration)."""

    name: str
    group: str
    setting: str
    update: dict = field(default_factory=dict)
    calib: str | None = None


def variants(cfg: Any, losses: list[str], best: int) -> list[Variant]:
    """The ablation / sensitivity gates a baselines config asks for (``best``: the SB-PI expert)."""
    E = len(losses)
    v: list[Variant] = []
    if cfg.ablations:
        want = set(cfg.ablation_variants)
        cand = [
            ("selective", "AR-GSE selective objective", "gate_loss=selective", {"gate_loss": "selective"}, None),
            ("no_sparsity", "AR-GSE no sparsity", "lambda_ent=0", {"lambda_ent": 0.0}, None),
            ("hard_routing", "AR-GSE hard routing", "hard_routing", {"hard_routing": True}, None),
            ("one_expert", f"AR-GSE 1 expert ({losses[best]})", "experts=1", {"experts": (best,)}, None),
        ]
        if "ce" in losses and "balsoftmax" in losses:
            pair = (losses.index("ce"), losses.index("balsoftmax"))
            cand.append(("two_experts", "AR-GSE 2 experts (ce+balsoftmax)", "experts=2", {"experts": pair}, None))
        cand.append(("balanced_posteriors", "AR-GSE balanced posteriors", "posterior=balanced", {}, "balanced"))
        v += [Variant(name, "ablation", setting, upd, cal) for key, name, setting, upd, cal in cand if key in want]
        if E >= 6 and "two_experts" in want:
            v.append(Variant("AR-GSE 6 experts", "ablation", "experts=6", {"experts": tuple(range(6))}))
    if cfg.sensitivity:
        for label, upd in [("gate 2 layers", {"hidden": (128,)}), ("gate 3 layers", {"hidden": (128, 64)}),
                           *[(f"lambda_ent={x:g}", {"lambda_ent": x}) for x in (1e-4, 1e-3, 1e-2)],
                           *[(f"c={x:g}", {"c": x}) for x in (0.02, 0.05, 0.1)]]:
            v.append(Variant(f"AR-GSE {label}", "sensitivity", label, upd))
    return v


def variant_config(gate_config: dict, update: dict, gate_epochs: int | None) -> Any:
    """The resolved train-gate config of a variant: the eval'd gate's config (beta balanced), the
    variant's update, and ``gate_epochs`` (patience capped by it) when given."""
    from .config import TrainGateConfig

    base = {k: v for k, v in gate_config.items() if v is not None and k not in ("beta", "xi", "T")}
    if gate_epochs:
        base["epochs"] = gate_epochs
        base["patience"] = min(base.get("patience", 15), gate_epochs)
    return TrainGateConfig.model_validate({**base, **update, "beta": "balanced"}).resolved()


class _Calib:
    """An in-memory calibration (temperatures + prior shifts) with the artifact's read API."""

    def __init__(self, shift: Any, T: Any):
        self._a = {"shift": shift, "temperature": T}

    def array(self, name: str) -> Any:
        return self._a[name]


def balanced_calibration(exp: Any, cal: Any) -> _Calib:
    """Temperatures refitted for the balanced posteriors, shift_e = tau_e - 1, on the calibration's
    own split and view."""
    import numpy as np

    from .core.expert_data import log_prior
    from .experts.calibration import fit_temperature

    shift_b = np.array([e["tau"] - 1.0 for e in exp.meta["experts"]], np.float32)
    fs = cal.config.get("fit_split", "val_small")
    wv = "w_lt" if cal.config.get("view", "lt") == "lt" else "w_bal"
    Tb = [fit_temperature(exp.array(f"{fs}/logits")[:, e].astype(np.float32), exp.array(f"{fs}/labels"),
                          log_prior(exp), float(shift_b[e]), w=exp.array(f"{fs}/{wv}"))
          for e in range(len(shift_b))]
    return _Calib(shift_b, np.asarray(Tb, np.float32))


def variant_mixtures(variant: Variant, gcfg: Any, exp: Any, cal: Any, data: dict,
                     progress: Any = None) -> tuple[dict, Any]:
    """Train the variant's gate (config ``gcfg``; its epochs reported to ``progress``) and return
    ({split: eta}, the gate fit) on tuneV, val_small and test; ``data`` holds the full
    calibration's posteriors."""
    from .core.expert_data import load_posteriors
    from .core.gated import fit_gate

    cal_use = balanced_calibration(exp, cal) if variant.calib == "balanced" else cal
    fit = fit_gate(gcfg, exp, cal_use, progress)
    sub = list(gcfg.experts) if gcfg.experts is not None else None
    post = ({s: load_posteriors(exp, cal_use, s, sub)["post"] for s in ("tuneV", "val_small", "test")}
            if (variant.calib is not None or sub is not None) else {s: data[s]["post"] for s in data})
    return {s: fit.model.mixture(post[s]) for s in post}, fit
