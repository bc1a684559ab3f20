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
