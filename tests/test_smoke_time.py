"""Issue 15 item 10: every smoke notebook takes under ~2 minutes on 2 cores, and the README prints the times.

Not a timed test: it reads the durations papermill wrote into the committed notebooks when `make notebooks`
executed them (on the 2-core reference machine), and the README line that reports them."""
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(p for p in (REPO / "notebooks").glob("0[1-5]_*.ipynb"))
LIMIT_S = 120


def duration(path: Path) -> float:
    return float(json.loads(path.read_text())["metadata"]["papermill"]["duration"])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_smoke_execution_took_under_two_minutes(path):
    assert duration(path) < LIMIT_S, f"{path.name}: {duration(path):.0f} s as committed (limit {LIMIT_S} s)"


def test_readme_prints_the_committed_times():
    line = re.search(r"each notebook's smoke\s+execution[^:]*:\s*(.*?)\(papermill", (REPO / "README.md").read_text(),
                     re.S | re.I)
    assert line, "README: the smoke-times line is missing"
    said = dict(re.findall(r"(0[1-5]) (\d+) s", line.group(1)))
    assert said == {p.stem[:2]: str(round(duration(p))) for p in NOTEBOOKS}
