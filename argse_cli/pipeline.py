"""Pipeline files, config overrides and upstream-key resolution.

A pipeline file (YAML or JSON) holds one optional section per stage. A stage's config is its
section, then ``--set field=value`` overrides, then its own CLI options. Upstream keys are
computed from the upstream sections (defaults where absent), so ``argse train-gate --config
demo.yaml`` finds exactly the experts that ``argse train-expert --config demo.yaml`` wrote.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from .config import DEFAULT_EXPERTS, STAGE_MODELS, StageConfig, section_name
from .errors import ArgseError
from .store import Store

SECTIONS = tuple(section_name(s) for s in STAGE_MODELS)


def load_file(path: str | Path | None) -> dict[str, Any]:
    """Read a pipeline file (YAML or JSON); unknown sections are refused."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ArgseError("config", f"file {p} not found", "pass an existing YAML or JSON file")
    text = p.read_text()
    try:
        if p.suffix == ".json":
            doc = json.loads(text)
        else:
            import yaml

            doc = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - yaml/json errors -> one line
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise ArgseError("config", f"{p} is not valid YAML/JSON{where}", "fix the syntax") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ArgseError("config", f"{p} must be a mapping of sections", f"use sections {list(SECTIONS)}")
    unknown = set(doc) - set(SECTIONS)
    if unknown:
        raise ArgseError(
            f"config.{sorted(unknown)[0]}", "unknown section", f"valid sections: {', '.join(SECTIONS)}"
        )
    return doc


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """``--set field=value`` (value parsed as YAML: numbers, lists, booleans)."""
    out: dict[str, Any] = {}
    for it in items or []:
        if "=" not in it:
            raise ArgseError("--set", f"{it!r} is not field=value", "write e.g. --set epochs=2")
        k, v = it.split("=", 1)
        import yaml

        try:
            out[k.strip()] = yaml.safe_load(v)
        except Exception:  # noqa: BLE001
            out[k.strip()] = v
    return out


def validate(stage: str, data: dict[str, Any]) -> StageConfig:
    """Validate a stage config; a ValidationError becomes one line naming the field and the fix."""
    from pydantic import ValidationError

    model = STAGE_MODELS[stage]
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "(config)"
        field = f"{section_name(stage)}.{loc}" if err["loc"] else section_name(stage)
        if err["type"] == "inert_field":
            fix = err["ctx"]["fix"]
        elif err["type"] == "extra_forbidden":
            fix = f"remove it; valid fields: {', '.join(model.model_fields)}"
        elif err["type"] in ("finite_number",):
            fix = "use a finite number"
        else:
            fix = f"see `argse {stage} --help` or `argse schema {stage}`"
        msg = err["msg"].replace("\n", " ")
        raise ArgseError(field, msg, fix) from None


