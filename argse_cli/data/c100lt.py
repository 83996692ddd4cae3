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


_PROTOCOL_TAIL = (
    "Per fold: one temperature per expert fitted on val_small; each gate (5 seeds; NLL objective) trained on "
    "tuneV with its epoch chosen by the val_small NLL; every plug-in rule -- AR-GSE's and every baseline's, by "
    "the same code and search -- re-fitted at each coverage 0.01..1.00 on validation data only (alpha's fixed "
    "point on tuneV, lambda chosen on val_small; Algorithm 2 for the worst-group methods with S1 = tuneV, "
    "S2 = val_small) and read on test at that coverage (the refit view); Chow-type rules sweep a threshold. "
    "Test labels never choose anything."
)
CROSSFIT_FRACTIONS = {"tuneV": 0.6, "val_small": 0.3, "calib": 0.1}
"""How each cross-fitting fold's fitting rows (the other folds) are carved."""


def _pool(z: Any) -> dict[str, np.ndarray]:
    """Every distinct image of val_lt and of the clean test_lt once: {"from", "rows", "y", "src"}."""
    v_src, t_src = np.asarray(z["val_lt_source_index"]), np.asarray(z["test_lt_source_index"])
    v_rows, t_rows = _dedup(v_src), _dedup(t_src)
    t_rows = t_rows[~np.isin(t_src[t_rows], v_src[v_rows])]
    frm = np.array(["val_lt"] * len(v_rows) + ["test_lt"] * len(t_rows))
    rows = np.concatenate([v_rows, t_rows])
    y = np.concatenate([np.asarray(z["val_lt_labels"], np.int64)[v_rows], np.asarray(z["test_lt_labels"], np.int64)[t_rows]])
    src = np.concatenate([v_src[v_rows], t_src[t_rows]])
    assert len(np.unique(src)) == len(src), "the pooled images are not distinct"
    return {"from": frm, "rows": rows, "y": y, "src": src}


def crossfit_protocol(z: Any, n_folds: int = 5, seed: int = 0,
                      fractions: dict[str, float] | None = None) -> dict[str, Any]:
    """Cross-fitting: the pool (:func:`_pool`) cut into ``n_folds`` class-stratified folds; for fold
    k, test = fold k and tuneV / val_small / calib are carved (class-stratified) from the other
    folds. Returns {"pool", "folds": [{split: positions into the pool}], "stats"}; disjointness is
    asserted within every fold and across the folds' test sets."""
    from .splits import LeakError, stratified_partition

    fractions = dict(CROSSFIT_FRACTIONS if fractions is None else fractions)
    c2g = np.asarray(z["class_to_group"], np.int64)
    pool = _pool(z)
    rng = np.random.default_rng(seed)
    cut = stratified_partition(pool["y"], {f"fold{k}": 1.0 / n_folds for k in range(n_folds)}, rng, c2g)
    folds, counts = [], []
    for k in range(n_folds):
        test = cut[f"fold{k}"]
        rest = np.sort(np.concatenate([cut[f"fold{j}"] for j in range(n_folds) if j != k]))
        parts = stratified_partition(pool["y"][rest], fractions, np.random.default_rng([seed, k]), c2g)
        splits = {s: rest[parts[s]] for s in fractions}
        splits["test"] = test
        allpos = np.concatenate(list(splits.values()))
        if len(np.unique(pool["src"][allpos])) != len(allpos) or len(allpos) != len(pool["y"]):
            raise LeakError(f"fold {k}: a source image in two splits, or a row lost")
        folds.append(splits)
        counts.append({s: np.bincount(c2g[pool["y"][p]], minlength=int(c2g.max()) + 1).tolist()
                       for s, p in splits.items()})
    tests = np.concatenate([f["test"] for f in folds])
    if len(np.unique(tests)) != len(pool["y"]):
        raise LeakError("the folds' test sets overlap or miss rows")
    stats = {"protocol": "crossfit", "n_folds": n_folds, "pool_rows": int(len(pool["y"])),
             "pool_from_val_lt": int(np.sum(pool["from"] == "val_lt")),
             "pool_from_test_lt": int(np.sum(pool["from"] == "test_lt")),
             "val_lt_rows": int(len(z["val_lt_labels"])), "test_lt_rows": int(len(z["test_lt_labels"])),
             "fractions": fractions, "seed": seed, "counts": counts}
    return {"pool": pool, "folds": folds, "stats": stats}


