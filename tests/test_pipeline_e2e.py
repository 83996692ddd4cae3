"""All eight stages end to end on a tiny synthetic CIFAR-10 (CPU), then a rerun that is all cache hits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from argse_cli.cli import app
from argse_cli.data.synthetic import write_synthetic_cifar10
from argse_cli.store import Store

PIPE = {
    "split": {"dataset": "cifar10", "imbalance_factor": 10, "seed": 0},
    # three experts: ce (also the cRT backbone), a logit-adjusted one and cRT; a balsoftmax expert
    # through the CLI is the tiny pipeline's (tests/_tiny.py)
    "train_expert": {"losses": ["ce", "logitadjust:2", "decoupled"], "depth": 8, "epochs": 1,
                     "decoupled_epochs": 1, "warmup_epochs": 0, "batch_size": 64},
    "export_logits": {"chunk_rows": 64},
    "calibrate": {},
    "train_gate": {"epochs": 6, "patience": 4, "batch_size": 64},
    "eval": {"n_boot": 20},
    "baselines": {"n_boot": 0, "seeds": [42], "gate_epochs": 3, "T": 3},
    "report": {"formats": ["png"], "n_boot": 20},
}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    data = root / "data"
    write_synthetic_cifar10(data, n_train_per_class=60, n_test_per_class=40, seed=1)
    cfg = root / "pipe.yaml"
    cfg.write_text(yaml.safe_dump(PIPE))
    return {"ARGSE_STORE": str(root / "store"), "ARGSE_DATA": str(data)}, cfg


def _run(runner, env, *args):
    r = runner.invoke(app, list(args), env=env, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.output


def _all_stages(runner, env, cfg):
    c = ["--config", str(cfg)]
    outs = [
        _run(runner, env, "split", *c, "-q"),
        _run(runner, env, "train-expert", *c, "-q"),
        _run(runner, env, "export-logits", *c, "-q"),
        _run(runner, env, "calibrate", *c, "-q"),
        _run(runner, env, "train-gate", *c, "-q"),
        _run(runner, env, "train-gate", *c, "--beta", "worst", "--xi", "1.0", "--set", "T=3", "-q"),
    ]
    gb = _run(runner, env, "train-gate", *c, "--print-key").strip()
    gw = _run(runner, env, "train-gate", *c, "--beta", "worst", "--xi", "1.0", "--set", "T=3", "--print-key").strip()
    outs += [_run(runner, env, "eval", *c, "--gate", gb, "-q"), _run(runner, env, "eval", *c, "--gate", gw, "-q"),
             _run(runner, env, "baselines", *c, "-q")]
    eb = _run(runner, env, "eval", *c, "--gate", gb, "--print-key").strip()
    ew = _run(runner, env, "eval", *c, "--gate", gw, "--print-key").strip()
    bk = _run(runner, env, "baselines", *c, "--print-key").strip()
    outs.append(_run(runner, env, "report", *c, "--eval", eb, "--eval", ew, "--baselines", bk, "-q"))
    return outs, (gb, gw, eb, ew, bk)


def test_pipeline_end_to_end_then_all_cached(env):
    env_vars, cfg = env
    runner = CliRunner()
    first, keys = _all_stages(runner, env_vars, cfg)
    assert all("cached" not in o for o in first[1:6])
    store = Store(env_vars["ARGSE_STORE"])
    stages = {a.stage for a in store.list()}
    assert stages == {"split", "train-expert", "export-logits", "calibrate", "train-gate", "eval", "baselines", "report"}

    second, keys2 = _all_stages(runner, env_vars, cfg)
    assert keys2 == keys
    for o in second:
        assert "wrote" not in o and "cached" in o

    # eval output names both views and states the AURC convention
    ev = store.open("eval", keys[2])
    m = ev.json("metrics.json")
    assert set(m["sweep"]["views"]) == {"lt", "bal"}
    assert "0.01" in m["sweep"]["aurc_convention"]
    score = ev.array("test/score")
    assert np.isfinite(score).all()

    # fp16 export equals a float32 forward pass within fp16 tolerance
    from argse_cli.data.images import load_images, split_arrays
    from argse_cli.experts.trainer import load_model, predict_logits

    exp = store.open("export-logits", store.open("train-gate", keys[0]).upstream_keys["export"])
    split = exp.upstream("split")
    x, _ = split_arrays(split, "test", load_images(split))
    order = exp.array("test/row_order")
    f16 = exp.array("test/logits")
    for e, ex in enumerate(exp.upstream("experts")):
        model = load_model(ex.file("model.safetensors").read_bytes(), ex.meta["depth"], 10)
        f32 = predict_logits(model, x[order]).numpy()
        np.testing.assert_allclose(f16[:, e].astype(np.float32), f32, rtol=2e-3, atol=2e-2)

    rep = store.open("report", _report_key(store))
    assert "main.tex" in rep.manifest["files"]
    shown = _run(runner, env_vars, "show", rep.key[:12])
    assert f"files: {rep.path / 'files'}" in shown and "rc_balanced_lt.png" in shown.split("figures:")[1]
    assert json.loads(rep.file("summary.json").read_text())


def _report_key(store):
    return [a for a in store.list() if a.stage == "report"][0].key
