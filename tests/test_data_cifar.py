import hashlib
import io
import os
import pickle
import subprocess
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import xxhash

from argse_cli.data.cifar import (
    SPECS,
    RestrictedUnpickler,
    data_fingerprint,
    load_cifar,
    restricted_loads,
)
from argse_cli.data.synthetic import write_synthetic_cifar10, write_synthetic_cifar100
from argse_cli.errors import ArgseError

SHARED = Path(__file__).resolve().parents[2] / "shared"
BUILD = SHARED / "data" / "cifar10" / "build_cifar10.py"


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _load_quiet(dataset, root, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return load_cifar(dataset, root, **kw)


@pytest.fixture(scope="module")
def syn100(tmp_path_factory):
    root = tmp_path_factory.mktemp("c100")
    write_synthetic_cifar100(root, n_train_per_class=6, n_test_per_class=2, seed=0)
    return root


@pytest.fixture
def syn10(tmp_path):
    write_synthetic_cifar10(tmp_path, n_train_per_class=7, n_test_per_class=3, seed=1)
    return tmp_path


# ---------------------------------------------------------------- restricted unpickler
def test_restricted_unpickler_refuses_os_system(capfd):
    payload = pickle.dumps(_Evil(), protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="system"):
        restricted_loads(payload)
    assert "pwned" not in capfd.readouterr().out  # never executed


@pytest.mark.parametrize("proto", [2, 4])
def test_restricted_unpickler_refuses_other_globals(proto):
    for obj in (eval, getattr, subprocess.Popen, types.SimpleNamespace(a=1)):
        with pytest.raises(pickle.UnpicklingError):
            restricted_loads(pickle.dumps(obj, protocol=proto))


def test_restricted_unpickler_accepts_numpy_protocol2():
    d = {b"data": np.arange(12, dtype=np.uint8).reshape(2, 6), b"labels": [1, 2]}
    got = RestrictedUnpickler(io.BytesIO(pickle.dumps(d, 2)), encoding="bytes").load()
    assert np.array_equal(got[b"data"], d[b"data"]) and got[b"labels"] == [1, 2]


def test_malicious_data_file_refused_by_loader(syn10, capfd):
    path = syn10 / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(pickle.dumps(_Evil(), protocol=2))
    with pytest.raises(ArgseError) as e:
        _load_quiet("cifar10", syn10)
    assert "data_batch_3" in e.value.problem
    assert "pwned" not in capfd.readouterr().out


# ---------------------------------------------------------------- synthetic sets through load_cifar
def test_synthetic_cifar100_loads(syn100):
    with pytest.warns(UserWarning, match="MD5") as rec:
        d = load_cifar("cifar100", syn100)
    assert len([w for w in rec if "MD5" in str(w.message)]) == 1  # one warning for all files
    assert d.md5_mismatch == ["train", "test", "meta"]
    assert d.num_classes == 100 and d.dataset == "cifar100"
    assert d.x_train.shape == (600, 32, 32, 3) and d.x_train.dtype == np.uint8
    assert d.x_test.shape == (200, 32, 32, 3)
    assert d.y_train.dtype == np.int64 and d.y_test.dtype == np.int64
    assert np.bincount(d.y_train, minlength=100).tolist() == [6] * 100
    assert np.bincount(d.y_test, minlength=100).tolist() == [2] * 100
    assert np.array_equal(d.y_train_coarse, d.y_train // 5)
    assert [p.name for p in d.files] == ["train", "test", "meta"]
    assert len(d.class_names) == 100
    # HWC conversion: pixel (h, w, ch) is the raw CHW row entry ch*1024 + h*32 + w
    raw = pickle.loads((syn100 / "cifar-100-python" / "train").read_bytes())[b"data"]
    i, h, w, ch = 17, 3, 29, 2
    assert d.x_train[i, h, w, ch] == raw[i, ch * 1024 + h * 32 + w]


def test_synthetic_cifar10_loads_batches_in_order(syn10):
    d = _load_quiet("cifar10", syn10)
    assert d.x_train.shape == (70, 32, 32, 3) and d.x_test.shape == (30, 32, 32, 3)
    base = syn10 / "cifar-10-batches-py"
    ys = sum(
        (pickle.loads((base / f).read_bytes())[b"labels"] for f in SPECS["cifar10"].train_files), []
    )
    assert d.y_train.tolist() == ys
    assert d.md5_mismatch == list(SPECS["cifar10"].files)


def test_fingerprint(syn10, tmp_path_factory):
    d = _load_quiet("cifar10", syn10)
    base = syn10 / "cifar-10-batches-py"
    expect = xxhash.xxh3_128(b"".join((base / f).read_bytes() for f in SPECS["cifar10"].files))
    assert d.fingerprint == expect.hexdigest() == data_fingerprint("cifar10", syn10)
    other = tmp_path_factory.mktemp("c10b")
    write_synthetic_cifar10(other, n_train_per_class=7, n_test_per_class=3, seed=2)
    assert data_fingerprint("cifar10", other) != d.fingerprint
    meta = base / "batches.meta"
    meta.write_bytes(meta.read_bytes() + b" ")
    assert data_fingerprint("cifar10", syn10) != d.fingerprint


# ---------------------------------------------------------------- user-facing errors
def test_missing_root_names_data_root(tmp_path):
    with pytest.raises(ArgseError) as e:
        load_cifar("cifar10", tmp_path / "nowhere")
    assert e.value.field == "data_root"
    assert "no cifar-10-batches-py/ under" in e.value.problem
    assert "build_cifar10.py" in e.value.fix and "--download" in e.value.fix
    with pytest.raises(ArgseError) as e:
        data_fingerprint("cifar100", tmp_path)
    assert e.value.field == "data_root" and "--download" in e.value.fix
    assert "cifar-100-python" in e.value.problem


def test_missing_file_named(syn10):
    (syn10 / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(ArgseError) as e:
        load_cifar("cifar10", syn10)
    assert e.value.field == "data_root" and "test_batch" in e.value.problem


def test_truncated_pickle_names_file(syn10):
    path = syn10 / "cifar-10-batches-py" / "data_batch_2"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ArgseError) as e:
        _load_quiet("cifar10", syn10)
    assert e.value.field == "data_root"
    assert str(path) in e.value.problem and "truncated or corrupt" in e.value.problem


def test_labels_out_of_range(syn10):
    path = syn10 / "cifar-10-batches-py" / "test_batch"
    d = pickle.loads(path.read_bytes())
    d[b"labels"][0] = 10
    path.write_bytes(pickle.dumps(d, protocol=2))
    with pytest.raises(ArgseError) as e:
        _load_quiet("cifar10", syn10)
    assert "outside [0, 10)" in e.value.problem and "test_batch" in e.value.problem


def test_unknown_dataset(tmp_path):
    with pytest.raises(ArgseError) as e:
        load_cifar("svhn", tmp_path)
    assert e.value.field == "dataset"


def test_download_uses_torchvision_lazily(tmp_path, monkeypatch):
    calls = []

    class FakeCIFAR100:
        def __init__(self, root, train=True, download=False):
            calls.append((root, train, download))
            write_synthetic_cifar100(root, n_train_per_class=1, n_test_per_class=1)

    fake = types.ModuleType("torchvision")
    fake.datasets = types.SimpleNamespace(CIFAR100=FakeCIFAR100, CIFAR10=None)
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    d = _load_quiet("cifar100", tmp_path / "dl", download=True)
    assert calls == [(str(tmp_path / "dl"), True, True)]
    assert len(d.y_train) == 100


def test_download_failure_is_user_error(tmp_path, monkeypatch):
    class Offline:
        def __init__(self, *a, **k):
            raise RuntimeError("no network")

    fake = types.ModuleType("torchvision")
    fake.datasets = types.SimpleNamespace(CIFAR10=Offline, CIFAR100=Offline)
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    with pytest.raises(ArgseError) as e:
        load_cifar("cifar10", tmp_path, download=True)
    assert e.value.field == "download" and "no network" in e.value.problem


def test_no_torch_at_import():
    code = (
        "import sys, argse_cli.data, argse_cli.data.cifar, argse_cli.data.splits, "
        "argse_cli.data.groups, argse_cli.data.longtail, argse_cli.data.synthetic; "
        "bad = [m for m in ('torch', 'torchvision', 'scipy', 'zarr') if m in sys.modules]; "
        "assert not bad, bad"
    )
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def test_official_md5_table_matches_torchvision_facts():
    assert SPECS["cifar10"].md5["data_batch_1"] == "c99cafc152244af753f735de768cd75f"
    assert SPECS["cifar10"].md5["batches.meta"] == "5ff9c542aee3614f3951f8cda6e48888"
    assert SPECS["cifar100"].md5["train"] == "16019d7e3df5f24257cddd939b257f8d"
    assert set(SPECS["cifar10"].md5) == set(SPECS["cifar10"].files)
    assert set(SPECS["cifar100"].md5) == set(SPECS["cifar100"].files)


# ---------------------------------------------------------------- the real offline CIFAR-10 copy
@pytest.fixture(scope="module")
def real_cifar10(tmp_path_factory):
    if not BUILD.is_file():
        pytest.skip("../shared/data/cifar10 not present (offline CIFAR-10 copy)")
    # Built once and kept beside pytest's numbered temp dirs (which pytest prunes; this one it
    # leaves), so only the first run pays the ~10-20 s build. The script is idempotent and writes
    # atomically (temp dir + rename); a complete copy is left alone.
    root = tmp_path_factory.getbasetemp().parent / "argse-cifar10-offline"
    base = root / "cifar-10-batches-py"
    if not all((base / f).is_file() for f in SPECS["cifar10"].files):
        root.mkdir(parents=True, exist_ok=True)
        run = subprocess.run([sys.executable, str(BUILD), str(root)], capture_output=True)
        if run.returncode and not all((base / f).is_file() for f in SPECS["cifar10"].files):
            raise RuntimeError(run.stderr.decode()[-2000:])
    return root


def test_real_offline_copy(real_cifar10):
    with pytest.warns(UserWarning, match="MD5"):
        d = load_cifar("cifar10", real_cifar10)
    assert d.x_train.shape == (50000, 32, 32, 3) and d.x_test.shape == (10000, 32, 32, 3)
    assert np.bincount(d.y_train).tolist() == [5000] * 10
    assert np.bincount(d.y_test).tolist() == [1000] * 10
    # official batches.meta byte for byte; the JPEG-re-encoded data files are not official
    assert d.md5_mismatch == [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    meta = real_cifar10 / "cifar-10-batches-py" / "batches.meta"
    assert hashlib.md5(meta.read_bytes()).hexdigest() == SPECS["cifar10"].md5["batches.meta"]
    assert d.class_names[0] == "airplane" and d.class_names[9] == "truck"
    assert d.fingerprint == data_fingerprint("cifar10", real_cifar10)

    from argse_cli.data.groups import get_class_to_group
    from argse_cli.data.longtail import lt_class_counts
    from argse_cli.data.splits import check_disjoint, make_splits

    counts = lt_class_counts(5000, 10, 100)
    res = make_splits(d.y_train, d.y_test, counts, "paper", None,
                      get_class_to_group(counts, "quantile:0.5"), seed=0)  # fmt: skip
    check_disjoint(res)
    assert len(res["train"]) == 12406 and len(res["test"]) == 6000
