"""Study D (johnkorn/distillation at e134fc5, papers/04_emnist_mlp_student.md): a Keras CNN teacher distilled into
a 512-unit MLP on EMNIST letters, with Keras 2.0 semantics written out in torch.

Teacher CNN (3,378,970 parameters for 26 classes) and MLP student (415,258), glorot-uniform kernels and zero
biases, Adadelta(lr=1.0, rho=0.95, eps=1e-8) (Keras 2.0's defaults, not torch's), batch 256, shuffled every epoch,
and for every model the source's callbacks on val_loss: EarlyStopping(patience 3), ReduceLROnPlateau(patience 1,
factor 0.1, epsilon 1e-4), both acting as Keras 2.0.x did (kdnb.train.KerasEarlyStopping / KerasReduceLROnPlateau);
the final weights are the result. Losses are Keras' clipped categorical cross-entropy; the student's is
    L = lam * CE(onehot(y), softmax(z)) + s * CE(softmax(t/T), softmax(z/T)),  s = 1 (faithful, D-Q1) or T^2
with the teacher's logits t computed once per teacher and cached under a hash of the teacher's weights and of the
images (the source's train_logits.npy could silently outlive its teacher; ours cannot).

`dataset`: 'emnist_letters' (the study; torchvision's EMNIST split 'letters', labels 1-26 shifted to 0-25,
transposed images turned upright by kdnb.data) or a stand-in, 'mnist' / 'fashion_mnist' (10 classes: the models
then have 3,362,570 / 407,050 parameters). A stand-in result is never an EMNIST result: it is recorded under its own
claim ids (`D1-mnist-standin`, ...), which papers/04_emnist_mlp_student.yaml lists without a reported number.

Quirks as flags (faithful value first):
  t2_scaling   False | True       D-Q1: no T^2 on the soft term; a list runs both
  validation   'test' | 'holdout' D-Q2: the test set drove early stopping and the LR schedule and was reported as
                                   "val acc"; 'holdout' validates on 10 % of the training set instead
D-Q3 (HEAD broke the letters labels) is avoided by implementing e134fc5; D-Q4 (the T x lambda sweep was not
recorded) is what `kdnb sweep` reruns; D-Q5 (Keras vs torch defaults) is this module.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import claims, data, losses, models, numerics, papers, runs, train, validate

NOTEBOOK = "04_emnist_mlp_student"
DATASETS = ("emnist_letters", "mnist", "fashion_mnist")
STAND_INS = ("mnist", "fashion_mnist")
DATA_SOURCES = ("sample", "real")
VALIDATIONS = ("test", "holdout")
CLASS_NAMES = {
    "emnist_letters": [chr(ord("a") + i) for i in range(26)],  # the letters split merges upper and lower case
    "mnist": [str(i) for i in range(10)],
    "fashion_mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"],
}
# Keras 2.0.x defaults the source ran with (D.4)
ADADELTA_LR, ADADELTA = 1.0, {"rho": 0.95, "eps": 1e-8}
KERAS_EPS = 1e-7                      # K.epsilon(): the probability clip of categorical_crossentropy
ES_PATIENCE = 3                       # EarlyStopping(monitor='val_loss', patience=3), min_delta 0
LR_PLATEAU = {"factor": 0.1, "patience": 1, "epsilon": 1e-4}  # ReduceLROnPlateau(val_loss, patience=1), defaults
LOGIT_BATCH = 100                     # the source computed the teacher logits in batches of 100
HOLDOUT_FRACTION = 0.1                # D-Q2 corrected: 10 % of the training set validates
CACHE_VERSION = 1

PROFILES = {
    # synthetic EMNIST letters (2,600 train / 260 test, torchvision's raw layout): the pipeline in CI, not a result
    "smoke": dict(seeds=[0], dataset="emnist_letters", data_source="sample", teacher_epochs=3, epochs=5,
                  batch_size=256, temperature=10.0, lam=0.5, t2_scaling=[False, True], validation="test",
                  teacher_seed=0, train_baseline=True, sweep_summary=True),
    # the MNIST stand-in (EMNIST cannot be downloaded offline) with the full protocol except that the teacher
    # stops after at most 8 epochs (an epoch takes ~100 s of one CPU core: 30 would take up to ~50 min, more on a
    # shared machine); MLP alone and distilled MLP up to 50 epochs, as the source
    "reduced": dict(seeds=[0], dataset="mnist", data_source="real", teacher_epochs=8, epochs=50,
                    batch_size=256, temperature=10.0, lam=0.5, t2_scaling=[False, True], validation="test",
                    teacher_seed=0, train_baseline=True, sweep_summary=True),
    # e134fc5: real EMNIST letters, teacher --epochs 30 (it early-stopped after 26), MLP and student up to 50
    "full": dict(seeds=[0], dataset="emnist_letters", data_source="real", teacher_epochs=30, epochs=50,
                 batch_size=256, temperature=10.0, lam=0.5, t2_scaling=[False, True], validation="test",
                 teacher_seed=0, train_baseline=True, sweep_summary=True),
}


# ---------------------------------------------------------------- parameters


def as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def check(*, dataset, data_source, teacher_epochs, epochs, batch_size, temperature, lam, t2_scaling, validation,
          teacher_seed, train_baseline, sweep_summary, **_):
    """Every parameter of notebook 04, before any data is read: one ValueError naming the first bad one."""
    validate.choice("dataset", dataset, DATASETS)
    validate.choice("data_source", data_source, DATA_SOURCES)
    validate.positive_int("teacher_epochs", teacher_epochs)
    validate.positive_int("epochs", epochs)
    validate.positive_int("batch_size", batch_size)
    n = data.sizes(dataset, data_source)
    data.at_most("batch_size", batch_size, n["train"], f"the {n['train']} training images of {dataset!r} "
                 f"({data_source})")
    validate.temperature(temperature)
    validate.unit_interval("lam", lam)
    flags = as_list(t2_scaling)
    if not flags or any(not isinstance(f, bool) for f in flags) or len(set(flags)) != len(flags):
        validate.fail("t2_scaling", t2_scaling, "must be True, False or a list of distinct booleans, e.g. [False, True]")
    validate.choice("validation", validation, VALIDATIONS)
    validate.seed("teacher_seed", teacher_seed)
    for name, value in (("train_baseline", train_baseline), ("sweep_summary", sweep_summary)):
        if not isinstance(value, bool):
            validate.fail(name, value, "must be True or False")


def is_stand_in(dataset: str) -> bool:
    return dataset in STAND_INS


def dataset_label(dataset: str, source: str | None = None) -> str:
    """How every title and record names the data: a stand-in says so, and so do the smoke samples."""
    label = "EMNIST letters" if dataset == "emnist_letters" else \
        f"{ {'mnist': 'MNIST', 'fashion_mnist': 'Fashion-MNIST'}[dataset]} (stand-in for EMNIST letters)"
    if source == "sample" and dataset == "emnist_letters":
        source = "synthetic"  # EMNIST cannot ship: its sample is rendered letters (kdnb.samples)
    extra = {"synthetic": "synthetic smoke sample", "sample": "shipped smoke sample"}.get(source)
    return f"{label}, {extra}" if extra else label


def describe(params: dict) -> str:
    """What the setup cell prints below the parameters (kdnb.study.setup): a stand-in says it is one."""
    label = dataset_label(params["dataset"], params["data_source"])
    return (f"STAND-IN: {label}. Nothing below is an EMNIST-letters result or comparable with the source's numbers."
            if is_stand_in(params["dataset"]) else "")


# ---------------------------------------------------------------- models (Keras layers, torch modules)


def keras_init_(model: nn.Module) -> nn.Module:
    """Keras' defaults: glorot_uniform kernels (same fans as torch's xavier_uniform_ for Dense and Conv2D), zero biases."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def teacher_cnn(num_classes: int = 26) -> nn.Sequential:
    """Conv(64,3x3) ReLU, MaxPool 2, Dropout .25, Conv(128,3x3) ReLU, MaxPool 2, Dropout .25, Dense 1024 ReLU,
    Dropout .5, Dense; 'valid' padding; returns logits (the Keras model's softmax is in the loss).
    Flattened in torch's C,H,W order (Keras: H,W,C), which matters only when porting weights."""
    return keras_init_(nn.Sequential(
        nn.Conv2d(1, 64, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.25),
        nn.Conv2d(64, 128, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.25),
        nn.Flatten(), nn.Linear(128 * 5 * 5, 1024), nn.ReLU(), nn.Dropout(0.5), nn.Linear(1024, num_classes)))


