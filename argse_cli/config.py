"""All stage configurations (Pydantic v2): frozen, ``extra="forbid"``, no NaN/inf.

One model per stage. A *pipeline file* (YAML or JSON) may hold one section per stage
(``split``, ``train_expert``, ``export_logits``, ``calibrate``, ``train_gate``, ``eval``,
``baselines``, ``report``); a stage reads its own section, applies CLI overrides, and derives
its upstream keys from the upstream sections of the same file (defaults where absent).

Runtime-only fields (``RUNTIME_FIELDS``: data root, workers, batch size for inference,
download flag) never enter a cache key; everything that changes the numbers does.
"""

from __future__ import annotations

import math
import os
import re
import types
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

RUNTIME_FIELDS = frozenset({"data_root", "download", "workers", "verbose", "store", "infer_batch_size"})

HELDOUT_SPLITS = ("tuneV", "val_small", "calib", "test")
ALL_SPLITS = ("train", *HELDOUT_SPLITS)
PAPER_FRACTIONS = {"tuneV": 0.2, "val_small": 0.1, "calib": 0.1, "test": 0.6}
PLAN_FRACTIONS = {"train": 0.80, "tuneV": 0.08, "val_small": 0.06, "calib": 0.03, "test": 0.03}
DEFAULT_EXPERTS = ("ce", "balsoftmax", "logitadjust:2", "decoupled")
SIX_EXPERTS = (*DEFAULT_EXPERTS, "logitadjust:0.5", "logitadjust:1.5")
_LOSS_RE = re.compile(r"^(ce|balsoftmax|decoupled|logitadjust:(\d+(\.\d+)?))$")
_GROUP_RE = re.compile(r"^(threshold:\d+|quantile:(0?\.\d+|1(\.0+)?)(,(0?\.\d+))*)$")


SEED_MAX = 2**32  # numpy's SeedSequence-free legacy seeding and torch.manual_seed accept < 2**32
INT_MAX = 2**63  # every integer field fits numpy's int64
Seed = Annotated[int, Field(ge=0, lt=SEED_MAX)]


def _scalar_kind(ann: Any) -> Any:
    """'bool' / 'int' / 'float' / ('seq', kind) / None for a field annotation (Optional,
    Annotated and Literal unwrapped); None: not a plain scalar field (str, dict, models)."""
    origin = typing.get_origin(ann)
    if origin is Annotated:
        return _scalar_kind(typing.get_args(ann)[0])
    if origin in (typing.Union, types.UnionType):
        kinds = {_scalar_kind(a) for a in typing.get_args(ann) if a is not type(None)}
        return kinds.pop() if len(kinds) == 1 else None
    if origin is Literal:
        vals = typing.get_args(ann)
        if all(isinstance(v, bool) for v in vals):
            return "bool"
        if all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
            return "int"
        return None
    if origin in (tuple, list):
        args = [a for a in typing.get_args(ann) if a is not Ellipsis]
        kinds = {_scalar_kind(a) for a in args}
        return ("seq", kinds.pop()) if len(kinds) == 1 and None not in kinds else None
    return {bool: "bool", int: "int", float: "float"}.get(ann)


# a number as YAML 1.2 spells it: PyYAML (YAML 1.1) reads 1e-3 (no dot) as a string
_FLOAT_TEXT = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")


