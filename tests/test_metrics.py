"""kdnb.metrics against hand-computed tiny cases and against torchmetrics (the library the
studies themselves used for mIoU / ECE semantics)."""
import math

import numpy as np
import pytest
import torch
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassCalibrationError,
    MulticlassJaccardIndex,
)

from kdnb import metrics

TOL = 1e-6


# ---- accuracy, confusion, per-class -----------------------------------------------------------


def test_accuracy_logits_and_preds_and_dense():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 5.0], [4.0, 0.0, 0.0]])
    target = torch.tensor([0, 1, 1, 2])
    assert metrics.accuracy(logits, target) == pytest.approx(0.5)
    assert metrics.accuracy(torch.tensor([0, 1, 2, 0]), target) == pytest.approx(0.5)
    dense = logits.T.reshape(1, 3, 2, 2)  # [B, C, H, W] with the same 4 pixels
    assert metrics.accuracy(dense, target.reshape(1, 2, 2)) == pytest.approx(0.5)


def test_confusion_matrix_by_hand_rows_are_true():
    preds = torch.tensor([[0, 1], [2, 2]])
    target = torch.tensor([[0, 2], [255, 2]])
    conf = metrics.confusion_matrix(preds, target, 3, ignore_index=255)
    assert conf.dtype == torch.int64
    assert conf.tolist() == [[1, 0, 0], [0, 0, 0], [0, 1, 1]]
    with pytest.raises(ValueError, match="target"):
        metrics.confusion_matrix(preds, target, 3)  # 255 is out of range when not ignored


def test_per_class_accuracy_by_hand_and_vs_torchmetrics():
    preds = torch.tensor([0, 0, 1, 2, 2, 2])
    target = torch.tensor([0, 1, 1, 2, 2, 0])
    got = metrics.per_class_accuracy(preds, target, 4)
    assert got[:3].tolist() == pytest.approx([0.5, 0.5, 1.0])
    assert math.isnan(got[3])  # class 3 has no samples
    gen = torch.Generator().manual_seed(0)
    preds = torch.randint(0, 7, (200,), generator=gen)
    target = torch.randint(0, 6, (200,), generator=gen)  # class 6 never a target
    got = metrics.per_class_accuracy(preds, target, 7)
    ref = MulticlassAccuracy(num_classes=7, average=None)(preds, target).numpy()
    np.testing.assert_allclose(got[:6], ref[:6], atol=TOL)
    assert np.isnan(got[6])


# ---- calibration ------------------------------------------------------------------------------


def gpleiss_ece(probs, target, n_bins=15):
    """The distillistic/gpleiss ECELoss loop, (lower, upper] bins, on probabilities."""
    conf, pred = probs.max(1)
    correct = pred.eq(target)
    edges = torch.linspace(0, 1, n_bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = conf.gt(lo.item()) * conf.le(hi.item())
        if in_bin.any():
            total += abs(conf[in_bin].mean().item() - correct[in_bin].float().mean().item()) * in_bin.float().mean().item()
    return total


def torchmetrics_ece(probs, target):
    return MulticlassCalibrationError(num_classes=probs.shape[1], n_bins=15, norm="l1")(probs, target).item()


def random_probs(seed, n=300, k=5):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=gen) * 2
    return logits.softmax(1), torch.randint(0, k, (n,), generator=gen)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_ece_matches_torchmetrics_on_random_predictions(seed):
    probs, target = random_probs(seed)
    ref = torchmetrics_ece(probs, target)
    # no confidence on a float32 bin edge here, so both edge conventions agree with torchmetrics
    assert metrics.ece(probs, target) == pytest.approx(ref, abs=TOL)
    assert metrics.ece(probs, target, closed="left") == pytest.approx(ref, abs=TOL)
    assert metrics.ece(probs, target) == pytest.approx(gpleiss_ece(probs, target), abs=TOL)
    diagram = metrics.reliability_diagram(probs, target)
    filled = diagram["count"] > 0
    from_diagram = np.sum(np.abs(diagram["confidence"] - diagram["accuracy"])[filled] * diagram["count"][filled]) / len(target)
    assert from_diagram == pytest.approx(ref, abs=TOL)


