import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdnb import data, train


def _problem(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return x, y


def _fit(tmp_path=None, epochs=4, interrupt_after=None, **kw):
    x, y = _problem()
    train.seed_everything(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))
    loader = data.TensorLoader(x, y, 32, shuffle=True, seed=1)
    calls = []

    def on_epoch_end(epoch, row):
        calls.append(epoch)
        if interrupt_after is not None and epoch == interrupt_after:
            raise KeyboardInterrupt

    res = train.fit(model, loader, lambda m, xb, yb: F.cross_entropy(m(xb), yb), epochs=epochs, optimizer="sgd",
                    lr=0.1, evaluate=lambda m: {"val_loss": F.cross_entropy(m(x), y).item()}, monitor="val_loss",
                    checkpoint=tmp_path / "ck.pt" if tmp_path else None, seed=0, progress=False,
                    on_epoch_end=on_epoch_end, **kw)
    return model, res, calls


def test_seeded_runs_are_identical():
    m1, r1, _ = _fit()
    m2, r2, _ = _fit()
    assert [h["train_loss"] for h in r1.history] == [h["train_loss"] for h in r2.history]
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))


def test_interrupted_run_resumes_and_matches_uninterrupted(tmp_path):
    ref_model, ref, _ = _fit()
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path, interrupt_after=2)
    model, res, calls = _fit(tmp_path)
    assert res.resumed_from == 2 and calls == [3, 4]          # lost nothing, repeated nothing
    assert [h["train_loss"] for h in res.history] == [h["train_loss"] for h in ref.history]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref_model.state_dict().values()))
    # a finished fit returns at once with the same weights
    again, res2, calls2 = _fit(tmp_path)
    assert calls2 == [] and res2.stopped_epoch == 4
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


def test_early_stopping_and_best_selection():
    x, y = _problem()
    model = nn.Linear(5, 2)
    loader = data.TensorLoader(x, y, 64, shuffle=False)
    values = iter([3.0, 1.0, 2.0, 2.5, 2.7, 9.0, 9.0])
    seen = {}

    def evaluate(m):
        v = next(values)
        seen[v] = {k: t.clone() for k, t in m.state_dict().items()}
        return {"val_loss": v}

    res = train.fit(model, loader, lambda m, xb, yb: F.cross_entropy(m(xb), yb), epochs=7, optimizer="sgd", lr=0.5,
                    evaluate=evaluate, monitor="val_loss", es_patience=3, select="best", progress=False)
    assert res.stopped_epoch == 5 and res.best_epoch == 2
    assert all(torch.equal(model.state_dict()[k], seen[1.0][k]) for k in seen[1.0])


def test_schedulers_and_bad_names():
    x, y = _problem(64)
    loader = data.TensorLoader(x, y, 16, shuffle=False)
    model = nn.Linear(5, 2)
    res = train.fit(model, loader, lambda m, xb, yb: F.cross_entropy(m(xb), yb), epochs=2, optimizer="adamw",
                    lr=1e-2, scheduler="onecycle", progress=False)
    assert res.history[-1]["lr"] < 1e-2
    with pytest.raises(ValueError, match="optimizer='rmsprop'"):
        train.make_optimizer("rmsprop", model.parameters(), 0.1)
    with pytest.raises(ValueError, match="lr=0"):
        train.make_optimizer("sgd", model.parameters(), 0)
    with pytest.raises(ValueError, match="select='best'.*monitor"):
        train.fit(model, loader, lambda m, xb, yb: F.cross_entropy(m(xb), yb), epochs=1, select="best")


def test_predict_restores_mode():
    m = nn.Sequential(nn.Linear(5, 2), nn.Dropout(0.5))
    m.train()
    out = train.predict(m, torch.randn(10, 5), batch_size=3)
    assert out.shape == (10, 2) and m.training
    assert train.config_hash({"a": 1, "b": [1, 2]}) == train.config_hash({"b": [1, 2], "a": 1})
