"""One core, one search: AR-GSE and the baselines are fitted by the same code, so where the methods
coincide their fits must coincide exactly (stage level, through the store):

- a frozen single-expert gate = the CS-plug-in of that expert (alpha, mu at every coverage, refit AURC);
- the frozen uniform gate = U-PI.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _logit_files import write_logits

from argse_cli.config import (
    HELDOUT_SPLITS,
    BaselinesConfig,
    CalibrateConfig,
    EvalConfig,
    ExpertSource,
    ImportLogitsConfig,
    TrainGateConfig,
)
from argse_cli.stages import import_logits as imp
from argse_cli.stages import run_stage
from argse_cli.store import Store

torch.set_num_threads(1)
C, N = 20, 900
LOSSES = ("ce", "balsoftmax", "logitadjust:2")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("equiv")
    rng = np.random.default_rng(7)
    counts = np.maximum(2, np.floor(400 * 100.0 ** (-np.arange(C) / (C - 1)))).astype(np.int64)
    log_pi = np.log(counts / counts.sum()).astype(np.float32)
    (d / "counts.json").write_text(json.dumps(counts.tolist()))
    specs, labels = {}, {}
    for s in HELDOUT_SPLITS:
        y = rng.permutation(np.concatenate([np.arange(C), rng.choice(C, N - C, p=counts / counts.sum())]))
        (d / f"y_{s}.json").write_text(json.dumps(y.tolist()))
        labels[s] = str(d / f"y_{s}.json")
        for e, tau in enumerate((0.0, 1.0, 2.0)):
            f = rng.standard_normal((N, C)).astype(np.float32)
            f[np.arange(N), y] += rng.uniform(0, 5, N).astype(np.float32)
            f += np.float32(1.0 - tau) * log_pi[None]
            specs[(e, s)] = write_logits(f, d / f"f{e}_{s}", "npy")
    cfg = ImportLogitsConfig(
        experts=[ExpertSource(name=loss, loss=loss, logits={s: specs[(e, s)] for s in HELDOUT_SPLITS})
                 for e, loss in enumerate(LOSSES)],
        labels=labels, class_counts=str(d / "counts.json"), group_rule="threshold:20", chunk_rows=256,
    )
    store = Store(d / "store")
    ikey = imp.run(cfg, store, quiet=True)
    st = {"export": "import-logits", "calibrate": "calibrate"}
    kc, _ = run_stage("calibrate", CalibrateConfig(), {"export": ikey}, {"export": "import-logits"}, store, quiet=True)
    up = {"export": ikey, "calibrate": kc}

    def gate(**kw):
        k, _ = run_stage("train-gate", TrainGateConfig.model_validate(kw).resolved(), up, st, store, quiet=True)
        return store.open("train-gate", k)

    def evaluate(g):
        k, _ = run_stage("eval", EvalConfig(n_boot=0), {"gate": g.key}, {"gate": "train-gate"}, store, quiet=True)
        return store.open("eval", k)

    kg = gate(epochs=1, patience=1).key
    kb, _ = run_stage("baselines", BaselinesConfig(ablations=False, n_boot=0, T=2, seeds=(42,)),
                      {**up, "gate": kg}, {**st, "gate": "train-gate"}, store, quiet=True)
    base = {r["method"]: r for r in store.open("baselines", kb).json("baselines.json")["results"]}
    return gate, evaluate, base


def _same_fit(gate_art, base_entry):
    curves = gate_art.json("curves.json")
    for v in ("lt", "bal"):
        g, b = curves[v], base_entry["fit"][v]
        assert np.array_equal(np.asarray(g["alpha"]), np.asarray(b["alpha"])), v
        assert np.array_equal(np.asarray(g["lambda"]), np.asarray(b["lambda"])), v
        assert np.array_equal(np.asarray(g["widened"]), np.asarray(b["widened"])), v


@pytest.mark.parametrize("e", [0, 1, 2])
def test_frozen_single_expert_gate_is_the_cs_plugin_of_that_expert(world, e):
    gate, evaluate, base = world
    g = gate(uniform_gate=True, experts=(e,))
    ref = base[f"CS-plug-in ({LOSSES[e]})"]
    _same_fit(g, ref)
    m = evaluate(g).json("metrics.json")
    for v in ("lt", "bal"):
        for k in ("standard", "balanced", "worst"):
            assert abs(m["refit"]["views"][v]["aurc"][k] - ref["refit"]["views"][v]["aurc"][k]) <= 1e-9


def test_uniform_gate_is_u_pi(world):
    gate, evaluate, base = world
    g = gate(uniform_gate=True)
    _same_fit(g, base["U-PI"])
    m = evaluate(g).json("metrics.json")
    for v in ("lt", "bal"):
        for k in ("standard", "balanced", "worst"):
            assert abs(m["refit"]["views"][v]["aurc"][k] - base["U-PI"]["refit"]["views"][v]["aurc"][k]) <= 1e-9
    # its operating point (cost-matched on the lt curve) is U-PI's too
    assert g.meta["operating_coverage"] == base["U-PI"]["operating_coverage"]


def test_sb_pi_is_one_of_the_cs_plugins_chosen_on_validation(world):
    _, _, base = world
    sb = base["SB-PI"]
    scores = sb["val_mean_selection_score"]
    assert sb["expert"] == LOSSES[int(np.argmin(scores))]
    assert sb["refit"]["views"]["lt"]["aurc"] == base[f"CS-plug-in ({sb['expert']})"]["refit"]["views"]["lt"]["aurc"]
