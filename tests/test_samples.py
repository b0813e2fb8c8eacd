"""Tests of kdnb.samples: shipped real samples, idx round-trips, synthetic EMNIST and VOC layouts."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kdnb import samples

EXPECTED = {  # name: (train per class, test per class, image shape)
    "mnist": (200, 100, (28, 28)),
    "fashion_mnist": (200, 50, (28, 28)),
    "cifar10": (50, 25, (32, 32, 3)),
}


def _manifest() -> dict:
    return json.loads((samples.SAMPLES_DIR / "MANIFEST.json").read_text())


# --------------------------------------------------------------------------------------------------
# shipped samples
# --------------------------------------------------------------------------------------------------
def test_shipped_files_match_manifest_sha256():
    manifest = _manifest()
    assert set(manifest["samples"]) == set(samples.SAMPLE_NAMES)
    for name, entry in manifest["samples"].items():
        path = samples.SAMPLES_DIR / entry["file"]
        assert path.is_file(), path
        assert samples._sha256(path) == entry["sha256"], name
        assert path.stat().st_size == entry["bytes"]
        assert entry["sources"] and all(len(s["sha256"]) == 64 and len(s["md5"]) == 32 for s in entry["sources"])
        assert entry["licence"] and entry["citation"] and entry["selection"]
    assert samples.verify() == []
    total = sum(p.stat().st_size for p in samples.SAMPLES_DIR.iterdir())
    assert total < 6_000_000, f"shipped samples grew to {total} bytes"


def test_verify_cli_flags_a_mismatch(tmp_path, capsys):
    for p in samples.SAMPLES_DIR.iterdir():
        shutil.copy(p, tmp_path / p.name)
    assert samples.main(["verify", "--dest", str(tmp_path)]) == 0
    data = bytearray((tmp_path / "mnist.npz").read_bytes())
    data[-100] ^= 0xFF
    (tmp_path / "mnist.npz").write_bytes(bytes(data))
    assert samples.main(["verify", "--dest", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "mnist" in err and "do NOT match" in err
    (tmp_path / "cifar10.npz").unlink()
    assert any("missing" in p for p in samples.verify(tmp_path))


def test_verify_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "kdnb.samples", "verify"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout


@pytest.mark.parametrize("name", samples.SAMPLE_NAMES)
def test_sample_counts_per_class(name):
    n_train, n_test, shape = EXPECTED[name]
    d = samples.load_sample(name)
    assert set(d) == {"train_x", "train_y", "train_index", "test_x", "test_y", "test_index"}
    entry = _manifest()["samples"][name]
    for split, n in (("train", n_train), ("test", n_test)):
        x, y, idx = d[f"{split}_x"], d[f"{split}_y"], d[f"{split}_index"]
        assert x.dtype == np.uint8 and x.shape == (10 * n, *shape)
        assert y.dtype == np.int64 and idx.dtype == np.int64
        assert np.bincount(y, minlength=10).tolist() == [n] * 10
        assert np.all(np.diff(idx) > 0), "kept in official order, no duplicates"
        assert entry["counts"][split] == {"n": 10 * n, "per_class": [n] * 10}
        assert x.std() > 20, "real images, not blanks"


def test_load_sample_rejects_unknown_name():
    with pytest.raises(ValueError, match=r"'svhn'.*'mnist'.*'fashion_mnist'.*'cifar10'"):
        samples.load_sample("svhn")


# --------------------------------------------------------------------------------------------------
# idx layout round-trip through torchvision
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, cls_name", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_write_idx_layout_roundtrips_through_torchvision(tmp_path, name, cls_name):
    import torchvision

    root = samples.write_idx_layout(name, tmp_path)
    assert Path(root) == tmp_path
    raw = tmp_path / cls_name / "raw"
    d = samples.load_sample(name)
    for split, stem in (("train", "train"), ("test", "t10k")):
        ds = getattr(torchvision.datasets, cls_name)(tmp_path, train=split == "train", download=False)
        np.testing.assert_array_equal(ds.data.numpy(), d[f"{split}_x"])
        np.testing.assert_array_equal(ds.targets.numpy(), d[f"{split}_y"])
        img, target = ds[0]
        assert np.array_equal(np.asarray(img), d[f"{split}_x"][0]) and target == d[f"{split}_y"][0]
        for kind in ("images-idx3", "labels-idx1"):
            plain = raw / f"{stem}-{kind}-ubyte"
            assert gzip.decompress((raw / (plain.name + ".gz")).read_bytes()) == plain.read_bytes()
            np.testing.assert_array_equal(samples.read_idx(plain), samples.read_idx(str(plain) + ".gz"))
    # idempotent: a second call leaves the files untouched
    stamps = {p.name: p.stat().st_mtime_ns for p in raw.iterdir()}
    assert len(stamps) == 8
    samples.write_idx_layout(name, tmp_path)
    assert {p.name: p.stat().st_mtime_ns for p in raw.iterdir()} == stamps


def test_write_idx_layout_rejects_cifar(tmp_path):
    with pytest.raises(ValueError, match="cifar10"):
        samples.write_idx_layout("cifar10", tmp_path)


# --------------------------------------------------------------------------------------------------
# synthetic EMNIST letters
# --------------------------------------------------------------------------------------------------
def test_synthetic_emnist_reads_through_torchvision(tmp_path):
    import torchvision

    n_train, n_test = 40, 10
    samples.write_synthetic_emnist(tmp_path, n_train_per_class=n_train, n_test_per_class=n_test, seed=3)
    raw = tmp_path / "EMNIST" / "raw"
    assert sorted(p.name for p in raw.glob("emnist-*")) == sorted(
        f"emnist-letters-{s}-{k}-ubyte" for s in ("train", "test") for k in ("images-idx3", "labels-idx1"))
    # idempotent for the same arguments, rewritten for others
    stamps = {p.name: p.stat().st_mtime_ns for p in raw.iterdir()}
    samples.write_synthetic_emnist(tmp_path, n_train_per_class=n_train, n_test_per_class=n_test, seed=3)
    assert {p.name: p.stat().st_mtime_ns for p in raw.iterdir()} == stamps
    samples.write_synthetic_emnist(tmp_path, n_train_per_class=n_train, n_test_per_class=n_test, seed=4)
    samples.write_synthetic_emnist(tmp_path, n_train_per_class=n_train, n_test_per_class=n_test, seed=3)
    for train, n in ((True, n_train), (False, n_test)):
        ds = torchvision.datasets.EMNIST(tmp_path, split="letters", train=train, download=False)
        assert len(ds) == 26 * n
        labels, counts = np.unique(ds.targets.numpy(), return_counts=True)
        assert labels.tolist() == list(range(1, 27)) and counts.tolist() == [n] * 26
        assert ds.classes[1] == "a" and len(ds.classes) == 27  # torchvision: 'N/A' + a..z
        images, rendered_labels = samples.synthetic_letters(n, seed=3, split="train" if train else "test")
        # stored transposed, as real EMNIST: transposing back gives the rendered (upright) letter
        np.testing.assert_array_equal(ds.data.numpy().transpose(0, 2, 1), images)
        np.testing.assert_array_equal(ds.targets.numpy(), rendered_labels)
        assert not np.array_equal(ds.data.numpy(), images)


def test_synthetic_letters_are_learnable_and_seeded():
    x_tr, y_tr = samples.synthetic_letters(30, seed=0, split="train")
    x_te, y_te = samples.synthetic_letters(10, seed=0, split="test")
    again, _ = samples.synthetic_letters(30, seed=0, split="train")
    other, _ = samples.synthetic_letters(30, seed=1, split="train")
    assert np.array_equal(x_tr, again) and not np.array_equal(x_tr, other)
    assert not np.array_equal(x_tr[: len(x_te)], x_te)
    # nearest class mean on raw pixels must be far above chance (1/26)
    f_tr = x_tr.reshape(len(x_tr), -1).astype(np.float32)
    f_te = x_te.reshape(len(x_te), -1).astype(np.float32)
    means = np.stack([f_tr[y_tr == c].mean(0) for c in range(1, 27)])
    pred = 1 + np.argmin(((f_te[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    assert (pred == y_te).mean() > 0.4


# --------------------------------------------------------------------------------------------------
# synthetic PASCAL VOC
# --------------------------------------------------------------------------------------------------
def test_voc_palette_is_the_standard_colormap():
    pal = samples.voc_palette()
    assert pal.shape == (256, 3) and pal.dtype == np.uint8
    assert pal[0].tolist() == [0, 0, 0]
    assert pal[1].tolist() == [128, 0, 0]
    assert pal[2].tolist() == [0, 128, 0]
    assert pal[15].tolist() == [192, 128, 128]  # person
    assert pal[20].tolist() == [0, 64, 128]  # tvmonitor
    assert pal[255].tolist() == [224, 224, 192]  # void
    assert len({tuple(c) for c in pal}) == 256


@pytest.mark.data
def test_voc_palette_matches_a_real_mask():
    from PIL import Image

    data = os.environ.get("KDNB_DATA")
    if not data:
        pytest.skip("KDNB_DATA is not set: no real VOC mask to compare the palette with")
    folder = Path(data) / "VOC2012-sample" / "VOCdevkit" / "VOC2012" / "SegmentationClass"
    masks = sorted(folder.glob("*.png"))
    if not masks:
        pytest.skip(f"KDNB_DATA={data} lacks {folder}/*.png (real VOC masks)")
    real = np.asarray(Image.open(masks[0]).getpalette(), dtype=np.uint8).reshape(-1, 3)
    np.testing.assert_array_equal(real, samples.voc_palette()[: len(real)])


def test_synthetic_voc_reads_through_torchvision(tmp_path):
    import torchvision

    samples.write_synthetic_voc(tmp_path, n_train=8, n_val=4, size=(64, 48), seed=0)
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    train = (voc / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    val = (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    assert train[0] == "2012_000001" and len(train) == 8 and len(val) == 4 and not set(train) & set(val)
    pal = samples.voc_palette()
    colour_sums: dict[int, list] = {}
    for image_set, n in (("train", 8), ("val", 4)):
        ds = torchvision.datasets.VOCSegmentation(tmp_path, year="2012", image_set=image_set, download=False)
        assert len(ds) == n
        for i in range(n):
            img, mask = ds[i]
            assert img.mode == "RGB" and img.size == (64, 48) and mask.size == (64, 48)
            assert mask.mode == "P"
            np.testing.assert_array_equal(np.asarray(mask.getpalette(), np.uint8).reshape(-1, 3), pal)
            m, rgb = np.asarray(mask), np.asarray(img, dtype=np.float64)
            values = set(np.unique(m).tolist())
            assert 255 in values and 0 in values
            assert values <= set(range(21)) | {255}
            assert values & set(range(1, 21)), "at least one object"
            for c in values - {0, 255}:
                colour_sums.setdefault(c, []).append(rgb[m == c].mean(0))
    # the image colour inside an object tells its class: objects of different classes differ in colour
    means = {c: np.mean(v, axis=0) for c, v in colour_sums.items()}
    classes = sorted(means)
    assert len(classes) >= 3
    gaps = [np.abs(means[a] - means[b]).max() for a in classes for b in classes if a < b]
    assert min(gaps) > 15


def test_synthetic_voc_is_seeded(tmp_path):
    a, b = samples.write_synthetic_voc(tmp_path / "a", seed=5), samples.write_synthetic_voc(tmp_path / "b", seed=5)
    rel = "VOCdevkit/VOC2012/SegmentationClass/2012_000003.png"
    assert (a / rel).read_bytes() == (b / rel).read_bytes()


# --------------------------------------------------------------------------------------------------
# rebuilding from the real datasets
# --------------------------------------------------------------------------------------------------
def _data_root_or_skip() -> Path:
    data = os.environ.get("KDNB_DATA")
    if not data:
        pytest.skip("KDNB_DATA is not set: cannot rebuild the samples from the real datasets")
    root = Path(data)
    for folder, names in (("MNIST/raw", ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                          "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")),
                          ("FashionMNIST/raw", ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))):
        for n in names:
            p = root / folder / n
            if not (p.is_file() or p.with_name(n + ".gz").is_file()):
                pytest.skip(f"KDNB_DATA={data} lacks {folder}/{n} (or .gz)")
    if not (root / "cifar10-subset" / "cifar10_subset.npz").is_file():
        pytest.skip(f"KDNB_DATA={data} lacks cifar10-subset/cifar10_subset.npz")
    return root


@pytest.mark.data
def test_build_reproduces_shipped_files(tmp_path):
    root = _data_root_or_skip()
    manifest = samples.build(root, tmp_path)
    shipped = _manifest()
    for name, entry in shipped["samples"].items():
        built = (tmp_path / entry["file"]).read_bytes()
        assert built == (samples.SAMPLES_DIR / entry["file"]).read_bytes(), (
            f"{entry['file']} rebuilt from {root} differs from the shipped file")
        assert manifest["samples"][name]["sha256"] == entry["sha256"]
        assert manifest["samples"][name]["counts"] == entry["counts"]
    if all([s["file"] for s in manifest["samples"][n]["sources"]] == [s["file"] for s in e["sources"]]
           for n, e in shipped["samples"].items()):
        assert (tmp_path / "MANIFEST.json").read_bytes() == (samples.SAMPLES_DIR / "MANIFEST.json").read_bytes()
    # the selection really is "first n per class" of the official files, at the recorded indices
    y = samples.read_idx(samples._find_idx(root / "MNIST" / "raw", "train-labels-idx1-ubyte"))
    d = samples.load_sample("mnist")
    np.testing.assert_array_equal(y[d["train_index"]], d["train_y"])
    expected = np.sort(np.concatenate([np.flatnonzero(y == c)[:200] for c in range(10)]))
    np.testing.assert_array_equal(d["train_index"], expected)
    with np.load(root / "cifar10-subset" / "cifar10_subset.npz") as src:
        c = samples.load_sample("cifar10")
        pos = np.searchsorted(src["test_index"], c["test_index"])
        np.testing.assert_array_equal(src["test_x"][pos], c["test_x"])
