"""CUDA evidence (issue 17): one prepared command that runs, on a lent GPU machine and inside a time budget,
 (a) every notebook's smoke profile with device=cuda, (b) 03 `full` (one seed), (c) 05's ResNet part at the source's
settings (profile full) on the lossless CIFAR-10 *subset* (4,000 train / 1,000 test images, not the full 50,000 /
10,000), (d) one training epoch per study on CUDA (images/s, peak GPU memory, fp32 vs bf16 where the study has bf16),
and returns every run folder in results/'s layout.

Here (no GPU needed), from the repository root:
    make gpu-evidence                  # = --prepare: packs the data the parts need into .device/data (ignored)
    make gpu-evidence DRY=1            # = --dry: the whole sequence on CPU with tiny sizes, into a temp folder

Then fire it with the device tool's `run` (one call; the machine starts bare, .venv does NOT travel):
    command:   PYTHONUNBUFFERED=1 python3 benchmarks/gpu_evidence.py --out "$OUT" --budget-s 480
    carry:     [".device/data"]
    timeout_s: 570
and unpack what comes back at the repository root:
    tar -xzf <files_at>/results.tar.gz     # -> results/<notebook>/<run-id>/ and gpu_evidence_logs/
    <files_at>/gpu_evidence.json            # one record per part: ok / failed / timeout / skipped, seconds, why
(results/*/smoke-*/ is git-ignored: gpu_evidence.json is what records (a) and (d)). With the guessed costs below,
(b) and (c) do not fit 8 minutes and are skipped; the summary's `projections_s` turns (d)'s measured epochs into
their real cost (one device command may run at most 600 s: `--parts b --budget-s 540` is the most one call gives).

The GPU machine cannot reach any package index. Its `python3` must already hold torch and torchvision (it does:
check with `python3 -c 'import torch'`; only where it is missing install, with `pip install -r requirements.lock`
then `pip install --no-deps -e .`, which needs an index). Besides torch the script and the notebooks need only what
requirements.lock pins and that image already has (numpy, pandas, matplotlib, seaborn, pyyaml, tqdm, torchmetrics,
scikit-learn, pillow); kdnb itself is imported from the checkout (PYTHONPATH), not installed. papermill (with
nbformat, nbclient, ipykernel) is not in that image: the notebooks then run through the in-process executor below
(their code cells in order, parameters injected after the `parameters` cell, as papermill does), and the records
say which executor ran them.

Why the data is packed, not copied: the tool carries at most 64 MiB *including the working tree* (28 MiB now), so
the .gz files (Fashion-MNIST 31 MB + CIFAR subset 14 MB = 45 MB) do not fit. Fashion-MNIST goes as xz (26 MB),
the CIFAR images as lossless WebP (8 MB); the GPU side rebuilds torchvision's layouts (FashionMNIST/raw/<idx files>,
cifar10-subset/cifar10_subset.npz) in a scratch folder and checks every array's sha256. MNIST is not carried: no
part reads it (smoke runs read the samples shipped in kdnb/_samples) and its 12 MB would not fit.
Why a tarball: the tool returns at most 8 files, no more than 2 folders deep, 16 MiB each.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import io
import json
import lzma
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # kdnb from this checkout: the GPU machine has no .venv and no installed kdnb

MIB = 2 ** 20
CARRY_LIMIT = 64 * MIB  # the device tool's limit for the working tree plus carried paths, together
CARRY_MARGIN = 2 * MIB  # room for records committed between --prepare and the call
TAR_LIMIT = 15 * MIB    # one returned file is at most 16 MiB
NOTEBOOKS = sorted(p.stem for p in (REPO / "notebooks").glob("[0-9]*.ipynb"))
FMNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte")
DATA_OF_PART = {"b": "fashion_mnist", "c": "cifar10_subset"}
SUBSET_NOTE = "CIFAR-10 lossless subset: the first 4,000 training and 1,000 test images, not the full 50,000 / 10,000"

# Guessed seconds on one H200 (rewrite them from the measured `seconds` of the first call's summary):
#  a  process start + torch import + CUDA init + a few steps, per notebook
#  b  12 algorithm runs x 10 epochs x 55,000 images go through 03's per-image RandAugment loop (~0.25 ms per image
#     on CPU, bench_03; a GPU does not make a Python loop faster): ~1,650 s for the augmentation alone
#  c  2 variants x 5 steps x 75 epochs x 250 batches of 16 = 187,500 ResNet-50 steps, launch-bound at ~8 ms
#  d  one epoch plus set-up per study and precision
GPU_EST = {"a": 40, "b": 1800, "c": 1800, "d01": 25, "d02": 35, "d03": 50, "d04": 25, "d05": 30}
DRY_EST = {"a": 25, "b": 25, "c": 25, "d": 10}

# --dry: every part with the smallest parameters its notebook accepts (device=cpu). (a) runs only the two quick
# notebooks: 02, 03 and 05 smoke take 1-2 min each on 2 busy cores, and the code path is the same for all five
DRY_SMOKE = {"01_mnist_unseen_classes": {"epochs": 1}, "04_emnist_mlp_student": {"epochs": 1, "teacher_epochs": 1}}
DRY_03 = {"data_source": "real", "train_per_class": 8, "holdout_per_class": 1, "val_size": 20, "epochs": 1,
          "teacher_epochs": 1, "batch_size": 4, "algorithms": ["baseline"], "downscale_sizes": [14]}
DRY_05 = {"data_source": "subset", "arch": "resnet18", "epochs": 1, "distillation_steps": 2, "batch_size": 64,
          "variants": ["faithful"]}
# (d): study -> (images in its full-profile training set, tiny size for --dry); bf16 only where the study has it
BENCH = {"01": (60_000, 600), "02": (1_264, 8), "03": (55_000, 160), "04": (124_800, 512), "05": (4_000, 64)}
BF16_STUDIES = ("02", "03")


class EvidenceError(Exception):
    """A mistake to report as one line (wrong folder, too much data), not as a traceback."""


# ---------------------------------------------------------------- data: pack here, unpack there


def tree_bytes() -> int:
    """Bytes of what the device tool sends besides `carry`: tracked and untracked-not-ignored files."""
    out = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                         check=True).stdout.decode()
    return sum((REPO / f).stat().st_size for f in out.split("\0") if f and (REPO / f).is_file())


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def check_size(data_dir: Path, tree: int, limit: int = CARRY_LIMIT, margin: int = CARRY_MARGIN) -> int:
    data = folder_bytes(data_dir)
    if data + tree + margin > limit:
        raise EvidenceError(f"{data_dir} holds {data / MIB:.1f} MiB and the working tree {tree / MIB:.1f} MiB: "
                            f"{(data + tree) / MIB:.1f} MiB, over the device tool's {limit / MIB:.0f} MiB less "
                            f"{margin / MIB:.0f} MiB of margin; carry fewer parts (--parts) or shrink the tree")
    return data


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _idx_bytes(raw: Path, name: str) -> bytes:
    import gzip

    if (raw / name).is_file():
        return (raw / name).read_bytes()
    if (raw / (name + ".gz")).is_file():
        return gzip.decompress((raw / (name + ".gz")).read_bytes())
    raise EvidenceError(f"{raw / name}(.gz) not found: point --source / KDNB_DATA at ../shared/datasets")


def _mosaic(x, cols: int = 100):
    """[N,32,32,3] uint8 -> one image of ceil(N/cols) x cols tiles (WebP compresses across tiles)."""
    import numpy as np

    n, h, w, c = x.shape
    rows = math.ceil(n / cols)
    pad = np.zeros((rows * cols - n, h, w, c), x.dtype)
    return np.concatenate([x, pad]).reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


def _unmosaic(m, n: int, h: int = 32, w: int = 32, cols: int = 100):
    c = m.shape[2]
    rows = m.shape[0] // h
    return m.reshape(rows, h, cols, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * cols, h, w, c)[:n]


def prepare(source: Path, dest: Path, parts: str, *, check_tree: bool = True) -> dict:
    """Pack the datasets the chosen parts read into `dest` (emptied first) and check the carry size."""
    import numpy as np
    from PIL import Image

    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    manifest = {}
    needed = {DATA_OF_PART[p] for p in parts if p in DATA_OF_PART}
    if "fashion_mnist" in needed:
        raw = source / "FashionMNIST" / "raw"
        (dest / "FashionMNIST" / "raw").mkdir(parents=True)
        for name in FMNIST_FILES:
            b = _idx_bytes(raw, name)
            rel = f"FashionMNIST/raw/{name}"
            (dest / (rel + ".xz")).write_bytes(lzma.compress(b, preset=9 | lzma.PRESET_EXTREME))
            manifest[rel] = {"packed": rel + ".xz", "sha256": _sha(b)}
    if "cifar10_subset" in needed:
        npz = source / "cifar10-subset" / "cifar10_subset.npz"
        if not npz.is_file():
            raise EvidenceError(f"{npz} not found: point --source / KDNB_DATA at ../shared/datasets")
        (dest / "cifar10-subset").mkdir()
        with np.load(npz) as z:
            arrays = {k: z[k] for k in z.files}
        rest = {}
        for k, a in arrays.items():
            if a.ndim == 4:  # images: lossless WebP, 28 % smaller than xz on these photos
                buf = io.BytesIO()
                Image.fromarray(_mosaic(a)).save(buf, "WEBP", lossless=True, quality=100, method=6)
                (dest / "cifar10-subset" / f"{k}.webp").write_bytes(buf.getvalue())
            else:
                rest[k] = a
        np.savez_compressed(dest / "cifar10-subset" / "labels.npz", **rest)
        manifest["cifar10-subset/cifar10_subset.npz"] = {
            "packed": "cifar10-subset", "arrays": {k: {"shape": list(a.shape), "dtype": str(a.dtype),
                                                       "sha256": _sha(a.tobytes())} for k, a in arrays.items()}}
    (dest / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    try:
        data = check_size(dest, tree_bytes() if check_tree else 0)
    except EvidenceError:
        shutil.rmtree(dest)  # an over-size folder left behind would make the next device call fail instead
        raise
    return {"dest": str(dest), "bytes": data, "datasets": sorted(needed)}


def unpack(packed: Path, dest: Path) -> dict:
    """Rebuild torchvision's layouts from a prepared folder into `dest` (never into the carried folder: it would
    grow past the carry limit here); every file or array is checked against the manifest's sha256."""
    import numpy as np
    from PIL import Image

    mf = packed / "MANIFEST.json"
    if not mf.is_file():
        raise EvidenceError(f"{mf} not found: run `make gpu-evidence` (--prepare) here first and carry .device/data")
    manifest = json.loads(mf.read_text())
    for rel, m in manifest.items():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if "arrays" not in m:
            b = lzma.decompress((packed / m["packed"]).read_bytes())
            if _sha(b) != m["sha256"]:
                raise EvidenceError(f"{rel}: sha256 differs after unpacking {m['packed']}")
            target.write_bytes(b)
            continue
        with np.load(packed / m["packed"] / "labels.npz") as z:
            arrays = {k: z[k] for k in z.files}
        for k, spec in m["arrays"].items():
            if k not in arrays:
                img = np.asarray(Image.open(packed / m["packed"] / f"{k}.webp").convert("RGB"))
                arrays[k] = _unmosaic(img, spec["shape"][0]).astype(spec["dtype"])
            if _sha(np.ascontiguousarray(arrays[k]).tobytes()) != spec["sha256"]:
                raise EvidenceError(f"{rel}: array {k} differs after unpacking")
        np.savez(target, **arrays)
    return {"datasets": sorted(manifest)}


