"""Loading configs and artifacts never executes code; manifest paths stay inside the store
(issue: reliability & security, item 5).

Allowed loaders: the CIFAR reader's allow-list Unpickler (its refusal test is in
test_data_cifar.py), torch.load(weights_only=True), and the job files the user's own launcher
wrote (submitit, sweep.py). Checked here:
- a static audit (AST) of argse_cli/: no other pickle / marshal / shelve / dill / joblib loader,
  no torch.load without weights_only=True, no yaml loader but safe_load, no eval / exec, no
  np.load(allow_pickle=True), no shell=True, dynamic imports only from fixed tables;
- pipeline files (YAML and --set values) carrying python tags are refused and run nothing;
- weight files and logits files holding a code-running pickle are refused and run nothing;
- a crafted manifest whose upstream stage or key contains ``..`` is refused by the store and by
  `argse eval` (a complete-looking artifact planted outside the store is never read).
Store-level ``../`` array / file names and symlinks are in test_store.py.
"""

from __future__ import annotations

import ast
import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from argse_cli.errors import ArgseError, IntegrityError
from argse_cli.store import MANIFEST, MARKER, Store, compute_key, seal_text

PKG = Path(__file__).resolve().parents[1] / "argse_cli"


def _cli(args, env, timeout=120):
    full = {**os.environ, "COLUMNS": "200", **env}
    return subprocess.run([sys.executable, "-m", "argse_cli.cli", *map(str, args)], env=full,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


class _Pwn:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ------------------------------------------------------------------------------ static audit
def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    parts.append(node.id if isinstance(node, ast.Name) else "<expr>")  # m.to(d).eval(): <expr>.eval
    return ".".join(reversed(parts))


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value
    return None


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


FORBIDDEN_MODULES = {"marshal", "shelve", "dill", "cloudpickle", "joblib", "_pickle", "cPickle"}
# where a construct is allowed (relative to argse_cli/)
ALLOWED = {
    "pickle": {"data/cifar.py", "data/synthetic.py"},  # allow-list Unpickler; the synthetic writer
    "Unpickler": {"data/cifar.py"},
    "submitit": {"sweep.py"},  # job files written by the user's own launcher (scale-out)
    "import_module": {"__init__.py", "stages/__init__.py"},  # names from fixed tables
}


def audit(path: Path) -> list[str]:
    rel = str(path.relative_to(PKG))
    tree = ast.parse(path.read_text(), filename=rel)
    bad = []

    def flag(node, what):
        bad.append(f"{rel}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names]
            mod = node.module if isinstance(node, ast.ImportFrom) else None
            for m in ([mod] if mod else []) + (names if isinstance(node, ast.Import) else []):
                top = m.split(".")[0]
                if top in FORBIDDEN_MODULES:
                    flag(node, f"import {m}")
                if top in ("pickle", "submitit") and rel not in ALLOWED[top]:
                    flag(node, f"import {m}")
            if mod == "yaml" and any(
                n not in ("safe_load", "safe_dump", "YAMLError") for n in names
            ):
                flag(node, f"from yaml import {names}")
        elif isinstance(node, ast.ClassDef):
            for b in node.bases:
                if _dotted(b).endswith("Unpickler") and rel not in ALLOWED["Unpickler"]:
                    flag(node, f"Unpickler subclass {node.name}")
        elif isinstance(node, ast.Attribute):
            name = _dotted(node)
            if name in ("yaml.Loader", "yaml.FullLoader", "yaml.UnsafeLoader", "yaml.unsafe_load",
                        "yaml.full_load", "yaml.load", "yaml.load_all", "yaml.full_load_all",
                        "yaml.unsafe_load_all"):  # fmt: skip
                flag(node, name)
        if not isinstance(node, ast.Call):
            continue
        fn = _dotted(node.func)
        last = fn.rsplit(".", 1)[-1]
        if fn in ("eval", "exec", "compile"):
            flag(node, f"{fn}()")
        if fn in ("pickle.load", "pickle.loads") or (
            fn.startswith("pickle.") and last == "Unpickler"
        ):
            flag(node, fn)
        if (
            last == "load"
            and fn.split(".")[0] == "torch"
            and not _is_true(_kw(node, "weights_only"))
        ):
            flag(node, "torch.load without weights_only=True")
        if fn in ("np.load", "numpy.load") and _is_true(_kw(node, "allow_pickle")):
            flag(node, "np.load(allow_pickle=True)")
        if _is_true(_kw(node, "shell")):
            flag(node, f"{fn}(shell=True)")
        if fn == "__import__" and not (node.args and isinstance(node.args[0], ast.Constant)):
            flag(node, "__import__ of a computed name")
        if last == "import_module" and rel not in ALLOWED["import_module"]:
            flag(node, "import_module")
    return bad


def test_static_audit_finds_no_unsafe_loader():
    files = sorted(PKG.rglob("*.py"))
    assert len(files) > 30
    bad = [b for f in files for b in audit(f)]
    assert bad == [], "\n".join(bad)


def test_static_audit_catches_what_it_should(tmp_path):
    """The audit itself flags each construct (so a clean result above means something)."""
    src = tmp_path / "bad.py"
    src.write_text(
        "import pickle, marshal, yaml, torch, numpy as np, subprocess\n"
        "from yaml import load\n"
        "class U(pickle.Unpickler): pass\n"
        "pickle.loads(b'')\nyaml.load('', Loader=yaml.Loader)\nyaml.unsafe_load('')\n"
        "torch.load('x')\ntorch.load('x', weights_only=False)\nnp.load('x', allow_pickle=True)\n"
        "eval('1')\nexec('1')\nsubprocess.run('ls', shell=True)\n__import__(name)\n"
        "torch.load('x', weights_only=True)\nyaml.safe_load('')\nnp.load('x')\nm.cpu().eval()\n"
    )
    global PKG
    old, PKG = PKG, tmp_path
    try:
        bad = audit(src)
    finally:
        PKG = old
    text = "\n".join(bad)
    for what in ("import pickle", "import marshal", "from yaml import", "Unpickler subclass",
                 "pickle.loads", "yaml.load", "yaml.Loader", "yaml.unsafe_load", "eval()",
                 "exec()", "np.load(allow_pickle=True)", "shell=True", "__import__"):  # fmt: skip
        assert what in text, (what, text)
    assert text.count("torch.load without weights_only=True") == 2
    assert not any(f":{n}:" in b for n in (14, 15, 16, 17) for b in bad), text


# ------------------------------------------------------------------------------ configs
TAGGED = [
    "split:\n  seed: !!python/object/apply:os.system ['touch {m}']\n",
    "split: !!python/object/apply:os.system ['touch {m}']\n",
    "!!python/object/new:os.system ['touch {m}']\n",
    "train_gate:\n  c: !!python/name:os.system\n",
]


@pytest.mark.parametrize("i", range(len(TAGGED)))
def test_pipeline_file_with_python_tags_is_refused(tmp_path, i):
    marker = tmp_path / "pwned"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(TAGGED[i].format(m=marker))
    store = tmp_path / "store"
    res = _cli(["split", "-c", cfg, "--print-key"], {"ARGSE_STORE": str(store)})
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr and "config" in res.stderr and "YAML" in res.stderr
    assert not marker.exists() and not store.exists()


def test_set_value_with_python_tag_is_not_constructed(tmp_path):
    from argse_cli.pipeline import parse_set

    marker = tmp_path / "pwned"
    got = parse_set([f"seed=!!python/object/apply:os.system ['touch {marker}']"])
    assert isinstance(got["seed"], str)  # kept as a plain string, then refused by validation
    res = _cli(["split", "--set", f"seed=!!python/object/apply:os.system ['touch {marker}']",
                "--print-key"], {"ARGSE_STORE": str(tmp_path / "s")})  # fmt: skip
    assert res.returncode == 2 and "split.seed" in res.stderr, res.stderr
    assert not marker.exists()


# ------------------------------------------------------------------------------ weights / logits
def test_pickled_weights_are_refused_without_running(tmp_path):
    """A 'model.safetensors' / 'gate.safetensors' that is really a torch pickle never runs."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load

    from argse_cli.experts.trainer import load_model

    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"fc.weight": torch.zeros(2, 2), "x": _Pwn(marker)}, buf)
    for blob in (buf.getvalue(), pickle.dumps(_Pwn(marker))):
        with pytest.raises(SafetensorError):  # load_model (experts), as export-logits uses it
            load_model(blob, 8, 10)
        with pytest.raises(SafetensorError):  # safetensors.torch.load (the gate, load_gate)
            load(blob)
    assert not marker.exists()


def test_pickled_logits_files_are_refused_without_running(tmp_path):
    from argse_cli.readers import load_vector, open_logits

    marker = tmp_path / "pwned"
    torch_ = pytest.importorskip("torch")
    torch_.save({"logits": torch_.zeros(3, 4), "evil": _Pwn(marker)}, tmp_path / "a.pt")
    np.save(tmp_path / "o.npy", np.array([_Pwn(marker), 1], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "o.npz", logits=np.array([_Pwn(marker)], dtype=object))
    np.savez_compressed(tmp_path / "oc.npz", logits=np.array([_Pwn(marker)], dtype=object))
    with pytest.raises(ArgseError, match="weights_only"):
        open_logits(f"{tmp_path / 'a.pt'}:logits")
    for spec in ("o.npy", "o.npz:logits"):
        with pytest.raises(ArgseError):
            open_logits(str(tmp_path / spec))
        with pytest.raises(ArgseError):
            load_vector(str(tmp_path / spec), "labels")
    with pytest.raises(ArgseError, match="object arrays are refused"):  # deflated: its header says so
        open_logits(str(tmp_path / "oc.npz:logits"))
    with pytest.raises(ArgseError):
        load_vector(str(tmp_path / "a.pt:evil"), "labels")
    assert not marker.exists()


# ------------------------------------------------------------------------------ manifests
def _fake(store: Store, stage: str, config: dict | None = None, **kw) -> str:
    """Publish a small artifact; returns its key."""
    up, ups = kw.pop("upstream", {}), kw.pop("upstream_stages", {})
    key = compute_key(stage, 1, config or {}, up)
    with store.writer(stage, key, config=config or {}, upstream=up, upstream_stages=ups,
                      version=1) as w:  # fmt: skip
        w.array("v", np.arange(4))
        for k, v in kw.items():
            w.meta[k] = v
    return key


def _craft(store: Store, stage: str, key: str, edit) -> None:
    """Edit a published manifest and rewrite COMPLETE for it (a deliberate crafter: the
    manifest checksum alone would already refuse an edit)."""
    mp = store.dir(stage, key) / MANIFEST
    m = json.loads(mp.read_text())
    edit(m)
    mp.write_text(json.dumps(m))
    with pytest.raises(IntegrityError, match="fails its checksum"):
        store.open(stage, key)
    (mp.parent / MARKER).write_text(seal_text(key, mp.read_bytes()))


def _plant_outside(tmp_path: Path) -> tuple[Path, str]:
    """A complete artifact outside the store (what a crafted manifest would point to)."""
    evil = tmp_path / "evil"
    key = _fake(Store(evil), "x", {"o": 1})
    return evil / "x" / key, key


@pytest.mark.parametrize("field", ["stage", "key"])
def test_crafted_upstream_reference_is_refused(tmp_path, field):
    store = Store(tmp_path / "store")
    outside, kout = _plant_outside(tmp_path)
    assert Store(tmp_path / "evil").open("x", kout).verify() == []
    kd = _fake(store, "down", upstream={"src": kout}, upstream_stages={"src": "x"})
    rel = os.path.relpath(outside.parent, store.root)  # ../evil/x

    def edit(m):
        if field == "stage":
            m["upstream_stages"]["src"] = rel
        else:
            m["upstream_stages"]["src"] = "down"
            m["upstream"]["src"] = os.path.relpath(outside, store.root / "down")  # ../../evil/x/<key>

    _craft(store, "down", kd, edit)
    with pytest.raises(IntegrityError, match="unsafe"):  # the manifest model refuses it on open
        store.open("down", kd)
    # the store API refuses such names directly, too
    with pytest.raises(IntegrityError, match="unsafe"):
        store.dir(rel, kout)
    assert not store.exists(rel, kout) and not store.exists("down", f"../{kd}")
    with pytest.raises(ArgseError):
        store.open(rel, kout)
    with pytest.raises(ArgseError):
        store.resolve(kout[:8], rel)
    # gc --keep cannot follow the crafted artifact's links: it refuses to delete anything
    with pytest.raises(IntegrityError, match="unsafe"):
        store.gc(keep=[kd])
    store.gc()
    assert (outside / "manifest.json").exists()
    assert store.dir("down", kd).exists()  # an unreadable artifact is reported, not deleted


def test_eval_refuses_a_gate_whose_manifest_points_outside(tmp_path):
    from argse_cli.config import TrainGateConfig

    store = Store(tmp_path / "store")
    outside, kout = _plant_outside(tmp_path)
    cfg = TrainGateConfig(epochs=2).key_payload()
    up = {"export": kout, "calibrate": kout}
    kg = compute_key("train-gate", 99, cfg, up)
    rel = os.path.relpath(outside.parent, store.root)
    with store.writer("train-gate", kg, config=cfg, version=99, upstream=up,
                      upstream_stages={"export": "x", "calibrate": "x"}) as w:  # fmt: skip
        for name in ("alpha", "mu", "lambda", "beta"):
            w.array(name, np.ones(2))
        w.json("history.json", {"epoch": [0]})
        w.meta.update(tau=1.0, c=0.05, chosen_epoch=0, num_experts=2, in_dim=4, experts=None)
    _craft(store, "train-gate", kg,
           lambda m: m["upstream_stages"].update(export=rel, calibrate=rel))  # fmt: skip
    from typer.testing import CliRunner

    from argse_cli.cli import app

    args = ["eval", "--gate", kg[:12], "--set", "n_boot=0", "-q"]
    res = CliRunner().invoke(app, args, env={"ARGSE_STORE": str(store.root)})
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), res.output
    assert "error: train-gate/" in res.output and "refusing unsafe stage name" in res.output
    assert [e.state for e in store.entries()] == ["unreadable"]  # nothing published
