"""Code digests per stage: a stage's code may not change without a ``VERSION`` bump.

``stage_digests.json`` records, per stage, the VERSION and an xxh3 digest of the files listed in
the stage module's ``CODE`` (its module and the math it calls). ``make digests`` refreshes entries
whose VERSION was bumped and refuses to bless changed code under an unchanged VERSION, so a fixed
bug never keeps serving artifacts cached under the old key.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import xxhash

PKG = Path(__file__).resolve().parent
DIGESTS = PKG / "stage_digests.json"


def code_files(stage: str) -> list[Path]:
    from .stages import get_stage

    mod = get_stage(stage)
    files: set[Path] = set()
    for pattern in mod.CODE:
        files.update(p for p in PKG.glob(pattern) if p.is_file())
    return sorted(files)


def stage_digest(stage: str) -> str:
    h = xxhash.xxh3_128()
    for p in code_files(stage):
        h.update(str(p.relative_to(PKG)).encode() + b"\0")
        h.update(p.read_bytes().replace(b"\r\n", b"\n") + b"\0")
    return h.hexdigest()


def recorded() -> dict:
    return json.loads(DIGESTS.read_text()) if DIGESTS.exists() else {}


def problems() -> list[str]:
    from .stages import STAGE_MODULES, get_stage

    rec = recorded()
    out = []
    for stage in STAGE_MODULES:
        try:
            version = get_stage(stage).VERSION
        except ModuleNotFoundError:
            continue
        d = stage_digest(stage)
        r = rec.get(stage)
        if r is None:
            out.append(f"{stage}: no recorded digest; run `make digests`")
        elif r["digest"] != d and r["version"] == version:
            out.append(f"{stage}: code changed but VERSION is still {version}; bump VERSION in the stage module, then `make digests`")
        elif r["digest"] != d or r["version"] != version:
            out.append(f"{stage}: VERSION {version} not recorded; run `make digests`")
    return out


def update(force: bool = False) -> list[str]:
    from .stages import STAGE_MODULES, get_stage

    rec = recorded()
    refused = []
    for stage in STAGE_MODULES:
        try:
            version = get_stage(stage).VERSION
        except ModuleNotFoundError:
            continue
        d = stage_digest(stage)
        r = rec.get(stage)
        if r is not None and r["digest"] != d and r["version"] == version and not force:
            refused.append(stage)
            continue
        rec[stage] = {"version": version, "digest": d}
    DIGESTS.write_text(json.dumps(rec, indent=2, sort_keys=True) + "\n")
    return refused


if __name__ == "__main__":
    refused = update(force="--force" in sys.argv)
    if refused:
        print(f"refused (code changed, VERSION unchanged): {refused}; bump VERSION first")
        sys.exit(1)
    print(f"wrote {DIGESTS}")
