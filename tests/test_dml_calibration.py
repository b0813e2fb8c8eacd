"""Study C (kdnb.dml_calibration): the C-Q11 eval-mode bug, DML_e = DML in gradient, validation accuracy as the
source averaged it, temperature scaling, ECE against torchmetrics, data splits, parameter checks and verdict rules."""
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from kdnb import dml_calibration as dc
from kdnb import losses, metrics, profiles

from conftest import real_data_root


def tiny_fmnist(n_train=24, n_test=40, seed=0) -> dc.Fmnist:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n_train, 1, 28, 28), generator=g, dtype=torch.uint8)
    y = torch.arange(n_train) % 10
    xt = torch.randint(0, 256, (n_test, 1, 28, 28), generator=g, dtype=torch.uint8)
    return dc.Fmnist(x, y, dc.normalise(xt[:10]), torch.arange(10), dc.normalise(xt), torch.arange(n_test) % 10, 20)


def params(**over):
    p = dict(dc.PROFILES["smoke"], batch_size=2, val_every=None)
    p.update(over)
    return p


def bn_batches_tracked(model) -> set[int]:
    return {int(m.num_batches_tracked) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}


def test_cq11_faithful_dml_trains_in_eval_mode_after_the_first_batch():
    fm = tiny_fmnist()  # 12 batches of 2
    p = params(num_students=2)
    bug = dc.train_algorithm("dml", fm, p, seed=0, progress=False, keep_models=True)
    fixed = dc.train_algorithm("dml_corrected", fm, p, seed=0, progress=False, keep_models=True)
    assert bug["trained_in_eval_mode"] and not fixed["trained_in_eval_mode"]
    for m in bug["models"]:  # one train-mode forward (batch 0), then BatchNorm statistics frozen
        assert bn_batches_tracked(m) == {1}
    for m in fixed["models"]:
        assert bn_batches_tracked(m) == {12}
    # the flag turns the bug off for 'dml' itself
    off = dc.train_algorithm("dml", fm, params(num_students=2, dml_students_stuck_in_eval=False), seed=0,
                             progress=False, keep_models=True)
    assert bn_batches_tracked(off["models"][0]) == {12}
    # other algorithms evaluate and return to train mode (the source evaluated a deep copy)
    base = dc.train_algorithm("baseline", fm, p, seed=0, progress=False, keep_models=True)
    assert bn_batches_tracked(base["models"][0]) == {12}


def test_dml_e_has_the_dml_gradient_unless_double_softmax():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 10, generator=g, requires_grad=True)
    peers = [torch.randn(6, 10, generator=g) * 3 for _ in range(2)]
    y = torch.randint(0, 10, (6,), generator=g)
    grads = {}
    for name, kw in {"dml": {}, "dml_e": {"use_ensemble": True}, "dml_e_cq2": {"use_ensemble": True, "apply_softmax": True}}.items():
        (grad,) = torch.autograd.grad(losses.dml_loss(z, peers, y, distil_weight=0.5, **kw), z)
        grads[name] = grad
    assert torch.allclose(grads["dml"], grads["dml_e"], atol=1e-7)
    assert not torch.allclose(grads["dml"], grads["dml_e_cq2"], atol=1e-4)
    # and by hand: w * (softmax z - mean_j softmax z_j) / B + (1 - w) * (softmax z - onehot) / B
    p = z.detach().softmax(1)
    q = torch.stack([pe.softmax(1) for pe in peers]).mean(0)
    expected = (0.5 * (p - q) + 0.5 * (p - F.one_hot(y, 10))) / 6
    assert torch.allclose(grads["dml"], expected, atol=1e-7)


def test_batch_mean_accuracy_overweights_the_last_batch():
    logits = torch.eye(3)[[0, 1, 0, 2, 2]]  # predictions 0 1 0 2 2
    y = torch.tensor([0, 1, 1, 0, 0])        # correct: 1 1 0 0 0 -> overall 0.4
    assert dc.batch_mean_accuracy(logits, y, 2) == pytest.approx((1.0 + 0.0 + 0.0) / 3)
    assert dc.batch_mean_accuracy(logits, y, 5) == pytest.approx(0.4)


def test_fit_temperature_recovers_the_scale():
    g = torch.Generator().manual_seed(0)
    true = torch.randn(20000, 10, generator=g) * 2
    y = torch.multinomial(true.softmax(1), 1, generator=g).squeeze(1)
    t = dc.fit_temperature(true * 3.0, y)  # over-confident by a factor 3
    assert t == pytest.approx(3.0, rel=0.05)
    assert metrics.nll(true * 3.0 / t, y) < metrics.nll(true * 3.0, y)


def test_calibration_ece_agrees_with_torchmetrics():
    from torchmetrics.classification import MulticlassCalibrationError

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5000, 10, generator=g) * 2.5
    y = torch.randint(0, 10, (5000,), generator=g)
    ref = MulticlassCalibrationError(num_classes=10, n_bins=15, norm="l1")(logits.softmax(1), y).item()
    assert abs(dc.calibration(logits, y)["ece"] - ref) < 1e-6
    # and ECE is not a constant: a sharper model on the same labels is less calibrated
    assert dc.calibration(logits * 4, y)["ece"] > dc.calibration(logits, y)["ece"] + 0.1


