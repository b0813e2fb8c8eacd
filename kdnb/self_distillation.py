"""Study E, ResNet part (Kennethborup/self_distillation `self_distiller.py`, papers/05_self_distillation.md §E.2).

Step 0 fits the ground truth; step t >= 1 trains a fresh network on
    alpha * MSE(softmax(z), onehot(y)) + (1 - alpha) * MSE(softmax(z), softmax(z_teacher))
    + reg_coef * sum of per-tensor L2 norms (not squared: quirk E-Q5),
with the previous step's *last-epoch* network as the frozen teacher.

Quirks as flags (faithful value first; None in the notebook = the variant's value):
  teacher_bn_train_mode  True | False   E-Q2: Lightning's .train() recursed into the teacher, whose
                                         BatchNorm then used batch statistics while producing targets
  shuffle                False | True   E-Q4: the source never reshuffled the training set
The source's "validation" is the test set (E-Q3): we report the final-epoch test accuracy per step
and, beside it, the best-epoch one the source's checkpoint monitor would have picked.
precision: 'fp32' in every profile (the source); 'bf16' opts into autocast (CPU or CUDA) + channels_last for the
student's and the teacher's forward passes (the loss, the L2 term and Adam stay fp32); never in smoke.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from . import claims, data, losses, models, numerics, study, train, validate

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
VARIANTS = {
    "faithful": {"teacher_bn_train_mode": True, "shuffle": False},
    "corrected": {"teacher_bn_train_mode": False, "shuffle": True},
}

# One dict per profile: the notebook's None parameters take these values.
PROFILES = {
    # shipped CIFAR sample (500 train / 250 test), one epoch per step (float64 on CPU, under 2 minutes on 2 cores,
    # issue 15): the pipeline, not a result
    "smoke": dict(seeds=[0], data_source="sample", arch="resnet18", sd_alphas=[0.6], distillation_steps=2,
                  epochs=1, batch_size=64, lr=1e-3, reg_coef=1e-4, variants=["faithful", "corrected"], precision="fp32"),
    # lossless CIFAR-10 subset (4,000 train / 1,000 test), ResNet-18, about 20 minutes on 2 CPU cores
    "reduced": dict(seeds=[0], data_source="subset", arch="resnet18", sd_alphas=[0.0, 0.6], distillation_steps=3,
                    epochs=10, batch_size=64, lr=1e-3, reg_coef=1e-4, variants=["faithful", "corrected"],
                    precision="fp32"),
    # the source README's command: ResNet-50, 75 epochs, batch 16, Adam 1e-4, alpha 0.6, 5 steps (CUDA)
    "full": dict(seeds=[1], data_source="real", arch="resnet50", sd_alphas=[0.6], distillation_steps=5,
                 epochs=75, batch_size=16, lr=1e-4, reg_coef=1e-4, variants=["faithful", "corrected"],
                 precision="fp32"),
}


def require_data(params: dict, data_dir) -> None:
    """Missing CIFAR-10 stops the setup cell: the exact kernel cells run before the ResNet part reads it."""
    data.require("cifar10", params["data_source"], data_dir, download=params["download"])


def check(*, sd_alphas, distillation_steps, epochs, batch_size, lr, reg_coef, variants, arch, alphas=None,
          gamma=None, lam=None, steps=None, precision="fp32", profile=None, **_):
    """Every parameter of notebook 05 (the KRR ones too when given), before any data is read."""
    numerics.check_precision(precision, profile)
    if alphas is not None:
        from . import krr

        krr.check_table(alphas, gamma, lam, steps)
    if not isinstance(sd_alphas, (list, tuple)) or not sd_alphas:
        validate.fail("sd_alphas", sd_alphas, "must be a non-empty list of numbers in [0, 1]")
    for a in sd_alphas:
        validate.unit_interval("sd_alphas", a)
    validate.positive_int("distillation_steps", distillation_steps)
    if distillation_steps < 2:
        # step 0 only fits the ground truth: with one step nothing is distilled and there is no alpha to report
        validate.fail("distillation_steps", distillation_steps, "must be >= 2 (step 0 fits the ground truth, "
                      "steps 1.. distil)")
    validate.positive_int("epochs", epochs)
    validate.positive_int("batch_size", batch_size)
    if "data_source" in _:
        validate.choice("data_source", _["data_source"], ("sample", "subset", "real"))
    if _.get("data_source") in data.SOURCES:
        n = data.sizes("cifar10", _["data_source"])
        data.at_most("batch_size", batch_size, n["train"], f"the {n['train']} training images of "
                     f"data_source={_['data_source']!r}")
    validate.positive("lr", lr)
    if isinstance(reg_coef, bool) or not isinstance(reg_coef, (int, float)) or reg_coef < 0:
        validate.fail("reg_coef", reg_coef, "must be a number >= 0")
    validate.choices("variants", variants, VARIANTS)
    validate.choice("arch", arch, models.RESNETS)
    for name in VARIANTS["faithful"]:
        value = _.get(name)
        if value is not None and not isinstance(value, bool):
            validate.fail(name, value, "must be None (the variant's value), True or False")


def variant_flags(variant: str, params: dict) -> dict:
    """The quirk flags a variant runs with: the variant's values, overridden by any flag given explicitly."""
    return study.variant_flags(VARIANTS, variant, params)


