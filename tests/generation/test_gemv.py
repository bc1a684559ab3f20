"""The batch-1 decode GEMV (Triton, run through the CPU interpreter here) against a float64 matrix product."""
import pytest

from helpers import run_interpreted

pytest.importorskip("triton")

_CODE = r"""
import torch
from fastxlstm.generation._gemv import _CFG, gemv, skinny_linears
torch.manual_seed(0)
worst = 0.0
for N, K, bias in ((8, 4096, True), (37, 300, False), (64, 1024, True), (9, 2050, False)):
    for dt in (torch.float32, torch.bfloat16):
        x = torch.randn(1, 1, K).to(dt)
        w = torch.randn(N, K).to(dt)
        b = torch.randn(N).to(dt) if bias else None
        for cfg in ({}, _CFG):  # the default tiling and the one the decoder uses
            y = gemv(x, w, b, **cfg)
            ref = x.double().reshape(K) @ w.double().t() + (b.double() if bias else 0)
            err = float((y.double().reshape(N) - ref).norm() / ref.norm())
            tol = 1e-6 if dt == torch.float32 else 8e-3
            assert y.shape == (1, 1, N) and y.dtype == dt, (y.shape, y.dtype)
            assert err < tol, (N, K, dt, cfg, err)
            worst = max(worst, err) if dt == torch.float32 else worst
try:
    gemv(torch.randn(2, 8), torch.randn(4, 8))
except ValueError as e:
    assert "one row" in str(e)
else:
    raise AssertionError("two rows accepted")
print("OK", worst)
"""


def test_gemv_interpreter():
    run_interpreted(_CODE)


def test_skinny_linears_restores_modules():
    import torch
    from fastxlstm.generation._gemv import skinny_linears
    lin = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    ref = lin(x)
    with skinny_linears(torch.nn.Sequential(lin)):
        assert "forward" in lin.__dict__
        torch.testing.assert_close(lin(x), ref)  # CPU input: the usual F.linear
    assert "forward" not in lin.__dict__


def test_gemv_auto_rule(monkeypatch):
    import torch
    from fastxlstm.generation import _gemv
    narrow, wide = torch.empty(4096, 8), torch.empty(12288, 8)
    monkeypatch.delenv("FASTXLSTM_GEMV", raising=False)
    assert _gemv.gemv_mode() == "auto" and _gemv._use_gemv(narrow) and not _gemv._use_gemv(wide)
    monkeypatch.setenv("FASTXLSTM_GEMV", "1")
    assert _gemv._use_gemv(wide)
    monkeypatch.setenv("FASTXLSTM_GEMV", "0")
    assert not _gemv.gemv_enabled() and not _gemv._use_gemv(narrow)
    monkeypatch.setenv("FASTXLSTM_GEMV", "fast")  # a typo is refused, not read as "auto"
    with pytest.raises(ValueError, match="FASTXLSTM_GEMV"):
        _gemv.gemv_mode()
