"""Values refused in the config models before any work (issue 19 item 8), bad files of every
accepted logits / labels format refused in one line, and the fingerprint rule (item 9: a data file
changed in place with the same size and mtime is served as cached until `--rehash`)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import yaml
from _checks import assert_one_line_error, foreign_import
from conftest import invoke

from argse_cli.errors import ArgseError
from argse_cli.pipeline import Pipeline, validate

# (stage, field value pairs, the field the one-line error names, a word of the problem)
REFUSED = [
    ("eval", {"levels": [1.5]}, "eval.levels", "grid 0.01, 0.02, ..., 1.00"),
    ("eval", {"levels": [0.0]}, "eval.levels", "grid 0.01, 0.02, ..., 1.00"),
    ("eval", {"levels": []}, "eval.levels", "grid 0.01, 0.02, ..., 1.00"),
    ("eval", {"levels": [0.555]}, "eval.levels", "grid 0.01, 0.02, ..., 1.00"),
    ("eval", {"human_noise": [1.5]}, "eval.human_noise.0", "less than or equal to 1"),
    ("eval", {"human_noise": [-0.1]}, "eval.human_noise.0", "greater than or equal to 0"),
    ("eval", {"n_boot": True}, "eval.n_boot", "boolean"),
    ("eval", {"seed": 2**32 - 1}, "eval.seed", "less than"),
    ("baselines", {"levels": [1.5]}, "baselines.levels", "grid 0.01, 0.02, ..., 1.00"),
    ("baselines", {"seeds": [2**40]}, "baselines.seeds.0", "less than 4294967296"),
    ("baselines", {"seeds": []}, "baselines.seeds", "at least 1"),
    ("baselines", {"seeds": [True]}, "baselines.seeds", "boolean"),
    ("train-gate", {"hidden": [0]}, "train_gate.hidden", "every hidden width must be >= 1"),
    ("train-gate", {"hidden": [-3]}, "train_gate.hidden", "every hidden width must be >= 1"),
    ("train-gate", {"experts": []}, "train_gate.experts", "at least one"),
    ("train-gate", {"experts": [-1]}, "train_gate.experts", "distinct indices >= 0"),
    ("train-gate", {"experts": [1, 1]}, "train_gate.experts", "distinct"),
    ("train-gate", {"epochs": True}, "train_gate.epochs", "boolean"),
    ("train-gate", {"epochs": 2.0}, "train_gate.epochs", "integer"),
    ("train-gate", {"epochs": "3"}, "train_gate.epochs", "integer"),
    ("train-gate", {"lr_gate": True}, "train_gate.lr_gate", "boolean"),
    ("train-gate", {"lr_gate": "fast"}, "train_gate.lr_gate", "number"),
    ("train-gate", {"lr_gate": "1e-3x"}, "train_gate.lr_gate", "number"),
    ("train-gate", {"hard_routing": 1}, "train_gate.hard_routing", "boolean"),
    ("train-gate", {"seed": 99999999999999999999999}, "train_gate.seed", "out of range"),
    ("train-gate", {"seed": 2**32}, "train_gate.seed", "less than 4294967296"),
    ("train-expert", {"epochs": True}, "train_expert.epochs", "boolean"),
    ("train-expert", {"seed": 2**32}, "train_expert.seed", "less than 4294967296"),
    ("train-expert", {"compile": "yes"}, "train_expert.compile", "boolean"),
    ("split", {"seed": -1}, "split.seed", "greater than or equal to 0"),
    ("split", {"imbalance_factor": True}, "split.imbalance_factor", "boolean"),
    ("export-logits", {"seed": 2**32}, "export_logits.seed", "less than 4294967296"),
]  # fmt: skip


@pytest.mark.parametrize("stage,data,field,word", REFUSED)
def test_bad_values_are_refused_by_the_config_model(stage, data, field, word):
    with pytest.raises(ArgseError) as ei:
        validate(stage, data)
    e = ei.value
    assert e.field == field and word in e.problem and "\n" not in str(e), str(e)


@pytest.mark.parametrize("stage,data", [
    ("eval", {"levels": [1.0, 0.01], "human_noise": [0.0, 1.0]}),
    ("train-gate", {"hidden": [], "experts": [0, 2], "seed": 2**32 - 1, "lr_gate": 1}),
    ("baselines", {"seeds": [0, 2**32 - 1]}),
    ("split", {"imbalance_factor": 10}),  # an int where a float is expected is fine
])  # fmt: skip
def test_edge_values_are_accepted(stage, data):
    validate(stage, data)


def test_exponent_notation_is_a_number_not_a_string():
    """PyYAML (YAML 1.1) reads `1e-3` as a string; float fields take the number it spells."""
    from argse_cli.pipeline import parse_set

    over = parse_set(["lr_gate=1e-3", "xi=2E1", "human_noise=[1e-1, .5]"])
    assert over["lr_gate"] == "1e-3"  # what PyYAML gives
    assert validate("train-gate", {"lr_gate": over["lr_gate"]}).lr_gate == 0.001
    assert validate("eval", {"human_noise": over["human_noise"]}).human_noise == (0.1, 0.5)
    with pytest.raises(ArgseError, match="integer"):
        validate("train-gate", {"epochs": "1e3"})  # an integer field takes integers only


def test_yaml_epochs_true_is_refused_not_read_as_1(tmp_path):
    (tmp_path / "p.yaml").write_text("train_gate:\n  epochs: true\n")
    res = invoke(["train-gate", "-c", str(tmp_path / "p.yaml")], env={"ARGSE_STORE": str(tmp_path / "s")})
    assert_one_line_error(res, ["train_gate.epochs", "boolean"])


@pytest.mark.parametrize("value,word", [("5", "non-empty list"), ("[]", "non-empty list"),
                                         ("[1, 2]", "non-empty list")])  # fmt: skip
def test_losses_must_be_a_list_of_names(value, word):
    p = Pipeline({})
    p.override("train-expert", {"losses": yaml.safe_load(value)})
    with pytest.raises(ArgseError, match=word) as ei:
        p.expert_losses()
    assert ei.value.field == "train_expert.losses"


def test_cli_set_and_option_errors_are_one_line(tmp_path):
    env = {"ARGSE_STORE": str(tmp_path / "s")}
    cases = [
        (["train-expert", "--set", "losses=5"], ["train_expert.losses"]),
        (["train-expert", "--set", "seed=99999999999999999999999"], ["train_expert.seed"]),
        (["train-gate", "--set", "hidden=[-3]"], ["train_gate.hidden"]),
        (["eval", "--set", "levels=[1.5]"], ["eval.levels"]),
        (["baselines", "--seeds", "a,b"], ["--seeds", "comma list of integers"]),
    ]
    for args, words in cases:
        assert_one_line_error(invoke(args, env=env), words)
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------ experts=[5] with E = 2 experts
def test_gate_expert_index_beyond_the_export_is_refused_before_any_work(tiny_pipe, tmp_path):
    t = tiny_pipe("calibrate")
    store = tmp_path / "store"
    shutil.copytree(t.store, store)
    before = sorted(p.name for p in store.rglob("*"))
    res = t.run("train-gate", "-c", str(t.cfg), "--set", "experts=[5]", store=store)
    assert_one_line_error(res, ["train_gate.experts", "index 5", "2 experts"])
    assert sorted(p.name for p in store.rglob("*")) == before


# ------------------------------------------------------------------------------- bad files
def _bad_file(path, kind: str) -> None:
    rng = np.random.default_rng(0)
    if kind == "npz-not-zip":
        path.write_bytes(b"this is not a zip archive" * 10)
    elif kind == "npz-truncated":
        np.savez(path, a=rng.standard_normal((40, 10)).astype(np.float32))
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "npz-garbage-member":
        np.savez(path, a=rng.standard_normal((40, 10)).astype(np.float32))
        b = bytearray(path.read_bytes())
        b[40:120] = os.urandom(80)
        path.write_bytes(bytes(b))
    elif kind == "safetensors-garbage":
        path.write_bytes(os.urandom(256))
    elif kind == "safetensors-huge-header":
        path.write_bytes((10**12).to_bytes(8, "little") + b"{}" * 8)
    elif kind in ("npy-huge-header", "labels-huge-header"):
        dt = "<f4" if kind == "npy-huge-header" else "<i8"
        with open(path, "wb") as fh:
            np.lib.format.write_array_header_1_0(
                fh, {"descr": dt, "fortran_order": False, "shape": (10**12, 10) if dt == "<f4" else (10**12,)}
            )
            fh.write(b"\0" * 64)
    elif kind == "npy-garbage":
        path.write_bytes(b"\x93NUMPY\x01\x00" + os.urandom(100))
    else:
        raise ValueError(kind)


BAD_FILES = {  # kind: (suffix, role in the import file, words of the one-line error)
    "npz-not-zip": (".npz", "logits", ["import_logits.experts.x0.logits.test", "not a valid .npz"]),
    "npz-truncated": (".npz", "logits", ["import_logits.experts.x0.logits.test", ".npz"]),
    "npz-garbage-member": (".npz", "logits", ["import_logits.experts.x0.logits.test"]),
    "safetensors-garbage": (".safetensors", "logits", ["import_logits.experts.x0.logits.test", "safetensors"]),
    "safetensors-huge-header": (".safetensors", "logits", ["import_logits.experts.x0.logits.test"]),
    "npy-huge-header": (".npy", "logits", ["import_logits.experts.x0.logits.test", "header claims"]),
    "npy-garbage": (".npy", "logits", ["import_logits.experts.x0.logits.test", ".npy"]),
    "labels-huge-header": (".npy", "labels", ["import_logits.labels.test", "header claims"]),
}  # fmt: skip


@pytest.fixture(scope="module")
def bad_imports(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_imports")
    out = {}
    for kind, (suffix, role, _) in BAD_FILES.items():
        cfg = foreign_import(root / kind)
        doc = json.loads(cfg.read_text())
        bad = root / kind / f"bad{suffix}"
        _bad_file(bad, kind)
        sec = doc["import_logits"]
        if role == "logits":
            sec["experts"][0]["logits"]["test"] = str(bad)
        else:
            sec["labels"]["test"] = str(bad)
        cfg.write_text(json.dumps(doc))
        out[kind] = cfg
    counts = foreign_import(root / "counts")
    doc = json.loads(counts.read_text())
    (root / "counts" / "big.json").write_text(json.dumps([1e30] + [5] * 9))
    doc["import_logits"]["class_counts"] = str(root / "counts" / "big.json")
    counts.write_text(json.dumps(doc))
    out["class-count-1e30"] = counts
    return out


def test_bad_files_are_one_line_errors_and_nothing_is_stored(bad_imports, tmp_path):
    results = {
        kind: invoke(["import-logits", "-c", str(cfg), "-q"], env={"ARGSE_STORE": str(tmp_path / kind)})
        for kind, cfg in bad_imports.items()
    }  # in-process: one interpreter for every case
    failures = []
    for kind, res in results.items():
        words = (["import_logits.class_counts", "1e+30", "too large"] if kind == "class-count-1e30"
                 else BAD_FILES[kind][2])  # fmt: skip
        try:
            assert_one_line_error(res, words)
            store = tmp_path / kind
            assert not any(p.name[0] != "." for p in store.glob("*/*")), "something was stored"
        except AssertionError as e:
            failures.append(f"{kind}: {e}")
    assert not failures, "\n\n".join(failures)


# ------------------------------------------------------------------------- fingerprint rule
def test_rehash_sees_a_data_file_changed_in_place(synthetic_cifar10, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synthetic_cifar10, data)
    env = {"ARGSE_STORE": str(tmp_path / "store"), "ARGSE_DATA": str(data)}
    k1 = invoke(["split", "--print-key"], env=env)
    first = invoke(["split", "-q"], env=env)
    assert first.returncode == 0 and f"wrote {k1.stdout.strip()}" in first.stdout, first.stderr
    f = data / "cifar-10-batches-py" / "test_batch"
    st = f.stat()
    b = bytearray(f.read_bytes())
    b[-100] ^= 0x01  # one pixel of the last test image: same size
    f.write_bytes(bytes(b))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # ... and the same mtime
    # the documented limitation: the (path, size, mtime) memo serves the old fingerprint
    cached = invoke(["split", "-q"], env=env)
    assert cached.returncode == 0 and f"cached {k1.stdout.strip()}" in cached.stdout
    # --rehash hashes the contents again: a new key, recomputed
    k2 = invoke(["split", "--rehash", "--print-key"], env=env).stdout.strip()
    assert k2 and k2 != k1.stdout.strip()
    again = invoke(["split", "--rehash", "-q"], env=env)
    assert again.returncode == 0 and f"wrote {k2}" in again.stdout, again.stderr
    # the memo is refreshed: a plain run now agrees
    assert invoke(["split", "--print-key"], env=env).stdout.strip() == k2


def test_import_rehash_sees_a_logits_file_changed_in_place(tmp_path):
    cfg = foreign_import(tmp_path / "imp")
    env = {"ARGSE_STORE": str(tmp_path / "store")}
    k1 = invoke(["import-logits", "-c", str(cfg), "--print-key"], env=env).stdout.strip()
    res = invoke(["import-logits", "-c", str(cfg), "-q"], env=env)
    assert res.returncode == 0 and f"wrote {k1}" in res.stdout, res.stderr
    f = tmp_path / "imp" / "f0_test.npy"
    st = f.stat()
    a = np.load(f)
    a[0, 0] += 1.0
    np.save(f, a)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert invoke(["import-logits", "-c", str(cfg), "--print-key"], env=env).stdout.strip() == k1
    k2 = invoke(["import-logits", "-c", str(cfg), "--rehash", "--print-key"], env=env).stdout.strip()
    assert k2 != k1
    res = invoke(["import-logits", "-c", str(cfg), "--rehash", "-q"], env=env)
    assert res.returncode == 0 and f"wrote {k2}" in res.stdout, res.stderr