def mlp_student(num_classes: int = 26) -> nn.Sequential:
    """Flatten 784, Dense 512 ReLU, Dropout .2, Dense (logits)."""
    return keras_init_(nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Dropout(0.2),
                                     nn.Linear(512, num_classes)))


# ---------------------------------------------------------------- data


@dataclass
class Data:
    train_x: torch.Tensor   # float [N,1,28,28] in [0,1] (/255, no normalisation: D.2), on the device
    train_y: torch.Tensor
    val_x: torch.Tensor     # the validation set the callbacks watch: the test set (faithful) or a holdout
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    dataset: str
    source: str             # 'real', 'sample' or 'synthetic' (the smoke EMNIST letters)
    validation: str
    num_classes: int
    data_key: dict = field(default_factory=dict)  # data.cache_key of the files read (labels included)

    @property
    def class_names(self) -> list[str]:
        return CLASS_NAMES[self.dataset]


def load(dataset: str, data_source: str, *, validation: str = "test", holdout_seed: int = 0, data_dir=None,
         device: str = "cpu", download: bool = False) -> Data:
    """Both splits through kdnb.data.load (torchvision's own readers; EMNIST turned upright, labels 0-25)."""
    validate.choice("dataset", dataset, DATASETS)
    validate.choice("data_source", data_source, DATA_SOURCES)
    validate.choice("validation", validation, VALIDATIONS)
    tr = data.load(dataset, "train", source=data_source, data_dir=data_dir, download=download)
    te = data.load(dataset, "test", source=data_source, data_dir=data_dir, download=download)
    if validation == "holdout":
        tr, va = data.holdout(tr, HOLDOUT_FRACTION, seed=holdout_seed)
    else:
        va = te
    f = lambda s: data.to_float(s.x, device=device)
    return Data(f(tr), tr.y.to(device), f(va), va.y.to(device), f(te), te.y.to(device), dataset, te.source,
                validation, data.NUM_CLASSES[dataset], data.cache_key(tr, te))


