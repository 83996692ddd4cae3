"""Report layer: LaTeX tables (booktabs, mean +- std, bold rule, escaping), figures, report stage."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from argse_cli.evaluation import evaluate_scores
from argse_cli.report import tables as T

C, K = 10, 2
C2G = np.array([0] * 5 + [1] * 5, dtype=np.int64)
LEVELS = [0.7, 0.8, 0.9]


# ------------------------------------------------------------------------------ fake data
def _test_set(n: int = 600, seed: int = 0) -> dict:
    """Balanced test labels; w_lt follows a long-tailed prior (IF 100), w_bal = 1."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(C), n // C).astype(np.int64)
    rng.shuffle(y)
    prior = 100.0 ** (-np.arange(C) / (C - 1))
    w_lt = (prior / prior.mean())[y].astype(np.float64)
    return {"y": y, "class_to_group": C2G, "w_lt": w_lt, "w_bal": np.ones(len(y))}


def _method(data: dict, acc: float, informative: bool, seed: int) -> dict:
    """pred correct w.p. ``acc``; an informative score ranks correct samples higher."""
    rng = np.random.default_rng(seed)
    y = data["y"]
    ok = rng.random(len(y)) < acc
    pred = np.where(ok, y, (y + 1 + rng.integers(0, C - 1, len(y))) % C).astype(np.int64)
    noise = rng.normal(0, 0.3, len(y))
    score = (ok.astype(float) + noise if informative else noise).astype(np.float32)
    return {"score": score, "pred": pred}


def _evaluate(data: dict, m: dict) -> tuple[dict, dict]:
    sweep, curves = evaluate_scores(
        m["score"], m["pred"], data["y"], data["class_to_group"],
        {"lt": data["w_lt"], "bal": data["w_bal"]}, levels=LEVELS, n_boot=0,
    )  # fmt: skip
    return sweep, {v: c.to_dict() for v, c in curves.items()}


Q = 100


