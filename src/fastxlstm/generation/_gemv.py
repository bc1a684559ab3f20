"""A Triton matrix-vector product for one-token decoding at batch 1 (y = x W^T + b, x of one row).

At batch 1 every linear layer of a decode step is a matrix-vector product: it reads the whole weight once and does
2 FLOPs per weight, so it is bound by memory bandwidth. cuBLAS picks split-K kernels plus a reduction kernel for
these shapes (measured on the H200: ~73% of the copy bandwidth over a 7B step). This kernel gives each program
BN rows of W and streams them in BK-wide tiles (no split-K, no second kernel), with enough programs and pipeline
stages in flight to keep HBM busy.

It is used only while the CUDA-graph decoder captures a batch-1 step (``skinny_linears``), for the weight shapes
where it measured faster than cuBLAS inside the captured step (FASTXLSTM_GEMV: "auto" default, "1" all, "0" none).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..ops._intmath import cdiv, next_pow2
from ._modes import env_choice

__all__ = ["gemv", "skinny_linears", "gemv_enabled"]


def gemv_mode() -> str:
    """FASTXLSTM_GEMV: "auto" (default: the Triton GEMV for the shapes where it beat cuBLAS inside the captured
    step, see ``_use_gemv``), "1" (every batch-1 linear), "0" (cuBLAS only)."""
    return env_choice("FASTXLSTM_GEMV", "auto", _GEMV_ALIASES, "batch-1 GEMV mode")


_GEMV_ALIASES = {"auto": "auto", "1": "all", "true": "all", "all": "all", "0": "off", "false": "off", "off": "off"}


def gemv_enabled() -> bool:
    return gemv_mode() != "off"


# "auto": weights with at most this many rows (the 7B's out-projection 4096 x 4096 and FFN down-projection
# 4096 x 10944); cuBLAS keeps the wide ones (packed q|k|v|o 12288 rows, FFN up 21888, the LM head), where its
# non-split-K kernels already run near the copy bandwidth
_AUTO_MAX_ROWS = 4096


def _use_gemv(weight: torch.Tensor) -> bool:
    mode = gemv_mode()
    return mode == "all" or (mode == "auto" and weight.shape[0] <= _AUTO_MAX_ROWS)


_KERNEL = None


def _kernel():
    global _KERNEL
    if _KERNEL is None:
        import triton
        import triton.language as tl

        @triton.jit
        def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_wn, HAS_BIAS: tl.constexpr, BN: tl.constexpr,
                         BK: tl.constexpr):
            pid = tl.program_id(0)
            rn = pid * BN + tl.arange(0, BN)
            mn = rn < N
            acc = tl.zeros([BN, BK], dtype=tl.float32)
            w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn
            for k0 in range(0, K, BK):
                rk = k0 + tl.arange(0, BK)
                mk = rk < K
                x = tl.load(x_ptr + rk, mask=mk, other=0.0).to(tl.float32)
                w = tl.load(w_rows + rk[None, :], mask=mn[:, None] & mk[None, :], other=0.0).to(tl.float32)
                acc += w * x[None, :]
            y = tl.sum(acc, axis=1)
            if HAS_BIAS:
                y += tl.load(b_ptr + rn, mask=mn, other=0.0).to(tl.float32)
            tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=mn)

        _KERNEL = _gemv_kernel
    return _KERNEL


def gemv(x: torch.Tensor, weight: torch.Tensor, bias=None, BN: int = 8, BK: int = 1024, num_warps: int = 8,
         num_stages: int = 3) -> torch.Tensor:
    """x (..., K) with one row in all; weight (N, K) row-major; bias (N,) or None -> (..., N) in x's dtype.
    fp32 accumulation; the result equals F.linear up to summation order. BN rows per program, BK-wide tiles."""
    K = x.shape[-1]
    N = weight.shape[0]
    if x.numel() != K or weight.shape[1] != K or weight.stride(1) != 1:
        raise ValueError(f"gemv takes one row x (..., K) and a row-major weight (N, K), got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")
    xc = x.reshape(K).contiguous()
    y = torch.empty(N, device=x.device, dtype=x.dtype)
    # default 8 rows x 1024 columns per load: 16 KB in flight per program, several programs per SM
    BK = min(BK, max(16, next_pow2(K)))
    _kernel()[(cdiv(N, BN),)](xc, weight, bias if bias is not None else weight, y, N, K, weight.stride(0),
                              HAS_BIAS=bias is not None, BN=BN, BK=BK, num_warps=num_warps, num_stages=num_stages)
    return y.view(*x.shape[:-1], N)


# 4 rows x 1024 columns per program, 4 warps, no software pipelining: the best or near-best configuration on every
# 7B decode shape measured on the H200 (benchmarks/NOTES.md)
_CFG = dict(BN=4, BK=1024, num_warps=4, num_stages=1)


def _skinny_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if (x.is_cuda and x.numel() == x.shape[-1] and x.dtype in (torch.bfloat16, torch.float16)
            and module.weight.dtype == x.dtype and not torch.is_grad_enabled() and _use_gemv(module.weight)):
        return gemv(x, module.weight, module.bias, **_CFG)
    return nn.functional.linear(x, module.weight, module.bias)


def _skinny_packed(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    if (x.is_cuda and x.numel() == x.shape[-1] and x.dtype in (torch.bfloat16, torch.float16)
            and weight.dtype == x.dtype and weight.stride(1) == 1 and not torch.is_grad_enabled()
            and _use_gemv(weight)):
        return gemv(x, weight, bias, **_CFG)
    return nn.functional.linear(x, weight, bias)


@contextlib.contextmanager
def skinny_linears(model: nn.Module):
    """Inside: every nn.Linear of ``model`` computes a single-row input with :func:`gemv` (others as usual).
    The modules are restored on exit; a CUDA graph captured inside keeps the kernels it recorded."""
    from ..layers import _packing
    patched = []
    packed_linear = _packing._LINEAR
    try:
        for mod in model.modules():
            if type(mod) is nn.Linear and "forward" not in mod.__dict__:
                mod.forward = (lambda m: (lambda x: _skinny_forward(m, x)))(mod)
                patched.append(mod)
        # the packed projections (fastxlstm.layers._packing) call this instead of nn.Linear
        _packing._LINEAR = _skinny_packed
        yield
    finally:
        _packing._LINEAR = packed_linear
        for mod in patched:
            del mod.forward
