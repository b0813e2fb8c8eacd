import pytest

from kdnb import validate


@pytest.mark.parametrize("fn,args,name", [
    (validate.temperature, (0,), "temperature"),
    (validate.temperature, (-1.0,), "temperature"),
    (validate.temperature, (float("nan"),), "temperature"),
    (validate.unit_interval, ("alpha", 1.5), "alpha"),
    (validate.unit_interval, ("alpha", -0.1), "alpha"),
    (validate.unit_interval, ("soft_weight", True), "soft_weight"),
    (validate.profile, ("huge",), "profile"),
    (validate.positive_int, ("epochs", 0), "epochs"),
    (validate.positive_int, ("epochs", 2.5), "epochs"),
    (validate.seeds, ([],), "seeds"),
    (validate.seeds, ([1, 1],), "seeds"),
    (validate.seeds, (["a"],), "seeds"),
])
def test_bad_values_name_parameter_value_and_rule(fn, args, name):
    with pytest.raises(ValueError, match=rf"^{name}=") as e:
        fn(*args)
    assert repr(args[-1]) in str(e.value)


@pytest.mark.parametrize("value,why", [([], "empty"), ([1, 1], "repeat"), ([0, 10], r"0\.\.9"), ("012", "list"),
                                       ([1.0], r"0\.\.9")])
def test_classes(value, why):
    with pytest.raises(ValueError, match=rf"kept_classes=.*{why}"):
        validate.classes("kept_classes", value, 10)
    assert validate.classes("kept_classes", [0, 5, 9], 10) == [0, 5, 9]


def test_unknown_dataset_and_device():
    from kdnb import data

    with pytest.raises(ValueError, match="dataset='imagenet'.*mnist"):
        data.load("imagenet")
    with pytest.raises(ValueError, match="device='tpu'"):
        validate.device("tpu")


def test_cuda_without_cuda_is_reported_before_work(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device='cuda'.*CUDA is not available"):
        validate.device("cuda")
    assert validate.device("auto") == "cpu"


def test_good_values_pass_through():
    assert validate.temperature(2.5) == 2.5
    assert validate.unit_interval("alpha", 0) == 0
    assert validate.seeds(3) == [3]
    assert validate.device("cpu") == "cpu"


@pytest.mark.parametrize("value,why", [([], "non-empty"), ("a", "non-empty list"), (["a", "a"], "repeat"),
                                       (["a", "c"], "'c'")])
def test_choices_names_the_parameter_and_what_is_allowed(value, why):
    with pytest.raises(ValueError, match="variants") as e:
        validate.choices("variants", value, ("a", "b"))
    assert why in str(e.value)
    assert validate.choices("variants", ("b", "a"), ("a", "b")) == ["b", "a"]
