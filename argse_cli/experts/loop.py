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
    from argse_cli.experts.augment import apply_augment
    from argse_cli.experts.trainer import (
        _to_nchw_u8,
        class_balanced_indices,
        lr_at,
        make_optimizer,
        normalize,
    )

    dev = torch.device(recipe.device)
    cuda = dev.type == "cuda"
    E, C = len(task.names), int(num_classes)
    x_dev = _to_nchw_u8(x_u8, dev)
    y_dev = torch.as_tensor(np.asarray(y).astype(np.int64), device=dev)
    N, bs = x_dev.shape[0], min(recipe.batch_size, x_dev.shape[0])
    steps = N // bs  # drop_last
    total, warm = recipe.epochs * steps, int(round(recipe.warmup_epochs * steps))
    gen = torch.Generator(device=dev).manual_seed(recipe.seed)
    opt = make_optimizer(task.params, recipe)
    use_bf16 = recipe.precision == "bf16" and cuda
    fingerprint = _fingerprint(task, recipe, N, C)

    hist: list[list[dict]] = [[] for _ in range(E)]
    last_finite = torch.full((E,), float("nan"), device=dev)
    prev_loss: list[float | None] = [None] * E
    step, start, elapsed = 0, 0, 0.0
    resumed_from: int | None = None
    if checkpoint is not None:
        st = checkpoint.load()
        if st is not None and st.info.get("fingerprint") == fingerprint:
            t = {k: v.to(dev) for k, v in st.tensors.items()}
            task.load_state({k[5:]: v for k, v in t.items() if k.startswith("task.")})
            osd = opt.state_dict()
            osd["state"] = {
                int(k.split(".")[1]): {"momentum_buffer": v}
                for k, v in t.items()
                if k.startswith("opt.") and k.endswith(".momentum_buffer")
            }
            opt.load_state_dict(osd)
            last_finite = t["loop.last_finite"].clone()
            restore_rng(st.tensors, st.info["rng"], gen)
            info = st.info
            step, start, elapsed = info["step"], info["epoch"], info["elapsed_s"]
            hist, prev_loss = info["history"], info["prev_loss"]
            resumed_from = start
            if on_resume is not None:
                on_resume(start, recipe.epochs)
        elif st is not None:
            note = getattr(checkpoint, "on_note", None)
            if note is not None:
                note("the checkpoint found belongs to another run (ignored); starting over")

    def save(epoch_done: int) -> None:
        assert checkpoint is not None
        tensors = {f"task.{k}": v for k, v in task.state().items()}
        for i, s in opt.state_dict()["state"].items():
            if s.get("momentum_buffer") is not None:
                tensors[f"opt.{i}.momentum_buffer"] = s["momentum_buffer"]
        tensors["loop.last_finite"] = last_finite
        rt, rj = capture_rng(gen)
        tensors.update(rt)
        checkpoint.save(TrainState(tensors, {
            "fingerprint": fingerprint, "epoch": epoch_done, "step": step, "elapsed_s": elapsed,
            "history": hist, "prev_loss": prev_loss, "rng": rj,
        }))  # fmt: skip

    for epoch in range(start, recipe.epochs):
        task.set_train()
        t0 = time.perf_counter()
        if recipe.class_balanced_sampling:
            order = class_balanced_indices(y_dev, steps * bs, gen)
        else:
            order = torch.randperm(N, generator=gen, device=dev)
        loss_sum = torch.zeros(E, device=dev)
        correct = torch.zeros(E, device=dev)
        lr = 0.0
        for s in range(steps):
            idx = order[s * bs : (s + 1) * bs]
            yb = y_dev[idx]
            xb, tb = apply_augment(x_dev[idx], yb, recipe.aug, C, gen)
            xb = normalize(xb)
            if cuda and recipe.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            lr = lr_at(step, total, warm, recipe.peak_lr)
            for g in opt.param_groups:
                g["lr"] = lr
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                losses, logits = task.losses(xb, tb)
            opt.zero_grad(set_to_none=True)
            losses.sum().backward()
            opt.step()
            step += 1
            ld = losses.detach().float()
            if on_step is not None:
                on_step(step - 1, ld)
            last_finite = torch.where(torch.isfinite(ld), ld, last_finite)
            loss_sum += ld
            correct += (logits.detach().argmax(-1) == yb[None]).sum(1)
        if cuda:
            torch.cuda.synchronize(dev)
        dt = time.perf_counter() - t0
        elapsed += dt
        ep_loss = (loss_sum / steps).tolist()
        accs = (correct / (steps * bs)).tolist()
        for e in range(E):
            if not math.isfinite(ep_loss[e]) or ep_loss[e] > MAX_LOSS:
                lf = float(last_finite[e])
                err = TrainingDiverged(epoch, lf if math.isfinite(lf) else prev_loss[e])
                if E > 1:
                    err.add_note(f"expert {e} ({task.names[e]})")
                raise err
        prev_loss = list(ep_loss)
        rows = [
            {"epoch": epoch, "loss": ep_loss[e], "acc": accs[e], "lr": lr, "img_per_s": steps * bs / dt,
             "time_s": dt}
            for e in range(E)
        ]  # fmt: skip
        if evaluate is not None and recipe.eval_every and (epoch + 1) % recipe.eval_every == 0:
            for r, a in zip(rows, evaluate(), strict=True):
                r["eval_bal_acc"] = a
            task.set_train()
        for h, r in zip(hist, rows, strict=True):
            h.append(r)
        metrics = {
            "epoch": epoch + 1, "epochs": recipe.epochs, "loss": float(np.mean(ep_loss)),
            "acc": float(np.mean(accs)), "lr": lr, "img_per_s": steps * bs / dt, "time_s": dt,
            "elapsed_s": elapsed,
        }  # fmt: skip
        if E > 1:
            metrics.update(names=list(task.names), losses=ep_loss, accs=accs)
        if "eval_bal_acc" in rows[0]:
            metrics["eval_bal_acc"] = [r["eval_bal_acc"] for r in rows]
        if resumed_from is not None:
            metrics["resumed_from"] = resumed_from
            resumed_from = None
        if checkpoint is not None:
            checkpoint.log(metrics)
            if checkpoint.every and ((epoch + 1) % checkpoint.every == 0 or epoch + 1 == recipe.epochs):
                save(epoch + 1)
        if progress is not None:
            progress(epoch + 1, recipe.epochs, rows[0] if E == 1 else metrics)
    return hist
