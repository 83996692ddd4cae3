"""Stage registry and the one runner every stage goes through.

A stage module defines ``STAGE``, ``VERSION`` (bumped whenever its code -- the import closure of
the module, see :mod:`argse_cli.digests` -- changes) and ``compute(cfg, inputs, out, progress)``; optionally
``summary(meta) -> str``, ``show(artifact, console)`` and ``RESUMABLE = True`` (its writer works in
the key's pending dir, which survives a kill: checkpoints in ``out.scratch``, ``out.log_metrics``). Stage modules import nothing heavy at
module level, so computing a key and answering ``cached`` never imports torch or zarr. A stage is
thin -- inputs, library calls, outputs -- and imports no other stage: shared code lives in library
modules outside this package (``tests/test_layout.py``).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from ..config import StageConfig
from ..errors import ArgseError
from ..store import Store, compute_key

STAGE_MODULES = {
    "split": "split",
    "train-expert": "train_expert",
    "export-logits": "export_logits",
    "calibrate": "calibrate",
    "train-gate": "train_gate",
    "eval": "evaluate",
    "baselines": "baselines",
    "report": "report",
    "import-logits": "import_logits",
}


def get_stage(stage: str) -> ModuleType:
    return importlib.import_module(f"argse_cli.stages.{STAGE_MODULES[stage]}")


def _resolved(cfg: StageConfig) -> StageConfig:
    """Defaults that depend on other fields filled in (programmatic callers get the CLI's key)."""
    return cfg.resolved() if hasattr(cfg, "resolved") else cfg


def key_of(stage: str, cfg: StageConfig, upstream: dict, extra: dict | None = None) -> str:
    mod = get_stage(stage)
    return compute_key(stage, mod.VERSION, _resolved(cfg).key_payload(), upstream, extra)


def run_stage(
    stage: str,
    cfg: StageConfig,
    upstream: dict[str, Any],
    upstream_stages: dict[str, str],
    store: Store,
    *,
    force: bool = False,
    extra: dict | None = None,
    quiet: bool = False,
) -> tuple[str, bool]:
    """Run a stage unless its artifact exists. Returns (key, computed)."""
    mod = get_stage(stage)
    cfg = _resolved(cfg)
    key = compute_key(stage, mod.VERSION, cfg.key_payload(), upstream, extra)

    def say(msg: str) -> None:  # the outcome line is printed even with --quiet
        print(msg, flush=True)

    if not force and store.exists(stage, key):
        say(f"cached {key}")
        return key, False
    inputs: dict[str, Any] = {}
    for role, ref in upstream.items():
        st = upstream_stages[role]
        refs = ref if isinstance(ref, list) else [ref]
        for k in refs:
            if not store.exists(st, k):
                raise ArgseError(
                    f"upstream.{role}",
                    f"missing {st} artifact {k[:12]} in {store.root}",
                    f"run `argse {st}` with the same config first",
                )
        arts = [store.open(st, k) for k in refs]
        inputs[role] = arts if isinstance(ref, list) else arts[0]

    from ..progress import Progress

    progress = Progress(desc=stage, quiet=quiet)
    created = store.new_dirs(stage)
    try:
        with store.lock(stage, key, on_wait=lambda: say(f"waiting for another writer of {key}")):
            if not force and store.exists(stage, key):
                say(f"cached {key}")
                return key, False
            with store.writer(
                stage, key, config=cfg.key_payload(), upstream=upstream,
                upstream_stages=upstream_stages, version=mod.VERSION, extra=extra, replace=force,
                resumable=getattr(mod, "RESUMABLE", False),
            ) as out:
                mod.compute(cfg, inputs, out, progress)
            progress.close()
    except BaseException:
        store.prune(created)  # a failed first run leaves no empty stage / lock dirs behind
        raise
    if out.published:
        say(f"wrote {key}")
    else:
        say(f"cached {key}")
    return key, out.published

