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

import os

# libgomp (torch's OpenMP runtime) spin-waits between parallel regions by default; on a machine running anything
# else the spinning threads steal the cores the work needs (issue 16: 01 on 2 threads 25x slower than on 1, a
# ResNet-18 step 6x). Passive waiting costs nothing measurable on a quiet machine. Read once, when torch loads
# libgomp: every entry point sets it before that (Makefile, kernel spec, kdnb run/sweep, `import kdnb`).
THREAD_POLICY = {"OMP_WAIT_POLICY": "PASSIVE"}


def thread_policy(environ=None) -> dict:
    """Put THREAD_POLICY into `environ` (os.environ by default) where the user has not set it; returns its values.
    Children started afterwards (Jupyter kernels, sweep workers) inherit it; this process only if torch is not
    loaded yet."""
    environ = os.environ if environ is None else environ
    for k, v in THREAD_POLICY.items():
        environ.setdefault(k, v)
    return {k: environ[k] for k in THREAD_POLICY}


thread_policy()  # before the torch import below: `import kdnb` (kdnb/__init__.py imports this module) covers plain Python

import torch  # noqa: E402  (after the thread policy, on purpose)

from . import validate  # noqa: E402

SMOKE_DTYPE = torch.float64
_TORCH_THREADS = torch.get_num_threads()  # torch's own choice, restored when a later run in this process is not smoke


# Intra-op threads of a reduced/full run on CPU, fixed per (study, profile): the thread count changes the order of
# float32 sums, hence the last digits, so the run id (which names study and profile) must fix it too - whatever
# OMP_NUM_THREADS, Ray's --cpus-per-trial or the core count say. One thread unless listed: 01 is fastest on one even
# with passive waiting (benchmarks/bench_thread_policy.py), and the committed 01/03/04 records ran on one; 05's
# ResNet gains from two and its committed reduced record ran on two.
CPU_THREADS = {("05_self_distillation", "reduced"): 2, ("05_self_distillation", "full"): 2}


def regime(profile: str, device: str, notebook: str | None = None) -> dict:
    """{'dtype': ..., 'threads': int or None} for a run of this profile on this device (None = torch's default,
    for CUDA runs, whose numbers do not hang on the CPU's thread count)."""
    if profile == "smoke" and str(device) == "cpu":
        return {"dtype": "float64", "threads": 1}
    if str(device) == "cpu":
        return {"dtype": "float32", "threads": CPU_THREADS.get((notebook, profile), 1)}
    return {"dtype": "float32", "threads": None}


def configure(profile: str, device: str, notebook: str | None = None) -> dict:
    """Set torch's default dtype and thread count for this run; returns the regime as recorded in run.json."""
    r = regime(profile, device, notebook)
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


# ---------------------------------------------------------------- opt-in bf16 for the ResNet studies (03, 05)

PRECISIONS = ("fp32", "bf16")


def check_precision(precision, profile: str) -> str:
    """`precision` of a study: 'fp32' (the sources') or 'bf16' (autocast + channels_last), never in smoke."""
    validate.choice("precision", precision, PRECISIONS)
    if precision == "bf16" and profile == "smoke":
        # smoke's printed numbers must regenerate on any CPU (float64, one thread); bf16 would undo exactly that
        raise ValueError("precision='bf16' is not allowed in the smoke profile: smoke computes in float64 so that "
                         "its numbers regenerate on any CPU; use --profile reduced or full")
    return precision


def autocast(device, precision: str):
    """bf16 autocast on the device's type (CPU or CUDA) for precision='bf16'; a no-op context for 'fp32'."""
    from contextlib import nullcontext

    if precision != "bf16":
        return nullcontext()
    return torch.autocast("cuda" if str(device).startswith("cuda") else "cpu", dtype=torch.bfloat16)


def model_layout(t, precision: str):
    """channels_last for bf16 (oneDNN's and cuDNN's fast bf16 convolutions want it), unchanged for fp32.
    Works on a 4-d tensor and on a module alike."""
    if precision != "bf16":
        return t
    if isinstance(t, torch.Tensor):
        return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t
    return t.to(memory_format=torch.channels_last)