PIPELINE_TAIL = {
    "calibrate": {},
    "train_gate": {"epochs": 60, "patience": 15},
    "eval": {"n_boot": 0},
    "baselines": {"n_boot": 0, "seeds": [42, 43, 44, 45, 46], "ablations": True, "ablation_variants": ["selective"]},
    "report": {"title": "CIFAR-100-LT (published expert logits)", "n_boot": 1000},
}


def _write_fold(z: Any, out: Path, parts: dict[str, tuple[np.ndarray, np.ndarray]], seed: int) -> Path:
    """Files of one set of splits (``parts[split] = (from, rows)``) and its ``pipeline.yaml``."""
    import yaml

    (out / "logits").mkdir(parents=True, exist_ok=True)
    names = [str(e) for e in z["experts"]]

    def take(key: str, frm: np.ndarray, rows: np.ndarray, e: int | None = None) -> np.ndarray:
        cols = []
        for f in np.unique(frm):
            a = np.asarray(z[f"{f}_{key}"])
            cols.append((np.flatnonzero(frm == f), (a[e] if e is not None else a)[rows[frm == f]]))
        first = cols[0][1]
        res = np.empty((len(rows), *first.shape[1:]), first.dtype)
        for pos, v in cols:
            res[pos] = v
        return res

    experts = []
    for e, name in enumerate(names):
        files = {}
        for s, (frm, rows) in parts.items():
            p = out / "logits" / f"{name}_{s}.npy"
            np.save(p, np.ascontiguousarray(take("logits", frm, rows, e)))
            files[s] = str(p.resolve())
        experts.append({"name": name, "loss": LOSSES[name], "logits": files})
    labels = {}
    for s, (frm, rows) in parts.items():
        p = out / f"labels_{s}.npy"
        np.save(p, take("labels", frm, rows).astype(np.int64))
        np.save(out / f"source_index_{s}.npy", take("source_index", frm, rows))
        labels[s] = str(p.resolve())
    (out / "class_counts.json").write_text(json.dumps(np.asarray(z["train_class_counts"]).tolist()))
    (out / "class_to_group.json").write_text(json.dumps(np.asarray(z["class_to_group"]).tolist()))
    pipe = {
        "import_logits": {
            "experts": experts, "labels": labels,
            "class_counts": str((out / "class_counts.json").resolve()),
            "class_to_group": str((out / "class_to_group.json").resolve()),
            "chunk_rows": 1024, "seed": seed,
        },
        **PIPELINE_TAIL,
    }  # fmt: skip
    path = out / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipe, sort_keys=False))
    return path


CAVEATS = [
    "Provenance: three ResNet-32 experts (ce, logitadjust, balsoftmax) trained on CIFAR-100-LT (IF = 100) by a "
    "public AR-GSE reproduction (hainguyenvie/cifar100LTreproceduce, commit a8c0004); the logits (fp16) and "
    "their exact labels are in ../shared/data/cifar100lt-logits (see its README).",
    "The published logits are already temperature-scaled upstream (T not published); `argse calibrate` fits a "
    "further temperature per expert on val_small.",
    "val_lt was used upstream for checkpoint selection and temperature fitting, so the rows that come from "
    "val_lt are not fully independent of the experts.",
    "Duplicated images are removed (by source index; the first copy kept), as are test_lt images shared with "
    "val_lt; the fixture's own tuneV (CIFAR-100 training images) is never used. One official test image "
    "carries two labels (girl / baby): one copy is kept.",
]


