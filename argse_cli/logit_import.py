"""The inputs of `import-logits` (experts trained elsewhere): the files a config names
(:func:`file_roles`), their content fingerprints in the cache key (:func:`key_extra`), and each
held-out split's sources, labels, weights and groups read and checked (:func:`read_split`).

Paths are runtime-only: the cache key holds each file's xxh3 content fingerprint, memoised on
(path, size, mtime_ns) in ``<store>/.file_fingerprints.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MEMO = ".file_fingerprints.json"


# ---------------------------------------------------------------------------------- config
def heldout_splits() -> tuple[str, ...]:
    from .config import HELDOUT_SPLITS

    return HELDOUT_SPLITS


def file_roles(cfg: Any) -> dict[str, str]:
    """role -> spec of every file the import reads (train logits are ignored)."""
    from .errors import ArgseError

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

    from .readers import file_stamp, split_spec

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
    from .store import Store

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


# ---------------------------------------------------------------------------------- checks
def load_groups(cfg: Any, counts: Any) -> tuple[Any, int]:
    """class -> group (int64 [C]) from a file or the group rule; every group needs a class."""
    import numpy as np

    from .data.groups import get_class_to_group
    from .errors import ArgseError
    from .readers import load_int_vector

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

    from .errors import ArgseError
    from .readers import load_vector

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

    from .data.splits import split_weights
    from .errors import ArgseError
    from .readers import load_vector

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


# ---------------------------------------------------------------------------------- splits
@dataclass
class ImportedSplit:
    """One held-out split read and checked: the experts' logits ``sources`` (one per expert,
    [N, C] each), labels ``y`` [N], weights ``w_lt``, ``w_bal`` [N] and the storage ``dtype``."""

    sources: list
    y: Any
    w_lt: Any
    w_bal: Any
    dtype: Any

    @property
    def n(self) -> int:
        return len(self.y)


def open_sources(cfg: Any, s: str, C: int) -> list:
    """The experts' logits sources of split ``s``: 2-D, the same rows and the ``C`` classes of
    class_counts for every expert, at least one row."""
    from .errors import ArgseError
    from .readers import open_logits

    srcs: list = []
    for e in cfg.experts:
        field = f"import_logits.experts.{e.name}.logits.{s}"
        src = open_logits(e.logits[s], field)
        if src.ndim != 2:
            raise ArgseError(field, f"{src.spec} has shape {src.shape}", "store logits as [N, C]")
        for dim, what in ((1, "classes"), (0, "rows")):
            if srcs and src.shape[dim] != srcs[0].shape[dim]:
                raise ArgseError(
                    field,
                    f"{src.shape[dim]} {what}, but expert {cfg.experts[0].name!r} has "
                    f"{srcs[0].shape[dim]} in split {s}",
                    f"every expert must score the same {what}",
                )
        srcs.append(src)
    if srcs[0].shape[1] != C:
        raise ArgseError(
            "import_logits.class_counts",
            f"{C} class counts, but the logits have {srcs[0].shape[1]} classes",
            "give one training count per logit column",
        )
    if srcs[0].shape[0] == 0:
        raise ArgseError(f"import_logits.labels.{s}", "split is empty", "give at least one row per split")
    return srcs


def read_split(cfg: Any, s: str, counts: Any, c2g: Any) -> ImportedSplit:
    """Split ``s`` of an import: sources, labels (every group present), weights, and the storage
    dtype over all experts (one streamed validating pass per source)."""
    import numpy as np

    from .errors import ArgseError
    from .logit_storage import scan_source, storage_dtype

    C, K = len(counts), int(c2g.max()) + 1
    srcs = open_sources(cfg, s, C)
    y = load_labels(cfg, s, srcs[0].shape[0], C)
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
    return ImportedSplit(srcs, y, w_lt, w_bal, storage_dtype(worst))


def expert_meta(cfg: Any, test_pred: Any, test_y: Any, C: int) -> list[dict]:
    """The artifact's ``experts`` entries (export-logits layout), with each expert's test
    class-balanced accuracy."""
    from .experts.losses import posterior_tau

    return [
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


def class_balanced_accuracy(pred: Any, y: Any, C: int) -> float:
    """Mean over classes present in y of the per-class recall P(pred = c | y = c)."""
    import numpy as np

    n_c = np.bincount(y, minlength=C)
    hit = np.bincount(y[pred == y], minlength=C)
    present = n_c > 0
    return float(np.mean(hit[present] / n_c[present]))
