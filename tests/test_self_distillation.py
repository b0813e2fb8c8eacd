import copy

import pytest
import torch

from kdnb import self_distillation as sd


def _tiny_cifar(n=64):
    g = torch.Generator().manual_seed(0)
    return sd.Cifar(torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g),
                    torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g))


def test_steps_alphas_and_shared_step0():
    rows = sd.run(_tiny_cifar(), seed=0, arch="resnet18", sd_alphas=[0.0, 0.6], distillation_steps=2, epochs=1,
                  batch_size=32, lr=1e-3, reg_coef=1e-4, teacher_bn_train_mode=False, shuffle=True, progress=False)
    assert [(r["step"], r["alpha"]) for r in rows] == [(0, None), (1, 0.0), (1, 0.6)]
    table = sd.accuracy_table([dict(r, variant="corrected") for r in rows])
    assert len(table) == 4 and set(table.alpha) == {0.0, 0.6}     # step 0 listed under each alpha


def test_step0_uses_only_ground_truth_and_teacher_stays_frozen(monkeypatch):
    seen = []
    real = sd.losses.self_distillation_mse

    def spy(student, target, teacher=None, **kw):
        seen.append(teacher is None)
        return real(student, target, teacher, **kw)

    monkeypatch.setattr(sd.losses, "self_distillation_mse", spy)
    teachers = []
    real_deepcopy = copy.deepcopy

    def keep(obj, *a):
        out = real_deepcopy(obj, *a)
        if isinstance(obj, torch.nn.Module):
            teachers.append((out, {k: v.clone() for k, v in out.state_dict().items()}))
        return out

    monkeypatch.setattr(sd.copy, "deepcopy", keep)
    sd.run(_tiny_cifar(), seed=0, arch="resnet18", sd_alphas=[0.5], distillation_steps=2, epochs=1, batch_size=32,
           lr=1e-3, reg_coef=0.0, teacher_bn_train_mode=False, shuffle=False, progress=False)
    assert seen[:2] == [True, True] and seen[-1] is False          # step 0: no teacher; step 1: teacher
    teacher, before = teachers[0]
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())   # eval: BN stats untouched


def test_bn_quirk_lets_the_teacher_running_stats_move(monkeypatch):
    teachers = []
    real_deepcopy = copy.deepcopy

    def keep(obj, *a):
        out = real_deepcopy(obj, *a)
        if isinstance(obj, torch.nn.Module):
            teachers.append((out, out.bn1.running_mean.clone()))
        return out

    monkeypatch.setattr(sd.copy, "deepcopy", keep)
    sd.run(_tiny_cifar(), seed=0, arch="resnet18", sd_alphas=[0.5], distillation_steps=2, epochs=1, batch_size=32,
           lr=1e-3, reg_coef=0.0, teacher_bn_train_mode=True, shuffle=False, progress=False)
    teacher, before = teachers[0]
    assert teacher.training and not torch.equal(teacher.bn1.running_mean, before)     # E-Q2


@pytest.mark.parametrize("override,name", [({"sd_alphas": [1.2]}, "sd_alphas"), ({"sd_alphas": []}, "sd_alphas"),
                                           ({"epochs": 0}, "epochs"), ({"variants": ["fast"]}, "variants"),
                                           ({"arch": "vgg"}, "arch"), ({"reg_coef": -1}, "reg_coef"),
                                           ({"lr": 0}, "lr")])
def test_check_rejects_bad_parameters(override, name):
    params = dict(sd.PROFILES["smoke"], **override)
    with pytest.raises(ValueError, match=rf"^{name}="):
        sd.check(**params)


def test_profiles_resolve():
    from kdnb import profiles

    p = profiles.resolve("05_self_distillation", profile="full", epochs=None, lr=3e-4)
    assert p["epochs"] == 75 and p["lr"] == 3e-4 and p["arch"] == "resnet50" and p["batch_size"] == 16
    with pytest.raises(ValueError, match="profile='paper'"):
        profiles.resolve("05_self_distillation", profile="paper")


def test_an_ablation_run_records_no_claim():
    from kdnb import profiles

    reduced = profiles.resolve("05_self_distillation", **{**{k: None for k in sd.PROFILES["reduced"]},
                                                          "teacher_bn_train_mode": None, "shuffle": None,
                                                          "profile": "reduced"})
    assert sd.claim_applies("E4", reduced)
    assert sd.claim_applies("E1", {"variants": ["faithful", "corrected"]})  # a record made before the flags existed
    for point in sd.ABLATION_RUNS[1:]:  # the first is the profile's own run, which does record them
        assert not any(sd.claim_applies(c, dict(reduced, **point)) for c in ("E1", "E4"))
    assert not sd.claim_applies("E4", dict(reduced, variants=["corrected"]))
    assert not sd.claim_applies("E4", dict(reduced, shuffle=False))  # a flag given explicitly, even the variant's own
