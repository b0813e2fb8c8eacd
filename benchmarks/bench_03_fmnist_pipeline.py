"""Study 03's input pipeline and training step per algorithm: kdnb's uint8 tensors in memory with per-image
RandAugment on tensors (kdnb.dml_calibration) vs the source's torchvision pipeline (PIL RandAugment() ->
Grayscale(3) -> ToTensor -> Normalize((0.2860,), (0.3530,)) through a DataLoader, no shuffle), side by side in one
process, same images, same batch size, same models.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_03_fmnist_pipeline.py [--images 256] [--batch-size 64] \
        [--reps 5] [--algorithms baseline,kd,dml,tfkd,crossq14]

Prints images/second of the input pipeline alone, then of one training step per algorithm (ResNet-18 students,
ResNet-50 teacher forward for kd / crossq14, 3 students for dml) fed by each pipeline; every comparison alternates
the pipelines rep by rep and gives the median ratio and its min-max. On CPU the models dominate and the ratio tends
to 1; on CUDA (--device cuda: data on the GPU, bf16 autocast + channels_last as the full profile) the input
pipeline matters.

Measured (2-core machine shared with other jobs, 1 thread; shipped 2,000-image FMNIST sample; 256 images, batch 64,
5 interleaved reps; median and min-max of the paired ratios):
    input pipeline only   DataLoader+PIL  3222 img/s   kdnb tensors   5629 img/s   ratio 1.81x (1.67-2.20x)
      (randaugment='per_batch', one draw per batch: 116674 img/s, 35.6x (12.2-52.9x); not the source's per-image draw)
    baseline training     DataLoader+PIL   258 img/s   kdnb tensors    262 img/s   ratio 1.05x (0.88-1.12x)
This replaces the 2.5x an earlier single best-of-2 pass claimed (issue 16 measured 1.1-1.6x): per-image RandAugment
on tensors costs nearly as much as on PIL images, so the tensor pipeline gains under 2x on input and nothing once a
ResNet trains on CPU; it pays off where the model step is fast (CUDA).
"""
import argparse
import os
import statistics
import sys

import torch
import torchvision.transforms as T
from PIL import Image

from kdnb import data, numerics
from kdnb import dml_calibration as dc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _interleave import interleave, ratio_text  # noqa: E402


class PilFmnist(torch.utils.data.Dataset):
    """The source's FMNIST_loader train transform on PIL images."""

    def __init__(self, x, y):
        self.x, self.y = x.numpy(), y
        self.tf = T.Compose([T.RandAugment(), T.Grayscale(num_output_channels=3), T.ToTensor(),
                             T.Normalize((dc.FMNIST_MEAN,), (dc.FMNIST_STD,))])

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.tf(Image.fromarray(self.x[i], mode="L")), self.y[i]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=5, help="interleaved reps per comparison (>= 5)")
    ap.add_argument("--algorithms", default="baseline",
                    help="training-step rows, from baseline,kd,dml,tfkd,crossq14 ('' for the input pipeline only)")
    args = ap.parse_args()
    device = args.device
    # on CUDA as the full profile runs there (bf16 autocast + channels_last); on CPU fp32 as reduced does
    precision = "bf16" if device.startswith("cuda") else "fp32"
    split = data.load("fashion_mnist", "train", source="sample")
    x, y = split.x[:args.images], split.y[:args.images]
    n = len(y)
    p = dict(dc.PROFILES["smoke"], num_students=3)
    x_dev, y_dev = x.unsqueeze(1).to(device), y.to(device)

    def ours(mode="per_sample"):
        for xb, yb in data.TensorLoader(x_dev, y_dev, args.batch_size, shuffle=False).epoch(0):
            yield dc.normalise(dc.randaugment(xb, mode)), yb

    def theirs():
        loader = torch.utils.data.DataLoader(PilFmnist(x, y), batch_size=args.batch_size, shuffle=False, num_workers=0)
        for xb, yb in loader:
            yield xb.to(device), yb.to(device)

    def timed(batches, step=None):
        def go():
            for xb, yb in batches():
                if step is not None:
                    step(xb, yb)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
        return go

    def row(name, t, slow="DataLoader+PIL", fast="kdnb tensors"):
        a, b = (n / statistics.median(t[k]) for k in (slow, fast))
        print(f"{name:20s} {slow} {a:8.1f} img/s   {fast} {b:8.1f} img/s   ratio {ratio_text(t[slow], t[fast])}",
              flush=True)

    timed(ours)(), timed(theirs)()  # warm-up
    print(f"images: {n}, batch {args.batch_size}, device {device} ({precision}), torch threads: {torch.get_num_threads()}")
    t = interleave({"DataLoader+PIL": timed(theirs), "kdnb tensors": timed(ours),
                    "per_batch": timed(lambda: ours("per_batch"))}, args.reps)
    row("input pipeline only", t)
    row("  randaugment='per_batch' (one draw per batch)", t, fast="per_batch")
    teacher = dc.build_model("resnet50", 0, device, precision=precision).eval().requires_grad_(False)
    for name in filter(None, args.algorithms.split(",")):
        algo, size = ("crossq", int(name[6:])) if name.startswith("crossq") else (name, None)
        k = p["num_students"] if algo in dc.DML_ALGOS else 1
        students = [dc.build_model("resnet18", i, device, precision=precision) for i in range(k)]
        opts = [torch.optim.AdamW(m.parameters(), 1e-3) for m in students]

        def step(xb, yb):
            xs = numerics.model_layout(dc.resize(xb, size), precision)
            t_logits = None
            if algo in dc.TEACHER_ALGOS:
                with torch.no_grad(), numerics.autocast(device, precision):
                    t_logits = numerics.cast(teacher(xs))
            dc.joint_step(algo, students, opts, xs, yb, p, teacher_logits=t_logits, device=device, precision=precision)

        step(*next(ours()))  # warm-up
        row(name, interleave({"DataLoader+PIL": timed(theirs, step), "kdnb tensors": timed(ours, step)}, args.reps))


if __name__ == "__main__":
    main()