def _check_kind(v: Any, kind: Any) -> Any:
    """Values are taken as typed (YAML and --set parse them): a boolean is not a number, a
    string is not a boolean or an integer, 2.0 is not an integer. The one conversion: a float
    field takes a string that spells a number (``1e-3``, which PyYAML leaves a string)."""
    if v is None or kind is None:
        return v
    if isinstance(kind, tuple):
        if isinstance(v, (list, tuple)):
            out = []
            for i, x in enumerate(v):
                try:
                    out.append(_check_kind(x, kind[1]))
                except ValueError as e:
                    raise ValueError(f"item {i}: {e}") from None
            return type(v)(out)
        return v
    name = {"bool": "a boolean (true / false)", "int": "an integer", "float": "a number"}[kind]
    if kind == "bool":
        if not isinstance(v, bool):
            raise ValueError(f"must be {name}, not {type(v).__name__} {v!r:.40}")
        return v
    if isinstance(v, bool):
        raise ValueError(f"must be {name}, not a boolean ({v!r})")
    if kind == "int":
        if not isinstance(v, int):
            raise ValueError(f"must be {name}, not {type(v).__name__} {v!r:.40}")
        if not -INT_MAX <= v < INT_MAX:
            raise ValueError(f"{v:.3g} is out of range (|value| < 2**63)")
        return v
    if isinstance(v, str) and _FLOAT_TEXT.match(v.strip()):
        return float(v)
    if not isinstance(v, (int, float)):
        raise ValueError(f"must be {name}, not {type(v).__name__} {v!r:.40}")
    return v


class StageConfig(BaseModel):
    """Base of every stage config: frozen, unknown fields refused, NaN/inf refused, scalars
    strictly typed (``epochs: true`` or ``lr: "0.1"`` are refused, never coerced)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, validate_default=True)

    @field_validator("*", mode="before")
    @classmethod
    def _strict_scalars(cls, v: Any, info: ValidationInfo) -> Any:
        f = cls.model_fields.get(info.field_name or "")
        return _check_kind(v, _scalar_kind(f.annotation)) if f is not None else v

    def key_payload(self) -> dict[str, Any]:
        """The config as it enters the cache key: JSON-mode dump minus runtime-only fields."""
        d = self.model_dump(mode="json")
        return {k: v for k, v in d.items() if k not in RUNTIME_FIELDS}


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when an NVIDIA driver is visible, else 'cpu' (no torch import)."""
    if device != "auto":
        return device
    return "cuda" if os.path.exists("/proc/driver/nvidia/version") else "cpu"


class SplitConfig(StageConfig):
    """`argse split`: long-tailed subset (Cao et al. 2019 profile), groups and leak-free splits."""

    dataset: Literal["cifar10", "cifar100"] = "cifar10"
    imbalance_factor: float = Field(100.0, ge=1.0, description="n_max / n_min of the LT profile (>= 1)")
    seed: int = Field(0, ge=0, lt=SEED_MAX)
    protocol: Literal["paper", "fractions"] = Field(
        "paper",
        description="paper: experts train on the whole LT subset, held-out splits partition the "
        "balanced official test set; fractions: all five splits carved from the LT subset",
    )
    fractions: dict[str, float] | None = Field(
        None, description="split -> fraction; defaults depend on the protocol; must sum to 1"
    )
    group_rule: str | None = Field(
        None, description="threshold:T (tail = <= T train images) or quantile:q[,q2..]; default per dataset"
    )
    data_root: str = Field(default_factory=lambda: os.environ.get("ARGSE_DATA", "./data"))
    download: bool = False

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        protocol = data.get("protocol", "paper")
        if data.get("fractions") is None:
            data["fractions"] = dict(PLAN_FRACTIONS if protocol == "fractions" else PAPER_FRACTIONS)
        if data.get("group_rule") is None:
            data["group_rule"] = "threshold:20" if data.get("dataset") == "cifar100" else "quantile:0.5"
        return data

    @field_validator("group_rule")
    @classmethod
    def _rule(cls, v: str | None) -> str | None:
        if v is not None and not _GROUP_RE.fullmatch(v):
            raise ValueError("must look like threshold:20 or quantile:0.5 (or quantile:0.3,0.7)")
        if v is not None:  # the stage's own parser: refuse here what compute would refuse later
            from .data.groups import parse_group_rule
            from .errors import ArgseError

            try:
                parse_group_rule(v)
            except ArgseError as e:
                raise ValueError(f"{e.problem}; {e.fix}") from None
        return v

    @model_validator(mode="after")
    def _check_fractions(self) -> SplitConfig:
        fr = self.fractions or {}
        want = set(ALL_SPLITS) if self.protocol == "fractions" else set(HELDOUT_SPLITS)
        if set(fr) != want:
            raise ValueError(f"fractions must name exactly {sorted(want)} for protocol {self.protocol}")
        if any((not math.isfinite(v)) or v <= 0 for v in fr.values()):
            raise ValueError("every fraction must be > 0")
        if abs(sum(fr.values()) - 1.0) > 1e-6:
            raise ValueError(f"fractions sum to {sum(fr.values()):.6g}, not 1")
        return self


