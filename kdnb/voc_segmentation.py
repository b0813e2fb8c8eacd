"""Study B (EYErbil/Knowledge-Distillation, papers/02_voc_segmentation_kd.md): response- vs feature-based KD for
PASCAL VOC 2012 semantic segmentation, FCN-ResNet50 (COCO-with-VOC-labels weights) -> a lightweight MobileNetV2 +
ASPP student.

Students (one recipe each, B.4):
  plain     `train.py`: CE, Adam (coupled L2), ColorJitter(0.2, 0.2, 0.2), plateau + early stopping on val *loss*
  response  `train_kd.py --kd_method response --temperature 4 --alpha 0.3`: alpha*T^2*KL + (1-alpha)*CE
  feature   `train_kd.py --kd_method feature` (alpha 0.5): alpha*sum_i(1 - cos) + (1-alpha)*CE on 3 feature pairs
  control   quirk B-Q5: CE only, but with the KD script's augmentations, AdamW and val-mIoU selection, so that
            "KD helps" can be told apart from "the KD script's recipe helps"
The KD students share AdamW, the heavier photometric augmentation and plateau + early stopping on val *mIoU*.

Variants (faithful value first):
  faithful   kd_reduction='batchmean_dense' (B-Q1: the KL summed over pixels), VOC val selects *and* tests (B-Q4)
  corrected  kd_reduction='pixel_mean' (per-pixel mean over non-void pixels), selection on a split carved from train
Both test protocols are always reported: mIoU ignoring void (correct) and with void clamped to class 20 (B-Q2), and
both timings: the source's unsynchronised per-batch perf_counter (B-Q3) and a synchronised latency with warm-up.

Data stays in (device) memory as uint8 and is augmented there, batch-wise, with per-image random parameters: the
GPU never waits for PIL workers (and no lambda transforms need pickling, B-Q8).
"""
from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import data, losses, metrics, models, numerics, runs, samples, train, validate

NUM_CLASSES = 21
VOID = 255
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
VOC_MEAN, VOC_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TEACHER_LAYERS = ("backbone.layer1", "backbone.layer2", "backbone.layer3", "backbone.layer4")
STUDENT_PARAMS = 14_652_181          # incl. the alignment convs (B.2)
MOBILENET_TRUNK_PARAMS = 2_223_872
VOC_SIZES = {"train": 1464, "val": 1449}
DATA_SOURCES = ("synthetic", "real")
# the synthetic VOCdevkit of the smoke profile: (train, val) images, (width, height)
SYNTHETIC = {"n_train": 12, "n_val": 6, "size": (64, 48)}

STUDENTS = ("plain", "response", "feature", "control")
RECIPES = {
    "plain": {"optimizer": "adam", "augment": "plain", "monitor": "val_loss", "mode": "min", "teacher": False},
    "response": {"optimizer": "adamw", "augment": "kd", "monitor": "val_miou", "mode": "max", "teacher": True},
    "feature": {"optimizer": "adamw", "augment": "kd", "monitor": "val_miou", "mode": "max", "teacher": True},
    "control": {"optimizer": "adamw", "augment": "kd", "monitor": "val_miou", "mode": "max", "teacher": False},
}
VARIANTS = {
    "faithful": {"kd_reduction": "batchmean_dense", "selection": "voc_val"},
    "corrected": {"kd_reduction": "pixel_mean", "selection": "train_holdout"},
}

# the kind of value a parameter takes where no profile says (every profile leaves bf16 at None): kdnb.profiles
PARAMETER_TYPES = {"bf16": "bool"}

PROFILES = {
    # synthetic VOCdevkit (12 train / 6 val at 64x48 -> 64x64), random teacher, a few steps: the pipeline only
    "smoke": dict(seeds=[0], data_source="synthetic", image_size=64, epochs=1, batch_size=4, test_batch_size=8,
                  lr=1e-3, weight_decay=1e-4, temperature=4.0, alpha_response=0.3, alpha_feature=0.5,
                  es_patience=30, plateau_patience=10, holdout=4, variants=["faithful", "corrected"],
                  students=list(STUDENTS), num_workers=0, latency_iters=2, bf16=None),
    # real VOC 2012 at 256x256 on CUDA, about 30 epochs per student
    "reduced": dict(seeds=[0], data_source="real", image_size=256, epochs=30, batch_size=64, test_batch_size=8,
                    lr=1e-3, weight_decay=1e-4, temperature=4.0, alpha_response=0.3, alpha_feature=0.5,
                    es_patience=30, plateau_patience=10, holdout=200, variants=["faithful", "corrected"],
                    students=list(STUDENTS), num_workers=8, latency_iters=50, bf16=None),
    # the source's configuration: <= 500 epochs with early stopping (patience 30), batch 64
    "full": dict(seeds=[0], data_source="real", image_size=256, epochs=500, batch_size=64, test_batch_size=8,
                 lr=1e-3, weight_decay=1e-4, temperature=4.0, alpha_response=0.3, alpha_feature=0.5,
                 es_patience=30, plateau_patience=10, holdout=200, variants=["faithful", "corrected"],
                 students=list(STUDENTS), num_workers=8, latency_iters=50, bf16=None),
}


