"""Triton kernels for the sLSTM (CUDA; the CPU interpreter TRITON_INTERPRET=1 runs them too, for tests).

    slstm_triton(x, R, b, state, resets) -> (h, (c, n, m, h_last))

Differentiable (a torch.autograd.Function: gradients to x, R, b and the initial c, n, h). One call with S = 1 is
the decoding step; without autograd it allocates one small state buffer and launches one kernel. triton is
imported only when this is first called, so ``import fastxlstm`` stays light. The kernels are in _kernels.py.
"""
from __future__ import annotations

from typing import Optional

import torch

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)  # (the same tuple as _kernels.SUPPORTED_HEAD_DIMS, without triton)


def _state_buffer(state, B, NH, DH, NS, device):
    st = torch.empty(NS, 4, B, NH, DH, dtype=torch.float32, device=device)
    if state is None:
        st[0].zero_()  # n == 0: an empty state (the stabiliser starts from the first input gate)
    else:
        torch.stack([s.to(torch.float32) for s in state], dim=0, out=st[0])
    return st


class _SLSTMTritonFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, R, b, c0, n0, m0, h0, resets, cfg):
        from ._kernels import slstm_forward
        B, S, _, NH, DH = x.shape
        has_state = c0 is not None
        st = _state_buffer((c0, n0, m0, h0) if has_state else None, B, NH, DH, S + 1, x.device)
        h, G = slstm_forward(x, R, b, st, resets, True, cfg)
        ctx.save_for_backward(G, st, R, resets)
        ctx.has_resets = resets is not None
        ctx.cfg, ctx.has_state, ctx.x_dtype = cfg, has_state, x.dtype
        ctx.b_dtype = b.dtype
        fin = st[S]
        return h, fin[0].clone(), fin[1].clone(), fin[2].clone(), fin[3].clone()

    @staticmethod
    def backward(ctx, gh, gc, gn, gm, ghl):
        from ._kernels import slstm_backward
        G, st, R, resets = ctx.saved_tensors
        if not ctx.has_resets:
            resets = None
        B, S, _, NH, DH = G.shape
        dG, dc0, dn0, dh0 = slstm_backward(G, st, resets, R, ctx.x_dtype, gh, gc, gn, ghl, ctx.cfg)
        dx = dR = db = None
        if ctx.needs_input_grad[0]:
            dx = dG.to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            db = dG.sum(dim=(0, 1)).to(ctx.b_dtype)
        if ctx.needs_input_grad[1]:
            # dR[g, h] = sum over (b, t) of h_{t-1}^T dG_t: one batched matmul per head, in the dots' dtype
            hp = st[:S, 3]  # (S, B, NH, DH): h_{t-1}, zero after a reset
            if resets is not None:
                hp = hp * (~resets).t().to(hp.dtype)[:, :, None, None]
            mm = ctx.x_dtype if ctx.x_dtype in (torch.float16, torch.bfloat16) else torch.float32
            A = hp.permute(2, 3, 1, 0).reshape(NH, DH, B * S).to(mm)  # (NH, DH, B*S), (b, t) order
            Bm = dG.permute(3, 0, 1, 2, 4).reshape(NH, B * S, 4 * DH).to(mm)  # (NH, B*S, 4*DH)
            dR = torch.bmm(A, Bm).float().view(NH, DH, 4, DH).permute(2, 0, 1, 3).to(R.dtype)
        if not ctx.has_state:
            return dx, dR, db, None, None, None, None, None, None
        return dx, dR, db, dc0, dn0, None, dh0, None, None


_disabled = None


def slstm_triton(x, R, b, state=None, resets: Optional[torch.Tensor] = None, cfg=None):
    """The sLSTM over a sequence with the Triton kernels (inputs validated by fastxlstm.ops.slstm).

    x (B, S, 4, NH, DH) fp16/bf16/fp32 (gates i, f, z, o); R (4, NH, DH, DH); b (4, NH, DH); state None or
    (c, n, m, h) each (B, NH, DH); resets None or (B, S) bool; DH in SUPPORTED_HEAD_DIMS. Returns h (B, S, NH, DH)
    in x's dtype and the final (c, n, m, h) in float32. ``cfg`` (an SLSTMTritonConfig) overrides the tiling.
    """
    if torch.compiler.is_compiling():
        # torch.compile runs the kernels as they are (a graph break) rather than tracing the launcher. The wrapper
        # is made here, not at import: torch.compiler.disable imports dynamo (and triton); eager calls skip it
        # (a few microseconds per decoding step)
        global _disabled
        if _disabled is None:
            _disabled = torch.compiler.disable(_slstm_triton)
        return _disabled(x, R, b, state, resets, cfg)
    return _slstm_triton(x, R, b, state, resets, cfg)


def _slstm_triton(x, R, b, state, resets, cfg):
    x = x.contiguous()
    B, S, _, NH, DH = x.shape
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or R.requires_grad or b.requires_grad
        or (state is not None and any(s.requires_grad for s in state)))
    if needs_grad:
        c0, n0, m0, h0 = (None,) * 4 if state is None else state
        h, c, n, m, hl = _SLSTMTritonFn.apply(x, R, b, c0, n0, m0, h0, resets, cfg)
        return h, (c, n, m, hl)
    from ._kernels import slstm_forward
    st = _state_buffer(state, B, NH, DH, 2, x.device)
    h, _ = slstm_forward(x, R.detach(), b.detach(), st, resets, False, cfg)
    fin = st[S % 2]
    return h, (fin[0], fin[1], fin[2], fin[3])


__all__ = ["slstm_triton", "SUPPORTED_HEAD_DIMS"]
