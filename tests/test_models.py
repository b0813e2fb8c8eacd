import pytest
import torch

from kdnb import models


@pytest.mark.parametrize("build,count", [
    (lambda: models.TeacherMLP(), 468_874),
    (lambda: models.student_mlp("mlp"), 155_830),
    (lambda: models.student_mlp("linear"), 7_850),
    (lambda: models.resnet("resnet18", 10), 11_181_642),
    (lambda: models.resnet("resnet50", 10), 23_528_522),
])
def test_parameter_counts(build, count):
    assert models.count_parameters(build()) == count


def test_teacher_dropout_quirk():
    x = torch.rand(4, 784)
    t = models.TeacherMLP(dropout_at_inference=True).eval()
    torch.manual_seed(0)
    a = t(x)
    assert not torch.equal(a, t(x))       # A-Q2: still random in eval mode
    t.dropout_at_inference = False
    assert torch.equal(t(x), t(x))


def test_feature_hooks_leave_model_untouched():
    m = models.resnet("resnet18", 10).eval()
    x = torch.randn(2, 3, 32, 32)
    with models.FeatureHooks(m, ["layer1", "layer4"]) as hooks:
        out = m(x)
        shapes = [f.shape for f in hooks.outputs]
    assert shapes == [(2, 64, 8, 8), (2, 512, 1, 1)]
    assert torch.equal(out, m(x)) and not m.layer1._forward_hooks
    with pytest.raises(ValueError, match="layer9"):
        models.FeatureHooks(m, ["layer9"])


def test_unknown_arch():
    with pytest.raises(ValueError, match="arch='vgg'"):
        models.resnet("vgg")
    with pytest.raises(ValueError, match="student='cnn'"):
        models.student_mlp("cnn")