def precision_mode(params: dict, device: str) -> tuple[bool, bool]:
    """(bf16 autocast, channels_last) of the run: both on CUDA unless `bf16` says otherwise. On CUDA it also allows
    TF32 matmuls, what the source's GPU run did by default."""
    if str(device).startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return _precision(params, device)


def _precision(params: dict, device: str) -> tuple[bool, bool]:
    cuda = str(device).startswith("cuda")
    return (cuda if params["bf16"] is None else params["bf16"]), cuda


def describe(params: dict) -> str:
    """What the setup cell prints below the parameters (kdnb.study.setup): the precision the device gets."""
    bf16, channels_last = _precision(params, validate.device(params["device"]))
    return f"bf16 autocast: {bf16}, channels_last: {channels_last}"


def check(*, data_source, image_size, epochs, batch_size, test_batch_size, lr, weight_decay, temperature,
          alpha_response, alpha_feature, es_patience, plateau_patience, holdout, variants, students, num_workers,
          latency_iters, bf16=None, **_):
    """Every study parameter of notebook 02, before any data is read."""
    validate.choice("data_source", data_source, DATA_SOURCES)
    validate.positive_int("image_size", image_size)
    if image_size < 32 or image_size % 32:
        validate.fail("image_size", image_size, "must be a multiple of 32 (the student's x3 has stride 32), >= 32")
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("test_batch_size", test_batch_size),
                        ("es_patience", es_patience), ("plateau_patience", plateau_patience),
                        ("holdout", holdout), ("latency_iters", latency_iters)):
        validate.positive_int(name, value)
    if batch_size < 2:
        validate.fail("batch_size", batch_size, "must be >= 2 (BatchNorm in training mode needs two images)")
    validate.positive("lr", lr)
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        validate.fail("weight_decay", weight_decay, "must be a number >= 0")
    validate.temperature(temperature)
    validate.unit_interval("alpha_response", alpha_response)
    validate.unit_interval("alpha_feature", alpha_feature)
    validate.non_negative_int("num_workers", num_workers)
    validate.choices("variants", variants, VARIANTS)
    validate.choices("students", students, STUDENTS)
    if bf16 is not None and not isinstance(bf16, bool):
        validate.fail("bf16", bf16, "use None (bf16 autocast on CUDA only), True or False")


# ============================================================================ models (B.2)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling as in the source's model.py: 1x1, 3x3 at dilations 6/12/18 and image
    pooling, each conv (no bias) + BN + ReLU, concatenated (5 x out) and fused by 1x1 conv + BN + ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()

        def branch(kernel: int, dilation: int = 1) -> nn.Sequential:
            pad = 0 if kernel == 1 else dilation
            return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, padding=pad, dilation=dilation, bias=False),
                                 nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))

        self.atrous_block1 = branch(1)
        self.atrous_block6 = branch(3, 6)
        self.atrous_block12 = branch(3, 12)
        self.atrous_block18 = branch(3, 18)
        self.global_pooling = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))
        self.conv1 = nn.Sequential(nn.Conv2d(out_channels * 5, out_channels, 1, bias=False),
                                   nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))

    def forward(self, x):
        pooled = F.interpolate(self.global_pooling(x), size=x.shape[2:], mode="bilinear", align_corners=False)
        return self.conv1(torch.cat([self.atrous_block1(x), self.atrous_block6(x), self.atrous_block12(x),
                                     self.atrous_block18(x), pooled], dim=1))


