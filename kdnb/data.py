"""Datasets: one resolver for where the files are, torchvision's own classes to read them, and
in-memory tensors to batch from (airbench style: no per-sample PIL or DataLoader on the hot path).

Where data is looked for, in order: the notebook's `data_dir`, `$KDNB_DATA`, the repository's `data/`, and for
Fashion-MNIST also Debian's `/usr/share/datasets/fashion-mnist`. `source='sample'` reads the small
real samples shipped inside the package (see kdnb.samples), which is what the smoke profile uses.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from . import numerics, runs, validate

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
# the default `./data` means the checkout's, wherever the process runs (Jupyter and kdnb run work in notebooks/)
REPO_DATA = Path(__file__).resolve().parent.parent / "data"
NUM_CLASSES = {"mnist": 10, "fashion_mnist": 10, "emnist_letters": 26, "cifar10": 10, "voc2012": 21}


class DataNotFoundError(FileNotFoundError):
    """Raised before any work when a dataset is not where we looked; says where and how to get it."""

    def __init__(self, dataset: str, searched: Sequence[Path], expected: str):
        # absolute: a relative data_dir is read from the process's folder, which the user may not know
        self.dataset, self.searched = dataset, [Path(p).absolute() for p in searched]
        where = "\n".join(f"  - {p}" for p in self.searched) or "  (no candidate folder)"
        super().__init__(
            f"dataset {dataset!r} not found (looked for {expected}) in:\n{where}\n"
            f"How to get it: {HOW_TO_GET[dataset]}."
        )


HOW_TO_GET_SAMPLE = ("the shipped samples are part of the kdnb package: reinstall it (`pip install -e .`) or "
                     "rebuild them with `python -m kdnb.samples build --source <datasets>`")


class DataCorruptError(ValueError):
    """Raised at load time, before any training, when a data file is unreadable or inconsistent: one line
    naming the dataset, the file, what is wrong and how to get a good copy."""

    def __init__(self, dataset: str, path, problem: str, *, sample: bool = False):
        self.dataset, self.path, self.problem = dataset, str(path), problem
        how = HOW_TO_GET_SAMPLE if sample else HOW_TO_GET[dataset]
        super().__init__(f"dataset {dataset!r}: file {path} is corrupt ({problem}); get a good copy: {how}")


def cache_dir() -> Path:
    """Scratch space for decompressed or generated files (never inside the repo's results)."""
    return Path(os.environ.get("KDNB_CACHE", Path.home() / ".cache" / "kdnb"))


def candidate_roots(dataset: str, data_dir: str | os.PathLike | None = None, *, cwd=None) -> list[Path]:
    """Where `dataset` is looked for, in order. `cwd`: the folder relative roots are taken from (a notebook
    runs in notebooks/, so `kdnb run` asks what the notebook's process would find); None = this process's."""
    validate.choice("dataset", dataset, DATASETS)
    roots = []
    if data_dir:
        roots.append(Path(data_dir))
    if os.environ.get("KDNB_DATA"):
        roots.append(Path(os.environ["KDNB_DATA"]))
    roots.append(REPO_DATA)
    if dataset == "fashion_mnist":
        roots.append(DEBIAN_FASHION_MNIST)
    out = []
    for r in roots:  # keep order, drop duplicates
        r = r.expanduser()
        if cwd is not None and not r.is_absolute():
            r = Path(cwd) / r
        if r not in out:
            out.append(r)
    return out


# ---------------------------------------------------------------- data identity: what was actually read

_DIGESTS: dict[tuple, str] = {}
_READS: dict[tuple, dict] = {}  # (dataset, split, source) -> what load() read since the last reset_reads()


def file_digest(path: str | os.PathLike) -> str:
    """sha256 (first 16 hex digits) of a file's bytes. Hashing MNIST's 47 MB takes a fraction of a second, once:
    the digest is kept by (path, size, mtime) in this process and under the cache folder."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key in _DIGESTS:
        return _DIGESTS[key]
    memo = cache_dir() / "digests" / f"{runs.digest(key[0].encode(), 16)}.json"
    digest = None
    try:
        saved = json.loads(memo.read_text())
        if (saved["path"], saved["size"], saved["mtime_ns"]) == key:
            digest = saved["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if digest is None:
        digest = runs.file_hashes(p, "sha256")["sha256"][:16]
        try:
            runs.atomic_write_json(memo, {"path": key[0], "size": key[1], "mtime_ns": key[2], "sha256": digest})
        except OSError:
            pass  # a read-only cache only costs hashing again next time
    _DIGESTS[key] = digest
    return digest


def identity_of(entries) -> str | None:
    """One digest for a list of read entries: the files' contents only (not where they are), so the same data in
    another folder is the same data. None when nothing was read."""
    entries = list(entries)
    if not entries:
        return None
    keyed = sorted([e["dataset"], e["split"], e["source"], sorted(e["files"].values())] for e in entries)
    return runs.digest(keyed, 16, "sha256")  # lists only: sorting keys changes nothing


def _record_read(dataset: str, split: str, source: str, files: Sequence[Path]) -> str | None:
    entry = {"dataset": dataset, "split": split, "source": source,
             "files": {str(Path(f).resolve()): file_digest(f) for f in files}}
    _READS[(dataset, split, source)] = entry
    return identity_of([entry])


def reads() -> list[dict]:
    """Every split load() read since the last reset_reads(), with a digest per file: a run's data identity."""
    return [dict(e, files=dict(e["files"])) for e in _READS.values()]


def reset_reads() -> None:
    _READS.clear()


def cache_key(*splits: "Split") -> dict:
    """What a cached model's key must add so a teacher trained on other data never answers: the content digest of
    the files the splits came from. Empty for the shipped samples and the generated data (fixed by the package
    version, verified against MANIFEST.json), so the keys the smoke notebooks print stay the same."""
    ids = [s.identity for s in splits if s.source not in ("sample", "synthetic") and s.identity is not None]
    return {"data": runs.digest("/".join(ids).encode(), 16, "sha256")} if ids else {}


def files_for(dataset: str, split: str, source: str, data_dir=None, *, cwd=None) -> list[Path] | None:
    """The files load(dataset, split, source=source, data_dir=data_dir) reads, found the same way (None: not
    found). kdnb run compares their digests with a finished record's before it calls the record finished."""
    if dataset == "voc2012":
        return _voc_files(split, source, data_dir, cwd=cwd)
    if source == "sample":
        if dataset == "emnist_letters":
            return []  # generated by code: the package version fixes it
        from . import samples

        return [samples.SAMPLES_DIR / samples._SPECS[dataset]["file"]]
    roots = candidate_roots(dataset, data_dir, cwd=cwd)
    if dataset == "cifar10":
        if source == "subset":
            return next(([p] for r in roots for p in (r / "cifar10-subset" / "cifar10_subset.npz",
                                                     r / "cifar10_subset.npz") if p.is_file()), None)
        root = next((r for r in roots if (r / "cifar-10-batches-py").is_dir()), None)
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        return None if root is None else [root / "cifar-10-batches-py" / n for n in names]
    found = _idx_files(dataset, roots)
    if found is None:
        return None
    files = found[1]
    return files[:2] if split == "train" else files[2:]


def _voc_files(split: str, source: str, data_dir=None, *, cwd=None) -> list[Path] | None:
    """What voc_segmentation.load_voc reads for `split`: the split list and every image and mask it names."""
    from . import voc_segmentation

    if data_dir and cwd is not None and not Path(data_dir).is_absolute():
        data_dir = Path(cwd) / data_dir
    try:
        root = voc_segmentation.voc_dataset_root(source, data_dir)
    except (FileNotFoundError, ValueError):
        return None
    base = Path(root) / "VOCdevkit" / "VOC2012"
    listed = base / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not listed.is_file():
        return None
    ids = listed.read_text().split()
    return [listed, *(base / "JPEGImages" / f"{i}.jpg" for i in ids), *(base / "SegmentationClass" / f"{i}.png" for i in ids)]


def require(dataset: str, source: str, data_dir=None, *, download: bool = False) -> None:
    """DataNotFoundError now, before any other work, when load(dataset, ..., source=source) would not find the
    files (a study whose notebook reads its data late calls this from its `require_data`, in the setup cell)."""
    if source == "sample" or download:
        return
    for split in ("train", "test"):
        if files_for(dataset, split, source, data_dir) is None:
            expected = {"cifar10": "cifar10-subset/cifar10_subset.npz" if source == "subset" else
                        "cifar-10-batches-py/"}.get(dataset) or f"{_IDX[dataset][0]}/raw/{_IDX[dataset][1][0]} (or .gz)"
            raise DataNotFoundError(dataset, candidate_roots(dataset, data_dir), expected)


# ---------------------------------------------------------------- idx files: found, checked, decompressed


def _idx_files(dataset: str, roots: Sequence[Path]) -> tuple[str, list[Path]] | None:
    """('raw', the four idx files) or ('gz', the four .gz files) of the first root that has all four."""
    folder, files = _IDX[dataset]
    for root in roots:
        raw = root / folder / "raw"
        if all((raw / f).is_file() for f in files):
            return "raw", [raw / f for f in files]
        for gz_dir in (raw, root):
            if all((gz_dir / (f + ".gz")).is_file() for f in files):
                return "gz", [gz_dir / (f + ".gz") for f in files]
    return None


def idx_expected_size(header: bytes) -> tuple[int, tuple[int, ...]] | str:
    """(file size the header promises, shape) of a uint8 idx file, or what is wrong with the header."""
    if len(header) < 4 or header[0] != 0 or header[1] != 0:
        return "not an idx file (bad magic number)"
    if header[2] != 0x08:
        return f"idx type code 0x{header[2]:02x}, expected 0x08 (unsigned bytes)"
    ndim = header[3]
    if not 1 <= ndim <= 4 or len(header) < 4 + 4 * ndim:
        return f"idx header truncated or with {ndim} dimensions"
    shape = tuple(int.from_bytes(header[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    n = 1
    for d in shape:
        n *= d
    return 4 + 4 * ndim + n, shape


def _check_idx(dataset: str, path: Path, size: int, header: bytes, *, shown: Path | None = None,
               sample: bool = False) -> tuple[int, ...]:
    """The idx file's shape; DataCorruptError when its size is not what its header promises."""
    expected = idx_expected_size(header)
    if isinstance(expected, str):
        raise DataCorruptError(dataset, shown or path, expected, sample=sample)
    if size != expected[0]:
        what = "decompressed to" if shown is not None else "has"
        raise DataCorruptError(dataset, shown or path, f"{what} {size} bytes, its idx header "
                               f"(shape {list(expected[1])}) says {expected[0]}", sample=sample)
    return expected[1]


def _read_header(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(20)


def _check_idx_set(dataset: str, files: Sequence[Path], *, shown: Sequence[Path] | None = None,
                   sample: bool = False) -> None:
    """Sizes against headers, and images and labels of each split in equal numbers."""
    shown = list(shown or files)
    shapes = [_check_idx(dataset, f, f.stat().st_size, _read_header(f), shown=s if s != f else None, sample=sample)
              for f, s in zip(files, shown)]
    for i in (0, 2):
        if shapes[i][0] != shapes[i + 1][0]:
            raise DataCorruptError(dataset, shown[i + 1], f"{shapes[i + 1][0]} labels for {shapes[i][0]} images "
                                   f"in {Path(shown[i]).name}", sample=sample)


def _decompress(dataset: str, gz: Path, dest: Path) -> None:
    """gz -> dest through runs.atomic_path, checked against its idx header before the rename: two runs
    decompressing the same file at once both succeed, and a failed one leaves nothing behind."""
    with runs.atomic_path(dest) as tmp:
        try:
            with open(tmp, "wb") as out, gzip.open(gz, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
        except EOFError:
            raise DataCorruptError(dataset, gz, "the compressed file ends early (truncated)") from None
        except (gzip.BadGzipFile, zlib.error) as e:
            raise DataCorruptError(dataset, gz, f"not valid gzip: {e}") from None
        _check_idx(dataset, tmp, tmp.stat().st_size, _read_header(tmp), shown=gz)


def _idx_root(dataset: str, roots: Sequence[Path]) -> Path | None:
    """A root that torchvision's class can read with download=False, decompressing .gz if needed
    (torchvision only checks for the uncompressed idx files; Debian ships only .gz, flat)."""
    found = _idx_files(dataset, roots)
    if found is None:
        return None
    kind, paths = found
    folder, files = _IDX[dataset]
    if kind == "raw":
        _check_idx_set(dataset, paths)
        return paths[0].parent.parent.parent
    # keyed by what the .gz files hold, not by their folder: a .gz repaired or replaced in place gets a fresh copy
    ident = [(p.name, p.stat().st_size, file_digest(p)) for p in paths]
    key = runs.digest(ident, 12)  # lists only: sorting keys changes nothing
    dest_root = cache_dir() / "decompressed" / f"{dataset}-{key}"
    dest = dest_root / folder / "raw"
    dest.mkdir(parents=True, exist_ok=True)
    for f, gz in zip(files, paths):
        target = dest / f
        ok = target.is_file() and not isinstance(expected := idx_expected_size(_read_header(target)), str) \
            and target.stat().st_size == expected[0]
        if not ok:
            _decompress(dataset, gz, target)
    _check_idx_set(dataset, [dest / f for f in files], shown=paths)
    return dest_root


# (train, test, fewest training images of one class) of the official releases and of the shipped or generated
# smoke data: what sizes are checked against before any data is read (load checks the real files again)
_SIZES = {
    ("mnist", "real"): (60000, 10000, 5421), ("fashion_mnist", "real"): (60000, 10000, 6000),
    ("emnist_letters", "real"): (124800, 20800, 4800), ("cifar10", "real"): (50000, 10000, 5000),
    ("cifar10", "subset"): (4000, 1000, 366), ("emnist_letters", "sample"): (2600, 260, 100),
}


def sizes(dataset: str, source: str) -> dict:
    """{'train': images, 'test': images, 'train_per_class': fewest training images of one class}."""
    validate.choice("dataset", dataset, [d for d in DATASETS if d != "voc2012"])
    validate.choice("source", source, SOURCES)
    if source == "sample" and dataset != "emnist_letters":
        from . import samples

        counts = samples._read_manifest(samples.SAMPLES_DIR)["samples"][dataset]["counts"]
        n = (counts["train"]["n"], counts["test"]["n"], min(counts["train"]["per_class"]))
    else:
        if (dataset, source) not in _SIZES:
            validate.fail("source", source, f"has no {dataset!r}")
        n = _SIZES[(dataset, source)]
    return {"train": n[0], "test": n[1], "train_per_class": n[2]}


def at_most(name: str, value, limit: int, what: str) -> None:
    """A size parameter against the data it is taken from, before anything runs."""
    if isinstance(value, int) and not isinstance(value, bool) and value > limit:
        validate.fail(name, value, f"must be <= {limit} ({what})")


@dataclass
class Split:
    """One split held in memory: uint8 images [N,H,W] or [N,H,W,3] and int64 labels [N]."""

    x: torch.Tensor
    y: torch.Tensor
    source: str
    identity: str | None = None  # content digest of the files it was read from (see cache_key)

    def __len__(self) -> int:
        return len(self.y)


def load(dataset: str, split: str = "train", *, source: str = "real", data_dir=None,
         download: bool = False) -> Split:
    """Load one split of a classification dataset into uint8 tensors.

    source: 'sample' (shipped with kdnb, offline), 'real' (torchvision's files under the resolved
    root) or 'subset' (CIFAR-10 only: the lossless subset npz of ../shared/datasets).
    Corrupt files (truncated or bad gzip, sizes that disagree with the idx header, labels out of range, an npz
    without its arrays) raise DataCorruptError here, before any training. What was read is recorded (reads()).
    """
    validate.choice("dataset", dataset, [d for d in DATASETS if d != "voc2012"])
    validate.choice("split", split, ("train", "test"))
    validate.choice("source", source, SOURCES)
    validate.boolean("download", download)
    if source == "subset" and dataset != "cifar10":
        validate.fail("source", source, "'subset' exists only for dataset='cifar10'")
    if source == "sample":
        from . import samples

        if dataset == "emnist_letters":
            root = samples.write_synthetic_emnist(cache_dir() / "synthetic-emnist")
            out = _read_idx(dataset, root, split, source="synthetic")
            _record_read(dataset, split, "synthetic", [])
            return out
        npz = samples.SAMPLES_DIR / samples._SPECS[dataset]["file"]
        if dataset == "cifar10":
            out = _read_npz(dataset, npz, split, "sample", sample=True)
        else:
            # through torchvision's own reader, so the smoke path is the real path
            root = samples.write_idx_layout(dataset, cache_dir() / "samples")
            out = _read_idx(dataset, root, split, source="sample")
        out.identity = _record_read(dataset, split, "sample", [npz])
        return out
    roots = candidate_roots(dataset, data_dir)
    if dataset == "cifar10":
        out = _load_cifar(roots, split, source, download)
    else:
        root = _idx_root(dataset, roots)
        if root is None:
            if not download:
                folder, files = _IDX[dataset]
                raise DataNotFoundError(dataset, roots, f"{folder}/raw/{files[0]} (or .gz)")
            root = roots[0]
        found = files_for(dataset, split, source, data_dir)
        out = _read_idx(dataset, root, split, source="real", download=download,
                        labels_file=found[1] if found else None)
    files = files_for(dataset, split, source, data_dir)
    out.identity = _record_read(dataset, split, source, files or [])
    return out


def _check_labels(dataset: str, y: torch.Tensor, where, *, n_images: int, sample: bool = False) -> None:
    """Labels in 0..classes-1 and one per image, checked at load: a bad label otherwise surfaces as a CUDA
    assert or 'Target 200 is out of bounds' after minutes of training."""
    n = NUM_CLASSES[dataset]
    if len(y) != n_images:
        raise DataCorruptError(dataset, where, f"{len(y)} labels for {n_images} images", sample=sample)
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= n):
        bad = y[(y < 0) | (y >= n)]
        shift = " (stored as 1..26)" if dataset == "emnist_letters" else ""
        raise DataCorruptError(dataset, where, f"{len(bad)} labels outside 0..{n - 1}{shift}, e.g. "
                               f"{int(bad[0]) + (1 if dataset == 'emnist_letters' else 0)}", sample=sample)


def _read_idx(dataset: str, root: Path, split: str, *, source: str, download: bool = False,
              labels_file: Path | None = None) -> Split:
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
    labels = labels_file or Path(ds.raw_folder) / _IDX[dataset][1][1 if train else 3]
    _check_labels(dataset, y, labels, n_images=len(x), sample=source != "real")
    return Split(x, y, source)


def _read_npz(dataset: str, path: Path, split: str, source: str, *, sample: bool = False) -> Split:
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in (f"{split}_x", f"{split}_y") if k not in z.files]
            if missing:
                raise DataCorruptError(dataset, path, f"no array {missing[0]!r} (it holds {sorted(z.files)})",
                                       sample=sample)
            x, y = torch.from_numpy(z[f"{split}_x"]), torch.from_numpy(z[f"{split}_y"]).long()
    except (zipfile.BadZipFile, EOFError, zlib.error, ValueError) as e:
        if isinstance(e, DataCorruptError):
            raise
        raise DataCorruptError(dataset, path, f"not a readable npz archive: {e}", sample=sample) from None
    if x.ndim != 4 or x.dtype != torch.uint8:
        raise DataCorruptError(dataset, path, f"{split}_x is {x.dtype} of shape {list(x.shape)}, expected uint8 "
                               "[N, 32, 32, 3]", sample=sample)
    _check_labels(dataset, y, path, n_images=len(x), sample=sample)
    return Split(x, y, source)


def _load_cifar(roots: Sequence[Path], split: str, source: str, download: bool) -> Split:
    if source == "subset":
        for root in roots:
            for p in (root / "cifar10-subset" / "cifar10_subset.npz", root / "cifar10_subset.npz"):
                if p.is_file():
                    return _read_npz("cifar10", p, split, "subset")
        raise DataNotFoundError("cifar10", roots, "cifar10-subset/cifar10_subset.npz")
    import torchvision.datasets as tvd
    from torchvision.datasets.utils import check_integrity

    root = next((r for r in roots if (r / "cifar-10-batches-py").is_dir()), None)
    if root is None:
        if not download:
            raise DataNotFoundError("cifar10", roots, "cifar-10-batches-py/")
        root = roots[0]
    folder = root / "cifar-10-batches-py"
    if folder.is_dir():
        # torchvision's own check, per file, so the error can say which one
        for name, md5 in tvd.CIFAR10.train_list + tvd.CIFAR10.test_list:
            if (folder / name).is_file() and not check_integrity(str(folder / name), md5):
                raise DataCorruptError("cifar10", folder / name, "its MD5 is not the official one")
    try:
        ds = tvd.CIFAR10(root, train=split == "train", download=download)
    except RuntimeError as e:
        raise DataCorruptError("cifar10", folder, str(e).rstrip(".")) from None
    out = Split(torch.from_numpy(ds.data), torch.tensor(ds.targets).long(), "real")
    _check_labels("cifar10", out.y, folder, n_images=len(out.x))
    return out


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
    return Split(split.x[keep], split.y[keep], split.source, split.identity)


def subset_by_count(split: Split, n: int, *, per_class: bool = False) -> Split:
    """First n images (or first n of each class) in dataset order: deterministic, no seed needed."""
    validate.positive_int("n", n)
    if not per_class:
        return Split(split.x[:n], split.y[:n], split.source, split.identity)
    idx = torch.cat([torch.nonzero(split.y == c).flatten()[:n] for c in torch.unique(split.y)])
    idx = idx.sort().values
    return Split(split.x[idx], split.y[idx], split.source, split.identity)


def holdout(split: Split, fraction: float, *, seed: int = 0) -> tuple[Split, Split]:
    """Seeded random split of a training set into (train, validation) for the corrected variants."""
    validate.unit_interval("fraction", fraction)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(split), generator=g)
    n_val = int(round(fraction * len(split)))
    tr, va = perm[n_val:].sort().values, perm[:n_val].sort().values
    return (Split(split.x[tr], split.y[tr], split.source, split.identity),
            Split(split.x[va], split.y[va], split.source, split.identity))


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
