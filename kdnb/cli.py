"""`kdnb run NOTEBOOK`, `kdnb sweep NOTEBOOK`, `kdnb report`: batch reruns with papermill and the
reported-vs-reproduced table.

    kdnb run 05_self_distillation --profile reduced -p sd_alphas "[0.0, 0.6]"
    kdnb sweep 05_self_distillation --profile reduced --grid "sd_alphas=[0.0,0.6],[0.6]" epochs=5,10 --seeds 0,1,2
    kdnb sweep 05_self_distillation --grid lr=1e-3,1e-4 --seeds 0,1 --backend ray --address HEAD:6379 --gpus-per-trial 1
    kdnb sweep 01_mnist_unseen_classes --profile full --ablate --seeds 0,1,2,3,4   (issue 12: one quirk at a time)
    kdnb report
"""
from __future__ import annotations

import argparse
import ast
import os
import sys
from pathlib import Path

from . import runs, validate

NOTEBOOKS = runs.REPO / "notebooks"
# parameters that say where things go; kdnb run sets output_dir itself
LOCATION_PARAMS = ("output_dir", "data_dir")


def notebook_path(name: str) -> Path:
    p = Path(name)
    if p.suffix != ".ipynb":
        p = NOTEBOOKS / f"{p.name}.ipynb"
    if not p.is_file():
        known = sorted(q.stem for q in NOTEBOOKS.glob("*.ipynb"))
        raise ValueError(f"notebook={name!r} not found; available: {known}")
    return p.resolve()


def parse_value(text: str):
    """Python literal if it is one ('[0.0, 0.6]', '1e-3', 'None', 'True'), else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def notebook_parameters(path: Path) -> dict:
    """Names and default values of the notebook's cell tagged `parameters`."""
    import papermill

    found = papermill.inspect_notebook(str(path))
    if not found:
        raise ValueError(f"{path.name} has no cell tagged 'parameters'")
    return {name: parse_value(info["default"]) for name, info in found.items()}


def check_known(path: Path, defaults: dict, names) -> None:
    """One line naming the first of `names` that is not a parameter of the notebook (kdnb run, and the notebook
    itself under plain papermill: kdnb.profiles.from_namespace)."""
    unknown = sorted(set(names) - set(defaults))
    if unknown:
        raise ValueError(f"parameter {unknown[0]!r} is not a parameter of {path.name}; "
                         f"its parameters are: {', '.join(defaults)}")


def plan(name: str, given: dict, results: Path | None = None) -> tuple[Path, dict, dict, Path]:
    """Check the parameters against the notebook's and resolve the profile, before anything runs.
    Returns (notebook, parameters to inject, resolved parameters, output folder)."""
    from . import profiles

    path = notebook_path(name)
    defaults = notebook_parameters(path)
    check_known(path, defaults, given)
    merged = {**defaults, **given}
    resolved = profiles.resolve(path.stem, **{k: v for k, v in merged.items() if k not in LOCATION_PARAMS})
    profiles.check(path.stem, resolved)  # bad values stop here, not as a traceback inside the notebook
    out = (results or runs.RESULTS) / path.stem / runs.run_id(resolved)
    return path, given, resolved, out


def run(name: str, given: dict, *, force: bool = False, log_output: bool = False, results: Path | None = None,
        progress_bar: bool = True) -> Path:
    """Execute one notebook into <results>/<notebook>/<run-id>/; a finished run is not repeated (unless the data
    it read has changed since) and an interrupted one resumes from the checkpoints its folder kept. Two identical
    runs at once take turns on the folder: the second waits, then finds the first one's record."""
    import papermill

    from . import numerics

    numerics.thread_policy()  # the Jupyter kernel papermill starts below inherits it (read when torch loads)
    path, given, resolved, out = plan(name, given, results)
    if "device" in resolved:
        validate.device(resolved["device"])  # here, not in plan(): a cluster's driver may have no GPU
    runs.check_writable(out, "results folder")
    partial, final = out / "notebook.partial.ipynb", out / "notebook.ipynb"
    with _folder_lock(out):
        if (out / "run.json").is_file() and not force:
            stale = stale_reason(out, given.get("data_dir"), cwd=path.parent)
            if partial.is_file() and not final.is_file() and stale is None:
                if notebook_complete(partial):
                    # killed after papermill saved the last cell but before the rename below
                    os.replace(partial, final)
                else:
                    # killed after the record was written but before papermill saved the notebook: the record's
                    # notebook is lost, so run again (everything resumes from checkpoints and caches)
                    stale = "its executed notebook was not saved (the run was killed at its end)"
            if stale is None:
                note = threads_note(out, resolved)
                print(f"already finished, nothing to do: {_show(out)}" + (f" ({note})" if note else ""))
                return out
            print(f"finished record in {_show(out)} is not reused: {stale}")
        resuming = any((out / "checkpoints").glob("*.pt"))
        print(f"running {path.name} ({resolved['profile']}) -> {_show(out)}"
              + (" (resuming from checkpoints)" if resuming else ""))
        papermill.execute_notebook(str(path), str(partial), parameters={**given, "output_dir": str(out)},
                                   cwd=str(path.parent), kernel_name="python3", log_output=log_output,
                                   progress_bar=progress_bar)
        os.replace(partial, final)
    return out