def edge_case_probs():
    """Confidences exactly on float32 bin edges (1/3, 0.8), next to one (0.2 is *not* an edge
    in float32: linspace gives 0.20000002) and exactly 1.0 (torchmetrics' extra bin)."""
    rows = [
        [1 / 3, 1 / 3, 1 / 3, 0.0, 0.0],  # conf 1/3, argmax 0
        [1 / 3, 1 / 3, 1 / 3, 0.0, 0.0],
        [0.8, 0.1, 0.1, 0.0, 0.0],  # conf 0.8
        [0.1, 0.8, 0.1, 0.0, 0.0],
        [0.2, 0.2, 0.2, 0.2, 0.2],  # conf 0.2
        [0.0, 0.0, 0.0, 0.0, 1.0],  # conf 1.0
        [0.5, 0.3, 0.2, 0.0, 0.0],  # conf 0.5 (inside a bin)
    ]
    probs = torch.tensor(rows, dtype=torch.float32)  # float32(1/3) is also softmax(zeros(3))
    target = torch.tensor([0, 1, 0, 0, 3, 4, 1])
    return probs, target


def test_ece_on_bin_edges():
    probs, target = edge_case_probs()
    edges = torch.linspace(0, 1, 16)
    assert (edges == probs.max(1).values[0]).any() and (edges == probs.max(1).values[2]).any()
    ref = torchmetrics_ece(probs, target)
    # closed='left' is torchmetrics' lower <= conf < upper, including its extra bin for conf = 1
    assert metrics.ece(probs, target, closed="left") == pytest.approx(ref, abs=TOL)
    # default closed='right' is gpleiss/distillistic lower < conf <= upper
    assert metrics.ece(probs, target) == pytest.approx(gpleiss_ece(probs, target), abs=TOL)
    # By hand, right-closed (float32 edges): the two 1/3 samples sit on edge 5 -> bin
    # (4/15, 1/3], acc 1/2; the two 0.8 samples on edge 12 -> bin (11/15, 4/5], acc 1/2;
    # float32(0.2) = 0.20000000 lies just below edge 3 (0.20000002) -> bin (2/15, 3/15], acc 0;
    # conf 1.0 -> last bin, acc 1; conf 0.5 -> bin (7/15, 8/15], acc 0. No two groups share a
    # bin under either rule here, so torchmetrics agrees too; the next test makes them differ.
    hand = (2 * abs(1 / 3 - 0.5) + 2 * abs(0.8 - 0.5) + abs(0.2 - 0) + 0 + abs(0.5 - 0)) / 7
    assert metrics.ece(probs, target) == pytest.approx(hand, abs=TOL)


def test_ece_bin_edges_differ_between_conventions():
    # one sample at conf 1/3 (wrong) and one at 0.35 (right): same bin only if [1/3, 0.4)
    probs = torch.tensor([[0.0, 0.0, 0.0], [0.35, 0.325, 0.325]])
    probs[0] = torch.zeros(3).softmax(0)
    target = torch.tensor([1, 0])
    c = [probs[0].max().item(), 0.35]
    left = abs((c[0] + c[1]) / 2 - 0.5)  # both in [1/3, 0.4)
    right = (abs(c[0] - 0) + abs(c[1] - 1)) / 2  # (4/15, 1/3] and (1/3, 0.4]
    assert metrics.ece(probs, target, closed="left") == pytest.approx(left, abs=TOL)
    assert metrics.ece(probs, target, closed="left") == pytest.approx(torchmetrics_ece(probs, target), abs=TOL)
    assert metrics.ece(probs, target) == pytest.approx(right, abs=TOL)


