"""Stage config models (frozen, no extras, no NaN/inf, field rules) and pipeline files/overrides."""

from __future__ import annotations

import json
import math
import typing

import pytest
from pydantic import ValidationError

from argse_cli.config import (
    ALL_SPLITS,
    HELDOUT_SPLITS,
    PAPER_FRACTIONS,
    PLAN_FRACTIONS,
    RUNTIME_FIELDS,
    STAGE_MODELS,
    ExportLogitsConfig,
    SplitConfig,
    TrainExpertConfig,
    section_name,
)
from argse_cli.errors import ArgseError
from argse_cli.pipeline import Pipeline, load_file, parse_set, validate
from argse_cli.store import Store, canonical_json

STAGES = sorted(STAGE_MODELS)


def _float_fields(model) -> list[str]:
    out = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        if ann is float or (typing.get_origin(ann) in (typing.Union, type(int | None))
                            and float in typing.get_args(ann)):  # fmt: skip
            out.append(name)
    return out


# ----------------------------------------------------------------------- common behaviour
@pytest.mark.parametrize("stage", STAGES)
def test_frozen_no_extras_and_clean_key_payload(stage):
    model = STAGE_MODELS[stage]
    assert model.model_config["frozen"] and model.model_config["extra"] == "forbid"
    assert model.model_config["allow_inf_nan"] is False
    with pytest.raises(ValidationError) as ei:
        model.model_validate({"no_such_field": 1})
    assert "extra_forbidden" in {e["type"] for e in ei.value.errors()}
    if any(f.is_required() for f in model.model_fields.values()):
        return  # no default instance to poke at
    cfg = model()
    field = next(iter(model.model_fields))
    with pytest.raises(ValidationError):
        setattr(cfg, field, getattr(cfg, field))
    # the key payload is canonical JSON (no NaN) and free of runtime-only fields
    payload = cfg.key_payload()
    canonical_json(payload)
    assert not set(payload) & RUNTIME_FIELDS


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "nan", "inf"])
def test_non_finite_floats_refused(stage, bad):
    model = STAGE_MODELS[stage]
    for name in _float_fields(model):
        with pytest.raises(ValidationError) as ei:
            model.model_validate({name: bad})
        assert name in str(ei.value)


def test_float_field_discovery():
    assert _float_fields(SplitConfig) == ["imbalance_factor"]
    assert "lr" in _float_fields(TrainExpertConfig)  # lr=inf would pass gt=0 without the check


@pytest.mark.parametrize(
    "stage,data",
    [("eval", {"levels": [0.7, math.nan]}), ("baselines", {"levels": [math.inf]}),
     ("split", {"fractions": {"tuneV": math.nan, "val_small": 0.1, "calib": 0.1, "test": 0.6}})],
)  # fmt: skip
def test_non_finite_inside_containers_refused(stage, data):
    with pytest.raises(ValidationError):
        STAGE_MODELS[stage].model_validate(data)


# --------------------------------------------------------------------------------- split
def test_split_default_fractions_per_protocol():
    paper = SplitConfig()
    assert paper.fractions == PAPER_FRACTIONS and set(paper.fractions) == set(HELDOUT_SPLITS)
    lt = SplitConfig(protocol="fractions")
    assert lt.fractions == PLAN_FRACTIONS and set(lt.fractions) == set(ALL_SPLITS)
    for fr in (PAPER_FRACTIONS, PLAN_FRACTIONS):
        assert math.isclose(sum(fr.values()), 1.0)


@pytest.mark.parametrize(
    "protocol,fractions",
    [
        ("paper", {"tuneV": 0.2, "val_small": 0.1, "calib": 0.1, "test": 0.5}),  # 0.9
        ("paper", {"tuneV": 0.3, "val_small": 0.1, "calib": 0.1, "test": 0.6}),  # 1.1
        ("paper", {"tuneV": 0.2, "val_small": 0.1, "calib": 0.1, "test": 0.6, "train": 0.0}),
        ("paper", {"tuneV": 0.4, "val_small": 0.0, "calib": 0.0, "test": 0.6}),  # empty split
        ("paper", {"tuneV": 0.5, "val_small": -0.1, "calib": 0.0, "test": 0.6}),
        ("fractions", {"train": 0.8, "tuneV": 0.1, "val_small": 0.05, "calib": 0.03, "test": 0.03}),
        ("fractions", {"tuneV": 0.2, "val_small": 0.1, "calib": 0.1, "test": 0.6}),  # no train
        (
            "fractions",
            {"train": 0.7, "tuneV": 0.08, "val_small": 0.06, "calib": 0.03, "test": 0.03},
        ),
    ],
)
def test_fractions_must_partition_one(protocol, fractions):
    with pytest.raises(ValidationError, match="fraction"):
        SplitConfig(protocol=protocol, fractions=fractions)


