"""CIFAR-10 / CIFAR-100 reader for the official python layout, with a restricted unpickler.

Layouts: <root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta} and
<root>/cifar-100-python/{train, test, meta}. Each data file is a pickled dict (bytes keys) with
b"data" = uint8 [N, 3072] (CHW rows) and b"labels" (CIFAR-10) or b"fine_labels" (CIFAR-100).
"""

from __future__ import annotations

import codecs
import hashlib
import io
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xxhash

from argse_cli.errors import ArgseError

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct


@dataclass(frozen=True)
class CifarSpec:
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: bytes
    names_key: bytes
    num_classes: int
    md5: dict[str, str]  # official MD5 of each file (torchvision's table)

    @property
    def files(self) -> tuple[str, ...]:
        """Fixed order used for reading and for the fingerprint."""
        return self.train_files + self.test_files + (self.meta_file,)


SPECS = {
    "cifar10": CifarSpec(
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        meta_file="batches.meta",
        label_key=b"labels",
        names_key=b"label_names",
        num_classes=10,
        md5={
            "data_batch_1": "c99cafc152244af753f735de768cd75f",
            "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
            "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
            "data_batch_4": "634d18415352ddfa80567beed471001a",
            "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
            "test_batch": "40351d587109b95175f43aff81a1287e",
            "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
        },
    ),
    "cifar100": CifarSpec(
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        meta_file="meta",
        label_key=b"fine_labels",
        names_key=b"fine_label_names",
        num_classes=100,
        md5={
            "train": "16019d7e3df5f24257cddd939b257f8d",
            "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
            "meta": "7973b15100ade9c7d40fb424638fde48",
        },
    ),
}

# Everything the official pickles (Python 2 cPickle of numpy arrays) and protocol-2 pickles written
# by Python 3 (bytes -> _codecs.encode) need. Nothing else is ever resolved.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy array-reconstruction globals the CIFAR files use."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"global {module}.{name} is not allowed in a CIFAR pickle"
            ) from None


def restricted_loads(data: bytes):
    """pickle.loads through RestrictedUnpickler with encoding='bytes' (the official recipe)."""
    return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()


@dataclass
class CifarData:
    dataset: str
    x_train: np.ndarray  # uint8 [N, 32, 32, 3] (HWC)
    y_train: np.ndarray  # int64 [N]
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    files: list[Path]
    fingerprint: str  # xxh3_128 hex of the files' bytes concatenated in spec order
    md5_mismatch: list[str] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    y_train_coarse: np.ndarray | None = None  # CIFAR-100 only
    y_test_coarse: np.ndarray | None = None


def _spec(dataset: str) -> CifarSpec:
    if dataset not in SPECS:
        raise ArgseError("dataset", f"unknown dataset {dataset!r}", "use cifar10 or cifar100")
    return SPECS[dataset]


def _missing_fix(dataset: str, root: Path) -> str:
    if dataset == "cifar10":
        return (
            f"run `python ../shared/data/cifar10/build_cifar10.py {root}` (offline copy) "
            "or pass --download"
        )
    return (
        f"pass --download, or place the official cifar-100-python/ (train, test, meta) under {root}"
    )


def _paths(dataset: str, root: Path) -> list[Path]:
    spec = _spec(dataset)
    base = Path(root) / spec.folder
    if not base.is_dir():
        raise ArgseError(
            "data_root", f"no {spec.folder}/ under {root}", _missing_fix(dataset, Path(root))
        )
    paths = [base / f for f in spec.files]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise ArgseError(
            "data_root", f"{base} lacks {', '.join(missing)}", _missing_fix(dataset, Path(root))
        )
    return paths


def data_fingerprint(dataset: str, root: Path) -> str:
    """xxh3_128 hex of the dataset files' bytes, concatenated in the fixed spec order (no unpickling)."""
    h = xxhash.xxh3_128()
    for p in _paths(dataset, Path(root)):
        with open(p, "rb") as f:
            while chunk := f.read(1 << 23):
                h.update(chunk)
    return h.hexdigest()


def _corrupt(path: Path, why: str) -> ArgseError:
    return ArgseError(
        "data_root",
        f"{path} is truncated or corrupt ({why})",
        "delete it and rebuild the offline copy or re-download the dataset",
    )


