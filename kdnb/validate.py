"""Checks run before any work starts: a user mistake gets one clear ValueError naming the
parameter, the value and what is allowed, never a traceback from deep inside torch."""
from __future__ import annotations

import math
from typing import Any, Iterable

PROFILES = ("smoke", "reduced", "full")


def fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{name}={value!r} is not allowed: {allowed}")


def choice(name: str, value: Any, allowed: Iterable[Any]) -> Any:
    allowed = tuple(allowed)
    if value not in allowed:
        fail(name, value, "choose one of " + ", ".join(repr(a) for a in allowed))
    return value


def positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        fail(name, value, "must be a finite number > 0")
    return value


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        fail(name, value, "must be an integer >= 1")
    return value


def non_negative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        fail(name, value, "must be an integer >= 0")
    return value


def boolean(name: str, value: Any) -> bool:
    # a string such as 'no' is truthy: it must not count as True (download='no' would reach the network)
    if not isinstance(value, bool):
        fail(name, value, "must be True or False")
    return value


# seeds feed torch.manual_seed after `seed * 1_000_003 + epoch`-style arithmetic (kdnb.train, kdnb.data): this bound
# keeps every derived seed inside the 64-bit range torch accepts
MAX_SEED = 2**32 - 1


def seed(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        fail(name, value, f"must be an integer in 0..{MAX_SEED}")
    return value


def unit_interval(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        fail(name, value, "must be a number in [0, 1]")
    return value


def temperature(value: Any, name: str = "temperature") -> float:
    return positive(name, value)


def profile(value: Any) -> str:
    return choice("profile", value, PROFILES)


def device(value: Any) -> str:
    """'cpu', 'cuda', 'cuda:N' or 'auto' (cuda when available). Resolved here so that a
    missing GPU is reported before training, not as a CUDA error mid-run."""
    import torch

    if not isinstance(value, str):
        fail("device", value, "use 'cpu', 'cuda', 'cuda:N' or 'auto'")
    if value == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if value == "cpu":
        return value
    if value == "cuda" or (value.startswith("cuda:") and value[5:].isdigit()):
        if not torch.cuda.is_available():
            fail("device", value, "CUDA is not available on this machine; use 'cpu' or 'auto'")
        if ":" in value and int(value[5:]) >= torch.cuda.device_count():
            fail("device", value, f"this machine has {torch.cuda.device_count()} CUDA device(s)")
        return value
    fail("device", value, "use 'cpu', 'cuda', 'cuda:N' or 'auto'")


def choices(name: str, value: Any, allowed) -> list:
    """A non-empty list of distinct names, each one of `allowed` (which algorithms, variants, students to run)."""
    if not isinstance(value, (list, tuple)) or not value:
        fail(name, value, f"must be a non-empty list of {list(allowed)}")
    for v in value:
        choice(name, v, allowed)
    if len(set(value)) != len(value):
        fail(name, value, "entries must not repeat")
    return list(value)


def classes(name: str, value: Any, num_classes: int) -> list[int]:
    """A non-empty list of distinct class indices in [0, num_classes)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        fail(name, value, f"must be a list of distinct class indices in 0..{num_classes - 1}")
    value = list(value)
    if not value:
        fail(name, value, f"must not be empty: give class indices in 0..{num_classes - 1}")
    bad = [c for c in value if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < num_classes]
    if bad:
        fail(name, value, f"class indices must be integers in 0..{num_classes - 1} (bad: {bad})")
    if len(set(value)) != len(value):
        fail(name, value, "class indices must not repeat")
    return value


def seeds(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or not all(
        isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_SEED for s in value
    ):
        fail("seeds", value, f"must be a non-empty list of integers in 0..{MAX_SEED}")
    if len(set(value)) != len(value):
        fail("seeds", value, "seeds must not repeat")
    return list(value)
