"""JSON Schemas are in sync with the config models; stage code cannot change under the same VERSION."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from argse_cli import digests, schemas
from argse_cli.config import SplitConfig

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------- schemas
def test_schemas_are_fresh():
    res = subprocess.run([sys.executable, "-m", "argse_cli.schemas"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert {p.stem for p in schemas.SCHEMA_DIR.glob("*.json")} >= set(schemas.STAGE_MODELS)


def test_changed_model_is_detected(monkeypatch, capsys):
    class Changed(SplitConfig):
        new_knob: int = 3

    monkeypatch.setitem(schemas.STAGE_MODELS, "split", Changed)
    assert schemas.main([]) == 1
    assert "split" in capsys.readouterr().out


@pytest.fixture
def schema_copy(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "schemas"
    monkeypatch.setattr(schemas, "SCHEMA_DIR", d)
    assert schemas.main(["--write"]) == 0
    return d


def test_modified_or_missing_schema_file_is_detected(schema_copy, capsys):
    assert schemas.main([]) == 0
    p = schema_copy / "split.json"
    doc = json.loads(p.read_text())
    doc["properties"]["imbalance_factor"]["minimum"] = 2
    p.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    assert schemas.main([]) == 1
    assert "['split']" in capsys.readouterr().out
    (schema_copy / "eval.json").unlink()
    assert schemas.main([]) == 1
    assert "eval" in capsys.readouterr().out
    assert schemas.main(["--write"]) == 0 and schemas.main([]) == 0


def test_schema_content_and_env_independence(monkeypatch):
    doc = json.loads(schemas.render("split"))
    assert doc["additionalProperties"] is False
    assert doc["properties"]["imbalance_factor"]["minimum"] == 1
    assert "default" not in doc["properties"]["data_root"]
    monkeypatch.setenv("ARGSE_DATA", "/some/where")
    assert json.loads(schemas.render("split")) == doc


# ---------------------------------------------------------------------------------- digests
def test_recorded_digests_match_the_code():
    if not digests.DIGESTS.exists():
        pytest.skip("digests not generated")
    assert digests.problems() == []


def test_code_set_is_the_import_closure_of_the_stage_module():
    """Each stage's code set holds its module, the modules it imports lazily inside functions, and
    what those import in turn (static, via ast)."""
    from argse_cli.stages import STAGE_MODULES

    files = {st: {str(p.relative_to(digests.PKG)) for p in digests.code_files(st)} for st in STAGE_MODULES}
    for st, mod in STAGE_MODULES.items():
        assert f"stages/{mod}.py" in files[st]
    # lazy imports inside compute() and, transitively, what the core imports
    assert {"core/plugin_fit.py", "core/gate_fit.py", "core/rule.py", "evaluation.py"} <= files["train-gate"]
    assert {"metrics/refit.py", "metrics/bootstrap.py", "report/figures.py", "core/gated.py"} <= files["eval"]
    assert {"report/compare.py", "metrics/bootstrap.py"} <= files["report"]
    assert {"metrics/selective.py", "experts/calibration.py", "core/plugin_fit.py"} <= files["baselines"]


@pytest.mark.parametrize("stage", ["train-gate", "eval", "baselines", "report", "calibrate"])
def test_editing_a_file_deep_in_the_closure_changes_the_digest(tmp_path, monkeypatch, stage):
    """Edit, in a temp copy of the package, the file farthest from the stage module in its import
    graph (a file the stage module does not import itself): the stage's digest changes."""
    pkg = tmp_path / "argse_cli"
    shutil.copytree(digests.PKG, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(digests, "PKG", pkg)
    from argse_cli.stages import STAGE_MODULES

    start = pkg / "stages" / f"{STAGE_MODULES[stage]}.py"
    direct = digests._imports(start)
    deep = [p for p in digests.closure(start) if p not in direct and p != start]
    assert deep, f"{stage}: nothing beyond its direct imports"
    d0 = digests.stage_digest(stage)
    deep[-1].write_text(deep[-1].read_text() + "\n# edited\n")
    assert digests.stage_digest(stage) != d0


@pytest.fixture
def pkg_copy(tmp_path, monkeypatch) -> Path:
    """digests pointed at a copy of the package and a temp record, with only the split stage."""
    from argse_cli import stages

    pkg = tmp_path / "argse_cli"
    shutil.copytree(digests.PKG, pkg, ignore=shutil.ignore_patterns("__pycache__", "*.json"))
    monkeypatch.setattr(digests, "PKG", pkg)
    monkeypatch.setattr(digests, "DIGESTS", tmp_path / "stage_digests.json")
    monkeypatch.setattr(stages, "STAGE_MODULES", {"split": "split"})
    return pkg


def test_missing_record_is_reported(pkg_copy):
    assert digests.problems() == ["split: no recorded digest; run `make digests`"]


def test_changed_code_under_the_same_version_is_reported(pkg_copy, monkeypatch):
    from argse_cli.stages import get_stage

    assert digests.update() == []
    rec = digests.recorded()
    assert set(rec) == {"split"} and rec["split"]["version"] == get_stage("split").VERSION
    assert digests.problems() == []
    f = pkg_copy / "data" / "longtail.py"  # a file in the split stage's import closure
    original = f.read_bytes()
    f.write_bytes(original.replace(b"\n", b"\r\n"))  # line endings alone are not a change
    assert digests.problems() == []
    f.write_bytes(original + b"\n# a behaviour change\n")
    (p,) = digests.problems()
    assert p.startswith("split: code changed but VERSION is still")
    assert digests.update() == ["split"]  # refuses to bless it
    assert digests.recorded() == rec
    # an unrelated file does not count
    f.write_bytes(original)
    (pkg_copy / "sag.py").write_bytes(b"# unrelated\n")
    assert digests.problems() == []
    # bump VERSION: reported as unrecorded until `make digests`, then clean
    f.write_bytes(original + b"\n# a behaviour change\n")
    monkeypatch.setattr(get_stage("split"), "VERSION", rec["split"]["version"] + 1)
    (p,) = digests.problems()
    assert "not recorded" in p
    assert digests.update() == [] and digests.problems() == []
    assert digests.recorded()["split"]["version"] == rec["split"]["version"] + 1


def test_stage_digest_depends_on_content_and_names(pkg_copy):
    d0 = digests.stage_digest("split")
    f = pkg_copy / "stages" / "split.py"
    f.write_bytes(f.read_bytes() + b" ")
    d1 = digests.stage_digest("split")
    assert d1 != d0
    f.write_bytes(f.read_bytes()[:-1])
    assert digests.stage_digest("split") == d0
