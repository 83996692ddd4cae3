"""Progress for long work: a Rich bar on a TTY (stderr), plain periodic lines otherwise.

One :class:`Progress` per stage run. Loops report through it:

- ``progress(m, n, stats)`` after step ``m`` of ``n`` (trainers, export chunks, bootstrap, fits);
  a loop that starts over (``m`` smaller than before, or another ``n``) or a new
  :meth:`Progress.phase` name starts a new bar;
- ``progress.phase(name)`` names the loop that follows (e.g. ``"bootstrap (refit, lt)"``);
- ``progress.log(msg)`` prints one line (above the bar on a TTY), e.g. early stopping;
- ``progress.warn(msg)`` prints ``warning: msg`` even with ``--quiet`` and keeps it in
  ``progress.warnings`` for the stage to store;
- ``progress.child(name)`` is the progress of a loop nested in the current step (a gate's epochs
  inside the baselines' methods): its own bar (or lines) under the parent's, which keeps its
  count and clock; the child's bar is removed when the child is closed.

On a TTY the bar shows the name, the bar, M/N, elapsed time, ETA and the stats, on one line that
never wraps (the stats are cut with an ellipsis when the terminal is narrow). Without a TTY one
plain line per step is printed at most every ``every_s`` seconds (always the first and the last
step), each at most :data:`MAX_LINE` characters. Numbers in the stats are rounded to 3
significant digits, lists element-wise.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

MAX_LINE = 160
"""Longest plain (non-TTY) progress line, in characters."""


def _value(v: Any) -> str:
    if hasattr(v, "tolist") and not isinstance(v, str | bytes):  # numpy / torch arrays and scalars
        v = v.tolist()
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def fmt_stats(stats: dict[str, Any] | None) -> str:
    """``k=v`` pairs, numbers to 3 significant digits (lists element-wise); None values dropped."""
    return " ".join(f"{k}={_value(v)}" for k, v in (stats or {}).items() if v is not None)


_fmt = fmt_stats  # the old private name


def fmt_duration(s: float | None) -> str:
    """``h:mm:ss`` (``-:--:--`` when unknown)."""
    if s is None or s != s or s < 0 or s == float("inf"):
        return "-:--:--"
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def clip(line: str, width: int = MAX_LINE) -> str:
    return line if len(line) <= width else line[: width - 1] + "…"


class Progress:
    """``progress(step, total, stats)`` callable used by long loops; ``log``, ``warn``, ``phase``.

    ``tty`` (default: ``stream.isatty()``) selects the Rich bar; ``stream`` defaults to stderr.
    """

    def __init__(self, desc: str = "", every_s: float = 5.0, quiet: bool = False, *,
                 stream: TextIO | None = None, tty: bool | None = None, width: int | None = None):
        self.desc, self.every_s, self.quiet = desc, every_s, quiet
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(self.stream.isatty()) if tty is None else tty
        self.width = width
        self.warnings: list[str] = []
        self._phase: str | None = None
        self._loop: tuple[str, int] | None = None  # (name, total) of the current loop
        self._step = 0
        self._t0 = 0.0
        self._last = -1e18
        self._rich: Any = None
        self._task: Any = None
        self._parent: Progress | None = None
        self._mark = time.monotonic()  # the last event (creation, phase, step, log): a new loop's start

    # ------------------------------------------------------------------ naming and lines
    @property
    def name(self) -> str:
        return f"{self.desc}: {self._phase}" if self._phase and self.desc else (self._phase or self.desc)

    def phase(self, name: str | None) -> Progress:
        """Name the loop that follows (a new bar starts at its first step)."""
        self._phase = name
        self._mark = time.monotonic()
        return self

    def log(self, msg: str) -> None:
        self._mark = time.monotonic()
        if self.quiet:
            return
        if self._rich is not None:
            self._rich.console.print(msg, markup=False, highlight=False, soft_wrap=True)
        else:
            print(msg, file=self.stream, flush=True)

    def warn(self, msg: str) -> None:
        """A warning line (shown even with ``--quiet``), kept in ``self.warnings``."""
        self.warnings.append(msg)
        line = f"warning: {msg}"
        if self._rich is not None:
            self._rich.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            print(line, file=self.stream, flush=True)

    # ------------------------------------------------------------------ steps
    def __call__(self, step: int, total: int, stats: dict[str, Any] | None = None) -> None:
        if self.quiet:
            return
        step, total = int(step), max(int(total), 1)
        name = self.name
        new = self._loop is None or self._loop != (name, total) or step < self._step
        now = time.monotonic()
        if new:  # the loop began at the previous event (its first step has already run)
            self._end_task()
            self._loop, self._t0, self._last = (name, total), self._mark, -1e18
        self._step, self._mark = step, now
        if self.tty:
            self._draw(step, total, stats, new)
            return
        if new or step >= total or now - self._last >= self.every_s:
            self._last = now
            el = now - self._t0
            eta = el / step * (total - step) if step > 0 else None
            pct = 100.0 * step / total
            line = (f"[{name}] {step}/{total} {pct:3.0f}% elapsed {fmt_duration(el)} "
                    f"eta {fmt_duration(eta)} {fmt_stats(stats)}")
            print(clip(line.rstrip()), file=self.stream, flush=True)

    def track(self, items: Iterable[Any], name: str, total: int | None = None) -> Iterator[Any]:
        """Iterate ``items`` under the phase ``name``, one step per item."""
        seq = items if total is not None else list(items)
        n = total if total is not None else len(seq)  # type: ignore[arg-type]
        self.phase(name)
        for i, x in enumerate(seq, 1):
            yield x
            self(i, n)

    def child(self, name: str) -> Progress:
        """The progress of a loop nested in the current step, named ``<this name>: <name>``; it
        shares this one's stream, Rich display and warnings. Close it when its loop ends."""
        c = Progress(f"{self.name}: {name}", self.every_s, self.quiet, stream=self.stream, tty=self.tty,
                     width=self.width)
        c.warnings = self.warnings
        c._parent = self
        return c

    # ------------------------------------------------------------------ Rich
    def _ensure_rich(self) -> Any:
        if self._parent is not None:
            self._rich = self._parent._ensure_rich()
            return self._rich
        if self._rich is None:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RP
            from rich.table import Column

            console = Console(file=self.stream, force_terminal=True, width=self.width)
            self._rich = RP(
                TextColumn("{task.description}", table_column=Column(no_wrap=True, overflow="ellipsis",
                                                                      max_width=36)),
                BarColumn(bar_width=24),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[stats]}", table_column=Column(no_wrap=True, overflow="ellipsis",
                                                                        ratio=1)),
                console=console, transient=False, expand=True,
            )
            self._rich.start()
        return self._rich

    def _draw(self, step: int, total: int, stats: dict[str, Any] | None, new: bool) -> None:
        self._ensure_rich()
        if new or self._task is None:
            self._task = self._rich.add_task(self.name, total=total, stats="")
            for t in self._rich.tasks:  # the loop began before its first step was reported
                if t.id == self._task:
                    t.start_time = self._t0
        self._rich.update(self._task, completed=step, total=total, stats=fmt_stats(stats))

    def _end_task(self) -> None:
        self._loop, self._step = None, 0
        if self._rich is not None and self._task is not None:
            self._rich.refresh()
            self._task = None

    def close(self) -> None:
        if self._parent is not None:  # a child removes its own bar; the display is the parent's
            if self._rich is not None and self._task is not None:
                self._rich.refresh()  # its last state is drawn once, then the bar goes
                self._rich.remove_task(self._task)
            self._task, self._rich, self._loop, self._step = None, None, None, 0
            self._parent._mark = time.monotonic()
            return
        self._end_task()
        if self._rich is not None:
            self._rich.stop()
            self._rich = None