def expert_accuracies(z: Any, frm: np.ndarray, rows: np.ndarray) -> list[dict]:
    """Each expert's class-balanced accuracy (mean per-class recall of argmax of its raw logits) on the
    given rows, overall and per group (head, tail)."""
    c2g = np.asarray(z["class_to_group"], np.int64)
    out = []
    for e, name in enumerate(str(x) for x in z["experts"]):
        pred = np.empty(len(rows), np.int64)
        y = np.empty(len(rows), np.int64)
        for f in np.unique(frm):
            m = frm == f
            pred[m] = np.asarray(z[f"{f}_logits"][e][rows[m]], np.float32).argmax(1)
            y[m] = np.asarray(z[f"{f}_labels"], np.int64)[rows[m]]
        cls = np.unique(y)
        rec = np.array([np.mean(pred[y == c] == c) for c in cls])
        out.append({"name": name, "loss": LOSSES[name], "rows": int(len(rows)), "balanced_acc": float(rec.mean()),
                    "group_acc": [float(rec[c2g[cls] == k].mean()) for k in range(int(c2g.max()) + 1)]})
    return out


def prepare(npz: str | Path, out: str | Path, seed: int = 0, protocol: str = "crossfit",
            n_folds: int = 5) -> list[Path]:
    """Write the import-ready files and one ``pipeline.yaml`` per fold (``out/fold<k>/``; the holdout
    protocol: ``out/holdout/``) and ``out/protocol.json``; returns the pipeline paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    z = np.load(npz, allow_pickle=False)
    if protocol == "holdout":
        proto = clean_protocol(z, seed)
        parts = {s: (np.array([d["from"]] * len(d["rows"])), np.asarray(d["rows"])) for s, d in proto["splits"].items()}
        paths = [_write_fold(z, out / "holdout", parts, seed)]
        st = proto["stats"]
        stats = {"protocol": "holdout", **st, "experts": expert_accuracies(z, *parts["test"]),
                 "experts_note": "Class-balanced accuracy of argmax of the raw logits on the test split.",
                 "text": f"Holdout. val_lt ({st['val_lt_rows']} rows, {st['val_lt_distinct']} distinct images) is "
                         "de-duplicated and cut (class-stratified) into tuneV / val_small / calib (0.5 / 0.25 / 0.25); "
                         f"test is test_lt de-duplicated ({st['test_lt_distinct']} images) minus the "
                         f"{st['test_dropped_shared_with_val']} images shared with val_lt. " + _PROTOCOL_TAIL}
    elif protocol == "crossfit":
        cf = crossfit_protocol(z, n_folds, seed)
        pool = cf["pool"]
        paths = [_write_fold(z, out / f"fold{k}", {s: (pool["from"][p], pool["rows"][p]) for s, p in f.items()}, seed)
                 for k, f in enumerate(cf["folds"])]
        st = cf["stats"]
        fr = st["fractions"]
        stats = {**st, "experts": expert_accuracies(z, pool["from"], pool["rows"]),
                 "experts_note": "Class-balanced accuracy of argmax of the raw logits on all pooled rows.",
                 "text": f"Cross-fitting ({n_folds} folds). The de-duplicated val_lt ({st['pool_from_val_lt']} images) "
                         f"and the clean test_lt ({st['pool_from_test_lt']} images: de-duplicated, minus the images it "
                         f"shares with val_lt) are pooled ({st['pool_rows']} distinct images) and cut into {n_folds} "
                         "class-stratified folds. For each fold, tuneV / val_small / calib "
                         f"({fr['tuneV']:g} / {fr['val_small']:g} / {fr['calib']:g}, class-stratified) are carved from "
                         "the other folds and the held-out fold is its test set; no image is in two splits of a fold "
                         "and every image is a test row exactly once (asserted). Curves, bootstrap and paired tests "
                         "use all out-of-fold rows. " + _PROTOCOL_TAIL}
    else:
        raise ValueError("protocol must be crossfit or holdout")
    stats["caveats"] = CAVEATS
    (out / "protocol.json").write_text(json.dumps(stats, indent=2))
    return paths


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Prepare the CIFAR-100-LT protocol (cross-fitting or holdout).")
    ap.add_argument("npz")
    ap.add_argument("out")
    ap.add_argument("--protocol", choices=("crossfit", "holdout"), default="crossfit")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    for p in prepare(a.npz, a.out, a.seed, a.protocol, a.folds):
        print(p)


if __name__ == "__main__":
    main()
