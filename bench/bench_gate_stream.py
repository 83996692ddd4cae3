"""Benchmark: gate training streamed from a Zarr export -- samples/s and peak memory vs N (CPU).

For each N a synthetic export-logits artifact is written (tuneV: N rows, val_small: --n-val rows,
fp16 logits [N, E, C] in row chunks of --chunk-rows; C = 1000 classes, E = 4 experts: an
ImageNet-LT-sized label space; a long-tailed prior with imbalance factor 100 and K = 2 groups,
head = the classes holding the first half of the training mass) plus a calibration artifact
(temperature, shift). Then, in a FRESH process per N,
``argse_cli.core.gated.fit_gate`` runs --epochs epochs while a thread samples ``RssAnon``
(/proc/self/status, every 5 ms). Baseline = RssAnon after every module is imported and both
artifacts are opened (file-backed page cache is not anonymous memory and does not count).

What is timed is the train-gate stage's work: ``fit_gate`` (one pass over tuneV caching what the
NLL objective needs -- gate features and p_e(y|x) per row --, then the epochs over that cache) and
the rule's fit (one more streamed pass for the mixture's group statistics, then the core's refit
curves on at most 20,000 rows, both views).

Lines (one JSON line each): ``gate_stream_samples_per_s_N`` (epochs_run * N / seconds of the whole
stage work above) and
``gate_stream_peak_rss_anon_above_baseline_N`` (MiB); the extra fields hold ZarrSource's
``max_resident_rows`` (instrumented) and its bound buffer_chunks * chunk_rows. A final
``gate_stream_peak_ratio`` line compares the two largest N whose buffer was full (resident rows
>= 90% of the bound; acceptance: within 20%).

Floor (``--floor``, on by default): in another fresh process on the same store, one pass that
only does the work no implementation of the streamed gate epoch can skip -- read every tuneV
chunk (logits, labels, view weights; checksum-verified by the store) in the stage's chunk order
and buffer size, decode them into one buffer and compute the experts' calibrated softmax with
``core.expert_data.apply_calibration`` (:func:`floor_pass`, the reading of
``core.expert_data.ZarrSource.iter_epoch`` without the shuffle and the batches). Lines
``gate_stream_floor_s_N`` (seconds of that pass) and three ratios to it (:func:`epoch_times`),
reference 3 (the issue's goal: ratio <= 3), ``pass`` when within it:
``gate_stream_epoch_over_floor_N`` (the whole stage work / epochs run: the cache pass and the one
rule fit amortised over --epochs), ``gate_stream_one_epoch_run_over_floor_N`` (a 1-epoch run:
nothing amortised) and ``gate_stream_steady_epoch_over_floor_N`` (one more epoch on the cache).

Every N is measured twice (``--malloc both``): with glibc as shipped, and with
MALLOC_MMAP_THRESHOLD_ fixed at 64 KiB (suffix ``_mmap64k``). The second is a diagnostic: with
the dynamic threshold (raised up to 32 MiB after large frees), the per-batch [B, E, C] and
[B, C] float32 tensors (4 MiB, 1 MiB here) come from the heap, and the small per-batch tensors
the rule refit keeps (``gate_train.rule_row_stats``) are carved out of their freed holes, so the
heap -- RssAnon -- grows by about one batch tensor per batch although live data does not. A
fixed threshold below those sizes serves them with mmap and shows the live-memory behaviour.

    python bench/bench_gate_stream.py [--n 10000 100000 1000000] [--classes 1000] [--experts 4]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PeakSampler, commit, rss_anon_mib  # noqa: E402,F401

LOSSES = ("ce", "balsoftmax", "logitadjust:2", "logitadjust:0.5")
TAUS = (0.0, 1.0, 2.0, 0.5)


def class_prior(C: int, imbalance: float = 100.0):
    """pi_c proportional to imbalance^(-c / (C - 1)) (class 0 the most frequent)."""
    import numpy as np

    r = imbalance ** (-np.arange(C) / max(C - 1, 1))
    return r / r.sum()


def head_tail_groups(pi):
    """K = 2: head = the most frequent classes holding the first half of the mass, tail = rest."""
    import numpy as np

    order = np.argsort(-pi, kind="stable")
    head = order[: int(np.searchsorted(np.cumsum(pi[order]), 0.5)) + 1]
    g = np.ones(len(pi), dtype=np.int64)
    g[head] = 0
    return g


def write_synthetic_store(
    root: Path, n: int, C: int = 1000, E: int = 4, chunk_rows: int = 4096, n_val: int = 4000,
    seed: int = 0,
) -> tuple[str, str]:  # fmt: skip
    """A synthetic export-logits artifact (tuneV: n rows, val_small: n_val rows) and a calibrate
    artifact in ``Store(root)``; logits are written chunk by chunk (never [n, E, C] in memory).
    Expert e's logit for class c: 2 z + 4 [c = y] - tau_e log pi_c, z ~ N(0, 1) (an expert
    trained with logit adjustment tau_e is shifted by -tau_e log pi). Returns (export key,
    calibrate key)."""
    import numpy as np

    from argse_cli.store import Store, compute_key

    pi = class_prior(C)
    log_pi = np.log(pi).astype(np.float32)
    c2g = head_tail_groups(pi)
    counts = np.maximum(1, np.round(pi * 500 / pi[0])).astype(np.int64)  # n_max 500, IF 100
    taus = np.array([TAUS[e % 4] for e in range(E)], np.float32)
    store = Store(root)
    spec = {"synthetic": True, "n": n, "C": C, "E": E, "chunk_rows": chunk_rows, "n_val": n_val,
            "seed": seed}  # fmt: skip
    ekey = compute_key("export-logits", 1, spec)
    rng = np.random.default_rng(seed)
    with store.writer("export-logits", ekey, config=spec, upstream={}, upstream_stages={},
                      version=1) as out:  # fmt: skip
        for s, rows in (("tuneV", n), ("val_small", n_val)):
            y = rng.choice(C, size=rows, p=pi).astype(np.int64)
            w_lt = np.ones(rows)
            w_bal = 1.0 / (C * pi[y])
            for name, arr in (
                ("labels", y), ("w_lt", w_lt), ("w_bal", w_bal), ("group", c2g[y]),
                ("row_order", np.arange(rows, dtype=np.int64)),
                ("source_index", np.arange(rows, dtype=np.int64)),
            ):  # fmt: skip
                out.array(f"{s}/{name}", arr, chunk_rows=chunk_rows)
            rw = out.rows(f"{s}/logits", (rows, E, C), np.float16, chunk_rows)
            for a in range(0, rows, chunk_rows):
                b = min(a + chunk_rows, rows)
                z = rng.standard_normal((b - a, E, C), dtype=np.float32)
                z *= 2.0
                z[np.arange(b - a), :, y[a:b]] += 4.0
                z -= taus[None, :, None] * log_pi[None, None, :]
                rw.append(z.astype(np.float16))
                del z
        out.array("class_counts", counts)
        out.array("class_to_group", c2g)
        out.meta.update(
            experts=[{"key": f"synthetic{e}", "loss": LOSSES[e % 4], "tau": float(taus[e]),
                      "depth": 0, "test_class_balanced_acc": None} for e in range(E)],
            splits={"tuneV": n, "val_small": n_val}, num_classes=C, num_experts=E, num_groups=2,
            chunk_rows=chunk_rows, layout="s/logits float16 [N, E, C]", synthetic=True,
        )  # fmt: skip
    ccfg = {"synthetic": True, "T": 1.3}
    ckey = compute_key("calibrate", 1, ccfg, {"export": ekey})
    with store.writer("calibrate", ckey, config=ccfg, upstream={"export": ekey},
                      upstream_stages={"export": "export-logits"}, version=1) as out:  # fmt: skip
        out.array("temperature", np.full(E, 1.3, np.float32))
        out.array("shift", taus)
        out.meta.update(temperatures=[1.3] * E, view="lt", posterior="train")
    return ekey, ckey


def warm_imports() -> None:
    """Import everything fit_gate imports lazily, so the baseline is really post-import:
    torch.optim.Adam's first construction imports torch._dynamo (~75 MB of module objects)."""
    import numpy.ma  # noqa: F401
    import torch
    import zarr  # noqa: F401

    import argse_cli.core.expert_data  # noqa: F401
    import argse_cli.core.gate_fit  # noqa: F401
    import argse_cli.core.gated  # noqa: F401
    import argse_cli.core.plugin_fit  # noqa: F401
    import argse_cli.evaluation  # noqa: F401

    torch.optim.Adam([torch.zeros(1, requires_grad=True)])