@pytest.mark.parametrize("seed", [0, 1])
def test_ece_left_matches_torchmetrics_with_edge_confidences_mixed_in(seed):
    probs, target = random_probs(seed, n=100)
    edge_probs, edge_target = edge_case_probs()
    probs, target = torch.cat([probs, edge_probs]), torch.cat([target, edge_target])
    assert metrics.ece(probs, target, closed="left") == pytest.approx(torchmetrics_ece(probs, target), abs=TOL)
    assert metrics.ece(probs, target) == pytest.approx(gpleiss_ece(probs, target), abs=TOL)


def test_reliability_diagram_bins_match_torchmetrics_binning():
    from torchmetrics.functional.classification.calibration_error import _binning_bucketize

    probs, target = random_probs(7, n=200, k=4)
    conf, pred = probs.max(1)
    acc_bin, conf_bin, prop_bin = _binning_bucketize(conf, pred.eq(target).float(), torch.linspace(0, 1, 16))
    d = metrics.reliability_diagram(probs, target, closed="left")
    filled = d["count"] > 0
    np.testing.assert_allclose(d["count"] / len(target), prop_bin[:15].numpy(), atol=TOL)
    np.testing.assert_allclose(d["confidence"][filled], conf_bin[:15].numpy()[filled], atol=TOL)
    np.testing.assert_allclose(d["accuracy"][filled], acc_bin[:15].numpy()[filled], atol=TOL)
    assert np.isnan(d["confidence"][~filled]).all() and np.isnan(d["accuracy"][~filled]).all()
    np.testing.assert_allclose(d["bin_lower"], np.arange(15) / 15, atol=1e-7)
    np.testing.assert_allclose(d["bin_upper"], np.arange(1, 16) / 15, atol=1e-7)
    assert d["count"].sum() == len(target)


def test_reliability_diagram_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.95, 0.05], [0.6, 0.4]])
    target = torch.tensor([0, 1, 0])
    d = metrics.reliability_diagram(probs, target, n_bins=2)
    assert d["count"].tolist() == [0, 3]
    assert math.isnan(d["confidence"][0])
    assert d["confidence"][1] == pytest.approx((0.9 + 0.95 + 0.6) / 3, abs=TOL)
    assert d["accuracy"][1] == pytest.approx(2 / 3, abs=TOL)
    assert metrics.ece(probs, target, n_bins=2) == pytest.approx(abs((0.9 + 0.95 + 0.6) / 3 - 2 / 3), abs=TOL)


def test_nll_and_entropy_by_hand():
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.3, -1.0, 2.0]])
    target = torch.tensor([1, 2])

    def log_softmax(row):
        lse = math.log(sum(math.exp(v) for v in row))
        return [v - lse for v in row]

    expected = -(log_softmax(logits[0].tolist())[1] + log_softmax(logits[1].tolist())[2]) / 2
    assert metrics.nll(logits, target) == pytest.approx(expected, abs=TOL)
    probs = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    assert metrics.mean_entropy(probs) == pytest.approx(math.log(2) / 2, abs=TOL)  # 0·log 0 = 0
    assert metrics.mean_entropy(torch.full((1, 10), 0.1)) == pytest.approx(math.log(10), abs=TOL)


# ---- segmentation -----------------------------------------------------------------------------


def random_maps(seed, void_frac=0.2, shape=(2, 16, 16), k=21):
    gen = torch.Generator().manual_seed(seed)
    target = torch.randint(0, k - 3, shape, generator=gen)  # classes 18..20 never true
    target[torch.rand(shape, generator=gen) < void_frac] = 255
    preds = torch.randint(0, k - 2, shape, generator=gen)  # 18 only predicted; 19, 20 absent
    return preds, target


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_miou_matches_torchmetrics_with_ignore(seed):
    preds, target = random_maps(seed)
    ref = MulticlassJaccardIndex(num_classes=21, average="macro", ignore_index=255)(preds, target).item()
    got, per_class = metrics.miou(preds, target)
    assert got == pytest.approx(ref, abs=TOL)
    assert per_class[18] == 0.0  # predicted, never true: IoU 0 and counted
    assert np.isnan(per_class[19]) and np.isnan(per_class[20])  # absent from both
    ref_none = MulticlassJaccardIndex(num_classes=21, average="none", ignore_index=255)(preds, target).numpy()
    np.testing.assert_allclose(per_class[:19], ref_none[:19], atol=TOL)
    # logits give the same result as their argmax
    logits = torch.nn.functional.one_hot(preds, 21).permute(0, 3, 1, 2).float()
    assert metrics.miou(logits, target)[0] == pytest.approx(got, abs=TOL)