def images_hash(x: torch.Tensor) -> str:
    return runs.digest(x.detach().cpu().contiguous().numpy().tobytes(), 16)


# ---------------------------------------------------------------- Keras-style training


def keras_ce(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Keras categorical_crossentropy on the model's softmax output (clipped to [1e-7, 1 - 1e-7]), batch mean."""
    return losses._keras_categorical_crossentropy(target_probs, F.softmax(logits, dim=1), KERAS_EPS)


def kd_targets(y: torch.Tensor, teacher_logits: torch.Tensor | None, num_classes: int) -> torch.Tensor:
    """The source's targets: [onehot(y) | teacher logits] side by side (one-hot only without a teacher)."""
    onehot = numerics.cast(F.one_hot(y.long(), num_classes))
    return onehot if teacher_logits is None else torch.cat([onehot, numerics.cast(teacher_logits)], 1)


def make_loss(num_classes: int, *, temperature: float | None = None, lam: float | None = None,
              t2_scaling: bool = False):
    """loss(logits, targets): Keras CE against the one-hot part, or the KD loss when targets carry teacher logits."""
    def loss(logits, targets):
        onehot = targets[:, :num_classes]
        if targets.shape[1] == num_classes:
            return keras_ce(logits, onehot)
        return losses.keras_kd_loss(logits, targets[:, num_classes:], onehot.argmax(1), temperature=temperature,
                                    hard_weight=lam, t2_scaling=t2_scaling, eps=KERAS_EPS)
    return loss


def fit_keras(model: nn.Module, d: Data, loss, train_targets, val_targets, *, epochs: int, batch_size: int, seed: int,
              checkpoint=None, desc: str = "", progress: bool = False) -> dict:
    """model.fit(x, targets, shuffle=True, validation_data=val, callbacks=[EarlyStopping, ReduceLROnPlateau]) with
    Adadelta; the model keeps its final weights. Returns the epoch history and where training stopped."""
    loader = data.TensorLoader(d.train_x, train_targets, batch_size, shuffle=True, seed=seed)

    def evaluate(m):
        logits = train.predict(m, d.val_x, batch_size=1000)
        row = {"val_loss": loss(logits, val_targets).item(), "val_acc": (logits.argmax(1) == d.val_y).float().mean().item()}
        if d.validation == "holdout":
            row["test_acc"] = test_accuracy(m, d)
        return row

    es = train.KerasEarlyStopping("val_loss", patience=ES_PATIENCE)
    plateau = train.KerasReduceLROnPlateau("val_loss", **LR_PLATEAU)
    res = train.fit(model, loader, lambda m, xb, tb: loss(m(xb), tb), epochs=epochs, optimizer="adadelta",
                    lr=ADADELTA_LR, optimizer_kwargs=ADADELTA, evaluate=evaluate, select="final",
                    checkpoint=checkpoint, seed=seed, desc=desc, progress=progress, callbacks=[es, plateau])
    model.eval()
    return {"history": res.history, "stopped_epoch": res.stopped_epoch,
            "early_stopped": es.stopped_epoch is not None, "resumed_from": res.resumed_from}


def test_accuracy(model: nn.Module, d: Data) -> float:
    """model.evaluate's categorical accuracy on the test set (the first num_classes outputs: argmax of z)."""
    return (train.predict(model, d.test_x, batch_size=1000).argmax(1) == d.test_y).float().mean().item()


# ---------------------------------------------------------------- teacher, cached by configuration


def teacher_config(d: Data, *, epochs: int, batch_size: int, seed: int) -> dict:
    """Everything that fixes the teacher's weights (not the device): its hash names the cache file."""
    return {"version": CACHE_VERSION, "arch": "cnn_64_128_1024", "dataset": d.dataset, "source": d.source,
            "train": images_hash(d.train_x), "val": images_hash(d.val_x), "validation": d.validation,
            "n_train": len(d.train_y), "epochs": int(epochs), "batch_size": int(batch_size), "seed": int(seed),
            "adadelta": dict(ADADELTA, lr=ADADELTA_LR), "es_patience": ES_PATIENCE, "plateau": LR_PLATEAU,
            **d.data_key, **numerics.cache_key()}


def cache_folder() -> Path:
    return data.cache_dir() / "emnist_student"


def teacher_path(config: dict) -> Path:
    return cache_folder() / f"teacher-{train.config_hash(config)}.pt"


def weights_hash(model: nn.Module) -> str:
    """sha256 of the weights themselves (names, shapes, bytes): the key of everything computed from them."""
    def chunks():
        for name, t in model.state_dict().items():
            t = t.detach().cpu().contiguous()
            yield from (name.encode(), str(tuple(t.shape)).encode(), t.numpy().tobytes())

    return runs.hashes(chunks(), "sha256")["sha256"][:16]


def get_teacher(d: Data, config: dict, *, device: str = "cpu", progress: bool = False):
    """The cached teacher of this configuration; trained on a miss (resumable: its fit checkpoint sits beside the
    cache file) and written atomically. Returns (teacher in eval mode, info: history, cache_hit, weights_hash)."""
    path = teacher_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    with runs.teacher_lock(path):
        saved = torch.load(path, map_location=device, weights_only=True) if path.is_file() else None
        teacher = teacher_cnn(d.num_classes).to(device)
        hit = saved is not None and saved.get("config") == json.loads(json.dumps(config))
        if hit:
            teacher.load_state_dict(saved["model"])
            info = saved["info"]
        else:
            train.seed_everything(config["seed"])
            teacher = teacher_cnn(d.num_classes).to(device)
            loss = make_loss(d.num_classes)
            info = fit_keras(teacher, d, loss, kd_targets(d.train_y, None, d.num_classes),
                             kd_targets(d.val_y, None, d.num_classes), epochs=config["epochs"],
                             batch_size=config["batch_size"], seed=config["seed"],
                             checkpoint=path.with_suffix(".fit.pt"), desc="teacher", progress=progress)
            train.atomic_save({"config": config, "model": teacher.state_dict(), "info": info}, path)
    teacher.eval().requires_grad_(False)
    return teacher, dict(info, cache_hit=hit, path=str(path), key=train.config_hash(config),
                         weights_hash=weights_hash(teacher))


@torch.no_grad()
def compute_logits(teacher: nn.Module, x: torch.Tensor, batch_size: int = LOGIT_BATCH) -> torch.Tensor:
    """Teacher logits (softmax removed, inference mode) for every image, in batches of 100 as the source; the source
    processed only floor(n/100) full batches, we process the remainder too (0 images for every real split)."""
    return train.predict(teacher, x, batch_size=batch_size)


def cached_logits(teacher: nn.Module, d: Data, teacher_hash: str | None = None) -> tuple[dict, dict]:
    """{'train', 'val', 'test'} teacher logits, computed once and cached under (weights hash, images hash): a new
    teacher or new images give a new key, so a cache can never answer for another teacher."""
    teacher_hash = teacher_hash or weights_hash(teacher)
    sets = {"train": d.train_x, "val": d.val_x, "test": d.test_x}
    key = runs.digest({"teacher": teacher_hash, **{k: images_hash(x) for k, x in sets.items()}}, 16)
    path = cache_folder() / f"logits-{key}.pt"
    if path.is_file():
        saved = torch.load(path, map_location=d.train_x.device, weights_only=True)
        if saved.get("teacher") == teacher_hash:
            return {k: saved[k] for k in sets}, {"cache_hit": True, "key": key, "path": str(path)}
    logits = {k: compute_logits(teacher, x) for k, x in sets.items()}
    train.atomic_save({"teacher": teacher_hash, **{k: v.cpu() for k, v in logits.items()}}, path)
    return logits, {"cache_hit": False, "key": key, "path": str(path)}


# ---------------------------------------------------------------- students


def train_student(d: Data, *, seed: int, epochs: int, batch_size: int, logits: dict | None = None,
                  temperature: float | None = None, lam: float | None = None, t2_scaling: bool = False,
                  device: str = "cpu", checkpoint=None, desc: str = "", progress: bool = False):
    """The MLP alone (logits=None: Keras CE) or distilled (the KD loss, val_loss = the KD loss on the validation
    set). Returns (model with its final weights, fit info)."""
    train.seed_everything(seed)
    model = mlp_student(d.num_classes).to(device)
    loss = make_loss(d.num_classes, temperature=temperature, lam=lam, t2_scaling=t2_scaling)
    tr = kd_targets(d.train_y, None if logits is None else logits["train"], d.num_classes)
    va = kd_targets(d.val_y, None if logits is None else logits["val"], d.num_classes)
    info = fit_keras(model, d, loss, tr, va, epochs=epochs, batch_size=batch_size, seed=seed, checkpoint=checkpoint,
                     desc=desc, progress=progress)
    return model, info


def run(d: Data, params: dict, *, device: str = "cpu", checkpoint=lambda name: None, progress: bool = False,
        log=print) -> dict:
    """Teacher (cached), its logits (cached), then per seed the MLP alone (if train_baseline) and the distilled MLP
    for every t2_scaling value. Returns {'teacher': {...}, 'students': [rows]} with accuracies in [0, 1]."""
    config = teacher_config(d, epochs=params["teacher_epochs"], batch_size=params["batch_size"],
                            seed=params["teacher_seed"])
    teacher, tinfo = get_teacher(d, config, device=device, progress=progress)
    t_acc = test_accuracy(teacher, d)
    # cache hits and hashes go to metrics.json, not to the printed output (nbval compares it across machines)
    log(f"teacher: {tinfo['stopped_epoch']} epochs{' (early-stopped)' if tinfo['early_stopped'] else ''}, "
        f"test accuracy {100 * t_acc:.2f} %")
    logits, linfo = cached_logits(teacher, d, tinfo["weights_hash"])
    log(f"teacher logits for {len(d.train_y)} + {len(d.val_y)} + {len(d.test_y)} images; the source's floor(n/100) "
        f"batches would have dropped {len(d.train_y) % LOGIT_BATCH} train / {len(d.test_y) % LOGIT_BATCH} test images")
    rows = []
    common = dict(epochs=params["epochs"], batch_size=params["batch_size"], device=device, progress=progress)
    for seed in params["seeds"]:
        jobs = [("mlp", None)] if params["train_baseline"] else []
        jobs += [("kd", t2) for t2 in as_list(params["t2_scaling"])]
        for kind, t2 in jobs:
            name = "mlp" if kind == "mlp" else f"kd-T{params['temperature']:g}-lam{params['lam']:g}" + ("-T2" if t2 else "")
            kw = {} if kind == "mlp" else dict(logits=logits, temperature=params["temperature"], lam=params["lam"],
                                              t2_scaling=t2)
            model, info = train_student(d, seed=seed, checkpoint=checkpoint(f"{name}-seed{seed}"),
                                        desc=f"{name} seed {seed}", **common, **kw)
            acc = test_accuracy(model, d)
            rows.append({"model": kind, "name": name, "seed": seed, "temperature": params["temperature"] if t2 is not None else None,
                         "lam": params["lam"] if t2 is not None else None, "t2_scaling": t2, "test_acc": acc, **info})
            log(f"{name} seed {seed}: {info['stopped_epoch']} epochs{' (early-stopped)' if info['early_stopped'] else ''}, "
                f"test accuracy {100 * acc:.2f} %")
    return {"teacher": {"test_acc": t_acc, "config_key": tinfo["key"], "weights_hash": tinfo["weights_hash"],
                        "logits_key": linfo["key"], "cache_hit": tinfo["cache_hit"], "logits_cache_hit": linfo["cache_hit"],
                        "history": tinfo["history"], "stopped_epoch": tinfo["stopped_epoch"],
                        "early_stopped": tinfo["early_stopped"], "params": models.count_parameters(teacher)},
            "students": rows, "student_params": models.count_parameters(mlp_student(d.num_classes)),
            "teacher_model": teacher, "logits": logits}


def accuracy_table(result: dict):
    """One row per model: parameters, epochs, test accuracy in % (mean ± std over seeds)."""
    import pandas as pd

    rows = [{"model": "teacher CNN", "params": result["teacher"]["params"], "seeds": 1,
             "epochs": str(result["teacher"]["stopped_epoch"]), "test acc (%)": f"{100 * result['teacher']['test_acc']:.2f}"}]
    by = {}
    for r in result["students"]:
        by.setdefault(r["name"], []).append(r)
    for name, rs in by.items():
        acc = np.array([100 * r["test_acc"] for r in rs])
        label = "MLP alone" if rs[0]["model"] == "mlp" else \
            f"MLP + KD (T={rs[0]['temperature']:g}, lam={rs[0]['lam']:g}, {'T^2' if rs[0]['t2_scaling'] else 'no T^2'})"
        rows.append({"model": label, "params": result["student_params"], "seeds": len(rs),
                     "epochs": ", ".join(str(r["stopped_epoch"]) for r in rs),
                     "test acc (%)": f"{acc.mean():.2f}" + (f" ± {acc.std(ddof=1):.2f}" if len(rs) > 1 else "")})
    return pd.DataFrame(rows).set_index("model")


# ---------------------------------------------------------------- claims (papers/04_emnist_mlp_student.yaml)

# A claim is recorded only by a run made under the source's conditions, the card's `run_with` (the full protocol
# of one notebook run: teacher, MLP alone and distilled MLP); smoke runs record none. Stand-in datasets record their
# own claim ids, under the same conditions.
CLAIM_CONDITIONS = papers.load("04_emnist_mlp_student")["run_with"]


def claim_id(base: str, dataset: str) -> str:
    """'D1' for EMNIST letters; 'D1-mnist-standin' for a stand-in (never the EMNIST claim)."""
    return base if dataset == "emnist_letters" else f"{base}-{dataset}-standin"


def _pct(x: float) -> float:
    return round(100.0 * x, 2)


def claim_values(params: dict, result: dict) -> dict:
    """{claim id: {'values', 'seeds', 'note'?, 'verdict'?}} for D1 (teacher), D2 (MLP alone), D3 (distilled MLP,
    no T^2) and D3-gain (distilled minus alone, points), accuracies in %; empty unless the conditions hold."""
    if params["profile"] == "smoke" or any(params.get(k) != v for k, v in CLAIM_CONDITIONS.items()):
        return {}
    ds, stand_in = params["dataset"], is_stand_in(params["dataset"])
    caveat = f"{dataset_label(ds)}: not comparable with the reported EMNIST number" if stand_in else None
    out = {claim_id("D1", ds): {"values": [_pct(result["teacher"]["test_acc"])], "seeds": [params["teacher_seed"]],
                                 "note": "; ".join(filter(None, [caveat, f"teacher stopped after "
                                                                 f"{result['teacher']['stopped_epoch']} epochs"]))}}
    mlp = {r["seed"]: r["test_acc"] for r in result["students"] if r["model"] == "mlp"}
    kd = {r["seed"]: r["test_acc"] for r in result["students"] if r["model"] == "kd" and not r["t2_scaling"]}
    t2 = {r["seed"]: r["test_acc"] for r in result["students"] if r["model"] == "kd" and r["t2_scaling"]}
    if mlp:
        out[claim_id("D2", ds)] = {"values": [_pct(v) for v in mlp.values()], "seeds": list(mlp), "note": caveat}
    if kd:
        note = [caveat] + ([f"with T^2 (D-Q1 corrected): {np.mean([_pct(v) for v in t2.values()]):.2f} %"] if t2 else [])
        out[claim_id("D3", ds)] = {"values": [_pct(v) for v in kd.values()], "seeds": list(kd),
                                   "note": "; ".join(filter(None, note))}
    both = [s for s in kd if s in mlp]
    if both:
        gains = [round(_pct(kd[s]) - _pct(mlp[s]), 2) for s in both]
        entry = {"values": gains, "seeds": both,
                 "note": "; ".join(filter(None, [caveat, f"MLP alone {np.mean([_pct(mlp[s]) for s in both]):.2f} %, "
                                                         f"distilled {np.mean([_pct(kd[s]) for s in both]):.2f} %"]))}
        if stand_in:  # no reported number to compare with: say whether KD helped on every seed
            better = sum(g > 0 for g in gains)
            entry["verdict"] = claims.verdict(better, len(gains))
        out[claim_id("D3-gain", ds)] = entry
    return {k: {kk: vv for kk, vv in v.items() if vv is not None} for k, v in out.items()}


def metrics_record(params: dict, result: dict) -> dict:
    """What metrics.json keeps: the dataset (a stand-in says so), the teacher and every student with its history."""
    students = [{k: v for k, v in r.items()} for r in result["students"]]
    return {"dataset": params["dataset"], "dataset_label": dataset_label(params["dataset"], params["data_source"]),
            "stand_in": is_stand_in(params["dataset"]),
            "note": (f"{dataset_label(params['dataset'])}: not the EMNIST-letters experiment; its numbers are not "
                     f"comparable with the source's" if is_stand_in(params["dataset"]) else "EMNIST letters"),
            "teacher": {k: v for k, v in result["teacher"].items()},
            "student_params": result["student_params"], "students": students,
            "test_acc": {r["name"] + f"-seed{r['seed']}": r["test_acc"] for r in result["students"]}}


# ---------------------------------------------------------------- the T x lambda sweep (D-Q4)

# A sweep trial belongs to this run's sweep when these parameters and the teacher's weights are the same.
SWEEP_MATCH = ("profile", "dataset", "data_source", "teacher_epochs", "teacher_seed", "epochs", "batch_size",
               "validation")


def sweep_rows(students: list[dict], run_name: str) -> list[dict]:
    return [{"temperature": r["temperature"], "lam": r["lam"], "t2_scaling": r["t2_scaling"], "seed": r["seed"],
             "test_acc": r["test_acc"], "run": run_name} for r in students if r["model"] == "kd"]


def sweep_records(params: dict, teacher_hash: str, results: Path | None = None) -> list[dict]:
    """Distilled students of every non-smoke run of this notebook (a `kdnb sweep` trial or not) made with the same
    data, budgets and teacher weights as `params`, one per (T, lam, t2_scaling, seed)."""
    root = Path(results or runs.RESULTS) / NOTEBOOK
    out = []
    for path in sorted(root.glob("*/run.json")):
        rec = json.loads(path.read_text())
        p, m = rec.get("params", {}), rec.get("metrics", {})
        if p.get("profile") == "smoke" or any(p.get(k) != params.get(k) for k in SWEEP_MATCH):
            continue
        if (m.get("teacher") or {}).get("weights_hash") != teacher_hash:
            continue
        out += sweep_rows(m.get("students", []), path.parent.name)
    return dedupe(out)


def dedupe(rows: list[dict]) -> list[dict]:
    """One row per (T, lam, t2_scaling, seed): the same configuration rerun is the same (seeded) student."""
    seen, out = set(), []
    for r in rows:
        key = (r["temperature"], r["lam"], r["t2_scaling"], r["seed"])
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def sweep_table(rows: list[dict], *, t2_scaling: bool = False):
    """Test accuracy (%) per temperature (rows) x lam (columns), mean over seeds; NaN where no run exists."""
    import pandas as pd

    df = pd.DataFrame([r for r in rows if r["t2_scaling"] == t2_scaling])
    if df.empty:
        return pd.DataFrame()
    return (100 * df.pivot_table(index="temperature", columns="lam", values="test_acc", aggfunc="mean")).sort_index()


def complete_seeds(rows: list[dict]) -> list[int]:
    """The seeds that ran every cell of the sweep (the reference cell alone has more seeds than the grid)."""
    by_seed: dict[int, set] = {}
    for r in rows:
        if not r["t2_scaling"]:
            by_seed.setdefault(r["seed"], set()).add((r["temperature"], r["lam"]))
    cells = set().union(*by_seed.values())
    return sorted(s for s, c in by_seed.items() if c == cells)


def d4_claim(params: dict, rows: list[dict]) -> dict | None:
    """D4: was (T=10, lam=0.5) the best cell of the sweep? Judged per seed on each seed that ran every cell of a
    grid of at least 2 x 2 that has it: value = that cell's accuracy minus the best cell's (points)."""
    seeds = complete_seeds(rows)
    grid = sweep_table([r for r in rows if r["seed"] in seeds])
    if params["profile"] == "smoke" or grid.empty or grid.shape[0] < 2 or grid.shape[1] < 2:
        return None
    if 10.0 not in grid.index or 0.5 not in grid.columns or np.isnan(grid.loc[10.0, 0.5]):
        return None
    values, held = [], 0
    for seed in seeds:
        table = sweep_table([r for r in rows if r["seed"] == seed])
        ref = table.loc[10.0, 0.5]
        values.append(round(float(ref - np.nanmax(table.to_numpy())), 2))
        held += int(not (table.to_numpy() > ref).any())
    ref, best = grid.loc[10.0, 0.5], np.nanmax(grid.to_numpy())
    t_best, l_best = np.unravel_index(np.nanargmax(grid.to_numpy()), grid.shape)
    n_cells = int(np.isfinite(grid.to_numpy()).sum())
    rank = int((grid.to_numpy() > ref).sum()) + 1
    note = (f"mean of seeds {seeds}: T=10, lam=0.5: {ref:.2f} %, rank {rank} of {n_cells}; best "
            f"T={grid.index[t_best]:g}, lam={grid.columns[l_best]:g}: {best:.2f} %; the best cell on {held} of "
            f"{len(seeds)} seeds")
    if is_stand_in(params["dataset"]):
        note = f"{dataset_label(params['dataset'])}: not comparable with EMNIST; " + note
    return {"values": values, "seeds": seeds, "verdict": claims.verdict(held, len(seeds)), "note": note}


# ---------------------------------------------------------------- attribution (issue 12, kdnb.attribution)

QUIRKS = {"t2_scaling": (False, True), "validation": ("test", "holdout")}
ABLATION_STARTS = {"faithful": {"t2_scaling": False, "validation": "test"},
                   "corrected": {"t2_scaling": True, "validation": "holdout"}}
# two runs per seed cover every row: the profiles train both t2_scaling values beside one MLP alone and teacher
ABLATION_RUNS = [{"validation": "test"}, {"validation": "holdout"}]
ATTRIBUTION_PROFILE = "reduced"  # the MNIST stand-in with an 8-epoch teacher (EMNIST is not here)
ATTRIBUTION = {"D3-mnist-standin": ("kd_test_acc", "distilled MLP's test accuracy on the MNIST stand-in (%)")}


def attribution_samples(claim: str, params: dict, metrics: dict) -> list[dict]:
    """One sample per distilled student of a run made under the claim's conditions (the quirk flags aside)."""
    cond = {k: v for k, v in CLAIM_CONDITIONS.items() if k not in QUIRKS}
    if claim_id("D3", params.get("dataset")) != claim or any(params.get(k) != v for k, v in cond.items()):
        return []
    return [{"flags": {"t2_scaling": r["t2_scaling"], "validation": params["validation"]}, "protocol": {},
             "seed": r["seed"], "value": _pct(r["test_acc"])} for r in metrics.get("students", []) if r["model"] == "kd"]
