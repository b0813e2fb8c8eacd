"""Datasets: one resolver for where the files are, torchvision's own classes to read them, and
in-memory tensors to batch from (airbench style: no per-sample PIL or DataLoader on the hot path).

Where data is looked for, in order: the notebook's `data_dir`, `$KDNB_DATA`, `./data`, and for
Fashion-MNIST also Debian's `/usr/share/datasets/fashion-mnist`. `source='sample'` reads the small
real samples shipped inside the package (see kdnb.samples), which is what the smoke profile uses.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from . import numerics, validate

DATASETS = ("mnist", "fashion_mnist", "emnist_letters", "cifar10", "voc2012")
SOURCES = ("sample", "real", "subset")

# torchvision folder name, class, the four idx files (MNIST-like sets only), how to obtain it
_IDX = {
    "mnist": ("MNIST", ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                        "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")),
    "fashion_mnist": ("FashionMNIST", ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                       "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")),
    "emnist_letters": ("EMNIST", ("emnist-letters-train-images-idx3-ubyte",
                                  "emnist-letters-train-labels-idx1-ubyte",
                                  "emnist-letters-test-images-idx3-ubyte",
                                  "emnist-letters-test-labels-idx1-ubyte")),
}
HOW_TO_GET = {
    "mnist": "pass download=True on a connected machine (torchvision fetches it into data_dir), "
             "or set KDNB_DATA to a folder holding MNIST/raw/",
    "fashion_mnist": "pass download=True on a connected machine, `apt-get install dataset-fashion-mnist`, "
                     "or set KDNB_DATA to a folder holding FashionMNIST/raw/",
    "emnist_letters": "pass download=True on a connected machine (torchvision's EMNIST, 'letters' split, "
                      "about 560 MB), or set KDNB_DATA to a folder holding EMNIST/raw/",
    "cifar10": "pass download=True on a connected machine (torchvision's CIFAR10), or set KDNB_DATA to a "
               "folder holding cifar-10-batches-py/ (source='real') or cifar10-subset/cifar10_subset.npz "
               "(source='subset')",
    "voc2012": "pass download=True on a connected machine (torchvision's VOCSegmentation, 2 GB), or set "
               "KDNB_DATA to a folder holding VOCdevkit/VOC2012/",
}
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
NUM_CLASSES = {"mnist": 10, "fashion_mnist": 10, "emnist_letters": 26, "cifar10": 10, "voc2012": 21}


class DataNotFoundError(FileNotFoundError):
    """Raised before any work when a dataset is not where we looked; says where and how to get it."""

    def __init__(self, dataset: str, searched: Sequence[Path], expected: str):
        self.dataset, self.searched = dataset, list(searched)
        where = "\n".join(f"  - {p}" for p in searched) or "  (no candidate folder)"
        super().__init__(
            f"dataset {dataset!r} not found (looked for {expected}) in:\n{where}\n"
            f"How to get it: {HOW_TO_GET[dataset]}."
        )


def cache_dir() -> Path:
    """Scratch space for decompressed or generated files (never inside the repo's results)."""
    return Path(os.environ.get("KDNB_CACHE", Path.home() / ".cache" / "kdnb"))


def candidate_roots(dataset: str, data_dir: str | os.PathLike | None = None) -> list[Path]:
    validate.choice("dataset", dataset, DATASETS)
    roots = []
    if data_dir:
        roots.append(Path(data_dir))
    if os.environ.get("KDNB_DATA"):
        roots.append(Path(os.environ["KDNB_DATA"]))
    roots.append(Path("data"))
    if dataset == "fashion_mnist":
        roots.append(DEBIAN_FASHION_MNIST)
    out = []
    for r in roots:  # keep order, drop duplicates
        r = r.expanduser()
        if r not in out:
            out.append(r)
    return out


def _idx_root(dataset: str, roots: Sequence[Path]) -> Path | None:
    """A root that torchvision's class can read with download=False, decompressing .gz if needed
    (torchvision only checks for the uncompressed idx files; Debian ships only .gz, flat)."""
    folder, files = _IDX[dataset]
    for root in roots:
        raw = root / folder / "raw"
        if all((raw / f).is_file() for f in files):
            return root
        for gz_dir in (raw, root):
            if all((gz_dir / (f + ".gz")).is_file() for f in files):
                # a stable name per source folder (str hash() changes with every process)
                key = hashlib.sha1(str(gz_dir.resolve()).encode()).hexdigest()[:12]
                dest_root = cache_dir() / "decompressed" / f"{dataset}-{key}"
                dest = dest_root / folder / "raw"
                dest.mkdir(parents=True, exist_ok=True)
                for f in files:
                    if not (dest / f).is_file():
                        tmp = dest / (f + ".tmp")
                        with gzip.open(gz_dir / (f + ".gz"), "rb") as src, open(tmp, "wb") as dst:
                            shutil.copyfileobj(src, dst)
                        tmp.replace(dest / f)
                return dest_root
    return None


@dataclass
class Split:
    """One split held in memory: uint8 images [N,H,W] or [N,H,W,3] and int64 labels [N]."""

    x: torch.Tensor
    y: torch.Tensor
    source: str

    def __len__(self) -> int:
        return len(self.y)


def load(dataset: str, split: str = "train", *, source: str = "real", data_dir=None,
         download: bool = False) -> Split:
    """Load one split of a classification dataset into uint8 tensors.

    source: 'sample' (shipped with kdnb, offline), 'real' (torchvision's files under the resolved
    root) or 'subset' (CIFAR-10 only: the lossless subset npz of ../shared/datasets).
    """
    validate.choice("dataset", dataset, [d for d in DATASETS if d != "voc2012"])
    validate.choice("split", split, ("train", "test"))
    validate.choice("source", source, SOURCES)
    if source == "subset" and dataset != "cifar10":
        validate.fail("source", source, "'subset' exists only for dataset='cifar10'")
    if source == "sample":
        if dataset == "emnist_letters":
            from . import samples

            root = samples.write_synthetic_emnist(cache_dir() / "synthetic-emnist")
            return _read_idx(dataset, root, split, source="synthetic")
        from . import samples

        if dataset == "cifar10":
            arrays = samples.load_sample("cifar10")
            return Split(torch.from_numpy(arrays[f"{split}_x"]), torch.from_numpy(arrays[f"{split}_y"]).long(),
                         "sample")
        # through torchvision's own reader, so the smoke path is the real path
        root = samples.write_idx_layout(dataset, cache_dir() / "samples")
        return _read_idx(dataset, root, split, source="sample")
    roots = candidate_roots(dataset, data_dir)
    if dataset == "cifar10":
        return _load_cifar(roots, split, source, download)
    root = _idx_root(dataset, roots)
    if root is None:
        if not download:
            folder, files = _IDX[dataset]
            raise DataNotFoundError(dataset, roots, f"{folder}/raw/{files[0]} (or .gz)")
        root = roots[0]
    return _read_idx(dataset, root, split, source="real", download=download)


def _read_idx(dataset: str, root: Path, split: str, *, source: str, download: bool = False) -> Split:
    import torchvision.datasets as tvd

    train = split == "train"
    if dataset == "mnist":
        ds = tvd.MNIST(root, train=train, download=download)
    elif dataset == "fashion_mnist":
        ds = tvd.FashionMNIST(root, train=train, download=download)
    else:
        ds = tvd.EMNIST(root, split="letters", train=train, download=download)
    x, y = ds.data, ds.targets.long()
    if dataset == "emnist_letters":
        # EMNIST stores images transposed and letters as 1..26 (torchvision keeps both as is)
        x, y = x.transpose(1, 2).contiguous(), y - 1
    return Split(x, y, source)


def _load_cifar(roots: Sequence[Path], split: str, source: str, download: bool) -> Split:
    if source == "subset":
        for root in roots:
            for p in (root / "cifar10-subset" / "cifar10_subset.npz", root / "cifar10_subset.npz"):
                if p.is_file():
                    with np.load(p) as z:
                        return Split(torch.from_numpy(z[f"{split}_x"]), torch.from_numpy(z[f"{split}_y"]).long(),
                                     "subset")
        raise DataNotFoundError("cifar10", roots, "cifar10-subset/cifar10_subset.npz")
    import torchvision.datasets as tvd

    root = next((r for r in roots if (r / "cifar-10-batches-py").is_dir()), None)
    if root is None:
        if not download:
            raise DataNotFoundError("cifar10", roots, "cifar-10-batches-py/")
        root = roots[0]
    ds = tvd.CIFAR10(root, train=split == "train", download=download)
    return Split(torch.from_numpy(ds.data), torch.tensor(ds.targets).long(), "real")


def voc_root(data_dir=None, *, download: bool = False) -> Path:
    """Folder that torchvision.datasets.VOCSegmentation(root, year='2012') reads."""
    roots = candidate_roots("voc2012", data_dir)
    for root in roots:
        for r in (root, root / "VOC2012-sample"):
            if (r / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation").is_dir():
                return r
    if download:
        return roots[0]
    raise DataNotFoundError("voc2012", roots, "VOCdevkit/VOC2012/ImageSets/Segmentation/")


# ---------------------------------------------------------------- subsets and tensors


def subset_by_classes(split: Split, classes: Sequence[int]) -> Split:
    """Keep images *and* labels of the listed classes only (labels keep their original ids)."""
    keep = torch.isin(split.y, torch.as_tensor(list(classes), device=split.y.device))  # same device as the labels
    return Split(split.x[keep], split.y[keep], split.source)


def subset_by_count(split: Split, n: int, *, per_class: bool = False) -> Split:
    """First n images (or first n of each class) in dataset order: deterministic, no seed needed."""
    validate.positive_int("n", n)
    if not per_class:
        return Split(split.x[:n], split.y[:n], split.source)
    idx = torch.cat([torch.nonzero(split.y == c).flatten()[:n] for c in torch.unique(split.y)])
    idx = idx.sort().values
    return Split(split.x[idx], split.y[idx], split.source)


def holdout(split: Split, fraction: float, *, seed: int = 0) -> tuple[Split, Split]:
    """Seeded random split of a training set into (train, validation) for the corrected variants."""
    validate.unit_interval("fraction", fraction)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(split), generator=g)
    n_val = int(round(fraction * len(split)))
    tr, va = perm[n_val:].sort().values, perm[:n_val].sort().values
    return Split(split.x[tr], split.y[tr], split.source), Split(split.x[va], split.y[va], split.source)


def to_float(x: torch.Tensor, *, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
             device: str = "cpu", channels_first: bool = True) -> torch.Tensor:
    """uint8 [N,H,W] or [N,H,W,C] -> float [N,C,H,W] in [0,1] (ToTensor semantics), optionally normalised."""
    x = x.to(device)
    x = x.unsqueeze(1) if x.ndim == 3 else (x.permute(0, 3, 1, 2) if channels_first else x)
    x = numerics.cast(x).div_(255.0)
    if mean is not None:
        m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        x = (x - m) / s
    return x.contiguous()


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, *, padding: int = 4,
                     flip: bool = True) -> torch.Tensor:
    """RandomCrop(size, padding) + RandomHorizontalFlip on a whole batch of tensors at once."""
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
    rows = (torch.arange(h, device=x.device)[None] + dy[:, None])[:, None, :, None].expand(b, c, h, w)
    cols = torch.arange(w, device=x.device)[None] + dx[:, None]
    if flip:
        do = (torch.rand(b, generator=generator) < 0.5).to(x.device)
        cols = torch.where(do[:, None], cols.flip(1), cols)
    cols = cols[:, None, None, :].expand(b, c, h, w)
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[bi, ci, rows, cols]


class TensorLoader:
    """Batches from tensors already in (device) memory. The order of epoch e depends only on
    (seed, e), so a run resumed at epoch e sees exactly the batches it would have seen."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool, seed: int = 0,
                 drop_last: bool = False, augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None):
        validate.positive_int("batch_size", batch_size)
        if len(x) != len(y):
            raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
        self.x, self.y, self.batch_size = x, y, batch_size
        self.shuffle, self.seed, self.drop_last, self.augment = shuffle, seed, drop_last, augment

    def __len__(self) -> int:
        n = len(self.y)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        n = len(self.y)
        order = torch.randperm(n, generator=g).to(self.x.device) if self.shuffle else None
        for i in range(len(self)):
            sl = slice(i * self.batch_size, min(n, (i + 1) * self.batch_size))
            idx = order[sl] if order is not None else None
            xb = self.x[idx] if idx is not None else self.x[sl]
            yb = self.y[idx] if idx is not None else self.y[sl]
            if self.augment is not None:
                xb = self.augment(xb, g)
            yield xb, yb

    def __iter__(self):
        return self.epoch(0)
