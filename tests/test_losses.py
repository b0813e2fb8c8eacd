"""kdnb.losses against values computed by hand with the ``math`` module (papers/README.md §H.2).

The reference helpers below re-derive each formula from scratch on plain Python lists, so a
test failure means the torch implementation and the written formula disagree.
"""
import math

import pytest
import torch
from torch import nn

from kdnb import losses

# The shared 2×3 example: 2 samples, 3 classes.
Z_S = [[1.0, 2.0, 0.5], [0.3, -1.0, 2.0]]
Z_T = [[2.0, 1.0, 0.1], [0.0, 0.5, 1.5]]
Y = [1, 2]
TOL = 1e-6


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def y():
    return torch.tensor(Y)


# ---- hand formulas (math only) ----------------------------------------------------------------


def softmax(row, T=1.0):
    e = [math.exp(v / T) for v in row]
    s = sum(e)
    return [v / s for v in e]


def log_softmax(row, T=1.0):
    lse = math.log(sum(math.exp(v / T) for v in row))
    return [v / T - lse for v in row]


def ce_hard(rows, labels):
    """mean_i −log softmax(z_i)[y_i]"""
    return sum(-log_softmax(r)[c] for r, c in zip(rows, labels)) / len(rows)


def ce_soft(rows, targets, T=1.0):
    """mean_i −Σ_k P_ik log softmax(z_i/T)_k"""
    return sum(-sum(p * l for p, l in zip(P, log_softmax(r, T))) for r, P in zip(rows, targets)) / len(rows)


def kl(P, Q_log):
    """Σ_k P_k (log P_k − log Q_k), with 0·log 0 = 0."""
    return sum(p * (math.log(p) - q) for p, q in zip(P, Q_log) if p > 0)


def kl_batchmean(rows, targets, T=1.0):
    return sum(kl(P, log_softmax(r, T)) for r, P in zip(rows, targets)) / len(rows)


# ---- Study A ---------------------------------------------------------------------------------


def test_soft_target_kd_by_hand():
    T, w = 2.5, 0.9
    soft = ce_soft(Z_S, [softmax(r, T) for r in Z_T], T)
    expected = w * T * T * soft + (1 - w) * ce_hard(Z_S, Y)
    got = losses.soft_target_kd(t(Z_S), t(Z_T), y(), temperature=T, soft_weight=w)
    assert got.item() == pytest.approx(expected, abs=TOL)
    # soft_weight=0 is plain hard-label CE (the "baseline" run of A.4)
    got0 = losses.soft_target_kd(t(Z_S), t(Z_T), y(), temperature=1.0, soft_weight=0.0)
    assert got0.item() == pytest.approx(ce_hard(Z_S, Y), abs=TOL)


def test_double_softmax_ce_by_hand():
    # CE applied to probabilities: −log( e^{p_y} / Σ_k e^{p_k} ) with p = softmax(z)
    expected = ce_hard([softmax(r) for r in Z_S], Y)
    assert losses.double_softmax_ce(t(Z_S), y()).item() == pytest.approx(expected, abs=TOL)
    # Floor for K=10 after the caller's /32 (A-Q4): a perfectly confident prediction.
    perfect = torch.full((1, 10), -1e4, dtype=torch.float64)
    perfect[0, 3] = 1e4
    floor = -math.log(math.e / (math.e + 9)) / 32
    assert losses.double_softmax_ce(perfect, torch.tensor([3])).item() / 32 == pytest.approx(floor, abs=1e-6)
    assert floor == pytest.approx(0.045661, abs=5e-7)


# ---- Study B ---------------------------------------------------------------------------------

# B=1, C=3, H=W=2: four pixels, listed row-major; logits per pixel.
PIX_S = [[1.0, 2.0, 0.5], [0.3, -1.0, 2.0], [0.0, 0.0, 1.0], [2.0, -0.5, 0.2]]
PIX_T = [[2.0, 1.0, 0.1], [0.0, 0.5, 1.5], [1.0, 0.0, 0.0], [0.5, 0.5, 0.5]]
PIX_Y = [1, 2, 0, 0]


def dense(pixels):
    """[4 pixels × C] -> [1, C, 2, 2]"""
    return t(pixels).T.reshape(1, 3, 2, 2)


def pixel_kl(T, pixels=range(4)):
    return sum(kl(softmax(PIX_T[i], T), log_softmax(PIX_S[i], T)) for i in pixels)


