"""Every digest the package spells, pinned: committed results/ folders are named by run ids and caches are keyed by
these strings, so a refactoring that changes one byte of them orphans records and retrains teachers. The literal
values were computed with the code before the digests shared one function."""
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kdnb import data, runner, runs, samples, train
from kdnb import emnist_student as es

REPO = Path(__file__).resolve().parent.parent
RECORDS = sorted(REPO.glob("results/*/*/run.json"))


def test_run_ids():
    assert runs.run_id({"profile": "reduced", "lr": 0.1, "seeds": [0, 1], "output_dir": "x"}) == "reduced-4477124523"
    assert runs.run_id({"profile": "smoke", "x": np.float32(0.5)}) == "smoke-fe3af02aaa"


@pytest.mark.parametrize("notebook", sorted({p.parent.parent.name for p in RECORDS}))
def test_committed_records_keep_their_run_id_and_data_identity(notebook):
    for path in (p for p in RECORDS if p.parent.parent.name == notebook):
        record = json.loads(path.read_text())
        assert runs.run_id(record["params"]) == record["run_id"] == path.parent.name
        if (record.get("data") or {}).get("reads"):
            assert data.identity_of(record["data"]["reads"]) == record["data"]["identity"]


def test_cache_keys():
    assert train.config_hash({"b": [1, 2], "a": 1, "where": Path("/x/y")}) == "477a434bb5a0"
    reads = [{"dataset": "mnist", "split": "test", "source": "real", "files": {"/a": "0123", "/b": "4567"}},
             {"dataset": "mnist", "split": "train", "source": "real", "files": {"/c": "89ab"}}]
    assert data.identity_of(reads) == "79e165ab7160172d"

    class Split:
        def __init__(self, source, identity):
            self.source, self.identity = source, identity

    splits = Split("real", "ecacd18acd941a58"), Split("real", "0123456789abcdef"), Split("sample", "x")
    assert data.cache_key(*splits) == {"data": "8e1c5fc590fc2c6f"}


def test_file_digests(tmp_path):
    f = tmp_path / "f.bin"
    f.write_bytes(b"kdnb\n" * 1000)
    assert data.file_digest(f) == "e30a7a10d293bf93"
    memo = hashlib.sha1(str(f.resolve()).encode()).hexdigest()[:16]
    assert (data.cache_dir() / "digests" / f"{memo}.json").is_file()
    assert samples._hash_file(f) == {"md5": "358d903228b8206305eb75d84100b99d", "sha256":
                                     "e30a7a10d293bf93c636dbb42cb796c145cd8eceb1bae81d0c09ccfcf4d9a8c2"}


def test_decompressed_copy_name(tmp_path):
    src = samples.write_idx_layout("mnist", tmp_path / "tv")
    flat = tmp_path / "flat"
    flat.mkdir()
    for gz in (src / data._IDX["mnist"][0] / "raw").glob("*.gz"):
        shutil.copy(gz, flat / gz.name)
    data.load("mnist", "test", data_dir=flat)
    assert (data.cache_dir() / "decompressed" / "mnist-fe4c5d63d670").is_dir()


def test_emnist_teacher_and_logit_keys():
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert es.images_hash(x) == "e3c37aebe7ab9ced"
    m = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    for p in m.parameters():
        p.data = torch.linspace(-1, 1, p.numel()).reshape(p.shape)
    assert es.weights_hash(m) == "f131fc4cb5497155"
    images = x.reshape(3, 1, 2, 2)
    d = es.Data(images, torch.zeros(3), images + 1, torch.zeros(3), images + 2, torch.zeros(3), "emnist_letters",
                "synthetic", "test", 2)
    assert es.cached_logits(nn.Sequential(nn.Flatten(), m), d)[1]["key"] == "3edca0507db76b13"


def test_run_folder_lock_name(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(runs, "exclusive", lambda path, waiting: seen.append(Path(path)))
    runner._folder_lock(tmp_path / "r")
    name = hashlib.sha1(str((tmp_path / "r").resolve()).encode()).hexdigest()[:16]
    assert seen == [data.cache_dir() / "locks" / f"{name}.lock"]
