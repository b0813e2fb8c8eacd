"""Models of the studies, as plain torch modules whose parameter counts match the study docs (papers/0N_*.md).
Models are left untouched by distillation: features are taken with forward hooks (see `FeatureHooks`)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import validate


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- study A (AditMeh): MNIST MLPs


class TeacherMLP(nn.Module):
    """784-512-128-10 with dropout 0.5 (468,874 parameters).

    `dropout_at_inference=True` reproduces quirk A-Q2: the source used the functional
    `F.dropout(x, 0.5)` whose default `training=True` keeps dropout on in eval mode too, so the
    teacher's soft targets were themselves noisy.
    """

    def __init__(self, dropout_at_inference: bool = True):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(784, 512), nn.Linear(512, 128), nn.Linear(128, 10)
        self.dropout_at_inference = dropout_at_inference

    def _drop(self, x):
        return F.dropout(x, 0.5, training=self.training or self.dropout_at_inference)

    def forward(self, x):
        x = x.flatten(1)
        x = self._drop(F.relu(self.fc1(x)))
        x = self._drop(F.relu(self.fc2(x)))
        return self.fc3(x)


def student_mlp(kind: str = "mlp") -> nn.Module:
    """'mlp': 784-196-10 (155,830 params, Dec 2021 on); 'linear': 784-10 (7,850, the 3-Dec-2021 runs)."""
    validate.choice("student", kind, ("mlp", "linear"))
    if kind == "linear":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 196), nn.ReLU(), nn.Linear(196, 10))


# ---------------------------------------------------------------- studies C and E: torchvision ResNets

RESNETS = ("resnet18", "resnet34", "resnet50")


def resnet(arch: str = "resnet18", num_classes: int = 10) -> nn.Module:
    """torchvision's ImageNet-style ResNet (7x7/2 stem + max-pool, kept even on 28-32 px inputs as the
    sources did: quirk E-Q6), new `fc` for `num_classes`, random init (no weights offline)."""
    import torchvision.models as tvm

    validate.choice("arch", arch, RESNETS)
    return getattr(tvm, arch)(weights=None, num_classes=num_classes)


class FeatureHooks:
    """Collects the outputs of named submodules with forward hooks, leaving the model untouched.

    with FeatureHooks(teacher, ["backbone.layer1", "backbone.layer2"]) as feats:
        teacher(x); feats.outputs  # list in the given order
    """

    def __init__(self, model: nn.Module, names: Sequence[str]):
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"layer names {missing} not in the model; it has e.g. {list(modules)[1:8]}")
        self.names, self._store, self._handles = list(names), {}, []
        for n in names:
            self._handles.append(modules[n].register_forward_hook(self._hook(n)))

    def _hook(self, name):
        def fn(_module, _inputs, output):
            self._store[name] = output
        return fn

    @property
    def outputs(self) -> list[torch.Tensor]:
        return [self._store[n] for n in self.names]

    def close(self):
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
