"""Copying a report artifact's files out of the store (``argse report --out``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def export_to(art: Any, out_dir: Path) -> list[Path]:
    """Copy every file of a report artifact into ``out_dir`` (created); returns the copies.

    Copies out of the store are checksum-verified: every file is checked against the manifest
    before anything is written (a tampered file in the store is refused and nothing is copied),
    and each copy writes exactly the bytes that passed (temp file + rename)."""
    from ..store import check_out_dir, place_errno, place_error

    out_dir = check_out_dir(out_dir)
    names = sorted(art.manifest.get("files", {}))
    for name in names:
        art.read_bytes(name)  # IntegrityError (one line) on a tampered or missing file
    copied = []
    try:
        for name in names:
            dst = out_dir / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            art.copy_file(name, dst)
            copied.append(dst)
    except OSError as e:
        if place_errno(e) is None:
            raise
        raise place_error(e, "--out", out_dir) from None
    return copied