# ---------------------------------------------------------------- the plan and the budget


def plan(parts: str, dry: bool) -> list[dict]:
    """The parts in the issue's order; each is one child process of this script."""
    dev = "cpu" if dry else "cuda"
    items = []
    if "a" in parts:
        for nb in (DRY_SMOKE if dry else NOTEBOOKS):
            p = {"profile": "smoke", "device": dev, **(DRY_SMOKE[nb] if dry else {})}
            items.append({"part": "a", "name": f"smoke {nb}", "notebook": nb, "params": p,
                          "est_s": DRY_EST["a"] if dry else GPU_EST["a"]})
    if "b" in parts:
        p = {"profile": "full", "device": dev, **(DRY_03 if dry else {})}
        items.append({"part": "b", "name": "03_dml_kd_calibration full, one seed", "notebook": "03_dml_kd_calibration",
                      "params": p, "est_s": DRY_EST["b"] if dry else GPU_EST["b"]})
    if "c" in parts:
        p = {"profile": "full", "device": dev, **(DRY_05 if dry else {"data_source": "subset"})}
        items.append({"part": "c", "name": "05_self_distillation full (source settings) on the CIFAR-10 subset",
                      "notebook": "05_self_distillation", "params": p, "note": SUBSET_NOTE,
                      "est_s": DRY_EST["c"] if dry else GPU_EST["c"]})
    if "d" in parts:
        for study, (n_gpu, n_dry) in BENCH.items():
            for bf16 in ((False, True) if study in BF16_STUDIES else (False,)):
                items.append({"part": "d", "name": f"epoch benchmark {study} {'bf16' if bf16 else 'fp32'}",
                              "bench": study, "bf16": bf16, "device": dev, "size": n_dry if dry else n_gpu,
                              "est_s": DRY_EST["d"] if dry else GPU_EST[f"d{study}"], "reserve": True})
    if dry:  # a part that can never fit, so that --dry runs the budget's skip path too
        items.append({"part": "z", "name": "dry only: a part longer than any budget", "est_s": math.inf})
    return items


def decide(est_s: float, elapsed_s: float, budget_s: float, reserve_s: float = 0.0) -> tuple[bool, float, str]:
    """(run it?, its time limit, why not). A part starts only if its estimate fits in what is left after the time
    kept for the later `reserve` parts (the cheap benchmarks, so a long run before them cannot starve them);
    once started it may overrun its estimate up to that same limit, then it is killed and recorded as a timeout."""
    left = budget_s - elapsed_s - reserve_s
    if est_s > left:
        kept = f", {reserve_s:.0f} s kept for later parts" if reserve_s else ""
        return False, 0.0, f"would not fit: estimated {est_s:.0f} s, {max(left, 0):.0f} s left{kept}"
    return True, left, ""


# ---------------------------------------------------------------- children: one notebook, one benchmark


def _run_dirs(results: Path) -> set[str]:
    return {str(p.relative_to(results.parent)) for p in results.glob("*/*") if p.is_dir()}


def run_child(cmd: list[str], env: dict, timeout: float, log: Path) -> tuple[str, str | None]:
    """(status, error line). Its own process group, so that a timeout kills papermill's kernel too."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return "timeout", f"killed after {timeout:.0f} s, the budget's limit for this part"
        finally:
            if proc.poll() is None:  # timed out, or this script is being stopped
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if proc.returncode != 0:
        lines = log.read_text(errors="replace").strip().splitlines()
        return "failed", (lines[-1] if lines else f"exit status {proc.returncode}")[:500]
    return "ok", None


def notebook_parameters(path: Path) -> dict:
    """papermill.inspect_notebook without papermill: the `parameters` cell's assignments (literals only)."""
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            tree = ast.parse("".join(cell["source"]))
            out = {t.id: ast.literal_eval(s.value) for s in tree.body if isinstance(s, ast.Assign)
                   for t in s.targets if isinstance(t, ast.Name)}
            # the annotated form papermill's --help-notebook reads: `lr: "Optional[float]" = None  # help`
            out.update({s.target.id: ast.literal_eval(s.value) for s in tree.body
                        if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name) and s.value is not None})
            return {k: out[k] for k in sorted(out, key=lambda k: next(i for i, s in enumerate(tree.body)
                                                                          if k in _names(s)))}
    raise EvidenceError(f"{path.name} has no cell tagged 'parameters'")


