"""One small training loop for the classification studies.

A distillation method enters only through `loss_fn(model, x, y) -> loss` (teacher and weights are
captured by the caller), so the loop stays the same for every study. Each epoch ends with an
atomic checkpoint; rerunning with the same arguments and checkpoint path resumes after the last
finished epoch (losing at most one epoch) and a finished fit returns at once.
"""
from __future__ import annotations

import copy
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from . import runs, validate
from .data import TensorLoader

OPTIMIZERS = ("sgd", "adam", "adamw", "adadelta")
SCHEDULERS = (None, "plateau", "onecycle")
SELECT = ("final", "best")


def seed_everything(seed: int) -> None:
    """Python, numpy and torch RNGs, and deterministic kernels (same printed numbers on rerun)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def make_optimizer(name: str, params, lr: float, **kwargs) -> torch.optim.Optimizer:
    validate.choice("optimizer", name, OPTIMIZERS)
    validate.positive("lr", lr)
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
           "adadelta": torch.optim.Adadelta}[name]
    return cls(params, lr=lr, **kwargs)


def make_scheduler(name, optimizer, *, epochs: int, steps_per_epoch: int, mode: str = "min", **kwargs):
    validate.choice("scheduler", name, SCHEDULERS)
    if name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, **kwargs)
    if name == "onecycle":
        lr = optimizer.param_groups[0]["lr"]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, epochs=epochs,
                                                   steps_per_epoch=steps_per_epoch, **kwargs)
    return None


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)   # one dict per epoch: train_loss, lr, eval metrics
    best_epoch: int | None = None                       # 1-based epoch of the best monitored value
    stopped_epoch: int = 0                              # last epoch trained (early stopping may end sooner)
    resumed_from: int = 0                               # epochs found finished in the checkpoint


def atomic_save(obj, path: Path) -> None:
    """torch.save through runs.atomic_path (two runs may write the same cache file)."""
    with runs.atomic_path(path) as tmp:
        torch.save(obj, tmp)


def fit(model: nn.Module, loader: TensorLoader, loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
        *, epochs: int, optimizer: str = "adam", lr: float = 1e-3, optimizer_kwargs: dict | None = None,
        scheduler: str | None = None, scheduler_kwargs: dict | None = None,
        evaluate: Callable[[nn.Module], dict] | None = None, monitor: str | None = None, mode: str = "min",
        es_patience: int | None = None, es_min_delta: float = 0.0, select: str = "final",
        checkpoint: str | os.PathLike | None = None, seed: int = 0, desc: str = "train",
        progress: bool = True, on_epoch_end: Callable[[int, dict], None] | None = None,
        step: Callable[[nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        callbacks: Sequence = ()) -> FitResult:
    """Train `model` in place; on return it holds the selected weights ('final' or 'best' by `monitor`).

    evaluate(model) runs after every epoch with the model in eval mode and returns metrics, e.g.
    {'val_loss': ..., 'val_acc': ...}; `monitor` names the one that drives the plateau scheduler,
    early stopping (`es_patience` epochs without improvement > es_min_delta) and best selection.
    `callbacks`: objects with on_epoch_end(row, optimizer) -> True to stop, state_dict() and load_state_dict()
    (KerasEarlyStopping, KerasReduceLROnPlateau); all see every epoch and their state is checkpointed.

    step(model, optimizer, x, y) -> loss, when given, replaces loss_fn + backward + optimizer.step for one batch:
    a hand-written update must read the learning rate from optimizer.param_groups (the schedulers change it
    there) and leave the optimizer's state as optimizer.step would (checkpoints save it).
    """
    validate.positive_int("epochs", epochs)
    validate.choice("select", select, SELECT)
    validate.choice("mode", mode, ("min", "max"))
    if es_patience is not None:
        validate.positive_int("es_patience", es_patience)
    if (select == "best" or es_patience or scheduler == "plateau") and (evaluate is None or monitor is None):
        raise ValueError("select='best', es_patience and scheduler='plateau' need evaluate= and monitor=")
    opt = make_optimizer(optimizer, model.parameters(), lr, **(optimizer_kwargs or {}))
    sched = make_scheduler(scheduler, opt, epochs=epochs, steps_per_epoch=len(loader), mode=mode,
                           **(scheduler_kwargs or {}))
    sign = 1.0 if mode == "min" else -1.0
    state = {"epoch": 0, "history": [], "best_value": math.inf, "best_epoch": None, "best_state": None,
             "bad_epochs": 0, "done": False}
    ckpt = Path(checkpoint) if checkpoint else None
    if ckpt and ckpt.is_file():
        saved = torch.load(ckpt, map_location="cpu", weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        if sched is not None and saved.get("scheduler"):
            sched.load_state_dict(saved["scheduler"])
        state = saved["state"]
        for cb, cb_state in zip(callbacks, saved.get("callbacks") or []):
            cb.load_state_dict(cb_state)
    result = FitResult(resumed_from=state["epoch"])

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs, initial=state["epoch"], desc=desc, leave=False)
    try:
        while not state["done"] and state["epoch"] < epochs:
            epoch = state["epoch"]
            # dropout and other torch randomness depend only on (seed, epoch): resumable
            torch.manual_seed(seed * 1000 + epoch)
            model.train()
            total, n = 0.0, 0
            for xb, yb in loader.epoch(epoch):
                if step is not None:
                    loss = step(model, opt, xb, yb)
                else:
                    loss = loss_fn(model, xb, yb)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                if scheduler == "onecycle":
                    sched.step()
                total += loss.item() * len(yb)
                n += len(yb)
            row = {"epoch": epoch + 1, "train_loss": total / max(n, 1), "lr": opt.param_groups[0]["lr"]}
            if evaluate is not None:
                model.eval()
                with torch.no_grad():
                    row.update(evaluate(model))
                model.train()
            state["history"].append(row)
            state["epoch"] = epoch + 1
            if monitor is not None:
                value = sign * row[monitor]
                if scheduler == "plateau":
                    sched.step(row[monitor])
                if value < state["best_value"] - es_min_delta:
                    state["best_value"], state["best_epoch"], state["bad_epochs"] = value, epoch + 1, 0
                    if select == "best":
                        state["best_state"] = copy.deepcopy(model.state_dict())
                else:
                    state["bad_epochs"] += 1
                if es_patience and state["bad_epochs"] >= es_patience:
                    state["done"] = True
            if any([cb.on_epoch_end(row, opt) for cb in callbacks]):  # a list: every callback sees every epoch
                state["done"] = True
            if state["epoch"] >= epochs:
                state["done"] = True
            if ckpt:
                atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                              "scheduler": sched.state_dict() if sched is not None else None, "state": state,
                              "callbacks": [cb.state_dict() for cb in callbacks]}, ckpt)
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, row)
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: round(v, 4) for k, v in row.items() if k != "epoch" and isinstance(v, float)})
    finally:
        if bar is not None:
            bar.close()
    if select == "best" and state["best_state"] is not None:
        model.load_state_dict(state["best_state"])
    result.history, result.best_epoch, result.stopped_epoch = state["history"], state["best_epoch"], state["epoch"]
    return result


class KerasEarlyStopping:
    """Keras 2.0.x `EarlyStopping` (no weight restore). `wait` is compared with `patience` *before* it is
    incremented, so training stops after the (patience + 1)-th consecutive epoch in which `monitor` did not
    beat the best by more than `min_delta` (Keras 2.1.x and later stop one epoch sooner)."""

    def __init__(self, monitor: str = "val_loss", patience: int = 0, min_delta: float = 0.0, mode: str = "min"):
        validate.non_negative_int("patience", patience)
        validate.choice("mode", mode, ("min", "max"))
        self.monitor, self.patience, self.min_delta = monitor, patience, abs(min_delta)
        self.sign = 1.0 if mode == "min" else -1.0
        self.best, self.wait, self.stopped_epoch = math.inf, 0, None

    def on_epoch_end(self, row: dict, optimizer) -> bool:
        current = self.sign * row[self.monitor]
        if current + self.min_delta < self.best:
            self.best, self.wait = current, 0
            return False
        stop = self.wait >= self.patience
        self.wait += 1
        if stop:
            self.stopped_epoch = row["epoch"]
        return stop

    def state_dict(self) -> dict:
        return {"best": self.best, "wait": self.wait, "stopped_epoch": self.stopped_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.wait, self.stopped_epoch = state["best"], state["wait"], state["stopped_epoch"]


class KerasReduceLROnPlateau:
    """Keras 2.0.x `ReduceLROnPlateau`: an improvement must beat the best by more than the absolute `epsilon`.
    The learning rate is multiplied by `factor` after the (patience + 1)-th consecutive epoch without one and,
    because `wait` restarts at 0 and is incremented in the same call, again after every `patience` further
    such epochs (patience 1: after every following non-improving epoch). The new rate applies from the next epoch."""

    def __init__(self, monitor: str = "val_loss", factor: float = 0.1, patience: int = 10, epsilon: float = 1e-4,
                 cooldown: int = 0, min_lr: float = 0.0, mode: str = "min"):
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < 1:
            validate.fail("factor", factor, "must be a number in (0, 1): the learning rate is multiplied by it")
        validate.non_negative_int("patience", patience)
        validate.non_negative_int("cooldown", cooldown)
        validate.choice("mode", mode, ("min", "max"))
        self.monitor, self.factor, self.patience, self.epsilon = monitor, factor, patience, epsilon
        self.cooldown, self.min_lr, self.sign = cooldown, min_lr, 1.0 if mode == "min" else -1.0
        self.best, self.wait, self.cooldown_counter = math.inf, 0, 0

    def on_epoch_end(self, row: dict, optimizer) -> bool:
        current = self.sign * row[self.monitor]
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.wait = 0
        if current < self.best - self.epsilon:
            self.best, self.wait = current, 0
        elif self.cooldown_counter <= 0:
            if self.wait >= self.patience:
                for group in optimizer.param_groups:
                    if group["lr"] > self.min_lr * (1 + 1e-4):
                        group["lr"] = max(group["lr"] * self.factor, self.min_lr)
                self.cooldown_counter, self.wait = self.cooldown, 0
            self.wait += 1
        return False

    def state_dict(self) -> dict:
        return {"best": self.best, "wait": self.wait, "cooldown_counter": self.cooldown_counter}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.wait, self.cooldown_counter = state["best"], state["wait"], state["cooldown_counter"]


def config_hash(obj) -> str:
    """Short stable hash of a JSON-able configuration (names cached teachers and checkpoints)."""
    return runs.digest(obj, 12, default=str)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, *, batch_size: int = 1024) -> torch.Tensor:
    """Logits for all of x in eval mode, batched (x already float and on the model's device)."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    model.train(was_training)
    return out
