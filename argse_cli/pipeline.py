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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import DEFAULT_EXPERTS, STAGE_MODELS, StageConfig, section_name
from .dag import DAG, Role, role_of
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


@dataclass(frozen=True)
class Resolved:
    """One stage instance of a pipeline: everything ``run_stage`` needs, and its key."""

    stage: str
    config: StageConfig
    upstream: dict[str, Any]
    upstream_stages: dict[str, str]
    extra: dict[str, Any] | None
    key: str


@dataclass
class Memo:
    """Validated configs (by stage and data), keys (by their inputs) and data fingerprints (by
    dataset and root) of pipelines that share it."""

    configs: dict[tuple[str, str], StageConfig] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    data: dict[tuple[str, str], str] = field(default_factory=dict)  # (dataset, root) -> fingerprint


def _canon(obj: Any) -> str:
    """A canonical text of JSON-like data (a memo key)."""
    try:
        return json.dumps(obj, sort_keys=True, default=repr)
    except TypeError:  # keys of mixed types
        return repr(obj)


class Pipeline:
    """Resolves every stage's config and key from one pipeline document by walking :data:`DAG`.

    Memoised: each distinct (stage, config data) is validated once, each key hashed once and
    the data fingerprinted once per data root (``memo_of``: share these with other pipelines).
    """

    def __init__(
        self, doc: dict[str, Any] | None = None, store: Store | None = None, memo: bool = True,
        rehash: bool = False, memo_of: Memo | None = None,
    ):
        self.doc = doc or {}
        self.store = store or Store()
        self.memo = memo  # False: never write the fingerprint memo (--print-config / --print-key)
        self.rehash = rehash  # True: hash the data files' contents again (ignore the memo)
        self.cache = memo_of if memo_of is not None else Memo()
        self._over: dict[str, dict[str, Any]] = {}
        self._resolved: dict[str, Resolved] = {}
        self._shared: bool | None = None

    def override(self, stage: str, values: dict[str, Any]) -> None:
        vals = {k: v for k, v in values.items() if v is not None}
        self._over.setdefault(stage, {}).update(vals)
        self._resolved.clear()
        self._shared = None

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
        k = (stage, _canon(data))
        if k not in self.cache.configs:
            cfg = validate(stage, data)
            self.cache.configs[k] = cfg.resolved() if hasattr(cfg, "resolved") else cfg
        return self.cache.configs[k]

    # ---- the graph -----------------------------------------------------------------------
    def resolve(self, stage: str, given: dict[str, Any] | None = None, **fields: Any) -> Resolved:
        """Config, upstream keys (``given``: roles the caller chose), input fingerprints and key of
        one instance of ``stage`` (``fields``: config fields of the instance, e.g. ``loss``)."""
        memo = _canon([stage, given, fields])
        if memo in self._resolved:
            return self._resolved[memo]
        cfg = self.config(stage, **fields)
        up, st = {}, {}
        for role in DAG[stage].roles:
            if not role.applies(fields):
                continue
            if given is not None and role.name in given:
                st[role.name], up[role.name] = role.stage, given[role.name]
            else:
                st[role.name], up[role.name] = self.ref(role)
        extra = self._inputs(stage, cfg)
        r = Resolved(stage, cfg, up, st, extra, self._key(stage, cfg, up, extra))
        self._resolved[memo] = r
        return r

    def ref(self, role: Role) -> tuple[str, Any]:
        """(stage, key or keys) of an upstream role of this pipeline."""
        if role.fan == "experts":
            return role.stage, self.expert_keys()
        if role.fan == "given":
            raise ArgseError(f"upstream.{role.name}", "is not part of a pipeline file", "pass the keys")
        stage = next((a for a in role.alt if section_name(a) in self.doc), role.stage)
        return stage, self.resolve(stage, **role.pick).key

    def _inputs(self, stage: str, cfg: Any) -> dict[str, Any] | None:
        """The fingerprints of the stage's input files (its key's ``extra``)."""
        kind = DAG[stage].inputs
        if kind == "data":
            k = (cfg.dataset, str(cfg.data_root))
            if k not in self.cache.data:
                self.cache.data[k] = cached_fingerprint(self.store, *k, write=self.memo, rehash=self.rehash)
            return {"data": self.cache.data[k]}
        if kind == "files":
            from .logit_import import key_extra

            return key_extra(cfg, self.store, write=self.memo, rehash=self.rehash)
        return None

    def _key(self, stage: str, cfg: StageConfig, up: dict, extra: dict | None) -> str:
        from . import stages

        k = _canon([stage, cfg.key_payload(), up, extra])
        if k not in self.cache.keys:
            self.cache.keys[k] = stages.key_of(stage, cfg, up, extra)
        return self.cache.keys[k]

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
        if self._shared is None:
            v = self.raw("train-expert").get("shared_backbone", False)
            from pydantic import TypeAdapter, ValidationError

            try:
                self._shared = TypeAdapter(bool).validate_python(v)
            except ValidationError:
                raise ArgseError("train_expert.shared_backbone", f"{v!r} is not a boolean",
                                 "use true or false") from None  # fmt: skip
        return self._shared

    def shared_heads(self) -> list[str]:
        """The jointly trained heads of the shared backbone: the non-cRT losses in `losses` order
        (``ce`` alone when `losses` is only decoupled: cRT needs a backbone)."""
        heads = [l for l in self.expert_losses() if l != "decoupled"]
        return heads or ["ce"]

    def train_losses(self) -> list[str]:
        """The losses to train, in dependency order: ce added when decoupled needs its backbone,
        backbones before decoupled."""
        losses = self.expert_losses()
        if "decoupled" in losses and "ce" not in losses:
            losses = ["ce", *losses]  # cRT re-uses the ce backbone
        return sorted(losses, key=lambda l: l == "decoupled")  # stable: backbones first

    def experts(self) -> list[Resolved]:
        """The train-expert artifacts to produce, in dependency order, one per key. Independent:
        one per loss; shared backbone: the shared artifact, then decoupled if asked."""
        runs = {}
        for l in self.train_losses():
            r = self.resolve("train-expert", loss=l)
            runs.setdefault(r.key, r)
        return list(runs.values())

    def expert_runs(self) -> list[tuple[Any, dict, dict, str]]:
        """:meth:`experts` as (config, upstream, upstream_stages, key)."""
        return [(r.config, r.upstream, r.upstream_stages, r.key) for r in self.experts()]

    def expert_keys(self) -> list[str]:
        """Independent: one train-expert key per loss, in `losses` order. Shared backbone: the
        shared artifact (all its heads, in `losses` order) then the decoupled one if asked."""
        keys = [self.expert_key(l) for l in self.expert_losses()]
        if self.shared_backbone():
            keys = list(dict.fromkeys(sorted(keys, key=lambda k: k != self.expert_key("ce"))))
        return keys

    # ---- keys (one stage each) -----------------------------------------------------------
    def split_key(self) -> str:
        return self.resolve("split").key

    def split_extra(self) -> dict[str, Any]:
        return dict(self.resolve("split").extra or {})

    def expert_upstream(self, loss: str) -> tuple[dict, dict]:
        r = self.resolve("train-expert", loss=loss)
        return r.upstream, r.upstream_stages

    def expert_key(self, loss: str) -> str:
        return self.resolve("train-expert", loss=loss).key

    def export_upstream(self) -> tuple[dict, dict]:
        r = self.resolve("export-logits")
        return r.upstream, r.upstream_stages

    def export_key(self) -> str:
        return self.resolve("export-logits").key

    def import_key(self) -> str:
        return self.resolve("import-logits").key

    def export_ref(self) -> tuple[str, str]:
        """(stage, key) of the logits: `import-logits` when the file has that section."""
        return self.ref(role_of("calibrate", "export"))

    def calibrate_upstream(self) -> tuple[dict, dict]:
        r = self.resolve("calibrate")
        return r.upstream, r.upstream_stages

    def calibrate_key(self) -> str:
        return self.resolve("calibrate").key

    def gate_upstream(self) -> tuple[dict, dict]:
        r = self.resolve("train-gate")
        return r.upstream, r.upstream_stages

    def gate_key(self) -> str:
        return self.resolve("train-gate").key


_FINGERPRINTS: dict[str, str] = {}  # this process's fingerprints, keyed like the memo file


def cached_fingerprint(
    store: Store, dataset: str, data_root: str, write: bool = True, rehash: bool = False
) -> str:
    """Data fingerprint, memoised on (path, size, mtime) of the files so a cache hit stays fast.

    The fingerprint rule: the data files' contents (xxh3) enter the split key; the memo in
    ``<store>/.fingerprints.json`` (and, within one process, in memory) maps (resolved path,
    size, mtime_ns) of every file to the content fingerprint, so a file changed in place keeping
    its size AND mtime is not noticed until ``rehash=True`` (``argse split --rehash``) hashes the
    contents again and refreshes it.
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
    fp = _FINGERPRINTS.get(k) if not rehash else None
    fp = fp or data_fingerprint(dataset, Path(data_root))
    _FINGERPRINTS[k] = fp
    if not write:
        return fp
    table[k] = fp
    with contextlib.suppress(OSError):
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table))
        os.replace(tmp, memo)
    return fp
