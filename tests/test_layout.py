"""The package's layering, read statically with ``ast`` (every import statement, lazy ones inside
functions included):

(a) stages are leaves: no module of ``argse_cli/stages/`` imports another stage module (neither
    ``from .train_gate import ...`` nor ``argse_cli.stages.train_gate``); importing the registry and
    runner ``argse_cli.stages`` itself (``from . import run_stage``) is allowed;
(b) library code does not reach into stages: outside ``argse_cli/stages/`` and ``argse_cli/cli.py``
    no module imports a stage module ``argse_cli.stages.<name>``; the registry ``argse_cli.stages``
    (``key_of``, ``run_stage``, ``get_stage``, ``STAGE_MODULES``) is allowed -- the pipeline, the
    sweep and the digests go through it;
(c) stage modules are light: at module level a stage module imports only the standard library
    (its library calls are imported inside ``compute``), so importing every stage -- what computing
    a key or answering ``cached`` does -- loads none of numpy, torch, zarr, matplotlib, scipy.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from argse_cli.stages import STAGE_MODULES

PKG = Path(__file__).resolve().parents[1] / "argse_cli"
STAGES = PKG / "stages"
STAGE_NAMES = set(STAGE_MODULES.values())
HEAVY = ("numpy", "torch", "zarr", "matplotlib", "scipy")


def _module_of(path: Path) -> list[str]:
    """``argse_cli/a/b.py`` -> ["argse_cli", "a", "b"]; a package's ``__init__.py`` -> its package."""
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _imported(path: Path, top_level_only: bool = False) -> list[tuple[str, int]]:
    """(absolute dotted name, line) of every module an import statement of ``path`` names; for
    ``from X import a, b`` both ``X`` and ``X.a``, ``X.b`` (a name may be a submodule)."""
    tree = ast.parse(path.read_text(), str(path))
    mod = _module_of(path)
    pkg = mod if path.name == "__init__.py" else mod[:-1]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = []
    for node in nodes:
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = pkg[: len(pkg) - node.level + 1] if node.level else []
            name = ".".join(base + (node.module.split(".") if node.module else []))
            out.append((name, node.lineno))
            out += [(f"{name}.{a.name}", node.lineno) for a in node.names]
    return out


def _stage_module(name: str) -> str | None:
    """The stage module a dotted name lies in (``argse_cli.stages.<stage>[.x]``), else None."""
    parts = name.split(".")
    if parts[:2] == ["argse_cli", "stages"] and len(parts) > 2 and parts[2] in STAGE_NAMES:
        return parts[2]
    return None


def test_resolution_of_relative_imports():
    """The resolver the rules below rely on: relative imports from a stage and from the registry."""
    names = {n for n, _ in _imported(STAGES / "import_logits.py")}
    assert "argse_cli.stages.run_stage" in names and "argse_cli.logit_import" in names
    assert "argse_cli.stages.train_expert" not in {n for n, _ in _imported(STAGES / "__init__.py")}
    assert _stage_module("argse_cli.stages.train_gate.fit") == "train_gate"
    assert _stage_module("argse_cli.stages.run_stage") is None


def test_no_stage_imports_another_stage():
    bad = []
    for f in sorted(STAGES.glob("*.py")):
        if f.name == "__init__.py":
            continue
        for name, line in _imported(f):
            st = _stage_module(name)
            if st is not None and st != f.stem:
                bad.append(f"stages/{f.name}:{line} imports {name}")
    assert not bad, "\n".join(bad)


def test_library_modules_do_not_import_stage_modules():
    bad = []
    for f in sorted(PKG.rglob("*.py")):
        rel = f.relative_to(PKG)
        if rel.parts[0] == "stages" or rel == Path("cli.py"):
            continue
        for name, line in _imported(f):
            if _stage_module(name) is not None:
                bad.append(f"{rel}:{line} imports {name}")
    assert not bad, "\n".join(bad)


def test_stage_modules_import_only_the_standard_library_at_module_level():
    bad = []
    for f in sorted(STAGES.glob("*.py")):
        if f.name == "__init__.py":
            continue
        for name, line in _imported(f, top_level_only=True):
            top = name.split(".")[0]
            if top != "__future__" and top not in sys.stdlib_module_names:
                bad.append(f"stages/{f.name}:{line} imports {name} at module level")
    assert not bad, "\n".join(bad)


def test_importing_every_stage_loads_nothing_heavy():
    code = (
        "import sys, importlib\n"
        "from argse_cli.stages import STAGE_MODULES\n"
        "for m in STAGE_MODULES.values():\n"
        "    importlib.import_module('argse_cli.stages.' + m)\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr
