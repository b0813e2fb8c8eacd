"""The "Results at a glance" section every notebook opens with: the committed evidence, read from results/ only.

It shows the study's rows of `report.rows()` - the same numbers, verdicts and formatting as results/README.md and
results/summary.csv - with the runs they come from (profile, seeds, commit, date, a link to the executed notebook)
and the study's figure from results/figures/. It trains nothing, so nbval regenerates it exactly; after new run
records are committed, `kdnb report` and re-executing the notebooks bring both up to date.
"""
from __future__ import annotations

import json
from pathlib import Path

from . import papers, report, runs


def rows(notebook: str, results: Path = runs.RESULTS) -> list[dict]:
    return [r for r in report.rows(results) if r["study"] == notebook]


def _link(rel: str, results: Path) -> str:
    # notebooks live in notebooks/, the records in results/: a link that works on GitHub and in Jupyter
    return f"[{Path(rel).name}](../{results.name}/{rel}/notebook.ipynb)"


def _evidence(rels: list[str], results: Path) -> list[str]:
    out = []
    for rel in rels:
        rec = json.loads((results / rel / "run.json").read_text())
        env = rec.get("environment", {})
        seeds = rec["params"].get("seeds", rec["params"].get("seed"))
        commit = (env.get("git_commit") or "?")[:12]
        out.append(f"- {_link(rel, results)}: profile `{rec['params'].get('profile')}`, seeds {seeds}, "
                   f"commit `{commit}`, finished {str(rec.get('finished', '?'))[:10]}, "
                   f"{env.get('device', 'cpu')}, torch {env.get('torch', '?')}")
    return out


def markdown(notebook: str, results: Path = runs.RESULTS) -> str:
    """The section's text: the claims table, the runs behind it, and what would produce missing evidence."""
    table = rows(notebook, results)
    card = papers.load(notebook)
    lines = [f"As committed in `results/` (generated from the run records, the same numbers as "
             f"`results/README.md`; this execution's own results, whatever its profile, are in the sections below). "
             f"Ours: mean ± 95 % t-interval over seeds, n = seeds.", "",
             "| claim | reported | ours | tolerance | profile | verdict | runs |", "|---|---|---|---|---|---|---|"]
    for r in table:
        links = ", ".join(_link(p, results) for p in r["runs"]) or "—"
        verdict = r["verdict"] + (f" ({r['note']})" if r["note"] and r["verdict"] != "not runnable offline" else "")
        lines.append(f"| **{r['claim']}** {r['statement']} | {report._fmt(r['reported'])} | {report.cell(r)} | "
                     f"{report._fmt(r['tolerance'])} | {r['profile']} | {verdict} | {links} |")
    evidence = sorted({p for r in table for p in r["runs"]})
    lines += ["", f"**Evidence** ({len(evidence)} run{'s' if len(evidence) != 1 else ''}):" if evidence else
              "**Evidence:** no committed run speaks to these claims yet."]
    lines += _evidence(evidence, results)
    offline: dict[str, list[str]] = {}  # reason -> the claims it holds back, each reason said once
    for r in table:
        if r["verdict"] == "not runnable offline":
            offline.setdefault(r["note"] or "not runnable offline", []).append(r["claim"])
    if offline:
        lines += ["", "**Not runnable here**, and what would produce it:"]
        lines += [f"- {', '.join(ids)}: {reason}" for reason, ids in offline.items()]
    if not (results / report.figure_path(notebook)).is_file():
        lines += ["", f"No figure in `results/figures/`: no claim of {card['notebook']} has both a reported number "
                      f"and a reproduced one of the same shape."]
    return "\n".join(lines)


def show(notebook: str, results: Path = runs.RESULTS) -> None:
    """Display the section in Jupyter (markdown table, then the study's figure)."""
    from IPython.display import Image, Markdown, display

    display(Markdown(markdown(notebook, results)))
    figure = results / report.figure_path(notebook)
    if figure.is_file():
        display(Image(filename=str(figure)))