def test_log_freq_is_the_sources_rule_without_its_crash():
    assert dc.log_freq(59) == 5      # FMNIST, batch 1024 (C.4)
    assert dc.log_freq(5000) == 100
    assert dc.log_freq(5) == 1       # the source: 0, then modulo by zero


def test_randaugment_per_sample_is_seeded_and_varies_per_image():
    x = torch.randint(0, 256, (64, 1, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    torch.manual_seed(5)
    a = dc.randaugment(x, "per_sample")
    torch.manual_seed(5)
    b = dc.randaugment(x, "per_sample")
    assert a.dtype == torch.uint8 and a.shape == x.shape and torch.equal(a, b)
    assert not torch.equal(a, x)
    assert torch.equal(dc.randaugment(x, "none"), x)


def test_normalise_and_resize():
    x = torch.full((2, 1, 28, 28), 255, dtype=torch.uint8)
    z = dc.normalise(x)
    assert z.shape == (2, 3, 28, 28)
    assert torch.allclose(z, torch.full_like(z, (1 - 0.2860) / 0.3530))
    assert dc.resize(z, 14).shape == (2, 3, 14, 14) and dc.resize(z, None) is z


def test_load_fmnist_sample_split_is_balanced_and_disjoint():
    fm = dc.load_fmnist("sample", train_per_class=16, holdout_per_class=5, val_size=100)
    assert torch.equal(torch.bincount(fm.train_y), torch.full((10,), 16))
    assert torch.equal(torch.bincount(fm.holdout_y), torch.full((10,), 5))
    assert fm.train_x.shape == (160, 1, 28, 28) and fm.train_x.dtype == torch.uint8
    assert fm.test_x.shape == (500, 3, 28, 28) and fm.val_n == 100
    with pytest.raises(ValueError, match="train_per_class"):
        dc.load_fmnist("sample", train_per_class=199, holdout_per_class=5)


@pytest.mark.data
def test_load_fmnist_real_counts():
    root = real_data_root("FashionMNIST/raw")
    fm = dc.load_fmnist("real", train_per_class=None, holdout_per_class=500, data_dir=root)
    assert len(fm.train_y) == 55000 and len(fm.holdout_y) == 5000 and len(fm.test_y) == 10000
    assert torch.equal(torch.bincount(fm.train_y), torch.full((10,), 5500))


def test_finished_run_returns_from_its_checkpoint(tmp_path, monkeypatch):
    fm = tiny_fmnist()
    ck = tmp_path / "baseline.pt"
    a = dc.train_algorithm("baseline", fm, params(), seed=0, progress=False, checkpoint=ck)

    def no_training(*_, **__):  # every training batch is augmented first: a finished run must not train again
        raise AssertionError("a finished checkpoint was trained again")
    monkeypatch.setattr(dc, "randaugment", no_training)
    with pytest.raises(AssertionError, match="trained again"):  # the guard bites when there is no checkpoint
        dc.train_algorithm("baseline", fm, params(), seed=0, progress=False, checkpoint=None)
    b = dc.train_algorithm("baseline", fm, params(), seed=0, progress=False, checkpoint=ck)
    assert torch.equal(a["members"][0]["test_logits"], b["members"][0]["test_logits"])
    # 12 batches: log_freq = 1, the source's val_every = 2 * log_freq -> checks after batches 0, 2, ..., 10
    assert [c["step"] for c in a["members"][0]["checks"]] == [0, 2, 4, 6, 8, 10]


@pytest.mark.parametrize("name,value", [
    ("algorithms", ["baseline", "dmll"]), ("algorithms", []), ("num_students", 1), ("batch_size", 0),
    ("distil_weight", 1.5), ("temperature", 0), ("randaugment", "half"), ("dml_update", "sequential"),
    ("downscale_sizes", [28]), ("teacher_init", "coco"), ("dml_students_stuck_in_eval", "yes"),
    ("holdout_per_class", -1), ("student_arch", "vgg"),
])
def test_check_names_the_bad_parameter(name, value):
    p = profiles.resolve("03_dml_kd_calibration", profile="smoke", seeds=None)
    p[name] = value
    with pytest.raises(ValueError, match=name):
        dc.check(**p)


def test_too_few_steps_for_onecycle_is_a_clear_error():
    with pytest.raises(ValueError, match="batch_size"):
        dc.train_algorithm("baseline", tiny_fmnist(n_train=20), params(batch_size=4), seed=0, progress=False)


def test_c2_verdict_rules():
    def summary(**tf):
        rows = {"tfkd_smooth": dict(confidence=0.3, final_acc=0.8, entropy=2.0, train_batch_ece_last_epoch=0.4, ece=0.4),
                "tfkd": dict(confidence=0.85, final_acc=0.85, entropy=0.5, train_batch_ece_last_epoch=0.02, ece=0.03)}
        rows["tfkd"].update(tf)
        return pd.DataFrame(rows).T

    assert dc.c2_verdict(summary())["verdict"] == "supported"
    assert dc.c2_verdict(summary(final_acc=0.7))["verdict"] == "mixed"
    s = summary(entropy=2.5, train_batch_ece_last_epoch=0.5, final_acc=0.7)
    s.loc["tfkd_smooth", "confidence"] = 0.9
    assert dc.c2_verdict(s)["verdict"] == "not supported"


def test_c1_verdict_rules():
    def member(accs):
        return {"checks": [{"epoch": 1.0 + i, "val_acc": a} for i, a in enumerate(accs)]}

    results = {0: {"baseline": {"members": [member([0.80, 0.85, 0.86])]},
                   "dml": {"members": [member([0.50, 0.70, 0.55]), member([0.6, 0.6, 0.6])]},
                   "dml_e": {"members": [member([0.50, 0.70, 0.56])]},
                   "dml_corrected": {"members": [member([0.80, 0.84, 0.86])]}}}
    summary = pd.DataFrame({"final_acc": {"baseline": 0.86, "dml": 0.55, "dml_e": 0.56, "dml_corrected": 0.86}})
    out = dc.c1_verdict(results, summary, after_epoch=1.5)["by_setting"]
    assert out["with C-Q11"]["verdict"] == "supported"
    assert out["with C-Q11"]["values"][3] == pytest.approx(0.15)
    assert out["without C-Q11"]["verdict"] == "not supported"
    assert set(out["without C-Q11"]["parts"]) == {"low accuracy", "unstable"}  # dml_e_corrected not run
    # the first half of training does not count: a baseline dip there changes nothing
    results[0]["baseline"]["members"][0]["checks"].insert(0, {"epoch": 0.5, "val_acc": 0.95})
    assert dc.c1_verdict(results, summary, after_epoch=1.5)["by_setting"]["with C-Q11"]["verdict"] == "supported"
    # but a late one does: twice the baseline's late drop is then required
    results[0]["baseline"]["members"][0]["checks"].append({"epoch": 4.0, "val_acc": 0.70})
    late = dc.c1_verdict(results, summary, after_epoch=1.5)["by_setting"]["with C-Q11"]
    assert late["parts"]["unstable"] is False and late["verdict"] == "mixed"


def test_alternating_dml_and_cross_quality_paths_run_and_differ():
    fm = tiny_fmnist()
    sim = dc.train_algorithm("dml_corrected", fm, params(num_students=2), seed=0, progress=False)
    alt = dc.train_algorithm("dml_corrected", fm, params(num_students=2, dml_update="alternating"), seed=0, progress=False)
    # student 0 is updated first in both orders; student 1 sees student 0's updated logits only when alternating
    assert not torch.equal(sim["members"][1]["test_logits"], alt["members"][1]["test_logits"])
    teacher = dc.build_model("resnet18", 7, "cpu").eval().requires_grad_(False)
    low = dc.train_algorithm("crossq", fm, params(), seed=0, size=14, teacher=teacher, progress=False)
    full = dc.train_algorithm("crossq", fm, params(teacher_sees_full_res=True), seed=0, size=14, teacher=teacher,
                              progress=False)
    assert low["size"] == 14 and low["members"][0]["test_logits"].shape == (40, 10)
    assert not torch.equal(low["members"][0]["test_logits"], full["members"][0]["test_logits"])  # C-Q5 matters


def test_only_a_run_with_the_sources_flags_and_cohorts_speaks_to_a_claim(tmp_path):
    import json

    from kdnb import report

    reduced = profiles.resolve("03_dml_kd_calibration", **{**{k: None for k in dc.PROFILES["reduced"]},
                                                           "profile": "reduced"})
    assert dc.claim_applies("C1", reduced) and dc.claim_applies("C2", reduced)
    for flag, (_, corrected) in dc.QUIRKS.items():
        assert not dc.claim_applies("C1", dict(reduced, **{flag: corrected}))
    faithful_row = dict(reduced, **dc.ABLATION_STARTS["faithful"])  # baseline and dml only: no dml_e, no tfkd
    assert not dc.claim_applies("C1", faithful_row) and not dc.claim_applies("C2", faithful_row)
    # the report drops the claim of an ablation record made before the notebook asked (it has dml_e = None)
    for run_id, params, value in [("reduced-full", reduced, [0.74, 0.74, 0.83, 0.02, 0.01]),
                                  ("reduced-row", dict(faithful_row, dml_update="alternating", seeds=[43]),
                                   [0.70, None, 0.83, 0.02, 0.01])]:
        d = tmp_path / "03_dml_kd_calibration" / run_id
        d.mkdir(parents=True)
        (d / "run.json").write_text(json.dumps({"notebook": "03_dml_kd_calibration", "params": params, "claims": {
            "C1": {"values": [value], "seeds": params["seeds"], "verdict": "mixed"}}}))
    row = next(r for r in report.rows(tmp_path) if r["claim"] == "C1")
    assert row["runs"] == ["03_dml_kd_calibration/reduced-full"] and row["seeds"] == 1
