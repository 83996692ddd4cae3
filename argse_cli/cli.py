"""The `argse` command line: commands only parse options and call the stage runner.

Conventions: every option has help text; a default is shown as ``[default: X]`` (the stage
config's default where the option is left unset); options with a fixed set of values are Enums
(``--help`` lists them); ``--set field=value`` or ``--set section.field=value`` overrides any
field of any section of the pipeline file (an upstream section changes the upstream keys, as
editing the file would); bad input is one ``error: <field>: <problem> -- fix: <fix>`` line.
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, get_args

import typer

from . import __version__
from .dag import DAG
from .errors import ArgseError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="AR-GSE: selective classification on long-tailed data. Run order: split -> train-expert -> "
    "export-logits -> calibrate -> train-gate -> eval / baselines -> report. Distribution `argse`, "
    "Python package `argse_cli`.",
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


# ------------------------------------------------------------------------------ help helpers
def _field_default(stage: str, field: str) -> Any:
    from .config import GATE_DEFAULTS, STAGE_MODELS

    f = STAGE_MODELS[stage].model_fields[field]
    v = None if f.default_factory is not None else f.default
    if v is None and stage == "train-gate":
        v = GATE_DEFAULTS.get(field)
    return v


def _show(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, tuple | list):
        return ",".join(_show(x) for x in v)
    return str(v)


def H(text: str, stage: str | None = None, field: str | None = None, default: Any = None) -> str:
    """Help text ending in ``[default: X]``: X from the stage config's field, or ``default``."""
    if stage is not None:
        default = _field_default(stage, field or "")
    return text if default is None else f"{text} \\[default: {_show(default)}]"  # \\[: not Rich markup


def _choices(stage: str, field: str) -> tuple[str, ...]:
    """The values of a Literal[...] (or Literal[...] | None) config field, as strings."""
    from .config import STAGE_MODELS

    ann = STAGE_MODELS[stage].model_fields[field].annotation
    args = get_args(ann)
    lits = [a for a in args if get_args(a)] if args and type(None) in args else [ann]
    vals: list[Any] = []
    for lit in lits:
        vals += [v for v in get_args(lit) if v is not None] if get_args(lit) else [lit]
    return tuple(str(v) for v in vals)


def _enum(name: str, values: tuple[str, ...]) -> type[Enum]:
    return Enum(name, {v: v for v in values}, type=str)  # type: ignore[return-value]


Dataset = _enum("Dataset", _choices("split", "dataset"))
Protocol = _enum("Protocol", _choices("split", "protocol"))
Depth = _enum("Depth", _choices("train-expert", "depth"))
Aug = _enum("Aug", _choices("train-expert", "aug"))
Device = _enum("Device", _choices("train-expert", "device"))
Precision = _enum("Precision", _choices("train-expert", "precision"))
View = _enum("View", _choices("calibrate", "view"))
Posterior = _enum("Posterior", _choices("calibrate", "posterior"))
Beta = _enum("Beta", _choices("train-gate", "beta"))
SagMode = _enum("SagMode", _choices("eval", "sag_mode"))
Executor = _enum("Executor", ("inprocess", "local", "slurm"))
SweepDevice = _enum("SweepDevice", ("cpu", "cuda"))
Kind = _enum("Kind", ("balanced", "worst", "standard"))
Format = _enum("Format", ("csv", "parquet"))
StageName = _enum("StageName", tuple(DAG))


def _val(v: Any) -> Any:
    """Enum members -> their value (lists element-wise); anything else unchanged."""
    if isinstance(v, Enum):
        return v.value
    if isinstance(v, list):
        return [_val(x) for x in v]
    return v


def _pattern(name: str, regex: str, example: str):
    """A typer ``parser`` for a value with a fixed grammar (e.g. a loss spec)."""
    import re

    rx = re.compile(regex)

    def parse(text: str) -> str:
        if not rx.fullmatch(str(text)):
            raise typer.BadParameter(f"{text!r} is not {example}")
        return str(text)

    parse.__name__ = name
    return parse


LOSSES = "ce | balsoftmax | logitadjust:TAU | decoupled"
_loss = _pattern("loss", r"ce|balsoftmax|decoupled|logitadjust:\d+(\.\d+)?", LOSSES)
_group_rule = _pattern("group_rule", r"threshold:\d+|quantile:(0?\.\d+|1(\.0+)?)(,0?\.\d+)*",
                       "threshold:T or quantile:Q[,Q2..]")


def _version(value: bool) -> None:
    if value:
        print(f"argse {__version__} (Python package argse_cli)")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool | None, typer.Option("--version", callback=_version, is_eager=True,
                                                 help="print the version and exit")] = None,
) -> None:
    """AR-GSE: selective classification on long-tailed data."""


ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="pipeline file (YAML/JSON) with one section per stage")]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", help="override a field: --set field=value (this stage) or --set section.field=value (any "
    "section of the pipeline file; upstream sections change the upstream keys); repeatable")]
