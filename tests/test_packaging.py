"""The repository's shape: what DEVELOPERS.md promises a researcher on a fresh clone."""
import re
import tomllib

import yaml

from conftest import REPO


def _names(reqs):
    return {re.split(r"[\s<>=!\[;]", r)[0].lower().replace("_", "-") for r in reqs}


def _lock() -> dict:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"requirements.lock: {line!r} is not an exact pin"
            pins[name.lower().replace("_", "-")] = version
    return pins


def _version(v: str) -> tuple:
    return tuple(int(x) for x in re.match(r"[\d.]+", v).group(0).rstrip(".").split("."))


def test_lock_pins_every_dependency_exactly_within_the_caps():
    deps = _names(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"])
    pins = _lock()
    assert deps <= set(pins), f"not pinned in requirements.lock: {sorted(deps - set(pins))}"
    # what decides numbers and notebook outputs, indirect ones included
    assert {"nbclient", "jupyter-client", "ipykernel", "pillow", "nbformat"} <= set(pins)
    # some of our machines' pip configuration caps torch at 2.14.1 and torchvision at 0.29.1: the lock must install there
    assert _version(pins["torch"]) <= (2, 14, 1) and _version(pins["torchvision"]) <= (0, 29, 1)


def test_environment_yml_and_makefile_install_from_the_lock():
    env = yaml.safe_load((REPO / "environment.yml").read_text())["dependencies"]
    pip = next(d["pip"] for d in env if isinstance(d, dict))
    assert "-r requirements.lock" in pip
    assert not [d for d in env if isinstance(d, str) and d.split("=")[0] not in ("python", "pip")]
    make = (REPO / "Makefile").read_text()
    assert "pip install -q -r requirements.lock" in make and "--no-deps -e ." in make


def test_run_records_carry_the_lock_hash():
    import hashlib

    from kdnb import runs

    assert runs.environment()["lock_sha256"] == hashlib.sha256((REPO / "requirements.lock").read_bytes()).hexdigest()[:16]


def test_top_level_layout():
    expected = {"notebooks", "kdnb", "papers", "results", "environment.yml", "tests", "README.md",
                "pyproject.toml", "Makefile", ".ci", "benchmarks", "requirements.lock", "CONTRIBUTING.md"}
    present = {p.name for p in REPO.iterdir() if not p.name.startswith(".") or p.name == ".ci"}
    present = {p for p in present if not p.endswith(".egg-info")} - {"__pycache__", "data"}
    assert expected <= present and present - expected == set(), present - expected


def test_every_notebook_has_a_parameters_cell_a_doc_cell_and_a_card():
    import nbformat

    for nb_path in sorted((REPO / "notebooks").glob("[0-9]*.ipynb")):
        nb = nbformat.read(nb_path, as_version=4)
        assert nb.cells[0].cell_type == "markdown" and "parameter" in nb.cells[0].source.lower()
        tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, nb_path.name
        assert (REPO / "papers" / f"{nb_path.stem}.yaml").is_file(), f"papers card missing for {nb_path.stem}"
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert sum(bool(c.outputs) for c in code) >= len(code) // 2, f"{nb_path.name} is not committed executed"


def test_cards_have_claims_as_data():
    for card_path in sorted((REPO / "papers").glob("*.yaml")):
        card = yaml.safe_load(card_path.read_text())
        assert card["notebook"] == card_path.stem and "@" in card["citation"]
        assert card["source"]["repository"].startswith("https://github.com/")
        ids = [c["id"] for c in card["claims"]]
        assert len(ids) == len(set(ids))
        for c in card["claims"]:
            assert {"id", "claim", "metric", "reported", "conditions"} <= set(c), c["id"]
            if c["reported"] is not None:
                assert "tolerance" in c, c["id"]
        assert all({"id", "quirk", "faithful", "corrected"} <= set(q) for q in card["quirks"])
