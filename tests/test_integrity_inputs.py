"""Integrity of stage inputs (issue: reliability & security, item 3).

- every array of every artifact of the tiny pipeline carries its xxh3 (whole and per row chunk) in
  the manifest, recomputed here independently with zarr + xxhash (not through Artifact);
- `argse verify KEY...` names each damaged array and exits 1 (and 0 when everything is intact);
- a stage whose input has a corrupted or missing chunk fails with exit code 2 and one line naming
  the artifact (stage/key) and the array, publishes nothing and leaves the store as it was --
  through both read paths (whole arrays: calibrate; streamed row chunks: train-gate);
- a damaged side file (weights, JSON) is refused on read (Artifact.read_bytes / json).
Store-level corruption cases (delete / flip x array / iter_chunks) are in test_store.py.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import xxhash
from _checks import assert_one_line_error, listing

from argse_cli.errors import IntegrityError
from argse_cli.store import DATA, Store


@pytest.fixture(scope="module")
def tiny(tiny_pipe):
    return tiny_pipe("calibrate")


def _chunk_file(store: Path, stage: str, key: str, array: str, i: int) -> Path:
    """The file of row chunk ``i`` (zarr v3 default key encoding: c/<i>/0/...)."""
    base = store / stage / key / DATA / array / "c"
    hits = [p for p in base.rglob("*") if p.is_file() and p.relative_to(base).parts[0] == str(i)]
    assert len(hits) == 1, (array, i, hits)
    return hits[0]


def _damage(path: Path, how: str) -> None:
    if how == "delete":
        path.unlink()
    else:
        b = bytearray(path.read_bytes())
        b[len(b) // 2] ^= 0x5A
        path.write_bytes(bytes(b))


def test_manifest_holds_every_arrays_checksum(tiny):
    import zarr

    arts = Store(tiny.store).list()
    assert {a.stage for a in arts} == {"split", "train-expert", "export-logits", "calibrate"}
    n = 0
    for a in arts:
        assert a.manifest["arrays"], a.stage
        for name, info in a.manifest["arrays"].items():
            data = np.asarray(zarr.open_array(str(a.path / DATA / name), mode="r")[...])
            assert list(data.shape) == info["shape"] and data.dtype.str == info["dtype"]
            assert info["xxh3"] == xxhash.xxh3_128_hexdigest(np.ascontiguousarray(data).tobytes())
            cr = info["chunk_rows"]
            if data.ndim:
                want = [xxhash.xxh3_128_hexdigest(np.ascontiguousarray(data[s : s + cr]).tobytes())
                        for s in range(0, max(len(data), 1), cr)]  # fmt: skip
                assert info["chunk_xxh3"] == want, (a.stage, name)
            n += 1
        for name, digest in a.manifest["files"].items():
            assert digest == xxhash.xxh3_128_hexdigest((a.path / "files" / name).read_bytes())
    assert n > 40


def test_verify_names_damaged_arrays(tiny, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(tiny.store, store)
    ek, sk, ck = tiny.keys["export-logits"], tiny.keys["split"], tiny.keys["calibrate"]
    ok = tiny.run("verify", ek[:12], sk[:12], store=store)
    assert ok.returncode == 0 and ok.stdout.count("OK ") == 2, ok.stdout + ok.stderr
    _damage(_chunk_file(store, "export-logits", ek, "test/logits", 3), "flip")
    _damage(_chunk_file(store, "export-logits", ek, "calib/labels", 1), "delete")
    res = tiny.run("verify", ek[:12], sk, store=store)
    assert res.returncode == 1, res.stdout + res.stderr
    assert f"BAD  export-logits {ek}" in res.stdout and f"OK   split {sk}" in res.stdout
    bad = [ln for ln in res.stdout.splitlines() if ln.startswith("     ")]
    assert len(bad) == 2, res.stdout
    assert any("test/logits" in ln for ln in bad) and any("calib/labels" in ln for ln in bad)
    assert all(f"export-logits/{ek[:12]}" in ln for ln in bad)
    res = tiny.run("verify", store=store)  # all artifacts
    assert (
        res.returncode == 1
        and res.stdout.count("BAD ") == 1
        and f"OK   calibrate {ck}" in res.stdout
    )


# (stage run, damaged export array, chunk, how): calibrate reads whole arrays, train-gate streams
# tuneV row chunks (iter_chunks) and reads val_small whole.
CASES = [
    ("calibrate", "val_small/logits", 1, "flip"),
    ("train-gate", "tuneV/logits", 2, "delete"),
]


def test_stage_refuses_damaged_input_chunk(tiny, tmp_path):
    ek = tiny.keys["export-logits"]
    exp = Store(tiny.store).open("export-logits", ek)
    calls, befores = [], []
    for i, (stage, array, chunk, how) in enumerate(CASES):
        store = tmp_path / f"case{i}"
        shutil.copytree(tiny.store, store)
        if stage == "calibrate":
            shutil.rmtree(store / "calibrate")  # (train-gate has never run: nothing to remove)
        assert not Store(store).list() or all(a.stage != stage for a in Store(store).list())
        blocks = dict(exp.iter_chunks(array))
        start = chunk * exp.manifest["arrays"][array]["chunk_rows"]
        assert np.any(blocks[start] != 0)  # a lost chunk reads as zeros: make that detectable
        _damage(_chunk_file(store, "export-logits", ek, array, chunk), how)
        befores.append(listing(store))
        calls.append((stage, store))
    with ThreadPoolExecutor(max_workers=2) as ex:
        results = list(ex.map(lambda c: tiny.run(*tiny.argv(c[0]), "-q", store=c[1]), calls))
    failures = []
    for (stage, array, _, how), (_, store), res, before in zip(
        CASES, calls, results, befores, strict=True
    ):
        try:
            line = assert_one_line_error(res, [f"export-logits/{ek[:12]}:{array}", "--force"])
            assert "chunk" in line or "checksum" in line, line
            assert listing(store) == before, "store changed"
            assert not (store / stage).exists() or not any((store / stage).iterdir())
        except AssertionError as e:
            failures.append(f"{stage} with {array} ({how}): {e}")
    assert not failures, "\n\n".join(failures)


def test_damaged_side_file_is_refused_on_read(tiny, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(tiny.store, store)
    key = tiny.keys["train-expert"]
    a = Store(store).open("train-expert", key)
    blob = a.read_bytes("model.safetensors")
    assert a.json("history.json")
    p = a.path / "files" / "model.safetensors"
    b = bytearray(blob)
    b[-100] ^= 0x01  # one bit in the weights: loading would silently give other logits
    p.write_bytes(bytes(b))
    with pytest.raises(
        IntegrityError, match=rf"train-expert/{key[:12]}:model.safetensors.*checksum"
    ):
        a.read_bytes("model.safetensors")
    h = a.path / "files" / "history.json"
    h.write_text(h.read_text().replace("0", "1", 1))
    with pytest.raises(IntegrityError, match="history.json"):
        a.json("history.json")
    h.unlink()
    with pytest.raises(IntegrityError, match="history.json.*missing"):
        a.json("history.json")


def test_export_refuses_an_expert_whose_weights_were_damaged(tiny, tmp_path):
    """The stage reads weights through the checksum (one flipped bit would silently change every
    logit): a one-line error naming the artifact and file, nothing published."""
    store = tmp_path / "store"
    shutil.copytree(tiny.store, store)
    for stage in ("export-logits", "calibrate"):
        shutil.rmtree(store / stage)
    key = tiny.keys["train-expert"]
    p = Store(store).open("train-expert", key).path / "files" / "model.safetensors"
    b = bytearray(p.read_bytes())
    b[-100] ^= 0x01
    p.write_bytes(bytes(b))
    before = listing(store)
    res = tiny.run(*tiny.argv("export-logits"), "-q", store=store)
    assert_one_line_error(res, [f"train-expert/{key[:12]}:model.safetensors", "checksum"])
    assert listing(store) == before
    assert not (store / "export-logits").exists() or not any((store / "export-logits").iterdir())
