"""The report and the sweep summary read at a glance (issue 15, items 5, 7, 8, 9)."""
import json

import pytest

from kdnb import papers, report, sweep
from kdnb import unseen_classes as uc


def _record(folder, notebook, profile, claims, **extra):
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"notebook": notebook, "params": {"profile": profile},
                                                 "claims": claims, **extra}))


def test_report_finds_records_anywhere_under_the_results_root(tmp_path):
    """`papermill ... -p output_dir results/mine/x`: the record is evidence wherever its folder is; a copy counts once."""
    e3 = papers.reported("05_self_distillation", "E3")
    claims = {"E3": {"values": [e3]}}
    _record(tmp_path / "mine" / "deeper" / "reduced-x", "05_self_distillation", "reduced", claims, run_id="reduced-x",
            finished="2026-01-01T00:00:00")
    _record(tmp_path / "05_self_distillation" / "reduced-x", "05_self_distillation", "reduced", claims,
            run_id="reduced-x", finished="2026-01-01T00:00:00")
    _record(tmp_path / "mine" / ".ipynb_checkpoints" / "reduced-y", "05_self_distillation", "reduced", claims)
    row = next(r for r in report.rows(tmp_path) if r["claim"] == "E3")
    assert row["verdict"] == "reproduced" and row["runs"] == ["05_self_distillation/reduced-x"]
    (tmp_path / "05_self_distillation" / "reduced-x" / "run.json").unlink()
    assert next(r for r in report.rows(tmp_path) if r["claim"] == "E3")["runs"] == ["mine/deeper/reduced-x"]


def test_readme_shows_values_at_the_cards_precision():
    assert report.precision(0.20412) == 5 and report.precision([98.64, 96.0]) == 2 and report.precision(98) == 0
    assert report.precision("supported") is None
    row = {"reported": 97.78, "reproduced": 97.573333, "ci95": 0.169093, "seeds": 3, "diff": -0.206667}
    assert report.readme_cell(row) == "97.57 ± 0.17 (n=3)" and report._diff(row) == "-0.21"
    lst = {"reported": [98.64, 96.01], "reproduced": [98.08667, 96.43333], "ci95": [0.5, 1.25], "seeds": 3}
    assert report.readme_cell(lst) == "[98.09 ± 0.5, 96.43 ± 1.25] (n=3)"
    assert report.readme_cell(dict(row, reported=98, reproduced=100.0, ci95=None, seeds=1)) == "100 (n=1)"
    assert report.cell(row) == "97.57333 ± 0.16909 (n=3)"  # the glance section's cell is unchanged


def test_a2_notes_name_their_configuration():
    """A2-kd's and A2-ce's corrected means coincide in the full run: each note must say which cell it is."""
    full = dict(uc.PROFILES["full"], profile="full", kept_classes=list(range(10)))
    rows = []
    for variant in ("faithful", "corrected"):
        for w in (0.9, 0.0):
            rows.append({"variant": variant, "cell": uc.cell_name({"temperature": 2.5, "soft_weight": w, "lr": 0.01}),
                         "temperature": 2.5, "soft_weight": w, "lr": 0.01, "seed": 0, "flags": dict(uc.VARIANTS[variant]),
                         "per_class": [97.79] * 10, "mean": 97.79})
    values = uc.claim_values(full, rows)
    assert values["A2-kd"]["note"] == "corrected variant of T=2.5 w=0.9 lr=0.01, mean of seeds [0]: 97.79"
    assert values["A2-ce"]["note"] == "corrected variant of T=2.5 w=0 lr=0.01, mean of seeds [0]: 97.79"


def test_figure_axes_say_what_they_are(tmp_path):
    a1 = papers.reported("01_mnist_unseen_classes", "A1")
    e3 = papers.reported("05_self_distillation", "E3")
    assert report.element_axis("01_mnist_unseen_classes", "A1", len(a1)) == ("digit", ["6", "7", "8", "9"])
    assert report.element_axis("01_mnist_unseen_classes", "A1", 3) == ("element", ["1", "2", "3"])
    lo, hi = report.scalar_ylim(e3, 5e-4, [e3 + 1e-5])
    assert hi - lo >= 4 * 5e-4 and lo < e3 - 5e-4 and hi > e3 + 5e-4  # the whole band, not a 1e-4 zoom
    _record(tmp_path / "01_mnist_unseen_classes" / "full-a", "01_mnist_unseen_classes", "full",
            {"A1": {"values": [a1]}, "A2-kd": {"values": [98.9]}})
    fig = report.render_figure(report.rows(tmp_path), "01_mnist_unseen_classes")
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert axes[0].get_xlabel() == "digit" and [t.get_text() for t in axes[0].get_xticklabels()] == ["6", "7", "8", "9"]
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # constrained layout: the suptitle sits above every panel title
    renderer = canvas.get_renderer()
    titles = [t for ax in axes for t in ax.get_children() if isinstance(t, Text) and t.get_text() in ("A1", "A2-kd")]
    assert len(titles) == 2
    assert fig._suptitle.get_window_extent(renderer).y0 >= max(t.get_window_extent(renderer).y1 for t in titles)


def test_sweep_summary_has_each_studys_headline_metrics():
    """A grid over lr changes 05's ResNet accuracy, which the summary did not show (only the constant claim:E3)."""
    rec = {"notebook": "05_self_distillation", "claims": {"E3": {"values": [0.2041]}},
           "metrics": {"resnet": [{"variant": "corrected", "alpha": 0.6, "step": 2, "final_acc_mean": 0.518},
                                  {"variant": "faithful", "alpha": 0.0, "step": 0, "final_acc_mean": 0.473}]}}
    got = sweep.numeric_scalars(rec)
    assert got["final_acc[corrected, alpha=0.6, step=2]"] == pytest.approx(0.518)
    assert got["final_acc[faithful, alpha=0, step=0]"] == pytest.approx(0.473) and "claim:E3" in got
    dml = {"notebook": "03_dml_kd_calibration",
           "metrics": {"summary": [{"run": "kd", "final_acc": 0.7, "ece": 0.05}]}}
    assert sweep.numeric_scalars(dml) == {"final_acc[kd]": 0.7, "ece[kd]": 0.05}
    voc = {"notebook": "02_voc_segmentation_kd",
           "metrics": {"results": [{"variant": "faithful", "student": "plain", "seed": s, "test": {"miou": m}}
                                   for s, m in ((0, 0.2), (1, 0.4))]}}
    assert sweep.numeric_scalars(voc) == {"miou[faithful, plain]": pytest.approx(0.3)}