StoreOpt = Annotated[Path | None, typer.Option("--store", envvar="ARGSE_STORE", help=H("artifact store root", default="./artifacts"))]
ForceOpt = Annotated[bool, typer.Option("--force", help="recompute even if the artifact exists")]
PrintCfgOpt = Annotated[bool, typer.Option("--print-config", help="show the resolved config and key as one JSON document; run nothing")]
PrintKeyOpt = Annotated[bool, typer.Option("--print-key", help="print only the key; run nothing")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress output (warnings and the outcome line stay)")]
RehashOpt = Annotated[bool, typer.Option("--rehash", help="hash the input files' contents again, ignoring the (path, size, mtime) memo")]
CostOpt = Annotated[float | None, typer.Option("--cost", help=H("rejection cost c of the operating point", "train-gate", "c"))]
CostAlias = Annotated[float | None, typer.Option("--c", hidden=True, help="old name of --cost")]


def _one_line(msg: str) -> str:
    """Control characters and every other line break ``str.splitlines`` knows (a newline, or a
    YAML ``"\\N"`` = U+0085, in a field name or a file path) shown escaped: the error stays one line."""
    import re

    return re.sub(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]", lambda m: m.group().encode("unicode_escape").decode(), msg)


def _fail(msg: str) -> None:
    print(f"error: {_one_line(msg)}", file=sys.stderr, flush=True)
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


# ------------------------------------------------------------------------ stage commands
COMMON_HEAD = (("config", ConfigOpt, None), ("set_", SetOpt, None))
COMMON_TAIL = (("store", StoreOpt, None), ("force", ForceOpt, False), ("print_config", PrintCfgOpt, False),
               ("print_key", PrintKeyOpt, False), ("quiet", QuietOpt, False))
INPUTS_TAIL = (("rehash", RehashOpt, False),)  # stages whose key fingerprints input files


def _params(spec: tuple) -> list[inspect.Parameter]:
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    return [inspect.Parameter(name, kind, default=d, annotation=ann) for name, ann, d in spec]


def _pipeline(config: Path | None, store: Path | None, dry: bool = False, rehash: bool = False):
    from .pipeline import Pipeline, load_file
    from .store import Store

    # dry (--print-config / --print-key): nothing may be written, not even the fingerprint memo
    return Pipeline(load_file(config), Store(store), memo=not dry, rehash=rehash)


def _sets(p: Any, stage: str, items: list[str] | None) -> dict[str, Any]:
    """The ``--set`` values of this stage; ``section.field=value`` of another section goes to that
    section (so ``--set train_expert.epochs=2`` on train-gate finds the experts trained that way)."""
    from .config import section_name
    from .pipeline import SECTIONS, parse_set

    own: dict[str, Any] = {}
    for k, v in parse_set(items).items():
        sec, dot, field = k.partition(".")
        if not dot:
            own[k] = v
            continue
        if sec not in SECTIONS or not field:
            raise ArgseError("--set", f"{k!r}: unknown section {sec!r}",
                             f"write field=value or section.field=value with a section of {', '.join(SECTIONS)}")
        if sec == section_name(stage):
            own[field] = v
        else:
            p.override(sec.replace("_", "-"), {field: v})
    return own


class StageRun:
    """A stage command's common options and its pipeline: the pipeline file with the ``--set``
    values of other sections applied; this stage's ``--set`` values in ``own``, under its options."""

    def __init__(self, stage: str, config: Path | None = None, set_: list[str] | None = None,
                 store: Path | None = None, force: bool = False, print_config: bool = False,
                 print_key: bool = False, quiet: bool = False, rehash: bool = False):  # fmt: skip
        self.stage, self.config_path, self.force, self.quiet = stage, config, force, quiet
        self.print_config, self.print_key = print_config, print_key
        self.dry = print_config or print_key
        self.p = _pipeline(config, store, dry=self.dry, rehash=rehash)
        self.own = _sets(self.p, stage, set_)
        self._applied = False

    def set(self, **opts: Any) -> None:
        """The command's own options over the --set values, skipping those not given (None)."""
        self.own.update({k: _val(v) for k, v in opts.items() if v is not None})

    def apply(self) -> None:
        """Put this stage's values (--set, then its options) into the pipeline, once."""
        if not self._applied:
            self.p.override(self.stage, self.own)
            self._applied = True

    def config(self) -> Any:
        self.apply()
        return self.p.config(self.stage)

    def resolve(self, given: dict[str, Any] | None = None) -> Any:
        self.config()  # bad values are refused before any upstream is looked up
        return self.p.resolve(self.stage, given)

    def finish(self, r: Any, **more: Any) -> str | None:
        """Print the key (--print-key) or the config (--print-config), or run the stage and return
        its key."""
        if self.print_key:
            print(r.key)
        elif self.print_config:
            doc = {"stage": self.stage, "key": r.key, "config": r.config.model_dump(mode="json"), **more}
            print(json.dumps(doc, indent=2))
        else:
            return self.run(r)
        return None

    def run(self, r: Any) -> str:
        from .stages import run_stage

        return run_stage(r.stage, r.config, r.upstream, r.upstream_stages, self.p.store, force=self.force,
                         extra=r.extra, quiet=self.quiet)[0]  # fmt: skip

    def go(self, given: dict[str, Any] | None = None, **more: Any) -> str | None:
        return self.finish(self.resolve(given), **more)


def stage_command(stage: str) -> Any:
    """Register ``body(run, **own options)`` as the command of ``stage``: its signature (the CLI
    options) is the common head (--config, --set), the body's own options, then the common tail
    (--store, --force, --print-config, --print-key, --quiet; --rehash where the stage's key
    fingerprints input files)."""

    def register(body: Any) -> Any:
        common = (*COMMON_HEAD, *COMMON_TAIL, *(INPUTS_TAIL if DAG[stage].inputs else ()))
        own = list(inspect.signature(body, eval_str=True).parameters.values())[1:]
        params = [*_params(COMMON_HEAD), *own, *_params(common[len(COMMON_HEAD):])]

        def command(**kw: Any) -> Any:
            return body(StageRun(stage, **{n: kw.pop(n) for n, _, _ in common}), **kw)

        command.__name__, command.__doc__ = body.__name__, body.__doc__
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {q.name: q.annotation for q in params}
        app.command(stage)(handled(command))
        return body

    return register


def _cost(cost: float | None, c: float | None) -> float | None:
    if cost is not None and c is not None and cost != c:
        raise ArgseError("--cost", f"--cost {cost} and --c {c} disagree", "pass --cost only (--c is its old name)")
    return cost if cost is not None else c


# --------------------------------------------------------------------------------- split
@stage_command("split")
def split(
    run: StageRun,
    dataset: Annotated[Dataset | None, typer.Option(help=H("dataset", "split", "dataset"))] = None,
    imbalance_factor: Annotated[float | None, typer.Option("--imbalance-factor", help=H(
        "imbalance factor IF = n_max / n_min of the long-tailed profile (>= 1)", "split", "imbalance_factor"))] = None,
    seed: Annotated[int | None, typer.Option(help=H("seed of the long-tailed subsampling and of the split "
                                                    "assignment", "split", "seed"))] = None,
    protocol: Annotated[Protocol | None, typer.Option(help=H(
        "paper: experts train on the whole LT subset, held-out splits from the balanced test set; "
        "fractions: all five splits from the LT subset", "split", "protocol"))] = None,
    fractions: Annotated[str | None, typer.Option(help=H(
        "comma list in split order (tuneV,val_small,calib,test; fractions: train first)",
        default="0.2,0.1,0.1,0.6 (paper)"))] = None,
    group_rule: Annotated[str | None, typer.Option("--group-rule", parser=_group_rule,
                                                   metavar="threshold:T|quantile:Q", help=H(
        "class -> group rule: threshold:T (tail = classes with <= T training images) or quantile:Q",
        default="quantile:0.5 (cifar10), threshold:20 (cifar100)"))] = None,
    data_root: Annotated[Path | None, typer.Option("--data-root", envvar="ARGSE_DATA", help=H(
        "folder holding cifar-10-batches-py/ or cifar-100-python/", default="./data"))] = None,
    download: Annotated[bool | None, typer.Option("--download/--no-download", help=H(
        "allow a torchvision download when the files are missing", "split", "download"))] = None,
) -> None:
    """Long-tailed subset, class->group map and leak-free splits of CIFAR-10/100."""
    import warnings

    warnings.filterwarnings("default", message=".*MD5 differs.*")  # shown here, once (see main)
    run.set(dataset=dataset, imbalance_factor=imbalance_factor, seed=seed, protocol=protocol,
            group_rule=group_rule, download=download, data_root=str(data_root) if data_root else None)
    if fractions is not None:
        run.own["fractions"] = _parse_fractions(fractions, _val(protocol) or run.p.raw("split").get("protocol", "paper"))
    key = run.go()
    if key is not None and not run.quiet:
        from .stages.split import print_table

        print_table(run.p.store.open("split", key))


def _parse_ints(text: str, field: str) -> list[int]:
    """A comma list of integers (``42,43,44``); one-line error otherwise."""
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise ArgseError(field, f"{text!r} is not a comma list of integers", "e.g. 42,43,44") from None


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
@stage_command("train-expert")
def train_expert(
    run: StageRun,
    loss: Annotated[list[str] | None, typer.Option(parser=_loss, metavar="LOSS", help=H(
        f"expert loss, repeatable: {LOSSES} (TAU a number, e.g. logitadjust:2)",
        default="ce, balsoftmax, logitadjust:2, decoupled"))] = None,
    depth: Annotated[Depth | None, typer.Option(help=H("ResNet depth", "train-expert", "depth"))] = None,
    width: Annotated[int | None, typer.Option(help=H("ResNet channel multiplier", "train-expert", "width"))] = None,
    shared_backbone: Annotated[bool | None, typer.Option("--shared-backbone/--independent", help=H(
        "one backbone with a head per loss (BalPoE style) / independent experts", "train-expert",
        "shared_backbone"))] = None,
    epochs: Annotated[int | None, typer.Option(help=H("training epochs", "train-expert", "epochs"))] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help=H("batch size", "train-expert",
                                                                          "batch_size"))] = None,
    lr: Annotated[float | None, typer.Option(help=H("learning rate per batch of 128 (scaled linearly)",
                                                    "train-expert", "lr"))] = None,
    aug: Annotated[Aug | None, typer.Option(help=H("training augmentation", "train-expert", "aug"))] = None,
    device: Annotated[Device | None, typer.Option(help=H("auto: cuda when an NVIDIA driver is visible, else cpu",
                                                         "train-expert", "device"))] = None,
    precision: Annotated[Precision | None, typer.Option(help=H("auto: bf16 on cuda, fp32 on cpu", "train-expert",
                                                               "precision"))] = None,
    compile_: Annotated[bool | None, typer.Option("--compile/--no-compile", help=H(
        "torch.compile the model (CUDA)", "train-expert", "compile"))] = None,
    seed: Annotated[int | None, typer.Option(help=H("seed of the initialisation and the batch order",
                                                    "train-expert", "seed"))] = None,
) -> None:
    """Train experts on the split's long-tailed train set: one cached artifact per loss, or with
    --shared-backbone one artifact holding the backbone and a head per loss (+ the cRT head's).

    --print-config prints one JSON document listing every expert; --print-key one key per line."""
    run.set(depth=int(depth.value) if depth is not None else None, width=width, shared_backbone=shared_backbone,
            epochs=epochs, batch_size=batch_size, lr=lr, aug=aug, device=device, precision=precision,
            compile=compile_, seed=seed, losses=loss or None)  # fmt: skip
    run.apply()
    experts = run.p.experts()
    if run.print_key or run.print_config:
        docs = [{"loss": r.config.loss, "heads": r.config.heads, "key": r.key,
                 "config": r.config.model_dump(mode="json")} for r in experts]  # fmt: skip
        print("\n".join(r.key for r in experts) if run.print_key
              else json.dumps({"stage": "train-expert", "experts": docs}, indent=2))  # fmt: skip
        return
    for r in experts:
        run.run(r)


