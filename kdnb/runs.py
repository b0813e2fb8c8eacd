"""Run records: what was run (resolved parameters), what came out (metrics, claims, figures), and
on what (package versions, device, git commit, wall time). Every file is written atomically
(temp file + rename) so an interrupted run never leaves a half-written result behind.

Layout of one run (written by `kdnb run` / `make reproduce`):
    results/<notebook>/<run-id>/notebook.ipynb   executed notebook (papermill)
                               params.yaml      resolved parameters
                               metrics.json     metrics and per-claim values
                               run.json         the full record (params + metrics + environment)
                               figures/*.png
                               checkpoints/     (ignored by git) lets a rerun resume
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import yaml

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(os.environ.get("KDNB_RESULTS", REPO / "results"))
# parameters that say where things are, not what is computed: they do not enter the run id, and `kdnb run`
# passes them to the notebook unresolved
LOCATION_PARAMS = ("output_dir", "data_dir")
# parameters added after run records were committed, with the value every earlier run computed with: at that value
# they stay out of the hash, so committed run ids remain valid; any other value (precision='bf16') changes the id
ADDED_LATER = {"precision": "fp32", "lr_schedule": "plateau", "test_size": None,
               "teacher_bn_train_mode": None, "shuffle": None}  # 05's flags; 03's shuffle is never None


@contextlib.contextmanager
def exclusive(lock_path: str | os.PathLike, waiting: str | None = None):
    """Hold an exclusive lock on `lock_path` (created if needed) for the block; another process (or thread) asking
    for the same lock waits, after printing `waiting` once. Serialises one machine, not hosts sharing a filesystem."""
    import fcntl

    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                print(waiting, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def teacher_lock(path: Path):
    """The lock a cached teacher is trained under: a second run of the same configuration waits for the first and
    then loads its weights, instead of training the same teacher beside it (and writing the same checkpoint)."""
    return exclusive(Path(path).with_suffix(".lock"), f"waiting for another process training the teacher "
                                                      f"{Path(path).name}")


def param(params: dict, name: str):
    """A record's parameter; one added after the record was made (ADDED_LATER) has the value every earlier run used."""
    return params.get(name, ADDED_LATER.get(name))


class NotWritableError(PermissionError):
    """A folder a run must write (results, checkpoints, the kdnb cache) is not writable: one line naming it,
    raised before any work so that no training is thrown away at its first write."""


