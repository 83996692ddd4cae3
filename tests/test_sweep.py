"""`argse sweep`: plan = the CLI's keys, submitit local == sequential CLI runs, reruns are no-ops,
a killed job resubmitted leaves exactly one intact artifact.

Synthetic CIFAR-10 (40 train / 30 test images per class, IF = 10), ResNet-8, 1 epoch, CPU.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import xxhash
import yaml
from typer.testing import CliRunner

from argse_cli.cli import app
from argse_cli.data.synthetic import write_synthetic_cifar10
from argse_cli.errors import ArgseError
from argse_cli.store import Store
from argse_cli.sweep import (
    STAGE_ORDER,
    SubmititExecutor,
    SweepSpec,
    execute,
    expand,
    load_sweep_file,
    point_doc,
    sweep_command,
)

PIPE = {
    "split": {"dataset": "cifar10", "imbalance_factor": 10, "seed": 0},
    "train_expert": {
        "depth": 8,
        "epochs": 1,
        "warmup_epochs": 0,
        "batch_size": 64,
        "device": "cpu",
        "decoupled_epochs": 1,
    },
    "export_logits": {"chunk_rows": 64, "device": "cpu"},
    "train_gate": {"epochs": 3, "patience": 2, "batch_size": 64},
    "eval": {"n_boot": 10},
    "baselines": {"n_boot": 0, "gate_epochs": 2, "T": 2},
    "report": {"formats": ["png"]},
}
SEEDS, LOSSES = [42, 43], ["ce", "balsoftmax"]
# history.json holds wall-clock timings; model.safetensors is compared by its decoded tensors
# (the safetensors header's metadata order is not stable across processes)
UNSTABLE_FILES = {"history.json", "model.safetensors", "metrics.jsonl"}  # timings per epoch


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    data = root / "data"
    write_synthetic_cifar10(data, n_train_per_class=40, n_test_per_class=30, seed=0)
    cfg = root / "pipe.yaml"
    cfg.write_text(yaml.safe_dump(PIPE))
    mp = pytest.MonkeyPatch()
    mp.setenv("ARGSE_DATA", str(data))
    mp.setenv("OMP_WAIT_POLICY", "PASSIVE")  # 2 cores shared by several job processes
    yield {"root": root, "data": data, "cfg": cfg}
    mp.undo()


def _cli(*args: str, store) -> str:
    r = CliRunner().invoke(app, [*args, "--store", str(store)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.output


@pytest.fixture(scope="module")
def sequential(world):
    """The same runs done one by one with the stage commands, in this process (own store)."""
    store = world["root"] / "store-seq"
    c = ["--config", str(world["cfg"])]
    _cli("split", *c, "-q", store=store)
    for s in SEEDS:
        _cli(
            "train-expert",
            *c,
            "--seed",
            str(s),
            "--loss",
            "ce",
            "--loss",
            "balsoftmax",
            "-q",
            store=store,
        )
    return Store(store)


def _weights_digest(path) -> str:
    from safetensors.numpy import load_file

    t = load_file(str(path))
    return xxhash.xxh3_128_hexdigest(b"".join(n.encode() + t[n].tobytes() for n in sorted(t)))


def _sums(store: Store) -> dict:
    """(stage, key) -> whole/per-chunk xxh3 of every array (decoded bytes), stable file digests
    and the decoded model weights."""
    out = {}
    for a in store.list():
        arrays = {n: (i["xxh3"], tuple(i["chunk_xxh3"])) for n, i in a.manifest["arrays"].items()}
        files = {n: d for n, d in a.manifest["files"].items() if n not in UNSTABLE_FILES}
        if "model.safetensors" in a.manifest["files"]:
            files["weights"] = _weights_digest(a.file("model.safetensors"))
        out[(a.stage, a.key)] = (arrays, files)
    return out


def _plan(world, store, **spec):
    doc, _ = load_sweep_file(world["cfg"])
    return expand(doc, SweepSpec(**spec), Store(store), memo=False)


# ------------------------------------------------------------------------- planning (fast)
def test_plan_keys_equal_the_stage_commands(world, tmp_path):
    """Every planned key is what `argse <stage> --print-key` gives for that grid point's file."""
    store = tmp_path / "s"
    plan = _plan(
        world, store, seeds=(42, 43), losses=("ce", "decoupled"), betas=("balanced", "worst")
    )
    assert [r.stage for r in plan] == sorted((r.stage for r in plan), key=STAGE_ORDER.index)
    by = {(r.stage, tuple(sorted(r.point.items()))): r for r in plan}
    assert len({(r.stage, r.key) for r in plan}) == len(plan)  # deduplicated
    # 1 shared split, 2 x {ce, decoupled} experts, 2 exports, 2 calibrations, 4 gates, 4 evals,
    # 2 baselines (first beta), 1 report
    counts = {st: sum(r.stage == st for r in plan) for st in STAGE_ORDER}
    assert counts == {
        "split": 1,
        "train-expert": 4,
        "export-logits": 2,
        "calibrate": 2,
        "train-gate": 4,
        "eval": 4,
        "baselines": 2,
        "report": 1,
    }
    for seed in (42, 43):
        f = tmp_path / f"point{seed}.yaml"
        f.write_text(yaml.safe_dump(point_doc(PIPE, seed, ["ce", "decoupled"], "worst")))
        c = ["--config", str(f), "--print-key"]
        exp_keys = _cli("train-expert", *c, store=store).split()
        assert exp_keys == [
            by[("train-expert", (("loss", l), ("seed", seed)))].key for l in ("ce", "decoupled")
        ]
        pt = (("beta", "worst"), ("seed", seed))
        assert _cli("train-gate", *c, store=store).strip() == by[("train-gate", pt)].key
        assert _cli("eval", *c, store=store).strip() == by[("eval", pt)].key
        assert (
            _cli("calibrate", *c, store=store).strip() == by[("calibrate", (("seed", seed),))].key
        )
        g = tmp_path / f"pointb{seed}.yaml"
        g.write_text(yaml.safe_dump(point_doc(PIPE, seed, ["ce", "decoupled"], "balanced")))
        bkey = _cli("baselines", "--config", str(g), "--print-key", store=store).strip()
        assert bkey == by[("baselines", (("beta", "balanced"), ("seed", seed)))].key
    # levels: split 0, ce 1, decoupled 2 (reads the ce backbone), export 3, ..., report last
    lv = {(r.stage, r.point.get("loss")): r.level for r in plan}
    assert lv[("split", None)] == 0 and lv[("train-expert", "ce")] == 1
    assert lv[("train-expert", "decoupled")] == 2 and lv[("export-logits", None)] == 3
    assert lv[("report", None)] == max(r.level for r in plan)
    rep = plan[-1]
    assert rep.upstream["evals"] == [r.key for r in plan if r.stage == "eval"]
    assert rep.upstream["baselines"] == [r.key for r in plan if r.stage == "baselines"]
    # seeds do not touch the split unless full_reruns; then one split per seed
    full = _plan(world, store, seeds=(42, 43), losses=("ce",), full_reruns=True, until="split")
    assert [r.config.seed for r in full] == [42, 43]
    assert not store.exists()  # planning wrote nothing (no fingerprint memo either)


