"""Fused mLSTM decode step in Triton: the state C is read once and written once.

One program per (batch*head, DV tile); it walks DQK in blocks, updates that (BK x BV) slab of C, stores it and
accumulates q^T C_new, so the fp32 state crosses memory exactly twice (the floor of a functional update). The
normaliser q . n_new (DQK values) is recomputed by every DV tile; that is cheap next to the C traffic.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ..._intmath import cdiv, next_pow2


@triton.jit
def _step_kernel(q_ptr, k_ptr, v_ptr, i_ptr, f_ptr, C_ptr, n_ptr, m_ptr, h_ptr, Co_ptr, no_ptr, mo_ptr,
                 scale, eps, DQK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    pv = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    dv = pv * BV + tl.arange(0, BV)
    mv = dv < DV
    ig = tl.load(i_ptr + bh).to(tl.float32)
    fg = tl.load(f_ptr + bh).to(tl.float32)
    m = tl.load(m_ptr + bh).to(tl.float32)
    lf = tl.minimum(fg, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(fg)))
    m_new = tl.maximum(lf + m, ig)
    fp = tl.exp(lf + m - m_new)
    ip = tl.exp(ig - m_new)
    vv = tl.load(v_ptr + bh * DV + dv, mask=mv, other=0.0).to(tl.float32)
    num = tl.zeros([BV], dtype=tl.float32)
    den = tl.zeros([BK], dtype=tl.float32)
    for k0 in range(0, DQK, BK):
        dk = k0 + tl.arange(0, BK)
        mk = dk < DQK
        # the cast keeps the loop-carried sums fp32 when torch.compile (Inductor) passes ``scale`` as an fp64 scalar
        qq = (tl.load(q_ptr + bh * DQK + dk, mask=mk, other=0.0).to(tl.float32) * scale).to(tl.float32)
        kk = tl.load(k_ptr + bh * DQK + dk, mask=mk, other=0.0).to(tl.float32)
        nn = tl.load(n_ptr + bh * DQK + dk, mask=mk, other=0.0).to(tl.float32)
        n_new = fp * nn + ip * kk
        den += qq * n_new
        if pv == 0:
            tl.store(no_ptr + bh * DQK + dk, n_new, mask=mk)
        ofs = bh * DQK * DV + dk[:, None] * DV + dv[None, :]
        cm = mk[:, None] & mv[None, :]
        C = tl.load(C_ptr + ofs, mask=cm, other=0.0).to(tl.float32)
        C = fp * C + (ip * kk)[:, None] * vv[None, :]
        tl.store(Co_ptr + ofs, C, mask=cm)
        num += tl.sum(qq[:, None] * C, 0)
    dsum = tl.sum(den, 0)
    Z = tl.maximum(tl.abs(dsum), tl.maximum(tl.exp(-m_new), 1.1754943508222875e-38)) + eps  # see exp_floor
    tl.store(h_ptr + bh * DV + dv, (num / Z).to(h_ptr.dtype.element_ty), mask=mv)
    if pv == 0:
        tl.store(mo_ptr + bh, m_new)


def _block_v(BH: int, DV: int) -> int:
    """DV tile: 64 when there are many heads; smaller for small batches so that enough programs fill the GPU."""
    bv = 64
    while bv > 16 and BH * cdiv(DV, bv) < 512:
        bv //= 2
    return min(bv, max(16, next_pow2(DV)))


def _tiles(BH: int, DQK: int, DV: int, c16: bool):
    """(BK, BV, num_warps) of the step kernel, from sweeps on the H200 (benchmarks/NOTES.md; 7B heads 256 x 512,
    paper 1.3B heads 1024 x 1024): few programs (small batches) -> 32-wide DV tiles over 128-deep DQK blocks (7B,
    B=1: 4.2 vs 5.3 us; 256-deep for DQK >= 1024); a 16-bit C with many programs -> 128 x 128 tiles (more bytes per
    load: B=64 88 vs 92 us, B=256 330 vs 347 us); else 64 x 64."""
    BV, BK = _block_v(BH, DV), 64
    if BV < 64:
        # the paper 1.3B's 1024 x 1024 heads at B=1: 256-deep blocks, 8.8 vs 11.0 us
        BV, BK = 32, (256 if DQK >= 1024 else 128)
    elif c16 and BH * cdiv(DV, 128) >= 512:
        BV, BK = 128, 128
    return min(BK, max(16, next_pow2(DQK))), min(BV, max(16, next_pow2(DV))), 4


# (BK, BV, num_warps) forced for every launch while set (see forced_tiles)
_TILE_OVERRIDE = None


@contextlib.contextmanager
def forced_tiles(tiles):
    """Every step-kernel launch inside uses ``tiles`` = (BK, BV, num_warps) instead of :func:`_tiles`' rule: for
    the benchmarks' tiling sweeps (of the kernel alone and inside a captured decoder), not for users."""
    global _TILE_OVERRIDE
    prev, _TILE_OVERRIDE = _TILE_OVERRIDE, tuple(tiles)
    try:
        yield
    finally:
        _TILE_OVERRIDE = prev


