"""How a run computes: the one place that decides the floating-point type and the intra-op thread count.

A smoke run on CPU computes in float64 on one thread. nbval compares a smoke notebook's printed numbers with the
committed ones on whatever machine runs it, and a few-step training is chaotic: in float32 the last-bit differences
between the kernels torch, MKL and oneDNN pick on one CPU or another (AVX-512, AVX2, plain) grow into different
third decimals. In float64 they stay near 1e-13, far below any printed digit, so the printed numbers are the same on
every x86-64 CPU (tests/test_kernel_invariance.py runs smoke trainings under several kernel choices to prove it).
One thread makes the sums' order independent of the core count as well.

reduced/full runs compute in float32 (what the sources did) with torch's own thread choice; bf16 autocast stays a
per-study option that smoke never uses.

`configure` is called by `runs.Run` (every notebook's setup cell makes one), so Jupyter, papermill, `kdnb run` and
nbval all get the same regime. Code that casts a tensor to "the compute type" uses `cast` instead of `.float()`.
"""
from __future__ import annotations

import torch

SMOKE_DTYPE = torch.float64
_TORCH_THREADS = torch.get_num_threads()  # torch's own choice, restored when a later run in this process is not smoke


def regime(profile: str, device: str) -> dict:
    """{'dtype': ..., 'threads': int or None} for a run of this profile on this device (None = torch's default)."""
    if profile == "smoke" and str(device) == "cpu":
        return {"dtype": "float64", "threads": 1}
    return {"dtype": "float32", "threads": None}


def configure(profile: str, device: str) -> dict:
    """Set torch's default dtype and thread count for this run; returns the regime as recorded in run.json."""
    r = regime(profile, device)
    torch.set_default_dtype(getattr(torch, r["dtype"]))
    torch.set_num_threads(r["threads"] or _TORCH_THREADS)
    return dict(r, threads=torch.get_num_threads())


def dtype() -> torch.dtype:
    return torch.get_default_dtype()


def cast(t: torch.Tensor) -> torch.Tensor:
    """To the run's compute type (float32, or float64 in smoke on CPU); also undoes bf16 autocast outputs."""
    return t.to(torch.get_default_dtype())


def cache_key() -> dict:
    """What a cached model's key must add so a float64 smoke teacher never answers for a float32 run (and back).
    Empty for float32, so the keys of caches made before float64 smoke existed stay valid."""
    d = torch.get_default_dtype()
    return {} if d == torch.float32 else {"dtype": str(d).removeprefix("torch.")}
