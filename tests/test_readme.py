"""The README's fenced code blocks, checked and run.

Fast (default suite): every block is accounted for (python / bash / console / yaml, or the one
text diagram; a block is skipped only with a written reason); Python blocks compile; shell blocks
parse (`bash -n`) and name only real commands and options; console blocks run and print exactly
what the README shows; the bring-your-own-experts YAML is a valid import config whose group rule
leaves both groups non-empty on CIFAR-10-LT counts.

Slow: every block runs, as written, in a folder holding a demo-like store (the demo's stages on a
tiny synthetic CIFAR-10, `configs/demo.yaml` there being a tiny recipe with the demo's eval
options) and the files the bring-your-own-experts example names.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, run_cli

README = REPO / "README.md"
SKIP = re.compile(r"<!-- readme-test: skip: (.+?) -->\s*$")


@dataclass
class Block:
    lang: str
    body: str
    line: int
    skip: str | None


def blocks() -> list[Block]:
    lines = README.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        j = i + 1
        while not lines[j].startswith("```"):
            j += 1
        skip = SKIP.match(lines[i - 1]) if i else None
        out.append(Block(m.group(1), "\n".join(lines[i + 1 : j]) + "\n", i + 1, skip.group(1) if skip else None))
        i = j + 1
    return out


def _commands(text: str) -> list[list[str]]:
    """Every `argse ...` invocation of a shell block (also inside $(...)), as argv lists."""
    text = text.replace("\\\n", " ")
    parts: list[str] = []
    while (m := re.search(r"\$\(([^()]*)\)", text)) is not None:  # innermost command substitutions first
        parts.append(m.group(1))
        text = text[: m.start()] + "SUBST" + text[m.end() :]
    parts += text.splitlines()
    found = []
    for part in parts:
        for seg in re.split(r"&&|;|\|", part.split(" #")[0]):
            words = shlex.split(seg)
            if words and words[0] == "argse":
                found.append(words[1:])
    return found


def test_every_block_is_accounted_for():
    bs = blocks()
    assert {b.lang for b in bs} <= {"bash", "python", "yaml", "console", ""}
    assert [b.body for b in bs if b.lang == ""] == [
        "split -> train-expert -> export-logits -> calibrate -> train-gate -> eval / baselines -> report\n"]
    skipped = [b for b in bs if b.skip]
    assert len(skipped) == 1 and skipped[0].body.startswith("make demo") and "make test" in skipped[0].body
    assert sum(b.lang == "python" for b in bs) >= 2 and sum(b.lang == "bash" for b in bs) >= 3


def test_python_blocks_compile():
    for b in blocks():
        if b.lang == "python":
            compile(b.body, f"README.md:{b.line}", "exec")


def test_shell_blocks_parse_and_name_real_commands_and_options():
    import typer.main

    from argse_cli.cli import app

    cmds = typer.main.get_command(app).commands
    n = 0
    for b in blocks():
        if b.lang != "bash" or b.skip:
            continue
        res = subprocess.run(["bash", "-n"], input=b.body, capture_output=True, text=True)
        assert res.returncode == 0, (b.line, res.stderr)
        for argv in _commands(b.body):
            assert argv[0] in cmds, (b.line, argv)
            opts = {o for p in cmds[argv[0]].params for o in [*p.opts, *p.secondary_opts]}
            for a in argv[1:]:
                if a.startswith("--"):
                    assert a in opts, (b.line, argv[0], a)
            n += 1
    assert n >= 8


def test_console_blocks_print_what_the_readme_shows(tmp_path):
    for b in blocks():
        if b.lang != "console":
            continue
        lines = b.body.splitlines()
        cmd, want = lines[0], lines[1:]
        assert cmd.startswith("$ argse ")
        res = run_cli(shlex.split(cmd[len("$ argse "):]), env={"ARGSE_STORE": str(tmp_path / "s")})
        got = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
        assert got == want, (b.line, got)
        assert not (tmp_path / "s").exists()


def _byoe_yaml() -> tuple[str, dict]:
    b = next(b for b in blocks() if b.lang == "yaml" and "import_logits" in b.body)
    name = b.body.splitlines()[0].lstrip("# ").strip()
    return name, yaml.safe_load(b.body)


def test_byoe_yaml_is_a_valid_import_config_for_cifar10_counts():
    from argse_cli.config import ImportLogitsConfig
    from argse_cli.data.groups import get_class_to_group
    from argse_cli.data.longtail import lt_class_counts

    name, doc = _byoe_yaml()
    assert name == "my_experts.yaml"
    cfg = ImportLogitsConfig.model_validate(doc["import_logits"])
    c2g = np.asarray(get_class_to_group(lt_class_counts(5000, 10, 100), cfg.group_rule))  # CIFAR-10-LT, IF 100
    assert set(c2g.tolist()) == {0, 1}


# --------------------------------------------------------------------------------- slow
TINY = {
    "split": {"dataset": "cifar10", "imbalance_factor": 10, "seed": 0},
    "train_expert": {"losses": ["ce", "balsoftmax", "logitadjust:2", "decoupled"], "depth": 8, "epochs": 1,
                     "decoupled_epochs": 1, "warmup_epochs": 0, "batch_size": 64},
    "export_logits": {"chunk_rows": 64},
    "calibrate": {},
    "train_gate": {"epochs": 4, "patience": 2, "batch_size": 64},
    # the demo's eval options (the README's eval command must be a cache hit)
    "eval": {"n_boot": 20, "target_risk": 0.1, "delta": 0.1, "conformal_epsilon": 0.1, "sag_mode": "sensitivity",
             "sag_target": 0.8, "l2d": True},
    "baselines": {"n_boot": 0, "seeds": [42], "ablations": False, "T": 3},
    "report": {"formats": ["png", "pdf"], "n_boot": 20, "band_boot": 20,
               "banner": "smoke recipe: experts trained {expert_epochs} epochs; numbers are not meaningful"},
}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """A folder like the repository after `make demo`: configs/demo.yaml (tiny), ./artifacts, and an
    `argse` on the PATH that runs this checkout."""
    from argse_cli.data.synthetic import write_synthetic_cifar10

    w = tmp_path_factory.mktemp("readme")
    write_synthetic_cifar10(w / "data", n_train_per_class=60, n_test_per_class=40, seed=1)
    (w / "configs").mkdir()
    (w / "configs" / "demo.yaml").write_text(yaml.safe_dump(TINY))
    (w / "bin").mkdir()
    (w / "bin" / "argse").write_text(f'#!/bin/sh\nexec {sys.executable} -m argse_cli.cli "$@"\n')
    (w / "bin" / "argse").chmod(0o755)
    env = {**os.environ, "PATH": f"{w / 'bin'}:{os.environ['PATH']}", "ARGSE_DATA": str(w / "data"),
           "PYTHONPATH": str(REPO), "COLUMNS": "160", "PYTHONUNBUFFERED": "1"}
    env.pop("ARGSE_STORE", None)  # the default ./artifacts, as after make demo
    D = "--config configs/demo.yaml"
    script = f"""set -e
