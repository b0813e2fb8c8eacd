"""Why not: which quirk moves a claim's number by how much, one quirk flag at a time, with seed statistics.

A study that takes part declares, in its module:
  QUIRKS          {flag: (faithful value, corrected value)}: the notebook's own quirk parameters
  ABLATION_STARTS {'faithful': params, 'corrected': params}: what puts a run at either end (01: `variants`)
  PROTOCOL        params that take the training protocol itself away from a validation signal (optional): the
                  correction changes *which* loss drives the scheduler and early stopping, and that choice is ours,
                  so it gets its own row from either start; PROTOCOL_DEFAULT: the same keys at the claim's values
  ATTRIBUTION     {claim id: (metric name, what it is)}: the claims to attribute and their value per seed
  ATTRIBUTION_PROFILE  the profile whose runs the rows rest on (`kdnb sweep --ablate` runs it by default)
  attribution_samples(claim, params, metrics) -> [{'flags', 'protocol', 'seed', 'value'}], one per trained model
  ABLATION_RUNS   (optional) fewer runs that cover every row (04 trains both t2_scaling values in one run)
`points()` is what `kdnb sweep NB --ablate` runs: from faithful, correct one flag at a time; from corrected, restore
one at a time; both ends; the protocol row. `rows()` reads the run records back (any record of the attribution
profile's configuration whose models sit at one of those points counts, whichever sweep or run made it) into
results/attribution.csv, one row per (notebook, claim, start, change), each seed counted once. A row's Δ is paired:
the mean over the seeds it shares with its start of (row - start), with its own 95 % t-interval.
"""
from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path

import numpy as np

from . import metrics, papers, profiles, runs

STARTS = ("faithful", "corrected")
COLUMNS = ["notebook", "claim", "start", "change", "n_seeds", "metric", "mean", "std", "ci95_low", "ci95_high",
           "delta_vs_start", "run_ids"]


def study(notebook: str):
    """The study module, if it declares quirks to attribute; else None."""
    module = profiles.module(notebook)
    return module if module is not None and hasattr(module, "QUIRKS") and hasattr(module, "ATTRIBUTION") else None


def studies() -> list[str]:
    return sorted(nb for nb in profiles.STUDY_MODULES if study(nb) is not None)


def change_label(changes: dict) -> str:
    """'none', 'teacher_source=train_on_train', or 'protocol: lr_schedule=constant es_patience=70 select=final'."""
    return " ".join(f"{k}={v}" for k, v in changes.items()) or "none"


def points(notebook: str) -> list[tuple[str, str, dict]]:
    """(start, change, parameters to give the notebook) of every ablation row, in the order a reader wants them."""
    m = study(notebook)
    if m is None:
        have = ", ".join(studies()) or "none"
        raise ValueError(f"notebook={notebook!r} declares no quirk flags to ablate (QUIRKS/ATTRIBUTION in its "
                         f"module); studies that do: {have}")
    out = []
    for start in STARTS:
        base = dict(m.ABLATION_STARTS[start])
        out.append((start, "none", base))
        for flag, ends in m.QUIRKS.items():
            other = ends[1] if start == "faithful" else ends[0]
            out.append((start, change_label({flag: other}), {**base, flag: other}))
        protocol = getattr(m, "PROTOCOL", None)
        if protocol:
            out.append((start, "protocol: " + change_label(protocol), {**base, **protocol}))
    return out


def classify(m, sample: dict) -> list[tuple[str, str]]:
    """The (start, change) rows one trained model belongs to: its flags at one end or one flag away from it, and
    its protocol the claim's own or the PROTOCOL row's (never a mix). A model without one of the flags (a record
    made before the flag existed) belongs to none."""
    protocol = getattr(m, "PROTOCOL", None) or {}
    default = m.PROTOCOL_DEFAULT if protocol else {}
    have = sample.get("protocol", {})
    if any(f not in sample["flags"] for f in m.QUIRKS):
        return []
    if all(have.get(k) == default.get(k) for k in protocol):
        changed_protocol = False
    elif protocol and all(have.get(k) == v for k, v in protocol.items()):
        changed_protocol = True
    else:
        return []
    out = []
    for i, start in enumerate(STARTS):
        diff = {f: sample["flags"][f] for f, ends in m.QUIRKS.items() if sample["flags"][f] != ends[i]}
        if changed_protocol:
            if not diff:
                out.append((start, "protocol: " + change_label(protocol)))
        elif len(diff) <= 1:
            out.append((start, change_label(diff)))
    return out


