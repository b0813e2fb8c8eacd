import math

import numpy as np
import pytest
import torch

from kdnb import data, models, profiles, runner, train
from kdnb import unseen_classes as uc

KEPT = [0, 1, 2, 3, 4, 5]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # these models are tiny: one thread is faster, and immune to other jobs holding the cores
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny_mnist(n_train=40, n_test=20, seed=0) -> uc.Mnist:
    """n images per digit of random pixels: enough to exercise every code path in well under a second."""
    g = torch.Generator().manual_seed(seed)
    tr_y, te_y = torch.arange(10).repeat_interleave(n_train), torch.arange(10).repeat_interleave(n_test)
    tr_x = torch.randint(0, 256, (len(tr_y), 28, 28), generator=g, dtype=torch.uint8)
    te_x = torch.randint(0, 256, (len(te_y), 28, 28), generator=g, dtype=torch.uint8)
    return uc.Mnist(data.to_float(tr_x), tr_y, data.to_float(te_x), te_x.unsqueeze(1).float(), te_y, "sample")


def _smoke(**override):
    return dict(profiles.resolve("01_mnist_unseen_classes", profile="smoke"), **override)


def _student(mnist, teacher, **kw):
    args = dict(kept_classes=KEPT, seed=0, temperature=10.0, soft_weight=0.9, lr=0.01, epochs=3, batch_size=32,
                es_patience=15, select="best_val", student="mlp", validation="test", val_loss="source",
                heldout_size=20)
    return uc.train_student(mnist, teacher, **dict(args, **kw))


@pytest.mark.parametrize("build,count", [(lambda: models.TeacherMLP(), 468_874),
                                         (lambda: models.student_mlp("mlp"), 155_830),
                                         (lambda: models.student_mlp("linear"), 7_850)])
def test_parameter_counts(build, count):
    assert models.count_parameters(build()) == count


@pytest.mark.parametrize("override,name", [
    ({"kept_classes": []}, "kept_classes"), ({"kept_classes": [0, 1, 1]}, "kept_classes"),
    ({"kept_classes": [0, 10]}, "kept_classes"), ({"kept_classes": [-1, 2]}, "kept_classes"),
    ({"kept_classes": "012"}, "kept_classes"),
    ({"soft_weight": -0.1}, "soft_weight"), ({"soft_weight": 1.5}, "soft_weight"),
    ({"soft_weight": [0.0, 1.2]}, "soft_weight"), ({"temperature": 0}, "temperature"),
    ({"temperature": -2.0}, "temperature"), ({"temperature": [2.5, 0.0]}, "temperature"), ({"temperature": []}, "temperature"),
    ({"lr": 0}, "lr"), ({"epochs": 0}, "epochs"), ({"batch_size": 0}, "batch_size"), ({"es_patience": 0}, "es_patience"),
    ({"select": "best"}, "select"), ({"student": "cnn"}, "student"), ({"variants": ["fast"]}, "variants"),
    ({"variants": []}, "variants"), ({"teacher_source": "shipped"}, "teacher_source"),
    ({"validation": "train"}, "validation"), ({"val_loss": "kl"}, "val_loss"),
    ({"teacher_dropout_at_inference": 1}, "teacher_dropout_at_inference"),
    ({"eval_unscaled_inputs": "yes"}, "eval_unscaled_inputs"), ({"heldout_size": 0}, "heldout_size"),
    ({"data_source": "subset"}, "data_source"), ({"teacher_lr": -1.0}, "teacher_lr"),
])
def test_bad_parameters_name_themselves(override, name):
    with pytest.raises(ValueError, match=rf"^{name}="):
        uc.check(**_smoke(**override))


def test_profiles_flags_and_grid():
    p = profiles.resolve("01_mnist_unseen_classes", profile="full", lr=None, temperature=[2.5, 10])
    assert p["epochs"] == 70 and p["seeds"] == [0, 1, 2] and p["data_source"] == "real" and p["kept_classes"] == KEPT
    uc.check(**p)
    assert [c["temperature"] for c in uc.cells(p)] == [2.5, 10.0]
    assert uc.variant_flags("faithful", p)["teacher_source"] == "train_on_test"
    assert uc.variant_flags("corrected", dict(p, validation="test"))["validation"] == "test"   # explicit flag wins
    _, _, resolved, _ = runner.plan("01_mnist_unseen_classes", {"profile": "full", "soft_weight": [0.0, 0.9]})
    assert resolved["soft_weight"] == [0.0, 0.9] and resolved["temperature"] == 10.0


