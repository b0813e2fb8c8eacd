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

from . import attribution, papers, profiles, runs
from .metrics import ci95_halfwidth  # noqa: F401 (report.ci95_halfwidth: the rows' intervals)

PROFILE_ORDER = {"full": 0, "reduced": 1}
# a verdict of a seed-dependent claim rests on at least this many seeds; fewer is "inconclusive" (DEVELOPERS.md)
MIN_SEEDS = 3


def _seeded(entries: list[dict]) -> bool:
    """Whether a claim's values vary with the seed (its runs name seeds); exact results (KRR) do not."""
    return any(e.get("seeds") for e in entries)


def load_runs(results: Path = runs.RESULTS) -> list[dict]:
    """Every run record under the results root, at any depth (`papermill -p output_dir results/mine/x` puts one
    wherever the user says); a copy of a record already found (same notebook, run id and finish time) counts once."""
    out, seen = [], set()
    for path in sorted(results.rglob("run.json")):
        if any(part.startswith(".") for part in path.relative_to(results).parts):
            continue  # .ipynb_checkpoints and the like hold no records
        rec = json.loads(path.read_text())
        key = (rec.get("notebook"), rec.get("run_id") or path.parent.name, rec.get("finished"))
        if rec.get("params", {}).get("profile") == "smoke" or key in seen:
            continue
        seen.add(key)
        rec["_dir"] = path.parent
        out.append(rec)
    return out


def _fmt(v, digits=5) -> str:
    if v is None:
        return "—"
    if isinstance(v, (list, tuple, np.ndarray)):
        return "[" + ", ".join(_fmt(x, digits) for x in v) + "]"
    if not isinstance(v, float):
        return str(v)
    s = f"{v:.{digits}f}"
    return s.rstrip("0").rstrip(".") if "." in s else s  # digits=0: '100' keeps its zeros


def precision(reported) -> int | None:
    """Decimals the card wrote its reported value with (0.20412 -> 5, [98.64, 96.01] -> 2, 98 -> 0); None when
    it has no number. Our values are shown to that precision: more digits than the source printed mean nothing."""
    from decimal import Decimal

    nums = [v for v in (reported if isinstance(reported, list) else [reported]) if _is_number(v)]
    if not nums:
        return None
    return max(max(0, -Decimal(repr(v)).as_tuple().exponent) for v in nums)


def readme_cell(row) -> str:
    """Our value as README.md shows it: at the card's precision, each element with its own interval."""
    if row["reproduced"] is None:
        return "—"
    digits = precision(row["reported"])
    digits = 5 if digits is None else digits
    value, ci = row["reproduced"], row.get("ci95")
    if isinstance(value, list):
        parts = [_fmt(v, digits) + ("" if ci is None else f" ± {_fmt(c, digits)}") for v, c in
                 zip(value, ci if ci is not None else value)]
        s = "[" + ", ".join(parts) + "]"
    else:
        s = _fmt(value, digits) + ("" if ci is None else f" ± {_fmt(ci, digits)}")
    return s + _n(row)


def _n(row) -> str:
    """' (n=5)', or ' (exact)' for a seedless computation (05's KRR): one value, no seed to vary."""
    return " (exact)" if row.get("exact") else f" (n={row['seeds']})"


def _aggregate(values: list):
    arr = np.asarray(values, dtype=float)
    mean = arr.mean(axis=0)
    std = arr.std(axis=0, ddof=1) if len(arr) > 1 else None
    return mean, std


