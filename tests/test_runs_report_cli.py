import json
import os
from pathlib import Path

import pytest
import yaml

from kdnb import cli, papers, report, runner, runs
from kdnb import dml_calibration as dc


def test_atomic_writes_leave_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    runs.atomic_write_json(target, {"a": 1})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        runs.atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_atomic_path_gives_each_writer_its_own_temp_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "f.bin"
    with runs.atomic_path(target) as a, runs.atomic_path(target) as b:
        assert a != b and a.parent == b.parent == tmp_path
        a.write_bytes(b"a")
        b.write_bytes(b"b")
    assert target.read_bytes() == b"a"  # b is renamed first (inner block), a last: the last rename wins, whole
    with pytest.raises(RuntimeError):
        with runs.atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError
    assert target.read_bytes() == b"a" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_atomic_dir_shows_readers_no_folder_or_the_whole_one(tmp_path):
    target = tmp_path / "tree"
    with runs.atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("a")
        assert not target.exists() and tmp.parent == tmp_path
    assert (target / "a.txt").read_text() == "a"
    # another writer finished first: theirs stays, ours is dropped
    with runs.atomic_dir(target) as tmp:
        (tmp / "b.txt").write_text("b")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    with pytest.raises(RuntimeError):
        with runs.atomic_dir(tmp_path / "other") as tmp:
            (tmp / "half").write_text("h")
            raise RuntimeError
    assert [p.name for p in tmp_path.iterdir()] == ["tree"]


def test_run_id_is_a_hash_of_what_is_computed():
    a = runs.run_id({"profile": "reduced", "lr": 0.1, "output_dir": "x", "data_dir": "/d"})
    b = runs.run_id({"lr": 0.1, "profile": "reduced", "output_dir": "y"})
    assert a == b and a.startswith("reduced-")
    assert runs.run_id({"profile": "reduced", "lr": 0.2}) != a


def test_run_record(tmp_path):
    import numpy as np

    r = runs.Run("05_self_distillation", {"profile": "reduced", "seeds": [0]}, tmp_path / "run", device="cpu")
    assert r.checkpoint("step0") == tmp_path / "run" / "checkpoints" / "step0.pt"
    r.log(acc=np.float32(0.5), curve=np.array([1.0, 2.0]))
    r.claim("E1", [[0.1, 0.2]])
    rec = r.finish()
    assert yaml.safe_load((tmp_path / "run" / "params.yaml").read_text()) == {"profile": "reduced", "seeds": [0]}
    saved = json.loads((tmp_path / "run" / "run.json").read_text())
    assert saved["metrics"] == {"acc": 0.5, "curve": [1.0, 2.0]} and saved["claims"]["E1"]["values"] == [[0.1, 0.2]]
    for key in ("torch", "python", "device", "git_commit"):
        assert key in saved["environment"]
    assert rec["wall_time_s"] >= 0
    nothing = runs.Run("x", {}, None)
    assert nothing.checkpoint("a") is None and nothing.save_figure(None, "f") is None


def _record(results, notebook, run_id, profile, claims, params=None):
    d = results / notebook / run_id
    d.mkdir(parents=True)
    (d / "run.json").write_text(json.dumps({"notebook": notebook, "params": {**(params or {}), "profile": profile},
                                            "claims": claims}))


def test_report_verdicts(tmp_path):
    e1 = papers.reported("05_self_distillation", "E1")
    _record(tmp_path, "05_self_distillation", "reduced-a", "reduced",
            {"E1": {"values": [e1]}, "E2": {"values": [[0.2] * 7]},
             "E3": {"values": [0.2041, 0.2042, 0.2043]},
             "E4": {"values": [[0.4, 0.45]], "verdict": "supported", "note": "reduced profile"}})
    _record(tmp_path, "05_self_distillation", "smoke-b", "smoke", {"E1": {"values": [[9.0] * 7]}})
    rows = {(r["claim"], r["profile"]): r for r in report.rows(tmp_path)}
    assert rows[("E1", "reduced")]["verdict"] == "reproduced"
    assert rows[("E2", "reduced")]["verdict"] == "not reproduced"
    e3 = rows[("E3", "reduced")]
    assert e3["verdict"] == "reproduced" and e3["seeds"] == 3 and e3["std"] == pytest.approx(0.0001, abs=1e-9)
    assert rows[("E4", "reduced")]["verdict"] == "supported"
    assert not any(p == "smoke" for _, p in rows)                       # smoke runs never reported
    assert rows[("E2-readme", "—")]["verdict"] == "not run yet"
    md, csv_path = report.write(tmp_path)
    text = md.read_text()
    assert "reduced-a/notebook.ipynb" in text and "not reproduced" in text and csv_path.is_file()


