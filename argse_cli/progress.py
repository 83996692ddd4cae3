"""Progress for long work: Rich on a TTY (stderr), plain periodic lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Any


def _fmt(stats: dict[str, Any]) -> str:
    parts = []
    for k, v in stats.items():
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


class Progress:
    """``progress(step, total, stats)`` callable used by trainers; ``log(msg)`` for one-off lines.

    On a TTY a Rich progress bar is drawn on stderr; otherwise one plain line is printed at most
    every ``every_s`` seconds (and always for the last step).
    """

    def __init__(self, desc: str = "", every_s: float = 5.0, quiet: bool = False):
        self.desc, self.every_s, self.quiet = desc, every_s, quiet
        self._last = 0.0
        self._rich = None
        self._task = None
        self.tty = sys.stderr.isatty()

    def log(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    def __call__(self, step: int, total: int, stats: dict[str, Any] | None = None) -> None:
        if self.quiet:
            return
        stats = stats or {}
        if self.tty:
            if self._rich is None:
                from rich.progress import BarColumn, MofNCompleteColumn, TextColumn
                from rich.progress import Progress as RP

                self._rich = RP(
                    TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[stats]}"), transient=False,
                    console=__import__("rich.console").console.Console(stderr=True),
                )
                self._rich.start()
                self._task = self._rich.add_task(self.desc, total=total, stats="")
            self._rich.update(self._task, completed=step, total=total, stats=_fmt(stats))
            if step >= total:
                self.close()
            return
        now = time.time()
        if now - self._last >= self.every_s or step >= total or step <= 1:
            self._last = now
            print(f"[{self.desc}] {step}/{total} {_fmt(stats)}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None