def test_response_kd_batchmean_dense_is_hw_times_pixel_mean():
    T = 4.0
    mask = torch.tensor(PIX_Y).reshape(1, 2, 2)
    faithful = losses.response_kd_segmentation(dense(PIX_S), dense(PIX_T), mask, temperature=T, alpha=1.0)
    corrected = losses.response_kd_segmentation(
        dense(PIX_S), dense(PIX_T), mask, temperature=T, alpha=1.0, kd_reduction="pixel_mean"
    )
    # batchmean on 4-D: sum over all B·C·H·W elements / B (B=1) -> per-pixel KL summed
    assert faithful.item() == pytest.approx(T * T * pixel_kl(T) / 1, abs=TOL)
    assert corrected.item() == pytest.approx(T * T * pixel_kl(T) / 4, abs=TOL)
    assert faithful.item() == pytest.approx(4 * corrected.item(), abs=TOL)  # H·W = 4


def test_response_kd_full_loss_with_void_pixel():
    T, a = 4.0, 0.3
    mask = torch.tensor([1, 255, 0, 0]).reshape(1, 2, 2)  # pixel 1 is void
    valid = [0, 2, 3]
    ce = sum(-log_softmax(PIX_S[i])[PIX_Y[i]] for i in valid) / 3
    got_f = losses.response_kd_segmentation(dense(PIX_S), dense(PIX_T), mask, temperature=T, alpha=a)
    # faithful KD keeps the void pixel; CE ignores it
    assert got_f.item() == pytest.approx(a * T * T * pixel_kl(T) + (1 - a) * ce, abs=TOL)
    got_c = losses.response_kd_segmentation(
        dense(PIX_S), dense(PIX_T), mask, temperature=T, alpha=a, kd_reduction="pixel_mean"
    )
    # corrected KD averages over the 3 non-void pixels only
    assert got_c.item() == pytest.approx(a * T * T * pixel_kl(T, valid) / 3 + (1 - a) * ce, abs=TOL)


