"""The `argse` CLI end to end on `split` (subprocesses, synthetic CIFAR-10): help, caching, keys,
--force, --print-config, SIGKILL safety, one-line errors that leave the store untouched, store tools."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli

from argse_cli.store import Store

COMMANDS = ["split", "train-expert", "export-logits", "calibrate", "train-gate", "eval",
            "baselines", "report", "import-logits", "apply", "sweep", "plot", "export-results", "schema",
            "ls", "show", "verify", "gc"]  # fmt: skip
HEAVY = ("torch", "zarr", "matplotlib", "scipy")


def listing(root: Path) -> list[tuple[str, int]]:
    """Every file (with its size) and directory (size -1) under root; [] if root is absent."""
    if not root.exists():
        return []
    return sorted(
        (str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1) for p in root.rglob("*")
    )


def run_many(calls: list[tuple[list[str], dict[str, str]]]) -> list[subprocess.CompletedProcess]:
    """run_cli for independent invocations, a few at a time (each is mostly interpreter start-up)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=4) as ex:
        return list(ex.map(lambda c: run_cli(c[0], env=c[1]), calls))


def _key_from(out: str, word: str) -> str:
    for line in out.splitlines():
        if line.startswith(word + " "):
            return line.split()[1]
    raise AssertionError(f"no '{word} <key>' line in:\n{out}")


@pytest.fixture(scope="module")
def populated(tmp_path_factory, synthetic_cifar10):
    """A store holding one split artifact (defaults, seed 0) and the env that points at it."""
    root = tmp_path_factory.mktemp("cli") / "store"
    env = {"ARGSE_STORE": str(root), "ARGSE_DATA": str(synthetic_cifar10)}
    res = run_cli(["split"], env=env)
    assert res.returncode == 0, res.stderr
    key = _key_from(res.stdout, "wrote")
    return root, env, key


# ------------------------------------------------------------------------------------ help
def test_top_level_help_lists_every_command():
    res = run_cli(["--help"])
    assert res.returncode == 0, res.stderr
    for cmd in COMMANDS:
        assert cmd in res.stdout, cmd
    script = Path(sys.executable).parent / "argse"
    if script.exists():  # the installed console script works too
        res2 = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
        assert res2.returncode == 0 and "split" in res2.stdout


def test_command_list_is_complete():
    import typer.main

    from argse_cli.cli import app

    assert sorted(typer.main.get_command(app).commands) == sorted(COMMANDS)


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_help(cmd):
    from typer.testing import CliRunner

    from argse_cli.cli import app

    res = CliRunner().invoke(app, [cmd, "--help"])
    assert res.exit_code == 0, res.output
    assert "Usage" in res.output and cmd in res.output


