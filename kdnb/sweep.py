"""`kdnb sweep NOTEBOOK`: every combination of a parameter grid (x seeds) is one `kdnb run`.

    kdnb sweep 05_self_distillation --profile reduced --grid "sd_alphas=[0.0,0.6],[0.6]" epochs=5,10 --seeds 0,1,2
    kdnb sweep 05_self_distillation --grid lr=1e-3,1e-4 --seeds 0,1 --backend ray --address HEAD:6379 --gpus-per-trial 1

Grid syntax: `NAME=V1,V2,...`; values are separated by commas *outside* brackets and quotes, and each is
read like `kdnb run -p NAME VALUE` (a Python literal, else a string). A list-valued grid point is written in
brackets: `sd_alphas=[0.0,0.6],[0.6]` is two points, `[0.0, 0.6]` and `[0.6]`; `x=[1,2]` is one point.
`--seeds 0,1,2` runs every combination once per seed, passed as `seeds=[s]` (or `seed=s` to a notebook that
has a `seed` parameter and no `seeds`).

Everything is checked before any trial starts: grid syntax, every parameter name against the notebook's
`parameters` cell, and each trial's resolved parameters (`kdnb.runner.plan`). A trial is the `kdnb run` of its
parameters, so it lands in `results/<notebook>/<run-id>/` (run id = hash of the resolved parameters): a
finished trial is skipped ('cached'), a failed or killed one is retried and resumes from its checkpoints in
the same folder, and its record (run.json, written atomically by the notebook) exists once.

Backends: `local` runs trials in a process pool on this machine; `ray` submits each trial as a Ray task —
on a local cluster started here, or on an existing cluster with `--address` (every node needs this package
importable: `pip install -e .` of the same checkout on every node, or a shared filesystem).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path

from . import numerics, runner, runs, validate

BACKENDS = ("local", "ray")
# files of a finished run that travel back to the driver when a Ray worker ran on another machine
RECORD_FILES = ("notebook.ipynb", "run.json", "metrics.json", "params.yaml")


# --------------------------------------------------------------------------- parsing

def split_values(text: str) -> list[str]:
    """Split at commas outside brackets and quotes: '[0.0,0.6],[0.6]' -> ['[0.0,0.6]', '[0.6]']."""
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch in "[({":
            depth += 1
        elif ch in "])}":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced {ch!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if quote or depth:
        raise ValueError("unbalanced brackets or quotes")
    parts.append(text[start:])
    return [p.strip() for p in parts]


def parse_grid(specs) -> dict[str, list]:
    """['x=1,2', 'sd_alphas=[0.0,0.6],[0.6]'] -> {'x': [1, 2], 'sd_alphas': [[0.0, 0.6], [0.6]]}."""
    grid: dict[str, list] = {}
    for spec in specs:
        name, eq, values = spec.partition("=")
        name = name.strip()
        if not eq:
            raise ValueError(f"--grid {spec!r}: expected NAME=V1,V2,... (no '=' found)")
        if not name:
            raise ValueError(f"--grid {spec!r}: missing parameter name before '='")
        if not name.isidentifier():
            raise ValueError(f"--grid {spec!r}: {name!r} is not a parameter name")
        if name in grid:
            raise ValueError(f"--grid {spec!r}: parameter {name!r} is given twice")
        if not values.strip():
            raise ValueError(f"--grid {spec!r}: no values for parameter {name!r}")
        try:
            texts = split_values(values)
        except ValueError as e:
            raise ValueError(f"--grid {spec!r}: {e} in the values of {name!r}") from None
        if any(not t for t in texts):
            raise ValueError(f"--grid {spec!r}: empty value in the values of {name!r}")
        parsed = [runner.parse_value(t) for t in texts]
        if len({json.dumps(v, sort_keys=True, default=repr) for v in parsed}) != len(parsed):
            raise ValueError(f"--grid {spec!r}: a value of {name!r} repeats")
        grid[name] = parsed
    return grid


def parse_seeds(text) -> list[int] | None:
    """'0,1,2' -> [0, 1, 2] (also accepts a list, or None for 'no seed axis')."""
    if text is None:
        return None
    if isinstance(text, str):
        try:
            text = [int(s) for s in text.split(",")]
        except ValueError:
            raise ValueError(f"--seeds {text!r}: expected integers separated by commas, e.g. 0,1,2") from None
    return validate.seeds(text)


# --------------------------------------------------------------------------- planning

@dataclass
class Trial:
    point: dict            # the grid combination (one summary row per point)
    seed: int | None
    given: dict            # parameters injected into the notebook
    resolved: dict         # what the notebook will record (params.yaml)
    out: Path              # results/<notebook>/<run-id>/
    status: str = "pending"  # cached | done | failed
    record: dict | None = None
    error: str | None = None
    attempts: int = 0
    seconds: float | None = None
    meta: dict = field(default_factory=dict)

    def label(self) -> str:
        s = " ".join(f"{k}={_short(v)}" for k, v in self.point.items())
        return (s + (f" seed={self.seed}" if self.seed is not None else "")).strip() or "(defaults)"


def _short(v) -> str:
    return json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v)


def plan(notebook: str, grid: dict, *, seeds=None, fixed: dict | None = None,
         results: Path | None = None, points: list[dict] | None = None) -> list[Trial]:
    """Every trial, checked and resolved with kdnb.runner.plan before any of them starts. `points` (a list of
    parameter dicts, e.g. the ablation's) replaces the grid's product."""
    fixed = dict(fixed or {})
    path = runner.notebook_path(notebook)
    names = runner.notebook_parameters(path)
    if points is not None and grid:
        raise ValueError("--ablate makes its own trials (one quirk flag at a time); it cannot take --grid too")
    for name in list(grid) + list(fixed) + [k for p in points or [] for k in p]:  # the first unknown name, before any expansion
        if name not in names:
            raise ValueError(f"parameter {name!r} is not a parameter of {path.name}; "
                             f"its parameters are: {', '.join(names)}")
    both = sorted((set(grid) | {k for p in points or [] for k in p}) & set(fixed))
    if both:
        raise ValueError(f"parameter {both[0]!r} is given both as a grid axis (or by --ablate) and as a fixed value")
    for name in runs.LOCATION_PARAMS:
        if name in grid:
            raise ValueError(f"parameter {name!r} says where things are, it cannot be a grid axis")
    seed_key = None
    if seeds is not None:
        seed_key = "seeds" if "seeds" in names else "seed" if "seed" in names else None
        if seed_key is None:
            raise ValueError(f"--seeds given but {path.name} has neither a 'seeds' nor a 'seed' parameter")
        if seed_key in grid or seed_key in fixed:
            raise ValueError(f"parameter {seed_key!r} is given both with --seeds and as a parameter")
    trials, seen = [], {}
    for point in points if points is not None else [dict(zip(grid, combo)) for combo in product(*grid.values())]:
        for seed in (seeds if seeds is not None else [None]):
            given = {**fixed, **point}
            if seed is not None:
                given[seed_key] = [seed] if seed_key == "seeds" else seed
            _, given, resolved, out = runner.plan(str(path), given, results)
            t = Trial(point=point, seed=seed, given=given, resolved=resolved, out=out)
            if out in seen:
                raise ValueError(f"trials {seen[out].label()!r} and {t.label()!r} resolve to the same parameters "
                                 f"(run {out.name}); drop one of the grid values")
            seen[out] = t
            trials.append(t)
    return trials


# --------------------------------------------------------------------------- one trial (runs on a worker)

def execute(notebook: str, given: dict, results: str | None, driver_host: str | None = None,
            driver_out: str | None = None) -> dict:
    """Run one trial with `kdnb run` semantics (skip if finished, resume from checkpoints) and return its
    record. Safe to call in a fresh process: everything it needs comes in as plain arguments. On Ray, the record's
    files come back with the result whenever the worker wrote them anywhere but the folder the driver expects
    (another machine, or another checkout on the same machine: no `--results`)."""
    buf = io.StringIO()
    start = time.time()
    with contextlib.redirect_stdout(buf):
        out = runner.run(notebook, given, results=Path(results) if results else None, progress_bar=False)
    record = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else None
    result = {"out": str(out), "record": record, "seconds": round(time.time() - start, 1),
              "host": socket.gethostname(), "pid": os.getpid(), "log": buf.getvalue()}
    result["where"] = f"{result['host']}:{out}"
    elsewhere = driver_out is not None and Path(driver_out).resolve() != Path(out).resolve()
    if driver_host is not None and (driver_host != result["host"] or elsewhere):
        # another machine or checkout (maybe without a shared filesystem): the driver writes what it lacks
        files = {name: (out / name).read_bytes() for name in RECORD_FILES if (out / name).is_file()}
        for fig in sorted((out / "figures").glob("*.png")) if (out / "figures").is_dir() else []:
            files[f"figures/{fig.name}"] = fig.read_bytes()
        result["files"] = files
    return result


def _mirror(trial: Trial, files: dict) -> bool:
    """Write a remote trial's record into the driver's results folder when it is not there already; True when
    the driver's folder now holds it because of this call."""
    if not files or (trial.out / "run.json").is_file():
        return False
    for name, data in sorted(files.items(), key=lambda kv: kv[0] == "run.json"):  # run.json last
        runs.atomic_write_bytes(trial.out / name, data)
    return True


# --------------------------------------------------------------------------- backends

def _finish(trial: Trial, result: dict) -> None:
    trial.status, trial.record, trial.seconds = "done", result["record"], result["seconds"]
    trial.meta.update(host=result["host"], pid=result["pid"], where=result.get("where"))
    trial.meta["copied"] = _mirror(trial, result.get("files"))


def _done_line(t: Trial) -> str:
    """Where the trial's record is: the driver's folder, and the worker's own when the record was copied from it
    (its checkpoints stay there); never a folder the driver did not create."""
    line = f"done {t.label()} ({t.seconds:.0f} s) -> {runner.show(t.out)}"
    if t.meta.get("copied"):
        line += f" (copied from {t.meta['where']}; its checkpoints stay there)"
    elif not (t.out / "run.json").is_file() and t.meta.get("where"):
        line = f"done {t.label()} ({t.seconds:.0f} s) -> {t.meta['where']} (the worker's folder; not copied here)"
    return line


def _one_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else type(e).__name__


def _run_local(todo, notebook, results, workers, max_retries, bar, say):
    """A process pool (spawned, so no state is shared with this process). A trial that raises is
    resubmitted; a worker that dies breaks the pool, so a new pool takes the unfinished trials."""
    ctx = multiprocessing.get_context("spawn")
    queue, running = deque(todo), {}
    pool = None

    def retry_or_fail(t: Trial, err: str, charged: bool = True):
        t.attempts += charged
        if t.attempts <= max_retries:
            say(f"retrying ({t.attempts}/{max_retries}) {t.label()}: {err}")
            queue.append(t)
        else:
            t.status, t.error = "failed", err
            say(f"FAILED {t.label()}: {err}")
            bar.update(1)

    started: set = set()  # futures handed to a worker process (charged an attempt if their pool breaks)
    restarts = 0
    # Ctrl-C only sets a flag, read once per loop (wait() returns within a second): a KeyboardInterrupt raised at
    # any bytecode could leave a future's lock held inside concurrent.futures, and the shutdown below then hangs
    stop = threading.Event()
    own_handler = threading.current_thread() is threading.main_thread()  # signal.signal works there only
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set()) if own_handler else None
    try:
        while queue or running:
            if stop.is_set():
                raise KeyboardInterrupt
            if pool is None:
                pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
            # no more than the pool runs at once: a future handed to the pool beyond that sits in its call queue
            # marked running, so a worker death would charge a retry to a trial that never started
            while queue and len(running) < workers:
                t = queue.popleft()
                running[pool.submit(execute, notebook, t.given, results)] = t
            started |= {f for f in running if f.running()}
            done, _ = wait(running, timeout=1.0, return_when=FIRST_COMPLETED)
            broken = False
            for fut in done:
                t = running.pop(fut)
                try:
                    _finish(t, fut.result())
                    say(_done_line(t))
                    bar.update(1)
                except BrokenProcessPool:
                    broken = True
                    retry_or_fail(t, "worker process died", charged=fut in started)
                except Exception as e:  # the notebook failed: papermill raises PapermillExecutionError
                    retry_or_fail(t, _one_line(e))
            if broken:  # every other future of this pool fails too: requeue them, charge only the started ones
                for fut, t in list(running.items()):
                    running.pop(fut)
                    try:  # a broken pool resolves every future: most with BrokenProcessPool
                        _finish(t, fut.result())
                        say(_done_line(t))
                        bar.update(1)
                    except BrokenProcessPool:
                        retry_or_fail(t, "worker process died", charged=fut in started)
                    except Exception as e:
                        retry_or_fail(t, _one_line(e))
                pool.shutdown(wait=False, cancel_futures=True)
                pool = None
                restarts += 1
                if restarts > (max_retries + 1) * len(todo):  # never loop forever on a pool that keeps dying
                    for t in list(queue):
                        t.status, t.error = "failed", "worker processes keep dying"
                        bar.update(1)
                    queue.clear()
    except KeyboardInterrupt:
        # one Ctrl-C: nothing more is scheduled and the running trials stop now (they resume from their checkpoints
        # next time); waiting for them would keep the driver alive for as long as a trial takes
        if pool is not None:
            _stop_workers(pool)
            pool.shutdown(wait=False, cancel_futures=True)
            pool = None
        raise
    finally:
        if own_handler:
            signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Terminate the pool's worker processes and what they started (papermill's Jupyter kernels)."""
    import psutil

    procs = []
    for w in list((getattr(pool, "_processes", None) or {}).values()):
        try:
            parent = psutil.Process(w.pid)
            procs += parent.children(recursive=True) + [parent]
        except psutil.NoSuchProcess:
            continue
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=3)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep: says how many trials are left (`kdnb sweep` exits 130)."""