def run_variants(cifar: "Cifar", params: dict, *, device: str = "cpu", checkpoint=lambda name: None) -> list[dict]:
    """Every (variant, seed) of the notebook's ResNet part: `run` with the variant's flags; one row per (variant,
    alpha, step, seed) with the flags it ran with."""
    rows = []
    for variant in params["variants"]:
        flags = variant_flags(variant, params)
        for seed in params["seeds"]:
            out = run(cifar, seed=seed, arch=params["arch"], sd_alphas=params["sd_alphas"],
                      distillation_steps=params["distillation_steps"], epochs=params["epochs"],
                      batch_size=params["batch_size"], lr=params["lr"], reg_coef=params["reg_coef"],
                      precision=params["precision"], device=device,
                      checkpoint=lambda name, v=variant: checkpoint(f"{v}-{name}"), desc=f"{variant} ", **flags)
            rows += [dict(r, variant=variant, flags=flags) for r in out]
    return rows


@dataclass
class Cifar:
    train_x: torch.Tensor  # float in [0,1], [N,3,32,32], on the device
    train_y: torch.Tensor
    test_x: torch.Tensor   # normalised
    test_y: torch.Tensor


def load_cifar(source: str, *, data_dir=None, device: str = "cpu", download: bool = False) -> Cifar:
    tr = data.load("cifar10", "train", source=source, data_dir=data_dir, download=download)
    te = data.load("cifar10", "test", source=source, data_dir=data_dir, download=download)
    return Cifar(data.to_float(tr.x, device=device), tr.y.to(device),
                 data.to_float(te.x, mean=CIFAR_MEAN, std=CIFAR_STD, device=device), te.y.to(device))


