"""Bench: the refit curves of every plug-in method on CIFAR-100-LT (the one core, 100 coverages x 2 views).

On the published expert logits (../shared/data/cifar100lt-logits), per protocol unit (the holdout
split, or one cross-fitting fold): temperatures fitted on val_small, then the refit curves of the
CS-plug-in on each of the 3 experts (SB-PI is one of them), U-PI (uniform mixture), Plug-in[Worst]
(Algorithm 2, T rounds) and AR-GSE balanced / worst on a stand-in mixture (fixed, expert-dependent
weights: the fits cost the same for any mixture). Reports the wall time and the CPU time of the
whole set and per method kind, with the machine's load average.

    python bench/bench_refit.py [--protocol holdout|fold0] [--T 10] [--out FILE.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
NPZ = ROOT.parent / "shared" / "data" / "cifar100lt-logits" / "cifar100lt_real_logits.npz"


def _load(protocol: str) -> tuple[dict, dict, np.ndarray]:
    """{split: {"post" [N, E, C], "y", "w_lt", "w_bal"}} (calibrated on val_small), class_to_group."""
    from argse_cli.data.c100lt import prepare
    from argse_cli.data.splits import split_weights
    from argse_cli.experts.calibration import fit_temperature
    from argse_cli.experts.losses import posterior_tau
    from argse_cli.experts.posterior import train_prior_posterior

    tmp = Path(tempfile.mkdtemp(prefix="bench_refit_"))
    paths = prepare(NPZ, tmp, protocol="holdout" if protocol == "holdout" else "crossfit")
    d = paths[0].parent if protocol in ("holdout", "fold0") else tmp / protocol
    counts = np.asarray(json.loads((d / "class_counts.json").read_text()))
    c2g = np.asarray(json.loads((d / "class_to_group.json").read_text()))
    log_pi = np.log(counts / counts.sum())
    import yaml

    pipe = yaml.safe_load((d / "pipeline.yaml").read_text())["import_logits"]
    data = {}
    for s in ("tuneV", "val_small", "test"):
        y = np.load(d / f"labels_{s}.npy")
        w_lt, w_bal = split_weights(y, counts)
        data[s] = {"y": y, "w_lt": w_lt, "w_bal": w_bal, "logits": [np.load(e["logits"][s]).astype(np.float32)
                                                                     for e in pipe["experts"]]}
    taus = [posterior_tau(e["loss"]) for e in pipe["experts"]]
    Ts = [fit_temperature(data["val_small"]["logits"][e], data["val_small"]["y"], log_pi, taus[e],
                          w=data["val_small"]["w_lt"]) for e in range(len(taus))]
    for s in data:
        data[s]["post"] = np.stack([train_prior_posterior(f, log_pi, taus[e], Ts[e])
                                    for e, f in enumerate(data[s].pop("logits"))], axis=1)
    return data, {"rows": {s: int(len(data[s]["y"])) for s in data}}, c2g


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--protocol", default="holdout", help="holdout | fold0 .. fold4")
    ap.add_argument("--T", type=int, default=10)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    if not NPZ.exists():
        print(json.dumps({"bench": "refit_curves_c100lt", "skipped": f"{NPZ} not found"}))
        return
    from argse_cli.core.gate_fit import GateModel
    from argse_cli.evaluation import fit_curves, views_of_eta

    data, info, c2g = _load(a.protocol)
    E = data["tuneV"]["post"].shape[1]
    mix_w = np.linspace(1.0, 2.0, E) / np.linspace(1.0, 2.0, E).sum()
    etas = {f"CS-plug-in (expert {e})": {s: data[s]["post"][:, e] for s in data} for e in range(E)}
    etas["U-PI"] = {s: GateModel(None, E).mixture(data[s]["post"]) for s in data}
    etas["AR-GSE (stand-in mixture)"] = {s: np.einsum("e,nec->nc", mix_w, data[s]["post"]).astype(np.float32)
                                         for s in data}
    jobs = [(n, False) for n in etas] + [("Plug-in[Worst]", True), ("AR-GSE (worst, stand-in mixture)", True)]
    src = {"Plug-in[Worst]": "U-PI", "AR-GSE (worst, stand-in mixture)": "AR-GSE (stand-in mixture)"}
    load0 = os.getloadavg()
    t0, c0 = time.perf_counter(), time.process_time()
    per = {}
    for name, worst in jobs:
        eta = etas[src.get(name, name)]
        t, c = time.perf_counter(), time.process_time()
        splits = {s: views_of_eta(eta[s], data[s], c2g) for s in ("tuneV", "val_small")}
        fit_curves(splits, worst=worst, T=a.T)
        per[name] = {"wall_s": round(time.perf_counter() - t, 2), "cpu_s": round(time.process_time() - c, 2)}
    line = {
        "bench": "refit_curves_c100lt", "protocol": a.protocol, **info, "methods": len(jobs), "T": a.T,
        "coverages": 100, "views": 2, "wall_s": round(time.perf_counter() - t0, 2),
        "cpu_s": round(time.process_time() - c0, 2), "per_method": per, "cores": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load0], "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }  # fmt: skip
    print(json.dumps(line))
    if a.out:
        with open(a.out, "a") as fh:
            fh.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
