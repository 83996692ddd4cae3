"""Code digests per stage: a stage's code may not change without a ``VERSION`` bump.

A stage's code is the **import closure** of its module inside the package, read statically with
``ast`` (:func:`code_files`): every ``argse_cli`` module named by an import statement anywhere in the
stage module (lazy imports inside functions included), then every module those name, and so on.
``stage_digests.json`` records, per stage, the VERSION and an xxh3 digest of those files. ``make
digests`` refreshes entries whose VERSION was bumped and refuses to bless changed code under an
unchanged VERSION, so a fixed bug never keeps serving artifacts cached under the old key.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import xxhash

PKG = Path(__file__).resolve().parent
DIGESTS = PKG / "stage_digests.json"
_NAME = PKG.name  # "argse_cli"


def _module_file(parts: list[str]) -> Path | None:
    """The file of package module ``argse_cli.<parts>`` (module.py or package/__init__.py)."""
    base = PKG.joinpath(*parts)
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _imports(path: Path) -> set[Path]:
    """Package files named by the import statements of ``path``."""
    rel = path.relative_to(PKG)
    pkg_parts = list(rel.parent.parts)  # the package the file lives in
    out: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[list[str]] = []
        if isinstance(node, ast.Import):
            targets = [a.name.split(".")[1:] for a in node.names if a.name.split(".")[0] == _NAME]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[: len(pkg_parts) - (node.level - 1)] if node.level > 1 else pkg_parts
                if node.level - 1 > len(pkg_parts):
                    continue
            elif (node.module or "").split(".")[0] == _NAME:
                base = []
            else:
                continue
            mod = base + ([] if node.module is None else node.module.split(".")[0 if node.level else 1:])
            targets = [mod] + [mod + [a.name] for a in node.names]  # `from pkg import submodule`
        for t in targets:
            f = _module_file(t) if t else None
            if f is not None:
                out.add(f)
    return out


def closure(start: Path) -> list[Path]:
    """``start`` and every package file reachable through import statements."""
    seen: set[Path] = set()
    todo = [start]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        todo.extend(_imports(p) - seen)
    return sorted(seen)


def code_files(stage: str) -> list[Path]:
    from .stages import STAGE_MODULES

    return closure(PKG / "stages" / f"{STAGE_MODULES[stage]}.py")


def stage_digest(stage: str) -> str:
    h = xxhash.xxh3_128()
    for p in code_files(stage):
        h.update(str(p.relative_to(PKG)).encode() + b"\0")
        h.update(p.read_bytes().replace(b"\r\n", b"\n") + b"\0")
    return h.hexdigest()


def recorded() -> dict:
    return json.loads(DIGESTS.read_text()) if DIGESTS.exists() else {}


def _version(stage: str) -> int | None:
    from .stages import get_stage

    try:
        return get_stage(stage).VERSION
    except ModuleNotFoundError:
        return None


def problems() -> list[str]:
    from .stages import STAGE_MODULES

    rec = recorded()
    out = []
    for stage in STAGE_MODULES:
        version = _version(stage)
        if version is None:
            continue
        d, r = stage_digest(stage), rec.get(stage)
        if r is None:
            out.append(f"{stage}: no recorded digest; run `make digests`")
        elif r["digest"] != d and r["version"] == version:
            out.append(f"{stage}: code changed but VERSION is still {version}; bump VERSION in the stage module, then `make digests`")
        elif r["digest"] != d or r["version"] != version:
            out.append(f"{stage}: VERSION {version} not recorded; run `make digests`")
    return out


def update(force: bool = False) -> list[str]:
    from .stages import STAGE_MODULES

    rec = recorded()
    refused = []
    for stage in STAGE_MODULES:
        version = _version(stage)
        if version is None:
            continue
        d, r = stage_digest(stage), rec.get(stage)
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
