"""The independent oracles (the official ``xlstm`` package, ``transformers``, ``triton``): import them or skip,
but never skip silently when they are expected to be there.

An oracle is expected when FASTXLSTM_REQUIRE_ORACLES=1 (CI sets it: .ci/run), or when the ``dev`` extra is
detectably installed: every other package of fastxlstm's ``dev`` extra is present and the extra lists this oracle
for this Python (xlstm is in it only for Python >= 3.11). Then a failed import is a test failure that says why,
not a skip.
"""
from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import re
from functools import lru_cache
from typing import Dict, Optional

import pytest

# module -> distribution that provides it; the oracles' distributions (mlstm-kernels comes with xlstm)
_DIST = {"xlstm": "xlstm", "transformers": "transformers", "triton": "triton"}
_ORACLE_DISTS = {"xlstm", "mlstm-kernels", "transformers", "triton"}


@lru_cache(maxsize=None)
def _dev_requirements() -> Optional[Dict[str, bool]]:
    """{distribution: applies to this Python} for the dev extra of the installed fastxlstm, or None."""
    try:
        requires = md.distribution("fastxlstm").requires or []
    except md.PackageNotFoundError:
        return None
    from packaging.requirements import Requirement
    out = {}
    for line in requires:
        req = Requirement(line)
        if req.marker is not None and re.search(r"extra\s*==\s*['\"]dev['\"]", str(req.marker)):
            out[req.name.lower()] = req.marker.evaluate({"extra": "dev"})  # False: not for this Python
    return out


def _installed(dist: str) -> bool:
    try:
        md.version(dist)
        return True
    except md.PackageNotFoundError:
        return False


def oracle_expected(dist: str) -> bool:
    """True where ``dist`` must be importable (see the module docstring)."""
    if os.environ.get("FASTXLSTM_REQUIRE_ORACLES", "").strip() not in ("", "0"):
        dev = _dev_requirements()
        return dev is None or dev.get(dist, True)  # the variable asks for every oracle that applies here
    dev = _dev_requirements()
    if not dev or not dev.get(dist, False):
        return False
    others = [d for d, applies in dev.items() if applies and d not in _ORACLE_DISTS]
    return all(_installed(d) for d in others)


def require_oracle(module: str, allow_module_level: bool = True):
    """Import and return ``module`` (e.g. "xlstm", "xlstm.xlstm_large.model", "transformers", "triton"). Missing:
    a failure if the oracle is expected, else a skip."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        dist = _DIST.get(module.split(".")[0], module.split(".")[0])
        if oracle_expected(dist):
            pytest.fail(f"the oracle {module!r} cannot be imported ({exc}), but it is expected here "
                        f"(FASTXLSTM_REQUIRE_ORACLES is set or the dev extra is installed): fix the install "
                        f"instead of skipping the checks that depend on it", pytrace=False)
        pytest.skip(f"{module} is not installed (an oracle from the dev extra)",
                    allow_module_level=allow_module_level)
