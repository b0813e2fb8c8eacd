"""Regression tests of issue 18 (a reliability pass): caches and records that must not lie about the data, corrupt
files stopped at load with one line, bad input stopped before any work, folders that must be writable, records
that stay consistent after a kill. Everything here runs on the shipped samples written to a temp folder (fast)."""
import gzip
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kdnb import cli, data, report, runner, runs, samples, train, validate
from kdnb import unseen_classes as uc

MNIST_FILES = data._IDX["mnist"][1]


def _raw(tmp_path: Path, name="mnist") -> Path:
    """The sample as torchvision's uncompressed + .gz layout under tmp_path/<name>-root."""
    return samples.write_idx_layout(name, tmp_path / f"{name}-root")


def _gz_only(tmp_path: Path) -> Path:
    """The MNIST sample's four .gz files alone in one folder (Debian's Fashion-MNIST layout)."""
    src = _raw(tmp_path) / "MNIST" / "raw"
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in MNIST_FILES:
        shutil.copy(src / (f + ".gz"), flat / (f + ".gz"))
    return flat


def _labels_idx(labels: np.ndarray) -> bytes:
    return samples.idx_bytes(labels.astype(np.uint8))


def _relabel(path: Path, shift: int = 1, *, gz: bool) -> None:
    """Rewrite an idx label file (or its .gz) in place with every label shifted by `shift` (mod 10)."""
    raw = gzip.decompress(path.read_bytes()) if gz else path.read_bytes()
    arr = np.frombuffer(raw[8:], dtype=np.uint8)
    new = _labels_idx((arr.astype(int) + shift) % 10)
    path.write_bytes(gzip.compress(new) if gz else new)


# ------------------------------------------------------------------ fault 2 and 8: the decompression cache


