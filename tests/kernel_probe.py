"""Short smoke trainings of every study kind, run by tests/test_kernel_invariance.py in subprocesses under different
CPU kernel choices (ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA) and thread counts.

    python tests/kernel_probe.py [KIND ...]     # prints one JSON object {kind: {metric: value}}

Each kind calls the same module functions as its notebook, with the smoke regime that `runs.Run` sets up
(numerics.configure), on the shipped samples, cut to a few steps so all of them take well under a minute.
"""
from __future__ import annotations

import dataclasses
import json
import sys

import torch

from kdnb import numerics, profiles

KINDS = ("mlp_kd", "cnn", "resnet", "resnet_dml", "segmentation")


def _history(rows, keys):
    return [{k: float(h[k]) for k in keys if h.get(k) is not None} for h in rows]


def mlp_kd() -> dict:
    """01: 784-512-128-10 teacher (1 epoch) and both variants' 784-196-10 students through the hand-written step."""
    from kdnb import unseen_classes as uc

    p = profiles.resolve("01_mnist_unseen_classes", profile="smoke", epochs=1, teacher_epochs=1)
    mnist = uc.load_mnist("sample")
    teachers = uc.teachers_for(mnist, p)
    rows = uc.run(mnist, teachers, p, log=lambda *a, **k: None)
    return {r["variant"]: json.loads(json.dumps(uc.metrics_record([r], p["kept_classes"]), default=float))
            for r in rows}


def cnn() -> dict:
    """04: Keras-style CNN teacher (1 epoch on 520 images), the MLP alone and the distilled MLP (Adadelta)."""
    from kdnb import emnist_student as es

    p = profiles.resolve("04_emnist_mlp_student", profile="smoke", teacher_epochs=1, epochs=1, t2_scaling=[True])
    d = es.load(p["dataset"], p["data_source"], validation=p["validation"], holdout_seed=p["teacher_seed"])
    d = dataclasses.replace(d, train_x=d.train_x[:520], train_y=d.train_y[:520])
    result = es.run(d, p, log=lambda *a, **k: None)
    return json.loads(json.dumps(es.metrics_record(p, result), default=float))


def resnet() -> dict:
    """05: ResNet-18 on 64 CIFAR sample images, step 0 and one self-distillation step, faithful variant."""
    from kdnb import self_distillation as sd

    cifar = sd.load_cifar("sample")
    cifar = dataclasses.replace(cifar, train_x=cifar.train_x[:64], train_y=cifar.train_y[:64],
                                test_x=cifar.test_x[:64], test_y=cifar.test_y[:64])
    rows = sd.run(cifar, seed=0, arch="resnet18", sd_alphas=[0.6], distillation_steps=2, epochs=1, batch_size=32,
                  lr=1e-3, reg_coef=1e-4, progress=False, **sd.VARIANTS["faithful"])
    return {f"step{r['step']}": _history(r["history"], ("train_loss", "test_acc")) for r in rows}


def resnet_dml() -> dict:
    """03: the smoke teacher, a KD student and a DML cohort of two ResNet-18 on 120 Fashion-MNIST sample images (batch 8 as smoke:
    at batch 4 BatchNorm over 4 images makes even float64 training chaotic) with
    per-image RandAugment."""
    from kdnb import dml_calibration as dc

    p = profiles.resolve("03_dml_kd_calibration", profile="smoke", algorithms=["kd", "dml"], train_per_class=12,
                         holdout_per_class=1, val_size=16, batch_size=8)
    fm = dc.load_fmnist(p["data_source"], train_per_class=p["train_per_class"], holdout_per_class=p["holdout_per_class"],
                        val_size=p["val_size"])
    fm = dataclasses.replace(fm, test_x=fm.test_x[:64], test_y=fm.test_y[:64])
    out = dc.run_seed(fm, p, seed=p["seeds"][0], progress=False)
    members = out["teacher"]["members"] + out["kd"]["members"] + out["dml"]["members"]
    return {f"member{i}": {"history": [{k: float(v) for k, v in h.items()} for h in m["history"] + m["checks"]],
                           "test": dc.calibration(m["test_logits"], fm.test_y, n_bins=p["n_bins"])}
            for i, m in enumerate(members)}


def segmentation() -> dict:
    """02: the response-KD segmentation student on synthetic VOC (64x64, as smoke) with a random teacher, one epoch."""
    from kdnb import voc_segmentation as vs

    p = profiles.resolve("02_voc_segmentation_kd", profile="smoke")
    root = vs.voc_dataset_root(p["data_source"])
    tr = vs.load_voc(root, "train", p["image_size"], source=p["data_source"])
    va = vs.load_voc(root, "val", p["image_size"], source=p["data_source"])
    torch.manual_seed(0)  # as the notebook does before building the (random) teacher
    teacher, _ = vs.build_teacher()
    teacher.eval()
    _, info = vs.train_student("response", tr, va, seed=0, teacher=teacher, epochs=1, batch_size=4, lr=1e-3,
                               weight_decay=1e-4, temperature=4.0, alpha_response=0.3, alpha_feature=0.5,
                               kd_reduction=vs.VARIANTS["faithful"]["kd_reduction"], es_patience=30,
                               plateau_patience=10, progress=False)
    return {"history": _history(info["history"], ("train_loss", "val_loss", "val_miou", "val_pixel_acc"))}


def main(kinds) -> None:
    numerics.configure("smoke", "cpu")
    out = {"_capability": torch.backends.cpu.get_cpu_capability(), "_threads": torch.get_num_threads()}
    for kind in kinds:
        out[kind] = globals()[kind]()
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:] or KINDS)
