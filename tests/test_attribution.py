"""Issue 12: one quirk at a time (kdnb.attribution, `kdnb sweep --ablate`) and the verdict rule with seed statistics."""
import json
import math

import pytest

from kdnb import attribution, cli, report, runs, sweep
from kdnb import unseen_classes as uc

NB = "01_mnist_unseen_classes"
FAITHFUL, CORRECTED = uc.VARIANTS["faithful"], uc.VARIANTS["corrected"]
PLATEAU = {"lr_schedule": "plateau", "es_patience": 15, "select": "best_val"}


def test_points_change_one_flag_from_either_end_and_add_the_protocol_row():
    pts = attribution.points(NB)
    assert len(pts) == 2 * (1 + len(uc.QUIRKS) + 1) == 14
    for start, change, params in pts:
        assert params["variants"] == [start]
        flags = uc.variant_flags(start, params)
        ends = FAITHFUL if start == "faithful" else CORRECTED
        moved = {k for k in flags if flags[k] != ends[k]}
        if change == "none" or change.startswith("protocol:"):
            assert moved == set()
        else:
            (flag,) = moved  # exactly one flag, moved to the other end's value
            other = CORRECTED if start == "faithful" else FAITHFUL
            assert flags[flag] == other[flag] and change == f"{flag}={other[flag]}"
    assert ("faithful", "teacher_source=train_on_train") in [(s, c) for s, c, _ in pts]
    assert ("corrected", "protocol: lr_schedule=constant es_patience=70 select=final") in [(s, c) for s, c, _ in pts]


def test_classify_a_model_by_its_flags_and_protocol():
    one = dict(FAITHFUL, validation="heldout")
    assert attribution.classify(uc, {"flags": FAITHFUL, "protocol": PLATEAU}) == [("faithful", "none")]
    assert attribution.classify(uc, {"flags": one, "protocol": PLATEAU}) == [("faithful", "validation=heldout")]
    assert attribution.classify(uc, {"flags": CORRECTED, "protocol": dict(uc.PROTOCOL)}) == [
        ("corrected", "protocol: lr_schedule=constant es_patience=70 select=final")]
    two = dict(FAITHFUL, validation="heldout", val_loss="nll")
    assert attribution.classify(uc, {"flags": two, "protocol": PLATEAU}) == []  # two flags away from both ends
    half = dict(PLATEAU, lr_schedule="constant")  # part of the protocol row only: neither row
    assert attribution.classify(uc, {"flags": FAITHFUL, "protocol": half}) == []
    assert attribution.classify(uc, {"flags": one, "protocol": dict(uc.PROTOCOL)}) == []  # a flag *and* the protocol


def test_t_interval_by_hand():
    mean, std, lo, hi = attribution.t_interval([1.0, 2.0, 3.0])
    half = 4.302652729749464 / math.sqrt(3)  # t(0.975, 2) * std 1 / sqrt(3)
    assert (mean, std) == (2.0, 1.0)
    assert lo == pytest.approx(2.0 - half, abs=1e-12) and hi == pytest.approx(2.0 + half, abs=1e-12)
    assert attribution.t_interval([5.0])[2:] == (None, None)


def _record(run_id, finished, students, **params):
    base = dict(uc.PROFILES["full"], profile="full")
    base.update(params)
    return {"notebook": NB, "run_id": run_id, "finished": finished, "params": base, "_dir": f"/x/{run_id}",
            "metrics": {"students": students}}


def _student(seed, flags, value, cell=None):
    cell = cell or {"temperature": 10.0, "soft_weight": 0.9, "lr": 0.01}
    return {"seed": seed, "flags": flags, "unseen_mean": value, **cell}


