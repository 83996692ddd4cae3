"""The Python packages a GPU machine lacks, carried as wheels and installed there without network.

    python bench/gpu_wheels.py download --dest .carry/wheels      # here: `make gpu-carry`
    python bench/gpu_wheels.py install --wheels .carry/wheels --target /tmp/argse-site   # there
    python bench/gpu_wheels.py check --wheels .carry/wheels       # dry run: installs nothing

What is needed: the ``[project] dependencies`` of pyproject.toml, walked through the
``Requires-Dist`` of every package that has to be installed (extras followed, environment markers
evaluated for the target interpreter). A requirement that a distribution installed in the target
already satisfies is kept (that distribution's own requirements are trusted); any other is served
by the newest wheel of the folder whose version fits and whose tags the target supports, and that
wheel's requirements are walked in turn (:func:`plan`). Two different wheels of one package, or a
requirement nothing fits, is an error naming the package and the fix.

``install`` runs ``pip install --no-index --no-deps --target`` on exactly the planned wheels (the
device tool's recipe: nothing is resolved against an index) and then re-plans in a fresh
interpreter with the target first on ``sys.path``: every requirement must now be satisfied and
the packages must import. ``download`` computes the same plan here for the simulated machine
(bench/gpu_device_packages.txt: the packages it holds, versions where known; Python 3.12,
manylinux x86_64) with this environment's installed distributions standing in for the wheels,
and ``pip download``s those exact versions (the tested set) for cp312; it also carries, as
fallbacks, the newer-than-some-lower-bound dependencies of the carried packages that the machine
holds in an unknown version (typing-extensions, packaging), which ``install`` uses only when the
machine's copy is too old. ``check`` plans for this interpreter (nothing may be missing) and for
the simulated machine against the folder (or, when the folder is absent, against the stand-ins),
and has pip dry-run the planned wheels for cp312.

Only the standard library and ``packaging`` are used (both present on the machine before anything
is installed). Errors: one line ``error: <field>: <problem> -- fix: <fix>``, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from email.parser import HeaderParser
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.tags import compatible_tags, cpython_tags, sys_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DEVICE_PACKAGES = Path(__file__).resolve().parent / "gpu_device_packages.txt"
DEVICE_PYTHON = (3, 12)
# glibc 2.17 (manylinux2014) .. 2.39 (Ubuntu 24.04, whose Python is the machine's 3.12.3)
DEVICE_PLATFORMS = (
    [f"manylinux_2_{m}_x86_64" for m in range(39, 16, -1)]
    + ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]
)  # fmt: skip
IMPORTS = ("zarr", "numcodecs", "pydantic", "pydantic_core", "xxhash", "yaml")


class PlanError(Exception):
    """A requirement that cannot be met: str() is the project's one-line error body."""

    def __init__(self, field_: str, problem: str, fix: str):
        super().__init__(f"{field_}: {problem} -- fix: {fix}")


@dataclass(frozen=True)
class Wheel:
    """One wheel file (or, with ``path`` None, an installed distribution standing in for one)."""

    name: str  # canonical
    version: Version
    tags: frozenset
    requires: tuple[str, ...]
    path: Path | None = None


@dataclass
class Plan:
    install: dict[str, Wheel] = field(default_factory=dict)  # canonical name -> wheel
    satisfied: dict[str, str] = field(default_factory=dict)  # canonical name -> installed version
    edges: list[tuple[str, str]] = field(default_factory=list)  # (required by, requirement)
    # requirements met by a distribution of the target whose version is not known (simulation)
    assumed: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "install": {n: str(w.version) for n, w in sorted(self.install.items())},
            "files": sorted(w.path.name for w in self.install.values() if w.path is not None),
            "satisfied": {n: v for n, v in sorted(self.satisfied.items()) if n not in self.install},
        }


# --------------------------------------------------------------------------- reading


def project_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    import tomllib

    return list(tomllib.loads(pyproject.read_text())["project"]["dependencies"])


def _requires_from_metadata(text: str) -> tuple[str, ...]:
    return tuple(HeaderParser().parsestr(text).get_all("Requires-Dist") or ())


