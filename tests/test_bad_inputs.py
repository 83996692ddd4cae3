"""Bad inputs, one table (issue: reliability & security, item 4).

Every case runs the real CLI in a subprocess against its own copy of a store that already holds a
`split` artifact, and must exit with code 2, print exactly one `error: <field>: <problem> -- fix:
<fix>` line naming the field or file (no traceback), and leave the store as it was (only the
digest memos `.fingerprints.json` / `.file_fingerprints.json`, which cache file digests by path,
size and mtime, may gain an entry). The `split`-only cases of test_cli_split.py are not repeated:
the same kinds of error are raised here through other stages and other sources (pipeline file
sections of other stages, an upstream section, --set, import-logits files, damaged data roots).
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from _checks import assert_one_line_error, foreign_import, listing

from argse_cli.data.synthetic import write_synthetic_cifar10


def cli(args: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    full = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "COLUMNS": "200", **env}
    return subprocess.run([sys.executable, "-m", "argse_cli.cli", *map(str, args)], env=full,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def _damaged_roots(base: Path) -> dict[str, Path]:
    roots = {"empty": base / "empty", "nofiles": base / "nofiles"}
    roots["empty"].mkdir()
    (roots["nofiles"] / "cifar-10-batches-py").mkdir(parents=True)
    for name in ("trunc", "badlabels"):
        roots[name] = base / name
        write_synthetic_cifar10(roots[name], n_train_per_class=7, n_test_per_class=3, seed=2)
    p = roots["trunc"] / "cifar-10-batches-py" / "data_batch_2"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    p = roots["badlabels"] / "cifar-10-batches-py" / "test_batch"
    d = pickle.loads(p.read_bytes())  # our own synthetic file, written just above
    d[b"labels"][5] = 10
    p.write_bytes(pickle.dumps(d, protocol=2))
    return roots


# (id, argv, pipeline-file text or None, words the error line must contain)
CASES = [
    ("malformed-yaml", ["train-gate", "-c", "{yaml}"], "train_gate:\n  epochs: [1\n",
     ["config", "not valid YAML", "line"]),
    ("unknown-field", ["train-expert", "-c", "{yaml}"], "train_expert:\n  epochz: 3\n",
     ["train_expert.epochz", "valid fields", "epochs"]),
    ("unknown-section", ["calibrate", "-c", "{yaml}"], "calibrat:\n  view: lt\n",
     ["config.calibrat", "unknown section", "calibrate"]),
    ("wrong-type-yaml", ["train-gate", "-c", "{yaml}"], "train_gate:\n  epochs: many\n",
     ["train_gate.epochs", "integer"]),
    ("wrong-type-set", ["eval", "--set", "n_boot=lots"], None, ["eval.n_boot", "integer"]),
    ("wrong-type-bool", ["baselines", "-c", "{yaml}"], "baselines:\n  ablations: perhaps\n",
     ["baselines.ablations", "boolean"]),
    ("nan-set", ["train-expert", "--set", "lr=.nan"], None, ["train_expert.lr", "finite"]),
    ("inf-yaml", ["train-gate", "-c", "{yaml}"], "train_gate:\n  lr_gate: .inf\n",
     ["train_gate.lr_gate", "finite"]),
    ("negative-epochs", ["train-expert", "--epochs", "-1"], None,
     ["train_expert.epochs", "greater than or equal to 1"]),
    ("negative-gate-epochs", ["train-gate", "-c", "{yaml}"], "train_gate:\n  epochs: -3\n",
     ["train_gate.epochs", "greater than or equal to 1"]),
    ("fractions-sum", ["split", "--protocol", "fractions", "--fractions", "0.5,0.1,0.1,0.1,0.1"],
     None, ["fractions", "sum to 0.9"]),
    ("if-below-1-upstream-section", ["train-expert", "-c", "{yaml}"],
     "split:\n  imbalance_factor: 0.5\n", ["split.imbalance_factor", "greater than or equal to 1"]),
    ("empty-group", ["import-logits", "-c", "{imp_group}"], None,
     ["import_logits.class_to_group", "group 1 is empty"]),
    ("missing-upstream", ["calibrate"], None, ["upstream.export", "argse export-logits"]),
    ("missing-gate-key", ["eval", "--gate", "0123abcd"], None, ["key", "no complete"]),
    ("data-root-empty-dir", ["split", "--data-root", "{empty}"], None,
     ["data_root", "cifar-10-batches-py"]),
    ("data-root-without-files", ["split", "--data-root", "{nofiles}"], None,
     ["data_root", "data_batch_1"]),
    ("truncated-pickle", ["split", "--data-root", "{trunc}"], None,
     ["data_root", "data_batch_2", "truncated"]),
    ("labels-out-of-range", ["split", "--data-root", "{badlabels}"], None,
     ["data_root", "test_batch", "outside [0, 10)"]),
    ("experts-class-counts", ["import-logits", "-c", "{imp_classes}"], None,
     ["import_logits.experts.x1.logits.val_small", "11 classes", "'x0' has 10"]),
]  # fmt: skip


@pytest.fixture(scope="module")
def populated(tmp_path_factory, synthetic_cifar10):
    root = tmp_path_factory.mktemp("bad_inputs")
    store = root / "store"
    env = {"ARGSE_STORE": str(store), "ARGSE_DATA": str(synthetic_cifar10)}
    res = cli(["split", "-q"], env)
    assert res.returncode == 0, res.stderr
    files = _damaged_roots(root)
    files["imp_group"] = foreign_import(root / "imp_group", class_to_group=[0] * 5 + [2] * 5)
    files["imp_classes"] = foreign_import(root / "imp_classes", classes_x1=11)
    return store, env, files


def test_bad_inputs_exit_2_one_line_store_unchanged(populated, tmp_path):
    store0, env, files = populated
    calls, befores = [], []
    for cid, argv, text, _ in CASES:
        case = tmp_path / cid
        case.mkdir()
        store = case / "store"
        shutil.copytree(store0, store)
        befores.append(listing(store))
        if text is not None:
            (case / "pipe.yaml").write_text(text)
        fmt = {"yaml": case / "pipe.yaml", **files}
        calls.append(([*(a.format(**fmt) for a in argv), "-q"], {**env, "ARGSE_STORE": str(store)}))
    with ThreadPoolExecutor(max_workers=4) as ex:
        results = list(ex.map(lambda c: cli(*c), calls))
    failures = []
    for (cid, _, _, words), res, before in zip(CASES, results, befores, strict=True):
        try:
            assert_one_line_error(res, words)
            assert listing(tmp_path / cid / "store") == before, "store changed"
        except AssertionError as e:
            failures.append(f"{cid}: {e}")
    assert not failures, "\n\n".join(failures)


def test_config_error_creates_no_store(populated, tmp_path):
    """A config error on a store that does not exist yet does not create it. (A stage failing
    inside compute on its first ever run -- experts-class-counts above: no import-logits/ dir
    before -- removes the stage and lock dirs it created: the table's listing check.)"""
    _, env, _ = populated
    fresh = tmp_path / "fresh"
    res = cli(["train-gate", "--set", "epochs=-1"], {**env, "ARGSE_STORE": str(fresh)})
    assert_one_line_error(res, ["train_gate.epochs"])
    assert not fresh.exists()
