"""Benchmark: anonymous memory of `import-logits` on a large memory-mapped fp16 .npy (CPU).

Writes an N x C float16 ``.npy`` (default 1,000,000 x 1,000 = 2 GB) as the tuneV logits of one
expert (the other held-out splits: 2,000 rows each), then imports it into a fresh store while a
thread samples ``RssAnon`` from /proc/self/status every 10 ms. The value is the peak RssAnon
above the baseline taken after every module is imported and the input files are written
(memory-mapped pages are file-backed and do not count). Not a timed test; prints one JSON line:

    python bench/bench_import.py [--rows 1000000] [--classes 1000] [--experts 1] [--dir DIR]
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PeakSampler, rss_anon_mib  # noqa: E402
from _common import commit as _commit  # noqa: E402

REFERENCE_MIB = 1024.0
SPLITS = ("tuneV", "val_small", "calib", "test")


def write_inputs(
    d: Path, n_big: int, C: int, E: int, n_small: int = 2000, block: int = 16384
) -> dict:
    """Float16 logits written block by block through open_memmap (no whole array in memory)."""
    rng = np.random.default_rng(0)
    counts = np.maximum(1, np.floor(500 * 100.0 ** (-np.arange(C) / (C - 1)))).astype(np.int64)
    (d / "counts.json").write_text(json.dumps(counts.tolist()))
    labels, logits = {}, {e: {} for e in range(E)}
    for s in SPLITS:
        n = n_big if s == "tuneV" else n_small
        y = rng.integers(0, C, n)
        y[:C] = np.arange(C)  # every class (hence every group) present
        np.save(d / f"y_{s}.npy", y)
        labels[s] = str(d / f"y_{s}.npy")
        for e in range(E):
            p = d / f"f{e}_{s}.npy"
            if e > 0 and s == "tuneV":  # the big file is shared by the experts
                logits[e][s] = logits[0][s]
                continue
            mm = np.lib.format.open_memmap(p, mode="w+", dtype=np.float16, shape=(n, C))
            for a in range(0, n, block):
                b = min(a + block, n)
                z = rng.standard_normal((b - a, C), dtype=np.float32) * 2
                z[np.arange(b - a), y[a:b]] += 5
                mm[a:b] = z.astype(np.float16)
            mm.flush()
            del mm
            logits[e][s] = str(p)
    return {"labels": labels, "logits": logits, "counts": str(d / "counts.json")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--experts", type=int, default=1)
    ap.add_argument("--chunk-rows", type=int, default=4096)
    ap.add_argument(
        "--dir", type=Path, default=None, help="scratch directory (default: a temp dir)"
    )
    args = ap.parse_args()

    import torch  # noqa: F401 - imported by the stage (loss specs); part of the baseline
    import zarr  # noqa: F401

    from argse_cli.config import ExpertSource, ImportLogitsConfig
    from argse_cli.stages import import_logits as imp
    from argse_cli.store import Store

    d = Path(tempfile.mkdtemp(prefix="bench_import_", dir=args.dir))
    try:
        t0 = time.perf_counter()
        inp = write_inputs(d, args.rows, args.classes, args.experts)
        t_write = time.perf_counter() - t0
        losses = ("ce", "balsoftmax", "logitadjust:2", "logitadjust:0.5")
        cfg = ImportLogitsConfig(
            experts=[
                ExpertSource(name=f"e{e}", loss=losses[e % 4], logits=inp["logits"][e])
                for e in range(args.experts)
            ],
            labels=inp["labels"],
            class_counts=inp["counts"],
            chunk_rows=args.chunk_rows,
        )
        store = Store(d / "store")
        gc.collect()
        base = rss_anon_mib()
        sampler = PeakSampler()
        sampler.start()
        t0 = time.perf_counter()
        key = imp.run(cfg, store, quiet=True)
        seconds = time.perf_counter() - t0
        peak = sampler.stop()
        art = store.open("import-logits", key)
        assert art.meta["splits"]["tuneV"] == args.rows
        value = round(peak - base, 1)
        print(
            json.dumps(
                {
                    "name": "import_logits_peak_rss_anon_above_baseline",
                    "value": value,
                    "unit": "MiB",
                    "reference": REFERENCE_MIB,
                    "ratio": round(value / REFERENCE_MIB, 4),
                    "device": "cpu",
                    "commit": _commit(),
                    "rows": args.rows,
                    "classes": args.classes,
                    "experts": args.experts,
                    "chunk_rows": args.chunk_rows,
                    "baseline_mib": round(base, 1),
                    "import_s": round(seconds, 1),
                    "write_inputs_s": round(t_write, 1),
                    "stored_dtype": art.meta["dtypes"]["tuneV"],
                }
            )
        )
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