# ------------------------------------------------------------------------------- caching
def test_second_run_is_a_cache_hit_that_computes_nothing(populated):
    """Deterministic, not timed (timings live in bench/): the rerun prints `cached` with the same key,
    publishes nothing and leaves the store byte-identical (its light imports: the next test)."""
    root, env, key = populated
    before = sorted((p.relative_to(root), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file())
    for _ in range(2):
        res = run_cli(["split"], env=env)
        assert res.returncode == 0, res.stderr
        assert _key_from(res.stdout, "cached") == key and "wrote" not in res.stdout
    after = sorted((p.relative_to(root), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file())
    assert after == before


def test_cache_hit_and_imports_stay_light(populated):
    _, env, key = populated
    code = f"""
import sys
import argse_cli.cli, argse_cli.config, argse_cli.store, argse_cli.pipeline
import argse_cli.stages, argse_cli.stages.split
heavy = {HEAVY!r}
print("import:", [m for m in heavy if m in sys.modules])
sys.argv = ["argse", "split"]
try:
    argse_cli.cli.main()
except SystemExit as e:
    assert e.code in (0, None), e.code
print("hit:", [m for m in heavy if m in sys.modules])
"""
    res = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "import: []" in res.stdout and "hit: []" in res.stdout
    assert f"cached {key}" in res.stdout


def test_keys_follow_the_config(populated):
    _, env, key = populated
    seed1, set1, both = run_many([
        (["split", "--seed", "1", "--print-key"], env),
        (["split", "--set", "seed=1", "--print-key"], env),
        (["split", "--set", "seed=5", "--seed", "1", "--no-download", "--print-key"], env),
    ])  # fmt: skip
    k1 = seed1.stdout.strip()
    assert len(k1) == 32 and k1 != key  # another seed, another key
    assert set1.stdout.strip() == k1  # --set reaches the config like the option does
    assert both.stdout.strip() == k1  # the option wins over --set; download is not keyed


def test_force_reproduces_identical_checksums(populated):
    root, env, key = populated
    before = Store(root).open("split", key).manifest
    res = run_cli(["split", "--force", "-q"], env=env)
    assert res.returncode == 0, res.stderr
    after = Store(root).open("split", key).manifest
    assert after["arrays"].keys() == before["arrays"].keys()
    for name, info in before["arrays"].items():
        assert after["arrays"][name]["xxh3"] == info["xxh3"], name
        assert after["arrays"][name]["chunk_xxh3"] == info["chunk_xxh3"], name
    assert after["files"] == before["files"]
    assert Store(root).temp_dirs() == []
    assert [a.key for a in Store(root).list()] == [key]


def test_print_config_runs_nothing(populated, tmp_path):
    root, env, key = populated
    before = listing(root)
    res = run_cli(["split", "--seed", "7", "--print-config"], env=env)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["stage"] == "split" and doc["config"]["seed"] == 7 and len(doc["key"]) == 32
    assert doc["key"] != key
    assert listing(root) == before
    # on a store that does not exist yet, nothing is created (not even the fingerprint memo)
    fresh = tmp_path / "fresh"
    res = run_cli(["split", "--print-config"], env={**env, "ARGSE_STORE": str(fresh)})
    assert res.returncode == 0 and json.loads(res.stdout)["key"] == key
    assert not fresh.exists()


# ------------------------------------------------------------------------------- SIGKILL
def _start_split(env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "argse_cli.cli", "split", "-q"], env={**os.environ, **env},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def _kill(p: subprocess.Popen) -> None:
    if p.poll() is None:
        os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=60)


def test_sigkill_leaves_nothing_complete_and_rerun_succeeds(store_root, synthetic_cifar10):
    env = {"ARGSE_STORE": str(store_root), "ARGSE_DATA": str(synthetic_cifar10)}
    killed = 0
    for delay in (0.05, 0.3, 0.6, 0.9):
        p = _start_split(env)
        time.sleep(delay)
        _kill(p)
        if p.returncode != -signal.SIGKILL:  # a fast machine finished first: nothing to check here
            shutil.rmtree(store_root, ignore_errors=True)
            continue
        killed += 1
        # Killed before the publishing rename: nothing complete. Killed after it (while printing):
        # the artifact is complete and intact. Never anything in between.
        for a in Store(store_root).list():
            assert a.verify() == []
        shutil.rmtree(store_root, ignore_errors=True)
    assert killed >= 1, "every run finished before its kill"
    # and once more, killed the moment its temp dir appears (mid-write)
    p = _start_split(env)
    tmp_seen, t0 = False, time.time()
    while p.poll() is None and time.time() - t0 < 60:
        if list(store_root.glob("split/.tmp-*")):
            tmp_seen = True
            _kill(p)
            break
        time.sleep(0.002)
    _kill(p)
    print(f"killed mid-write: {tmp_seen}")
    for a in Store(store_root).list():  # publishing is atomic: complete means intact
        assert a.verify() == []
    if tmp_seen and p.returncode == -signal.SIGKILL and not Store(store_root).list():
        assert Store(store_root).temp_dirs()  # the dead writer's temp dir is left for gc
        res = run_cli(["ls"], env=env)
        assert res.returncode == 0 and "split" not in res.stdout.split("summary", 1)[-1]
    res = run_cli(["split"], env=env)
    assert res.returncode == 0, res.stderr
    key = _key_from(res.stdout, "wrote")
    assert [a.key for a in Store(store_root).list()] == [key]
    assert "removed" in run_cli(["gc"], env=env).stdout
    assert Store(store_root).temp_dirs() == []
    assert Store(store_root).open("split", key).verify() == []


# ---------------------------------------------------------------------------- bad inputs
BAD_INPUTS = [
    # (id, args, yaml text or None, words the one error line must contain)
    ("fractions-paper", ["--fractions", "0.2,0.1,0.1,0.5"], None, ["fractions", "sum"]),
    ("if-below-1", ["--imbalance-factor", "0.5"], None, ["imbalance_factor"]),
    ("dataset", ["--dataset", "mnist"], None, ["dataset"]),
    ("data-root", ["--data-root", "{missing}"], None, ["data_root"]),
    # synthetic n_max=200, IF=100: rarest class has 2 images, so threshold:1 leaves the tail empty
    # (the analogue of threshold:20 on real CIFAR-10 IF=100, run on the offline copy when slow)
    ("empty-group", ["--group-rule", "threshold:1"], None, ["group", "threshold"]),
    ("yaml-unknown-field", ["--config", "{yaml}"], "split:\n  imbalance_factr: 50\n",
     ["split.imbalance_factr", "valid fields"]),
    ("yaml-nan", ["--config", "{yaml}"], "split:\n  imbalance_factor: .nan\n",
     ["imbalance_factor", "finite"]),
    ("set-nan", ["--set", "imbalance_factor=.nan"], None, ["imbalance_factor", "finite"]),
    ("yaml-malformed", ["--config", "{yaml}"], "split:\n  seed: [1\n", ["config", "YAML"]),
]  # fmt: skip


def _check_one_line_error(res: subprocess.CompletedProcess, words: list[str]) -> None:
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, res.stderr
    # anything else on stderr is a one-line warning (e.g. the MD5 note about synthetic data)
    assert all(ln.startswith("warning:") for ln in lines if ln not in errors), res.stderr
    assert "fix:" in errors[0]
    for w in words:
        assert w in errors[0], (w, errors[0])


def test_bad_inputs_exit_2_with_one_line_and_store_unchanged(populated, tmp_path):
    """Each case runs on its own copy of the populated store, so they can run side by side."""
    root, env, _ = populated
    calls, befores = [], []
    for cid, args, yaml_text, _ in BAD_INPUTS:
        case_dir = tmp_path / cid
        case_dir.mkdir()
        store = case_dir / "store"
        shutil.copytree(root, store)
        befores.append(listing(store))
        yaml_path = case_dir / "pipe.yaml"
        if yaml_text is not None:
            yaml_path.write_text(yaml_text)
        args = [a.format(yaml=yaml_path, missing=case_dir / "no_data_here") for a in args]
        calls.append((["split", *args], {**env, "ARGSE_STORE": str(store)}))
    # two cases against a store that does not exist yet: it must not be created
    for cid in ("fractions-paper", "set-nan"):
        args = next(c[1] for c in BAD_INPUTS if c[0] == cid)
        calls.append((["split", *args], {**env, "ARGSE_STORE": str(tmp_path / f"never-{cid}")}))
    results = run_many(calls)
    failures = []
    for (cid, _, _, words), res, before in zip(BAD_INPUTS, results, befores, strict=False):
        try:
            _check_one_line_error(res, words)
            store = tmp_path / cid / "store"
            assert listing(store) == before, "store changed"
        except AssertionError as e:
            failures.append(f"{cid}: {e}")
    for cid, res in zip(("fractions-paper", "set-nan"), results[len(BAD_INPUTS) :], strict=True):
        if res.returncode != 2 or (tmp_path / f"never-{cid}").exists():
            failures.append(f"{cid} (fresh store): rc={res.returncode}, store created?")
    assert not failures, "\n".join(failures)


# --------------------------------------------------------------------------- store tools
def test_ls_show_verify_gc(populated, tmp_path):
    root, env, key = populated
    # a corrupted copy of the store: verify names the array and exits 1
    bad_root = tmp_path / "bad"
    shutil.copytree(root, bad_root)
    (bad_root / "split" / key / "data.zarr" / "test" / "labels" / "c" / "0").unlink()
    ls, ls_json, show, verify, gc, bad_key, bad = run_many([
        (["ls"], env),
        (["ls", "--json", "--stage", "split"], env),
        (["show", key[:12]], env),
        (["verify"], env),
        (["gc"], env),
        (["show", "zz"], env),
        (["verify", key[:12]], {**env, "ARGSE_STORE": str(bad_root)}),
    ])  # fmt: skip
    assert ls.returncode == 0 and key[:16] in ls.stdout and "dataset=cifar10" in ls.stdout
    (row,) = json.loads(ls_json.stdout)
    assert row["key"] == key and row["stage"] == "split" and row["state"] == "complete"
    assert show.returncode == 0, show.stderr
    assert key in show.stdout and "class_counts" in show.stdout and "train/indices" in show.stdout
    assert verify.returncode == 0 and f"OK   split {key}" in verify.stdout
    assert gc.returncode == 0 and "0 removed" in gc.stdout
    assert Store(root).exists("split", key)
    _check_one_line_error(bad_key, ["key"])
    assert bad.returncode == 1 and "BAD" in bad.stdout and "test/labels" in bad.stdout


# ------------------------------------------------------------------ offline copy (slow)
@pytest.mark.slow
def test_offline_copy_empty_group_and_sigkill(shared_cifar10, store_root):
    env = {"ARGSE_STORE": str(store_root), "ARGSE_DATA": str(shared_cifar10)}
    for delay in (0.5, 1.0):
        p = _start_split(env)
        time.sleep(delay)
        _kill(p)
        assert Store(store_root).list() == []
    res = run_cli(["split", "-q"], env=env)
    assert res.returncode == 0, res.stderr
    assert len(Store(store_root).list()) == 1
    before = listing(store_root)
    res = run_cli(["split", "--group-rule", "threshold:20", "--imbalance-factor", "100"], env=env)
    _check_one_line_error(res, ["group", "threshold"])
    assert listing(store_root) == before