def check_writable(folder: str | os.PathLike, what: str) -> Path:
    """Create `folder` if needed and prove a file can be written in it (a temp file, removed at once)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".kdnb-write-check.", suffix=".tmp")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise NotWritableError(f"{what} {folder} is not writable ({e.strerror or type(e).__name__}); "
                               f"make it writable or point {_HOW_TO_MOVE.get(what, 'it')} elsewhere") from None
    return folder


_HOW_TO_MOVE = {"results folder": "output_dir / --results / KDNB_RESULTS", "kdnb cache": "KDNB_CACHE",
                "output_dir": "output_dir", "checkpoints folder": "output_dir"}


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """A temp path beside `path` for the block to write; renamed over `path` when the block ends, removed when it
    raises. Readers see the old file or the new one, never half of one; the temp name is unique, so two processes
    writing the same path at once never write into one file (the last rename wins, whole). Every writer of the
    package goes through here."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600: the file is as readable as one written plainly
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """A temp folder beside `path` for the block to fill; renamed to `path` when the block ends, removed when it
    raises. Readers find no folder or the whole one. When another process renamed its own first, that one stays
    (callers write the same seeded content) and ours is dropped. An existing `path` is the caller's to check first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def _jsonable(obj):
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:  # 0-d torch tensor
        return obj.item()
    if isinstance(obj, float) and obj != obj:
        return None  # NaN has no JSON spelling
    return obj


def atomic_write_json(path, obj) -> Path:
    return atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=True) + "\n")


def atomic_write_yaml(path, obj) -> Path:
    return atomic_write_text(path, yaml.safe_dump(_jsonable(obj), sort_keys=True))


def atomic_save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """A matplotlib figure as PNG (format given: the temp file's name does not end in .png)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    return Path(path)


def digest(data, n: int | None = None, algo: str = "sha1", *, default=None) -> str:
    """The first `n` hex digits (all of them: None) of `algo` over bytes as they are, or over anything else as JSON
    with sorted keys (`default` as json.dumps takes it). Run ids and cache keys are spelt with it: committed results/
    folders and cached teachers are named by its output, so not one byte of it may change (tests/test_digests.py)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        data = json.dumps(data, sort_keys=True, default=default).encode()
    return hashes([data], algo)[algo][:n]


def hashes(chunks: Iterable[bytes], *algos: str) -> dict[str, str]:
    """{algo: full hex digest} of the bytes `chunks` yields, every algorithm in one pass (a large file is read once)."""
    hs = {a: hashlib.new(a) for a in algos}
    for chunk in chunks:
        for h in hs.values():
            h.update(chunk)
    return {a: h.hexdigest() for a, h in hs.items()}


def file_hashes(path: str | os.PathLike, *algos: str) -> dict[str, str]:
    """hashes() of a file's bytes, read in 1 MiB chunks (a dataset file need not fit in memory twice)."""
    with open(path, "rb") as f:
        return hashes(iter(lambda: f.read(1 << 20), b""), *algos)


def run_id(params: dict) -> str:
    """<profile>-<hash of the resolved parameters>: the same parameters always land in the same folder,
    which is what makes a finished run skippable and an interrupted one resumable."""
    keyed = {k: v for k, v in params.items()
             if k not in LOCATION_PARAMS and not (k in ADDED_LATER and v == ADDED_LATER[k])}
    return f"{params.get('profile', 'run')}-{digest(_jsonable(keyed), 10)}"


def newest_first(records: list[dict]) -> list[dict]:
    """Records by finish time, newest first (then by run id): where two runs computed the same seed, the newest one's
    value is the one counted - an older run may predate a code or thread-count change (float32 full runs are not
    bit-equal across thread counts)."""
    return sorted(sorted(records, key=lambda r: str(r.get("run_id"))), key=lambda r: str(r.get("finished") or ""),
                  reverse=True)


def git_commit() -> str | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


LOCK = REPO / "requirements.lock"


def lock_hash() -> str | None:
    """sha256 (first 16 hex digits) of the pinned environment the run was installed from, if this is a checkout."""
    return digest(LOCK.read_bytes(), 16, "sha256") if LOCK.is_file() else None


def environment(device: str = "cpu") -> dict:
    import numpy
    import torch
    import torchvision

    env = {"lock_sha256": lock_hash(), "default_dtype": str(torch.get_default_dtype()).removeprefix("torch."),
           "python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine(),
           "torch": torch.__version__, "torchvision": torchvision.__version__, "numpy": numpy.__version__,
           # the intra-op thread count changes the order of float sums, hence the last digits of non-smoke numbers
           "cpu_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
           "device": device, "git_commit": git_commit()}
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


class Run:
    """The record of one notebook execution. With output_dir=None (interactive use, nbval) nothing is
    written and no checkpoints are kept, so the notebook behaves the same wherever it runs."""

    def __init__(self, notebook: str, params: dict, output_dir: str | os.PathLike | None = None,
                 device: str = "cpu"):
        self.notebook, self.params, self.device = notebook, dict(params), device
        self.dir = Path(output_dir) if output_dir else None
        self.metrics: dict[str, Any] = {}
        self.claims: dict[str, dict] = {}
        self.figures: list[str] = []
        self.started = time.time()
        from . import data, numerics

        # every folder the run writes, before any work: a read-only one must not cost a trained teacher
        check_writable(data.cache_dir(), "kdnb cache")
        if self.dir is not None:
            check_writable(self.dir, "output_dir")  # its checkpoints/ is made inside it
        # the run's data identity is what its notebook reads from here on
        data.reset_reads()
        self._data_checked = False
        # smoke on CPU: float64 on one thread, so the printed numbers are the same on any x86-64 CPU
        numerics.configure(self.params.get("profile", "smoke"), device, notebook)
        # taken at the start: the code that ran is the commit checked out when the run began
        self.environment = environment(device)
        if self.dir is not None:
            atomic_write_yaml(self.dir / "params.yaml", self.params)

    def smoke_banner(self, n_images: int) -> None:
        """One line where a smoke run's training starts: what follows checks the pipeline and says nothing else."""
        if self.params.get("profile") == "smoke":
            print(f"smoke profile: a pipeline check on {n_images:,} images, numbers mean nothing")

    def checkpoint(self, name: str) -> Path | None:
        """Path for a resumable checkpoint (None when the run keeps no files). The first call compares the data
        read so far with the data the folder's checkpoints were made from and drops them when it differs: the
        run id does not cover the data, so the same folder may meet other data."""
        if self.dir is None:
            return None
        folder = self.dir / "checkpoints"
        if not self._data_checked:
            self._data_checked = True
            dropped = guard_checkpoints(folder, data_identity())
            if dropped:
                print(f"checkpoints in {folder} were made from other data: {dropped} dropped, training again")
        return folder / f"{name}.pt"

    def log(self, **metrics) -> None:
        self.metrics.update(_jsonable(metrics))

    def claim(self, claim_id: str, values, *, verdict: str | None = None, note: str | None = None,
              seeds=None) -> None:
        """Values that speak to a claim of papers/<study>.yaml: one per seed (a number or a list of
        numbers). A verdict is given here only for qualitative claims; numeric ones are judged by
        `kdnb report` against the reported value and tolerance."""
        entry = {"values": _jsonable(values)}
        if seeds is not None:
            entry["seeds"] = list(seeds)
        if verdict:
            entry["verdict"] = verdict
        if note:
            entry["note"] = note
        self.claims[claim_id] = entry

    def save_figure(self, fig, name: str) -> Path | None:
        if self.dir is None:
            return None
        path = atomic_save_figure(fig, self.dir / "figures" / f"{name}.png")
        self.figures.append(f"figures/{name}.png")
        return path

    def finish(self) -> dict:
        record = {
            "notebook": self.notebook,
            "run_id": self.dir.name if self.dir is not None else None,
            "params": self.params,
            "metrics": self.metrics,
            "claims": self.claims,
            "figures": self.figures,
            "environment": self.environment,
            "data": data_record(),
            "wall_time_s": round(time.time() - self.started, 1),
            "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        if self.dir is not None:
            atomic_write_json(self.dir / "metrics.json", {"metrics": self.metrics, "claims": self.claims})
            atomic_write_json(self.dir / "run.json", record)
        return record


# ---------------------------------------------------------------- the data a run read


def data_identity() -> str | None:
    from . import data

    return data.identity_of(data.reads())


def data_record() -> dict:
    """run.json's `data`: one digest for everything the notebook read, and per split the files and their digests."""
    from . import data

    reads = data.reads()
    return {"identity": data.identity_of(reads), "reads": reads}


DATA_STAMP = "data.json"


def guard_checkpoints(folder: Path, identity: str | None) -> int:
    """Stamp `folder` with the data identity its checkpoints are made from; when a stamp says other data, delete
    them (resuming would mix two datasets) and return how many. Folders from before stamps are left alone."""
    stamp = folder / DATA_STAMP
    stamped = stamp.is_file()
    if stamped:
        try:
            old = json.loads(stamp.read_text()).get("identity")
        except (OSError, ValueError, AttributeError):
            old = "unreadable"
        if old == identity:
            return 0
    dropped = 0
    if stamped:
        for ckpt in folder.glob("*.pt"):
            ckpt.unlink(missing_ok=True)
            dropped += 1
    atomic_write_json(stamp, {"identity": identity})
    return dropped