def test_cli_rejects_unknown_parameter_before_running(tmp_path, capsys):
    assert cli.main(["run", "05_self_distillation", "-p", "temprature", "3"]) == 2
    err = capsys.readouterr().err
    assert "'temprature' is not a parameter of 05_self_distillation.ipynb" in err and "Traceback" not in err
    assert cli.main(["run", "no_such_notebook"]) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_plan_resolves_like_the_notebook():
    path, given, resolved, out = runner.plan("05_self_distillation", {"profile": "reduced", "epochs": 3})
    assert resolved["epochs"] == 3 and resolved["arch"] == "resnet18" and resolved["sd_alphas"] == [0.0, 0.6]
    assert out.parent.name == "05_self_distillation" and out.name == runs.run_id(resolved)
    assert "output_dir" not in resolved and "data_dir" not in resolved
    assert runner.parse_value("[0.0, 0.6]") == [0.0, 0.6] and runner.parse_value("1e-3") == 1e-3
    assert runner.parse_value("resnet50") == "resnet50" and runner.parse_value("None") is None


def test_committed_run_records_match_their_folder():
    """Every committed result: executed notebook, params and metrics beside it, run id = hash of params."""
    for rec_path in sorted(runs.RESULTS.glob("*/*/run.json")):
        d = rec_path.parent
        if d.name.startswith("smoke-"):
            continue
        rec = json.loads(rec_path.read_text())
        assert (d / "notebook.ipynb").is_file() and (d / "metrics.json").is_file() and (d / "params.yaml").is_file()
        assert runs.run_id(rec["params"]) == d.name, f"{d}: params do not hash to the folder name"
        assert yaml.safe_load((d / "params.yaml").read_text()) == rec["params"]


def test_committed_report_is_up_to_date():
    readme = runs.RESULTS / "README.md"
    if not readme.is_file():
        pytest.skip("no results/README.md yet")
    from kdnb import attribution

    records = report.load_runs()
    ablation = attribution.rows(records)
    assert readme.read_text() == report.render_markdown(report.rows(records=records), ablation)
    assert (runs.RESULTS / "attribution.csv").read_text() == attribution.csv_text(ablation)


def test_report_counts_each_seed_once(tmp_path):
    e3 = papers.reported("05_self_distillation", "E3")
    _record(tmp_path, "05_self_distillation", "reduced-a", "reduced", {"E3": {"values": [e3, e3 + 1e-4], "seeds": [0, 1]}})
    _record(tmp_path, "05_self_distillation", "reduced-b", "reduced", {"E3": {"values": [e3 + 1e-4, 9.0], "seeds": [1, 2]}})
    row = next(r for r in report.rows(tmp_path) if r["claim"] == "E3")
    assert row["seeds"] == 3 and row["reproduced"] == pytest.approx((e3 + e3 + 1e-4 + 9.0) / 3)


def test_an_exact_claim_counts_once_however_many_runs_computed_it(tmp_path):
    """05's KRR claims carry no seeds: three both-variant runs computed the same numbers, which are not n = 3."""
    e3 = papers.reported("05_self_distillation", "E3")
    for run_id in ("reduced-a", "reduced-b", "reduced-c"):
        _record(tmp_path, "05_self_distillation", run_id, "reduced", {"E3": {"values": [e3]}})
    row = next(r for r in report.rows(tmp_path) if r["claim"] == "E3")
    assert row["seeds"] == 1 and row["ci95"] is None and len(row["runs"]) == 1 and row["verdict"] == "reproduced"
    assert report.cell(row).endswith(" (exact)") and report.readme_cell(row).endswith(" (exact)")
    # seedless values that differ are not one computation: they are pooled (tests/test_sweep.py has that case)
    _record(tmp_path, "05_self_distillation", "reduced-d", "reduced", {"E3": {"values": [e3 + 1e-4]}})
    row = next(r for r in report.rows(tmp_path) if r["claim"] == "E3")
    assert row["seeds"] == 4 and not row["exact"] and report.cell(row).endswith(" (n=4)")


