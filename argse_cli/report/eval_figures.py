"""The figures of one `eval` artifact: refit and sweep RC curves with their pointwise bootstrap
bands (also stored in ``rc_bands.json`` for ``argse plot``), the margin histogram and the gate's
training curves."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BAND_BOOT = 200
"""Bootstrap resamples of the figures' pointwise bands (at most ``n_boot``)."""


@dataclass
class EvalCurves:
    """What the eval figures draw: the method's ``name``, its refit metrics (``refit``), the sweep
    curves by view (``sweep``), the refitted rules' test arrays by view (``scored``: (S, P)), the
    operating point's test decisions (``dec``), the test rows (``test``) and ``class_to_group``."""

    name: str
    refit: dict
    sweep: dict
    scored: dict
    dec: Any
    test: dict
    class_to_group: Any


def eval_figures(out: Any, ec: EvalCurves, history: dict, cfg: Any, progress: Any) -> None:
    """RC figures (both protocols, both views, balanced and worst), margins, training curves."""
    from .figures import plot_margin_hist, plot_rc_curves, plot_training

    def stem(n: str) -> Any:
        out.file_path(f"{n}.pdf")
        return out.file_path(f"{n}.png").with_suffix("")

    bands = rc_bands(out, ec, cfg, progress)
    for kind in ("balanced", "worst"):
        for v, c in ec.sweep.items():
            curves = {f"{ec.name} (refit)": {**ec.refit["views"][v]["curve"], "band": bands.get(v, {}).get("refit")},
                      f"{ec.name} (sweep)": {**c.to_dict(), "band": bands.get(v, {}).get("sweep")}}
            plot_rc_curves(curves, kind, v, stem(f"rc_{kind}_{v}"), levels=cfg.levels, subtitle="refit and sweep views")
    plot_margin_hist(ec.dec.score, ec.test["group"], stem("margin_hist"), title=ec.name)
    if history.get("epoch"):
        plot_training(history, stem("trajectories"), title=ec.name)


def rc_bands(out: Any, ec: EvalCurves, cfg: Any, progress: Any) -> dict[str, dict]:
    """{view: {protocol: {kind: coverage, lo, hi}}}: 95% pointwise bands over ``min(BAND_BOOT,
    n_boot)`` class-stratified resamples of the test rows, written to ``rc_bands.json`` ({} when 0)."""
    from ..evaluation import WEIGHT_OF_VIEW
    from .bands import rc_band

    t = ec.test
    nb = min(BAND_BOOT, cfg.n_boot)
    bands: dict[str, dict] = {}
    if not nb:
        return bands
    progress.phase(f"RC bands ({nb} resamples)")
    for i, v in enumerate(ec.sweep, 1):
        w = t[WEIGHT_OF_VIEW[v]]
        bands[v] = {}
        for protocol, arrs in (("refit", ec.scored[v]), ("sweep", (ec.dec.score, ec.dec.pred))):
            b = rc_band([arrs], t["y"], ec.class_to_group, w, n_boot=nb, seed=cfg.seed)
            bands[v][protocol] = {k: {"coverage": b[k]["coverage"], "lo": b[k]["lo"], "hi": b[k]["hi"]} for k in b}
        progress(i, len(ec.sweep), {"view": v})
    progress.phase(None)
    out.json("rc_bands.json", {**bands, "n_boot": nb, "seed": cfg.seed,
                               "note": "95% pointwise percentile bands over class-stratified bootstrap "
                                       "resamples of the test rows"})
    return bands
