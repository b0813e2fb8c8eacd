"""Evaluation metrics of the five studies: accuracy, per-class accuracy, calibration (ECE,
reliability diagram), NLL, predictive entropy, and segmentation mIoU from a confusion matrix.

Everything counts with ``torch.bincount`` on flattened tensors, so the same code serves
[N] classification labels and [B, H, W] segmentation maps. Functions that summarise return
Python floats / numpy arrays (ready for a results table); the confusion matrix stays a tensor
so a caller can accumulate it over batches on the device and compute *dataset-level* mIoU
(the protocol of study B, B.5) rather than a mean of per-image scores.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import validate

BIN_CLOSED = ("right", "left")


def _labels(logits_or_preds: Tensor, target: Tensor) -> Tensor:
    """Class predictions: argmax over dim 1 when the input has one more dimension than the
    target (logits / probabilities, [N,K] or [B,K,H,W]), else the input itself (labels)."""
    if logits_or_preds.ndim == target.ndim + 1:
        return logits_or_preds.argmax(dim=1)
    if logits_or_preds.shape != target.shape:
        validate.fail(
            "preds", tuple(logits_or_preds.shape), f"must be labels shaped like target {tuple(target.shape)} or logits with an extra class dim 1"
        )
    return logits_or_preds


def _check_num_classes(num_classes: int) -> int:
    return validate.positive_int("num_classes", num_classes)


def accuracy(logits_or_preds: Tensor, target: Tensor) -> float:
    """Top-1 accuracy: fraction of elements whose predicted class equals the target."""
    preds = _labels(logits_or_preds, target)
    if target.numel() == 0:
        validate.fail("target", tuple(target.shape), "must contain at least one element")
    return (preds == target).double().mean().item()


def confusion_matrix(preds: Tensor, target: Tensor, num_classes: int, ignore_index: int | None = None) -> Tensor:
    """[K, K] int64 confusion matrix, rows = true class, columns = predicted class.

    Elements whose target equals ``ignore_index`` are dropped first (VOC void = 255). One
    ``bincount`` over target·K + pred does the counting, which is fast for dense maps of any
    shape. Accepts labels or logits (argmax over dim 1).
    """
    _check_num_classes(num_classes)
    preds = _labels(preds, target).reshape(-1).long()
    target = target.reshape(-1).long()
    if ignore_index is not None:
        keep = target != ignore_index
        preds, target = preds[keep], target[keep]
    # An out-of-range label would silently land in another cell of the flattened bincount.
    for name, labels in (("target", target), ("preds", preds)):
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            bad = labels[(labels < 0) | (labels >= num_classes)].unique()[:5].tolist()
            validate.fail(name, bad, f"labels must lie in 0..{num_classes - 1} (or equal ignore_index={ignore_index})")
    counts = torch.bincount(target * num_classes + preds, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def per_class_accuracy(preds: Tensor, target: Tensor, num_classes: int) -> np.ndarray:
    """Recall of every class (correct / samples of that class); NaN for a class with no samples.

    Study A's per-class report (seen vs held-out digits). Equals torchmetrics
    ``MulticlassAccuracy(average=None)`` wherever a class has samples (torchmetrics reports 0
    there instead of NaN, which would hide "class absent" behind "class always wrong").
    """
    conf = confusion_matrix(preds, target, num_classes).double()
    support = conf.sum(dim=1)
    return (conf.diagonal() / support).cpu().numpy()  # torch gives 0/0 = NaN, on purpose


def _confidences(probs: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Max-softmax confidence and correctness per sample (float32, as torchmetrics/gpleiss)."""
    if probs.ndim != 2 or target.ndim != 1 or probs.shape[0] != target.shape[0]:
        validate.fail("probs", tuple(probs.shape), f"must be [N, K] probabilities matching target of shape [N]={tuple(target.shape)}")
    confidences, predictions = probs.float().max(dim=1)
    return confidences, (predictions == target).float()


