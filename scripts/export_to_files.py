"""Write an `export-logits` artifact back out as plain files, plus an import pipeline file.

    python scripts/export_to_files.py EXPORT_KEY OUT_DIR [--store artifacts]

OUT_DIR receives, for each held-out split s and expert e, ``logits/<expert>_<s>.npy`` (fp16 [N, C],
rows in the split's own order, i.e. the export's row permutation undone), ``labels_<s>.npy``,
``class_counts.json``, ``class_to_group.json`` and ``pipeline.yaml`` whose ``import_logits``
section imports them with the export's seed and chunking. `make demo` uses it to run
`argse import-logits` (and `argse apply`) on the demo's own experts: what a user with logits from
elsewhere does, checked against logits whose provenance is known.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from argse_cli.config import HELDOUT_SPLITS  # noqa: E402
from argse_cli.store import Store  # noqa: E402


def write_files(exp: Any, out_dir: Path) -> Path:
    """Write the export artifact ``exp`` under ``out_dir`` (see the module docstring); returns the
    path of the import pipeline file."""
    out = Path(out_dir).resolve()
    (out / "logits").mkdir(parents=True, exist_ok=True)
    infos = exp.meta["experts"]
    experts = [{"name": f"e{i}_{e['loss'].replace(':', '')}", "loss": e["loss"], "logits": {}}
               for i, e in enumerate(infos)]  # fmt: skip
    labels = {}
    for s in HELDOUT_SPLITS:
        ro = exp.array(f"{s}/row_order")  # stored row i is source row ro[i]
        y = np.empty_like(exp.array(f"{s}/labels"))
        y[ro] = exp.array(f"{s}/labels")
        labels[s] = str(out / f"labels_{s}.npy")
        np.save(labels[s], y)
        L = exp.array(f"{s}/logits")
        for e, ex in enumerate(experts):
            src = np.empty_like(L[:, e])
            src[ro] = L[:, e]
            ex["logits"][s] = str(out / "logits" / f"{ex['name']}_{s}.npy")
            np.save(ex["logits"][s], src)
    (out / "class_counts.json").write_text(json.dumps(exp.array("class_counts").tolist()))
    (out / "class_to_group.json").write_text(json.dumps(exp.array("class_to_group").tolist()))
    pipeline = {
        "import_logits": {
            "experts": experts,
            "labels": labels,
            "class_counts": str(out / "class_counts.json"),
            "class_to_group": str(out / "class_to_group.json"),
            "chunk_rows": int(exp.meta["chunk_rows"]),
            "seed": int(exp.config.get("seed", 0)),
        },
        "calibrate": {},
    }
    (out / "pipeline.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    return out / "pipeline.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export_key")
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--store", default=os.environ.get("ARGSE_STORE", "artifacts"))
    a = ap.parse_args()
    print(write_files(Store(a.store).open("export-logits", a.export_key), a.out_dir))


if __name__ == "__main__":
    main()