def t_interval(values: list[float]) -> tuple[float, float, float | None, float | None]:
    """mean, std (ddof 1), and the two-sided 95 % Student-t interval of the mean (None below 2 values)."""
    arr = np.asarray(values, dtype=float)
    mean = float(arr.mean())
    if len(arr) < 2:
        return mean, float("nan"), None, None
    std = float(arr.std(ddof=1))
    half = float(metrics.ci95_halfwidth(std, len(arr)))
    return mean, std, mean - half, mean + half


# what a run may differ in from its study's attribution profile and still be counted: the ablation's own axes and
# where things are (runs.LOCATION_PARAMS) or run
_FREE = ("seeds", "variants", "profile", "device", "download", *runs.LOCATION_PARAMS)


def same_configuration(notebook: str, params: dict) -> bool:
    """Whether a record trained the attribution profile's configuration, quirk flags, protocol and seeds aside (a run
    with another teacher recipe or held-out size must not enter a row, nor replace a seed's value there)."""
    m = study(notebook)
    free = set(_FREE) | set(m.QUIRKS) | set(getattr(m, "PROTOCOL", None) or {})
    for start in m.ABLATION_STARTS.values():
        free |= set(start)
    return profiles.trained_profile(params, notebook, m.ATTRIBUTION_PROFILE, free)


def paired_delta(row: dict, start: dict) -> tuple[float | None, float | None, float | None, int]:
    """Mean over the seeds both rows have of (row - start), its 95 % t-interval and the number of such seeds."""
    common = sorted(set(row) & set(start))
    if not common:
        return None, None, None, 0
    mean, _, lo, hi = t_interval([row[s] - start[s] for s in common])
    return mean, lo, hi, len(common)


def rows(records: list[dict]) -> list[dict]:
    """One row per (notebook, claim, start, change) that some record speaks to, in `points()` order."""
    out = []
    for notebook in studies():
        m = study(notebook)
        order = {(s, c): i for i, (s, c, _) in enumerate(points(notebook))}
        mine = runs.newest_first([r for r in records if r.get("notebook") == notebook
                                  and same_configuration(notebook, r.get("params", {}))])
        for claim, (metric, _) in m.ATTRIBUTION.items():
            found: dict[tuple[str, str], dict] = {}
            for rec in mine:
                for sample in m.attribution_samples(claim, rec["params"], rec.get("metrics") or {}):
                    for key in classify(m, sample):
                        slot = found.setdefault(key, {"values": {}, "runs": set()})
                        if sample["seed"] not in slot["values"]:  # a seed computed twice counts once: the newest run
                            slot["values"][sample["seed"]] = sample["value"]
                            slot["runs"].add(rec.get("run_id") or Path(rec["_dir"]).name)
            for (start, change) in sorted(found, key=lambda k: order.get(k, len(order))):
                slot = found[(start, change)]
                mean, std, lo, hi = t_interval(list(slot["values"].values()))
                base = found.get((start, "none"), {}).get("values", {})
                delta, d_lo, d_hi, paired = ((0.0, None, None, len(base)) if change == "none"
                                             else paired_delta(slot["values"], base))
                out.append({"notebook": notebook, "claim": claim, "start": start, "change": change,
                            "n_seeds": len(slot["values"]), "metric": metric, "mean": mean, "std": std,
                            "ci95_low": lo, "ci95_high": hi, "delta_vs_start": delta,
                            "run_ids": ";".join(sorted(slot["runs"])), "seeds": sorted(slot["values"]),
                            "delta_low": d_lo, "delta_high": d_hi, "n_paired": paired})
    return out


def csv_text(table: list[dict]) -> str:
    import csv

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in table:
        w.writerow({k: (f"{r[k]:.4f}" if isinstance(r[k], float) and math.isfinite(r[k]) else
                        "" if r[k] is None or (isinstance(r[k], float) and not math.isfinite(r[k])) else r[k])
                    for k in COLUMNS})
    return buf.getvalue()


