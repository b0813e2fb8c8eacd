"""The qualitative-claim rule is one function, and no study spells it again."""
import re
from pathlib import Path

import pytest

from kdnb import claims

KDNB = Path(__file__).resolve().parent.parent / "kdnb"


def test_the_rule():
    assert [claims.verdict(k, 3) for k in range(4)] == ["not supported", "mixed", "mixed", "supported"]
    assert claims.verdict(1, 1) == "supported" and claims.verdict(0, 1) == "not supported"
    for held, total in ((0, 0), (3, 2), (-1, 2)):
        with pytest.raises(ValueError, match=f"^held={held} of total={total}"):
            claims.verdict(held, total)


def test_no_module_writes_the_rule_again():
    spelt = [f"{p.name}:{i}" for p in sorted(KDNB.glob("*.py")) if p.name != "claims.py"
             for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r'["\']mixed["\']', line)]
    assert spelt == []


def test_conditions_moved_into_the_cards_are_the_ones_the_code_held():
    """Claims as data: the cards' `run_with` are exactly the dicts 01 and 04 spelt in code before (copied here), so
    every committed record still records the same claims."""
    from kdnb import emnist_student, unseen_classes

    dec11 = dict(student="mlp", epochs=70, batch_size=32, select="best_val", es_patience=15, data_source="real",
                 lr_schedule="plateau")
    grid = dict(dec11, kept_classes=[0, 1, 2, 3, 4, 5], soft_weight=0.9)
    old = {"A1": dict(grid, temperature=10.0, lr=0.01),
           "A2-kd": dict(dec11, kept_classes=list(range(10)), temperature=2.5, soft_weight=0.9, lr=0.01),
           "A2-ce": dict(dec11, kept_classes=list(range(10)), soft_weight=0.0, lr=0.01),
           **{f"A3-lr{lr:g}-T{t:g}": dict(grid, temperature=t, lr=lr)
              for lr, t in ((0.01, 20.0), (0.01, 15.0), (0.01, 10.0), (0.01, 5.0), (0.01, 2.5), (0.001, 20.0),
                            (0.001, 2.5))},
           "A4": dict(student="linear", epochs=70, batch_size=32, select="final", es_patience=6, data_source="real",
                      lr_schedule="plateau", kept_classes=[0, 1, 2, 3, 4, 5], temperature=2.5, soft_weight=0.9,
                      lr=0.01)}
    assert unseen_classes.CLAIM_CONDITIONS == old
    assert all(type(v) is type(old[c][k]) for c, d in unseen_classes.CLAIM_CONDITIONS.items() for k, v in d.items())
    assert emnist_student.CLAIM_CONDITIONS == dict(data_source="real", temperature=10.0, lam=0.5, batch_size=256,
                                                   validation="test", train_baseline=True)


def test_every_committed_01_record_records_the_same_claims_from_its_metrics():
    """The claim logic read from the cards, applied to each committed record's students, gives the values the record
    holds (83 records today): moving the conditions into the cards moved no claim."""
    import json

    from kdnb import unseen_classes as uc

    records = sorted((KDNB.parent / "results" / "01_mnist_unseen_classes").glob("*/run.json"))
    assert records
    for f in records:
        rec = json.loads(f.read_text())
        students = json.loads((f.parent / "metrics.json").read_text())["metrics"]["students"]
        got = {k: v["values"] for k, v in uc.claim_values(rec["params"], students).items()}
        held = {k: v["values"] for k, v in rec["claims"].items() if k in uc.CLAIM_CONDITIONS}
        assert got == held, f.parent.name
