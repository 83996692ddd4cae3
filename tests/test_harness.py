"""The guard of issue 19: every CLI command against Hypothesis-generated bad inputs.

Inputs: config values (``--set field=value`` strings and pipeline files, any YAML value, for
every stage command), malformed manifests and markers (edited, truncated, garbage; resealed or
not), truncated / garbage / bit-flipped files of every format `import-logits` and `apply` accept,
and bad places (a store that is a file or under one, an unwritable or wrong ``--out``). Every
call must

- exit 0 or 2 (``verify`` may also exit 1: its documented "found damage" result) with no
  traceback, and an exit 2 from argse prints exactly one ``error:`` line;
- leave every artifact that verified before the call verifying after it.

Commands run in-process (typer's CliRunner, stdout / stderr apart) so an example costs
milliseconds, not an interpreter start. The default suite runs a short version of each property
(a few examples); ``-m slow`` runs many more and adds real stage runs on the tiny pipeline
(calibrate / train-gate / eval / report over damaged and overridden inputs, `apply` with bad
files). Profiles (tests/conftest.py): derandomized when CI is set.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from _checks import foreign_section
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from argse_cli.cli import app
from argse_cli.config import HELDOUT_SPLITS, STAGE_MODELS, section_name
from argse_cli.store import MANIFEST, MARKER, Store, compute_key, seal_text

SHORT = dict(max_examples=6, deadline=None, database=None,
             suppress_health_check=list(HealthCheck))  # fmt: skip
LONG = dict(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))

STAGE_COMMANDS = ["split", "train-expert", "export-logits", "calibrate", "train-gate", "eval",
                  "baselines", "report", "import-logits"]  # fmt: skip


# ------------------------------------------------------------------------------- running
class Call:
    def __init__(self, args: list[str], res):
        self.args, self.code = args, res.exit_code
        self.stdout, self.stderr, self.exception = res.stdout, res.stderr, res.exception

    def check(self, allow: tuple[int, ...] = (0, 2)) -> Call:
        what = f"argse {' '.join(self.args)}\nrc={self.code}\n{self.stderr[-2000:]}"
        if self.exception is not None and not isinstance(self.exception, SystemExit):
            import traceback

            tb = "".join(traceback.format_exception(self.exception))
            raise AssertionError(f"uncaught {type(self.exception).__name__}: {what}\n{tb[-3000:]}")
        assert "Traceback" not in self.stderr + self.stdout, what
        ok = allow + ((1,) if self.args[:1] == ["verify"] else ())
        assert self.code in ok, what
        if self.code == 2 and "Usage:" not in self.stderr:  # typer's own option parsing errors
            errors = [ln for ln in self.stderr.splitlines() if ln.startswith("error:")]
            assert len(errors) == 1 and " -- fix: " in errors[0], what
        return self


def cli(args: list[str], store: Path, **env: str) -> Call:
    full = {"ARGSE_STORE": str(store), "COLUMNS": "200", **env}
    return Call(args, CliRunner().invoke(app, args, env=full))


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    if root.is_dir():
        for p in root.rglob("*"):
            with contextlib.suppress(OSError):
                st_ = p.lstat()
                out[str(p.relative_to(root))] = (st_.st_size, st_.st_mtime_ns)
    return out


def verified(root: Path) -> set[tuple[str, str]]:
    return {(a.stage, a.key) for a in Store(root).list() if a.verify() == []} if root.is_dir() else set()


@contextlib.contextmanager
def guarded(root: Path):
    """Every artifact that verified before the block verifies after it."""
    before, snap = verified(root), _snapshot(root)
    yield
    if _snapshot(root) == snap:
        return  # nothing on disk changed
    s = Store(root)
    for stage, key in before:
        assert s.exists(stage, key), f"{stage}/{key[:12]} vanished or stopped verifying"
        assert s.open(stage, key).verify() == [], f"{stage}/{key[:12]} no longer verifies"


@contextlib.contextmanager
def copy_of(root: Path):
    d = Path(tempfile.mkdtemp(prefix="harness-"))
    try:
        if root.exists():
            shutil.copytree(root, d / "store", symlinks=True)
        yield d / "store"
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------- strategies
scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**32, 2**63, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-300, 1.5, -1.5, 1e30, float("nan"), float("inf")]),
    st.text(max_size=12),
)  # fmt: skip
values = st.recursive(
    scalars, lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.text(max_size=6), ch, max_size=3),
    max_leaves=6,
)


def _yaml(v) -> str:
    try:
        return yaml.safe_dump(v, default_flow_style=True, width=10**6).strip().removesuffix("\n...")
    except yaml.YAMLError:
        return str(v)


def field_names(stage: str) -> st.SearchStrategy[str]:
    names = list(STAGE_MODELS[stage].model_fields)
    extra = ["losses"] if stage == "train-expert" else []
    return st.sampled_from(names + extra) | st.text(min_size=1, max_size=8)


@st.composite
def set_args(draw, stage: str) -> list[str]:
    """--set strings: a field (mostly real) and any YAML value, or raw text."""
    out = []
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.integers(0, 9)) == 0:
            out += ["--set", draw(st.text(max_size=20))]
        else:
            out += ["--set", f"{draw(field_names(stage))}={_yaml(draw(values))}"]
    return out


@st.composite
def pipeline_doc(draw, stage: str) -> str:
    sec = section_name(stage)
    doc = {sec: draw(st.dictionaries(field_names(stage), values, max_size=3))}
    if draw(st.booleans()):  # an upstream section or a junk one
        other = draw(st.sampled_from(STAGE_COMMANDS + ["nonsense"]))
        doc[section_name(other)] = draw(values)
    text = yaml.safe_dump(doc)
    if draw(st.integers(0, 5)) == 0:  # truncated file
        text = text[: draw(st.integers(0, len(text)))]
    return text


# ------------------------------------------------------------------ a small real-ish store
def _art(store: Store, stage: str, cfg: dict, up: dict | None = None, ups: dict | None = None,
         metrics: bool = False) -> str:  # fmt: skip
    key = compute_key(stage, 1, cfg, up or {})
    with store.writer(stage, key, config=cfg, upstream=up or {}, upstream_stages=ups or {},
                      version=1) as w:  # fmt: skip
        w.array("x", np.arange(60, dtype=np.float32).reshape(20, 3), chunk_rows=7)
        w.array("s", np.float64(2.5))
        w.json("m.json", {"a": [1, 2]})
        w.meta["experts"] = [{"tau": 1.0}]
        if metrics:
            w.log_metrics({"epoch": 0, "loss": 0.5})
    return key


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> tuple[Path, list[tuple[str, str]]]:
    """Four linked artifacts (one with a metrics log) built through the store API."""
    root = tmp_path_factory.mktemp("harness_mini") / "store"
    s = Store(root)
    a = _art(s, "export-logits", {"i": 1}, metrics=True)
    b = _art(s, "calibrate", {"i": 2}, {"export": a}, {"export": "export-logits"})
    c = _art(s, "train-gate", {"i": 3}, {"export": a, "calibrate": b},
             {"export": "export-logits", "calibrate": "calibrate"})  # fmt: skip
    d = _art(s, "report", {"i": 4}, {"evals": [c, c]}, {"evals": "train-gate"})
    return root, [("export-logits", a), ("calibrate", b), ("train-gate", c), ("report", d)]


PATHS = ["stage", "key", "stage_version", "hash_scheme", "config", "config.i", "upstream",
         "upstream_stages", "extra", "meta", "meta.experts", "arrays", "files", "created",
         "arrays.x", "arrays.x.shape", "arrays.x.dtype", "arrays.x.chunk_rows", "arrays.x.xxh3",
         "arrays.x.chunk_xxh3", "arrays.s.shape", "arrays.s.chunk_xxh3", "files.m.json"]  # fmt: skip


@st.composite
def manifest_damage(draw):
    kind = draw(st.sampled_from(["set", "delete", "truncate", "garbage", "marker", "rename-key"]))
    if kind == "set":
        return kind, draw(st.sampled_from(PATHS)), draw(values), draw(st.booleans())
    if kind == "delete":
        return kind, draw(st.sampled_from(PATHS)), None, draw(st.booleans())
    if kind == "truncate":
        return kind, None, draw(st.floats(0, 1)), draw(st.booleans())
    if kind == "garbage":
        return kind, None, draw(st.binary(max_size=80)), draw(st.booleans())
    if kind == "marker":
        return kind, None, draw(st.sampled_from(["delete", "garbage", "empty", "dir", "other"])), False
    return kind, None, None, False


def _apply_damage(d: Path, damage) -> None:
    kind, path, val, reseal = damage
    mp = d / MANIFEST
    if kind in ("set", "delete"):
        m = json.loads(mp.read_text())
        *head, last = path.split(".") if not path.startswith("files.") else ["files", path[6:]]
        node = m
        for h in head:
            node = node.get(h) if isinstance(node, dict) else None
        if isinstance(node, dict):
            if kind == "delete":
                node.pop(last, None)
            else:
                node[last] = val
        mp.write_text(json.dumps(m, allow_nan=True))
    elif kind == "truncate":
        b = mp.read_bytes()
        mp.write_bytes(b[: int(len(b) * val)])
    elif kind == "garbage":
        mp.write_bytes(val)
    elif kind == "marker":
        mk = d / MARKER
        mk.unlink()
        if val == "garbage":
            mk.write_bytes(os.urandom(20))
        elif val == "empty":
            mk.write_text("")
        elif val == "dir":
            mk.mkdir()
        elif val == "other":
            mk.write_text(seal_text("0" * 32, mp.read_bytes()))
    elif kind == "rename-key":  # a complete folder under another (valid-looking) key
        d.rename(d.parent / ("f" * 32))
        return
    if reseal:
        (d / MARKER).write_text(seal_text(d.name, mp.read_bytes()))


def _commands(arts, victim: tuple[str, str]) -> st.SearchStrategy[list[str]]:
    stage, key = victim
    other = [k for s, k in arts if k != key]
    return st.sampled_from([
        ["ls"], ["ls", "--all"], ["verify"], ["verify", key[:12]], ["verify", other[0][:12]],
        ["show", key[:12]], ["show", other[-1][:12]], ["show", "--follow", arts[0][1][:12]],
        ["gc"], ["gc", "--dry-run"], ["gc", "--pending"], ["gc", "--dry-run", "--keep", other[-1][:12]],
        ["calibrate", "--print-key"],
    ])  # fmt: skip


def _manifest_property(root: Path, arts, data) -> None:
    victim = data.draw(st.sampled_from(arts), label="victim")
    damage = data.draw(manifest_damage(), label="damage")
    with copy_of(root) as store:
        _apply_damage(store / victim[0] / victim[1], damage)
        args = data.draw(_commands(arts, victim), label="command")
        with guarded(store):
            cli(args, store).check()


@settings(**SHORT)
@given(data=st.data())
def test_short_malformed_manifests_every_store_command(mini, data):
    _manifest_property(*mini, data)


@pytest.mark.slow
@settings(**LONG)
@given(data=st.data())
def test_malformed_manifests_every_store_command(mini, data):
    _manifest_property(*mini, data)


# ------------------------------------------------------------------------ config values
def _config_property(data, store: Path, run: bool) -> None:
    stage = data.draw(st.sampled_from(STAGE_COMMANDS), label="stage")
    how = data.draw(st.sampled_from(["set", "file"]), label="how")
    args = [stage]
    tmp = Path(tempfile.mkdtemp(prefix="harness-cfg-"))
    try:
        if how == "set":
            args += data.draw(set_args(stage), label="set")
        else:
            (tmp / "p.yaml").write_text(data.draw(pipeline_doc(stage), label="file"))
            args += ["-c", str(tmp / "p.yaml")]
        if not run:
            args.append(data.draw(st.sampled_from(["--print-config", "--print-key"])))
        with guarded(store):
            cli([*args, "-q"] if run else args, store, ARGSE_DATA=str(tmp / "nodata")).check()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@settings(**{**SHORT, "max_examples": 8})  # the long version (400 examples) is in the slow set
@given(data=st.data())
def test_short_config_values_every_stage_command(mini, data):
    with copy_of(mini[0]) as store:
        _config_property(data, store, run=False)


@pytest.mark.slow
@settings(**{**LONG, "max_examples": 400})
@given(data=st.data())
def test_config_values_every_stage_command(mini, data):
    with copy_of(mini[0]) as store:
        _config_property(data, store, run=False)


# ------------------------------------------------------------------------------ files
LOGITS_FORMATS = [".npy", ".npz", ".npz-deflated", ".safetensors", ".pt", ".zarr"]
VECTOR_FORMATS = [".npy", ".npz", ".json", ".csv", ".txt", ".pt"]


def _write(path: Path, fmt: str, a: np.ndarray) -> Path:
    if fmt == ".npy":
        np.save(path.with_suffix(".npy"), a)
        return path.with_suffix(".npy")
    if fmt in (".npz", ".npz-deflated"):
        p = path.with_suffix(".npz")
        (np.savez_compressed if fmt == ".npz-deflated" else np.savez)(p, a=a)
        return p
    if fmt == ".safetensors":
        from safetensors.numpy import save_file

        save_file({"a": np.ascontiguousarray(a)}, str(path.with_suffix(".safetensors")))
        return path.with_suffix(".safetensors")
    if fmt == ".pt":
        import torch

        torch.save(torch.from_numpy(np.ascontiguousarray(a)), path.with_suffix(".pt"))
        return path.with_suffix(".pt")
    if fmt == ".zarr":
        import zarr

        z = zarr.open_array(str(path.with_suffix(".zarr")), mode="w", shape=a.shape,
                            chunks=(16, *a.shape[1:]), dtype=a.dtype)  # fmt: skip
        z[:] = a
        return path.with_suffix(".zarr")
    if fmt == ".json":
        path.with_suffix(".json").write_text(json.dumps(a.tolist()))
        return path.with_suffix(".json")
    p = path.with_suffix(fmt)
    p.write_text("\n".join(str(x) for x in a.tolist()) + "\n")
    return p


def _damage_file(p: Path, how: str, frac: float, junk: bytes) -> None:
    targets = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
    t = targets[int(frac * (len(targets) - 1))] if targets else p
    b = t.read_bytes()
    if how == "truncate":
        t.write_bytes(b[: int(len(b) * frac)])
    elif how == "garbage":
        t.write_bytes(junk)
    elif how == "flip" and b:
        i = int(frac * (len(b) - 1))
        t.write_bytes(b[:i] + bytes([b[i] ^ 0xFF]) + b[i + 1 :])
    elif how == "splice":
        i = int(frac * len(b))
        t.write_bytes(b[:i] + junk + b[i + len(junk) :])


@st.composite
def file_case(draw):
    role = draw(st.sampled_from(["logits", "logits", "labels", "class_counts", "class_to_group", "weights"]))
    fmt = draw(st.sampled_from(LOGITS_FORMATS if role == "logits" else VECTOR_FORMATS))
    how = draw(st.sampled_from(["truncate", "garbage", "flip", "splice", "none"]))
    return role, fmt, how, draw(st.floats(0, 1)), draw(st.binary(max_size=64))


def _import_doc(d: Path, case) -> Path:
    """An import-logits pipeline file (2 experts, C = 10, 40 rows per split) with one damaged
    file in the case's format and role."""
    role, fmt, how, frac, junk = case
    sec = foreign_section(d)
    sec["chunk_rows"] = 16
    experts, labels = sec["experts"], sec["labels"]
    rng = np.random.default_rng(1)
    C, n = 10, 40
    if role == "logits":
        p = _write(d / "bad", fmt, rng.standard_normal((n, C)).astype(np.float32))
        experts[0]["logits"]["test"] = str(p)
    elif role == "labels":
        p = _write(d / "bad", fmt, rng.permutation(np.arange(n) % C))
        labels["test"] = str(p)
    elif role == "class_counts":
        p = _write(d / "bad", fmt, np.array([100, 80, 60, 40, 30, 20, 10, 8, 6, 5]))
        sec["class_counts"] = str(p)
    elif role == "class_to_group":
        p = _write(d / "bad", fmt, np.array([0] * 5 + [1] * 5))
        sec["class_to_group"] = str(p)
    else:
        p = _write(d / "bad", fmt, np.ones(n))
        sec["weights"] = {s: str(p) for s in HELDOUT_SPLITS}
    if how != "none":
        _damage_file(p, how, frac, junk)
    (d / "import.yaml").write_text(yaml.safe_dump({"import_logits": sec}))
    return d / "import.yaml"


