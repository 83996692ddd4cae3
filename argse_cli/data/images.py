"""The images behind a split artifact: the CIFAR arrays it was made from (fingerprint-checked) and
one split's (x, y) read through its stored indices."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import ArgseError
from .cifar import data_fingerprint, load_cifar


def load_images(split_art: Any) -> Any:
    """The CIFAR arrays a split was made from; refuses data whose fingerprint differs.

    Looks in the root the split was made from first, then in ``ARGSE_DATA`` (data that moved);
    either must hold exactly the files the split was made from (same fingerprint)."""
    meta = split_art.meta
    want = split_art.manifest["extra"]["data"]
    roots = [Path(meta["data_root"])]
    if os.environ.get("ARGSE_DATA"):
        roots.append(Path(os.environ["ARGSE_DATA"]))
    for r in roots:
        try:
            if data_fingerprint(meta["dataset"], r) == want:
                return load_cifar(meta["dataset"], r)
        except ArgseError:
            continue
    raise ArgseError(
        "data_root",
        f"no files matching split {split_art.key[:12]} under {', '.join(map(str, roots))}",
        "point ARGSE_DATA / --data-root at the original files or re-run `argse split`",
    )


def split_arrays(split_art: Any, name: str, images: Any) -> tuple[Any, Any]:
    """(x uint8 [n,32,32,3], y) of one split, read through the split artifact's indices."""
    src = split_art.meta["sources"][name]
    idx = split_art.array(f"{name}/indices")
    x = (images.x_train if src == "train" else images.x_test)[idx]
    return x, split_art.array(f"{name}/labels")