# ------------------------------------------------------------------------ export-logits
@stage_command("export-logits")
def export_logits(
    run: StageRun,
    chunk_rows: Annotated[int | None, typer.Option("--chunk-rows", help=H("rows per Zarr chunk", "export-logits",
                                                                          "chunk_rows"))] = None,
    include_train: Annotated[bool | None, typer.Option("--include-train/--no-include-train", help=H(
        "also export the logits of the experts' training split", "export-logits", "include_train"))] = None,
    loss: Annotated[list[str] | None, typer.Option(parser=_loss, metavar="LOSS", help=H(
        f"experts to export, repeatable: {LOSSES}", default="the train_expert section's losses"))] = None,
) -> None:
    """Export every expert's raw fp16 logits on the held-out splits (row-chunked Zarr)."""
    run.set(chunk_rows=chunk_rows, include_train=include_train)
    if loss:
        run.p.override("train-expert", {"losses": loss})
    run.go()


# ---------------------------------------------------------------------------- calibrate
@stage_command("calibrate")
def calibrate(
    run: StageRun,
    view: Annotated[View | None, typer.Option(help=H("target view of the NLL weights (lt: long-tailed, bal: "
                                                     "balanced)", "calibrate", "view"))] = None,
    posterior: Annotated[Posterior | None, typer.Option(help=H(
        "train: put every expert on the training prior; balanced: ablation", "calibrate", "posterior"))] = None,
) -> None:
    """Fit one temperature per expert on val_small; report NLL/ECE before and after."""
    run.set(view=view, posterior=posterior)
    run.go()


