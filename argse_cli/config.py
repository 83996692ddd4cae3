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
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

RUNTIME_FIELDS = frozenset({"data_root", "download", "workers", "verbose", "store", "infer_batch_size"})

HELDOUT_SPLITS = ("tuneV", "val_small", "calib", "test")
ALL_SPLITS = ("train", *HELDOUT_SPLITS)
PAPER_FRACTIONS = {"tuneV": 0.2, "val_small": 0.1, "calib": 0.1, "test": 0.6}
PLAN_FRACTIONS = {"train": 0.80, "tuneV": 0.08, "val_small": 0.06, "calib": 0.03, "test": 0.03}
DEFAULT_EXPERTS = ("ce", "balsoftmax", "logitadjust:2", "decoupled")
SIX_EXPERTS = (*DEFAULT_EXPERTS, "logitadjust:0.5", "logitadjust:1.5")
_LOSS_RE = re.compile(r"^(ce|balsoftmax|decoupled|logitadjust:(\d+(\.\d+)?))$")
_GROUP_RE = re.compile(r"^(threshold:\d+|quantile:(0?\.\d+|1(\.0+)?)(,(0?\.\d+))*)$")


class StageConfig(BaseModel):
    """Base of every stage config: frozen, unknown fields refused, NaN/inf refused."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, validate_default=True)

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
    seed: int = Field(0, ge=0)
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
    seed: int = Field(0, ge=0)
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
    seed: int = Field(0, ge=0, description="seed of the stored row order")
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


class TrainGateConfig(StageConfig):
    """`argse train-gate`: gating network + primal-dual AR-GSE."""

    c: float = Field(0.05, ge=0, le=1, description="rejection cost")
    beta: Literal["balanced", "worst"] = "balanced"
    xi: float = Field(1.0, gt=0, description="exponentiated-gradient step for beta (worst)")
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(256, ge=1)
    lr_gate: float = Field(1e-3, gt=0)
    lr_alpha_mu: float = Field(5e-3, gt=0)
    rho: float = Field(1e-2, gt=0)
    lambda_max: float = Field(10.0, gt=0)
    alpha_min: float = Field(1e-3, gt=0)
    alpha_ema: float = Field(0.9, ge=0, lt=1)
    tau_start: float = Field(2.0, gt=0)
    tau_end: float = Field(10.0, gt=0)
    tau_warmup_epochs: int = Field(30, ge=0)
    lambda_ent: float = Field(1e-3, ge=0)
    hard_routing: bool = False
    gate_loss: Literal["nll", "selective"] = Field(
        "nll", description="nll: mixture trained as an estimate of P_train(y|x); selective: the Lagrangian")
    rule_update: Literal["fixed_point", "adam"] = Field(
        "fixed_point", description="fixed_point: (alpha, mu) by Algorithm 1 each epoch; adam: learned")
    M: int = Field(10, ge=1, description="fixed-point iterations of the per-epoch rule refit")
    uniform_gate: bool = Field(False, description="freeze the gate at w = 1/E (ablation)")
    hidden: tuple[int, ...] = (128, 64)
    dropout: float = Field(0.1, ge=0, lt=1)
    patience: int = Field(15, ge=1)
    view: Literal["lt", "bal"] = "lt"
    experts: tuple[int, ...] | None = Field(None, description="subset of expert indices (ablation)")
    buffer_chunks: int = Field(4, ge=1, description="row chunks shuffled together when streaming")
    seed: int = Field(42, ge=0)


class EvalConfig(StageConfig):
    """`argse eval`: risk-coverage metrics of a gate on test, with bootstrap CIs."""

    levels: tuple[float, ...] = (0.7, 0.8, 0.9)
    n_boot: int = Field(1000, ge=0)
    seed: int = Field(0, ge=0)
    refit: bool = Field(True, description="also compute the refit view (alpha, mu refitted per coverage)")
    refit_grid: tuple[float, ...] = (0.6, 0.7, 0.8, 0.9, 1.0)
    target_risk: float | None = Field(None, gt=0, lt=1, description="risk-controlled thresholds on calib")
    delta: float = Field(0.1, gt=0, lt=1, description="failure probability of the risk guarantee")
    conformal_epsilon: float = Field(0.1, gt=0, lt=1, description="Mondrian bound P(accept | error, group)")
    sag_mode: Literal["sensitivity", "specificity", "success"] | None = None
    sag_target: float = Field(0.9, gt=0, lt=1)
    sag_p_rand: float = Field(0.0, ge=0, lt=1)
    sag_window: int = Field(500, ge=10)
    sag_batch: int = Field(100, ge=1)
    l2d: bool = Field(False, description="learning to defer to simulated humans (EM)")
    human_noise: tuple[float, ...] = Field((0.3, 0.3), description="label-noise rate of each simulated human")


class BaselinesConfig(StageConfig):
    """`argse baselines`: Chow, DE-Chow, CS-plug-in (U-PI, SB-PI), Plug-in[Worst], AR-GSE ablations."""

    c: float = Field(0.05, ge=0, le=1)
    M: int = Field(10, ge=1, description="fixed-point iterations of Algorithm 1")
    T: int = Field(25, ge=1, description="EG rounds of Algorithm 2")
    xi: float = Field(1.0, gt=0)
    view: Literal["lt", "bal"] = "lt"
    levels: tuple[float, ...] = (0.7, 0.8, 0.9)
    n_boot: int = Field(1000, ge=0)
    seeds: tuple[int, ...] = (42,)
    ablations: bool = True
    sensitivity: bool = False
    gate_epochs: int | None = Field(None, ge=1, description="epochs of ablation gates (default: the gate's)")


class ReportConfig(StageConfig):
    """`argse report`: LaTeX tables and figures from eval / baselines artifacts."""

    formats: tuple[Literal["pdf", "png"], ...] = ("pdf", "png")
    title: str = "AR-GSE"


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
    seed: int = Field(0, ge=0)

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
