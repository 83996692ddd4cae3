"""`argse sweep`: a grid of seeds x expert losses x gate options, run through the stage runner.

The grid is applied to a pipeline file (one point = the pipeline file with a few fields set;
every key is then derived by :class:`~argse_cli.pipeline.Pipeline`, exactly as the single-stage
commands derive it). Axes and the fields each one sets:

* ``seeds`` (seed ``s``): ``train_expert.seed = s``, ``train_gate.seed = s``,
  ``baselines.seeds = [s]``; with ``full_reruns: true`` also ``split.seed = s`` (a new long-tailed
  subset and new splits per seed). ``export_logits.seed`` (row order) and ``eval.seed``
  (bootstrap) stay as in the file.
* ``losses``: ``train_expert.losses`` -- the expert *set*: one ``train-expert`` run per loss and
  seed (``ce`` is added when ``decoupled`` needs its backbone), and export-logits exports all of
  them, in the given order.
* ``betas``: ``train_gate.beta`` -- one gate (and one eval) per seed and beta; baselines run once
  per seed, against the gate of the first beta.
* ``device`` (not an axis): ``train_expert.device`` / ``export_logits.device`` where the file
  leaves them ``auto``; on SLURM it defaults to ``cuda`` when ``gpus_per_job > 0`` (the planning
  host is usually a login node without a GPU, and the device is part of the key).

An axis left out keeps the pipeline file's value. The plan lists every run in stage order (split
-> train-expert -> export-logits -> calibrate -> train-gate -> eval -> baselines -> report),
deduplicated by key, each with a dependency *level* (1 + the highest level of the runs it reads;
the ce expert precedes the decoupled one). Runs whose key is already in the store are skipped;
the rest are executed level by level: in-process, or through submitit (one job array per level on
SLURM; subprocesses on the local executor). A job only carries JSON and the store root, and calls
:func:`execute`, which re-validates the config, checks the key and calls ``run_stage``; since keys
are deterministic and publishing is atomic (per-key lock, temp dir + rename), a retried or
duplicated job is a cache hit or waits on the key lock, and a killed one leaves only a temp dir
that ``argse gc`` removes.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .config import resolve_device, section_name
from .dag import DAG, RUN_ORDER
from .errors import ArgseError
from .pipeline import SECTIONS, Memo, Pipeline, Resolved, load_file, validate
from .store import Store

STAGE_ORDER = RUN_ORDER
StageName = Literal[STAGE_ORDER]  # the same names, as a validated type


# ------------------------------------------------------------------------------ the grid
class SweepSpec(BaseModel):
    """The ``sweep:`` section of a pipeline file (CLI options replace its axes one by one)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    seeds: tuple[Annotated[int, Field(ge=0)], ...] | None = Field(
        None, min_length=1, description="experts' and gate's seed per run"
    )
    losses: tuple[str, ...] | None = Field(None, min_length=1, description="the expert set")
    betas: tuple[Literal["balanced", "worst"], ...] | None = Field(None, min_length=1)
    full_reruns: bool = Field(False, description="also vary split.seed (new LT subset per seed)")
    until: StageName = Field("report", description="last stage of the plan")


def _spec(data: dict[str, Any]) -> SweepSpec:
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        field_ = f"sweep.{loc}" if loc else "sweep"
        fix = (
            f"valid fields: {', '.join(SweepSpec.model_fields)}"
            if err["type"] == "extra_forbidden"
            else "see docs/SLURM.md"
        )
        raise ArgseError(field_, err["msg"].replace("\n", " "), fix) from None