class LightweightResNet(nn.Module):
    """The source's student ("light"; a MobileNetV2 despite the name), 14,652,181 parameters.

    MobileNetV2 `.features` from scratch split into x1 = features[0:4] (24 ch, stride 4), x2 = features[4:7]
    (32 ch, stride 8), x3 = features[7:] (1,280 ch, stride 32 - the source's comment says 16: B-Q7); ASPP on x3,
    upsampled to x2 and concatenated (288 ch), two 3x3 conv + BN + ReLU + dropout (0.5, 0.1), bilinear upsampling
    to the input size, *then* the 1x1 classifier. The 1x1 alignment convs (24->256, 32->512, 1280->1024) belong to
    the model even when unused (plain/response students), as in the source. forward -> (logits, [x1, x2, x3]).
    Attribute names follow the source, so its checkpoints load with load_state_dict.
    """

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        import torchvision.models as tvm

        self.backbone = tvm.mobilenet_v2(weights=None).features
        self.low_level_features = self.backbone[:4]
        self.mid_level_features = self.backbone[4:7]
        self.high_level_features = self.backbone[7:]
        self.aspp = ASPP(1280, 256)
        self.decoder = nn.Sequential(
            nn.Conv2d(256 + 32, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256), nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Conv2d(256, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256), nn.ReLU(inplace=True),
            nn.Dropout(0.1))
        self.classifier = nn.Conv2d(256, num_classes, 1)
        # zip(student [24, 32, 1280], teacher [256, 512, 1024, 2048]): three pairs, layer4 unused (B-Q7)
        self.align_layers = nn.ModuleList(nn.Conv2d(s, t, 1) for s, t in zip((24, 32, 1280), (256, 512, 1024, 2048)))

    def forward(self, x):
        x1 = self.low_level_features(x)
        x2 = self.mid_level_features(x1)
        x3 = self.high_level_features(x2)
        up = F.interpolate(self.aspp(x3), size=x2.shape[2:], mode="bilinear", align_corners=False)
        dec = self.decoder(torch.cat([up, x2], dim=1))
        dec = F.interpolate(dec, size=x.shape[2:], mode="bilinear", align_corners=False)
        return self.classifier(dec), [x1, x2, x3]


def student_parameters(model: LightweightResNet) -> dict:
    align = models.count_parameters(model.align_layers)
    total = models.count_parameters(model)
    return {"total": total, "without_align": total - align, "align": align,
            "mobilenet_trunk": models.count_parameters(model.backbone)}


def teacher_weights_file() -> Path:
    """Where torchvision keeps the COCO-with-VOC-labels FCN weights once downloaded (torch hub cache)."""
    from torchvision.models.segmentation import FCN_ResNet50_Weights

    url = FCN_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def build_teacher(*, download: bool = False, require_pretrained: bool = False) -> tuple[nn.Module, bool]:
    """torchvision fcn_resnet50 with the COCO_WITH_VOC_LABELS_V1 weights (aux head included, 35,322,218 parameters)
    when `download` is set or the file is already in the torch hub cache; otherwise the same network randomly
    initialised - a pipeline check only. Returns (teacher in eval mode, frozen; pretrained?)."""
    from torchvision.models.segmentation import FCN_ResNet50_Weights, fcn_resnet50

    if download or teacher_weights_file().is_file():
        try:
            model = fcn_resnet50(weights=FCN_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1, progress=False)
        except OSError as e:  # URLError is an OSError: no network
            raise RuntimeError(f"could not get the FCN-ResNet50 COCO-VOC weights ({e}); they are fetched from "
                               f"{FCN_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1.url} into {teacher_weights_file()}") from e
        pretrained = True
    else:
        if require_pretrained:
            raise ValueError(
                f"download=False is not allowed without the teacher weights: the reduced/full profiles need the "
                f"FCN-ResNet50 COCO_WITH_VOC_LABELS_V1 weights; pass download=True on a connected machine or put "
                f"the file at {teacher_weights_file()}")
        model = fcn_resnet50(weights=None, weights_backbone=None, num_classes=NUM_CLASSES, aux_loss=True)
        pretrained = False
    model.eval().requires_grad_(False)
    return model, pretrained


def logits_of(output) -> torch.Tensor:
    """Student -> (logits, features); torchvision FCN -> {'out': logits, 'aux': ...}."""
    if isinstance(output, dict):
        return output["out"]
    return output[0] if isinstance(output, (tuple, list)) else output


# ============================================================================ data (B.1)