def measure(root: Path, ekey: str, ckey: str, epochs: int, buffer_chunks: int,
            batch_size: int, threads: int) -> dict:  # fmt: skip
    """Run the train-gate stage's work in THIS process (call it in a fresh one): the gate's training
    (``fit_gate``: one pass over tuneV that caches what the NLL needs, then the epochs) and the
    rule's fit (one more streamed pass for the mixture's group statistics, then the core's curves on
    at most 20,000 rows, both views). RssAnon peak above the baseline."""
    import torch

    import argse_cli.core.expert_data as ed
    import argse_cli.core.gated as gated
    from argse_cli.config import TrainGateConfig
    from argse_cli.evaluation import fit_curves
    from argse_cli.store import Store

    if threads:
        torch.set_num_threads(threads)
    sources: list = []

    class Recording(ed.ZarrSource):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            sources.append(self)

    ed.ZarrSource = Recording
    import argse_cli.core.gate_fit as gf

    cache_s: list[float] = []

    class TimedCache(gf.NLLCache):  # the one pass over tuneV that the epochs then train on
        def __init__(self, *a, **k):
            t = time.perf_counter()
            super().__init__(*a, **k)
            cache_s.append(time.perf_counter() - t)

    gf.NLLCache = TimedCache
    store = Store(root)
    exp, cal = store.open("export-logits", ekey), store.open("calibrate", ckey)
    cfg = TrainGateConfig(epochs=epochs, patience=epochs, buffer_chunks=buffer_chunks,
                          batch_size=batch_size).resolved()  # fmt: skip
    warm_imports()
    gc.collect()
    base = rss_anon_mib()
    sampler = PeakSampler()
    sampler.start()
    t0 = time.perf_counter()
    res = gated.fit_gate(cfg, exp, cal)
    t1 = time.perf_counter()
    splits = {s: gated.gate_views(res.model, exp, cal, s, None) for s in ("tuneV", "val_small")}
    fit_curves(splits)
    t2 = time.perf_counter()
    peak = sampler.stop()
    n = int(exp.meta["splits"]["tuneV"])
    epochs_run = len(res.history["epoch"])
    return {
        "n": n, "seconds": t2 - t0, "train_s": t1 - t0, "rule_fit_s": t2 - t1, "epochs_run": epochs_run,
        "cache_s": sum(cache_s), "epochs_s": t1 - t0 - sum(cache_s),
        "samples_per_s": epochs_run * n / (t2 - t0),
        "baseline_mib": base, "peak_mib": peak, "peak_above_mib": peak - base,
        "max_resident_rows": int(max(s.max_resident_rows for s in sources)),
        "resident_bound_rows": int(buffer_chunks * exp.meta["chunk_rows"]),
        "chunk_rows": int(exp.meta["chunk_rows"]), "buffer_chunks": buffer_chunks,
        "threads": torch.get_num_threads(),
    }  # fmt: skip