def _run_ray(todo, notebook, results, *, address, workers, cpus_per_trial, gpus_per_trial, max_retries, bar, say):
    import ray

    own = not ray.is_initialized()
    if own:
        if address:
            check_cluster(address)  # a rejected token is one line and exit 2, before any trial is submitted
            ray.init(address=address, log_to_driver=False)
        else:  # a local cluster on this machine, nothing to set up
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    elif address:
        say(f"Ray is already initialised in this process; --address {address} is ignored")
    try:
        task = ray.remote(execute).options(num_cpus=cpus_per_trial, num_gpus=gpus_per_trial,
                                           max_retries=max_retries, retry_exceptions=True)
        host = socket.gethostname()
        refs = {task.remote(notebook, t.given, results, host, str(t.out)): t for t in todo}
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            for ref in ready:
                t = refs.pop(ref)
                try:
                    _finish(t, ray.get(ref))
                    say(_done_line(t))
                except Exception as e:  # RayTaskError / WorkerCrashedError once the retries are spent
                    t.status, t.error = "failed", _one_line(e)
                    say(f"FAILED {t.label()} after {max_retries} retries: {t.error}")
                bar.update(1)
    except KeyboardInterrupt:
        for ref in list(refs):  # queued ones never start, running ones stop (and resume from checkpoints later)
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        raise
    finally:
        if own:
            ray.shutdown()


