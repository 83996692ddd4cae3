"""The `argse` command line: commands only parse options and call the stage runner."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from .errors import ArgseError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="AR-GSE: selective classification on long-tailed data. Run order: split -> train-expert -> "
    "export-logits -> calibrate -> train-gate -> eval / baselines -> report.",
    pretty_exceptions_enable=False,
)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="pipeline file (YAML/JSON) with one section per stage")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override any field: --set field=value (repeatable)")]
StoreOpt = Annotated[Path | None, typer.Option("--store", envvar="ARGSE_STORE", help="artifact store root [default: ./artifacts]")]
ForceOpt = Annotated[bool, typer.Option("--force", help="recompute even if the artifact exists")]
PrintCfgOpt = Annotated[bool, typer.Option("--print-config", help="show the resolved config and key; run nothing")]
PrintKeyOpt = Annotated[bool, typer.Option("--print-key", help="print only the key; run nothing")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress output")]


def _fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    raise typer.Exit(2)


def handled(fn):
    """Turn user-facing errors into one line on stderr and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*a: Any, **k: Any) -> Any:
        try:
            return fn(*a, **k)
        except ArgseError as e:
            _fail(str(e))
        except AssertionError as e:
            if type(e).__name__ != "LeakError":  # data.splits.LeakError (not imported: keeps numpy out)
                raise
            _fail(f"split: leak detected: {e} -- fix: report this bug; nothing was published")
        except KeyboardInterrupt:
            _fail("interrupted; nothing was published")

    return wrapper


def _pipeline(config: Path | None, store: Path | None, dry: bool = False):
    from .pipeline import Pipeline, load_file
    from .store import Store

    # dry (--print-config / --print-key): nothing may be written, not even the fingerprint memo
    return Pipeline(load_file(config), Store(store), memo=not dry)


def _update_given(over: dict[str, Any], **opts: Any) -> None:
    """Put the command's own options over the --set values, skipping those not given (None)."""
    over.update({k: v for k, v in opts.items() if v is not None})


def _emit(stage: str, cfg: Any, key: str, print_config: bool, print_key: bool) -> bool:
    if print_key:
        print(key)
        return True
    if print_config:
        print(json.dumps({"stage": stage, "key": key, "config": cfg.model_dump(mode="json")}, indent=2))
        return True
    return False