class ResizePair:
    """(PIL image, PIL palette mask) -> (uint8 [S,S,3], uint8 [S,S]) at S x S, aspect ratio not kept: bilinear
    (PIL, as transforms.Resize on a PIL image) for the photo, nearest for the mask (PIL forces nearest on palette
    images, so the source's two mask resizes agree). A class, not a lambda: picklable for worker processes (B-Q8)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image, mask):
        from PIL import Image

        image = image.convert("RGB").resize((self.size, self.size), Image.BILINEAR)
        mask = mask.resize((self.size, self.size), Image.NEAREST)
        return torch.from_numpy(np.array(image, dtype=np.uint8)), torch.from_numpy(np.array(mask, dtype=np.uint8))


def voc_dataset_root(data_source: str, data_dir=None, *, download: bool = False) -> Path:
    """The folder holding VOCdevkit/: a synthetic one written to the cache ('synthetic'), or the real one."""
    validate.choice("data_source", data_source, DATA_SOURCES)
    if data_source == "synthetic":
        key = f"synthetic-voc-{SYNTHETIC['n_train']}-{SYNTHETIC['n_val']}-{SYNTHETIC['size'][0]}x{SYNTHETIC['size'][1]}"
        root = data.cache_dir() / key
        finished = root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt"
        if not finished.is_file():
            # written whole beside the cache entry, then renamed into place: a sweep's workers start together, and
            # one must never read a JPEG another is still writing, nor take a half-written tree for a finished one
            if root.is_dir():  # left half-written by an older kdnb
                shutil.rmtree(root, ignore_errors=True)
            with runs.atomic_dir(root) as tmp:
                samples.write_synthetic_voc(tmp, **SYNTHETIC)
        return root
    return data.voc_root(data_dir, download=download)


def load_voc(root, image_set: str, size: int, *, download: bool = False, num_workers: int = 0,
             source: str = "real") -> data.Split:
    """One VOC 2012 split read by torchvision's VOCSegmentation, resized, held in memory as
    Split(x=uint8 images [N,S,S,3], y=uint8 masks [N,S,S] with 0..20 and 255 = void)."""
    import torchvision.datasets as tvd

    validate.choice("image_set", image_set, ("train", "val", "trainval"))
    ds = tvd.VOCSegmentation(str(root), year="2012", image_set=image_set, download=download,
                             transforms=ResizePair(size))
    if len(ds) == 0:
        raise data.DataNotFoundError("voc2012", [Path(root)], f"images listed in ImageSets/Segmentation/{image_set}.txt")
    # the run's data identity covers VOC too: the split list and every image and mask it names (issue 18, fault 1)
    listed = Path(root) / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / f"{image_set}.txt"
    files = [listed, *ds.images, *ds.targets] if listed.is_file() else [*ds.images, *ds.targets]
    identity = data._record_read("voc2012", image_set, source, files)
    from PIL import Image

    for path in map(Path, files):  # a truncated or unreadable file is one line now, not a PIL traceback inside a DataLoader
        try:
            if path.suffix in (".jpg", ".png"):
                with Image.open(path) as im:
                    im.verify()
        except (OSError, SyntaxError, ValueError) as e:
            raise data.DataCorruptError("voc2012", path, f"{type(e).__name__}: {e}",
                                        sample=source == "synthetic") from None
    loader = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=False, num_workers=num_workers)
    try:
        xs, ys = zip(*loader)
    except (OSError, SyntaxError, ValueError) as e:  # verify() passes some truncations that decoding then meets
        raise data.DataCorruptError("voc2012", root, f"an image or mask of {image_set} does not decode: {e}",
                                    sample=source == "synthetic") from None
    return data.Split(torch.cat(xs), torch.cat(ys), source, identity)


# ============================================================================ augmentation (B.1), batched


def _per_image(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def _blend(a: torch.Tensor, b: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    return (ratio * a + (1.0 - ratio) * b).clamp_(0.0, 1.0)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma, torchvision's weights; [B,1,H,W]."""
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def grayscale3(x):
    """RandomGrayscale's output: the luma copied into three channels."""
    return grayscale(x).expand(-1, 3, -1, -1)


def adjust_brightness(x, factor):
    return _blend(x, torch.zeros_like(x), _per_image(factor, x))


def adjust_contrast(x, factor):
    return _blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), _per_image(factor, x))


def adjust_saturation(x, factor):
    return _blend(x, grayscale(x), _per_image(factor, x))