class Pipeline:
    """Resolves every stage's config and key from one pipeline document."""

    def __init__(
        self, doc: dict[str, Any] | None = None, store: Store | None = None, memo: bool = True,
        rehash: bool = False,
    ):
        self.doc = doc or {}
        self.store = store or Store()
        self.memo = memo  # False: never write the fingerprint memo (--print-config / --print-key)
        self.rehash = rehash  # True: hash the data files' contents again (ignore the memo)
        self._over: dict[str, dict[str, Any]] = {}

    def override(self, stage: str, values: dict[str, Any]) -> None:
        vals = {k: v for k, v in values.items() if v is not None}
        self._over.setdefault(stage, {}).update(vals)

    def raw(self, stage: str) -> dict[str, Any]:
        sec = self.doc.get(section_name(stage)) or {}
        if not isinstance(sec, dict):
            raise ArgseError(section_name(stage), "section must be a mapping", "write field: value lines")
        return {**sec, **self._over.get(stage, {})}

    def config(self, stage: str, **extra: Any) -> StageConfig:
        data = self.raw(stage)
        if stage == "train-expert":
            data.pop("losses", None)
            if "heads" in data:
                raise ArgseError(
                    "train_expert.heads", "is set from train_expert.losses",
                    "list the losses in train_expert.losses and remove heads",
                )  # fmt: skip
        data.update({k: v for k, v in extra.items() if v is not None})
        if stage == "train-expert" and self.shared_backbone() and data.get("loss", "ce") != "decoupled":
            # shared backbone: every non-cRT loss is a head of the ONE shared artifact
            data.update(loss="shared", heads=self.shared_heads())
        cfg = validate(stage, data)
        return cfg.resolved() if hasattr(cfg, "resolved") else cfg

    # ---- experts -------------------------------------------------------------------------
    def expert_losses(self) -> list[str]:
        losses = self._over.get("train-expert", {}).get("losses")
        if losses is None:
            sec = self.doc.get("train_expert") or {}
            losses = sec.get("losses") if isinstance(sec, dict) else None
        if losses is None:
            return list(DEFAULT_EXPERTS)
        if isinstance(losses, str):
            losses = [s.strip() for s in losses.split(",") if s.strip()]
        if (not isinstance(losses, (list, tuple)) or not losses
                or not all(isinstance(x, str) for x in losses)):  # fmt: skip
            raise ArgseError(
                "train_expert.losses", f"must be a non-empty list of losses, not {losses!r:.60}",
                "e.g. losses: [ce, balsoftmax] or --set losses=ce,balsoftmax",
            )  # fmt: skip
        return list(losses)

    def shared_backbone(self) -> bool:
        """True when train_expert.shared_backbone is set (section or override)."""
        v = self.raw("train-expert").get("shared_backbone", False)
        from pydantic import TypeAdapter, ValidationError

        try:
            return TypeAdapter(bool).validate_python(v)
        except ValidationError:
            raise ArgseError("train_expert.shared_backbone", f"{v!r} is not a boolean", "use true or false") from None

    def shared_heads(self) -> list[str]:
        """The jointly trained heads of the shared backbone: the non-cRT losses in `losses` order
        (``ce`` alone when `losses` is only decoupled: cRT needs a backbone)."""
        heads = [l for l in self.expert_losses() if l != "decoupled"]
        return heads or ["ce"]

    def expert_runs(self) -> list[tuple[Any, dict, dict, str]]:
        """The train-expert artifacts to produce, in dependency order, one per key:
        (config, upstream, upstream_stages, key). Independent: one per loss (ce first when
        decoupled needs it); shared backbone: the shared artifact, then decoupled if asked."""
        from .stages import key_of

        losses = self.expert_losses()
        if "decoupled" in losses and "ce" not in losses:
            losses = ["ce", *losses]  # cRT re-uses the ce backbone
        losses = sorted(losses, key=lambda l: l == "decoupled")  # stable: backbones first
        runs, seen = [], set()
        for l in losses:
            cfg = self.config("train-expert", loss=l)
            up, st = self.expert_upstream(l)
            key = key_of("train-expert", cfg, up)
            if key not in seen:
                seen.add(key)
                runs.append((cfg, up, st, key))
        return runs

    # ---- keys ----------------------------------------------------------------------------
    def split_key(self) -> str:
        from .stages import key_of

        return key_of("split", self.config("split"), {}, self.split_extra())

    def split_extra(self) -> dict[str, Any]:
        cfg = self.config("split")
        fp = cached_fingerprint(self.store, cfg.dataset, cfg.data_root, write=self.memo,
                                rehash=self.rehash)  # fmt: skip
        return {"data": fp}

    def expert_upstream(self, loss: str) -> tuple[dict, dict]:
        from .stages import key_of

        up: dict[str, Any] = {"split": self.split_key()}
        st = {"split": "split"}
        if loss == "decoupled":
            base = self.config("train-expert", loss="ce")
            up["backbone"] = key_of("train-expert", base, {"split": up["split"]})
            st["backbone"] = "train-expert"
        return up, st

    def expert_key(self, loss: str) -> str:
        from .stages import key_of

        up, _ = self.expert_upstream(loss)
        return key_of("train-expert", self.config("train-expert", loss=loss), up)

    def export_upstream(self) -> tuple[dict, dict]:
        """Independent: one train-expert key per loss, in `losses` order. Shared backbone: the
        shared artifact (all its heads, in `losses` order) then the decoupled one if asked."""
        keys = [self.expert_key(l) for l in self.expert_losses()]
        if self.shared_backbone():
            keys = list(dict.fromkeys(sorted(keys, key=lambda k: k != self.expert_key("ce"))))
        up = {"split": self.split_key(), "experts": keys}
        return up, {"split": "split", "experts": "train-expert"}

    def export_key(self) -> str:
        from .stages import key_of

        return key_of("export-logits", self.config("export-logits"), self.export_upstream()[0])

    def import_key(self) -> str:
        from .logit_import import key_extra
        from .stages import key_of

        cfg = self.config("import-logits")
        extra = key_extra(cfg, self.store, write=self.memo, rehash=self.rehash)
        return key_of("import-logits", cfg, {}, extra)

    def export_ref(self) -> tuple[str, str]:
        """(stage, key) of the logits: `import-logits` when the file has that section."""
        if "import_logits" in self.doc:
            return "import-logits", self.import_key()
        return "export-logits", self.export_key()

    def calibrate_upstream(self) -> tuple[dict, dict]:
        st, k = self.export_ref()
        return {"export": k}, {"export": st}

    def calibrate_key(self) -> str:
        from .stages import key_of

        return key_of("calibrate", self.config("calibrate"), self.calibrate_upstream()[0])

    def gate_upstream(self) -> tuple[dict, dict]:
        st, k = self.export_ref()
        return {"export": k, "calibrate": self.calibrate_key()}, {"export": st, "calibrate": "calibrate"}

    def gate_key(self) -> str:
        from .stages import key_of

        return key_of("train-gate", self.config("train-gate"), self.gate_upstream()[0])


def cached_fingerprint(
    store: Store, dataset: str, data_root: str, write: bool = True, rehash: bool = False
) -> str:
    """Data fingerprint, memoised on (path, size, mtime) of the files so a cache hit stays fast.

    The fingerprint rule: the data files' contents (xxh3) enter the split key; the memo in
    ``<store>/.fingerprints.json`` maps (resolved path, size, mtime_ns) of every file to the
    content fingerprint, so a file changed in place keeping its size AND mtime is not noticed
    until ``rehash=True`` (``argse split --rehash``) hashes the contents again and refreshes it.
    """
    from .data.cifar import _paths as data_files
    from .data.cifar import data_fingerprint

    files = data_files(dataset, Path(data_root))
    stamp = [[str(Path(f).resolve()), os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files]
    memo = store.root / ".fingerprints.json"
    table: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        table = json.loads(memo.read_text())
    k = json.dumps([dataset, stamp])
    if k in table and not rehash:
        return table[k]
    fp = data_fingerprint(dataset, Path(data_root))
    if not write:
        return fp
    table[k] = fp
    with contextlib.suppress(OSError):
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table))
        os.replace(tmp, memo)
    return fp
