"""Shared pytest setup for the whole suite (CPU-only by default; GPU tests live under tests/gpu/)."""
from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

import torch

# Make tests/helpers.py importable as `helpers` from any test directory, whatever the import mode.
sys.path.insert(0, os.path.dirname(__file__))

# Tests never write into the repository: hypothesis keeps no example database, and its other files (a cache of
# constants) go to a temporary directory removed at exit instead of .hypothesis/ in the working directory.
try:
    import hypothesis.configuration as _hyp_conf
    from hypothesis import settings as _hyp_settings
except ImportError:  # pragma: no cover - hypothesis is in the dev extra
    pass
else:
    _hyp_home = tempfile.mkdtemp(prefix="fastxlstm-hypothesis-")
    atexit.register(shutil.rmtree, _hyp_home, ignore_errors=True)
    os.environ["HYPOTHESIS_STORAGE_DIRECTORY"] = _hyp_home
    if hasattr(_hyp_conf, "set_hypothesis_home_dir"):
        _hyp_conf.set_hypothesis_home_dir(_hyp_home)
    _hyp_settings.register_profile("fastxlstm", database=None)
    _hyp_settings.load_profile("fastxlstm")

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
