"""Issue 14: every study has one shape - a module answering kdnb.study's contract, a notebook whose setup cell is one
call to `study.setup` and whose sections are kdnb.study.SECTIONS in order. File reading and parameter checks only."""
import json
import re
from pathlib import Path

import pytest

from kdnb import profiles, runs, study

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(profiles.STUDY_MODULES)


def _cells(nb: str) -> list[dict]:
    return json.loads((REPO / "notebooks" / f"{nb}.ipynb").read_text())["cells"]


def _src(cell: dict) -> str:
    return "".join(cell.get("source", ""))


def sections(nb: str) -> list[str]:
    """The notebook's H2 headings, as written."""
    return [line[3:].strip() for c in _cells(nb) if c["cell_type"] == "markdown"
            for line in _src(c).splitlines() if line.startswith("## ")]


def outline_problems(headings: list[str]) -> list[str]:
    """What keeps `headings` from being study.SECTIONS in order (numbered ones '1 · Data', '3 · Results: ...')."""
    want = [s for s in study.SECTIONS]
    problems, number = [], 0
    for h in headings:
        m = re.match(r"(\d+) · (.*)", h)
        name = m.group(2) if m else h
        while want and not name.startswith(want[0]) and want[0] in study.OPTIONAL:
            want.pop(0)
        if not want or not name.startswith(want[0]):
            problems.append(f"{h!r} where {want[0] if want else 'nothing'!r} belongs")
            continue
        if (want[0] in study.NUMBERED) != bool(m) or (m and int(m.group(1)) != number + 1):
            problems.append(f"{h!r} is not numbered {number + 1}" if want[0] in study.NUMBERED
                            else f"{h!r} takes no number")
        number += bool(m)
        want.pop(0)
    return problems + [f"missing {s!r}" for s in want if s not in study.OPTIONAL]


def test_the_outline_rule_itself():
    good = ["Results at a glance", "1 · Data", "2 · Training", "3 · Results: per class", "4 · Claims",
            "Why not: one quirk at a time", "What this notebook establishes"]
    assert outline_problems(good) == []
    assert outline_problems(good[:4] + ["4 · Beyond the source: x", "5 · Claims"] + good[5:]) == []
    assert outline_problems(good[:3] + good[4:])[0] == "'4 · Claims' where 'Results' belongs"
    assert outline_problems(["Results at a glance", "1 · Data", "3 · Training"] + good[3:])[0] == \
        "'3 · Training' is not numbered 2"
    assert "missing 'What this notebook establishes'" in outline_problems(good[:-1])
    assert outline_problems(good[:1] + ["1 · Teachers"] + good[1:]) != []


@pytest.mark.parametrize("nb", NOTEBOOKS)
def test_every_notebook_has_the_shared_sections(nb):
    assert outline_problems(sections(nb)) == [], sections(nb)


@pytest.mark.parametrize("nb", NOTEBOOKS)
def test_the_setup_cell_is_at_most_five_lines_around_one_study_setup_call(nb):
    code = [c for c in _cells(nb) if c["cell_type"] == "code"]
    assert "parameters" in code[0]["metadata"].get("tags", [])
    setup = _src(code[1])
    assert len(setup.splitlines()) <= 5, setup
    assert re.search(r"^params, run, device = study\.setup\((\"%s\"|NB), globals\(\)\)" % nb, setup, re.M), setup
    if "NB, globals()" in setup:
        assert f'NB = "{nb}"' in setup


@pytest.mark.parametrize("nb", NOTEBOOKS)
def test_every_study_module_answers_the_contract(nb):
    module = study.module(nb)
    assert set(module.PROFILES) == {"smoke", "reduced", "full"}
    for profile in module.PROFILES:
        params = profiles.resolve(nb, **dict(_notebook_defaults(nb), profile=profile))
        module.check(**params)  # every profile passes its own study's check
        if hasattr(module, "describe"):  # lines below the parameters setup prints; never the parameters again
            text = module.describe(params)
            assert isinstance(text, str) and str(study.set_values(params)) not in text


def _notebook_defaults(nb: str) -> dict:
    return {k: v for k, v in profiles.notebook_parameters(nb).items() if k not in runs.LOCATION_PARAMS}


def test_setup_stops_a_bad_parameter_before_anything_runs(tmp_path):
    ns = dict(_notebook_defaults("04_emnist_mlp_student"), output_dir=None, data_dir=None, temperature=-1.0)
    with pytest.raises(ValueError, match=r"^temperature=-1\.0"):
        study.setup("04_emnist_mlp_student", ns)


def test_setup_of_05_names_missing_cifar_before_the_exact_part(tmp_path, monkeypatch):
    from kdnb import data

    monkeypatch.delenv("KDNB_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    ns = dict(_notebook_defaults("05_self_distillation"), output_dir=None, data_dir=str(tmp_path / "none"),
              data_source="subset", profile="reduced")
    with pytest.raises(data.DataNotFoundError, match="cifar10_subset.npz"):
        study.setup("05_self_distillation", ns)


@pytest.mark.parametrize("nb", NOTEBOOKS)
def test_every_profile_value_is_a_parameter_of_its_notebook(nb):
    """One declaration: a value a profile sets that the notebook does not take (05's data_source once) could never
    be given with -p; `kdnb run 05_self_distillation --profile smoke -p data_source sample` must be accepted."""
    names = set(profiles.notebook_parameters(nb))
    for profile, values in study.module(nb).PROFILES.items():
        assert set(values) <= names, (profile, sorted(set(values) - names))


def test_kdnb_run_accepts_data_source_for_05(tmp_path):
    from kdnb import runner

    _, given, resolved, _ = runner.plan("05_self_distillation", {"profile": "smoke", "data_source": "sample"}, tmp_path)
    assert given["data_source"] == resolved["data_source"] == "sample"


def test_setup_prints_the_set_parameters_then_what_the_study_adds(capsys):
    ns = dict(_notebook_defaults("01_mnist_unseen_classes"), output_dir=None, data_dir=None)
    params, _, _ = study.setup("01_mnist_unseen_classes", ns)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(study.set_values(params))
    assert lines[1:] == study.module("01_mnist_unseen_classes").describe(params).splitlines()
    assert lines[1].strip().startswith(params["variants"][0] + ":")