def test_held_out_classes_never_reach_the_student(monkeypatch):
    mnist = _tiny_mnist()
    sd = uc.student_data(mnist, KEPT, validation="heldout", heldout_size=20, seed=0)
    assert set(sd.train.y.tolist()) == set(KEPT) and set(sd.val.y.tolist()) <= set(KEPT)
    assert {6, 7, 8, 9} <= set(sd.bias_set.y.tolist())
    seen = []
    real = uc.sgd_kd_step

    def spy(loader, labels, **kw):   # every label of every batch the training step sees
        step = real(loader, labels, **kw)

        def spied(model, opt, xb, idx):
            seen.append(labels.index_select(0, idx))
            return step(model, opt, xb, idx)
        return spied

    monkeypatch.setattr(uc, "sgd_kd_step", spy)
    teacher = models.TeacherMLP(dropout_at_inference=True).eval()
    _, sd, res = _student(mnist, teacher, epochs=2)
    labels = torch.cat(seen)
    assert set(labels.tolist()) == set(KEPT) and len(labels) == 2 * len(sd.train) == 2 * 6 * 40
    assert res.stopped_epoch == 2


def test_teacher_targets_match_the_teacher():
    x = _tiny_mnist().train_x[:100]
    t = models.TeacherMLP(dropout_at_inference=False).eval()
    torch.testing.assert_close(uc.TeacherTargets(t, x, chunk=32).for_epoch(), t(x))     # exact path, no dropout
    t.dropout_at_inference = True
    targets = uc.TeacherTargets(t, x)
    assert not torch.equal(targets.for_epoch(), targets.for_epoch())                    # A-Q2: a fresh draw each time
    h = torch.ones(2000, 512)
    kept = uc.dropout_half(h)
    assert set(kept.unique().tolist()) == {0.0, 2.0} and abs((kept > 0).float().mean().item() - 0.5) < 0.01


def test_teacher_cache_hit_and_miss():
    mnist = _tiny_mnist()
    cfg = uc.teacher_config(mnist, teacher_source="train_on_train", dropout_at_inference=False, seed=0, epochs=1,
                            lr=1e-3, heldout_size=50)
    t1, info1 = uc.get_teacher(mnist, cfg)
    t2, info2 = uc.get_teacher(mnist, cfg)
    assert not info1["cache_hit"] and info2["cache_hit"] and info1["path"] == info2["path"]
    assert str(data.cache_dir()) in info1["path"]
    assert all(torch.equal(a, b) for a, b in zip(t1.state_dict().values(), t2.state_dict().values()))
    _, info3 = uc.get_teacher(mnist, dict(cfg, lr=2e-3))
    assert not info3["cache_hit"] and info3["path"] != info1["path"]
    faithful = uc.teacher_config(mnist, teacher_source="train_on_test", dropout_at_inference=True, seed=0, epochs=1,
                                 lr=1e-3, heldout_size=50)
    assert train.config_hash(faithful) != train.config_hash(cfg) and faithful["heldout_size"] is None


def test_faithful_val_loss_floor():
    n = 10_000                                       # the MNIST test set: 312 batches of 32 and one of 16
    y = torch.arange(n) % 10
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    perfect = torch.nn.functional.one_hot(y, 10).float() * 1e4
    floor = math.log(1 + 9 / math.e) / 32
    assert uc.source_val_loss(perfect, y, order).item() == pytest.approx(floor, abs=1e-6)
    assert floor == pytest.approx(0.045661, abs=1e-6)
    assert uc.source_val_loss(torch.zeros(n, 10), y, order).item() == pytest.approx(math.log(10) / 32, abs=1e-6)


def test_bias_curve_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(300, 10, generator=g) * 3, torch.randint(0, 10, (300,), generator=g)
    unseen = [6, 7, 8, 9]
    grid = torch.tensor([0.0, 0.5, 1.3, 2.0, 4.0, 9.0])
    curve = uc.bias_curve(logits, y, unseen, grid)
    for b, value in zip(grid.tolist(), curve):
        acc = 100 * np.nanmean(uc.metrics.per_class_accuracy(uc.add_unseen_bias(logits, unseen, b), y, 10))
        assert value == pytest.approx(acc, abs=1e-9)


def test_smoke_pipeline_reports_ten_classes_and_records_no_claim():
    params = _smoke(epochs=1)
    mnist = uc.load_mnist("sample")
    teachers = uc.teachers_for(mnist, params)
    rows = uc.run(mnist, teachers, params, log=lambda *_: None)
    assert [r["variant"] for r in rows] == ["faithful", "corrected"]
    for r in rows:
        assert len(r["per_class"]) == 10 and len(r["per_class_bias"]) == 10 and r["train_classes"] == KEPT
        assert np.array(r["confusion"]).sum() == len(mnist.test_y)
        assert r["unseen_mean"] == pytest.approx(np.mean(r["per_class"][6:]))
    assert rows[0]["history"][0]["val_loss"] == rows[0]["history"][0]["val_loss_source"]
    assert rows[1]["history"][0]["val_loss"] == rows[1]["history"][0]["val_nll"]
    assert uc.claim_values(params, rows) == {}                     # smoke: conditions (epochs, data) not met
    rec = uc.metrics_record(rows, KEPT)
    assert len(rec["summary"]) == 2 and len(rec["summary"][0]["per_class_mean"]) == 10
    flat = {f"{s['variant']} {s['cell']}": s["unseen_mean"] for s in rec["summary"]}
    assert rec["unseen_mean"] == flat and len(flat) == 2              # what kdnb sweep's summary shows


