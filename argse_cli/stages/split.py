"""Stage `split`: LT subset (Cao et al. 2019), class->group map, leak-free splits.

Artifact layout (Zarr group):
  class_counts [C]      LT training counts (define pi_train)
  class_to_group [C]    0 = head
  <split>/indices [n]   indices into the official array named in meta.sources[split]
  <split>/labels, <split>/group, <split>/w_lt, <split>/w_bal
Side file ``indices.json``: {split: {"source": "train"|"test", "indices": [...]}} for reuse
outside the tool.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

STAGE = "split"
VERSION = 3


def compute(cfg: Any, inputs: dict, out: Any, progress: Any) -> None:
    import numpy as np

    from ..data.cifar import load_cifar
    from ..data.groups import get_class_to_group
    from ..data.longtail import lt_class_counts
    from ..data.splits import check_disjoint, make_splits, split_table

    data = load_cifar(cfg.dataset, Path(cfg.data_root), download=cfg.download)
    C = data.num_classes
    n_max = int(np.bincount(data.y_train, minlength=C).max())
    counts = lt_class_counts(n_max, C, cfg.imbalance_factor)
    class_to_group = get_class_to_group(counts, cfg.group_rule)
    res = make_splits(
        data.y_train, data.y_test, counts, cfg.protocol, dict(cfg.fractions), class_to_group, cfg.seed
    )
    check_disjoint(res)  # an assertion, not a hope: runs again right before publishing

    out.array("class_counts", np.asarray(counts, dtype=np.int64))
    out.array("class_to_group", np.asarray(class_to_group, dtype=np.int64))
    sources, sizes = {}, {}
    for name, part in res.splits.items():
        out.array(f"{name}/indices", part.indices.astype(np.int64))
        out.array(f"{name}/labels", part.labels.astype(np.int64))
        out.array(f"{name}/group", part.group.astype(np.int64))
        out.array(f"{name}/w_lt", part.w_lt.astype(np.float64))
        out.array(f"{name}/w_bal", part.w_bal.astype(np.float64))
        sources[name] = part.source
        sizes[name] = len(part)
    out.json(
        "indices.json",
        {n: {"source": p.source, "indices": p.indices.tolist()} for n, p in res.splits.items()},
    )
    out.meta.update(
        dataset=cfg.dataset,
        num_classes=C,
        num_groups=int(class_to_group.max()) + 1,
        sources=sources,
        sizes=sizes,
        table=[list(map(int, r[1:])) + [r[0]] for r in split_table(res)],
        data_root=str(Path(cfg.data_root).resolve()),
        md5_mismatch=list(data.md5_mismatch),
        warnings=list(res.warnings),
    )


def print_table(art: Any) -> None:
    """Rich table of counts per split x group (plus totals)."""
    from rich.console import Console
    from rich.table import Table

    meta = art.meta
    K = meta["num_groups"]
    names = ["head", "tail"] if K == 2 else [f"g{k}" for k in range(K)]
    t = Table(title=f"{meta['dataset']} splits ({art.key[:12]})")
    t.add_column("split")
    t.add_column("source")
    for n in names:
        t.add_column(n, justify="right")
    t.add_column("total", justify="right")
    rows: dict[str, list[int]] = {}
    for g, n, s in meta["table"]:
        rows.setdefault(s, [0] * K)[g] = n
    for s, counts in rows.items():
        t.add_row(s, meta["sources"][s], *map(str, counts), str(sum(counts)))
    con = Console(stderr=True)
    con.print(t)
    for w in meta.get("warnings", []):
        con.print(f"[yellow]warning:[/] {w}")