def test_rows_count_each_seed_once_newest_first_and_compute_the_deltas():
    recs = [
        # an old 2-variant run: its faithful seed 0 is superseded by the newer single-seed run below
        _record("full-old", "2026-01-01T00:00:00", [_student(0, FAITHFUL, 50.0), _student(0, CORRECTED, 10.0),
                                                     _student(1, CORRECTED, 20.0)], seeds=[0, 1]),
        _record("full-new0", "2026-02-01T00:00:00", [_student(0, FAITHFUL, 90.0)], seeds=[0]),
        _record("full-new1", "2026-02-01T00:00:00", [_student(1, FAITHFUL, 92.0)], seeds=[1]),
        _record("full-new2", "2026-02-01T00:00:00", [_student(2, FAITHFUL, 94.0)], seeds=[2]),
        _record("full-vh", "2026-02-02T00:00:00", [_student(s, dict(FAITHFUL, validation="heldout"), v)
                                                  for s, v in ((0, 80.0), (1, 84.0))], seeds=[0, 1]),
        # another temperature, teacher recipe or profile is not A1's configuration: never counted, never a
        # replacement for a seed's value although newer
        _record("full-T5", "2026-02-03T00:00:00", [_student(3, FAITHFUL, 1.0, {"temperature": 5.0, "soft_weight": 0.9,
                                                                              "lr": 0.01})], temperature=5.0, seeds=[3]),
        _record("full-h1000", "2026-03-01T00:00:00", [_student(0, FAITHFUL, 1.0)], heldout_size=1000, seeds=[0]),
        _record("reduced-x", "2026-03-01T00:00:00", [_student(1, FAITHFUL, 1.0)], profile="reduced", seeds=[1]),
    ]
    table = {(r["start"], r["change"]): r for r in attribution.rows(recs) if r["notebook"] == NB}
    f = table[("faithful", "none")]
    assert (f["n_seeds"], f["mean"], f["seeds"]) == (3, 92.0, [0, 1, 2])  # 90, 92, 94: not the old 50
    assert f["run_ids"] == "full-new0;full-new1;full-new2" and f["delta_vs_start"] == 0.0
    v = table[("faithful", "validation=heldout")]
    # paired over seeds 0 and 1: (80 - 90 + 84 - 92) / 2, not 82 - 92 (the start's mean over 3 seeds)
    assert (v["n_seeds"], v["mean"], v["delta_vs_start"], v["n_paired"]) == (2, 82.0, -9.0, 2)
    half = 12.706204736174696 * math.sqrt(2) / math.sqrt(2)  # t(0.975, 1) * std of (-10, -8) / sqrt(2)
    assert v["delta_low"] == pytest.approx(-9.0 - half) and v["delta_high"] == pytest.approx(-9.0 + half)
    c = table[("corrected", "none")]
    assert (c["n_seeds"], c["mean"], c["run_ids"]) == (2, 15.0, "full-old")
    text = attribution.csv_text(attribution.rows(recs))
    assert text.splitlines()[0].split(",") == attribution.COLUMNS
    md = attribution.markdown(attribution.rows(recs), NB)
    assert "| faithful | `validation=heldout` | 2 | 82.00 |" in md
    assert "fewer than 3 seeds paired with the start on some row, inconclusive" in md  # validation=heldout: 2
    assert "fewer than 3 seeds at an end: inconclusive." in md  # corrected has 2 seeds


