"""Study C (PiaCuk/distillistic, papers/03_dml_kd_calibration.md): supervised baseline, vanilla KD from a ResNet-50,
Deep Mutual Learning (DML, DML_e), Tf-KD with the virtual teacher and cross-quality KD on Fashion-MNIST, with
calibration.

Losses (kdnb.losses, C.3; w = distil_weight):
  baseline   CE(z, y)
  kd         (1-w) CE + w T^2 KL_bm(log_softmax(z/T), softmax(z_t/T)), ResNet-50 teacher (trained here: no
             ImageNet weights offline; teacher_init='imagenet' fine-tunes them where torchvision can download)
  dml        per student i: (1-w) CE + w mean_{j!=i} KL_bm(log_softmax(z_i), softmax(z_j)), T = 1
  dml_e      target = mean_{j!=i} softmax(z_j) (C-Q2: `dml_e_apply_softmax` softmaxes it again)
  tfkd       (1-w) CE + w T^2 KL_bm(log_softmax(z/T), v), v_y = 0.9 (smooth_teacher=False, T = 1: the scripts)
  tfkd_smooth  the same with softmax(v/T) (smooth_teacher=True, T = 10: the library default, C-Q1)
  crossq<s>  kd with the student on s x s images; faithful: the teacher sees the s x s image too (C-Q5)
`dml_corrected` / `dml_e_corrected` are the same cohorts with C-Q11 fixed (students back in train mode after
each validation); `dml` / `dml_e` follow the flag `dml_students_stuck_in_eval` (faithful True).

Quirks as parameters (faithful value first):
  dml_students_stuck_in_eval  True | False   C-Q11: the live students were validated and never put back in
                                              train mode: from batch 2 on, DML trains with BatchNorm frozen
  dml_e_apply_softmax         False | True   C-Q2 (main.py passes False; True = the library default)
  dml_update       'simultaneous' | 'alternating'  C-Q6: stale peer logits vs Zhang et al.'s Algorithm 1
  teacher_sees_full_res       False | True   C-Q5
  shuffle                     False | True   C-Q9: the FMNIST loader never shuffled
  weight_decay                0.01           C-Q10: AdamW's default, silently applied
C-Q3 (train-batch ECE) and C-Q4 (test set as validation, max over checks) are reported beside the held-out
numbers; C-Q7 (crashes, wandb) and the log_freq = 0 crash are fixed; C-Q8 (teacher not detached) is
numerically irrelevant for the student and not reproduced (the teacher runs under no_grad).
Validation accuracy during training is the mean of per-batch accuracies (C.4), on `val_size` test images.
precision: 'fp32' (the source) or 'bf16' (autocast on CPU or CUDA + channels_last for every forward pass; losses,
metrics and the optimiser stay fp32); `reduced` and `full` default to bf16 (reduced: the CPU gain bought a larger configuration;
full: what it always did on CUDA); never in smoke.
"""
from __future__ import annotations

import dataclasses

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from . import claims, data, losses, metrics, models, numerics, runs, train, validate

NUM_CLASSES = 10
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530  # the source's single-value Normalize, broadcast to 3 channels
ALGORITHMS = ("baseline", "kd", "dml", "dml_e", "dml_corrected", "dml_e_corrected", "tfkd_smooth", "tfkd", "crossq")
DML_ALGOS = ("dml", "dml_e", "dml_corrected", "dml_e_corrected")
TEACHER_ALGOS = ("kd", "crossq")
RANDAUGMENT = ("per_sample", "per_batch", "none")
DML_UPDATES = ("simultaneous", "alternating")
TEACHER_INITS = ("scratch", "imagenet")
DATA_SOURCES = ("sample", "real")
TEACHER_CACHE_VERSION = 1

_COMMON = dict(lr=1e-3, weight_decay=0.01, distil_weight=0.5, temperature=10.0, tfkd_temperature=1.0,
               tfkd_smooth_temperature=10.0, correct_prob=0.9, num_students=3, student_arch="resnet18",
               teacher_arch="resnet50", teacher_init="scratch", teacher_sees_full_res=False,
               dml_students_stuck_in_eval=True, dml_e_apply_softmax=False, dml_update="simultaneous",
               shuffle=False, randaugment="per_sample", n_bins=15, algorithms=list(ALGORITHMS))
