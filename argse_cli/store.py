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

HASH_SCHEME = 1
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
    stage: str, version: int, config: dict, upstream: dict | None = None, extra: dict | None = None
) -> str:
    """xxh3_128 hex of the canonical JSON of everything that determines the artifact."""
    payload = {
        "scheme": HASH_SCHEME,
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


def _trim_partial_line(path: Path) -> None:
    """Cut a last line that a kill left half-written (the log holds whole JSON lines only)."""
    try:
        with open(path, "rb+") as fh:
            data = fh.read()
            if data and not data.endswith(b"\n"):
                fh.truncate(data.rfind(b"\n") + 1)
    except OSError:
        pass


def _rm(path: Path) -> None:
    """Remove a file, link or directory tree (never following a link)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


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

    def __init__(self, zarr_array: Any, hasher: _Hasher, chunk_rows: int):
        self._a, self._h, self._cr = zarr_array, hasher, chunk_rows
        self._buf: list[Any] = []
        self._nbuf = 0
        self._next = 0

    def append(self, block: Any) -> None:
        import numpy as np

        block = np.asarray(block, dtype=self._a.dtype)
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
        rw = RowWriter(arr, h, cr)
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
        for name, digest in self.manifest.get("files", {}).items():
            p = self.path / FILES / name
            if not p.exists():
                problems.append(f"{name}: missing file")
            elif xxhash.xxh3_128_hexdigest(p.read_bytes()) != digest:
                problems.append(f"{name}: file checksum mismatch")
        return problems


class Store:
    """The artifact store rooted at ``root`` (``--store`` / ``ARGSE_STORE`` / ``./artifacts``)."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_root()

    def dir(self, stage: str, key: str) -> Path:
        """``<root>/<stage>/<key>``; stage and key (they may come from a manifest) are checked
        to be single safe path components, so no manifest can point outside the store."""
        _check_stage(stage)
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise IntegrityError(
                "key", f"refusing unsafe artifact key {key!r}", "remove the crafted manifest"
            )
        return self.root / stage / key

    def exists(self, stage: str, key: str) -> bool:
        try:
            d = self.dir(stage, key)
        except IntegrityError:  # an unsafe name never names a complete artifact
            return False
        return (d / MARKER).is_file()

    def open(self, stage: str | None, key: str) -> Artifact:
        """Open a complete artifact by stage and key (or key prefix; stage may be None)."""
        if stage is None or not self.exists(stage, key):
            stage, key = self.resolve(key, stage)
        d = self.dir(stage, key)
        try:
            manifest = json.loads((d / MANIFEST).read_text())
        except (OSError, ValueError) as e:
            raise IntegrityError(f"{stage}/{key[:12]}", "unreadable manifest", "recompute with --force") from e
        for name in manifest.get("arrays", {}):
            safe_name(name, "array")
        for name in manifest.get("files", {}):
            safe_name(name, "file")
        return Artifact(self, stage, key, d, manifest)

    def resolve(self, key: str, stage: str | None = None) -> tuple[str, str]:
        """Find the complete artifact whose key starts with ``key``."""
        if not _KEY_RE.match(key or ""):
            raise ArgseError("key", f"{key!r} is not an artifact key", "use a hex key from `argse ls`")
        hits = []
        if stage:
            _check_stage(stage)
        stages = [stage] if stage else sorted(p.name for p in self.root.glob("*") if p.is_dir())
        for st in stages:
            for d in (self.root / st).glob(f"{key}*"):
                if (d / MARKER).is_file():
                    hits.append((st, d.name))
        if not hits:
            where = f"{stage} " if stage else ""
            raise ArgseError(
                "key", f"no complete {where}artifact {key} in {self.root}",
                "run the upstream stage first (or pass --store)",
            )
        if len(hits) > 1:
            raise ArgseError("key", f"prefix {key} is ambiguous ({len(hits)} matches)", "give more digits")
        return hits[0]

    @contextlib.contextmanager
    def lock(self, stage: str, key: str, on_wait=None) -> Iterator[None]:
        """Exclusive per-key lock (flock): concurrent writers of one key run one at a time.

        The lock file is unlinked on release (while still held), so a run -- failed or not --
        leaves no lock file behind; a waiter that wakes up holding an unlinked file retries.
        """
        d = self.root / stage / ".locks"
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{key}.lock"
        waited = False
        while True:
            try:
                fh = open(path, "a+")  # closed below (or on retry)
            except FileNotFoundError:  # a failed first run pruned the empty dirs meanwhile
                d.mkdir(parents=True, exist_ok=True)
                continue
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
        (tmp / "writer.json").write_text(
            json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started,
                        "resumable": resumable})  # fmt: skip
        )
        w = Writer(tmp, resumable=resumable, resumed=resumed)
        if resumed:
            w.log_metrics({
                "event": "resumed", "time": started, "pid": os.getpid(),
                "previous_pid": prev.get("pid"), "previous_started": prev.get("started"),
            })  # fmt: skip
        t0 = time.time()
        try:
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
                "extra": extra or {},
                "versions": _versions(),
                "git": _git_state(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "duration_s": round(time.time() - t0, 3),
                "meta": w.meta,
                **sums,
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False))
            # writer.json stays until the rename: a writer killed in the last instants (marker
            # written, not yet renamed) still leaves a temp dir that gc can attribute and remove
            with open(tmp / MARKER, "w") as fh:
                fh.write(key)
                fh.flush()
                os.fsync(fh.fileno())
            _fsync_dir(tmp)
            # scratch is never published: moved out (atomically) just before the rename
            trash = None
            if (tmp / SCRATCH).exists():
                trash = base / f"{TRASH_PREFIX}{key}-{uuid.uuid4().hex[:8]}"
                os.rename(tmp / SCRATCH, trash)
            final = self.dir(stage, key)
            try:
                if replace and final.exists():
                    old = base / f".old-{key}-{uuid.uuid4().hex[:8]}"
                    os.rename(final, old)  # --force: swap only once the new one is complete
                    os.rename(tmp, final)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.rename(tmp, final)
                w.published = True
                with contextlib.suppress(OSError):
                    (final / "writer.json").unlink()
            except OSError:
                if not self.exists(stage, key):
                    raise
                w.published = False  # a concurrent finisher won: a cache hit
                shutil.rmtree(tmp, ignore_errors=True)
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)
            _fsync_dir(base)
        except BaseException:
            w._close_metrics()
            keep = resumable and any(p.is_file() for p in (tmp / SCRATCH).rglob("*"))
            if not keep:
                shutil.rmtree(tmp, ignore_errors=True)
            raise

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
        out = []
        if not self.root.exists():
            return out
        for stage_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for d in sorted(stage_dir.iterdir()):
                if d.name.startswith(".") or not (d / MARKER).is_file():
                    continue
                with contextlib.suppress(IntegrityError, ArgseError):
                    out.append(self.open(stage_dir.name, d.name))
        return out

    def temp_dirs(self) -> list[Path]:
        if not self.root.exists():
            return []
        return sorted(self.root.glob("*/.tmp-*"))

    def gc(self, max_age_s: float = 24 * 3600, keep: list[str] | None = None, dry_run: bool = False) -> list[str]:
        """Remove temp dirs whose writer is gone (or older than ``max_age_s``), never a live writer's.

        With ``keep`` (keys), also remove complete artifacts not reachable from those keys.
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
        removed += self._gc_debris(dry_run)
        if keep is not None:
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
                        with contextlib.suppress(ArgseError):
                            todo.append(self.open(st, k))
            for a in self.list():
                if a.key not in reach:
                    removed.append(str(a.path))
                    if not dry_run:
                        shutil.rmtree(a.path, ignore_errors=True)
        return removed

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
        if not self.root.exists():
            return removed
        for old in sorted(self.root.glob("*/.old-*")):
            m = re.match(r"^\.old-([0-9a-f]+)-", old.name)
            final = old.parent / m.group(1) if m else None
            if final is not None and not final.exists() and (old / MARKER).is_file():
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