def _files_property(case) -> None:
    d = Path(tempfile.mkdtemp(prefix="harness-files-"))
    try:
        doc = _import_doc(d, case)
        store = d / "store"
        res = cli(["import-logits", "-c", str(doc), "-q"], store).check()
        arts = Store(store).list() if store.is_dir() else []
        if res.code == 0:
            assert len(arts) == 1 and arts[0].verify() == []
        else:
            assert arts == []
    finally:
        shutil.rmtree(d, ignore_errors=True)


@settings(**{**SHORT, "max_examples": 8})
@given(case=file_case())
def test_short_damaged_files_of_every_format(case):
    _files_property(case)


@pytest.mark.slow
@settings(**LONG)
@given(case=file_case())
def test_damaged_files_of_every_format(case):
    _files_property(case)


# ------------------------------------------------------------------------------- places
PLACES = ["store-is-file", "store-under-file", "out-is-file", "out-under-file", "out-is-dir"]


def _places_property(mini_root: Path, place: str, command: str) -> None:
    d = Path(tempfile.mkdtemp(prefix="harness-places-"))
    try:
        f = d / "file"
        f.write_text("keep")
        store = {"store-is-file": f, "store-under-file": f / "store"}.get(place, d / "store")
        if store == d / "store":
            shutil.copytree(mini_root, store)
        out = {"out-is-file": f, "out-under-file": f / "out", "out-is-dir": d}.get(place, d / "o")
        args = {
            "ls": ["ls", "--all"], "verify": ["verify"], "gc": ["gc"], "show": ["show", "abcd"],
            "calibrate": ["calibrate", "-q"], "split": ["split", "--print-key"],
            "report": ["report", "--eval", "abcd", "--out", str(out)],
            "apply": ["apply", "abcd", "--logits", str(f), "--out", str(out.with_suffix(".npz")) if place == "out-under-file" else str(out)],
        }[command]  # fmt: skip
        with guarded(store if store.is_dir() else d / "none"):
            cli(args, store, ARGSE_DATA=str(d / "nodata")).check()
        assert f.read_text() == "keep"
    finally:
        shutil.rmtree(d, ignore_errors=True)


