"""CIFAR-100-LT on the published expert logits: clean protocol and the paper's central claim."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

NPZ = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar100lt-logits" / "cifar100lt_real_logits.npz"
pytestmark = pytest.mark.skipif(not NPZ.exists(), reason="../shared/data/cifar100lt-logits not present (user clone)")


@pytest.fixture(scope="module")
def fixture():
    return np.load(NPZ, allow_pickle=False)


def test_clean_protocol_is_disjoint_and_drops_the_overlap(fixture):
    from argse_cli.data.c100lt import clean_protocol

    p = clean_protocol(fixture)
    st = p["stats"]
    assert st["val_lt_distinct"] == 1986 and st["test_lt_distinct"] == 4570
    assert st["test_dropped_shared_with_val"] == 1309
    srcs = []
    for d in p["splits"].values():
        srcs.append(np.asarray(fixture[f"{d['from']}_source_index"])[d["rows"]])
    allsrc = np.concatenate(srcs)
    assert len(np.unique(allsrc)) == len(allsrc)  # no source image in two splits (or twice in one)
    tail = sum(st["counts"][s][1] for s in ("tuneV", "val_small", "calib"))
    assert tail == 71
    assert all(st["counts"][s][1] > 0 for s in ("tuneV", "val_small", "calib", "test"))


def test_cs_plugin_beats_chow_on_ce_in_the_refit_view(fixture):
    """Narasimhan et al.'s central claim on real data: at 70/80/90% coverage the CS-plug-in on the
    ce expert has a lower group-balanced error than Chow's rule on the same expert (refit view,
    long-tailed weights; alpha, mu fitted on tuneV, lambda chosen on val_small)."""
    from argse_cli.data.c100lt import clean_protocol
    from argse_cli.data.splits import split_weights
    from argse_cli.evaluation import score_curves, views_of_eta
    from argse_cli.experts.calibration import fit_temperature
    from argse_cli.experts.posterior import train_prior_posterior
    from argse_cli.metrics import rc_curve

    p = clean_protocol(fixture)
    counts = np.asarray(fixture["train_class_counts"])
    c2g = np.asarray(fixture["class_to_group"])
    log_pi = np.log(counts / counts.sum())
    data, logits = {}, {}
    for s, d in p["splits"].items():
        y = np.asarray(fixture[f"{d['from']}_labels"], np.int64)[d["rows"]]
        w_lt, w_bal = split_weights(y, counts)
        data[s] = {"y": y, "w_lt": w_lt, "w_bal": w_bal}
        logits[s] = fixture[f"{d['from']}_logits"][0][d["rows"]].astype(np.float32)  # expert 0 = ce
    T = fit_temperature(logits["val_small"], data["val_small"]["y"], log_pi, 0.0, w=data["val_small"]["w_lt"])
    eta = {s: train_prior_posterior(logits[s], log_pi, 0.0, T) for s in logits}
    from argse_cli.core.plugin_fit import fit_curve

    levels = [0.7, 0.8, 0.9]
    splits = {s: views_of_eta(eta[s], data[s], c2g, ("lt",)) for s in ("tuneV", "val_small")}
    curves = {"lt": fit_curve(splits["tuneV"]["lt"], splits["val_small"]["lt"], levels)}
    S, P = score_curves(curves, eta["test"], data["test"], c2g)["lt"]
    t = data["test"]
    chow = rc_curve(eta["test"].max(1), eta["test"].argmax(1), t["y"], c2g, t["w_lt"], coverages=levels, view="lt")
    for i, (q, chow_err) in enumerate(zip(levels, chow.balanced_risk, strict=True)):
        plug = rc_curve(S[i], P[i], t["y"], c2g, t["w_lt"], coverages=[q]).balanced_risk[0]
        print(f"coverage {q}: CS-plug-in {plug:.4f}  Chow {chow_err:.4f}")
        assert plug < chow_err
