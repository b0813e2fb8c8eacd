"""Study 03's input pipeline and training step per algorithm: kdnb's uint8 tensors in memory with per-image
RandAugment on tensors (kdnb.dml_calibration) vs the source's torchvision pipeline (PIL RandAugment() ->
Grayscale(3) -> ToTensor -> Normalize((0.2860,), (0.3530,)) through a DataLoader, no shuffle), side by side in one
process, same images, same batch size, same models.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_03_fmnist_pipeline.py [--images 256] [--batch-size 64]

Prints images/second of the input pipeline alone, then of one training step per algorithm (ResNet-18 students,
ResNet-50 teacher forward for kd / crossq14, 3 students for dml) fed by each pipeline. On CPU the models dominate and
the ratio tends to 1; on CUDA (--device cuda: data on the GPU, bf16 autocast, channels_last) the input pipeline matters.

Recorded (shared 2-core CPU, 1 thread, nice 15, other jobs running; shipped 2,000-image FMNIST sample; 256 images,
batch 64):
    input pipeline only   DataLoader+PIL     1588 img/s   kdnb tensors     4002 img/s   ratio   2.5x
      (randaugment='per_batch', one draw per batch:    23825 img/s, ratio  15.0x)
    baseline              DataLoader+PIL    128.6 img/s   kdnb tensors    134.7 img/s   ratio  1.05x
    kd                    DataLoader+PIL     82.3 img/s   kdnb tensors     82.0 img/s   ratio  1.00x
    dml                   DataLoader+PIL     41.7 img/s   kdnb tensors     42.6 img/s   ratio  1.02x
    tfkd                  DataLoader+PIL    122.7 img/s   kdnb tensors    116.4 img/s   ratio  0.95x
    crossq14              DataLoader+PIL    136.1 img/s   kdnb tensors    114.5 img/s   ratio  0.84x
The per-algorithm rows are single passes on a loaded machine (+-15 % noise): on CPU the ResNets set the pace and the
input pipeline does not matter; the tensor pipeline pays off only where the model step is fast (CUDA, not measured
here: no GPU was lent to this task). dml counts images once for a cohort of 3 students.
"""
import argparse
import time

import torch
import torchvision.transforms as T
from PIL import Image

from kdnb import data
from kdnb import dml_calibration as dc


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
    ap.add_argument("--algorithms", default="baseline,kd,dml,tfkd,crossq14")
    args = ap.parse_args()
    device = args.device
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
        t = time.perf_counter()
        for xb, yb in batches:
            if step is not None:
                step(xb, yb)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return n / (time.perf_counter() - t)

    timed(ours()), timed(theirs())  # warm-up
    print(f"images: {n}, batch {args.batch_size}, device {device}, torch threads: {torch.get_num_threads()}")
    base, mine = max(timed(theirs()) for _ in range(2)), max(timed(ours()) for _ in range(2))
    print(f"input pipeline only   DataLoader+PIL {base:8.0f} img/s   kdnb tensors {mine:8.0f} img/s   ratio {mine / base:5.1f}x")
    batch = max(timed(ours("per_batch")) for _ in range(2))
    print(f"  (randaugment='per_batch', one draw per batch: {batch:8.0f} img/s, ratio {batch / base:5.1f}x)")
    teacher = dc.build_model("resnet50", 0, device).eval().requires_grad_(False)
    for name in args.algorithms.split(","):
        algo, size = ("crossq", int(name[6:])) if name.startswith("crossq") else (name, None)
        k = p["num_students"] if algo in dc.DML_ALGOS else 1
        students = [dc.build_model("resnet18", i, device) for i in range(k)]
        opts = [torch.optim.AdamW(m.parameters(), 1e-3) for m in students]

        def step(xb, yb):
            xs = dc._to_model_layout(dc.resize(xb, size))
            t_logits = None
            if algo in dc.TEACHER_ALGOS:
                with torch.no_grad(), dc._amp(device):
                    t_logits = teacher(xs).float()
            dc.joint_step(algo, students, opts, xs, yb, p, teacher_logits=t_logits, device=device)

        step(*next(ours()))  # warm-up
        a, b = timed(theirs(), step), timed(ours(), step)
        print(f"{name:12s}          DataLoader+PIL {a:8.1f} img/s   kdnb tensors {b:8.1f} img/s   ratio {b / a:5.2f}x")


if __name__ == "__main__":
    main()
