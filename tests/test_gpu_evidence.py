"""benchmarks/gpu_evidence.py (issue 17): the budget, the data packing and its size check, and the whole --dry run."""
import gzip
import importlib.util
import json
import math
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from conftest import REPO

spec = importlib.util.spec_from_file_location("gpu_evidence", REPO / "benchmarks" / "gpu_evidence.py")
ge = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ge)


def test_decide_runs_what_fits_and_keeps_time_for_later_parts():
    assert ge.decide(100, elapsed_s=50, budget_s=480) == (True, 430, "")
    go, limit, why = ge.decide(100, elapsed_s=50, budget_s=480, reserve_s=350)
    assert not go and limit == 0 and "would not fit: estimated 100 s, 80 s left, 350 s kept for later parts" in why
    assert ge.decide(80, elapsed_s=50, budget_s=480, reserve_s=350)[:2] == (True, 80)
    assert not ge.decide(math.inf, 0, 1e9)[0]
    assert "0 s left" in ge.decide(10, elapsed_s=500, budget_s=480)[2]  # never a negative time left


def test_gpu_plan_order_and_default_budget():
    items = ge.plan("abcd", dry=False)
    assert [it["part"] for it in items] == ["a"] * len(ge.NOTEBOOKS) + ["b", "c"] + ["d"] * 7
    assert [it["notebook"] for it in items if it["part"] == "a"] == ge.NOTEBOOKS
    assert all(it["params"] == {"profile": "smoke", "device": "cuda"} for it in items if it["part"] == "a")
    b, c = items[len(ge.NOTEBOOKS)], items[len(ge.NOTEBOOKS) + 1]
    assert b["params"] == {"profile": "full", "device": "cuda"}
    assert c["params"]["data_source"] == "subset" and "4,000" in c["note"] and "1,000" in c["note"]
    assert [(it["bench"], it["bf16"]) for it in items if it["part"] == "d"] == [
        ("01", False), ("02", False), ("02", True), ("03", False), ("03", True), ("04", False), ("05", False)]
    assert all(bool(it.get("reserve")) == (it["part"] == "d") for it in items)
    # with the guessed costs, (a) and (d) fit the default 8 minutes and (b), (c) are skipped, not started
    elapsed, ran = 0.0, []
    for i, it in enumerate(items):
        reserve = sum(x["est_s"] for x in items[i + 1:] if x.get("reserve"))
        if ge.decide(it["est_s"], elapsed, 480, reserve)[0]:
            elapsed += it["est_s"]
            ran.append(it["part"])
    assert set(ran) == {"a", "d"} and len(ran) == len(ge.NOTEBOOKS) + 7


def test_dry_plan_has_every_part_on_cpu_and_a_part_that_never_fits():
    items = ge.plan("abcd", dry=True)
    assert [it["part"] for it in items] == ["a"] * len(ge.DRY_SMOKE) + ["b", "c"] + ["d"] * 7 + ["z"]
    assert all(it.get("params", {}).get("device", "cpu") == "cpu" and it.get("device", "cpu") == "cpu" for it in items)
    assert items[-1]["est_s"] == math.inf
    assert [it["part"] for it in ge.plan("bd", dry=False)] == ["b"] + ["d"] * 7


def _fake_source(root, n_img=12):
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ge.FMNIST_FILES:
        (raw / (name + ".gz")).write_bytes(gzip.compress(bytes(range(256)) * 3 + name.encode()))
    (root / "cifar10-subset").mkdir()
    rng = np.random.default_rng(0)
    np.savez(root / "cifar10-subset" / "cifar10_subset.npz",
             train_x=rng.integers(0, 256, (n_img, 32, 32, 3), dtype=np.uint8), train_y=np.arange(n_img, dtype=np.uint8),
             train_index=np.arange(n_img, dtype=np.int64), test_x=rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8),
             test_y=np.arange(3, dtype=np.uint8), test_index=np.arange(3, dtype=np.int64))