argse split {D}
argse train-expert {D}
argse export-logits {D}
argse calibrate {D}
argse train-gate {D} --beta balanced
argse train-gate {D} --beta worst --xi 1.0 --set T=3
argse eval {D} --gate $(argse train-gate {D} --beta balanced --print-key)
argse eval {D} --gate $(argse train-gate {D} --beta worst --xi 1.0 --set T=3 --print-key)
argse baselines {D}
"""
    res = subprocess.run(["bash", "-c", script], cwd=w, env=env, capture_output=True, text=True, timeout=3000)
    assert res.returncode == 0, res.stderr[-4000:]
    _byoe_files(w)
    return w, env, res


def _byoe_files(w: Path) -> None:
    """The files the README's bring-your-own-experts example names, from the tiny store's export
    (experts ce and logitadjust:2), with CIFAR-10-LT training counts."""
    from argse_cli.data.longtail import lt_class_counts
    from argse_cli.store import Store

    store = Store(w / "artifacts")
    exp = next(a for a in store.list() if a.stage == "export-logits")
    losses = [e["loss"] for e in exp.meta["experts"]]
    ce, la = losses.index("ce"), losses.index("logitadjust:2")
    name = {"tuneV": "tuneV", "val_small": "val", "calib": "calib", "test": "test"}
    la_parts = {}
    for s, short in name.items():
        L, y = exp.array(f"{s}/logits"), exp.array(f"{s}/labels")
        np.save(w / f"ce_{'val' if s == 'val_small' else s}.npy", L[:, ce])
        la_parts[short] = L[:, la]
        np.save(w / f"y_{short}.npy", y)
    np.savez(w / "la.npz", **la_parts)
    (w / "train_counts.json").write_text(str(list(map(int, lt_class_counts(5000, 10, 100)))))
    np.save(w / "new_ce.npy", exp.array("test/logits")[:, ce])
    np.save(w / "new_la.npy", exp.array("test/logits")[:, la])


@pytest.mark.slow
def test_readme_blocks_run_as_written(demo_dir):
    w, env, build = demo_dir
    # noise: the synthetic data's MD5 note is printed once (by split), not by every stage
    assert build.stderr.count("MD5 differs") == 1, build.stderr[-3000:]
    name, _ = _byoe_yaml()
    ran = []
    for b in blocks():
        if b.skip or b.lang == "":
            continue
        if b.lang == "yaml":
            (w / name).write_text(b.body)
            continue
        if b.lang == "console":
            cmd, want = b.body.splitlines()[0], b.body.splitlines()[1:]
            res = subprocess.run(["bash", "-c", cmd[2:]], cwd=w, env=env, capture_output=True, text=True, timeout=600)
            assert [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()] == want
        elif b.lang == "bash":
            res = subprocess.run(["bash", "-ec", b.body], cwd=w, env=env, capture_output=True, text=True, timeout=1800)
            assert res.returncode == 0, (b.line, res.stdout[-2000:], res.stderr[-4000:])
            if "--target-risk" in b.body:  # the README's eval command = configs/demo.yaml's eval section
                assert "cached" in res.stdout, res.stdout
            if "argse apply" in b.body:
                assert "accepted" in res.stdout and "of" in res.stdout
        elif b.lang == "python":
            if "argse_cli.results" in b.body:
                pytest.importorskip("pandas", reason="argse_cli.results needs the optional pandas extra")
            res = subprocess.run([sys.executable, "-c", b.body], cwd=w, env=env, capture_output=True, text=True,
                                 timeout=900)
            assert res.returncode == 0, (b.line, res.stderr[-4000:])
        ran.append(b.line)
    assert len(ran) == sum(1 for b in blocks() if not b.skip and b.lang in ("bash", "python", "console"))
    assert (w / "reports" / "demo" / "main.tex").is_file() and (w / "results.csv").is_file()
    assert "smoke recipe: experts trained 1 epochs" in (w / "reports" / "demo" / "main.tex").read_text()
    assert (w / "rc_worst_bal.png").read_bytes()[:4] == b"\x89PNG" and (w / "decisions.npz").is_file()
