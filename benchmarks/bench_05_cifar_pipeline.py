"""Study 05's input pipeline: tensors in memory with batched crop/flip (kdnb) vs the source's
torchvision pipeline (PIL RandomCrop(32, 4) -> RandomHorizontalFlip -> ToTensor -> Normalize through a
DataLoader), side by side in one process on the same CPU, same images, same batch size.

    .venv/bin/python benchmarks/bench_05_cifar_pipeline.py [--with-model] [--reps 5]

Prints images/second of each (median of the reps) and the ratio from the two pipelines alternating epoch by epoch:
median and min-max of the paired ratios. --with-model adds a ResNet-18 training step per batch (then the model
dominates and the ratio shrinks towards 1 on CPU; on a GPU the input pipeline matters).

Measured (2-core machine shared with other jobs, 2 torch threads, OMP_WAIT_POLICY=PASSIVE, shipped 500-image sample,
batch 64, 5 interleaved reps):
    input only    DataLoader+PIL 6,125 img/s   kdnb 52,377 img/s   8.64x (min-max 7.61-9.43x)
    --with-model  DataLoader+PIL   326 img/s   kdnb    343 img/s   1.03x (min-max 0.92-1.16x): the ResNet dominates
"""
import argparse
import os
import statistics
import sys

import torch
import torchvision.transforms as T
from PIL import Image

from kdnb import data, losses, models
from kdnb import self_distillation as sd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _interleave import interleave, ratio_text  # noqa: E402


class PilCifar(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x.numpy(), y
        self.tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                             T.Normalize(sd.CIFAR_MEAN, sd.CIFAR_STD)])

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.tf(Image.fromarray(self.x[i])), self.y[i]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--with-model", action="store_true")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5, help="interleaved reps (>= 5)")
    args = ap.parse_args()
    split = data.load("cifar10", "train", source="sample")
    n = len(split)
    step = (lambda xb, yb: None)
    if args.with_model:
        model = models.resnet("resnet18")
        opt = torch.optim.Adam(model.parameters(), 1e-3)

        def step(xb, yb):
            loss = losses.self_distillation_mse(model(xb), yb, alpha=1.0, num_classes=10)
            opt.zero_grad()
            loss.backward()
            opt.step()

    def timed(batches):
        for xb, yb in batches:
            step(xb, yb)

    loader = torch.utils.data.DataLoader(PilCifar(split.x, split.y), batch_size=args.batch_size, shuffle=True,
                                         num_workers=0)
    xf = data.to_float(split.x)
    tensors = data.TensorLoader(xf, split.y, args.batch_size, shuffle=True, augment=sd.augment)
    timed(loader), timed(tensors.epoch(0))  # warm-up
    epochs = iter(range(1, 10**6))
    t = interleave({"pil": lambda: timed(loader), "kdnb": lambda: timed(tensors.epoch(next(epochs)))}, args.reps)
    print(f"images: {n}, batch {args.batch_size}, model step: {args.with_model}, torch threads: {torch.get_num_threads()}")
    print(f"torch DataLoader + PIL transforms: {n / statistics.median(t['pil']):10.0f} img/s")
    print(f"kdnb TensorLoader (tensors):       {n / statistics.median(t['kdnb']):10.0f} img/s")
    print(f"ratio: {ratio_text(t['pil'], t['kdnb'])}")


if __name__ == "__main__":
    main()