def rows(results: Path = runs.RESULTS, records: list[dict] | None = None) -> list[dict]:
    records = load_runs(results) if records is None else records
    table = []
    for card in papers.all_cards():
        nb = card["notebook"]
        for claim in card["claims"]:
            by_profile: dict[str, list] = {}
            applies = getattr(profiles.module(nb), "claim_applies", lambda claim, params: True)
            for rec in records:
                if (rec["notebook"] == nb and claim["id"] in rec.get("claims", {})
                        and applies(claim["id"], rec["params"])):
                    by_profile.setdefault(rec["params"]["profile"], []).append(rec)
            base = {"study": nb, "claim": claim["id"], "statement": claim["claim"], "metric": claim["metric"],
                    "reported": claim.get("reported"), "tolerance": claim.get("tolerance")}
            if not by_profile:
                reason = claim.get("offline")
                table.append(dict(base, profile="—", reproduced=None, std=None, ci95=None, seeds=0, diff=None,
                                  verdict="not runnable offline" if reason else "not run yet", note=reason or "",
                                  runs=[]))
                continue
            for profile in sorted(by_profile, key=lambda p: PROFILE_ORDER.get(p, 9)):
                recs = runs.newest_first(by_profile[profile])
                entries = [r["claims"][claim["id"]] for r in recs]
                exact = not _seeded(entries) and all(e["values"] == entries[0]["values"] for e in entries)
                if exact:  # 05's KRR: every run computed the same numbers, which are one value, not n of them
                    recs, entries = recs[:1], entries[:1]
                values, used = _values_once_per_seed(entries)
                entries = [e for e, u in zip(entries, used) if u]  # the records counted, for notes and links
                recs = sorted((r for r, u in zip(recs, used) if u), key=lambda r: str(r["_dir"]))
                mean, std = _aggregate(values) if values else (None, None)
                reported, diff = claim.get("reported"), None
                ci = ci95_halfwidth(std, len(values))
                verdicts = {e["verdict"] for e in entries if e.get("verdict")}
                notes = "; ".join(sorted({e["note"] for e in entries if e.get("note")}))
                if verdicts:
                    verdict = "/".join(sorted(verdicts))
                elif reported is None:
                    verdict = "no reported number"
                elif mean is not None:
                    diff = np.asarray(mean) - np.asarray(reported, dtype=float)
                    verdict = judge(diff, ci, float(claim.get("tolerance", 0.0)))
                else:
                    verdict = "no values"
                if verdict not in ("no reported number", "no values") and _seeded(entries) and len(values) < MIN_SEEDS:
                    said = "this seed says" if len(values) == 1 else "these seeds say"
                    verdict = f"inconclusive (n={len(values)} < {MIN_SEEDS} seeds; {said}: {verdict.split(' (')[0]})"
                table.append(dict(base, profile=profile, reproduced=_tolist(mean), std=_tolist(std),
                                  ci95=_tolist(ci), seeds=len(values), exact=exact,
                                  diff=_tolist(diff), verdict=verdict, note=notes,
                                  runs=[str(r["_dir"].relative_to(results)) for r in recs]))
    return table


def judge(diff, ci, tolerance: float) -> str:
    """The verdict rule (issue 12): *reproduced* when the reported value lies inside our 95 % t-interval widened by
    the card's tolerance (every element of a list claim), *not reproduced* when it lies outside, *inconclusive*
    when the interval is wider than the tolerance itself: then the seeds cannot tell a mean inside the band from one
    outside it. `ci` is the interval's half-width (None for an exact, seedless value or a single seed)."""
    diff = np.abs(np.atleast_1d(np.asarray(diff, dtype=float)))
    if not np.all(np.isfinite(diff)):
        return "no values"
    half = np.zeros_like(diff) if ci is None else np.broadcast_to(np.asarray(ci, dtype=float), diff.shape)
    if not np.all(diff <= tolerance + half + 1e-12):
        return "not reproduced"  # outside even the widened interval: a wide interval cannot rescue it
    if ci is not None and float(np.max(half)) > tolerance + 1e-12:
        return (f"inconclusive (95 % interval ± {float(np.max(half)):.3g} is wider than the tolerance {tolerance:g}: "
                f"the reported value is inside it, but so would be values outside the tolerance)")
    return "reproduced"