def test_miou_clamp_void_quirk():
    preds, target = random_maps(5)
    preds[0, 0, :4] = 20  # class 20 is predicted somewhere, as a real model would
    clamped_ref = MulticlassJaccardIndex(num_classes=21, average="macro", ignore_index=255)(preds, target.clamp(0, 20)).item()
    faithful, per_class = metrics.miou(preds, target, clamp_void_to=20)
    corrected, _ = metrics.miou(preds, target)
    assert faithful == pytest.approx(clamped_ref, abs=TOL)
    assert not np.isnan(per_class[20])  # void pixels now count as class 20
    assert abs(faithful - corrected) > 1e-3
    # B-Q2: with the clamp, "with ignore" and "without ignore" are the same number
    assert metrics.miou(preds, target, clamp_void_to=20, ignore_index=255)[0] == pytest.approx(
        metrics.miou(preds, target.clamp(0, 20), ignore_index=None)[0], abs=TOL
    )


def test_dataset_level_accumulation_matches_torchmetrics():
    ref = MulticlassJaccardIndex(num_classes=21, average="macro", ignore_index=255)
    conf = torch.zeros(21, 21, dtype=torch.int64)
    for seed in (10, 11, 12):
        preds, target = random_maps(seed, shape=(1, 8, 8))
        ref.update(preds, target)
        conf += metrics.confusion_matrix(preds, target, 21, ignore_index=255)
    assert metrics.miou_from_confusion(conf)[0] == pytest.approx(ref.compute().item(), abs=TOL)


def test_miou_and_pixel_accuracy_by_hand():
    preds = torch.tensor([[0, 0], [1, 2]])
    target = torch.tensor([[0, 1], [1, 255]])
    # rows true: class0 -> [1,0,0]; class1 -> [1,1,0]; class2 -> none; void dropped
    conf = metrics.confusion_matrix(preds, target, 3, ignore_index=255)
    value, per_class = metrics.miou_from_confusion(conf)
    # IoU0 = 1/(1+1+0) = 1/2, IoU1 = 1/(1+0+1) = 1/2, class 2 absent from both -> NaN, excluded
    assert per_class[:2].tolist() == pytest.approx([0.5, 0.5])
    assert np.isnan(per_class[2]) and value == pytest.approx(0.5)
    assert metrics.pixel_accuracy(conf) == pytest.approx(2 / 3)
    # clamped: void pixel becomes class 2 and is predicted 2 -> IoU2 = 1, mIoU = (1/2+1/2+1)/3
    assert metrics.miou(preds, target, num_classes=3, clamp_void_to=2)[0] == pytest.approx(2 / 3)


BAD = [
    ("n_bins", lambda: metrics.ece(torch.full((2, 2), 0.5), torch.tensor([0, 1]), n_bins=0)),
    ("closed", lambda: metrics.ece(torch.full((2, 2), 0.5), torch.tensor([0, 1]), closed="both")),
    ("clamp_void_to", lambda: metrics.miou(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long), clamp_void_to=21)),
    ("num_classes", lambda: metrics.confusion_matrix(torch.tensor([0]), torch.tensor([0]), 0)),
    ("preds", lambda: metrics.accuracy(torch.tensor([0, 1, 2]), torch.tensor([0, 1]))),
]


@pytest.mark.parametrize("param,call", BAD, ids=[p for p, _ in BAD])
def test_bad_input_names_the_parameter(param, call):
    with pytest.raises(ValueError, match=param):
        call()