@settings(**{**SHORT, "max_examples": 6})
@given(place=st.sampled_from(PLACES),
       command=st.sampled_from(["ls", "verify", "gc", "show", "calibrate", "split", "report", "apply"]))  # fmt: skip
def test_short_bad_places(mini, place, command):
    _places_property(mini[0], place, command)


@pytest.mark.slow
@settings(**{**LONG, "max_examples": 60})
@given(place=st.sampled_from(PLACES),
       command=st.sampled_from(["ls", "verify", "gc", "show", "calibrate", "split", "report", "apply"]))  # fmt: skip
def test_bad_places(mini, place, command):
    _places_property(mini[0], place, command)


# ---------------------------------------------------------- slow: real stages, tiny pipeline
@pytest.fixture(scope="module")
def tiny(tiny_pipe):
    return tiny_pipe("eval")


EVAL_FIELDS = {  # cheap eval overrides (n_boot is forced to 0): their boundary and bad values
    "levels": st.lists(st.sampled_from([-0.1, 0.0, 1e-9, 0.5, 0.555, 1.0, 1.5]), max_size=3),
    "human_noise": st.lists(st.sampled_from([-0.5, 0.0, 0.5, 1.0, 1.5]), max_size=3),
    "target_risk": st.sampled_from([None, 0.0, 0.05, 0.5, 1.0]),
    "delta": st.sampled_from([0.0, 0.1, 1.0]),
    "conformal_epsilon": st.sampled_from([0.0, 0.1, 0.99]),
    "sag_mode": st.sampled_from([None, "sensitivity", "specificity", "success", "bogus"]),
    "sag_target": st.sampled_from([0.0, 0.5, 1.0]),
    "sag_window": st.sampled_from([5, 10, 50]),
    "l2d": st.booleans(),
    "seed": st.sampled_from([0, 2**32 - 2, 2**32 - 1, -1]),
}