def adjust_hue(x, factor):
    """Rotate the hue by `factor` (in turns, |factor| <= 0.5) per image, through HSV as torchvision does."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    delta = maxc - minc
    flat = delta == 0
    safe = torch.where(flat, torch.ones_like(delta), delta)
    s = delta / torch.where(flat, torch.ones_like(maxc), maxc)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(flat, torch.zeros_like(h), h)
    h = torch.remainder(h / 6.0 + factor.to(device=x.device, dtype=x.dtype).view(-1, 1, 1), 1.0)
    v = maxc
    h6 = h * 6.0
    i = torch.floor(h6)
    f = h6 - i
    i = i.long() % 6
    p = (v * (1.0 - s)).clamp(0, 1)
    q = (v * (1.0 - s * f)).clamp(0, 1)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0, 1)
    cand = torch.stack([v, p, q, t], dim=1)                        # [B,4,H,W]
    # sector i -> (r, g, b) taken from (v, p, q, t)
    table = torch.tensor([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]], device=x.device)
    idx = table[i].permute(0, 3, 1, 2)                             # [B,3,H,W]
    return torch.gather(cand, 1, idx)


def gaussian_blur(x, sigma, kernel_size: int = 5):
    """GaussianBlur(kernel_size) with one sigma per image, reflect padding (torchvision's tensor kernel)."""
    b, c, hgt, wid = x.shape
    half = kernel_size // 2
    grid = torch.linspace(-half, half, kernel_size, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (grid[None] / sigma.to(device=x.device, dtype=x.dtype)[:, None]) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, dim=0)   # [B*C, K]
    y = F.pad(x.reshape(1, b * c, hgt, wid), (half, half, half, half), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=b * c)
    y = F.conv2d(y, k[:, None, :, None], groups=b * c)
    return y.reshape(b, c, hgt, wid)


def adjust_sharpness(x, factor: float = 2.0):
    """torchvision's adjust_sharpness: blend with a 3x3 smoothed copy (13ths, centre 5) whose border pixels are the
    original ones."""
    c = x.shape[1]
    kernel = torch.ones(3, 3, device=x.device, dtype=x.dtype)
    kernel[1, 1] = 5.0
    kernel = (kernel / kernel.sum()).expand(c, 1, 3, 3)
    degenerate = x.clone()
    degenerate[..., 1:-1, 1:-1] = F.conv2d(x, kernel, groups=c)
    return _blend(x, degenerate, torch.tensor(factor, device=x.device, dtype=x.dtype))


def autocontrast(x):
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    flat = hi == lo
    scale = torch.where(flat, torch.ones_like(hi), hi - lo)
    lo = torch.where(flat, torch.zeros_like(lo), lo)
    return ((x - lo) / scale).clamp_(0.0, 1.0)


def _apply(x: torch.Tensor, chosen: torch.Tensor, fn, *args):
    """x[chosen] = fn(x[chosen], args[chosen]...) with `chosen` a CPU bool mask (no device sync to decide)."""
    if not bool(chosen.any()):
        return x
    idx = chosen.nonzero().flatten()
    dev_idx = idx.to(x.device)
    x[dev_idx] = fn(x[dev_idx], *(a[idx] for a in args))   # x is this batch's own float copy: in place is safe
    return x


def color_jitter(x: torch.Tensor, g: torch.Generator, *, brightness=0.2, contrast=0.2, saturation=0.2, hue=None):
    """ColorJitter with per-image factors and a per-image random order of the four adjustments (torchvision
    draws a new order and new factors for every image)."""
    n = x.shape[0]
    ops = [(adjust_brightness, brightness), (adjust_contrast, contrast), (adjust_saturation, saturation)]
    factors = [1.0 + (torch.rand(n, generator=g) * 2 - 1) * w for _, w in ops]
    if hue is not None:
        ops.append((adjust_hue, hue))
        factors.append((torch.rand(n, generator=g) * 2 - 1) * hue)
    order = torch.rand(n, 4, generator=g).argsort(dim=1)             # per image: a permutation of 0..3
    for pos in range(4):
        for k, (fn, _) in enumerate(ops):
            x = _apply(x, order[:, pos] == k, fn, factors[k])
    return x


def _to_unit(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [B,H,W,3] -> float [B,3,H,W] in [0, 1] (ToTensor)."""
    return data.to_float(x_uint8, device=x_uint8.device)


def normalise(x: torch.Tensor) -> torch.Tensor:
    m = torch.tensor(VOC_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(VOC_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


def prepare(x_uint8: torch.Tensor) -> torch.Tensor:
    """Val/test transform: ToTensor + Normalize (the resize happened on loading)."""
    return data.to_float(x_uint8, mean=VOC_MEAN, std=VOC_STD, device=x_uint8.device)


def augment_plain(x_uint8: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """`train.py`: ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2) -> ToTensor -> Normalize."""
    return normalise(color_jitter(_to_unit(x_uint8), g))


def augment_kd(x_uint8: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """`train_kd.py`: ColorJitter(0.2, 0.2, 0.2, hue=0.1), RandomGrayscale(0.2), RandomApply([GaussianBlur(5)], 0.3)
    (sigma ~ U(0.1, 2)), RandomAdjustSharpness(2, 0.3), RandomAutocontrast(0.3) -> ToTensor -> Normalize."""
    n = x_uint8.shape[0]
    x = color_jitter(_to_unit(x_uint8), g, hue=0.1)
    x = _apply(x, torch.rand(n, generator=g) < 0.2, grayscale3)
    sigma = torch.empty(n).uniform_(0.1, 2.0, generator=g)
    x = _apply(x, torch.rand(n, generator=g) < 0.3, gaussian_blur, sigma)
    x = _apply(x, torch.rand(n, generator=g) < 0.3, adjust_sharpness)
    x = _apply(x, torch.rand(n, generator=g) < 0.3, autocontrast)
    return normalise(x)


AUGMENTS = {"plain": augment_plain, "kd": augment_kd}


# ============================================================================ evaluation (B.5)


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def _autocast(device, bf16: bool):
    return torch.autocast(device_type="cuda" if str(device).startswith("cuda") else "cpu", dtype=torch.bfloat16,
                          enabled=bool(bf16))


@torch.no_grad()
def evaluate(model: nn.Module, split: data.Split, *, batch_size: int, device="cpu", bf16: bool = False,
             channels_last: bool = False, keep: int = 0) -> dict:
    """Dataset-level metrics of one model on one split (no augmentation), the source's test protocol and ours:

    val_loss      CE(ignore 255), mean over images of batch means (the source's weighting)
    miou          macro IoU from the dataset confusion matrix, void pixels ignored (correct)
    miou_void20   the same with void relabelled as class 20 before counting (test.py's clamp, B-Q2)
    iou, iou_void20, pixel_acc (void ignored), conf (ignore-void confusion matrix)
    unsync_ms     perf_counter around model(images) without CUDA synchronisation, summed / N (test.py, B-Q3)
    preds         argmax maps of the first `keep` images (figures)
    """
    was_training = model.training
    model.eval()
    conf = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.long, device=device)
    conf20 = torch.zeros_like(conf)
    loss_sum, n, unsync, kept = 0.0, 0, 0.0, []
    for i in range(0, len(split), batch_size):
        xb = prepare(split.x[i:i + batch_size].to(device, non_blocking=True))
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        yb = split.y[i:i + batch_size].to(device, non_blocking=True).long()
        t0 = time.perf_counter()
        with _autocast(device, bf16):
            out = model(xb)
        unsync += time.perf_counter() - t0
        logits = numerics.cast(logits_of(out))
        loss_sum += F.cross_entropy(logits, yb, ignore_index=VOID).item() * len(yb) if (yb != VOID).any() else 0.0
        preds = logits.argmax(1)
        conf += metrics.confusion_matrix(preds, yb, NUM_CLASSES, ignore_index=VOID)
        conf20 += metrics.confusion_matrix(preds, torch.where(yb == VOID, NUM_CLASSES - 1, yb), NUM_CLASSES)
        if len(kept) < keep:
            kept.extend(preds[: keep - len(kept)].cpu())
        n += len(yb)
    model.train(was_training)
    miou, iou = metrics.miou_from_confusion(conf)
    miou20, iou20 = metrics.miou_from_confusion(conf20)
    return {"val_loss": loss_sum / max(n, 1), "miou": miou, "miou_void20": miou20, "iou": iou, "iou_void20": iou20,
            "pixel_acc": metrics.pixel_accuracy(conf), "conf": conf.cpu(), "unsync_ms": 1000.0 * unsync / max(n, 1),
            "preds": torch.stack(kept) if kept else None}


@torch.no_grad()
def latency_ms(model: nn.Module, *, image_size: int, batch_size: int = 8, device="cpu", iters: int = 50,
               warmup: int | None = None, bf16: bool = False, channels_last: bool = False) -> float:
    """Milliseconds per image of model(x) on a batch, after `warmup` untimed calls, with CUDA synchronised
    before the clock starts and before it stops (what B-Q3's timing lacks)."""
    validate.positive_int("iters", iters)
    warmup = max(1, iters // 5) if warmup is None else warmup
    was_training = model.training
    model.eval()
    x = torch.randn(batch_size, 3, image_size, image_size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with _autocast(device, bf16):
        for _ in range(warmup):
            model(x)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            model(x)
        _sync(device)
    model.train(was_training)
    return 1000.0 * (time.perf_counter() - t0) / (iters * batch_size)


def flops_per_image(model: nn.Module, *, image_size: int, device="cpu") -> int:
    """Forward FLOPs of one image (torch.utils.flop_counter: 2 per multiply-add of convolutions and matrix
    products; element-wise ops, pooling and interpolation are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, image_size, image_size, device=device))
    model.train(was_training)
    return int(counter.get_total_flops())


# ============================================================================ training (B.3, B.4)


def make_loss(student: str, *, teacher: nn.Module | None = None, hooks: models.FeatureHooks | None = None,
              temperature: float = 4.0, alpha_response: float = 0.3, alpha_feature: float = 0.5,
              kd_reduction: str = "batchmean_dense", device="cpu", bf16: bool = False, channels_last: bool = False):
    """loss_fn(model, images, masks) of one student for train.fit; the teacher sees the same augmented batch
    under no_grad. Forward passes run under bf16 autocast when asked; the losses are computed in float32."""
    validate.choice("student", student, STUDENTS)
    if RECIPES[student]["teacher"] and teacher is None:
        raise ValueError(f"student={student!r} needs a teacher")
    if student == "feature" and hooks is None:
        raise ValueError("student='feature' needs FeatureHooks on the teacher's backbone.layer1..4")

    def loss_fn(model, xb, yb):
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        yb = yb.long()
        with _autocast(device, bf16):
            t_logits = None
            if RECIPES[student]["teacher"]:
                with torch.no_grad():
                    t_logits = logits_of(teacher(xb))
            s_logits, s_feats = model(xb)
        s_logits = numerics.cast(s_logits)
        if student in ("plain", "control"):
            return F.cross_entropy(s_logits, yb, ignore_index=VOID)
        if student == "response":
            return losses.response_kd_segmentation(s_logits, numerics.cast(t_logits), yb, temperature=temperature,
                                                   alpha=alpha_response, kd_reduction=kd_reduction, ignore_index=VOID)
        t_feats = [numerics.cast(f) for f in hooks.outputs]
        return losses.feature_kd_segmentation(s_logits, yb, [numerics.cast(f) for f in s_feats], t_feats, model.align_layers,
                                              alpha=alpha_feature, ignore_index=VOID)

    return loss_fn


def train_student(student: str, train_split: data.Split, select_split: data.Split, *, seed: int,
                  teacher: nn.Module | None, epochs: int, batch_size: int, lr: float, weight_decay: float,
                  temperature: float, alpha_response: float, alpha_feature: float, kd_reduction: str,
                  es_patience: int, plateau_patience: int, test_batch_size: int = 8, device="cpu",
                  bf16: bool = False, channels_last: bool = False, checkpoint=None, desc: str = "",
                  progress: bool = True) -> tuple[LightweightResNet, dict]:
    """Train one student with its script's recipe (RECIPES) and return it with the selected (best) weights.

    Every student of a seed starts from the same initialisation and sees the same batch order, so students
    differ only by their loss / augmentation / optimiser / selection.
    """
    recipe = RECIPES[student]
    train.seed_everything(seed)
    model = LightweightResNet().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    hooks = models.FeatureHooks(teacher, TEACHER_LAYERS) if student == "feature" else None
    loss_fn = make_loss(student, teacher=teacher, hooks=hooks, temperature=temperature, alpha_response=alpha_response,
                        alpha_feature=alpha_feature, kd_reduction=kd_reduction, device=device, bf16=bf16,
                        channels_last=channels_last)
    loader = data.TensorLoader(train_split.x, train_split.y, batch_size, shuffle=True, seed=seed,
                               augment=AUGMENTS[recipe["augment"]])
    tick = {"t": time.perf_counter(), "times": []}

    def select_metrics(m):
        ev = evaluate(m, select_split, batch_size=max(test_batch_size, batch_size), device=device, bf16=bf16,
                      channels_last=channels_last)
        return {"val_loss": ev["val_loss"], "val_miou": ev["miou"], "val_pixel_acc": ev["pixel_acc"]}

    def on_epoch_end(epoch, row):
        _sync(device)
        now = time.perf_counter()
        tick["times"].append(now - tick["t"])
        tick["t"] = now

    try:
        res = train.fit(model, loader, loss_fn, epochs=epochs, optimizer=recipe["optimizer"], lr=lr,
                        optimizer_kwargs={"weight_decay": weight_decay}, scheduler="plateau",
                        scheduler_kwargs={"patience": plateau_patience, "factor": 0.5},
                        evaluate=select_metrics, monitor=recipe["monitor"], mode=recipe["mode"],
                        es_patience=es_patience, es_min_delta=0.0, select="best", checkpoint=checkpoint, seed=seed,
                        desc=desc or student, progress=progress, on_epoch_end=on_epoch_end)
    finally:
        if hooks is not None:
            hooks.close()
    trained = len(tick["times"])
    seconds = sum(tick["times"])
    info = {"history": res.history, "best_epoch": res.best_epoch, "epochs_run": res.stopped_epoch,
            "resumed_from": res.resumed_from, "monitor": recipe["monitor"],
            # images per second of the epochs trained in this call (train + selection pass), None when resumed done
            "train_images_per_s": (trained * len(train_split) / seconds) if trained and seconds > 0 else None}
    return model, info


def split_for(variant: str, voc_train: data.Split, voc_val: data.Split, *, holdout: int, seed: int = 0):
    """(train, selection) splits of a variant: faithful selects on VOC val (= the test set, B-Q4); corrected
    carves `holdout` images out of train (seeded) and selects on those."""
    validate.choice("variant", variant, VARIANTS)
    if VARIANTS[variant]["selection"] == "voc_val":
        return voc_train, voc_val
    if holdout >= len(voc_train):
        validate.fail("holdout", holdout, f"must be smaller than the training set ({len(voc_train)} images)")
    tr, sel = data.holdout(voc_train, holdout / len(voc_train), seed=seed)
    return tr, sel


def test_row(ev: dict) -> dict:
    return {"miou": ev["miou"], "miou_void20": ev["miou_void20"], "pixel_acc": ev["pixel_acc"],
            "iou": np.asarray(ev["iou"]).tolist(), "iou_void20": np.asarray(ev["iou_void20"]).tolist(),
            "unsync_ms": ev["unsync_ms"]}


def colorize(mask) -> np.ndarray:
    """Label map (0..20, 255) -> RGB uint8 in the VOC palette (void drawn in its palette colour)."""
    m = np.asarray(mask, dtype=np.int64)
    return samples.voc_palette()[m]


def claim_values(results: list[dict], teacher_eval: dict, *, seed: int) -> dict:
    """Values for claims B1-B5 from the faithful variant (the source's protocol: void -> 20, unsynchronised
    timing). Missing students give None."""
    by = {(r["variant"], r["student"], r["seed"]): r for r in results}

    def m(student):
        r = by.get(("faithful", student, seed))
        return None if r is None else r["test"]["miou_void20"]

    def t(student):
        r = by.get(("faithful", student, seed))
        return None if r is None else r["test"]["unsync_ms"]

    return {"B1": teacher_eval["miou_void20"], "B2": m("plain"), "B3": m("response"), "B4": m("feature"),
            "B5": [teacher_eval["unsync_ms"], t("plain"), t("response"), t("feature")]}


def gains_table(results: list[dict]):
    """mIoU (void ignored) of each KD student minus the plain student and minus the B-Q5 control, per variant."""
    import pandas as pd

    rows = []
    for (variant, seed), grp in pd.DataFrame(
            [{"variant": r["variant"], "seed": r["seed"], "student": r["student"], "miou": r["test"]["miou"]}
             for r in results]).groupby(["variant", "seed"]):
        d = dict(zip(grp.student, grp.miou))
        for s in ("response", "feature"):
            if s in d:
                rows.append({"variant": variant, "seed": seed, "student": s, "miou": d[s],
                             "minus_plain": d[s] - d["plain"] if "plain" in d else math.nan,
                             "minus_control": d[s] - d["control"] if "control" in d else math.nan})
    return pd.DataFrame(rows)


def run_students(teacher, voc_train, voc_val, params: dict, *, device: str, bf16: bool, channels_last: bool,
                 checkpoint=lambda name: None, keep: int = 0) -> tuple[list[dict], dict]:
    """Every (seed, variant, student) of a run, trained with its script's recipe; its selected (best) checkpoint is
    tested on VOC val. Returns one result row each and, for the first seed, the first `keep` predictions of each
    (variant, student)."""
    results, shown = [], {}
    for seed in params["seeds"]:
        for variant in params["variants"]:
            train_split, select_split = split_for(variant, voc_train, voc_val, holdout=params["holdout"], seed=seed)
            for student in params["students"]:
                name = f"{variant}-{student}-seed{seed}"
                model, info = train_student(
                    student, train_split, select_split, seed=seed, teacher=teacher, epochs=params["epochs"],
                    batch_size=params["batch_size"], lr=params["lr"], weight_decay=params["weight_decay"],
                    temperature=params["temperature"], alpha_response=params["alpha_response"],
                    alpha_feature=params["alpha_feature"], kd_reduction=VARIANTS[variant]["kd_reduction"],
                    es_patience=params["es_patience"], plateau_patience=params["plateau_patience"],
                    test_batch_size=params["test_batch_size"], device=device, bf16=bf16, channels_last=channels_last,
                    checkpoint=checkpoint(name), desc=name)
                ev = evaluate(model, voc_val, batch_size=params["test_batch_size"], device=device, bf16=bf16,
                              channels_last=channels_last, keep=keep)
                if seed == params["seeds"][0]:
                    shown[(variant, student)] = ev["preds"]
                results.append({"variant": variant, "student": student, "seed": seed, "train_images": len(train_split),
                                "select_images": len(select_split), "test": test_row(ev), **info})
                del model
    return results, shown


def results_table(results: list[dict]):
    """One line per trained student: epochs, selection, test mIoU (void ignored and void as class 20), pixel acc."""
    import pandas as pd

    return pd.DataFrame([{"variant": r["variant"], "student": r["student"], "seed": r["seed"], "epochs": r["epochs_run"],
                          "best_epoch": r["best_epoch"], "selected_on": r["monitor"], "mIoU": r["test"]["miou"],
                          "mIoU_void20": r["test"]["miou_void20"], "pixel_acc": r["test"]["pixel_acc"]}
                         for r in results])