# --------------------------------------------------------------------------- train-gate
@stage_command("train-gate")
def train_gate(
    run: StageRun,
    beta: Annotated[Beta | None, typer.Option(help=H("balanced: Algorithm 1; worst: Algorithm 2", "train-gate",
                                                     "beta"))] = None,
    xi: Annotated[float | None, typer.Option(help=H("exponentiated-gradient step of Algorithm 2 (--beta worst "
                                                    "only)", "train-gate", "xi"))] = None,
    cost: CostOpt = None,
    c: CostAlias = None,
    epochs: Annotated[int | None, typer.Option(help=H("gate training epochs", "train-gate", "epochs"))] = None,
    seed: Annotated[int | None, typer.Option(help=H("seed of the gate's initialisation and batch order",
                                                    "train-gate", "seed"))] = None,
    view: Annotated[View | None, typer.Option(help=H("weights of the operating point's coverage and errors",
                                                     "train-gate", "view"))] = None,
    uniform_gate: Annotated[bool | None, typer.Option("--uniform-gate/--learned-gate", help=H(
        "--uniform-gate freezes the gate at w = 1/E (ablation: nothing is trained)", default="--learned-gate"))] = None,
    hard_routing: Annotated[bool | None, typer.Option("--hard-routing/--soft-routing", help=H(
        "top-1 routing (straight-through) instead of the soft mixture", default="--soft-routing"))] = None,
) -> None:
    """Train the gating network and fit its plug-in rule (alpha, mu) at every coverage."""
    run.set(beta=beta, xi=xi, c=_cost(cost, c), epochs=epochs, seed=seed, view=view, uniform_gate=uniform_gate,
            hard_routing=hard_routing)  # fmt: skip
    r = run.resolve()
    export = (r.upstream_stages["export"], r.upstream["export"])
    if r.config.experts is not None and run.p.store.exists(*export):
        num = run.p.store.open(*export).meta.get("num_experts")
        if isinstance(num, int):
            r.config.check_experts(num)  # experts=[5] with E = 4: refused before any work
    run.finish(r)


def _gate_key(p: Any, gate: str | None, dry: bool) -> tuple[str, bool]:
    """(gate key, trained?) of --gate (a key or unique prefix) or of the pipeline file's train_gate.
    A dry run (--print-config / --print-key) accepts a full key that is not trained yet."""
    if gate is None:
        k = p.gate_key()
        return k, p.store.exists("train-gate", k)
    try:
        return p.store.resolve(gate, "train-gate")[1], True
    except ArgseError:
        if dry and len(gate) == 32:
            return gate, False
        raise


def _missing_gate_note(gkey: str, trained: bool) -> dict[str, Any]:
    if not trained:
        print(f"note: gate {gkey[:12]} is not trained yet: run `argse train-gate` with the same config first",
              file=sys.stderr, flush=True)
    return {"gate": {"key": gkey, "trained": trained}}


def _on_gate(run: StageRun, gate: str | None) -> None:
    """Run (or print) a stage reading the gate of --gate or of the pipeline file (eval, baselines)."""
    run.config()
    gkey, trained = _gate_key(run.p, gate, run.dry)
    r = run.resolve({"gate": gkey})
    run.finish(r, **(_missing_gate_note(gkey, trained) if run.print_config and not run.print_key else {}))


