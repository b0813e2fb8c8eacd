"""The one rule for a qualitative claim (issue 14): judged by parts that each hold or not (C1's "low accuracy" and
"unstable"), or by seeds that each show the effect or not (A2's KD minus CE per seed)."""
from __future__ import annotations


def verdict(held: int, total: int) -> str:
    """supported when every part holds, not supported when none does, else mixed."""
    if total < 1 or not 0 <= held <= total:
        raise ValueError(f"held={held!r} of total={total!r}: a verdict needs 0 <= held <= total and total >= 1")
    return "supported" if held == total else ("not supported" if held == 0 else "mixed")