def _values_once_per_seed(entries: list[dict]) -> list:
    """All values of a claim, each seed counted once: two runs that share a seed (a 3-seed run and a grid's
    seed 0 of the same configuration) computed the same thing and must not weigh twice (entries newest first).
    Returns the values and, per entry, whether any of its values was counted."""
    values, seen, used = [], set(), []
    for e in entries:
        seeds = e.get("seeds") or [None] * len(e["values"])
        n = len(values)
        for seed, v in zip(seeds, e["values"]):
            if seed is None or seed not in seen:
                values.append(v)
                seen.add(seed)
        used.append(len(values) > n)
    return values, used


def _tolist(x):
    if x is None:
        return None
    x = np.asarray(x)
    return x.tolist() if x.ndim else float(x)


def cell(row) -> str:
    """Our value as README.md and every notebook's glance section show it: mean ± 95 % t-interval half-width, n."""
    if row["reproduced"] is None:
        return "—"
    s = _fmt(row["reproduced"])
    if row.get("ci95") is not None:
        s += " ± " + _fmt(row["ci95"])
    return s + _n(row)


def _diff(row) -> str:
    d = row["diff"]
    if d is None:
        return "—"
    digits = precision(row["reported"])
    digits = 5 if digits is None else digits
    return (_fmt(float(np.max(np.abs(d))) if isinstance(d, list) else d, digits)
            + (" (max abs)" if isinstance(d, list) else ""))


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _numeric(v) -> bool:
    """A number or a non-empty flat list of numbers."""
    if isinstance(v, list):
        return bool(v) and all(_is_number(x) for x in v)
    return _is_number(v)


def plotted(table: list[dict], study: str) -> list[dict]:
    """Rows of a study that its figure shows: a numeric reproduced value, with a reported one of the same shape or
    none at all (a qualitative claim or a stand-in: our numbers are drawn alone and the panel says so)."""
    return [r for r in table if r["study"] == study and _numeric(r["reproduced"])
            and (r["reported"] is None or (_numeric(r["reported"])
                 and isinstance(r["reported"], list) == isinstance(r["reproduced"], list)
                 and (not isinstance(r["reported"], list) or len(r["reported"]) == len(r["reproduced"]))))]


def figure_path(study: str) -> str:
    return f"figures/{study}.png"