# --------------------------------------------------------------------------------- eval
@stage_command("eval")
def eval_(
    run: StageRun,
    gate: Annotated[str | None, typer.Option(help=H("train-gate key or unique prefix",
                                                    default="the pipeline file's train_gate"))] = None,
    n_boot: Annotated[int | None, typer.Option("--n-boot", help=H("bootstrap resamples of the CIs (0: none)",
                                                                  "eval", "n_boot"))] = None,
    seed: Annotated[int | None, typer.Option(help=H("seed of the bootstrap resamples, the SAG stream and the "
                                                    "simulated humans", "eval", "seed"))] = None,
    target_risk: Annotated[float | None, typer.Option("--target-risk", help=H(
        "add risk-controlled thresholds fitted on calib for this target selective risk (LTT, per-group, "
        "Mondrian conformal)", default="off"))] = None,
    delta: Annotated[float | None, typer.Option(help=H("failure probability of the risk guarantee", "eval",
                                                       "delta"))] = None,
    conformal_epsilon: Annotated[float | None, typer.Option("--conformal-epsilon", help=H(
        "Mondrian conformal bound on P(accept | error, group)", "eval", "conformal_epsilon"))] = None,
    sag_mode: Annotated[SagMode | None, typer.Option("--sag-mode", help=H(
        "replay test as a stream with S-Aware-Gating thresholds in this mode", default="off"))] = None,
    sag_target: Annotated[float | None, typer.Option("--sag-target", help=H("target rate of the SAG mode", "eval",
                                                                            "sag_target"))] = None,
    l2d: Annotated[bool | None, typer.Option("--l2d/--no-l2d", help=H(
        "learning to defer to simulated humans by EM, compared with AR-GSE's rejection", "eval", "l2d"))] = None,
) -> None:
    """Risk-coverage metrics of a trained gate on test (refit and sweep views, bootstrap CIs), and
    optionally risk-controlled thresholds, SAG and learning to defer."""
    run.set(n_boot=n_boot, seed=seed, target_risk=target_risk, delta=delta, conformal_epsilon=conformal_epsilon,
            sag_mode=sag_mode, sag_target=sag_target, l2d=l2d)  # fmt: skip
    _on_gate(run, gate)


# ---------------------------------------------------------------------------- baselines
@stage_command("baselines")
def baselines(
    run: StageRun,
    gate: Annotated[str | None, typer.Option(help=H("train-gate key (or prefix) whose recipe the AR-GSE "
                                                    "ablations retrain", default="the pipeline file's train_gate"))] = None,
    seeds: Annotated[str | None, typer.Option(help=H("comma list of ablation gate seeds, e.g. 42,43,44",
                                                     "baselines", "seeds"))] = None,
    cost: CostOpt = None,
    c: CostAlias = None,
    n_boot: Annotated[int | None, typer.Option("--n-boot", help=H("bootstrap resamples of each method's CIs "
                                                                  "(0: none)", "baselines", "n_boot"))] = None,
) -> None:
    """Chow, DE-Chow, CS-plug-in (U-PI, SB-PI), Plug-in[Worst] and AR-GSE ablations."""
    run.set(c=_cost(cost, c), n_boot=n_boot, seeds=_parse_ints(seeds, "--seeds") if seeds else None)
    _on_gate(run, gate)


# ------------------------------------------------------------------------------- report
def pipeline_inputs(p: Any, latest: bool) -> tuple[list[str], list[str]]:
    """Eval and baselines keys of a pipeline file: every eval (with the file's eval config) of a gate
    trained on the file's logits and calibration, and every baselines artifact (the file's config)
    on them. ``latest``: the newest per (method, gate seed) and the newest baselines; otherwise
    all of them (two evals of one method and seed, or two baselines, are an error)."""
    from .evaluation import method_name

    est, ekey = p.export_ref()
    ckey = p.calibrate_key()
    ecfg, bcfg = p.config("eval").key_payload(), p.config("baselines").key_payload()
    evals: dict[tuple, list] = {}
    bases: list = []

    def when(a: Any) -> tuple:
        from .store import MARKER

        return (a.manifest.get("created", ""), (a.path / MARKER).stat().st_mtime_ns)

    for a in p.store.list():
        if a.stage == "eval" and a.config == ecfg:
            try:
                g = a.upstream("gate")
            except ArgseError:
                continue
            if g.upstream_keys.get("export") == ekey and g.upstream_keys.get("calibrate") == ckey:
                evals.setdefault((method_name(g.config), g.config.get("seed")), []).append(a)
        elif (a.stage == "baselines" and a.config == bcfg and a.upstream_keys.get("export") == ekey
              and a.upstream_keys.get("calibrate") == ckey):
            bases.append(a)
    if not evals and not bases:
        raise ArgseError("--latest/--all", f"no eval or baselines artifact of this pipeline file in {p.store.root}",
                         "run `argse eval` / `argse baselines` with the same --config first")
    if latest:
        chosen = [max(v, key=when) for v in evals.values()]
        chosen_b = [max(bases, key=when)] if bases else []
    else:
        dup = next(((k, v) for k, v in evals.items() if len(v) > 1), None)
        if dup is not None:
            (m, s), v = dup
            raise ArgseError("--all", f"{len(v)} evals of {m} seed {s} ({', '.join(a.key[:12] for a in v)})",
                             "use --latest (the newest of each), or pass the --eval keys")
        if len(bases) > 1:
            raise ArgseError("--all", f"{len(bases)} baselines artifacts ({', '.join(a.key[:12] for a in bases)})",
                             "use --latest (the newest), or pass the --baselines key")
        chosen, chosen_b = [a for v in evals.values() for a in v], bases
    return sorted(a.key for a in chosen), [a.key for a in chosen_b]