# Ray's own preflight: a driver whose token the cluster rejects otherwise prints ~20 s of InvalidAuthToken lines
# from its C++ client and then a ConnectionError, exit 1 like failed trials
PROBE = ("import sys, ray\n"
         "ray.init(address=sys.argv[1], log_to_driver=False, logging_level='ERROR')\n"
         "ray.shutdown()\n")
PROBE_TIMEOUT_S = 60


def _token_sources() -> str:
    """Where this driver's Ray would find an authentication token, said in a few words."""
    found = [f"RAY_AUTH_TOKEN ({len(os.environ['RAY_AUTH_TOKEN'])} characters)"] if os.environ.get("RAY_AUTH_TOKEN") else []
    for path in (os.environ.get("RAY_AUTH_TOKEN_PATH"), str(Path.home() / ".ray" / "auth_token")):
        if path and Path(path).is_file():
            found.append(path)
    return ", ".join(found)


def _refused(line: str) -> bool:
    return "InvalidAuthToken" in line or "Unauthenticated" in line


def check_cluster(address: str, python: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Connect to the cluster once in a child process, its output captured; a refused authentication token or an
    unreachable address is a ValueError (one line, exit 2) instead of a page of C++ log lines."""
    import subprocess
    import sys
    import threading

    proc = subprocess.Popen([python or sys.executable, "-c", PROBE, address], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines, settled = [], threading.Event()

    def read():  # stops at the first refusal: the client would go on retrying it for ~20 s
        for line in proc.stdout:
            lines.append(line.rstrip())
            if _refused(line):
                break
        settled.set()

    threading.Thread(target=read, daemon=True).start()
    answered = settled.wait(timeout)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    if any(_refused(ln) for ln in lines):
        have = _token_sources()
        why = (f"the token this driver has, from {have}, does not match the cluster's" if have else
               "this driver has no token (RAY_AUTH_TOKEN unset, no RAY_AUTH_TOKEN_PATH, no ~/.ray/auth_token)")
        raise ValueError(f"address={address!r}: the Ray cluster refused this driver's authentication token: {why}; "
                         "give it the cluster's token (export RAY_AUTH_TOKEN=... or copy ~/.ray/auth_token from the "
                         "head node) with RAY_AUTH_MODE=token")
    if not answered:
        raise ValueError(f"address={address!r}: the Ray cluster did not answer within {timeout:g} s (is its head "
                         "running there? `ray status --address ...` on that node; check the host and port)")
    if proc.returncode != 0:
        last = next((ln for ln in reversed(lines) if ln.strip()), "no output")
        raise ValueError(f"address={address!r}: cannot join the Ray cluster: {last[-300:]}")


# --------------------------------------------------------------------------- summary

def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _label(key: str, v) -> str:
    return v if isinstance(v, str) else f"{key}={v:g}" if _number(v) else f"{key}={v}"


def _dig(row, path: str):
    """row['test']['miou'] for path 'test.miou'; None where it is missing."""
    for key in path.split("."):
        row = row.get(key) if isinstance(row, dict) else None
    return row


def _table(rows, metric: str, labels: tuple[str, ...], name: str | None = None) -> dict:
    """{'name[label, ...]': value} from a metrics table (a list of row dicts); rows sharing labels (seeds) averaged."""
    found: dict[str, list] = {}
    for r in rows if isinstance(rows, list) else []:
        v = _dig(r, metric)
        if _number(v):
            tag = ", ".join(_label(k, r.get(k)) for k in labels)
            found.setdefault(f"{name or metric}[{tag}]", []).append(float(v))
    return {k: sum(v) / len(v) for k, v in found.items()}


# each study's headline numbers, which its metrics keep in tables the one-level flattening below cannot see: what a
# grid over lr or epochs changes (01's seen/unseen and 04's test accuracies are flat dicts and need nothing here)
HEADLINES = {
    "02_voc_segmentation_kd": lambda m: _table(m.get("results"), "test.miou", ("variant", "student"), "miou"),
    "03_dml_kd_calibration": lambda m: {**_table(m.get("summary"), "final_acc", ("run",)),
                                        **_table(m.get("summary"), "ece", ("run",))},
    "05_self_distillation": lambda m: _table(m.get("resnet"), "final_acc_mean", ("variant", "alpha", "step"),
                                             "final_acc"),
}


def numeric_scalars(record: dict | None) -> dict:
    """Numeric scalars of a run record: `metrics` flattened one level ('a', 'b.c'), the study's headline numbers
    (HEADLINES: 'final_acc[corrected, alpha=0.6, step=2]') and the claims whose value per seed is one number
    ('claim:E3', mean over the run's values)."""
    out = {}
    if not record:
        return out
    for k, v in (record.get("metrics") or {}).items():
        if _number(v):
            out[k] = float(v)
        elif isinstance(v, dict):
            out.update({f"{k}.{k2}": float(v2) for k2, v2 in v.items() if _number(v2)})
    if record.get("notebook") in HEADLINES:
        out.update(HEADLINES[record["notebook"]](record.get("metrics") or {}))
    for cid, entry in (record.get("claims") or {}).items():
        values = entry.get("values") if isinstance(entry, dict) else None
        if isinstance(values, list) and values and all(_number(v) for v in values):
            out[f"claim:{cid}"] = sum(values) / len(values)
    return out


def summarize(trials: list[Trial]):
    """One row per grid combination: the metrics' mean and std over seeds, n (seeds with a record), status."""
    import pandas as pd

    groups: dict[str, list[Trial]] = {}
    for t in trials:
        groups.setdefault(json.dumps(t.point, sort_keys=True, default=repr), []).append(t)
    rows = []
    for members in groups.values():
        row = {k: _short(v) if isinstance(v, (list, tuple, dict)) else v for k, v in members[0].point.items()}
        values: dict[str, list] = {}
        for t in members:
            if t.status in ("done", "cached"):
                for k, v in numeric_scalars(t.record).items():
                    values.setdefault(k, []).append(v)
        statuses = [t.status for t in members]
        row["seeds"] = _short([t.seed for t in members]) if members[0].seed is not None else "—"
        row["n"] = sum(s in ("done", "cached") for s in statuses)
        row["status"] = "+".join(f"{statuses.count(s)} {s}" if len(set(statuses)) > 1 else s
                                 for s in dict.fromkeys(statuses))
        for k, vs in sorted(values.items()):
            s = pd.Series(vs, dtype=float)
            row[f"{k}_mean"] = s.mean()
            row[f"{k}_std"] = s.std(ddof=1) if len(s) > 1 else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def format_summary(table) -> str:
    """The summary as text, each metric as 'mean ± std'."""
    import pandas as pd

    if table.empty:
        return "(no trials)"
    shown = pd.DataFrame(index=table.index)
    metrics = [c[:-5] for c in table.columns if c.endswith("_mean")]
    for c in table.columns:
        if not (c.endswith("_mean") or c.endswith("_std")):
            shown[c] = table[c]
    for m in metrics:
        mean, std = table[f"{m}_mean"], table[f"{m}_std"]
        shown[m] = [("—" if pd.isna(a) else f"{a:.4g}" + ("" if pd.isna(b) else f" ± {b:.2g}"))
                    for a, b in zip(mean, std)]
    return shown.to_string(index=False)


# --------------------------------------------------------------------------- the sweep

def sweep(notebook: str, grid=None, *, seeds=None, fixed: dict | None = None, backend: str = "local",
          address: str | None = None, workers: int | None = None, cpus_per_trial: float = 1,
          gpus_per_trial: float = 0, max_retries: int = 2, results: Path | str | None = None,
          progress: bool = True, echo=print, ablate: bool = False):
    """Run every trial of the grid (x seeds) and return the summary table (pandas; one row per combination).
    `grid` is {name: [values]} or a list of 'NAME=V1,V2' strings; `seeds` a list or '0,1,2'. `ablate=True`: instead
    of a grid, the study's one-quirk-at-a-time points (kdnb.attribution.points: both ends, each flag flipped from
    either end, the protocol row).
    The trials themselves are in `table.attrs['trials']` (point, seed, status, folder, error)."""
    from tqdm.auto import tqdm

    validate.choice("backend", backend, BACKENDS)
    if address and backend != "ray":
        raise ValueError(f"address={address!r} needs --backend ray")
    if workers is not None:
        validate.positive_int("workers", workers)
    validate.non_negative_int("max_retries", max_retries)
    validate.positive("cpus_per_trial", cpus_per_trial)
    if isinstance(gpus_per_trial, bool) or not isinstance(gpus_per_trial, (int, float)) or gpus_per_trial < 0:
        validate.fail("gpus_per_trial", gpus_per_trial, "must be a number >= 0 (a fraction shares a GPU)")
    if gpus_per_trial and backend != "ray":
        raise ValueError("gpus_per_trial needs --backend ray (the local backend does not schedule GPUs)")
    grid = parse_grid(grid or []) if not isinstance(grid, dict) else dict(grid)
    seeds = parse_seeds(seeds)
    results = Path(results).resolve() if results is not None else None

    points = None
    if ablate:
        from . import attribution

        name = runner.notebook_path(notebook).stem
        ablation_rows = attribution.points(name)  # a study without quirk flags: one line naming those that have them
        study = attribution.study(name)
        fixed = {"profile": study.ATTRIBUTION_PROFILE, **(fixed or {})}
        if fixed["profile"] != study.ATTRIBUTION_PROFILE:  # its records would never reach results/attribution.csv
            validate.fail("profile", fixed["profile"], f"--ablate runs {name}'s attribution profile "
                          f"{study.ATTRIBUTION_PROFILE!r} (leave --profile out)")
        # a study may cover every row with fewer runs (04: both t2_scaling values in one run); rows that are the
        # same parameters from either end (two flags: faithful + one = corrected - the other) run once
        wanted = getattr(study, "ABLATION_RUNS", None) or [p for _, _, p in ablation_rows]
        points = list({json.dumps(p, sort_keys=True): p for p in wanted}.values())
    trials = plan(notebook, grid, seeds=seeds, fixed=fixed, results=results, points=points)  # raises before anything runs
    numerics.thread_policy()  # before the pool or Ray starts: workers and their kernels inherit it
    for t in trials:
        if (t.out / "run.json").is_file():
            t.status, t.record = "cached", json.loads((t.out / "run.json").read_text())
    todo = [t for t in trials if t.status == "pending"]
    # a notebook named from notebooks/ is resolved by each worker in its own checkout; a path must exist there
    nb_arg = notebook if Path(notebook).suffix != ".ipynb" else str(Path(notebook).resolve())
    res_arg = str(results) if results is not None else None
    cached = len(trials) - len(todo)
    echo(f"sweep {runner.notebook_path(notebook).name}: {len(trials)} trials "
         f"({len(trials) // max(1, len(seeds or [None]))} {'ablation runs' if ablate else 'combinations'} "
         f"x {len(seeds or [None])} seeds), "
         f"{cached} finished already, {len(todo)} to run on {backend}")
    bar = tqdm(total=len(trials), initial=cached, desc="trials", unit="trial", disable=not progress)
    say = bar.write if progress else echo
    start = time.time()
    try:
        if todo and backend == "local":
            # default 1 worker: trials are notebooks that already use every core (torch threads), and the
            # reference machine has 2; more workers only make them fight over the cores
            _run_local(todo, nb_arg, res_arg, workers or 1, max_retries, bar, say)
        elif todo:
            _run_ray(todo, nb_arg, res_arg, address=address, workers=workers, cpus_per_trial=cpus_per_trial,
                     gpus_per_trial=gpus_per_trial, max_retries=max_retries, bar=bar, say=say)
    except KeyboardInterrupt:
        left = [t for t in todo if t.status not in ("done", "failed")]
        raise SweepInterrupted(f"interrupted: {len(left)} of {len(trials)} trials not finished; rerun the same "
                               "command to run them (interrupted ones resume from their checkpoints)") from None
    finally:
        bar.close()
    table = summarize(trials)
    table.attrs["trials"] = [dict(point=t.point, seed=t.seed, status=t.status, out=str(t.out), error=t.error,
                                  seconds=t.seconds) for t in trials]
    failed = [t for t in trials if t.status == "failed"]
    echo(f"\n{len(trials) - len(failed)}/{len(trials)} trials have results "
         f"({len(todo) - len(failed)} run now in {time.time() - start:.0f} s, {cached} cached)"
         + (f"; {len(failed)} FAILED" if failed else ""))
    echo(format_summary(table))
    return table