def render_figure(table: list[dict], study: str):
    """Reported vs reproduced, one panel per numeric claim (x = element of a list claim, e.g. the step)."""
    from matplotlib.figure import Figure

    shown = plotted(table, study)
    claims = list(dict.fromkeys(r["claim"] for r in shown))
    cols = min(3, len(claims))
    nrows = math.ceil(len(claims) / cols)
    # constrained layout makes room for the suptitle (tight_layout let it overlap the first panel's title)
    fig = Figure(figsize=(4.6 * cols, 3.4 * nrows + 0.4), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax in axes[len(claims):]:
        ax.set_visible(False)
    for ax, claim_id in zip(axes, claims):
        rows_ = [r for r in shown if r["claim"] == claim_id]
        has_reported = rows_[0]["reported"] is not None
        shape = rows_[0]["reported"] if has_reported else rows_[0]["reproduced"]
        scalar = not isinstance(shape, list)
        x = np.arange(len(np.atleast_1d(shape)))
        reported = np.atleast_1d(np.asarray(rows_[0]["reported"], dtype=float)) if has_reported else None
        if has_reported:
            ax.plot(x, reported, "kx" if scalar else "kx--", ms=9, mew=2, lw=1, label="reported", zorder=5)
        tol = rows_[0].get("tolerance") if has_reported else None
        if tol:  # the band a reproduced mean must fall in to count as reproduced
            span = np.array([-0.5, len(rows_) + 0.5]) if scalar else x
            ax.fill_between(span, *(np.broadcast_to(reported, span.shape) + d for d in (-tol, tol)) if scalar else
                            (reported - tol, reported + tol), color="0.85", zorder=0, label=f"reported ± {tol:g}")
        for i, r in enumerate(rows_):
            mean = np.atleast_1d(np.asarray(r["reproduced"], dtype=float))
            std = np.atleast_1d(np.asarray(r["ci95"], dtype=float)) if r.get("ci95") is not None else np.zeros_like(mean)
            at = np.array([i + 1.0]) if scalar else x + 0.08 * (i + 1)  # scalars: one column per profile
            ax.errorbar(at, mean, yerr=std, fmt="o" if scalar else "o-", ms=4, capsize=3,
                        label=f"{r['profile']}{_n(r)}: {r['verdict'].split(' (')[0]}")  # reasons: README
        ax.set_title(claim_id + ("" if has_reported else " (no reported number)"), fontsize=10, loc="left")
        if scalar:
            first = 0 if has_reported else 1
            ax.set_xticks(range(first, len(rows_) + 1), (["reported"] if has_reported else [])
                          + [r["profile"] for r in rows_])
            ax.set_xlim(first - 0.5, len(rows_) + 0.5)
            centre = reported[0] if has_reported else float(np.mean([r["reproduced"] for r in rows_]))
            # no reported value: a margin of its own (near zero, 2 % of the value would zoom into noise)
            margin = tol if has_reported else max(0.05, 0.01 * abs(centre))
            ax.set_ylim(*scalar_ylim(centre, margin, [r["reproduced"] + sign * (r.get("ci95") or 0)
                                                      for r in rows_ for sign in (-1, 1)]))
            ax.ticklabel_format(axis="y", useOffset=False)
        else:
            axis, labels = element_axis(study, claim_id, len(x))
            long = max(map(len, labels)) > 3
            ax.set_xticks(x, labels, rotation=30 if long else 0, ha="right" if long else "center", fontsize=7 if long else None)
            ax.set_xlabel(axis)
        card_claim = papers.claim(study, claim_id)
        ax.set_ylabel((card_claim.get("elements") or {}).get("value") or _short_metric(card_claim["metric"]), fontsize=7)
        ax.legend(fontsize=7)
    fig.suptitle(f"{study}: reported vs reproduced (mean ± 95 % t-interval over seeds)", fontsize=11)
    return fig


def _short_metric(metric: str, width: int = 48) -> str:
    """The card's metric as a y-axis label: its first clause, cut to fit beside a panel."""
    text = metric.split(";")[0].split(" vs ")[0].strip()
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


def element_axis(study: str, claim_id: str, n: int) -> tuple[str, list[str]]:
    """What a list claim's x-axis is: the card's `elements` (axis name and one label per value: 'digit', 6..9), else
    plain 'element' 1..n."""
    elements = papers.claim(study, claim_id).get("elements") or {}
    labels = [str(v) for v in elements.get("labels", [])]
    if len(labels) != n:
        return "element", [str(i + 1) for i in range(n)]
    return elements.get("axis", "element"), labels


def scalar_ylim(reported: float, tol, reproduced: list) -> tuple[float, float]:
    """A single-value panel's y-range: the reported value, its tolerance band with a margin, and every reproduced
    value, never narrower than 2 % of the value (left to itself matplotlib zooms to a 1e-4 span, so that a
    difference far inside the tolerance looks large)."""
    values = [float(reported)] + [float(v) for v in reproduced if _is_number(v)]
    half = max(2 * float(tol or 0), 0.01 * abs(float(reported)), 1e-12)
    lo, hi = min(min(values), reported - half), max(max(values), reported + half)
    pad = 0.05 * (hi - lo)
    return lo - pad, hi + pad


def _verdict(row) -> str:
    if row["verdict"] == "not runnable offline" and row["note"]:
        return f"not runnable offline ({row['note']})"
    return row["verdict"] + (f" — {row['note']}" if row["note"] else "")


def render_markdown(table: list[dict], ablation: list[dict] | None = None) -> str:
    ablation = ablation or []
    out = io.StringIO()
    out.write("# Reported vs reproduced\n\n")
    out.write("Generated by `kdnb report` from `papers/*.yaml` and every `run.json` under `results/` — do not edit by "
              "hand.\n")
    out.write("Smoke runs are pipeline checks and are not listed. Reproduced values: mean ± half-width of the two-sided "
              "95 % Student-t interval over seeds (elementwise for lists; no interval below 2 seeds), n = seeds "
              "(*exact*: a seedless computation, one value), to the precision of the reported value; "
              "a numeric claim is *reproduced* when the reported value lies inside that interval widened by the claim's "
              "tolerance (shown per row), *not reproduced* when outside, *inconclusive* below 3 seeds or when the "
              "interval is wider than the tolerance. "
              "Under each study, where it has them: the same claim with its quirk flags changed one at a time "
              "(`kdnb sweep NB --ablate`; all rows in `attribution.csv`).\n\n")
    for study in sorted({r["study"] for r in table}):
        card = papers.load(study)
        out.write(f"## {study}\n\n{card['title']} — source {card['source']['repository']}\n\n")
        out.write("| claim | metric | reported | tolerance | profile | reproduced | diff | verdict | runs |\n"
                  "|---|---|---|---|---|---|---|---|---|\n")
        for r in (r for r in table if r["study"] == study):
            links = ", ".join(f"[{Path(p).name}]({p}/notebook.ipynb)" for p in r["runs"]) or "—"
            out.write(f"| **{r['claim']}** {r['statement']} | {r['metric']} | {_fmt(r['reported'])} | {_fmt(r['tolerance'])} | "
                      f"{r['profile']} | "
                      f"{readme_cell(r)} | {_diff(r)} | {_verdict(r)} | {links} |\n")
        out.write("\n")
        if plotted(table, study):
            out.write(f"![{study}: reported vs reproduced]({figure_path(study)})\n\n")
        why = attribution.markdown(ablation, study)
        if why:
            out.write(f"### Why not: one quirk at a time\n\n{why}\n"
                      f"![{study}: one quirk at a time]({attribution.figure_path(study)})\n\n")
    return out.getvalue()


def figure_bytes(table: list[dict], ablation: list[dict] | None = None) -> dict[str, bytes]:
    """{figure path relative to the results root: PNG bytes} for every study with a plottable row, and the
    attribution figure of every study with ablation rows."""
    out = {}
    for study in sorted({r["study"] for r in table}):
        if plotted(table, study):
            out[str(figure_path(study))] = _png(render_figure(table, study))
    for study in sorted({r["notebook"] for r in ablation or []}):
        out[attribution.figure_path(study)] = _png(attribution.figure(ablation, study))
    return out


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, bbox_inches="tight", format="png")  # what runs.atomic_save_figure writes
    return buf.getvalue()