def test_response_kd_batchmean_divides_by_batch_only():
    T = 2.0
    s = torch.cat([dense(PIX_S), dense(PIX_T)])  # B=2
    te = torch.cat([dense(PIX_T), dense(PIX_S)])
    mask = torch.tensor(PIX_Y).reshape(1, 2, 2).repeat(2, 1, 1)
    other = sum(kl(softmax(PIX_S[i], T), log_softmax(PIX_T[i], T)) for i in range(4))
    got = losses.response_kd_segmentation(s, te, mask, temperature=T, alpha=1.0)
    assert got.item() == pytest.approx(T * T * (pixel_kl(T) + other) / 2, abs=TOL)


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_feature_kd_cosine_by_hand():
    # pair 0: same size 1×2 maps, identity alignment; pair 1: student 1×1 resized to 2×2
    # (bilinear of a constant map is constant), aligned by a fixed 1×1 conv; the third teacher
    # map has no student partner and must be dropped (zip semantics, B-Q7).
    t0 = t([[[[1.0, 0.0]], [[0.0, 2.0]]]])  # [1, 2, 1, 2]: pixel vectors (1,0) and (0,2)
    s0 = t([[[[1.0, 1.0]], [[1.0, 1.0]]]])  # (1,1) and (1,1)
    t1 = t([[[[1.0, 2.0], [3.0, 4.0]], [[1.0, 0.0], [-1.0, 1.0]]]])  # [1, 2, 2, 2]
    s1 = t([[[[2.0]], [[1.0]]]])  # [1, 2, 1, 1]
    conv = nn.Conv2d(2, 2, 1, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(t([[[[1.0]], [[0.0]]], [[[1.0]], [[-1.0]]]]))  # (a, b) -> (a, a − b)
    extra_teacher = torch.randn(1, 5, 3, 3, dtype=torch.float64)
    h0 = ((1 - cosine([1, 0], [1, 1])) + (1 - cosine([0, 2], [1, 1]))) / 2
    aligned = [2.0, 1.0]  # conv applied to (2, 1)
    teacher_px = [[1.0, 1.0], [2.0, 0.0], [3.0, -1.0], [4.0, 1.0]]
    h1 = sum(1 - cosine(aligned, v) for v in teacher_px) / 4
    got = losses.feature_kd_cosine([s0, s1], [t0, t1, extra_teacher], [nn.Identity(), conv, nn.Identity()])
    assert got.item() == pytest.approx(h0 + h1, abs=TOL)
    # feature_kd_segmentation = α·hint + (1 − α)·CE
    mask = torch.tensor(PIX_Y).reshape(1, 2, 2)
    ce = sum(-log_softmax(PIX_S[i])[PIX_Y[i]] for i in range(4)) / 4
    seg = losses.feature_kd_segmentation(
        dense(PIX_S), mask, [s0, s1], [t0, t1, extra_teacher], [nn.Identity(), conv], alpha=0.5
    )
    assert seg.item() == pytest.approx(0.5 * (h0 + h1) + 0.5 * ce, abs=TOL)


def test_feature_kd_resize_is_bilinear_align_corners_false():
    # 1×2 student map resized to 1×4: align_corners=False gives [a, .75a+.25b, .25a+.75b, b]
    s = t([[[[1.0, 3.0]], [[1.0, 1.0]]]])
    te = t([[[[1.0, 1.5, 2.5, 3.0]], [[1.0, 1.0, 1.0, 1.0]]]])  # exactly the resized map
    assert losses.feature_kd_cosine([s], [te], [nn.Identity()]).item() == pytest.approx(0.0, abs=TOL)


# ---- Study C ---------------------------------------------------------------------------------


def test_hinton_kd_by_hand():
    T, w = 2.0, 0.5
    kd = T * T * kl_batchmean(Z_S, [softmax(r, T) for r in Z_T], T)
    expected = (1 - w) * ce_hard(Z_S, Y) + w * kd
    got = losses.hinton_kd(t(Z_S), t(Z_T), y(), temperature=T, distil_weight=w)
    assert got.item() == pytest.approx(expected, abs=TOL)


PEER2 = [[0.5, 0.5, 1.0], [1.0, 0.0, -1.0]]


def test_dml_pairwise_by_hand():
    w = 0.5
    div = (kl_batchmean(Z_S, [softmax(r) for r in Z_T]) + kl_batchmean(Z_S, [softmax(r) for r in PEER2])) / 2
    got = losses.dml_loss(t(Z_S), [t(Z_T), t(PEER2)], y(), distil_weight=w)
    assert got.item() == pytest.approx((1 - w) * ce_hard(Z_S, Y) + w * div, abs=TOL)


def test_dml_ensemble_and_double_softmax_quirk():
    w = 0.5
    ens = [[(a + b) / 2 for a, b in zip(softmax(p), softmax(q))] for p, q in zip(Z_T, PEER2)]
    ens_twice = [softmax(row) for row in ens]  # C-Q2: softmax of probabilities
    ce = ce_hard(Z_S, Y)
    got = losses.dml_loss(t(Z_S), [t(Z_T), t(PEER2)], y(), distil_weight=w, use_ensemble=True)
    assert got.item() == pytest.approx((1 - w) * ce + w * kl_batchmean(Z_S, ens), abs=TOL)
    bug = losses.dml_loss(t(Z_S), [t(Z_T), t(PEER2)], y(), distil_weight=w, use_ensemble=True, apply_softmax=True)
    assert bug.item() == pytest.approx((1 - w) * ce + w * kl_batchmean(Z_S, ens_twice), abs=TOL)
    assert abs(bug.item() - got.item()) > 1e-3


def virtual(label, K=3, p=0.9):
    return [p if k == label else (1 - p) / (K - 1) for k in range(K)]


def test_tfkd_virtual_targets_quirk_values():
    label = torch.tensor([4])
    v1 = losses.tfkd_virtual_targets(label, 10, temperature=1.0, smooth_teacher=True)
    v10 = losses.tfkd_virtual_targets(label, 10, temperature=10.0, smooth_teacher=True)
    raw = losses.tfkd_virtual_targets(label, 10, temperature=10.0, smooth_teacher=False)
    assert round(v1[0, 4].item(), 4) == 0.2128  # papers/03_dml_kd_calibration.md §C.3
    assert round(v10[0, 4].item(), 4) == 0.1083
    assert v1[0, 4].item() == pytest.approx(softmax(virtual(4, 10), 1.0)[4], abs=TOL)
    assert raw[0].tolist() == pytest.approx(virtual(4, 10), abs=TOL)  # unsmoothed = v, T ignored
    assert v1.sum().item() == pytest.approx(1.0, abs=TOL)


@pytest.mark.parametrize("smooth", [False, True])
def test_tfkd_loss_by_hand(smooth):
    T, w = 2.0, 0.5
    targets = [softmax(virtual(c), T) if smooth else virtual(c) for c in Y]
    expected = (1 - w) * ce_hard(Z_S, Y) + w * T * T * kl_batchmean(Z_S, targets, T)
    got = losses.tfkd_loss(t(Z_S), y(), temperature=T, distil_weight=w, smooth_teacher=smooth)
    assert got.item() == pytest.approx(expected, abs=TOL)


# ---- Study D ---------------------------------------------------------------------------------


@pytest.mark.parametrize("t2", [False, True])
def test_keras_kd_loss_by_hand(t2):
    T, lam = 10.0, 0.5
    hard = sum(-math.log(softmax(r)[c]) for r, c in zip(Z_S, Y)) / 2
    soft = sum(
        -sum(p * math.log(q) for p, q in zip(softmax(zt, T), softmax(zs, T))) for zs, zt in zip(Z_S, Z_T)
    ) / 2
    expected = lam * hard + (T * T if t2 else 1.0) * soft
    got = losses.keras_kd_loss(t(Z_S), t(Z_T), y(), temperature=T, hard_weight=lam, t2_scaling=t2)
    assert got.item() == pytest.approx(expected, abs=TOL)


def test_keras_kd_loss_clips_probabilities():
    # A hopeless hard prediction: p_y ≈ e^-200 is clipped to 1e-7, so the hard term is −log(1e-7).
    z = t([[0.0, 200.0, 0.0]])
    got = losses.keras_kd_loss(z, z, torch.tensor([0]), temperature=1.0, hard_weight=1.0)
    soft = -(1 - 1e-7) * math.log(1 - 1e-7) - 2 * math.exp(-200) * math.log(1e-7)  # ≈ 1e-7
    assert got.item() == pytest.approx(-math.log(1e-7) + soft, abs=TOL)


# ---- Study E ---------------------------------------------------------------------------------


def mse_to(rows, targets):
    return sum((p - q) ** 2 for r, P in zip(rows, targets) for p, q in zip(softmax(r), P)) / (2 * 3)


def test_self_distillation_step0_and_step_t():
    onehot = [[1.0 if k == c else 0.0 for k in range(3)] for c in Y]
    step0 = losses.self_distillation_mse(t(Z_S), y(), alpha=0.6)
    assert step0.item() == pytest.approx(mse_to(Z_S, onehot), abs=TOL)
    a = 0.6
    expected = a * mse_to(Z_S, onehot) + (1 - a) * mse_to(Z_S, [softmax(r) for r in Z_T])
    step_t = losses.self_distillation_mse(t(Z_S), y(), t(Z_T), alpha=a, num_classes=3)
    assert step_t.item() == pytest.approx(expected, abs=TOL)
    # one-hot float targets (what the source's dataset yields) give the same value
    assert losses.self_distillation_mse(t(Z_S), t(onehot), t(Z_T), alpha=a).item() == pytest.approx(expected, abs=TOL)
    # α = 1 ignores the teacher: same as step 0
    assert losses.self_distillation_mse(t(Z_S), y(), t(Z_T), alpha=1.0).item() == pytest.approx(step0.item(), abs=TOL)


def test_l2_norm_sum_not_squared():
    lin = nn.Linear(2, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[3.0, 4.0]]))
        lin.bias.copy_(torch.tensor([-2.0]))
    got = losses.l2_norm_sum(lin.parameters())
    assert got.item() == pytest.approx(math.sqrt(9 + 16) + 2.0, abs=TOL)  # 5 + 2, not 25 + 4
    got.backward()
    assert lin.weight.grad[0].tolist() == pytest.approx([0.6, 0.8], abs=TOL)