def test_sweep_section_and_cli_axes(world, tmp_path, capsys):
    f = tmp_path / "with_sweep.yaml"
    f.write_text(
        yaml.safe_dump(
            {**PIPE, "sweep": {"seeds": [7, 8], "losses": ["ce"], "until": "train-expert"}}
        )
    )
    assert sweep_command(f, tmp_path / "s", dry_run=True) == 0
    out = capsys.readouterr().out.splitlines()
    assert [ln.split()[2] for ln in out[:-1]] == ["split", "train-expert", "train-expert"]
    assert "seed=7 loss=ce" in out[1] and "seed=8 loss=ce" in out[2]
    assert sweep_command(f, tmp_path / "s", seeds="9", losses=["ce,balsoftmax"], dry_run=True) == 0
    out = capsys.readouterr().out.splitlines()
    assert [ln.split("  ")[-1] for ln in out[1:3]] == ["seed=9 loss=ce", "seed=9 loss=balsoftmax"]
    assert out[-1] == "3 runs: 0 cached, 3 to run"
    for kw, field in [
        ({"seeds": "4,x"}, "--seeds"),
        ({"seeds": "-1"}, "sweep.seeds"),
        ({"betas": ["best"]}, "sweep.betas"),
        ({"until": "nope"}, "sweep.until"),
        ({"losses": ["hinge"]}, "train_expert.loss"),
        ({"executor": "ray"}, "--executor"),
    ]:
        with pytest.raises(ArgseError) as e:
            sweep_command(world["cfg"], tmp_path / "s", **{"losses": ["ce"], **kw})
        assert e.value.field.startswith(field), e.value.field
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**PIPE, "sweep": {"seed": [1]}}))
    with pytest.raises(ArgseError, match="sweep.seed"):
        sweep_command(bad, tmp_path / "s", dry_run=True)