def _num(v, digits=2) -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def _interval(r) -> str:
    return "—" if r["ci95_low"] is None else f"[{_num(r['ci95_low'])}, {_num(r['ci95_high'])}]"


def reported_value(notebook: str, claim: str) -> float | None:
    """The card's reported value as one number of the attribution metric (a list claim: its mean)."""
    rep = papers.claim(notebook, claim).get("reported")
    if isinstance(rep, list) and rep and all(isinstance(v, (int, float)) for v in rep):
        return float(np.mean(rep))
    return float(rep) if isinstance(rep, (int, float)) and not isinstance(rep, bool) else None


def markdown(table: list[dict], notebook: str) -> str:
    """The study's attribution tables (one per claim) and the sentences that read them."""
    lines = []
    for claim in dict.fromkeys(r["claim"] for r in table if r["notebook"] == notebook):
        rs = [r for r in table if r["notebook"] == notebook and r["claim"] == claim]
        rep = reported_value(notebook, claim)
        lines += [f"**{claim}**, metric `{rs[0]['metric']}`" + (f" (reported: {rep:.2f})" if rep is not None else "")
                  + "; mean and 95 % t-interval over seeds; Δ: paired with the row's start over the seeds both have:",
                  "", "| start | change | n | mean | 95 % interval | Δ vs start (paired n) | Δ 95 % interval |",
                  "|---|---|---|---|---|---|---|"]
        for r in rs:
            delta = "—" if r["change"] == "none" else f"{_num(r['delta_vs_start'])} ({r['n_paired']})"
            d_int = "—" if r.get("delta_low") is None else f"[{_num(r['delta_low'])}, {_num(r['delta_high'])}]"
            lines.append(f"| {r['start']} | `{r['change']}` | {r['n_seeds']} | {_num(r['mean'])} | {_interval(r)} | "
                         f"{delta} | {d_int} |")
        lines += ["", *sentences(rs, rep), ""]
    return "\n".join(lines).rstrip() + "\n" if lines else ""


def significant(r: dict) -> bool | None:
    """Whether a single change's paired Δ interval excludes 0 (None below 2 paired seeds)."""
    if r.get("delta_low") is None:
        return None
    return not (r["delta_low"] <= 0.0 <= r["delta_high"])


def sentences(rs: list[dict], reported: float | None) -> list[str]:
    """What the numbers say, in words: the gap between the ends and which single change accounts for how much."""
    ends = {r["start"]: r for r in rs if r["change"] == "none"}
    out = []
    if "faithful" in ends and "corrected" in ends:
        f, c = ends["faithful"], ends["corrected"]
        gap = c["mean"] - f["mean"]
        # a share of a gap that seed noise could have made is a meaningless percentage (04's 0.04 points was
        # "236 % of the way"): shares only where the two ends' 95 % intervals are apart
        apart = (None not in (f["ci95_low"], c["ci95_low"])
                 and (f["ci95_high"] < c["ci95_low"] or c["ci95_high"] < f["ci95_low"]))
        out.append(f"- Faithful {_num(f['mean'])} (n={f['n_seeds']}) → corrected {_num(c['mean'])} "
                   f"(n={c['n_seeds']}): a gap of {_num(gap)}"
                   + (f"; reported {reported:.2f}" if reported is not None else "")
                   + ("; fewer than 3 seeds at an end: inconclusive." if min(f["n_seeds"], c["n_seeds"]) < 3 else
                      "." if apart else "; the two ends' 95 % intervals overlap: no gap beyond seed noise to share "
                      "out."))
        for start in STARTS:
            singles = [r for r in rs if r["start"] == start and r["change"] != "none" and r["delta_vs_start"] is not None]
            if not singles:
                continue
            if min(r["n_paired"] for r in singles) < 3:
                out.append(f"- From {start}: fewer than 3 seeds paired with the start on some row, inconclusive.")
                continue
            top = max(singles, key=lambda r: abs(r["delta_vs_start"]))
            # the share of the way to the other end: from faithful towards corrected (+gap), or back (-gap)
            share = ((top["delta_vs_start"] if start == "faithful" else -top["delta_vs_start"]) / gap
                     if gap and apart else None)
            others = [r for r in singles if r is not top and significant(r)]
            verb, other_end = ("correcting", "corrected") if start == "faithful" else ("restoring", "faithful")
            way = ("" if share is None else f" ({100 * share:.0f} % of the way to {other_end})" if share >= 0 else
                   f" (away from {other_end}: {100 * share:.0f} % of the gap)")
            out.append(f"- From {start}, {verb} `{top['change']}` alone moves it by {_num(top['delta_vs_start'])}"
                       + way
                       + (f", paired interval [{_num(top['delta_low'])}, {_num(top['delta_high'])}] excludes 0"
                          if significant(top) else ", its paired interval includes 0 (not distinguishable from noise)")
                       + "; " + (("other single changes whose paired interval excludes 0: "
                                  + ", ".join(f"`{r['change']}` {_num(r['delta_vs_start'])}" for r in others))
                                 if others else "no other single change moves it beyond seed noise") + ".")
    return out


