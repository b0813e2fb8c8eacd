"""Numbers must not move (issue 14): rerun committed run records with today's code and compare what they logged.

    KDNB_DATA=../shared/datasets .venv/bin/python benchmarks/check_records.py \\
        results/01_mnist_unseen_classes/full-124c3ceb27 results/04_emnist_mlp_student/reduced-366da73694

Each record's params.yaml goes back to `kdnb run`, into a temporary results folder, on this checkout's code; the
new metrics.json (metrics and claims) must equal the committed one exactly (CPU runs fix dtype and thread count by
study and profile, kdnb.numerics), except values that measure the machine rather than the model (wall times,
throughput, cache hits). It prints one line per record and exits 1 when anything moved. Not a test: a rerun takes
minutes (01 `full` cell ~2 min, 04 `reduced` ~5 min with cached teachers; 03 and 05 `reduced` ~20-30 min).

Teachers come from the kdnb cache, as in any run. A record is only comparable while the cache holds the teacher it
was made with: its key is in the record (01: metrics.teachers.*.key). A cache key covers the teacher's configuration
and data, not its float32 weights, and a teacher retrained on another thread count has other weights, so a record
older than its cached teacher moves through the teacher alone (01's grid cells of 2026-11-23, teacher 9d0e18274f12,
against today's 05c1f3d7e3bf: 439 values moved). Pick records made with the cached teachers.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import yaml

# what measures the machine or the cache, not the model: keys with a time unit's suffix (wall_time_s,
# train_images_per_s, latency_ms) and whether a cache answered (cache_hit, teacher_cache_hit). Suffixes, not
# substrings: a metric merely containing "time" in its name must still be compared
VOLATILE_SUFFIXES = ("_s", "_ms", "cache_hit")


def volatile(key: str) -> bool:
    return key.lower().endswith(VOLATILE_SUFFIXES)


def differences(old, new, path: str = "") -> list[str]:
    """Where two logged JSON trees differ (floats to the bit), machine-dependent keys aside."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            if volatile(k):
                continue
            if k not in old or k not in new:
                out.append(f"{path}/{k}: only in {'new' if k in new else 'committed'}")
            else:
                out += differences(old[k], new[k], f"{path}/{k}")
        return out
    if isinstance(old, list) and isinstance(new, list):
        if len(old) != len(new):
            return [f"{path}: {len(old)} vs {len(new)} entries"]
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in differences(a, b, f"{path}[{i}]")]
    same = old == new or (isinstance(old, float) and isinstance(new, float) and math.isnan(old) and math.isnan(new))
    return [] if same else [f"{path}: {old!r} -> {new!r}"]


def check(record: Path, root: Path) -> list[str]:
    from kdnb import runner, runs

    params = yaml.safe_load((record / "params.yaml").read_text())
    given = {k: v for k, v in params.items() if k not in runs.LOCATION_PARAMS}
    out = runner.run(record.parent.name, given, results=root, progress_bar=False)
    if out.name != record.name:
        return [f"run id {out.name} instead of {record.name}"]
    old, new = (json.loads((d / "metrics.json").read_text()) for d in (record, out))
    return differences(old, new)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("records", nargs="+", type=Path, help="committed run folders (results/<notebook>/<run id>)")
    args = ap.parse_args(argv)
    moved = 0
    with tempfile.TemporaryDirectory(prefix="kdnb-check-") as tmp:
        for record in args.records:
            diffs = check(record.resolve(), Path(tmp))
            moved += bool(diffs)
            print(f"{record}: " + ("identical" if not diffs else f"{len(diffs)} values moved, e.g. {diffs[:3]}"),
                  flush=True)
    return 1 if moved else 0


if __name__ == "__main__":
    sys.exit(main())
