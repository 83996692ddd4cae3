"""Content-addressed artifact store: ``<root>/<stage>/<key>/`` = Zarr group + manifest + marker.

Key = xxh3_128 of canonical JSON (sorted keys, no NaN) of {hash scheme, stage, stage version,
config minus runtime-only fields, upstream keys by role (lists keep their order), extra}.

Publishing is atomic: a writer fills ``<root>/<stage>/.tmp-<key>-<pid>-<rand>/`` on the same
filesystem, writes ``manifest.json`` then the ``COMPLETE`` marker, and renames the directory to
``<key>``. Readers refuse a directory without the marker. If another process published the same
key first, the rename fails and the finished artifact counts as a cache hit.

Array checksums are xxh3_128 over the *decoded* C-order bytes (whole array and per row-chunk),
so a missing chunk (Zarr would silently return the fill value) or a corrupted one is detected.
Zarr is imported lazily: a cache hit never imports it.

Resumable writers (``Store.writer(..., resumable=True)``) work in ``<root>/<stage>/.pending-<key>/``
instead: one directory per (stage, key) that survives a SIGKILL and is reused by the next writer
of the key (writers of a key are serialised by :meth:`Store.lock`). Only ``scratch/`` (checkpoints,
never published) and ``metrics.jsonl`` (the metrics log, published as a checksummed side file)
carry over to the next run; everything else in a stale pending dir is discarded when it starts.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from .errors import ArgseError, IntegrityError

HASH_SCHEME = 1  # the scheme new keys use
HASH_SCHEMES = frozenset({1})  # the schemes whose keys this argse can recompute
MARKER = "COMPLETE"
MANIFEST = "manifest.json"
DATA = "data.zarr"
FILES = "files"
METRICS = "metrics.jsonl"  # the metrics log (Writer.log_metrics), published as a side file
SCRATCH = "scratch"  # Writer.scratch(): never published
PENDING_PREFIX = ".pending-"  # <stage>/.pending-<key>: a resumable writer's working dir
TRASH_PREFIX = ".trash-"  # <stage>/.trash-<key>-<rand>: on its way out (removed by gc)
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$")
_KEY_RE = re.compile(r"^[0-9a-f]{4,32}$")
_STAGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")  # one path component, never "." / ".."
_MEMO_TMP_RE = re.compile(r"^\..*\.\d+\.tmp$")  # <root>/.fingerprints.<pid>.tmp and the like


def canonical_json(obj: Any) -> str:
    """Sorted keys, compact separators, NaN/inf refused."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=False)


def compute_key(
    stage: str, version: int, config: dict, upstream: dict | None = None, extra: dict | None = None,
    scheme: int = HASH_SCHEME,
) -> str:
    """xxh3_128 hex of the canonical JSON of everything that determines the artifact.

    ``scheme`` is the hash scheme (a manifest records its own; only :data:`HASH_SCHEMES` are
    known: a manifest naming another one cannot be checked and is refused)."""
    if scheme not in HASH_SCHEMES:
        raise ValueError(f"unknown hash scheme {scheme!r} (this argse knows {sorted(HASH_SCHEMES)})")
    payload = {
        "scheme": scheme,
        "stage": stage,
        "stage_version": version,
        "config": config,
        "upstream": upstream or {},
        "extra": extra or {},
    }
    return xxhash.xxh3_128_hexdigest(canonical_json(payload).encode())


def default_root() -> Path:
    return Path(os.environ.get("ARGSE_STORE", "./artifacts"))


def safe_name(name: str, what: str = "name") -> str:
    """Array / file names: no absolute paths, no '..', a restricted alphabet."""
    if not _NAME_RE.match(name) or any(p in ("..", ".") for p in name.split("/")):
        raise IntegrityError(what, f"refusing unsafe path {name!r}", "artifact names stay inside the store")
    return name


def _inside(base: Path, p: Path) -> Path:
    rp = p.resolve()
    if not rp.is_relative_to(base.resolve()):
        raise IntegrityError("path", f"{p} resolves outside the store", "remove the crafted manifest")
    return rp


def _host_tag(host: str | None = None) -> str:
    """8 hex digits naming the host (in temp dir names)."""
    return xxhash.xxh3_64_hexdigest((host or socket.gethostname()).encode())[:8]


def _check_stage(stage: Any) -> str:
    if not isinstance(stage, str) or not _STAGE_RE.match(stage):
        raise IntegrityError(
            "stage", f"refusing unsafe stage name {stage!r}", "remove the crafted manifest"
        )
    return stage


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _finite(obj: Any) -> Any:
    """JSON-ready copy of ``obj``: numpy / torch scalars as Python numbers, non-finite floats as
    None (null), tuples as lists."""
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, (str, bool, int)) or obj is None:
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    item = getattr(obj, "item", None)  # numpy / torch scalars and 0-d arrays
    if callable(item):
        with contextlib.suppress(Exception):
            return _finite(item())
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        with contextlib.suppress(Exception):
            return _finite(tolist())
    return str(obj)


def _file_xxh3(path: Path) -> str:
    """xxh3_128 of a file, read in 1 MiB blocks."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _trim_partial_line(path: Path) -> None:
    """Cut a last line that a kill left half-written (the log holds whole JSON lines only)."""
    try:
        with open(path, "rb+") as fh:
            data = fh.read()
            if data and not data.endswith(b"\n"):
                fh.truncate(data.rfind(b"\n") + 1)
    except OSError:
        pass


def settle_zarr_io(timeout: float = 60.0) -> None:
    """Wait until Zarr's event loop has no write (or read) in flight.

    Zarr runs an array's chunk and metadata writes as concurrent tasks; when one fails (a full
    disk), the error reaches the caller while its siblings are still writing. Removing the temp
    dir then races them: a late write recreates it (``mkdir(parents=True)``) and is left behind,
    or fails after the process has reported its error and prints a stray traceback at exit. So a
    failed writer first waits here for every task on Zarr's loop (their errors are collected and
    dropped: the first one is the one reported). No-op when Zarr was never used in this process."""
    import asyncio
    import sys

    zsync = sys.modules.get("zarr.core.sync")
    loop = getattr(zsync, "loop", [None])[0] if zsync is not None else None
    if loop is None or loop.is_closed() or not loop.is_running():
        return

    async def _settle() -> None:
        me = asyncio.current_task()
        while others := [t for t in asyncio.all_tasks() if t is not me and not t.done()]:
            await asyncio.gather(*others, return_exceptions=True)

    with contextlib.suppress(Exception):
        asyncio.run_coroutine_threadsafe(_settle(), loop).result(timeout)


def _rm(path: Path) -> None:
    """Remove a file, link or directory tree (never following a link)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


_PLACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def place_errno(e: BaseException | None) -> OSError | None:
    """The OSError with a full-disk / read-only / permission errno in ``e``'s chain, if any."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _PLACE_ERRNOS:
            return e
        e = e.__cause__ or e.__context__
    return None


def _tree_size(path: Path | None) -> int:
    """Bytes of the files under ``path`` (0 if it is gone)."""
    total = 0
    if path is None:
        return 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def _mib(n: float) -> str:
    """Bytes in a readable unit (KiB below 1 MiB, GiB from 1 GiB)."""
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.1f} KiB"


def _free_bytes(path: Path) -> int | None:
    """Free bytes on the file system holding ``path`` (its nearest existing ancestor)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def place_error(
    e: OSError, field: str, path: Path | None, needed: int | None = None, given: int = 0,
    free: int | None = None,
) -> ArgseError:
    """One line for a write that failed for lack of space, a read-only file system or a
    permission: which path, and for a full disk how much the artifact needed (its temp dir on
    disk when the write failed, and the array bytes handed to the writer so far) vs what is free."""
    where = e.filename or path
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        if free is None:
            free = _free_bytes(Path(where) if where else Path("."))
        need = ""
        if needed is not None:
            of = f" ({_mib(given)} of array data given to the writer)" if given else ""
            need = f"; the artifact needed {_mib(needed)} on disk so far{of}"
        have = f", {_mib(free)} free" if free is not None else ""
        return ArgseError(
            field, f"no space left on the device writing {where}{need}{have}",
            "free some space (`argse gc`) or point --store at a larger disk; nothing was published",
        )  # fmt: skip
    if e.errno == errno.EROFS:
        return ArgseError(field, f"{where} is on a read-only file system", f"pass a writable {field}")
    return ArgseError(field, f"permission denied writing {where}", f"pass a {field} you may write to")