def test_sentences_name_the_single_change_that_moves_it_most():
    start = {"faithful": {0: 97.0, 1: 97.5, 2: 96.5}, "corrected": {0: 80.0, 1: 80.5, 2: 79.5}}

    def row(s, change, values):
        values = dict(enumerate(values))
        mean, std, lo, hi = attribution.t_interval(list(values.values()))
        d, d_lo, d_hi, n = (0.0, None, None, 3) if change == "none" else attribution.paired_delta(values, start[s])
        return {"start": s, "change": change, "n_seeds": len(values), "mean": mean, "std": std, "ci95_low": lo,
                "ci95_high": hi, "delta_vs_start": d, "delta_low": d_lo, "delta_high": d_hi, "n_paired": n}
    rs = [row("faithful", "none", start["faithful"].values()), row("faithful", "a=1", [80.0, 81.0, 79.0]),
          row("faithful", "b=1", [96.9, 97.6, 96.4]), row("corrected", "none", start["corrected"].values())]
    text = "\n".join(attribution.sentences(rs, 97.3))
    assert "a gap of -17.00" in text
    assert "correcting `a=1` alone moves it by -17.00 (100 % of the way to corrected), paired interval" in text
    assert "excludes 0" in text
    assert "no other single change moves it beyond seed noise" in text  # b=1: paired (-0.1, 0.1, -0.1) spans 0
    # ends whose intervals overlap: the gap is noise, and no share of it is computed
    rs[3] = row("corrected", "none", [97.2, 96.0, 98.1])
    text = "\n".join(attribution.sentences(rs, 97.3))
    assert "intervals overlap: no gap beyond seed noise" in text and "% of the way" not in text
    assert "correcting `a=1` alone moves it by -17.00, paired interval" in text


@pytest.mark.parametrize("diff, ci, tol, verdict", [
    ([0.5, -0.9], [0.4, 0.4], 1.0, "reproduced"),
    ([0.5, -1.3], [0.4, 0.4], 1.0, "reproduced"),        # 1.3 <= 1 + 0.4: inside the widened interval
    ([0.5, -1.5], [0.4, 0.4], 1.0, "not reproduced"),
    (2.0, None, 1.0, "not reproduced"),                   # exact (seedless) value: the tolerance alone
    (0.2, 1.5, 1.0, "inconclusive"),                      # the interval is wider than the tolerance
    (5.0, 1.5, 1.0, "not reproduced"),                    # ... but the miss is clear even so
    (float("nan"), None, 1.0, "no values"),
])
def test_verdict_rule(diff, ci, tol, verdict):
    assert report.judge(diff, ci, tol).startswith(verdict)


def test_sweep_ablate_plans_every_row_times_every_seed(tmp_path):
    pts = [p for _, _, p in attribution.points(NB)]
    trials = sweep.plan(NB, {}, seeds=[0, 1], fixed={"profile": "full"}, results=tmp_path, points=pts)
    assert len(trials) == 28 and len({t.out for t in trials}) == 28
    assert all(t.resolved["seeds"] in ([0], [1]) for t in trials)
    with pytest.raises(ValueError, match="--ablate .* cannot take --grid"):
        sweep.plan(NB, {"lr": [0.1]}, seeds=[0], results=tmp_path, points=pts)
    with pytest.raises(ValueError, match="'variants' is given both"):
        sweep.plan(NB, {}, seeds=[0], fixed={"variants": ["faithful"]}, results=tmp_path, points=pts)


