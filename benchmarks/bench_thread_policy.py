"""The thread policy under load: one training workload with 1 thread, 2 threads spinning (OMP_WAIT_POLICY=ACTIVE,
what libgomp's default behaves like) and 2 threads passive (OMP_WAIT_POLICY=PASSIVE, what kdnb sets: kdnb.numerics.
thread_policy), while a busy process the benchmark starts itself (a Python loop: one core's worth of other work)
competes for the cores. libgomp reads the policy once, when torch loads it, so every configuration runs in a fresh
subprocess; the configurations alternate rep by rep and each child times its own steps after a warm-up one.

    .venv/bin/python benchmarks/bench_thread_policy.py [--workload resnet|mlp] [--reps 5] [--steps 4] [--no-busy]

Workloads: `resnet` = a ResNet-18 training step, batch 64, 28 px, fp32 (study 03's reduced configuration);
`mlp` = 100 steps of 01's 784-196-10 student (batch 32, KD loss, SGD), small and dispatch-bound. A child that runs
past --timeout seconds is stopped and counted at the timeout (a lower bound, marked '>'). The busy process is
killed at the end, also on Ctrl-C or an error.

Measured (AMD EPYC, 2 cores shared with other jobs, one busy loop started by the benchmark, 5 reps, 4 steps each;
median time per step and min-max, and the paired ratio to 2 threads passive, median and min-max):
    resnet  1 thread             250 ms (233-279)   1.02x (0.92-1.16x)
            2 threads spinning   435 ms (307-1265)  1.81x (1.13-5.15x)
            2 threads passive    240 ms (231-273)   1
    mlp     1 thread             135 ms (135-462)   0.73x (0.44-2.21x)    (per 100 steps)
            2 threads spinning   551 ms (327-1002)  3.05x (1.23-5.26x)
            2 threads passive    191 ms (180-305)   1
Passive waiting removes the collapse; 01's small student is still fastest on one thread (issue 16 saw spinning 25x
slower on 2 busy cores: the spread above shows how much it depends on what else runs).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _interleave import ratio  # noqa: E402

CONFIGS = {"1 thread": {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"},
           "2 threads spinning": {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "ACTIVE"},
           "2 threads passive": {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}}


def child(workload: str, steps: int) -> None:
    """Runs in the fresh subprocess: print seconds per step (median over `steps`, after one warm-up)."""
    import torch
    import torch.nn.functional as F

    from kdnb import losses, models

    torch.manual_seed(0)
    if workload == "resnet":
        model, batch, inner = models.resnet("resnet18", 10), torch.randn(64, 3, 28, 28), 1
        y = torch.randint(0, 10, (64,))
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        loss_of = lambda: F.cross_entropy(model(batch), y)  # noqa: E731
    else:
        model, teacher = models.student_mlp("mlp"), models.TeacherMLP(dropout_at_inference=True).eval()
        batch, y, inner = torch.rand(32, 784), torch.randint(0, 6, (32,)), 100
        opt = torch.optim.SGD(model.parameters(), lr=0.01)

        def loss_of():
            with torch.no_grad():
                t = teacher(batch)
            return losses.soft_target_kd(model(batch), t, y, temperature=10.0, soft_weight=0.9)

    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        for _ in range(inner):
            loss = loss_of()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if i:  # the first is the warm-up
            times.append(time.perf_counter() - t0)
    print(json.dumps({"step_s": statistics.median(times), "threads": torch.get_num_threads()}))


def timed_child(name: str, args) -> tuple[float, bool]:
    env = dict(os.environ, **CONFIGS[name])
    cmd = [sys.executable, os.path.abspath(__file__), "--child", args.workload, "--steps", str(args.steps)]
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout, check=True).stdout
    except subprocess.TimeoutExpired:
        return args.timeout / (args.steps + 1), True
    got = json.loads(out.strip().splitlines()[-1])
    assert got["threads"] == int(CONFIGS[name]["OMP_NUM_THREADS"]), got
    return got["step_s"], False


UNIT = {"resnet": "step", "mlp": "100 steps"}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=("resnet", "mlp"), default="resnet")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per child, after one warm-up")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds one child may take")
    ap.add_argument("--no-busy", action="store_true", help="no competing process (the quiet-machine comparison)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child, args.steps)
    if args.reps < 5:
        ap.error("--reps must be >= 5 (a median and a spread from interleaved reps)")
    busy = None if args.no_busy else subprocess.Popen([sys.executable, "-c", "while True: pass"])
    names = list(CONFIGS)
    got = {n: [] for n in names}
    cut = {n: False for n in names}
    try:
        for r in range(args.reps):
            for name in (names if r % 2 == 0 else names[::-1]):
                s, timed_out = timed_child(name, args)
                got[name].append(s)
                cut[name] |= timed_out
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    print(f"workload {args.workload}, {'one busy process competing' if busy else 'no busy process'}, "
          f"{os.cpu_count()} CPUs, {args.reps} reps")
    ref = got["2 threads passive"]
    for name in names:
        med, lo, hi = ratio(got[name], ref)
        mark = ">" if cut[name] else ""
        print(f"{name:20s} {mark}{1e3 * statistics.median(got[name]):8.1f} ms per {UNIT[args.workload]} "
              f"(min-max {1e3 * min(got[name]):.1f}-{1e3 * max(got[name]):.1f})   vs 2 threads passive: "
              f"{mark}{med:.2f}x (min-max {lo:.2f}-{hi:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
