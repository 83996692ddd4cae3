"""Logits files in every format import-logits reads (npy fp32/fp16, npz stored/deflated,
safetensors fp32/bf16, Zarr, .pt fp32/bf16), shared by the import, apply and equivalence tests.
This module holds no tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def write_logits(f: np.ndarray, base: Path, fmt: str) -> str:
    """Write f [N, C] (float32) in format ``fmt``; return the spec."""
    import zarr
    from safetensors.numpy import save_file
    from safetensors.torch import save_file as save_torch

    if fmt == "npy":
        np.save(base.with_suffix(".npy"), f)
        return str(base.with_suffix(".npy"))
    if fmt == "npy16":
        np.save(base.with_suffix(".npy"), f.astype(np.float16))
        return str(base.with_suffix(".npy"))
    if fmt == "npz":  # stored member: memory-mapped
        np.savez(base.with_suffix(".npz"), other=np.zeros(3), logits=f.astype(np.float16))
        return f"{base.with_suffix('.npz')}:logits"
    if fmt == "npzc":  # deflated member: read whole
        np.savez_compressed(base.with_suffix(".npz"), f)
        return str(base.with_suffix(".npz"))
    if fmt == "st":
        save_file(
            {"logits": f, "bias": np.zeros(2, np.float32)}, str(base.with_suffix(".safetensors"))
        )
        return f"{base.with_suffix('.safetensors')}:logits"
    if fmt == "st_bf16":
        save_torch({"x": torch.from_numpy(f).bfloat16()}, str(base.with_suffix(".safetensors")))
        return str(base.with_suffix(".safetensors"))
    if fmt == "zarr":
        p = base.with_suffix(".zarr")
        z = zarr.create_array(store=str(p), shape=f.shape, dtype=f.dtype, chunks=(333, f.shape[1]))
        z[:] = f
        return str(p)
    if fmt == "pt":
        torch.save(
            {"logits": torch.from_numpy(f), "step": torch.tensor(3)}, base.with_suffix(".pt")
        )
        return f"{base.with_suffix('.pt')}:logits"
    if fmt == "pt_bf16":
        torch.save(torch.from_numpy(f).bfloat16(), base.with_suffix(".pt"))
        return str(base.with_suffix(".pt"))
    raise ValueError(fmt)


def as_read(f: np.ndarray, fmt: str) -> np.ndarray:
    """What a reader must return for f written in ``fmt`` (exact)."""
    if fmt in ("npy16", "npz"):
        return f.astype(np.float16)
    if fmt in ("st_bf16", "pt_bf16"):
        return torch.from_numpy(f).bfloat16().float().numpy()
    return f
