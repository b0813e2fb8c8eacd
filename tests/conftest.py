import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def real_data_root(*required: str) -> Path:
    """$KDNB_DATA if it holds every required relative path, else skip naming what is missing."""
    root = os.environ.get("KDNB_DATA")
    if not root:
        pytest.skip("KDNB_DATA is not set: data tests read the real datasets (e.g. KDNB_DATA=../shared/datasets)")
    missing = [r for r in required if not (Path(root) / r).exists()]
    if missing:
        pytest.skip(f"KDNB_DATA={root} lacks {', '.join(missing)}")
    return Path(root)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # generated and decompressed files go to a per-session temp folder, never the user's cache
    monkeypatch.setenv("KDNB_CACHE", str(tmp_path_factory.getbasetemp() / "kdnb-cache"))


@pytest.fixture(autouse=True)
def _restore_numerics():
    # runs.Run switches a smoke run on CPU to float64 on one thread (kdnb.numerics): never leak it into other tests
    import torch

    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)
