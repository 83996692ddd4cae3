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
runtime-only: the cache key holds each file's xxh3 content fingerprint
(:func:`argse_cli.logit_import.key_extra`).
"""

from __future__ import annotations

from typing import Any

STAGE = "import-logits"
VERSION = 9


def run(cfg: Any, store: Any, force: bool = False, quiet: bool = False, rehash: bool = False) -> str:
    """Run (or find cached) the import; returns its key (the Python API's entry point)."""
    from ..logit_import import key_extra
    from . import run_stage

    extra = key_extra(cfg, store, rehash=rehash)
    key, _ = run_stage("import-logits", cfg, {}, {}, store, force=force, extra=extra, quiet=quiet)
    return key


def compute(cfg: Any, inputs: dict, out: Any, progress: Any) -> None:
    import numpy as np

    from ..logit_import import expert_meta, file_roles, heldout_splits, load_groups, read_split
    from ..logit_storage import write_logits
    from ..readers import load_class_counts

    splits = heldout_splits()
    roles = file_roles(cfg)
    counts = load_class_counts(cfg.class_counts, "import_logits.class_counts")
    C = len(counts)
    c2g, K = load_groups(cfg, counts)
    E = len(cfg.experts)
    sizes, dtypes, test_pred, test_y = {}, {}, None, None
    for si, s in enumerate(splits):
        sp = read_split(cfg, s, counts, c2g)
        order = np.random.default_rng([cfg.seed, si]).permutation(sp.n).astype(np.int64)
        _write_rows(out, s, sp, order, c2g, cfg.chunk_rows)
        preds = write_logits(out, s, sp.sources, order, sp.dtype, cfg.chunk_rows, progress, keep_argmax=(s == "test"))
        if s == "test":
            test_pred, test_y = preds, sp.y[order]
        sizes[s], dtypes[s] = sp.n, str(sp.dtype)
        del sp
    out.array("class_counts", counts.astype(np.int64))
    out.array("class_to_group", c2g)
    out.meta.update(
        experts=expert_meta(cfg, test_pred, test_y, C),
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


def _write_rows(out: Any, s: str, sp: Any, order: Any, c2g: Any, cr: int) -> None:
    """Split ``s``'s per-row arrays in ``order`` (row i = source row order[i])."""
    import numpy as np

    out.array(f"{s}/row_order", order, chunk_rows=cr)
    out.array(f"{s}/source_index", order, chunk_rows=cr)
    out.array(f"{s}/labels", sp.y[order], chunk_rows=cr)
    out.array(f"{s}/w_lt", np.asarray(sp.w_lt, np.float64)[order], chunk_rows=cr)
    out.array(f"{s}/w_bal", np.asarray(sp.w_bal, np.float64)[order], chunk_rows=cr)
    out.array(f"{s}/group", c2g[sp.y][order], chunk_rows=cr)


def summary(meta: dict) -> str:
    return f"imported E={meta.get('num_experts')} C={meta.get('num_classes')} " + ",".join(
        e["loss"] for e in meta.get("experts", [])
    )
