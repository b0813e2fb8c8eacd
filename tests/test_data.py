import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from kdnb import data, samples
from conftest import real_data_root


def test_sample_goes_through_torchvision_reader():
    tr = data.load("mnist", "train", source="sample")
    te = data.load("mnist", "test", source="sample")
    assert tr.x.dtype == torch.uint8 and tr.x.shape == (2000, 28, 28) and len(te) == 1000
    assert torch.bincount(tr.y).tolist() == [200] * 10
    s = samples.load_sample("mnist")
    assert torch.equal(tr.x, torch.from_numpy(s["train_x"]))


def test_cifar_sample_and_fashion_sample():
    c = data.load("cifar10", "train", source="sample")
    assert c.x.shape == (500, 32, 32, 3) and c.x.dtype == torch.uint8
    f = data.load("fashion_mnist", "test", source="sample")
    assert f.x.shape == (500, 28, 28)


def test_missing_data_names_dataset_paths_and_how(tmp_path, monkeypatch):
    monkeypatch.delenv("KDNB_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(data.DataNotFoundError) as e:
        data.load("mnist", data_dir=tmp_path / "nowhere")
    msg = str(e.value)
    assert "'mnist'" in msg and str(tmp_path / "nowhere") in msg and "data" in msg and "download=True" in msg
    with pytest.raises(data.DataNotFoundError, match="cifar10_subset.npz"):
        data.load("cifar10", source="subset", data_dir=tmp_path)
    with pytest.raises(data.DataNotFoundError, match="dataset-fashion-mnist"):
        data.load("fashion_mnist", data_dir=tmp_path)


def test_resolver_order(tmp_path, monkeypatch):
    monkeypatch.setenv("KDNB_DATA", str(tmp_path / "env"))
    roots = data.candidate_roots("fashion_mnist", tmp_path / "param")
    assert roots[:3] == [tmp_path / "param", tmp_path / "env", data.REPO_DATA]
    assert roots[3] == data.DEBIAN_FASHION_MNIST
    assert data.DEBIAN_FASHION_MNIST not in data.candidate_roots("mnist")


def test_default_data_folder_is_the_repositorys_wherever_the_process_runs(tmp_path, monkeypatch):
    """Jupyter and kdnb run work in notebooks/: `./data` there was never the checkout's data/ (issue 15, item 6)."""
    monkeypatch.delenv("KDNB_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    assert data.candidate_roots("mnist") == [Path(__file__).resolve().parent.parent / "data"]
    assert data.candidate_roots("mnist", cwd=tmp_path / "elsewhere") == [data.REPO_DATA]


def test_missing_data_lists_absolute_folders(tmp_path, monkeypatch):
    monkeypatch.delenv("KDNB_DATA", raising=False)
    monkeypatch.setattr(data, "REPO_DATA", tmp_path / "checkout" / "data")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(data.DataNotFoundError) as e:
        data.require("mnist", "real", "relative/datasets")
    assert f"  - {tmp_path / 'relative' / 'datasets'}\n  - {tmp_path / 'checkout' / 'data'}\n" in str(e.value)


def test_gitignore_covers_a_symlinked_data_folder(tmp_path):
    import shutil
    import subprocess

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = Path(__file__).resolve().parent.parent
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    shutil.copy(repo / ".gitignore", tmp_path / ".gitignore")
    (tmp_path / "datasets").mkdir()
    (tmp_path / "data").symlink_to(tmp_path / "datasets")  # `ln -s /big/disk/datasets data`, as users do
    ignored = subprocess.run(["git", "-C", str(tmp_path), "check-ignore", "-q", "data"])
    assert ignored.returncode == 0, ".gitignore does not cover a symlink named data (write /data, not /data/)"


def test_real_path_offline_from_idx_files_written_here(tmp_path):
    """torchvision's real MNIST reader on idx files the project writes (the download path, offline)."""
    samples.write_idx_layout("mnist", tmp_path)
    split = data.load("mnist", "train", data_dir=tmp_path)
    assert split.source == "real" and len(split) == 2000


def _flat_gz_layout(name: str, tmp_path: Path) -> Path:
    """The sample's four .gz idx files alone in one folder, as Debian ships Fashion-MNIST."""
    src = samples.write_idx_layout(name, tmp_path / "tv")
    flat = tmp_path / "flat"
    flat.mkdir()
    for gz in (src / data._IDX[name][0] / "raw").glob("*.gz"):
        shutil.copy(gz, flat / gz.name)
    return flat


def test_gz_only_layouts_are_decompressed(tmp_path):
    """Debian ships Fashion-MNIST as flat .gz files; torchvision wants the uncompressed idx files."""
    flat = _flat_gz_layout("fashion_mnist", tmp_path)
    split = data.load("fashion_mnist", "test", data_dir=flat)
    assert len(split) == 500
    assert torch.equal(split.x, torch.from_numpy(samples.load_sample("fashion_mnist")["test_x"]))


def test_emnist_letters_orientation_and_labels(tmp_path):
    split = data.load("emnist_letters", "train", source="sample")
    assert split.y.min() == 0 and split.y.max() == 25
    letters, labels = samples.synthetic_letters(100, seed=0, split="train")
    # our loader undoes EMNIST's transposition: images come back upright
    assert torch.equal(split.x[:5], torch.as_tensor(letters[:5]))
    assert torch.equal(split.y[:5], torch.as_tensor(labels[:5]).long() - 1)


def test_voc_root_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("KDNB_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    samples.write_synthetic_voc(tmp_path)
    assert data.voc_root(tmp_path) == tmp_path
    with pytest.raises(data.DataNotFoundError, match="voc2012"):
        data.voc_root(tmp_path / "nothing")


def test_subsets_and_holdout():
    s = data.load("mnist", "train", source="sample")
    kept = data.subset_by_classes(s, [0, 1, 2])
    assert set(kept.y.tolist()) == {0, 1, 2} and len(kept) == 600
    few = data.subset_by_count(s, 7, per_class=True)
    assert torch.bincount(few.y).tolist() == [7] * 10
    assert len(data.subset_by_count(s, 10)) == 10
    tr, va = data.holdout(s, 0.1, seed=0)
    assert len(va) == 200 and len(tr) == 1800
    tr2, va2 = data.holdout(s, 0.1, seed=0)
    assert torch.equal(va.y, va2.y)


def test_tensor_loader_order_depends_only_on_seed_and_epoch():
    x, y = torch.arange(10).float()[:, None], torch.arange(10)
    a = data.TensorLoader(x, y, 4, shuffle=True, seed=3)
    b = data.TensorLoader(x, y, 4, shuffle=True, seed=3)
    assert len(a) == 3
    ea = [yb.tolist() for _, yb in a.epoch(5)]
    assert ea == [yb.tolist() for _, yb in b.epoch(5)]
    assert sorted(sum(ea, [])) == list(range(10))
    assert ea != [yb.tolist() for _, yb in a.epoch(6)]
    fixed = data.TensorLoader(x, y, 4, shuffle=False)
    assert [yb.tolist() for _, yb in fixed.epoch(0)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert len(data.TensorLoader(x, y, 4, shuffle=False, drop_last=True)) == 2


def test_to_float_is_totensor_semantics():
    x = torch.tensor([[[0, 255]]], dtype=torch.uint8)
    assert data.to_float(x).tolist() == [[[[0.0, 1.0]]]]
    rgb = torch.zeros(2, 4, 4, 3, dtype=torch.uint8)
    out = data.to_float(rgb, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert out.shape == (2, 3, 4, 4) and torch.all(out == -1)


def test_random_crop_flip_matches_padding_semantics():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 6, 6)
    assert torch.equal(data.random_crop_flip(x, g, padding=0, flip=False), x)
    out = data.random_crop_flip(x, g, padding=2)
    assert out.shape == x.shape
    # every output row is a (possibly flipped, shifted) piece of the zero-padded input
    padded = torch.nn.functional.pad(x, (2,) * 4)
    for i in range(8):
        found = any(torch.equal(out[i], padded[i, :, dy:dy + 6, dx:dx + 6]) or
                    torch.equal(out[i], padded[i, :, dy:dy + 6, dx:dx + 6].flip(-1))
                    for dy in range(5) for dx in range(5))
        assert found


@pytest.mark.data
def test_real_mnist_counts():
    root = real_data_root("MNIST/raw/train-images-idx3-ubyte")
    tr = data.load("mnist", "train", data_dir=root)
    assert torch.bincount(tr.y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert len(data.load("mnist", "test", data_dir=root)) == 10000


@pytest.mark.data
def test_real_fashion_mnist_and_cifar_subset():
    root = real_data_root("FashionMNIST/raw", "cifar10-subset/cifar10_subset.npz")
    f = data.load("fashion_mnist", "train", data_dir=root)
    assert torch.bincount(f.y).tolist() == [6000] * 10
    c = data.load("cifar10", "train", source="subset", data_dir=root)
    assert torch.bincount(c.y).tolist() == [396, 366, 420, 384, 422, 393, 414, 385, 407, 413]
    assert torch.bincount(data.load("cifar10", "test", source="subset", data_dir=root).y).tolist() == \
        [103, 89, 100, 103, 90, 86, 112, 102, 106, 109]


@pytest.mark.data
def test_real_voc_sample_reads_through_torchvision():
    import torchvision

    root = real_data_root("VOC2012-sample/VOCdevkit")
    ds = torchvision.datasets.VOCSegmentation(data.voc_root(root), year="2012", image_set="val")
    img, mask = ds[0]
    m = np.array(mask)
    assert len(ds) == 15 and img.size == mask.size and set(np.unique(m)) <= set(range(21)) | {255}


def test_decompressed_copy_is_reused_across_processes(tmp_path):
    """The cache folder for a gz-only layout is named stably, so a second process does not decompress again."""
    import subprocess
    import sys

    flat = _flat_gz_layout("mnist", tmp_path)
    code = ("import sys; from kdnb import data; data.load('mnist', 'test', data_dir=sys.argv[1]); "
            "print(sorted(p.name for p in (data.cache_dir() / 'decompressed').iterdir()))")
    outs = {subprocess.run([sys.executable, "-c", code, str(flat)], capture_output=True, text=True, check=True).stdout
            for _ in range(2)}
    assert len(outs) == 1
