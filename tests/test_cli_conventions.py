"""CLI conventions (issue 18): --version, help text and defaults on every option, choices as enums,
--set section.field=value, one JSON document from --print-config, --cost (with the hidden --c),
eval's guarantee flags, eval --print-config before the gate exists, report --latest / --all,
`argse schema`, apply's summary line, one-line errors for bad choices."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from conftest import REPO, run_cli
from typer.testing import CliRunner

from argse_cli.cli import app


@pytest.fixture(scope="module")
def env(tmp_path_factory, synthetic_cifar10):
    root = tmp_path_factory.mktemp("conv")
    cfg = root / "pipe.yaml"
    cfg.write_text(yaml.safe_dump({"split": {"imbalance_factor": 10}, "train_expert": {"epochs": 1, "depth": 8}}))
    return {"ARGSE_STORE": str(root / "store"), "ARGSE_DATA": str(synthetic_cifar10), "COLUMNS": "200"}, cfg


def _ok(env, *args) -> str:
    r = CliRunner().invoke(app, list(map(str, args)), env=env[0] if isinstance(env, tuple) else env)
    assert r.exit_code == 0, r.output
    return r.output


def test_version():
    res = run_cli(["--version"])
    assert res.returncode == 0 and res.stdout.startswith("argse 0.1.0")


def test_every_option_has_help_and_choices_are_listed():
    import typer.main

    cmd = typer.main.get_command(app)
    missing = []
    for name, sub in cmd.commands.items():
        if name in ("ls", "show"):  # being reworked on the store branch (argse ls --stage/--json, show)
            continue
        assert sub.help, name
        for p in sub.params:
            if getattr(p, "hidden", False) or p.name == "help":
                continue
            if not (getattr(p, "help", None) or "").strip():
                missing.append(f"{name} {p.opts}")
    assert not missing, missing
    r = CliRunner().invoke(app, ["split", "--help"], env={"COLUMNS": "250"})
    assert "<cifar10|cifar100>" in r.output and "<paper|fractions>" in r.output
    assert "[default: cifar10]" in r.output and "[default: 100.0]" in r.output and "[default: ./artifacts]" in r.output
    r = CliRunner().invoke(app, ["train-gate", "--help"], env={"COLUMNS": "250"})
    assert "<balanced|worst>" in r.output and "--cost" in r.output and "[default: 0.05]" in r.output
    assert "--c " not in r.output  # the old name is accepted, not advertised
    r = CliRunner().invoke(app, ["eval", "--help"], env={"COLUMNS": "250"})
    for flag in ("--target-risk", "--delta", "--conformal-epsilon", "--sag-mode", "--sag-target", "--l2d"):
        assert flag in r.output, flag
    assert "<sensitivity|specificity|success>" in r.output
    r = CliRunner().invoke(app, ["train-expert", "--help"], env={"COLUMNS": "250"})
    assert "<8|20|32|44|56>" in r.output and "ce | balsoftmax | logitadjust:TAU | decoupled" in r.output


def test_bad_choice_is_one_line(tmp_path):
    for args, field in ((["split", "--dataset", "mnist"], "--dataset"), (["train-gate", "--beta", "best"], "--beta"),
                        (["train-expert", "--loss", "focal"], "--loss"), (["split", "--no-such-flag"], "--no-such-flag")):
        res = run_cli(args, env={"ARGSE_STORE": str(tmp_path / "s")})
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert res.returncode == 2 and len(lines) == 1, res.stderr
        assert lines[0].startswith(f"error: {field}: ") and "-- fix: see `" in lines[0], lines[0]
    assert not (tmp_path / "s").exists()


def test_set_section_field(env):
    e, cfg = env
    c = ["--config", cfg]
    own = json.loads(_ok(e, "train-gate", *c, "--print-config", "--set", "train_gate.epochs=3"))
    assert own["config"]["epochs"] == 3
    assert own["key"] == _ok(e, "train-gate", *c, "--print-key", "--set", "epochs=3").strip()
    # an upstream section: the experts trained with 3 epochs, as if the file said so
    base = _ok(e, "train-gate", *c, "--print-key").strip()
    up = _ok(e, "train-gate", *c, "--print-key", "--set", "train_expert.epochs=3").strip()
    doc = yaml.safe_load(cfg.read_text())
    doc["train_expert"]["epochs"] = 3
    cfg3 = cfg.parent / "pipe3.yaml"
    cfg3.write_text(yaml.safe_dump(doc))
    assert up != base and up == _ok(e, "train-gate", "--config", cfg3, "--print-key").strip()
    r = CliRunner().invoke(app, ["train-gate", *map(str, c), "--print-key", "--set", "trian_gate.epochs=3"], env=e)
    assert r.exit_code == 2 and "unknown section 'trian_gate'" in r.output


def test_cost_and_hidden_c_and_eval_flags(env):
    e, cfg = env
    c = ["--config", cfg, "--print-key"]
    keys = {_ok(e, "train-gate", *c, *a).strip() for a in (["--cost", "0.1"], ["--c", "0.1"], ["--set", "c=0.1"])}
    assert len(keys) == 1 and keys != {_ok(e, "train-gate", *c).strip()}
    r = CliRunner().invoke(app, ["train-gate", "--config", str(cfg), "--cost", "0.1", "--c", "0.2"], env=e)
    assert r.exit_code == 2 and "--cost" in r.output
    flags = ["--target-risk", "0.2", "--delta", "0.05", "--conformal-epsilon", "0.2", "--sag-mode", "success",
             "--sag-target", "0.7", "--l2d"]
    sets = ["target_risk=0.2", "delta=0.05", "conformal_epsilon=0.2", "sag_mode=success", "sag_target=0.7", "l2d=true"]
    a = _ok(e, "eval", *c, *flags).strip()
    b = _ok(e, "eval", *c, *[x for s in sets for x in ("--set", s)]).strip()
    assert a == b


def test_print_config_is_one_json_document(env):
    e, cfg = env
    doc = json.loads(_ok(e, "train-expert", "--config", cfg, "--print-config"))
    assert doc["stage"] == "train-expert"
    assert [x["loss"] for x in doc["experts"]] == ["ce", "balsoftmax", "logitadjust:2", "decoupled"]
    assert all(len(x["key"]) == 32 and x["config"]["epochs"] == 1 for x in doc["experts"])
    keys = _ok(e, "train-expert", "--config", cfg, "--print-key").split()
    assert keys == [x["key"] for x in doc["experts"]]


def test_eval_print_config_before_the_gate_exists(env):
    e, cfg = env
    res = run_cli(["eval", "--config", cfg, "--print-config"], env=e[0] if isinstance(e, tuple) else e)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["stage"] == "eval" and doc["gate"]["trained"] is False and len(doc["key"]) == 32
    assert "is not trained yet" in res.stderr
    gate = doc["gate"]["key"]  # a full key that is not in the store: printed too, with the note
    res = run_cli(["eval", "--config", cfg, "--gate", gate, "--print-config"], env=e)
    assert res.returncode == 0 and json.loads(res.stdout)["key"] == doc["key"]
    res = run_cli(["eval", "--config", cfg, "--gate", gate], env=e)  # running it is an error
    assert res.returncode == 2 and res.stderr.startswith("error: key: no complete train-gate artifact")


def test_schema_command_prints_the_shipped_schema():
    out = _ok({}, "schema", "split")
    assert out == (REPO / "schemas" / "split.json").read_text()
    assert (REPO / "argse_cli" / "json_schemas" / "split.json").read_text() == out  # the path the wheel ships
    assert (REPO / "argse_cli" / "configs" / "demo.yaml").is_file()


def test_apply_summary_says_when_everything_is_accepted(tmp_path):
    from argse_cli.cli import accept_summary

    np.savez(tmp_path / "a.npz", pred=np.zeros(4), margin=np.ones(4), accept=np.ones(4, bool))
    assert accept_summary(str(tmp_path / "a.npz")) == (
        "accepted 4 of 4 rows (coverage 1.000): the rule accepts every row (nothing is rejected at this cost)")
    (tmp_path / "b.csv").write_text("row,pred,margin,accept\n0,1,0.5,1\n1,2,-0.1,0\n")
    assert accept_summary(str(tmp_path / "b.csv")) == "accepted 1 of 2 rows (coverage 0.500)"


# ------------------------------------------------------------------- report --latest / --all
def _publish(store, stage, config, upstream, stages, meta=None, version=1) -> str:
    from argse_cli.store import compute_key

    key = compute_key(stage, version, config, upstream)  # writers must be given their config's key
    with store.writer(stage, key, config=config, upstream=upstream, upstream_stages=stages, version=version) as o:
        o.meta.update(meta or {})
    return key


def test_report_inputs_from_the_pipeline_file(tmp_path):
    from argse_cli.cli import pipeline_inputs
    from argse_cli.config import BaselinesConfig, EvalConfig
    from argse_cli.errors import ArgseError
    from argse_cli.pipeline import Pipeline
    from argse_cli.store import Store

    store = Store(tmp_path / "s")
    E, Cal, other = "e" * 32, "c" * 32, "f" * 32
    ecfg, bcfg = EvalConfig().key_payload(), BaselinesConfig().key_payload()

    keys: dict[int, str] = {}

    def k(i):
        return keys[i]

    gates = {1: ("balanced", 42, E), 2: ("worst", 42, E), 3: ("balanced", 43, E), 4: ("balanced", 42, other)}
    for i, (beta, seed, exp) in gates.items():
        keys[i] = _publish(store, "train-gate", {"beta": beta, "seed": seed}, {"export": exp, "calibrate": Cal},
                           {"export": "export-logits", "calibrate": "calibrate"})
    # evals 100-102 of the pipeline; 103: a gate on other logits; 104: another eval config
    for i, (g, cfg) in enumerate([(1, ecfg), (2, ecfg), (3, ecfg), (4, ecfg), (1, {**ecfg, "n_boot": 7})], start=100):
        keys[i] = _publish(store, "eval", cfg, {"gate": k(g)}, {"gate": "train-gate"})
    keys[200] = _publish(store, "baselines", bcfg, {"export": E, "calibrate": Cal, "gate": k(1)},
                         {"export": "export-logits", "calibrate": "calibrate", "gate": "train-gate"})
    p = Pipeline({}, store)
    p.export_ref = lambda: ("export-logits", E)
    p.calibrate_key = lambda: Cal
    def got(latest):
        ev, ba = pipeline_inputs(p, latest=latest)
        return sorted(ev), ba

    assert got(True) == (sorted([k(100), k(101), k(102)]), [k(200)])
    assert got(False) == (sorted([k(100), k(101), k(102)]), [k(200)])
    # a newer eval of gate 1's method and seed (e.g. after a stage version bump)
    keys[105] = _publish(store, "eval", ecfg, {"gate": k(1)}, {"gate": "train-gate"}, version=2)
    assert got(True)[0] == sorted([k(101), k(102), k(105)])
    with pytest.raises(ArgseError, match="2 evals of AR-GSE \\(balanced\\) seed 42"):
        pipeline_inputs(p, latest=False)
    p.calibrate_key = lambda: "d" * 32
    with pytest.raises(ArgseError, match="no eval or baselines artifact of this pipeline"):
        pipeline_inputs(p, latest=True)


def test_report_latest_needs_config(tmp_path):
    r = CliRunner().invoke(app, ["report", "--latest"], env={"ARGSE_STORE": str(tmp_path / "s")})
    assert r.exit_code == 2 and "--config FILE" in r.output