def _bin_index(confidences: Tensor, n_bins: int, closed: str) -> tuple[Tensor, Tensor]:
    """Bin of each confidence on ``torch.linspace(0, 1, n_bins + 1)`` (float32, as gpleiss and
    torchmetrics build it — the same float32 edges matter when a confidence sits on an edge).

    closed='right': lower < conf <= upper — gpleiss/temperature_scaling ``ECELoss``, the ECE of
    distillistic (C.3). closed='left': lower <= conf < upper — torchmetrics'
    ``_binning_bucketize``; the two differ only for confidences exactly on an edge (in float32,
    e.g. 1/3 or 0.8). Out-of-range indices (conf = 0 for 'right', conf = 1 for 'left') are
    kept as bins -1 / n_bins rather than clamped, so 'left' reproduces torchmetrics exactly
    (it puts conf = 1.0 in an extra bin); callers drop empty bins.
    """
    validate.positive_int("n_bins", n_bins)
    validate.choice("closed", closed, BIN_CLOSED)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=confidences.dtype, device=confidences.device)
    if closed == "right":
        index = torch.bucketize(confidences, edges, right=False) - 1  # edges[i-1] < c <= edges[i]
    else:
        index = torch.bucketize(confidences, edges, right=True) - 1  # edges[i] <= c < edges[i+1]
    return index, edges


def _binned(probs: Tensor, target: Tensor, n_bins: int, closed: str) -> dict[str, Tensor]:
    confidences, correct = _confidences(probs, target)
    index, edges = _bin_index(confidences, n_bins, closed)
    # Shift by one so the two possible outside bins (-1 and n_bins) fit in n_bins + 2 slots.
    slot = index + 1
    size = n_bins + 2
    count = torch.bincount(slot, minlength=size).double()
    conf_sum = torch.bincount(slot, weights=confidences.double(), minlength=size)
    acc_sum = torch.bincount(slot, weights=correct.double(), minlength=size)
    return {"count": count, "conf_sum": conf_sum, "acc_sum": acc_sum, "edges": edges}


def ece(probs: Tensor, target: Tensor, n_bins: int = 15, closed: str = "right") -> float:
    """Expected calibration error (Naeini et al. 2015; Guo et al. 2017 form, C.3):
    ECE = Σ_b |mean conf_b − acc_b| · n_b / n over equal-width confidence bins on the
    max-softmax confidence. Default bins are lower < conf <= upper (gpleiss / distillistic);
    ``closed='left'`` gives torchmetrics ``MulticlassCalibrationError(norm='l1')`` exactly.
    ``probs`` are probabilities [N, K] (apply softmax to logits first).
    """
    b = _binned(probs, target, n_bins, closed)
    n = b["count"].sum()
    if n == 0:
        validate.fail("target", tuple(target.shape), "must contain at least one sample")
    filled = b["count"] > 0
    gap = (b["conf_sum"][filled] - b["acc_sum"][filled]).abs()  # = |mean conf − acc| · n_b
    return (gap.sum() / n).item()


def reliability_diagram(probs: Tensor, target: Tensor, n_bins: int = 15, closed: str = "right") -> dict[str, np.ndarray]:
    """Per-bin data of a reliability diagram (same bins as :func:`ece`).

    Returns numpy arrays of length n_bins: ``bin_lower``, ``bin_upper``, ``confidence`` (mean
    confidence, NaN for an empty bin), ``accuracy`` (NaN for an empty bin) and ``count``.
    With closed='left' a confidence of exactly 1.0 falls past the last edge; it is counted in
    the last bin here (a diagram has no bin [1, 1]) — :func:`ece` keeps torchmetrics' extra bin.
    With closed='right' a confidence of exactly 0 (impossible for a max-softmax) joins bin 0.
    """
    b = _binned(probs, target, n_bins, closed)
    count, conf_sum, acc_sum = (b[k].cpu().clone() for k in ("count", "conf_sum", "acc_sum"))
    for t in (count, conf_sum, acc_sum):
        t[1] += t[0]  # below the first edge -> first bin
        t[n_bins] += t[n_bins + 1]  # past the last edge -> last bin
    count, conf_sum, acc_sum = (t[1 : n_bins + 1] for t in (count, conf_sum, acc_sum))
    confidence = (conf_sum / count).numpy()  # empty bin: 0/0 = NaN
    acc = (acc_sum / count).numpy()
    edges = b["edges"].cpu().double().numpy()
    return {
        "bin_lower": edges[:-1],
        "bin_upper": edges[1:],
        "confidence": confidence,
        "accuracy": acc,
        "count": count.long().numpy(),
    }