def load_sweep_file(path: str | Path | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pipeline document, ``sweep:`` section) of a pipeline file; the other sections as in load_file."""
    if path is None:
        return {}, {}
    p = Path(path)
    try:
        if p.suffix == ".json":
            raw = json.loads(p.read_text())
        else:
            import yaml

            raw = yaml.safe_load(p.read_text())
    except Exception:  # noqa: BLE001 - load_file gives the one-line error below
        raw = None
    if not isinstance(raw, dict) or "sweep" not in raw:
        return load_file(p), {}
    sweep = raw.pop("sweep") or {}
    if not isinstance(sweep, dict):
        raise ArgseError("sweep", "section must be a mapping", "write seeds: [42, 43] etc.")
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise ArgseError(
            f"config.{sorted(unknown)[0]}",
            "unknown section",
            f"valid sections: sweep, {', '.join(SECTIONS)}",
        )
    return raw, sweep


def axis_fields(seed: int | None, beta: str | None, full_reruns: bool) -> dict[str, list[tuple]]:
    """Grid axis -> the (section, field, value) it sets (see module doc)."""
    seeds = [("train_expert", "seed", seed), ("train_gate", "seed", seed), ("baselines", "seeds", [seed])]
    return {"seed": seeds + ([("split", "seed", seed)] if full_reruns else []),
            "beta": [("train_gate", "beta", beta)]}  # fmt: skip


def point_doc(
    doc: dict[str, Any],
    seed: int | None = None,
    losses: list[str] | tuple[str, ...] | None = None,
    beta: str | None = None,
    full_reruns: bool = False,
    device: str | None = None,
) -> dict[str, Any]:
    """The pipeline document of one grid point: ``doc`` with the axis fields set (see module doc)."""
    d = copy.deepcopy(doc)

    def sec(name: str) -> dict[str, Any]:
        s = d.get(name)
        if s is None:
            s = d[name] = {}
        if not isinstance(s, dict):
            raise ArgseError(name, "section must be a mapping", "write field: value lines")
        return s

    for axis, fields in axis_fields(seed, beta, full_reruns).items():
        if {"seed": seed, "beta": beta}[axis] is not None:
            for name, f, v in fields:
                sec(name)[f] = v
    if losses is not None:
        sec("train_expert")["losses"] = list(losses)
    if device is not None:
        for name in ("train_expert", "export_logits"):
            if sec(name).get("device", "auto") == "auto":
                sec(name)["device"] = device
    return d


# ------------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class RunSpec(Resolved):
    """One stage run: a resolved stage instance (everything ``run_stage`` needs, and its key), plus
    the grid point and dependency level."""

    point: dict[str, Any] = field(default_factory=dict)
    level: int = 0

    def to_json(self) -> str:
        return json.dumps(
            {
                "stage": self.stage,
                "config": self.config.model_dump(mode="json"),
                "upstream": self.upstream,
                "upstream_stages": self.upstream_stages,
                "extra": self.extra,
                "key": self.key,
                "point": self.point,
                "level": self.level,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> RunSpec:
        d = json.loads(text)
        return cls(
            stage=d["stage"],
            config=validate(d["stage"], d["config"]),
            upstream=d["upstream"],
            upstream_stages=d["upstream_stages"],
            extra=d.get("extra") or {},
            key=d["key"],
            point=d.get("point") or {},
            level=int(d.get("level", 0)),
        )

    def deps(self) -> list[tuple[str, str]]:
        """(stage, key) of every upstream artifact, lists flattened in order."""
        out = []
        for role, ref in self.upstream.items():
            for k in ref if isinstance(ref, list) else [ref]:
                out.append((self.upstream_stages[role], k))
        return out

    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.point.items())


def execute(run_spec_json: str, store_root: str, quiet: bool = False) -> str:
    """Run one planned stage (the job function; top level so submitit can pickle it by name).

    Re-validates the config from JSON, checks that this code derives the planned key, then calls
    ``run_stage``: an existing artifact is a cache hit, a concurrent writer of the key is waited
    for (per-key lock), an interrupted one left only a temp dir. Returns the key.
    """
    from .stages import key_of, run_stage

    spec = RunSpec.from_json(run_spec_json)
    key = key_of(spec.stage, spec.config, spec.upstream, spec.extra or None)
    if key != spec.key:
        raise ArgseError(
            f"sweep.{spec.stage}",
            f"worker derives key {key[:12]}, the plan said {spec.key[:12]}",
            "run the planner and the jobs with the same argse version",
        )
    store = Store(store_root)
    key, _ = run_stage(
        spec.stage,
        spec.config,
        spec.upstream,
        spec.upstream_stages,
        store,
        extra=spec.extra or None,
        quiet=quiet,
    )
    return key


def expand(
    doc: dict[str, Any],
    spec: SweepSpec,
    store: Store,
    memo: bool = True,
    device: str | None = None,
) -> list[RunSpec]:
    """The ordered, deduplicated plan of a grid (stage order, then grid order), with levels.

    Every stage of :data:`~argse_cli.dag.RUN_ORDER` up to ``spec.until``, per grid point: one
    train-expert per loss, baselines once per seed (against the first beta's gate), one report
    over every planned eval and baselines (its ``given`` roles)."""
    if "import_logits" in doc:
        raise ArgseError(
            "import_logits",
            "a sweep trains its own experts",
            "remove the import_logits section (or run the stages one by one)",
        )
    seeds = list(spec.seeds) if spec.seeds is not None else [None]
    betas = list(spec.betas) if spec.betas is not None else [None]
    shared = Memo()  # one validation per config, one hash per key across the grid
    pts = [({"seed": s, "beta": b}, Pipeline(point_doc(doc, s, spec.losses, b, spec.full_reruns, device),
                                              store, memo=memo, memo_of=shared))
           for s in seeds for b in betas]  # fmt: skip
    axes = point_axes(spec.full_reruns)
    plan: dict[tuple[str, str], RunSpec] = {}
    made: dict[str, list[str]] = {}
    for stage in STAGE_ORDER[: STAGE_ORDER.index(spec.until) + 1]:
        given = {r.name: list(dict.fromkeys(made.get(r.stage, [])))
                 for r in DAG[stage].roles if r.fan == "given"}  # fmt: skip
        for at, p, fields in _instances(stage, pts):
            r = p.resolve(stage, given or None, **fields)
            made.setdefault(stage, []).append(r.key)
            vals = {**at, **fields}
            point = {a: vals[a] for a in (*axes[stage], *fields) if vals.get(a) is not None}
            plan.setdefault((stage, r.key), RunSpec(stage, r.config, r.upstream, r.upstream_stages,
                                                     r.extra or {}, r.key, point))  # fmt: skip
    return _with_levels(list(plan.values()))


def _instances(stage: str, pts: list) -> list[tuple[dict, Pipeline, dict]]:
    """(grid point, its pipeline, instance fields) of each run of ``stage`` in the plan."""
    if stage == "train-expert":
        return [(at, p, {"loss": l}) for at, p in pts for l in p.train_losses()]
    if stage == "report":
        return [(*pts[0], {})]
    if stage == "baselines":  # once per seed, against the first beta's gate
        first = {at["seed"]: (at, p) for at, p in reversed(pts)}
        return [(at, p, {}) for at, p in pts if first[at["seed"]][1] is p]
    return [(at, p, {}) for at, p in pts]


def point_axes(full_reruns: bool) -> dict[str, tuple[str, ...]]:
    """Stage -> the grid axes its runs are labelled with: the axes that set a field of its section
    or reach it through an upstream (report, over ``given`` inputs, has none)."""
    sets = {axis: {name for name, _, _ in fields}
            for axis, fields in axis_fields(0, "balanced", full_reruns).items()}  # fmt: skip
    out: dict[str, tuple[str, ...]] = {}
    for stage in STAGE_ORDER:
        ups = [out[r.stage] for r in DAG[stage].roles if r.fan != "given" and r.stage in out]
        out[stage] = tuple(a for a in sets if section_name(stage) in sets[a] or any(a in u for u in ups))
    return out


def _with_levels(plan: list[RunSpec]) -> list[RunSpec]:
    level: dict[tuple[str, str], int] = {}
    out = []
    for r in plan:
        lv = max((level[d] + 1 for d in r.deps() if d in level), default=0)
        level[(r.stage, r.key)] = lv
        out.append(
            RunSpec(r.stage, r.config, r.upstream, r.upstream_stages, r.extra, r.key, r.point, lv)
        )
    return out


def plan_lines(plan: list[RunSpec], store: Store) -> list[str]:
    """One line per run: status (cached / to-run), level, stage, full key, grid point."""
    lines = []
    for r in plan:
        status = "cached" if store.exists(r.stage, r.key) else "to-run"
        lines.append(f"{status:<7}L{r.level} {r.stage:<14} {r.key}  {r.label()}".rstrip())
    n_cached = sum(store.exists(r.stage, r.key) for r in plan)
    lines.append(f"{len(plan)} runs: {n_cached} cached, {len(plan) - n_cached} to run")
    return lines


# ------------------------------------------------------------------------------ executors
def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    tail = [t for t in text if t.strip()]
    return f"{e.__class__.__name__}: {tail[-1] if tail else ''}"


class InProcessExecutor:
    """Runs every job in this process, one after the other (the default)."""

    name = "in-process"

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.submitted = 0

    def run_level(self, runs: list[RunSpec], store_root: Path) -> list[str | None]:
        errors: list[str | None] = []
        for r in runs:
            self.submitted += 1
            try:
                execute(r.to_json(), str(store_root), quiet=self.quiet)
                errors.append(None)
            except Exception as e:  # noqa: BLE001 - one failed run must not stop its siblings
                errors.append(_one_line(e))
        return errors


class SubmititExecutor:
    """submitit: ``kind="slurm"`` (one job array per level) or ``"local"`` (subprocesses).

    SLURM: ``partition``, ``gpus_per_job`` (``--gpus-per-node``), ``timeout_min`` (``--time``),
    ``array_parallelism`` (``--array=0-N%P``), ``cpus_per_task``; ``slurm_params`` is passed to
    ``SlurmExecutor.update_parameters`` as is (e.g. ``{"account": "x", "mem": "32G"}``).
    Local: at most ``array_parallelism`` jobs run at once; ``gpus_per_job`` GPUs are visible to each
    (``CUDA_VISIBLE_DEVICES``), none by default.
    """

    def __init__(
        self,
        kind: Literal["local", "slurm"] = "local",
        folder: str | Path = "submitit",
        partition: str | None = None,
        gpus_per_job: int = 0,
        timeout_min: int = 240,
        array_parallelism: int = 16,
        cpus_per_task: int | None = None,
        slurm_params: dict[str, Any] | None = None,
    ):
        if kind not in ("local", "slurm"):
            raise ArgseError("--executor", f"unknown submitit kind {kind!r}", "use local or slurm")
        if array_parallelism < 1 or timeout_min < 1 or gpus_per_job < 0:
            raise ArgseError(
                "--array-parallelism/--timeout-min/--gpus-per-job",
                "out of range",
                "parallelism >= 1, time limit >= 1 min, GPUs >= 0",
            )
        self.kind, self.folder = kind, str(folder)
        self.partition, self.gpus_per_job, self.timeout_min = partition, gpus_per_job, timeout_min
        self.array_parallelism, self.cpus_per_task = array_parallelism, cpus_per_task
        self.slurm_params = dict(slurm_params or {})
        self.name = f"submitit-{kind}"
        self.submitted = 0
        self.job_ids: list[str] = []

    def slurm_parameters(self, job_name: str = "argse") -> dict[str, Any]:
        """``SlurmExecutor.update_parameters`` arguments (sbatch flags)."""
        params: dict[str, Any] = {
            "job_name": job_name,
            "time": int(self.timeout_min),
            "nodes": 1,
            "ntasks_per_node": 1,
            "array_parallelism": int(self.array_parallelism),
        }
        if self.gpus_per_job:
            params["gpus_per_node"] = int(self.gpus_per_job)
        if self.partition:
            params["partition"] = self.partition
        if self.cpus_per_task:
            params["cpus_per_task"] = int(self.cpus_per_task)
        params.update(self.slurm_params)
        return params

    def _executor(self, job_name: str) -> Any:
        import submitit

        if self.kind == "slurm":
            ex = submitit.SlurmExecutor(folder=self.folder)
            ex.update_parameters(**self.slurm_parameters(job_name))
        else:
            ex = submitit.LocalExecutor(folder=self.folder)
            ex.update_parameters(
                timeout_min=int(self.timeout_min), gpus_per_node=int(self.gpus_per_job)
            )
        return ex

    def run_level(self, runs: list[RunSpec], store_root: Path) -> list[str | None]:
        root = str(Path(store_root).resolve())
        specs = [r.to_json() for r in runs]
        stages = sorted({r.stage for r in runs}, key=STAGE_ORDER.index)
        ex = self._executor("argse-" + "+".join(stages))
        # SLURM: the whole level is one job array (the scheduler enforces array_parallelism);
        # local: submit at most array_parallelism subprocesses at a time.
        step = len(specs) if self.kind == "slurm" else self.array_parallelism
        errors: list[str | None] = []
        for i in range(0, len(specs), step):
            chunk = specs[i : i + step]
            jobs = ex.map_array(execute, chunk, [root] * len(chunk))
            self.submitted += len(jobs)
            self.job_ids += [str(j.job_id) for j in jobs]
            try:
                for j in jobs:
                    try:
                        j.result()
                        errors.append(None)
                    except Exception as e:  # noqa: BLE001 - failed / killed job
                        errors.append(_one_line(e))
            except KeyboardInterrupt:
                if self.kind == "local":
                    for j in jobs:
                        j.cancel(check=False)
                raise
        return errors


# ---------------------------------------------------------------------------------- runner
@dataclass
class SweepResult:
    plan: list[RunSpec]
    cached: list[RunSpec] = field(default_factory=list)
    done: list[RunSpec] = field(default_factory=list)
    failed: list[tuple[RunSpec, str]] = field(default_factory=list)
    submitted: int = 0


def run_plan(
    plan: list[RunSpec],
    executor: Any,
    store: Store,
    retries: int = 0,
    say: Any = print,
) -> SweepResult:
    """Submit the runs not in the store, level by level; a run is done when its key is complete.

    A run whose upstream artifact is missing after its level (a failed dependency) is not
    submitted and counts as failed. Failed runs of a level are resubmitted up to ``retries`` times.
    """
    res = SweepResult(plan)
    todo = []
    for r in plan:
        (res.cached if store.exists(r.stage, r.key) else todo).append(r)
    if not todo:
        say(f"nothing to run: all {len(plan)} runs cached")
        return res
    for lv in sorted({r.level for r in todo}):
        runs = [r for r in todo if r.level == lv]
        ready = []
        for r in runs:
            missing = [f"{st} {k[:12]}" for st, k in r.deps() if not store.exists(st, k)]
            if missing:
                res.failed.append((r, f"upstream missing: {', '.join(missing)}"))
            else:
                ready.append(r)
        for attempt in range(retries + 1):
            if not ready:
                break
            counts: dict[str, int] = {}
            for r in ready:
                counts[r.stage] = counts.get(r.stage, 0) + 1
            what = ", ".join(f"{s} x{n}" for s, n in counts.items())
            again = f" (retry {attempt})" if attempt else ""
            say(f"level {lv}: {len(ready)} run(s) via {executor.name}: {what}{again}")
            t0 = time.time()
            before = executor.submitted
            errors = executor.run_level(ready, store.root)
            res.submitted += executor.submitted - before
            retry = []
            for r, err in zip(ready, errors, strict=True):
                if store.exists(r.stage, r.key):
                    res.done.append(r)
                else:
                    retry.append((r, err or "job ended without publishing its artifact"))
            say(
                f"level {lv}: {len(ready) - len(retry)} done, {len(retry)} failed "
                f"({time.time() - t0:.1f} s)"
            )
            ready = [r for r, _ in retry]
            if attempt == retries:
                res.failed += retry
    return res


def make_executor(
    executor: str,
    *,
    folder: str | Path,
    partition: str | None = None,
    gpus_per_job: int | None = None,
    timeout_min: int = 240,
    array_parallelism: int = 16,
    cpus_per_task: int | None = None,
    slurm_params: dict[str, Any] | None = None,
    quiet: bool = False,
) -> Any:
    """``inprocess`` | ``local`` | ``slurm`` -> an executor object."""
    name = executor.replace("-", "").replace("_", "").lower()
    if name == "inprocess":
        return InProcessExecutor(quiet=quiet)
    if name in ("local", "slurm"):
        if gpus_per_job is None:
            gpus_per_job = 1 if (name == "slurm" or resolve_device("auto") == "cuda") else 0
        return SubmititExecutor(
            name,
            folder=folder,
            partition=partition,
            gpus_per_job=gpus_per_job,
            timeout_min=timeout_min,
            array_parallelism=array_parallelism,
            cpus_per_task=cpus_per_task,
            slurm_params=slurm_params,
        )
    raise ArgseError(
        "--executor", f"unknown executor {executor!r}", "use inprocess, local or slurm"
    )


def _ints(seeds: Any) -> list[int] | None:
    if seeds is None:
        return None
    items = seeds.split(",") if isinstance(seeds, str) else list(seeds)
    out = []
    for s in items:
        try:
            out.append(int(str(s).strip()))
        except ValueError:
            raise ArgseError(
                "--seeds", f"{s!r} is not an integer", "write e.g. --seeds 42,43"
            ) from None
    return out


def sweep_command(
    config_path: str | Path | None,
    store_root: str | Path | None,
    seeds: str | list[int] | None = None,
    losses: list[str] | None = None,
    betas: list[str] | None = None,
    executor: str = "inprocess",
    dry_run: bool = False,
    *,
    until: str | None = None,
    full_reruns: bool | None = None,
    device: str | None = None,
    folder: str | Path | None = None,
    partition: str | None = None,
    gpus_per_job: int | None = None,
    cpus_per_task: int | None = None,
    timeout_min: int = 240,
    array_parallelism: int = 16,
    retries: int = 0,
    quiet: bool = False,
) -> int:
    """`argse sweep`: plan the grid, print it (``dry_run``: and stop), run what is not cached.

    Returns 0 when every run of the plan is complete in the store, 1 when some failed. User
    errors raise :class:`ArgseError` (the CLI turns them into exit code 2).
    """
    doc, sweep = load_sweep_file(config_path)
    over: dict[str, Any] = {}
    if seeds is not None:
        over["seeds"] = _ints(seeds)
    if losses:
        flat = [x.strip() for item in losses for x in str(item).split(",") if x.strip()]
        over["losses"] = flat
    if betas:
        over["betas"] = list(betas)
    if until is not None:
        over["until"] = until
    if full_reruns is not None:
        over["full_reruns"] = full_reruns
    spec = _spec({**sweep, **over})
    store = Store(store_root)
    ex_name = executor.replace("-", "").replace("_", "").lower()
    if device is None and ex_name == "slurm":
        device = "cuda" if (gpus_per_job is None or gpus_per_job > 0) else "cpu"
    plan = expand(doc, spec, store, memo=not dry_run, device=device)
    say = (lambda *_a, **_k: None) if quiet else (lambda m: print(m, flush=True))
    if dry_run or not quiet:
        for line in plan_lines(plan, store):
            print(line, flush=True)
    if dry_run:
        return 0
    ex = make_executor(
        executor,
        folder=folder or Path(store.root) / ".submitit",
        partition=partition,
        gpus_per_job=gpus_per_job,
        timeout_min=timeout_min,
        array_parallelism=array_parallelism,
        cpus_per_task=cpus_per_task,
        quiet=quiet,
    )
    res = run_plan(plan, ex, store, retries=retries, say=say)
    for r, err in res.failed:
        print(f"failed {r.stage} {r.key[:12]} {r.label()}: {err}", file=sys.stderr, flush=True)
    say(
        f"sweep: {len(res.done)} computed, {len(res.cached)} cached, {len(res.failed)} failed, "
        f"{res.submitted} job(s) submitted"
    )
    return 1 if res.failed else 0