def test_slurm_job_array_parameters(tmp_path):
    from submitit.slurm.slurm import _make_sbatch_string

    ex = SubmititExecutor(
        "slurm",
        folder=tmp_path,
        partition="gpu",
        gpus_per_job=2,
        timeout_min=90,
        array_parallelism=3,
        cpus_per_task=8,
        slurm_params={"account": "lab"},
    )
    params = ex.slurm_parameters("argse-train-expert")
    text = _make_sbatch_string(command="python -m x", folder=str(tmp_path), map_count=5, **params)
    for flag in (
        "--partition=gpu",
        "--gpus-per-node=2",
        "--time=90",
        "--array=0-4%3",
        "--cpus-per-task=8",
        "--account=lab",
        "--job-name=argse-train-expert",
    ):
        assert f"#SBATCH {flag}" in text
    with pytest.raises(ArgseError):
        SubmititExecutor("slurm", folder=tmp_path, array_parallelism=0)


# ------------------------------------------------------------------ execution (the acceptance)
@pytest.mark.slow  # ~20 s on 2 cores (five training jobs through submitit's local executor)
def test_local_executor_equals_sequential_then_nothing_to_submit(
    world, sequential, tmp_path, capsys
):
    store = tmp_path / "store-local"
    kw = dict(seeds="42,43", losses=LOSSES, until="train-expert", quiet=True)
    rc = sweep_command(
        world["cfg"], store, executor="local", array_parallelism=4, folder=tmp_path / "jobs", **kw
    )
    assert rc == 0
    jobs = sorted(p.name for p in (tmp_path / "jobs").iterdir())
    assert sum(n.endswith("_result.pkl") for n in jobs) == 5  # split + 2 seeds x 2 losses
    got, want = _sums(Store(store)), _sums(sequential)
    assert set(got) == set(want) and len(got) == 5
    assert got == want  # keys and every array checksum (decoded bytes) + model weights
    capsys.readouterr()
    # second sweep: all cached, nothing submitted
    assert sweep_command(world["cfg"], store, executor="local", folder=tmp_path / "jobs", **kw) == 0
    assert sorted(p.name for p in (tmp_path / "jobs").iterdir()) == jobs
    assert sweep_command(world["cfg"], store, dry_run=True, **{**kw, "quiet": False}) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "5 runs: 5 cached, 0 to run"
    assert all(ln.startswith("cached ") for ln in lines[:-1])
    keys = {ln.split()[3] for ln in lines[:-1]}
    assert keys == {k for _, k in want}


