"""Benchmark: wall time of the all-cache-hit rerun of the `make demo` command sequence (CPU).

The sequence is the Makefile's ``demo`` recipe, one ``argse`` process per invocation, the nested
``$(argse ... --print-key)`` calls included (17 processes): split, train-expert, export-logits,
calibrate, train-gate x2, eval x2, baselines, report.

Mode ``demo-store``: when ARGSE_STORE holds a completed demo (the report artifact of
configs/demo.yaml exists) the sequence is timed once more on it (every stage must answer
"cached"); reference = null. Mode ``synthetic`` otherwise: a tiny synthetic CIFAR-10 and
configs/demo.yaml with tiny sizes in a temp store; the sequence runs once cold (the reference)
and then again (the value; every stage must answer "cached"). One JSON line.

    python bench/bench_cache_hit.py [--mode auto|synthetic|demo-store]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import commit  # noqa: E402

DEMO = ROOT / "configs" / "demo.yaml"
# Tiny sizes over configs/demo.yaml for the synthetic mode (a few minutes cold on 2 cores).
TINY = {
    "split": {"imbalance_factor": 10},
    "train_expert": {"epochs": 1, "decoupled_epochs": 1, "batch_size": 64},
    "export_logits": {"chunk_rows": 64},
    "train_gate": {"epochs": 6, "tau_warmup_epochs": 2, "patience": 4, "batch_size": 64},
    "eval": {"n_boot": 20, "refit_grid": [0.8, 1.0]},
    "baselines": {"n_boot": 0, "gate_epochs": 3},
    "report": {"formats": ["png"]},
}


def argse_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("argse")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "argse_cli.cli"]


class Runner:
    """Runs argse invocations, counting them and collecting the non-print-key outputs."""

    def __init__(self, env: dict, cwd: Path):
        self.env, self.cwd, self.calls, self.outputs = env, cwd, 0, []

    def __call__(self, *args: str) -> str:
        self.calls += 1
        p = subprocess.run(
            [*argse_cmd(), *args], env=self.env, cwd=self.cwd, capture_output=True, text=True,
            timeout=3600,
        )  # fmt: skip
        if p.returncode != 0:
            raise SystemExit(f"argse {' '.join(args)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
        if "--print-key" in args:
            return p.stdout.strip()
        self.outputs.append((args[0], p.stdout + p.stderr))
        return p.stdout


def demo_sequence(run: Runner, cfg: str, out_dir: str) -> None:
    """The Makefile's demo recipe, invocation for invocation."""
    c = ["--config", cfg]
    worst = ["--beta", "worst", "--xi", "1.0"]
    run("split", *c)
    run("train-expert", *c)
    run("export-logits", *c)
    run("calibrate", *c)
    run("train-gate", *c, "--beta", "balanced")
    run("train-gate", *c, *worst)
    run("eval", *c, "--gate", run("train-gate", *c, "--beta", "balanced", "--print-key"))
    run("eval", *c, "--gate", run("train-gate", *c, *worst, "--print-key"))
    run("baselines", *c)
    eb = run("eval", *c, "--gate", run("train-gate", *c, "--beta", "balanced", "--print-key"),
             "--print-key")  # fmt: skip
    ew = run("eval", *c, "--gate", run("train-gate", *c, *worst, "--print-key"), "--print-key")
    bk = run("baselines", *c, "--print-key")
    run("report", *c, "--out", out_dir, "--eval", eb, "--eval", ew, "--baselines", bk)


def completed_demo_key(env: dict) -> str | None:
    """The demo's report key if ARGSE_STORE holds that report artifact, else None."""
    from argse_cli.store import Store

    store = env.get("ARGSE_STORE")
    if not store or not Path(store).is_dir():
        return None
    run = Runner(env, ROOT)
    c = ["--config", str(DEMO)]
    worst = ["--beta", "worst", "--xi", "1.0"]
    try:
        eb = run("eval", *c, "--gate", run("train-gate", *c, "--beta", "balanced", "--print-key"),
                 "--print-key")  # fmt: skip
        ew = run("eval", *c, "--gate", run("train-gate", *c, *worst, "--print-key"), "--print-key")
        bk = run("baselines", *c, "--print-key")
        key = run("report", *c, "--eval", eb, "--eval", ew, "--baselines", bk, "--print-key")
    except SystemExit:
        return None
    return key if Store(store).exists("report", key) else None


def _timed(run: Runner, cfg: str, out_dir: str) -> float:
    t0 = time.perf_counter()
    demo_sequence(run, cfg, out_dir)
    return time.perf_counter() - t0


def _all_cached(outputs: list) -> list[str]:
    """Invocations whose output does not say 'cached'."""
    return [stage for stage, text in outputs if "cached" not in text]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("auto", "synthetic", "demo-store"), default="auto")
    a = ap.parse_args()
    env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    mode = a.mode
    if mode in ("auto", "demo-store"):
        key = completed_demo_key(env)
        if key is None and mode == "demo-store":
            raise SystemExit("ARGSE_STORE holds no completed demo (run `make demo` first)")
        mode = "demo-store" if key else "synthetic"

    if mode == "demo-store":
        run = Runner(env, ROOT)
        value = _timed(run, str(DEMO), "reports/demo")
        reference, ref_kind = None, "none (the demo's first run was not timed here)"
        where = env["ARGSE_STORE"]
    else:
        import yaml

        from argse_cli.data.synthetic import write_synthetic_cifar10

        tmp = Path(tempfile.mkdtemp(prefix="bench_cache_"))
        try:
            doc = yaml.safe_load(DEMO.read_text()) or {}
            for sec, over in TINY.items():
                doc.setdefault(sec, {}).update(over)
            cfg = tmp / "demo_tiny.yaml"
            cfg.write_text(yaml.safe_dump(doc))
            write_synthetic_cifar10(tmp / "data", n_train_per_class=60, n_test_per_class=40, seed=1)
            env = {**env, "ARGSE_STORE": str(tmp / "store"), "ARGSE_DATA": str(tmp / "data")}
            cold = Runner(env, tmp)
            reference = _timed(cold, str(cfg), str(tmp / "reports"))
            run = Runner(env, tmp)
            value = _timed(run, str(cfg), str(tmp / "reports"))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        ref_kind = "cold first run of the same sequence"
        where = (
            "temp store, synthetic CIFAR-10 (60/class train, 40/class test), demo.yaml + tiny sizes"
        )
    missed = _all_cached(run.outputs)
    print(
        json.dumps(
            {
                "name": "demo_cache_hit_rerun",
                "value": round(value, 3),
                "unit": "s",
                "reference": None if reference is None else round(reference, 3),
                "ratio": None if reference is None else round(value / reference, 4),
                "device": "cpu",
                "commit": commit(),
                "mode": mode,
                "store": where,
                "reference_kind": ref_kind,
                "invocations": run.calls,
                "per_invocation_s": round(value / run.calls, 3),
                "all_cached": not missed,
                "not_cached": missed,
            }
        )
    )


if __name__ == "__main__":
    main()
