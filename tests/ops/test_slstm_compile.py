"""The vectorised sLSTM recurrence runs under torch.compile (a few seconds to compile on CPU) and computes the
same function as the reference."""
import pytest
import torch

from fastxlstm.ops import slstm


def test_slstm_recurrent_under_torch_compile():
    pytest.importorskip("torch._inductor")
    g = torch.Generator().manual_seed(0)
    B, S, NH, DH = 2, 6, 2, 4
    x = torch.randn(B, S, 4, NH, DH, generator=g)
    R = torch.randn(4, NH, DH, DH, generator=g) * 0.3
    b = torch.randn(4, NH, DH, generator=g)
    ref, _ = slstm(x.double(), R.double(), b.double(), backend="reference")
    compiled = torch.compile(lambda x, R, b: slstm(x, R, b, backend="recurrent")[0])
    out = compiled(x, R, b)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < 1e-5, err
