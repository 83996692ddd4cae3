"""How logits are stored (`import-logits`, and `argse apply` by default): per row and expert,
``f - max_y f`` (softmax ignores the shift) as float16 unless some row's range ``max f - min f``
exceeds the fp16 range (65504), then float32; float16 input is kept verbatim. Sources are streamed
in row blocks: :func:`scan_source` validates them (finite values, ranges) and :func:`write_logits`
writes a split's rows in a given order, chunk by chunk.
"""

from __future__ import annotations

from typing import Any

FP16_MAX = 65504.0  # largest finite float16
F32_MAX = 3.4028234663852886e38
SCAN_BYTES = 32 * 2**20  # size of a row block read while validating / scanning
WINDOW_BYTES = 256 * 2**20  # output rows assembled per sequential pass of a non-mmap source


def to_storage(f: Any, dtype: Any) -> Any:
    """Logits rows [..., C] as stored: f - max_y f (softmax-invariant) cast to ``dtype``.

    float16 input is returned verbatim (cast only): it already is what fp16 storage holds.
    The shift is computed in float32 (float64 for float64 input), row by row, so the same rows
    give the same stored values whatever block they are read in.
    """
    import numpy as np

    f = np.asarray(f)
    if f.dtype == np.float16:
        return f.astype(dtype, copy=False)
    z = f.astype(np.float64 if f.dtype == np.float64 else np.float32, copy=True)
    z -= z.max(axis=-1, keepdims=True)
    return z.astype(dtype, copy=False)


def storage_dtype(max_range: float) -> Any:
    """float16 when every row's range max f - min f fits fp16 (<= 65504), else float32."""
    import numpy as np

    return np.dtype(np.float16) if max_range <= FP16_MAX else np.dtype(np.float32)


def row_range(block: Any) -> Any:
    """max_y f - min_y f per row (float32; float64 for float64 input)."""
    import numpy as np

    z = block.astype(np.float64 if block.dtype == np.float64 else np.float32, copy=False)
    return z.max(axis=-1) - z.min(axis=-1)


def scan_source(src: Any, field: str) -> float:
    """Stream a source once: refuse NaN/inf (naming the first bad row); return the largest row
    range (0 for float16 sources, which are stored verbatim)."""
    import numpy as np

    from .errors import ArgseError

    n, C = src.shape
    step = max(1, SCAN_BYTES // max(1, C * 4))
    worst = 0.0
    for a in range(0, n, step):
        block = src.read(a, min(a + step, n))
        ok = np.isfinite(block).all(axis=-1)
        if not ok.all():
            r = a + int(np.argmin(ok))
            raise ArgseError(
                field,
                f"row {r} of {src.spec} holds NaN or inf logits",
                "fix or drop the non-finite rows (every row needs finite logits)",
            )
        if block.dtype != np.float16 and len(block):
            worst = max(worst, float(row_range(block).max()))
    if worst > F32_MAX:
        raise ArgseError(
            field,
            f"{src.spec}: a row's logit range {worst:.3g} exceeds float32",
            "rescale the logits",
        )
    return worst


def write_logits(
    out: Any,
    s: str,
    srcs: list,
    order: Any,
    dtype: Any,
    cr: int,
    progress: Any,
    keep_argmax: bool = False,
) -> Any:
    """Write s/logits [N, E, C] in ``order`` (row i = source row order[i]), chunk by chunk.

    Memory-mapped sources: each output chunk gathers its rows. Sequential sources: a window of
    output rows (<= WINDOW_BYTES) is filled by one front-to-back pass over the source.
    Returns the stored rows' argmax [N, E] when ``keep_argmax`` (a report-only accuracy).
    """
    import numpy as np

    n, E, C = len(order), len(srcs), srcs[0].shape[1]
    rows = out.rows(f"{s}/logits", (n, E, C), dtype, cr)
    sequential = not all(src.random_access for src in srcs)
    per_row = E * C * np.dtype(dtype).itemsize
    W = max(1, WINDOW_BYTES // (per_row * cr)) * cr if sequential else cr
    inv = None
    if sequential:
        inv = np.empty(n, np.int64)
        inv[order] = np.arange(n)
    step = max(1, SCAN_BYTES // max(1, C * 4))
    argmax = np.empty((n, E), np.int64) if keep_argmax else None
    for w0 in range(0, n, W):
        w1 = min(w0 + W, n)
        buf = np.empty((w1 - w0, E, C), dtype)
        for e, src in enumerate(srcs):
            if src.random_access:
                for a in range(w0, w1, cr):
                    b = min(a + cr, w1)
                    buf[a - w0 : b - w0, e] = to_storage(src.take(order[a:b]), dtype)
            else:
                for r0 in range(0, n, step):
                    r1 = min(r0 + step, n)
                    pos = inv[r0:r1]
                    m = (pos >= w0) & (pos < w1)
                    if m.any():
                        buf[pos[m] - w0, e] = to_storage(src.read(r0, r1)[m], dtype)
        if argmax is not None:
            argmax[w0:w1] = buf.argmax(axis=-1)
        rows.append(buf)
        del buf
        progress(w1, n, {"split": s})
    return argmax