@stage_command("report")
def report(
    run: StageRun,
    eval_keys: Annotated[list[str] | None, typer.Option("--eval", help="eval key (or prefix); repeatable")] = None,
    baseline_keys: Annotated[list[str] | None, typer.Option("--baselines", help="baselines key (or prefix); "
                                                                                  "repeatable")] = None,
    latest: Annotated[bool, typer.Option("--latest", help="take the inputs from --config: the newest eval per "
                                                          "method and gate seed, and the newest baselines")] = False,
    all_: Annotated[bool, typer.Option("--all", help="take the inputs from --config: every eval and baselines "
                                                     "artifact of the pipeline (duplicates are an error)")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="also copy every file of the report into this "
                                                           "folder")] = None,
) -> None:
    """LaTeX tables (booktabs) and PDF/PNG figures from eval and baselines artifacts: pass their keys,
    or --config FILE with --latest / --all to take every eval and baselines of that pipeline."""
    run.config()
    if out is not None:
        from .store import check_out_dir

        check_out_dir(out)  # before any work
    evals, bases = _report_inputs(run, eval_keys, baseline_keys, latest, all_)
    r = run.resolve({"evals": evals, "baselines": bases})
    key = run.finish(r, inputs=r.upstream)
    if key is not None and out is not None:
        from .report.export import export_to

        export_to(run.p.store.open("report", key), out)


def _report_inputs(run: StageRun, eval_keys: list[str] | None, baseline_keys: list[str] | None, latest: bool,
                   all_: bool) -> tuple[list[str], list[str]]:  # fmt: skip
    """The report's eval and baselines keys: --eval / --baselines, or the pipeline's (--latest / --all)."""
    if latest and all_:
        raise ArgseError("--latest/--all", "both given", "pass one of them")
    if latest or all_:
        if eval_keys or baseline_keys:
            raise ArgseError("--latest/--all", "given with --eval/--baselines keys", "pass keys or --latest/--all")
        if run.config_path is None:
            raise ArgseError("--latest/--all", "no pipeline file", "pass --config FILE (the pipeline of the evals)")
        evals, bases = pipeline_inputs(run.p, latest)
    else:
        evals = [run.p.store.resolve(k, "eval")[1] for k in eval_keys or []]
        bases = [run.p.store.resolve(k, "baselines")[1] for k in baseline_keys or []]
    if not evals and not bases:
        raise ArgseError("--eval/--baselines", "no input artifacts",
                         "pass --eval KEY and/or --baselines KEY, or --config FILE --latest")
    return evals, bases


# ------------------------------------------------------------------------ import-logits
@stage_command("import-logits")
def import_logits(run: StageRun) -> None:
    """Import experts' logits trained elsewhere (pipeline file with an import_logits section)."""
    run.go()


@app.command()
@handled
def apply(
    gate: Annotated[str, typer.Argument(help="train-gate key (or unique prefix)")],
    logits: Annotated[list[Path], typer.Option("--logits", help="one logits file per expert, in the gate's expert order")],
    out: Annotated[Path, typer.Option("--out", help="output file (.npz or .csv): prediction, margin, accept per row")],
    store: StoreOpt = None,
) -> None:
    """Apply a stored calibrated gate + rejector to new logits; prints the file written and the share
    of rows accepted (and says so when the rule accepts every row)."""
    from .apply import apply_files
    from .store import Store

    path = apply_files(gate, [str(x) for x in logits], str(out), Store(store).root)
    print(path)
    print(accept_summary(path))


def accept_summary(path: str) -> str:
    """``accepted k of n rows (coverage k/n)`` of an apply output (.npz or .csv)."""
    import numpy as np

    if path.lower().endswith(".npz"):
        with np.load(path) as z:
            acc = np.asarray(z["accept"], bool)
    else:
        acc = np.loadtxt(path, delimiter=",", skiprows=1, usecols=3, ndmin=1).astype(bool)
    k, n = int(acc.sum()), int(acc.size)
    line = f"accepted {k} of {n} rows (coverage {k / max(n, 1):.3f})"
    if n and k == n:
        line += ": the rule accepts every row (nothing is rejected at this cost)"
    elif n and k == 0:
        line += ": the rule rejects every row"
    return line


