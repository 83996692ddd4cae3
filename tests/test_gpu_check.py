"""The GPU check (bench/gpu_check.sh, bench/gpu_check.py, bench/gpu_wheels.py) on the CPU: the wheel
planner on hand-made wheels, the driver's timeouts / statuses / schema with stub parts (no torch),
the merge into docs/BENCHMARKS.md's GPU section, and one real part of the dry run through the
shell script (the whole dry run is in the slow set)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import gpu_check as gc  # noqa: E402
import gpu_wheels as gw  # noqa: E402
import run_all  # noqa: E402
from packaging.tags import Tag  # noqa: E402
from packaging.version import Version  # noqa: E402

CP312 = gw.target_tags((3, 12))
ENV312 = gw.target_env((3, 12), "3.12.3")


def make_wheel(folder: Path, name: str, version: str, tag: str = "py3-none-any",
               requires: tuple[str, ...] = ()) -> Path:  # fmt: skip
    """A minimal wheel: the file name carries name / version / tags, METADATA the requirements."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-{tag}.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", meta)
        z.writestr(f"{name}/__init__.py", "")
    return path


# --------------------------------------------------------------------------- the wheel planner


def test_plan_installs_what_is_missing_and_walks_its_requirements(tmp_path):
    make_wheel(tmp_path, "alpha", "1.0", requires=("beta>=2", "gamma", 'delta; extra == "x"',
                                                   'old; python_version < "3.12"'))  # fmt: skip
    make_wheel(tmp_path, "beta", "1.5")
    make_wheel(tmp_path, "beta", "2.1")
    make_wheel(tmp_path, "beta", "2.3", tag="cp311-cp311-manylinux_2_17_x86_64")  # wrong tags
    make_wheel(tmp_path, "gamma", "3.0", tag="cp312-cp312-manylinux_2_17_x86_64")
    wheels = gw.read_folder(tmp_path)
    p = gw.plan(["alpha>=1", "numpy>=1.26"], {"numpy": Version("2.5.2")}, wheels, CP312, ENV312)
    # beta: the newest wheel that fits the specifier AND the cp312 tags (2.3 is cp311 only)
    assert {n: str(w.version) for n, w in p.install.items()} == {
        "alpha": "1.0", "beta": "2.1", "gamma": "3.0"}
    assert p.satisfied == {"numpy": "2.5.2"}  # installed and fitting: kept, not carried
    assert "delta" not in p.install and "old" not in p.install  # extra not asked; marker false
    # asking for the extra pulls its requirement in
    with pytest.raises(gw.PlanError, match="^delta: alpha needs delta"):
        gw.plan(["alpha[x]"], {}, wheels, CP312, ENV312)


def test_plan_replaces_an_installed_version_that_is_too_old(tmp_path):
    make_wheel(tmp_path, "typing_extensions", "4.16.0")
    make_wheel(tmp_path, "pydanticish", "2.0", requires=("typing-extensions>=4.16",))
    wheels = gw.read_folder(tmp_path)
    have = {"typing-extensions": Version("4.15.0")}
    p = gw.plan(["pydanticish"], have, wheels, CP312, ENV312)
    assert str(p.install["typing-extensions"].version) == "4.16.0"
    have_new = {"typing-extensions": Version("4.17.0")}
    p = gw.plan(["pydanticish"], have_new, wheels, CP312, ENV312)
    assert "typing-extensions" not in p.install and p.satisfied["typing-extensions"] == "4.17.0"


def test_plan_errors_name_the_package_and_the_fix(tmp_path):
    make_wheel(tmp_path, "zarr", "3.1.6", requires=("numcodecs>=0.14",))
    make_wheel(tmp_path, "numcodecs", "0.16.6", tag="cp311-cp311-manylinux_2_17_x86_64")
    wheels = gw.read_folder(tmp_path)
    with pytest.raises(gw.PlanError) as e:
        gw.plan(["zarr>=3.0,<3.2"], {}, wheels, CP312, ENV312, "FOLDER")
    msg = str(e.value)
    assert msg.startswith("numcodecs: zarr needs numcodecs>=0.14 (not installed)")
    assert "FOLDER" in msg and "0.16.6" in msg and "-- fix: run `make gpu-carry`" in msg
    assert "\n" not in msg
    # two requirements no single chosen version meets
    make_wheel(tmp_path, "a", "1.0", requires=("c<2",))
    make_wheel(tmp_path, "b", "1.0", requires=("c>=2",))
    make_wheel(tmp_path, "c", "1.5")
    make_wheel(tmp_path, "c", "2.5")
    with pytest.raises(gw.PlanError, match="^c: b needs c>=2 but 1.5 was chosen"):
        gw.plan(["a", "b"], {}, gw.read_folder(tmp_path), CP312, ENV312)


