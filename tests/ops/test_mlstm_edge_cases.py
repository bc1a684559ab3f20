"""Edge cases of the mLSTM ops (issue 14 items 3 and 6): eps = 0, mixed state dtypes, empty dimensions."""
from __future__ import annotations

import pytest
import torch

from helpers import make_mlstm_case, rel_err
from fastxlstm.ops import mlstm, mlstm_step

BACKENDS = ("reference", "parallel", "chunkwise", "recurrent")


def _big_m_case(dtype, S=7, seed=5):
    """An initial state with a stabiliser far beyond exp()'s range (exp(-m) is 0 in float32 and float64) and
    one token whose query is exactly zero (its denominator q . n is 0)."""
    case = make_mlstm_case(2, 2, S, 6, 5, seed=seed, with_state=True)
    t = {k: v.clone() for k, v in case.tensors.items()}
    t["m0"].fill_(1000.0)
    t["q"][:, :, 3] = 0.0
    return {k: v.to(dtype) for k, v in t.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_eps_zero_forward_zero_query_large_m(backend, dtype):
    t = _big_m_case(dtype)
    args = [t[k] for k in ("q", "k", "v", "i", "f")]
    st = (t["C0"], t["n0"], t["m0"])
    h, (C, n, m) = mlstm(*args, state=st, backend=backend, chunk_size=4, eps=0.0)
    assert torch.isfinite(h).all() and torch.isfinite(C).all() and torch.isfinite(n).all()
    assert torch.equal(h[:, :, 3], torch.zeros_like(h[:, :, 3]))  # q = 0: h = 0 / max(0, exp(-m)) = 0
    ref, _ = mlstm(*[a.double() for a in args], state=tuple(s.double() for s in st), backend="reference", eps=0.0)
    assert rel_err(h, ref) < (1e-12 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eps_zero_backward_padded_tail_large_m(backend):
    """S = 7 with chunk_size 4: the chunkwise form pads one token (q = 0, den = 0); with m = 1000 its 0 / 0 once
    made every gradient NaN. Gradients must be finite and equal the reference's."""
    t = _big_m_case(torch.float64)
    t["q"][:, :, 3] = torch.randn(2, 2, 6, dtype=torch.float64)  # only the padding has a zero query here
    grads = {}
    for name in (backend, "reference"):
        leaves = {k: v.clone().requires_grad_(k != "m0") for k, v in t.items()}
        h, (C, n, m) = mlstm(*[leaves[k] for k in ("q", "k", "v", "i", "f")],
                             state=(leaves["C0"], leaves["n0"], leaves["m0"]), backend=name, chunk_size=4, eps=0.0)
        (h.sum() + (C * torch.exp(m - 1000)[..., None, None]).sum()).backward()
        grads[name] = {k: v.grad for k, v in leaves.items() if k != "m0"}
    for k, g in grads[backend].items():
        assert torch.isfinite(g).all(), f"d_{k} not finite"
        assert rel_err(g, grads["reference"][k]) < 1e-10, k


@pytest.mark.parametrize("state_dtype", [torch.float64, torch.float16], ids=["f64", "f16"])
def test_mlstm_step_casts_state_like_mlstm(state_dtype):
    """A float64 (or float16) state with float32 inputs is cast to the compute dtype, as mlstm does, not a
    torch dtype error."""
    case = make_mlstm_case(2, 2, 1, 6, 5, seed=2, with_state=True)
    t = {k: v.float() for k, v in case.tensors.items()}
    args = [t[k][:, :, 0] for k in ("q", "k", "v", "i", "f")]
    st = tuple(t[k].to(state_dtype) for k in ("C0", "n0", "m0"))
    h, (C, n, m) = mlstm_step(*args, st, backend="torch")
    assert h.dtype == C.dtype == torch.float32
    h_seq, (C_seq, _, _) = mlstm(*[t[k] for k in ("q", "k", "v", "i", "f")], state=st, backend="recurrent")
    assert rel_err(h, h_seq[:, :, 0]) < 1e-6 and rel_err(C, C_seq) < 1e-6


@pytest.mark.parametrize("fn", ["mlstm", "mlstm_step"])
def test_empty_head_dim_is_a_clear_error(fn):
    q = torch.randn(1, 2, 3, 0)
    v = torch.randn(1, 2, 3, 4)
    g = torch.randn(1, 2, 3)
    with pytest.raises(ValueError, match="empty dimension"):
        if fn == "mlstm":
            mlstm(q, q, v, g, g)
        else:
            mlstm_step(q[:, :, 0], q[:, :, 0], v[:, :, 0], g[:, :, 0], g[:, :, 0], None)


@pytest.mark.parametrize("chunk_size", [16, 32, 64, 128, 256, 1, 48, 100, 512])
def test_triton_chunk_size_is_honoured_or_refused(chunk_size, monkeypatch):
    """chunk_size on the Triton path (issue 14 item 16): a power of two in [16, 256] is the kernels' chunk length
    (checked against the reference in tests/ops/test_mlstm_triton.py); backend="triton" refuses any other value
    with a ValueError, and "auto" then takes the PyTorch chunkwise form. (No GPU here: only the choice is run.)"""
    from fastxlstm.ops import dispatch

    monkeypatch.setattr(dispatch, "triton_available", lambda device=None: True)
    q = torch.randn(1, 2, 5, 8)
    ok = chunk_size in (16, 32, 64, 128, 256)
    assert dispatch._pick_mlstm_backend("auto", q, q, chunk_size) == ("triton" if ok else "chunkwise")
    if ok:
        assert dispatch._pick_mlstm_backend("triton", q, q, chunk_size) == "triton"
    else:
        with pytest.raises(ValueError, match=rf"chunk_size={chunk_size} is not a chunk length of the Triton"):
            dispatch._pick_mlstm_backend("triton", q, q, chunk_size)
