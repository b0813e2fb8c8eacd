"""`kdnb run NOTEBOOK`, `kdnb sweep NOTEBOOK`, `kdnb report`: batch reruns with papermill and the
reported-vs-reproduced table.

    kdnb run 05_self_distillation --profile reduced -p sd_alphas "[0.0, 0.6]"
    kdnb sweep 05_self_distillation --profile reduced --grid "sd_alphas=[0.0,0.6],[0.6]" epochs=5,10 --seeds 0,1,2
    kdnb sweep 05_self_distillation --grid lr=1e-3,1e-4 --seeds 0,1 --backend ray --address HEAD:6379 --gpus-per-trial 1
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


def plan(name: str, given: dict, results: Path | None = None) -> tuple[Path, dict, dict, Path]:
    """Check the parameters against the notebook's and resolve the profile, before anything runs.
    Returns (notebook, parameters to inject, resolved parameters, output folder)."""
    from . import profiles

    path = notebook_path(name)
    defaults = notebook_parameters(path)
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"parameter {unknown[0]!r} is not a parameter of {path.name}; "
                         f"its parameters are: {', '.join(defaults)}")
    merged = {**defaults, **given}
    resolved = profiles.resolve(path.stem, **{k: v for k, v in merged.items() if k not in LOCATION_PARAMS})
    profiles.check(path.stem, resolved)  # bad values stop here, not as a traceback inside the notebook
    out = (results or runs.RESULTS) / path.stem / runs.run_id(resolved)
    return path, given, resolved, out


def run(name: str, given: dict, *, force: bool = False, log_output: bool = False, results: Path | None = None,
        progress_bar: bool = True) -> Path:
    """Execute one notebook into <results>/<notebook>/<run-id>/; a finished run is not repeated and an
    interrupted one resumes from the checkpoints its folder kept."""
    import papermill

    path, given, resolved, out = plan(name, given, results)
    if "device" in resolved:
        validate.device(resolved["device"])  # here, not in plan(): a cluster's driver may have no GPU
    partial, final = out / "notebook.partial.ipynb", out / "notebook.ipynb"
    if (out / "run.json").is_file() and not force:
        if partial.is_file() and not final.is_file():
            # killed after the notebook wrote its record but before the rename below: keep the executed
            # notebook that produced the record
            os.replace(partial, final)
        print(f"already finished, nothing to do: {_show(out)}")
        return out
    out.mkdir(parents=True, exist_ok=True)
    print(f"running {path.name} ({resolved['profile']}) -> {_show(out)}"
          + (" (resuming from checkpoints)" if (out / "checkpoints").is_dir() else ""))
    papermill.execute_notebook(str(path), str(partial), parameters={**given, "output_dir": str(out)},
                               cwd=str(path.parent), kernel_name="python3", log_output=log_output,
                               progress_bar=progress_bar)
    os.replace(partial, final)
    return out


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
            given = {k: parse_value(v) for k, v in args.parameter}
            for flag, key in ((args.profile, "profile"), (args.device, "device"), (args.data_dir, "data_dir")):
                if flag is not None:
                    given[key] = flag
            run(args.notebook, given, force=args.force, log_output=args.log_output)
        elif args.cmd == "sweep":
            from . import sweep

            fixed = {k: parse_value(v) for k, v in args.parameter}
            for flag, key in ((args.profile, "profile"), (args.device, "device"), (args.data_dir, "data_dir")):
                if flag is not None:
                    fixed[key] = flag
            table = sweep.sweep(args.notebook, args.grid, seeds=args.seeds, fixed=fixed, backend=args.backend,
                                address=args.address, workers=args.workers, cpus_per_trial=args.cpus_per_trial,
                                gpus_per_trial=args.gpus_per_trial, max_retries=args.max_retries,
                                results=args.results, progress=not args.no_progress)
            if any(t["status"] == "failed" for t in table.attrs["trials"]):
                return 1
        elif args.cmd == "report":
            from . import report

            md, csv_path = report.write()
            print(f"wrote {_show(md)} and {_show(csv_path)}")
            figures = sorted((md.parent / "figures").glob("*.png"))
            if figures:
                print("figures: " + ", ".join(_show(f) for f in figures))
    except ValueError as e:  # user mistakes: one clear line, no traceback
        print(f"kdnb: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