def test_valid_custom_fractions_accepted():
    q = {s: 0.25 for s in HELDOUT_SPLITS}
    assert SplitConfig(fractions=q).fractions == q
    fr = {"train": 0.6, "tuneV": 0.1, "val_small": 0.1, "calib": 0.1, "test": 0.1}
    assert SplitConfig(protocol="fractions", fractions=fr).fractions == fr


@pytest.mark.parametrize("IF", [0.5, 0.999, 0.0, -3])
def test_imbalance_factor_below_one_refused(IF):
    with pytest.raises(ValidationError, match="imbalance_factor"):
        SplitConfig(imbalance_factor=IF)


@pytest.mark.parametrize("IF", [1, 1.0, 10, 100, 256.5])
def test_imbalance_factor_at_least_one_accepted(IF):
    assert SplitConfig(imbalance_factor=IF).imbalance_factor == float(IF)


def test_dataset_and_protocol_are_closed_sets():
    with pytest.raises(ValidationError, match="dataset"):
        SplitConfig(dataset="mnist")
    with pytest.raises(ValidationError, match="protocol"):
        SplitConfig(protocol="random")


@pytest.mark.parametrize(
    "rule", ["threshold:20", "threshold:0", "quantile:0.5", "quantile:.5", "quantile:0.3,0.7"]
)
def test_group_rule_accepted(rule):
    assert SplitConfig(group_rule=rule).group_rule == rule


@pytest.mark.parametrize(
    "rule",
    ["threshold", "threshold:", "threshold:-1", "threshold:2.5", "quantile:", "quantile:1.5",
     "quantile:0.5,", "quantile:0.7,0.3", "quantile:1", "quantile:0.5\n", "tail:3", "bogus", ""],
)  # fmt: skip
def test_group_rule_syntax_refused(rule):
    with pytest.raises(ValidationError, match="group_rule"):
        SplitConfig(group_rule=rule)


def test_group_rule_default_per_dataset():
    assert SplitConfig(dataset="cifar10").group_rule == "quantile:0.5"
    assert SplitConfig(dataset="cifar100").group_rule == "threshold:20"


# ------------------------------------------------------------------------ train-expert
@pytest.mark.parametrize(
    "loss", ["ce", "balsoftmax", "decoupled", "logitadjust:2", "logitadjust:0.5", "logitadjust:1.5"]
)
def test_loss_spec_accepted(loss):
    assert TrainExpertConfig(loss=loss).loss == loss


@pytest.mark.parametrize(
    "loss",
    ["focal", "CE", " ce", "ce\n", "logitadjust", "logitadjust:", "logitadjust:-1",
     "logitadjust:abc", "logitadjust:2:3", "balsoftmax,ce", ""],
)  # fmt: skip
def test_unknown_loss_spec_refused(loss):
    with pytest.raises(ValidationError, match="loss"):
        TrainExpertConfig(loss=loss)


def test_resolved_device_fixes_precision():
    assert TrainExpertConfig(device="cpu").resolved().precision == "fp32"
    assert TrainExpertConfig(device="cuda").resolved().precision == "bf16"
    assert TrainExpertConfig(device="cuda", precision="fp32").resolved().precision == "fp32"


# ------------------------------------------------------------------------- key payload
def test_key_payload_excludes_runtime_fields(monkeypatch):
    a = SplitConfig(data_root="/a", download=True)
    b = SplitConfig(data_root="/somewhere/else", download=False)
    assert a.key_payload() == b.key_payload()
    assert "data_root" not in a.key_payload() and "download" not in a.key_payload()
    assert SplitConfig(seed=1).key_payload() != SplitConfig(seed=2).key_payload()
    assert TrainExpertConfig(workers=8).key_payload() == TrainExpertConfig().key_payload()
    assert "workers" not in TrainExpertConfig().key_payload()
    assert "infer_batch_size" not in ExportLogitsConfig(infer_batch_size=7).key_payload()
    assert ExportLogitsConfig(chunk_rows=64).key_payload() != ExportLogitsConfig().key_payload()
    monkeypatch.setenv("ARGSE_DATA", "/from/env")
    assert SplitConfig().data_root == "/from/env"  # the runtime default comes from the env


