"""Readers for logits, labels and class counts produced outside argse ("bring your own experts").

A *spec* is a path, optionally followed by ``:key`` naming one array inside a container
(``file.npz:logits``, ``file.safetensors:test``, ``dir.zarr:group/array``, ``file.pt:logits``).
The key may be left out when the container holds exactly one array.

:func:`open_logits` returns a :class:`LogitsSource` (``.shape``, ``.dtype``, row slicing ``[a:b]``
and ``take(idx)``) that never loads a whole large file when the format allows slicing:

========================  ======================================================  ===========
format                    how rows are read                                       random rows
========================  ======================================================  ===========
``.npy``                  ``np.load(mmap_mode="r")``                              cheap
``.npz`` (stored member)  the member's bytes memory-mapped inside the zip         cheap
``.npz`` (deflated)       **the whole member is read into memory** (a compressed  cheap
                          zip member cannot be memory-mapped or sliced)
``.safetensors``          ``safe_open(framework="numpy").get_slice`` for row      cheap
                          blocks; the tensor's byte range memory-mapped for
                          random rows and for bf16 (numpy has no bf16)
Zarr array directory      ``zarr.open_array(mode="r")`` slices                    sequential
``.pt`` / ``.pth``        ``torch.load(weights_only=True, mmap=True)`` (a tensor  cheap
                          or a dict holding one under ``key``); a legacy non-zip
                          file is loaded whole
========================  ======================================================  ===========

"sequential" sources are read front to back in row blocks (never randomly); the importer
gathers a seeded row permutation from them window by window. bf16 rows are widened to float32
exactly. Labels / weights: ``.npy``, ``.npz[:key]``, ``.json`` (a list), ``.txt`` / ``.csv`` (one
value per line). Class counts: a JSON list or a CSV (one count per line, or ``class,count`` rows;
a header line is skipped).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import ArgseError

LOGITS_SUFFIXES = (".npy", ".npz", ".safetensors", ".pt", ".pth", ".zarr")
_FIX_FMT = "use .npy, .npz[:key], .safetensors[:key], a Zarr array directory or .pt[:key]"


def split_spec(spec: str, field: str = "file") -> tuple[Path, str | None]:
    """``"path[:key]"`` -> (path, key). A path that exists as written wins over a ``:key`` split."""
    p = Path(spec)
    if p.exists():
        return p, None
    if ":" in spec:
        head, key = spec.rsplit(":", 1)
        if Path(head).exists() and key:
            return Path(head), key
    raise ArgseError(
        field, f"{spec} not found", "give an existing file (path[:key] for containers)"
    )


def _is_zarr_dir(p: Path) -> bool:
    return p.is_dir() and any((p / m).exists() for m in ("zarr.json", ".zarray", ".zgroup"))


# ---------------------------------------------------------------------------------- sources
class LogitsSource:
    """Rows of a 2-D logits array [N, C]; subclasses read lazily.

    ``dtype`` is the numpy dtype of the blocks returned (bf16 sources return float32);
    ``source_dtype`` names the dtype on disk; ``random_access`` says whether ``take`` is cheap.
    """

    spec: str
    shape: tuple[int, ...]
    dtype: Any
    source_dtype: str
    random_access: bool = True
    field: str = "logits"  # named in errors (set by open_logits)

    def __len__(self) -> int:
        return int(self.shape[0])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def read(self, a: int, b: int) -> Any:
        raise NotImplementedError

    def __getitem__(self, sl: slice) -> Any:
        if not isinstance(sl, slice) or sl.step not in (None, 1):
            raise TypeError("logits sources support contiguous row slices [a:b] only; use take()")
        a, b, _ = sl.indices(len(self))
        return self.read(a, max(a, b))

    def take(self, idx: Any) -> Any:
        """Rows ``idx`` (any order) as one array; read in ascending order for locality."""
        import numpy as np

        idx = np.asarray(idx, dtype=np.int64)
        s = np.argsort(idx, kind="stable")
        block = self._take_sorted(idx[s])
        out = np.empty_like(block)
        out[s] = block
        return out

    def _take_sorted(self, idx: Any) -> Any:  # ascending indices
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        return self.read(lo, hi)[idx - lo]


class ArraySource(LogitsSource):
    """A numpy array or memmap (npy, stored npz member, torch mmap, in-memory)."""

    def __init__(self, spec: str, arr: Any, source_dtype: str | None = None):
        self.spec, self._a = spec, arr
        self.shape = tuple(int(s) for s in arr.shape)
        self.source_dtype = source_dtype or str(arr.dtype)
        self.dtype = _np_dtype(arr.dtype)

    def read(self, a: int, b: int) -> Any:
        import numpy as np

        return np.asarray(self._a[a:b])

    def _take_sorted(self, idx: Any) -> Any:
        import numpy as np

        return np.asarray(self._a[idx])


class SafetensorsSource(LogitsSource):
    """``safe_open(framework="numpy").get_slice`` for blocks; the tensor's bytes memory-mapped
    (offsets from the file header) for random rows and bf16."""

    def __init__(self, spec: str, path: Path, key: str | None):
        from safetensors import safe_open

        self.spec = spec
        self._f = safe_open(str(path), framework="numpy")
        keys = list(self._f.keys())
        key = _pick_key(keys, key, spec)
        self._slice = self._f.get_slice(key)
        self.shape = tuple(int(s) for s in self._slice.get_shape())
        st = self._slice.get_dtype()
        self.source_dtype = st
        dt = _SAFETENSORS_DTYPES.get(st)
        if dt is None:
            raise ArgseError(
                "logits", f"{spec}: unsupported safetensors dtype {st}", "store F16/BF16/F32/F64"
            )
        self._mm = _safetensors_memmap(path, key, dt, self.shape)
        self._bf16 = st == "BF16"
        self.dtype = _np_dtype("float32") if self._bf16 else _np_dtype(dt)

    def read(self, a: int, b: int) -> Any:
        import numpy as np

        if self._bf16:
            return _bf16_to_f32(np.asarray(self._mm[a:b]))
        return np.asarray(self._slice[a:b])

    def _take_sorted(self, idx: Any) -> Any:
        import numpy as np

        x = np.asarray(self._mm[idx])
        return _bf16_to_f32(x) if self._bf16 else x


class ZarrSource(LogitsSource):
    """A Zarr array (v2 or v3) read by row slices; random rows are not cheap (chunked, compressed)."""

    random_access = False

    def __init__(self, spec: str, path: Path, key: str | None):
        import zarr

        self.spec = spec
        try:
            node = zarr.open(str(path), mode="r")
            if key is not None:
                node = node[key]
            elif hasattr(node, "members"):
                arrays = [k for k, v in node.members() if hasattr(v, "dtype")]
                node = node[_pick_key(arrays, None, spec)]
        except ArgseError:
            raise
        except Exception as e:  # noqa: BLE001 - any open failure -> one line
            raise ArgseError(
                "logits", f"{spec}: cannot open as a Zarr array ({e.__class__.__name__})", _FIX_FMT
            ) from None
        self._z = node
        self.shape = tuple(int(s) for s in node.shape)
        self.source_dtype = str(node.dtype)
        self.dtype = node.dtype

    def read(self, a: int, b: int) -> Any:
        import numpy as np

        try:
            return np.asarray(self._z[a:b])
        except Exception as e:  # noqa: BLE001 - a damaged chunk (codec / decode errors) -> one line
            raise ArgseError(
                self.field, f"{self.spec}: rows {a}..{b - 1} unreadable ({e.__class__.__name__})",
                "re-save the Zarr array",
            ) from None  # fmt: skip


_SAFETENSORS_DTYPES = {"F16": "float16", "F32": "float32", "F64": "float64", "BF16": "uint16"}


def _np_dtype(name: str) -> Any:
    import numpy as np

    return np.dtype(name)


def _bf16_to_f32(u16: Any) -> Any:
    """bfloat16 bit patterns (uint16) -> float32, exactly (bf16 is the top half of a float32)."""
    import numpy as np

    return (np.asarray(u16, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def _safetensors_memmap(path: Path, key: str, dtype: str, shape: tuple) -> Any:
    """Memory-map one tensor: 8-byte little-endian header size n, n bytes of JSON, then data."""
    import numpy as np

    size = path.stat().st_size
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if n > size - 8:
            raise ArgseError("logits", f"{path}: header length {n} exceeds the file", "re-save the file")
        header = json.loads(fh.read(n))
    begin, end = header[key]["data_offsets"]
    if end - begin != int(np.prod(shape)) * np.dtype(dtype).itemsize or 8 + n + end > size:
        raise ArgseError(
            "logits", f"{path}:{key}: byte range does not match its shape", "re-save the file"
        )
    return np.memmap(path, dtype=dtype, mode="r", offset=8 + n + begin, shape=shape)


def _pick_key(keys: list[str], key: str | None, spec: str) -> str:
    if key is not None:
        if key not in keys:
            raise ArgseError(
                "logits", f"{spec}: no array {key!r} (has {keys[:8]})", "name an existing key"
            )
        return key
    if len(keys) == 1:
        return keys[0]
    raise ArgseError(
        "file", f"{spec} holds {len(keys)} arrays {keys[:8]}", "write path:key to pick one"
    )


def _npy_header(fh: Any, spec: str, field: str) -> tuple[tuple, bool, Any]:
    """(shape, fortran, dtype) of the .npy header at ``fh``'s position (left after it); a
    damaged header is a one-line error."""
    import numpy as np

    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    except Exception as e:  # noqa: BLE001 - numpy's header parser on untrusted bytes (tokenize, ...)
        raise ArgseError(
            field, f"{spec}: not a valid .npy header ({e.__class__.__name__})", "re-save the file"
        ) from None
    if dtype.hasobject:
        raise ArgseError(field, f"{spec}: object arrays are refused", "save a numeric array")
    return tuple(int(x) for x in shape), bool(fortran), dtype


def _check_size(shape: tuple, dtype: Any, available: int, spec: str, field: str) -> None:
    """A header whose shape needs more bytes than the file holds is refused (a truncated file,
    or a header claiming 10**12 rows) instead of reading past the end or allocating it."""
    import math

    need = math.prod(shape) * dtype.itemsize
    if need > available:
        raise ArgseError(
            field,
            f"{spec}: the header claims shape {shape} ({need:,} bytes) but the file holds "
            f"{max(available, 0):,} bytes of data (truncated or damaged)",
            "re-save the file",
        )


def _npy_checked(path: Path, spec: str, field: str) -> None:
    """Check a .npy file's header against its size before numpy maps or loads it."""
    with open(path, "rb") as fh:
        shape, _, dtype = _npy_header(fh, spec, field)
        data_at = fh.tell()
    _check_size(shape, dtype, path.stat().st_size - data_at, spec, field)


