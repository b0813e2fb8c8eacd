"""`kdnb run NOTEBOOK`, `kdnb report`: batch reruns with papermill and the reported-vs-reproduced table.

    kdnb run 05_self_distillation --profile reduced -p sd_alphas "[0.0, 0.6]"
    kdnb report
"""
from __future__ import annotations

import argparse
import ast
import os
import sys
from pathlib import Path

from . import runs

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


def plan(name: str, given: dict) -> tuple[Path, dict, dict, Path]:
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
    out = runs.RESULTS / path.stem / runs.run_id(resolved)
    return path, given, resolved, out


def run(name: str, given: dict, *, force: bool = False, log_output: bool = False) -> Path:
    import papermill

    path, given, resolved, out = plan(name, given)
    if (out / "run.json").is_file() and not force:
        print(f"already finished, nothing to do: {out.relative_to(runs.REPO)}")
        return out
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "notebook.partial.ipynb"
    print(f"running {path.name} ({resolved['profile']}) -> {out.relative_to(runs.REPO)}"
          + (" (resuming from checkpoints)" if (out / "checkpoints").is_dir() else ""))
    papermill.execute_notebook(str(path), str(partial), parameters={**given, "output_dir": str(out)},
                               cwd=str(path.parent), kernel_name="python3", log_output=log_output,
                               progress_bar=True)
    os.replace(partial, out / "notebook.ipynb")
    return out


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
    sub.add_parser("report", help="regenerate results/README.md and results/summary.csv")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "run":
            given = {k: parse_value(v) for k, v in args.parameter}
            for flag, key in ((args.profile, "profile"), (args.device, "device"), (args.data_dir, "data_dir")):
                if flag is not None:
                    given[key] = flag
            run(args.notebook, given, force=args.force, log_output=args.log_output)
        elif args.cmd == "report":
            from . import report

            md, csv_path = report.write()
            print(f"wrote {md.relative_to(runs.REPO)} and {csv_path.relative_to(runs.REPO)}")
    except ValueError as e:  # user mistakes: one clear line, no traceback
        print(f"kdnb: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
