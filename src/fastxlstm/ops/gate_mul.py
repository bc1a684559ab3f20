"""``act(a) * b`` in one pass: the gating of the 7B's SwiGLU FFN (silu) and output gate (sigmoid), and of the
paper's sLSTM-block FFN (gelu), for inference outside torch.compile.

In eager PyTorch these are two kernels, and with packed projections (``fastxlstm.layers._packing``) a and b are
column slices of one matmul output, so both kernels take the slow strided path: at a 16k-token prefill of the 7B they
were ~60 ms of ~420. The Triton kernel reads a and b once with their row strides and writes act(a) * b, computed in
float32 and rounded once (eager rounds act(a) first: the fused result is as close or closer to the exact one).

:func:`gate_mul` picks the kernel on CUDA without autograd (prefill, eager decoding) and the PyTorch expression
otherwise (training, CPU, inside torch.compile, where Inductor fuses it by itself).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._intmath import cdiv, next_pow2

__all__ = ["gate_mul", "ACTIVATIONS"]

ACTIVATIONS = ("silu", "sigmoid", "gelu")
_TORCH = {"silu": F.silu, "sigmoid": torch.sigmoid, "gelu": F.gelu}
_KERNEL = None
# below this many elements the two eager kernels are as fast (launch-bound); the fused kernel is for long inputs
_MIN_NUMEL = 1 << 16


def _kernel():
    global _KERNEL
    if _KERNEL is None:
        import triton
        import triton.language as tl

        @triton.jit
        def _gate_mul_kernel(a_ptr, b_ptr, y_ptr, D, stride_a, stride_b, ACT: tl.constexpr, BD: tl.constexpr):
            row = tl.program_id(0).to(tl.int64)
            col = tl.program_id(1) * BD + tl.arange(0, BD)
            msk = col < D
            a = tl.load(a_ptr + row * stride_a + col, mask=msk, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + row * stride_b + col, mask=msk, other=0.0).to(tl.float32)
            if ACT == 0:
                g = a * tl.sigmoid(a)
            elif ACT == 1:
                g = tl.sigmoid(a)
            else:
                g = 0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476))
            tl.store(y_ptr + row * D + col, (g * b).to(y_ptr.dtype.element_ty), mask=msk)

        _KERNEL = _gate_mul_kernel
    return _KERNEL


def _rows(t: torch.Tensor):
    """(rows, row stride) when t is (..., D) with unit column stride and its leading dims collapse to one strided
    axis (a column slice of a contiguous matmul output does: the case this is for); None otherwise."""
    if t.stride(-1) != 1:
        return None
    try:
        t2 = t.view(-1, t.shape[-1])  # a view exactly when the leading dims merge into one stride
    except RuntimeError:
        return None
    return t2.shape[0], t2.stride(0)


def gate_mul(a: torch.Tensor, b: torch.Tensor, act: str) -> torch.Tensor:
    """``act(a) * b`` for a, b of one shape (..., D) and dtype; act in :data:`ACTIVATIONS`. Returns a contiguous
    tensor of that shape and dtype."""
    if act not in _TORCH:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    if (not a.is_cuda or torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
            or torch.compiler.is_compiling() or a.shape != b.shape or a.dtype != b.dtype
            or a.dtype not in (torch.float16, torch.bfloat16, torch.float32) or a.numel() < _MIN_NUMEL):
        return _TORCH[act](a) * b
    ra, rb = _rows(a), _rows(b)
    if ra is None or rb is None:
        return _TORCH[act](a) * b
    return _launch(a, b, act, ra, rb)


def _launch(a, b, act, ra, rb):
    N, sa = ra
    _, sb = rb
    D = a.shape[-1]
    y = torch.empty(a.shape, device=a.device, dtype=a.dtype)
    BD = min(1024, max(16, next_pow2(D)))
    grid = (N, cdiv(D, BD))
    _kernel()[grid](a, b, y, D, sa, sb, ACT=ACTIVATIONS.index(act), BD=BD, num_warps=4)
    return y
