"""The one training loop behind every expert trainer, with checkpoint / resume and a metrics log.

:func:`run_loop` trains a :class:`LoopTask` -- E experts whose per-expert losses
``L_1 .. L_E`` are summed into one objective ``L = sum_e L_e`` (E = 1 for a single expert) -- with
the trainer's recipe (:class:`argse_cli.experts.trainer.TrainRecipe`): the uint8 train set lives
on the device, every epoch draws its order from ONE generator (a permutation, or class-balanced
indices), every step augments the batch on the device from that generator, sets the per-step lr
(:func:`argse_cli.experts.trainer.lr_at`) and takes one SGD step. The task supplies the forward
pass (one model, E vmapped models, or one backbone with E heads), so the single, cRT, fused and
shared-backbone trainers differ only in their task, never in the loop.

Resume. After every ``checkpoint.every`` epochs (and after the last) the loop hands
``checkpoint.save`` the complete training state: the task's tensors (weights and buffers), the
optimizer's state, the step / epoch counters, the per-epoch history so far, the divergence
tracker, and the RNG states of torch (CPU and CUDA), numpy, python ``random`` and the loop's own
generator. On the next call with the same checkpoint the loop restores all of it and continues
with the next epoch, so -- with deterministic kernels (:func:`deterministic_on_cpu`) -- the
final weights are bit-equal to an uninterrupted run's. A checkpoint written for a different
run (other experts, recipe, data size) is ignored, never loaded.

Metrics log. After every epoch ``checkpoint.log(row)`` receives one JSON-able row:
``epoch`` (1-based, epochs completed), ``epochs``, ``loss`` (mean over experts of the epoch-mean
loss), ``losses`` (per expert, E > 1), ``acc`` (training accuracy, mean over experts), ``lr``,
``img_per_s`` (training images drawn per second), ``time_s`` (this epoch), ``elapsed_s``
(training time over all runs, resumed ones included), ``resumed_from`` (the epoch the run
resumed from, in the first row after a resume).

Checkpoint file (:class:`DirCheckpoint`): one ``checkpoint.safetensors`` (tensors only, so
loading it never executes code; the JSON part of the state is in its metadata), replaced
atomically (written to a temporary name, then ``os.replace``), so a kill at any moment leaves
the previous checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

__all__ = [
    "MAX_LOSS",
    "Checkpoint",
    "DirCheckpoint",
    "LoopTask",
    "TrainState",
    "TrainingDiverged",
    "capture_rng",
    "deterministic_on_cpu",
    "restore_rng",
    "run_loop",
]

MAX_LOSS = 1e4  # a mean cross-entropy above this means the logits exploded: treated as divergence


class TrainingDiverged(RuntimeError):
    """The training loss became NaN/inf."""

    def __init__(self, epoch: int, last_finite_loss: float | None):
        self.epoch, self.last_finite_loss = epoch, last_finite_loss
        last = "none" if last_finite_loss is None else f"{last_finite_loss:.6g}"
        super().__init__(
            f"training diverged at epoch {epoch}: loss is NaN/inf or above {MAX_LOSS:g} (last finite loss {last}); "
            "lower the learning rate or use precision=fp32"
        )


@contextmanager
def deterministic_on_cpu(cuda: bool) -> Iterator[None]:
    """On CPU, torch's deterministic algorithms (warn-only) for the block; the previous setting is
    restored afterwards. On CUDA the setting is left as it is."""
    prev = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    if not cuda:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])


# ----------------------------------------------------------------------------- RNG states
def capture_rng(gen: torch.Generator | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """RNG states as (tensors, JSON-able dict): torch CPU (and every CUDA device when CUDA is
    initialised), the generator ``gen``, numpy's global RandomState and python's ``random``."""
    tensors = {"rng.torch": torch.get_rng_state().clone()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s.clone()
    if gen is not None:
        tensors["rng.gen"] = gen.get_state().clone()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    js = {
        "numpy": [name, np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached)],
        "python": [py_version, list(py_state), py_gauss],
    }
    return tensors, js


def restore_rng(tensors: dict[str, torch.Tensor], js: dict, gen: torch.Generator | None = None) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    if gen is not None and "rng.gen" in tensors:
        gen.set_state(tensors["rng.gen"])
    name, keys, pos, has_gauss, cached = js["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    v, st, g = js["python"]
    random.setstate((v, tuple(st), g))


# ----------------------------------------------------------------------------- checkpoints
@dataclass
class TrainState:
    """Everything a resumed run needs: ``tensors`` (task state under ``task.``, optimizer state
    under ``opt.``, RNG states under ``rng.``, the divergence tracker) and ``info`` (JSON: epoch,
    step, history, previous losses, elapsed time, python/numpy RNG states, run fingerprint)."""

    tensors: dict[str, torch.Tensor]
    info: dict[str, Any]


class Checkpoint(Protocol):
    """What the loop calls: ``every`` (epochs between saves; 0 = never), ``load()`` (the last
    saved state or None), ``save(state)``, ``log(row)`` (one metrics row per epoch)."""

    every: int

    def load(self) -> TrainState | None: ...

    def save(self, state: TrainState) -> None: ...

    def log(self, row: dict) -> None: ...


class DirCheckpoint:
    """Checkpoints in a plain directory: ``checkpoint.safetensors`` (atomic replace) and, unless
    ``log`` is given (e.g. the store's ``out.log_metrics``), ``metrics.jsonl`` appended there.
    A checkpoint that cannot be read is reported through ``on_note`` and ignored."""

    FILE = "checkpoint.safetensors"

    def __init__(
        self,
        directory: str | os.PathLike,
        every: int = 1,
        log: Callable[[dict], None] | None = None,
        on_note: Callable[[str], None] | None = None,
    ):
        self.dir = Path(directory)
        self.every = int(every)
        self._log = log
        self.on_note = on_note
        self.metrics_path = self.dir / "metrics.jsonl"

    @property
    def path(self) -> Path:
        return self.dir / self.FILE

    def load(self) -> TrainState | None:
        if not self.path.is_file():
            return None
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(self.path))
            from safetensors import safe_open

            with safe_open(str(self.path), framework="pt") as f:
                info = json.loads((f.metadata() or {})["state"])
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            if self.on_note is not None:
                self.on_note(f"checkpoint {self.path} unreadable ({type(e).__name__}); starting over")
            return None
        return TrainState(tensors, info)

    def save(self, state: TrainState) -> None:
        from safetensors.torch import save_file

        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{self.FILE}.{os.getpid()}.tmp"
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.tensors.items()}
        save_file(tensors, str(tmp), metadata={"state": json.dumps(state.info)})
        os.replace(tmp, self.path)

    def log(self, row: dict) -> None:
        if self._log is not None:
            self._log(row)
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")


# ----------------------------------------------------------------------------- the loop
@dataclass
class LoopTask:
    """What :func:`run_loop` trains.

    ``names``: one per expert (E); ``params``: the tensors the optimizer updates;
    ``losses(x, t) -> (L [E], logits [E, B, C])`` for a normalised augmented batch ``x`` and its
    targets ``t`` (int labels [B] or soft targets [B, C]); ``set_train()`` puts the modules in
    the mode of a training epoch; ``state()`` / ``load_state(d)`` give / restore the tensors that
    change during training (weights and buffers) for checkpoints."""

    names: Sequence[str]
    params: list[torch.Tensor]
    losses: Callable[[torch.Tensor, Any], tuple[torch.Tensor, torch.Tensor]]
    set_train: Callable[[], None]
    state: Callable[[], dict[str, torch.Tensor]]
    load_state: Callable[[dict[str, torch.Tensor]], None]


def _fingerprint(task: LoopTask, recipe: Any, N: int, C: int) -> str:
    r = asdict(recipe)
    r.pop("eval_every", None)  # reporting only
    return json.dumps({"names": list(task.names), "recipe": r, "N": N, "C": C}, sort_keys=True)


def run_loop(
    task: LoopTask,
    x_u8: Any,
    y: Any,
    recipe: Any,
    num_classes: int,
    *,
    progress: Callable[[int, int, dict], None] | None = None,
    checkpoint: Checkpoint | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    evaluate: Callable[[], list[float]] | None = None,
    on_resume: Callable[[int, int], None] | None = None,
) -> list[list[dict]]:
    """Train ``task`` for ``recipe.epochs`` epochs; returns E per-expert histories.

    A history row: ``epoch`` (0-based), ``loss``, ``acc``, ``lr``, ``img_per_s``, ``time_s``
    (+ ``eval_bal_acc`` when ``evaluate`` (-> per-expert class-balanced accuracies) runs every
    ``recipe.eval_every`` epochs). ``progress(epoch + 1, epochs, rec)``: rec is expert 0's row when
    E = 1, else the metrics row (see the module docstring). ``on_step(step, L [E])`` sees every
    step's detached per-expert losses. ``on_resume(epoch, epochs)`` is called once when a
    checkpoint is restored. Raises :class:`TrainingDiverged` on a NaN/inf or exploding epoch loss
    (a note names the expert when E > 1)."""
    run = _Loop(task, x_u8, y, recipe, num_classes)
    if checkpoint is not None:
        run.restore(checkpoint, on_resume)
    for epoch in range(run.start, recipe.epochs):
        loss_sum, correct, lr, dt = run.train_epoch(on_step)
        rows, metrics = run.end_epoch(epoch, loss_sum, correct, lr, dt, evaluate)
        if checkpoint is not None:
            checkpoint.log(metrics)
            if checkpoint.every and ((epoch + 1) % checkpoint.every == 0 or epoch + 1 == recipe.epochs):
                checkpoint.save(run.state(epoch + 1))
        if progress is not None:
            progress(epoch + 1, recipe.epochs, rows[0] if run.E == 1 else metrics)
    return run.hist


class _Loop:
    """One :func:`run_loop` call: the device-resident data, the optimizer, the loop's generator and
    the state a checkpoint holds (step and epoch counters, elapsed time, histories, the
    divergence tracker)."""

    def __init__(self, task: LoopTask, x_u8: Any, y: Any, recipe: Any, num_classes: int):
        from argse_cli.experts.trainer import _to_nchw_u8, make_optimizer

        self.task, self.recipe = task, recipe
        self.dev = torch.device(recipe.device)
        self.cuda = self.dev.type == "cuda"
        self.E, self.C = len(task.names), int(num_classes)
        self.x = _to_nchw_u8(x_u8, self.dev)
        self.y = torch.as_tensor(np.asarray(y).astype(np.int64), device=self.dev)
        self.N, self.bs = self.x.shape[0], min(recipe.batch_size, self.x.shape[0])
        self.steps = self.N // self.bs  # drop_last
        self.total, self.warm = recipe.epochs * self.steps, int(round(recipe.warmup_epochs * self.steps))
        self.gen = torch.Generator(device=self.dev).manual_seed(recipe.seed)
        self.opt = make_optimizer(task.params, recipe)
        self.use_bf16 = recipe.precision == "bf16" and self.cuda
        self.fingerprint = _fingerprint(task, recipe, self.N, self.C)
        self.hist: list[list[dict]] = [[] for _ in range(self.E)]
        self.last_finite = torch.full((self.E,), float("nan"), device=self.dev)
        self.prev_loss: list[float | None] = [None] * self.E
        self.step, self.start, self.elapsed = 0, 0, 0.0
        self.resumed_from: int | None = None

    # ---- checkpoints
    def restore(self, checkpoint: Checkpoint, on_resume: Callable[[int, int], None] | None) -> None:
        """Continue from the checkpoint's state when it belongs to this run (else a note)."""
        st = checkpoint.load()
        if st is None:
            return
        if st.info.get("fingerprint") != self.fingerprint:
            note = getattr(checkpoint, "on_note", None)
            if note is not None:
                note("the checkpoint found belongs to another run (ignored); starting over")
            return
        t = {k: v.to(self.dev) for k, v in st.tensors.items()}
        self.task.load_state({k[5:]: v for k, v in t.items() if k.startswith("task.")})
        osd = self.opt.state_dict()
        osd["state"] = {
            int(k.split(".")[1]): {"momentum_buffer": v}
            for k, v in t.items()
            if k.startswith("opt.") and k.endswith(".momentum_buffer")
        }
        self.opt.load_state_dict(osd)
        self.last_finite = t["loop.last_finite"].clone()
        restore_rng(st.tensors, st.info["rng"], self.gen)
        info = st.info
        self.step, self.start, self.elapsed = info["step"], info["epoch"], info["elapsed_s"]
        self.hist, self.prev_loss = info["history"], info["prev_loss"]
        self.resumed_from = self.start
        if on_resume is not None:
            on_resume(self.start, self.recipe.epochs)

    def state(self, epoch_done: int) -> TrainState:
        """The complete training state after ``epoch_done`` epochs (see the module docstring)."""
        tensors = {f"task.{k}": v for k, v in self.task.state().items()}
        for i, s in self.opt.state_dict()["state"].items():
            if s.get("momentum_buffer") is not None:
                tensors[f"opt.{i}.momentum_buffer"] = s["momentum_buffer"]
        tensors["loop.last_finite"] = self.last_finite
        rt, rj = capture_rng(self.gen)
        tensors.update(rt)
        return TrainState(tensors, {
            "fingerprint": self.fingerprint, "epoch": epoch_done, "step": self.step, "elapsed_s": self.elapsed,
            "history": self.hist, "prev_loss": self.prev_loss, "rng": rj,
        })  # fmt: skip

    # ---- one epoch
    def train_epoch(self, on_step: Callable[[int, torch.Tensor], None] | None):
        """One epoch of SGD steps: (loss sums [E], correct counts [E], last lr, seconds)."""
        from argse_cli.experts.augment import apply_augment
        from argse_cli.experts.trainer import class_balanced_indices, lr_at, normalize

        r, E = self.recipe, self.E
        self.task.set_train()
        t0 = time.perf_counter()
        if r.class_balanced_sampling:
            order = class_balanced_indices(self.y, self.steps * self.bs, self.gen)
        else:
            order = torch.randperm(self.N, generator=self.gen, device=self.dev)
        loss_sum = torch.zeros(E, device=self.dev)
        correct = torch.zeros(E, device=self.dev)
        lr = 0.0
        for s in range(self.steps):
            idx = order[s * self.bs : (s + 1) * self.bs]
            yb = self.y[idx]
            xb, tb = apply_augment(self.x[idx], yb, r.aug, self.C, self.gen)
            xb = normalize(xb)
            if self.cuda and r.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            lr = lr_at(self.step, self.total, self.warm, r.peak_lr)
            for g in self.opt.param_groups:
                g["lr"] = lr
            with torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.use_bf16):
                losses, logits = self.task.losses(xb, tb)
            self.opt.zero_grad(set_to_none=True)
            losses.sum().backward()
            self.opt.step()
            self.step += 1
            ld = losses.detach().float()
            if on_step is not None:
                on_step(self.step - 1, ld)
            self.last_finite = torch.where(torch.isfinite(ld), ld, self.last_finite)
            loss_sum += ld
            correct += (logits.detach().argmax(-1) == yb[None]).sum(1)
        if self.cuda:
            torch.cuda.synchronize(self.dev)
        return loss_sum, correct, lr, time.perf_counter() - t0

    def end_epoch(self, epoch: int, loss_sum: torch.Tensor, correct: torch.Tensor, lr: float, dt: float,
                  evaluate: Callable[[], list[float]] | None) -> tuple[list[dict], dict]:
        """Check for divergence, record the epoch's per-expert rows and return them with the
        metrics row (see the module docstring)."""
        E, steps, bs = self.E, self.steps, self.bs
        self.elapsed += dt
        ep_loss = (loss_sum / steps).tolist()
        accs = (correct / (steps * bs)).tolist()
        for e in range(E):
            if not math.isfinite(ep_loss[e]) or ep_loss[e] > MAX_LOSS:
                lf = float(self.last_finite[e])
                err = TrainingDiverged(epoch, lf if math.isfinite(lf) else self.prev_loss[e])
                if E > 1:
                    err.add_note(f"expert {e} ({self.task.names[e]})")
                raise err
        self.prev_loss = list(ep_loss)
        rows = [
            {"epoch": epoch, "loss": ep_loss[e], "acc": accs[e], "lr": lr, "img_per_s": steps * bs / dt,
             "time_s": dt}
            for e in range(E)
        ]  # fmt: skip
        if evaluate is not None and self.recipe.eval_every and (epoch + 1) % self.recipe.eval_every == 0:
            for r, a in zip(rows, evaluate(), strict=True):
                r["eval_bal_acc"] = a
            self.task.set_train()
        for h, r in zip(self.hist, rows, strict=True):
            h.append(r)
        metrics = {
            "epoch": epoch + 1, "epochs": self.recipe.epochs, "loss": float(np.mean(ep_loss)),
            "acc": float(np.mean(accs)), "lr": lr, "img_per_s": steps * bs / dt, "time_s": dt,
            "elapsed_s": self.elapsed,
        }  # fmt: skip
        if E > 1:
            metrics.update(names=list(self.task.names), losses=ep_loss, accs=accs)
        if "eval_bal_acc" in rows[0]:
            metrics["eval_bal_acc"] = [r["eval_bal_acc"] for r in rows]
        if self.resumed_from is not None:
            metrics["resumed_from"] = self.resumed_from
            self.resumed_from = None
        return rows, metrics
