"""Smoke numerics do not depend on the CPU: the same short trainings (tests/kernel_probe.py: MLP/KD, CNN, ResNet,
a DML ResNet cohort with RandAugment, a segmentation net) give the same metrics whichever kernels torch, MKL and
oneDNN dispatch to, and whatever OMP_NUM_THREADS the caller set.

This is the guard against committed smoke outputs that regenerate only on the machine that executed them: each
kernel choice below emulates another CPU (plain SSE, AVX2, AVX-512) on this one. Metrics must agree to 9
significant digits (printed numbers have at most 6); strings and integers exactly. Hashes of float64 weights are
identities of bytes, not metrics: their last bits may differ and they are never printed.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

PROBE = Path(__file__).with_name("kernel_probe.py")
RTOL, ATOL = 1e-9, 1e-12
# (ATen capability, MKL instruction cap, oneDNN ISA cap, OMP_NUM_THREADS): one emulated CPU each
KERNELS = {
    "default": ("default", "SSE4_2", "SSE41", "2"),
    "avx2": ("avx2", "AVX2", "AVX2", "1"),
    "avx512": ("avx512", "AVX512", "ALL", "2"),
}
NOT_METRICS = ("weights_hash", "logits_key", "config_key", "path")


def available_kernels() -> list[str]:
    have = torch.backends.cpu.get_cpu_capability()  # the best this CPU runs: 'AVX512', 'AVX2' or 'DEFAULT'
    order = ["default", "avx2", "avx512"]
    return order[: order.index(have.lower()) + 1] if have.lower() in order else ["default"]


def run_probe(kernel: str, tmp: Path) -> dict:
    aten, mkl, onednn, threads = KERNELS[kernel]
    env = dict(os.environ, ATEN_CPU_CAPABILITY=aten, MKL_ENABLE_INSTRUCTIONS=mkl, ONEDNN_MAX_CPU_ISA=onednn,
               OMP_NUM_THREADS=threads, KDNB_CACHE=str(tmp / f"cache-{kernel}"))  # no cache shared between runs
    out = subprocess.run([sys.executable, str(PROBE)], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"probe under {kernel} failed:\n{out.stderr[-3000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def flatten(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from flatten(v, f"{prefix}/{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from flatten(v, f"{prefix}[{i}]")
    else:
        yield prefix, obj


def differences(a: dict, b: dict) -> list[str]:
    fa, fb = dict(flatten(a)), dict(flatten(b))
    out = [f"{k}: only in one run" for k in sorted(set(fa) ^ set(fb))]
    for k in sorted(set(fa) & set(fb)):
        if k.startswith("/_") or k.rsplit("/", 1)[-1] in NOT_METRICS:
            continue
        x, y = fa[k], fb[k]
        if isinstance(x, float) and isinstance(y, float):
            if (math.isnan(x) and math.isnan(y)) or math.isclose(x, y, rel_tol=RTOL, abs_tol=ATOL):
                continue
        elif x == y:
            continue
        out.append(f"{k}: {x!r} vs {y!r}")
    return out


def test_differences_sees_a_changed_digit():
    a = {"m": {"acc": 0.123456789, "n": 3, "h": [1.0, float("nan")], "weights_hash": "ab"}}
    assert differences(a, json.loads(json.dumps(a))) == []
    assert differences(a, {"m": {"acc": 0.123456789, "n": 3, "h": [1.0, float("nan")], "weights_hash": "cd"}}) == []
    assert differences(a, {"m": {"acc": 0.1234568, "n": 3, "h": [1.0, float("nan")], "weights_hash": "ab"}})
    assert differences(a, {"m": {"acc": 0.123456789, "n": 4, "h": [1.0, float("nan")], "weights_hash": "ab"}})
    assert differences(a, {"m": {"acc": 0.123456789, "n": 3, "h": [1.0], "weights_hash": "ab"}})


@pytest.mark.slow
def test_smoke_metrics_are_the_same_under_every_cpu_kernel(tmp_path):
    kernels = available_kernels()
    assert len(kernels) >= 2 or pytest.skip("this CPU runs only the default kernels")
    # each probe runs on one torch thread (the smoke regime), so two at a time use the 2 cores without contention
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(kernels, pool.map(lambda k: run_probe(k, tmp_path), kernels)))
    for k, r in results.items():
        assert r["_capability"] == KERNELS[k][0].upper(), f"ATEN_CPU_CAPABILITY={k} was not applied: {r['_capability']}"
        assert r["_threads"] == 1, f"smoke ran on {r['_threads']} threads under OMP_NUM_THREADS={KERNELS[k][3]}"
    base = kernels[0]
    for k in kernels[1:]:
        diff = differences(results[base], results[k])
        assert not diff, f"{base} vs {k}: {len(diff)} metrics differ, e.g.\n" + "\n".join(diff[:20])
