"""Store integrity end to end (issue 19, items 1, 2, 4, 5, 6, 7).

- every read recomputes the key from the manifest's own (hash scheme, stage, version, config,
  upstream, extra) and compares it with the folder name; the manifest's bytes are checksummed in
  COMPLETE; readers, `verify` and `show` refuse a mismatch in one line;
- a malformed manifest (`[]`, no arrays, chunk_rows 0, a short chunk list, truncated JSON) makes
  that artifact unreadable with a one-line reason; ls / verify / show / gc keep working;
- `verify` lists every artifact it could not verify and exits 1; `ls --all` shows incomplete and
  unreadable folders, marked; `verify` on a store that does not exist is an error;
- a folder without a valid COMPLETE is incomplete: replaced on publish (moved aside atomically),
  removed by gc;
- a `--force` killed between its two renames is undone by the next read;
- `gc --keep` killed mid-removal never leaves a half-deleted artifact that still looks complete.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from argse_cli.errors import ArgseError, IntegrityError
from argse_cli.store import MANIFEST, MARKER, Store, compute_key, seal_text

REPO = Path(__file__).resolve().parents[1]


def _publish(store: Store, stage: str, cfg: dict, upstream: dict | None = None,
             upstream_stages: dict | None = None, **meta) -> str:  # fmt: skip
    key = compute_key(stage, 1, cfg, upstream or {})
    with store.writer(stage, key, config=cfg, upstream=upstream or {},
                      upstream_stages=upstream_stages or {}, version=1) as w:  # fmt: skip
        w.array("x", np.arange(40, dtype=np.float32).reshape(10, 4), chunk_rows=3)
        w.json("m.json", {"a": 1})
        w.meta.update(meta)
    return key


def _edit(store: Store, stage: str, key: str, edit, reseal: bool = False) -> None:
    mp = store.dir(stage, key) / MANIFEST
    m = json.loads(mp.read_text())
    out = edit(m)
    mp.write_text(out if isinstance(out, str) else json.dumps(m if out is None else out))
    if reseal:
        (mp.parent / MARKER).write_text(seal_text(key, mp.read_bytes()))


@pytest.fixture
def two(store_root):
    """Two calibrate-like artifacts c1, c2 and a gate-like artifact g whose upstream is c1."""
    store = Store(store_root)
    c1 = _publish(store, "calibrate", {"view": "lt"})
    c2 = _publish(store, "calibrate", {"view": "bal"})
    g = _publish(store, "train-gate", {"c": 0.05}, {"calibrate": c1}, {"calibrate": "calibrate"},
                 experts=[{"tau": 1.0}])  # fmt: skip
    return store, c1, c2, g


# ------------------------------------------------------------------------ item 1: key checks
@pytest.mark.parametrize("what", ["upstream", "config", "version", "meta"])
def test_edited_manifest_is_refused(two, what):
    store, c1, c2, g = two

    def edit(m):
        if what == "upstream":
            m["upstream"]["calibrate"] = c2  # another real calibrate key
        elif what == "config":
            m["config"]["c"] = 0.1
        elif what == "version":
            m["stage_version"] = 2
        else:
            m["meta"]["experts"][0]["tau"] = 2

    _edit(store, "train-gate", g, edit)
    for call in (lambda: store.open("train-gate", g), lambda: store.open(None, g[:8]),
                 lambda: store.exists("train-gate", g)):  # fmt: skip
        with pytest.raises(IntegrityError, match="manifest.json fails its checksum") as ei:
            call()
        assert "\n" not in str(ei.value) and f"train-gate/{g[:12]}" in str(ei.value)
    if what != "meta":  # the key check holds even against a crafter who rewrites COMPLETE
        _edit(store, "train-gate", g, lambda m: None, reseal=True)
        with pytest.raises(IntegrityError, match=f"key check failed.*not {g[:12]}"):
            store.open("train-gate", g)
    # the rest of the store keeps working
    assert sorted(a.key for a in store.list()) == sorted([c1, c2])
    assert store.open("calibrate", c1).verify() == []


def test_readers_verify_and_show_refuse_an_edited_manifest(two):
    store, c1, c2, g = two
    _edit(store, "train-gate", g, lambda m: m["upstream"].update(calibrate=c2))
    env = {"ARGSE_STORE": str(store.root)}
    show = run_cli(["show", g[:12]], env=env)
    assert show.returncode == 2 and "Traceback" not in show.stderr
    (line,) = [ln for ln in show.stderr.splitlines() if ln.strip()]
    assert line.startswith(f"error: train-gate/{g[:12]}: manifest.json fails its checksum")
    ver = run_cli(["verify"], env=env)
    assert ver.returncode == 1, ver.stdout + ver.stderr
    assert f"BAD  train-gate {g}" in ver.stdout and "fails its checksum" in ver.stdout
    assert f"OK   calibrate {c1}" in ver.stdout and f"OK   calibrate {c2}" in ver.stdout
    one = run_cli(["verify", g[:12]], env=env)
    assert one.returncode == 1 and "BAD" in one.stdout and "Traceback" not in one.stderr


# ------------------------------------------------------------- item 5: malformed manifests
MALFORMED = {
    "empty-list": lambda m: "[]",
    "no-arrays": lambda m: {k: v for k, v in m.items() if k != "arrays"},
    "chunk-rows-0": lambda m: m["arrays"]["x"].update(chunk_rows=0),
    "short-chunk-list": lambda m: m["arrays"]["x"].update(chunk_xxh3=m["arrays"]["x"]["chunk_xxh3"][:2]),
    "truncated": lambda m: json.dumps(m)[:50],
    "unsafe-file-name": lambda m: m["files"].update({"../../x": m["files"]["m.json"]}),
    "string-shape": lambda m: m["arrays"]["x"].update(shape="10,4"),
    "object-dtype": lambda m: m["arrays"]["x"].update(dtype="|O"),
}  # fmt: skip
REASONS = {
    "empty-list": "holds a list", "no-arrays": "arrays: Field required",
    "chunk-rows-0": "chunk_rows is 0", "short-chunk-list": "chunk_xxh3 has 2 entries",
    "truncated": "not valid JSON", "unsafe-file-name": "unsafe path",
    "string-shape": "shape", "object-dtype": "dtype",
}  # fmt: skip


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_manifest_is_reported_for_that_artifact_alone(two, case):
    store, c1, c2, g = two
    _edit(store, "calibrate", c2, MALFORMED[case], reseal=True)
    with pytest.raises(IntegrityError) as ei:
        store.open("calibrate", c2)
    msg = str(ei.value)
    assert "\n" not in msg and f"calibrate/{c2[:12]}" in msg and REASONS[case] in msg, msg
    assert {a.key for a in store.list()} == {c1, g}
    (e,) = [e for e in store.entries() if e.key == c2]
    assert e.state == "unreadable" and REASONS[case] in e.reason
    assert store.open("train-gate", g).upstream("calibrate").key == c1
    assert store.gc() == [] and store.dir("calibrate", c2).exists()  # reported, never deleted


def test_cli_tools_keep_working_around_malformed_manifests(two):
    store, c1, c2, g = two
    _edit(store, "calibrate", c2, MALFORMED["empty-list"], reseal=True)
    _edit(store, "train-gate", g, MALFORMED["short-chunk-list"], reseal=True)
    env = {"ARGSE_STORE": str(store.root)}
    ls, ls_all, ver, show_ok, show_bad, gc = (
        run_cli(a, env=env) for a in (["ls"], ["ls", "--all"], ["verify"], ["show", c1[:12]],
                                      ["show", c2[:12]], ["gc"])  # fmt: skip
    )
    for res in (ls, ls_all, ver, show_ok, show_bad, gc):
        assert "Traceback" not in res.stderr + res.stdout, res.stderr
    assert ls.returncode == 0 and c1[:16] in ls.stdout and c2[:16] not in ls.stdout
    assert "2 incomplete or unreadable" in ls.stderr
    assert ls_all.returncode == 0 and c2[:16] in ls_all.stdout and g[:16] in ls_all.stdout
    assert ls_all.stdout.count("unreadable") == 2
    assert ver.returncode == 1 and ver.stdout.count("BAD ") == 2 and ver.stdout.count("OK ") == 1
    assert show_ok.returncode == 0 and c1 in show_ok.stdout
    assert show_bad.returncode == 2 and "holds a list" in show_bad.stderr
    assert gc.returncode == 0 and "0 removed" in gc.stdout


def test_verify_on_a_missing_store_is_an_error(tmp_path):
    res = run_cli(["verify"], env={"ARGSE_STORE": str(tmp_path / "nowhere")})
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "error: --store:" in res.stderr and "does not exist" in res.stderr
    assert not (tmp_path / "nowhere").exists()


def test_store_pointing_at_a_file_is_an_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    for args in (["ls"], ["verify"], ["gc"], ["calibrate"], ["show", "abcd"]):
        res = run_cli(args, env={"ARGSE_STORE": str(f)})
        assert res.returncode == 2 and "Traceback" not in res.stderr, (args, res.stderr)
        assert "error: --store:" in res.stderr and "is a file" in res.stderr, res.stderr
    assert f.read_text() == "x"


# ------------------------------------------------------------ items 2 and 4: incomplete
def test_deleted_complete_marker_is_incomplete_replaced_and_gc_removes_it(two):
    store, c1, c2, g = two
    (store.dir("calibrate", c2) / MARKER).unlink()
    assert not store.exists("calibrate", c2)
    with pytest.raises(ArgseError, match="incomplete"):
        store.open("calibrate", c2)
    (e,) = [e for e in store.entries() if e.key == c2]
    assert e.state == "incomplete" and "no COMPLETE" in e.reason
    ver = run_cli(["verify"], env={"ARGSE_STORE": str(store.root)})
    assert ver.returncode == 1 and f"BAD  calibrate {c2}" in ver.stdout and "incomplete" in ver.stdout
    # the rerun the downstream message asks for: publishes over the incomplete folder
    assert _publish(store, "calibrate", {"view": "bal"}) == c2
    assert store.open("calibrate", c2).verify() == []
    assert sorted(p.name for p in (store.root / "calibrate").iterdir()) == sorted([c1, c2])
    # gc removes an incomplete folder (a garbage marker counts as none)
    (store.dir("calibrate", c2) / MARKER).write_text("garbage")
    assert not store.exists("calibrate", c2)
    removed = store.gc()
    assert len(removed) == 1 and c2 in removed[0] and "incomplete" in removed[0]
    assert not store.dir("calibrate", c2).exists() and {a.key for a in store.list()} == {c1, g}


def test_run_stage_recomputes_over_an_incomplete_folder(store_root):
    """The CLI path of item 4: a stage whose folder lost COMPLETE reruns and publishes."""
    import types

    from argse_cli import stages
    from argse_cli.config import CalibrateConfig
    from argse_cli.stages import run_stage

    mod = types.ModuleType("argse_cli.stages._fake_incomplete")
    mod.STAGE, mod.VERSION, mod.CODE = "fake", 1, ()
    mod.compute = lambda cfg, inputs, out, progress: out.array("v", np.arange(3))
    sys.modules[mod.__name__] = mod
    stages.STAGE_MODULES["fake"] = "_fake_incomplete"
    try:
        store = Store(store_root)
        key, _ = run_stage("fake", CalibrateConfig(), {}, {}, store, quiet=True)
        (store.dir("fake", key) / MARKER).unlink()
        key2, computed = run_stage("fake", CalibrateConfig(), {}, {}, store, quiet=True)
        assert key2 == key and computed and store.open("fake", key).verify() == []
        assert sorted(p.name for p in (store_root / "fake").iterdir()) == [".locks", key]
        # an unreadable (edited) artifact is refused, not silently replaced; --force replaces it
        _edit(store, "fake", key, lambda m: m["meta"].update(x=1))
        with pytest.raises(IntegrityError, match="fails its checksum"):
            run_stage("fake", CalibrateConfig(), {}, {}, store, quiet=True)
        assert run_stage("fake", CalibrateConfig(), {}, {}, store, quiet=True, force=True)[1]
        assert store.open("fake", key).verify() == []
        assert sorted(p.name for p in (store_root / "fake").iterdir()) == [".locks", key]
    finally:
        stages.STAGE_MODULES.pop("fake", None)
        sys.modules.pop(mod.__name__, None)


# ------------------------------------------------------------------- item 7: --force kill
def test_force_killed_between_its_renames_is_restored_by_the_next_read(two):
    store, c1, c2, g = two
    d = store.dir("calibrate", c1)
    os.rename(d, d.parent / f".old-{c1}-0a1b2c3d")  # the state a kill after rename 1 leaves
    assert store.exists("calibrate", c1) and d.is_dir()  # a run's cache check restores it
    os.rename(d, d.parent / f".old-{c1}-0a1b2c3d")
    assert store.open(None, c1[:10]).key == c1  # so does opening by prefix
    assert store.open("train-gate", g).upstream("calibrate").verify() == []
    os.rename(d, d.parent / f".old-{c1}-0a1b2c3d")
    res = run_cli(["ls"], env={"ARGSE_STORE": str(store.root)})  # and listing
    assert res.returncode == 0 and c1[:16] in res.stdout
    assert not list(d.parent.glob(".old-*"))


# --------------------------------------------------------------- item 6: gc --keep killed
GC_KILLER = r"""
import os, signal, sys
from pathlib import Path
import argse_cli.store as st
real = st._rm
def dying_rm(path):
    # delete about half of the files of the first artifact removed, then die like a SIGKILL
    files = sorted(p for p in Path(path).rglob("*") if p.is_file())
    for p in files[: len(files) // 2]:
        p.unlink()
    os.kill(os.getpid(), signal.SIGKILL)
st._rm = dying_rm
st.Store(sys.argv[1]).gc(keep=[sys.argv[2]])
"""


def test_gc_keep_killed_mid_removal_leaves_nothing_that_looks_complete(two):
    store, c1, c2, g = two
    p = subprocess.run([sys.executable, "-c", GC_KILLER, str(store.root), g], cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert p.returncode == -signal.SIGKILL, p.stderr
    # c2 (unreachable from g) was being removed: it is gone from sight, not half there
    assert not store.exists("calibrate", c2) and not store.dir("calibrate", c2).exists()
    assert {a.key for a in store.list()} == {c1, g}
    for a in store.list():
        assert a.verify() == []
    res = run_cli(["calibrate", "--set", "view=bal", "--print-key"], env={"ARGSE_STORE": str(store.root)})
    (trash,) = list((store.root / "calibrate").glob(".trash-*"))
    assert any(trash.rglob("*"))  # the half-deleted files are there, invisible
    removed = store.gc()  # the debris, and the lock file the killed gc held while removing
    assert str(trash) in removed and not trash.exists()
    assert set(removed) - {str(trash)} <= {str(p) for p in store.root.glob("*/.locks/*")} | {
        str(store.root / "calibrate" / ".locks" / f"{c2}.lock")}
    assert not list(store.root.glob("*/.locks/*.lock"))
    assert "Traceback" not in res.stderr


# ----------------------------------------------------------- item 3: copies out are verified
def test_report_export_refuses_a_tampered_file_and_copies_nothing(store_root, tmp_path):
    from argse_cli.report.export import export_to

    store = Store(store_root)
    key = compute_key("report", 1, {"title": "t"})
    with store.writer("report", key, config={"title": "t"}, upstream={}, upstream_stages={},
                      version=1) as w:  # fmt: skip
        w.file_path("main.tex").write_text("\\begin{table}\\end{table}\n")
        w.file_path("figures/a.png").write_bytes(b"\x89PNG fake")
    art = store.open("report", key)
    good = export_to(art, tmp_path / "ok")
    assert sorted(p.relative_to(tmp_path / "ok").as_posix() for p in good) == ["figures/a.png", "main.tex"]
    assert (tmp_path / "ok" / "main.tex").read_bytes() == art.read_bytes("main.tex")
    with open(art.path / "files" / "main.tex", "a") as fh:  # echo x >> files/main.tex
        fh.write("x\n")
    with pytest.raises(IntegrityError, match="main.tex: file checksum mismatch"):
        export_to(store.open("report", key), tmp_path / "bad")
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").rglob("*"))
    with pytest.raises(ArgseError, match="not a directory"):
        export_to(art, tmp_path / "ok" / "main.tex")