def _names(stmt) -> set:
    targets = stmt.targets if isinstance(stmt, ast.Assign) else [getattr(stmt, "target", None)]
    return {t.id for t in targets if isinstance(t, ast.Name)}


class _Tee(io.TextIOBase):
    def __init__(self, stream, buf):
        self.stream, self.buf = stream, buf

    def write(self, s):
        self.stream.write(s)
        self.buf.write(s)
        return len(s)

    def flush(self):
        self.stream.flush()


def exec_notebook(name: str, given: dict) -> Path:
    """Execute a notebook's code cells in this process, as papermill would (parameters injected after the
    `parameters` cell, cwd notebooks/), into <results>/<notebook>/<run-id>/notebook.ipynb; outputs are text."""
    import matplotlib

    matplotlib.use("Agg")
    from kdnb import runner, runs, validate

    runner.notebook_parameters = notebook_parameters  # plan() checks the parameters against this, papermill or not
    path, given, resolved, out = runner.plan(name, given)
    validate.device(resolved["device"])
    out.mkdir(parents=True, exist_ok=True)
    nb = json.loads(path.read_text())
    nb.setdefault("metadata", {})["kdnb_executor"] = "benchmarks/gpu_evidence.py in-process (no papermill)"
    injected = "".join(f"{k} = {v!r}\n" for k, v in {**given, "output_dir": str(out)}.items())
    done, ns, count = [], {"__name__": "__main__"}, 0
    save = lambda rest, fname="notebook.partial.ipynb": runs.atomic_write_text(
        out / fname, json.dumps(dict(nb, cells=done + rest), indent=1))
    os.chdir(path.parent)
    print(f"running {path.name} ({resolved['profile']}) in-process -> {out}", flush=True)
    for j, cell in enumerate(nb["cells"]):
        todo = [cell]
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            todo.append({"cell_type": "code", "id": "injected-parameters", "metadata": {"tags": ["injected-parameters"]},
                         "source": injected})
        for c in todo:
            if c["cell_type"] != "code":
                done.append(c)
                continue
            count += 1
            src, where, buf, value = "".join(c["source"]), f"<{path.stem} cell {count}>", io.StringIO(), None
            try:
                with contextlib.redirect_stdout(_Tee(sys.stdout, buf)), contextlib.redirect_stderr(_Tee(sys.stderr, buf)):
                    tree = ast.parse(src)
                    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
                    exec(compile(tree, where, "exec"), ns)
                    if last is not None:  # a cell's last expression is shown, as Jupyter does
                        value = eval(compile(ast.Expression(last.value), where, "eval"), ns)
            except BaseException as e:
                error = {"output_type": "error", "ename": type(e).__name__, "evalue": str(e),
                         "traceback": traceback.format_exception(e)}
                done.append(dict(c, execution_count=count, outputs=[_stream(buf), error]))
                save(nb["cells"][j + 1:])
                raise
            outputs = [_stream(buf)] if buf.getvalue() else []
            if value is not None:
                outputs.append({"output_type": "execute_result", "execution_count": count, "metadata": {},
                                "data": {"text/plain": repr(value)}})
            done.append(dict(c, execution_count=count, outputs=outputs))
        save(nb["cells"][j + 1:])
    save([], "notebook.ipynb")
    (out / "notebook.partial.ipynb").unlink(missing_ok=True)
    return out