def epoch_times(r: dict) -> dict:
    """Seconds per gate epoch, three ways, from one measured run of ``epochs_run`` epochs:
    ``gate_epoch_s`` = the whole stage work / epochs (the one-time work -- the NLL cache pass and
    the rule fit -- amortised over the run's epochs); ``steady_epoch_s`` = one epoch on the cache
    (its training pass and the val_small criterion); ``one_epoch_run_s`` = one-time work + one
    steady epoch (a 1-epoch run: nothing amortised)."""
    steady = r["epochs_s"] / r["epochs_run"]
    return {"gate_epoch_s": r["seconds"] / r["epochs_run"], "steady_epoch_s": steady,
            "one_epoch_run_s": r["cache_s"] + r["rule_fit_s"] + steady, "cache_s": r["cache_s"],
            "rule_fit_s": r["rule_fit_s"]}  # fmt: skip


def floor_pass(root: Path, ekey: str, ckey: str, buffer_chunks: int, threads: int,
               view: str = "lt", seed: int = 0, epoch: int = 0) -> dict:  # fmt: skip
    """The unskippable part of one streamed gate epoch, timed (run it in a fresh process)."""
    import numpy as np
    import torch

    from argse_cli.core.expert_data import ZarrSource, apply_calibration
    from argse_cli.store import Store

    if threads:
        torch.set_num_threads(threads)
    store = Store(root)
    exp, cal = store.open("export-logits", ekey), store.open("calibrate", ckey)
    wname = "w_lt" if view == "lt" else "w_bal"
    src = ZarrSource(exp, cal, "tuneV", wname, 256, seed, buffer_chunks)
    warm_imports()
    info = exp.manifest["arrays"]["tuneV/logits"]
    cr, dtype, n = int(info["chunk_rows"]), np.dtype(info["dtype"]), src.n_rows
    t0 = time.perf_counter()
    order = np.random.default_rng([seed, epoch]).permutation(src.n_chunks)  # as iter_epoch
    rows, check = 0, 0.0
    for b in range(0, len(order), buffer_chunks):
        sel = order[b : b + buffer_chunks]
        f = np.empty((sum(min(cr, n - int(i) * cr) for i in sel), *info["shape"][1:]), dtype)
        at = 0
        for _, blk in src._chunks("logits", sel):
            f[at : at + len(blk)] = blk
            at += len(blk)
        post = apply_calibration(f, src.log_pi, src.shift, src.T)
        y = np.concatenate([blk for _, blk in src._chunks("labels", sel)])
        w = np.concatenate([blk for _, blk in src._chunks(wname, sel)])
        rows += len(y)
        check += float(post[:, :, 0].sum()) + float(w[:1].sum())  # keep the results live
        del f, post
    dt = time.perf_counter() - t0
    return {"n": n, "rows": rows, "floor_s": dt, "floor_rows_per_s": rows / dt, "check": check,
            "threads": torch.get_num_threads()}  # fmt: skip


