"""Content-addressed store: atomic publish, checksums, corruption, crafted manifests, gc, keys,
and the stage runner (run_stage) on a fake stage."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
import xxhash

from argse_cli.errors import ArgseError, IntegrityError
from argse_cli.store import DATA, MANIFEST, MARKER, Store, compute_key, seal_text

REPO = Path(__file__).resolve().parents[1]


_CFG: dict[str, dict] = {}  # key -> the config it was computed from


def _key(i: object, stage: str = "s", upstream: dict | None = None) -> str:
    """The key of a test artifact of ``stage`` with config {"i": i} (what publish() writes)."""
    cfg = {"i": i}
    k = compute_key(stage, 1, cfg, upstream or {})
    _CFG[k] = cfg
    return k


def writer(store: Store, stage: str, key: str, **kw):
    return store.writer(stage, key, config=_CFG[key], upstream=kw.pop("upstream", {}),
                        upstream_stages=kw.pop("upstream_stages", {}), version=1, **kw)  # fmt: skip


def publish(store: Store, stage: str, key: str, fill, *, upstream=None, upstream_stages=None,
            replace: bool = False):  # fmt: skip
    with writer(store, stage, key, upstream=upstream or {}, upstream_stages=upstream_stages or {},
                replace=replace) as w:  # fmt: skip
        fill(w)
    return w


def reseal(d: Path) -> None:
    """Rewrite COMPLETE for the manifest as it is now (what a deliberate crafter would do)."""
    (d / MARKER).write_text(seal_text(d.name, (d / MANIFEST).read_bytes()))


def _stage_entries(store: Store, stage: str) -> list[str]:
    d = store.root / stage
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def _chunk_files(art, name: str) -> list[Path]:
    return sorted(p for p in (art.path / DATA / name / "c").rglob("*") if p.is_file())


# ------------------------------------------------------------------------------ round trip
def test_round_trip_arrays_rows_json_and_checksums(store_root):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((37, 5)).astype(np.float32)
    nested = np.arange(12, dtype=np.int64)
    scalar = np.float64(3.25)
    fort = np.asfortranarray(rng.standard_normal((6, 4)))
    empty = np.zeros((0, 3), dtype=np.int16)
    r = rng.integers(-1000, 1000, size=(10, 4)).astype(np.int32)
    side = {"acc": 0.5, "nested": {"list": [1, 2, 3]}}

    def fill(w):
        w.array("x", x, chunk_rows=8)  # 8 does not divide 37
        w.array("a/b", nested)
        w.array("scalar", scalar)
        w.array("fort", fort)
        w.array("empty", empty)
        rw = w.rows("r", r.shape, r.dtype, chunk_rows=3)  # 3 does not divide 10
        for s, e in ((0, 4), (4, 5), (5, 10)):  # blocks that straddle chunk borders
            rw.append(r[s:e])
        w.json("metrics.json", side)
        w.json("sub/more.json", [1, 2])
        w.meta["note"] = "hello"

    store = Store(store_root)
    key = _key("round")
    w = publish(store, "s", key, fill)
    assert w.published is True
    assert store.exists("s", key)
    assert store.temp_dirs() == []
    a = store.open("s", key)
    assert set(a.array_names()) == {"x", "a/b", "scalar", "fort", "empty", "r"}
    expect = {
        "x": x,
        "a/b": nested,
        "scalar": np.asarray(scalar),
        "fort": fort,
        "empty": empty,
        "r": r,
    }
    for name, want in expect.items():
        got = a.array(name)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want)
        # whole-array checksum = xxh3_128 of the decoded C-order bytes
        assert a.manifest["arrays"][name]["xxh3"] == xxhash.xxh3_128_hexdigest(want.tobytes()), name
    assert a.array("scalar").ndim == 0
    # per-chunk checksums follow the row chunks, the last one short
    info = a.manifest["arrays"]["r"]
    assert info["chunk_rows"] == 3 and a.n_chunks("r") == 4
    assert info["chunk_xxh3"] == [
        xxhash.xxh3_128_hexdigest(r[s : s + 3].tobytes()) for s in range(0, 10, 3)
    ]
    blocks = list(a.iter_chunks("r"))
    assert [s for s, _ in blocks] == [0, 3, 6, 9]
    assert [len(b) for _, b in blocks] == [3, 3, 3, 1]
    np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), r)
    assert len(_chunk_files(a, "r")) == 4  # stored as real row chunks, not one blob
    assert [s for s, _ in a.iter_chunks("x")] == [0, 8, 16, 24, 32]
    # side files round-trip and are checksummed over their bytes
    assert a.json("metrics.json") == side
    assert a.json("sub/more.json") == [1, 2]
    for name, digest in a.manifest["files"].items():
        assert digest == xxhash.xxh3_128_hexdigest(a.file(name).read_bytes())
    assert a.meta == {"note": "hello"}
    assert a.config == {"i": "round"}
    assert a.manifest["key"] == key and a.manifest["stage"] == "s"
    seal = json.loads((a.path / MARKER).read_text())  # COMPLETE seals the manifest's bytes
    assert seal == {"key": key, "manifest_xxh3": xxhash.xxh3_128_hexdigest((a.path / MANIFEST).read_bytes())}
    assert a.verify() == []
    assert [(b.stage, b.key) for b in store.list()] == [("s", key)]


def test_open_by_prefix_and_bad_keys(store_root):
    store = Store(store_root)
    seen: dict[str, str] = {}
    for i in range(100_000):  # two real keys (stages s1, s2) sharing their first 4 hex digits
        k1, k2 = _key(i, "s1"), _key(i, "s2")
        if k2[:4] in seen:
            k1 = seen[k2[:4]]
            break
        seen[k1[:4]] = k1
    pre = k1[:4]
    assert k2.startswith(pre) and k1 != k2
    publish(store, "s1", k1, lambda w: w.array("v", np.arange(3)))
    publish(store, "s2", k2, lambda w: w.array("v", np.arange(3)))
    n = next(i for i in range(32) if k1[i] != k2[i]) + 1  # digits that tell them apart
    assert store.open(None, k1[:n]).stage == "s1"
    assert store.open("s2", pre).key == k2
    with pytest.raises(ArgseError, match="ambiguous"):
        store.open(None, pre)
    with pytest.raises(ArgseError, match="not an artifact key"):
        store.open(None, "../s1")
    with pytest.raises(ArgseError, match="no complete"):
        store.open(None, "ffff" if pre != "ffff" else "eeee")
    with pytest.raises(IntegrityError, match="no such array"):
        store.open("s1", k1).array("nope")


def test_row_writer_short_of_rows_publishes_nothing(store_root):
    store = Store(store_root)
    key = _key("short")

    def fill(w):
        rw = w.rows("r", (10, 2), np.float32, chunk_rows=4)
        rw.append(np.ones((7, 2), np.float32))

    with pytest.raises(IntegrityError, match="7 of 10"):
        publish(store, "s", key, fill)
    assert not store.exists("s", key)
    assert _stage_entries(store, "s") == []


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_writer_that_raises_leaves_nothing(store_root, exc):
    store = Store(store_root)
    key = _key("raise")

    def fill(w):
        w.array("x", np.arange(100))
        w.json("m.json", {"a": 1})
        raise exc

    with pytest.raises(type(exc)):
        publish(store, "s", key, fill)
    assert not store.exists("s", key)
    assert store.temp_dirs() == []
    assert _stage_entries(store, "s") == []  # no complete artifact, no temp dir
    assert store.list() == []


def test_unsafe_name_in_writer_publishes_nothing(store_root):
    store = Store(store_root)
    with pytest.raises(IntegrityError, match="unsafe"):
        publish(store, "s", _key("u"), lambda w: w.array("../escape", np.arange(3)))
    with pytest.raises(IntegrityError, match="unsafe"):
        publish(store, "s", _key("u2"), lambda w: w.json("/abs.json", {}))
    assert _stage_entries(store, "s") == []
    assert not (store_root / "escape").exists()


# ------------------------------------------------------------------------- incompleteness
def test_dir_without_marker_is_not_an_artifact(store_root):
    store = Store(store_root)
    key = _key("inc")
    publish(store, "s", key, lambda w: w.array("x", np.arange(5)))
    (store.dir("s", key) / MARKER).unlink()
    assert not store.exists("s", key)
    with pytest.raises(ArgseError, match="no complete"):
        store.open("s", key)
    assert store.list() == []
    # a hand-made directory with a manifest but no marker is refused just the same
    crafted = store.dir("s", _key("crafted"))
    crafted.mkdir(parents=True)
    (crafted / MANIFEST).write_text(json.dumps({"arrays": {}, "files": {}, "config": {}}))
    assert not store.exists("s", crafted.name)
    with pytest.raises(ArgseError):
        store.open("s", crafted.name)


# ------------------------------------------------------------------------------ corruption
@pytest.fixture
def corruptible(store_root):
    """An artifact with a 4-chunk float64 array 'grp/logits' (chunks of 300 rows) and a sane one."""
    store = Store(store_root)
    key = _key("corrupt")
    data = np.random.default_rng(1).standard_normal((1000, 8))

    def fill(w):
        w.array("grp/logits", data, chunk_rows=300)
        w.array("ok", np.arange(10))
        w.json("m.json", {"a": 1})

    publish(store, "s", key, fill)
    return store, key, data


def _damage(art, how: str) -> None:
    chunk = _chunk_files(art, "grp/logits")[1]  # rows 300..599
    if how == "delete":
        chunk.unlink()
    else:
        b = bytearray(chunk.read_bytes())
        b[len(b) // 2] ^= 0xFF
        chunk.write_bytes(bytes(b))


@pytest.mark.parametrize("how", ["delete", "flip"])
@pytest.mark.parametrize("access", ["array", "iter_chunks"])
def test_damaged_chunk_raises_integrity_error(corruptible, how, access):
    store, key, _ = corruptible
    art = store.open("s", key)
    assert len(_chunk_files(art, "grp/logits")) == 4
    _damage(art, how)
    art = store.open("s", key)  # still opens: the marker and manifest are intact
    with pytest.raises(IntegrityError) as ei:
        if access == "array":
            art.array("grp/logits")
        else:
            list(art.iter_chunks("grp/logits"))
    msg = str(ei.value)
    assert key[:12] in msg and "grp/logits" in msg and "s/" in msg
    # the first chunk is intact: iterating yields it before failing on chunk 1
    if access == "iter_chunks":
        it = art.iter_chunks("grp/logits")
        s0, b0 = next(it)
        assert s0 == 0 and b0.shape == (300, 8)
        with pytest.raises(IntegrityError):
            next(it)
    problems = art.verify()
    assert len(problems) == 1 and "grp/logits" in problems[0]
    np.testing.assert_array_equal(art.array("ok"), np.arange(10))  # other arrays unaffected


def test_verify_reports_damaged_side_file(corruptible):
    store, key, _ = corruptible
    art = store.open("s", key)
    art.file("m.json").write_text('{"a": 2}')
    assert any("m.json" in p for p in art.verify())
    art.file("m.json").unlink()
    assert any("m.json" in p and "missing" in p for p in art.verify())


@pytest.mark.parametrize(
    "section,name",
    [("arrays", "../evil"), ("arrays", "a/../../evil"), ("files", "../../etc/passwd"),
     ("files", "/etc/passwd"), ("arrays", "./x")],
)  # fmt: skip
def test_crafted_manifest_with_escaping_name_is_refused(corruptible, section, name):
    store, key, _ = corruptible
    mp = store.dir("s", key) / MANIFEST
    m = json.loads(mp.read_text())
    m[section][name] = m[section]["grp/logits" if section == "arrays" else "m.json"]
    mp.write_text(json.dumps(m))
    with pytest.raises(IntegrityError, match="fails its checksum"):
        store.open("s", key)
    reseal(store.dir("s", key))  # a crafter who also rewrites COMPLETE: the model refuses it
    with pytest.raises(IntegrityError, match="unsafe"):
        store.open("s", key)


def test_symlink_out_of_the_artifact_is_refused(corruptible, tmp_path):
    store, key, data = corruptible
    art = store.open("s", key)
    outside = tmp_path / "outside"
    (art.path / DATA / "ok").rename(outside)
    (art.path / DATA / "ok").symlink_to(outside, target_is_directory=True)
    with pytest.raises(IntegrityError, match="outside"):
        art.array("ok")


# ----------------------------------------------------------------- concurrency and replace
def test_concurrent_finisher_second_publish_is_a_cache_hit(store_root):
    store = Store(store_root)
    key = _key("race")
    with writer(store, "s", key) as slow:
        slow.array("x", np.full(4, 1))
        fast = publish(store, "s", key, lambda w: w.array("x", np.full(4, 2)))
        assert fast.published is True
    assert slow.published is False  # the rename lost: a cache hit, no error
    assert store.temp_dirs() == []
    np.testing.assert_array_equal(store.open("s", key).array("x"), np.full(4, 2))
    assert _stage_entries(store, "s") == [key]


def test_concurrent_finishers_in_threads_publish_exactly_once(store_root):
    store = Store(store_root)
    key = _key("threads")
    barrier = threading.Barrier(3)
    results: list[bool] = []
    errors: list[BaseException] = []

    def work(v: int) -> None:
        try:
            with writer(store, "s", key) as w:
                w.array("x", np.full(64, v))
                barrier.wait(timeout=10)  # all temp dirs are filled before anyone publishes
            results.append(w.published)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(v,)) for v in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    assert sorted(results) == [False, False, True]
    assert store.temp_dirs() == []
    x = store.open("s", key).array("x")
    assert len(set(x.tolist())) == 1 and store.open("s", key).verify() == []


def test_replace_swaps_in_the_new_artifact(store_root):
    store = Store(store_root)
    key = _key("replace")
    publish(store, "s", key, lambda w: w.array("x", np.full(3, 1)))
    w = publish(store, "s", key, lambda w: w.array("x", np.full(3, 2)), replace=True)
    assert w.published is True
    np.testing.assert_array_equal(store.open("s", key).array("x"), np.full(3, 2))
    assert _stage_entries(store, "s") == [key]  # no .old-* or .tmp-* left

    # a failing replacement leaves the old artifact in place
    def bad(w):
        w.array("x", np.full(3, 3))
        raise RuntimeError("fail")

    with pytest.raises(RuntimeError):
        publish(store, "s", key, bad, replace=True)
    np.testing.assert_array_equal(store.open("s", key).array("x"), np.full(3, 2))
    assert _stage_entries(store, "s") == [key]


def test_lock_is_exclusive_and_leaves_no_file(store_root):
    store = Store(store_root)
    key = _key("lock")
    active, peak, waited = [0], [0], []
    guard = threading.Lock()

    def work() -> None:
        with store.lock("s", key, on_wait=lambda: waited.append(1)):
            with guard:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            time.sleep(0.02)
            with guard:
                active[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert peak[0] == 1
    assert waited  # at least one thread found the lock held
    assert list((store_root / "s" / ".locks").iterdir()) == []


def test_writer_killed_mid_write_leaves_no_artifact_and_gc_cleans(store_root):
    key = _key("killed")
    script = f"""