def read_wheel(path: Path) -> Wheel:
    """Name, version, tags (from the file name) and Requires-Dist (from its METADATA)."""
    name, version, _, tags = parse_wheel_filename(path.name)
    with zipfile.ZipFile(path) as z:
        meta = [n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")]
        if len(meta) != 1:
            raise PlanError(str(path), "not a wheel (no single *.dist-info/METADATA)",
                            "delete it and re-run `make gpu-carry`")  # fmt: skip
        requires = _requires_from_metadata(z.read(meta[0]).decode("utf-8", "replace"))
    return Wheel(canonicalize_name(name), version, frozenset(tags), requires, path)


def read_folder(folder: Path) -> list[Wheel]:
    return [read_wheel(p) for p in sorted(Path(folder).glob("*.whl"))]


def installed() -> dict[str, tuple[Version, tuple[str, ...]]]:
    """Installed distributions of THIS interpreter, the first one on sys.path winning (as import
    does): canonical name -> (version, Requires-Dist)."""
    from importlib.metadata import distributions

    out: dict[str, tuple[Version, tuple[str, ...]]] = {}
    for d in distributions():
        name = d.metadata["Name"]
        if not name:
            continue
        out.setdefault(canonicalize_name(name), (Version(d.version), tuple(d.requires or ())))
    return out


def device_packages(path: Path = DEVICE_PACKAGES) -> dict[str, Version | None]:
    """The simulated machine's packages: canonical name -> version (None where not known)."""
    out: dict[str, Version | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, v = line.partition("==")
            out[canonicalize_name(name)] = Version(v) if v else None
    return out


def target_tags(python: tuple[int, int] | None = None) -> frozenset:
    """Tags the target accepts: this interpreter's (None) or CPython ``python`` on manylinux x86_64."""
    if python is None:
        return frozenset(sys_tags())
    interp = f"cp{python[0]}{python[1]}"
    return frozenset(
        list(cpython_tags(python, platforms=DEVICE_PLATFORMS))
        + list(compatible_tags(python, interp, DEVICE_PLATFORMS))
    )


def target_env(python: tuple[int, int] | None = None, full: str | None = None) -> dict[str, str]:
    env = dict(default_environment())
    if python is not None:
        env["python_version"] = f"{python[0]}.{python[1]}"
        env["python_full_version"] = full or f"{python[0]}.{python[1]}.0"
        env["implementation_version"] = env["python_full_version"]
    return env


# --------------------------------------------------------------------------- planning


def _interp(tags: frozenset) -> str:
    return max((t.interpreter for t in tags if t.interpreter.startswith("cp")), default="?")


def _applies(req: Requirement, extras: frozenset[str], env: dict[str, str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**env, "extra": e}) for e in (extras | {""}))


def plan(
    requirements: list[str],
    have: dict[str, Version | None],
    wheels: list[Wheel],
    tags: frozenset,
    env: dict[str, str],
    folder: str = ".carry/wheels",
) -> Plan:
    """Which wheels must be installed so that every requirement holds (see the module docstring).

    ``have``: installed distributions of the target (version None = present, version unknown:
    trusted, and recorded in ``Plan.assumed``). Raises :class:`PlanError`."""
    p = Plan()
    queue: list[tuple[str, Requirement, frozenset[str]]] = [
        ("argse", Requirement(r), frozenset()) for r in requirements
    ]
    done: set[tuple[str, frozenset[str]]] = set()
    while queue:
        parent, req, parent_extras = queue.pop(0)
        if not _applies(req, parent_extras, env):
            continue
        name = canonicalize_name(req.name)
        p.edges.append((parent, str(req)))
        if name in p.install:
            w = p.install[name]
            if not req.specifier.contains(w.version, prereleases=True):
                raise PlanError(name, f"{parent} needs {req} but {w.version} was chosen for another "
                                "requirement", f"carry one version that fits both in {folder}")  # fmt: skip
        elif name in have and (have[name] is None
                               or req.specifier.contains(have[name], prereleases=True)):  # fmt: skip
            p.satisfied[name] = "present" if have[name] is None else str(have[name])
            if have[name] is None and str(req.specifier):
                p.assumed.append((parent, str(req)))
            continue
        else:
            fits = [w for w in wheels if w.name == name and w.tags & tags
                    and req.specifier.contains(w.version, prereleases=True)]  # fmt: skip
            if not fits:
                same = sorted(str(w.version) for w in wheels if w.name == name)
                got = f"installed {have[name]}" if have.get(name) else "not installed"
                raise PlanError(
                    name, f"{parent} needs {req} ({got}) and no wheel in {folder} fits "
                    f"(wheels of it there: {same or 'none'}; target {_interp(tags)})",
                    "run `make gpu-carry` here (it downloads the pinned set for cp312)",
                )  # fmt: skip
            p.install[name] = max(fits, key=lambda w: w.version)
        key = (name, frozenset(req.extras))
        if key not in done:
            done.add(key)
            queue += [(name, Requirement(r), frozenset(req.extras)) for r in p.install[name].requires]
    return p


def local_standins(tags: frozenset) -> list[Wheel]:
    """This environment's installed distributions as wheels (tags: all of the target's)."""
    return [Wheel(n, v, tags, reqs) for n, (v, reqs) in installed().items()]


def simulated_plan(wheels: list[Wheel] | None = None, folder: str = ".carry/wheels") -> Plan:
    """The plan for the GPU machine as bench/gpu_device_packages.txt describes it."""
    tags = target_tags(DEVICE_PYTHON)
    env = target_env(DEVICE_PYTHON, "3.12.3")
    return plan(project_requirements(), device_packages(), wheels if wheels is not None
                else local_standins(tags), tags, env, folder)  # fmt: skip


def fallbacks(p: Plan) -> list[str]:
    """Dependencies of the carried packages that the machine holds in an unknown version, with a
    version bound: carried too (the local version), used only if the machine's copy is too old."""
    out = set()
    for parent, req in p.assumed:
        if parent in p.install:
            out.add(canonicalize_name(Requirement(req).name))
    return sorted(out)


# --------------------------------------------------------------------------- commands


def _pip_platform_args() -> list[str]:
    py = f"{DEVICE_PYTHON[0]}.{DEVICE_PYTHON[1]}"
    args = ["--only-binary=:all:", "--python-version", py, "--implementation", "cp"]
    for plat in DEVICE_PLATFORMS:
        args += ["--platform", plat]
    return args


def cmd_download(dest: Path) -> dict:
    p = simulated_plan()
    have = installed()
    pins = {n: str(w.version) for n, w in p.install.items()}
    for n in fallbacks(p):
        pins[n] = str(have[n][0])
    dest.mkdir(parents=True, exist_ok=True)
    keep = set()
    for name, version in sorted(pins.items()):
        existing = [w for w in read_folder(dest) if w.name == name]
        if any(str(w.version) == version for w in existing):
            keep |= {w.path.name for w in existing if str(w.version) == version}
            continue
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d",
                            str(dest), *_pip_platform_args(), f"{name}=={version}"],
                           capture_output=True, text=True)  # fmt: skip
        if r.returncode != 0:
            raise PlanError(name, f"pip download {name}=={version} for cp312 failed: "
                            f"{(r.stderr.strip().splitlines() or ['?'])[-1]}",
                            "check the package mirror (pip config list)")  # fmt: skip
        keep |= {w.path.name for w in read_folder(dest) if w.name == name
                 and str(w.version) == version}  # fmt: skip
    removed = []
    for f in dest.glob("*.whl"):  # stale versions: two of one package would stop the install
        if f.name not in keep:
            f.unlink()
            removed.append(f.name)
    return {"pins": pins, "fallbacks": fallbacks(p), "removed": sorted(removed),
            "bytes": sum(f.stat().st_size for f in dest.glob("*.whl"))}  # fmt: skip