def test_cli_rejects_bad_values_before_running(capsys):
    assert cli.main(["run", "05_self_distillation", "-p", "sd_alphas", "[1.5]"]) == 2
    assert "sd_alphas=1.5" in capsys.readouterr().err
    assert cli.main(["run", "05_self_distillation", "-p", "gamma", "0"]) == 2
    assert "gamma=0" in capsys.readouterr().err
    assert cli.main(["run", "01_mnist_unseen_classes", "-p", "kept_classes", "[]"]) == 2
    assert "kept_classes=[]" in capsys.readouterr().err
    assert cli.main(["run", "01_mnist_unseen_classes", "-p", "temperature", "0"]) == 2
    assert "temperature=0" in capsys.readouterr().err


def test_cli_cuda_without_cuda(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["run", "05_self_distillation", "--device", "cuda"]) == 2
    assert "device='cuda'" in capsys.readouterr().err


def test_finished_run_killed_before_rename_keeps_its_notebook(tmp_path, capsys):
    """Killed after papermill saved the finished notebook but before the rename: the notebook is kept."""
    _, _, resolved, out = runner.plan("05_self_distillation", {}, tmp_path)
    out.mkdir(parents=True)
    (out / "run.json").write_text("{}")
    done = {"cells": [{"cell_type": "code", "metadata": {"papermill": {"status": "completed"}}, "source": ""}]}
    (out / "notebook.partial.ipynb").write_text(json.dumps(done))
    assert runner.run("05_self_distillation", {}, results=tmp_path) == out
    assert (out / "notebook.ipynb").is_file() and not (out / "notebook.partial.ipynb").exists()
    assert "already finished" in capsys.readouterr().out


def test_a_seeded_verdict_on_fewer_than_3_seeds_is_inconclusive(tmp_path):
    from kdnb import report

    def record(name, seeds, values):
        d = tmp_path / "05_self_distillation" / name
        d.mkdir(parents=True)
        (d / "run.json").write_text(json.dumps({
            "notebook": "05_self_distillation", "params": {"profile": "reduced", "seeds": seeds},
            "claims": {"E3": {"values": values, "seeds": seeds}}, "metrics": {}}))

    record("reduced-a", [0, 1], [0.2041, 0.2041])
    row = next(r for r in report.rows(tmp_path) if r["claim"] == "E3")
    assert row["verdict"].startswith("inconclusive (n=2 < 3 seeds; these seeds say: ") and row["ci95"] is not None
    record("reduced-b", [2], [0.2041])
    row = next(r for r in report.rows(tmp_path) if r["claim"] == "E3")
    assert row["seeds"] == 3 and not row["verdict"].startswith("inconclusive")


def test_claims_without_a_reported_number_still_get_a_figure(tmp_path):
    """Issue 15 item 8: 03 (qualitative C1/C2) and 04 (stand-in claims) had no figure at all; our numbers are drawn
    alone, each element labelled from the card, and the panel says there is no reported number."""
    for seed in (1, 2, 3):
        _record(tmp_path, "03_dml_kd_calibration", f"reduced-{seed}", "reduced",
                {"C2": {"values": [[0.25, 0.14, 0.19, 0.02, 0.80, 0.81, 1.36, 0.64]], "seeds": [seed],
                        "verdict": "supported"}}, params=dc.PROFILES["reduced"])
        _record(tmp_path, "04_emnist_mlp_student", f"reduced-{seed}", "reduced",
                {"D3-mnist-standin": {"values": [98.4 + seed / 10], "seeds": [seed]}})
    table = report.rows(tmp_path)
    assert [r["claim"] for r in report.plotted(table, "03_dml_kd_calibration")] == ["C2"]
    assert [r["claim"] for r in report.plotted(table, "04_emnist_mlp_student")] == ["D3-mnist-standin"]
    fig = report.render_figure(table, "03_dml_kd_calibration")
    ax = fig.axes[0]
    assert ax.get_title(loc="left") == "C2 (no reported number)"
    assert [t.get_text() for t in ax.get_xticklabels()][:2] == ["train ECE s", "train ECE u"]
    report.write(tmp_path)
    assert (tmp_path / "figures" / "03_dml_kd_calibration.png").is_file()
    assert (tmp_path / "figures" / "04_emnist_mlp_student.png").is_file()