# -------------------------------------------------------------------------------- sweep
@app.command()
@handled
def sweep(
    config: ConfigOpt = None,
    seeds: Annotated[str | None, typer.Option(help=H("comma list of seeds, e.g. 42,43,44",
                                                     default="the file's sweep section"))] = None,
    loss: Annotated[list[str] | None, typer.Option(help=H(f"expert losses ({LOSSES}), repeatable or a comma list",
                                                          default="the file's sweep section"))] = None,
    beta: Annotated[list[Beta] | None, typer.Option(help=H("gate variants, repeatable",
                                                           default="the file's sweep section"))] = None,
    executor: Annotated[Executor, typer.Option(show_default=False, help=H(
        "inprocess: this process; local: submitit on this machine; slurm: SLURM job arrays",
        default="inprocess"))] = Executor("inprocess"),
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan (key, cached / to-run) only")] = False,
    until: Annotated[StageName | None, typer.Option(help=H("last stage to plan", default="report"))] = None,
    full_reruns: Annotated[bool | None, typer.Option("--full-reruns/--no-full-reruns", help=H(
        "seeds also re-draw split and experts", default="--no-full-reruns"))] = None,
    device: Annotated[SweepDevice | None, typer.Option(help=H(
        "device class for the training stages", default="auto; cuda on slurm with GPUs"))] = None,
    folder: Annotated[Path | None, typer.Option(help=H("submitit log folder", default="<store>/.submitit"))] = None,
    partition: Annotated[str | None, typer.Option(help=H("SLURM partition", default="the cluster's default"))] = None,
    gpus_per_job: Annotated[int | None, typer.Option("--gpus-per-job", help=H(
        "GPUs per job", default="1 on slurm or when CUDA is visible, else 0"))] = None,
    cpus_per_task: Annotated[int | None, typer.Option("--cpus-per-task", help=H(
        "CPUs per SLURM task", default="the cluster's default"))] = None,
    timeout_min: Annotated[int, typer.Option("--timeout-min", show_default=False, help=H(
        "SLURM time limit per job (minutes)", default=240))] = 240,
    array_parallelism: Annotated[int, typer.Option("--array-parallelism", show_default=False, help=H(
        "SLURM jobs of one array running at once", default=16))] = 16,
    retries: Annotated[int, typer.Option(show_default=False, help=H("resubmit failed runs this many times",
                                                                    default=0))] = 0,
    store: StoreOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Fan out seeds x expert losses x gate options (in-process, submitit local or SLURM arrays)."""
    from .sweep import sweep_command

    rc = sweep_command(
        config, store, seeds, loss, _val(beta), _val(executor), dry_run, until=_val(until), full_reruns=full_reruns,
        device=_val(device), folder=folder, partition=partition, gpus_per_job=gpus_per_job,
        cpus_per_task=cpus_per_task, timeout_min=timeout_min, array_parallelism=array_parallelism,
        retries=retries, quiet=quiet,
    )
    if rc:
        raise typer.Exit(rc)


# ------------------------------------------------------------------------ results out
@app.command()
@handled
def plot(
    key: Annotated[str, typer.Argument(help="eval or report key (or unique prefix)")],
    kind: Annotated[Kind, typer.Option(show_default=False, help=H("which error the y axis shows",
                                                                  default="balanced"))] = Kind("balanced"),
    view: Annotated[View, typer.Option(show_default=False, help=H(
        "lt: long-tailed weights w_lt; bal: balanced weights w_bal", default="lt"))] = View("lt"),
    out: Annotated[Path | None, typer.Option("--out", help=H(
        "output file (.png or .pdf)", default="./rc_<kind>_<view>_<key>.png"))] = None,
    store: StoreOpt = None,
) -> None:
    """The risk-coverage figure of an eval (refit and sweep curves) or a report (every method), with
    its bootstrap bands, in one command; prints the file written."""
    from .analysis import plot_rc
    from .store import Store

    print(plot_rc(key, _val(kind), _val(view), out, Store(store)))


@app.command("export-results")
@handled
def export_results(
    key: Annotated[str, typer.Argument(help="eval or report key (or unique prefix)")],
    format_: Annotated[Format, typer.Option("--format", show_default=False, help=H(
        "csv (plain, no comment lines) or parquet (needs pandas and pyarrow)", default="csv"))] = Format("csv"),
    out: Annotated[Path | None, typer.Option("--out", help=H(
        "output file", default="./results_<key>.<format>"))] = None,
    store: StoreOpt = None,
) -> None:
    """Tidy results of an eval or a report (one row per method x seed x view x protocol x metric, with
    CIs) as CSV or Parquet; the same table as argse_cli.results(KEY) in Python."""
    from .analysis import export_results as export
    from .store import Store

    print(export(key, _val(format_), out, Store(store)))


@app.command()
@handled
def schema(
    stage: Annotated[StageName, typer.Argument(help="stage whose config schema to print")],
) -> None:
    """JSON Schema of a stage's config section (what a pipeline file's section may hold)."""
    from .schemas import render

    print(render(_val(stage)), end="")


# ------------------------------------------------------------------------- store tools
def _state_label(e) -> str:
    if e.state == "pending":
        return f"pending ({e.reason})"
    if e.state in ("incomplete", "unreadable"):
        return f"{e.state}: {e.reason}"
    return {"temp": "temp dir (a writer's; gc removes a dead one's)", "debris": e.reason}.get(
        e.state, e.state
    )


@app.command()
@handled
def ls(
    store: StoreOpt = None,
    stage: Annotated[str | None, typer.Option(help="only this stage")] = None,
    all_: Annotated[bool, typer.Option("--all", "-a", help="also incomplete / unreadable folders, pending (resumable) and temp dirs, marked")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON document (a list of artifacts) instead of the table")] = False,
) -> None:
    """Table of complete artifacts: stage, key, created, the stage's own summary (--all: everything, marked)."""
    from .store import Store

    s = Store(store)
    rows, hidden = [], 0
    for e in s.entries():
        if stage and e.stage != stage:
            continue
        if e.artifact is not None:
            a = e.artifact
            rows.append({"stage": a.stage, "key": a.key, "created": a.manifest.get("created", ""),
                         "summary": _summary(a), "state": "complete"})
        elif all_:
            rows.append({"stage": e.stage, "key": e.key, "created": "", "summary": "", "state": _state_label(e)})
        elif e.state in ("incomplete", "unreadable"):
            hidden += 1
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        t = Table("stage", "key", "created", "summary", *(["state"] if all_ else []))
        for r in rows:
            t.add_row(r["stage"], r["key"][:16], r["created"], r["summary"], *([r["state"]] if all_ else []))
        Console().print(t)
    if hidden:
        print(f"note: {hidden} incomplete or unreadable artifact folder(s) not listed: "
              "`argse ls --all` shows them, `argse verify` says why", file=sys.stderr)  # fmt: skip


_LS_FIELDS = {"train-expert": ("loss", "depth", "epochs", "shared_backbone"), "train-gate": ("beta", "seed", "gate_loss", "uniform_gate", "experts"),
              "split": ("dataset", "imbalance_factor", "seed", "protocol"), "calibrate": ("view", "posterior")}