def _write_figures(pngs: dict[str, bytes], results: Path) -> list[Path]:
    written = [runs.atomic_write_bytes(results / rel, png) for rel, png in pngs.items()]
    for stale in sorted((results / "figures").glob("*.png")) if (results / "figures").is_dir() else []:
        if stale not in written:
            stale.unlink()
    return written


def write(results: Path = runs.RESULTS) -> tuple[Path, Path]:
    """README.md, summary.csv and figures/, all or nothing: everything is rendered in memory and every folder
    proven writable before the first file is replaced, so a read-only results root leaves the old report whole."""
    records = load_runs(results)
    table = rows(results, records)
    ablation = attribution.rows(records)
    markdown = render_markdown(table, ablation)
    buf = io.StringIO()
    fields = ["study", "claim", "profile", "reported", "tolerance", "reproduced", "std", "ci95", "seeds", "diff", "verdict",
              "note", "runs"]
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for r in table:
        w.writerow({k: json.dumps(r[k]) if isinstance(r[k], list) else r[k] for k in fields})
    pngs = figure_bytes(table, ablation)
    runs.check_writable(results, "results folder")
    if pngs or (results / "figures").is_dir():
        runs.check_writable(results / "figures", "results folder")
    _write_figures(pngs, results)
    md = runs.atomic_write_text(results / "README.md", markdown)
    csv_path = runs.atomic_write_text(results / "summary.csv", buf.getvalue())
    runs.atomic_write_text(results / "attribution.csv", attribution.csv_text(ablation))
    return md, csv_path
