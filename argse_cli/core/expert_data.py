"""Calibrated expert posteriors read from an export (or import) artifact and a calibration.

p_e = softmax((f_e + shift_e log pi) / T_e) (:func:`apply_calibration`), on the training prior for
shift_e = tau_e (the default calibration). In memory (:func:`load_posteriors`) or streamed in row
chunks with bounded memory (:class:`ZarrSource`, the gate's training rows).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def log_prior(export_art: Any) -> Any:
    import numpy as np

    counts = export_art.array("class_counts").astype(np.float64)
    return np.log(counts / counts.sum()).astype(np.float32)


def apply_calibration(logits: Any, log_pi: Any, shift: Any, T: Any) -> Any:
    """p[n, e, :] = softmax((f[n, e, :] + shift_e * log pi) / T_e), float32 (fp16 in is fine).

    numpy in, numpy out; computed with torch's vectorised kernels in one float32 buffer (the
    fp16 -> float32 cast is the only copy; the caller's array is never modified)."""
    import numpy as np
    import torch

    f = torch.from_numpy(np.ascontiguousarray(logits))
    z = f.to(torch.float32, copy=True)
    sh = torch.as_tensor(np.asarray(shift, np.float32))
    lp = torch.as_tensor(np.asarray(log_pi, np.float32))
    z.add_(sh[:, None] * lp[None, :])
    z.div_(torch.as_tensor(np.asarray(T, np.float32))[:, None])
    z.sub_(z.amax(dim=-1, keepdim=True))
    z.exp_()
    z.div_(z.sum(dim=-1, keepdim=True))
    return z.numpy()


def load_posteriors(export_art: Any, calib_art: Any, split: str, experts: Any = None) -> dict:
    """Calibrated posteriors [N, E, C] of a split plus labels, weights and groups (in memory)."""
    import numpy as np

    logits = export_art.array(f"{split}/logits")
    shift, T = calib_art.array("shift"), calib_art.array("temperature")
    if experts is not None:
        idx = np.asarray(experts, dtype=np.int64)
        logits, shift, T = logits[:, idx], shift[idx], T[idx]
    return {
        "post": apply_calibration(logits, log_prior(export_art), shift, T),
        "y": export_art.array(f"{split}/labels"),
        "w_lt": export_art.array(f"{split}/w_lt"),
        "w_bal": export_art.array(f"{split}/w_bal"),
        "group": export_art.array(f"{split}/group"),
    }



class ZarrSource:
    """Streams (post [B,E,C] float32, y, w) from an export artifact with bounded memory: each epoch
    the chunk order is shuffled, ``buffer_chunks`` chunks at a time are read, calibrated and
    shuffled within the buffer. ``weights`` names the per-row weights (``w_lt`` or ``w_bal``).

    ``max_resident_rows`` records the most rows held at once (for the streaming test).
    """

    def __init__(self, export_art: Any, calib_art: Any, split: str, weights: str, batch_size: int,
                 seed: int, buffer_chunks: int = 4, experts: Any = None):
        self.exp, self.split, self.weights = export_art, split, weights
        self.batch_size, self.seed, self.buffer_chunks = batch_size, seed, buffer_chunks
        self.experts = experts
        self.log_pi = log_prior(export_art)
        self.shift = calib_art.array("shift")
        self.T = calib_art.array("temperature")
        if experts is not None:
            self.shift, self.T = self.shift[list(experts)], self.T[list(experts)]
        self.n_chunks = export_art.n_chunks(f"{split}/logits")
        self.n_rows = int(export_art.manifest["arrays"][f"{split}/logits"]["shape"][0])
        self.max_resident_rows = 0

    def _chunks(self, name: str, order: Any) -> Any:
        return self.exp.iter_chunks(f"{self.split}/{name}", order=order)

    def iter_epoch(self, epoch: int):
        import numpy as np

        rng = np.random.default_rng([self.seed, epoch])
        yield from self._read(rng.permutation(self.n_chunks), rng)

    def iter_rows(self, keep: Any = None):
        """(post, y, w) in the stored row order, one buffer at a time (no shuffling). ``keep``
        (sorted row indices) restricts them to those rows: the others are read, never calibrated."""
        yield from self._read(np.arange(self.n_chunks), None, keep)

    def _read(self, order: Any, rng: Any, keep: Any = None):
        import numpy as np
        import torch

        wname = self.weights
        info = self.exp.manifest["arrays"][f"{self.split}/logits"]
        cr, dtype = int(info["chunk_rows"]), np.dtype(info["dtype"])
        for b in range(0, len(order), self.buffer_chunks):
            sel = order[b : b + self.buffer_chunks]
            # the selected chunks decoded straight into one buffer (no list + concatenate copy)
            f = np.empty((sum(min(cr, self.n_rows - int(i) * cr) for i in sel), *info["shape"][1:]), dtype)
            at = 0
            for _, blk in self._chunks("logits", sel):
                f[at : at + len(blk)] = blk
                at += len(blk)
            self.max_resident_rows = max(self.max_resident_rows, len(f))
            y = np.concatenate([blk for _, blk in self._chunks("labels", sel)])
            w = np.concatenate([blk for _, blk in self._chunks(wname, sel)])
            if keep is not None:  # stored order: this buffer holds rows [start, start + len)
                start = int(sel[0]) * cr
                i = keep[(keep >= start) & (keep < start + len(y))] - start
                f, y, w = f[i], y[i], w[i]
            if self.experts is not None:
                f = f[:, list(self.experts)]
            post = torch.from_numpy(apply_calibration(f, self.log_pi, self.shift, self.T))
            del f
            y, w = torch.from_numpy(y).long(), torch.from_numpy(w).float()
            if rng is None:
                yield post, y, w
                continue
            perm = torch.from_numpy(rng.permutation(len(y)))
            for i in range(0, len(perm), self.batch_size):
                idx = perm[i : i + self.batch_size]
                yield post[idx], y[idx], w[idx]
            del post, y, w