def test_killed_job_resubmitted_completes_once(world, sequential, tmp_path):
    store = tmp_path / "store-kill"
    split_run, exp_run = _plan(world, store, seeds=(42,), losses=("ce",), until="train-expert")
    execute(split_run.to_json(), str(store), quiet=True)
    flag = tmp_path / "writing"
    # the job publishes nothing until finalize; hold it there (weights already written) and kill it
    code = (
        "import sys, time, argse_cli.store as s\n"
        "orig = s.Writer.finalize\n"
        f"def held(self):\n    open({str(flag)!r}, 'w').close(); time.sleep(300); return orig(self)\n"
        "s.Writer.finalize = held\n"
        "from argse_cli.sweep import execute\n"
        f"execute(sys.stdin.read(), {str(store)!r}, quiet=True)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        text=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    proc.stdin.write(exp_run.to_json())
    proc.stdin.close()
    t0 = time.time()
    while not flag.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() - t0 < 120, "job never started writing"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    proc.stderr.close()
    s = Store(store)
    assert not s.exists("train-expert", exp_run.key)
    (pend,) = s.pending_dirs()  # train-expert is resumable: its writer works in the key's pending dir
    assert (pend / "files" / "model.safetensors").is_file()  # it had started writing

    # resubmit the sweep: the killed key is recomputed, the split is a cache hit
    rc = sweep_command(
        world["cfg"], store, seeds="42", losses=["ce"], until="train-expert", quiet=True
    )
    assert rc == 0
    assert s.pending_dirs() == [] and s.temp_dirs() == []  # the rerun took the pending dir over and published
    assert s.gc() == []
    stage_dir = store / "train-expert"
    assert sorted(p.name for p in stage_dir.iterdir()) == [".locks", exp_run.key]
    assert list((stage_dir / ".locks").iterdir()) == []
    assert s.open("train-expert", exp_run.key).verify() == []
    ref = _sums(sequential)
    for k, v in _sums(s).items():
        assert v == ref[k]
    # a duplicate (retried) job of a published key is a cache hit and changes nothing
    before = (stage_dir / exp_run.key / "manifest.json").read_text()
    assert execute(exp_run.to_json(), str(store), quiet=True) == exp_run.key
    assert (stage_dir / exp_run.key / "manifest.json").read_text() == before


class _FakeExecutor:
    """Publishes an empty complete artifact per run, except runs failing ``fail[key]`` more times."""

    name = "fake"

    def __init__(self, store: Store, fail: dict[str, int]):
        self.store, self.fail, self.calls, self.submitted = store, dict(fail), [], 0

    def run_level(self, runs, store_root):
        self.calls.append([(r.stage, r.point.get("seed"), r.level) for r in runs])
        self.submitted += len(runs)
        errs = []
        for r in runs:
            if self.fail.get(r.key, 0) > 0:
                self.fail[r.key] -= 1
                errs.append("boom")
                continue
            from argse_cli.stages import _resolved, get_stage

            with self.store.writer(
                r.stage, r.key, config=_resolved(r.config).key_payload(), upstream=r.upstream,
                upstream_stages=r.upstream_stages, version=get_stage(r.stage).VERSION,
                extra=r.extra,
            ):  # fmt: skip
                pass  # an empty, complete artifact
            errs.append(None)
        return errs


def test_run_plan_levels_failures_and_retries(world, tmp_path):
    from argse_cli.sweep import run_plan

    store = Store(tmp_path / "s")
    plan = _plan(world, store.root, seeds=(42, 43), losses=("ce",), until="calibrate")
    bad = next(r for r in plan if r.stage == "train-expert" and r.point["seed"] == 43)
    ex = _FakeExecutor(store, {bad.key: 1})
    res = run_plan(plan, ex, store, retries=0, say=lambda m: None)
    # one submission per level, in level order; seed 43's export/calibrate never submitted
    assert ex.calls == [
        [("split", None, 0)],
        [("train-expert", 42, 1), ("train-expert", 43, 1)],
        [("export-logits", 42, 2)],
        [("calibrate", 42, 3)],
    ]
    assert sorted((r.stage, r.point["seed"]) for r, _ in res.failed) == [
        ("calibrate", 43),
        ("export-logits", 43),
        ("train-expert", 43),
    ]
    assert any("upstream missing" in e for _, e in res.failed)
    # rerun with a flaky job: the failed run is retried in its level, the rest are cache hits
    ex2 = _FakeExecutor(store, {bad.key: 1})
    res2 = run_plan(plan, ex2, store, retries=1, say=lambda m: None)
    assert not res2.failed and len(res2.cached) == 4 and len(res2.done) == 3
    assert ex2.calls == [
        [("train-expert", 43, 1)],
        [("train-expert", 43, 1)],
        [("export-logits", 43, 2)],
        [("calibrate", 43, 3)],
    ]
    ex3 = _FakeExecutor(store, {})
    assert run_plan(plan, ex3, store, say=lambda m: None).submitted == 0 and ex3.calls == []
