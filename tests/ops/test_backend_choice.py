"""Which backend "auto" picks: Triton where the kernels apply, the PyTorch chunkwise form everywhere else."""
import pytest
import torch

import fastxlstm.ops as ops


def _qv(B, NH, DQK, DV, dtype=torch.float32):
    return torch.empty(B, NH, 3, DQK, dtype=dtype), torch.empty(B, NH, 3, DV, dtype=dtype)


def test_auto_is_chunkwise_without_cuda():
    q, v = _qv(2, 4, 16, 8)
    assert ops._pick_mlstm_backend("auto", q, v) == "chunkwise"


@pytest.mark.parametrize("shape,dtype,expected", [
    ((2, 4, 64, 128), torch.bfloat16, "triton"),
    ((2, 4, 64, 128), torch.float32, "triton"),
    ((2, 4, 512, 512), torch.float16, "triton"),
    ((2, 4, 64, 128), torch.float64, "chunkwise"),      # the kernels take no float64
    ((2, 4, 1024, 128), torch.bfloat16, "chunkwise"),   # head dims beyond what the kernels were built for
    ((2, 4, 64, 1024), torch.bfloat16, "chunkwise"),
    ((65536, 1, 64, 64), torch.bfloat16, "chunkwise"),  # B * NH beyond one grid axis
])
def test_auto_with_cuda(monkeypatch, shape, dtype, expected):
    monkeypatch.setattr(ops, "triton_available", lambda device=None: True)
    B, NH, DQK, DV = shape
    q, v = _qv(B, NH, DQK, DV, dtype)
    assert ops._pick_mlstm_backend("auto", q, v) == expected


def test_explicit_triton_without_cuda_is_a_clear_error():
    q = torch.randn(1, 1, 3, 4)
    with pytest.raises(ValueError, match="triton"):
        ops.mlstm(q, q, q, q[..., 0], q[..., 0], backend="triton")