def test_check_size_counts_the_tree_and_keeps_a_margin(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f.bin").write_bytes(b"x" * 3000)
    (tmp_path / "g.bin").write_bytes(b"y" * 1000)
    assert ge.check_size(tmp_path, tree=1000, limit=6000, margin=1000) == 4000
    with pytest.raises(ge.EvidenceError, match=r"working tree .* over the device tool's") as e:
        ge.check_size(tmp_path, tree=1001, limit=6000, margin=1000)
    assert "\n" not in str(e.value)


def test_prepare_packs_losslessly_and_fails_clearly_when_too_big(tmp_path, monkeypatch):
    src, dest = tmp_path / "src", tmp_path / "packed"
    _fake_source(src)
    monkeypatch.setattr(ge, "tree_bytes", lambda: 0)
    info = ge.prepare(src, dest, "abcd")
    assert info["datasets"] == ["cifar10_subset", "fashion_mnist"]
    assert not list(dest.rglob("*.gz")) and not list(dest.rglob("*.npz"))[1:]  # only the small labels npz
    ge.unpack(dest, tmp_path / "data")
    for name in ge.FMNIST_FILES:
        assert (tmp_path / "data" / "FashionMNIST" / "raw" / name).read_bytes() == \
            gzip.decompress((src / "FashionMNIST" / "raw" / (name + ".gz")).read_bytes())
    with np.load(src / "cifar10-subset" / "cifar10_subset.npz") as a, \
            np.load(tmp_path / "data" / "cifar10-subset" / "cifar10_subset.npz") as b:
        assert sorted(a.files) == sorted(b.files) and all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype
                                                          for k in a.files)
    # only what the chosen parts read
    assert ge.prepare(src, dest, "ad")["datasets"] == [] and not (dest / "FashionMNIST").exists()
    # over the limit: one clear error, and no over-size folder left to be carried
    monkeypatch.setattr(ge, "tree_bytes", lambda: ge.CARRY_LIMIT)
    with pytest.raises(ge.EvidenceError, match="MiB, over the device tool's 64 MiB"):
        ge.prepare(src, dest, "b")
    assert not dest.exists()
    assert ge.main(["--prepare", "--source", str(src), "--data", str(dest), "--parts", "b"]) == 2


def test_unpack_refuses_a_changed_file_and_a_missing_manifest(tmp_path, monkeypatch):
    src, dest = tmp_path / "src", tmp_path / "packed"
    _fake_source(src)
    monkeypatch.setattr(ge, "tree_bytes", lambda: 0)
    ge.prepare(src, dest, "b")
    f = dest / "FashionMNIST" / "raw" / "train-labels-idx1-ubyte.xz"
    import lzma

    f.write_bytes(lzma.compress(b"other"))
    with pytest.raises(ge.EvidenceError, match="sha256 differs"):
        ge.unpack(dest, tmp_path / "data")
    with pytest.raises(ge.EvidenceError, match="MANIFEST.json not found"):
        ge.unpack(tmp_path / "nothing", tmp_path / "data")


def test_bad_parts_is_one_line(capsys):
    assert ge.main(["--parts", "ax"]) == 2
    assert capsys.readouterr().err.strip() == "gpu_evidence: error: --parts='ax': only a, b, c and d exist"


def test_notebook_parameters_without_papermill_matches_papermill():
    from kdnb import runner

    for nb in ge.NOTEBOOKS:
        path = REPO / "notebooks" / f"{nb}.ipynb"
        assert ge.notebook_parameters(path) == runner.notebook_parameters(path)


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_evidence.py"), "--dry", "--executor",
                           "inprocess", "--out", str(out), "--work", str(work)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "gpu_evidence.json").read_text())
    assert summary["finished"] and "error" not in summary and summary["executor"] == "inprocess"
    status = {p["name"]: p["status"] for p in summary["parts"]}
    by_part = {p["part"]: p for p in summary["parts"]}
    assert by_part["z"]["status"] == "skipped" and "would not fit" in by_part["z"]["reason"]
    # 05 cannot run on the subset until its parameters cell has data_source: then (c) must pass too
    if "data_source" not in ge.notebook_parameters(REPO / "notebooks" / "05_self_distillation.ipynb"):
        assert by_part["c"]["status"] == "failed" and "no parameter 'data_source'" in by_part["c"]["error"]
        status.pop(by_part["c"]["name"])
    status.pop(by_part["z"]["name"])
    assert set(status.values()) == {"ok"}, summary["parts"]
    for p in summary["parts"]:
        if p["part"] in "abc" and p["status"] == "ok":
            assert len(p["run_dirs"]) == 1 and p["run_json"] == [True]
        if p["part"] == "d":
            assert p["result"]["images_per_s"] > 0 and p["result"]["device"] == "cpu"
    # the run folders come back in results/'s layout, records and executed notebooks included, checkpoints not
    with tarfile.open(out / "results.tar.gz") as tar:
        names = set(tar.getnames())
    for p in summary["parts"]:
        for d in p.get("run_dirs", []):
            assert {f"{d}/run.json", f"{d}/notebook.ipynb", f"{d}/params.yaml"} <= names
    assert not [n for n in names if "/checkpoints" in n]
    assert any(n.startswith("gpu_evidence_logs/") for n in names)
    assert sorted(os.listdir(out)) == ["gpu_evidence.json", "results.tar.gz"]  # the device tool returns <= 8 files


def test_run_child_records_failure_and_timeout(tmp_path):
    env = dict(os.environ)
    status, err = ge.run_child([sys.executable, "-c", "print('working'); raise SystemExit('boom: one line')"], env,
                               timeout=60, log=tmp_path / "fail.log")
    assert (status, err) == ("failed", "boom: one line")
    status, err = ge.run_child([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                               env, timeout=1, log=tmp_path / "slow.log")
    assert status == "timeout" and "killed after 1 s" in err
    assert (tmp_path / "slow.log").read_text() == "started\n"