# ---- gradients -------------------------------------------------------------------------------


def _mask():
    return torch.tensor(PIX_Y).reshape(1, 2, 2)


GRAD_CASES = {
    "soft_target_kd": lambda s, te: losses.soft_target_kd(s, te, y(), temperature=2.0, soft_weight=0.5),
    "double_softmax_ce": lambda s, te: losses.double_softmax_ce(s, y()),
    "hinton_kd": lambda s, te: losses.hinton_kd(s, te, y(), temperature=2.0, distil_weight=0.5),
    "dml": lambda s, te: losses.dml_loss(s, [te], y(), distil_weight=0.5),
    "dml_e": lambda s, te: losses.dml_loss(s, [te, te * 2], y(), distil_weight=0.5, use_ensemble=True, apply_softmax=True),
    "tfkd": lambda s, te: losses.tfkd_loss(s, y(), temperature=2.0, distil_weight=0.5, smooth_teacher=True),
    "keras_kd": lambda s, te: losses.keras_kd_loss(s, te, y(), temperature=10.0, hard_weight=0.5),
    "self_distillation": lambda s, te: losses.self_distillation_mse(s, y(), te, alpha=0.6),
}


@pytest.mark.parametrize("name", sorted(GRAD_CASES))
def test_gradient_reaches_student_only(name):
    s = t(Z_S).requires_grad_()
    te = t(Z_T).requires_grad_()
    loss = GRAD_CASES[name](s, te)
    assert loss.ndim == 0
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert te.grad is None  # teacher / peers are detached


