"""Checks shared by the bad-input tests: one-line CLI errors, store listings, a small foreign
import-logits pipeline file. This module holds no tests."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np

from argse_cli.config import HELDOUT_SPLITS

MEMOS = {".fingerprints.json", ".file_fingerprints.json"}


def listing(root: Path) -> list[tuple[str, int]]:
    """Every path under root with its size (-1 for dirs), digest memos left out."""
    if not root.exists():
        return []
    return sorted(
        (str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1)
        for p in root.rglob("*")
        if p.name not in MEMOS and not p.name.startswith(tuple(m[:-5] for m in MEMOS))
    )


def assert_one_line_error(res: subprocess.CompletedProcess, words: list[str]) -> str:
    """Exit code 2, no traceback, one `error:` line (containing `fix:` and every word); any other
    stderr line is a one-line warning. Returns the error line."""
    assert res.returncode == 2, (res.returncode, res.stdout[-1500:], res.stderr[-3000:])
    assert "Traceback" not in res.stderr + res.stdout, res.stderr[-3000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, res.stderr
    assert all(ln.startswith("warning:") for ln in lines if ln not in errors), res.stderr
    assert "fix:" in errors[0], errors[0]
    for w in words:
        assert w in errors[0], (w, errors[0])
    assert "wrote " not in res.stdout
    return errors[0]


def foreign_section(d: Path, *, classes_x1: int = 10) -> dict:
    """Write small npy logits / labels (2 experts, C = 10, 40 rows per split) and counts under ``d``;
    returns the ``import_logits`` section over them (expert x1's val_small has ``classes_x1`` columns)."""
    rng = np.random.default_rng(0)
    d.mkdir(parents=True, exist_ok=True)
    C, n = 10, 40
    (d / "counts.json").write_text(json.dumps([100, 80, 60, 40, 30, 20, 10, 8, 6, 5]))
    experts = [
        {"name": "x0", "loss": "ce", "logits": {}},
        {"name": "x1", "loss": "balsoftmax", "logits": {}},
    ]
    labels = {}
    for s in HELDOUT_SPLITS:
        y = rng.permutation(np.arange(n) % C)
        np.save(d / f"y_{s}.npy", y)
        labels[s] = str(d / f"y_{s}.npy")
        for e, ex in enumerate(experts):
            cols = classes_x1 if (e == 1 and s == "val_small") else C
            np.save(d / f"f{e}_{s}.npy", rng.standard_normal((n, cols)).astype(np.float32))
            ex["logits"][s] = str(d / f"f{e}_{s}.npy")
    return {"experts": experts, "labels": labels, "class_counts": str(d / "counts.json"),
            "group_rule": "quantile:0.5"}  # fmt: skip


def foreign_import(d: Path, *, classes_x1: int = 10, class_to_group: list[int] | None = None) -> Path:
    """An import-logits pipeline file over small npy files (C = 10); returns its path."""
    sec = foreign_section(d, classes_x1=classes_x1)
    if class_to_group is not None:
        (d / "groups.json").write_text(json.dumps(class_to_group))
        sec["class_to_group"] = str(d / "groups.json")
    (d / "import.json").write_text(json.dumps({"import_logits": sec}))
    return d / "import.json"
