import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchmetrics.classification import MulticlassJaccardIndex

from conftest import real_data_root
from kdnb import data, losses, models, profiles
from kdnb import voc_segmentation as vs

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    return vs.LightweightResNet()


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    model, pretrained = vs.build_teacher(download=False) if not vs.teacher_weights_file().is_file() else (None, None)
    if model is None:  # a machine with the real weights cached: the random teacher is built explicitly
        from torchvision.models.segmentation import fcn_resnet50

        model = fcn_resnet50(weights=None, weights_backbone=None, num_classes=21, aux_loss=True).eval().requires_grad_(False)
    return model


# ---------------------------------------------------------------------------------------------- models (B.2)


def test_student_parameter_counts_match_the_spec(student):
    counts = vs.student_parameters(student)
    assert counts == {"total": 14_652_181, "without_align": 13_317_141, "align": 1_335_040,
                      "mobilenet_trunk": 2_223_872}
    assert models.count_parameters(student.aspp) == 9_833_472
    assert models.count_parameters(student.decoder) == 1_254_400
    assert models.count_parameters(student.classifier) == 5_397
    assert [tuple(c.weight.shape[:2]) for c in student.align_layers] == [(256, 24), (512, 32), (1024, 1280)]


def test_student_feature_shapes_at_64(student):
    student.eval()
    with torch.no_grad():
        logits, (x1, x2, x3) = student(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 21, 64, 64)
    assert x1.shape == (2, 24, 16, 16) and x2.shape == (2, 32, 8, 8) and x3.shape == (2, 1280, 2, 2)  # x3: stride 32


def test_random_teacher_and_hook_points(teacher):
    assert models.count_parameters(teacher) == 35_322_218 and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    with models.FeatureHooks(teacher, vs.TEACHER_LAYERS) as hooks, torch.no_grad():
        out = vs.logits_of(teacher(torch.randn(1, 3, 64, 64)))
        shapes = [tuple(f.shape[1:]) for f in hooks.outputs]
    assert out.shape == (1, 21, 64, 64)
    # output stride 8 with layers 3-4 dilated: 16^2, then 8^2 three times
    assert shapes == [(256, 16, 16), (512, 8, 8), (1024, 8, 8), (2048, 8, 8)]


def test_teacher_without_weights_is_refused_where_results_count(monkeypatch, tmp_path):
    monkeypatch.setattr(vs, "teacher_weights_file", lambda: tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="download=False"):
        vs.build_teacher(download=False, require_pretrained=True)
    model, pretrained = vs.build_teacher(download=False)
    assert pretrained is False and not model.training


def test_flops_and_latency(student, monkeypatch):
    f64 = vs.flops_per_image(student, image_size=64)
    f128 = vs.flops_per_image(student, image_size=128)
    # convolutions dominate and scale with the pixel count (the 1x1 image-pooling branch does not)
    assert 3.9 < f128 / f64 <= 4.0
    # on a clock that advances 10 ms per forward call: warm-up calls are not timed, the time is per image
    clock = {"t": 0.0}
    hook = student.register_forward_hook(lambda *_: clock.update(t=clock["t"] + 0.010))
    try:
        monkeypatch.setattr(vs.time, "perf_counter", lambda: clock["t"])
        assert vs.latency_ms(student, image_size=64, batch_size=2, iters=3, warmup=2) == pytest.approx(5.0)
    finally:
        hook.remove()


# ---------------------------------------------------------------------------------------------- augmentation