@pytest.mark.parametrize("reduction", ["batchmean_dense", "pixel_mean"])
def test_gradient_segmentation_losses(reduction):
    s = dense(PIX_S).requires_grad_()
    te = dense(PIX_T).requires_grad_()
    losses.response_kd_segmentation(s, te, _mask(), temperature=2.0, alpha=0.5, kd_reduction=reduction).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0 and te.grad is None
    feat_s = torch.randn(1, 2, 1, 1, dtype=torch.float64, requires_grad=True)
    conv = nn.Conv2d(2, 3, 1).double()
    s2 = dense(PIX_S).requires_grad_()
    losses.feature_kd_segmentation(s2, _mask(), [feat_s], [torch.randn(1, 3, 2, 2, dtype=torch.float64)], [conv], alpha=0.5).backward()
    assert feat_s.grad.abs().sum() > 0 and s2.grad.abs().sum() > 0 and conv.weight.grad is not None


# ---- bad input -------------------------------------------------------------------------------


BAD = [
    ("temperature", lambda: losses.soft_target_kd(t(Z_S), t(Z_T), y(), temperature=0, soft_weight=0.5)),
    ("soft_weight", lambda: losses.soft_target_kd(t(Z_S), t(Z_T), y(), temperature=1, soft_weight=1.5)),
    ("temperature", lambda: losses.response_kd_segmentation(dense(PIX_S), dense(PIX_T), _mask(), temperature=0, alpha=0.5)),
    ("alpha", lambda: losses.response_kd_segmentation(dense(PIX_S), dense(PIX_T), _mask(), temperature=2, alpha=1.5)),
    ("kd_reduction", lambda: losses.response_kd_segmentation(dense(PIX_S), dense(PIX_T), _mask(), temperature=2, alpha=0.5, kd_reduction="mean")),
    ("student_logits", lambda: losses.response_kd_segmentation(t(Z_S), t(Z_T), y(), temperature=2, alpha=0.5)),
    ("alpha", lambda: losses.feature_kd_segmentation(dense(PIX_S), _mask(), [], [], [], alpha=-0.1)),
    ("student_feats", lambda: losses.feature_kd_cosine([], [], [])),
    ("temperature", lambda: losses.hinton_kd(t(Z_S), t(Z_T), y(), temperature=-1.0, distil_weight=0.5)),
    ("distil_weight", lambda: losses.hinton_kd(t(Z_S), t(Z_T), y(), temperature=1.0, distil_weight=2)),
    ("distil_weight", lambda: losses.dml_loss(t(Z_S), [t(Z_T)], y(), distil_weight=1.5)),
    ("peer_logits", lambda: losses.dml_loss(t(Z_S), [], y(), distil_weight=0.5)),
    ("temperature", lambda: losses.tfkd_loss(t(Z_S), y(), temperature=0, distil_weight=0.5, smooth_teacher=True)),
    ("correct_prob", lambda: losses.tfkd_virtual_targets(y(), 3, temperature=1, correct_prob=1.2, smooth_teacher=False)),
    ("num_classes", lambda: losses.tfkd_virtual_targets(y(), 1, temperature=1, smooth_teacher=False)),
    ("temperature", lambda: losses.keras_kd_loss(t(Z_S), t(Z_T), y(), temperature=0, hard_weight=0.5)),
    ("hard_weight", lambda: losses.keras_kd_loss(t(Z_S), t(Z_T), y(), temperature=10, hard_weight=1.5)),
    ("alpha", lambda: losses.self_distillation_mse(t(Z_S), y(), alpha=1.5)),
    ("num_classes", lambda: losses.self_distillation_mse(t(Z_S), y(), alpha=0.5, num_classes=4)),
]


@pytest.mark.parametrize("param,call", BAD, ids=[f"{i}-{p}" for i, (p, _) in enumerate(BAD)])
def test_bad_input_names_the_parameter(param, call):
    with pytest.raises(ValueError, match=param):
        call()


def test_error_message_says_what_is_allowed():
    with pytest.raises(ValueError, match=r"kd_reduction='mean'.*'batchmean_dense', 'pixel_mean'"):
        losses.response_kd_segmentation(dense(PIX_S), dense(PIX_T), _mask(), temperature=2, alpha=0.5, kd_reduction="mean")
    with pytest.raises(ValueError, match=r"temperature=0 .*> 0"):
        losses.hinton_kd(t(Z_S), t(Z_T), y(), temperature=0, distil_weight=0.5)