def _npz_member(path: Path, key: str | None, spec: str, field: str = "logits") -> Any:
    """A stored (uncompressed) npz member as a memmap; a deflated one read whole (documented)."""
    import zipfile

    import numpy as np

    try:
        with zipfile.ZipFile(path) as zf:
            names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
            key = _pick_key(names, key, spec)
            info = zf.getinfo(key + ".npy")
            stored = info.compress_type == zipfile.ZIP_STORED
            offset = info.header_offset
            if not stored:  # check the member's header against its uncompressed size first
                with zf.open(info) as m:
                    shape, _, dtype = _npy_header(m, spec, field)
                    _check_size(shape, dtype, info.file_size - m.tell(), spec, field)
    except ArgseError:
        raise
    except Exception as e:  # noqa: BLE001 - zipfile on untrusted bytes (BadZipFile, zlib, NotImplemented...)
        raise ArgseError(
            field, f"{spec}: not a valid .npz (zip) file ({e.__class__.__name__})",
            "re-save it with numpy.savez",
        ) from None  # fmt: skip
    if stored:
        with open(path, "rb") as fh:
            fh.seek(offset)
            local = fh.read(30)
            if len(local) < 30 or local[:4] != b"PK\x03\x04":
                raise ArgseError(field, f"{spec}: corrupt zip member header", "re-save the file")
            name_len = int.from_bytes(local[26:28], "little")
            extra_len = int.from_bytes(local[28:30], "little")
            fh.seek(offset + 30 + name_len + extra_len)
            shape, fortran, dtype = _npy_header(fh, spec, field)
            data_at = fh.tell()
        end = min(path.stat().st_size, offset + 30 + name_len + extra_len + info.file_size)
        _check_size(shape, dtype, end - data_at, spec, field)
        return np.memmap(
            path, dtype=dtype, mode="r", offset=data_at, shape=shape, order="F" if fortran else "C"
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            return z[key]
    except ValueError as e:  # an object member (numpy refuses to unpickle it)
        raise ArgseError(field, f"{spec}: not a numeric array ({e})", "save a float array") from None
    except Exception as e:  # noqa: BLE001 - a damaged member (zlib, CRC, ...)
        raise ArgseError(
            field, f"{spec}: damaged .npz member ({e.__class__.__name__})", "re-save the file"
        ) from None


def _torch_array(path: Path, key: str | None, spec: str) -> tuple[Any, str]:
    """(array-like, source dtype) of a tensor saved with torch.save (weights_only)."""
    import torch

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - a legacy (non-zip) file cannot be memory-mapped: load it whole
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - the weights-only unpickler refuses arbitrary objects
            raise ArgseError(
                "logits",
                f"{spec}: not loadable with weights_only=True ({e.__class__.__name__})",
                "save a tensor or a dict of tensors with torch.save",
            ) from None
    if isinstance(obj, dict):
        keys = [k for k, v in obj.items() if isinstance(v, torch.Tensor)]
        obj = obj[_pick_key(keys, key, spec)]
    elif key is not None:
        raise ArgseError(
            "logits", f"{spec}: the file holds one tensor, not a dict", "drop the :key"
        )
    if not isinstance(obj, torch.Tensor):
        raise ArgseError(
            "logits", f"{spec}: holds a {type(obj).__name__}, not a tensor", "save a tensor"
        )
    t = obj.detach()
    if t.dtype == torch.bfloat16:
        return _TorchRows(t), "bfloat16"
    return t.numpy(), str(t.dtype).replace("torch.", "")


class _TorchRows:
    """Row access to a bf16 tensor, widened to a float32 numpy array per request."""

    def __init__(self, t: Any):
        self._t, self.shape, self.dtype = t, tuple(t.shape), _np_dtype("float32")

    def __getitem__(self, idx: Any) -> Any:
        import numpy as np
        import torch

        if not isinstance(idx, slice):
            idx = torch.from_numpy(np.asarray(idx, dtype=np.int64))
        return self._t[idx].float().numpy()


def open_logits(spec: str, field: str = "logits") -> LogitsSource:
    """Open a logits spec ([N, C] floats) without loading it when the format allows slicing."""
    import numpy as np

    path, key = split_spec(spec, field)
    suffix = path.suffix.lower()
    if _is_zarr_dir(path) or suffix == ".zarr":
        src: LogitsSource = ZarrSource(spec, path, key)
    elif suffix == ".npy":
        if key is not None:
            raise ArgseError(field, f"{spec}: a .npy file holds one array", "drop the :key")
        _npy_checked(path, spec, field)
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise ArgseError(
                field, f"{spec}: not a numeric .npy ({e})", "save a float array"
            ) from None
        src = ArraySource(spec, arr)
    elif suffix == ".npz":
        src = ArraySource(spec, _npz_member(path, key, spec, field))
    elif suffix == ".safetensors":
        try:
            src = SafetensorsSource(spec, path, key)
        except ArgseError:
            raise
        except Exception as e:  # noqa: BLE001 - the Rust reader's errors -> one line
            raise ArgseError(
                field, f"{spec}: not a valid .safetensors file ({e.__class__.__name__})",
                "re-save it with safetensors",
            ) from None  # fmt: skip
    elif suffix in (".pt", ".pth"):
        arr, sdt = _torch_array(path, key, spec)
        src = ArraySource(spec, arr, source_dtype=sdt)
    else:
        raise ArgseError(
            field, f"{spec}: unknown logits format {suffix or '(no suffix)'}", _FIX_FMT
        )
    src.field = field
    dt = np.dtype(src.dtype)
    if dt.kind not in "fiu":
        raise ArgseError(
            field, f"{spec}: logits of dtype {dt} (need floats)", "save float16/32/64 logits"
        )
    return src


# ---------------------------------------------------------------------------------- vectors
def load_vector(spec: str, field: str) -> Any:
    """A 1-D array from .npy / .npz[:key] / .json (list) / .txt / .csv (one value per line)."""
    import numpy as np

    path, key = split_spec(spec, field)
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            _npy_checked(path, spec, field)
            v = np.load(path, allow_pickle=False)
        elif suffix == ".npz":
            v = np.asarray(_npz_member(path, key, spec, field))
        elif suffix == ".json":
            doc = json.loads(path.read_text())
            if isinstance(doc, dict) and key is not None:
                doc = doc[key]
            v = np.asarray(doc)
        elif suffix in (".txt", ".csv"):
            v = np.asarray(_csv_numbers(path, field)[:, -1])
        elif suffix in (".pt", ".pth"):
            arr, _ = _torch_array(path, key, spec)
            v = np.asarray(arr[:])
        else:
            raise ArgseError(
                field,
                f"{spec}: unknown format {suffix or '(no suffix)'}",
                "use .npy, .npz[:key], .json or .csv",
            )
    except ArgseError:
        raise
    except Exception as e:  # noqa: BLE001 - any parser failure on a user's file is "unreadable"
        raise ArgseError(
            field, f"{spec}: unreadable ({e.__class__.__name__}: {str(e)[:120]})",
            "save a 1-D numeric array",
        ) from None  # fmt: skip
    v = np.asarray(v)
    if v.ndim != 1 or v.dtype.kind not in "fiub":
        raise ArgseError(
            field,
            f"{spec}: need a 1-D numeric array, got shape {v.shape} dtype {v.dtype}",
            "save a 1-D numeric array",
        )
    return v


def _csv_numbers(path: Path, field: str) -> Any:
    import numpy as np

    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = [p.strip() for p in line.replace(";", ",").split(",") if p.strip()]
        try:
            rows.append([float(p) for p in parts])
        except ValueError:
            if rows:  # only the first line may be a header
                raise ArgseError(
                    field,
                    f"{path}: line {i + 1} is not numeric",
                    "one number (or class,count) per line",
                ) from None
    widths = {len(r) for r in rows}
    if not rows or len(widths) != 1 or widths.pop() not in (1, 2):
        raise ArgseError(field, f"{path}: need one value or class,value per line", "fix the CSV")
    a = np.asarray(rows, dtype=np.float64)
    if a.shape[1] == 2:  # class,count rows, any order: must name each class 0..C-1 once
        cls = a[:, 0]
        C = len(a)
        if not np.array_equal(np.sort(cls), np.arange(C)):
            raise ArgseError(
                field, f"{path}: the first column must list 0..{C - 1} once each", "fix the CSV"
            )
        a = a[np.argsort(cls)]
    return a


def load_int_vector(spec: str, field: str, minimum: int = 0) -> Any:
    """A 1-D int64 vector (integral values >= minimum) from any :func:`load_vector` format."""
    import numpy as np

    v = load_vector(spec, field)
    if v.dtype.kind == "f":
        if not np.all(np.isfinite(v)) or np.any(v != np.round(v)):
            raise ArgseError(field, f"{spec}: values must be integers", "store integer values")
    if v.dtype.kind in "fu" and len(v):
        big = np.abs(v.astype(np.float64)) >= 2.0**62
        if big.any():  # would wrap around in int64 (1e30 -> -9223372036854775808)
            i = int(np.argmax(big))
            raise ArgseError(
                field, f"{spec}: value {v[i]:.6g} at position {i} is too large for an integer",
                "store values below 2**62",
            )  # fmt: skip
    v = v.astype(np.int64)
    if len(v) and v.min() < minimum:
        i = int(np.argmax(v < minimum))
        raise ArgseError(
            field,
            f"{spec}: value {int(v[i])} at position {i} is below {minimum}",
            f"every value must be >= {minimum}",
        )
    return v


def load_class_counts(spec: str, field: str = "class_counts") -> Any:
    """Training class counts (int64 [C], every count >= 1 so that log pi_train is finite)."""
    v = load_int_vector(spec, field, minimum=0)
    if len(v) < 2:
        raise ArgseError(
            field, f"{spec}: {len(v)} classes", "list one training count per class (C >= 2)"
        )
    if (v == 0).any():
        i = int((v == 0).argmax())
        raise ArgseError(
            field,
            f"{spec}: class {i} has 0 training samples (log pi_train = -inf)",
            "every class needs at least one training sample",
        )
    return v


def file_stamp(path: Path) -> list:
    """(size, mtime_ns) of a file, or of every file under a directory (for fingerprint memos)."""
    path = Path(path)
    if path.is_dir():
        out = []
        for root, _, files in sorted(os.walk(path)):
            for f in sorted(files):
                p = Path(root) / f
                st = p.stat()
                out.append([str(p.relative_to(path)), st.st_size, st.st_mtime_ns])
        return out
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]