import sys, time, numpy as np
from argse_cli.store import Store
s = Store({str(store_root)!r})
with s.writer("s", {key!r}, config={_CFG[key]!r}, upstream={{}}, upstream_stages={{}}, version=1) as w:
    w.array("x", np.arange(1000))
    print("ready", flush=True)
    time.sleep(60)
"""
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
    store = Store(store_root)
    assert not store.exists("s", key) and store.list() == []
    (tmp,) = store.temp_dirs()
    assert json.loads((tmp / "writer.json").read_text())["pid"] == p.pid
    assert store.gc() == [str(tmp)]
    assert store.temp_dirs() == []
    w = publish(store, "s", key, lambda w: w.array("x", np.arange(1000)))
    assert w.published and store.open("s", key).verify() == []


# -------------------------------------------------------------------------------------- gc
def _fake_tmp(store: Store, pid: int, *, host: str | None = None, started: float | None = None,
              info: bool = True, tag: str = "") -> Path:  # fmt: skip
    key = _key(f"tmp{pid}{host}{started}{info}{tag}")
    d = store.root / "s" / f".tmp-{key}-{pid}-{os.urandom(4).hex()}"
    d.mkdir(parents=True)
    if info:
        (d / "writer.json").write_text(json.dumps({
            "pid": pid, "host": host or socket.gethostname(),
            "started": time.time() if started is None else started,
        }))  # fmt: skip
    return d


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait(timeout=30)
    return p.pid


def test_gc_removes_dead_writers_only(store_root):
    store = Store(store_root)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = _fake_tmp(store, _dead_pid())
        mine_old = _fake_tmp(store, os.getpid(), started=0.0)  # live, however old
        sleeping = _fake_tmp(store, sleeper.pid)
        other_recent = _fake_tmp(store, 12345, host="some-other-host")
        other_old = _fake_tmp(store, 12345, host="some-other-host", started=time.time() - 3 * 86400)
        noinfo_live = _fake_tmp(store, os.getpid(), info=False)  # before writer.json exists
        noinfo_dead = _fake_tmp(store, _dead_pid(), info=False)
        noinfo_dead_old = _fake_tmp(store, _dead_pid(), info=False, tag="old")
        os.utime(noinfo_dead_old, (time.time() - 3 * 86400,) * 2)

        would = store.gc(dry_run=True)
        assert all(Path(p).exists() for p in would)
        removed = set(store.gc())
        assert removed == set(would) == {str(dead), str(other_old), str(noinfo_dead_old)}
        for d in (mine_old, sleeping, other_recent, noinfo_live, noinfo_dead):
            assert d.exists(), d.name
        for d in (dead, other_old, noinfo_dead_old):
            assert not d.exists(), d.name
        # once the sleeping writer dies its temp dir goes too
        sleeper.kill()
        sleeper.wait(timeout=30)
        assert str(sleeping) in store.gc()
        assert not sleeping.exists()
    finally:
        sleeper.kill()
        sleeper.wait(timeout=30)


def test_gc_never_touches_a_live_writer_in_this_process(store_root):
    store = Store(store_root)
    key = _key("live")
    with writer(store, "s", key) as w:
        w.array("x", np.arange(10))
        assert store.gc(max_age_s=0) == []
        assert len(store.temp_dirs()) == 1
    assert w.published and store.open("s", key).verify() == []


def test_gc_keep_removes_unreachable_artifacts_only(store_root):
    store = Store(store_root)
    arr = lambda w: w.array("v", np.arange(3))  # noqa: E731
    kA, kC, kF = _key("A", "up"), _key("C", "up"), _key("F", "up")
    kB = _key("B", "down", {"src": kA})
    kE = _key("E", "agg", {"parts": [kC]})
    kG = _key("G", "down", {"src": kF})
    publish(store, "up", kA, arr)
    publish(store, "up", kC, arr)
    publish(store, "up", kF, arr)
    publish(store, "down", kB, arr, upstream={"src": kA}, upstream_stages={"src": "up"})
    publish(store, "agg", kE, arr, upstream={"parts": [kC]}, upstream_stages={"parts": "up"})
    publish(store, "down", kG, arr, upstream={"src": kF}, upstream_stages={"src": "up"})
    live = _fake_tmp(store, os.getpid())
    b = store.open("down", kB)
    assert b.upstream("src").key == kA
    assert [a.key for a in store.open("agg", kE).upstream("parts")] == [kC]

    assert set(store.gc()) == set()  # without keep, complete artifacts are never removed
    assert len(store.list()) == 6
    removed = store.gc(keep=[kB[:12], kE])  # a key prefix works too
    assert set(removed) == {str(store.dir("up", kF)), str(store.dir("down", kG))}
    assert {a.key for a in store.list()} == {kA, kB, kC, kE}
    assert live.exists()


# ------------------------------------------------------------------------------------ keys
def test_compute_key_is_stable_and_canonical():
    cfg = {"a": 1, "b": {"x": [1, 2], "y": 0.5}, "c": "s"}
    k = compute_key("split", 1, cfg, {"up": "k1"}, {"data": "fp"})
    assert len(k) == 32 and all(ch in "0123456789abcdef" for ch in k)
    assert k == compute_key("split", 1, cfg, {"up": "k1"}, {"data": "fp"})
    reordered = {"c": "s", "b": {"y": 0.5, "x": [1, 2]}, "a": 1}
    assert k == compute_key("split", 1, reordered, {"up": "k1"}, {"data": "fp"})
    # the documented definition: xxh3_128 of sorted-key compact JSON of the payload
    payload = {"scheme": 1, "stage": "split", "stage_version": 1, "config": cfg,
               "upstream": {"up": "k1"}, "extra": {"data": "fp"}}  # fmt: skip
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    assert k == xxhash.xxh3_128_hexdigest(text.encode())
    # everything that determines the artifact changes the key; list order matters
    others = [
        compute_key(
            "split", 1, {**cfg, "b": {"x": [2, 1], "y": 0.5}}, {"up": "k1"}, {"data": "fp"}
        ),
        compute_key("split", 2, cfg, {"up": "k1"}, {"data": "fp"}),
        compute_key("eval", 1, cfg, {"up": "k1"}, {"data": "fp"}),
        compute_key("split", 1, cfg, {"up": "k2"}, {"data": "fp"}),
        compute_key("split", 1, cfg, {"up": "k1"}, {"data": "fp2"}),
        compute_key("split", 1, {**cfg, "a": 2}, {"up": "k1"}, {"data": "fp"}),
        compute_key("split", 1, cfg),
    ]
    assert len({k, *others}) == len(others) + 1
    assert compute_key("x", 1, {}, {"e": ["k1", "k2"]}) != compute_key(
        "x", 1, {}, {"e": ["k2", "k1"]}
    )
    assert compute_key("x", 1, {}, None, None) == compute_key("x", 1, {}, {}, {})


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_compute_key_refuses_non_finite(bad):
    with pytest.raises(ValueError):
        compute_key("split", 1, {"a": bad})
    with pytest.raises(ValueError):
        compute_key("split", 1, {"a": {"b": [1.0, bad]}})
    with pytest.raises(ValueError):
        compute_key("split", 1, {}, extra={"x": bad})


# ------------------------------------------------------------------------------- run_stage
@pytest.fixture
def fake_stage(monkeypatch):
    """Register a stage 'fake' whose compute records calls and may be told to fail."""
    from argse_cli import stages

    mod = types.ModuleType("argse_cli.stages._fake_for_tests")
    mod.STAGE, mod.VERSION, mod.CODE = "fake", 1, ()
    mod.calls = []
    mod.fail = False

    def compute(cfg, inputs, out, progress):
        mod.calls.append(inputs)
        out.array("v", np.arange(4) * (len(mod.calls)))
        if mod.fail:
            raise ArgseError("fake", "told to fail", "do not")

    mod.compute = compute
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setitem(stages.STAGE_MODULES, "fake", "_fake_for_tests")
    return mod


def test_run_stage_caches_forces_and_checks_upstream(store_root, fake_stage, capsys):
    from argse_cli.config import CalibrateConfig
    from argse_cli.stages import key_of, run_stage

    store = Store(store_root)
    cfg = CalibrateConfig()
    key, computed = run_stage("fake", cfg, {}, {}, store)
    assert computed and key == key_of("fake", cfg, {}) and len(fake_stage.calls) == 1
    assert f"wrote {key}" in capsys.readouterr().out
    key2, computed2 = run_stage("fake", cfg, {}, {}, store)
    assert key2 == key and not computed2 and len(fake_stage.calls) == 1  # compute not called
    assert f"cached {key}" in capsys.readouterr().out
    # --force recomputes and swaps in the new artifact
    _, computed3 = run_stage("fake", cfg, {}, {}, store, force=True)
    assert computed3 and len(fake_stage.calls) == 2
    np.testing.assert_array_equal(store.open("fake", key).array("v"), np.arange(4) * 2)
    # upstream artifacts arrive opened (a list stays a list); a missing one is refused up front
    cfg2 = CalibrateConfig(view="bal")
    k_up, _ = run_stage("fake", cfg2, {}, {}, store, quiet=True)
    run_stage("fake", CalibrateConfig(posterior="balanced"), {"one": key, "many": [k_up, key]},
              {"one": "fake", "many": "fake"}, store, quiet=True)  # fmt: skip
    inputs = fake_stage.calls[-1]
    assert inputs["one"].key == key and [a.key for a in inputs["many"]] == [k_up, key]
    n = len(fake_stage.calls)
    with pytest.raises(ArgseError, match="upstream.src"):
        run_stage("fake", cfg, {"src": _key("nowhere")}, {"src": "fake"}, store, quiet=True)
    assert len(fake_stage.calls) == n


def test_run_stage_failure_leaves_store_unchanged(store_root, fake_stage):
    from argse_cli.config import CalibrateConfig
    from argse_cli.stages import run_stage

    store = Store(store_root)
    run_stage("fake", CalibrateConfig(), {}, {}, store, quiet=True)

    def listing() -> list[tuple[str, int]]:
        return sorted((str(p.relative_to(store_root)), p.stat().st_size)
                      for p in store_root.rglob("*"))  # fmt: skip

    before = listing()
    fake_stage.fail = True
    with pytest.raises(ArgseError, match="told to fail"):
        run_stage("fake", CalibrateConfig(view="bal"), {}, {}, store, quiet=True)
    assert listing() == before  # no temp dir, no lock file, no artifact