def test_claims_need_their_conditions():
    row = {"variant": "faithful", "cell": "c", "temperature": 10.0, "soft_weight": 0.9, "lr": 0.01, "seed": 0,
           "flags": dict(uc.VARIANTS["faithful"]), "per_class": list(range(90, 100)), "mean": 94.5}
    full = profiles.resolve("01_mnist_unseen_classes", profile="full")
    assert uc.claim_values(full, [row])["A1"]["values"] == [[96, 97, 98, 99]]
    grid = dict(full, temperature=[10.0, 20.0])
    assert set(uc.claim_values(grid, [row])) == {"A1", "A3-lr0.01-T10"}   # kdnb report counts each seed once
    assert uc.claim_values(dict(full, epochs=10), [row]) == {}
    assert uc.claim_values(full, [dict(row, flags=dict(uc.VARIANTS["corrected"]))]) == {}
    errors = {"on_scaled": [12, 14], "off_scaled": 0, "train_acc_off": 0.966}
    assert uc.a5_values(full, [row], uc.VARIANTS["faithful"], errors)["values"] == [12, 14]
    assert uc.a5_values(dict(full, epochs=10), [row], uc.VARIANTS["faithful"], errors) is None


def test_interrupted_student_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    mnist = _tiny_mnist()
    teacher = models.TeacherMLP(dropout_at_inference=True).eval()
    ref, _, ref_res = _student(mnist, teacher)
    real = uc.make_evaluate

    def interrupting(*a, **kw):
        evaluate, calls = real(*a, **kw), []

        def wrapped(model):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return evaluate(model)
        return wrapped

    monkeypatch.setattr(uc, "make_evaluate", interrupting)
    with pytest.raises(KeyboardInterrupt):
        _student(mnist, teacher, checkpoint=tmp_path / "ck.pt")
    monkeypatch.setattr(uc, "make_evaluate", real)
    model, _, res = _student(mnist, teacher, checkpoint=tmp_path / "ck.pt")
    assert res.resumed_from == 1 and res.stopped_epoch == 3
    assert [h["val_loss"] for h in res.history] == [h["val_loss"] for h in ref_res.history]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))


def _fused_vs_autograd(kind, optimizer_kwargs=None, epochs=2):
    """Train the same student twice from the same seed: autograd + torch SGD on kd_loss, and sgd_kd_step."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(200, 1, 28, 28, generator=g), torch.randint(0, 6, (200,), generator=g)
    torch.manual_seed(2)  # the teacher's init, so the test does not depend on what ran before it
    teacher = models.TeacherMLP(dropout_at_inference=True).eval()
    out = []
    for fused in (False, True):
        train.seed_everything(0)
        model = models.student_mlp(kind)
        init = [p.detach().clone() for p in model.parameters()]
        loader = uc.DistillLoader(x, uc.TeacherTargets(teacher, x), 32, seed=0)
        step = uc.sgd_kd_step(loader, y, temperature=4.0, soft_weight=0.7) if fused else None
        res = train.fit(model, loader, uc.kd_loss(loader, y, temperature=4.0, soft_weight=0.7), epochs=epochs,
                        optimizer="sgd", lr=0.5, optimizer_kwargs=optimizer_kwargs, progress=False, step=step)
        out.append((model, [h["train_loss"] for h in res.history], init))
    return out


@pytest.fixture
def _float64():
    # in float64 the two paths agree to rounding (1e-12); in float32 rounding alone grows to ~1e-5 at lr 0.5
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_hand_written_sgd_step_matches_autograd(kind, _float64):
    (ref, ref_loss, init), (fused, fused_loss, init_fused) = _fused_vs_autograd(kind)
    assert all(torch.equal(a, b) for a, b in zip(init, init_fused))  # the same start
    # lr 0.5 so that two epochs move the weights far from where they started (~0.05, seven orders of magnitude
    # above the tolerance below): a wrong gradient term would show at once
    moved = max((a - b).abs().max().item() for a, b in zip(ref.parameters(), init))
    assert moved > 1e-2
    for a, b in zip(ref.parameters(), fused.parameters()):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(fused_loss, ref_loss, rtol=1e-10)


def test_hand_written_step_falls_back_to_autograd_for_other_optimizers():
    (ref, _, _), (fused, _, _) = _fused_vs_autograd("mlp", optimizer_kwargs={"momentum": 0.9}, epochs=1)
    for a, b in zip(ref.parameters(), fused.parameters()):
        assert torch.equal(a, b)        # momentum: the step took the autograd path, bit for bit


def test_half_mask_is_fair_coins():
    m = uc.half_mask((300, 513))
    assert m.dtype == torch.uint8 and m.shape == (300, 513) and set(m.unique().tolist()) == {0, 1}
    assert abs(m.float().mean().item() - 0.5) < 0.005
    assert abs(m[:, 0].float().mean().item() - 0.5) < 0.1 and abs(m[0].float().mean().item() - 0.5) < 0.1
