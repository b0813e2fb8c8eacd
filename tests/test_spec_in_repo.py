"""The specification lives in the repository: each study's spec is papers/<notebook>.md, and what the code and the
notebooks cite of it (sections, quirk ids) exists there. File reading only."""
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAPERS = REPO / "papers"
# study letter -> notebook; the letter of a quirk id (A-Q1) or section (§A.8) names the study
STUDY = {"A": "01_mnist_unseen_classes", "B": "02_voc_segmentation_kd", "C": "03_dml_kd_calibration",
         "D": "04_emnist_mlp_student", "E": "05_self_distillation"}
OUTSIDE_SPEC = "STUDIES" + ".md"  # the document that lived outside the repository (spelt so this file does not match)
QUIRK = re.compile(r"\b[A-E]-Q\d+\b")
SECTION_REF = re.compile(r"papers/([\w.-]+?\.md)`?\s*§\s*([0A-H](?:\.\d+)*)")
DOC_REF = re.compile(r"papers/([\w.-]+?\.md)\b")


def _files(*roots: str, suffixes=None):
    for root in roots:
        path = REPO / root
        for p in sorted([path] if path.is_file() else path.rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts and ".ipynb_checkpoints" not in p.parts \
                    and (suffixes is None or p.suffix in suffixes) and p.name != Path(__file__).name:
                yield p


def _notebook_sources(path: Path) -> str:
    return "\n".join("".join(c.get("source", "")) for c in json.loads(path.read_text())["cells"])


def _cited_text():
    """(path, text) of every kdnb module and every notebook's cell sources."""
    for p in _files("kdnb", suffixes={".py"}):
        yield p, p.read_text()
    for p in _files("notebooks", suffixes={".ipynb"}):
        yield p, _notebook_sources(p)


def _doc(letter: str) -> str:
    return (PAPERS / f"{STUDY[letter]}.md").read_text()


def _defined_quirks(letter: str) -> set[str]:
    """Quirk ids a study doc defines: the first cell of a row of its quirk table."""
    return set(re.findall(rf"^\| ({letter}-Q\d+) \|", _doc(letter), re.M))


def _has_heading(doc: str, section: str) -> bool:
    return re.search(rf"^#+ {re.escape(section)}[. ]", doc, re.M) is not None


def test_every_study_has_its_spec_named_after_its_notebook():
    for letter, nb in STUDY.items():
        assert (REPO / "notebooks" / f"{nb}.ipynb").is_file(), nb
        doc = _doc(letter)
        assert _has_heading(doc, letter), f"papers/{nb}.md has no '## {letter}.' heading"
        assert "## Loss weights" in doc, f"papers/{nb}.md lacks the glossary of the loss weights' names"
    assert (PAPERS / "README.md").is_file()


def test_nothing_cites_the_outside_spec():
    # kdnb and the notebooks (sources and outputs alike: the raw files), and everything else that cites the spec
    roots = ("kdnb", "notebooks", "tests", "benchmarks", "papers", "README.md")
    hits = [str(p.relative_to(REPO)) for p in _files(*roots) if OUTSIDE_SPEC.encode() in p.read_bytes()]
    assert not hits, f"{OUTSIDE_SPEC} is not in the repository; cite papers/<notebook>.md instead: {hits}"


def test_every_cited_quirk_id_is_defined_in_its_study_doc():
    defined = {letter: _defined_quirks(letter) for letter in STUDY}
    missing = sorted({(q, str(p.relative_to(REPO))) for p, text in _cited_text() for q in QUIRK.findall(text)
                      if q not in defined[q[0]]})
    assert not missing, f"quirk ids cited but not defined in papers/<notebook>.md: {missing}"


@pytest.mark.parametrize("letter", sorted(STUDY))
def test_the_claim_cards_quirks_are_the_study_docs(letter):
    card = (PAPERS / f"{STUDY[letter]}.yaml").read_text()
    in_card = set(re.findall(rf"^\s*- id: ({letter}-Q\d+)\s*$", card, re.M))
    assert in_card, f"papers/{STUDY[letter]}.yaml lists no quirks"
    assert in_card <= _defined_quirks(letter), sorted(in_card - _defined_quirks(letter))


def test_every_cited_section_exists():
    roots = ("kdnb", "notebooks", "tests", "benchmarks", "README.md")
    texts = list(_cited_text()) + [(p, p.read_text()) for p in _files(*roots, suffixes={".py", ".md"})
                                   if not p.is_relative_to(REPO / "kdnb")]
    texts += [(p, p.read_text()) for p in _files("papers", suffixes={".yaml"})]
    bad = []
    for p, text in texts:
        where = str(p.relative_to(REPO))
        for name in DOC_REF.findall(text):
            if not (PAPERS / name).is_file():
                bad.append((where, f"papers/{name}", "no such file"))
        for name, section in SECTION_REF.findall(text):
            doc = PAPERS / name
            if doc.is_file() and not _has_heading(doc.read_text(), section):
                bad.append((where, f"papers/{name} §{section}", "no heading with that number"))
    assert not bad, bad
    # the references this checks are really there
    assert any(SECTION_REF.search(text) for _, text in _cited_text())


def test_section_references_name_their_own_study():
    """papers/01_mnist_unseen_classes.md §B.3 would be a slip: a study's sections are in its own doc."""
    by_doc = {f"{nb}.md": letter for letter, nb in STUDY.items()}
    wrong = [(str(p.relative_to(REPO)), name, section) for p, text in _cited_text()
             for name, section in SECTION_REF.findall(text) if name in by_doc and section[0] != by_doc[name]]
    assert not wrong, wrong


@pytest.mark.parametrize("letter", sorted(STUDY))
def test_glossary_names_are_the_notebooks_parameters(letter):
    doc = _doc(letter)
    table = doc.split("## Loss weights", 1)[1].split("\n## ", 1)[0]
    names = [re.findall(r"`(\w+)`", row.split("|")[1]) for row in table.splitlines()
             if row.startswith("| `")]
    nb = REPO / "notebooks" / f"{STUDY[letter]}.ipynb"
    cell = next(c for c in json.loads(nb.read_text())["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    params = set(re.findall(r"^(\w+)\s*[:=]", "".join(cell["source"]), re.M))
    flat = [n for row in names for n in row]
    assert flat and set(flat) <= params, sorted(set(flat) - params)
