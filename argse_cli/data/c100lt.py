"""A clean protocol over the published CIFAR-100-LT expert logits (../shared/data/cifar100lt-logits).

The fixture's caveats (its README): rows sorted by class, duplicated images, 1,309 images shared by
``val_lt`` and ``test_lt``, and an unusable ``tuneV``. The protocol here:

1. de-duplicate ``val_lt`` and ``test_lt`` by source index (first occurrence kept);
2. drop from ``test_lt`` every source image that is in ``val_lt``;
3. carve tuneV / val_small / calib (default 0.5 / 0.25 / 0.25) from the de-duplicated ``val_lt``,
   class-stratified by largest remainder with the group-level fallback for tiny classes;
4. keep ``test_lt``'s long-tailed proportions through the weights ``w_lt = pi_train / pi_split``
   (computed by ``import-logits`` from the training counts);
5. assert that no source image is in two splits; the fixture's own ``tuneV`` is never used.

``python -m argse_cli.data.c100lt NPZ OUT_DIR`` writes ``.npy`` logits per expert and split, labels,
the training counts and class->group map as JSON, ``protocol.json`` (counts, what was dropped) and
``pipeline.yaml`` (an ``import_logits`` section plus the downstream stages' sections).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

LOSSES = {"ce": "ce", "logitadjust": "logitadjust:1", "balsoftmax": "balsoftmax"}
FRACTIONS = {"tuneV": 0.5, "val_small": 0.25, "calib": 0.25}


def _dedup(src: np.ndarray) -> np.ndarray:
    """Row positions of the first occurrence of every source index, in row order."""
    _, first = np.unique(src, return_index=True)
    return np.sort(first)


def clean_protocol(z: Any, seed: int = 0, fractions: dict[str, float] | None = None) -> dict[str, Any]:
    """{split: {"rows": positions into the fixture split, "from": "val_lt"|"test_lt"}} + stats."""
    from .splits import LeakError, stratified_partition

    fractions = dict(FRACTIONS if fractions is None else fractions)
    c2g = np.asarray(z["class_to_group"], np.int64)
    v_src, t_src = np.asarray(z["val_lt_source_index"]), np.asarray(z["test_lt_source_index"])
    v_rows = _dedup(v_src)
    t_rows = _dedup(t_src)
    t_keep = t_rows[~np.isin(t_src[t_rows], v_src[v_rows])]
    v_lab = np.asarray(z["val_lt_labels"], np.int64)[v_rows]
    parts = stratified_partition(v_lab, fractions, np.random.default_rng(seed), c2g)
    splits = {s: {"from": "val_lt", "rows": v_rows[parts[s]]} for s in fractions}
    splits["test"] = {"from": "test_lt", "rows": t_keep}
    owner: dict[int, str] = {}
    for s, d in splits.items():
        src = (v_src if d["from"] == "val_lt" else t_src)[d["rows"]]
        for i in src.tolist():
            if i in owner:
                raise LeakError(f"source image {i} in {owner[i]} and {s}")
            owner[i] = s
    stats = {
        "val_lt_rows": int(len(v_src)), "val_lt_distinct": int(len(v_rows)),
        "test_lt_rows": int(len(t_src)), "test_lt_distinct": int(len(t_rows)),
        "test_dropped_shared_with_val": int(len(t_rows) - len(t_keep)),
        "counts": {s: np.bincount(c2g[np.asarray(z[f"{d['from']}_labels"], np.int64)[d["rows"]]],
                                  minlength=int(c2g.max()) + 1).tolist() for s, d in splits.items()},
        "fractions": fractions, "seed": seed,
    }
    return {"splits": splits, "stats": stats}


PIPELINE_TAIL = {
    "calibrate": {},
    "train_gate": {"epochs": 60, "tau_warmup_epochs": 15, "patience": 15},
    "eval": {"n_boot": 1000},
    "baselines": {"n_boot": 1000, "seeds": [42, 43, 44, 45, 46], "ablations": False, "gate_epochs": 30},
    "report": {"title": "CIFAR-100-LT (published expert logits)"},
}


def prepare(npz: str | Path, out: str | Path, seed: int = 0) -> Path:
    """Write the import-ready files and ``pipeline.yaml``; returns the pipeline path."""
    import yaml

    out = Path(out)
    (out / "logits").mkdir(parents=True, exist_ok=True)
    z = np.load(npz, allow_pickle=False)
    proto = clean_protocol(z, seed)
    names = [str(e) for e in z["experts"]]
    experts = []
    for e, name in enumerate(names):
        files = {}
        for s, d in proto["splits"].items():
            p = out / "logits" / f"{name}_{s}.npy"
            np.save(p, np.ascontiguousarray(z[f"{d['from']}_logits"][e][d["rows"]]))
            files[s] = str(p.resolve())
        experts.append({"name": name, "loss": LOSSES[name], "logits": files})
    labels = {}
    for s, d in proto["splits"].items():
        p = out / f"labels_{s}.npy"
        np.save(p, np.asarray(z[f"{d['from']}_labels"], np.int64)[d["rows"]])
        np.save(out / f"source_index_{s}.npy", np.asarray(z[f"{d['from']}_source_index"])[d["rows"]])
        labels[s] = str(p.resolve())
    (out / "class_counts.json").write_text(json.dumps(np.asarray(z["train_class_counts"]).tolist()))
    (out / "class_to_group.json").write_text(json.dumps(np.asarray(z["class_to_group"]).tolist()))
    (out / "protocol.json").write_text(json.dumps(proto["stats"], indent=2))
    pipe = {
        "import_logits": {
            "experts": experts, "labels": labels,
            "class_counts": str((out / "class_counts.json").resolve()),
            "class_to_group": str((out / "class_to_group.json").resolve()),
            "chunk_rows": 1024, "seed": seed,
        },
        **PIPELINE_TAIL,
    }
    path = out / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipe, sort_keys=False))
    return path


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m argse_cli.data.c100lt NPZ OUT_DIR")
    print(prepare(sys.argv[1], sys.argv[2]))
