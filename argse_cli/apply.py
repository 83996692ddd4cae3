"""Apply a stored, calibrated gate + rejector to new logits (`argse apply`, :func:`load_rejector`).

For a train-gate artifact ``key``, :func:`load_rejector` collects everything the rule needs:
the temperatures ``T_e`` and prior shifts ``shift_e`` of its `calibrate` upstream, ``log pi``
(training class counts) and ``class_to_group`` of its export / import upstream, and the gate,
``alpha``, ``mu``, ``beta`` and ``c`` of the gate itself. :meth:`Rejector.apply` then computes,
for expert logits f_e [N, C]:

    p_e   = softmax((f_e + shift_e * log pi) / T_e)         (calibrated training-prior posterior)
    eta   = sum_e w_e(x) p_e                                 (gate mixture)
    pred  = argmax_y u_[g(y)] eta_y,   u_k = K beta_k / alpha_k
    margin = max_y u_[g(y)] eta_y - sum_y (u_[g(y)] - mu_[g(y)]) eta_y + c,   accept = margin >= 0

exactly as `eval` does. By default (``storage="auto"``) the logits first go through the same
storage rounding as `import-logits` (f - max_y f per row, float16 unless a row's range overflows
fp16; float16 input kept verbatim), so applying the rule to the files that were imported
reproduces eval's decisions bit for bit. ``storage="none"`` skips the rounding.

Python API::

    from argse_cli.apply import load_rejector
    rej = load_rejector("3fa2c1")                 # a train-gate key or unique prefix
    out = rej.apply([logits_expert0, logits_expert1, ...])   # each [N, C]
    out["pred"], out["margin"], out["accept"]
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ArgseError

BLOCK_ROWS = 4096


@dataclass
class Rejector:
    """A calibrated gate + plug-in rejector loaded from the store (see the module docstring)."""

    gate: Any  # GatedRule
    temperature: np.ndarray  # [E_used]
    shift: np.ndarray  # [E_used]
    log_pi: np.ndarray  # [C]
    class_to_group: np.ndarray  # [C]
    experts: list[int] | None  # indices (into the export's experts) the gate uses; None = all
    expert_names: list[str]  # every expert of the export / import, in order
    gate_key: str
    export_key: str
    calibrate_key: str

    @property
    def num_classes(self) -> int:
        return len(self.log_pi)

    @property
    def num_experts(self) -> int:
        """Experts the gate mixes (a subset of ``expert_names`` for ablation gates)."""
        return len(self.temperature)

    def select(self, logits_per_expert: list) -> list:
        """The gate's experts: pass all of the export's experts (or exactly the gate's)."""
        k = len(logits_per_expert)
        if self.experts is not None and k == len(self.expert_names) and k != self.num_experts:
            return [logits_per_expert[i] for i in self.experts]
        if k != self.num_experts:
            raise ArgseError(
                "logits",
                f"{k} logits arrays for a gate over {self.num_experts} experts "
                f"({', '.join(self.expert_names)})",
                "pass one logits array per expert, in that order",
            )
        return list(logits_per_expert)

    def posteriors(self, logits_per_expert: list, storage: str = "auto") -> np.ndarray:
        """Calibrated posteriors [N, E, C] float32 of the gate's experts:
        p_e = softmax((f_e + shift_e log pi) / T_e) after the storage rounding."""
        if storage == "auto":
            storage = self.storage_for(logits_per_expert)
        return self._posteriors(self._checked(logits_per_expert), storage)

    @staticmethod
    def storage_for(logits_per_expert: list) -> str:
        """The dtype import-logits would store these rows in: float16 unless some non-fp16
        expert's row range max f - min f exceeds 65504 (decided over all experts jointly)."""
        from .logit_storage import row_range, storage_dtype

        ranges = [
            float(row_range(np.asarray(x)).max(initial=0.0))
            for x in logits_per_expert
            if np.asarray(x).dtype != np.float16
        ]
        return str(storage_dtype(max(ranges, default=0.0)))

    def _posteriors(self, xs: list, storage: str) -> np.ndarray:
        from .core.expert_data import apply_calibration
        from .logit_storage import to_storage

        if storage == "auto":
            storage = self.storage_for(xs)
        if storage != "none":
            xs = [to_storage(x, np.dtype(storage)) for x in xs]
        f = np.stack(xs, axis=1)
        return apply_calibration(f, self.log_pi, self.shift, self.temperature)

    def _checked(self, logits_per_expert: list) -> list:
        xs = [np.asarray(x) for x in self.select(logits_per_expert)]
        n = {len(x) for x in xs}
        if len(n) != 1:
            raise ArgseError(
                "logits",
                f"the experts' logits have different row counts {sorted(n)}",
                "score the same rows with every expert",
            )
        for i, x in enumerate(xs):
            if x.ndim != 2 or x.shape[1] != self.num_classes:
                raise ArgseError(
                    "logits",
                    f"expert {i}: shape {x.shape}, expected [N, {self.num_classes}]",
                    "pass the experts' raw logits over all classes",
                )
            ok = np.isfinite(x).all(axis=1)
            if not ok.all():
                raise ArgseError(
                    "logits",
                    f"expert {i}: row {int(np.argmin(ok))} holds NaN or inf",
                    "every row needs finite logits",
                )
        return xs

    def apply(self, logits_per_expert: list, storage: str = "auto") -> dict[str, np.ndarray]:
        """{"pred" int64 [N], "margin" float32 [N], "accept" bool [N]} for raw logits [N, C] each."""
        post = self.posteriors(logits_per_expert, storage)
        margin = self.gate.margin(post).astype(np.float32)
        pred = self.gate.predict(post)[0].astype(np.int64)
        return {"pred": pred, "margin": margin, "accept": margin >= 0}


def load_rejector(key: str, store: Any = None) -> Rejector:
    """Load the calibrated gate + rejector of a train-gate artifact (key or unique prefix)."""
    from .core.expert_data import log_prior
    from .core.gated import load_gate
    from .store import Store

    store = store if store is not None else Store()
    if not isinstance(store, Store):
        store = Store(store)
    art = store.open("train-gate", key)
    exp, cal = art.upstream("export"), art.upstream("calibrate")
    experts = art.meta.get("experts")
    shift, T = (
        np.asarray(cal.array("shift"), np.float32),
        np.asarray(cal.array("temperature"), np.float32),
    )
    if experts is not None:
        shift, T = shift[list(experts)], T[list(experts)]
    names = [e.get("name") or e.get("loss") or str(i) for i, e in enumerate(exp.meta["experts"])]
    return Rejector(
        gate=load_gate(art),
        temperature=T,
        shift=shift,
        log_pi=np.asarray(log_prior(exp), np.float32),
        class_to_group=np.asarray(exp.array("class_to_group"), np.int64),
        experts=list(experts) if experts is not None else None,
        expert_names=names,
        gate_key=art.key,
        export_key=exp.key,
        calibrate_key=cal.key,
    )


def apply_files(
    gate_key: str, logits_files: list[str], out: str, store_root: Any = None, storage: str = "auto"
) -> str:
    """Apply a stored gate to logits files (one per expert, any `import-logits` format), streaming
    row blocks; write ``pred``, ``margin``, ``accept`` per row to ``out`` (.npz or .csv)."""
    from .logit_storage import scan_source, storage_dtype
    from .readers import open_logits
    from .store import Store, check_out_file

    out_p = Path(out)
    if out_p.suffix.lower() not in (".npz", ".csv"):
        raise ArgseError(
            "--out", f"{out} must end in .npz or .csv", "write e.g. --out decisions.npz"
        )
    check_out_file(out_p)  # a directory, or a place that cannot be written: refused before any work
    rej = load_rejector(gate_key, Store(store_root) if store_root is not None else None)
    srcs = [open_logits(f, f"--logits[{i}]") for i, f in enumerate(logits_files)]
    for i, s in enumerate(srcs):
        if s.ndim != 2 or s.shape[1] != rej.num_classes:
            raise ArgseError(
                f"--logits[{i}]",
                f"{s.spec} has shape {s.shape}; the gate's classes: {rej.num_classes}",
                "pass [N, C] logits over the classes the gate was trained on",
            )
    rows = {len(s) for s in srcs}
    if len(rows) != 1:
        raise ArgseError(
            "--logits",
            f"files have different row counts {sorted(rows)}",
            "score the same rows with every expert",
        )
    n = rows.pop()
    rej.select(srcs)  # checks the number of files
    # one streaming pass: refuse NaN/inf (global row numbers) and pick the storage dtype over all
    # the files, as import-logits does over all experts of a split
    worst = max(scan_source(s, f"--logits[{i}]") for i, s in enumerate(srcs))
    if storage == "auto":
        storage = str(storage_dtype(worst))
    pred = np.empty(n, np.int64)
    margin = np.empty(n, np.float32)
    for a in range(0, n, BLOCK_ROWS):
        b = min(a + BLOCK_ROWS, n)
        r = rej.apply([s.read(a, b) for s in srcs], storage)
        pred[a:b], margin[a:b] = r["pred"], r["margin"]
    accept = margin >= 0
    _write_decisions(out_p, pred, margin, accept)
    return str(out_p)


def _write_decisions(out_p: Path, pred: np.ndarray, margin: np.ndarray, accept: np.ndarray) -> None:
    """Write atomically (temp file + rename): a failure never leaves half a file at ``out_p``;
    a full disk / read-only place / permission problem is one line naming the path."""
    import os

    from .store import place_errno, place_error

    suffix = out_p.suffix.lower()
    tmp = out_p.with_name(f".{out_p.stem}.{os.getpid()}.partial{suffix}")
    try:
        out_p.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".npz":
            np.savez(tmp, pred=pred, margin=margin, accept=accept)
        else:
            with open(tmp, "w") as fh:
                fh.write("row,pred,margin,accept\n")
                for i in range(len(pred)):
                    fh.write(f"{i},{int(pred[i])},{float(margin[i])!r},{int(accept[i])}\n")
        os.replace(tmp, out_p)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if place_errno(e) is None:
            raise
        raise place_error(e, "--out", out_p) from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
