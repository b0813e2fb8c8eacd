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
import sys

from . import runner, runs, validate


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
            given = with_flags({k: runner.parse_value(v) for k, v in args.parameter}, args)
            runner.run(args.notebook, given, force=args.force, log_output=args.log_output)
        elif args.cmd == "sweep":
            from . import sweep

            fixed = with_flags({k: runner.parse_value(v) for k, v in args.parameter}, args)
            table = sweep.sweep(args.notebook, args.grid, seeds=args.seeds, fixed=fixed, backend=args.backend,
                                address=args.address, workers=args.workers, cpus_per_trial=args.cpus_per_trial,
                                gpus_per_trial=args.gpus_per_trial, max_retries=args.max_retries,
                                results=args.results, progress=not args.no_progress, ablate=args.ablate)
            if any(t["status"] == "failed" for t in table.attrs["trials"]):
                return 1
        elif args.cmd == "report":
            from . import report

            md, csv_path = report.write()
            show = runner.show
            print(f"wrote {show(md)}, {show(csv_path)} and {show(md.parent / 'attribution.csv')}")
            figures = sorted((md.parent / "figures").glob("*.png"))
            if figures:
                print("figures: " + ", ".join(show(f) for f in figures))
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
