"""Normalisation layers shared by the paper's model and the 7B.

All three keep their weight as the multiplier itself (initialised to 1). The official ``xlstm`` package stores
``w - 1`` instead ("residual weight"); the converter in ``fastxlstm.interop.official`` adds the 1 back.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LayerNorm", "RMSNorm", "MultiHeadLayerNorm"]


def _check_last_dim(name: str, x: torch.Tensor, dim: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} expects a tensor, got {type(x).__name__}")
    if x.ndim < 1 or x.shape[-1] != dim:
        raise ValueError(f"{name} expects an input whose last dim is {dim}, got shape {tuple(x.shape)}")


class LayerNorm(nn.Module):
    """Layer norm over the last dim with a weight and an optional bias (the paper's blocks use no bias).

    Input (..., dim) -> output (..., dim), same dtype.
    """

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = False):
        super().__init__()
        if dim < 1:
            raise ValueError(f"LayerNorm dim must be positive, got {dim}")
        self.dim = dim
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_last_dim("LayerNorm", x, self.dim)
        return F.layer_norm(x, (self.dim,), self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, bias={self.bias is not None}"


class RMSNorm(nn.Module):
    """RMS norm over the last dim: ``(x / sqrt(mean(x^2) + eps)).to(x.dtype) * weight``.

    The reduction runs in float32 when ``force_float32`` (bf16 squares lose too much); the normalised value is cast
    back to the input dtype BEFORE the weight multiply, as the 7B checkpoint was trained (the order changes bf16
    rounding). Input (..., dim) -> output (..., dim).
    """

    def __init__(self, dim: int, eps: float = 1e-6, force_float32: bool = True):
        super().__init__()
        if dim < 1:
            raise ValueError(f"RMSNorm dim must be positive, got {dim}")
        self.dim = dim
        self.eps = float(eps)
        self.force_float32 = bool(force_float32)
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_last_dim("RMSNorm", x, self.dim)
        in_dtype = x.dtype
        if self.force_float32 and in_dtype in (torch.float16, torch.bfloat16) and not torch.compiler.is_compiling():
            # the fused kernel reduces in float32 and rounds the normalised value once, keeping no float32 copy
            # of x for the backward (autocast would run it in float32: it is off for this call)
            with torch.autocast(x.device.type, enabled=False):
                y = F.rms_norm(x, (self.dim,), None, self.eps)
            return y * self.weight.to(in_dtype)
        xf = x.float() if (self.force_float32 and x.dtype in (torch.float16, torch.bfloat16)) else x
        y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return y.to(in_dtype) * self.weight.to(in_dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, force_float32={self.force_float32}"


class MultiHeadLayerNorm(nn.Module):
    """Per-head layer norm (mean-centred, biased variance), i.e. a GroupNorm with one group per head.

    Input (..., NH, DH) -> output (..., NH * DH). The weight (and optional bias) is flat, of size NH * DH, as in
    both checkpoints. Reductions run in float32 when ``force_float32``; the result is cast back to the input dtype
    before the weight multiply.
    """

    def __init__(self, num_heads: int, head_dim: int, eps: float = 1e-6, force_float32: bool = True,
                 bias: bool = False):
        super().__init__()
        if num_heads < 1 or head_dim < 1:
            raise ValueError(f"MultiHeadLayerNorm needs positive num_heads and head_dim, got {num_heads}, {head_dim}")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.eps = float(eps)
        self.force_float32 = bool(force_float32)
        self.weight = nn.Parameter(torch.ones(num_heads * head_dim))
        self.bias = nn.Parameter(torch.zeros(num_heads * head_dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim < 2 or tuple(x.shape[-2:]) != (self.num_heads, self.head_dim):
            raise ValueError(f"MultiHeadLayerNorm expects (..., {self.num_heads}, {self.head_dim}), "
                             f"got {tuple(getattr(x, 'shape', ()))}")
        in_dtype = x.dtype
        if self.force_float32 and in_dtype in (torch.float16, torch.bfloat16) and not torch.compiler.is_compiling():
            # the fused kernel reduces in float32 and rounds the normalised value once, keeping only x (16-bit) and
            # the per-head mean / rstd for the backward (autocast would run it in float32: off for this call)
            with torch.autocast(x.device.type, enabled=False):
                y = F.layer_norm(x, (self.head_dim,), None, None, self.eps)
            y = y.reshape(*x.shape[:-2], self.num_heads * self.head_dim) * self.weight.to(in_dtype)
            return y if self.bias is None else y + self.bias.to(in_dtype)
        xf = x.float() if (self.force_float32 and x.dtype in (torch.float16, torch.bfloat16)) else x
        xc = xf - xf.mean(dim=-1, keepdim=True)
        var = xc.pow(2).mean(dim=-1, keepdim=True)
        y = (xc * torch.rsqrt(var + self.eps)).to(in_dtype)
        y = y.reshape(*x.shape[:-2], self.num_heads * self.head_dim)
        y = y * self.weight.to(in_dtype)
        if self.bias is not None:
            y = y + self.bias.to(in_dtype)
        return y

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, head_dim={self.head_dim}, eps={self.eps}, "
                f"force_float32={self.force_float32}, bias={self.bias is not None}")