def step_forward(q, k, v, i, f, C, n, m, eps: float, C_out=None):
    """Kernel launch only (no autograd). Shapes: q, k (B, NH, DQK); v (B, NH, DV); i, f, m (B, NH).
    ``C_out``: where to write the new C (may be C itself: see fastxlstm.ops._inplace); a new tensor when None.
    The tiling follows :func:`_tiles` (or :func:`forced_tiles`)."""
    B, NH, DQK = q.shape
    DV = v.shape[-1]
    BH = B * NH
    h = torch.empty(B, NH, DV, device=q.device, dtype=q.dtype)
    Co = torch.empty(B, NH, DQK, DV, device=q.device, dtype=torch.float32) if C_out is None else C_out
    no = torch.empty(B, NH, DQK, device=q.device, dtype=torch.float32)
    mo = torch.empty(B, NH, device=q.device, dtype=torch.float32)
    BK, BV, num_warps = _TILE_OVERRIDE or _tiles(BH, DQK, DV, Co.dtype != torch.float32)
    _step_kernel[(cdiv(DV, BV), BH)](q, k, v, i, f, C, n, m, h, Co, no, mo, DQK ** -0.5, eps,
                                     DQK=DQK, DV=DV, BK=BK, BV=BV, num_warps=num_warps)
    return h, Co, no, mo


def _contig(*ts):
    return [t.contiguous() for t in ts]


class _StepFn(torch.autograd.Function):
    """Fused forward; the backward recomputes the step's few element-wise formulas in PyTorch (fp32)."""

    @staticmethod
    def forward(ctx, q, k, v, i, f, C, n, m, eps):
        q_, k_, v_, i_, f_, C_, n_, m_ = _contig(q, k, v, i, f, C, n, m.detach())
        h, Co, no, mo = step_forward(q_, k_, v_, i_, f_, C_, n_, m_, eps)
        ctx.save_for_backward(q, k, v, i, f, C, n, m.detach())
        ctx.eps = eps
        ctx.mark_non_differentiable(mo)
        return h, Co, no, mo

    @staticmethod
    def backward(ctx, dh, dC, dn, dm):
        from ..reference import mlstm_step_reference
        q, k, v, i, f, C, n, m = ctx.saved_tensors
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v, i, f, C, n)]
        with torch.enable_grad():
            h, (Cn, nn, _) = mlstm_step_reference(*leaves[:5], (leaves[5], leaves[6], m), ctx.eps)
            outs, gouts = [], []
            for o, g in ((h, dh), (Cn, dC), (nn, dn)):
                if g is not None:
                    outs.append(o)
                    gouts.append(g.to(o.dtype))
            grads = torch.autograd.grad(outs, leaves, gouts, allow_unused=True)
        grads = [None if g is None else g.to(x.dtype) for g, x in zip(grads, (q, k, v, i, f, C, n))]
        return (*grads, None, None)


def mlstm_step_triton_impl(q, k, v, i, f, state, eps: float = 1e-6):
    """One decode step with the fused kernel. q, k (B, NH, DQK); v (B, NH, DV); i, f (B, NH);
    state (C (B, NH, DQK, DV), n (B, NH, DQK), m (B, NH)). Returns h (B, NH, DV) in q's dtype and the new state
    (float32), never modifying the inputs."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"the Triton mLSTM step takes float16, bfloat16 or float32 inputs, got {q.dtype}")
    if q.shape[0] * q.shape[1] > 65535:  # batch*heads is a grid axis of size at most 65535
        raise ValueError(f"the Triton mLSTM step takes B * NH <= 65535, got {q.shape[0]} * {q.shape[1]}")
    C, n, m = state
    if m.ndim == 3:
        m = m[..., 0]
    eps = float(eps)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, i, f, C, n)):
        h, Co, no, mo = _StepFn.apply(q, k, v, i, f, C, n, m, eps)
        return h, (Co, no, mo)
    from ..._inplace import inplace_active
    if inplace_active() and C.dtype in (torch.float32, torch.bfloat16, torch.float16) and C.is_contiguous():
        # the decode engine's static state buffer: the new C overwrites the old one (see ops/_inplace.py); a
        # 16-bit C (the engine's reduced-precision state option) is read and written in its dtype, updated in fp32
        h, Co, no, mo = step_forward(*_contig(q, k, v, i, f), C, *_contig(n, m), eps, C_out=C)
        return h, (Co, no, mo)
    h, Co, no, mo = step_forward(*_contig(q, k, v, i, f, C, n, m), eps)
    return h, (Co, no, mo)
