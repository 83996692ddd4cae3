"""Helpers shared by the benchmarks: the commit stamp, anonymous resident memory, a peak sampler,
and the offline CIFAR-10 builder's location."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The offline CIFAR-10 builder: $ARGSE_SHARED (default ../shared next to the repository).
SHARED = Path(os.environ.get("ARGSE_SHARED", ROOT.parent / "shared"))
CIFAR10_BUILDER = SHARED / "data" / "cifar10" / "build_cifar10.py"


def commit() -> str:
    """Short hash of HEAD ("unknown" outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
            timeout=10,
        )  # fmt: skip
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def rss_anon_mib() -> float:
    """This process's anonymous resident memory (RssAnon, MiB): heap and anonymous mmaps, not the
    file-backed page cache."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("no RssAnon in /proc/self/status")


class PeakSampler(threading.Thread):
    """Samples RssAnon every ``every_s`` seconds; ``stop()`` returns the peak (MiB)."""

    def __init__(self, every_s: float = 0.005):
        super().__init__(daemon=True)
        self.every_s, self.peak, self._halt = every_s, 0.0, threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.peak = max(self.peak, rss_anon_mib())
            time.sleep(self.every_s)

    def stop(self) -> float:
        self._halt.set()
        self.join()
        self.peak = max(self.peak, rss_anon_mib())
        return self.peak
