"""A trained AR-GSE gate with its operating-point rule: training from an export (:func:`fit_gate`),
its mixture's per-group statistics on a split (:func:`gate_views`) and loading a stored gate
(:func:`load_gate` -> :class:`GatedRule`).

``eta(x) = sum_e w_e(x) p_e(x)`` is the gate's mixture of the calibrated experts; the rule accepts
iff its margin ``m(eta) >= 0`` (:class:`argse_cli.core.rule.PluginRule`).
"""

from __future__ import annotations

from typing import Any


def _weights_name(cfg: Any) -> str:
    """Training-row weights: w_lt for the NLL (eta estimates P_train(y|x)); the view's otherwise."""
    return "w_lt" if (cfg.gate_loss or "nll") == "nll" else ("w_lt" if cfg.view == "lt" else "w_bal")


def fit_gate(cfg: Any, export_art: Any, calib_art: Any, progress: Any = None) -> Any:
    """Train the gate of a (resolved) train-gate config on an export and a calibration."""
    from .expert_data import ZarrSource, load_posteriors
    from .gate_fit import train_gate

    cfg.check_experts(len(export_art.meta["experts"]))  # an index beyond the export: one line, no work
    experts = list(cfg.experts) if cfg.experts is not None else None
    wname = _weights_name(cfg)
    val = load_posteriors(export_art, calib_art, "val_small", experts)
    src = ZarrSource(export_art, calib_art, "tuneV", wname, cfg.batch_size or 256, cfg.seed or 0,
                     cfg.buffer_chunks or 4, experts)
    c2g = export_art.array("class_to_group")
    return train_gate(src, (val["post"], val["y"], val[wname]), c2g, cfg, progress)


def gate_views(model: Any, export_art: Any, calib_art: Any, split: str, experts: Any) -> dict:
    """{view: Split} of the gate's mixture on a split, streamed chunk by chunk (O(N K) memory);
    at most ``FIT_ROWS_MAX`` rows (:func:`argse_cli.evaluation.fit_rows`)."""
    import numpy as np

    from ..evaluation import fit_rows, views_of
    from .expert_data import ZarrSource
    from .plugin_fit import group_stats

    c2g = export_art.array("class_to_group")
    d = {k: export_art.array(f"{split}/{a}") for k, a in
         (("y", "labels"), ("w_lt", "w_lt"), ("w_bal", "w_bal"))}
    keep = fit_rows(d["y"])  # by labels only: the other rows' mixture is never computed
    parts = []
    for post, _y, _w in ZarrSource(export_art, calib_art, split, "w_lt", 1, 0, 4, experts).iter_rows(keep):
        if len(post):
            parts.append(group_stats(model.mixture(post), c2g))
    Mx, A, E = (np.concatenate([p[i] for p in parts]) for i in range(3))
    if keep is not None:
        d = {k: v[keep] for k, v in d.items()}
    return views_of(Mx, A, E, d, c2g)


class GatedRule:
    """A stored gate and its operating-point rule: ``decide(post) -> (eta, pred, margin)`` in one
    forward pass of the gate (accept iff margin >= 0)."""

    def __init__(self, model: Any, rule: Any, curves: dict, meta: dict):
        self.model, self.rule, self.curves, self.meta = model, rule, curves, meta

    def mixture(self, post: Any) -> Any:
        return self.model.mixture(post)

    def decide(self, post: Any) -> tuple[Any, Any, Any]:
        import numpy as np

        eta = self.model.mixture(post)
        return eta, np.asarray(self.rule.predict(eta), np.int64), self.rule.margin(eta).astype(np.float32)

    def margin(self, post: Any) -> Any:
        return self.decide(post)[2]

    def predict(self, post: Any) -> tuple[Any, Any]:
        _, pred, m = self.decide(post)
        return pred, m >= 0


def load_gate(art: Any) -> GatedRule:
    """The gate and rule of a train-gate artifact (weights read through their checksum; no code runs)."""
    import numpy as np

    from .gate import GatingNet
    from .gate_fit import GateModel
    from .plugin_fit import PluginCurve
    from .rule import PluginRule

    cfg = art.config
    net = None
    if "gate.safetensors" in art.manifest.get("files", {}):
        from safetensors.torch import load

        net = GatingNet(art.meta["in_dim"], art.meta["num_experts"], tuple(cfg["hidden"]), cfg["dropout"])
        net.load_state_dict(load(art.read_bytes("gate.safetensors")))
        net.eval()
    model = GateModel(net, int(art.meta["num_experts"]), bool(cfg.get("hard_routing") or False))
    c2g = np.asarray(art.upstream("export").array("class_to_group"), np.int64)
    beta = None if art.meta.get("uniform_beta", True) else art.array("beta")
    rule = PluginRule(art.array("alpha"), art.array("mu"), float(art.meta["c"]), beta, c2g)
    curves = {v: PluginCurve.from_dict(d) for v, d in art.json("curves.json").items()}
    return GatedRule(model, rule, curves, dict(art.meta))


def load_gate_data(gate_art: Any, splits: tuple[str, ...] = ("test",)) -> tuple[GatedRule, dict, Any]:
    """(GatedRule, {split: posteriors/labels/weights of the gate's experts}, export) of a gate artifact."""
    from .expert_data import load_posteriors

    gr = load_gate(gate_art)
    exp, cal = gate_art.upstream("export"), gate_art.upstream("calibrate")
    experts = gate_art.meta.get("experts")
    return gr, {s: load_posteriors(exp, cal, s, experts) for s in splits}, exp
