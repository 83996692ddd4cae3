"""The GPU check's driver (run it through bench/gpu_check.sh): every GPU figure of issue 20 in one
run of <= 8 minutes on a lent CUDA machine, or a CPU dry run of the same parts in tiny sizes.

    python bench/gpu_check.py [--dry-run] [--out DIR] [--deadline S] [--parts ID ...] [--no-install]

Steps, each printing progress (to stderr and DIR/gpu_check.log):

1. wheels: on the machine, ``bench/gpu_wheels.py install`` puts what it lacks (zarr, pydantic, ...)
   from the carried folder .carry/wheels into /tmp/argse-site, first on PYTHONPATH for every
   later step; in the dry run ``gpu_wheels.py check`` plans it for this interpreter and for the
   simulated machine, installing nothing.
2. probe: torch version, CUDA, device name (a CUDA device is required unless --dry-run).
3. data: the offline CIFAR-10 built once into /tmp/argse_bench_cifar10 from the carried builder
   ($ARGSE_SHARED, set by gpu_check.sh to .carry/shared); the dry run uses synthetic data.
4. the parts of :data:`PARTS`, each a benchmark subprocess in its own process group, killed at
   its budget (or at the run's deadline, whichever comes first). The last part gets what is left.

Output: DIR (``--out``, else $OUT -- the device tool's folder -- else build/gpu_check) holds
``gpu_check.jsonl`` and ``gpu_check.log``. Every JSON line is ``{name, value, unit, reference,
ratio, device, torch, commit, part, mode, run, ...}`` (:func:`validate_line`); each part adds a
``gpu_check_part_<id>`` line with its status (ok / skipped / timeout / failed), its wall time
and its budget (ratio = the share of the budget used). ``python bench/run_all.py --merge-gpu
DIR/gpu_check.jsonl`` puts the lines into docs/BENCHMARKS.md's GPU section.

Exit status: 0 when every part is ok or skipped for a stated reason, 1 when one timed out or
failed or a line breaks the schema, 2 on a setup error (one line ``error: ...``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))
import gpu_wheels as gw  # noqa: E402  (standard library + packaging only)

CARRY = ROOT / ".carry"
DATA_DIR = "/tmp/argse_bench_cifar10"  # the benchmarks' default --data-dir
SITE = Path("/tmp/argse-site")
DEADLINE_S = 450.0  # the whole run, wheels and data included: <= 8 min with margin
DRY_DEADLINE_S = 600.0
MODES = ("gpu", "dry-run")


@dataclass(frozen=True)
class Part:
    id: str
    script: str  # relative to the repository root
    gpu_args: tuple[str, ...]
    dry_args: tuple[str, ...]
    budget_s: float  # GPU mode; the dry run gives every part dry_budget_s
    expect: tuple[str, ...]  # line-name prefixes the part must print (GPU mode: exact names)
    what: str
    dry_expect: tuple[str, ...] = ()
    optional: bool = False  # skipped (not failed) when the script is absent
    out_file: bool = False  # the script writes its lines to --out FILE
    dry_budget_s: float = 120.0
    # (flag, args): args appended when the script's source mentions flag (a script being written)
    gpu_if_offered: tuple[tuple[str, tuple[str, ...]], ...] = ()
    dry_if_offered: tuple[tuple[str, tuple[str, ...]], ...] = ()


DRY = ("--n-train", "128", "--n-test", "40", "--batch-size", "32", "--synthetic")  # dry-run sizes

# Budgets: trainer 75 + fused 90 + shared 90 = 255 s, wheels + probe + data about 30 s; the
# 200-epoch expert runs last with what is left of the deadline (about 165 s): on an H200 one
# ResNet-32 step at batch 128 is launch-bound (a few ms), i.e. 200 x 96 steps about 1 to 2 min
# plus the compilation. A part that runs out of time says so (and how far it got).
PARTS: tuple[Part, ...] = (
    Part("trainer", "bench/bench_trainer.py",
         ("--device", "cuda", "--depth", "32", "--epochs", "4", "--n-train", "12406",
          "--n-test", "2000", "--precision", "bf16", "--channels-last"),
         ("--device", "cpu", "--depth", "8", "--epochs", "1", *DRY),
         75, ("train_throughput_resnet32", "bal_test_acc_resnet32_4ep"),
         "device-resident trainer vs the PIL/DataLoader reference, ResNet-32, CIFAR-10-LT IF 100, "
         "4 epochs each, bf16, channels-last (no compile: both sides eager), same process",
         dry_expect=("train_throughput_resnet", "bal_test_acc_resnet")),
    Part("fused", "bench/bench_fused.py",
         ("--device", "cuda", "--depth", "32", "--epochs", "15", "--experts", "3", "--n-train",
          "12406", "--precision", "bf16"),
         ("--device", "cpu", "--depth", "8", "--epochs", "1", "--experts", "2", *DRY),
         90, ("fused_train_throughput_E3_resnet32", "fused_max_acc_gap_E3_resnet32_15ep",
              "expert_wall_s_resnet32_15ep"),
         "fused (vmap) vs sequential training of 3 ResNet-32 experts, 15 epochs, bf16, "
         "CIFAR-10-LT IF 100",
         dry_expect=("fused_train_throughput_E", "fused_max_acc_gap_E", "expert_wall_s_resnet")),
    Part("shared", "bench/bench_shared.py",
         ("--device", "cuda", "--depth", "32", "--epochs", "15"),
         ("--device", "cpu", "--depth", "8", "--epochs", "1"),
         90, ("shared_",),
         "shared-backbone experts (one backbone, one head per loss) vs sequential models, "
         "15 epochs, ResNet-32, CIFAR-10-LT IF 100, bf16 where offered",
         optional=True, out_file=True,
         gpu_if_offered=(("--n-train", ("--n-train", "12406")),
                         ("--precision", ("--precision", "bf16"))),
         dry_if_offered=(("--n-train", ("--n-train", "128")), ("--n-test", ("--n-test", "40")),
                         ("--experts", ("--experts", "2")),
                         ("--batch-size", ("--batch-size", "32")),
                         ("--synthetic", ("--synthetic",)))),
    Part("expert200", "bench/bench_trainer.py",
         ("--device", "cuda", "--depth", "32", "--epochs", "200", "--n-train", "12406",
          "--n-test", "10000", "--precision", "bf16", "--channels-last", "--compile",
          "--warmup-epochs", "5", "--no-reference"),
         ("--device", "cpu", "--depth", "8", "--epochs", "2", *DRY, "--no-reference"),
         math.inf, ("expert_wall_s_resnet32_200ep", "bal_test_acc_resnet32_200ep"),
         "one 200-epoch ResNet-32 expert on CIFAR-10-LT IF 100 (ce, our trainer, bf16, "
         "channels-last, torch.compile, 5 warm-up epochs): wall time incl. compilation, "
         "class-balanced accuracy on the 10k CIFAR-10 test set",
         dry_expect=("expert_wall_s_resnet", "bal_test_acc_resnet")),
)  # fmt: skip


# --------------------------------------------------------------------------- schema


def validate_line(d: object) -> list[str]:
    """Problems of one JSON line (empty = valid): the benchmark fields, the run's stamp, and
    ratio = value / reference where both are given (5% slack: the fields are rounded)."""
    if not isinstance(d, dict):
        return ["not a JSON object"]
    errs = []
    for k in ("name", "unit", "device", "torch", "commit", "part", "run"):
        if not isinstance(d.get(k), str) or not d.get(k):
            errs.append(f"{k}: missing or not a non-empty string")
    for k in ("value", "reference", "ratio"):
        v = d.get(k, "absent")
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)
                              or not math.isfinite(v)):  # fmt: skip
            errs.append(f"{k}: {v!r} is not a finite number or null")
    if d.get("mode") not in MODES:
        errs.append(f"mode: {d.get('mode')!r} not one of {MODES}")
    v, r, q = d.get("value"), d.get("reference"), d.get("ratio")
    if not errs and v is not None and r not in (None, 0) and q is not None:
        if abs(q - v / r) > 0.05 * abs(v / r) + 1e-3:
            errs.append(f"ratio: {q} but value / reference = {v / r:.6g}")
    return [f"{d.get('name', '?')}: {e}" for e in errs]


# --------------------------------------------------------------------------- provenance


def tree_digest(root: Path = ROOT) -> str:
    """sha256 over the code that runs (argse_cli/, bench/, pyproject.toml), by relative path: the
    same on this machine and on the device machine, where no .git travels."""
    h = hashlib.sha256()
    files = [root / "pyproject.toml"]
    for sub, pat in (("argse_cli", "**/*.py"), ("argse_cli", "**/*.json"), ("bench", "*.py"),
                     ("bench", "*.sh"), ("bench", "*.txt")):  # fmt: skip
        files += (root / sub).glob(pat)
    for f in sorted(set(files)):
        if f.is_file() and "__pycache__" not in f.parts:
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _git(*args: str) -> str | None:
    try:
        p = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return p.stdout.strip() if p.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def commit_record() -> dict:
    """What `make gpu-carry` writes to .carry/commit.json: HEAD, dirty flag, tree digest."""
    return {"commit": _git("rev-parse", "--short", "HEAD") or "unknown",
            "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
            "tree_digest": tree_digest()}  # fmt: skip


def commit_stamp() -> str:
    """HEAD from git; where no .git travelled, the commit .carry/commit.json recorded when its
    tree digest still matches the code here; otherwise 'unknown (...)'."""
    head = _git("rev-parse", "--short", "HEAD")
    if head:
        dirty = _git("status", "--porcelain", "--untracked-files=no")
        return head + ("+dirty" if dirty else "")
    try:
        rec = json.loads((CARRY / "commit.json").read_text())
    except (OSError, ValueError):
        return "unknown (no .git, no .carry/commit.json)"
    if rec.get("tree_digest") == tree_digest():
        return str(rec.get("commit")) + ("+dirty" if rec.get("dirty") else "")
    return f"unknown (code differs from {rec.get('commit')} recorded by make gpu-carry)"


def carry_bytes() -> dict | None:
    """What the device tool would send: tracked + untracked-not-ignored files + .carry (git)."""
    listing = _git("ls-files", "-z", "-co", "--exclude-standard")
    if listing is None:
        return None
    tree = 0
    for rel in filter(None, listing.split("\0")):
        p = ROOT / rel
        if p.is_file() and not p.is_symlink():
            tree += p.stat().st_size
    carry = sum(f.stat().st_size for f in CARRY.rglob("*") if f.is_file()) if CARRY.is_dir() else 0
    return {"tree": tree, "carry": carry}


def record_carry() -> int:
    CARRY.mkdir(exist_ok=True)
    rec = commit_record()
    (CARRY / "commit.json").write_text(json.dumps(rec) + "\n")
    cb = carry_bytes() or {"tree": 0, "carry": 0}
    mib = (cb["tree"] + cb["carry"]) / 2**20
    print(f"recorded {rec} in .carry/commit.json; the device tool would send {mib:.1f} MiB (tree "
          f"{cb['tree'] / 2**20:.1f} + .carry {cb['carry'] / 2**20:.1f}; limit 64)")  # fmt: skip
    if mib > 64:
        print(f"error: .carry: {mib:.1f} MiB with the tree, over the device tool's 64 MiB -- fix: "
              "remove untracked files or large wheels", file=sys.stderr)  # fmt: skip
        return 2
    return 0


# --------------------------------------------------------------------------- running


class Log:
    """Progress: each message to stderr and appended to the log file, with the seconds elapsed."""

    def __init__(self, path: Path, t0: float):
        self.path, self.t0, self.lock = path, t0, threading.Lock()

    def __call__(self, msg: str) -> None:
        line = f"[gpu_check +{time.monotonic() - self.t0:5.0f}s] {msg}"
        with self.lock:
            print(line, file=sys.stderr, flush=True)
            with self.path.open("a") as f:
                f.write(line + "\n")


@dataclass
class PartResult:
    status: str  # ok | skipped | timeout | failed
    wall_s: float | None = None
    rc: int | None = None
    reason: str = ""
    lines: list[dict] = field(default_factory=list)
    progress: dict = field(default_factory=dict)


_EPOCH = re.compile(r"epoch (\d+)/(\d+).*?([\d.]+) img/s")


def run_command(tag: str, argv: list[str], timeout: float, env: dict, log: Log,
                out_file: Path | None = None) -> PartResult:  # fmt: skip
    """Run argv in its own process group; stderr streamed to the log (prefixed with tag), stdout's
    JSON lines (and out_file's) collected; the group is killed at ``timeout`` seconds."""
    t0 = time.monotonic()
    with tempfile.TemporaryFile("w+") as so:
        try:
            p = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=so, stderr=subprocess.PIPE,
                                 text=True, start_new_session=True)  # fmt: skip
        except OSError as e:
            return PartResult("failed", 0.0, None, f"cannot start: {e}")
        last: dict = {}

        def pump() -> None:
            for raw in p.stderr:
                line = raw.rstrip("\n")
                m = _EPOCH.search(line)
                if m:
                    last.update(epoch=int(m[1]), epochs=int(m[2]), img_per_s=float(m[3]),
                                at_s=round(time.monotonic() - t0, 1))  # fmt: skip
                log(f"[{tag}] {line}")

        th = threading.Thread(target=pump, daemon=True)
        th.start()
        timed_out = False
        try:
            rc = p.wait(timeout=max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    p.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            rc = p.returncode
        th.join(timeout=5)
        wall = time.monotonic() - t0
        so.seek(0)
        text = so.read()
    if out_file is not None and out_file.is_file():
        text += "\n" + out_file.read_text()
    lines, seen = [], set()
    for ln in text.splitlines():
        ln = ln.strip()
        if ln.startswith("{"):
            try:
                d = json.loads(ln)
            except json.JSONDecodeError:
                continue
            key = json.dumps(d, sort_keys=True)
            if key not in seen:  # a script printing its lines AND writing them to out_file
                seen.add(key)
                lines.append(d)
    if timed_out:
        got = (f"; reached epoch {last['epoch']}/{last['epochs']} at {last['at_s']} s "
               f"({last['img_per_s']:.0f} img/s)") if last else ""  # fmt: skip
        return PartResult("timeout", wall, rc, f"killed at its {timeout:.0f} s budget{got}",
                          lines, last)  # fmt: skip
    if rc != 0:
        return PartResult("failed", wall, rc, f"exit status {rc} (see the log)", lines, last)
    return PartResult("ok", wall, rc, "", lines, last)


def missing_names(lines: list[dict], expect: tuple[str, ...]) -> list[str]:
    names = [str(d.get("name", "")) for d in lines]
    return [e for e in expect if not any(n.startswith(e) for n in names)]


def probe(env: dict, dry_run: bool = False) -> dict:
    """torch version, CUDA, device name: from a subprocess that imports torch (GPU mode), or,
    in the dry run (CPU only by definition), from the installed metadata without importing it."""
    if dry_run:
        from importlib.metadata import PackageNotFoundError, version

        try:
            tv = version("torch")
        except PackageNotFoundError:
            raise SetupError("probe", "torch is not installed", "use the project's venv") from None
        return {"torch": tv, "cuda_available": False, "cuda": None, "device": "cpu",
                "capability": None}  # fmt: skip
    code = ("import json, torch; c = torch.cuda.is_available(); print(json.dumps({"
            "'torch': torch.__version__, 'cuda_available': c, 'cuda': torch.version.cuda, "
            "'device': torch.cuda.get_device_name() if c else 'cpu', "
            "'capability': list(torch.cuda.get_device_capability()) if c else None}))")  # fmt: skip
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    if p.returncode != 0:
        raise SetupError("probe", "cannot import torch: " +
                         (p.stderr.strip().splitlines() or ["?"])[-1],
                         "run with the machine's python3 (PY=/opt/torch/.venv/bin/python3)")  # fmt: skip
    return json.loads(p.stdout.strip().splitlines()[-1])


class SetupError(Exception):
    def __init__(self, field_: str, problem: str, fix: str):
        super().__init__(f"{field_}: {problem} -- fix: {fix}")


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None, parts: tuple[Part, ...] = PARTS, probe_fn=probe) -> int:
    """The run (see the module docstring); ``parts`` and ``probe_fn`` are replaceable in tests."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true",
                    default=os.environ.get("GPU_CHECK_DRY_RUN", "") not in ("", "0"),
                    help="every part on the CPU in tiny sizes; nothing installed (env: "
                    "GPU_CHECK_DRY_RUN=1)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=None, help="default: $OUT, else build/gpu_check")
    ap.add_argument("--deadline", type=float, default=None, help="seconds for the whole run "
                    f"(default {DEADLINE_S:.0f}; dry run {DRY_DEADLINE_S:.0f})")  # fmt: skip
    ids = [p.id for p in parts]
    ap.add_argument("--parts", nargs="+", choices=ids, default=ids)
    ap.add_argument("--wheels", type=Path, default=CARRY / "wheels")
    ap.add_argument("--no-install", action="store_true", help="use the packages as they are")
    ap.add_argument("--record-carry", action="store_true", help="write .carry/commit.json, print "
                    "what the device tool would send, exit 2 above 64 MiB (make gpu-carry)")  # fmt: skip
    a = ap.parse_args(argv)
    if a.record_carry:
        return record_carry()
    t_start = time.monotonic()
    mode = "dry-run" if a.dry_run else "gpu"
    deadline = t_start + (a.deadline or (DRY_DEADLINE_S if a.dry_run else DEADLINE_S))
    out = a.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "build" / "gpu_check")
    out.mkdir(parents=True, exist_ok=True)
    for f in ("gpu_check.jsonl", "gpu_check.log"):
        (out / f).unlink(missing_ok=True)
    log = Log(out / "gpu_check.log", t_start)
    run_id = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + [x for x in env.get("PYTHONPATH", "").split(os.pathsep) if x]
    )
    lines: list[tuple[str, dict]] = []
    statuses: dict[str, str] = {}
    log(f"{mode} run {run_id}, deadline {deadline - t_start:.0f} s, out {out}, python "
        f"{sys.executable} {sys.version.split()[0]}")  # fmt: skip
    try:
        # 1. wheels (a failure here is recorded, not fatal: the training parts need torch only)
        t0 = time.monotonic()
        try:
            if a.dry_run or a.no_install:
                res = gw.cmd_check(a.wheels)
                planned = res["device_simulated"]["install"]
                log(f"wheels (dry: nothing installed): this interpreter meets all "
                    f"{res['this_interpreter']['requirements_met']} requirements; the simulated "
                    f"machine would install {planned} from {res['device_simulated']['wheels_from']}")  # fmt: skip
                wl = {"value": len(planned), "status": "ok", "plan": res["device_simulated"],
                      "installed": False}  # fmt: skip
            else:
                res = gw.cmd_install(a.wheels, SITE)
                env["PYTHONPATH"] = os.pathsep.join([str(SITE), env["PYTHONPATH"]])
                log(f"wheels: installed {res['install']} into {SITE}; verified {res['verify']}")
                wl = {"value": len(res["install"]), "status": "ok", "plan": res, "installed": True}
        except gw.PlanError as e:
            log(f"wheels FAILED: {e}")
            wl = {"value": None, "status": "failed", "reason": str(e), "installed": False}
            statuses["wheels"] = "failed"
        lines.append(("setup", {"name": "gpu_check_wheels", "unit": "wheels", "reference": None,
                                "ratio": None, "wall_s": round(time.monotonic() - t0, 2), **wl}))  # fmt: skip
        # 2. probe
        info = probe_fn(env, a.dry_run)
        log(f"probe: {info}")
        if not a.dry_run and shutil.which("nvidia-smi"):
            q = "name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,temperature.gpu"
            try:
                smi = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv"],
                                     capture_output=True, text=True, timeout=30)  # fmt: skip
                log(f"nvidia-smi: {(smi.stdout or smi.stderr).strip()}")
            except (OSError, subprocess.SubprocessError) as e:
                log(f"nvidia-smi: {e}")
        if not a.dry_run and not info["cuda_available"]:
            raise SetupError("device", "CUDA is not available to torch "
                             f"{info['torch']}", "run on the GPU machine, or pass --dry-run")  # fmt: skip
        # 3. data
        if a.dry_run:
            log("data: synthetic (dry run)")
        else:
            from _common import CIFAR10_BUILDER

            if not CIFAR10_BUILDER.is_file():
                raise SetupError("data", f"no CIFAR-10 builder at {CIFAR10_BUILDER}",
                                 "run `make gpu-carry` here and name .carry in carry")  # fmt: skip
            if not (Path(DATA_DIR) / "cifar-10-batches-py" / "test_batch").is_file():
                r = run_command("data", [sys.executable, str(CIFAR10_BUILDER), DATA_DIR],
                                min(120.0, deadline - time.monotonic()), env, log)  # fmt: skip
                if r.status != "ok":
                    raise SetupError("data", f"building CIFAR-10 {r.status}: {r.reason}",
                                     "see gpu_check.log")  # fmt: skip
                lines.append(("setup", {"name": "gpu_check_data_build_s", "value": round(r.wall_s, 2),
                                        "unit": "s", "reference": None, "ratio": None,
                                        "status": "ok"}))  # fmt: skip
        if a.dry_run:
            cb = carry_bytes()
            if cb is not None:
                mib = (cb["tree"] + cb["carry"]) / 2**20
                log(f"carry size: tree {cb['tree'] / 2**20:.1f} MiB + .carry "
                    f"{cb['carry'] / 2**20:.1f} MiB = {mib:.1f} MiB (limit 64)")  # fmt: skip
                lines.append(("setup", {"name": "gpu_check_travel_mib", "value": round(mib, 2),
                                        "unit": "MiB", "reference": 64, "ratio": round(mib / 64, 4),
                                        "pass": mib <= 64, **cb}))  # fmt: skip
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        log(f"setup failed: {e}")
        return 2

    # 4. parts
    for part in (p for p in parts if p.id in a.parts):
        script = ROOT / part.script
        args = list(part.dry_args if a.dry_run else part.gpu_args)
        budget = part.dry_budget_s if a.dry_run else part.budget_s
        left = deadline - time.monotonic()
        timeout = min(budget, left)
        outfile = None
        if not script.is_file():
            r = PartResult("skipped" if part.optional else "failed", None, None,
                           f"{part.script} is not in this checkout")  # fmt: skip
        elif left < 20:
            r = PartResult("skipped", None, None, f"the run's deadline: {left:.0f} s left")
        else:
            if part.out_file:
                outfile = Path(tempfile.mkdtemp(prefix="gpu_check_")) / f"{part.id}.jsonl"
                args += ["--out", str(outfile)]
            offered = part.dry_if_offered if a.dry_run else part.gpu_if_offered
            if offered:
                src = script.read_text()
                for flag, extra in offered:
                    if flag in src:
                        args += list(extra)
            argv_ = [sys.executable, part.script, *args]
            log(f"{part.id}: start, budget {timeout:.0f} s: python {shlex.join(argv_[1:])}")
            r = run_command(part.id, argv_, timeout, env, log, outfile)
            if r.status == "ok":
                miss = missing_names(r.lines, part.dry_expect or part.expect if a.dry_run
                                     else part.expect)  # fmt: skip
                if miss:
                    r.status, r.reason = "failed", f"printed no line named {miss}"
        statuses[part.id] = r.status
        log(f"{part.id}: {r.status}" + (f" in {r.wall_s:.1f} s" if r.wall_s is not None else "")
            + (f" ({r.reason})" if r.reason else ""))  # fmt: skip
        lines += [(part.id, d) for d in r.lines]
        finite = math.isfinite(timeout)
        lines.append((part.id, {
            "name": f"gpu_check_part_{part.id}",
            "value": None if r.wall_s is None else round(r.wall_s, 2), "unit": "s",
            "reference": round(timeout, 1) if finite and r.wall_s is not None else None,
            "ratio": round(r.wall_s / timeout, 4) if finite and r.wall_s is not None else None,
            "status": r.status, "reason": r.reason, "rc": r.rc,
            "what": ("(dry run: tiny CPU sizes of) " if a.dry_run else "") + part.what,
            "command": "python " + shlex.join([part.script, *args]),
            **({"progress": r.progress} if r.progress else {}),
        }))  # fmt: skip

    # 5. stamp, validate, write
    commit = commit_stamp()
    stamped, errors = [], []
    for part_id, d in lines:
        d = {**d, "torch": info["torch"], "cuda": info["cuda"], "commit": commit,
             "part": part_id, "mode": mode, "run": run_id}  # fmt: skip
        if not d.get("device"):  # the benchmarks name it; the status lines take the probe's
            d["device"] = info["device"]
        errors += validate_line(d)
        stamped.append(d)
    total = time.monotonic() - t_start
    bad = [k for k, v in statuses.items() if v in ("timeout", "failed")]
    summary = {"name": "gpu_check_total_s", "value": round(total, 1), "unit": "s",
               "reference": round(deadline - t_start, 1),
               "ratio": round(total / (deadline - t_start), 4), "parts": statuses,
               "schema_errors": errors, "device": info["device"], "torch": info["torch"],
               "cuda": info["cuda"], "commit": commit, "part": "summary", "mode": mode,
               "run": run_id}  # fmt: skip
    errors += validate_line(summary)
    with (out / "gpu_check.jsonl").open("w") as f:
        for d in [*stamped, summary]:
            f.write(json.dumps(d) + "\n")
            print(json.dumps(d), flush=True)  # stdout: the lines (bench/run_all.py collects them)
    for e in errors:
        log(f"schema: {e}")
    log(f"done in {total:.0f} s: {statuses}; {len(stamped) + 1} lines -> {out / 'gpu_check.jsonl'}")
    return 1 if bad or errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