def cmd_install(folder: Path, target: Path) -> dict:
    wheels = read_folder(folder) if folder.is_dir() else []
    have = {n: v for n, (v, _) in installed().items()}
    p = plan(project_requirements(), have, wheels, target_tags(), target_env(), str(folder))
    files = [str(w.path) for w in p.install.values()]
    if files:
        target.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                            "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(target),
                            *files], capture_output=True, text=True)  # fmt: skip
        if r.returncode != 0:
            raise PlanError("pip install", (r.stderr.strip().splitlines() or ["failed"])[-1],
                            f"see `{sys.executable} -m pip install --no-index --no-deps --target "
                            f"{target} <wheels>`")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(target)] + [x for x in os.environ.get("PYTHONPATH", "").split(os.pathsep) if x])}
    r = subprocess.run([sys.executable, __file__, "verify"], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise PlanError("verify", (r.stdout + r.stderr).strip().splitlines()[-1],
                        f"inspect {target} and {folder}")  # fmt: skip
    return {**p.summary(), "target": str(target), "verify": json.loads(r.stdout)}


def cmd_verify() -> dict:
    """In the interpreter as it is now (target on sys.path): nothing left to install; imports."""
    import importlib

    have = {n: v for n, (v, _) in installed().items()}
    p = plan(project_requirements(), have, [], target_tags(), target_env(), "(none)")
    versions = {}
    for m in IMPORTS:
        mod = importlib.import_module(m)
        versions[m] = getattr(mod, "__version__", "?")
    return {"requirements_met": len(p.edges), "imports": versions}


def cmd_check(folder: Path, pip: bool = False) -> dict:
    """Dry run: nothing is installed. ``pip``: also have pip dry-run the planned wheels for cp312
    (the Makefile's check after downloading; a few seconds)."""
    have = {n: v for n, (v, _) in installed().items()}
    local = plan(project_requirements(), have, [], target_tags(), target_env(), "(this venv)")
    out: dict = {"this_interpreter": {"requirements_met": len(local.edges)}}
    tags = target_tags(DEVICE_PYTHON)
    use_folder = folder.is_dir() and any(folder.glob("*.whl"))
    sim = simulated_plan(read_folder(folder) if use_folder else local_standins(tags), str(folder))
    out["device_simulated"] = {**sim.summary(), "fallbacks_carried_for": fallbacks(sim),
                               "wheels_from": str(folder) if use_folder else
                               "this venv's distributions (no wheel folder: run make gpu-carry)"}  # fmt: skip
    if use_folder:
        out["folder_bytes"] = sum(f.stat().st_size for f in folder.glob("*.whl"))
    if use_folder and pip:
        files = [str(w.path) for w in sim.install.values()]
        with tempfile.TemporaryDirectory() as tmp:
            r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index",
                                "--no-deps", *_pip_platform_args(), "--target", tmp, *files],
                               capture_output=True, text=True)  # fmt: skip
        if r.returncode != 0:
            raise PlanError("pip --dry-run", (r.stderr.strip().splitlines() or ["failed"])[-1],
                            "run `make gpu-carry` again")  # fmt: skip
        out["pip_dry_run_cp312"] = [ln for ln in r.stdout.splitlines() if ln.startswith("Would")]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("download")
    d.add_argument("--dest", type=Path, default=ROOT / ".carry" / "wheels")
    i = sub.add_parser("install")
    i.add_argument("--wheels", type=Path, default=ROOT / ".carry" / "wheels")
    i.add_argument("--target", type=Path, default=Path("/tmp/argse-site"))
    c = sub.add_parser("check")
    c.add_argument("--wheels", type=Path, default=ROOT / ".carry" / "wheels")
    c.add_argument("--pip", action="store_true", help="also pip install --dry-run for cp312")
    sub.add_parser("verify")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "download":
            res = cmd_download(a.dest)
        elif a.cmd == "install":
            res = cmd_install(a.wheels, a.target)
        elif a.cmd == "check":
            res = cmd_check(a.wheels, a.pip)
        else:
            res = cmd_verify()
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"error: import: {e} -- fix: carry the package in .carry/wheels (make gpu-carry)",
              file=sys.stderr)  # fmt: skip
        return 2
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

