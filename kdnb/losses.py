"""Every distillation objective of the five studies, written formula by formula.

Each function takes logits (torch tensors) and returns a scalar tensor that is differentiable
with respect to the *student* logits. Teacher / peer outputs are always detached: in the
sources they are either computed under ``no_grad`` or their gradient never reaches an optimiser
that is stepped, so detaching changes no student update (see papers/03_dml_kd_calibration.md C-Q8).

Quirks of the original code are reproduced behind flags whose faithful value is named in the
study docs papers/0N_*.md (§A.4, §B.3, §C.3, §D.4, §E.2); the docstrings say which value is the faithful one.

Notation: z = student logits, z_t = teacher logits, y = integer labels, T = temperature,
CE(a, y) = hard-label cross-entropy (batch mean), CE(a, P) = soft-label cross-entropy
(batch mean of -sum_k P_k log softmax(a)_k), KL_bm = ``F.kl_div(..., reduction='batchmean')``.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import validate

KD_REDUCTIONS = ("batchmean_dense", "pixel_mean")


def _check_logits(name: str, value: Tensor, ndim: int | tuple[int, ...]) -> None:
    """Shape errors deep inside softmax/kl_div are cryptic; name the argument instead."""
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    if not isinstance(value, Tensor) or value.ndim not in ndims:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        validate.fail(name, shape, f"must be a tensor with {' or '.join(map(str, ndims))} dimensions")


def _kl_batchmean(student_log_probs: Tensor, target_probs: Tensor) -> Tensor:
    """KL_bm(log p, q) = sum over batch and classes of q (log q - log p), divided by the batch size.

    This is ``F.kl_div(log p, q, reduction='batchmean')`` as used by distillistic (C.3); for
    2-D inputs the batch size is dim 0.
    """
    return F.kl_div(student_log_probs, target_probs, reduction="batchmean")


# --------------------------------------------------------------------------------------------
# Study A — AditMeh/Distillation (MNIST), papers/01_mnist_unseen_classes.md §A.4
# --------------------------------------------------------------------------------------------


def soft_target_kd(
    student_logits: Tensor, teacher_logits: Tensor, target: Tensor, *, temperature: float, soft_weight: float
) -> Tensor:
    """Study A loss (A.4): soft_weight·T²·CE(z_s/T, softmax(z_t/T)) + (1 − soft_weight)·CE(z_s, y).

    The soft term is the soft-label *cross-entropy* of ``nn.CrossEntropyLoss`` with probability
    targets, not a KL divergence: it is larger by the teacher entropy (a constant), the gradient
    is the same. ``soft_weight`` is named explicitly because the source's ``weight`` flipped
    meaning in April 2022 (A-Q6): old runs used soft_weight = weight, HEAD uses 1 − weight.
    """
    validate.temperature(temperature)
    validate.unit_interval("soft_weight", soft_weight)
    _check_logits("student_logits", student_logits, 2)
    teacher_probs = F.softmax(teacher_logits.detach() / temperature, dim=1)
    soft = F.cross_entropy(student_logits / temperature, teacher_probs)
    hard = F.cross_entropy(student_logits, target)
    return soft_weight * temperature**2 * soft + (1.0 - soft_weight) * hard


def double_softmax_ce(student_logits: Tensor, target: Tensor) -> Tensor:
    """Study A "validation loss" (quirk A-Q4): ``F.cross_entropy(softmax(z), y)``, batch mean.

    The source feeds probabilities to a loss that applies log-softmax again, so the value is
    bounded below by -log(e/(e + K - 1)) and barely moves. The source then divides by 32 again
    (floor 0.045661 for K=10); that division is left to the caller so this function stays the
    plain formula.
    """
    _check_logits("student_logits", student_logits, 2)
    return F.cross_entropy(F.softmax(student_logits, dim=1), target)


# --------------------------------------------------------------------------------------------
# Study B — EYErbil/Knowledge-Distillation (VOC segmentation), papers/02_voc_segmentation_kd.md §B.3
# --------------------------------------------------------------------------------------------


def response_kd_segmentation(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    temperature: float,
    alpha: float,
    kd_reduction: str = "batchmean_dense",
    ignore_index: int = 255,
) -> Tensor:
    """Study B response KD (B.3): α·KD + (1 − α)·CE(z_s, mask; ignore_index).

    KD = T² · KL(log_softmax(z_s/T, 1) ‖ softmax(z_t/T, 1)) on [B, C, H, W] logits, reduced by

    * ``'batchmean_dense'`` (faithful, quirk B-Q1): ``KLDivLoss(reduction='batchmean')`` on 4-D
      tensors divides the sum over all B·C·H·W elements by B only, i.e. the per-pixel KL is
      *summed* over H·W pixels. Void pixels are included, as in the source.
    * ``'pixel_mean'`` (corrected): the per-pixel KL averaged over non-void pixels
      (mask != ignore_index), the same normalisation as the CE term. With no void pixels this is
      the faithful value divided by H·W.
    """
    validate.temperature(temperature)
    validate.unit_interval("alpha", alpha)
    validate.choice("kd_reduction", kd_reduction, KD_REDUCTIONS)
    _check_logits("student_logits", student_logits, 4)
    _check_logits("teacher_logits", teacher_logits, 4)
    log_p = F.log_softmax(student_logits / temperature, dim=1)
    q = F.softmax(teacher_logits.detach() / temperature, dim=1)
    # Element-wise q·(log q − log p); kl_div handles q = 0 as 0, like the source's KLDivLoss.
    kl = F.kl_div(log_p, q, reduction="none")
    if kd_reduction == "batchmean_dense":
        kd = kl.sum() / student_logits.shape[0]
    else:
        valid = (mask != ignore_index).unsqueeze(1).to(kl.dtype)  # [B,1,H,W], broadcast over C
        # clamp: an all-void batch gives 0 instead of 0/0 (the KD term then simply vanishes)
        kd = (kl * valid).sum() / valid.sum().clamp(min=1.0)
    kd = temperature**2 * kd
    ce = F.cross_entropy(student_logits, mask.long(), ignore_index=ignore_index)
    return alpha * kd + (1.0 - alpha) * ce


def feature_kd_cosine(
    student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor], align: Sequence[nn.Module]
) -> Tensor:
    """Study B feature-KD hint term (B.3): Σ_i mean_{B,H,W}[1 − cos(align_i(resize(s_i)), t_i)].

    Pairs are ``zip(teacher_feats, student_feats)`` exactly as in the source, so surplus teacher
    maps (layer4 with 4 teacher vs 3 student maps, quirk B-Q7) are silently dropped. Each student
    map is bilinearly resized (align_corners=False) to its teacher map's H×W *before* the 1×1
    alignment conv ``align[i]``; cosine similarity is taken over the channel dimension.
    """
    pairs = list(zip(teacher_feats, student_feats))
    if not pairs:
        validate.fail("student_feats", len(student_feats), "need at least one (teacher, student) feature pair")
    if len(align) < len(pairs):
        validate.fail("align", len(align), f"need one alignment module per feature pair ({len(pairs)})")
    total = student_feats[0].new_zeros(())
    for i, (teacher, student) in enumerate(pairs):
        teacher = teacher.detach()
        if student.shape[-2:] != teacher.shape[-2:]:
            # Resizing to the same size would be the identity, so only mismatched maps are touched.
            student = F.interpolate(student, size=teacher.shape[-2:], mode="bilinear", align_corners=False)
        aligned = align[i](student)
        total = total + (1.0 - F.cosine_similarity(aligned, teacher, dim=1)).mean()
    return total


def feature_kd_segmentation(
    student_logits: Tensor,
    mask: Tensor,
    student_feats: Sequence[Tensor],
    teacher_feats: Sequence[Tensor],
    align: Sequence[nn.Module],
    *,
    alpha: float,
    ignore_index: int = 255,
) -> Tensor:
    """Study B feature KD (B.3): α·Σ_i h_i + (1 − α)·CE(z_s, mask; ignore_index).

    The source's README passes no α, so the script default α = 0.5 applies; T is unused.
    """
    validate.unit_interval("alpha", alpha)
    _check_logits("student_logits", student_logits, 4)
    hint = feature_kd_cosine(student_feats, teacher_feats, align)
    ce = F.cross_entropy(student_logits, mask.long(), ignore_index=ignore_index)
    return alpha * hint + (1.0 - alpha) * ce


# --------------------------------------------------------------------------------------------
# Study C — PiaCuk/distillistic (KD, DML, DML_e, Tf-KD), papers/03_dml_kd_calibration.md §C.3
# --------------------------------------------------------------------------------------------


def hinton_kd(
    student_logits: Tensor, teacher_logits: Tensor, target: Tensor, *, temperature: float, distil_weight: float
) -> Tensor:
    """Hinton et al. (2015) KD as in distillistic (C.3):
    (1 − w)·CE(z, y) + w·T²·KL_bm(log_softmax(z/T), softmax(z_t/T)).

    T² keeps the soft-target gradient on the scale of the hard term. The teacher is detached
    (the source is not, quirk C-Q8 — identical for the student).
    """
    validate.temperature(temperature)
    validate.unit_interval("distil_weight", distil_weight)
    _check_logits("student_logits", student_logits, 2)
    log_p = F.log_softmax(student_logits / temperature, dim=1)
    q = F.softmax(teacher_logits.detach() / temperature, dim=1)
    kd = temperature**2 * _kl_batchmean(log_p, q)
    return (1.0 - distil_weight) * F.cross_entropy(student_logits, target) + distil_weight * kd


def dml_loss(
    student_logits: Tensor,
    peer_logits: Sequence[Tensor],
    target: Tensor,
    *,
    distil_weight: float,
    use_ensemble: bool = False,
    apply_softmax: bool = False,
) -> Tensor:
    """Deep Mutual Learning (Zhang et al. 2018) loss of one student i, as in distillistic (C.3).

    ``peer_logits`` are the other N − 1 students' logits (detached here). T = 1 always.

    * DML (``use_ensemble=False``): (1 − w)·CE + w·(1/(N−1))·Σ_j KL_bm(log_softmax(z_i), softmax(z_j)).
    * DML_e (``use_ensemble=True``): target = mean_j softmax(z_j);
      (1 − w)·CE + w·KL_bm(log_softmax(z_i), target). With ``apply_softmax=True`` (quirk C-Q2,
      the library default ``CustomKLDivLoss()``) the averaged *probabilities* are softmax-ed a
      second time, which flattens the target towards uniform; main.py uses False (faithful to
      the reported runs). ``apply_softmax`` only matters for DML_e: pairwise DML always compares
      with softmax(z_j), which is what main.py's ``CustomKLDivLoss(apply_softmax=True)`` did.
    """
    validate.unit_interval("distil_weight", distil_weight)
    _check_logits("student_logits", student_logits, 2)
    peers = [p.detach() for p in peer_logits]
    if not peers:
        validate.fail("peer_logits", peer_logits, "need the logits of at least one other student")
    log_p = F.log_softmax(student_logits, dim=1)
    if use_ensemble:
        target_probs = torch.stack([F.softmax(p, dim=1) for p in peers]).mean(dim=0)
        if apply_softmax:
            target_probs = F.softmax(target_probs, dim=1)  # C-Q2: softmax of probabilities
        divergence = _kl_batchmean(log_p, target_probs)
    else:
        divergence = sum(_kl_batchmean(log_p, F.softmax(p, dim=1)) for p in peers) / len(peers)
    return (1.0 - distil_weight) * F.cross_entropy(student_logits, target) + distil_weight * divergence


def tfkd_virtual_targets(
    target: Tensor, num_classes: int, *, temperature: float, correct_prob: float = 0.9, smooth_teacher: bool
) -> Tensor:
    """Tf-KD virtual teacher (Yuan et al. 2020, "Tf-KD_reg"; distillistic C.3).

    v_y = correct_prob and (1 − correct_prob)/(K − 1) on every other class. Returns softmax(v/T)
    when ``smooth_teacher`` (quirk C-Q1: a softmax of a probability vector, inherited from the
    official code; for K = 10 it leaves only 0.2128 on the true class at T = 1 and 0.1083 at
    T = 10), else v itself (what distillistic's experiment scripts use). No default for
    ``smooth_teacher`` on purpose: the library default (True) and the scripts (False) disagree.
    """
    validate.temperature(temperature)
    validate.unit_interval("correct_prob", correct_prob)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        validate.fail("num_classes", num_classes, "must be an integer >= 2")
    target = target.long()
    v = torch.full((target.shape[0], num_classes), (1.0 - correct_prob) / (num_classes - 1), device=target.device)
    v.scatter_(1, target.unsqueeze(1), correct_prob)
    return F.softmax(v / temperature, dim=1) if smooth_teacher else v


def tfkd_loss(
    student_logits: Tensor,
    target: Tensor,
    *,
    temperature: float,
    distil_weight: float,
    correct_prob: float = 0.9,
    smooth_teacher: bool,
) -> Tensor:
    """Tf-KD loss (C.3): (1 − w)·CE(z, y) + w·T²·KL_bm(log_softmax(z/T), virtual targets)."""
    validate.temperature(temperature)
    validate.unit_interval("distil_weight", distil_weight)
    _check_logits("student_logits", student_logits, 2)
    virtual = tfkd_virtual_targets(
        target, student_logits.shape[1], temperature=temperature, correct_prob=correct_prob, smooth_teacher=smooth_teacher
    ).to(student_logits.dtype)
    kd = temperature**2 * _kl_batchmean(F.log_softmax(student_logits / temperature, dim=1), virtual)
    return (1.0 - distil_weight) * F.cross_entropy(student_logits, target) + distil_weight * kd


# --------------------------------------------------------------------------------------------
# Study D — johnkorn/distillation (Keras), papers/04_emnist_mlp_student.md §D.4
# --------------------------------------------------------------------------------------------


def _keras_categorical_crossentropy(target_probs: Tensor, output_probs: Tensor, eps: float) -> Tensor:
    """Keras 2.0 ``categorical_crossentropy`` (TF backend, from_logits=False), batch mean.

    Keras renormalises the output to sum 1, clips it to [eps, 1 − eps] (so log never sees 0;
    the clip also zeroes the gradient of saturated entries, like ``tf.clip_by_value``) and
    returns −Σ P·log p per sample; ``model.fit`` then averages over the batch.
    """
    output_probs = output_probs / output_probs.sum(dim=-1, keepdim=True)
    output_probs = output_probs.clamp(eps, 1.0 - eps)
    return -(target_probs * torch.log(output_probs)).sum(dim=-1).mean()


def keras_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    *,
    temperature: float,
    hard_weight: float,
    t2_scaling: bool = False,
    eps: float = 1e-7,
) -> Tensor:
    """Study D student loss (D.4), Keras semantics:
    hard_weight·CE_keras(onehot(y), softmax(z)) + s·CE_keras(softmax(z_t/T), softmax(z/T)).

    s = 1 (faithful, quirk D-Q1: no T², so at T = 10 the soft gradient is ~1/T² of Hinton's
    scale) or T² with ``t2_scaling=True``. λ (``hard_weight``) weights the *hard* term.
    """
    validate.temperature(temperature)
    validate.unit_interval("hard_weight", hard_weight)
    validate.positive("eps", eps)
    _check_logits("student_logits", student_logits, 2)
    onehot = F.one_hot(target.long(), student_logits.shape[1]).to(student_logits.dtype)
    hard = _keras_categorical_crossentropy(onehot, F.softmax(student_logits, dim=1), eps)
    soft_targets = F.softmax(teacher_logits.detach() / temperature, dim=1)
    soft = _keras_categorical_crossentropy(soft_targets, F.softmax(student_logits / temperature, dim=1), eps)
    scale = temperature**2 if t2_scaling else 1.0
    return hard_weight * hard + scale * soft


# --------------------------------------------------------------------------------------------
# Study E — Borup & Andersen self-distillation (ResNet/CIFAR-10), papers/05_self_distillation.md §E.2
# --------------------------------------------------------------------------------------------


def self_distillation_mse(
    student_logits: Tensor,
    target: Tensor,
    teacher_logits: Tensor | None = None,
    *,
    alpha: float,
    num_classes: int | None = None,
) -> Tensor:
    """Borup & Andersen (NeurIPS 2021) self-distillation loss (E.2), no temperature.

    step 0 (``teacher_logits is None``): MSE(softmax(z), onehot(y));
    step t ≥ 1: α·MSE(softmax(z), onehot(y)) + (1 − α)·MSE(softmax(z), softmax(z_teacher)).
    MSE is ``nn.MSELoss()`` (mean over B×K). α is the weight of the ground truth. ``target``
    may be integer labels or an already one-hot float tensor (the source's dataset yields
    one-hot targets). ``num_classes`` defaults to the logits' width. The weight-norm penalty is
    separate: see :func:`l2_norm_sum`.
    """
    validate.unit_interval("alpha", alpha)
    _check_logits("student_logits", student_logits, 2)
    k = student_logits.shape[1] if num_classes is None else validate.positive_int("num_classes", num_classes)
    if k != student_logits.shape[1]:
        validate.fail("num_classes", num_classes, f"must equal the logits' class dimension {student_logits.shape[1]}")
    if target.is_floating_point() and target.shape == student_logits.shape:
        onehot = target.to(student_logits.dtype)
    else:
        onehot = F.one_hot(target.long(), k).to(student_logits.dtype)
    probs = F.softmax(student_logits, dim=1)
    ground_truth = F.mse_loss(probs, onehot)
    if teacher_logits is None:
        return ground_truth
    teacher_probs = F.softmax(teacher_logits.detach(), dim=1)
    return alpha * ground_truth + (1.0 - alpha) * F.mse_loss(probs, teacher_probs)


def l2_norm_sum(parameters: Iterable[Tensor]) -> Tensor:
    """Σ over parameter tensors of ‖θ‖₂ — the source's ``reg_coef`` penalty (E.2).

    Not squared (quirk E-Q5): each tensor's Frobenius norm enters linearly, so the penalty is
    not ½‖θ‖² weight decay; kept because it is what ran. The caller multiplies by ``reg_coef``
    (1e-4 in the source).
    """
    norms = [p.norm(2) for p in parameters]
    if not norms:
        return torch.zeros(())
    return torch.stack(norms).sum()