def _read_pickle(path: Path, raw: bytes) -> dict:
    try:
        obj = restricted_loads(raw)
    except Exception as e:  # truncated files raise EOFError/UnpicklingError/ValueError/...
        raise _corrupt(path, f"{type(e).__name__}: {e}") from e
    if not isinstance(obj, dict):
        raise _corrupt(path, f"expected a dict, found {type(obj).__name__}")
    return obj


def _labels(path: Path, d: dict, key: bytes, n: int, num_classes: int) -> np.ndarray:
    if key not in d:
        raise _corrupt(path, f"no {key!r} entry")
    try:
        y = np.asarray(d[key], dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise _corrupt(path, f"{key!r} is not a list of integers") from e
    if len(y) != n:
        raise _corrupt(path, f"{len(y)} labels for {n} images")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ArgseError(
            "data_root",
            f"{path} has labels outside [0, {num_classes}) (min {y.min()}, max {y.max()})",
            "point data_root at an unmodified CIFAR copy and check the dataset name",
        )
    return y


def _images(path: Path, d: dict) -> np.ndarray:
    x = d.get(b"data")
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        what = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise _corrupt(path, f"b'data' should be uint8 [N, 3072], found {what}")
    return x


def _download(dataset: str, root: Path) -> None:
    try:
        from torchvision import datasets as tvd  # lazy: heavy import
    except ImportError as e:
        raise ArgseError(
            "download", "torchvision is not installed", "install torchvision or place the files"
        ) from e
    cls = tvd.CIFAR10 if dataset == "cifar10" else tvd.CIFAR100
    Path(root).mkdir(parents=True, exist_ok=True)
    try:
        cls(str(root), train=True, download=True)
    except Exception as e:
        raise ArgseError(
            "download",
            f"downloading {dataset} into {root} failed ({type(e).__name__}: {e})",
            "check the network, or drop --download and use files already under data_root",
        ) from e


def load_cifar(dataset: str, root: Path, download: bool = False) -> CifarData:
    """Read the official python layout under root (HWC uint8 images, int64 labels).

    Files whose MD5 differs from the official release (e.g. the offline CIFAR-10 copy) are listed
    in md5_mismatch and reported in one UserWarning; they are not an error.
    """
    spec = _spec(dataset)
    root = Path(root)
    if download:
        _download(dataset, root)
    paths = _paths(dataset, root)
    h = xxhash.xxh3_128()
    mismatch: list[str] = []
    xs: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    ys: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    coarse: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    class_names: list[str] = []
    for p in paths:
        raw = p.read_bytes()
        h.update(raw)
        if hashlib.md5(raw).hexdigest() != spec.md5[p.name]:
            mismatch.append(p.name)
        d = _read_pickle(p, raw)
        del raw
        if p.name == spec.meta_file:
            names = d.get(spec.names_key, [])
            class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
            continue
        part = "train" if p.name in spec.train_files else "test"
        x = _images(p, d)
        xs[part].append(x)
        ys[part].append(_labels(p, d, spec.label_key, len(x), spec.num_classes))
        if dataset == "cifar100":
            coarse[part].append(_labels(p, d, b"coarse_labels", len(x), 20))
    if mismatch:
        warnings.warn(
            f"{dataset}: MD5 differs from the official release for {', '.join(mismatch)} "
            "(e.g. the offline CIFAR-10 copy or a synthetic set; results may differ from published numbers)",
            UserWarning,
            stacklevel=2,
        )

    def hwc(parts: list[np.ndarray]) -> np.ndarray:
        x = np.concatenate(parts) if len(parts) > 1 else parts[0]
        return np.ascontiguousarray(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))

    return CifarData(
        dataset=dataset,
        x_train=hwc(xs["train"]),
        y_train=np.concatenate(ys["train"]),
        x_test=hwc(xs["test"]),
        y_test=np.concatenate(ys["test"]),
        num_classes=spec.num_classes,
        files=paths,
        fingerprint=h.hexdigest(),
        md5_mismatch=mismatch,
        class_names=class_names,
        y_train_coarse=np.concatenate(coarse["train"]) if coarse["train"] else None,
        y_test_coarse=np.concatenate(coarse["test"]) if coarse["test"] else None,
    )