def _normalise(x: torch.Tensor) -> torch.Tensor:
    m = torch.tensor(CIFAR_MEAN, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(CIFAR_STD, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """RandomCrop(32, padding=4) -> RandomHorizontalFlip -> Normalize, as the source's train transform
    (padding with black before normalising, as torchvision does on the PIL image)."""
    return _normalise(data.random_crop_flip(x, g, padding=4))


def test_accuracy(model, cifar: Cifar, precision: str = "fp32") -> float:
    with numerics.autocast(cifar.test_x.device, precision):
        logits = train.predict(model, numerics.model_layout(cifar.test_x, precision), batch_size=500)
    return (logits.argmax(1) == cifar.test_y).float().mean().item()


def run(cifar: Cifar, *, seed: int, arch: str, sd_alphas, distillation_steps: int, epochs: int, batch_size: int,
        lr: float, reg_coef: float, teacher_bn_train_mode: bool, shuffle: bool, device: str = "cpu",
        checkpoint=lambda name: None, desc: str = "", progress: bool = True, precision: str = "fp32") -> list[dict]:
    """All steps for every alpha; step 0 (ground truth only) is trained once and shared by the alphas.
    Returns one row per (alpha, step): final and best-epoch test accuracy and the epoch history."""
    rows = []

    def train_step(step: int, alpha: float, teacher):
        train.seed_everything(seed * 100 + step)  # a fresh initialisation per step, as the source
        model = numerics.model_layout(models.resnet(arch, 10).to(device), precision)
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.train(teacher_bn_train_mode)

        def loss_fn(m, xb, yb):
            xb = numerics.model_layout(xb, precision)
            t_logits = None
            with numerics.autocast(device, precision):
                if teacher is not None:
                    with torch.no_grad():
                        t_logits = numerics.cast(teacher(xb))
                z = numerics.cast(m(xb))
            loss = losses.self_distillation_mse(z, yb, t_logits, alpha=alpha, num_classes=10)
            return loss + reg_coef * losses.l2_norm_sum(m.parameters()) if reg_coef else loss

        loader = data.TensorLoader(cifar.train_x, cifar.train_y, batch_size, shuffle=shuffle,
                                   seed=seed * 100 + step, augment=augment)
        tag = f"step{step}" + ("" if step == 0 else f"-alpha{alpha:g}")
        res = train.fit(model, loader, loss_fn, epochs=epochs, optimizer="adam", lr=lr,
                        evaluate=lambda m: {"test_acc": test_accuracy(m, cifar, precision)}, monitor="test_acc", mode="max",
                        select="final", checkpoint=checkpoint(f"{tag}-seed{seed}"), seed=seed * 100 + step,
                        desc=desc + tag, progress=progress)
        accs = [h["test_acc"] for h in res.history]
        rows.append({"alpha": alpha if step else None, "step": step, "seed": seed, "final_acc": accs[-1],
                     "best_acc": max(accs), "best_epoch": res.best_epoch, "history": res.history})
        return model

    step0 = train_step(0, 1.0, None)
    for alpha in sd_alphas:
        teacher = step0
        for step in range(1, distillation_steps):
            student = train_step(step, alpha, copy.deepcopy(teacher))
            teacher = student
    return rows


def accuracy_table(rows: list[dict]):
    """Mean and std over seeds of final- and best-epoch test accuracy per (variant, alpha, step).
    Step 0 has no alpha; it is repeated under every alpha as the common starting point."""
    import pandas as pd

    alphas = sorted({r["alpha"] for r in rows if r["alpha"] is not None})
    flat = []
    for r in rows:
        for a in (alphas if r["step"] == 0 else [r["alpha"]]):
            flat.append({"variant": r["variant"], "alpha": a, "step": r["step"], "seed": r["seed"],
                         "final_acc": r["final_acc"], "best_acc": r["best_acc"]})
    df = pd.DataFrame(flat)
    g = df.groupby(["variant", "alpha", "step"], sort=True)
    out = g.agg(final_acc_mean=("final_acc", "mean"), final_acc_std=("final_acc", "std"),
                best_acc_mean=("best_acc", "mean"), best_acc_std=("best_acc", "std"), seeds=("seed", "count"))
    return out.reset_index()


def e4_verdict(acc, *, profile: str) -> dict:
    """Claim E4 (no reported number): does some alpha in (0, 1) beat the ground-truth-only step 0?
    Judged on the final-epoch test accuracy of the last step, per variant."""
    lines, values, supported = [], [], {}
    for variant, d in acc.groupby("variant"):
        step0 = d[d.step == 0].final_acc_mean.iloc[0]
        for alpha, g in d[(d.alpha > 0) & (d.alpha < 1)].groupby("alpha"):
            last = g[g.step == g.step.max()].final_acc_mean.iloc[0]
            best_step = g.loc[g.final_acc_mean.idxmax()]
            supported[(variant, alpha)] = last > step0
            lines.append(f"{variant}, alpha={alpha:g}: step 0 {step0:.3f} -> step {int(g.step.max())} {last:.3f} "
                         f"({last - step0:+.3f}); best step {int(best_step.step)} ({best_step.final_acc_mean:.3f})")
            if variant == "faithful" or not values:
                values = [g.sort_values("step").final_acc_mean.round(4).tolist()]
        for alpha, g in d[d.alpha == 0].groupby("alpha"):
            last = g[g.step == g.step.max()].final_acc_mean.iloc[0]
            lines.append(f"{variant}, alpha=0 (no ground truth): step 0 {step0:.3f} -> step {int(g.step.max())} {last:.3f} "
                         f"({last - step0:+.3f})")
    if profile == "smoke":
        verdict, note = None, "smoke profile: a pipeline check on 500 images, not evidence"
    elif not supported:
        verdict, note = None, "no alpha in (0, 1) was run"
    else:
        ok = [k for k, v in supported.items() if v]
        verdict = claims.verdict(len(ok), len(supported))
        note = f"{profile} profile; " + "; ".join(lines)
    return {"verdict": verdict, "note": note, "values": values,
            "text": "\n".join(lines) + (f"\nE4 verdict ({profile}): {verdict or 'none'}" + (f" - {note}" if verdict is None else ""))}


# ---------------------------------------------------------------- attribution (issue 12, kdnb.attribution)

QUIRKS = {k: (VARIANTS["faithful"][k], VARIANTS["corrected"][k]) for k in VARIANTS["faithful"]}
ABLATION_STARTS = {v: {"variants": [v]} for v in VARIANTS}
# two flags: faithful + one corrected flag is corrected - the other, so three runs per seed cover the six rows. The
# first is the profile's own run (both variants: both ends), the same run id as `kdnb run 05 --profile reduced`,
# so a seed's claim record is its ablation endpoint too and nothing trains twice
ABLATION_RUNS = [{}, {"variants": ["faithful"], "teacher_bn_train_mode": False},
                 {"variants": ["faithful"], "shuffle": True}]
ATTRIBUTION_PROFILE = "reduced"  # the lossless CIFAR-10 subset on CPU; full needs CIFAR-10 and a GPU


def claim_applies(claim: str, params: dict) -> bool:
    """Whether a run records the claims: both variants, each with its own flags. An ablation run (one variant, or
    a flag given explicitly) exists for results/attribution.csv: its E4 would judge a mixed recipe, and its E1-E3
    (exact, no seed) would only repeat the same numbers as more n. `kdnb report` applies this to older records."""
    # a record without the key predates variant selection: it ran both
    return list(params.get("variants", VARIANTS)) == list(VARIANTS) and all(params.get(k) is None for k in QUIRKS)


GAIN_ALPHA = 0.6  # the source README's alpha
ATTRIBUTION = {"E4": ("sd_gain", f"last step's final test accuracy with alpha {GAIN_ALPHA} minus step 0's "
                                 "(points)")}


def attribution_samples(claim: str, params: dict, metrics: dict) -> list[dict]:
    """One sample per (variant, seed) of a run that trained alpha GAIN_ALPHA: the gain of self-distillation over the
    ground-truth-only step 0, with the flags the variant ran with (records made before the flags were parameters
    ran with the variant's own)."""
    last = params["distillation_steps"] - 1
    final = {(r["variant"], r["seed"], r["alpha"], r["step"]): r for r in metrics.get("resnet_rows", [])}
    out = []
    for (variant, seed, alpha, step), r in final.items():
        base = final.get((variant, seed, None, 0))
        if alpha == GAIN_ALPHA and step == last and base is not None:
            out.append({"flags": r.get("flags") or variant_flags(variant, params), "protocol": {}, "seed": seed,
                        "value": round(100.0 * (r["final_acc"] - base["final_acc"]), 4)})
    return out