PROFILES = {
    # shipped 2,000/500 FMNIST sample: 100 train images, batch 8 (13 batches: OneCycle needs > 10), 1 epoch, cohorts
    # of 2: the pipeline, not a result. A ResNet-18 teacher: a ResNet-50's 20 steps at batch 8 are chaotic (from
    # step 4 on its losses differ between CPU kernels even in float64), so nbval could not regenerate them elsewhere.
    # Sized to stay under 2 minutes on 2 cores in float64 (issue 15; cut again when the shared machine ran 30 % slower:
    # 100 images, 100 test images, a check every 4 batches instead of 2); dml_e_corrected is left out as in reduced
    "smoke": dict(_COMMON, seeds=[42], data_source="sample", train_per_class=10, holdout_per_class=5, val_size=32,
                  test_size=100,
                  epochs=1, teacher_epochs=1, batch_size=8, val_every=4, downscale_sizes=[14], num_students=2,
                  teacher_arch="resnet18", precision="fp32",
                  algorithms=[a for a in ALGORITHMS if a != "dml_e_corrected"]),
    # real FMNIST, class-balanced 5,000 train (+ 1,000 held out for temperature scaling), the full 10k test set,
    # 4 epochs at batch 256 (80 steps), validation on 500 test images 3x per epoch, bf16 autocast + channels_last
    # (issue 16): a ResNet-18 step at batch 256 in bf16 is ~2x the fp32 batch-64 step's images/s on one core
    # (benchmarks/bench_resnet_precision.py), so 2.2x the images of the fp32 profile it replaced (3,000 x 3 epochs
    # at batch 64) fit in about the same time, nearer the source's batch 1024: 22-33 min per seed on one core of
    # the shared 2-core machine (the fp32 profile: 15-33 min). dml_e_corrected is left out: with
    # dml_e_apply_softmax=False its gradient equals dml_corrected's (KL's gradient in the student logits is
    # softmax(z) - target, linear in the target; tested)
    "reduced": dict(_COMMON, seeds=[42], data_source="real", train_per_class=500, holdout_per_class=100,
                    val_size=500, test_size=None, epochs=4, teacher_epochs=4, batch_size=256, val_every=7, downscale_sizes=[14],
                    algorithms=[a for a in ALGORITHMS if a != "dml_e_corrected"], precision="bf16"),
    # the source's main.py: all 60k (less 5k held out for temperature scaling; holdout_per_class=0 trains on all
    # 60k and skips it), 10 epochs, batch 1024, validation on the whole test set every 2*log_freq batches. bf16
    # autocast + channels_last (the source computed in fp32): what full runs on CUDA always did before `precision`
    "full": dict(_COMMON, seeds=[42], data_source="real", train_per_class=None, holdout_per_class=500, val_size=None,
                 test_size=None,
                 epochs=10, teacher_epochs=10, batch_size=1024, val_every=None, downscale_sizes=[7, 14, 21],
                 precision="bf16"),
}


def _bool(name, value):
    if not isinstance(value, bool):
        validate.fail(name, value, "must be True or False")


def check(*, algorithms, data_source, train_per_class, holdout_per_class, val_size, epochs, teacher_epochs, batch_size,
          val_every, lr, weight_decay, distil_weight, temperature, tfkd_temperature, tfkd_smooth_temperature,
          correct_prob, num_students, student_arch, teacher_arch, teacher_init, teacher_sees_full_res,
          dml_students_stuck_in_eval, dml_e_apply_softmax, dml_update, shuffle, randaugment, n_bins,
          downscale_sizes, precision="fp32", test_size=None, profile=None, **_):
    """Every study parameter of notebook 03, before any data is read."""
    numerics.check_precision(precision, profile)
    validate.choices("algorithms", algorithms, ALGORITHMS)
    validate.choice("data_source", data_source, DATA_SOURCES)
    if train_per_class is not None:
        validate.positive_int("train_per_class", train_per_class)
    validate.non_negative_int("holdout_per_class", holdout_per_class)
    if val_size is not None:
        validate.positive_int("val_size", val_size)
    for name, v in (("epochs", epochs), ("teacher_epochs", teacher_epochs), ("batch_size", batch_size),
                    ("n_bins", n_bins)):
        validate.positive_int(name, v)
    n = data.sizes("fashion_mnist", data_source)
    src = f"data_source={data_source!r}"
    data.at_most("holdout_per_class", holdout_per_class, n["train_per_class"] - 1,
                 f"{n['train_per_class']} training images per class in {src}, less one to train on")
    data.at_most("train_per_class", train_per_class, n["train_per_class"] - holdout_per_class,
                 f"{n['train_per_class']} images per class in {src} less holdout_per_class={holdout_per_class}")
    if test_size is not None:
        validate.positive_int("test_size", test_size)
    data.at_most("test_size", test_size, n["test"], f"the {n['test']} test images of {src}")
    data.at_most("val_size", val_size, test_size or n["test"],
                 f"test_size={test_size}" if test_size else f"the {n['test']} test images of {src}")
    n_train = NUM_CLASSES * (train_per_class or n["train_per_class"] - holdout_per_class)
    data.at_most("batch_size", batch_size, n_train, f"the {n_train} training images of this configuration")
    if val_every is not None:
        validate.positive_int("val_every", val_every)
    validate.positive("lr", lr)
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        validate.fail("weight_decay", weight_decay, "must be a number >= 0")
    validate.unit_interval("distil_weight", distil_weight)
    for name, v in (("temperature", temperature), ("tfkd_temperature", tfkd_temperature),
                    ("tfkd_smooth_temperature", tfkd_smooth_temperature)):
        validate.temperature(v, name)
    validate.unit_interval("correct_prob", correct_prob)
    validate.positive_int("num_students", num_students)
    if num_students < 2 and any(a in DML_ALGOS for a in algorithms):
        validate.fail("num_students", num_students, "DML needs a cohort of at least 2 students")
    validate.choice("student_arch", student_arch, models.RESNETS)
    validate.choice("teacher_arch", teacher_arch, models.RESNETS)
    validate.choice("teacher_init", teacher_init, TEACHER_INITS)
    for name, v in (("teacher_sees_full_res", teacher_sees_full_res),
                    ("dml_students_stuck_in_eval", dml_students_stuck_in_eval),
                    ("dml_e_apply_softmax", dml_e_apply_softmax), ("shuffle", shuffle)):
        _bool(name, v)
    validate.choice("dml_update", dml_update, DML_UPDATES)
    validate.choice("randaugment", randaugment, RANDAUGMENT)
    if not isinstance(downscale_sizes, (list, tuple)) or ("crossq" in algorithms and not downscale_sizes):
        validate.fail("downscale_sizes", downscale_sizes, "must be a list of image sizes (non-empty for 'crossq')")
    for s in downscale_sizes:
        if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s < 28:
            validate.fail("downscale_sizes", downscale_sizes, "sizes must be integers in 1..27 (28 is plain kd)")


# ---------------------------------------------------------------- data: uint8 tensors in (device) memory