def test_ablate_on_a_study_without_quirks_is_one_line(capsys):
    assert cli.main(["sweep", "02_voc_segmentation_kd", "--ablate", "--seeds", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "declares no quirk flags to ablate" in err and "01_mnist_unseen_classes" in err


def test_lr_schedule_is_checked_and_its_default_keeps_committed_run_ids():
    params = dict(uc.PROFILES["full"], profile="full", device="cpu", download=False)
    with pytest.raises(ValueError, match="lr_schedule='cosine'"):
        uc.check(**{k: v for k, v in dict(params, lr_schedule="cosine").items() if k not in ("profile", "device", "download")})
    assert runs.run_id(params) == runs.run_id({k: v for k, v in params.items() if k != "lr_schedule"})
    assert runs.run_id(params) != runs.run_id(dict(params, lr_schedule="constant"))


def test_report_writes_attribution_csv_with_the_issue_columns(tmp_path):
    folder = tmp_path / NB / "full-abc"
    folder.mkdir(parents=True)
    rec = _record("full-abc", "2026-02-01T00:00:00", [_student(s, FAITHFUL, 90.0 + s) for s in range(3)], seeds=[0, 1, 2])
    rec.pop("_dir")
    (folder / "run.json").write_text(json.dumps(rec))
    report.write(tmp_path)
    lines = (tmp_path / "attribution.csv").read_text().splitlines()
    assert lines[0] == ("notebook,claim,start,change,n_seeds,metric,mean,std,ci95_low,ci95_high,delta_vs_start,"
                        "run_ids")
    assert lines[1].startswith(f"{NB},A1,faithful,none,3,unseen_mean,91.0000,1.0000,")
    assert (tmp_path / attribution.figure_path(NB)).is_file()
    assert "### Why not: one quirk at a time" in (tmp_path / "README.md").read_text()


def test_two_flag_study_covers_its_rows_with_two_runs_per_seed(tmp_path):
    """04: both t2_scaling values train in one run, so `--ablate` runs validation=test and =holdout per seed, at the
    study's attribution profile unless one is given; a model one flag from both ends belongs to two rows."""
    from kdnb import emnist_student as es

    pts = [p for _, _, p in attribution.points("04_emnist_mlp_student")]
    assert len(pts) == 6
    trials = sweep.plan("04_emnist_mlp_student", {}, seeds=[0], fixed={"profile": es.ATTRIBUTION_PROFILE},
                        results=tmp_path, points=es.ABLATION_RUNS)
    assert [t.resolved["validation"] for t in trials] == ["test", "holdout"]
    assert all(t.resolved["t2_scaling"] == [False, True] and t.resolved["profile"] == "reduced" for t in trials)
    mixed = {"flags": {"t2_scaling": True, "validation": "test"}, "protocol": {}}
    assert attribution.classify(es, mixed) == [("faithful", "t2_scaling=True"), ("corrected", "validation=test")]


def test_ablate_runs_the_study_attribution_profile_unless_told(monkeypatch):
    seen = []

    def fake_plan(notebook, grid, **kw):
        seen.append(kw)
        raise ValueError("planned")
    monkeypatch.setattr(sweep, "plan", fake_plan)
    for nb, profile, n in ((NB, "full", 14), ("04_emnist_mlp_student", "reduced", 2)):
        with pytest.raises(ValueError, match="planned"):
            sweep.sweep(nb, seeds=[0], ablate=True, progress=False)
        assert seen[-1]["fixed"]["profile"] == profile and len(seen[-1]["points"]) == n
    with pytest.raises(ValueError, match="profile='reduced' is not allowed: --ablate runs 01_mnist_unseen_classes's "
                                         "attribution profile 'full'"):
        sweep.sweep(NB, seeds=[0], fixed={"profile": "reduced"}, ablate=True, progress=False)


def test_two_runs_per_seed_fill_all_six_rows_of_04():
    from kdnb import emnist_student as es

    def rec(validation, seed):
        students = [{"model": "mlp", "seed": seed, "t2_scaling": None, "test_acc": 0.98}] + [
            {"model": "kd", "seed": seed, "t2_scaling": t2, "test_acc": 0.98 + 0.001 * t2 + 0.002 * (validation == "test")}
            for t2 in (False, True)]
        params = dict(es.PROFILES["reduced"], profile="reduced", validation=validation, seeds=[seed])
        return {"notebook": "04_emnist_mlp_student", "run_id": f"reduced-{validation}-{seed}", "finished": "x",
                "params": params, "metrics": {"students": students}, "_dir": "/x"}
    recs = [rec(v, s) for v in ("test", "holdout") for s in range(3)]
    table = [r for r in attribution.rows(recs) if r["notebook"] == "04_emnist_mlp_student"]
    assert [(r["start"], r["change"]) for r in table] == [(s, c) for s, c, _ in attribution.points("04_emnist_mlp_student")]
    assert all(r["n_seeds"] == 3 for r in table)
    by = {(r["start"], r["change"]): r for r in table}
    assert by[("faithful", "t2_scaling=True")]["delta_vs_start"] == pytest.approx(0.1)
    assert by[("corrected", "validation=test")]["delta_vs_start"] == pytest.approx(0.2)


def test_05_declares_its_two_flags_and_reads_records_made_before_they_were_parameters():
    from kdnb import self_distillation as sd

    assert [c for s, c, _ in attribution.points("05_self_distillation")] == [
        "none", "teacher_bn_train_mode=False", "shuffle=True", "none", "teacher_bn_train_mode=True", "shuffle=False"]
    params = dict(sd.PROFILES["reduced"], profile="reduced")  # no flag keys: made before they were parameters
    rows = [{"variant": v, "seed": 0, "alpha": a, "step": st, "final_acc": acc} for v, a, st, acc in (
        ("faithful", None, 0, 0.40), ("faithful", 0.6, 2, 0.45), ("faithful", 0.0, 2, 0.30),
        ("corrected", None, 0, 0.42), ("corrected", 0.6, 2, 0.43))]
    got = sd.attribution_samples("E4", params, {"resnet_rows": rows})
    assert [(s["flags"], s["value"]) for s in got] == [(sd.VARIANTS["faithful"], 5.0), (sd.VARIANTS["corrected"], 1.0)]
    runs_ = [dict(params, **run) for run in sd.ABLATION_RUNS]
    covered = {key for run in runs_ for v in run["variants"]
               for key in attribution.classify(sd, {"flags": sd.variant_flags(v, run), "protocol": {}})}
    assert covered == {(s, c) for s, c, _ in attribution.points("05_self_distillation")}  # 3 runs, all 6 rows
    # the first is the profile's own run: a seed's claim record (reduced-88b2c1dda6 for seed 0) is its endpoints
    assert sd.ABLATION_RUNS[0] == {} and sd.claim_applies("E4", runs_[0])
    with pytest.raises(ValueError, match="shuffle='yes'"):
        sd.check(**dict(params, shuffle="yes"))
    assert sd.variant_flags("corrected", dict(params, shuffle=False)) == {"teacher_bn_train_mode": False, "shuffle": False}


def test_03_attributes_c1_to_its_three_dml_flags(tmp_path):
    from kdnb import dml_calibration as dc

    pts = attribution.points("03_dml_kd_calibration")
    assert [c for s, c, _ in pts] == ["none", "dml_students_stuck_in_eval=False", "dml_update=alternating",
                                      "shuffle=True", "none", "dml_students_stuck_in_eval=True",
                                      "dml_update=simultaneous", "shuffle=False"]
    assert all(p["algorithms"] == ["baseline", "dml"] for _, _, p in pts)  # no teacher, no other run
    params = dict(dc.PROFILES["reduced"], profile="reduced", seeds=[7], shuffle=True)
    members = [{"run": "dml", "seed": 7, "final_acc": a} for a in (0.70, 0.72, 0.74)] + \
              [{"run": "baseline", "seed": 7, "final_acc": 0.80}, {"run": "kd", "seed": 7, "final_acc": 0.9}]
    got = dc.attribution_samples("C1", params, {"members": members})
    assert got == [{"flags": {"dml_students_stuck_in_eval": True, "dml_update": "simultaneous", "shuffle": True},
                    "protocol": {}, "seed": 7, "value": -8.0}]  # mean(0.70, 0.72, 0.74) - 0.80 = -0.08
    assert attribution.classify(dc, got[0]) == [("faithful", "shuffle=True")]
    assert dc.attribution_samples("C1", params, {"members": members[:3]}) == []  # no baseline: no sample
    assert attribution.same_configuration("03_dml_kd_calibration", dict(params, algorithms=["baseline", "dml"]))
    old = dict(params, train_per_class=300, epochs=3, teacher_epochs=3, batch_size=64, val_every=16)
    del old["precision"]  # a record of the fp32 profile reduced had before it grew
    assert not attribution.same_configuration("03_dml_kd_calibration", old)
    trials = sweep.plan("03_dml_kd_calibration", {}, seeds=[42, 43, 44], results=tmp_path, points=[p for *_, p in pts])
    assert len(trials) == 24
