"""The study cards in papers/: what each source claims, as data (reported numbers live only there)."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import yaml

PAPERS = Path(__file__).resolve().parent.parent / "papers"


@lru_cache(maxsize=None)
def load(notebook: str) -> dict:
    path = PAPERS / f"{notebook}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PAPERS.glob("*.yaml"))
        raise ValueError(f"notebook={notebook!r} has no card in {PAPERS}; cards exist for {known}")
    return yaml.safe_load(path.read_text())


def all_cards() -> list[dict]:
    return [load(p.stem) for p in sorted(PAPERS.glob("*.yaml"))]


def claim(notebook: str, claim_id: str) -> dict:
    claims = {c["id"]: c for c in load(notebook)["claims"]}
    if claim_id not in claims:
        raise ValueError(f"claim_id={claim_id!r} is not in papers/{notebook}.yaml; it has {list(claims)}")
    return claims[claim_id]


def reported(notebook: str, claim_id: str):
    return claim(notebook, claim_id)["reported"]


def run_with(notebook: str) -> dict[str, dict]:
    """{claim id: the run parameters the source reported it under}, from the card (claims as data, issue 14): a
    claim's own `run_with`, else the card's. A study records a claim only from runs that match it."""
    card = load(notebook)
    default = card.get("run_with")
    return {c["id"]: dict(c.get("run_with", default)) for c in card["claims"]
            if c.get("run_with", default) is not None}
