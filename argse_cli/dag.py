"""The stage graph, declared once: each stage's module, config model, key inputs and upstream roles.

:class:`~argse_cli.pipeline.Pipeline` resolves upstream keys by walking this table, the CLI builds
its stage commands from it (``--rehash`` where a stage fingerprints input files) and `argse sweep`
plans its runs in its order. A role is the name an upstream artifact has in the manifest; its keys
are found as ``fan`` says:

* ``one``: the upstream stage's key for this pipeline file (``pick``: with these config fields,
  e.g. the ce expert as the cRT backbone); ``alt`` stages replace it when the file has their
  section (``import-logits`` for ``export-logits``);
* ``experts``: one train-expert key per expert artifact, in ``losses`` order (a list; shared
  backbone: the shared artifact, then the decoupled one);
* ``given``: chosen by the caller (report's inputs: lists of eval and baselines keys).

A role with ``when`` applies only to the instances whose config fields match (the ``backbone`` of
the decoupled expert).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from .config import StageConfig


@dataclass(frozen=True)
class Role:
    """One upstream input of a stage."""

    name: str
    stage: str
    fan: Literal["one", "experts", "given"] = "one"
    alt: tuple[str, ...] = ()
    pick: dict[str, Any] = field(default_factory=dict)
    when: dict[str, Any] = field(default_factory=dict)

    def applies(self, fields: dict[str, Any]) -> bool:
        return all(fields.get(k) == v for k, v in self.when.items())


@dataclass(frozen=True)
class Node:
    """A stage: its upstream roles (in manifest order) and the input files whose contents enter its
    key (``data``: the dataset files; ``files``: the imported logits files)."""

    stage: str
    roles: tuple[Role, ...] = ()
    inputs: Literal["data", "files"] | None = None

    @property
    def module(self) -> str:
        """The stage module's name under ``argse_cli.stages`` (the registry the code digests read)."""
        from .stages import STAGE_MODULES

        return STAGE_MODULES[self.stage]

    @property
    def model(self) -> type[StageConfig]:
        from .config import STAGE_MODELS

        return STAGE_MODELS[self.stage]


_EXPORT = Role("export", "export-logits", alt=("import-logits",))

DAG: dict[str, Node] = {
    n.stage: n
    for n in (
        Node("split", inputs="data"),
        Node("train-expert", (
            Role("split", "split"),
            Role("backbone", "train-expert", pick={"loss": "ce"}, when={"loss": "decoupled"}),
        )),
        Node("export-logits", (Role("split", "split"), Role("experts", "train-expert", fan="experts"))),
        Node("calibrate", (_EXPORT,)),
        Node("train-gate", (_EXPORT, Role("calibrate", "calibrate"))),
        Node("eval", (Role("gate", "train-gate"),)),
        Node("baselines", (_EXPORT, Role("calibrate", "calibrate"), Role("gate", "train-gate"))),
        Node("report", (Role("evals", "eval", fan="given"), Role("baselines", "baselines", fan="given"))),
        Node("import-logits", inputs="files"),
    )
}  # fmt: skip


def role_of(stage: str, name: str) -> Role:
    """The role ``name`` of ``stage``."""
    return next(r for r in DAG[stage].roles if r.name == name)


# the stages a pipeline runs, in dependency order: every stage but the stand-ins (``alt``)
RUN_ORDER: tuple[str, ...] = tuple(
    s for s in DAG if not any(s in r.alt for n in DAG.values() for r in n.roles)
)
