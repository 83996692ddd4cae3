"""The results a report reads: every eval and baselines artifact as :class:`Result` entries per
(method, seed, fold) (:func:`gather`), the evals' warnings and the banner's ``{expert_epochs}``."""

from __future__ import annotations

from typing import Any

from .compare import VIEWS, Result, cached


def _scorer(art: Any) -> Any:
    """The artifact whose ``export`` upstream the result was scored on: an eval's gate, else itself."""
    return art.upstream("gate") if art.stage == "eval" else art


def _image_ids(art: Any, names: set, scorer: Any = None) -> Any:
    """The test rows' image identities, or None when the scored export has none: export-logits
    stores indices into the official CIFAR arrays (comparable across folds); import-logits stores
    rows of each source file, which identify no image across imports (a cross-fitting protocol
    asserts its folds' disjointness itself, e.g. :func:`argse_cli.data.c100lt.crossfit_protocol`)."""
    stages = (scorer or _scorer(art)).manifest.get("upstream_stages") or {}
    if stages.get("export") != "export-logits" or "test/source_index" not in names:
        return None
    return art.array("test/source_index")


def _fold_of(scorer: Any) -> tuple[str, str]:
    """The test set's identity -- the export / import key the result was scored on -- and the xxh3
    of that export's test logits (content, not key: it orders the folds, :func:`compare.fold_order`)."""
    key = str(scorer.upstream_keys["export"])
    info = scorer.upstream("export").manifest.get("arrays", {}).get("test/logits") or {}
    return key, str(info.get("xxh3", ""))


def _eval_results(art: Any) -> list:
    m = art.json("metrics.json")
    names = set(art.manifest.get("arrays", {}))
    gate = _scorer(art)
    fold, content = _fold_of(gate)

    def load() -> dict:
        d = {k: art.array(f"test/{k}") for k in ("score", "pred", "y", "w_lt", "w_bal")}
        d["class_to_group"] = art.array("class_to_group")
        d["source_index"] = _image_ids(art, names, gate)
        d["refit"] = {v: (art.array(f"refit/{v}/score"), art.array(f"refit/{v}/pred")) for v in VIEWS}
        return d

    return [Result(name=str(m["method"]), method=str(m["method"]), seed=int(m.get("seed") or 0), kind="main",
                   setting=None, fold=fold, source=f"eval/{art.key[:12]}", load=cached(load),
                   info={"operating_point": m.get("operating_point")}, gate=lambda: gate,
                   fold_content=content)]


def _baseline_results(art: Any) -> list:
    b = art.json("baselines.json")
    names = set(art.manifest.get("arrays", {}))
    fold, content = _fold_of(art)

    @cached
    def shared() -> dict:
        d = {k: art.array(f"test/{k}") for k in ("y", "w_lt", "w_bal")}
        d["class_to_group"] = art.array("class_to_group")
        d["source_index"] = _image_ids(art, names)
        return d

    out = []
    for r in b.get("results", []):
        slug, kind = str(r["slug"]), r.get("group", "baseline")
        name = str(r["method"]) + (f" [{r['setting']}]" if kind == "ablation" and r.get("setting") else "")

        def load(slug: str = slug, refit: bool = r.get("refit") is not None) -> dict:
            d = {**shared(), "score": art.array(f"m/{slug}/score"), "pred": art.array(f"m/{slug}/pred")}
            d["refit"] = ({v: (art.array(f"m/{slug}/refit/{v}/score"), art.array(f"m/{slug}/refit/{v}/pred"))
                           for v in VIEWS} if refit else None)
            return d

        info = {k: r[k] for k in ("expert", "operating_coverage", "chosen_epoch") if k in r}
        out.append(Result(name=name, method=str(r["method"]), seed=int(r.get("seed") or 0), kind=kind,
                          setting=r.get("setting"), fold=fold, source=f"baselines/{art.key[:12]}:{slug}",
                          load=cached(load), info=info, fold_content=content))
    return out


def gather(inputs: dict) -> tuple[list, list[float]]:
    results: list = []
    levels = None
    for art in inputs.get("evals") or []:
        results += _eval_results(art)
        levels = levels or art.json("metrics.json").get("levels")
    for art in inputs.get("baselines") or []:
        results += _baseline_results(art)
        levels = levels or art.json("baselines.json").get("levels")
    return results, [float(v) for v in (levels or (0.7, 0.8, 0.9))]


def expert_epochs(inputs: dict) -> str:
    """The training epochs of the experts behind the inputs ("2", "2/200" when they differ, "?"
    for imported logits)."""
    seen: list[int] = []
    arts = list(inputs.get("baselines") or []) + [a.upstream("gate") for a in inputs.get("evals") or []]
    for a in arts:
        try:
            exp = a.upstream("export")
            experts = exp.upstream("experts") if "experts" in exp.upstream_keys else []
        except Exception:  # noqa: BLE001 - a missing upstream only loses the number
            continue
        seen += [int(e.config["epochs"]) for e in experts if "epochs" in e.config]
    vals = sorted(set(seen))
    return "/".join(map(str, vals)) if vals else "?"


def fill_banner(banner: str | None, inputs: dict) -> str | None:
    """The report config's banner with ``{expert_epochs}`` filled in (other text unchanged)."""
    if not banner or "{expert_epochs}" not in banner:
        return banner
    return banner.replace("{expert_epochs}", expert_epochs(inputs))


def eval_warnings(inputs: dict) -> list[str]:
    """Warnings of the evals (their own, and the L2D fit's diagnostics for evals made before they
    were recorded), each prefixed with the method and the eval key."""
    from ..l2d import em_diagnostics

    out: list[str] = []
    for art in inputs.get("evals") or []:
        m = art.json("metrics.json")
        ws = list(m.get("warnings") or [])
        if m.get("l2d") and "diagnostics" not in m["l2d"]:
            fit = m["l2d"]["fit"]
            ws += em_diagnostics(fit["loglik"], fit["eps"], m["l2d"].get("human_noise"))["warnings"]
        out += [f"{m['method']} (eval {art.key[:12]}): {w}" for w in ws]
    return list(dict.fromkeys(out))