# --------------------------------------------------------------------- pipeline file etc.
def test_load_file_yaml_json_and_errors(tmp_path):
    y = tmp_path / "p.yaml"
    y.write_text("split:\n  seed: 3\n  imbalance_factor: 50\ntrain_expert:\n  epochs: 2\n")
    assert load_file(y) == {
        "split": {"seed": 3, "imbalance_factor": 50},
        "train_expert": {"epochs": 2},
    }
    j = tmp_path / "p.json"
    j.write_text(json.dumps({"split": {"seed": 4}}))
    assert load_file(j) == {"split": {"seed": 4}}
    assert load_file(None) == {}
    (tmp_path / "empty.yaml").write_text("")
    assert load_file(tmp_path / "empty.yaml") == {}
    cases = {
        "bad.yaml": ("split:\n  seed: [1\n", "not valid YAML"),
        "list.yaml": ("- 1\n- 2\n", "mapping"),
        "unknown.yaml": ("spilt:\n  seed: 1\n", "unknown section"),
    }
    for name, (text, msg) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ArgseError, match=msg) as ei:
            load_file(tmp_path / name)
        assert "\n" not in str(ei.value)
    with pytest.raises(ArgseError, match="not found"):
        load_file(tmp_path / "missing.yaml")


def test_parse_set_values():
    got = parse_set(["seed=3", "imbalance_factor=50.5", "download=true", "levels=[0.7, 0.8]",
                     "group_rule=quantile:0.3,0.7", "title=a=b", " epochs = 2"])  # fmt: skip
    assert got == {"seed": 3, "imbalance_factor": 50.5, "download": True, "levels": [0.7, 0.8],
                   "group_rule": "quantile:0.3,0.7", "title": "a=b", "epochs": 2}  # fmt: skip
    assert math.isnan(parse_set(["imbalance_factor=.nan"])["imbalance_factor"])
    assert parse_set(None) == {}
    with pytest.raises(ArgseError, match="field=value"):
        parse_set(["seed"])


def test_validate_errors_are_one_line_naming_field_and_fix():
    cases = [
        ("split", {"bogus": 1}, "split.bogus", "remove it"),
        ("split", {"imbalance_factor": math.nan}, "split.imbalance_factor", "finite"),
        ("split", {"imbalance_factor": 0.5}, "split.imbalance_factor", "argse schema split"),
        ("train-expert", {"loss": "focal"}, "train_expert.loss", "argse train-expert --help"),
        ("split", {"fractions": {"tuneV": 1.0}}, "split", "fix"),
    ]
    for stage, data, field, fix in cases:
        with pytest.raises(ArgseError) as ei:
            validate(stage, data)
        msg = str(ei.value)
        assert "\n" not in msg and msg.startswith(field) and fix in msg and "-- fix:" in msg


def test_pipeline_precedence_section_then_set_then_options(tmp_path):
    p = Pipeline({"split": {"seed": 1, "imbalance_factor": 50}}, Store(tmp_path / "s"))
    assert p.config("split").seed == 1
    p.override("split", parse_set(["seed=2", "protocol=fractions"]))
    assert p.config("split").seed == 2 and p.config("split").protocol == "fractions"
    p.override("split", {"seed": 3, "imbalance_factor": None})  # None = option not given
    cfg = p.config("split")
    assert (cfg.seed, cfg.imbalance_factor, cfg.protocol) == (3, 50.0, "fractions")
    with pytest.raises(ArgseError, match="mapping"):
        Pipeline({"split": [1, 2]}).config("split")


def test_pipeline_expert_losses():
    assert Pipeline({}).expert_losses() == ["ce", "balsoftmax", "logitadjust:2", "decoupled"]
    assert Pipeline({"train_expert": {"losses": "ce, balsoftmax"}}).expert_losses() == [
        "ce",
        "balsoftmax",
    ]
    p = Pipeline({"train_expert": {"losses": ["ce"]}})
    p.override("train-expert", {"losses": ["decoupled"]})
    assert p.expert_losses() == ["decoupled"]
    # 'losses' is a pipeline-level list, not a field of the per-expert config
    assert p.config("train-expert", loss="balsoftmax").loss == "balsoftmax"


def test_split_key_ignores_data_root_but_not_data(tmp_path, synthetic_cifar10):
    from argse_cli.data.synthetic import write_synthetic_cifar10

    store = Store(tmp_path / "store")
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(synthetic_cifar10, copy)
    k1 = Pipeline({"split": {"data_root": str(synthetic_cifar10)}}, store).split_key()
    k2 = Pipeline({"split": {"data_root": str(copy)}}, store).split_key()
    assert k1 == k2  # same bytes elsewhere: same key
    other = tmp_path / "other"
    write_synthetic_cifar10(other, n_train_per_class=200, n_test_per_class=100, seed=1)
    k3 = Pipeline({"split": {"data_root": str(other)}}, store).split_key()
    assert k3 != k1  # different images: different key
    # the fingerprint memo is never written when memo=False (--print-config / --print-key)
    fresh = Store(tmp_path / "fresh")
    assert Pipeline({"split": {"data_root": str(other)}}, fresh, memo=False).split_key() == k3
    assert not fresh.root.exists()


def test_section_names():
    assert section_name("train-expert") == "train_expert"
    assert section_name("split") == "split"
