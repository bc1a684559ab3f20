"""The oracle guard (tests/oracles.py): a missing oracle fails where it is expected and skips elsewhere."""
from __future__ import annotations

import importlib

import pytest

import oracles


def _missing(monkeypatch, module):
    real = importlib.import_module

    def fake(name, *a, **k):
        if name == module or name.startswith(module + "."):
            raise ImportError(f"No module named {module!r} (simulated broken install)")
        return real(name, *a, **k)

    monkeypatch.setattr(oracles.importlib, "import_module", fake)


def test_missing_oracle_fails_when_required(monkeypatch):
    _missing(monkeypatch, "transformers")
    monkeypatch.setenv("FASTXLSTM_REQUIRE_ORACLES", "1")
    with pytest.raises(pytest.fail.Exception, match="cannot be imported.*expected here"):
        oracles.require_oracle("transformers")


def test_missing_oracle_fails_when_the_dev_extra_is_installed(monkeypatch):
    _missing(monkeypatch, "xlstm")
    monkeypatch.delenv("FASTXLSTM_REQUIRE_ORACLES", raising=False)
    monkeypatch.setattr(oracles, "_dev_requirements", lambda: {"pytest": True, "xlstm": True})
    monkeypatch.setattr(oracles, "_installed", lambda dist: True)
    with pytest.raises(pytest.fail.Exception, match="'xlstm.xlstm_large.model' cannot be imported"):
        oracles.require_oracle("xlstm.xlstm_large.model")


def test_missing_oracle_skips_where_it_is_not_expected(monkeypatch):
    _missing(monkeypatch, "xlstm")
    # the dev extra on Python 3.10: xlstm is listed only for Python >= 3.11
    monkeypatch.setattr(oracles, "_dev_requirements", lambda: {"pytest": True, "xlstm": False})
    monkeypatch.setattr(oracles, "_installed", lambda dist: True)
    for env in (None, "1"):
        if env is None:
            monkeypatch.delenv("FASTXLSTM_REQUIRE_ORACLES", raising=False)
        else:
            monkeypatch.setenv("FASTXLSTM_REQUIRE_ORACLES", env)
        with pytest.raises(pytest.skip.Exception, match="not installed"):
            oracles.require_oracle("xlstm")
    # no dev extra (a plain install running the tests): skip
    monkeypatch.delenv("FASTXLSTM_REQUIRE_ORACLES", raising=False)
    monkeypatch.setattr(oracles, "_installed", lambda dist: dist != "hypothesis")
    monkeypatch.setattr(oracles, "_dev_requirements", lambda: {"hypothesis": True, "xlstm": True})
    with pytest.raises(pytest.skip.Exception, match="not installed"):
        oracles.require_oracle("xlstm")


def test_present_oracle_is_returned():
    assert oracles.require_oracle("json") is importlib.import_module("json")