@pytest.mark.slow
@settings(**{**LONG, "max_examples": 25})
@given(data=st.data())
def test_real_stage_runs_with_bad_overrides_and_damaged_upstreams(tiny, data):
    """eval / calibrate / train-gate / report run for real on a copy of the tiny pipeline, with
    generated overrides (values refused must be refused before any work) or a damaged upstream
    manifest; the store's verified artifacts survive every call."""
    t = tiny
    with copy_of(t.store) as store:
        what = data.draw(st.sampled_from(["eval-set", "damage-upstream"]), label="what")
        if what == "eval-set":
            field = data.draw(st.sampled_from(sorted(EVAL_FIELDS)), label="field")
            val = data.draw(EVAL_FIELDS[field], label="value")
            args = ["eval", "-c", str(t.cfg), "--set", "n_boot=0", "--set", f"{field}={_yaml(val)}", "-q"]
        else:
            stage = data.draw(st.sampled_from(["export-logits", "calibrate", "train-gate"]), label="up")
            _apply_damage(store / stage / t.keys[stage], data.draw(manifest_damage(), label="damage"))
            cmd = {"export-logits": "calibrate", "calibrate": "train-gate", "train-gate": "eval"}[stage]
            args = [cmd, "-c", str(t.cfg), "--set", "n_boot=0" if cmd == "eval" else "epochs=1", "-q"]
        with guarded(store):
            cli(args, store, ARGSE_DATA=str(t.data)).check()


