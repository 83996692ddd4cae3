"""The protocol notes of a pipeline trained here (``docs/RESULTS.md``'s CIFAR-10-LT section): head / tail
counts per split, each expert's class-balanced accuracy (overall and per group, with the published
reference point for scale), the protocol paragraph and the data caveats -- read from the store.

``python -m argse_cli.report.notes --config configs/cifar10lt-cpu.yaml [--store DIR] > notes.json``
writes the JSON that :mod:`argse_cli.report.markdown` takes as ``--protocol``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

REFERENCE = (
    "Reference point for scale (not comparable: ResNet-32, 200 epochs on a GPU, the official images): "
    "Menon et al. (ICLR 2021, logit adjustment), CIFAR-10-LT IF 100 balanced accuracy: ERM 71.4%, "
    "logit-adjusted loss 77.9%."
)
CIFAR10_CAVEAT = (
    "Data: the offline CIFAR-10 copy of ../shared/data/cifar10 -- official order and labels, but 41,932 of the "
    "50,000 training and 8,983 of the 10,000 test images are a JPEG (quality ~75, ~30.5 dB PSNR) re-encoding of "
    "the official image, so accuracies can differ from published CIFAR-10 numbers; relative comparisons on this "
    "copy are sound (its README)."
)


def _experts(p: Any, split: Any) -> list[dict[str, Any]]:
    """Each expert's test accuracies as recorded by `argse train-expert`: one row per independent
    model, or per head of a shared-backbone artifact (its cRT head is its own artifact)."""
    rows = int(len(split.array("test/labels")))
    out = []
    for _cfg, _up, _st, key in p.expert_runs():
        a = p.store.open("train-expert", key)
        heads = a.meta["heads"] if a.meta.get("loss") == "shared" else [a.meta]
        for m in heads:
            out.append({"name": m["loss"], "loss": m["loss"], "rows": rows,
                        "balanced_acc": float(m["test_class_balanced_acc"]), "group_acc": list(m["test_group_acc"]),
                        "rule_acc": m.get("test_balanced_rule_acc") if m.get("tau", 1.0) != 1.0 else None,
                        "rule_group_acc": m.get("test_balanced_rule_group_acc") if m.get("tau", 1.0) != 1.0 else None,
                        "artifact": key, "shared": a.meta.get("loss") == "shared",
                        "epochs": a.config.get("decoupled_epochs") if m["loss"] == "decoupled" else a.config.get("epochs"),
                        "depth": a.config.get("depth"), "train_s": float(a.manifest.get("duration_s") or 0.0)})  # fmt: skip
    return out


def notes(config: Path, store_root: Path | None = None) -> dict[str, Any]:
    from ..pipeline import Pipeline, load_file
    from ..store import Store

    p = Pipeline(load_file(config), Store(store_root), memo=False)
    split = p.store.open("split", p.split_key())
    K = int(split.meta["num_groups"])
    counts = {}
    for s in ("tuneV", "val_small", "calib", "test"):
        g = split.array(f"{s}/group")
        counts[s] = [int((g == k).sum()) for k in range(K)]
    experts = _experts(p, split)
    cfg = split.config
    fr = cfg["fractions"]
    text = (
        f"CIFAR-10-LT (IF = {cfg['imbalance_factor']:g}, Cao et al.'s exponential profile, seed {cfg['seed']}); "
        f"groups by `{cfg['group_rule']}` ({K} groups). The experts train on the whole long-tailed subset; the "
        "official balanced test set is partitioned, class-stratified, into tuneV / val_small / calib / test "
        f"({fr['tuneV']:g} / {fr['val_small']:g} / {fr['calib']:g} / {fr['test']:g}); a disjointness check runs at "
        "every split. One temperature per expert on val_small; each gate (NLL objective) trained on tuneV with its "
        "epoch chosen by the val_small NLL; every plug-in rule -- AR-GSE's and every baseline's, by the same code "
        "and search -- re-fitted at each coverage 0.01..1.00 on validation data only (alpha's fixed point on tuneV, "
        "lambda chosen on val_small; Algorithm 2 for the worst-group methods with S1 = tuneV, S2 = val_small) and "
        "read on test at that coverage (the refit view); Chow-type rules sweep a threshold. Test labels never "
        "choose anything."
    )
    return {
        "protocol": "holdout",
        "text": text,
        "counts": counts,
        "experts": experts,
        "experts_note": "Class-balanced accuracy (mean per-class recall) of each expert's argmax on the test "
        "split, overall and per group, as recorded by `argse train-expert` (report-only: never "
        "used for a choice). For an expert trained with a logit-adjusted loss of tau != 1 the "
        "raw argmax targets a prior other than the balanced one; the 'balanced-prior rule' "
        "columns give argmax_y f_y + (tau - 1) log pi_y, the expert's own balanced prediction. "
        "Heads of one shared backbone were trained together (one artifact); cRT re-trains a "
        "head on that frozen backbone. " + REFERENCE,
        "caveats": [CIFAR10_CAVEAT],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--store", type=Path)
    a = ap.parse_args(argv)
    print(json.dumps(notes(a.config, a.store), indent=2))


if __name__ == "__main__":
    main()