def _stream(buf: io.StringIO) -> dict:
    return {"output_type": "stream", "name": "stdout", "text": buf.getvalue()}


def bench(study: str, device: str, bf16: bool, n: int) -> dict:
    """One training epoch of a study's own training function on random inputs of its shapes (speed does not depend
    on pixel values), timed from the call to its return: the study's per-epoch evaluation included."""
    import torch

    from kdnb import data, models, numerics

    numerics.configure("full", device)  # float32, as reduced/full runs
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    g = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.rand(*s, generator=g).to(device)
    labels = lambda k, m: torch.randint(0, k, (m,), generator=g).to(device)
    info = {}
    if study == "01":
        from kdnb import unseen_classes as uc

        p, flags, nt = uc.PROFILES["full"], uc.VARIANTS["faithful"], max(n // 6, 100)
        mnist = uc.Mnist(rand(n, 1, 28, 28), labels(10, n), rand(nt, 1, 28, 28), rand(nt, 1, 28, 28) * 255,
                         labels(10, nt), "synthetic")
        teacher = models.TeacherMLP(dropout_at_inference=True).to(device).eval().requires_grad_(False)
        kept = int(torch.isin(mnist.train_y, torch.tensor(p["kept_classes"], device=device)).sum())
        call = lambda: uc.train_student(
            mnist, teacher, kept_classes=p["kept_classes"], seed=0, temperature=p["temperature"],
            soft_weight=p["soft_weight"], lr=p["lr"], epochs=1, batch_size=p["batch_size"], es_patience=p["es_patience"],
            select=p["select"], student=p["student"], validation=flags["validation"], val_loss=flags["val_loss"],
            heldout_size=min(p["heldout_size"], kept // 10), device=device)
        images, info = kept, {"model": "784-196-10 MLP student, KD from a 784-512-128-10 teacher", "batch_size": p["batch_size"]}
    elif study == "02":
        from kdnb import voc_segmentation as vs

        p, s = vs.PROFILES["full"], (256 if n > 100 else 64)
        teacher, _ = vs.build_teacher(download=False)  # random FCN-ResNet50: the same arithmetic as the real one
        teacher = teacher.to(device)
        if cuda:
            teacher = teacher.to(memory_format=torch.channels_last)
        img = lambda m: torch.randint(0, 256, (m, s, s, 3), generator=g, dtype=torch.uint8).to(device)
        seg = lambda m: torch.randint(0, vs.NUM_CLASSES, (m, s, s), generator=g, dtype=torch.uint8).to(device)
        n_sel = max(n // 6, 2)
        tr, sel = data.Split(img(n), seg(n), "synthetic"), data.Split(img(n_sel), seg(n_sel), "synthetic")
        call = lambda: vs.train_student(
            "response", tr, sel, seed=0, teacher=teacher, epochs=1, batch_size=p["batch_size"], lr=p["lr"],
            weight_decay=p["weight_decay"], temperature=p["temperature"], alpha_response=p["alpha_response"],
            alpha_feature=p["alpha_feature"], kd_reduction=vs.VARIANTS["faithful"]["kd_reduction"],
            es_patience=p["es_patience"], plateau_patience=p["plateau_patience"], test_batch_size=p["test_batch_size"],
            device=device, bf16=bf16, channels_last=cuda, progress=False)
        images, info = n, {"model": f"LightweightResNet 'response' student, FCN-ResNet50 teacher, {s}x{s}",
                           "batch_size": p["batch_size"], "channels_last": cuda}
    elif study == "03":
        from kdnb import dml_calibration as dc

        # full's default is bf16 (autocast + channels_last); fp32 is the comparison
        p = dict(dc.PROFILES["full"], precision="bf16" if bf16 else "fp32", **({} if n > 1000 else {"batch_size": 8}))
        nt, nh = (10_000, 5_000) if n > 1000 else (32, 16)  # full: the whole test set, 500 per class held out
        fm = dc.Fmnist(torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8).to(device), labels(10, n),
                       rand(nh, 3, 28, 28), labels(10, nh), rand(nt, 3, 28, 28), labels(10, nt), nt)
        call = lambda: dc.train_algorithm("baseline", fm, p, seed=42, epochs=1, device=device, progress=False)
        images, info = n, {"model": "ResNet-18 baseline, per-image RandAugment, AdamW + OneCycle",
                           "batch_size": p["batch_size"], "channels_last": bf16}
    elif study == "04":
        from kdnb import emnist_student as es

        nt = max(n // 6, 100)
        d = es.Data(rand(n, 1, 28, 28), labels(26, n), rand(nt, 1, 28, 28), labels(26, nt), rand(nt, 1, 28, 28),
                    labels(26, nt), "emnist_letters", "synthetic", "test", 26)
        p = es.PROFILES["full"]
        call = lambda: es.train_student(d, seed=0, epochs=1, batch_size=p["batch_size"], device=device)
        images, info = n, {"model": "784-512-26 MLP (Keras recipe, Adadelta)", "batch_size": p["batch_size"]}
    elif study == "05":
        from kdnb import self_distillation as sd

        p = dict(sd.PROFILES["full"], **({} if n > 1000 else {"arch": "resnet18"}))
        cifar = sd.Cifar(rand(n, 3, 32, 32), labels(10, n), rand(n // 4, 3, 32, 32), labels(10, n // 4))
        call = lambda: sd.run(cifar, seed=1, arch=p["arch"], sd_alphas=p["sd_alphas"], distillation_steps=1, epochs=1,
                              batch_size=p["batch_size"], lr=p["lr"], reg_coef=p["reg_coef"], device=device,
                              progress=False, **sd.VARIANTS["faithful"])
        images, info = n, {"model": f"{p['arch']} step 0 (ground truth only), Adam + L2 term", "batch_size": p["batch_size"]}
    else:
        raise EvidenceError(f"unknown study {study!r}; known: {', '.join(BENCH)}")
    t = time.perf_counter()
    call()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    return dict(info, study=study, device=device, precision="bf16 autocast" if bf16 else "fp32", images=images,
                seconds=round(seconds, 3), images_per_s=round(images / seconds, 1),
                peak_gpu_mib=round(torch.cuda.max_memory_allocated() / MIB, 1) if cuda else None,
                gpu=torch.cuda.get_device_name() if cuda else None, torch=torch.__version__,
                note="one epoch incl. the study's per-epoch evaluation and first-call CUDA set-up; random inputs; "
                     "peak memory incl. the training set held on the GPU, as the studies hold it")


# ---------------------------------------------------------------- the driver


def atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def pack_results(work: Path, out: Path) -> dict:
    """results/<notebook>/<run-id>/ (checkpoints left out) and the logs into $OUT/results.tar.gz, atomically;
    without the executed notebooks if that is over the size one returned file may have."""
    for drop_notebooks in (False, True):
        skip = lambda ti: None if "/checkpoints" in ti.name or (drop_notebooks and ti.name.endswith(".ipynb")) else ti
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for top in ("results", "gpu_evidence_logs"):
                if (work / top).is_dir():
                    tar.add(work / top, arcname=top, filter=skip)
        if buf.tell() <= TAR_LIMIT:
            break
    atomic_write(out / "results.tar.gz", buf.getvalue())
    return {"file": "results.tar.gz", "bytes": buf.tell(), "notebooks_left_out": drop_notebooks}


def projections(parts: list[dict]) -> dict:
    """(b) and (c) from (d)'s measured epochs, so that the next call's estimates need no guessing. Lower bounds:
    03's DML cohorts train 3 students and its teacher is a ResNet-50; 05's steps 1-4 also run their teacher."""
    epoch = {(p["bench"], p["bf16"]): p["result"]["seconds"] for p in parts if p.get("result")}
    out = {}
    if ("03", True) in epoch:
        out["b_03_full_s"] = round(epoch["03", True] * 10 * 12, 0)  # 10 epochs x 12 runs (teacher, 8 algos, 3 crossq)
    if ("05", False) in epoch:
        out["c_05_full_s"] = round(epoch["05", False] * 75 * 5 * 2, 0)  # 75 epochs x 5 steps x 2 variants
    return out


def environment_check() -> list[str]:
    missing = []
    for mod in ("torch", "torchvision", "numpy", "pandas", "matplotlib", "seaborn", "yaml", "tqdm", "torchmetrics",
                "sklearn", "PIL"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    return missing


def run_part(it: dict, i: int, rec: dict, go: bool, limit: float, why: str, work: Path, env: dict, executor: str,
             start: float) -> None:
    """Run one planned part in a child process (or skip it) and fill in its record."""
    unknown = []
    if "notebook" in it:
        unknown = sorted(set(it["params"]) - set(notebook_parameters(REPO / "notebooks" / f"{it['notebook']}.ipynb")))
    if not go:
        rec.update(status="skipped", reason=why)
        return
    if unknown:  # no child, no seconds spent: the notebook itself must change
        rec.update(status="failed", error=f"{it['notebook']}.ipynb has no parameter {unknown[0]!r}: add "
                   f"`{unknown[0]} = None` to its parameters cell and pass it on to profiles.resolve")
        return
    tag = it.get("notebook") or f"bench-{it['bench']}{'-bf16' if it['bf16'] else ''}"
    log = work / "gpu_evidence_logs" / f"{i:02d}-{it['part']}-{tag}.log"
    cmd = [sys.executable, str(Path(__file__).resolve())]
    if "notebook" in it:
        cmd += ["--child-notebook", it["notebook"], "--child-params", json.dumps(it["params"]), "--executor", executor]
    else:
        cmd += ["--child-bench", it["bench"], "--device", it["device"], "--child-size", str(it["size"]),
                "--child-out", str(log.with_suffix(".json"))] + (["--bf16"] if it["bf16"] else [])
    results, t = work / "results", time.time()
    before = _run_dirs(results)
    print(f"[{t - start:6.0f} s] {it['name']} (estimated {it['est_s']:.0f} s, limit {limit:.0f} s)", flush=True)
    status, err = run_child(cmd, env, limit, log)
    rec.update(status=status, seconds=round(time.time() - t, 1), log=str(log.relative_to(work)),
               run_dirs=sorted(_run_dirs(results) - before))
    rec["run_json"] = [(work / d / "run.json").is_file() for d in rec["run_dirs"]]
    if err:
        rec["error"] = err
    if "bench" in it and status == "ok":
        rec["result"] = json.loads(log.with_suffix(".json").read_text())


def _stop(signum, frame):
    raise SystemExit(f"stopped by signal {signum}")


def drive(args) -> dict:
    start = time.time()
    signal.signal(signal.SIGTERM, _stop)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="kdnb-gpu-evidence-")).resolve()
    results = work / "results"
    results.mkdir(parents=True, exist_ok=True)
    summary = {"issue": 17, "mode": "dry (cpu, tiny sizes)" if args.dry else "gpu", "command": sys.argv,
               "budget_s": args.budget_s,
               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start)), "parts": [], "finished": False,
               "results_archive": None, "cifar10": SUBSET_NOTE}

    def write_summary():
        summary["elapsed_s"] = round(time.time() - start, 1)
        atomic_write(out / "gpu_evidence.json", (json.dumps(summary, indent=1, default=str) + "\n").encode())

    try:
        missing = environment_check()
        summary["missing_modules"] = missing
        try:
            import papermill  # noqa: F401

            executor = "papermill"
        except ImportError:
            executor = "inprocess"
        summary["executor"] = executor = executor if args.executor == "auto" else args.executor
        import torch

        summary["torch"] = torch.__version__
        summary["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        if not args.dry and summary["gpu"] is None:
            summary["warning"] = "torch sees no CUDA device: every device=cuda part will fail"
        data_dir = work / "data"
        try:
            summary["data"] = unpack(Path(args.data).resolve(), data_dir)
        except EvidenceError as e:  # (a) and (d) read no carried data: run them anyway, (b) and (c) will say why
            summary["data_error"] = str(e)
            print(f"gpu_evidence: data: {e}", flush=True)
        write_summary()
        env = dict(os.environ, KDNB_DATA=str(data_dir), KDNB_RESULTS=str(results),
                   PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
                   PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
        items = plan(args.parts, args.dry)
        print(f"gpu_evidence: {len(items)} parts, budget {args.budget_s:.0f} s, executor {executor}, "
              f"work {work}; {SUBSET_NOTE}", flush=True)
        for i, it in enumerate(items):
            reserve = sum(later["est_s"] for later in items[i + 1:] if later.get("reserve"))
            go, limit, why = decide(it["est_s"], time.time() - start, args.budget_s, reserve)
            rec = {k: v for k, v in it.items() if k != "reserve"}
            try:
                run_part(it, i, rec, go, limit, why, work, env, executor, start)
            except Exception as e:  # this part's bookkeeping broke: record it, go on with the next part
                rec.update(status="failed", error=f"gpu_evidence: {type(e).__name__}: {e}")
            summary["results_archive"] = pack_results(work, out)
            print(f"         -> {rec['status']}" + (f": {rec.get('error') or rec.get('reason')}"
                                                     if rec["status"] != "ok" else f" in {rec['seconds']} s"), flush=True)
            summary["parts"].append(rec)
            summary["projections_s"] = projections(summary["parts"])
            write_summary()
        summary["finished"] = True
    except Exception as e:  # the driver's own bug: keep what finished, say what broke
        summary["error"] = f"{type(e).__name__}: {e}"
    except SystemExit as e:
        summary["error"] = str(e)
        raise
    finally:  # also on SIGTERM (the tool's time limit): the record says where it stopped
        summary["results_archive"] = pack_results(work, out)
        write_summary()
    counts = {s: sum(p["status"] == s for p in summary["parts"]) for s in ("ok", "failed", "timeout", "skipped")}
    print(f"gpu_evidence: {counts} in {summary['elapsed_s']} s -> {out}/gpu_evidence.json, {out}/results.tar.gz"
          + (f"; error: {summary['error']}" if "error" in summary else ""), flush=True)
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepare", action="store_true", help="pack the data into --data here (before the GPU call)")
    ap.add_argument("--dry", action="store_true", help="the whole sequence on CPU, tiny sizes, temp --out")
    ap.add_argument("--parts", default="abcd", help="which of a b c d to prepare / run (default abcd)")
    ap.add_argument("--budget-s", type=float, default=None, help="seconds for all parts (default 480; --dry 270)")
    ap.add_argument("--out", help="where gpu_evidence.json and results.tar.gz go (the tool's $OUT)")
    ap.add_argument("--work", help="scratch folder for the runs and the unpacked data (default: a new temp folder)")
    ap.add_argument("--data", help="prepared folder (default .device/data; --dry: packed from the shipped samples)")
    ap.add_argument("--source", default=os.environ.get("KDNB_DATA") or str(REPO.parent / "shared" / "datasets"),
                    help="--prepare reads the datasets here (default $KDNB_DATA, else ../shared/datasets)")
    ap.add_argument("--executor", choices=["auto", "papermill", "inprocess"], default="auto",
                    help="how notebooks run: papermill (kdnb run) where importable, else in-process")
    ap.add_argument("--child-notebook", help=argparse.SUPPRESS)
    ap.add_argument("--child-params", help=argparse.SUPPRESS)
    ap.add_argument("--child-bench", help=argparse.SUPPRESS)
    ap.add_argument("--child-size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    ap.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    try:
        if args.child_notebook:
            given = json.loads(args.child_params)
            if args.executor == "papermill":
                from kdnb import runner

                runner.run(args.child_notebook, given, progress_bar=False)
            else:
                exec_notebook(args.child_notebook, given)
            return 0
        if args.child_bench:
            result = bench(args.child_bench, args.device, args.bf16, args.child_size)
            print(json.dumps(result), flush=True)
            Path(args.child_out).write_text(json.dumps(result) + "\n")
            return 0
        bad = set(args.parts) - set("abcd")
        if bad:
            raise EvidenceError(f"--parts={args.parts!r}: only a, b, c and d exist")
        if args.prepare:
            info = prepare(Path(args.source), Path(args.data or REPO / ".device" / "data"), args.parts)
            print(f"gpu_evidence: packed {', '.join(info['datasets']) or 'nothing'} into {info['dest']} "
                  f"({info['bytes'] / MIB:.1f} MiB; with the working tree {(info['bytes'] + tree_bytes()) / MIB:.1f} "
                  f"of {CARRY_LIMIT / MIB:.0f} MiB). Now fire, with the device tool's run (carry [\".device/data\"], "
                  f"timeout_s 570):\n  PYTHONUNBUFFERED=1 python3 benchmarks/gpu_evidence.py --out \"$OUT\" --budget-s 480")
            return 0
        if args.budget_s is None:
            args.budget_s = 270.0 if args.dry else 480.0
        if args.dry:
            args.out = args.out or tempfile.mkdtemp(prefix="kdnb-gpu-evidence-out-")
            if args.data is None:  # the shipped samples in the real layouts, packed as --prepare packs them
                src = Path(args.work or tempfile.mkdtemp(prefix="kdnb-gpu-evidence-")) / "dry-source"
                args.work = str(src.parent)
                _dry_source(src)
                args.data = str(prepare(src, src.parent / "dry-packed", args.parts, check_tree=False)["dest"])
        elif not args.out:
            raise EvidenceError("--out is required (the device tool's $OUT), or use --prepare / --dry")
        args.data = args.data or str(REPO / ".device" / "data")
        drive(args)
        return 0
    except EvidenceError as e:
        print(f"gpu_evidence: error: {e}", file=sys.stderr)
        return 2


def _dry_source(src: Path) -> None:
    """A ../shared/datasets look-alike from kdnb's shipped samples (Fashion-MNIST 2,000/500, CIFAR-10 500/250)."""
    import numpy as np

    from kdnb import samples

    samples.write_idx_layout("fashion_mnist", src)
    (src / "cifar10-subset").mkdir(parents=True, exist_ok=True)
    np.savez(src / "cifar10-subset" / "cifar10_subset.npz", **samples.load_sample("cifar10"))


if __name__ == "__main__":
    sys.exit(main())