@pytest.mark.slow
@settings(**{**LONG, "max_examples": 25})
@given(case=file_case().filter(lambda c: c[0] == "logits"))
def test_apply_with_damaged_logits_files(tiny, case):
    t = tiny
    gate = t.keys["train-gate"]
    d = Path(tempfile.mkdtemp(prefix="harness-apply-"))
    try:
        _, fmt, how, frac, junk = case
        rng = np.random.default_rng(1)
        good = _write(d / "good", ".npy", rng.standard_normal((30, 10)).astype(np.float32))
        bad = _write(d / "bad", fmt, rng.standard_normal((30, 10)).astype(np.float32))
        if how != "none":
            _damage_file(bad, how, frac, junk)
        with guarded(t.store):
            cli(["apply", gate[:12], "--logits", str(bad), "--logits", str(good), "--out",
                 str(d / "out.npz")], t.store).check()  # fmt: skip
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("key", ['"\\N"', '"a\\u2028b"', '"x\\ny"'])
def test_a_line_break_in_a_field_name_stays_one_error_line(mini, tmp_path, key):
    # found by the harness: YAML's "\N" is U+0085, a line break for str.splitlines
    (tmp_path / "p.yaml").write_text(f"split:\n  ? {key}\n  : null\n")
    with copy_of(mini[0]) as store, guarded(store):
        call = cli(["split", "-c", str(tmp_path / "p.yaml"), "--print-config"], store,
                   ARGSE_DATA=str(tmp_path / "nodata")).check(allow=(2,))
    assert "Extra inputs" in call.stderr