def test_read_wheel_refuses_a_file_that_is_not_a_wheel(tmp_path):
    bad = tmp_path / "x-1.0-py3-none-any.whl"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("x/__init__.py", "")
    with pytest.raises(gw.PlanError, match="not a wheel"):
        gw.read_wheel(bad)


def test_check_plans_this_venv_and_the_simulated_machine():
    """Against this venv's real metadata: nothing missing here; on the simulated GPU machine (its
    package list, Python 3.12) the storage and config stack must be carried, torch must not."""
    res = gw.cmd_check(Path("/nonexistent-wheel-folder"))
    assert res["this_interpreter"]["requirements_met"] >= len(gw.project_requirements())
    sim = res["device_simulated"]
    assert {"zarr", "numcodecs", "pydantic", "pydantic-core"} <= set(sim["install"])
    assert not {"torch", "torchvision", "numpy"} & set(sim["install"])
    assert sim["satisfied"]["torch"] == "2.11.0"  # the version the machine's list gives
    assert "typing-extensions" in sim["fallbacks_carried_for"]


# --------------------------------------------------------------------------- the JSON lines


def _line(**kw):
    d = {"name": "x", "value": 2.0, "unit": "s", "reference": 4.0, "ratio": 0.5, "device": "cpu",
         "torch": "2.11", "commit": "abc", "part": "p", "mode": "gpu", "run": "r"}  # fmt: skip
    d.update(kw)
    return d


def test_validate_line():
    assert gc.validate_line(_line()) == []
    assert gc.validate_line(_line(value=None, reference=None, ratio=None)) == []
    assert any("device" in e for e in gc.validate_line(_line(device="")))
    assert any("value" in e for e in gc.validate_line(_line(value=True)))
    assert any("value" in e for e in gc.validate_line(_line(value=float("nan"))))
    assert any("mode" in e for e in gc.validate_line(_line(mode="cpu")))
    assert any("ratio" in e for e in gc.validate_line(_line(ratio=2.0)))  # value / reference = 0.5
    assert gc.validate_line([1]) == ["not a JSON object"]


# --------------------------------------------------------------------------- the driver, stub parts


