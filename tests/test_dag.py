"""The stage graph declared once (argse_cli.dag) and memoised key resolution: `argse train-gate
--print-key` validates each config once, hashes each key once and fingerprints the data once."""

from __future__ import annotations

import collections

import pytest
import typer.main
import yaml
from typer.testing import CliRunner

import argse_cli.data.cifar as cifar
import argse_cli.pipeline as pipeline
import argse_cli.stages as stages
from argse_cli.cli import app
from argse_cli.config import STAGE_MODELS
from argse_cli.dag import DAG, RUN_ORDER
from argse_cli.data.synthetic import write_synthetic_cifar10
from argse_cli.store import Store


def test_the_table_names_every_stage_once():
    assert list(DAG) == list(stages.STAGE_MODULES) == list(STAGE_MODELS)
    assert RUN_ORDER == ("split", "train-expert", "export-logits", "calibrate", "train-gate", "eval",
                         "baselines", "report")  # fmt: skip
    for node in DAG.values():
        assert stages.get_stage(node.stage).__name__.endswith(node.module)
        assert node.model is STAGE_MODELS[node.stage]
        for role in node.roles:
            assert {role.stage, *role.alt} <= set(DAG), role


def test_every_stage_command_has_the_common_options_from_the_factory():
    cmd = typer.main.get_command(app)
    for stage, node in DAG.items():
        names = [p.name for p in cmd.commands[stage].params]
        assert names[:2] == ["config", "set_"], stage
        tail = ["store", "force", "print_config", "print_key", "quiet"] + (["rehash"] if node.inputs else [])
        assert names[-len(tail):] == tail, stage


@pytest.mark.parametrize("shared", [False, True])
def test_print_key_validates_hashes_and_fingerprints_once(tmp_path, monkeypatch, shared):
    data = tmp_path / "data"  # a fresh root: its fingerprint is in no memo yet
    write_synthetic_cifar10(data, n_train_per_class=20, n_test_per_class=10, seed=0)
    cfg = tmp_path / "pipe.yaml"
    cfg.write_text(yaml.safe_dump({
        "split": {"imbalance_factor": 10},
        "train_expert": {"depth": 8, "epochs": 1, "shared_backbone": shared,
                         "losses": ["ce", "balsoftmax", "logitadjust:2", "decoupled"]},
        "train_gate": {"epochs": 2},
    }))  # fmt: skip
    calls: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

    def spy(mod, name, count):
        real = getattr(mod, name)

        def wrapper(*a, **k):
            out = real(*a, **k)
            calls[name][count(a, k, out)] += 1
            return out

        monkeypatch.setattr(mod, name, wrapper)

    spy(pipeline, "validate", lambda a, k, out: (a[0], pipeline._canon(a[1])))
    spy(stages, "key_of", lambda a, k, out: out)
    spy(pipeline, "cached_fingerprint", lambda a, k, out: a[2])
    spy(cifar, "data_fingerprint", lambda a, k, out: str(a[1]))
    res = CliRunner().invoke(app, ["train-gate", "--config", str(cfg), "--print-key", "--store",
                                   str(tmp_path / "s")], env={"ARGSE_DATA": str(data)})  # fmt: skip
    assert res.exit_code == 0, res.output
    key = res.output.strip()
    assert calls["cached_fingerprint"] == {str(data): 1}
    assert calls["data_fingerprint"] == {str(data): 1}
    assert set(calls["validate"].values()) == {1}  # each (stage, config data) once
    per_stage = collections.Counter(stage for stage, _ in calls["validate"])
    n_experts = 2 if shared else 4  # the shared artifact + cRT, or one per loss
    assert per_stage == {"split": 1, "train-expert": n_experts, "export-logits": 1, "calibrate": 1,
                         "train-gate": 1}  # fmt: skip
    assert set(calls["key_of"].values()) == {1} and len(calls["key_of"]) == n_experts + 4
    assert key in calls["key_of"]
    assert not (tmp_path / "s").exists()  # --print-key writes nothing, not even the memo


def test_override_after_resolution_changes_the_keys(tmp_path, synthetic_cifar10):
    p = pipeline.Pipeline({"split": {"data_root": str(synthetic_cifar10)}}, Store(tmp_path / "s"), memo=False)
    gate, split = p.gate_key(), p.split_key()
    p.override("train-gate", {"epochs": 3})
    assert p.gate_key() != gate and p.split_key() == split
    p.override("split", {"seed": 1})
    assert p.split_key() != split
