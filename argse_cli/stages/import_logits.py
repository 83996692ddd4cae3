"""Stage `import-logits`: experts trained elsewhere ("bring your own experts").

Reads, per expert, logits for every held-out split (tuneV, val_small, calib, test; a ``train``
entry is accepted and ignored), labels per split, the training class counts and each expert's
training loss, and writes one artifact with the *export-logits* layout (plus the split-like
fields), so `calibrate`, `train-gate`, `eval`, `baselines` and `report` run unchanged:

  s/logits        float16 [N, E, C]  f - max_y f per row and expert (softmax ignores the shift);
                                     float32 for a split where some row's range max f - min f
                                     exceeds the fp16 range (65504). Logits already stored as
                                     float16 are kept verbatim: re-rounding f - max f could only
                                     lose bits, and keeping them makes importing an argse export
                                     bit-identical to the native path.
  s/labels        int64   [N]
  s/w_lt, s/w_bal float64 [N]        split_weights(labels, class_counts), or w_lt from a file and
                                     w_bal = w_lt * (1/C) / pi_train(y)
  s/group         int64   [N]        g(y)
  s/source_index  int64   [N]        row of the source file
  s/row_order     int64   [N]        same (position in the split's own order)
  class_counts [C], class_to_group [C]

Rows are stored in the seeded random order ``default_rng([seed, i]).permutation(N)`` of split i
of (tuneV, val_small, calib, test) -- the order `export-logits` uses -- and row-chunked with
``chunk_rows``. Sources are streamed: a pass of row blocks validates them (finite values, ranges),
then each output chunk gathers its rows (memory-mapped formats) or, for sequential formats (Zarr),
windows of output rows are filled by one sequential pass over the source each. Paths are
runtime-only: the cache key holds each file's xxh3 content fingerprint (:func:`key_extra`).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

STAGE = "import-logits"
VERSION = 6

FP16_MAX = 65504.0  # largest finite float16
F32_MAX = 3.4028234663852886e38
SCAN_BYTES = 32 * 2**20  # size of a row block read while validating / scanning
WINDOW_BYTES = 256 * 2**20  # output rows assembled per sequential pass of a non-mmap source
MEMO = ".file_fingerprints.json"


# ---------------------------------------------------------------------------------- config
def heldout_splits() -> tuple[str, ...]:
    from ..config import HELDOUT_SPLITS

    return HELDOUT_SPLITS


def file_roles(cfg: Any) -> dict[str, str]:
    """role -> spec of every file the import reads (train logits are ignored)."""
    from ..errors import ArgseError

    splits = heldout_splits()
    roles: dict[str, str] = {}
    names = [e.name for e in cfg.experts]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ArgseError(
            "import_logits.experts",
            f"expert name {dup[0]!r} is used twice",
            "give each expert a unique name",
        )
    for e in cfg.experts:
        for s in splits:
            if s not in e.logits:
                raise ArgseError(
                    f"import_logits.experts.{e.name}.logits",
                    f"split {s} is missing",
                    f"give logits for every held-out split: {', '.join(splits)}",
                )
            roles[f"logits.{e.name}.{s}"] = e.logits[s]
        extra = sorted(set(e.logits) - set(splits) - {"train"})
        if extra:
            raise ArgseError(
                f"import_logits.experts.{e.name}.logits",
                f"unknown split {extra[0]!r}",
                f"use {', '.join(splits)} (train is optional and ignored)",
            )
    for what, table in (("labels", cfg.labels), ("weights", cfg.weights)):
        if table is None:
            continue
        for s in splits:
            if s not in table:
                if what == "weights":
                    raise ArgseError(
                        "import_logits.weights",
                        f"split {s} is missing",
                        "give a weights file for every held-out split, or none",
                    )
                raise ArgseError(
                    "import_logits.labels",
                    f"split {s} is missing",
                    f"give labels for every held-out split: {', '.join(splits)}",
                )
            roles[f"{what}.{s}"] = table[s]
    roles["class_counts"] = cfg.class_counts
    if cfg.class_to_group:
        roles["class_to_group"] = cfg.class_to_group
    return roles


# ---------------------------------------------------------------------------------- keys
def _hash_path(path: Path) -> str:
    """xxh3_128 of a file's bytes (streamed), or of a directory's files (relative name + bytes)."""
    import xxhash

    def file_digest(p: Path) -> str:
        h = xxhash.xxh3_128()
        with open(p, "rb") as fh:
            while True:
                b = fh.read(8 * 2**20)
                if not b:
                    break
                h.update(b)
        return h.hexdigest()

    if not path.is_dir():
        return file_digest(path)
    h = xxhash.xxh3_128()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for f in sorted(files):
            p = Path(root) / f
            h.update(str(p.relative_to(path)).encode() + b"\0" + file_digest(p).encode() + b"\0")
    return h.hexdigest()


def fingerprint(spec: str, memo: dict | None = None, rehash: bool = False) -> str:
    """Content fingerprint of a spec ``path[:key]``: xxh3 of the bytes (plus the member key).

    ``memo`` maps (resolved path, size, mtime_ns) to digests so a cache hit does not re-read;
    ``rehash`` ignores it (a file changed in place with the same size and mtime) and stores the
    fresh digest.
    """
    import xxhash

    from ..readers import file_stamp, split_spec

    path, key = split_spec(spec, "file")
    k = json.dumps([str(path.resolve()), file_stamp(path)])
    digest = memo.get(k) if memo is not None and not rehash else None
    if digest is None:
        digest = _hash_path(path)
        if memo is not None:
            memo[k] = digest
    return digest if key is None else xxhash.xxh3_128_hexdigest(f"{digest}:{key}".encode())


def key_extra(cfg: Any, store: Any = None, write: bool = True, rehash: bool = False) -> dict[str, Any]:
    """``{"files": {role: fingerprint}}``: the imported files' contents enter the cache key.

    Fingerprints are memoised on (path, size, mtime_ns) in ``<store>/.file_fingerprints.json``
    (``write=False``: read the memo, never write it; ``rehash=True``: hash every file's content
    again, ignoring the memo, and refresh it).
    """
    from ..store import Store

    store = store or Store()
    memo_path = Path(store.root) / MEMO
    memo: dict[str, str] = {}
    with contextlib.suppress(OSError, ValueError):
        memo = json.loads(memo_path.read_text())
    before = dict(memo)
    files = {role: fingerprint(spec, memo, rehash) for role, spec in file_roles(cfg).items()}
    if write and memo != before:
        with contextlib.suppress(OSError):
            memo_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo_path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(memo))
            os.replace(tmp, memo_path)
    return {"files": files}


def run(cfg: Any, store: Any, force: bool = False, quiet: bool = False, rehash: bool = False) -> str:
    """Run (or find cached) the import; returns its key."""
    from . import run_stage

    extra = key_extra(cfg, store, rehash=rehash)
    key, _ = run_stage("import-logits", cfg, {}, {}, store, force=force, extra=extra, quiet=quiet)
    return key


# ---------------------------------------------------------------------------------- math
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

    from ..errors import ArgseError

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


def class_balanced_accuracy(pred: Any, y: Any, C: int) -> float:
    """Mean over classes present in y of the per-class recall P(pred = c | y = c)."""
    import numpy as np

    n_c = np.bincount(y, minlength=C)
    hit = np.bincount(y[pred == y], minlength=C)
    present = n_c > 0
    return float(np.mean(hit[present] / n_c[present]))


# ---------------------------------------------------------------------------------- checks
def load_groups(cfg: Any, counts: Any) -> tuple[Any, int]:
    """class -> group (int64 [C]) from a file or the group rule; every group needs a class."""
    import numpy as np

    from ..data.groups import get_class_to_group
    from ..errors import ArgseError
    from ..readers import load_int_vector

    C = len(counts)
    if cfg.class_to_group:
        c2g = load_int_vector(cfg.class_to_group, "import_logits.class_to_group", minimum=0)
        if len(c2g) != C:
            raise ArgseError(
                "import_logits.class_to_group",
                f"{len(c2g)} entries for {C} classes",
                "give one group id per class",
            )
        if int(c2g.max()) >= C:  # every group needs a class, so K <= C
            raise ArgseError(
                "import_logits.class_to_group",
                f"group id {int(c2g.max())} is not below the {C} classes",
                "use group ids 0..K-1 (K <= the number of classes), every group holding a class",
            )
        K = int(c2g.max()) + 1
        sizes = np.bincount(c2g, minlength=K)
        if (sizes == 0).any():
            k = int(np.argmin(sizes))
            raise ArgseError(
                "import_logits.class_to_group",
                f"group {k} is empty (no class maps to it)",
                f"use group ids 0..K-1 with every group holding a class (K = {K})",
            )
    else:
        c2g = get_class_to_group(counts, cfg.group_rule)
        K = int(c2g.max()) + 1
    return np.asarray(c2g, np.int64), K


def load_labels(cfg: Any, s: str, n: int, C: int) -> Any:
    import numpy as np

    from ..errors import ArgseError
    from ..readers import load_vector

    field = f"import_logits.labels.{s}"
    y = load_vector(cfg.labels[s], field)
    if len(y) != n:
        raise ArgseError(
            field, f"{len(y)} labels for {n} logit rows", "give one label per row, in row order"
        )
    if y.dtype.kind == "f" and (not np.all(np.isfinite(y)) or np.any(y != np.round(y))):
        raise ArgseError(field, "labels must be integers", "store integer class ids")
    y = y.astype(np.int64)
    bad = (y < 0) | (y >= C)
    if bad.any():
        i = int(np.argmax(bad))
        raise ArgseError(
            field,
            f"label {int(y[i])} at row {i} is outside [0, {C})",
            f"labels are class ids 0..{C - 1} of the {C} classes in class_counts",
        )
    return y


def split_weights_of(cfg: Any, s: str, y: Any, counts: Any) -> tuple[Any, Any]:
    """(w_lt, w_bal): computed as `split` does, or w_lt from a file and
    w_bal = w_lt * (1/C) / pi_train(y)."""
    import numpy as np

    from ..data.splits import split_weights
    from ..errors import ArgseError
    from ..readers import load_vector

    if not cfg.weights:
        return split_weights(y, counts)
    field = f"import_logits.weights.{s}"
    w = load_vector(cfg.weights[s], field).astype(np.float64)
    if len(w) != len(y):
        raise ArgseError(field, f"{len(w)} weights for {len(y)} rows", "give one weight per row")
    if not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
        raise ArgseError(
            field, "weights must be finite, >= 0 and not all 0", "fix the weights file"
        )
    pi = counts.astype(np.float64) / counts.sum()
    return w, w * (1.0 / len(counts)) / pi[y]


# ---------------------------------------------------------------------------------- stage
def compute(cfg: Any, inputs: dict, out: Any, progress: Any) -> None:
    import numpy as np

    from ..errors import ArgseError
    from ..experts.losses import posterior_tau
    from ..readers import load_class_counts, open_logits

    splits = heldout_splits()
    roles = file_roles(cfg)
    counts = load_class_counts(cfg.class_counts, "import_logits.class_counts")
    C = len(counts)
    c2g, K = load_groups(cfg, counts)
    E = len(cfg.experts)
    sizes, dtypes, test_pred, test_y = {}, {}, None, None
    for si, s in enumerate(splits):
        srcs = []
        for e in cfg.experts:
            field = f"import_logits.experts.{e.name}.logits.{s}"
            src = open_logits(e.logits[s], field)
            if src.ndim != 2:
                raise ArgseError(
                    field, f"{src.spec} has shape {src.shape}", "store logits as [N, C]"
                )
            if srcs and src.shape[1] != srcs[0].shape[1]:
                raise ArgseError(
                    field,
                    f"{src.shape[1]} classes, but expert {cfg.experts[0].name!r} has "
                    f"{srcs[0].shape[1]} in split {s}",
                    "every expert must score the same classes",
                )
            if srcs and src.shape[0] != srcs[0].shape[0]:
                raise ArgseError(
                    field,
                    f"{src.shape[0]} rows, but expert {cfg.experts[0].name!r} has "
                    f"{srcs[0].shape[0]} in split {s}",
                    "every expert must score the same rows",
                )
            srcs.append(src)
        if srcs[0].shape[1] != C:
            raise ArgseError(
                "import_logits.class_counts",
                f"{C} class counts, but the logits have {srcs[0].shape[1]} classes",
                "give one training count per logit column",
            )
        n = srcs[0].shape[0]
        if n == 0:
            raise ArgseError(
                f"import_logits.labels.{s}", "split is empty", "give at least one row per split"
            )
        y = load_labels(cfg, s, n, C)
        present = np.bincount(c2g[y], minlength=K)
        if (present == 0).any():
            k = int(np.argmin(present))
            raise ArgseError(
                f"import_logits.labels.{s}",
                f"group {k} has no rows in split {s} (empty group)",
                "every group needs samples in every held-out split; change the grouping",
            )
        w_lt, w_bal = split_weights_of(cfg, s, y, counts)
        worst = max(
            scan_source(src, f"import_logits.experts.{e.name}.logits.{s}")
            for e, src in zip(cfg.experts, srcs, strict=True)
        )
        dtype = storage_dtype(worst)
        order = np.random.default_rng([cfg.seed, si]).permutation(n).astype(np.int64)
        cr = cfg.chunk_rows
        out.array(f"{s}/row_order", order, chunk_rows=cr)
        out.array(f"{s}/source_index", order, chunk_rows=cr)
        out.array(f"{s}/labels", y[order], chunk_rows=cr)
        out.array(f"{s}/w_lt", np.asarray(w_lt, np.float64)[order], chunk_rows=cr)
        out.array(f"{s}/w_bal", np.asarray(w_bal, np.float64)[order], chunk_rows=cr)
        out.array(f"{s}/group", c2g[y][order], chunk_rows=cr)
        preds = _write_logits(out, s, srcs, order, dtype, cr, progress, keep_argmax=(s == "test"))
        if s == "test":
            test_pred, test_y = preds, y[order]
        sizes[s], dtypes[s] = n, str(dtype)
        del srcs
    out.array("class_counts", counts.astype(np.int64))
    out.array("class_to_group", c2g)
    experts = [
        {
            "key": e.name,
            "name": e.name,
            "loss": e.loss,
            "tau": posterior_tau(e.loss),
            "depth": None,
            "test_class_balanced_acc": class_balanced_accuracy(test_pred[:, i], test_y, C),
        }
        for i, e in enumerate(cfg.experts)
    ]
    out.meta.update(
        experts=experts,
        splits=sizes,
        sizes=sizes,
        num_classes=C,
        num_experts=E,
        num_groups=K,
        chunk_rows=cfg.chunk_rows,
        dtypes=dtypes,
        source="import",
        layout="s/logits float16 [N, E, C] (row max subtracted; float32 where a row's range overflows fp16)",
        group_source="file" if cfg.class_to_group else cfg.group_rule,
        files={r: str(v) for r, v in roles.items()},
    )
    progress.log(
        f"import-logits: E={E} C={C} K={K} "
        + ", ".join(f"{s}={sizes[s]} ({dtypes[s]})" for s in splits)
    )


def _write_logits(
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


def summary(meta: dict) -> str:
    return f"imported E={meta.get('num_experts')} C={meta.get('num_classes')} " + ",".join(
        e["loss"] for e in meta.get("experts", [])
    )