def _folder_lock(out: Path):
    """An exclusive lock on a run folder, held while its notebook runs. The lock file lives in the kdnb cache (a
    run folder holds only its record), so it serialises runs of one machine, not of several sharing a filesystem."""
    import hashlib

    from . import data

    folder = runs.check_writable(data.cache_dir() / "locks", "kdnb cache")
    path = folder / f"{hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:16]}.lock"
    return runs.exclusive(path, f"waiting for another kdnb run of {_show(out)} to finish")


def stale_reason(out: Path, data_dir=None, *, cwd: Path | None = None) -> str | None:
    """Why a finished record in `out` must not answer for a run reading data from here now (None: it may).
    The run id does not cover the data, so the record's `data` digests are compared with the files the notebook
    would read now (found the way it finds them). Records from before `data` existed, and data that is not found
    now, leave the record standing."""
    import json

    from . import data

    try:
        record = json.loads((out / "run.json").read_text())
    except (OSError, ValueError):
        return "its run.json is unreadable"
    recorded = (record.get("data") or {})
    if not recorded.get("reads"):
        return None
    now = []
    for entry in recorded["reads"]:
        files = data.files_for(entry["dataset"], entry["split"], entry["source"], data_dir, cwd=cwd)
        if files is None or not all(f.is_file() for f in files):
            return None
        now.append(dict(entry, files={str(f): data.file_digest(f) for f in files}))
    current = data.identity_of(now)
    if current != recorded.get("identity"):
        return f"it was computed from other data (identity {recorded.get('identity')}, the data found now is {current})"
    return None


def threads_note(out: Path, resolved: dict) -> str | None:
    """A finished non-smoke record computed with another intra-op thread count than this machine would use: same run
    id, possibly different last digits (README, Reliability). Said, not rerun."""
    import json

    from . import numerics

    try:
        env = json.loads((out / "run.json").read_text()).get("environment") or {}
    except (OSError, ValueError):
        return None
    r = numerics.regime(resolved.get("profile", "smoke"), str(resolved.get("device", "cpu")), out.parent.name)
    now = r["threads"] or numerics._TORCH_THREADS
    had = env.get("cpu_threads")
    if had is None or had == now:
        return None
    return f"note: recorded with {had} intra-op threads, this machine would use {now}"


def notebook_complete(path: Path) -> bool:
    """Did papermill save this notebook after its last cell finished (every code cell 'completed')?"""
    import json

    try:
        nb = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    code = [c for c in nb.get("cells", []) if c.get("cell_type") == "code"]
    return bool(code) and all((c.get("metadata", {}).get("papermill") or {}).get("status") == "completed"
                              for c in code)