def _images(n=3, size=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


@pytest.mark.parametrize("name, ours, theirs, factors", [
    ("brightness", vs.adjust_brightness, TF.adjust_brightness, [0.8, 1.0, 1.2]),
    ("contrast", vs.adjust_contrast, TF.adjust_contrast, [0.8, 1.1, 1.2]),
    ("saturation", vs.adjust_saturation, TF.adjust_saturation, [0.8, 0.95, 1.2]),
    ("hue", vs.adjust_hue, TF.adjust_hue, [-0.1, 0.03, 0.1]),
])
def test_colour_ops_match_torchvision_per_image(name, ours, theirs, factors):
    x = _images()
    got = ours(x.clone(), torch.tensor(factors))
    want = torch.stack([theirs(x[i], f) for i, f in enumerate(factors)])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def test_blur_sharpness_autocontrast_grayscale_match_torchvision():
    x = _images()
    sig = [0.1, 0.7, 2.0]
    want = torch.stack([TF.gaussian_blur(x[i], [5, 5], [s, s]) for i, s in enumerate(sig)])
    torch.testing.assert_close(vs.gaussian_blur(x, torch.tensor(sig)), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(vs.adjust_sharpness(x), TF.adjust_sharpness(x, 2.0), atol=1e-5, rtol=0)
    low = x * 0.5 + 0.2
    torch.testing.assert_close(vs.autocontrast(low), TF.autocontrast(low), atol=1e-5, rtol=0)
    torch.testing.assert_close(vs.grayscale3(x), TF.rgb_to_grayscale(x, 3), atol=1e-6, rtol=0)


def test_augmentations_are_per_image_seeded_and_photometric_only():
    x = (torch.rand(8, 16, 16, 3, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    same = x[:1].expand(8, -1, -1, -1).contiguous()
    for aug in (vs.augment_plain, vs.augment_kd):
        a = aug(same.clone(), torch.Generator().manual_seed(3))
        b = aug(same.clone(), torch.Generator().manual_seed(3))
        torch.testing.assert_close(a, b)                                  # seeded
        assert len({round(v, 5) for v in a.mean(dim=(1, 2, 3)).tolist()}) > 4   # 8 copies, different draws
        assert a.shape == (8, 3, 16, 16) and torch.isfinite(a).all()
    # no augmentation: exactly ToTensor + Normalize
    want = (x.permute(0, 3, 1, 2).float() / 255 - torch.tensor(vs.VOC_MEAN).view(1, 3, 1, 1)) / torch.tensor(vs.VOC_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(vs.prepare(x), want)


# ---------------------------------------------------------------------------------------------- test protocol (B.5)


class FixedPredictions(nn.Module):
    """Logits whose argmax is a stored label map (consumed in order, batch by batch)."""

    def __init__(self, preds):
        super().__init__()
        self.preds, self.i = preds, 0

    def forward(self, x):
        p = self.preds[self.i:self.i + len(x)]
        self.i += len(x)
        return {"out": torch.nn.functional.one_hot(p, 21).permute(0, 3, 1, 2).float()}


def test_both_miou_protocols_by_hand():
    target = torch.tensor([[[0, 0], [1, 255]]], dtype=torch.uint8)
    split = data.Split(torch.zeros(1, 2, 2, 3, dtype=torch.uint8), target, "test")
    # void pixel predicted as 20: ignored -> IoU0 = IoU1 = 1/2; clamped -> class 20 is a hit, (1/2 + 1/2 + 1) / 3
    ev = vs.evaluate(FixedPredictions(torch.tensor([[[0, 1], [1, 20]]])), split, batch_size=8)
    assert ev["miou"] == pytest.approx(0.5) and ev["miou_void20"] == pytest.approx(2 / 3)
    assert ev["pixel_acc"] == pytest.approx(2 / 3)
    # void pixel predicted as 0: clamped -> IoU0 = 1/3, IoU1 = 1/2, IoU20 = 0
    ev = vs.evaluate(FixedPredictions(torch.tensor([[[0, 1], [1, 0]]])), split, batch_size=8)
    assert ev["miou"] == pytest.approx(0.5) and ev["miou_void20"] == pytest.approx((1 / 3 + 1 / 2 + 0) / 3)
    assert np.isnan(ev["iou"][5]) and ev["iou_void20"][20] == 0.0


def test_evaluate_matches_the_source_test_script_on_random_maps():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 21, (10, 8, 8), generator=g)
    target[torch.rand(10, 8, 8, generator=g) < 0.15] = 255
    preds = torch.randint(0, 21, (10, 8, 8), generator=g)
    split = data.Split(torch.zeros(10, 8, 8, 3, dtype=torch.uint8), target.to(torch.uint8), "test")
    ev = vs.evaluate(FixedPredictions(preds), split, batch_size=3)          # batches of 3, 3, 3, 1
    # test.py: masks clamped to [0, 20] and fed to MulticlassJaccardIndex(ignore_index=255) (nothing left to ignore)
    source = MulticlassJaccardIndex(num_classes=21, ignore_index=255)
    source.update(preds, target.clamp(0, 20))
    assert ev["miou_void20"] == pytest.approx(source.compute().item(), abs=1e-6)
    correct = MulticlassJaccardIndex(num_classes=21, ignore_index=255)(preds, target).item()
    assert ev["miou"] == pytest.approx(correct, abs=1e-6)


# ---------------------------------------------------------------------------------------------- losses and training


def test_loss_functions_follow_the_recipe(monkeypatch, student, teacher):
    seen = {}
    real = losses.response_kd_segmentation

    def spy(*a, **kw):
        seen.update(kw)
        return real(*a, **kw)

    monkeypatch.setattr(vs.losses, "response_kd_segmentation", spy)
    x = torch.randn(2, 3, 64, 64)
    y = torch.randint(0, 21, (2, 64, 64))
    y[:, :4] = 255
    student.eval()
    fn = vs.make_loss("response", teacher=teacher, temperature=4.0, alpha_response=0.3, kd_reduction="batchmean_dense")
    faithful = fn(student, x, y)
    assert seen["kd_reduction"] == "batchmean_dense" and seen["alpha"] == 0.3 and seen["temperature"] == 4.0
    corrected = vs.make_loss("response", teacher=teacher, kd_reduction="pixel_mean")(student, x, y)
    ce = vs.make_loss("plain")(student, x, y)
    with torch.no_grad():
        logits = student(x)[0]
    assert ce.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, y, ignore_index=255).item(), rel=1e-5)
    # B-Q1: summing the KL over 64x64 pixels makes the faithful loss far larger than the per-pixel version
    assert faithful.item() > 100 * corrected.item()
    with models.FeatureHooks(teacher, vs.TEACHER_LAYERS) as hooks:
        feat = vs.make_loss("feature", teacher=teacher, hooks=hooks, alpha_feature=0.5)(student, x, y)
        s_logits, s_feats = student(x)
        hint = losses.feature_kd_cosine(s_feats, hooks.outputs, student.align_layers)
    assert feat.item() == pytest.approx(0.5 * hint.item() + 0.5 * ce.item(), rel=1e-4)
    with pytest.raises(ValueError, match="student"):
        vs.make_loss("distill")
    with pytest.raises(ValueError, match="teacher"):
        vs.make_loss("response")


@pytest.fixture(scope="module")
def tiny_voc():
    g = torch.Generator().manual_seed(0)
    masks = torch.randint(0, 21, (6, 64, 64), generator=g).to(torch.uint8)
    masks[:, :2] = 255
    return data.Split((torch.rand(6, 64, 64, 3, generator=g) * 255).to(torch.uint8), masks, "test")


@pytest.mark.parametrize("name", vs.STUDENTS)
def test_one_train_step_of_each_student(name, monkeypatch, teacher, tiny_voc):
    calls = {}
    real_fit = vs.train.fit

    def spy(model, loader, loss_fn, **kw):
        calls.update(kw, augment=loader.augment)
        return real_fit(model, loader, loss_fn, **kw)

    monkeypatch.setattr(vs.train, "fit", spy)
    train_split = data.Split(tiny_voc.x[:4], tiny_voc.y[:4], "test")
    sel = data.Split(tiny_voc.x[4:], tiny_voc.y[4:], "test")
    model, info = vs.train_student(name, train_split, sel, seed=0, teacher=teacher, epochs=1, batch_size=4, lr=1e-3,
                                   weight_decay=1e-4, temperature=4.0, alpha_response=0.3, alpha_feature=0.5,
                                   kd_reduction="pixel_mean", es_patience=30, plateau_patience=10, progress=False)
    recipe = vs.RECIPES[name]
    assert calls["optimizer"] == recipe["optimizer"] and calls["monitor"] == recipe["monitor"]
    assert calls["mode"] == recipe["mode"] and calls["select"] == "best" and calls["scheduler"] == "plateau"
    assert calls["augment"] is (vs.augment_plain if name == "plain" else vs.augment_kd)
    assert info["epochs_run"] == 1 and info["best_epoch"] == 1 and set(info["history"][0]) >= {"val_loss", "val_miou"}
    after = model.state_dict()
    # the weights moved away from the seeded initialisation that every student of seed 0 shares
    vs.train.seed_everything(0)
    init = vs.LightweightResNet().state_dict()
    assert not torch.equal(after["classifier.weight"], init["classifier.weight"])
    # the alignment convs learn only under feature KD; elsewhere they get no gradient, so Adam(W) skips them
    moved = not torch.equal(after["align_layers.0.bias"], init["align_layers.0.bias"])
    assert moved == (name == "feature")
    assert not teacher.backbone.layer1._forward_hooks                       # hooks removed afterwards


def test_split_for_variants(tiny_voc):
    val = data.Split(tiny_voc.x[:2], tiny_voc.y[:2], "test")
    tr, sel = vs.split_for("faithful", tiny_voc, val, holdout=2)
    assert tr is tiny_voc and sel is val                                    # B-Q4: VOC val selects and tests
    tr, sel = vs.split_for("corrected", tiny_voc, val, holdout=2)
    assert len(tr) == 4 and len(sel) == 2
    rows = {tuple(m.flatten()[:50].tolist()) for m in tiny_voc.y}
    assert {tuple(m.flatten()[:50].tolist()) for m in tr.y} | {tuple(m.flatten()[:50].tolist()) for m in sel.y} == rows
    with pytest.raises(ValueError, match="holdout"):
        vs.split_for("corrected", tiny_voc, val, holdout=6)


# ---------------------------------------------------------------------------------------------- data (B.1)


def test_synthetic_voc_through_torchvision(tmp_path, monkeypatch):
    monkeypatch.setenv("KDNB_CACHE", str(tmp_path))
    root = vs.voc_dataset_root("synthetic")
    tr = vs.load_voc(root, "train", 64, source="synthetic")
    va = vs.load_voc(root, "val", 64, source="synthetic")
    assert (len(tr), len(va)) == (vs.SYNTHETIC["n_train"], vs.SYNTHETIC["n_val"])
    assert tr.x.shape == (12, 64, 64, 3) and tr.x.dtype == torch.uint8 and tr.y.shape == (12, 64, 64)
    values = set(torch.unique(tr.y).tolist())
    assert 255 in values and 0 in values and values <= set(range(21)) | {255}
    # the mask is the palette PNG resized with nearest neighbour (no interpolated labels)
    png = Image.open(root / "VOCdevkit/VOC2012/SegmentationClass/2012_000001.png")
    assert png.mode == "P"
    want = torch.from_numpy(np.array(png.resize((64, 64), Image.NEAREST)))
    assert torch.equal(tr.y[0], want)
    # the photo: exactly what the source's transforms.Resize((S, S)) makes of the PIL image
    import torchvision.transforms as T

    jpg = Image.open(root / "VOCdevkit/VOC2012/JPEGImages/2012_000001.jpg").convert("RGB")
    assert torch.equal(tr.x[0], T.PILToTensor()(T.Resize((64, 64))(jpg)).permute(1, 2, 0))


def test_synthetic_voc_cache_is_written_whole_then_renamed(tmp_path, monkeypatch):
    monkeypatch.setenv("KDNB_CACHE", str(tmp_path))
    root = vs.voc_dataset_root("synthetic")
    sets = root / "VOCdevkit/VOC2012/ImageSets/Segmentation"
    # a tree an interrupted writer left without its last file is replaced, not read
    (sets / "val.txt").unlink()
    (root / "VOCdevkit/VOC2012/JPEGImages/2012_000001.jpg").write_bytes(b"half a jpeg")
    assert vs.voc_dataset_root("synthetic") == root and (sets / "val.txt").is_file()
    assert len(vs.load_voc(root, "train", 64, source="synthetic")) == vs.SYNTHETIC["n_train"]
    # a second process that finished while we wrote: our rename fails, theirs stays, no temporary folder is left
    shutil.rmtree(root)
    calls = []
    real = vs.samples.write_synthetic_voc
    monkeypatch.setattr(vs.samples, "write_synthetic_voc", lambda r, **kw: calls.append(r) or real(r, **kw) and
                        real(root, **kw))
    assert vs.voc_dataset_root("synthetic") == root and (sets / "val.txt").is_file()
    assert len(calls) == 1 and calls[0] != root  # never written where a reader looks
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.data
def test_real_voc_sample_through_the_same_loader():
    root = real_data_root("VOC2012-sample/VOCdevkit/VOC2012/ImageSets/Segmentation") / "VOC2012-sample"
    tr = vs.load_voc(root, "train", 256)
    va = vs.load_voc(root, "val", 256, num_workers=0)
    assert (len(tr), len(va)) == (11, 15)
    assert tr.x.shape == (11, 256, 256, 3) and va.y.shape == (15, 256, 256)
    values = set(torch.unique(torch.cat([tr.y.flatten(), va.y.flatten()])).tolist())
    assert 255 in values and values <= set(range(21)) | {255} and len(values) > 3
    stem = open(root / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt").read().split()[0]
    png = Image.open(root / f"VOCdevkit/VOC2012/SegmentationClass/{stem}.png")
    assert torch.equal(va.y[0], torch.from_numpy(np.array(png.resize((256, 256), Image.NEAREST))))


def test_missing_real_voc_names_dataset_and_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("KDNB_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(data.DataNotFoundError, match="(?s)voc2012.*download=True"):
        vs.voc_dataset_root("real", tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------- parameters


def test_profiles_resolve_and_check():
    for p in ("smoke", "reduced", "full"):
        params = profiles.resolve("02_voc_segmentation_kd", profile=p)
        vs.check(**params)
    assert profiles.resolve("02_voc_segmentation_kd", profile="full")["epochs"] == 500


@pytest.mark.parametrize("name, value, match", [
    ("image_size", 100, "multiple of 32"),
    ("variants", ["faithful", "other"], "variants"),
    ("students", [], "students"),
    ("students", ["plain", "plain"], "repeat"),
    ("alpha_feature", 1.5, "alpha_feature"),
    ("data_source", "web", "data_source"),
    ("batch_size", 1, "batch_size"),
    ("bf16", "yes", "bf16"),
])
def test_check_rejects_bad_values(name, value, match):
    params = dict(vs.PROFILES["smoke"], **{name: value})
    with pytest.raises(ValueError, match=match):
        vs.check(**params)


def test_claim_values_and_gains():
    def row(variant, student, miou, ms):
        return {"variant": variant, "student": student, "seed": 0,
                "test": {"miou": miou, "miou_void20": miou - 0.01, "unsync_ms": ms}}

    results = [row("faithful", s, m, ms) for s, m, ms in
               (("plain", 0.10, 1.0), ("response", 0.15, 1.1), ("feature", 0.40, 1.2), ("control", 0.12, 1.0))]
    claims = vs.claim_values(results, {"miou_void20": 0.63, "unsync_ms": 2.0}, seed=0)
    assert claims["B1"] == 0.63 and claims["B4"] == pytest.approx(0.39) and claims["B5"] == [2.0, 1.0, 1.1, 1.2]
    g = vs.gains_table(results).set_index("student")
    assert g.loc["feature", "minus_plain"] == pytest.approx(0.30)
    assert g.loc["feature", "minus_control"] == pytest.approx(0.28)


@pytest.mark.parametrize("name", ["response", "feature"])
def test_cuda_code_path_bf16_channels_last_on_cpu(name, teacher, tiny_voc):
    # the options the notebook turns on under CUDA, exercised through CPU autocast: dtypes and layouts must fit
    t = teacher.to(memory_format=torch.channels_last)
    model, info = vs.train_student(name, tiny_voc, tiny_voc, seed=1, teacher=t, epochs=1, batch_size=3, lr=1e-3,
                                   weight_decay=1e-4, temperature=4.0, alpha_response=0.3, alpha_feature=0.5,
                                   kd_reduction="batchmean_dense", es_patience=30, plateau_patience=10, bf16=True,
                                   channels_last=True, progress=False)
    assert np.isfinite(info["history"][0]["train_loss"]) and info["best_epoch"] == 1
    ev = vs.evaluate(model, tiny_voc, batch_size=4, bf16=True, channels_last=True, keep=2)
    assert 0.0 <= ev["miou"] <= 1.0 and ev["preds"].shape == (2, 64, 64)