# --------------------------------------------------------------------------------- split
@app.command()
@handled
def split(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    dataset: Annotated[str | None, typer.Option(help="cifar10 | cifar100")] = None,
    imbalance_factor: Annotated[float | None, typer.Option("--imbalance-factor", help="IF >= 1 [100]")] = None,
    seed: Annotated[int | None, typer.Option(help="subsampling/split seed [0]")] = None,
    protocol: Annotated[str | None, typer.Option(help="paper | fractions")] = None,
    fractions: Annotated[str | None, typer.Option(help="comma list in split order, e.g. 0.2,0.1,0.1,0.6")] = None,
    group_rule: Annotated[str | None, typer.Option("--group-rule", help="threshold:20 | quantile:0.5")] = None,
    data_root: Annotated[Path | None, typer.Option("--data-root", envvar="ARGSE_DATA", help="[./data]")] = None,
    download: Annotated[bool | None, typer.Option("--download/--no-download", help="allow torchvision download")] = None,
    store: StoreOpt = None,
    force: ForceOpt = False,
    print_config: PrintCfgOpt = False,
    print_key: PrintKeyOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Long-tailed subset, class->group map and leak-free splits of CIFAR-10/100."""
    from .pipeline import parse_set

    p = _pipeline(config, store, dry=print_config or print_key)
    over: dict[str, Any] = parse_set(set_)
    _update_given(over, dataset=dataset, imbalance_factor=imbalance_factor, seed=seed, protocol=protocol,
                group_rule=group_rule, download=download,
                data_root=str(data_root) if data_root else None)
    if fractions is not None:
        over["fractions"] = _parse_fractions(fractions, protocol or p.raw("split").get("protocol", "paper"))
    p.override("split", over)
    cfg = p.config("split")
    extra = p.split_extra()
    from .stages import key_of, run_stage

    key = key_of("split", cfg, {}, extra)
    if _emit("split", cfg, key, print_config, print_key):
        return
    key, _ = run_stage("split", cfg, {}, {}, p.store, force=force, extra=extra, quiet=quiet)
    if not quiet:
        from .stages.split import print_table

        print_table(p.store.open("split", key))


def _parse_fractions(text: str, protocol: str) -> dict[str, float]:
    from .config import ALL_SPLITS, HELDOUT_SPLITS

    names = ALL_SPLITS if protocol == "fractions" else HELDOUT_SPLITS
    try:
        vals = [float(x) for x in text.split(",")]
    except ValueError:
        raise ArgseError("fractions", f"{text!r} is not a comma list of numbers", "e.g. 0.2,0.1,0.1,0.6") from None
    if len(vals) != len(names):
        raise ArgseError("fractions", f"need {len(names)} values ({','.join(names)})", f"protocol {protocol}")
    return dict(zip(names, vals, strict=True))


# ------------------------------------------------------------------------- train-expert
@app.command("train-expert")
@handled
def train_expert(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    loss: Annotated[list[str] | None, typer.Option(help="ce | balsoftmax | logitadjust:TAU | decoupled (repeatable) [default set]")] = None,
    depth: Annotated[int | None, typer.Option(help="ResNet depth 8|20|32|44|56 [32]")] = None,
    width: Annotated[int | None, typer.Option(help="ResNet channel multiplier [1]")] = None,
    shared_backbone: Annotated[bool | None, typer.Option(
        "--shared-backbone/--independent",
        help="one backbone with one head per loss (BalPoE style) / independent experts [independent]")] = None,
    epochs: Annotated[int | None, typer.Option(help="[200]")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="[128]")] = None,
    lr: Annotated[float | None, typer.Option(help="lr per batch of 128 [0.1]")] = None,
    aug: Annotated[str | None, typer.Option(help="cropflip | plan | none")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda")] = None,
    precision: Annotated[str | None, typer.Option(help="auto | fp32 | bf16")] = None,
    compile_: Annotated[bool | None, typer.Option("--compile/--no-compile", help="torch.compile (CUDA)")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    store: StoreOpt = None,
    force: ForceOpt = False,
    print_config: PrintCfgOpt = False,
    print_key: PrintKeyOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train experts on the split's long-tailed train set: one cached artifact per loss, or with
    --shared-backbone one artifact holding the backbone and a head per loss (+ the cRT head's)."""
    from .pipeline import parse_set
    from .stages import run_stage

    p = _pipeline(config, store, dry=print_config or print_key)
    over = parse_set(set_)
    _update_given(over, depth=depth, width=width, shared_backbone=shared_backbone, epochs=epochs,
                  batch_size=batch_size, lr=lr, aug=aug, device=device, precision=precision,
                  compile=compile_, seed=seed)  # fmt: skip
    if loss:
        over["losses"] = loss
    p.override("train-expert", over)
    for cfg, up, st, key in p.expert_runs():
        if _emit("train-expert", cfg, key, print_config, print_key):
            continue
        run_stage("train-expert", cfg, up, st, p.store, force=force, quiet=quiet)


# ------------------------------------------------------------------------ export-logits
@app.command("export-logits")
@handled
def export_logits(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    chunk_rows: Annotated[int | None, typer.Option("--chunk-rows", help="rows per Zarr chunk [4096]")] = None,
    include_train: Annotated[bool | None, typer.Option("--include-train/--no-include-train")] = None,
    loss: Annotated[list[str] | None, typer.Option(help="expert losses to export (repeatable) [default set]")] = None,
    store: StoreOpt = None,
    force: ForceOpt = False,
    print_config: PrintCfgOpt = False,
    print_key: PrintKeyOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Export every expert's raw fp16 logits on the held-out splits (row-chunked Zarr)."""
    from .pipeline import parse_set
    from .stages import key_of, run_stage

    p = _pipeline(config, store, dry=print_config or print_key)
    over = parse_set(set_)
    _update_given(over, chunk_rows=chunk_rows, include_train=include_train)
    p.override("export-logits", over)
    if loss:
        p.override("train-expert", {"losses": loss})
    cfg = p.config("export-logits")
    up, st = p.export_upstream()
    key = key_of("export-logits", cfg, up)
    if _emit("export-logits", cfg, key, print_config, print_key):
        return
    run_stage("export-logits", cfg, up, st, p.store, force=force, quiet=quiet)


# ---------------------------------------------------------------------------- calibrate
@app.command()
@handled
def calibrate(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    view: Annotated[str | None, typer.Option(help="lt | bal: target view of the NLL [lt]")] = None,
    posterior: Annotated[str | None, typer.Option(help="train | balanced [train]")] = None,
    store: StoreOpt = None,
    force: ForceOpt = False,
    print_config: PrintCfgOpt = False,
    print_key: PrintKeyOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fit one temperature per expert on val_small; report NLL/ECE before and after."""
    from .pipeline import parse_set
    from .stages import key_of, run_stage

    p = _pipeline(config, store, dry=print_config or print_key)
    over = parse_set(set_)
    _update_given(over, view=view, posterior=posterior)
    p.override("calibrate", over)
    cfg = p.config("calibrate")
    up, st = p.calibrate_upstream()
    key = key_of("calibrate", cfg, up)
    if _emit("calibrate", cfg, key, print_config, print_key):
        return
    run_stage("calibrate", cfg, up, st, p.store, force=force, quiet=quiet)


# --------------------------------------------------------------------------- train-gate
def _gate_overrides(p, set_, beta, xi, c, epochs, seed, view, uniform_gate, hard_routing) -> None:
    from .pipeline import parse_set

    over = parse_set(set_)
    _update_given(over, beta=beta, xi=xi, c=c, epochs=epochs, seed=seed, view=view, uniform_gate=uniform_gate,
                hard_routing=hard_routing)
    p.override("train-gate", over)


@app.command("train-gate")
@handled
def train_gate(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    beta: Annotated[str | None, typer.Option(help="balanced | worst [balanced]")] = None,
    xi: Annotated[float | None, typer.Option(help="EG step for --beta worst [1.0]")] = None,
    c: Annotated[float | None, typer.Option(help="rejection cost [0.05]")] = None,
    epochs: Annotated[int | None, typer.Option(help="[100]")] = None,
    seed: Annotated[int | None, typer.Option(help="gate seed [42]")] = None,
    view: Annotated[str | None, typer.Option(help="lt | bal: target distribution [lt]")] = None,
    uniform_gate: Annotated[bool | None, typer.Option("--uniform-gate/--learned-gate")] = None,
    hard_routing: Annotated[bool | None, typer.Option("--hard-routing/--soft-routing")] = None,
    store: StoreOpt = None,
    force: ForceOpt = False,
    print_config: PrintCfgOpt = False,
    print_key: PrintKeyOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train the gating network and the AR-GSE rejector (alpha, mu) primal-dual."""
    from .stages import key_of, run_stage

    p = _pipeline(config, store, dry=print_config or print_key)
    _gate_overrides(p, set_, beta, xi, c, epochs, seed, view, uniform_gate, hard_routing)
    cfg = p.config("train-gate")
    up, st = p.gate_upstream()
    key = key_of("train-gate", cfg, up)
    if _emit("train-gate", cfg, key, print_config, print_key):
        return
    run_stage("train-gate", cfg, up, st, p.store, force=force, quiet=quiet)


# --------------------------------------------------------------------------------- eval
@app.command("eval")
@handled
def eval_(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    gate: Annotated[str | None, typer.Option(help="gate key [the pipeline file's train_gate]")] = None,
    n_boot: Annotated[int | None, typer.Option("--n-boot", help="bootstrap resamples [1000]")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    store: StoreOpt = None,
    force: ForceOpt = False,
    print_config: PrintCfgOpt = False,
    print_key: PrintKeyOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Risk-coverage metrics of a trained gate on test (sweep and refit views, bootstrap CIs)."""
    from .pipeline import parse_set
    from .stages import key_of, run_stage

    p = _pipeline(config, store, dry=print_config or print_key)
    over = parse_set(set_)
    _update_given(over, n_boot=n_boot, seed=seed)
    p.override("eval", over)
    cfg = p.config("eval")
    gkey = p.store.resolve(gate, "train-gate")[1] if gate else p.gate_key()
    up, st = {"gate": gkey}, {"gate": "train-gate"}
    key = key_of("eval", cfg, up)
    if _emit("eval", cfg, key, print_config, print_key):
        return
    run_stage("eval", cfg, up, st, p.store, force=force, quiet=quiet)


# ---------------------------------------------------------------------------- baselines
@app.command()
@handled
def baselines(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    gate: Annotated[str | None, typer.Option(help="gate key for AR-GSE ablations [pipeline's]")] = None,
    seeds: Annotated[str | None, typer.Option(help="comma list, e.g. 42,43,44,45,46")] = None,
    c: Annotated[float | None, typer.Option(help="rejection cost [0.05]")] = None,
    n_boot: Annotated[int | None, typer.Option("--n-boot")] = None,
    store: StoreOpt = None,
    force: ForceOpt = False,
    print_config: PrintCfgOpt = False,
    print_key: PrintKeyOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Chow, DE-Chow, CS-plug-in (U-PI, SB-PI), Plug-in[Worst] and AR-GSE ablations."""
    from .pipeline import parse_set
    from .stages import key_of, run_stage

    p = _pipeline(config, store, dry=print_config or print_key)
    over = parse_set(set_)
    _update_given(over, c=c, n_boot=n_boot)
    if seeds:
        over["seeds"] = [int(s) for s in seeds.split(",")]
    p.override("baselines", over)
    cfg = p.config("baselines")
    gkey = p.store.resolve(gate, "train-gate")[1] if gate else p.gate_key()
    est, ekey = p.export_ref()
    up = {"export": ekey, "calibrate": p.calibrate_key(), "gate": gkey}
    st = {"export": est, "calibrate": "calibrate", "gate": "train-gate"}
    key = key_of("baselines", cfg, up)
    if _emit("baselines", cfg, key, print_config, print_key):
        return
    run_stage("baselines", cfg, up, st, p.store, force=force, quiet=quiet)


# ------------------------------------------------------------------------------- report
@app.command()
@handled
def report(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    eval_keys: Annotated[list[str] | None, typer.Option("--eval", help="eval keys (repeatable)")] = None,
    baseline_keys: Annotated[list[str] | None, typer.Option("--baselines", help="baselines keys (repeatable)")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="also copy main.tex and figures here")] = None,
    store: StoreOpt = None,
    force: ForceOpt = False,
    print_config: PrintCfgOpt = False,
    print_key: PrintKeyOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """LaTeX tables (booktabs) and PDF/PNG figures from eval and baselines artifacts."""
    from .pipeline import parse_set
    from .stages import key_of, run_stage

    p = _pipeline(config, store, dry=print_config or print_key)
    p.override("report", parse_set(set_))
    cfg = p.config("report")
    evals = [p.store.resolve(k, "eval")[1] for k in eval_keys or []]
    bases = [p.store.resolve(k, "baselines")[1] for k in baseline_keys or []]
    if not evals and not bases:
        raise ArgseError("--eval/--baselines", "no input artifacts", "pass --eval KEY and/or --baselines KEY")
    up = {"evals": evals, "baselines": bases}
    st = {"evals": "eval", "baselines": "baselines"}
    key = key_of("report", cfg, up)
    if _emit("report", cfg, key, print_config, print_key):
        return
    key, _ = run_stage("report", cfg, up, st, p.store, force=force, quiet=quiet)
    if out is not None:
        from .stages.report import export_to

        export_to(p.store.open("report", key), out)


# ------------------------------------------------------------------------ import-logits
@app.command("import-logits")
@handled
def import_logits(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    store: StoreOpt = None,
    force: ForceOpt = False,
    print_config: PrintCfgOpt = False,
    print_key: PrintKeyOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Import experts' logits trained elsewhere (pipeline file with an import_logits section)."""
    from .pipeline import parse_set
    from .stages import key_of
    from .stages.import_logits import key_extra, run

    p = _pipeline(config, store)
    p.override("import-logits", parse_set(set_))
    cfg = p.config("import-logits")
    if print_key or print_config:
        extra = key_extra(cfg, p.store, write=False)
        _emit("import-logits", cfg, key_of("import-logits", cfg, {}, extra), print_config, print_key)
        return
    run(cfg, p.store, force=force, quiet=quiet)


@app.command()
@handled
def apply(
    gate: Annotated[str, typer.Argument(help="train-gate key (or unique prefix)")],
    logits: Annotated[list[Path], typer.Option("--logits", help="one logits file per expert, in the gate's expert order")],
    out: Annotated[Path, typer.Option("--out", help="output file (.npz or .csv): prediction, margin, accept per row")],
    store: StoreOpt = None,
) -> None:
    """Apply a stored calibrated gate + rejector to new logits."""
    from .apply import apply_files
    from .store import Store

    print(apply_files(gate, [str(x) for x in logits], str(out), Store(store).root))


# -------------------------------------------------------------------------------- sweep
@app.command()
@handled
def sweep(
    config: ConfigOpt = None,
    seeds: Annotated[str | None, typer.Option(help="comma list of seeds, e.g. 42,43,44")] = None,
    loss: Annotated[list[str] | None, typer.Option(help="expert losses (repeatable or comma list)")] = None,
    beta: Annotated[list[str] | None, typer.Option(help="gate variants: balanced / worst (repeatable)")] = None,
    executor: Annotated[str, typer.Option(help="inprocess | local | slurm")] = "inprocess",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan (key, cached / to-run) only")] = False,
    until: Annotated[str | None, typer.Option(help="last stage to plan (e.g. train-gate)")] = None,
    full_reruns: Annotated[bool | None, typer.Option("--full-reruns/--no-full-reruns", help="seeds also re-draw split and experts")] = None,
    device: Annotated[str | None, typer.Option(help="device class for training stages (cpu | cuda)")] = None,
    folder: Annotated[Path | None, typer.Option(help="submitit log folder")] = None,
    partition: Annotated[str | None, typer.Option(help="SLURM partition")] = None,
    gpus_per_job: Annotated[int | None, typer.Option("--gpus-per-job")] = None,
    cpus_per_task: Annotated[int | None, typer.Option("--cpus-per-task")] = None,
    timeout_min: Annotated[int, typer.Option("--timeout-min", help="SLURM time limit per job")] = 240,
    array_parallelism: Annotated[int, typer.Option("--array-parallelism")] = 16,
    retries: Annotated[int, typer.Option(help="resubmit failed runs this many times")] = 0,
    store: StoreOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Fan out seeds x expert losses x gate options (in-process, submitit local or SLURM arrays)."""
    from .sweep import sweep_command

    rc = sweep_command(
        config, store, seeds, loss, beta, executor, dry_run, until=until, full_reruns=full_reruns,
        device=device, folder=folder, partition=partition, gpus_per_job=gpus_per_job,
        cpus_per_task=cpus_per_task, timeout_min=timeout_min, array_parallelism=array_parallelism,
        retries=retries, quiet=quiet,
    )
    if rc:
        raise typer.Exit(rc)


# ------------------------------------------------------------------------- store tools
@app.command()
@handled
def ls(store: StoreOpt = None, stage: Annotated[str | None, typer.Option(help="only this stage")] = None) -> None:
    """Table of complete artifacts: stage, key, created, short config summary."""
    from rich.console import Console
    from rich.table import Table

    from .store import Store

    s = Store(store)
    t = Table("stage", "key", "created", "summary")
    for a in s.list():
        if stage and a.stage != stage:
            continue
        t.add_row(a.stage, a.key[:16], a.manifest.get("created", ""), _summary(a))
    Console().print(t)


def _summary(a) -> str:
    skip = {"seed"} if a.stage == "report" else set()
    items = [f"{k}={v}" for k, v in sorted(a.config.items()) if k not in skip and not isinstance(v, (dict, list))]
    return ", ".join(items)[:90]


@app.command()
@handled
def show(key: str, store: StoreOpt = None) -> None:
    """Manifest of one artifact plus its arrays and shapes."""
    from rich.console import Console

    from .store import Store

    a = Store(store).open(None, key)
    con = Console()
    m = dict(a.manifest)
    arrays = m.pop("arrays", {})
    con.print_json(json.dumps(m))
    for name, info in arrays.items():
        con.print(f"  {name}: {info['dtype']} {tuple(info['shape'])} chunk_rows={info['chunk_rows']}")


@app.command()
@handled
def verify(keys: Annotated[list[str] | None, typer.Argument(help="keys (default: all)")] = None, store: StoreOpt = None) -> None:
    """Recompute every checksum; exit 1 on a mismatch."""
    from .store import Store

    s = Store(store)
    arts = [s.open(None, k) for k in keys] if keys else s.list()
    bad = 0
    for a in arts:
        problems = a.verify()
        print(f"{'OK  ' if not problems else 'BAD '} {a.stage} {a.key}")
        for pr in problems:
            print(f"     {pr}")
        bad += bool(problems)
    if bad:
        raise typer.Exit(1)


@app.command()
@handled
def gc(
    store: StoreOpt = None,
    max_age: Annotated[float, typer.Option("--max-age", help="hours after which a dead writer's temp dir goes")] = 24.0,
    keep: Annotated[list[str] | None, typer.Option("--keep", help="also remove artifacts not reachable from these keys")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run")] = False,
) -> None:
    """Remove temp dirs of dead writers (never a live writer's); optionally unreachable artifacts."""
    from .store import Store

    removed = Store(store).gc(max_age_s=max_age * 3600, keep=keep, dry_run=dry_run)
    for r in removed:
        print(("would remove " if dry_run else "removed ") + r)
    print(f"{len(removed)} {'to remove' if dry_run else 'removed'}")


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    return f"warning: {message}\n"


def main() -> None:
    import warnings

    warnings.formatwarning = _one_line_warning
    app()


if __name__ == "__main__":
    main()
