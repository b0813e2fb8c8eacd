"""Plain papermill as a client (issue 15, items 1-4): the notebook itself makes the checks `kdnb run` makes, and its
parameters cell tells `papermill --help-notebook` a type and a help line for every parameter."""
import json
import types

import papermill
import pytest

from kdnb import profiles, runner, runs

NOTEBOOKS = sorted(profiles.STUDY_MODULES)


def kernel_namespace(notebook: str, **injected) -> dict:
    """globals() of a kernel after the parameters cell and papermill's injected cell, before the setup cell."""
    ns = dict(profiles.notebook_parameters(notebook), In=[""], Out={}, get_ipython=lambda: None, exit=None, quit=None,
              _ih=[""], _i1="", __name__="__main__", __builtins__={}, profiles=profiles, json=json)
    ns.update(injected)
    return ns


def test_a_misspelt_parameter_stops_the_notebook_with_kdnb_runs_line():
    with pytest.raises(ValueError) as e:
        profiles.from_namespace("05_self_distillation", kernel_namespace("05_self_distillation", typo_param=1))
    assert str(e.value).startswith("parameter 'typo_param' is not a parameter of 05_self_distillation.ipynb; "
                                   "its parameters are: profile, seeds, device")


def test_the_setup_cell_can_be_rerun_after_later_cells():
    nb = "01_mnist_unseen_classes"
    ns = kernel_namespace(nb, params={}, run=object(), card={}, mnist=types.SimpleNamespace())  # later cells bind these
    assert profiles.from_namespace(nb, ns) == profiles.resolve(nb, **{k: v for k, v in kernel_namespace(nb).items()
                                                                     if k in profiles.notebook_parameters(nb)
                                                                     and k not in runs.LOCATION_PARAMS})


def test_strings_for_numeric_and_list_parameters_are_read_once(capsys):
    nb = "05_self_distillation"
    ns = kernel_namespace(nb, profile="reduced", lr="1e-3", sd_alphas="[0.5, 0.9]", arch="resnet34", seeds="[1, 2]")
    params = profiles.from_namespace(nb, ns)
    assert params["lr"] == 1e-3 and params["sd_alphas"] == [0.5, 0.9] and params["seeds"] == [1, 2]
    assert params["arch"] == "resnet34" and ns["lr"] == 1e-3  # a string parameter stays a string
    out = capsys.readouterr().out
    assert "lr='1e-3' read as 0.001" in out and "sd_alphas='[0.5, 0.9]' read as [0.5, 0.9]" in out
    assert out.count("read as") == 3
    # a string that spells no number is left for the study's check to reject by name
    assert profiles.from_namespace(nb, kernel_namespace(nb, epochs="ten"))["epochs"] == "ten"


def test_cuda_on_a_machine_without_it_stops_in_the_setup_cell(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device='cuda' is not allowed: CUDA is not available"):
        profiles.from_namespace("05_self_distillation", kernel_namespace("05_self_distillation", device="cuda"))


def _with_cell(notebook: str, source: str, tmp_path):
    path = runner.notebook_path(notebook)
    nb = json.loads(path.read_text())
    cell = next(c for c in nb["cells"] if "parameters" in (c.get("metadata", {}).get("tags") or []))
    cell["source"] = source.splitlines(keepends=True)
    out = tmp_path / path.name
    out.write_text(json.dumps(nb))
    return out


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_generated_parameters_cell_is_what_papermill_reads(notebook, tmp_path):
    """Every parameter typed and explained for --help-notebook; same names and defaults; the cell still runs."""
    source = profiles.parameters_cell(notebook)
    exec(compile(source, "parameters", "exec"), {})
    generated = _with_cell(notebook, source, tmp_path)
    assert runner.notebook_parameters(generated) == profiles.notebook_parameters(notebook)
    found = papermill.inspect_notebook(str(generated))
    assert [k for k, v in found.items() if v["inferred_type_name"] == "None" or not v["help"]] == []


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_parameters_cell_is_the_generated_one(notebook):
    """Regenerate with `python -m kdnb.profiles parameters-cell NOTEBOOK` and paste it into the parameters cell."""
    path = runner.notebook_path(notebook)
    assert profiles._parameters_source(path).rstrip("\n") == profiles.parameters_cell(notebook), (
        f"{path.name}: parameters cell is not the generated one; paste `python -m kdnb.profiles parameters-cell "
        f"{notebook}`")