@dataclass
class Fmnist:
    train_x: torch.Tensor    # uint8 [N,1,28,28] (RandAugment works on uint8), on the device
    train_y: torch.Tensor
    holdout_x: torch.Tensor  # normalised float [M,3,28,28]: temperature-scaling split from the training data
    holdout_y: torch.Tensor
    test_x: torch.Tensor     # normalised float [10000,3,28,28]
    test_y: torch.Tensor
    val_n: int               # the first val_n test images are the in-training check set (C-Q4: test = val)
    data_key: dict = field(default_factory=dict)  # data.cache_key of the files read: part of the teacher's key


def normalise(x_uint8: torch.Tensor) -> torch.Tensor:
    """Grayscale(3) -> ToTensor -> Normalize((0.2860,), (0.3530,)) on uint8 [N,1,H,W]."""
    x = (numerics.cast(x_uint8) / 255.0 - FMNIST_MEAN) / FMNIST_STD
    return x.expand(-1, 3, -1, -1).contiguous()


def resize(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """torchvision Resize((s, s)) on tensors (antialiased), applied after Normalize as in the source."""
    if size is None or size == x.shape[-1]:
        return x
    import torchvision.transforms.v2.functional as TF

    return TF.resize(x, [size, size], antialias=True)


def load_fmnist(source: str, *, train_per_class=None, holdout_per_class: int = 0, val_size=None, data_dir=None,
                device: str = "cpu", download: bool = False, test_size=None) -> Fmnist:
    """Class-balanced train / hold-out split of the training data (first images of each class in dataset order, so
    the unshuffled order of C-Q9 stays the dataset's), the whole test set (or its first `test_size` images: smoke,
    where evaluating a dozen float64 ResNets on every test image would be half of the notebook's time)."""
    tr = data.load("fashion_mnist", "train", source=source, data_dir=data_dir, download=download)
    te = data.load("fashion_mnist", "test", source=source, data_dir=data_dir, download=download)
    if test_size is not None:
        te = dataclasses.replace(te, x=te.x[:test_size], y=te.y[:test_size])  # val_size <= test_size: same checks
    per_class = int(torch.bincount(tr.y).min())
    need = (train_per_class or 0) + holdout_per_class
    if train_per_class is not None and need > per_class:
        validate.fail("train_per_class", train_per_class,
                      f"train_per_class + holdout_per_class must be <= {per_class} (images per class in this split)")
    # hold-out = the last `holdout_per_class` images of each class, train = the first ones
    idx_train, idx_hold = [], []
    for c in range(NUM_CLASSES):
        ids = torch.nonzero(tr.y == c).flatten()
        n_hold = holdout_per_class
        idx_hold.append(ids[len(ids) - n_hold:] if n_hold else ids[:0])
        rest = ids[:len(ids) - n_hold]
        idx_train.append(rest if train_per_class is None else rest[:train_per_class])
    it, ih = torch.cat(idx_train).sort().values, torch.cat(idx_hold).sort().values
    if val_size is not None and val_size > len(te):
        validate.fail("val_size", val_size, f"must be <= {len(te)} (the test set)")
    to = lambda t: t.to(device)
    return Fmnist(to(tr.x[it].unsqueeze(1)), to(tr.y[it]), to(normalise(tr.x[ih].unsqueeze(1))), to(tr.y[ih]),
                  to(normalise(te.x.unsqueeze(1))), to(te.y), val_size or len(te), data.cache_key(tr, te))


def randaugment(x: torch.Tensor, mode: str) -> torch.Tensor:
    """torchvision's RandAugment() defaults (2 ops, magnitude 9) on uint8 [B,1,H,W] tensors. 'per_sample' draws the
    ops for every image, as the source's per-image PIL transform (torch's global RNG, seeded per epoch);
    'per_batch' applies one draw to the whole batch (cheaper on a GPU, not faithful); 'none' skips it."""
    if mode == "none":
        return x
    import torchvision.transforms.v2 as v2

    ra = v2.RandAugment()
    if mode == "per_batch":
        return ra(x)
    return torch.stack([ra(xi) for xi in x])


# ---------------------------------------------------------------- helpers


def _precision(p: dict) -> str:
    return p.get("precision", "fp32")  # parameter dicts made before `precision` existed computed in fp32


@torch.no_grad()
def logits_of(model, x: torch.Tensor, *, batch_size: int = 1000, restore_mode: bool = True,
              precision: str = "fp32") -> torch.Tensor:
    """Eval-mode logits (float32, CPU). restore_mode=False leaves the model in eval mode (C-Q11, faithful)."""
    was = model.training
    model.eval()
    with numerics.autocast(x.device, precision):
        out = torch.cat([numerics.cast(model(numerics.model_layout(x[i:i + batch_size], precision)))
                         for i in range(0, len(x), batch_size)])
    if restore_mode:
        model.train(was)
    return out.cpu()


def batch_mean_accuracy(logits: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    """The source's validation accuracy: mean of per-batch accuracies (the last, partial batch over-weighted)."""
    accs = [(logits[i:i + batch_size].argmax(1) == y[i:i + batch_size]).float().mean().item()
            for i in range(0, len(y), batch_size)]
    return float(np.mean(accs))


def calibration(logits: torch.Tensor, y: torch.Tensor, *, n_bins: int = 15) -> dict:
    """Accuracy, NLL, ECE (15 equal-width bins, lower < conf <= upper), mean entropy and mean confidence."""
    y = y.cpu()
    p = logits.double().softmax(1)
    return {"acc": metrics.accuracy(logits, y), "nll": metrics.nll(logits, y), "ece": metrics.ece(p, y, n_bins),
            "entropy": metrics.mean_entropy(p), "confidence": p.max(1).values.mean().item()}


def fit_temperature(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Guo et al. (2017) temperature scaling: the T > 0 minimising the NLL of logits / T (LBFGS on log T)."""
    logits, y = logits.double().cpu(), y.cpu()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, tolerance_grad=1e-10, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.exp().item())


def log_freq(n_batches: int) -> int:
    """The source's min(100, int(len(train_loader) / 10)); it crashed (modulo by zero) below 10 batches: 1 here."""
    return max(1, min(100, n_batches // 10))


def build_model(arch: str, seed: int, device: str, init: str = "scratch", precision: str = "fp32"):
    torch.manual_seed(seed)
    if init == "imagenet":
        import torchvision.models as tvm

        # ImageNet weights (torchvision V1, as the source), new 10-class fc: needs a connection the first time
        name = {"resnet18": "ResNet18_Weights", "resnet34": "ResNet34_Weights", "resnet50": "ResNet50_Weights"}[arch]
        m = getattr(tvm, arch)(weights=getattr(tvm, name).IMAGENET1K_V1)
        m.fc = torch.nn.Linear(m.fc.in_features, NUM_CLASSES)
    else:
        m = models.resnet(arch, NUM_CLASSES)
    return numerics.model_layout(m.to(device), precision)


# ---------------------------------------------------------------- one algorithm, checkpointed per epoch


def train_algorithm(algo: str, fm: Fmnist, p: dict, *, seed: int, size: int | None = None, teacher=None,
                    arch: str | None = None, epochs: int | None = None, init: str = "scratch", device: str = "cpu",
                    checkpoint=None, progress: bool = True, desc: str = "", keep_models: bool = False) -> dict:
    """Train one algorithm (a cohort of `num_students` for DML) and evaluate it. Returns per member: the history of
    training-batch metrics (every log_freq batches, C-Q3) and validation checks (every val_every batches, C-Q4),
    final and best-check models' test logits, hold-out logits, and the final state dict (teacher only).
    `checkpoint` (a path) is written after every epoch; a rerun resumes there, a finished one returns at once.
    keep_models=True adds the trained modules under 'models' (not checkpointed; for tests and inspection)."""
    dml = algo in DML_ALGOS
    n = p["num_students"] if dml else 1
    arch = arch or p["student_arch"]
    epochs = epochs or p["epochs"]
    stuck_flag = dml and (algo in ("dml", "dml_e")) and p["dml_students_stuck_in_eval"]
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False) if checkpoint and checkpoint.is_file() else None
    if saved is not None and saved.get("done"):
        return saved["result"]
    prec = _precision(p)
    students = [build_model(arch, seed + i, device, init, prec) for i in range(n)]
    loader = data.TensorLoader(fm.train_x, fm.train_y, p["batch_size"], shuffle=p["shuffle"], seed=seed)
    nb = len(loader)
    if epochs * nb * 0.1 <= 1:  # OneCycleLR(pct_start=0.1) divides by zero with 10 steps or fewer
        validate.fail("batch_size", p["batch_size"], f"leaves {epochs * nb} training steps; OneCycle needs more than 10")
    opts = [train.make_optimizer("adamw", m.parameters(), p["lr"], betas=(0.9, 0.999), weight_decay=p["weight_decay"])
            for m in students]
    scheds = [train.make_scheduler("onecycle", o, epochs=epochs, steps_per_epoch=nb, pct_start=0.1) for o in opts]
    lf = log_freq(nb)
    ve = p["val_every"] or 2 * lf
    state = {"epoch": 0, "stuck": False, "history": [[] for _ in range(n)], "checks": [[] for _ in range(n)],
             "best": [(-1.0, None) for _ in range(n)]}  # (acc, step) of the best check per member
    if saved is not None:
        for m, sd in zip(students, saved["models"]):
            m.load_state_dict(sd)
        for o, sd in zip(opts, saved["opts"]):
            o.load_state_dict(sd)
        for s, sd in zip(scheds, saved["scheds"]):
            s.load_state_dict(sd)
        state = saved["state"]
    val_x = resize(fm.test_x[:fm.val_n], size)
    val_y = fm.test_y[:fm.val_n].cpu()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs * nb, initial=state["epoch"] * nb, desc=desc or algo, leave=False)
    try:
        while state["epoch"] < epochs:
            epoch = state["epoch"]
            torch.manual_seed(seed * 1000 + epoch)  # RandAugment draws from torch's global RNG: resumable per epoch
            for m in students:
                m.train(not state["stuck"])
            for b, (xb, yb) in enumerate(loader.epoch(epoch)):
                step = epoch * nb + b
                x_full = normalise(randaugment(xb, p["randaugment"]))
                x = numerics.model_layout(resize(x_full, size), prec)
                t_logits = None
                if teacher is not None:
                    x_t = x_full if p["teacher_sees_full_res"] else resize(x_full, size)
                    with torch.no_grad(), numerics.autocast(device, prec):
                        t_logits = numerics.cast(teacher(numerics.model_layout(x_t, prec)))
                if dml and p["dml_update"] == "alternating":
                    outs = []
                    for i, m in enumerate(students):  # Zhang et al.: peers re-predicted after each update
                        with numerics.autocast(device, prec):
                            z = numerics.cast(m(x))
                            with torch.no_grad():
                                peers = [numerics.cast(students[j](x)) for j in range(n) if j != i]
                        loss = _loss(algo, z, yb, p, peers=peers)
                        opts[i].zero_grad(set_to_none=True)
                        loss.backward()
                        opts[i].step()
                        outs.append((z.detach(), loss.detach()))
                else:
                    outs = joint_step(algo, students, opts, x, yb, p, teacher_logits=t_logits, device=device,
                                      precision=prec)
                for s in scheds:
                    s.step()
                if b % lf == 0:  # ClassifierMetrics on the (augmented) training batch, logged every log_freq
                    yc = yb.cpu()
                    v = losses.tfkd_virtual_targets(yc, NUM_CLASSES, temperature=1.0, correct_prob=0.9,
                                                    smooth_teacher=False)
                    for i, (z, l) in enumerate(outs):
                        z = numerics.cast(z).cpu()
                        pz = z.double().softmax(1)
                        state["history"][i].append({
                            "step": step, "epoch": epoch + b / nb, "loss": l.item(), "train_acc": metrics.accuracy(z, yc),
                            "train_ece": metrics.ece(pz, yc, p["n_bins"]), "train_entropy": metrics.mean_entropy(pz),
                            "train_kl_virtual": F.kl_div(z.log_softmax(1), v, reduction="batchmean").item()})
                if b % ve == 0:  # validation on the live students, after this batch's update
                    for i, m in enumerate(students):
                        z = logits_of(m, val_x, batch_size=p["batch_size"], restore_mode=not stuck_flag, precision=prec)
                        acc = batch_mean_accuracy(z, val_y, p["batch_size"])
                        c = calibration(z, val_y, n_bins=p["n_bins"])
                        state["checks"][i].append({"step": step, "epoch": epoch + (b + 1) / nb, "val_acc": acc,
                                                   "val_ece": c["ece"], "val_nll": c["nll"],
                                                   "val_entropy": c["entropy"]})
                        if acc > state["best"][i][0]:
                            state["best"][i] = (acc, step)
                    if stuck_flag:
                        state["stuck"] = True  # C-Q11: nothing calls .train() again
                if bar is not None:
                    bar.update(1)
            state["epoch"] = epoch + 1
            if checkpoint:
                train.atomic_save({"models": [m.state_dict() for m in students], "opts": [o.state_dict() for o in opts],
                                   "scheds": [s.state_dict() for s in scheds], "state": state}, checkpoint)
    finally:
        if bar is not None:
            bar.close()
    test_x = resize(fm.test_x, size)
    hold_x = resize(fm.holdout_x, size)
    members = []
    for i, m in enumerate(students):
        best_acc, best_step = state["best"][i]
        members.append({"history": state["history"][i], "checks": state["checks"][i], "best_check_acc": best_acc,
                        "best_check_step": best_step, "test_logits": logits_of(m, test_x, precision=prec),
                        "holdout_logits": logits_of(m, hold_x, precision=prec) if len(hold_x) else None})
    result = {"algo": algo, "size": size or 28, "arch": arch, "seed": seed, "steps_per_epoch": nb, "log_freq": lf,
              "val_every": ve, "trained_in_eval_mode": bool(stuck_flag), "members": members,
              "final_state": students[0].state_dict() if algo == "teacher" else None}
    if checkpoint:
        train.atomic_save({"done": True, "result": result}, checkpoint)
    return dict(result, models=students) if keep_models else result


def joint_step(algo, students, opts, x, y, p, *, teacher_logits=None, device: str = "cpu", precision: str = "fp32"):
    """One update of every student on batch x from the same forward pass (the source's simultaneous DML update;
    a cohort of one for the other algorithms). Returns [(logits, loss)] detached, one per student."""
    with numerics.autocast(device, precision):
        zs = [numerics.cast(m(x)) for m in students]
    n = len(zs)
    ls = [_loss(algo, z, y, p, peers=[zs[j] for j in range(n) if j != i], teacher_logits=teacher_logits)
          for i, z in enumerate(zs)]
    for o in opts:
        o.zero_grad(set_to_none=True)
    # peers are detached inside the losses, so one backward of the sum = each student's own gradient
    sum(ls).backward()
    for o in opts:
        o.step()
    return [(z.detach(), l.detach()) for z, l in zip(zs, ls)]


def _loss(algo, z, y, p, *, peers=(), teacher_logits=None):
    w = p["distil_weight"]
    if algo in ("baseline", "teacher"):
        return F.cross_entropy(z, y)
    if algo in ("kd", "crossq"):
        return losses.hinton_kd(z, teacher_logits, y, temperature=p["temperature"], distil_weight=w)
    if algo in DML_ALGOS:
        return losses.dml_loss(z, peers, y, distil_weight=w, use_ensemble=algo.startswith("dml_e"),
                               apply_softmax=p["dml_e_apply_softmax"])
    if algo == "tfkd":
        return losses.tfkd_loss(z, y, temperature=p["tfkd_temperature"], distil_weight=w,
                                correct_prob=p["correct_prob"], smooth_teacher=False)
    if algo == "tfkd_smooth":
        return losses.tfkd_loss(z, y, temperature=p["tfkd_smooth_temperature"], distil_weight=w,
                                correct_prob=p["correct_prob"], smooth_teacher=True)
    raise ValueError(f"algo={algo!r} is not allowed: choose one of {ALGORITHMS}")


# ---------------------------------------------------------------- teacher: trained once, cached by configuration


def teacher_config(p: dict, fm: Fmnist, seed: int) -> dict:
    return {"version": TEACHER_CACHE_VERSION, "arch": p["teacher_arch"], "init": p["teacher_init"],
            "epochs": p["teacher_epochs"], "batch_size": p["batch_size"], "lr": p["lr"],
            "weight_decay": p["weight_decay"], "seed": seed, "data_source": p["data_source"],
            "n_train": len(fm.train_y), "train_per_class": p["train_per_class"],
            "holdout_per_class": p["holdout_per_class"], "val_size": fm.val_n, "val_every": p["val_every"],
            "randaugment": p["randaugment"], "shuffle": p["shuffle"], **fm.data_key, **numerics.cache_key(),
            # only when bf16: the keys of fp32 teachers cached before `precision` existed stay valid
            **({"precision": _precision(p)} if _precision(p) != "fp32" else {})}


def get_teacher(fm: Fmnist, p: dict, *, seed: int, device: str = "cpu", checkpoint=None):
    """The ResNet-50 teacher of this configuration (CE on the same training images and schedule as the students),
    from the cache under kdnb's cache folder or trained now. Returns (teacher in eval mode, its result, cache hit)."""
    cfg = teacher_config(p, fm, seed)
    path = data.cache_dir() / "teachers" / f"fmnist-{cfg['arch']}-{train.config_hash(cfg)}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with runs.teacher_lock(path):
        saved = torch.load(path, map_location="cpu", weights_only=False) if path.is_file() else None
        hit = saved is not None and saved.get("config") == cfg
        if hit:
            res = saved["result"]
        else:
            # no progress bar here: a cache hit shows none, and the notebook's outputs must not depend on the cache
            res = train_algorithm("teacher", fm, p, seed=seed, arch=cfg["arch"], epochs=cfg["epochs"],
                                  init=cfg["init"], device=device, checkpoint=checkpoint, progress=False)
            train.atomic_save({"config": cfg, "result": res}, path)
    teacher = build_model(cfg["arch"], seed, device, precision=_precision(p))
    teacher.load_state_dict(res["final_state"])
    teacher.eval().requires_grad_(False)
    return teacher, res, hit


# ---------------------------------------------------------------- all algorithms of one seed, and the tables


def run_seed(fm: Fmnist, p: dict, *, seed: int, device: str = "cpu", checkpoint=lambda name: None,
             progress: bool = True) -> dict:
    """Every selected algorithm for one seed: {run name: result}; the teacher is trained (or loaded) first when
    kd or crossq is selected. Cross-quality runs are named crossq<size>."""
    out = {}
    teacher = None
    if any(a in TEACHER_ALGOS for a in p["algorithms"]):
        teacher, res, hit = get_teacher(fm, p, seed=seed, device=device, checkpoint=checkpoint(f"teacher-seed{seed}"))
        out["teacher"] = dict(res, cache_hit=hit)
    for algo in p["algorithms"]:
        sizes = p["downscale_sizes"] if algo == "crossq" else [None]
        for s in sizes:
            name = f"crossq{s}" if algo == "crossq" else algo
            out[name] = train_algorithm(algo, fm, p, seed=seed, size=s, teacher=teacher if algo in TEACHER_ALGOS else None,
                                        device=device, checkpoint=checkpoint(f"{name}-seed{seed}"), progress=progress,
                                        desc=f"{name} seed {seed}")
    if teacher is not None:  # the teacher on the downscaled test images (what the faithful cross-quality KD sees)
        out["teacher"]["test_logits_at_size"] = {s: logits_of(teacher, resize(fm.test_x, s), precision=_precision(p))
                                                 for s in p["downscale_sizes"]}
    return out


def member_rows(results_by_seed: dict, fm: Fmnist, *, n_bins: int = 15) -> list[dict]:
    """One row per (seed, run, member): final-model test metrics, the source's best-check accuracy (max over the
    validation checks, C-Q4: on the first val_size test images), train-batch ECE as the source logged
    (last logged value and mean over the last epoch), and temperature scaling fitted on the hold-out split."""
    rows = []
    for seed, results in results_by_seed.items():
        for name, res in results.items():
            for i, m in enumerate(res["members"]):
                fin = calibration(m["test_logits"], fm.test_y, n_bins=n_bins)
                hist = m["history"]
                last_epoch = [h for h in hist if h["epoch"] >= math.floor(hist[-1]["epoch"])] if hist else []
                row = {"seed": seed, "run": name, "member": i, "size": res["size"],
                       "trained_in_eval_mode": res["trained_in_eval_mode"],
                       "final_acc": fin["acc"], "best_check_acc": m["best_check_acc"],
                       "nll": fin["nll"], "ece": fin["ece"], "entropy": fin["entropy"], "confidence": fin["confidence"],
                       "train_batch_ece_last": hist[-1]["train_ece"] if hist else float("nan"),
                       "train_batch_ece_last_epoch": float(np.mean([h["train_ece"] for h in last_epoch])) if hist else float("nan"),
                       "train_batch_entropy_last_epoch": float(np.mean([h["train_entropy"] for h in last_epoch])) if hist else float("nan")}
                if m["holdout_logits"] is not None:
                    t = fit_temperature(m["holdout_logits"], fm.holdout_y)
                    ts = calibration(m["test_logits"] / t, fm.test_y, n_bins=n_bins)
                    row.update(ts_temperature=t, ts_nll=ts["nll"], ts_ece=ts["ece"], ts_entropy=ts["entropy"])
                rows.append(row)
    return rows


def summary_table(rows: list[dict]):
    """Mean over cohort members and seeds per run (DML: the cohort mean; best_check_acc: the source's max over
    students and checks, averaged over seeds)."""
    import pandas as pd

    df = pd.DataFrame(rows)
    per_seed = df.groupby(["run", "seed"], sort=False).agg(
        **{c: (c, "mean") for c in df.columns if c not in ("run", "seed", "member", "trained_in_eval_mode", "best_check_acc")},
        best_check_acc=("best_check_acc", "max"), members=("member", "count"))
    out = per_seed.groupby("run", sort=False).mean()
    out["seeds"] = per_seed.groupby("run", sort=False).size()
    return out


# ---------------------------------------------------------------- claims C1 and C2: verdicts from our numbers

C1_ACC_GAP = 0.02    # "does not reach high accuracy": >= 2 points below the supervised baseline
C1_DROP = 0.05       # "unstable": a drop of >= 5 points between consecutive checks in the second half of training
C1_SAME = 0.02       # "DML ~ DML_e": final accuracies within 2 points


def max_check_drop(checks: list[dict], after_epoch: float) -> float:
    """Largest fall of validation accuracy between consecutive checks after `after_epoch` (0 if none). The notebook
    takes the second half of training: around OneCycle's peak learning rate every run, the baseline included, can
    drop sharply (the reduced baseline fell 0.71 -> 0.50 at the start of epoch 2), which says nothing about DML."""
    acc = [c["val_acc"] for c in checks if c["epoch"] > after_epoch]
    return max([0.0] + [a - b for a, b in zip(acc[:-1], acc[1:])])


def c1_verdict(results_by_seed: dict, summary, *, after_epoch: float) -> dict:
    """C1 for the faithful cohorts (dml, dml_e: C-Q11 as flagged) and the corrected ones. Three parts: DML final
    test accuracy >= 2 points under the baseline; unstable (a check-to-check drop after `after_epoch` of >= 5 points
    and >= twice the baseline's); DML and DML_e within 2 points. supported = all, not supported = none, else mixed."""
    def drop(name):
        return float(np.mean([max(max_check_drop(m["checks"], after_epoch) for m in r[name]["members"])
                              for r in results_by_seed.values()]))

    out, lines = {}, []
    base_acc, base_drop = summary.loc["baseline", "final_acc"], drop("baseline")
    for tag, (a, e) in {"with C-Q11": ("dml", "dml_e"), "without C-Q11": ("dml_corrected", "dml_e_corrected")}.items():
        if a not in summary.index:
            continue
        has_e = e in summary.index
        acc_a, d = summary.loc[a, "final_acc"], max(drop(a), drop(e) if has_e else 0.0)
        acc_e = summary.loc[e, "final_acc"] if has_e else float("nan")
        parts = {"low accuracy": bool(acc_a <= base_acc - C1_ACC_GAP),
                 "unstable": bool(d >= max(C1_DROP, 2 * base_drop))}
        if has_e:
            parts["DML ~ DML_e"] = bool(abs(acc_a - acc_e) <= C1_SAME)
        k = sum(parts.values())
        verdict = claims.verdict(k, len(parts))
        out[tag] = {"verdict": verdict, "values": [acc_a, acc_e, base_acc, d, base_drop], "parts": parts}
        lines.append(f"C1 {tag}: {verdict} - {a} {acc_a:.4f}" + (f", {e} {acc_e:.4f}" if has_e else f" ({e} not run)")
                     + f" vs baseline {base_acc:.4f} (final test acc, cohort mean); largest check-to-check drop "
                     f"{d:.4f} vs baseline {base_drop:.4f}; " + ", ".join(f"{k_}: {'yes' if v else 'no'}" for k_, v in parts.items()))
    return {"by_setting": out, "text": "\n".join(lines)}


def c2_verdict(summary) -> dict:
    """C2: the smoothed virtual teacher makes an under-confident (mean confidence < accuracy), higher-entropy
    student; dropping the smoothing lowers ECE (the train-batch ECE the source logged, C-Q3) and raises accuracy.
    supported = all four parts, not supported = none, else mixed. The test-set ECE is reported beside."""
    s, u = summary.loc["tfkd_smooth"], summary.loc["tfkd"]
    parts = {"smoothed under-confident": bool(s["confidence"] < s["final_acc"]),
             "smoothed higher entropy": bool(s["entropy"] > u["entropy"]),
             "unsmoothed lower train-batch ECE": bool(u["train_batch_ece_last_epoch"] < s["train_batch_ece_last_epoch"]),
             "unsmoothed higher accuracy": bool(u["final_acc"] > s["final_acc"])}
    verdict = claims.verdict(sum(parts.values()), len(parts))
    values = [s["train_batch_ece_last_epoch"], u["train_batch_ece_last_epoch"], s["ece"], u["ece"], s["final_acc"],
              u["final_acc"], s["entropy"], u["entropy"]]
    text = (f"C2: {verdict} - smoothed vs unsmoothed: train-batch ECE {values[0]:.4f} vs {values[1]:.4f}, test ECE "
            f"{values[2]:.4f} vs {values[3]:.4f}, test acc {values[4]:.4f} vs {values[5]:.4f}, entropy {values[6]:.4f} vs "
            f"{values[7]:.4f} nats, mean confidence {s['confidence']:.4f} vs {u['confidence']:.4f}; "
            + ", ".join(f"{k_}: {'yes' if v else 'no'}" for k_, v in parts.items()))
    return {"verdict": verdict, "values": values, "parts": parts, "text": text}


# ---------------------------------------------------------------- the committed evidence, as the conclusion quotes it


def evidence_markdown(profile: str = "reduced", results=None) -> str:
    """The numbers notebook 03's conclusion rests on, computed from the committed `profile` run records (never typed):
    per run, mean ± std over seeds of final test accuracy, and means of test ECE, ECE after temperature scaling and
    entropy; then the per-seed figures behind C1, C2, temperature scaling and cross-quality KD."""
    import json

    from . import profiles, report, runs

    root = results or runs.RESULTS
    recs = [r for r in report.load_runs(root) if r["notebook"] == "03_dml_kd_calibration"
            and profiles.trained_profile(r["params"], "03_dml_kd_calibration", profile)]
    if not recs:
        return f"No committed `{profile}` run of this notebook: nothing to conclude from yet."
    recs.sort(key=lambda r: r["params"]["seeds"])
    seeds = [s for r in recs for s in r["params"]["seeds"]]
    logged = [json.loads((r["_dir"] / "metrics.json").read_text())["metrics"] for r in recs]
    summ = [{row["run"]: row for row in m["summary"]} for m in logged]
    names = [n for n in summ[0] if n != "teacher" and all(n in s for s in summ)]
    col = lambda name, key: np.array([s[name][key] for s in summ], dtype=float)
    std = lambda a: f" ± {a.std(ddof=1):.4f}" if len(a) > 1 else ""
    lines = [f"Committed `{profile}` runs, seeds {seeds} ({', '.join(r['_dir'].name for r in recs)}): final test accuracy "
             f"mean ± std over the seeds (cohort mean for DML), the other columns means.", "",
             "| run | accuracy | test ECE | ECE after temperature scaling | entropy (nats) |", "|---|---|---|---|---|"]
    for n in ["teacher"] + names:
        acc = col(n, "final_acc")
        lines.append(f"| {n} | {acc.mean():.4f}{std(acc)} | {col(n, 'ece').mean():.4f} | {col(n, 'ts_ece').mean():.4f} | "
                     f"{col(n, 'entropy').mean():.2f} |")
    pts = lambda a: ", ".join(f"{100 * v:+.1f}" for v in a)
    base = col("baseline", "final_acc")
    c1 = [r["claims"]["C1"]["values"][0] for r in recs]
    lines += ["", f"- **C1**, DML cohort minus baseline per seed (points): with C-Q11 {pts(col('dml', 'final_acc') - base)}; "
                  f"without it (dml_corrected) {pts(col('dml_corrected', 'final_acc') - base)}; DML_e minus DML "
                  f"{pts(col('dml_e', 'final_acc') - col('dml', 'final_acc'))}. Largest late check-to-check drop of any DML "
                  f"student per seed: {', '.join(f'{100 * v[3]:.1f}' for v in c1)} points (the instability rule: 5)."]
    c2 = np.array([r["claims"]["C2"]["values"][0] for r in recs], dtype=float).mean(axis=0)
    lines.append(f"- **C2**, means over seeds, smoothed → unsmoothed Tf-KD: training-batch ECE {c2[0]:.3f} → {c2[1]:.3f}, "
                 f"test ECE {c2[2]:.3f} → {c2[3]:.3f}, entropy {c2[6]:.2f} → {c2[7]:.2f} nats; accuracy gain per seed "
                 f"{pts(col('tfkd', 'final_acc') - col('tfkd_smooth', 'final_acc'))} points.")
    spread = lambda key: np.mean([max(s[n][key] for n in names) - min(s[n][key] for n in names) for s in summ])
    lines.append(f"- **Temperature scaling**: spread of test ECE across the student runs (max − min, mean over seeds) "
                 f"{spread('ece'):.3f} before, {spread('ts_ece'):.3f} after; fitted T of tfkd_smooth "
                 f"{col('tfkd_smooth', 'ts_temperature').mean():.2f}.")
    cq = [n for n in names if n.startswith("crossq")]
    if cq:
        t_acc = np.mean([m["crossq"]["teacher_acc"][0] for m in logged])
        lines.append(f"- **Cross-quality KD** ({cq[0]}): the teacher's accuracy on the downscaled test images "
                     f"{t_acc:.3f}; the student's test ECE {col(cq[0], 'ece').mean():.3f}. KD's from-scratch teacher "
                     f"{col('teacher', 'final_acc').mean():.3f} against the baseline's {base.mean():.3f}.")
    return "\n".join(lines)


# ---------------------------------------------------------------- attribution (issue 12, kdnb.attribution)

# C1's quirks: the ones that change how a DML cohort trains (C-Q2 changes only DML_e, C-Q5 only cross-quality KD)
QUIRKS = {"dml_students_stuck_in_eval": (True, False),  # C-Q11
          "dml_update": ("simultaneous", "alternating"),  # C-Q6
          "shuffle": (False, True)}  # C-Q9
# a row needs only the baseline and the DML cohort (4 ResNet-18s, no teacher): about a third of a reduced run
_C1_RUNS = ["baseline", "dml"]
ABLATION_STARTS = {"faithful": {**{k: v[0] for k, v in QUIRKS.items()}, "algorithms": _C1_RUNS},
                   "corrected": {**{k: v[1] for k, v in QUIRKS.items()}, "algorithms": _C1_RUNS}}
ATTRIBUTION_PROFILE = "reduced"
# the cohorts each claim compares
CLAIM_RUNS = {"C1": ("baseline", "dml", "dml_e"), "C2": ("tfkd", "tfkd_smooth")}


def claim_applies(claim: str, params: dict) -> bool:
    """Whether a run speaks to a claim as the source made it: every quirk flag at the source's value and the
    claim's cohorts trained. An ablation run (one flag corrected, or only the baseline and DML) records none: its
    'dml' cohort is not the thesis's. `kdnb report` applies the same rule to records made before it existed."""
    return (all(runs.param(params, k) == ends[0] for k, ends in QUIRKS.items())
            and set(CLAIM_RUNS.get(claim, ())) <= set(params.get("algorithms") or ()))


ATTRIBUTION = {"C1": ("dml_minus_baseline", "DML cohort's mean final test accuracy minus the baseline's (points)")}


def attribution_samples(claim: str, params: dict, metrics: dict) -> list[dict]:
    """One sample per seed of a run that trained both the baseline and the `dml` cohort: its quirk flags and the
    cohort's mean final test accuracy minus the baseline's, in points."""
    if claim != "C1":
        return []
    acc: dict[tuple[str, int], list[float]] = {}
    for m in metrics.get("members", []):
        acc.setdefault((m["run"], m["seed"]), []).append(m["final_acc"])
    flags = {k: runs.param(params, k) for k in QUIRKS}
    return [{"flags": flags, "protocol": {}, "seed": seed,
             "value": round(100 * (float(np.mean(acc[("dml", seed)])) - acc[("baseline", seed)][0]), 4)}
            for (run, seed) in sorted(acc) if run == "baseline" and ("dml", seed) in acc]
