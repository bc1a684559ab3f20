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