class TrainExpertConfig(StageConfig):
    """`argse train-expert`: one expert (loss) on the split's LT train set -- or, with
    ``shared_backbone``, one backbone with one linear head per loss (BalPoE style).

    Independent experts (default, the paper's): one artifact per loss; ``decoupled`` (cRT) re-trains
    the classifier of the ``ce`` expert with class-balanced sampling on its frozen backbone.
    Shared backbone: ONE artifact (``loss = "shared"``, ``heads`` = the non-cRT losses in the
    pipeline's ``losses`` order, set by the pipeline) holds the backbone and every head, trained
    with the summed per-head losses, one forward pass per batch; ``decoupled`` is then a new head
    re-trained with class-balanced sampling on that frozen shared backbone (its own artifact).
    Either way export-logits writes one expert per head / model.
    """

    loss: str = Field(
        "ce",
        description="ce | balsoftmax | logitadjust:TAU | decoupled; shared = the shared-backbone "
        "artifact of `heads` (set by the pipeline when shared_backbone is true)",
    )
    shared_backbone: bool = Field(
        False, description="one backbone + one linear head per loss (BalPoE style) instead of independent experts"
    )
    heads: tuple[str, ...] | None = Field(
        None, description="losses of the jointly trained heads (loss = shared only; set by the pipeline)"
    )
    depth: Literal[8, 20, 32, 44, 56] = 32
    width: int = Field(1, ge=1, le=8, description="channel multiplier of the ResNet ({16, 32, 64} x width)")
    epochs: int = Field(200, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.1, gt=0, description="learning rate per batch of 128 (scaled linearly)")
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    warmup_epochs: int = Field(5, ge=0)
    aug: Literal["cropflip", "plan", "none"] = "cropflip"
    decoupled_epochs: int = Field(10, ge=1, description="cRT classifier re-training epochs")
    select: Literal["final", "best_val"] = "final"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False
    seed: int = Field(0, ge=0, lt=SEED_MAX)
    workers: int = Field(0, ge=0)
    checkpoint_every: int = Field(
        1, ge=0, description="epochs between resume checkpoints (0 = none); runtime only, not keyed"
    )

    @field_validator("loss")
    @classmethod
    def _loss(cls, v: str) -> str:
        if v != "shared" and not _LOSS_RE.fullmatch(v):
            raise ValueError("must be ce, balsoftmax, logitadjust:TAU (e.g. logitadjust:2) or decoupled")
        return v

    @field_validator("heads")
    @classmethod
    def _heads(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("needs at least one loss")
        for h in v:
            if not _LOSS_RE.fullmatch(h) or h == "decoupled":
                raise ValueError(
                    f"{h!r}: a head is ce, balsoftmax or logitadjust:TAU (decoupled is a cRT head on the "
                    "frozen shared backbone, trained after it)"
                )
        if len(set(v)) != len(v):
            raise ValueError("the head losses must be distinct")
        return v

    @model_validator(mode="after")
    def _shared(self) -> TrainExpertConfig:
        if self.loss == "shared" and not (self.shared_backbone and self.heads):
            raise ValueError("loss 'shared' needs shared_backbone: true and heads (set by the pipeline)")
        if self.loss != "shared" and self.heads is not None:
            raise ValueError("heads are set only for the shared-backbone artifact (loss 'shared')")
        if self.shared_backbone and self.loss not in ("shared", "decoupled"):
            raise ValueError(
                f"with shared_backbone, {self.loss!r} is a head of the shared artifact (loss 'shared'), "
                "not an expert of its own"
            )
        return self

    def key_payload(self) -> dict[str, Any]:
        d = super().key_payload()
        d.pop("checkpoint_every", None)  # resume is bit-exact: checkpoints never change the numbers
        return d

    def resolved(self) -> TrainExpertConfig:
        """Concrete device class and precision (they change the numbers, so they are keyed)."""
        dev = resolve_device(self.device)
        prec = self.precision if self.precision != "auto" else ("bf16" if dev == "cuda" else "fp32")
        return self.model_copy(update={"device": dev, "precision": prec})


class ExportLogitsConfig(StageConfig):
    """`argse export-logits`: every expert's raw logits on the held-out splits, fp16, row-chunked."""

    chunk_rows: int = Field(4096, ge=16)
    seed: int = Field(0, ge=0, lt=SEED_MAX, description="seed of the stored row order")
    include_train: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    infer_batch_size: int = Field(1024, ge=1)

    def resolved(self) -> ExportLogitsConfig:
        return self.model_copy(update={"device": resolve_device(self.device)})


class CalibrateConfig(StageConfig):
    """`argse calibrate`: one temperature per expert on val_small (importance-weighted NLL)."""

    view: Literal["lt", "bal"] = Field("lt", description="target distribution of the NLL weights")
    posterior: Literal["train", "balanced"] = Field(
        "train", description="train: put every expert on the training prior (default); balanced: ablation"
    )
    fit_split: Literal["val_small", "tuneV"] = "val_small"


GATE_TRAINING_FIELDS = ("gate_loss", "epochs", "batch_size", "lr_gate", "lambda_ent", "hard_routing",
                        "hidden", "dropout", "patience", "buffer_chunks", "seed")
"""Fields of a trained gate: inert (kept out of the key) for the frozen uniform gate."""
SELECTIVE_FIELDS = ("lr_alpha_mu", "rho", "lambda_max", "alpha_min", "alpha_ema", "tau_start", "tau_end",
                    "tau_warmup_epochs")
"""Fields of the primal-dual selective recipe only: inert for the NLL gate."""
WORST_FIELDS = ("xi", "T")
"""Fields of Algorithm 2 (beta = worst) only."""
GATE_DEFAULTS: dict[str, Any] = {
    "gate_loss": "nll", "epochs": 100, "batch_size": 256, "lr_gate": 1e-3, "lambda_ent": 1e-3,
    "hard_routing": False, "hidden": (128, 64), "dropout": 0.1, "patience": 15, "buffer_chunks": 4,
    "seed": 42, "lr_alpha_mu": 5e-3, "rho": 1e-2, "lambda_max": 10.0, "alpha_min": 1e-3,
    "alpha_ema": 0.9, "tau_start": 2.0, "tau_end": 10.0, "tau_warmup_epochs": 30, "xi": 1.0, "T": 10,
}


class TrainGateConfig(StageConfig):
    """`argse train-gate`: the gating network (the mixture eta) and its plug-in rule.

    The gate is trained by ``gate_loss`` (nll: eta as an estimate of P_train(y|x); selective: the
    primal-dual Lagrangian); the rule is fitted on the trained mixture by the one core
    (Algorithm 1 for ``beta=balanced``, Algorithm 2 for ``beta=worst``) at every coverage, and the
    artifact's operating point is the cost-matched one for ``c``. A field that does nothing in the
    chosen recipe is left unset (None, out of the key); setting it is an error that says so.
    """

    c: float = Field(0.05, ge=0, le=1, description="rejection cost of the operating point")
    beta: Literal["balanced", "worst"] = Field("balanced", description="balanced: Algorithm 1; worst: Algorithm 2")
    xi: float | None = Field(None, gt=0, description="exponentiated-gradient step of Algorithm 2 (worst) [1.0]")
    T: int | None = Field(None, ge=1, le=1000, description="rounds of Algorithm 2 (worst) [10]")
    uniform_gate: bool = Field(False, description="freeze the gate at w = 1/E (ablation; nothing is trained)")
    gate_loss: Literal["nll", "selective"] | None = Field(
        None, description="nll: the mixture trained as an estimate of P_train(y|x); selective: the "
        "primal-dual Lagrangian [nll]")
    epochs: int | None = Field(None, ge=1, le=100_000, description="[100]")
    batch_size: int | None = Field(None, ge=1, description="[256]")
    lr_gate: float | None = Field(None, gt=0, description="[1e-3]")
    lambda_ent: float | None = Field(None, ge=0, description="routing-entropy weight [1e-3]")
    hard_routing: bool | None = Field(None, description="top-1 routing, straight-through [false]")
    hidden: tuple[int, ...] | None = Field(None, description="gate MLP widths [128, 64]")
    dropout: float | None = Field(None, ge=0, lt=1, description="[0.1]")
    patience: int | None = Field(None, ge=1, description="early stopping [15]")
    buffer_chunks: int | None = Field(None, ge=1, description="row chunks shuffled together when streaming [4]")
    seed: int | None = Field(None, ge=0, lt=2**32, description="gate initialisation and batch order [42]")
    lr_alpha_mu: float | None = Field(None, gt=0, description="selective only: Adam lr of (alpha, mu) [5e-3]")
    rho: float | None = Field(None, gt=0, description="selective only: dual step [1e-2]")
    lambda_max: float | None = Field(None, gt=0, description="selective only: dual clip [10]")
    alpha_min: float | None = Field(None, gt=0, description="selective only: alpha clamp [1e-3]")
    alpha_ema: float | None = Field(None, ge=0, lt=1, description="selective only: per-epoch EMA of alpha [0.9]")
    tau_start: float | None = Field(None, gt=0, description="selective only: sigmoid sharpness at epoch 0 [2]")
    tau_end: float | None = Field(None, gt=0, description="selective only: after warm-up [10]")
    tau_warmup_epochs: int | None = Field(None, ge=0, description="selective only: [30]")
    view: Literal["lt", "bal"] = Field("lt", description="weights of the operating point's coverage and errors")
    experts: tuple[int, ...] | None = Field(None, description="subset of expert indices (ablation)")

    @field_validator("hidden")
    @classmethod
    def _hidden(cls, v: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if v is not None and any(h < 1 for h in v):
            raise ValueError("every hidden width must be >= 1")
        return v

    @field_validator("experts")
    @classmethod
    def _experts(cls, v: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if v is not None and (len(v) == 0 or min(v) < 0 or len(set(v)) != len(v)):
            raise ValueError("experts must be distinct indices >= 0 (at least one)")
        return v

    @field_validator(*GATE_TRAINING_FIELDS, *SELECTIVE_FIELDS, *WORST_FIELDS)
    @classmethod
    def _inert(cls, v: Any, info: ValidationInfo) -> Any:
        """A value for a field the recipe does not use is refused (one line: field, why, fix)."""
        if v is None:
            return v
        d, n = info.data, info.field_name
        if n in WORST_FIELDS and d.get("beta") == "balanced":
            why, fix = "with beta=balanced (Algorithm 2 only)", "remove it or use beta=worst"
        elif n in GATE_TRAINING_FIELDS and d.get("uniform_gate"):
            why, fix = "with uniform_gate=true (nothing is trained)", "remove it or drop uniform_gate"
        elif n in SELECTIVE_FIELDS and (d.get("uniform_gate") or (d.get("gate_loss") or "nll") == "nll"):
            why, fix = "unless gate_loss=selective (the primal-dual recipe)", "remove it or set gate_loss=selective"
        else:
            return v
        raise PydanticCustomError("inert_field", "has no effect {why}", {"why": why, "fix": fix})

    def check_experts(self, num_experts: int) -> None:
        """``experts`` against the upstream's expert count E (known once the export is): every
        index must be < E. One-line error (before any work) otherwise."""
        from .errors import ArgseError

        bad = [i for i in self.experts or () if i >= num_experts]
        if bad:
            raise ArgseError(
                "train_gate.experts", f"index {bad[0]} is out of range: the export has "
                f"{num_experts} experts (0..{num_experts - 1})",
                f"pick distinct indices below {num_experts}",
            )  # fmt: skip

    def resolved(self) -> TrainGateConfig:
        """Defaults filled in for the fields the recipe uses (the others stay None)."""
        use = ()
        if not self.uniform_gate:
            use += GATE_TRAINING_FIELDS
            if (self.gate_loss or "nll") == "selective":
                use += SELECTIVE_FIELDS
        if self.beta == "worst":
            use += WORST_FIELDS
        upd = {k: GATE_DEFAULTS[k] for k in use if getattr(self, k) is None}
        return self.model_copy(update=upd)


def _grid_levels(v: tuple[float, ...]) -> tuple[float, ...]:
    """Coverage levels must be points of the refit grid 0.01, 0.02, ..., 1.00."""
    if not v or any(not (0 < x <= 1) or abs(round(x * 100) - x * 100) > 1e-9 for x in v):
        raise ValueError("levels must be coverages of the grid 0.01, 0.02, ..., 1.00")
    return tuple(round(x, 2) for x in v)


class EvalConfig(StageConfig):
    """`argse eval`: risk-coverage metrics of a gate on test, with bootstrap CIs."""

    levels: tuple[float, ...] = Field((0.7, 0.8, 0.9), max_length=100, description="coverages of the error columns "
                                      "(points of the grid 0.01..1.00)")
    n_boot: int = Field(1000, ge=0, le=1_000_000)
    seed: int = Field(0, ge=0, lt=SEED_MAX - 1, description="seed (seed + 1 is used too)")

    _levels = field_validator("levels")(classmethod(lambda cls, v: _grid_levels(v)))
    target_risk: float | None = Field(None, gt=0, lt=1, description="risk-controlled thresholds on calib")
    delta: float = Field(0.1, gt=0, lt=1, description="failure probability of the risk guarantee")
    conformal_epsilon: float = Field(0.1, gt=0, lt=1, description="Mondrian bound P(accept | error, group)")
    sag_mode: Literal["sensitivity", "specificity", "success"] | None = None
    sag_target: float = Field(0.9, gt=0, lt=1)
    sag_p_rand: float = Field(0.0, ge=0, lt=1)
    sag_window: int = Field(500, ge=10)
    sag_batch: int = Field(100, ge=1)
    l2d: bool = Field(False, description="learning to defer to simulated humans (EM)")
    human_noise: tuple[Annotated[float, Field(ge=0, le=1)], ...] = Field(
        (0.3, 0.3), min_length=1, max_length=64,
        description="label-noise rate in [0, 1] of each simulated human")


class BaselinesConfig(StageConfig):
    """`argse baselines`: Chow, DE-Chow, CS-plug-in (U-PI, SB-PI), Plug-in[Worst], AR-GSE ablations."""

    c: float = Field(0.05, ge=0, le=1)
    T: int = Field(10, ge=1, le=1000, description="EG rounds of Algorithm 2 (Plug-in[Worst]); AR-GSE (worst) uses train_gate.T")
    xi: float = Field(1.0, gt=0)
    view: Literal["lt", "bal"] = Field("lt", description="view of the operating points (sweep view) and of SB-PI's choice")
    levels: tuple[float, ...] = (0.7, 0.8, 0.9)
    n_boot: int = Field(1000, ge=0, le=1_000_000)
    seeds: tuple[Seed, ...] = Field((42,), min_length=1, max_length=1000)

    _levels = field_validator("levels")(classmethod(lambda cls, v: _grid_levels(v)))
    ablations: bool = True
    ablation_variants: tuple[
        Literal["selective", "no_sparsity", "hard_routing", "one_expert", "two_experts", "balanced_posteriors"], ...
    ] = Field(("selective", "no_sparsity", "hard_routing", "one_expert", "two_experts", "balanced_posteriors"),
              description="which AR-GSE ablation gates to retrain (with ablations: true), one per seed")
    sensitivity: bool = False
    gate_epochs: int | None = Field(None, ge=1, description="epochs of ablation gates (default: the gate's)")


class ReportConfig(StageConfig):
    """`argse report`: LaTeX tables and figures from eval / baselines artifacts."""

    formats: tuple[Literal["pdf", "png"], ...] = ("pdf", "png")
    title: str = "AR-GSE"
    n_boot: int = Field(1000, ge=1, le=100_000, description="bootstrap resamples of the CIs and paired comparisons")
    table_ci: Literal["halfwidth", "column", "none"] = Field(
        "halfwidth", description="CIs in the LaTeX tables: halfwidth = cells 'mean +- half-width of the seed-mean "
        "95% CI'; column = cells 'mean +- std over seeds' and a CI column after each AURC; none = mean +- std only")
    bands: Literal["headline", "all", "none"] = Field(
        "headline", description="pointwise bootstrap bands in the RC figures: headline = AR-GSE, U-PI, SB-PI and "
        "Plug-in[Worst]; all = every method; none")
    band_boot: int = Field(200, ge=10, le=100_000, description="bootstrap resamples of the figures' bands")
    banner: str | None = Field(None, max_length=200, description="a line shown on every table, figure and "
                               "summary, e.g. 'smoke recipe: numbers are not meaningful'; {expert_epochs} is "
                               "replaced by the training epochs of the inputs' experts")


class ExpertSource(BaseModel):
    """One imported expert: its training loss and a logits file per held-out split."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(min_length=1)
    loss: str = Field(description="ce | balsoftmax | logitadjust:TAU | decoupled (how it was trained)")
    logits: dict[str, str] = Field(description="split -> file (.npy, .npz[:key], .safetensors[:key], .zarr, .pt)")

    @field_validator("loss")
    @classmethod
    def _loss(cls, v: str) -> str:
        if not _LOSS_RE.fullmatch(v):
            raise ValueError("must be ce, balsoftmax, logitadjust:TAU or decoupled (cRT, tau = 1)")
        return v


class ImportLogitsConfig(StageConfig):
    """`argse import-logits`: experts trained elsewhere, as split-like + export-like artifacts.

    File paths are runtime-only; the key holds the files' content fingerprints instead.
    """

    experts: tuple[ExpertSource, ...] = Field(min_length=1)
    labels: dict[str, str] = Field(description="split -> labels file (.npy / .npz[:key] / .json)")
    class_counts: str = Field(description="training class counts: JSON list or CSV")
    class_to_group: str | None = Field(None, description="optional class -> group file; else group_rule")
    group_rule: str = "threshold:20"
    weights: dict[str, str] | None = Field(None, description="optional split -> w_lt file; else from counts")
    chunk_rows: int = Field(4096, ge=16)
    seed: int = Field(0, ge=0, lt=SEED_MAX)

    @field_validator("group_rule")
    @classmethod
    def _rule(cls, v: str) -> str:
        if not _GROUP_RE.match(v):
            raise ValueError("must look like threshold:20 or quantile:0.5 (or quantile:0.3,0.7)")
        return v

    def key_payload(self) -> dict[str, Any]:
        d = self.model_dump(mode="json")
        d["experts"] = [{"name": e["name"], "loss": e["loss"], "splits": sorted(e["logits"])} for e in d["experts"]]
        for k in ("labels", "weights"):
            d[k] = sorted(d[k]) if d[k] else d[k]
        d["class_counts"] = "file"
        d["class_to_group"] = "file" if d["class_to_group"] else None
        return d


STAGE_MODELS: dict[str, type[StageConfig]] = {
    "split": SplitConfig,
    "train-expert": TrainExpertConfig,
    "export-logits": ExportLogitsConfig,
    "calibrate": CalibrateConfig,
    "train-gate": TrainGateConfig,
    "eval": EvalConfig,
    "baselines": BaselinesConfig,
    "report": ReportConfig,
    "import-logits": ImportLogitsConfig,
}


def section_name(stage: str) -> str:
    """Pipeline-file section of a stage: 'train-expert' -> 'train_expert'."""
    return stage.replace("-", "_")
