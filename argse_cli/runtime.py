"""Process-level runtime settings shared by the compute stages."""

from __future__ import annotations


def pin_threads() -> None:
    """Deterministic CPU runs: a fixed torch thread count (the cores we have, at most 8)."""
    import os

    import torch

    torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
