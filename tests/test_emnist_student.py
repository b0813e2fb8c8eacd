"""Study D (kdnb.emnist_student): Keras semantics, caches keyed by content, the real EMNIST path, claims and sweep."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from kdnb import data, papers, report, samples, train
from kdnb import emnist_student as es


def _tiny(n=64, n_test=32, classes=26, validation="test", seed=0):
    g = torch.Generator().manual_seed(seed)
    tx, ty = torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, classes, (n,), generator=g)
    vx, vy = torch.rand(n_test, 1, 28, 28, generator=g), torch.randint(0, classes, (n_test,), generator=g)
    return es.Data(tx, ty, vx, vy, vx, vy, "emnist_letters", "synthetic", validation, classes)


def _params(**kw):
    p = dict(es.PROFILES["smoke"], profile="smoke", device="cpu", download=False, teacher_epochs=1, epochs=2,
             batch_size=32)
    p.update(kw)
    return p


# ---------------------------------------------------------------- models


@pytest.mark.parametrize("classes,teacher,student", [(26, 3_378_970, 415_258), (10, 3_362_570, 407_050)])
def test_parameter_counts(classes, teacher, student):
    assert es.models.count_parameters(es.teacher_cnn(classes)) == teacher
    assert es.models.count_parameters(es.mlp_student(classes)) == student


def test_keras_initialisation_glorot_uniform_zero_bias():
    torch.manual_seed(0)
    t = es.teacher_cnn(26)
    conv, dense = t[0], t[9]
    # glorot: limit sqrt(6 / (fan_in + fan_out)); Conv2D fans are k*k*in and k*k*out, as torch's xavier
    assert conv.weight.abs().max() <= math.sqrt(6 / (9 * 1 + 9 * 64))
    assert conv.weight.abs().max() > 0.9 * math.sqrt(6 / (9 * 1 + 9 * 64))
    assert dense.weight.abs().max() <= math.sqrt(6 / (3200 + 1024))
    assert all(float(m.bias.detach().abs().max()) == 0.0 for m in t.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    assert t(torch.rand(2, 1, 28, 28)).shape == (2, 26)


def test_adadelta_matches_keras_update_by_hand():
    # Keras 2.0 Adadelta: a = rho a + (1-rho) g^2; u = g sqrt(d + eps) / sqrt(a + eps); p -= lr u;
    # d = rho d + (1-rho) u^2   (lr 1.0, rho 0.95, eps 1e-8)
    w = nn.Parameter(torch.tensor([0.5, -1.0], dtype=torch.float64))
    opt = train.make_optimizer("adadelta", [w], es.ADADELTA_LR, **es.ADADELTA)
    p, a, dd = np.array([0.5, -1.0]), np.zeros(2), np.zeros(2)
    for _ in range(3):
        opt.zero_grad()
        (w ** 3).sum().backward()
        opt.step()
        g = 3 * p ** 2
        a = 0.95 * a + 0.05 * g ** 2
        u = g * np.sqrt(dd + 1e-8) / np.sqrt(a + 1e-8)
        p = p - 1.0 * u
        dd = 0.95 * dd + 0.05 * u ** 2
    np.testing.assert_allclose(w.detach().numpy(), p, rtol=1e-12)


# ---------------------------------------------------------------- Keras 2.0 callbacks


def _feed(cb, losses, lr=1.0):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    out = []
    for e, v in enumerate(losses, 1):
        stop = cb.on_epoch_end({"epoch": e, "val_loss": v}, opt)
        out.append((stop, opt.param_groups[0]["lr"]))
    return out


def test_early_stopping_acts_on_the_fourth_non_improving_epoch():
    cb = train.KerasEarlyStopping("val_loss", patience=3)
    # epoch 2 is the best; 3, 4, 5, 6 do not improve (an equal value is no improvement): stop after epoch 6
    stops = [s for s, _ in _feed(cb, [1.0, 0.9, 0.95, 0.9, 0.92, 0.93, 0.5])]
    assert stops == [False, False, False, False, False, True, False]
    assert cb.stopped_epoch == 6
    cb = train.KerasEarlyStopping("val_loss", patience=3)
    assert not any(s for s, _ in _feed(cb, [1.0, 0.9, 0.95, 0.96, 0.97, 0.8, 0.81, 0.82, 0.83]))


def test_reduce_lr_on_plateau_keras_2_0_semantics():
    cb = train.KerasReduceLROnPlateau("val_loss", factor=0.1, patience=1, epsilon=1e-4)
    # 0.89995 is not better than 0.9 by more than 1e-4. Epoch 3: first bad epoch (no change); epoch 4: reduce;
    # epoch 5: reduce again (wait restarts at 0 and is incremented in the same call); 6 improves; 7 is a first bad one
    lrs = [lr for _, lr in _feed(cb, [1.0, 0.9, 0.89995, 0.95, 0.91, 0.5, 0.6])]
    assert lrs == pytest.approx([1.0, 1.0, 1.0, 0.1, 0.01, 0.01, 0.01])


def test_fit_with_keras_callbacks_stops_and_resumes_identically(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 3, (64,), generator=g)

    def run(ckpt=None, interrupt_at=None, script=None):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(784, 3))
        vals = iter(script)

        def boom(epoch, row):
            if epoch == interrupt_at:
                raise KeyboardInterrupt

        cbs = [train.KerasEarlyStopping("val_loss", patience=3), train.KerasReduceLROnPlateau("val_loss", patience=1)]
        res = train.fit(model, data.TensorLoader(x, y, 16, shuffle=True), lambda m, a, b: nn.functional.cross_entropy(m(a), b),
                        epochs=10, optimizer="adadelta", lr=1.0, evaluate=lambda m: {"val_loss": next(vals)},
                        checkpoint=ckpt, progress=False, callbacks=cbs, on_epoch_end=boom)
        return res, model

    script = [1.0, 0.9, 0.95, 0.96, 0.97, 0.98, 0.99, 1.0]
    res, model = run(script=script)
    assert res.stopped_epoch == 6                      # best at 2, stop after the 4th bad epoch
    assert [h["lr"] for h in res.history] == pytest.approx([1.0, 1.0, 1.0, 1.0, 0.1, 0.01])
    ckpt = tmp_path / "fit.pt"
    with pytest.raises(KeyboardInterrupt):
        run(ckpt, interrupt_at=4, script=script)
    resumed, model2 = run(ckpt, script=script[4:])     # epochs 5.. only: callbacks' state came from the checkpoint
    assert resumed.resumed_from == 4 and resumed.stopped_epoch == 6
    assert [h["lr"] for h in resumed.history] == pytest.approx([h["lr"] for h in res.history])
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- losses


def test_keras_ce_and_kd_loss_by_hand():
    z = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    y = torch.tensor([1, 2])
    sm = lambda a: np.exp(a) / np.exp(a).sum(1, keepdims=True)
    zn, tn = z.numpy().astype(float), t.numpy().astype(float)
    hard = -np.log(sm(zn)[[0, 1], [1, 2]]).mean()
    assert es.keras_ce(z, nn.functional.one_hot(y, 3).float()).item() == pytest.approx(hard, abs=1e-6)
    T, lam = 4.0, 0.3
    soft = -(sm(tn / T) * np.log(sm(zn / T))).sum(1).mean()
    targets = es.kd_targets(y, t, 3)
    assert targets.shape == (2, 6) and torch.equal(targets[:, 3:], t)
    for t2, scale in ((False, 1.0), (True, T ** 2)):
        loss = es.make_loss(3, temperature=T, lam=lam, t2_scaling=t2)
        assert loss(z, targets).item() == pytest.approx(lam * hard + scale * soft, abs=1e-5)
    assert es.make_loss(3)(z, es.kd_targets(y, None, 3)).item() == pytest.approx(hard, abs=1e-6)


# ---------------------------------------------------------------- caches


def test_teacher_cache_and_logits_keyed_by_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("KDNB_CACHE", str(tmp_path))
    d = _tiny()
    config = es.teacher_config(d, epochs=1, batch_size=32, seed=0)
    t1, info1 = es.get_teacher(d, config)
    assert not info1["cache_hit"] and info1["stopped_epoch"] == 1
    t2, info2 = es.get_teacher(d, config)
    assert info2["cache_hit"] and info2["weights_hash"] == info1["weights_hash"]
    l1, c1 = es.cached_logits(t1, d)
    l2, c2 = es.cached_logits(t2, d)
    assert not c1["cache_hit"] and c2["cache_hit"] and torch.equal(l1["train"], l2["train"])
    assert torch.allclose(l1["test"], train.predict(t1, d.test_x))
    # another teacher (weights changed in place, same file name would be stale in the source): a new key
    with torch.no_grad():
        t2[-1].bias.add_(1.0)
    l3, c3 = es.cached_logits(t2, d)
    assert not c3["cache_hit"] and c3["key"] != c1["key"]
    assert torch.allclose(l3["train"], l1["train"] + 1.0, atol=1e-5)
    # other images: a new key too
    d2 = _tiny(seed=1)
    assert es.cached_logits(t1, d2)[1]["key"] != c1["key"]
    # a different configuration is a different teacher file
    assert es.teacher_path(es.teacher_config(d, epochs=2, batch_size=32, seed=0)) != es.teacher_path(config)


def test_run_trains_three_models_and_reuses_the_teacher(tmp_path, monkeypatch):
    monkeypatch.setenv("KDNB_CACHE", str(tmp_path))
    d = _tiny()
    res = es.run(d, _params(), log=lambda s: None)
    assert [(r["model"], r["t2_scaling"]) for r in res["students"]] == [("mlp", None), ("kd", False), ("kd", True)]
    assert not res["teacher"]["cache_hit"]
    again = es.run(d, _params(train_baseline=False, t2_scaling=False), log=lambda s: None)
    assert again["teacher"]["cache_hit"] and again["teacher"]["logits_cache_hit"]
    assert [r["name"] for r in again["students"]] == ["kd-T10-lam0.5"]
    # seeded: the same distilled student again
    assert again["students"][0]["test_acc"] == res["students"][1]["test_acc"]
    assert len(es.accuracy_table(res)) == 4


# ---------------------------------------------------------------- data: the real torchvision EMNIST path


def test_real_emnist_path_reads_torchvision_raw_layout(tmp_path, monkeypatch):
    """kdnb writes EMNIST letters in torchvision's raw layout; torchvision's EMNIST class reads it via our loader."""
    import torchvision.datasets as tvd

    samples.write_synthetic_emnist(tmp_path, n_train_per_class=3, n_test_per_class=2, seed=5)
    calls = []
    real_cls = tvd.EMNIST

    def spy(root, split, **kw):  # a subclass would look in <root>/<its own name>/raw: torchvision names by class
        calls.append((str(root), split, kw.get("train")))
        return real_cls(root, split, **kw)

    monkeypatch.setattr(tvd, "EMNIST", spy)
    monkeypatch.delenv("KDNB_DATA", raising=False)
    d = es.load("emnist_letters", "real", data_dir=tmp_path)
    assert calls == [(str(tmp_path), "letters", True), (str(tmp_path), "letters", False)]
    assert d.source == "real" and d.num_classes == 26 and len(d.train_y) == 78 and len(d.test_y) == 52
    letters, labels = samples.synthetic_letters(3, seed=5, split="train")
    # labels 1..26 -> 0..25, images upright again (EMNIST stores them transposed), /255 floats
    assert torch.equal(d.train_y, torch.as_tensor(labels).long() - 1)
    assert torch.allclose(d.train_x[:, 0], torch.as_tensor(letters).float() / 255)
    assert sorted(torch.bincount(d.test_y).tolist()) == [2] * 26


def test_holdout_validation_and_missing_data(tmp_path, monkeypatch):
    samples.write_synthetic_emnist(tmp_path, n_train_per_class=10, n_test_per_class=2, seed=1)
    d = es.load("emnist_letters", "real", data_dir=tmp_path, validation="holdout")
    assert len(d.val_y) == 26 and len(d.train_y) == 234 and len(d.test_y) == 52   # D-Q2: 10 % of train validates
    monkeypatch.delenv("KDNB_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(data.DataNotFoundError, match="(?s)emnist_letters.*download=True"):
        es.load("emnist_letters", "real", data_dir=tmp_path / "nothing")


@pytest.mark.data
def test_mnist_stand_in_real():
    from conftest import real_data_root

    root = real_data_root("MNIST/raw")
    d = es.load("mnist", "real", data_dir=root)
    assert (len(d.train_y), len(d.test_y), d.num_classes) == (60000, 10000, 10)
    assert es.dataset_label("mnist") == "MNIST (stand-in for EMNIST letters)"


# ---------------------------------------------------------------- parameters, claims, sweep


@pytest.mark.parametrize("name,value", [("dataset", "emnist"), ("lam", 1.5), ("temperature", 0), ("t2_scaling", "yes"),
                                        ("t2_scaling", [True, True]), ("validation", "val"), ("teacher_epochs", 0),
                                        ("train_baseline", 1), ("data_source", "subset")])
def test_check_names_the_bad_parameter(name, value):
    with pytest.raises(ValueError, match=name):
        es.check(**_params(**{name: value}))


def _result(t_acc=0.95, mlp=0.90, kd=0.91, kd_t2=0.92):
    rows = [{"model": "mlp", "seed": 0, "t2_scaling": None, "test_acc": mlp},
            {"model": "kd", "seed": 0, "t2_scaling": False, "test_acc": kd, "temperature": 10.0, "lam": 0.5},
            {"model": "kd", "seed": 0, "t2_scaling": True, "test_acc": kd_t2, "temperature": 10.0, "lam": 0.5}]
    return {"teacher": {"test_acc": t_acc, "stopped_epoch": 9, "weights_hash": "abc"}, "students": rows,
            "student_params": 1}


def test_stand_in_never_records_emnist_claims():
    card_ids = {c["id"]: c for c in papers.load(es.NOTEBOOK)["claims"]}
    full = dict(es.PROFILES["reduced"], profile="reduced")
    got = es.claim_values(full, _result())
    assert set(got) == {"D1-mnist-standin", "D2-mnist-standin", "D3-mnist-standin", "D3-gain-mnist-standin"}
    assert got["D3-gain-mnist-standin"]["values"] == [1.0] and got["D3-gain-mnist-standin"]["verdict"] == "supported"
    assert all("not comparable" in e["note"] for e in got.values())
    assert all(card_ids[c]["reported"] is None for c in got)          # the card gives stand-ins no number
    emnist = es.claim_values(dict(es.PROFILES["full"], profile="full"), _result())
    assert set(emnist) == {"D1", "D2", "D3", "D3-gain"} and emnist["D1"]["values"] == [95.0]
    assert "verdict" not in emnist["D3-gain"]                          # judged against 0.6 by kdnb report
    assert all(card_ids[c].get("offline") for c in ("D1", "D2", "D3", "D3-gain", "D4"))
    assert es.claim_values(dict(es.PROFILES["smoke"], profile="smoke"), _result()) == {}
    assert es.claim_values(dict(full, temperature=5.0), _result()) == {}
    assert es.claim_values(dict(full, validation="holdout"), _result()) == {}


def _write_run(root, name, params, students, weights_hash="abc"):
    folder = root / es.NOTEBOOK / name
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"notebook": es.NOTEBOOK, "params": params, "claims": {},
                                                 "metrics": {"teacher": {"weights_hash": weights_hash},
                                                             "students": students}}))


def test_sweep_records_table_and_d4(tmp_path):
    base = dict(es.PROFILES["reduced"], profile="reduced")
    cells = {(2.0, 0.1): 0.97, (2.0, 0.5): 0.975, (10.0, 0.1): 0.98, (10.0, 0.5): 0.985}
    for i, ((t, lam), acc) in enumerate(cells.items()):
        _write_run(tmp_path, f"reduced-{i}", dict(base, temperature=t, lam=lam),
                   [{"model": "kd", "temperature": t, "lam": lam, "t2_scaling": False, "seed": 0, "test_acc": acc}])
    # not gathered: another teacher, a smoke run, other epochs
    kd = [{"model": "kd", "temperature": 5.0, "lam": 0.5, "t2_scaling": False, "seed": 0, "test_acc": 0.99}]
    _write_run(tmp_path, "reduced-other-teacher", base, kd, weights_hash="zzz")
    _write_run(tmp_path, "smoke-x", dict(base, profile="smoke"), kd)
    _write_run(tmp_path, "reduced-epochs", dict(base, epochs=3), kd)
    rows = es.sweep_records(base, "abc", results=tmp_path)
    assert len(rows) == 4
    table = es.sweep_table(rows)
    assert table.shape == (2, 2) and table.loc[10.0, 0.5] == pytest.approx(98.5)
    d4 = es.claim_id("D4", "mnist"), es.d4_claim(base, rows)
    assert d4[0] == "D4-mnist-standin" and d4[1]["verdict"] == "supported" and d4[1]["values"] == [0.0]
    assert d4[1]["seeds"] == [0]
    worse = [dict(r, test_acc=0.99) if (r["temperature"], r["lam"]) == (2.0, 0.1) else r for r in rows]
    got = es.d4_claim(base, worse)
    assert got["verdict"] == "not supported" and got["values"] == [-0.5] and "rank 2 of 4" in got["note"]
    assert es.d4_claim(dict(base, profile="smoke"), rows) is None
    # judged per seed, on the seeds that ran every cell: seed 1 (reference cell best by 0.2) counts, seed 2 ran the
    # reference cell only and is left out of the grid, whatever its accuracy
    seed1 = [dict(r, seed=1, test_acc=r["test_acc"] - 0.002 * ((r["temperature"], r["lam"]) != (10.0, 0.5)))
             for r in rows]
    seed2 = [dict(rows[-1], seed=2, test_acc=0.5)]
    got = es.d4_claim(base, worse + seed1 + seed2)
    assert got["seeds"] == [0, 1] and got["values"] == [-0.5, 0.0] and got["verdict"] == "mixed"
    assert es.complete_seeds(worse + seed1 + seed2) == [0, 1] and "on 1 of 2 seeds" in got["note"]
    assert es.sweep_table([]).empty


def test_report_keeps_stand_ins_apart_from_emnist_numbers(tmp_path):
    params = dict(es.PROFILES["reduced"], profile="reduced")
    folder = tmp_path / es.NOTEBOOK / "reduced-x"
    folder.mkdir(parents=True)
    claims = {k: {kk: vv for kk, vv in v.items()} for k, v in es.claim_values(params, _result()).items()}
    (folder / "run.json").write_text(json.dumps({"notebook": es.NOTEBOOK, "params": params, "claims": claims,
                                                 "metrics": {}}))
    rows = {r["claim"]: r for r in report.rows(tmp_path) if r["study"] == es.NOTEBOOK}
    assert rows["D1-mnist-standin"]["reported"] is None and rows["D1-mnist-standin"]["verdict"] == "no reported number"
    assert rows["D1-mnist-standin"]["reproduced"] == pytest.approx(95.0)
    # one seed: the notebook's verdict is kept, but the report calls it inconclusive (a verdict needs 3 seeds)
    assert rows["D3-gain-mnist-standin"]["verdict"] == "inconclusive (n=1 < 3 seeds; this seed says: supported)"
    assert rows["D1"]["verdict"] == "not runnable offline" and rows["D1"]["reproduced"] is None
    # stand-ins are drawn alone, never against the EMNIST reported number
    shown = report.plotted(list(rows.values()), es.NOTEBOOK)
    assert shown and all(r["claim"].endswith("-standin") and r["reported"] is None for r in shown)
    fig = report.render_figure(list(rows.values()), es.NOTEBOOK)
    assert all("reported" not in [t.get_text() for t in ax.get_xticklabels()] for ax in fig.axes if ax.get_visible())
    md = report.render_markdown(list(rows.values()))
    line = next(s for s in md.splitlines() if "**D1-mnist-standin**" in s)
    assert "94.4" not in line and "stand-in" in line