def _refit_arrays(m: dict, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A refitted curve's [Q, N] scores: point i is the method's score plus a little per-point noise."""
    rng = np.random.default_rng(seed)
    S = (m["score"][None, :] + rng.normal(0, 0.05, (Q, len(m["score"])))).astype(np.float32)
    return S, np.repeat(m["pred"][None, :], Q, axis=0)


def _history(T_: int = 6) -> dict:
    ep = list(range(T_))
    return {
        "epoch": ep,
        "loss": [1.0 / (t + 1) for t in ep],
        "val_criterion": [1.2 / (t + 1) + 0.01 * t for t in ep],
        "alpha": [[1.0 + 0.05 * t, 1.0 - 0.05 * t] for t in ep],
        "mu": [[0.1 * t, 0.0] for t in ep],
        "beta": [[0.5, 0.5] for _ in ep],
        "lambda": [[0.01 * t, 0.02 * t] for t in ep],
        "coverage": [0.6 + 0.02 * t for t in ep],
        "group_coverage": [[0.7 + 0.02 * t, 0.5 + 0.02 * t] for t in ep],
        "group_error": [[0.05, 0.3 - 0.01 * t] for t in ep],
    }


def _publish(store, stage: str, name: str, fill, upstream=None, stages=None) -> str:
    from argse_cli.store import compute_key

    key = compute_key(stage, 1, {"name": name, "view": "lt"}, upstream or {})
    with store.writer(
        stage,
        key,
        config={"name": name, "view": "lt"},
        upstream=upstream or {},
        upstream_stages=stages or {},
        version=1,
    ) as out:
        fill(out)
    return key


def _extras(data: dict, m: dict) -> dict:
    """Risk control, SAG and L2D sections of an eval's metrics.json, made by the real functions on
    the fake data (calib: the first half of the rows, test: the second)."""
    from argse_cli.guarantees import risk_control_report
    from argse_cli.l2d import EMSettings, deferral_comparison, em_defer, simulate_humans
    from argse_cli.sag import sag_stream

    n = len(data["y"]) // 2
    part = lambda sl: {"score": m["score"][sl], "pred": m["pred"][sl], "y": data["y"][sl],  # noqa: E731
                       "w_lt": data["w_lt"][sl], "w_bal": data["w_bal"][sl]}
    cal, tst = part(slice(0, n)), part(slice(n, None))
    g = risk_control_report(cal, tst, data["class_to_group"], 0.1, 0.1, 0.1)
    sag = sag_stream(tst["score"], tst["pred"] == tst["y"], "sensitivity", 0.8, 100, 20, seed=0)
    eta = np.full((n, C), 0.02)
    eta[np.arange(n), tst["pred"]] = 0.82
    hm = simulate_humans(tst["y"], C, [0.3, 0.3], seed=0)
    fit = em_defer(np.c_[tst["score"], eta.max(1)], eta, hm, tst["y"], C, em=EMSettings(n_iter=5))
    comp = deferral_comparison(fit.gate.predict(np.c_[tst["score"], eta.max(1)]), eta, hm, tst["y"], tst["score"],
                               tst["pred"])
    l2d = {**comp, "fit": fit.to_dict(), "human_noise": [0.3, 0.3]}  # no "diagnostics": an older eval
    return {"guarantees": g, "sag": sag, "l2d": l2d,
            "warnings": ["the operating point (rejection cost c = 0.05) accepts everything on test"]}


def _build_store(root) -> tuple:
    """2 seeds: eval 'AR-GSE (balanced)' (good) + 'AR-GSE_weak' (bad), baselines with a
    baseline, an ablation and two sensitivity settings. Returns (store, up, stages, raw)."""
    from argse_cli.store import Store

    store = Store(root)
    data = _test_set()
    evals, bases, raw = [], [], {}
    fold = _publish(store, "export-logits", "fold", lambda o: o.meta.update(experts=[]))
    for seed in (0, 1):
        gkey = _publish(
            store,
            "train-gate",
            f"gate{seed}",
            lambda o: (
                o.json("history.json", _history()),
                o.meta.update(view="lt", chosen_epoch=3),
            ),
            {"export": fold}, {"export": "export-logits"},
        )
        for name, acc, inf in (("AR-GSE (balanced)", 0.9, True), ("AR-GSE_weak", 0.6, False)):
            m = _method(data, acc, inf, seed=100 * seed + int(acc * 10))
            sweep, curves = _evaluate(data, m)
            raw[(name, seed)] = sweep

            S, P = _refit_arrays(m, seed)
            raw[(name, seed, "refit")] = (S, P)

            extra = _extras(data, m) if (name, seed) == ("AR-GSE (balanced)", 0) else {}

            def fill(o, name=name, m=m, sweep=sweep, curves=curves, seed=seed, gkey=gkey, S=S, P=P, extra=extra):
                o.json("metrics.json", {
                    "method": name, "seed": seed, "gate_key": gkey, "levels": LEVELS, "sweep": sweep, **extra,
                })  # fmt: skip
                o.json("rc_curves.json", {v: {name: c} for v, c in curves.items()})
                for v in ("lt", "bal"):
                    o.array(f"refit/{v}/score", S)
                    o.array(f"refit/{v}/pred", P)
                o.array("test/score", m["score"])
                o.array("test/pred", m["pred"])
                o.array("test/y", data["y"])
                o.array("test/w_lt", data["w_lt"])
                o.array("test/w_bal", data["w_bal"])
                o.array("class_to_group", data["class_to_group"])

            evals.append(
                _publish(
                    store, "eval", f"{name}{seed}", fill, {"gate": gkey}, {"gate": "train-gate"}
                )
            )
        results, arrays, rc = [], {}, {"lt": {}, "bal": {}}
        specs = [
            ("Chow", "baseline", None, 0.75, True),
            ("AR-GSE", "ablation", "no gate", 0.8, True),
            ("AR-GSE", "sensitivity", "c=0.1", 0.85, True),
            ("AR-GSE", "sensitivity", "c=0.2", 0.8, True),
        ]
        for i, (meth, group, setting, acc, inf) in enumerate(specs):
            slug = f"s{i}"
            m = _method(data, acc, inf, seed=1000 + 10 * seed + i)
            sweep, curves = _evaluate(data, m)
            raw[(meth, group, setting, seed)] = sweep
            plug = group != "baseline"  # the ablation / sensitivity rows are plug-in rules: refitted
            results.append({"method": meth, "seed": seed, "group": group, "setting": setting, "slug": slug,
                            "sweep": sweep, "refit": {} if plug else None})
            arrays[slug] = {**m, "refit": _refit_arrays(m, 50 + i) if plug else None}
            for v, c in curves.items():
                rc[v][slug] = c

        def fill_b(o, results=results, arrays=arrays, rc=rc):
            o.json("baselines.json", {"levels": LEVELS, "results": results})
            o.json("rc_curves.json", rc)
            for slug, m in arrays.items():
                o.array(f"m/{slug}/score", m["score"])
                o.array(f"m/{slug}/pred", m["pred"])
                if m["refit"] is not None:
                    for v in ("lt", "bal"):
                        o.array(f"m/{slug}/refit/{v}/score", m["refit"][0])
                        o.array(f"m/{slug}/refit/{v}/pred", m["refit"][1])
            for k in ("y", "w_lt", "w_bal"):
                o.array(f"test/{k}", data[k])
            o.array("class_to_group", data["class_to_group"])

        bases.append(_publish(store, "baselines", f"b{seed}", fill_b, {"export": fold},
                              {"export": "export-logits"}))
    up = {"evals": evals, "baselines": bases}
    stages = {"evals": "eval", "baselines": "baselines"}
    return store, up, stages, raw


@pytest.fixture(scope="module")
def report_art(tmp_path_factory):
    from argse_cli.config import ReportConfig
    from argse_cli.stages import run_stage

    store, up, st, raw = _build_store(tmp_path_factory.mktemp("store"))
    cfg = ReportConfig(n_boot=50, band_boot=50, banner="smoke recipe: experts trained {expert_epochs} epochs; "
                       "numbers are not meaningful")
    key, computed = run_stage("report", cfg, up, st, store, quiet=True)
    assert computed
    return store.open("report", key), raw


# ------------------------------------------------------------------------------ tables
def test_fmt_mean_std_hand_computed():
    # mean 0.15, std (ddof 1) = sqrt(2 * 0.05^2 / 1) = 0.0707...
    assert T.fmt_mean_std([0.1, 0.2]) == "0.150 $\\pm$ 0.071"
    assert T.fmt_mean_std([0.5]) == "0.500"
    assert T.fmt_mean_std([]) == "--"
    m, s = T.mean_std([1.0, 2.0, 3.0])
    assert m == 2.0 and s == pytest.approx(1.0)


def test_latex_escape():
    assert T.latex_escape("a_b%c&d#e$f") == r"a\_b\%c\&d\#e\$f"
    assert (
        T.latex_escape("x{y}~^\\") == r"x\{y\}\textasciitilde{}\textasciicircum{}\textbackslash{}"
    )


def _balanced_braces(tex: str) -> bool:
    depth = 0
    for i, ch in enumerate(tex):
        if ch in "{}" and i and tex[i - 1] == "\\":
            continue
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0


def _body_rows(tex: str) -> list[str]:
    body = tex.split("\\midrule", 1)[1].split("\\bottomrule")[0]
    return [r for r in body.splitlines() if r.strip().endswith("\\\\")]


def test_main_table_structure_bold_and_escaping():
    cols = T.default_columns(LEVELS)
    entries = {
        "AR-GSE_v1 & 50%": {c.key: [0.1, 0.2] for c in cols},
        "Chow#2": {c.key: [0.3] for c in cols},
    }
    bold = {"aurc_balanced": "AR-GSE_v1 & 50%", "aurc_worst": None}
    tex = T.main_table(entries, cols, bold, "Long-tailed weights.", "tab:x")
    assert tex.index("\\toprule") < tex.index("\\midrule") < tex.index("\\bottomrule")
    rows = _body_rows(tex)
    assert len(rows) == 2
    assert rows[0].startswith(r"AR-GSE\_v1 \& 50\% & ")
    assert rows[1].startswith(r"Chow\#2 & ")
    # 1 label + 8 numeric + seeds column; separators are the unescaped &
    assert len(re.split(r"(?<!\\)&", rows[0])) == 1 + len(cols) + 1
    assert rows[0].count("\\textbf") == 1 and "\\textbf{0.150 $\\pm$ 0.071}" in rows[0]
    assert "\\textbf" not in rows[1]
    assert rows[0].rstrip(" \\").endswith("2") and rows[1].rstrip(" \\").endswith("1")
    assert _balanced_braces(tex)
    assert tex.count("\\begin{") == tex.count("\\end{")


def _pooled(data: dict, m: dict, name: str, seed: int = 0, refit=None):
    from argse_cli.report.compare import Pooled

    return Pooled(name, seed, "main", None, data["y"], data["class_to_group"],
                  {"lt": data["w_lt"], "bal": data["w_bal"]}, (m["score"], m["pred"]), refit, [])


def test_compare_clear_winner_and_identical_methods():
    from argse_cli.report.compare import compare, method_stats

    data = _test_set(800, seed=3)
    good, bad = _method(data, 0.9, True, seed=1), _method(data, 0.55, False, seed=2)
    pooled = {("good", 0): _pooled(data, good, "good"), ("bad", 0): _pooled(data, bad, "bad"),
              ("copy", 0): _pooled(data, good, "copy")}
    ms = method_stats(pooled, ["good", "bad", "copy"], "lt", "sweep", LEVELS, 300)
    c = compare(ms["good"], ms["bad"])
    assert c["hi"][1] < 0 and c["diff"][1] < 0  # aurc_balanced: good is lower, significantly
    same = compare(ms["good"], ms["copy"])
    assert np.all(same["diff"] == 0) and np.all(same["lo"] == 0) and np.all(same["hi"] == 0)


def test_refit_statistics_equal_sweep_statistics_when_every_point_has_the_same_score():
    """A curve whose every point is the same score is that score's sweep: same numbers, same
    bootstrap resamples (so paired differences between the two protocols are exact)."""
    from argse_cli.report.compare import method_stats

    data = _test_set(600, seed=5)
    m = _method(data, 0.8, True, seed=4)
    refit = {v: (np.repeat(m["score"][None], Q, 0), np.repeat(m["pred"][None], Q, 0)) for v in ("lt", "bal")}
    pooled = {("a", 0): _pooled(data, m, "a", refit=refit)}
    r = method_stats(pooled, ["a"], "bal", "refit", LEVELS, 100)["a"]
    s = method_stats(pooled, ["a"], "bal", "sweep", LEVELS, 100)["a"]
    np.testing.assert_allclose(r.est, s.est, atol=1e-12)
    np.testing.assert_allclose(r.samples, s.samples, atol=1e-12)


def test_pooling_over_folds_and_disjointness():
    from argse_cli.report.compare import Result, check_disjoint, pool

    d1, d2 = _test_set(200, seed=1), _test_set(300, seed=2)
    m1, m2 = _method(d1, 0.8, True, 1), _method(d2, 0.8, True, 2)

    def res(name, fold, d, m, src):
        return Result(name, name, 0, "main", None, fold, fold,
                      lambda: {**d, **m, "refit": None, "source_index": src})

    rs = [res("A", "f1", d1, m1, np.arange(200)), res("A", "f2", d2, m2, np.arange(200, 500)),
          res("B", "f1", d1, m1, np.arange(200))]
    pooled, warnings = pool(rs, ["f1", "f2"])
    assert set(pooled) == {("A", 0)} and len(pooled[("A", 0)].y) == 500
    assert any("1 of 2 folds" in w for w in warnings)
    assert check_disjoint(rs, ["f1", "f2"])["rows"] == {"f1": 200, "f2": 300}
    bad = [res("A", "f1", d1, m1, np.arange(200)), res("A", "f2", d2, m2, np.arange(100, 400))]
    with pytest.raises(AssertionError, match="share source image"):
        check_disjoint(bad, ["f1", "f2"])


def test_fold_order_follows_the_data_not_the_keys():
    """Renaming the folds' keys (an upstream VERSION bump) keeps their order, hence the pooled row
    order, the bootstrap resamples and every CI; the keys only break ties of identical content."""
    from argse_cli.report.compare import Result, fold_order, method_stats, pool

    ds = [_test_set(200 + 50 * i, seed=i) for i in range(3)]
    ms = [_method(d, 0.8, True, i) for i, d in enumerate(ds)]
    content = ["c2", "c0", "c1"]  # xxh3 of each fold's test logits

    def results(keys):
        return [Result("A", "A", 0, "main", None, k, k, (lambda d=d, m=m: {**d, **m, "refit": None}),
                       fold_content=c) for k, d, m, c in zip(keys, ds, ms, content, strict=True)]

    before, after = results(["k1", "k2", "k3"]), results(["a1", "z9", "m5"])  # the keys sort otherwise
    assert fold_order(before) == ["k2", "k3", "k1"] and fold_order(after) == ["z9", "m5", "a1"]
    stats = []
    for rs in (before, after):
        pooled, _ = pool(rs, fold_order(rs))
        stats.append(method_stats(pooled, ["A"], "lt", "sweep", LEVELS, 200)["A"])
    np.testing.assert_array_equal(stats[0].est, stats[1].est)
    np.testing.assert_array_equal(stats[0].samples, stats[1].samples)
    pooled, _ = pool(after, sorted(r.fold for r in after))  # the old order: by key
    moved = method_stats(pooled, ["A"], "lt", "sweep", LEVELS, 200)["A"]
    np.testing.assert_allclose(moved.est, stats[0].est, atol=1e-12)  # the estimates never depended on it
    assert not np.array_equal(moved.samples, stats[0].samples)  # the resamples did
    tie = [Result("A", "A", 0, "main", None, k, k, lambda: {}, fold_content="same") for k in ("b", "a")]
    assert fold_order(tie) == ["a", "b"]


def test_holm_adjustment():
    from argse_cli.report.compare import holm

    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5]) == [0.5]


# ------------------------------------------------------------------------------ figures
def test_figures_written(tmp_path):
    """Direct API: returned paths, both formats, non-empty files (the stage test draws the rest)."""
    from argse_cli.report import figures as F

    data = _test_set(300, seed=1)
    curves = {
        n: _evaluate(data, _method(data, a, True, seed=i))[1]["lt"]
        for i, (n, a) in enumerate((("good", 0.9), ("bad", 0.6)))
    }
    paths = F.plot_rc_curves(curves, "worst", "bal", tmp_path / "rc")
    assert paths == [tmp_path / "rc.pdf", tmp_path / "rc.png"]
    _check_files(paths)
    # a group with no sample is skipped, not an error; only PNG requested -> only PNG written
    m = _method(data, 0.8, True, seed=3)
    out = F.plot_margin_hist(
        m["score"] - 0.5,
        np.zeros(len(m["score"]), np.int64),
        tmp_path / "margin",
        formats=("png",),
        weights=data["w_lt"],
    )
    assert out == [tmp_path / "margin.png"] and not (tmp_path / "margin.pdf").exists()
    with pytest.raises(ValueError):
        F.plot_rc_curves(curves, "nonsense", "lt", tmp_path / "x")
    with pytest.raises(ValueError):
        F.plot_rc_curves(curves, "balanced", "lt", tmp_path / "x", formats=("svg",))


def _check_files(paths):
    assert {p.suffix for p in paths} == {".pdf", ".png"}
    for p in paths:
        head = p.read_bytes()[:8]
        assert p.stat().st_size > 2000
        assert head.startswith(b"\x89PNG") if p.suffix == ".png" else head.startswith(b"%PDF")


# ------------------------------------------------------------------------------ stage
def test_stage_module_is_light():
    code = (
        "import sys, argse_cli.stages.report as r, argse_cli.report; "
        "assert r.STAGE == 'report' and r.VERSION >= 1; "
        "bad = [m for m in ('matplotlib', 'numpy', 'torch', 'zarr') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_report_stage_files_and_numbers(report_art, tmp_path):
    from argse_cli.metrics.refit import refit_stats

    art, raw = report_art
    files = set(art.manifest["files"])
    for f in ("main.tex", "main_balanced.tex", "sweep.tex", "sweep_balanced.tex", "ablations.tex",
              "sensitivity.tex", "summary.json"):
        assert f in files, f
    for stem in ("rc_balanced_lt", "rc_worst_lt", "rc_balanced_bal", "trajectories_ar-gse-balanced",
                 "trajectories_ar-gse-weak", "margin_ar-gse-balanced"):
        assert {f"{stem}.pdf", f"{stem}.png"} <= files, stem
        _check_files([art.file(f"{stem}.pdf"), art.file(f"{stem}.png")])
    main = art.file("main.tex").read_text()
    assert "long-tailed weights" in main and "Refit view" in main and "0.01, 0.02" in main
    assert "balanced weights" in art.file("main_balanced.tex").read_text()
    assert "Sweep view" in art.file("sweep.tex").read_text()
    rows = _body_rows(main)
    assert [r.split(" & ")[0] for r in rows] == ["AR-GSE (balanced)", r"AR-GSE\_weak", "Chow"]
    assert all(r.rstrip(" \\").endswith("& 2") for r in rows)  # two seeds each
    s = art.json("summary.json")
    t = s["tables"]["refit_lt"]
    assert t["bold"]["aurc_balanced"] == "AR-GSE (balanced)"
    # the refit-view numbers are the refitted curves' statistics, per seed
    data = _test_set()
    want = [refit_stats(*raw[("AR-GSE (balanced)", sd, "refit")], data["y"], data["class_to_group"], data["w_lt"],
                        levels=LEVELS)["aurc_balanced"] for sd in (0, 1)]
    cell = t["rows"]["AR-GSE (balanced)"]["aurc_balanced"]
    assert cell["values"] == pytest.approx(want) and cell["seeds"] == [0, 1]
    assert cell["mean"] == pytest.approx(np.mean(want)) and cell["std"] == pytest.approx(np.std(want, ddof=1))
    assert cell["ci"][0] <= cell["mean"] <= cell["ci"][1]
    # Chow has nothing to refit: its refit-view row is its sweep curve
    chow = t["rows"]["Chow"]["aurc_worst"]["values"]
    assert chow == pytest.approx([raw[("Chow", "baseline", None, sd)]["views"]["lt"]["aurc"]["worst"] for sd in (0, 1)])
    sw = s["tables"]["sweep_bal"]["rows"]["AR-GSE_weak"]["worst_error@0.8"]["values"]
    assert sw == pytest.approx([raw[("AR-GSE_weak", sd)]["views"]["bal"]["errors_at_coverage"]["worst"][1]
                                for sd in (0, 1)])
    abl = _body_rows(art.file("ablations.tex").read_text())
    assert any(r.startswith("AR-GSE [no gate]") for r in abl)
    assert s["folds"]["n_folds"] == 1
    assert json.dumps(s)  # JSON-clean (no NaN)


def test_export_to(report_art, tmp_path):
    from argse_cli.report.export import export_to

    art, _ = report_art
    copied = export_to(art, tmp_path / "out")
    assert sorted(p.name for p in copied) == sorted(art.manifest["files"])
    assert (tmp_path / "out" / "main.tex").read_text() == art.file("main.tex").read_text()


# ------------------------------------------------------------------------------ LaTeX
def captions(tex: str) -> list[str]:
    """The argument of every \\caption{...} (balanced braces)."""
    out, i = [], 0
    while (i := tex.find("\\caption{", i)) >= 0:
        j, depth = i + len("\\caption{"), 1
        while depth:
            depth += {"{": 1, "}": -1}.get(tex[j], 0) if tex[j - 1] != "\\" else 0
            j += 1
        out.append(tex[i + len("\\caption{") : j - 1])
        i = j
    return out


def compile_check(files: dict[str, str], folder) -> tuple[list[float], dict[str, int]]:
    """Compile every table / figure file in the standard article class (booktabs, graphicx);
    returns the overfull \\hbox widths (pt) and the line count of every caption, each typeset
    alone at the text width as LaTeX sets it ("Table 1: ..."), measured with \\prevgraf."""
    from argse_cli.report.tables import standalone_document

    measure = []
    for f, tex in files.items():
        what = "Figure" if "\\begin{figure}" in tex else "Table"
        for k, cap in enumerate(captions(tex)):  # (no overfull report from the measuring boxes)
            measure.append(f"\\setbox0=\\vbox{{\\hfuzz=\\maxdimen\\hbadness=10000\\hsize=\\linewidth\\noindent "
                           f"{what}~1: {cap}\\par\\xdef\\nlines{{\\the\\prevgraf}}}}"
                           f"\\typeout{{CAPLINES {f}#{k}=\\nlines}}")
    body = "\n\\clearpage\n".join(files.values()) + "\n" + "\n".join(measure)
    (folder / "doc.tex").write_text(standalone_document(body))
    res = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], cwd=folder,
                         capture_output=True, text=True, timeout=300)
    log = (folder / "doc.log").read_text(errors="replace")
    assert res.returncode == 0, log[-3000:]
    over = [float(x) for x in re.findall(r"Overfull \\hbox \(([\d.]+)pt too wide\)", log)]
    lines = {m[0]: int(m[1]) for m in re.findall(r"CAPLINES (\S+)=(\d+)", log)}
    assert len(lines) == sum(len(captions(t)) for t in files.values())
    return over, lines


def report_tex(art) -> dict[str, str]:
    return {f: art.file(f).read_text() for f in sorted(art.manifest["files"]) if f.endswith(".tex")}


def test_every_table_compiles_without_overfull_and_captions_fit_three_lines(report_art, tmp_path):
    if shutil.which("pdflatex") is None:
        pytest.skip("pdflatex not installed (apt-get install texlive-latex-base texlive-latex-recommended)")
    art, _ = report_art
    from argse_cli.report.export import export_to

    export_to(art, tmp_path)  # figures.tex includes the figures beside it
    files = report_tex(art)
    assert {"main.tex", "sweep.tex", "ablations.tex", "sensitivity.tex", "guarantees.tex", "sag.tex", "defer.tex",
            "figures.tex"} <= set(files)
    over, lines = compile_check(files, tmp_path)
    assert not [w for w in over if w > 1.0], over
    assert max(lines.values()) <= 3, lines
    for f, tex in files.items():  # one style: caption above the tabular, a label, booktabs
        if f == "figures.tex":
            continue
        assert tex.index("\\caption{") < tex.index("\\begin{tabular}") < tex.index("\\toprule"), f
        assert "\\label{tab:" in tex and "\\bottomrule" in tex, f
        assert "smoke recipe: experts trained ? epochs; numbers are not meaningful" in tex, f


def test_main_table_ci_modes_hand_computed():
    cols = T.default_columns([0.7])[:1]  # aurc_balanced
    entries = {"A": {"aurc_balanced": [0.10, 0.20]}}
    ci = {"A": {"aurc_balanced": (0.12, 0.18)}}
    half = T.main_table(entries, cols, None, "c", "tab:x", ci=ci, ci_mode="halfwidth")
    assert _body_rows(half) == ["A & 0.150 $\\pm$ 0.030 & 2 \\\\"]  # (0.18 - 0.12) / 2
    col = T.main_table(entries, cols, {"aurc_balanced": "A"}, "c", "tab:x", ci=ci, ci_mode="column")
    assert _body_rows(col) == ["A & \\textbf{0.150 $\\pm$ 0.071} & [0.120, 0.180] & 2 \\\\"]
    assert "95\\% CI" in col and "\\multicolumn{2}{c}{AURC}" in col
    none = T.main_table(entries, cols, None, "c", "tab:x")
    assert _body_rows(none) == ["A & 0.150 $\\pm$ 0.071 & 2 \\\\"]
    with pytest.raises(ValueError):
        T.main_table(entries, cols, None, "c", "tab:x", ci_mode="halfwidth")


def test_guarantee_rows_say_accepts_nothing_and_show_the_target():
    from argse_cli.report.deferral_tables import guarantee_rows

    test = {"unweighted": {"risk": 0.08, "coverage": 1.0}, "lt": {"risk": 0.05, "coverage": 0.5}}
    gm = {"target": 0.1, "delta": 0.1, "epsilon": 0.2, "methods": {
        "mondrian_conformal": {"thresholds": [0.1, 0.2], "test": test},
        "ltt_binomial": {"threshold": None, "accepts_nothing": True,
                         "test": {"unweighted": {"risk": 1.0, "coverage": 0.0}}},
    }}
    rows = guarantee_rows("AR-GSE (balanced)", gm)
    assert rows[0] == "AR-GSE (balanced) & LTT (binomial) & $R \\le 0.1$ & \\multicolumn{4}{c}{accepts nothing} \\\\"
    assert rows[1] == (" & Mondrian conformal & $P(\\mathrm{acc} \\mid \\mathrm{err}) \\le 0.2$ & 0.080 & "
                       "1.000 (all) & 0.050 & 0.500 \\\\")


def test_report_warnings_banner_bands(report_art):
    from argse_cli.metrics.refit import refit_rc

    art, raw = report_art
    s = art.json("summary.json")
    assert s["banner"] == "smoke recipe: experts trained ? epochs; numbers are not meaningful"
    w = s["warnings"]
    assert any("L2D: EM not converged" in x and x.startswith("AR-GSE (balanced) (eval ") for x in w), w
    assert any("accepts everything" in x for x in w), w
    assert s["methods"]["Chow"]["kind"] == "baseline" and s["methods"]["AR-GSE (balanced)"]["seeds"] == [0, 1]
    rc = art.json("rc_curves.json")
    c = rc["views"]["lt"]["AR-GSE (balanced)"]
    data = _test_set()
    want = np.mean([refit_rc(*raw[("AR-GSE (balanced)", sd, "refit")], data["y"], data["class_to_group"],
                             data["w_lt"]).balanced_risk for sd in (0, 1)], axis=0)
    np.testing.assert_allclose(c["balanced_risk"], want, atol=1e-12)  # the seed mean
    lo, hi = np.asarray(c["band"]["balanced_risk"]["lo"]), np.asarray(c["band"]["balanced_risk"]["hi"])
    assert np.all(lo <= hi) and np.mean((lo <= want + 1e-12) & (want <= hi + 1e-12)) > 0.9
    assert "band" not in rc["views"]["lt"]["Chow"]  # bands: headline (AR-GSE and the plug-in baselines)
    assert "AR-GSE\\_weak" in art.file("main.tex").read_text()


def test_band_samples_average_to_the_bootstrapped_aurc():
    """A band's resamples are the statistics' resamples: their mean over the grid is the AURC of
    the same resample in bootstrap_refit (same seed), exactly."""
    from argse_cli.metrics.rc import COVERAGE_GRID, rc_curve
    from argse_cli.metrics.refit import bootstrap_refit
    from argse_cli.report.bands import _point_samples, rc_band

    data = _test_set(400, seed=7)
    m = _method(data, 0.8, True, seed=3)
    S, P = _refit_arrays(m, 1)
    y, c2g, w = data["y"], data["class_to_group"], data["w_lt"]
    got = np.zeros((60, Q))
    for r0, r1, r in _point_samples(S, P, y, c2g, w, w, COVERAGE_GRID, 60, 0, 17):
        got[r0:r1] = r["worst_risk"]
    smp = bootstrap_refit([(S, P)], y, c2g, w, n_boot=60, seed=0, return_samples=True)[0]["samples"]
    np.testing.assert_allclose(got.mean(axis=1), smp[:, 2], atol=1e-12)  # aurc_worst
    sw = rc_band([(m["score"], m["pred"])], y, c2g, w, n_boot=0)  # a sweep: the rc_curve itself
    np.testing.assert_allclose(sw["balanced_risk"]["mean"], rc_curve(m["score"], m["pred"], y, c2g, w).balanced_risk)
    assert sw["balanced_risk"]["lo"] is None


def _captured(monkeypatch):
    """Capture the figures the plot functions save."""
    from argse_cli.report import deferral_figures, figures

    figs = []
    real = figures._save

    def keep(fig, stem, formats):
        figs.append(fig)
        return real(fig, stem, formats)

    monkeypatch.setattr(figures, "_save", keep)
    monkeypatch.setattr(deferral_figures, "_save", keep)
    return figs


def test_figures_distinct_styles_outside_legend_no_duplicates(tmp_path, monkeypatch):
    from argse_cli.report import figures as F
    from argse_cli.report.deferral_figures import plot_defer, plot_sag
    from argse_cli.sag import sag_stream

    figs = _captured(monkeypatch)
    data = _test_set(300, seed=2)
    c = _evaluate(data, _method(data, 0.8, True, seed=1))[1]["lt"]
    curves = {f"Chow ({i})": c for i in range(14)}  # 14 identical curves: they overlap everywhere
    F.plot_rc_curves(curves, "worst", "lt", tmp_path / "rc", ("png",), title="AR-GSE", banner="smoke")
    ax = figs[-1].axes[0]
    lines = [ln for ln in ax.get_lines() if ln.get_label().startswith("Chow")]
    styles = {(ln.get_color(), ln.get_linestyle(), ln.get_marker()) for ln in lines}
    assert len(lines) == 14 and len(styles) == 14
    leg = ax.get_legend()
    labels = [t.get_text() for t in leg.get_texts()]
    assert len(labels) == len(set(labels)) and any(lb.startswith("dotted: coverages of the tables") for lb in labels)
    assert leg.get_bbox_to_anchor().x0 > ax.get_window_extent().x1 - 1  # outside, right of the axes
    assert ax.get_title() == "AR-GSE: worst-group error vs coverage, long-tailed weights (w_lt)"
    # deferral: the operating point is not a second "L2D (EM gate)" legend entry
    curve = {"share_kept": [0.0, 0.5, 1.0], "accuracy": [0.9, 0.8, 0.7]}
    plot_defer({"L2D (EM gate)": curve, "AR-GSE": curve}, tmp_path / "d", ("png",),
               points={"L2D (EM gate)": {"share_kept": 0.5, "accuracy": 0.8}})
    labels = [t.get_text() for t in figs[-1].axes[0].get_legend().get_texts()]
    assert len(labels) == len(set(labels)) == 3
    # SAG: the mode is named once in the title
    rng = np.random.default_rng(0)
    r = sag_stream(rng.normal(size=600), rng.random(600) < 0.8, "sensitivity", 0.8, 100, 50)
    plot_sag(r, tmp_path / "s", ("png",), title="AR-GSE (balanced)")
    title = figs[-1].axes[0].get_title()
    assert title.count("sensitivity") == 1 and title.startswith("AR-GSE (balanced): SAG sensitivity")


# ------------------------------------------------------------------------------ results out
def test_tidy_results_of_a_report(report_art, tmp_path):
    from argse_cli.analysis import COLUMNS, export_results, plot_rc, result_records

    art, _ = report_art
    rows = result_records(art.key[:10], art.store)
    s = art.json("summary.json")
    t = s["tables"]["refit_lt"]
    r = [x for x in rows if (x["method"], x["seed"], x["view"], x["protocol"], x["metric"])
         == ("AR-GSE (balanced)", 1, "lt", "refit", "aurc_balanced")]
    cell = t["rows"]["AR-GSE (balanced)"]["aurc_balanced"]
    assert len(r) == 1 and r[0]["value"] == cell["values"][1] and [r[0]["ci_lo"], r[0]["ci_hi"]] == cell["ci"]
    assert r[0]["ci_of"] == "seed mean" and r[0]["kind"] == "main" and r[0]["n_seeds"] == 2
    # one row per method x seed x view x protocol x metric (the ablation table's repeats dropped)
    idents = [(x["method"], x["seed"], x["view"], x["protocol"], x["metric"]) for x in rows]
    assert len(idents) == len(set(idents))
    main = {m for m in s["tables"]["refit_lt"]["rows"]}
    n_metrics = len(t["columns"])
    assert sum(1 for x in rows if x["method"] in main) == len(main) * 2 * 2 * 2 * n_metrics  # seeds, views, protocols
    out = export_results(art.key, "csv", tmp_path / "r.csv", art.store)
    import csv

    with open(out) as fh:
        back = list(csv.DictReader(fh))
    assert list(back[0]) == list(COLUMNS) and len(back) == len(rows)
    png = plot_rc(art.key, "worst", "bal", tmp_path / "rc.png", art.store)
    assert open(png, "rb").read(8).startswith(b"\x89PNG")


def test_results_dataframe(report_art, tmp_path):
    pd = pytest.importorskip("pandas", reason="pandas is the optional 'results' extra")
    import argse_cli

    art, _ = report_art
    df = argse_cli.results(art.key, art.store)
    assert list(df.columns) == list(argse_cli.analysis.COLUMNS)
    assert df["value"].dtype == float and df["std"].dtype == float and df["seed"].dtype == "Int64"
    sub = df[(df.method == "Chow") & (df.view == "lt") & (df.protocol == "refit") & (df.metric == "aurc_worst")]
    assert sorted(sub.seed.tolist()) == [0, 1]
    csv_path = argse_cli.analysis.export_results(art.key, "csv", tmp_path / "r.csv", art.store)
    back = pd.read_csv(csv_path)  # plain CSV: pandas reads it without options
    assert back.shape == df.shape


def test_results_parquet(report_art, tmp_path):
    pd = pytest.importorskip("pandas", reason="pandas is the optional 'results' extra")
    pytest.importorskip("pyarrow", reason="parquet needs pyarrow (the optional 'results' extra)")
    from argse_cli.analysis import export_results, results

    art, _ = report_art
    pq = export_results(art.key, "parquet", tmp_path / "r.parquet", art.store)
    assert pd.read_parquet(pq).shape == results(art.key, art.store).shape


def test_image_ids_only_from_exports_of_official_images():
    """Cross-fold disjointness uses image identities: export-logits' official-array indices, never
    import-logits' rows of a source file (row 48 of two folds' files are different images)."""
    from argse_cli.report.inputs import _image_ids

    class Art:
        def __init__(self, stage, up_stages, gate=None):
            self.stage, self.manifest, self._gate = stage, {"upstream_stages": up_stages}, gate

        def upstream(self, role):
            assert role == "gate"
            return self._gate

        def array(self, name):
            assert name == "test/source_index"
            return np.arange(3)

    names = {"test/source_index"}
    exported = Art("train-gate", {"export": "export-logits", "calibrate": "calibrate"})
    imported = Art("train-gate", {"export": "import-logits", "calibrate": "calibrate"})
    assert _image_ids(Art("eval", {"gate": "train-gate"}, exported), names).tolist() == [0, 1, 2]
    assert _image_ids(Art("eval", {"gate": "train-gate"}, imported), names) is None
    assert _image_ids(Art("baselines", {"export": "import-logits"}), names) is None
    assert _image_ids(Art("baselines", {"export": "export-logits"}), names).tolist() == [0, 1, 2]
    assert _image_ids(Art("baselines", {"export": "export-logits"}), set()) is None