def _summary(a) -> str:
    """The stage's own ``summary(meta)`` (its results) after the config fields that tell its artifacts apart."""
    from .stages import get_stage

    fields = [f"{k}={a.config[k]}" for k in _LS_FIELDS.get(a.stage, ()) if a.config.get(k) not in (None, False)]
    try:
        mod = get_stage(a.stage)
        own = mod.summary(a.meta) if hasattr(mod, "summary") else ""
    except Exception:  # noqa: BLE001 - a summary never breaks the listing
        own = ""
    return " ".join([*fields, own]).strip()[:110]


@app.command()
@handled
def show(
    key: str,
    store: StoreOpt = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="print the metrics log as it grows (KEY may be a pending key's prefix) until the artifact is published")] = False,
) -> None:
    """Manifest of one artifact, its arrays and shapes, its files folder and its figures (--follow: its metrics log)."""
    from rich.console import Console

    from .store import Store

    s = Store(store)
    if follow:
        from .store import follow_metrics

        try:
            follow_metrics(s, key, lambda line: print(line, flush=True))
        except KeyboardInterrupt:  # Ctrl-C ends following; the writer is not affected
            pass
        return
    a = s.open(None, key)
    con = Console()
    m = dict(a.manifest)
    arrays = m.pop("arrays", {})
    con.print_json(json.dumps(m))
    for name, info in arrays.items():
        con.print(f"  {name}: {info['dtype']} {tuple(info['shape'])} chunk_rows={info['chunk_rows']}")
    files = sorted(a.manifest.get("files", {}))
    if files:
        print(f"files: {a.path / 'files'}")
        figs = [f for f in files if f.endswith((".png", ".pdf"))]
        if figs:
            print("figures: " + ", ".join(figs))


@app.command()
@handled
def verify(keys: Annotated[list[str] | None, typer.Argument(help="keys (default: all)")] = None, store: StoreOpt = None) -> None:
    """Recompute every checksum; list every artifact that cannot be verified and why; exit 1 if any."""
    from .store import Store

    s = Store(store)
    if not s.root.is_dir():
        raise ArgseError("--store", f"{s.root} does not exist",
                         "pass the store the stages wrote to (--store or ARGSE_STORE)")  # fmt: skip
    if keys:
        targets = [s.inspect(*s.resolve(k)) for k in keys]
    else:
        targets = [e for e in s.entries() if e.state in ("complete", "incomplete", "unreadable")]
    bad = 0
    for e in targets:
        problems = e.artifact.verify() if e.artifact is not None else [f"{e.state}: {e.reason}"]
        print(f"{'OK  ' if not problems else 'BAD '} {e.stage} {e.key}")
        for pr in problems:
            print(f"     {pr}")
        bad += bool(problems)
    if not targets:
        print(f"no artifacts in {s.root}")
    if bad:
        print(f"{bad} of {len(targets)} artifact(s) could not be verified", file=sys.stderr)
        raise typer.Exit(1)


@app.command()
@handled
def gc(
    store: StoreOpt = None,
    max_age: Annotated[float, typer.Option("--max-age", show_default=False, help=H(
        "hours after which a dead writer's temp dir goes", default=24))] = 24.0,
    keep: Annotated[list[str] | None, typer.Option("--keep", help="also remove artifacts not reachable from these keys")] = None,
    pending: Annotated[bool, typer.Option("--pending", help="also remove dead writers' pending (resumable) dirs")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list what would go; remove nothing")] = False,
) -> None:
    """Remove temp dirs of dead writers (never a live writer's), incomplete artifact folders and kill
    debris; optionally unreachable artifacts (--keep) and resumable state (--pending)."""
    from .store import Store

    s = Store(store)
    removed = s.gc(max_age_s=max_age * 3600, keep=keep, dry_run=dry_run, pending=pending)
    for r in removed:
        print(("would remove " if dry_run else "removed ") + r)
    print(f"{len(removed)} {'to remove' if dry_run else 'removed'}")
    gone = {r.split(" (")[0] for r in removed}
    for e in s.entries():
        if e.state == "pending" and str(e.path) not in gone:
            hint = "" if "running" in e.reason else " -- `argse gc --pending` removes it"
            print(f"kept {e.path} (pending: {e.reason}){hint}")


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    return f"warning: {message}\n"


def _usage_line(e: Exception) -> str:
    """A click usage error (bad choice, unknown option, ...) as the project's one error line."""
    param = getattr(e, "param", None)
    opts = getattr(param, "opts", None) or []
    field = opts[0] if opts else (getattr(param, "name", None) or getattr(e, "option_name", None) or "usage")
    msg = str(getattr(e, "message", "") or e).strip().rstrip(".").removeprefix("Value error, ")
    ctx = getattr(e, "ctx", None)
    cmd = getattr(ctx, "command_path", None) or "argse"
    return f"{field}: {msg} -- fix: see `{cmd} --help`"


def main() -> None:
    import warnings

    warnings.formatwarning = _one_line_warning
    # the offline copy's MD5 note is shown once, by `split` (and recorded in its manifest)
    warnings.filterwarnings("ignore", message=".*MD5 differs.*")
    try:
        rc = app(standalone_mode=False)
    except typer.Abort:
        print("error: interrupted; nothing was published", file=sys.stderr, flush=True)
        sys.exit(2)
    except typer.TyperException as e:  # click's usage errors: one line, exit 2
        print(f"error: {_one_line(_usage_line(e))}", file=sys.stderr, flush=True)
        sys.exit(2)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
