"""Where a report's files go: LaTeX and figures written into the artifact, each name recorded in
``written`` (the artifact's ``files``) and, for figures, in ``doc["figures"]`` (summary.json)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Sink:
    """The report writer ``out``, the figure ``formats``, summary.json's ``doc`` and the names written."""

    out: Any
    formats: tuple
    doc: dict
    written: list[str] = field(default_factory=list)

    def tex(self, name: str, tex: str) -> None:
        """Write a LaTeX file."""
        self.out.file_path(name).write_text(tex)
        self.written.append(name)

    def figure(self, stem: str, draw: Callable[[Path], Any]) -> None:
        """Register ``stem.<fmt>`` in the artifact and draw into the writer's files folder."""
        paths = [self.out.file_path(f"{stem}.{fmt}") for fmt in self.formats]
        if not paths:
            return
        draw(paths[0].parent / stem)
        names = [f"{stem}.{fmt}" for fmt in self.formats]
        self.written.extend(names)
        self.doc["figures"] += names


def slug(name: str) -> str:
    """A method name as a file-name part."""
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "method"