def check_out_dir(out: str | Path, field: str = "--out") -> Path:
    """An output directory given by the user: refused in one line if it is an existing file,
    lies under a file, or cannot be written (checked before any work; created later)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ArgseError(field, f"{out} exists and is not a directory",
                         "pass a directory (it is created when missing)")  # fmt: skip
    p = out
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise ArgseError(field, f"{p} is a file, so {out} cannot be created", "pass another directory")
    if not os.access(p, os.W_OK | os.X_OK):
        ro = _read_only(p)
        problem = f"{p} is on a read-only file system" if ro else f"{p} is not writable"
        raise ArgseError(field, problem, f"pass a {field} you may write to")
    return out


def check_out_file(out: str | Path, field: str = "--out") -> Path:
    """An output file given by the user: refused in one line if it is a directory or its
    directory cannot be created / written (an existing file is replaced atomically)."""
    out = Path(out)
    if out.is_dir():
        raise ArgseError(field, f"{out} is a directory", "pass a file name, e.g. decisions.npz")
    check_out_dir(out.parent if str(out.parent) else Path("."), field)
    return out


def _read_only(p: Path) -> bool:
    try:
        return bool(os.statvfs(p).f_flag & os.ST_RDONLY)
    except OSError:
        return False


class _Hasher:
    """Whole-array and per-row-chunk xxh3_128 over decoded C-order bytes."""

    def __init__(self) -> None:
        self.whole = xxhash.xxh3_128()
        self.chunks: list[str] = []

    def add(self, block: Any) -> None:
        import numpy as np

        b = np.ascontiguousarray(block)  # hashed through the buffer protocol: no bytes copy
        self.whole.update(b)
        self.chunks.append(xxhash.xxh3_128_hexdigest(b))


class RowWriter:
    """Append rows to a Zarr array; writes are buffered to whole row chunks."""

    def __init__(self, zarr_array: Any, hasher: _Hasher, chunk_rows: int, owner: Any = None):
        self._a, self._h, self._cr, self._owner = zarr_array, hasher, chunk_rows, owner
        self._buf: list[Any] = []
        self._nbuf = 0
        self._next = 0

    def append(self, block: Any) -> None:
        import numpy as np

        block = np.asarray(block, dtype=self._a.dtype)
        if self._owner is not None:
            self._owner.bytes_given += block.nbytes
        self._buf.append(block)
        self._nbuf += len(block)
        while self._nbuf >= self._cr:
            self._flush(self._cr)

    def _flush(self, n: int) -> None:
        import numpy as np

        data = np.concatenate(self._buf) if len(self._buf) > 1 else self._buf[0]
        out, rest = data[:n], data[n:]
        self._a[self._next : self._next + n] = out
        self._h.add(out)
        self._next += n
        self._buf = [rest] if len(rest) else []
        self._nbuf = len(rest)

    def close(self) -> None:
        if self._nbuf:
            self._flush(self._nbuf)
        if self._next != self._a.shape[0]:
            raise IntegrityError(
                "rows", f"wrote {self._next} of {self._a.shape[0]} rows", "report this bug"
            )


class Writer:
    """Fills a temp artifact directory; :meth:`Store.writer` publishes it."""

    def __init__(self, tmp: Path, *, resumable: bool = False, resumed: bool = False):
        self.tmp = tmp
        #: ``<root>/<stage>/.pending-<key>/`` of a resumable writer (None otherwise)
        self.pending: Path | None = tmp if resumable else None
        #: True when this run found state left by an earlier, interrupted run of the same key
        self.resumed = resumed
        #: live path of the metrics log (:meth:`log_metrics`); published as ``metrics.jsonl``
        self.metrics_path = tmp / METRICS
        self.meta: dict[str, Any] = {}
        self._arrays: dict[str, dict] = {}
        self._hashers: dict[str, _Hasher] = {}
        self._row_writers: list[RowWriter] = []
        self._files: dict[str, str] = {}
        self._group = None
        self._metrics_fh: Any = None
        self.bytes_given = 0  # array bytes handed to array() / rows() (for a full-disk message)
        self.published = False

    def scratch(self, name: str) -> Path:
        """A path under ``<temp or pending dir>/scratch/`` (parent dirs created) for state such
        as checkpoints: never published, removed when the artifact is published. In a resumable
        writer it survives a kill and is found again by the next writer of the same key."""
        safe_name(name, "scratch")
        p = self.tmp / SCRATCH / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def log_metrics(self, row: dict) -> None:
        """Append ``row`` as one JSON line to :attr:`metrics_path`, flushed at once (readable while
        the stage runs: ``argse show --follow KEY``). Non-finite floats are written as null."""
        if not isinstance(row, dict):
            raise TypeError(f"log_metrics takes a dict, not {type(row).__name__}")
        line = json.dumps(_finite(row), allow_nan=False, ensure_ascii=False)
        if self._metrics_fh is None:
            self._metrics_fh = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115
        self._metrics_fh.write(line + "\n")
        self._metrics_fh.flush()

    def _close_metrics(self) -> None:
        if self._metrics_fh is not None:
            with contextlib.suppress(OSError):
                self._metrics_fh.close()
            self._metrics_fh = None

    def _zgroup(self, name: str):
        import zarr

        if self._group is None:
            self._group = zarr.open_group(str(self.tmp / DATA), mode="w")
        parts = safe_name(name, "array").split("/")
        g = self._group
        for p in parts[:-1]:
            g = g.require_group(p)
        return g, parts[-1]

    def _create(self, name: str, shape: tuple, dtype: Any, chunk_rows: int | None) -> Any:
        import numpy as np

        g, leaf = self._zgroup(name)
        shape = tuple(int(s) for s in shape)
        cr = int(chunk_rows or max(1, shape[0] if shape else 1))
        cr = max(1, min(cr, shape[0])) if shape and shape[0] > 0 else 1
        chunks = (cr, *shape[1:]) if shape else ()
        arr = g.create_array(leaf, shape=shape, dtype=np.dtype(dtype), chunks=chunks, fill_value=0)
        self._arrays[name] = {
            "shape": list(shape),
            "dtype": np.dtype(dtype).str,
            "chunk_rows": cr if shape else 0,
        }
        return arr, cr

    def array(self, name: str, data: Any, chunk_rows: int | None = None) -> None:
        """Store a whole numpy array (chunked by rows: ``chunk_rows`` or one chunk)."""
        import numpy as np

        data = np.asarray(data)
        if data.dtype == object:
            raise TypeError(f"array {name}: object arrays are not stored")
        self.bytes_given += data.nbytes
        arr, cr = self._create(name, data.shape, data.dtype, chunk_rows)
        h = _Hasher()
        if data.ndim == 0:
            arr[...] = data
            h.add(data)
        else:
            arr[:] = data
            for s in range(0, max(len(data), 1), cr):
                h.add(data[s : s + cr])
        self._hashers[name] = h

    def rows(self, name: str, shape: tuple, dtype: Any, chunk_rows: int) -> RowWriter:
        """Stream an array row-block by row-block (buffered to whole chunks)."""
        arr, cr = self._create(name, shape, dtype, chunk_rows)
        h = _Hasher()
        self._hashers[name] = h
        rw = RowWriter(arr, h, cr, self)
        self._row_writers.append(rw)
        return rw

    def json(self, name: str, obj: Any) -> None:
        """A JSON side file (metrics, indices), checksummed in the manifest."""
        p = self.file_path(name)
        p.write_text(json.dumps(obj, indent=2, sort_keys=True, allow_nan=False))

    def file_path(self, name: str) -> Path:
        """Path for an arbitrary side file (figure, weights, LaTeX); checksummed at publish."""
        safe_name(name, "file")
        p = self.tmp / FILES / name
        p.parent.mkdir(parents=True, exist_ok=True)
        self._files[name] = ""
        return p

    def finalize(self) -> dict:
        for rw in self._row_writers:
            rw.close()
        self._close_metrics()
        if self.metrics_path.is_file():  # the metrics log becomes the side file metrics.jsonl
            if METRICS in self._files:
                raise IntegrityError(
                    METRICS, "written both by log_metrics and as a side file", "use one of them"
                )
            (self.tmp / FILES).mkdir(exist_ok=True)
            os.replace(self.metrics_path, self.tmp / FILES / METRICS)
            self._files[METRICS] = ""
        arrays = {}
        for name, info in self._arrays.items():
            h = self._hashers[name]
            arrays[name] = {**info, "xxh3": h.whole.hexdigest(), "chunk_xxh3": h.chunks}
        files = {}
        for name in self._files:
            p = self.tmp / FILES / name
            if p.exists():
                files[name] = xxhash.xxh3_128_hexdigest(p.read_bytes())
        return {"arrays": arrays, "files": files}


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for pkg in ("argse", "numpy", "torch", "torchvision", "zarr", "pydantic", "xxhash", "scipy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


def _git_state() -> dict[str, Any]:
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=here, capture_output=True, text=True, timeout=5,
            ).stdout.strip()
        )
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": dirty if commit else None}


# ------------------------------------------------------------------------------ manifests
_HEX32 = r"^[0-9a-f]{32}$"
_DTYPE = r"^[<>|=][biufcmMSUV][0-9]+(\[[A-Za-z0-9]+\])?$"  # numpy dtype.str; no objects


def _manifest_models() -> tuple[type, type]:
    """(ArrayInfo, Manifest): the Pydantic models of ``manifest.json`` (built on first use)."""
    global _MODELS
    if _MODELS is not None:
        return _MODELS
    from typing import Annotated

    from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

    Hex = Annotated[str, Field(pattern=_HEX32)]
    Count = Annotated[int, Field(ge=0, lt=2**63)]

    class ArrayInfo(BaseModel):
        """One stored array: shape, dtype, rows per chunk and its xxh3_128 checksums."""

        model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
        shape: list[Count] = Field(max_length=32)
        dtype: Annotated[str, Field(pattern=_DTYPE)]
        chunk_rows: Count
        xxh3: Hex
        chunk_xxh3: list[Hex]

        @model_validator(mode="after")
        def _chunks(self) -> ArrayInfo:
            if not self.shape:  # 0-d: one "chunk"
                want = {1}
            else:
                if self.chunk_rows < 1:
                    raise ValueError(f"chunk_rows is {self.chunk_rows} for an array with rows")
                n = self.shape[0]
                want = {-(-n // self.chunk_rows)} if n else {0, 1}
            if len(self.chunk_xxh3) not in want:
                raise ValueError(
                    f"chunk_xxh3 has {len(self.chunk_xxh3)} entries, shape {self.shape} with "
                    f"chunk_rows {self.chunk_rows} has {min(want)}"
                )
            return self

    class Manifest(BaseModel):
        """``manifest.json``: what determines the artifact (hashed into its key), the stage's
        meta and every array's / side file's checksum. Unknown fields are kept (forward
        compatible: the manifest's bytes are checksummed in COMPLETE anyway)."""

        model_config = ConfigDict(extra="allow", strict=True, frozen=True)
        stage: Annotated[str, Field(pattern=_STAGE_RE.pattern)]
        key: Annotated[str, Field(pattern=_KEY_RE.pattern)]
        stage_version: int
        hash_scheme: int
        config: dict[str, Any]
        upstream: dict[str, str | list[str]]
        upstream_stages: dict[str, str]
        extra: dict[str, Any]
        meta: dict[str, Any] = {}
        arrays: dict[str, ArrayInfo]
        files: dict[str, Hex]
        created: str = ""

        @field_validator("arrays", "files")
        @classmethod
        def _names(cls, v: dict) -> dict:
            for name in v:
                if not _NAME_RE.match(name) or any(p in ("..", ".") for p in name.split("/")):
                    raise ValueError(f"refusing unsafe path {name!r}")
            return v

        @model_validator(mode="after")
        def _upstream(self) -> Manifest:
            for role, ref in self.upstream.items():
                st = self.upstream_stages.get(role)
                if not isinstance(st, str) or not _STAGE_RE.match(st):
                    raise ValueError(f"upstream {role!r}: refusing unsafe stage name {st!r}")
                for k in ref if isinstance(ref, list) else [ref]:
                    if not _KEY_RE.match(k):
                        raise ValueError(f"upstream {role!r}: refusing unsafe artifact key {k!r}")
            return self

    _MODELS = (ArrayInfo, Manifest)
    return _MODELS


_MODELS: tuple[type, type] | None = None


def parse_manifest(raw: bytes) -> dict:
    """Parse and validate ``manifest.json`` bytes; ValueError with one line on any problem."""
    from pydantic import ValidationError

    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"manifest.json is not valid JSON ({e.__class__.__name__})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"manifest.json holds a {type(doc).__name__}, not an object")
    try:
        _manifest_models()[1].model_validate(doc)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = err["msg"].replace("\n", " ")
        more = f" (+{e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise ValueError(f"manifest.json: {loc}: {msg}{more}") from None
    return doc


def seal_text(key: str, manifest_bytes: bytes) -> str:
    """The content of COMPLETE: the key and the xxh3_128 of the manifest's bytes."""
    return json.dumps({"key": key, "manifest_xxh3": xxhash.xxh3_128_hexdigest(manifest_bytes)})


def _read_seal(marker: Path) -> dict | None:
    """COMPLETE's {key, manifest_xxh3}, or None if it is not a valid marker."""
    try:
        with open(marker, "rb") as fh:
            seal = json.loads(fh.read(4096))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    ok = (
        isinstance(seal, dict)
        and isinstance(seal.get("key"), str)
        and isinstance(seal.get("manifest_xxh3"), str)
        and re.match(_HEX32, seal["manifest_xxh3"]) is not None
    )
    return seal if ok else None


@dataclass
class Inspection:
    """What a folder ``<root>/<stage>/<key>`` holds (:meth:`Store.inspect`).

    ``state``: ``absent``, ``incomplete`` (no valid COMPLETE: never read; replaced by the next
    run; removed by gc), ``unreadable`` (sealed, but the manifest fails its checksum, its model
    or its key check: refused in one line until recomputed with --force) or ``complete``.
    """

    stage: str
    key: str
    path: Path
    state: str
    reason: str = ""
    artifact: Artifact | None = None


@dataclass
class Artifact:
    """A published, complete artifact (read-only)."""

    store: Store
    stage: str
    key: str
    path: Path
    manifest: dict

    @property
    def config(self) -> dict:
        return self.manifest["config"]

    @property
    def meta(self) -> dict:
        return self.manifest.get("meta", {})

    @property
    def upstream_keys(self) -> dict:
        return self.manifest.get("upstream", {})

    def upstream(self, role: str) -> Artifact | list[Artifact]:
        ref = self.upstream_keys[role]
        stage = self.manifest.get("upstream_stages", {}).get(role)
        if isinstance(ref, list):
            return [self.store.open(stage, k) for k in ref]
        return self.store.open(stage, ref)

    def array_names(self) -> list[str]:
        return list(self.manifest["arrays"])

    def _info(self, name: str) -> dict:
        try:
            return self.manifest["arrays"][name]
        except KeyError:
            raise IntegrityError(
                f"{self.stage}/{self.key[:12]}:{name}", "no such array", f"arrays: {self.array_names()}"
            ) from None

    def zarr(self, name: str) -> Any:
        import zarr

        safe_name(name, "array")
        _inside(self.path, self.path / DATA / name)
        try:
            return zarr.open_array(str(self.path / DATA / name), mode="r")
        except Exception as e:  # noqa: BLE001 - any decode/open failure is an integrity error
            raise IntegrityError(
                f"{self.stage}/{self.key[:12]}:{name}", f"cannot open array ({e.__class__.__name__})",
                f"run `argse verify {self.key[:12]}` and recompute with --force",
            ) from e

    def _fail(self, name: str, what: str) -> IntegrityError:
        return IntegrityError(
            f"{self.stage}/{self.key[:12]}:{name}", what,
            f"the artifact is corrupted; recompute it with --force (argse verify {self.key[:12]})",
        )

    def array(self, name: str, verify: bool = True) -> Any:
        """The whole array as numpy, checksum-verified (missing/corrupt chunks are errors)."""
        import numpy as np

        info = self._info(name)
        try:
            data = np.asarray(self.zarr(name)[...])
        except IntegrityError:
            raise
        except Exception as e:  # noqa: BLE001
            raise self._fail(name, f"unreadable chunk ({e.__class__.__name__})") from e
        if verify:
            self._check_chunks(name, np.asarray(data, order="C"), info)  # keeps 0-d
        return data

    def _check_chunks(self, name: str, data: Any, info: dict) -> None:
        import numpy as np

        cr = info["chunk_rows"]
        if list(data.shape) != info["shape"] or data.dtype != np.dtype(info["dtype"]):
            raise self._fail(name, "shape/dtype differ from the manifest")
        h = xxhash.xxh3_128()
        if data.ndim == 0:
            h.update(data.tobytes())
        else:
            for i, s in enumerate(range(0, max(len(data), 1), cr)):
                b = np.ascontiguousarray(data[s : s + cr])
                if xxhash.xxh3_128_hexdigest(b) != info["chunk_xxh3"][i]:
                    raise self._fail(name, f"row chunk {i} (rows {s}..{s + cr - 1}) fails its checksum")
                h.update(b)
        if h.hexdigest() != info["xxh3"]:
            raise self._fail(name, "checksum mismatch")

    def iter_chunks(self, name: str, order: Any = None) -> Iterator[tuple[int, Any]]:
        """Yield (row_start, block) one stored row chunk at a time, each checksum-verified."""
        import numpy as np

        info = self._info(name)
        z = self.zarr(name)
        cr, n = info["chunk_rows"], info["shape"][0]
        n_chunks = (n + cr - 1) // cr
        for i in range(n_chunks) if order is None else order:
            s = int(i) * cr
            try:
                block = np.ascontiguousarray(z[s : min(s + cr, n)])
            except Exception as e:  # noqa: BLE001
                raise self._fail(name, f"unreadable row chunk {i}") from e
            if xxhash.xxh3_128_hexdigest(block) != info["chunk_xxh3"][i]:
                raise self._fail(name, f"row chunk {i} (rows {s}..) fails its checksum")
            yield s, block

    def n_chunks(self, name: str) -> int:
        info = self._info(name)
        return (info["shape"][0] + info["chunk_rows"] - 1) // info["chunk_rows"]

    def json(self, name: str) -> Any:
        return json.loads(self.read_bytes(name))

    def read_bytes(self, name: str) -> bytes:
        """A side file's bytes, checked against the manifest's xxh3 (a damaged file is an error
        naming the artifact and the file, never silently different weights)."""
        b = self.file(name).read_bytes()
        if xxhash.xxh3_128_hexdigest(b) != self.manifest["files"][name]:
            raise self._fail(name, "file checksum mismatch")
        return b

    def file(self, name: str) -> Path:
        safe_name(name, "file")
        p = _inside(self.path, self.path / FILES / name)
        want = self.manifest.get("files", {}).get(name)
        if want is None or not p.exists():
            raise IntegrityError(f"{self.stage}/{self.key[:12]}:{name}", "missing file", "recompute with --force")
        return p

    def verify(self) -> list[str]:
        """Recompute every checksum; return a list of problems (empty = intact)."""
        problems = []
        for name in self.manifest["arrays"]:
            try:
                self.array(name, verify=True)
            except IntegrityError as e:
                problems.append(str(e))
            except Exception as e:  # noqa: BLE001 - whatever a damaged array does is a problem
                problems.append(f"{name}: unreadable ({e.__class__.__name__})")
        for name, digest in self.manifest.get("files", {}).items():
            p = self.path / FILES / name
            try:
                _inside(self.path, p)
                if not p.is_file():
                    problems.append(f"{name}: missing file")
                elif _file_xxh3(p) != digest:
                    problems.append(f"{name}: file checksum mismatch")
            except IntegrityError as e:
                problems.append(str(e))
            except OSError as e:
                problems.append(f"{name}: unreadable ({e.__class__.__name__})")
        return problems

    def copy_file(self, name: str, dst: Path) -> None:
        """Copy side file ``name`` to ``dst``, verified: the bytes written are the bytes whose
        xxh3 matches the manifest (a tampered file is refused and nothing is left at ``dst``)."""
        data = self.read_bytes(name)
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.partial")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, dst)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise


def _check_writer_key(
    stage: str, key: str, version: int, config: dict, upstream: dict, extra: dict
) -> None:
    """The writer's ``key`` must be ``compute_key`` of its stage, version, config, upstream, extra."""
    try:
        want = compute_key(stage, version, config, upstream, extra)
    except (ValueError, TypeError) as e:
        raise IntegrityError("key", f"cannot compute the key of {stage} ({e})", "report this bug") from None
    if want != key:
        raise IntegrityError(
            "key", f"{stage} writer called with key {key[:12]}, its config hashes to {want[:12]}",
            "report this bug (the key must be compute_key of the writer's arguments)",
        )  # fmt: skip


class Store:
    """The artifact store rooted at ``root`` (``--store`` / ``ARGSE_STORE`` / ``./artifacts``)."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_root()
        if self.root.exists() and not self.root.is_dir():
            raise ArgseError(
                "--store", f"{self.root} is a file, not a directory",
                "pass a directory (it is created when missing) via --store or ARGSE_STORE",
            )  # fmt: skip

    def dir(self, stage: str, key: str) -> Path:
        """``<root>/<stage>/<key>``; stage and key (they may come from a manifest) are checked
        to be single safe path components, so no manifest can point outside the store."""
        _check_stage(stage)
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise IntegrityError(
                "key", f"refusing unsafe artifact key {key!r}", "remove the crafted manifest"
            )
        return self.root / stage / key

    # ---- reading ---------------------------------------------------------------------------
    def inspect(self, stage: str, key: str) -> Inspection:
        """The state of ``<root>/<stage>/<key>`` (see :class:`Inspection`), checking, without
        reading any array: COMPLETE names the key and the manifest's xxh3; the manifest's bytes
        match it; the manifest passes its model; and the key recomputed from the manifest's own
        (hash_scheme, stage, stage_version, config, upstream, extra) is the folder's name.
        A ``--force`` replacement killed between its two renames is undone first."""
        d = self.dir(stage, key)
        if not os.path.lexists(d) and not self._restore_old(stage, key):
            return Inspection(stage, key, d, "absent")
        return self._inspect_path(stage, key, d)

    def _inspect_path(self, stage: str, key: str, d: Path) -> Inspection:
        def bad(state: str, why: str) -> Inspection:
            return Inspection(stage, key, d, state, why)

        if d.is_symlink() or not d.is_dir():
            return bad("unreadable", "the artifact folder is a link or a file")
        marker = d / MARKER
        if not marker.is_file():
            if not os.path.lexists(d):  # renamed away meanwhile (a --force swap, gc)
                return bad("absent", "")
            return bad("incomplete", "no COMPLETE marker (never finished, or the marker was deleted)")
        seal = _read_seal(marker)
        if seal is None:
            if not os.path.lexists(d):
                return bad("absent", "")
            return bad("incomplete", "COMPLETE marker is not valid (damaged, or an older argse)")
        if seal["key"] != key:
            return bad("unreadable", f"COMPLETE names key {seal['key'][:16]!r}, not the folder's")
        try:
            raw = (d / MANIFEST).read_bytes()
        except OSError as e:
            if not os.path.lexists(d):
                return bad("absent", "")
            return bad("unreadable", f"manifest.json unreadable ({e.__class__.__name__})")
        if xxhash.xxh3_128_hexdigest(raw) != seal["manifest_xxh3"]:
            return bad("unreadable", "manifest.json fails its checksum (changed after publishing)")
        try:
            doc = parse_manifest(raw)
        except ValueError as e:
            return bad("unreadable", str(e))
        if doc["stage"] != stage or doc["key"] != key:
            return bad("unreadable", f"manifest names {doc['stage']}/{doc['key'][:16]}, not this folder")
        try:
            want = compute_key(stage, doc["stage_version"], doc["config"], doc["upstream"],
                               doc["extra"], scheme=doc["hash_scheme"])  # fmt: skip
        except (ValueError, TypeError) as e:
            return bad("unreadable", f"key check impossible: {e}")
        if want != key:
            return bad(
                "unreadable",
                f"key check failed: the manifest's stage, version, config, upstream and extra hash "
                f"to {want[:12]}, not {key[:12]} (manifest edited?)",
            )
        return Inspection(stage, key, d, "complete", "", Artifact(self, stage, key, d, doc))

    def _restore_old(self, stage: str, key: str) -> bool:
        """``<key>`` is missing but a complete ``.old-<key>-*`` exists (a ``--force`` killed
        between its two renames): rename it back. True if ``<key>`` exists afterwards."""
        base = self.root / stage
        final = base / key
        try:
            olds = sorted(base.glob(f".old-{key}-*"))
        except OSError:
            return False
        for old in olds:
            if not os.path.lexists(final) and self._inspect_path(stage, key, old).state == "complete":
                with contextlib.suppress(OSError):
                    os.rename(old, final)  # fails harmlessly if a writer put <key> back meanwhile
        return os.path.lexists(final)

    def _refuse(self, ins: Inspection) -> ArgseError:
        if ins.state == "unreadable":
            return IntegrityError(
                f"{ins.stage}/{ins.key[:12]}", ins.reason,
                f"recompute it with --force (`argse verify {ins.key[:12]}` lists what is wrong)",
            )  # fmt: skip
        where = f" ({ins.path} is incomplete: {ins.reason})" if ins.state == "incomplete" else ""
        return ArgseError(
            "key", f"no complete {ins.stage} artifact {ins.key} in {self.root}{where}",
            "run the stage (again): it replaces an incomplete folder",
        )  # fmt: skip

    def exists(self, stage: str, key: str) -> bool:
        """True for a complete, intact-manifest artifact; False when absent or incomplete (or an
        unsafe name); an artifact whose manifest fails its checks raises IntegrityError (one
        line: a stage must neither call it cached nor silently replace it)."""
        try:
            ins = self.inspect(stage, key)
        except IntegrityError:  # an unsafe name never names a complete artifact
            return False
        if ins.state == "unreadable":
            raise self._refuse(ins)
        return ins.state == "complete"

    def open(self, stage: str | None, key: str) -> Artifact:
        """Open a complete artifact by stage and key (or key prefix; stage may be None).
        Incomplete or unreadable ones are refused in one line saying why."""
        if stage is not None and isinstance(key, str) and _KEY_RE.match(key):
            ins = self.inspect(stage, key)
            if ins.state != "absent":
                if ins.artifact is None:
                    raise self._refuse(ins)
                return ins.artifact
        ins = self.inspect(*self.resolve(key, stage))
        if ins.artifact is None:
            raise self._refuse(ins)
        return ins.artifact

    def resolve(self, key: str, stage: str | None = None) -> tuple[str, str]:
        """(stage, key) of the artifact folder whose key starts with ``key`` (complete or not:
        :meth:`open` then says what is wrong with it)."""
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise ArgseError("key", f"{key!r} is not an artifact key", "use a hex key from `argse ls`")
        hits = []
        if stage:
            _check_stage(stage)
        for st in [stage] if stage else self._stage_names():
            base = self.root / st
            with contextlib.suppress(OSError):
                for old in base.glob(f".old-{key}*"):
                    m = re.match(r"^\.old-([0-9a-f]{32})-", old.name)
                    if m:
                        self._restore_old(st, m.group(1))
            with contextlib.suppress(OSError):
                hits += [(st, d.name) for d in base.glob(f"{key}*") if _KEY_RE.match(d.name)]
        if not hits:
            where = f"{stage} " if stage else ""
            raise ArgseError(
                "key", f"no complete {where}artifact {key} in {self.root}",
                "run the upstream stage first (or pass --store)",
            )  # fmt: skip
        if len(hits) > 1:
            complete = [h for h in hits if self._state_quiet(*h) == "complete"]
            if len(complete) == 1:
                return complete[0]
            raise ArgseError("key", f"prefix {key} is ambiguous ({len(hits)} matches)", "give more digits")
        return hits[0]

    def _state_quiet(self, stage: str, key: str) -> str:
        try:
            return self.inspect(stage, key).state
        except ArgseError:
            return "unreadable"

    def _stage_names(self) -> list[str]:
        try:
            return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _STAGE_RE.match(p.name))
        except OSError:
            return []

    @contextlib.contextmanager
    def lock(self, stage: str, key: str, on_wait=None) -> Iterator[None]:
        """Exclusive per-key lock (flock): concurrent writers of one key run one at a time.

        The lock file is unlinked on release (while still held), so a run -- failed or not --
        leaves no lock file behind; a waiter that wakes up holding an unlinked file retries.
        """
        d = self.root / stage / ".locks"
        path = d / f"{key}.lock"
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            if place_errno(e) is None:
                raise
            raise place_error(e, "--store", d) from None
        waited = False
        while True:
            try:
                fh = open(path, "a+")  # closed below (or on retry)
            except FileNotFoundError:  # a failed first run pruned the empty dirs meanwhile
                d.mkdir(parents=True, exist_ok=True)
                continue
            except OSError as e:
                if place_errno(e) is None:
                    raise
                raise place_error(e, "--store", path) from None
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait and not waited:
                    on_wait()
                waited = True
                fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                same = os.stat(path).st_ino == os.fstat(fh.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            fh.close()  # the holder we waited for unlinked this file: lock the new one
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()

    def pending_dir(self, stage: str, key: str) -> Path:
        """``<root>/<stage>/.pending-<key>``: the working dir of a resumable writer of the key."""
        d = self.dir(stage, key)
        return d.parent / f"{PENDING_PREFIX}{key}"

    def _start_pending(self, pending: Path) -> tuple[bool, dict]:
        """Create or take over the pending dir; returns (resumed, the earlier writer's info).

        A stale pending dir keeps ``scratch/`` and ``metrics.jsonl`` (a half-written last line
        is cut); everything else (partial arrays, side files, manifest, marker) is discarded.
        """
        if pending.is_symlink() or (pending.exists() and not pending.is_dir()):
            pending.unlink()  # never follow a crafted link out of the store
        if not pending.is_dir():
            pending.mkdir(parents=True)
            return False, {}
        prev: dict = {}
        with contextlib.suppress(OSError, ValueError):
            prev = json.loads((pending / "writer.json").read_text())
        if not isinstance(prev, dict):
            prev = {}
        published_log = pending / FILES / METRICS  # a kill between finalize and the rename
        if published_log.is_file() and not (pending / METRICS).exists():
            os.replace(published_log, pending / METRICS)
        for child in pending.iterdir():
            if child.name == SCRATCH and child.is_dir() and not child.is_symlink():
                continue
            if child.name == METRICS and child.is_file() and not child.is_symlink():
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        _trim_partial_line(pending / METRICS)
        return True, prev

    @contextlib.contextmanager
    def writer(
        self, stage: str, key: str, *, config: dict, upstream: dict, upstream_stages: dict,
        version: int, extra: dict | None = None, replace: bool = False, resumable: bool = False,
    ) -> Iterator[Writer]:
        """Write into a temp dir; on success publish atomically; on error remove the temp dir.

        After the block, ``writer.published`` is True if this process published the artifact,
        False if another process had already published it (a cache hit).

        ``resumable=True``: the writer works in :meth:`pending_dir` (the caller holds
        :meth:`lock` for the key). A SIGKILLed run leaves it behind; the next writer of the key
        (also with ``replace=True``) finds ``scratch/`` and ``metrics.jsonl`` there, sets
        ``writer.resumed`` and logs ``{"event": "resumed", ...}``. If the block raises, the
        pending dir is kept when ``scratch/`` holds a file (resumable state), else removed.
        Publishing removes it (the pending dir itself is renamed to ``<key>``).
        """
        _check_stage(stage)
        base = self.root / stage
        extra = extra or {}
        _check_writer_key(stage, key, version, config, upstream, extra)
        tmp, resumed, prev, started = self._open_temp(base, stage, key, resumable)
        w = Writer(tmp, resumable=resumable, resumed=resumed)
        t0 = time.time()
        try:
            if resumed:
                w.log_metrics({
                    "event": "resumed", "time": started, "pid": os.getpid(),
                    "previous_pid": prev.get("pid"), "previous_started": prev.get("started"),
                })  # fmt: skip
            yield w
            sums = w.finalize()
            manifest = {
                "stage": stage,
                "key": key,
                "stage_version": version,
                "hash_scheme": HASH_SCHEME,
                "config": config,
                "upstream": upstream,
                "upstream_stages": upstream_stages,
                "extra": extra,
                "versions": _versions(),
                "git": _git_state(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "duration_s": round(time.time() - t0, 3),
                "meta": w.meta,
                **sums,
            }
            self._seal(tmp, stage, key, manifest)
            w.published = self._publish_sealed(tmp, base, stage, key, replace)
        except BaseException as e:
            w._close_metrics()
            settle_zarr_io()  # Zarr writes still in flight would race the cleanup below
            place = place_errno(e)
            needed = _tree_size(tmp) if place is not None else 0
            free = _free_bytes(tmp) if place is not None else None  # at the failure, not after
            keep = resumable and any(p.is_file() for p in (tmp / SCRATCH).rglob("*"))
            if not keep:
                shutil.rmtree(tmp, ignore_errors=True)
            if place is not None:
                raise place_error(place, "--store", tmp, needed, w.bytes_given, free) from None
            raise

    def _open_temp(
        self, base: Path, stage: str, key: str, resumable: bool
    ) -> tuple[Path, bool, dict, float]:
        """The writer's dir with its ``writer.json``: (dir, resumed, previous writer.json, start
        time). A fresh ``.tmp-<key>-<pid>-<rand>-h<host>`` dir, or the pending dir when
        ``resumable``. A full / read-only / missing store is a one-line place error."""
        tmp: Path | None = None
        try:
            base.mkdir(parents=True, exist_ok=True)
            if resumable:
                tmp = self.pending_dir(stage, key)
                resumed, prev = self._start_pending(tmp)
            else:
                # the host tag in the name lets gc attribute a temp dir whose writer was killed
                # before writer.json was written (a shared store may be used from several hosts)
                tmp = base / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}-h{_host_tag()}"
                tmp.mkdir(parents=True)  # parents: the stage dir may have been pruned meanwhile
                resumed, prev = False, {}
            started = time.time()
            info = {"pid": os.getpid(), "host": socket.gethostname(), "started": started,
                    "resumable": resumable}  # fmt: skip
            (tmp / "writer.json").write_text(json.dumps(info))
        except OSError as e:
            if tmp is not None and not resumable:
                shutil.rmtree(tmp, ignore_errors=True)
            if place_errno(e) is None:
                raise
            raise place_error(e, "--store", tmp or base) from None
        return tmp, resumed, prev, started

    def _seal(self, tmp: Path, stage: str, key: str, manifest: dict) -> None:
        """Write the manifest and the fsynced marker sealing it, then check ``tmp`` exactly as
        every reader will (refuse to publish what a reader would not accept)."""
        raw = json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False).encode()
        (tmp / MANIFEST).write_bytes(raw)
        # writer.json stays until the rename: a writer killed in the last instants (marker
        # written, not yet renamed) still leaves a temp dir that gc can attribute and remove
        with open(tmp / MARKER, "w") as fh:
            fh.write(seal_text(key, raw))
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
        check = self._inspect_path(stage, key, tmp)
        if check.state != "complete":
            raise IntegrityError(f"{stage}/{key[:12]}", f"refusing to publish: {check.reason}",
                                 "report this bug")  # fmt: skip

    def _publish_sealed(self, tmp: Path, base: Path, stage: str, key: str, replace: bool) -> bool:
        """Publish the sealed ``tmp`` (:meth:`_publish`) without its ``scratch/``; True if this
        call published it, False on a cache hit (``tmp`` is then removed)."""
        # scratch is never published: moved out (atomically) just before the rename
        trash = None
        if (tmp / SCRATCH).exists():
            trash = base / f"{TRASH_PREFIX}{key}-{uuid.uuid4().hex[:8]}"
            os.rename(tmp / SCRATCH, trash)
        published = self._publish(tmp, stage, key, replace)
        if published:
            with contextlib.suppress(OSError):
                (self.dir(stage, key) / "writer.json").unlink()
        else:  # a concurrent finisher won: a cache hit
            shutil.rmtree(tmp, ignore_errors=True)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        _fsync_dir(base)
        return published

    def _publish(self, tmp: Path, stage: str, key: str, replace: bool) -> bool:
        """Rename the sealed ``tmp`` to ``<key>``: True if this call published it, False if a
        complete artifact was already there (and ``replace`` is off: a cache hit).

        A complete ``<key>`` that is replaced (``--force``) is first renamed to ``.old-<key>-*``
        (restored by the next read if a kill lands between the two renames); an incomplete or
        unreadable ``<key>`` folder is renamed to ``.trash-<key>-*`` (atomically out of sight)
        and replaced. Both are deleted once the new artifact is in place.
        """
        base = tmp.parent
        final = self.dir(stage, key)
        for _ in range(16):
            ins = self._inspect_path(stage, key, final) if os.path.lexists(final) else None
            if ins is None:
                try:
                    os.rename(tmp, final)
                    return True
                except OSError as e:
                    if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                        continue  # someone else put <key> there meanwhile: look again
                    raise
            if ins.state == "complete" and not replace:
                return False
            prefix = ".old-" if ins.state == "complete" else TRASH_PREFIX
            aside = base / f"{prefix}{key}-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(final, aside)
            except FileNotFoundError:
                continue
            try:
                os.rename(tmp, final)
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    continue  # a reader restored / a writer published meanwhile: look again
                with contextlib.suppress(OSError):
                    os.rename(aside, final)  # put it back as it was
                raise
            _rm(aside)
            return True
        raise IntegrityError(f"{stage}/{key[:12]}", "could not publish: the folder kept changing",
                             "run the stage again")  # fmt: skip

    def new_dirs(self, stage: str) -> list[Path]:
        """The store / stage / lock dirs a run of ``stage`` would create (those not there yet)."""
        dirs = (self.root, self.root / stage, self.root / stage / ".locks")
        return [p for p in dirs if not p.exists()]

    def prune(self, created: list[Path]) -> None:
        """After a failed run: remove the dirs it created (:meth:`new_dirs`) if they are empty,
        so a failure leaves the store as it was."""
        for p in reversed(created):
            with contextlib.suppress(OSError):
                p.rmdir()

    def list(self) -> list[Artifact]:
        """Every complete artifact (incomplete / unreadable folders: :meth:`entries`)."""
        return [e.artifact for e in self.entries() if e.artifact is not None]

    def entries(self) -> list[Inspection]:
        """Every folder under the stage dirs, inspected: artifacts (``complete``, ``incomplete``,
        ``unreadable``), resumable writers' ``pending`` dirs, writers' ``temp`` dirs, and
        ``debris`` (``.old-*`` / ``.trash-*`` left by a kill; removed or restored by gc)."""
        out: list[Inspection] = []
        for st in self._stage_names():
            try:
                for old in (self.root / st).glob(".old-*"):  # a killed --force: undo it first
                    m = re.match(r"^\.old-([0-9a-f]{32})-", old.name)
                    if m:
                        self._restore_old(st, m.group(1))
                children = sorted((self.root / st).iterdir())
            except OSError:
                continue
            for d in children:
                name = d.name
                if name == ".locks":
                    continue
                if _KEY_RE.match(name):
                    try:
                        out.append(self.inspect(st, name))
                    except ArgseError as e:
                        out.append(Inspection(st, name, d, "unreadable", e.problem))
                elif name.startswith(PENDING_PREFIX):
                    live, pid = self._writer_state(st, name[len(PENDING_PREFIX) :], d)
                    what = ("running" + (f", pid {pid}" if pid else "")) if live else "resumable"
                    out.append(Inspection(st, name[len(PENDING_PREFIX) :], d, "pending", what))
                elif name.startswith(".tmp-"):
                    out.append(Inspection(st, name, d, "temp", "a writer's temp dir"))
                elif name.startswith((".old-", TRASH_PREFIX)):
                    out.append(Inspection(st, name, d, "debris", "left by a kill; `argse gc` clears it"))
                elif not name.startswith("."):
                    out.append(Inspection(st, name, d, "unreadable", "not an artifact key"))
        return out

    def temp_dirs(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(self.root.glob("*/.tmp-*"))

    def pending_dirs(self) -> list[Path]:
        """Resumable writers' ``<stage>/.pending-<key>`` dirs (live or left by a kill)."""
        if not self.root.is_dir():
            return []
        return sorted(self.root.glob(f"*/{PENDING_PREFIX}*"))

    def _writer_state(
        self, stage: str, key: str, d: Path, check_lock: bool = True
    ) -> tuple[bool, int | None]:
        """(live, pid) of the writer of a pending / temp dir: live if the key's lock is held
        or its pid (same host) is alive."""
        info: Any = {}
        with contextlib.suppress(OSError, ValueError):
            info = json.loads((d / "writer.json").read_text())
        if not isinstance(info, dict):
            info = {}
        pid = info.get("pid")
        same_host = info.get("host") == socket.gethostname()
        alive = isinstance(pid, int) and pid > 0 and same_host and _pid_alive(pid)
        if check_lock and _KEY_RE.match(key) and self._lock_held(stage, key):
            alive = True
        return alive, pid if isinstance(pid, int) else None

    def _lock_held(self, stage: str, key: str) -> bool:
        """Someone holds :meth:`lock` for the key (a live writer, even in this process)."""
        path = self.root / stage / ".locks" / f"{key}.lock"
        try:
            fh = open(path)  # noqa: SIM115 - closed below; never created here
        except OSError:
            return False
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False
        finally:
            fh.close()  # closing drops a lock taken here
        return False

    def _remove(self, d: Path, key: str, dry_run: bool) -> None:
        """Make ``d`` invisible atomically (rename to ``.trash-<key>-*``), then delete it: a kill
        in between leaves only debris, never a half-deleted artifact that still looks complete."""
        if dry_run:
            return
        trash = d.parent / f"{TRASH_PREFIX}{key}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(d, trash)
        except OSError:
            return
        _rm(trash)

    def gc(
        self, max_age_s: float = 24 * 3600, keep: list[str] | None = None, dry_run: bool = False,
        pending: bool = False,
    ) -> list[str]:
        """Remove temp dirs whose writer is gone (or older than ``max_age_s``), never a live
        writer's; artifact folders without a valid COMPLETE; what kills leave behind.

        A dead resumable writer's pending dir is kept (it is resumable state) unless
        ``pending``; a live writer's never goes. With ``keep`` (keys), also remove artifacts
        (complete or unreadable) not reachable from those keys.
        """
        removed = []
        host = socket.gethostname()
        for tmp in self.temp_dirs():
            info_p = tmp / "writer.json"
            try:
                info = json.loads(info_p.read_text())
            except (OSError, ValueError):
                info = {}
            if not isinstance(info, dict):
                info = {}
            # no (readable) writer.json -- a writer killed in the instants before it was
            # written: fall back to the name ".tmp-<key>-<pid>-<rand>[-h<host tag>]"; without a
            # host tag (older names) the host is unknown and only age removes the dir
            m = re.match(r"^\.tmp-[0-9a-f]+-(\d+)-[0-9a-f]+(?:-h([0-9a-f]+))?$", tmp.name)
            try:
                pid = int(info.get("pid", m.group(1) if m else -1))
                age = time.time() - float(info.get("started", tmp.stat().st_mtime))
            except (TypeError, ValueError, OSError):
                continue
            if info:
                known, same_host = True, info.get("host") == host
            elif m and m.group(2):
                known, same_host = True, m.group(2) == _host_tag(host)
            else:
                known, same_host = False, True
            live = same_host and pid > 0 and _pid_alive(pid)
            if live:
                continue  # never remove a live writer's temp dir, however old
            if (known and same_host) or age > max_age_s:
                removed.append(str(tmp))
                if not dry_run:
                    shutil.rmtree(tmp, ignore_errors=True)
        if pending:
            for d in self.pending_dirs():
                stage, key = d.parent.name, d.name[len(PENDING_PREFIX) :]
                if not _KEY_RE.match(key):
                    continue
                with self._try_lock(stage, key) as got:  # a writer starting now waits for us
                    if not got or self._writer_state(stage, key, d, check_lock=False)[0]:
                        continue  # never a live writer's
                    removed.append(f"{d} (pending)")
                    self._remove(d, key, dry_run)
        for e in self.entries():
            if e.state == "incomplete" and self._remove_checked(e, ("incomplete",), dry_run):
                removed.append(f"{e.path} (incomplete: {e.reason})")
        removed += self._gc_debris(dry_run)
        if keep is not None:
            # everything reachable is opened first: an unreadable artifact on the way (its links
            # cannot be trusted) stops gc before anything is deleted; a missing upstream does not
            reach: set[str] = set()
            todo = [self.open(None, k) for k in keep]
            while todo:
                a = todo.pop()
                if a.key in reach:
                    continue
                reach.add(a.key)
                for role, ref in a.upstream_keys.items():
                    st = a.manifest.get("upstream_stages", {}).get(role)
                    for k in ref if isinstance(ref, list) else [ref]:
                        if self.exists(st, k):  # raises for an unreadable one
                            todo.append(self.open(st, k))
            for e in self.entries():
                states = ("complete", "unreadable")
                if e.state in states and e.key not in reach:
                    if self._remove_checked(e, states, dry_run):
                        removed.append(str(e.path))
        return removed

    def _remove_checked(self, e: Inspection, states: tuple[str, ...], dry_run: bool) -> bool:
        """Remove ``e`` (:meth:`_remove`) if it is still in one of ``states`` when looked at
        again while holding the key's lock (nobody writes it): a folder seen mid-swap by a
        concurrent ``--force`` is never removed. True if removed (or would be, dry run)."""
        if dry_run:
            return True
        with self._try_lock(e.stage, e.key) as got:
            if not got or self._inspect_path(e.stage, e.key, e.path).state not in states:
                return False
            self._remove(e.path, e.key, dry_run)
            return True

    @contextlib.contextmanager
    def _try_lock(self, stage: str, key: str) -> Iterator[bool]:
        """:meth:`lock` without waiting: yields False if another holder has it."""
        d = self.root / stage / ".locks"
        path = d / f"{key}.lock"
        try:
            d.mkdir(parents=True, exist_ok=True)
            fh = open(path, "a+")  # noqa: SIM115 - closed below
        except OSError:
            yield False
            return
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            yield False
            return
        try:
            same = os.stat(path).st_ino == os.fstat(fh.fileno()).st_ino
        except OSError:
            same = False
        try:
            yield same
        finally:
            if same:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()

    def _gc_debris(self, dry_run: bool, memo_age_s: float = 60.0) -> list[str]:
        """What a SIGKILLed process can leave besides its temp dir.

        - ``<stage>/.old-<key>-*``: a ``--force`` replacement killed between its two renames.
          If ``<key>`` exists the old copy goes; if not, the old (complete) copy is put back.
        - ``<stage>/.locks/<key>.lock`` that nobody holds: removed under the lock itself (the
          protocol of :meth:`lock`: a waiter that then wakes on the unlinked file retries).
        - ``<root>/.<memo>.<pid>.tmp`` (fingerprint memos are written then renamed within
          milliseconds): removed once older than ``memo_age_s``.
        """
        removed: list[str] = []
        if not self.root.is_dir():
            return removed
        for old in sorted(self.root.glob("*/.old-*")):
            m = re.match(r"^\.old-([0-9a-f]{32})-", old.name)
            final = old.parent / m.group(1) if m else None
            if (
                final is not None
                and not os.path.lexists(final)
                and self._inspect_path(old.parent.name, m.group(1), old).state == "complete"
            ):
                removed.append(f"{old} (restored as {final.name})")
                if not dry_run:
                    with contextlib.suppress(OSError):
                        os.rename(old, final)
                continue
            removed.append(str(old))
            if not dry_run:
                shutil.rmtree(old, ignore_errors=True)
        for trash in sorted(self.root.glob(f"*/{TRASH_PREFIX}*")):
            removed.append(str(trash))  # already invisible (renamed out): only the deletion is left
            if not dry_run:
                _rm(trash)
        for path in sorted(self.root.glob("*/.locks/*.lock")):
            try:
                fh = open(path, "a+")  # noqa: SIM115 - closed below
            except OSError:
                continue
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.close()  # held by a live writer (or waiter): keep
                continue
            try:
                if os.stat(path).st_ino == os.fstat(fh.fileno()).st_ino:
                    removed.append(str(path))
                    if not dry_run:
                        os.unlink(path)
            except OSError:
                pass
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
                fh.close()
        now = time.time()
        for path in sorted(self.root.glob(".*.tmp")):
            with contextlib.suppress(OSError):
                stale = now - path.stat().st_mtime > memo_age_s
                if _MEMO_TMP_RE.match(path.name) and path.is_file() and stale:
                    removed.append(str(path))
                    if not dry_run:
                        path.unlink()
        return removed


# ------------------------------------------------------------------------- following a log
FOLLOW_POLL_S = 1.0  # `argse show --follow` polls the metrics log this often
FOLLOW_GIVE_UP_POLLS = 3  # ... and gives up after this many polls finding its writer gone


def _live_dirs(store: Store, prefix: str) -> list[tuple[str, str, Path]]:
    """(stage, key, dir) of pending / temp dirs whose key starts with ``prefix``."""
    out = []
    for st in store._stage_names():
        base = store.root / st
        with contextlib.suppress(OSError):
            for d in base.glob(f"{PENDING_PREFIX}{prefix}*"):
                out.append((st, d.name[len(PENDING_PREFIX) :], d))
            for d in base.glob(f".tmp-{prefix}*"):
                m = re.match(r"^\.tmp-([0-9a-f]{32})-", d.name)
                if m:
                    out.append((st, m.group(1), d))
    return [x for x in out if _KEY_RE.match(x[1])]


def follow_metrics(store: Store, prefix: str, emit, poll_s: float | None = None) -> int:
    """``argse show --follow``: emit the metrics log's lines as they are appended, until the
    artifact is published (then return the number of lines); a published artifact's log is
    emitted whole. ``prefix`` may name a pending (or temp) dir's key. A writer that is gone
    without publishing is an error (after :data:`FOLLOW_GIVE_UP_POLLS` polls)."""
    if not isinstance(prefix, str) or not _KEY_RE.match(prefix):
        raise ArgseError("key", f"{prefix!r} is not an artifact key", "use a hex key from `argse ls --all`")
    poll = FOLLOW_POLL_S if poll_s is None else poll_s
    live = _live_dirs(store, prefix)
    if len({(st, k) for st, k, _ in live}) > 1:
        raise ArgseError("key", f"prefix {prefix} matches {len(live)} running or pending writers",
                         "give more digits")  # fmt: skip
    if not live:
        a = store.open(None, prefix)
        if METRICS not in a.manifest["files"]:
            raise ArgseError(f"{a.stage}/{a.key[:12]}", "has no metrics log",
                             "only stages that log metrics (Writer.log_metrics) have one")  # fmt: skip
        lines = a.read_bytes(METRICS).decode().splitlines()
        for line in lines:
            emit(line)
        return len(lines)
    # a live writer's dir is preferred over a dead one's (several temp dirs of one key)
    live.sort(key=lambda x: not store._writer_state(x[0], x[1], x[2])[0])
    stage, key, d = live[0]
    final = store.dir(stage, key)
    marker0 = _ino(final / MARKER)  # a --force run replaces a complete artifact: wait for a new one
    fh, buf, n, gone = None, b"", 0, 0

    def drain() -> None:
        nonlocal buf, n
        if fh is None:
            return
        buf += fh.read()
        *done, buf = buf.split(b"\n")
        for line in done:
            emit(line.decode(errors="replace"))
            n += 1

    try:
        while True:
            if fh is None and (d / METRICS).is_file():
                with contextlib.suppress(OSError):
                    fh = open(d / METRICS, "rb")  # noqa: SIM115 - closed below
            drain()
            ino = _ino(final / MARKER)
            if not d.exists() and ino is not None and ino != marker0 and store._state_quiet(stage, key) == "complete":
                if fh is not None:  # the log moved into the artifact with its inode: read on
                    drain()
                else:
                    a = store.open(stage, key)
                    if METRICS in a.manifest["files"]:
                        for line in a.read_bytes(METRICS).decode().splitlines():
                            emit(line)
                            n += 1
                return n
            alive = d.exists() and store._writer_state(stage, key, d)[0]
            gone = 0 if alive else gone + 1
            if gone >= FOLLOW_GIVE_UP_POLLS:
                what = "its pending dir is kept: rerun the stage to resume" if d.exists() else (
                    "rerun the stage (see its own error)")
                raise ArgseError(f"{stage}/{key[:12]}",
                                 f"the writer is gone without publishing ({n} metrics lines)", what)  # fmt: skip
            time.sleep(poll)
    finally:
        if fh is not None:
            fh.close()


def _ino(p: Path) -> int | None:
    try:
        return os.stat(p).st_ino
    except OSError:
        return None