def test_gz_repaired_or_replaced_in_place_is_decompressed_again(tmp_path):
    flat = _gz_only(tmp_path)
    good = (flat / "t10k-labels-idx1-ubyte.gz").read_bytes()
    before = data.load("mnist", "test", data_dir=flat).y.clone()
    _relabel(flat / "t10k-labels-idx1-ubyte.gz", gz=True)
    after = data.load("mnist", "test", data_dir=flat).y
    assert torch.equal(after, (before + 1) % 10), "the decompressed copy of the old .gz answered"
    # a truncated .gz fails with one line; once repaired in place, it loads
    (flat / "t10k-labels-idx1-ubyte.gz").write_bytes(good[:len(good) // 2])
    with pytest.raises(data.DataCorruptError, match="truncated"):
        data.load("mnist", "test", data_dir=flat)
    (flat / "t10k-labels-idx1-ubyte.gz").write_bytes(good)
    assert torch.equal(data.load("mnist", "test", data_dir=flat).y, before)


def test_decompressed_size_is_checked_against_the_idx_header(tmp_path):
    flat = _gz_only(tmp_path)
    images = flat / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(images.read_bytes())
    images.write_bytes(gzip.compress(raw[:-784]))  # valid gzip, one image short
    with pytest.raises(data.DataCorruptError, match=r"t10k-images-idx3-ubyte\.gz.*says \d+"):
        data.load("mnist", "test", data_dir=flat)
    dest = list((data.cache_dir() / "decompressed").glob("mnist-*/MNIST/raw"))
    assert not any(p.name.endswith(".tmp") for d in dest for p in d.iterdir()), "a temp file was left behind"


def test_concurrent_decompression_of_one_folder_never_crashes(tmp_path, monkeypatch):
    """Two runs decompressing the same .gz at once: unique temp names and a rename, so both succeed."""
    monkeypatch.setenv("KDNB_CACHE", str(tmp_path / "fresh-cache"))
    flat = _gz_only(tmp_path)
    errors, results = [], []

    def go():
        try:
            results.append(len(data.load("mnist", "train", data_dir=flat)))
        except Exception as e:  # noqa: BLE001 - the test reports any crash
            errors.append(e)

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [2000] * 4


# ------------------------------------------------------------------ fault 11: corrupt files, one line at load time


def _assert_one_line(e: Exception, *words):
    text = str(e)
    assert "\n" not in text, text
    for w in words:
        assert w in text, (w, text)


def test_bad_gzip_names_dataset_file_and_how_to_get_it(tmp_path):
    flat = _gz_only(tmp_path)
    (flat / "train-images-idx3-ubyte.gz").write_bytes(b"this is not gzip at all" * 10)
    with pytest.raises(data.DataCorruptError) as e:
        data.load("mnist", "train", data_dir=flat)
    _assert_one_line(e.value, "'mnist'", "train-images-idx3-ubyte.gz", "gzip", "download=True")


def test_raw_idx_of_the_wrong_size(tmp_path):
    root = _raw(tmp_path)
    f = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(data.DataCorruptError) as e:
        data.load("mnist", "train", data_dir=root)
    _assert_one_line(e.value, "'mnist'", "train-images-idx3-ubyte", "idx header")


def test_labels_out_of_range_stop_at_load(tmp_path):
    root = _raw(tmp_path)
    f = root / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    raw = bytearray(f.read_bytes())
    raw[8 + 5] = 200
    f.write_bytes(bytes(raw))
    with pytest.raises(data.DataCorruptError) as e:
        data.load("mnist", "train", data_dir=root)
    _assert_one_line(e.value, "'mnist'", "train-labels-idx1-ubyte", "outside 0..9", "200")


def test_npz_missing_a_key(tmp_path):
    arrays = samples.load_sample("cifar10")
    folder = tmp_path / "cifar10-subset"
    folder.mkdir()
    np.savez(folder / "cifar10_subset.npz", **{k: v for k, v in arrays.items() if k != "train_x"})
    with pytest.raises(data.DataCorruptError) as e:
        data.load("cifar10", "train", source="subset", data_dir=tmp_path)
    _assert_one_line(e.value, "'cifar10'", "cifar10_subset.npz", "'train_x'")
    (folder / "cifar10_subset.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(data.DataCorruptError, match="not a readable npz"):
        data.load("cifar10", "test", source="subset", data_dir=tmp_path)


# ------------------------------------------------------------------ fault 1: the identity of the data read


def test_teacher_key_covers_the_data_content(tmp_path):
    """A teacher trained on corrupted labels must never answer for the good data (same sizes, same folder)."""
    root = _raw(tmp_path)
    kw = dict(teacher_source="train_on_train", dropout_at_inference=False, seed=0, epochs=1, lr=1e-3,
              heldout_size=200)
    good = uc.teacher_config(uc.load_mnist("real", data_dir=root), **kw)
    (root / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz").unlink()
    _relabel(root / "MNIST" / "raw" / "train-labels-idx1-ubyte", gz=False)
    bad = uc.teacher_config(uc.load_mnist("real", data_dir=root), **kw)
    assert good["data"] != bad["data"] and train.config_hash(good) != train.config_hash(bad)
    assert list(good)[-1] == "data"  # numerics.cache_key() still comes last (empty in float32)
    # the shipped samples are fixed by the package: their keys (printed by the smoke notebooks) do not change
    assert "data" not in uc.teacher_config(uc.load_mnist("sample"), **kw)


def test_run_record_holds_the_data_identity(tmp_path):
    root = _raw(tmp_path)
    run = runs.Run("x", {"profile": "reduced"}, tmp_path / "out")
    data.load("mnist", "test", data_dir=root)
    rec = run.finish()
    assert rec["data"]["identity"] and rec["data"]["reads"][0]["dataset"] == "mnist"
    files = rec["data"]["reads"][0]["files"]
    assert sorted(Path(p).name for p in files) == ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    assert json.loads((tmp_path / "out" / "run.json").read_text())["data"] == rec["data"]
    # the intra-op thread count is part of the record (fault 3)
    assert rec["environment"]["cpu_threads"] == torch.get_num_threads() and "omp_num_threads" in rec["environment"]


def test_checkpoints_made_from_other_data_are_not_resumed(tmp_path, capsys):
    root = _raw(tmp_path)
    out = tmp_path / "out"
    run = runs.Run("x", {"profile": "reduced"}, out)
    data.load("mnist", "test", data_dir=root)
    ckpt = run.checkpoint("student")
    ckpt.write_bytes(b"weights trained on the first data")
    assert runs.Run("x", {"profile": "reduced"}, out) and data.load("mnist", "test", data_dir=root)
    run2 = runs.Run("x", {"profile": "reduced"}, out)
    data.load("mnist", "test", data_dir=root)
    assert run2.checkpoint("student").is_file(), "same data: the checkpoint resumes"
    _relabel(root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte", gz=False)
    run3 = runs.Run("x", {"profile": "reduced"}, out)
    data.load("mnist", "test", data_dir=root)
    assert not run3.checkpoint("student").exists(), "a checkpoint made from other data was kept"
    assert "other data" in capsys.readouterr().out


def _fake_papermill(monkeypatch, calls):
    """papermill.execute_notebook stand-in: records the call, saves a finished notebook and writes a record
    the way the notebook's runs.Run would, reading MNIST's test split from the run's data_dir."""
    import papermill

    def execute(src, dst, parameters, **kw):
        calls.append(parameters)
        out = Path(parameters["output_dir"])
        run = runs.Run("05_self_distillation", {"profile": "smoke"}, out)
        data.load("mnist", "test", data_dir=parameters.get("data_dir"))
        run.finish()
        Path(dst).write_text(json.dumps({"cells": [
            {"cell_type": "code", "metadata": {"papermill": {"status": "completed"}}, "source": ""}]}))

    monkeypatch.setattr(papermill, "execute_notebook", execute)


def test_kdnb_run_does_not_return_a_record_made_from_other_data(tmp_path, monkeypatch, capsys):
    good, bad = _raw(tmp_path / "good"), _raw(tmp_path / "bad")
    _relabel(bad / "MNIST" / "raw" / "t10k-labels-idx1-ubyte", gz=False)
    calls = []
    _fake_papermill(monkeypatch, calls)
    res = tmp_path / "results"
    out = runner.run("05_self_distillation", {"data_dir": str(bad)}, results=res)
    assert len(calls) == 1
    # same run id (data_dir is not in it), other data: run again instead of "already finished"
    assert runner.run("05_self_distillation", {"data_dir": str(good)}, results=res) == out
    assert len(calls) == 2 and "other data" in capsys.readouterr().out
    # same data again: the record stands
    runner.run("05_self_distillation", {"data_dir": str(good)}, results=res)
    assert len(calls) == 2 and "already finished" in capsys.readouterr().out
    # the same data in another folder is the same data
    moved = tmp_path / "moved"
    shutil.copytree(good, moved)
    runner.run("05_self_distillation", {"data_dir": str(moved)}, results=res)
    assert len(calls) == 2


# ------------------------------------------------------------------ fault 4: record and notebook consistent on kill


def test_record_without_its_saved_notebook_is_run_again(tmp_path, monkeypatch, capsys):
    """Killed after the notebook wrote run.json but before papermill saved the last cell: not 'finished'."""
    calls = []
    _fake_papermill(monkeypatch, calls)
    _, _, _, out = runner.plan("05_self_distillation", {}, tmp_path)
    out.mkdir(parents=True)
    (out / "run.json").write_text("{}")
    running = {"cells": [{"cell_type": "code", "metadata": {"papermill": {"status": "running"}}, "source": ""}]}
    (out / "notebook.partial.ipynb").write_text(json.dumps(running))
    monkeypatch.setenv("KDNB_DATA", str(_raw(tmp_path)))
    runner.run("05_self_distillation", {}, results=tmp_path)
    assert len(calls) == 1 and runner.notebook_complete(out / "notebook.ipynb")
    assert "not saved" in capsys.readouterr().out


# ------------------------------------------------------------------ fault 10: bad input stopped before any work


@pytest.mark.parametrize("notebook, params, named", [
    ("05_self_distillation", {"distillation_steps": 1}, "distillation_steps=1"),
    ("05_self_distillation", {"seeds": [18446744073709551616]}, "seeds="),
    ("01_mnist_unseen_classes", {"teacher_seed": 99999999999999999999}, "teacher_seed="),
    ("04_emnist_mlp_student", {"teacher_seed": 2**64}, "teacher_seed="),
    ("01_mnist_unseen_classes", {"download": "no"}, "download='no'"),
    ("05_self_distillation", {"download": "no"}, "download='no'"),
    ("01_mnist_unseen_classes", {"batch_size": 1e8}, "batch_size=100000000.0"),
    ("01_mnist_unseen_classes", {"batch_size": 10**8}, "batch_size=100000000"),
    ("05_self_distillation", {"batch_size": 10**8}, "batch_size=100000000"),
    ("04_emnist_mlp_student", {"batch_size": 10**8}, "batch_size=100000000"),
    ("01_mnist_unseen_classes", {"heldout_size": 100000, "profile": "reduced"}, "heldout_size=100000"),
    ("01_mnist_unseen_classes", {"heldout_size": 2000}, "heldout_size=2000"),
    ("03_dml_kd_calibration", {"train_per_class": 100000, "profile": "reduced"}, "train_per_class=100000"),
    ("03_dml_kd_calibration", {"val_size": 10**9}, "val_size=1000000000"),
    ("03_dml_kd_calibration", {"batch_size": 10**8, "profile": "reduced"}, "batch_size=100000000"),
])
def test_bad_values_are_named_before_anything_runs(notebook, params, named):
    with pytest.raises(ValueError, match=named.replace("[", r"\[").replace(".", r"\.")):
        runner.plan(notebook, params)


def test_download_must_be_a_real_bool_for_the_loader_too():
    with pytest.raises(ValueError, match="download='no'"):
        data.load("mnist", "train", source="real", download="no")


def test_seed_bound_keeps_derived_seeds_in_range():
    s = validate.MAX_SEED
    torch.Generator().manual_seed(s * 1_000_003 + 10_000)  # TensorLoader's derived seed: no overflow
    with pytest.raises(ValueError, match="seeds="):
        validate.seeds([s + 1])


def test_flag_and_parameter_that_disagree(capsys):
    assert cli.main(["run", "05_self_distillation", "--profile", "smoke", "-p", "profile", "bogus"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "profile='bogus'" in err and "--profile smoke" in err


# ------------------------------------------------------------------ faults 6, 9, 12: folders that must be writable


def test_unwritable_cache_stops_the_run_before_any_work(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("KDNB_CACHE", str(blocker / "cache"))
    with pytest.raises(runs.NotWritableError) as e:
        runs.Run("x", {"profile": "smoke"}, tmp_path / "out")
    _assert_one_line(e.value, "kdnb cache", str(blocker / "cache"), "KDNB_CACHE")
    assert not (tmp_path / "out" / "params.yaml").exists()


def test_unwritable_results_is_one_line_from_the_cli(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(runs, "RESULTS", blocker / "results")
    assert cli.main(["run", "05_self_distillation"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "results folder" in err and "not writable" in err


def test_report_on_a_read_only_root_changes_nothing(tmp_path, monkeypatch):
    """figures/ is writable, the root is not: before, figures were rewritten and README.md then failed."""
    res = tmp_path / "results"
    shutil.copytree(runs.RESULTS, res, ignore=shutil.ignore_patterns("checkpoints", "smoke-*", "*.ipynb"))
    before = {p: p.read_bytes() for p in res.rglob("*") if p.is_file()}
    real_mkstemp = tempfile.mkstemp

    def read_only_root(*a, dir=None, **k):
        if dir is not None and Path(dir) == res:
            raise PermissionError(13, "Permission denied", str(res))
        return real_mkstemp(*a, dir=dir, **k)

    monkeypatch.setattr(tempfile, "mkstemp", read_only_root)
    (res / "figures").mkdir(exist_ok=True)
    (res / "figures" / "stale.png").write_bytes(b"old")
    before[res / "figures" / "stale.png"] = b"old"
    with pytest.raises(runs.NotWritableError, match="results folder"):
        report.write(res)
    after = {p: p.read_bytes() for p in res.rglob("*") if p.is_file()}
    assert after == before


# ------------------------------------------------------------------ fault 5: 01's teacher resumes after a kill


def test_01_teacher_training_resumes_from_its_epoch_checkpoint(monkeypatch):
    mnist = uc.load_mnist("sample")
    cfg = uc.teacher_config(mnist, teacher_source="train_on_test", dropout_at_inference=False, seed=0, epochs=2,
                            lr=1e-3, heldout_size=200)
    uc.teacher_path(cfg).unlink(missing_ok=True)
    real_save, real_fit, resumed = train.atomic_save, train.fit, []

    def killed_at_the_cache_write(obj, path):
        if Path(path) == uc.teacher_path(cfg):
            raise KeyboardInterrupt  # a kill after the last epoch, before the teacher reached the cache
        real_save(obj, path)

    def spy_fit(*a, **k):
        res = real_fit(*a, **k)
        resumed.append(res.resumed_from)
        return res

    monkeypatch.setattr(train, "atomic_save", killed_at_the_cache_write)
    monkeypatch.setattr(train, "fit", spy_fit)
    with pytest.raises(KeyboardInterrupt):
        uc.get_teacher(mnist, cfg)
    monkeypatch.setattr(train, "atomic_save", real_save)
    _, info = uc.get_teacher(mnist, cfg)
    assert resumed == [0, 2] and not info["cache_hit"], "the teacher was trained again from epoch 0"
    assert not uc.teacher_path(cfg).with_suffix(".fit.pt").exists()  # the cache file replaces the fit checkpoint


# ------------------------------------------------------------------ fault 3: same run id, other thread count


def test_finished_record_with_another_thread_count_is_said(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"environment": {"cpu_threads": 999}}))
    assert "999 intra-op threads" in runner.threads_note(out, {"profile": "reduced", "device": "cpu"})
    # smoke on CPU always runs on one thread (kdnb.numerics): a record made with one is not flagged
    (out / "run.json").write_text(json.dumps({"environment": {"cpu_threads": 1}}))
    assert runner.threads_note(out, {"profile": "smoke", "device": "cpu"}) is None


def test_missing_data_can_be_found_before_any_work(tmp_path, monkeypatch):
    """05 reads CIFAR-10 after its KRR cells: data.require is the check its setup cell can make first."""
    monkeypatch.delenv("KDNB_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(data.DataNotFoundError, match="cifar10_subset.npz"):
        data.require("cifar10", "subset", tmp_path / "nothing-here")
    data.require("cifar10", "sample")  # shipped
    data.require("mnist", "real", _raw(tmp_path))


def test_a_run_ids_thread_count_is_fixed_by_study_and_profile(monkeypatch):
    """Fault 3: the same run id means the same numbers, so the intra-op thread count of a CPU run follows from what
    the run id names (study, profile), not from OMP_NUM_THREADS, Ray's cpus-per-trial or the core count."""
    import torch

    from kdnb import numerics

    for threads in (1, 3):
        torch.set_num_threads(threads)  # what the caller's environment would have given
        assert numerics.configure("reduced", "cpu", "01_mnist_unseen_classes")["threads"] == 1
        assert numerics.configure("reduced", "cpu", "05_self_distillation")["threads"] == 2
        assert numerics.configure("smoke", "cpu", "05_self_distillation") == {"dtype": "float64", "threads": 1}
    assert numerics.regime("full", "cuda", "05_self_distillation")["threads"] is None


def test_voc_reads_enter_the_data_identity_and_a_corrupt_image_is_one_line(tmp_path):
    """Faults 1 and 11 for 02: the VOC files a run reads are hashed into its data identity, and an image that does
    not decode stops at load time with one line naming the dataset and the file."""
    import shutil

    from kdnb import data
    from kdnb import voc_segmentation as vs

    root = vs.voc_dataset_root("synthetic")
    data.reset_reads()
    split = vs.load_voc(root, "train", 32, source="synthetic")
    entry = next(e for e in data.reads() if e["dataset"] == "voc2012")
    assert len(entry["files"]) == 2 * len(split) + 1 and split.identity == data.identity_of([entry])
    copy = tmp_path / "voc"
    shutil.copytree(root, copy)
    jpg = sorted((copy / "VOCdevkit" / "VOC2012" / "JPEGImages").glob("*.jpg"))[0]
    jpg.write_bytes(jpg.read_bytes()[:40])
    with pytest.raises(data.DataCorruptError) as e:
        vs.load_voc(copy, "train", 32, source="real")
    assert "voc2012" in str(e.value) and jpg.name in str(e.value) and "\n" not in str(e.value)


def test_kdnb_run_finds_the_voc_files_a_finished_02_record_read():
    """A finished 02 record lists VOC reads; kdnb run must find the same files again to compare them (it crashed
    looking for VOC among the idx datasets), and the same files give the same identity."""
    from kdnb import data
    from kdnb import voc_segmentation as vs

    data.reset_reads()
    vs.load_voc(vs.voc_dataset_root("synthetic"), "train", 32, source="synthetic")
    entry = next(e for e in data.reads() if e["dataset"] == "voc2012")
    files = data.files_for("voc2012", "train", "synthetic")
    assert {str(f.resolve()) for f in files} == set(entry["files"])


def test_a_second_trainer_of_the_same_teacher_waits_for_the_first(tmp_path, capsys):
    """Two sweep workers of one configuration used to train the same teacher side by side (a core wasted for the
    teacher's whole training, both writing its checkpoint): the cache's lock makes the second wait, then load."""
    import threading

    from kdnb import runs

    order, first_in = [], threading.Event()

    def first():
        with runs.teacher_lock(tmp_path / "teacher-x.pt"):
            first_in.set()
            time.sleep(0.5)
            order.append("first done")

    t = threading.Thread(target=first)
    t.start()
    first_in.wait(5)
    with runs.teacher_lock(tmp_path / "teacher-x.pt"):
        order.append("second in")
    t.join()
    assert order == ["first done", "second in"]
    assert "waiting for another process training the teacher teacher-x.pt" in capsys.readouterr().out


@pytest.mark.parametrize("module, name", [("kdnb.unseen_classes", "get_teacher"), ("kdnb.emnist_student", "get_teacher"),
                                          ("kdnb.dml_calibration", "get_teacher")])
def test_every_teacher_cache_trains_under_its_lock(module, name):
    import importlib
    import inspect

    source = inspect.getsource(getattr(importlib.import_module(module), name))
    assert "runs.teacher_lock(path)" in source and source.index("teacher_lock") < source.index("torch.load")