def figure(table: list[dict], notebook: str):
    """Waterfall-style chart per claim: reported → faithful → each single change → corrected (and back), each
    mean with its 95 % interval."""
    from matplotlib.figure import Figure

    claims = list(dict.fromkeys(r["claim"] for r in table if r["notebook"] == notebook))
    fig = Figure(figsize=(11, 5.0 * len(claims) + 0.4), layout="constrained")
    axes = fig.subplots(len(claims), 1, squeeze=False).ravel()
    for ax, claim in zip(axes, claims):
        rs = [r for r in table if r["notebook"] == notebook and r["claim"] == claim]
        rep = reported_value(notebook, claim)
        tol = papers.claim(notebook, claim).get("tolerance")
        labels, positions, x = [], [], 0.0
        if rep is not None:
            ax.axhline(rep, color="k", lw=1, ls="--", zorder=1, label=f"reported {rep:.2f}")
            if tol:
                ax.axhspan(rep - tol, rep + tol, color="0.9", zorder=0, label=f"reported ± {tol:g}")
        for start, colour in zip(STARTS, ("#4c72b0", "#dd8452")):
            mine = [r for r in rs if r["start"] == start]
            for r in mine:
                err = None if r["ci95_low"] is None else [[r["mean"] - r["ci95_low"]], [r["ci95_high"] - r["mean"]]]
                ax.errorbar([x], [r["mean"]], yerr=err, fmt="s" if r["change"] == "none" else "o", color=colour,
                            ms=7 if r["change"] == "none" else 5, capsize=3,
                            label=f"from {start}" if r is mine[0] else None)
                labels.append(start if r["change"] == "none" else f"+ {r['change']}")
                positions.append(x)
                x += 1
            x += 0.5  # a gap between the two starts
        ax.set_xticks(positions, labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(textwrap.fill(study(notebook).ATTRIBUTION[claim][1], 36), fontsize=8)
        ax.set_title(f"{claim}: one quirk at a time (mean ± 95 % t-interval over seeds; n per row in "
                     f"results/attribution.csv)", fontsize=10, loc="left")
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"{notebook}: which quirk moves the number", fontsize=11)
    return fig


def figure_path(notebook: str) -> str:
    return f"figures/{notebook}-attribution.png"


def show(notebook: str, results: Path | None = None) -> None:
    """A notebook's conclusion: the committed ablation of its claims (tables, sentences, figure), read from
    results/ only (nothing is trained here), or how to produce it."""
    from IPython.display import Image, Markdown, display

    from . import report

    results = runs.RESULTS if results is None else results
    table = [r for r in rows(report.load_runs(results)) if r["notebook"] == notebook]
    if table:
        display(Markdown(markdown(table, notebook)))
        figure = results / figure_path(notebook)
        if figure.is_file():
            display(Image(filename=str(figure)))
    elif study(notebook) is not None:
        display(Markdown(f"No one-at-a-time ablation of {notebook} is committed yet: "
                         f"`kdnb sweep {notebook} --ablate --seeds 0,1,2,3,4` (profile "
                         f"`{study(notebook).ATTRIBUTION_PROFILE}`), then `kdnb report`."))
    else:
        display(Markdown(f"{notebook} does not declare its quirk flags for `kdnb sweep --ablate` yet (QUIRKS and "
                         f"ATTRIBUTION in its module, see `kdnb/attribution.py`); its faithful and corrected variants "
                         f"are compared as a whole in the sections above."))
