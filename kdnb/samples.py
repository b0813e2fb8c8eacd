"""Small real data samples shipped inside the package, and synthetic data in torchvision's layouts.

The "smoke" profile must run offline, without network and without ``../shared``.  For that the
package ships a few MB of *real* images (``kdnb/_samples/``), built reproducibly by :func:`build`
from the full datasets (``$KDNB_DATA``, e.g. ``/work/shared/datasets``):

* ``mnist.npz``          2,000 train (200/class) + 1,000 test (100/class)
* ``fashion_mnist.npz``  2,000 train (200/class) +   500 test ( 50/class)
* ``cifar10.npz``          500 train ( 50/class) +   250 test ( 25/class), from the CIFAR-10 subset

Each npz holds ``train_x, train_y, train_index, test_x, test_y, test_index`` where ``*_index`` is the
image's index in the official split.  ``MANIFEST.json`` records checksums, counts, the selection rule,
the source files and the licence of each sample.

EMNIST and PASCAL VOC cannot ship, so :func:`write_synthetic_emnist` and :func:`write_synthetic_voc`
generate small learnable stand-ins in torchvision's real on-disk layouts; :func:`write_idx_layout`
writes the MNIST-style samples back as the four official idx files.  Together they let the real
``torchvision.datasets`` classes (the download code path) be exercised offline.

Command line::

    python -m kdnb.samples build --source /work/shared/datasets   # rebuild kdnb/_samples
    python -m kdnb.samples verify                                 # sha256 of shipped files vs MANIFEST
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import sys
import zipfile
from pathlib import Path
from typing import Mapping

import numpy as np

from .runs import atomic_write_bytes, digest, file_hashes

__all__ = [
    "SAMPLE_NAMES",
    "SAMPLES_DIR",
    "build",
    "verify",
    "load_sample",
    "write_idx_layout",
    "synthetic_letters",
    "write_synthetic_emnist",
    "voc_palette",
    "write_synthetic_voc",
    "read_idx",
    "idx_bytes",
    "main",
]

SAMPLES_DIR = Path(__file__).resolve().parent / "_samples"
MANIFEST_NAME = "MANIFEST.json"
SAMPLE_NAMES = ("mnist", "fashion_mnist", "cifar10")

# Fixed zip member timestamp (the earliest a zip can hold) so that the npz bytes are reproducible.
_ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)
_ZIP_LEVEL = 9

# idx files: official names and their folders in torchvision's layout (root/<Class>/raw/).
_IDX_FILES = {
    ("train", "x"): "train-images-idx3-ubyte",
    ("train", "y"): "train-labels-idx1-ubyte",
    ("test", "x"): "t10k-images-idx3-ubyte",
    ("test", "y"): "t10k-labels-idx1-ubyte",
}
_IDX_FOLDER = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}

_SPECS = {
    "mnist": {
        "file": "mnist.npz",
        "kind": "idx",
        "folder": "MNIST",
        "per_class": {"train": 200, "test": 100},
        "classes": [str(i) for i in range(10)],
        "licence": "CC BY-SA 3.0",
        "citation": "Yann LeCun and Corinna Cortes, The MNIST database of handwritten digits "
        "(http://yann.lecun.com/exdb/mnist/), licensed CC BY-SA 3.0.",
    },
    "fashion_mnist": {
        "file": "fashion_mnist.npz",
        "kind": "idx",
        "folder": "FashionMNIST",
        "per_class": {"train": 200, "test": 50},
        "classes": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
        "licence": "MIT",
        "citation": "Fashion-MNIST, Copyright (c) 2017 Zalando SE, MIT licence; Han Xiao, Kashif Rasul, "
        "Roland Vollgraf, Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning "
        "Algorithms, arXiv:1708.07747 (2017).",
    },
    "cifar10": {
        "file": "cifar10.npz",
        "kind": "npz",
        "source": "cifar10-subset/cifar10_subset.npz",
        "per_class": {"train": 50, "test": 25},
        "classes": ["airplane", "automobile", "bird", "cat", "deer",
                    "dog", "frog", "horse", "ship", "truck"],
        "licence": "CIFAR-10 terms: cite the technical report when redistributing",
        "citation": "Alex Krizhevsky, Learning Multiple Layers of Features from Tiny Images, "
        "technical report, University of Toronto, 2009 (CIFAR-10 by Alex Krizhevsky, Vinod Nair "
        "and Geoffrey Hinton).",
    },
}


# --------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------
def _hash_file(path: Path) -> dict:
    return file_hashes(path, "md5", "sha256")


def _sha256(path: Path) -> str:
    return _hash_file(path)["sha256"]


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """The bytes of a compressed npz holding ``arrays`` (in the given key order), reproducibly.

    ``np.savez_compressed`` stamps each zip member with the current local time, so two builds a
    few seconds apart differ; here every member gets a fixed date, mode and creator system.
    ``np.load`` reads the result like any npz.  (Byte identity across machines also assumes the
    same zlib deflate output, true for the same zlib version.)
    """
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=_ZIP_LEVEL) as zf:
        for key, arr in arrays.items():
            arr = np.ascontiguousarray(arr)
            if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and sys.byteorder == "big"):
                arr = arr.astype(arr.dtype.newbyteorder("<"))
            member = io.BytesIO()
            np.lib.format.write_array(member, arr, allow_pickle=False)
            info = zipfile.ZipInfo(key + ".npy", date_time=_ZIP_DATE_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3
            info.external_attr = 0o644 << 16
            zf.writestr(info, member.getvalue(), compresslevel=_ZIP_LEVEL)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# idx format (MNIST, Fashion-MNIST, EMNIST)
# --------------------------------------------------------------------------------------------------
_IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_IDX_CODES = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (``.gz`` or uncompressed, told apart by the gzip magic) into a numpy array."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an idx file (magic {data[:4].hex()})")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES or not 1 <= ndim <= 4:
        raise ValueError(f"{path}: unsupported idx type 0x{code:02x} / ndim {ndim}")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    offset = 4 + 4 * ndim
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) != offset + count * dtype.itemsize:
        raise ValueError(f"{path}: size {len(data)} does not match header shape {shape}")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def idx_bytes(arr: np.ndarray) -> bytes:
    """The uncompressed idx encoding of a uint8 (or int8) array, as in the official files."""
    arr = np.ascontiguousarray(arr)
    if arr.dtype not in _IDX_CODES:
        raise TypeError(f"idx_bytes supports uint8/int8 arrays, got {arr.dtype}")
    header = bytes([0, 0, _IDX_CODES[arr.dtype], arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    return header + arr.tobytes()


def _gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=9, mtime=0)


def _find_idx(folder: Path, name: str) -> Path:
    """The uncompressed idx file if present, else its ``.gz``."""
    for candidate in (folder / name, folder / (name + ".gz")):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"neither {folder / name} nor {folder / name}.gz exists")


# --------------------------------------------------------------------------------------------------
# build / verify
# --------------------------------------------------------------------------------------------------
def _first_per_class(y: np.ndarray, n: int, n_classes: int = 10) -> np.ndarray:
    """Positions of the first ``n`` examples of each class, merged back into the original order."""
    y = np.asarray(y)
    picks = []
    for c in range(n_classes):
        where = np.flatnonzero(y == c)[:n]
        if len(where) < n:
            raise ValueError(f"class {c} has only {len(where)} examples, {n} needed")
        picks.append(where)
    return np.sort(np.concatenate(picks))


def _source_paths(name: str, source_root: Path) -> list[Path]:
    spec = _SPECS[name]
    if spec["kind"] == "idx":
        folder = source_root / spec["folder"] / "raw"
        return [_find_idx(folder, _IDX_FILES[key]) for key in
                (("train", "x"), ("train", "y"), ("test", "x"), ("test", "y"))]
    path = source_root / spec["source"]
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return [path]


def _select(name: str, source_root: Path) -> tuple[dict, list[Path]]:
    spec = _SPECS[name]
    paths = _source_paths(name, source_root)
    out: dict[str, np.ndarray] = {}
    if spec["kind"] == "idx":
        arrays = dict(zip((("train", "x"), ("train", "y"), ("test", "x"), ("test", "y")),
                          (read_idx(p) for p in paths)))
        for split in ("train", "test"):
            x, y = arrays[(split, "x")], arrays[(split, "y")]
            if x.dtype != np.uint8 or x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
                raise ValueError(f"{name} {split}: unexpected idx shapes {x.shape} / {y.shape}")
            pos = _first_per_class(y, spec["per_class"][split])
            out[f"{split}_x"] = np.ascontiguousarray(x[pos])
            out[f"{split}_y"] = y[pos].astype(np.int64)
            out[f"{split}_index"] = pos.astype(np.int64)
    else:
        with np.load(paths[0], allow_pickle=False) as src:
            for split in ("train", "test"):
                x, y, index = src[f"{split}_x"], src[f"{split}_y"], src[f"{split}_index"]
                pos = _first_per_class(y, spec["per_class"][split])
                out[f"{split}_x"] = np.ascontiguousarray(x[pos])
                out[f"{split}_y"] = y[pos].astype(np.int64)
                out[f"{split}_index"] = index[pos].astype(np.int64)
    return out, paths


def _counts(arrays: Mapping[str, np.ndarray]) -> dict:
    return {split: {"n": int(len(arrays[f"{split}_y"])),
                    "per_class": np.bincount(arrays[f"{split}_y"], minlength=10).astype(int).tolist()}
            for split in ("train", "test")}


def _selection_rule(name: str) -> str:
    spec = _SPECS[name]
    tr, te = spec["per_class"]["train"], spec["per_class"]["test"]
    if spec["kind"] == "idx":
        where = "of the official training and test files (official order)"
    else:
        where = ("of the CIFAR-10 subset's training and test arrays (the subset holds the first 4,000 "
                 "training and first 1,000 test images in official order)")
    return (f"For each class 0-9, the first {tr} training and the first {te} test examples {where}; "
            f"kept in their original order; *_index is the index in the official split.")


def build(source_root: str | os.PathLike | None = None,
          dest: str | os.PathLike = SAMPLES_DIR) -> dict:
    """Build ``mnist.npz``, ``fashion_mnist.npz``, ``cifar10.npz`` and ``MANIFEST.json`` in ``dest``.

    ``source_root`` (default ``$KDNB_DATA``) holds ``MNIST/raw/``, ``FashionMNIST/raw/`` (idx files,
    uncompressed or ``.gz``) and ``cifar10-subset/cifar10_subset.npz``.  The output is byte-for-byte
    reproducible.  Returns the manifest (also written to ``dest/MANIFEST.json``).
    """
    if source_root is None:
        source_root = os.environ.get("KDNB_DATA")
        if not source_root:
            raise ValueError("build() needs source_root (or $KDNB_DATA) pointing at the real datasets")
    source_root = Path(source_root)
    dest = Path(dest)
    manifest: dict = {
        "description": "Small real samples shipped with kdnb for offline smoke runs; "
                       "built by `python -m kdnb.samples build --source <datasets>`.",
        "format": "npz (zip, deflate level 9, fixed member timestamps); keys train_x, train_y (int64), "
                  "train_index (int64, index in the official split), test_x, test_y, test_index",
        "samples": {},
    }
    outputs: dict[str, bytes] = {}
    for name in SAMPLE_NAMES:
        spec = _SPECS[name]
        arrays, paths = _select(name, source_root)
        data = _npz_bytes(arrays)
        outputs[spec["file"]] = data
        manifest["samples"][name] = {
            "file": spec["file"],
            "sha256": digest(data, algo="sha256"),
            "bytes": len(data),
            "shapes": {k: list(v.shape) for k, v in arrays.items()},
            "dtypes": {k: str(v.dtype) for k, v in arrays.items()},
            "counts": _counts(arrays),
            "classes": spec["classes"],
            "selection": _selection_rule(name),
            "sources": [{"file": p.relative_to(source_root).as_posix(), **_hash_file(p)} for p in paths],
            "licence": spec["licence"],
            "citation": spec["citation"],
        }
    for fname, data in outputs.items():
        atomic_write_bytes(dest / fname, data)
    atomic_write_bytes(dest / MANIFEST_NAME, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return manifest


def _read_manifest(root: Path) -> dict:
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; run `python -m kdnb.samples build --source <datasets>`")
    return json.loads(path.read_text())


def verify(root: str | os.PathLike = SAMPLES_DIR) -> list[str]:
    """Recompute the sha256 of each shipped sample; return a list of problems (empty when all match)."""
    root = Path(root)
    problems = []
    manifest = _read_manifest(root)
    for name, entry in sorted(manifest["samples"].items()):
        path = root / entry["file"]
        if not path.is_file():
            problems.append(f"{name}: {path} is missing")
            continue
        got = _sha256(path)
        if got != entry["sha256"]:
            problems.append(f"{name}: sha256 of {path} is {got}, MANIFEST.json says {entry['sha256']}")
    return problems


def load_sample(name: str, *, root: str | os.PathLike = SAMPLES_DIR) -> dict[str, np.ndarray]:
    """The shipped sample ``name`` ('mnist', 'fashion_mnist' or 'cifar10') as a dict of numpy arrays."""
    if name not in SAMPLE_NAMES:
        raise ValueError(f"unknown sample {name!r}; allowed values are {', '.join(map(repr, SAMPLE_NAMES))}")
    path = Path(root) / _SPECS[name]["file"]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; run `python -m kdnb.samples build --source <datasets>`")
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def write_idx_layout(name: str, root: str | os.PathLike) -> Path:
    """Write sample ``name`` ('mnist' or 'fashion_mnist') as the four official idx files.

    They go to ``root/MNIST/raw/`` or ``root/FashionMNIST/raw/``, uncompressed and ``.gz`` (gzip
    mtime 0), so ``torchvision.datasets.MNIST(root, download=False)`` / ``FashionMNIST`` read the
    sample back.  Files that already exist with the right size are left alone.  Returns ``Path(root)``.
    """
    if name not in _IDX_FOLDER:
        raise ValueError(f"write_idx_layout: unknown sample {name!r}; allowed values are "
                         f"{', '.join(map(repr, _IDX_FOLDER))}")
    root = Path(root)
    raw = root / _IDX_FOLDER[name] / "raw"
    sample = load_sample(name)
    for (split, part), fname in _IDX_FILES.items():
        arr = sample[f"{split}_{part}"]
        data = idx_bytes(arr if part == "x" else arr.astype(np.uint8))
        for path, payload in ((raw / fname, data), (raw / (fname + ".gz"), None)):
            if payload is None:
                payload = _gzip_bytes(data)
            if path.is_file() and path.stat().st_size == len(payload):
                continue
            atomic_write_bytes(path, payload)
    return root


# --------------------------------------------------------------------------------------------------
# synthetic EMNIST letters
# --------------------------------------------------------------------------------------------------
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_GLYPHS_CACHE: list | None = None


def _glyphs():
    """Cropped high-resolution 'L' images of the capitals A-Z in PIL's default font."""
    global _GLYPHS_CACHE
    if _GLYPHS_CACHE is None:
        from PIL import Image, ImageDraw, ImageFont, features

        if features.check("freetype2"):
            font, canvas, scale_up = ImageFont.load_default(size=48), 96, 1
        else:  # tiny bitmap font: render small, scale up
            font, canvas, scale_up = ImageFont.load_default(), 24, 4
        glyphs = []
        for ch in _LETTERS:
            img = Image.new("L", (canvas, canvas), 0)
            ImageDraw.Draw(img).text((canvas // 8, canvas // 8), ch, fill=255, font=font)
            img = img.crop(img.getbbox())
            if scale_up != 1:
                img = img.resize((img.width * scale_up, img.height * scale_up), Image.Resampling.NEAREST)
            glyphs.append(img)
        _GLYPHS_CACHE = glyphs
    return _GLYPHS_CACHE


def synthetic_letters(n_per_class: int, *, seed: int = 0, split: str = "train"
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Upright 28x28 renderings of A-Z with seeded random thickness, rotation, scale, shift and noise.

    Returns ``(images, labels)``: ``images`` (26*n, 28, 28) uint8, white letter on black like EMNIST,
    **not** transposed; ``labels`` int64 in 1..26 (A=1), shuffled.  The same arguments give the same
    arrays; ``split`` ('train' or 'test') selects an independent random stream.
    """
    from PIL import Image, ImageFilter

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = np.random.default_rng([int(seed), 0 if split == "train" else 1])
    labels = np.repeat(np.arange(1, 27, dtype=np.int64), n_per_class)
    labels = labels[rng.permutation(len(labels))]
    glyphs = _glyphs()
    images = np.zeros((len(labels), 28, 28), dtype=np.uint8)
    for i, label in enumerate(labels):
        g = glyphs[label - 1]
        thick = int(rng.integers(0, 3))          # 0: as drawn, 1: 3x3 dilation, 2: 5x5 dilation
        if thick:
            g = g.filter(ImageFilter.MaxFilter(2 * thick + 1))
        g = g.rotate(float(rng.uniform(-12, 12)), resample=Image.Resampling.BILINEAR, expand=True)
        box = float(rng.uniform(14, 21))         # letters fill ~20x20 of 28x28 in EMNIST
        s = box / max(g.width, g.height)
        w, h = max(1, round(g.width * s)), max(1, round(g.height * s))
        g = g.resize((w, h), Image.Resampling.LANCZOS)
        canvas = Image.new("L", (28, 28), 0)
        x0 = (28 - w) // 2 + int(rng.integers(-2, 3))
        y0 = (28 - h) // 2 + int(rng.integers(-2, 3))
        canvas.paste(g, (min(max(x0, 0), 28 - w), min(max(y0, 0), 28 - h)))
        a = np.asarray(canvas, dtype=np.float32) * float(rng.uniform(0.75, 1.0))
        a += rng.normal(0.0, 12.0, size=a.shape).astype(np.float32)
        images[i] = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    return images, labels


def write_synthetic_emnist(root: str | os.PathLike, *, n_train_per_class: int = 100,
                           n_test_per_class: int = 10, seed: int = 0) -> Path:
    """Write a synthetic EMNIST 'letters' split in torchvision's raw layout.

    Files: ``root/EMNIST/raw/emnist-letters-{train,test}-{images-idx3,labels-idx1}-ubyte``
    (uncompressed, the names ``torchvision.datasets.EMNIST`` checks and reads).  Labels are 1..26 as in
    the real file; images are stored transposed as real EMNIST is (``torchvision`` returns them
    as stored: transpose back to see upright letters).  Images come from :func:`synthetic_letters`
    with the same seed.  A stamp file ``.kdnb-synthetic.json`` records the arguments; when it matches
    and the four files have the expected sizes nothing is rewritten.  Returns ``Path(root)``.
    """
    root = Path(root)
    raw = root / "EMNIST" / "raw"
    stamp = raw / ".kdnb-synthetic.json"
    params = json.dumps({"generator": "kdnb.samples.synthetic_letters", "version": 1, "seed": int(seed),
                         "n_train_per_class": int(n_train_per_class),
                         "n_test_per_class": int(n_test_per_class)}, sort_keys=True)
    sizes = {}
    for split, n in (("train", n_train_per_class), ("test", n_test_per_class)):
        sizes[raw / f"emnist-letters-{split}-images-idx3-ubyte"] = 16 + 26 * n * 28 * 28
        sizes[raw / f"emnist-letters-{split}-labels-idx1-ubyte"] = 8 + 26 * n
    if (stamp.is_file() and stamp.read_text() == params
            and all(p.is_file() and p.stat().st_size == size for p, size in sizes.items())):
        return root
    for split, n in (("train", n_train_per_class), ("test", n_test_per_class)):
        images, labels = synthetic_letters(n, seed=seed, split=split)
        stored = np.ascontiguousarray(images.transpose(0, 2, 1))
        atomic_write_bytes(raw / f"emnist-letters-{split}-images-idx3-ubyte", idx_bytes(stored))
        atomic_write_bytes(raw / f"emnist-letters-{split}-labels-idx1-ubyte", idx_bytes(labels.astype(np.uint8)))
    atomic_write_bytes(stamp, params.encode())
    return root


# --------------------------------------------------------------------------------------------------
# synthetic PASCAL VOC 2012 segmentation
# --------------------------------------------------------------------------------------------------
def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map (``n`` x 3 uint8): bits of the index spread over R, G, B.

    Index 0 is black (background), 1 (aeroplane) is (128, 0, 0), 255 (void) is (224, 224, 192).
    """
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


def _class_colours() -> np.ndarray:
    """A distinct saturated RGB colour per class 1..20 (hues evenly spaced); index 0 unused."""
    import colorsys

    out = np.zeros((21, 3), dtype=np.float32)
    for c in range(1, 21):
        r, g, b = colorsys.hsv_to_rgb((c - 1) / 20.0, 0.85, 0.9 if c % 2 else 0.65)
        out[c] = (255 * r, 255 * g, 255 * b)
    return out


def write_synthetic_voc(root: str | os.PathLike, *, n_train: int = 8, n_val: int = 4,
                        size: tuple[int, int] = (64, 48), seed: int = 0) -> Path:
    """Write a synthetic PASCAL VOC 2012 segmentation set in torchvision's layout.

    ``root/VOCdevkit/VOC2012/{JPEGImages/<stem>.jpg, SegmentationClass/<stem>.png,
    ImageSets/Segmentation/{train,val}.txt}`` with stems ``2012_000001``, ... (train first).  ``size``
    is (width, height).  Each mask is a palette PNG with :func:`voc_palette`: 1-3 random filled
    rectangles / ellipses of classes 1..20 on background 0, each outlined by a 2-pixel void border
    (255) as in real VOC masks.  In the JPEG each object is painted in its class's own colour (plus
    noise) on a grey textured background, so the classes are learnable.  Returns ``Path(root)``.
    """
    from PIL import Image, ImageDraw

    root = Path(root)
    voc = root / "VOCdevkit" / "VOC2012"
    width, height = int(size[0]), int(size[1])
    if width < 16 or height < 16:
        raise ValueError(f"size must be at least 16x16, got {size}")
    rng = np.random.default_rng(seed)
    palette = voc_palette().reshape(-1).tolist()
    colours = _class_colours()
    stems = [f"2012_{i:06d}" for i in range(1, n_train + n_val + 1)]
    for stem in stems:
        mask = Image.new("L", (width, height), 0)
        mdraw = ImageDraw.Draw(mask)
        # background: smooth grey gradient, low saturation
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        base = float(rng.uniform(70, 150))
        gx, gy = rng.uniform(-0.6, 0.6, size=2)
        img = np.repeat((base + gx * xx + gy * yy)[..., None], 3, axis=2)
        for _ in range(int(rng.integers(1, 4))):
            cls = int(rng.integers(1, 21))
            w = int(rng.integers(max(8, width // 5), max(9, int(width * 0.6)) + 1))
            h = int(rng.integers(max(8, height // 5), max(9, int(height * 0.6)) + 1))
            x0 = int(rng.integers(0, width - w + 1))
            y0 = int(rng.integers(0, height - h + 1))
            box = [x0, y0, x0 + w - 1, y0 + h - 1]
            ellipse = bool(rng.integers(0, 2))
            shape = Image.new("L", (width, height), 0)
            sdraw = ImageDraw.Draw(shape)
            (sdraw.ellipse if ellipse else sdraw.rectangle)(box, fill=1)
            inside = np.asarray(shape, dtype=bool)
            img[inside] = colours[cls] * float(rng.uniform(0.85, 1.1))
            (mdraw.ellipse if ellipse else mdraw.rectangle)(box, fill=cls, outline=255, width=2)
        img += rng.normal(0.0, 10.0, size=img.shape)
        rgb = Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")
        (voc / "JPEGImages").mkdir(parents=True, exist_ok=True)
        rgb.save(voc / "JPEGImages" / f"{stem}.jpg", quality=95)
        pmask = Image.frombytes("P", mask.size, mask.tobytes())
        pmask.putpalette(palette)
        (voc / "SegmentationClass").mkdir(parents=True, exist_ok=True)
        pmask.save(voc / "SegmentationClass" / f"{stem}.png")
    sets = voc / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    (sets / "train.txt").write_text("".join(s + "\n" for s in stems[:n_train]))
    (sets / "val.txt").write_text("".join(s + "\n" for s in stems[n_train:]))
    (sets / "trainval.txt").write_text("".join(s + "\n" for s in stems))
    return root


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------
def _human(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdnb.samples", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_build = sub.add_parser("build", help="rebuild the shipped samples from the real datasets")
    p_build.add_argument("--source", default=os.environ.get("KDNB_DATA"),
                         help="folder with MNIST/raw, FashionMNIST/raw, cifar10-subset/ (default $KDNB_DATA)")
    p_build.add_argument("--dest", default=str(SAMPLES_DIR), help="output folder (default: %(default)s)")
    p_verify = sub.add_parser("verify", help="check the shipped samples against MANIFEST.json")
    p_verify.add_argument("--dest", default=str(SAMPLES_DIR), help="samples folder (default: %(default)s)")
    args = parser.parse_args(argv)

    if args.cmd == "build":
        if not args.source:
            parser.error("build needs --source (or $KDNB_DATA)")
        try:
            manifest = build(args.source, args.dest)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        total = 0
        for name, entry in manifest["samples"].items():
            total += entry["bytes"]
            c = entry["counts"]
            print(f"{entry['file']:<18} {_human(entry['bytes']):>9}  train {c['train']['n']:>5}  "
                  f"test {c['test']['n']:>5}  sha256 {entry['sha256'][:16]}...")
        print(f"total {_human(total)} in {args.dest}")
        return 0

    try:
        problems = verify(args.dest)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if problems:
        print("kdnb samples do NOT match MANIFEST.json:", file=sys.stderr)
        for p in problems:
            print("  " + p, file=sys.stderr)
        print("rebuild with `python -m kdnb.samples build --source <datasets>`", file=sys.stderr)
        return 1
    print(f"ok: all samples in {args.dest} match MANIFEST.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