STUB_OK = """
import json
for n in ("stub_speed", "stub_acc"):
    print(json.dumps({"name": n, "value": 3.0, "unit": "x", "reference": 1.5, "ratio": 2.0,
                      "device": "StubGPU"}))
"""
STUB_SLOW = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
open(sys.argv[sys.argv.index("--pidfile") + 1], "w").write(str(child.pid))
print("[ours] epoch 3/10 loss 1.0 1234 img/s", file=sys.stderr, flush=True)
time.sleep(60)
"""
STUB_CRASH = "import sys; print('boom', file=sys.stderr); sys.exit(3)"
STUB_WRONG = STUB_OK.replace("stub_acc", "other")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def fake_probe(env, dry_run=False):
    return {"torch": "9.9-stub", "cuda_available": False, "cuda": None, "device": "cpu",
            "capability": None}  # fmt: skip


def test_driver_statuses_timeouts_and_schema(tmp_path, capsys):
    scripts = {}
    for name, src in (("ok", STUB_OK), ("slow", STUB_SLOW), ("crash", STUB_CRASH),
                      ("wrong", STUB_WRONG)):  # fmt: skip
        scripts[name] = tmp_path / f"stub_{name}.py"
        scripts[name].write_text(textwrap.dedent(src))
    pidfile = tmp_path / "child.pid"
    parts = (
        gc.Part("ok", str(scripts["ok"]), (), (), 30, ("stub_speed", "stub_acc"), "ok part",
                dry_budget_s=30),
        gc.Part("slow", str(scripts["slow"]), (), ("--pidfile", str(pidfile)), 30, ("x",),
                "slow part", dry_budget_s=1.5),
        gc.Part("crash", str(scripts["crash"]), (), (), 30, ("x",), "crashing part"),
        gc.Part("wrong", str(scripts["wrong"]), (), (), 30, ("stub_speed", "stub_acc"), "w"),
        gc.Part("absent", str(tmp_path / "nope.py"), (), (), 30, ("x",), "absent", optional=True),
    )  # fmt: skip
    out = tmp_path / "out"
    rc = gc.main(["--dry-run", "--out", str(out), "--wheels", str(tmp_path / "no-wheels")],
                 parts=parts, probe_fn=fake_probe)  # fmt: skip
    assert rc == 1  # a part timed out / failed
    lines = [json.loads(x) for x in (out / "gpu_check.jsonl").read_text().splitlines()]
    assert all(gc.validate_line(d) == [] for d in lines)
    status = {d["part"]: d for d in lines if d["name"].startswith("gpu_check_part_")}
    assert {k: v["status"] for k, v in status.items()} == {
        "ok": "ok", "slow": "timeout", "crash": "failed", "wrong": "failed", "absent": "skipped"}
    assert "reached epoch 3/10" in status["slow"]["reason"]
    assert status["slow"]["progress"]["img_per_s"] == 1234.0
    assert "exit status 3" in status["crash"]["reason"]
    assert "stub_acc" in status["wrong"]["reason"]
    assert "not in this checkout" in status["absent"]["reason"]
    # the killed part's whole process group went with it (its child sleeper too)
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 60  # a killed process group is gone well before this
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)
    ok_lines = [d for d in lines if d["part"] == "ok" and not d["name"].startswith("gpu_check")]
    assert [d["name"] for d in ok_lines] == ["stub_speed", "stub_acc"]
    assert all(d["device"] == "StubGPU" and d["torch"] == "9.9-stub" and d["mode"] == "dry-run"
               for d in ok_lines)  # fmt: skip
    summ = lines[-1]
    assert summ["name"] == "gpu_check_total_s" and summ["schema_errors"] == []
    assert "[slow] [ours] epoch 3/10" in (out / "gpu_check.log").read_text()
    # stdout carries the same lines (bench/run_all.py collects them from there)
    printed = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert printed == lines


def test_driver_records_a_wheel_plan_failure_and_still_runs_the_parts(tmp_path):
    wheels = tmp_path / "wheels"
    make_wheel(wheels, "unrelated", "1.0")  # a folder that cannot serve zarr / pydantic
    stub = tmp_path / "stub_ok.py"
    stub.write_text(textwrap.dedent(STUB_OK))
    parts = (gc.Part("ok", str(stub), (), (), 30, ("stub_speed",), "ok part"),)
    rc = gc.main(["--dry-run", "--out", str(tmp_path / "out"), "--wheels", str(wheels)],
                 parts=parts, probe_fn=fake_probe)  # fmt: skip
    lines = [json.loads(x) for x in (tmp_path / "out" / "gpu_check.jsonl").read_text().splitlines()]
    w = lines[0]
    assert w["name"] == "gpu_check_wheels" and w["status"] == "failed"
    assert "no wheel in" in w["reason"] and "-- fix:" in w["reason"]
    assert [d["status"] for d in lines if d["name"] == "gpu_check_part_ok"] == ["ok"]
    assert lines[-1]["parts"] == {"wheels": "failed", "ok": "ok"} and rc == 1


def test_driver_gpu_mode_without_cuda_is_a_one_line_error(tmp_path, capsys):
    rc = gc.main(["--no-install", "--out", str(tmp_path)], parts=(), probe_fn=fake_probe)
    err = capsys.readouterr().err
    assert rc == 2
    assert "error: device: CUDA is not available to torch 9.9-stub -- fix:" in err
    assert "Traceback" not in err


def test_commit_stamp_without_git_uses_the_carried_record(tmp_path, monkeypatch):
    rec = gc.commit_record()
    assert rec["tree_digest"] == gc.tree_digest()
    monkeypatch.setattr(gc, "_git", lambda *a: None)  # as on the device machine: no .git
    monkeypatch.setattr(gc, "CARRY", tmp_path)
    assert gc.commit_stamp().startswith("unknown (no .git")
    (tmp_path / "commit.json").write_text(json.dumps({**rec, "commit": "c0ffee1", "dirty": False}))
    assert gc.commit_stamp() == "c0ffee1"
    (tmp_path / "commit.json").write_text(json.dumps({**rec, "commit": "c0ffee1",
                                                      "tree_digest": "other"}))  # fmt: skip
    assert gc.commit_stamp() == "unknown (code differs from c0ffee1 recorded by make gpu-carry)"


# --------------------------------------------------------------------------- the merge


def _gpu_lines(tmp_path: Path, mode: str = "gpu") -> Path:
    common = {"torch": "2.11.0+cu130", "cuda": "13.0", "commit": "abc1234", "mode": mode,
              "run": "2026-01-01T00:00:00Z", "device": "NVIDIA H200"}  # fmt: skip
    lines = [
        {"name": "train_throughput_resnet32", "value": 30000.0, "unit": "img/s",
         "reference": 10000.0, "ratio": 3.0, "part": "trainer", "precision": "bf16", **common},
        {"name": "gpu_check_part_trainer", "value": 20.0, "unit": "s", "reference": 75.0,
         "ratio": 0.2667, "part": "trainer", "status": "ok", "reason": "", "what": "trainer",
         "command": "python bench/bench_trainer.py", **common},
        {"name": "gpu_check_total_s", "value": 300.0, "unit": "s", "reference": 450.0,
         "ratio": 0.6667, "part": "summary", "parts": {"trainer": "ok"}, "schema_errors": [],
         **common},
    ]  # fmt: skip
    f = tmp_path / "gpu_check.jsonl"
    f.write_text("".join(json.dumps(d) + "\n" for d in lines))
    return f


def _merge(tmp_path, *args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "bench" / "run_all.py"), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=60)  # fmt: skip


def test_merge_gpu_writes_the_gpu_section_and_keeps_the_cpu_one(tmp_path):
    doc = tmp_path / "BENCHMARKS.md"
    cpu = f"{run_all.BEGIN}\n\n## Run\n\n| cpu_row | 1 |\n\n{run_all.END}\n"
    doc.write_text("# old header\n\n" + cpu)
    r = _merge(tmp_path, "--merge-gpu", _gpu_lines(tmp_path), "--out", doc)
    assert r.returncode == 0, r.stderr
    text = doc.read_text()
    assert text.startswith(run_all.HEADER.rstrip("\n"))
    assert cpu.strip() in text  # the CPU section untouched
    gpu = text.split(run_all.GPU_BEGIN)[1]
    assert "| train_throughput_resnet32 | 3e+04 | img/s | 1e+04 | 3 | NVIDIA H200 |" in gpu
    assert "Part `trainer`: ok, 20 s of its 75 s budget" in gpu
    assert "Device: NVIDIA H200; torch 2.11.0+cu130" in gpu
    # merging again replaces the GPU section (one copy)
    assert _merge(tmp_path, "--merge-gpu", _gpu_lines(tmp_path), "--out", doc).returncode == 0
    assert doc.read_text().count(run_all.GPU_BEGIN) == 1


def test_merge_gpu_refuses_bad_lines_with_one_line_and_keeps_the_doc(tmp_path):
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("keep me\n")
    for f in (_gpu_lines(tmp_path, mode="dry-run"), tmp_path / "missing.jsonl"):
        r = _merge(tmp_path, "--merge-gpu", f, "--out", doc)
        assert r.returncode == 2
        assert r.stderr.startswith("error: --merge-gpu: ") and "-- fix:" in r.stderr
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_line(ratio=9.0)) + "\n")
    r = _merge(tmp_path, "--merge-gpu", bad, "--out", doc)
    assert r.returncode == 2 and "ratio" in r.stderr
    assert doc.read_text() == "keep me\n"


# --------------------------------------------------------------------------- the real dry run


def _dry_run(tmp_path: Path, *parts: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    env = {**os.environ, "PY": sys.executable, "PYTHONPATH": str(REPO)}
    env.pop("OUT", None)
    args = ["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)]
    if parts:
        args += ["--parts", *parts]
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    f = tmp_path / "gpu_check.jsonl"
    lines = [json.loads(x) for x in f.read_text().splitlines()] if f.is_file() else []
    return r, lines


def test_dry_run_one_real_part_through_the_script(tmp_path):
    """gpu_check.sh --dry-run with the cheapest real part: the wheel plan, the probe, a real
    benchmark subprocess, the stamp and the schema."""
    r, lines = _dry_run(tmp_path, "expert200")
    assert r.returncode == 0, r.stderr[-3000:]
    assert lines and all(gc.validate_line(d) == [] for d in lines)
    names = [d["name"] for d in lines]
    assert names[0] == "gpu_check_wheels" and names[-1] == "gpu_check_total_s"
    assert any(n.startswith("expert_wall_s_resnet8_2ep") for n in names)
    wall = next(d for d in lines if d["name"] == "expert_wall_s_resnet8_2ep")
    assert wall["value"] > 0 and wall["device"] == "cpu" and wall["mode"] == "dry-run"
    wheels = lines[0]
    assert wheels["installed"] is False and "zarr" in wheels["plan"]["install"]


@pytest.mark.slow
def test_dry_run_every_part_and_merge(tmp_path):
    r, lines = _dry_run(tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    st = {d["part"]: d["status"] for d in lines if d["name"].startswith("gpu_check_part_")}
    assert st["trainer"] == st["fused"] == st["expert200"] == "ok"
    assert st["shared"] in ("ok", "skipped")
    doc = tmp_path / "B.md"
    m = _merge(tmp_path, "--merge-gpu", tmp_path / "gpu_check.jsonl", "--out", doc,
               "--allow-dry-run")  # fmt: skip
    assert m.returncode == 0, m.stderr
    assert "train_throughput_resnet8" in doc.read_text().split(run_all.GPU_BEGIN)[1]


def test_tag_helpers():
    assert Tag("cp312", "cp312", "manylinux_2_17_x86_64") in CP312
    assert Tag("py3", "none", "any") in CP312
    assert Tag("cp311", "cp311", "manylinux_2_17_x86_64") not in CP312
