"""Which backend "auto" picks: Triton where the kernels apply, the PyTorch chunkwise form everywhere else."""
import pytest
import torch

from fastxlstm.ops import dispatch as ops


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


@pytest.mark.parametrize("backend", ["reference", "parallel", "chunkwise", "recurrent"])
def test_empty_sequence_passes_the_state_through(backend):
    g = torch.Generator().manual_seed(0)
    q, v = torch.randn(2, 3, 0, 4, generator=g), torch.randn(2, 3, 0, 5, generator=g)
    gate = torch.randn(2, 3, 0, generator=g)
    state = (torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, generator=g))
    h, (C, n, m) = ops.mlstm(q, q, v, gate, gate, state=state, backend=backend)
    assert h.shape == (2, 3, 0, 5)
    assert torch.equal(C, state[0]) and torch.equal(n, state[1]) and torch.equal(m, state[2])
    h, (C, n, m) = ops.mlstm(q, q, v, gate, gate, backend=backend)
    assert C.abs().sum() == 0 and n.abs().sum() == 0 and m.abs().sum() == 0


# ----------------------------------------------------------------------------------------------------------
# sLSTM
# ----------------------------------------------------------------------------------------------------------

def _x(B, NH, DH, dtype=torch.float32):
    return torch.empty(B, 3, 4, NH, DH, dtype=dtype)


def test_slstm_auto_is_recurrent_without_cuda():
    assert ops._pick_slstm_backend("auto", _x(2, 4, 16)) == "recurrent"


@pytest.mark.parametrize("NH,DH,dtype,expected", [
    (4, 256, torch.bfloat16, "triton"),
    (16, 64, torch.float32, "triton"),
    (8, 16, torch.float16, "triton"),
    (4, 256, torch.float64, "recurrent"),  # the kernels take no float64
    (4, 8, torch.bfloat16, "recurrent"),   # head dims the kernels were not built for
    (4, 48, torch.bfloat16, "recurrent"),
    (2, 512, torch.bfloat16, "recurrent"),
])
def test_slstm_auto_with_cuda(monkeypatch, NH, DH, dtype, expected):
    monkeypatch.setattr(ops, "triton_available", lambda device=None: True)
    assert ops._pick_slstm_backend("auto", _x(2, NH, DH, dtype)) == expected


def test_slstm_explicit_triton_without_cuda_is_a_clear_error():
    x = torch.randn(1, 2, 4, 1, 16)
    with pytest.raises(ValueError, match="backend='triton' needs a CUDA device"):
        ops.slstm(x, torch.zeros(4, 1, 16, 16), torch.zeros(4, 1, 16), backend="triton")


def test_slstm_explicit_triton_unsupported_head_dim(monkeypatch):
    monkeypatch.setattr(ops, "triton_available", lambda device=None: True)
    with pytest.raises(ValueError, match="head dims"):
        ops._pick_slstm_backend("triton", _x(1, 1, 24))
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        ops._pick_slstm_backend("triton", _x(1, 1, 16, torch.float64))


def test_triton_refuses_eps_zero_and_auto_falls_back(monkeypatch):
    from fastxlstm.ops import mlstm
    q, v = _qv(1, 2, 8, 8)
    i = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="eps=0 is not supported by the Triton"):
        mlstm(q, q, v, i, i, backend="triton", eps=0.0)
    monkeypatch.setattr(ops, "triton_available", lambda device=None: True)
    assert ops._pick_mlstm_backend("auto", q, v, 64, 0.0) == "chunkwise"
    assert ops._pick_mlstm_backend("auto", q, v, 64, 1e-6) == "triton"
