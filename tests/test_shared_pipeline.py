"""Shared-backbone experts through the config, the pipeline keys and the CLI stages
(train-expert -> export-logits -> calibrate) on a tiny synthetic CIFAR-10."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from conftest import run_cli
from pydantic import ValidationError

from argse_cli.config import TrainExpertConfig
from argse_cli.errors import ArgseError
from argse_cli.pipeline import Pipeline
from argse_cli.store import Store

HEADS = ("ce", "balsoftmax", "logitadjust:2")


def test_config_rules():
    ok = TrainExpertConfig(loss="shared", shared_backbone=True, heads=HEADS)
    assert ok.heads == HEADS
    assert TrainExpertConfig(loss="decoupled", shared_backbone=True).heads is None
    bad = [
        dict(loss="shared", heads=HEADS),  # shared_backbone missing
        dict(loss="shared", shared_backbone=True),  # no heads
        dict(loss="shared", shared_backbone=True, heads=()),
        dict(loss="shared", shared_backbone=True, heads=("ce", "decoupled")),
        dict(loss="shared", shared_backbone=True, heads=("ce", "ce")),
        dict(loss="shared", shared_backbone=True, heads=("focal",)),
        dict(loss="ce", heads=("ce",)),  # heads only on the shared artifact
        dict(loss="balsoftmax", shared_backbone=True),  # a head, not an expert of its own
        dict(width=0),
    ]
    for kw in bad:
        with pytest.raises(ValidationError):
            TrainExpertConfig(**kw)


def test_checkpoint_every_is_not_keyed_but_width_is():
    a, b = TrainExpertConfig(checkpoint_every=1), TrainExpertConfig(checkpoint_every=7)
    assert a.key_payload() == b.key_payload() and "checkpoint_every" not in a.key_payload()
    assert TrainExpertConfig(width=2).key_payload() != a.key_payload()


@pytest.fixture
def pipe(synthetic_cifar10, tmp_path):
    def make(section: dict) -> Pipeline:
        return Pipeline(
            {"split": {"data_root": str(synthetic_cifar10)}, "train_expert": section}, Store(tmp_path / "s")
        )

    return make


def test_shared_mode_keys(pipe):
    p = pipe({"shared_backbone": True, "depth": 8})
    cfgs = [p.config("train-expert", loss=l) for l in ("ce", "balsoftmax", "logitadjust:2")]
    assert all(c.loss == "shared" and c.heads == HEADS for c in cfgs)  # one artifact for all heads
    runs = p.expert_runs()
    assert [r[0].loss for r in runs] == ["shared", "decoupled"]
    shared_key, crt_key = runs[0][3], runs[1][3]
    assert runs[1][1]["backbone"] == shared_key and runs[1][2]["backbone"] == "train-expert"
    assert {p.expert_key(l) for l in HEADS} == {shared_key} and p.expert_key("decoupled") == crt_key
    assert p.export_upstream()[0]["experts"] == [shared_key, crt_key]
    # cRT first in the list: still exported after the shared heads (its backbone)
    p2 = pipe({"shared_backbone": True, "depth": 8, "losses": ["decoupled", "balsoftmax"]})
    assert p2.config("train-expert", loss="ce").heads == ("balsoftmax",)
    r2 = p2.expert_runs()
    assert [r[0].loss for r in r2] == ["shared", "decoupled"]
    assert p2.export_upstream()[0]["experts"] == [r2[0][3], r2[1][3]]
    # decoupled alone: the backbone is a ce head
    p3 = pipe({"shared_backbone": True, "losses": ["decoupled"]})
    assert p3.expert_runs()[0][0].heads == ("ce",) and len(p3.export_upstream()[0]["experts"]) == 1
    # independent mode is unchanged: one artifact per loss, ce (the cRT backbone) before decoupled
    q = pipe({"depth": 8, "losses": ["decoupled", "balsoftmax"]})
    assert [r[0].loss for r in q.expert_runs()] == ["ce", "balsoftmax", "decoupled"]
    assert len(q.export_upstream()[0]["experts"]) == 2
    # the shared and independent keys differ
    assert shared_key not in {r[3] for r in pipe({"depth": 8}).expert_runs()}


def test_heads_field_and_bad_flag_refused(pipe):
    with pytest.raises(ArgseError, match="train_expert.heads"):
        pipe({"shared_backbone": True, "heads": ["ce"]}).config("train-expert", loss="ce")
    with pytest.raises(ArgseError, match="train_expert.shared_backbone"):
        pipe({"shared_backbone": "maybe"}).config("train-expert", loss="ce")


PIPE = {
    "split": {"dataset": "cifar10", "imbalance_factor": 10, "seed": 0},
    "train_expert": {"losses": ["ce", "balsoftmax", "logitadjust:2", "decoupled"], "shared_backbone": True,
                     "depth": 8, "epochs": 2, "decoupled_epochs": 1, "warmup_epochs": 0, "batch_size": 64},
    "export_logits": {"chunk_rows": 64},
    "calibrate": {},
}  # fmt: skip


@pytest.mark.slow  # ~16 s on 2 cores; the shared trainer itself is tested in tests/test_shared.py
def test_cli_shared_backbone_train_export_calibrate(tmp_path, monkeypatch):
    from argse_cli.data.images import load_images, split_arrays
    from argse_cli.data.synthetic import write_synthetic_cifar10
    from argse_cli.experts.trainer import load_model, predict_logits

    data = tmp_path / "data"
    write_synthetic_cifar10(data, n_train_per_class=60, n_test_per_class=40, seed=1)
    cfg = tmp_path / "pipe.yaml"
    cfg.write_text(yaml.safe_dump(PIPE))
    env = {"ARGSE_STORE": str(tmp_path / "store"), "ARGSE_DATA": str(data)}

    def cli(*args, ok=True):
        r = run_cli([*args, "--config", cfg], env=env, timeout=300)
        assert (r.returncode == 0) == ok, r.stderr
        return r

    cli("split", "-q")
    keys = cli("train-expert", "--print-key").stdout.split()
    assert len(keys) == 2  # the shared artifact and the cRT head
    tr = cli("train-expert")
    assert tr.stdout.count("wrote") == 2
    assert "shared backbone with heads ce, balsoftmax, logitadjust:2" in tr.stderr
    assert "cRT head on the frozen shared backbone" in tr.stderr
    cli("export-logits", "-q")
    cli("calibrate", "-q")
    again = cli("train-expert", "-q").stdout + cli("export-logits", "-q").stdout + cli("calibrate", "-q").stdout
    assert "wrote" not in again and again.count("cached") == 4

    store = Store(tmp_path / "store")
    shared, crt = store.open("train-expert", keys[0]), store.open("train-expert", keys[1])
    assert shared.meta["loss"] == "shared" and [h["loss"] for h in shared.meta["heads"]] == list(HEADS)
    assert [h["tau"] for h in shared.meta["heads"]] == [0.0, 1.0, 2.0]
    K = int(shared.meta["num_classes"])
    assert shared.array("test/per_class_acc").shape == (3, K)
    assert len(shared.json("history.json")) == 3
    bs_head, la_head = shared.meta["heads"][1], shared.meta["heads"][2]
    assert bs_head["test_balanced_rule_acc"] == bs_head["test_class_balanced_acc"]  # tau = 1: same rule
    assert len(la_head["test_balanced_rule_group_acc"]) == len(la_head["test_group_acc"])
    assert crt.meta["loss"] == "decoupled" and crt.meta["tau"] == 1.0 and crt.meta["shared_backbone"]
    assert crt.upstream_keys["backbone"] == keys[0]

    exp_key = cli("export-logits", "--print-key").stdout.strip()
    exp = store.open("export-logits", exp_key)
    ex = exp.meta["experts"]
    assert [e["loss"] for e in ex] == [*HEADS, "decoupled"] and [e["tau"] for e in ex] == [0.0, 1.0, 2.0, 1.0]
    assert [e.get("head") for e in ex] == [0, 1, 2, None] and all(e["shared_backbone"] for e in ex)
    assert exp.meta["num_experts"] == 4
    # the exported logits are each head's own forward pass (fp16 tolerance)
    split = exp.upstream("split")
    x, _ = split_arrays(split, "test", load_images(split))
    order = exp.array("test/row_order")
    f16 = exp.array("test/logits")
    m = load_model(shared.read_bytes("model.safetensors"), 8, K, num_heads=3)
    f32 = predict_logits(m, x[order]).numpy()
    for e in range(3):
        np.testing.assert_allclose(f16[:, e].astype(np.float32), f32[:, e], rtol=2e-3, atol=2e-2)
    c = load_model(crt.read_bytes("model.safetensors"), 8, K)
    np.testing.assert_allclose(f16[:, 3].astype(np.float32), predict_logits(c, x[order]).numpy(), rtol=2e-3, atol=2e-2)
    # the backbone of the cRT head is the shared backbone, unchanged
    sm, cm = m.state_dict(), c.state_dict()
    assert all(np.array_equal(sm[k].numpy(), cm[k].numpy()) for k in cm if not k.startswith("fc."))
    # the RESULTS.md notes list one row per head of the shared artifact, then the cRT head
    from argse_cli.report.notes import notes

    monkeypatch.setenv("ARGSE_DATA", str(data))
    rows = notes(cfg, tmp_path / "store")["experts"]
    assert [r["name"] for r in rows] == [*HEADS, "decoupled"]
    assert [r["shared"] for r in rows] == [True, True, True, False]
    assert rows[2]["balanced_acc"] == la_head["test_class_balanced_acc"]
    assert rows[2]["rule_acc"] == la_head["test_balanced_rule_acc"] and rows[1]["rule_acc"] is None
    assert rows[3]["balanced_acc"] == crt.meta["test_class_balanced_acc"]
