"""Packaging: an SPDX license, package data that matches files (configs and schemas ship in the
wheel, at the paths the error messages and `argse schema` use), the extras `make install` leaves out."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest
from conftest import REPO


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_license_is_spdx_and_package_data_matches_files():
    p = _pyproject()
    assert p["project"]["license"] == "MIT"  # PEP 639 string (a table makes setuptools warn)
    pats = p["tool"]["setuptools"]["package-data"]["argse_cli"]
    for pat in pats:
        assert list((REPO / "argse_cli").glob(pat)), pat  # every pattern ships something
    shipped = {f.name for pat in pats for f in (REPO / "argse_cli").glob(pat)}
    assert {"demo.yaml", "cifar10lt.yaml", "split.json", "report.json", "stage_digests.json"} <= shipped
    assert set(p["project"]["optional-dependencies"]) == {"results", "test", "cluster"}


def test_make_install_leaves_the_dev_extras_to_install_dev():
    mk = (REPO / "Makefile").read_text()
    install = mk.split("$(VENV)/.installed: ")[1].split("\n\n")[0]
    assert "-e ." in install and "[" not in install
    assert "'.[test,cluster,results]'" in mk.split("$(VENV)/.installed-dev: ")[1].split("\n\n")[0]
    assert "test: install-dev" in mk and "demo: install data" in mk


@pytest.mark.slow
def test_wheel_ships_configs_and_schemas(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "argse_cli", "configs", "schemas"):
        f = REPO / name
        if f.is_dir():
            shutil.copytree(f, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(f, src / name)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                          "-w", str(tmp_path / "out"), "."], cwd=src, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "license" not in (res.stdout + res.stderr).lower().replace("license-expression", ""), res.stderr
    whl = next((tmp_path / "out").glob("argse-*.whl"))
    with zipfile.ZipFile(whl) as z:
        names = set(z.namelist())
        meta = z.read(next(n for n in names if n.endswith("METADATA"))).decode()
    for f in ("argse_cli/configs/demo.yaml", "argse_cli/configs/cifar10lt.yaml", "argse_cli/json_schemas/split.json",
              "argse_cli/json_schemas/train-gate.json", "argse_cli/stage_digests.json"):
        assert f in names, f
    assert "License-Expression: MIT" in meta and "Provides-Extra: results" in meta
