"""User-facing errors: one line naming the field and the fix; the CLI exits with code 2."""

from __future__ import annotations


class ArgseError(Exception):
    """A user-facing error: one line naming the field and the fix (CLI exits 2)."""

    def __init__(self, field: str, problem: str, fix: str):
        self.field, self.problem, self.fix = field, problem, fix
        super().__init__(f"{field}: {problem} -- fix: {fix}")


class IntegrityError(ArgseError):
    """A stored artifact is incomplete, corrupted or missing a chunk."""