def nll(logits: Tensor, target: Tensor) -> float:
    """Negative log-likelihood = mean cross-entropy of the logits (the proper validation loss
    that study A's double-softmax "val loss", A-Q4, should have been)."""
    return F.cross_entropy(logits.double(), target.long()).item()


def mean_entropy(probs: Tensor) -> float:
    """Mean predictive entropy −Σ_k p_k log p_k in nats over the batch (0·log 0 = 0)."""
    if probs.ndim != 2:
        validate.fail("probs", tuple(probs.shape), "must be [N, K] probabilities")
    return torch.special.entr(probs.double()).sum(dim=1).mean().item()


def miou_from_confusion(conf: Tensor) -> tuple[float, np.ndarray]:
    """Macro mIoU from a (dataset-level) confusion matrix, rows = true.

    IoU_c = TP_c / (TP_c + FP_c + FN_c). Classes absent from both predictions and targets
    (row + column sum 0) get NaN and are left out of the mean — torchmetrics
    ``MulticlassJaccardIndex(average='macro')`` semantics. A class that appears only in the
    predictions has IoU 0 and counts.
    """
    conf = conf.double().cpu()  # K×K: cheap to move, and numpy needs host memory
    tp = conf.diagonal()
    union = conf.sum(dim=0) + conf.sum(dim=1) - tp
    iou = (tp / union).numpy()  # 0/0 = NaN for absent classes
    present = union.numpy() > 0
    mean = float(iou[present].mean()) if present.any() else float("nan")
    return mean, iou


def pixel_accuracy(conf: Tensor) -> float:
    """Overall pixel accuracy = trace / total of a confusion matrix (void already dropped)."""
    total = conf.sum().item()
    return conf.diagonal().sum().item() / total if total else float("nan")


def miou(
    preds: Tensor,
    target: Tensor,
    *,
    num_classes: int = 21,
    ignore_index: int | None = 255,
    clamp_void_to: int | None = None,
) -> tuple[float, np.ndarray]:
    """Dataset-level macro mIoU of one batch/dataset of dense maps (study B, B.5).

    Returns (mIoU, per-class IoU with NaN for classes absent from preds and target).
    ``clamp_void_to=None`` (corrected): pixels whose target is ``ignore_index`` are dropped.
    ``clamp_void_to=20`` (faithful, quirk B-Q2): ``test.py`` clamps masks to [0, 20] *before*
    counting, so void pixels become class 20 (tv/monitor) and nothing is ignored. Implemented as
    "void pixels -> clamp_void_to", identical to the clamp for VOC masks (values 0..20 and 255).
    To accumulate over batches use :func:`confusion_matrix` + :func:`miou_from_confusion`.
    """
    _check_num_classes(num_classes)
    if clamp_void_to is not None:
        if isinstance(clamp_void_to, bool) or not isinstance(clamp_void_to, int) or not 0 <= clamp_void_to < num_classes:
            validate.fail("clamp_void_to", clamp_void_to, f"must be None or a class index in 0..{num_classes - 1}")
        if ignore_index is None:
            validate.fail("ignore_index", ignore_index, "clamp_void_to needs the void label (ignore_index) to replace")
        target = torch.where(target == ignore_index, torch.full_like(target, clamp_void_to), target)
    return miou_from_confusion(confusion_matrix(preds, target, num_classes, ignore_index=ignore_index))


def ci95_halfwidth(std, n: int):
    """Half-width of the two-sided 95 % Student-t interval of a mean over n seeds (None below 2 seeds)."""
    if std is None or n < 2:
        return None
    from scipy import stats

    return np.asarray(std) * stats.t.ppf(0.975, n - 1) / math.sqrt(n)