def _show(path: Path) -> str:
    try:
        return str(path.relative_to(runs.REPO))
    except ValueError:
        return str(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="kdnb", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="execute one notebook with papermill into results/<notebook>/<run-id>/")
    r.add_argument("notebook", help="name (05_self_distillation) or path of a notebook")
    r.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    r.add_argument("--profile", choices=["smoke", "reduced", "full"])
    r.add_argument("--device")
    r.add_argument("--data-dir")
    r.add_argument("--force", action="store_true", help="rerun even if a finished record exists")
    r.add_argument("--log-output", action="store_true", help="stream the notebook's output to this terminal")
    s = sub.add_parser("sweep", help="run every combination of a parameter grid (x seeds), locally or on Ray",
                       description="Every combination is one `kdnb run` (same folders, same skip/resume rules). "
                                   "Grid values are separated by commas outside brackets: "
                                   "--grid \"sd_alphas=[0.0,0.6],[0.6]\" is two points.")
    s.add_argument("notebook", help="name (05_self_distillation) or path of a notebook")
    s.add_argument("--grid", nargs="+", action="extend", default=[], metavar="NAME=V1,V2",
                   help="one grid axis per NAME=V1,V2,... (repeatable)")
    s.add_argument("--ablate", action="store_true",
                   help="instead of --grid: the study's quirk flags one at a time (both ends, each flag corrected from "
                        "faithful and restored from corrected, the protocol row); `kdnb report` writes "
                        "results/attribution.csv from them")
    s.add_argument("--seeds", help="comma-separated seeds, each combination runs once per seed (e.g. 0,1,2)")
    s.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="a parameter fixed for every trial")
    s.add_argument("--profile", choices=["smoke", "reduced", "full"])
    s.add_argument("--device")
    s.add_argument("--data-dir")
    s.add_argument("--backend", choices=["local", "ray"], default="local")
    s.add_argument("--address", help="Ray cluster to join (HEAD:6379 or ray://HEAD:10001); default: start one here")
    s.add_argument("--workers", type=int, help="local: processes (default 1); ray without --address: CPUs of "
                                              "the local cluster (default all)")
    s.add_argument("--cpus-per-trial", type=float, default=1.0, help="ray: CPUs reserved per trial (default 1)")
    s.add_argument("--gpus-per-trial", type=float, default=0.0, help="ray: GPUs per trial, fractions share one")
    s.add_argument("--max-retries", type=int, default=2, help="retries of a failed or killed trial (default 2)")
    s.add_argument("--results", help="results root (default: results/ of this checkout, or $KDNB_RESULTS)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    sub.add_parser("report", help="regenerate results/README.md, results/summary.csv and results/figures/")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "run":
            given = with_flags({k: parse_value(v) for k, v in args.parameter}, args)
            run(args.notebook, given, force=args.force, log_output=args.log_output)
        elif args.cmd == "sweep":
            from . import sweep

            fixed = with_flags({k: parse_value(v) for k, v in args.parameter}, args)
            table = sweep.sweep(args.notebook, args.grid, seeds=args.seeds, fixed=fixed, backend=args.backend,
                                address=args.address, workers=args.workers, cpus_per_trial=args.cpus_per_trial,
                                gpus_per_trial=args.gpus_per_trial, max_retries=args.max_retries,
                                results=args.results, progress=not args.no_progress, ablate=args.ablate)
            if any(t["status"] == "failed" for t in table.attrs["trials"]):
                return 1
        elif args.cmd == "report":
            from . import report

            md, csv_path = report.write()
            print(f"wrote {_show(md)}, {_show(csv_path)} and {_show(md.parent / 'attribution.csv')}")
            figures = sorted((md.parent / "figures").glob("*.png"))
            if figures:
                print("figures: " + ", ".join(_show(f) for f in figures))
    except ValueError as e:  # user mistakes: one clear line, no traceback
        print(f"kdnb: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C: what is left, no traceback, the shell's code for SIGINT
        print(f"kdnb: {e or 'interrupted'}", file=sys.stderr)
        return 130
    except PermissionError as e:  # a read-only results folder or cache: one line naming it
        print(f"kdnb: error: {_permission_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:
        if type(e).__name__ != "PapermillExecutionError":
            raise
        # the notebook raised: its own one-line error (a DataCorruptError, a bad value) and where the notebook is
        print(f"kdnb: error: {e.ename}: {e.evalue} (in cell [{e.exec_count}]; the partly executed notebook is the "
              "run folder's notebook.partial.ipynb)", file=sys.stderr)
        return 1
    return 0


def with_flags(given: dict, args) -> dict:
    """-p values plus --profile / --device / --data-dir; the same name given both ways, differently, is an error."""
    for flag, key, opt in ((args.profile, "profile", "--profile"), (args.device, "device", "--device"),
                           (args.data_dir, "data_dir", "--data-dir")):
        if flag is None:
            continue
        if key in given and given[key] != flag:
            validate.fail(key, given[key], f"conflicts with {opt} {flag}; give it once")
        given[key] = flag
    return given


def _permission_line(e: PermissionError) -> str:
    if isinstance(e, runs.NotWritableError) or not e.filename:
        return str(e)
    return f"{e.filename} is not writable ({e.strerror}); make it writable or write elsewhere"


if __name__ == "__main__":
    sys.exit(main())
