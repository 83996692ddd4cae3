"""Benchmark: wall time of the all-cache-hit rerun of `make demo` (CPU).

Runs the Makefile's ``demo`` target itself (``make -s demo VENV=<this interpreter's venv> ...``),
so the timed sequence is the recipe, whatever it holds (scripts/demo.sh: each stage one ``argse``
process, the export-to-files + import-logits round trip, apply unless its output is this gate's).

Mode ``demo-store``: when ARGSE_STORE holds a completed demo (the report artifact of
configs/demo.yaml exists) ``make demo`` is timed once more on it (every stage must answer
"cached"); reference = null. Mode ``synthetic`` otherwise: a tiny synthetic CIFAR-10 and
configs/demo.yaml with tiny sizes, everything in a temp directory (DEMO_CFG, STORE, DATA, DEMO_OUT,
DEMO_IMPORT); ``make demo`` runs once cold (the reference) and then again (the value; every stage
must answer "cached"). One JSON line.

    python bench/bench_cache_hit.py [--mode auto|synthetic|demo-store]
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
    "train_gate": {"epochs": 6, "patience": 4, "batch_size": 64},
    "eval": {"n_boot": 20},
    "baselines": {"n_boot": 0, "gate_epochs": 3},
    "report": {"formats": ["png"]},
}


def argse_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("argse")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "argse_cli.cli"]


def _print_key(env: dict, *args: str) -> str:
    """``argse ARGS --print-key`` (SystemExit on failure)."""
    p = subprocess.run([*argse_cmd(), *args, "--print-key"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    if p.returncode != 0:
        raise SystemExit(f"argse {' '.join(args)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p.stdout.strip()


def completed_demo_key(env: dict) -> str | None:
    """The demo's report key if ARGSE_STORE holds that report artifact, else None."""
    from argse_cli.store import Store

    store = env.get("ARGSE_STORE")
    if not store or not Path(store).is_dir():
        return None
    c = ["--config", str(DEMO)]
    worst = ["--beta", "worst", "--xi", "1.0"]
    try:
        eb = _print_key(env, "eval", *c, "--gate", _print_key(env, "train-gate", *c, "--beta", "balanced"))
        ew = _print_key(env, "eval", *c, "--gate", _print_key(env, "train-gate", *c, *worst))
        bk = _print_key(env, "baselines", *c)
        key = _print_key(env, "report", *c, "--eval", eb, "--eval", ew, "--baselines", bk)
    except SystemExit:
        return None
    return key if Store(store).exists("report", key) else None


STAGE_LINE = re.compile(r"^(cached|wrote) [0-9a-f]{32}\b", re.M)


def make_demo(env: dict, **make_vars: str) -> tuple[float, list[str]]:
    """Time ``make demo`` with this interpreter's venv; returns (seconds, per-stage result lines
    'cached KEY' / 'wrote KEY'). The venv's install stamp is never remade (``-o``)."""
    venv = Path(sys.prefix)
    if not (venv / "bin" / "argse").is_file():
        raise SystemExit(f"no argse in {venv / 'bin'}: run from the project's venv (make install)")
    cmd = ["make", "-s", "--no-print-directory", "-o", f"{venv}/.installed", "demo",
           f"VENV={venv}", *(f"{k}={v}" for k, v in make_vars.items())]  # fmt: skip
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=7200)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return dt, [m.group(0) for m in STAGE_LINE.finditer(p.stdout + p.stderr)]


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
        store = env["ARGSE_STORE"]
        value, lines = make_demo(env, STORE=store, DATA=env.get("ARGSE_DATA", "data"))
        reference, ref_kind = None, "none (the demo's first run was not timed here)"
        where = store
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
            dirs = {"DEMO_CFG": str(cfg), "STORE": str(tmp / "store"), "DATA": str(tmp / "data"),
                    "DEMO_OUT": str(tmp / "reports"), "DEMO_IMPORT": str(tmp / "import")}  # fmt: skip
            reference, _ = make_demo(env, **dirs)
            value, lines = make_demo(env, **dirs)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        ref_kind = "cold first run of the same target"
        where = (
            "temp store, synthetic CIFAR-10 (60/class train, 40/class test), demo.yaml + tiny sizes"
        )
    missed = [ln for ln in lines if not ln.startswith("cached")]
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
                "stage_runs": len(lines),
                "all_cached": not missed,
                "not_cached": missed,
            }
        )
    )


if __name__ == "__main__":
    main()
