"""End to end on foreign experts (C = 1000, four experts, 2000 rows per split, every format):
import-logits -> calibrate -> train-gate -> eval -> apply (and baselines, in the slow set).

`apply` (load_rejector / apply_files) on the *original* test files must reproduce eval's accept
decisions exactly (eval stores test/score = margin in the stored row order; accept = score >= 0),
also for an ablation gate over a subset of experts; bad inputs give one-line errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _logit_files import write_logits

from argse_cli.apply import apply_files, load_rejector
from argse_cli.config import (
    HELDOUT_SPLITS,
    BaselinesConfig,
    CalibrateConfig,
    EvalConfig,
    ExpertSource,
    ImportLogitsConfig,
    TrainGateConfig,
)
from argse_cli.errors import ArgseError
from argse_cli.readers import open_logits
from argse_cli.stages import import_logits as imp
from argse_cli.stages import run_stage
from argse_cli.store import Store

torch.set_num_threads(1)

C, E, N = 1000, 4, 2000
LOSSES = ("ce", "balsoftmax", "logitadjust:2", "logitadjust:0.5")
# a format per (expert, split); the writer is the import tests' (keyed .pt / .safetensors, fp16 npz ...)
FORMATS = ("npy", "npz", "npzc", "st", "zarr", "pt", "npy16")


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    import argse_cli.report.eval_figures as ef

    d = tmp_path_factory.mktemp("byoe")
    rng = np.random.default_rng(1)
    counts = np.maximum(1, np.floor(500 * 100.0 ** (-np.arange(C) / (C - 1)))).astype(np.int64)
    log_pi = np.log(counts / counts.sum()).astype(np.float32)
    (d / "counts.csv").write_text("count\n" + "\n".join(map(str, counts)) + "\n")
    specs, labels = {}, {}
    for si, s in enumerate(HELDOUT_SPLITS):
        y = rng.permutation(np.concatenate([np.arange(C), rng.integers(0, C, N - C)]))
        (d / f"y_{s}.json").write_text(json.dumps(y.tolist()))
        labels[s] = str(d / f"y_{s}.json")
        for e in range(E):
            tau = [0.0, 1.0, 2.0, 0.5][e]
            f = rng.standard_normal((N, C)).astype(np.float32)
            f[np.arange(N), y] += rng.uniform(0, 14, N).astype(np.float32) * (0.7 + 0.1 * e)
            f += np.float32(0.5 * (1 - tau)) * log_pi[None]
            specs[(e, s)] = write_logits(f, d / f"f{e}_{s}", FORMATS[(e + 4 * si) % len(FORMATS)])
    cfg = ImportLogitsConfig(
        experts=[
            ExpertSource(
                name=f"expert{e}", loss=LOSSES[e], logits={s: specs[(e, s)] for s in HELDOUT_SPLITS}
            )
            for e in range(E)
        ],
        labels=labels,
        class_counts=str(d / "counts.csv"),
        chunk_rows=512,
    )
    store = Store(d / "store")
    ikey = imp.run(cfg, store, quiet=True)
    st_e = {"export": "import-logits"}
    kc, _ = run_stage("calibrate", CalibrateConfig(), {"export": ikey}, st_e, store, quiet=True)
    up, st = {"export": ikey, "calibrate": kc}, {**st_e, "calibrate": "calibrate"}
    gcfg = TrainGateConfig(epochs=1, patience=1, c=0.1)
    kg, _ = run_stage("train-gate", gcfg, up, st, store, quiet=True)
    mp = pytest.MonkeyPatch()
    mp.setattr(ef, "eval_figures", lambda *a, **k: None)  # figures are not under test here (slow)
    try:
        ke, _ = run_stage(
            "eval",
            EvalConfig(n_boot=50),
            {"gate": kg},
            {"gate": "train-gate"},
            store,
            quiet=True,
        )
    finally:
        mp.undo()
    return {
        "dir": d,
        "store": store,
        "specs": specs,
        "cfg": cfg,
        "import": store.open("import-logits", ikey),
        "cal": kc,
        "gate": kg,
        "eval": store.open("eval", ke),
        "gcfg": gcfg,
        "up": up,
        "stages": st,
    }


def test_pipeline_ran_on_imported_logits(e2e):
    used = {FORMATS[(e + 4 * si) % len(FORMATS)] for e in range(E) for si in range(4)}
    assert used == set(FORMATS)
    m = e2e["eval"].json("metrics.json")
    lt = m["sweep"]["views"]["lt"]
    assert 0.0 <= lt["aurc"]["balanced"] <= 1.0 and 0.0 <= lt["aurc"]["worst"] <= 1.0
    score = e2e["eval"].array("test/score")
    assert 0.02 < float((score >= 0).mean()) < 0.98  # a real mix of accept / reject to reproduce


@pytest.mark.slow  # ~15 s on 2 cores: every baseline's refit curves at C = 1000
def test_baselines_ran_on_imported_logits(e2e):
    bcfg = BaselinesConfig(n_boot=0, seeds=(42,), ablations=False, gate_epochs=2, levels=(0.8,), T=3, c=0.1)
    kb, _ = run_stage("baselines", bcfg, {**e2e["up"], "gate": e2e["gate"]},
                      {**e2e["stages"], "gate": "train-gate"}, e2e["store"], quiet=True)
    names = {r["method"] for r in e2e["store"].open("baselines", kb).json("baselines.json")["results"]}
    assert {"DE-Chow", "U-PI", "SB-PI", "Plug-in[Worst]"} <= names
    assert any(n.startswith("Chow (") for n in names)


def test_apply_reproduces_eval_accept_decisions_exactly(e2e):
    rej = load_rejector(e2e["gate"][:10], e2e["store"])  # a key prefix is fine
    assert rej.num_experts == E and rej.num_classes == C
    raw = [open_logits(e2e["specs"][(e, "test")])[0:N] for e in range(E)]  # original (source) order
    out = rej.apply(raw)
    ro = e2e["import"].array("test/row_order")  # stored row i = source row ro[i]
    score = e2e["eval"].array("test/score")
    assert np.array_equal(out["accept"][ro], score >= 0)
    assert np.array_equal(out["margin"][ro], score)
    assert np.array_equal(out["pred"][ro], e2e["eval"].array("test/pred"))
    assert out["accept"].dtype == bool and out["pred"].dtype == np.int64
    # without the storage rounding the margins move by fp16 rounding only
    m_raw = rej.apply(raw, storage="none")["margin"]
    assert np.abs(m_raw[ro] - score).max() < 1e-2


def test_apply_files_npz_and_csv(e2e, tmp_path):
    files = [e2e["specs"][(e, "test")] for e in range(E)]
    ro, score = e2e["import"].array("test/row_order"), e2e["eval"].array("test/score")
    p = apply_files(e2e["gate"], files, str(tmp_path / "d.npz"), e2e["store"].root)
    z = np.load(p)
    assert np.array_equal(z["accept"][ro], score >= 0) and np.array_equal(z["margin"][ro], score)
    p = apply_files(e2e["gate"], files, str(tmp_path / "d.csv"), e2e["store"].root)
    lines = Path(p).read_text().splitlines()
    assert lines[0] == "row,pred,margin,accept" and len(lines) == N + 1
    rows = np.array([ln.split(",") for ln in lines[1:]])
    assert np.array_equal(rows[:, 0].astype(int), np.arange(N))
    assert np.array_equal(rows[:, 3].astype(int)[ro], (score >= 0).astype(int))
    assert np.array_equal(rows[:, 2].astype(np.float64).astype(np.float32)[ro], score)


@pytest.mark.slow  # trains a second gate (~10 s on 2 cores)
def test_apply_with_an_expert_subset_gate(e2e):
    """An ablation gate over experts (0, 2): apply takes all four files and selects, or just two."""
    from argse_cli.core.expert_data import load_posteriors
    from argse_cli.core.gated import load_gate

    store = e2e["store"]
    up = {"export": e2e["import"].key, "calibrate": e2e["cal"]}
    st = {"export": "import-logits", "calibrate": "calibrate"}
    kg, _ = run_stage(
        "train-gate",
        e2e["gcfg"].model_copy(
            update={"experts": (0, 2), "epochs": 1, "patience": 1}
        ),
        up,
        st,
        store,
        quiet=True,
    )
    rej = load_rejector(kg, store)
    assert rej.experts == [0, 2] and rej.num_experts == 2
    raw = [open_logits(e2e["specs"][(e, "test")])[0:N] for e in range(E)]
    gate = store.open("train-gate", kg)
    res = load_gate(gate)
    want = res.margin(
        load_posteriors(e2e["import"], gate.upstream("calibrate"), "test", [0, 2])["post"]
    )
    ro = e2e["import"].array("test/row_order")
    assert np.array_equal(rej.apply(raw)["margin"][ro], want)
    assert np.array_equal(rej.apply([raw[0], raw[2]])["margin"][ro], want)
    with pytest.raises(ArgseError, match="3 logits arrays"):
        rej.apply(raw[:3])


def test_storage_dtype_is_decided_jointly_like_the_import():
    from argse_cli.apply import Rejector

    rng = np.random.default_rng(0)
    small = rng.standard_normal((4, 30)).astype(np.float32)
    wild = small.copy()
    wild[2, 3] = -7.0e4  # range > 65504
    h = small.astype(np.float16)
    assert Rejector.storage_for([small, h]) == "float16"
    assert Rejector.storage_for([small, wild, h]) == "float32"  # one wild row: all experts float32
    assert Rejector.storage_for([h, h]) == "float16"  # fp16 input is kept verbatim


def test_apply_errors(e2e, tmp_path):
    rej = load_rejector(e2e["gate"], e2e["store"])
    x = np.zeros((5, C), np.float32)
    with pytest.raises(ArgseError, match="different row counts"):
        rej.apply([x, x, x, x[:4]])
    with pytest.raises(ArgseError, match=r"expected \[N, 1000\]"):
        rej.apply([x, x, x, np.zeros((5, 999), np.float32)])
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ArgseError, match="row 3 holds NaN or inf"):
        rej.apply([x, x, bad, x])
    files = [e2e["specs"][(e, "test")] for e in range(E)]
    with pytest.raises(ArgseError, match=r"\.npz or \.csv"):
        apply_files(e2e["gate"], files, str(tmp_path / "d.txt"), e2e["store"].root)
    f = np.zeros((N, C), np.float32)
    f[1234, 7] = np.inf
    np.save(tmp_path / "inf.npy", f)
    with pytest.raises(ArgseError, match="row 1234 of .*inf.npy holds NaN or inf"):
        apply_files(
            e2e["gate"],
            [*files[:3], str(tmp_path / "inf.npy")],
            str(tmp_path / "d.npz"),
            e2e["store"].root,
        )
    np.save(tmp_path / "long.npy", np.zeros((N + 1, C), np.float16))
    with pytest.raises(ArgseError, match="different row counts"):
        apply_files(
            e2e["gate"],
            [*files[:3], str(tmp_path / "long.npy")],
            str(tmp_path / "d.npz"),
            e2e["store"].root,
        )
    np.save(tmp_path / "narrow.npy", np.zeros((N, 10), np.float16))
    with pytest.raises(ArgseError, match="the gate's classes: 1000"):
        apply_files(
            e2e["gate"],
            [*files[:3], str(tmp_path / "narrow.npy")],
            str(tmp_path / "d.npz"),
            e2e["store"].root,
        )
    with pytest.raises(ArgseError, match="no complete train-gate artifact"):
        load_rejector("abcdef012345", e2e["store"])


def test_streamed_rows_restricted_to_a_subset_equal_the_subset_of_all_rows(e2e):
    # gate_views reads every chunk but calibrates only the rule-fit rows (fit_rows)
    from argse_cli.core.expert_data import ZarrSource

    cal = e2e["store"].open("calibrate", e2e["cal"])
    src = ZarrSource(e2e["import"], cal, "tuneV", "w_lt", 1, 0, 2)
    full = [torch.cat(t) for t in zip(*src.iter_rows(), strict=True)]
    keep = np.sort(np.random.default_rng(0).choice(N, 333, replace=False))
    part = [torch.cat(t) for t in zip(*src.iter_rows(keep), strict=True)]
    for a, b in zip(full, part, strict=True):
        assert torch.equal(a[torch.from_numpy(keep)], b)
    assert src.max_resident_rows == 2 * 512  # whole buffers are still read