def profile_worker(root: Path, ekey: str, ckey: str, epochs: int, buffer_chunks: int,
                   batch_size: int, threads: int, out: Path) -> None:  # fmt: skip
    """fit_gate under cProfile; the stats to ``out`` (read with pstats)."""
    import cProfile

    prof = cProfile.Profile()
    prof.enable()
    r = measure(root, ekey, ckey, epochs, buffer_chunks, batch_size, threads)
    prof.disable()
    prof.dump_stats(str(out))
    print(json.dumps(r))


MODES = {
    "": {},  # glibc as shipped (dynamic mmap threshold)
    "_mmap64k": {"MALLOC_MMAP_THRESHOLD_": str(2**16)},  # fixed 64 KiB threshold (diagnostic)
}


def _line(name: str, value: float, unit: str, reference, extra: dict) -> str:
    ratio = round(value / reference, 4) if reference else None
    return json.dumps({"name": name, "value": round(value, 2), "unit": unit, "reference": reference,
                       "ratio": ratio, "device": "cpu", "commit": commit(), **extra})  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--chunk-rows", type=int, default=4096)
    ap.add_argument("--buffer-chunks", type=int, default=4)
    ap.add_argument("--n-val", type=int, default=4000)
    ap.add_argument("--epochs", type=int, default=10,
                    help="gate epochs per run (all run: patience = epochs); the default recipe trains up to 100")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument(
        "--malloc",
        choices=("default", "both"),
        default="both",
        help="also measure with a fixed 64 KiB glibc mmap threshold (diagnostic)",
    )
    ap.add_argument("--dir", type=Path, default=None, help="scratch directory (default: temp)")
    ap.add_argument("--no-floor", dest="floor", action="store_false",
                    help="skip the floor pass and the epoch / floor ratio")  # fmt: skip
    ap.add_argument("--profile", type=Path, default=None, metavar="DIR",
                    help="also write cProfile stats of fit_gate per N to DIR/gate_N.prof")  # fmt: skip
    ap.add_argument("--worker", nargs=3, metavar=("ROOT", "EXPORT_KEY", "CALIB_KEY"),
                    help=argparse.SUPPRESS)  # fmt: skip
    ap.add_argument("--worker-kind", choices=("fit", "floor", "profile"), default="fit",
                    help=argparse.SUPPRESS)  # fmt: skip
    ap.add_argument("--profile-out", type=Path, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        root, ekey, ckey = Path(a.worker[0]), a.worker[1], a.worker[2]
        if a.worker_kind == "floor":
            r = floor_pass(root, ekey, ckey, a.buffer_chunks, a.threads)
        elif a.worker_kind == "profile":
            profile_worker(root, ekey, ckey, a.epochs, a.buffer_chunks, a.batch_size, a.threads,
                           a.profile_out)  # fmt: skip
            return
        else:
            r = measure(root, ekey, ckey, a.epochs, a.buffer_chunks, a.batch_size, a.threads)
        print(json.dumps(r))
        return

    modes = MODES if a.malloc == "both" else {"": {}}
    results: dict[str, list] = {m: [] for m in modes}
    for n in a.n:
        d = Path(tempfile.mkdtemp(prefix="bench_gate_", dir=a.dir))
        try:
            t0 = time.perf_counter()
            ekey, ckey = write_synthetic_store(d / "store", n, a.classes, a.experts,
                                               a.chunk_rows, a.n_val)  # fmt: skip
            t_write = time.perf_counter() - t0
            for suffix, env in modes.items():
                cmd = [sys.executable, __file__, "--worker", str(d / "store"), ekey, ckey,
                       "--epochs", str(a.epochs), "--buffer-chunks", str(a.buffer_chunks),
                       "--batch-size", str(a.batch_size), "--threads", str(a.threads)]  # fmt: skip
                p = subprocess.run(cmd, capture_output=True, text=True, check=False,
                                   env={**os.environ, **env})  # fmt: skip
                if p.returncode != 0:
                    sys.stderr.write(p.stderr[-4000:])
                    raise SystemExit(f"gate measurement for N={n} failed (rc {p.returncode})")
                r = json.loads(p.stdout.strip().splitlines()[-1])
                results[suffix].append(r)
                extra = {"rows": n, "classes": a.classes, "experts": a.experts,
                         "epochs": r["epochs_run"], "chunk_rows": a.chunk_rows,
                         "buffer_chunks": a.buffer_chunks,
                         "max_resident_rows": r["max_resident_rows"],
                         "resident_bound_rows": r["resident_bound_rows"],
                         "baseline_mib": round(r["baseline_mib"], 1),
                         "fit_s": round(r["seconds"], 1), "train_s": round(r["train_s"], 1),
                         "rule_fit_s": round(r["rule_fit_s"], 1), "write_store_s": round(t_write, 1),
                         "threads": r["threads"], "malloc": env or "glibc default"}  # fmt: skip
                print(_line(f"gate_stream_samples_per_s_{n}{suffix}", r["samples_per_s"],
                            "rows/s", None, extra), flush=True)  # fmt: skip
                print(_line(f"gate_stream_peak_rss_anon_above_baseline_{n}{suffix}",
                            r["peak_above_mib"], "MiB", None, extra), flush=True)  # fmt: skip
                if suffix == "":
                    run = r  # the glibc-default run is the one the ratios below describe
            worker = [sys.executable, __file__, "--worker", str(d / "store"), ekey, ckey,
                      "--epochs", str(a.epochs), "--buffer-chunks", str(a.buffer_chunks),
                      "--batch-size", str(a.batch_size), "--threads", str(a.threads)]  # fmt: skip
            if a.floor:
                p = subprocess.run([*worker, "--worker-kind", "floor"], capture_output=True,
                                   text=True, check=False)  # fmt: skip
                if p.returncode != 0:
                    sys.stderr.write(p.stderr[-4000:])
                    raise SystemExit(f"floor measurement for N={n} failed (rc {p.returncode})")
                fl = json.loads(p.stdout.strip().splitlines()[-1])
                t = epoch_times(run)
                fx = {"rows": n, "classes": a.classes, "experts": a.experts,
                      "chunk_rows": a.chunk_rows, "buffer_chunks": a.buffer_chunks,
                      **{k: round(v, 2) for k, v in t.items()}, "epochs": run["epochs_run"],
                      "floor_s": round(fl["floor_s"], 2), "floor_rows_per_s": round(fl["floor_rows_per_s"], 1),
                      "tuneV_reads": "2 in all (the NLL cache; the rule's statistics, calibrating only its rows)",
                      "threads": fl["threads"]}  # fmt: skip
                print(_line(f"gate_stream_floor_s_{n}", fl["floor_s"], "s", None, fx), flush=True)
                for name, key in (("epoch_over_floor", "gate_epoch_s"), ("one_epoch_run_over_floor", "one_epoch_run_s"),
                                  ("steady_epoch_over_floor", "steady_epoch_s")):  # fmt: skip
                    ratio = t[key] / fl["floor_s"]
                    print(json.dumps({
                        "name": f"gate_stream_{name}_{n}", "value": round(ratio, 3),
                        "unit": "x", "reference": 3.0, "ratio": round(ratio / 3.0, 4),
                        "device": "cpu", "commit": commit(), "pass": bool(ratio <= 3.0), **fx,
                    }), flush=True)  # fmt: skip
            if a.profile is not None:
                a.profile.mkdir(parents=True, exist_ok=True)
                out = a.profile / f"gate_{n}.prof"
                p = subprocess.run([*worker, "--worker-kind", "profile", "--profile-out", str(out)],
                                   capture_output=True, text=True, check=False)  # fmt: skip
                if p.returncode != 0:
                    sys.stderr.write(p.stderr[-4000:])
                    raise SystemExit(f"profile for N={n} failed (rc {p.returncode})")
                print(f"[gate] N={n}: cProfile stats of fit_gate in {out}", file=sys.stderr)
        finally:
            shutil.rmtree(d, ignore_errors=True)
    for suffix, env in modes.items():
        full = [
            r for r in results[suffix] if r["max_resident_rows"] >= 0.9 * r["resident_bound_rows"]
        ]
        if len(full) < 2:
            continue
        lo, hi = sorted(full, key=lambda r: r["n"])[-2:]
        ratio = hi["peak_above_mib"] / lo["peak_above_mib"]
        print(json.dumps({
            "name": f"gate_stream_peak_ratio_{hi['n']}_vs_{lo['n']}{suffix}",
            "value": round(ratio, 4), "unit": "x", "reference": 1.2, "ratio": round(ratio / 1.2, 4),
            "device": "cpu", "commit": commit(), "pass": bool(ratio <= 1.2),
            "malloc": env or "glibc default",
            "peak_above_mib": {str(lo["n"]): round(lo["peak_above_mib"], 1),
                               str(hi["n"]): round(hi["peak_above_mib"], 1)},
        }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
