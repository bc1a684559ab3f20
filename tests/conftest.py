"""Shared pytest setup for the whole suite (CPU-only by default; GPU tests live under tests/gpu/)."""
from __future__ import annotations

import os
import sys

import torch

# Make tests/helpers.py importable as `helpers` from any test directory, whatever the import mode.
sys.path.insert(0, os.path.dirname(__file__))

# Under pytest-xdist every worker is its own process: on a 2-core CI runner with `-n 2`, two workers with two
# intra-op threads each would oversubscribe the cores and run slower than one thread each.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


import pytest  # noqa: E402

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session", autouse=True)
def _tests_do_not_write_runs_into_the_repository():
    """Every training test writes under tmp_path (--out, or a changed working directory): the repository's runs/
    must look the same after the session as before it."""
    runs = os.path.join(_REPO, "runs")
    before = sorted(os.listdir(runs)) if os.path.isdir(runs) else None
    yield
    after = sorted(os.listdir(runs)) if os.path.isdir(runs) else None
    assert after == before, f"tests wrote into {runs}: {sorted(set(after or []) - set(before or []))}"
