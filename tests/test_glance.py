"""Every notebook opens on the committed evidence ("Results at a glance"), and what it shows is the report's numbers."""
import csv
import json

import nbformat
import pytest

from conftest import REPO
from kdnb import glance, report, runs

NOTEBOOKS = sorted(p.stem for p in (REPO / "notebooks").glob("[0-9]*.ipynb"))


def _summary(study: str) -> list[dict]:
    with open(REPO / "results" / "summary.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r["study"] == study]


def _as_csv(v) -> str:
    return "" if v is None else json.dumps(v) if isinstance(v, list) else str(v)


@pytest.mark.parametrize("nb", NOTEBOOKS)
def test_glance_rows_are_the_committed_report(nb):
    """The glance table and results/summary.csv come from the same rows: a run record committed without `kdnb report`
    (or a report edited by hand) fails here."""
    ours = glance.rows(nb)
    committed = _summary(nb)
    assert len(ours) == len(committed)
    for r, c in zip(ours, committed):
        for key in ("claim", "profile", "reported", "tolerance", "reproduced", "ci95", "seeds", "verdict", "runs"):
            assert _as_csv(r[key]) == c[key], (nb, r["claim"], key)


@pytest.mark.parametrize("nb", NOTEBOOKS)
def test_notebook_opens_on_the_glance_section_as_it_is_now(nb):
    cells = nbformat.read(REPO / "notebooks" / f"{nb}.ipynb", as_version=4).cells
    code = [i for i, c in enumerate(cells) if c.cell_type == "code"]
    setup = code[1]  # after the parameters cell
    heading, shown = cells[setup + 1], cells[setup + 2]
    assert heading.cell_type == "markdown" and heading.source.startswith("## Results at a glance")
    assert f'glance.show("{nb}")' in shown.source
    texts = [o["data"]["text/markdown"] for o in shown.outputs if "text/markdown" in o.get("data", {})]
    assert texts == [glance.markdown(nb)], "the committed glance output differs from the records: re-execute the notebook"
    has_figure = (REPO / "results" / report.figure_path(nb)).is_file()
    assert any("image/png" in o.get("data", {}) for o in shown.outputs) == has_figure


def test_every_study_with_non_smoke_runs_names_them():
    for nb in NOTEBOOKS:
        rels = {p for r in glance.rows(nb) for p in r["runs"]}
        text = glance.markdown(nb)
        for rel in rels:
            assert f"[{rel.split('/')[-1]}](../results/{rel}/notebook.ipynb)" in text
            assert (REPO / "results" / rel / "notebook.ipynb").is_file()
        if not rels:
            assert "no committed run" in text


def test_studies_without_offline_evidence_say_what_would_produce_it():
    for nb in ("02_voc_segmentation_kd", "04_emnist_mlp_student"):
        text = glance.markdown(nb)
        assert "**Not runnable here**" in text and "kdnb run" in text or "make reproduce" in text


def test_glance_reads_another_results_root(tmp_path):
    """Nothing is trained and nothing outside the given root is read."""
    (tmp_path / "results").mkdir()
    text = glance.markdown("05_self_distillation", tmp_path / "results")
    assert "no committed run" in text and "| **E1**" in text


def test_03_conclusion_numbers_come_from_the_records():
    from kdnb import dml_calibration as dc

    from kdnb import profiles

    text = dc.evidence_markdown("reduced")
    reduced = [r for r in report.load_runs(runs.RESULTS) if r["notebook"] == "03_dml_kd_calibration"
               and r["params"]["profile"] == "reduced"]
    recs = [r for r in reduced if profiles.trained_profile(r["params"], "03_dml_kd_calibration", "reduced")]
    # records of the configuration `reduced` had before it grew (issue 16) are not the conclusion's evidence
    assert not any(r["_dir"].name in text for r in reduced if r not in recs)
    if not recs:
        assert text.startswith("No committed `reduced` run")
        return
    assert all(r["_dir"].name in text for r in recs)
    base = [next(s for s in json.loads((r["_dir"] / "metrics.json").read_text())["metrics"]["summary"]
                 if s["run"] == "baseline")["final_acc"] for r in recs]
    assert f"| baseline | {sum(base) / len(base):.4f}" in text
