"""A ResNet-18 training step (forward, loss, backward, Adam) on CPU in fp32 vs bf16 autocast + channels_last
(what `precision='bf16'` does in studies 03 and 05: kdnb.numerics.autocast / model_layout), at 28 px (03's
Fashion-MNIST, 3 channels) and 32 px (05's CIFAR-10), batch 64 and 256, the two precisions interleaved rep by rep
in one process on the same weights and batches.

    .venv/bin/python benchmarks/bench_resnet_precision.py [--reps 5] [--steps 2] [--sizes 28,32] [--batches 64,256]

Prints images/second of each precision and the median fp32/bf16 time ratio with its min-max over the reps.
bf16 pays off only where the CPU has native bf16 instructions (AVX512_BF16 or AMX: oneDNN uses them); elsewhere it
is emulated and slower.

Measured (AMD EPYC with AVX512_BF16, 2 cores shared with other jobs, 2 torch threads, OMP_WAIT_POLICY=PASSIVE,
5 reps of 2 steps; fp32 -> bf16 img/s, speed-up median and min-max over the reps):
    28 px batch  64:  398 ->  463 img/s  1.17x (1.16-1.30x)
    28 px batch 256:  638 ->  946 img/s  1.51x (1.36-2.30x)
    32 px batch  64:  410 ->  476 img/s  1.15x (0.99-1.20x)
    32 px batch 256:  655 ->  996 img/s  1.52x (1.44-1.55x)
(issue 16 saw 1.3x at batch 64 and 1.5-2.35x at batch 256 on this machine: within these spreads.)
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

from kdnb import models, numerics

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _interleave import interleave, ratio_text  # noqa: E402


def make_step(precision: str, size: int, batch: int, steps: int):
    torch.manual_seed(0)
    model = numerics.model_layout(models.resnet("resnet18", 10), precision)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    g = torch.Generator().manual_seed(0)
    x = numerics.model_layout(torch.randn(batch, 3, size, size, generator=g), precision)
    y = torch.randint(0, 10, (batch,), generator=g)

    def run():
        for _ in range(steps):
            with numerics.autocast("cpu", precision):
                z = numerics.cast(model(x))
            loss = F.cross_entropy(z, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return run


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2, help="training steps per timed rep")
    ap.add_argument("--sizes", default="28,32")
    ap.add_argument("--batches", default="64,256")
    args = ap.parse_args(argv)
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    native = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    print(f"torch threads {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
          f"native bf16: {', '.join(native) or 'none (emulated: expect bf16 to be slower)'}")
    for size in map(int, args.sizes.split(",")):
        for batch in map(int, args.batches.split(",")):
            arms = {p: make_step(p, size, batch, args.steps) for p in ("fp32", "bf16")}
            for run in arms.values():
                run()  # warm-up: oneDNN picks and caches its kernels for this shape
            t = interleave(arms, args.reps)
            med = {p: sorted(v)[len(v) // 2] for p, v in t.items()}
            ips = {p: batch * args.steps / med[p] for p in med}
            print(f"{size} px batch {batch:3d}: fp32 {ips['fp32']:6.0f} img/s  bf16+channels_last {ips['bf16']:6.0f} img/s"
                  f"  bf16 speed-up {ratio_text(t['fp32'], t['bf16'])}", flush=True)


if __name__ == "__main__":
    main()
