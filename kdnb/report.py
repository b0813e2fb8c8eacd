"""results/README.md, results/summary.csv and results/figures/<study>.png, generated from papers/ claims
and run records — never typed.

One row per (claim, profile that produced values for it). Numeric claims are judged here: the mean
over seeds (elementwise for lists) against the reported value within the card's tolerance.
Qualitative claims carry the verdict their notebook computed. Smoke runs are pipeline checks and are
never reported. The figure of a study shows, per numeric claim, the reported value(s) beside the
reproduced mean ± std of every profile; every number in README.md links the executed notebooks behind it.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np

from . import papers, runs

PROFILE_ORDER = {"full": 0, "reduced": 1}


def load_runs(results: Path = runs.RESULTS) -> list[dict]:
    out = []
    for path in sorted(results.glob("*/*/run.json")):
        rec = json.loads(path.read_text())
        if rec.get("params", {}).get("profile") == "smoke":
            continue
        rec["_dir"] = path.parent
        out.append(rec)
    return out


def _fmt(v, digits=5) -> str:
    if v is None:
        return "—"
    if isinstance(v, (list, tuple, np.ndarray)):
        return "[" + ", ".join(_fmt(x, digits) for x in v) + "]"
    return f"{v:.{digits}f}".rstrip("0").rstrip(".") if isinstance(v, float) else str(v)


def _aggregate(values: list):
    arr = np.asarray(values, dtype=float)
    mean = arr.mean(axis=0)
    std = arr.std(axis=0, ddof=1) if len(arr) > 1 else None
    return mean, std


def rows(results: Path = runs.RESULTS) -> list[dict]:
    records = load_runs(results)
    table = []
    for card in papers.all_cards():
        nb = card["notebook"]
        for claim in card["claims"]:
            by_profile: dict[str, list] = {}
            for rec in records:
                if rec["notebook"] == nb and claim["id"] in rec.get("claims", {}):
                    by_profile.setdefault(rec["params"]["profile"], []).append(rec)
            base = {"study": nb, "claim": claim["id"], "statement": claim["claim"], "metric": claim["metric"],
                    "reported": claim.get("reported")}
            if not by_profile:
                reason = claim.get("offline")
                table.append(dict(base, profile="—", reproduced=None, std=None, seeds=0, diff=None,
                                  verdict="not runnable offline" if reason else "not run yet", note=reason or "",
                                  runs=[]))
                continue
            for profile in sorted(by_profile, key=lambda p: PROFILE_ORDER.get(p, 9)):
                recs = by_profile[profile]
                entries = [r["claims"][claim["id"]] for r in recs]
                values = _values_once_per_seed(entries)
                mean, std = _aggregate(values) if values else (None, None)
                reported, diff = claim.get("reported"), None
                verdicts = {e["verdict"] for e in entries if e.get("verdict")}
                notes = "; ".join(sorted({e["note"] for e in entries if e.get("note")}))
                if verdicts:
                    verdict = "/".join(sorted(verdicts))
                elif reported is None:
                    verdict = "no reported number"
                elif mean is not None:
                    diff = np.asarray(mean) - np.asarray(reported, dtype=float)
                    ok = float(np.max(np.abs(diff))) <= float(claim.get("tolerance", 0.0)) + 1e-12
                    verdict = "reproduced" if ok else "not reproduced"
                else:
                    verdict = "no values"
                table.append(dict(base, profile=profile, reproduced=_tolist(mean), std=_tolist(std),
                                  seeds=len(values), diff=_tolist(diff), verdict=verdict, note=notes,
                                  runs=[str(r["_dir"].relative_to(results)) for r in recs]))
    return table


def _values_once_per_seed(entries: list[dict]) -> list:
    """All values of a claim, each seed counted once: two runs that share a seed (a 3-seed run and a grid's
    seed 0 of the same configuration) computed the same thing and must not weigh twice."""
    values, seen = [], set()
    for e in entries:
        seeds = e.get("seeds") or [None] * len(e["values"])
        for seed, v in zip(seeds, e["values"]):
            if seed is None or seed not in seen:
                values.append(v)
                seen.add(seed)
    return values


def _tolist(x):
    if x is None:
        return None
    x = np.asarray(x)
    return x.tolist() if x.ndim else float(x)


def _cell(row) -> str:
    if row["reproduced"] is None:
        return "—"
    s = _fmt(row["reproduced"])
    if row["std"] is not None:
        s += " ± " + _fmt(row["std"])
    return s + f" (n={row['seeds']})"


def _diff(row) -> str:
    d = row["diff"]
    if d is None:
        return "—"
    return _fmt(float(np.max(np.abs(d))) if isinstance(d, list) else d) + (" (max abs)" if isinstance(d, list) else "")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _numeric(v) -> bool:
    """A number or a non-empty flat list of numbers."""
    if isinstance(v, list):
        return bool(v) and all(_is_number(x) for x in v)
    return _is_number(v)


def plotted(table: list[dict], study: str) -> list[dict]:
    """Rows of a study that its figure shows: a numeric reported value and a reproduced one of the same shape."""
    return [r for r in table if r["study"] == study and _numeric(r["reported"]) and _numeric(r["reproduced"])
            and isinstance(r["reported"], list) == isinstance(r["reproduced"], list)
            and (not isinstance(r["reported"], list) or len(r["reported"]) == len(r["reproduced"]))]


def figure_path(study: str) -> str:
    return f"figures/{study}.png"


def render_figure(table: list[dict], study: str):
    """Reported vs reproduced, one panel per numeric claim (x = element of a list claim, e.g. the step)."""
    from matplotlib.figure import Figure

    shown = plotted(table, study)
    claims = list(dict.fromkeys(r["claim"] for r in shown))
    cols = min(3, len(claims))
    nrows = math.ceil(len(claims) / cols)
    fig = Figure(figsize=(4.6 * cols, 3.4 * nrows))
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax in axes[len(claims):]:
        ax.set_visible(False)
    for ax, claim_id in zip(axes, claims):
        rows_ = [r for r in shown if r["claim"] == claim_id]
        reported = np.atleast_1d(np.asarray(rows_[0]["reported"], dtype=float))
        scalar = not isinstance(rows_[0]["reported"], list)
        x = np.arange(len(reported))
        ax.plot(x, reported, "kx" if scalar else "kx--", ms=9, mew=2, lw=1, label="reported", zorder=5)
        for i, r in enumerate(rows_):
            mean = np.atleast_1d(np.asarray(r["reproduced"], dtype=float))
            std = np.atleast_1d(np.asarray(r["std"], dtype=float)) if r["std"] is not None else np.zeros_like(mean)
            at = np.array([i + 1.0]) if scalar else x + 0.08 * (i + 1)  # scalars: one column per profile
            ax.errorbar(at, mean, yerr=std, fmt="o" if scalar else "o-", ms=4, capsize=3,
                        label=f"{r['profile']} (n={r['seeds']}): {r['verdict']}")
        ax.set_title(claim_id, fontsize=10, loc="left")
        if scalar:
            ax.set_xticks(range(len(rows_) + 1), ["reported"] + [r["profile"] for r in rows_])
            ax.set_xlim(-0.5, len(rows_) + 0.5)
        else:
            ax.set_xticks(x, [str(i + 1) for i in x])
            ax.set_xlabel("element (step)")
        ax.legend(fontsize=7)
    fig.suptitle(f"{study}: reported vs reproduced (mean ± std over seeds)", fontsize=11)
    fig.tight_layout()
    return fig


def _verdict(row) -> str:
    if row["verdict"] == "not runnable offline" and row["note"]:
        return f"not runnable offline ({row['note']})"
    return row["verdict"] + (f" — {row['note']}" if row["note"] else "")


def render_markdown(table: list[dict]) -> str:
    out = io.StringIO()
    out.write("# Reported vs reproduced\n\n")
    out.write("Generated by `kdnb report` from `papers/*.yaml` and every `results/*/*/run.json` — do not edit by hand.\n")
    out.write("Smoke runs are pipeline checks and are not listed. Reproduced values: mean ± std over seeds "
              "(elementwise for lists); verdicts of numeric claims use the tolerance in the claim's card.\n\n")
    for study in sorted({r["study"] for r in table}):
        card = papers.load(study)
        out.write(f"## {study}\n\n{card['title']} — source {card['source']['repository']}\n\n")
        out.write("| claim | metric | reported | profile | reproduced | diff | verdict | runs |\n|---|---|---|---|---|---|---|---|\n")
        for r in (r for r in table if r["study"] == study):
            links = ", ".join(f"[{Path(p).name}]({p}/notebook.ipynb)" for p in r["runs"]) or "—"
            out.write(f"| **{r['claim']}** {r['statement']} | {r['metric']} | {_fmt(r['reported'])} | {r['profile']} | "
                      f"{_cell(r)} | {_diff(r)} | {_verdict(r)} | {links} |\n")
        out.write("\n")
        if plotted(table, study):
            out.write(f"![{study}: reported vs reproduced]({figure_path(study)})\n\n")
    return out.getvalue()


def write_figures(table: list[dict], results: Path = runs.RESULTS) -> list[Path]:
    """results/figures/<study>.png for every study with a plottable row (none without non-smoke runs);
    figures of studies that no longer have one are removed."""
    written = []
    for study in sorted({r["study"] for r in table}):
        if plotted(table, study):
            written.append(runs.atomic_save_figure(render_figure(table, study), results / figure_path(study)))
    for stale in sorted((results / "figures").glob("*.png")) if (results / "figures").is_dir() else []:
        if stale not in written:
            stale.unlink()
    return written


def write(results: Path = runs.RESULTS) -> tuple[Path, Path]:
    table = rows(results)
    write_figures(table, results)
    md = runs.atomic_write_text(results / "README.md", render_markdown(table))
    buf = io.StringIO()
    fields = ["study", "claim", "profile", "reported", "reproduced", "std", "seeds", "diff", "verdict", "note", "runs"]
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for r in table:
        w.writerow({k: json.dumps(r[k]) if isinstance(r[k], list) else r[k] for k in fields})
    csv_path = runs.atomic_write_text(results / "summary.csv", buf.getvalue())
    return md, csv_path
