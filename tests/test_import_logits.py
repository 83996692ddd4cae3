"""`import-logits`: foreign logits in every supported format -> the export layout, streamed.

Checks: every format (npy fp32/fp16, stored and deflated npz, safetensors fp32/bf16, Zarr, .pt
fp32/bf16) is read exactly; stored rows are f - max f in fp16 in the seeded row order (float32
where a row's range overflows fp16); labels, groups and weights follow the rows; the sequential
(Zarr) window path equals the memory-mapped path; cache keys follow file contents, not paths;
each validation error; and a round trip of a (fake) argse export through import gives the same
temperatures and eval metrics as the native path.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _logit_files import as_read, write_logits

from argse_cli import logit_import, logit_storage
from argse_cli.config import (
    HELDOUT_SPLITS,
    CalibrateConfig,
    EvalConfig,
    ExpertSource,
    ExportLogitsConfig,
    ImportLogitsConfig,
    TrainGateConfig,
)
from argse_cli.data.splits import split_weights
from argse_cli.errors import ArgseError
from argse_cli.readers import open_logits
from argse_cli.stages import import_logits as imp
from argse_cli.stages import run_stage
from argse_cli.store import Store, compute_key

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from export_to_files import write_files  # noqa: E402

torch.set_num_threads(1)

FORMATS = ("npy", "npy16", "npz", "npzc", "st", "st_bf16", "zarr", "pt", "pt_bf16")
LOSSES = ("ce", "balsoftmax", "logitadjust:2", "logitadjust:0.5")


def lt_counts(C: int, n_max: int = 500, imb: float = 100.0) -> np.ndarray:
    return np.maximum(1, np.floor(n_max * imb ** (-np.arange(C) / (C - 1)))).astype(np.int64)


def make_foreign(d: Path, C: int, E: int, n: int, fmts, seed: int = 0, n_per: dict | None = None):
    """Synthetic foreign experts: logits = noise + signal on the true class + (1 - tau) log pi."""
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    counts = lt_counts(C)
    log_pi = np.log(counts / counts.sum()).astype(np.float32)
    (d / "counts.json").write_text(json.dumps(counts.tolist()))
    data, specs, labels, used = {}, {}, {}, {}
    for si, s in enumerate(HELDOUT_SPLITS):
        m = (n_per or {}).get(s, n)
        y = (
            np.concatenate([np.arange(C), rng.integers(0, C, m - C)])
            if m >= C
            else rng.integers(0, C, m)
        )
        y = rng.permutation(y)
        np.save(d / f"y_{s}.npy", y)
        labels[s] = str(d / f"y_{s}.npy")
        for e in range(E):
            tau = [0.0, 1.0, 2.0, 0.5][e % 4]
            f = rng.standard_normal((m, C)).astype(np.float32)
            f[np.arange(m), y] += rng.uniform(0, 14, m).astype(np.float32) * (0.7 + 0.1 * e)
            f += np.float32(0.5 * (1 - tau)) * log_pi[None] + np.float32(
                30.0 * e
            )  # offsets: softmax-free
            fmt = fmts[(e + si * E) % len(fmts)]
            specs[(e, s)] = write_logits(f, d / f"f{e}_{s}", fmt)
            data[(e, s)] = as_read(f, fmt)
            used[(e, s)] = fmt
    experts = [
        ExpertSource(
            name=f"x{e}", loss=LOSSES[e % 4], logits={s: specs[(e, s)] for s in HELDOUT_SPLITS}
        )
        for e in range(E)
    ]
    return {
        "experts": experts,
        "labels": labels,
        "counts": counts,
        "data": data,
        "used": used,
        "class_counts": str(d / "counts.json"),
    }


def import_cfg(fx: dict, **kw) -> ImportLogitsConfig:
    base = {
        "experts": fx["experts"],
        "labels": fx["labels"],
        "class_counts": fx["class_counts"],
        "chunk_rows": 512,
    }
    return ImportLogitsConfig(**{**base, **kw})


# ---------------------------------------------------------------------------------- formats
@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """C = 1000, four experts, 2000 rows per split, the 16 (expert, split) files in 9 formats."""
    d = tmp_path_factory.mktemp("foreign")
    fx = make_foreign(d, C=1000, E=4, n=2000, fmts=FORMATS)
    store = Store(d / "store")
    key = imp.run(import_cfg(fx), store, quiet=True)
    return fx, store, store.open("import-logits", key)


def test_every_format_is_used_and_read_exactly(big):
    fx, _, _ = big
    assert set(fx["used"].values()) == set(FORMATS)
    for (e, s), spec in [
        ((e, s), fx["experts"][e].logits[s]) for e in range(4) for s in HELDOUT_SPLITS
    ]:
        src = open_logits(spec)
        want = fx["data"][(e, s)]
        assert src.shape == want.shape
        assert np.array_equal(src[5:17], want[5:17])
        idx = np.array([1999, 3, 700, 3, 0])
        assert np.array_equal(src.take(idx), want[idx])
        mmapped = fx["used"][(e, s)] not in ("zarr",)
        assert src.random_access == mmapped


def test_stored_rows_are_row_max_shifted_fp16_in_seeded_order(big):
    fx, _, art = big
    counts = fx["counts"]
    c2g = art.array("class_to_group")
    assert np.array_equal(c2g, (counts <= 20).astype(np.int64))  # group rule threshold:20
    assert np.array_equal(art.array("class_counts"), counts)
    for si, s in enumerate(HELDOUT_SPLITS):
        logits = art.array(f"{s}/logits")
        assert logits.dtype == np.float16 and logits.shape == (2000, 4, 1000)
        assert art.manifest["arrays"][f"{s}/logits"]["chunk_rows"] == 512
        ro = art.array(f"{s}/row_order")
        assert np.array_equal(ro, np.random.default_rng([0, si]).permutation(2000))
        assert np.array_equal(art.array(f"{s}/source_index"), ro)
        y = np.load(fx["labels"][s])
        assert np.array_equal(art.array(f"{s}/labels"), y[ro])
        assert np.array_equal(art.array(f"{s}/group"), c2g[y[ro]])
        w_lt, w_bal = split_weights(y, counts)
        assert np.array_equal(art.array(f"{s}/w_lt"), w_lt[ro])
        assert np.array_equal(art.array(f"{s}/w_bal"), w_bal[ro])
        for e in range(4):
            f = fx["data"][(e, s)][ro]
            if f.dtype == np.float16:  # fp16 sources are stored verbatim
                want = f
            else:
                z = f.astype(np.float32)
                want = (z - z.max(axis=1, keepdims=True)).astype(np.float16)
            assert np.array_equal(logits[:, e], want), (e, s, fx["used"][(e, s)])
            if f.dtype != np.float16:
                assert (logits[:, e].max(axis=1) == 0).all()  # the row max is subtracted
            # softmax ignores the shift: posteriors agree with the raw logits' up to fp16 rounding
            p_raw = torch.softmax(torch.from_numpy(f.astype(np.float32)), 1)
            p_st = torch.softmax(torch.from_numpy(logits[:, e].astype(np.float32)), 1)
            assert torch.allclose(p_raw, p_st, atol=2e-2)
    meta = art.meta
    assert [x["key"] for x in meta["experts"]] == ["x0", "x1", "x2", "x3"]
    assert [x["tau"] for x in meta["experts"]] == [0.0, 1.0, 2.0, 0.5]
    assert meta["num_classes"] == 1000 and meta["num_experts"] == 4 and meta["num_groups"] == 2
    assert meta["splits"] == {s: 2000 for s in HELDOUT_SPLITS}


def test_float32_where_a_row_range_overflows_fp16(tmp_path):
    fx = make_foreign(tmp_path / "d", C=30, E=2, n=200, fmts=("npy",))
    f = fx["data"][(1, "calib")].copy()
    f[17, 3] = -1.0e5  # range > 65504 in one row of one split
    np.save(fx["experts"][1].logits["calib"], f)
    art = Store(tmp_path / "s").open(
        "import-logits", imp.run(import_cfg(fx, chunk_rows=64), Store(tmp_path / "s"), quiet=True)
    )
    assert art.meta["dtypes"] == {
        "tuneV": "float16",
        "val_small": "float16",
        "calib": "float32",
        "test": "float16",
    }
    ro = art.array("calib/row_order")
    got = art.array("calib/logits")[:, 1]
    want = f[ro] - f[ro].max(axis=1, keepdims=True)
    assert got.dtype == np.float32 and np.array_equal(got, want)
    assert np.isfinite(got).all() and got.min() < -65504


def test_sequential_window_path_equals_mmap_path(tmp_path, monkeypatch):
    """Zarr sources are read front to back once per window of output rows; same bytes stored."""
    a = make_foreign(tmp_path / "a", C=50, E=2, n=700, fmts=("npy",), seed=3)
    b = make_foreign(tmp_path / "b", C=50, E=2, n=700, fmts=("zarr",), seed=3)
    monkeypatch.setattr(logit_storage, "WINDOW_BYTES", 2 * 64 * 2 * 50 * 2)  # 2 chunks of 64 rows per window
    monkeypatch.setattr(logit_storage, "SCAN_BYTES", 37 * 50 * 4)  # 37-row scan blocks
    store = Store(tmp_path / "s")
    ka = imp.run(import_cfg(a, chunk_rows=64), store, quiet=True)
    kb = imp.run(import_cfg(b, chunk_rows=64), store, quiet=True)
    assert ka != kb  # different files (formats) -> different keys
    A, B = store.open("import-logits", ka), store.open("import-logits", kb)
    for name in A.array_names():
        assert np.array_equal(A.array(name), B.array(name)), name


def test_key_follows_contents_not_paths(tmp_path):
    fx = make_foreign(tmp_path / "a", C=20, E=2, n=100, fmts=("npy", "npz"))
    store = Store(tmp_path / "s")
    cfg = import_cfg(fx, chunk_rows=32)
    extra = logit_import.key_extra(cfg, store)
    assert set(extra["files"]) == {f"logits.x{e}.{s}" for e in range(2) for s in HELDOUT_SPLITS} | {
        f"labels.{s}" for s in HELDOUT_SPLITS
    } | {"class_counts"}
    assert (store.root / logit_import.MEMO).is_file()
    key = imp.run(cfg, store, quiet=True)
    # the same bytes under another directory: same key (a cache hit)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    moved = json.loads(cfg.model_dump_json().replace(str(tmp_path / "a"), str(tmp_path / "b")))
    cfg_b = ImportLogitsConfig.model_validate(moved)
    assert logit_import.key_extra(cfg_b, store) == extra
    assert imp.run(cfg_b, store, quiet=True) == key
    # one changed value in one file: a new key; train logits are ignored
    y = np.load(tmp_path / "b" / "y_test.npy")
    y[0] = (y[0] + 1) % 20
    np.save(tmp_path / "b" / "y_test.npy", y)
    assert logit_import.key_extra(cfg_b, store) != extra
    ex = [
        e.model_copy(update={"logits": {**e.logits, "train": e.logits["test"]}})
        for e in cfg.experts
    ]
    assert logit_import.key_extra(cfg.model_copy(update={"experts": tuple(ex)}), store) == extra
    # write=False never writes the memo
    memo = store.root / logit_import.MEMO
    memo.unlink()
    logit_import.key_extra(cfg, store, write=False)
    assert not memo.exists()


def test_pipeline_file_with_an_import_section_feeds_calibrate(tmp_path, monkeypatch):
    from argse_cli.pipeline import Pipeline

    fx = make_foreign(tmp_path / "a", C=20, E=2, n=100, fmts=("npy",))
    store = Store(tmp_path / "s")
    monkeypatch.setenv("ARGSE_STORE", str(store.root))  # where key_extra keeps its memo by default
    cfg = import_cfg(fx, chunk_rows=32)
    key = imp.run(cfg, store, quiet=True)
    p = Pipeline({"import_logits": cfg.model_dump(mode="json")}, store)
    assert p.export_ref() == ("import-logits", key)
    assert p.calibrate_upstream() == ({"export": key}, {"export": "import-logits"})


def test_weights_file_and_group_file(tmp_path):
    fx = make_foreign(tmp_path / "a", C=20, E=1, n=100, fmts=("npy",))
    w = {}
    for s in HELDOUT_SPLITS:
        (tmp_path / f"w_{s}.json").write_text(json.dumps([0.5 + (i % 3) for i in range(100)]))
        w[s] = str(tmp_path / f"w_{s}.json")
    c2g = np.array([0] * 6 + [1] * 8 + [2] * 6)
    (tmp_path / "c2g.csv").write_text(
        "class,group\n" + "".join(f"{c},{g}\n" for c, g in enumerate(c2g))
    )
    store = Store(tmp_path / "s")
    art = store.open(
        "import-logits",
        imp.run(
            import_cfg(fx, chunk_rows=32, weights=w, class_to_group=str(tmp_path / "c2g.csv")),
            store,
            quiet=True,
        ),
    )
    assert np.array_equal(art.array("class_to_group"), c2g) and art.meta["num_groups"] == 3
    ro, y = art.array("test/row_order"), art.array("test/labels")
    w_lt = np.array([0.5 + (i % 3) for i in range(100)])[ro]
    pi = fx["counts"] / fx["counts"].sum()
    assert np.array_equal(art.array("test/w_lt"), w_lt)
    assert np.allclose(art.array("test/w_bal"), w_lt * (1 / 20) / pi[y], rtol=1e-15)


class Unsafe:
    """Not a tensor: the weights-only unpickler must refuse it."""


def test_zarr_group_member_and_csv_counts(tmp_path):
    import zarr

    f = np.arange(60, dtype=np.float32).reshape(6, 10)
    g = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    g.create_array("logits", shape=f.shape, dtype=f.dtype, chunks=(4, 10))[:] = f
    assert np.array_equal(open_logits(f"{tmp_path / 'g.zarr'}:logits")[1:5], f[1:5])
    assert np.array_equal(open_logits(str(tmp_path / "g.zarr"))[0:6], f)  # the only array
    from argse_cli.readers import load_class_counts

    (tmp_path / "c.csv").write_text("class,count\n2,5\n0,7\n1,6\n")
    assert load_class_counts(str(tmp_path / "c.csv")).tolist() == [7, 6, 5]
    (tmp_path / "c.txt").write_text("7\n6\n5\n")
    assert load_class_counts(str(tmp_path / "c.txt")).tolist() == [7, 6, 5]


# ---------------------------------------------------------------------------------- errors
@pytest.fixture
def small(tmp_path):
    return make_foreign(tmp_path / "d", C=20, E=2, n=60, fmts=("npy",)), Store(tmp_path / "s")


def _expect(cfg, store, field, *words):
    with pytest.raises(ArgseError) as ei:
        imp.run(cfg, store, quiet=True)
    assert ei.value.field.startswith(field), str(ei.value)
    for w in words:
        assert w in str(ei.value), str(ei.value)
    assert "\n" not in str(ei.value)
    assert (
        not any(p.name.startswith(".tmp") for p in (store.root / "import-logits").glob("*"))
        if (store.root / "import-logits").exists()
        else True
    )


def test_error_class_count_mismatch_between_experts(small):
    fx, store = small
    np.save(fx["experts"][1].logits["val_small"], np.zeros((60, 21), np.float32))
    _expect(
        import_cfg(fx),
        store,
        "import_logits.experts.x1.logits.val_small",
        "21 classes",
        "'x0' has 20",
    )


def test_error_class_counts_vs_logits(small, tmp_path):
    fx, store = small
    (tmp_path / "c.csv").write_text("\n".join(str(v) for v in fx["counts"][:19]))
    _expect(
        import_cfg(fx, class_counts=str(tmp_path / "c.csv")),
        store,
        "import_logits.class_counts",
        "19 class counts",
        "20 classes",
    )


def test_error_label_out_of_range(small):
    fx, store = small
    y = np.load(fx["labels"]["calib"])
    y[7] = 20
    np.save(fx["labels"]["calib"], y)
    _expect(import_cfg(fx), store, "import_logits.labels.calib", "label 20 at row 7", "[0, 20)")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_error_non_finite_logits_names_split_expert_row(small, bad):
    fx, store = small
    f = fx["data"][(1, "test")].copy()
    f[41, 5] = bad
    f[50, 0] = bad
    np.save(fx["experts"][1].logits["test"], f)
    _expect(import_cfg(fx), store, "import_logits.experts.x1.logits.test", "row 41", "NaN or inf")


def test_error_row_counts_differ(small):
    fx, store = small
    np.save(fx["experts"][1].logits["tuneV"], fx["data"][(1, "tuneV")][:59])
    _expect(import_cfg(fx), store, "import_logits.experts.x1.logits.tuneV", "59 rows", "60")


def test_error_empty_group(small, tmp_path):
    fx, store = small
    (tmp_path / "g.json").write_text(json.dumps([0] * 10 + [2] * 10))  # group 1 has no class
    _expect(
        import_cfg(fx, class_to_group=str(tmp_path / "g.json")),
        store,
        "import_logits.class_to_group",
        "group 1 is empty",
    )
    _expect(import_cfg(fx, group_rule="threshold:0"), store, "groups", "empty")  # no tail class
    y = np.load(fx["labels"]["val_small"])  # a split without any tail row
    np.save(fx["labels"]["val_small"], np.where(fx["counts"][y] <= 20, 0, y))
    _expect(import_cfg(fx), store, "import_logits.labels.val_small", "group 1 has no rows")


def test_error_missing_split_and_duplicate_names(small):
    fx, store = small
    e0 = fx["experts"][0]
    ex = (
        e0.model_copy(update={"logits": {k: v for k, v in e0.logits.items() if k != "calib"}}),
        fx["experts"][1],
    )
    _expect(
        import_cfg(fx, experts=ex),
        store,
        "import_logits.experts.x0.logits",
        "split calib is missing",
    )
    labels = {k: v for k, v in fx["labels"].items() if k != "test"}
    _expect(import_cfg(fx, labels=labels), store, "import_logits.labels", "split test is missing")
    dup = (e0, fx["experts"][1].model_copy(update={"name": "x0"}))
    _expect(import_cfg(fx, experts=dup), store, "import_logits.experts", "used twice")


def test_error_bad_files(small, tmp_path):
    fx, store = small
    e0 = fx["experts"][0]
    for spec, word in (
        (str(tmp_path / "nope.npy"), "not found"),
        (str(tmp_path / "c.txt"), "unknown logits format"),
    ):
        (tmp_path / "c.txt").write_text("1\n")
        ex = (e0.model_copy(update={"logits": {**e0.logits, "test": spec}}), fx["experts"][1])
        with pytest.raises(ArgseError, match=word):
            imp.run(import_cfg(fx, experts=ex), store, quiet=True)
    torch.save({"logits": torch.zeros(3, 20), "obj": Unsafe()}, tmp_path / "u.pt")
    with pytest.raises(ArgseError, match="weights_only"):
        open_logits(f"{tmp_path / 'u.pt'}:logits")
    np.savez(tmp_path / "two.npz", a=np.zeros((2, 3)), b=np.zeros((2, 3)))
    with pytest.raises(ArgseError, match="holds 2 arrays"):
        open_logits(str(tmp_path / "two.npz"))
    (tmp_path / "z.json").write_text(json.dumps([3, 0, 2]))
    with pytest.raises(ArgseError, match="class 1 has 0 training samples"):
        imp.run(import_cfg(fx, class_counts=str(tmp_path / "z.json")), store, quiet=True)


# ---------------------------------------------------------------------------------- round trip
def _fake_export(store: Store, C: int, n: int, seed: int, chunk_rows: int) -> tuple[str, dict]:
    """An `export-logits`-shaped artifact (what the CIFAR path writes), built directly."""
    rng = np.random.default_rng(seed + 100)
    counts = lt_counts(C, n_max=500, imb=100)
    c2g = (np.arange(C) >= C // 2).astype(np.int64)
    taus = [0.0, 1.0, 2.0]
    log_pi = np.log(counts / counts.sum())
    own = {}
    cfg = ExportLogitsConfig(chunk_rows=chunk_rows, seed=seed)
    key = compute_key("export-logits", 1, cfg.key_payload())
    with store.writer(
        "export-logits", key, config=cfg.key_payload(), upstream={}, upstream_stages={}, version=1
    ) as out:
        for si, s in enumerate(HELDOUT_SPLITS):
            y = rng.permutation(np.arange(n) % C)
            f = rng.standard_normal((n, 3, C)) * 1.5
            f[np.arange(n), :, y] += rng.uniform(0, 6, (n, 1))
            f += (1 - np.array(taus))[None, :, None] * log_pi[None, None, :] + 4.0
            f = f.astype(np.float16)
            own[s] = (f, y)
            order = np.random.default_rng([seed, si]).permutation(n)
            w_lt, w_bal = split_weights(y, counts)
            out.array(f"{s}/row_order", order, chunk_rows=chunk_rows)
            out.array(f"{s}/source_index", order + 1000, chunk_rows=chunk_rows)
            for name, v in (("labels", y), ("w_lt", w_lt), ("w_bal", w_bal), ("group", c2g[y])):
                out.array(f"{s}/{name}", v[order], chunk_rows=chunk_rows)
            rows = out.rows(f"{s}/logits", (n, 3, C), np.float16, chunk_rows)
            rows.append(f[order])
        out.array("class_counts", counts)
        out.array("class_to_group", c2g)
        out.meta.update(
            experts=[
                {"key": f"e{i}", "loss": l, "tau": t, "depth": 8}
                for i, (l, t) in enumerate(
                    zip(("ce", "balsoftmax", "logitadjust:2"), taus, strict=True)
                )
            ],
            splits={s: n for s in HELDOUT_SPLITS},
            num_classes=C,
            num_experts=3,
            num_groups=2,
            chunk_rows=chunk_rows,
            layout="s/logits float16 [N, E, C]",
        )
    return key, own


def _downstream(store: Store, stage: str, key: str) -> tuple:
    kc, _ = run_stage(
        "calibrate", CalibrateConfig(), {"export": key}, {"export": stage}, store, quiet=True
    )
    kg, _ = run_stage(
        "train-gate",
        TrainGateConfig(epochs=1, patience=1, batch_size=64),
        {"export": key, "calibrate": kc},
        {"export": stage, "calibrate": "calibrate"},
        store,
        quiet=True,
    )
    ke, _ = run_stage(
        "eval",
        EvalConfig(n_boot=20),
        {"gate": kg},
        {"gate": "train-gate"},
        store,
        quiet=True,
    )
    return store.open("calibrate", kc), store.open("train-gate", kg), store.open("eval", ke)


def test_round_trip_of_an_export_matches_the_native_path(tmp_path, monkeypatch):
    """The export's logits, put back in each split's own order and imported with the export's
    seed and chunking, give the same stored rows, temperatures, gate and eval metrics."""
    import argse_cli.report.eval_figures as ef

    monkeypatch.setattr(ef, "eval_figures", lambda *a, **k: None)  # figures are not compared (slow)
    store = Store(tmp_path / "s")
    C, n, seed, cr = 10, 400, 5, 64
    ekey, own = _fake_export(store, C, n, seed, cr)
    exp = store.open("export-logits", ekey)
    # scripts/export_to_files.py (what `make demo` runs): each split in its own order, plain .npy
    pipeline = write_files(exp, tmp_path / "src")
    for s in HELDOUT_SPLITS:  # the export's row permutation was undone
        assert np.array_equal(np.load(tmp_path / "src" / f"labels_{s}.npy"), own[s][1])
    cfg = ImportLogitsConfig(**yaml.safe_load(pipeline.read_text())["import_logits"])
    assert cfg.seed == seed and cfg.chunk_rows == cr
    ikey = imp.run(cfg, store, quiet=True)
    art = store.open("import-logits", ikey)
    for s in HELDOUT_SPLITS:
        for name in ("logits", "labels", "w_lt", "w_bal", "group", "row_order"):
            assert np.array_equal(art.array(f"{s}/{name}"), exp.array(f"{s}/{name}")), (s, name)
    native, imported = (
        _downstream(store, "export-logits", ekey),
        _downstream(store, "import-logits", ikey),
    )
    assert native[0].key != imported[0].key  # distinct artifacts ...
    assert np.array_equal(
        native[0].array("temperature"), imported[0].array("temperature")
    )  # ... same numbers
    assert np.array_equal(native[0].array("shift"), imported[0].array("shift"))
    for name in ("alpha", "mu", "beta"):
        assert np.array_equal(native[1].array(name), imported[1].array(name))
    m_nat, m_imp = native[2].json("metrics.json"), imported[2].json("metrics.json")
    m_nat.pop("gate_key"), m_imp.pop("gate_key")
    assert m_nat == m_imp
    assert np.array_equal(native[2].array("test/score"), imported[2].array("test/score"))
