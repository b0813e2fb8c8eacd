"""One notebook executed with papermill into results/<notebook>/<run-id>/: its parameters checked against the
notebook's `parameters` cell and the profile resolved before anything runs (`plan`), the run folder locked, a finished
record reused unless the data it read has changed (`run`). `kdnb run` and every trial of `kdnb sweep` come here; this
module is apart from kdnb.cli so that sweep and profiles need not import the command line that imports them."""
from __future__ import annotations

import ast
import os
from pathlib import Path

from . import runs, validate

NOTEBOOKS = runs.REPO / "notebooks"


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
    resolved = profiles.resolve(path.stem, **{k: v for k, v in merged.items() if k not in runs.LOCATION_PARAMS})
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
                print(f"already finished, nothing to do: {show(out)}" + (f" ({note})" if note else ""))
                return out
            print(f"finished record in {show(out)} is not reused: {stale}")
        resuming = any((out / "checkpoints").glob("*.pt"))
        print(f"running {path.name} ({resolved['profile']}) -> {show(out)}"
              + (" (resuming from checkpoints)" if resuming else ""))
        papermill.execute_notebook(str(path), str(partial), parameters={**given, "output_dir": str(out)},
                                   cwd=str(path.parent), kernel_name="python3", log_output=log_output,
                                   progress_bar=progress_bar)
        os.replace(partial, final)
    return out


def _folder_lock(out: Path):
    """An exclusive lock on a run folder, held while its notebook runs. The lock file lives in the kdnb cache (a
    run folder holds only its record), so it serialises runs of one machine, not of several sharing a filesystem."""
    from . import data

    folder = runs.check_writable(data.cache_dir() / "locks", "kdnb cache")
    path = folder / f"{runs.digest(str(out.resolve()).encode(), 16)}.lock"
    return runs.exclusive(path, f"waiting for another kdnb run of {show(out)} to finish")


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


def show(path: Path) -> str:
    """A path as printed: relative to the checkout when it is inside it."""
    try:
        return str(path.relative_to(runs.REPO))
    except ValueError:
        return str(path)
