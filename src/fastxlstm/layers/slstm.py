"""The paper's sLSTM block (xLSTM, NeurIPS 2024; docs/MATH.md section 3): post up-projection.

    y = x + GroupNorm_per_head(sLSTM cell(W_i x_c, W_f x_c, W_z x_n, W_o x_n)),   x_n = LayerNorm(x),
        x_c = SiLU(causal conv(x_n))   (the conv feeds only the i and f gates)
    out = y + GatedFFN_gelu(LayerNorm(y))   (hidden width round_up(1.3 E, 64))

Gate projections are head-wise block-diagonal (one DH x DH block per head), without bias: the bias lives in the
cell. The state is the cell's (c, n, m, h) plus the conv window, carried as an ``SLSTMBlockState``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .state import SLSTMBlockState
from ..ops.dispatch import _slstm_unchecked  # the model validated its inputs once
from .conv import CausalConv1d
from .ffn import GatedFFN
from ._fast import cell_call, compute_dtype_for
from .mlstm import HeadwiseLinear, _cell_dtype, round_up, small_init_, wang_init_
from .norm import LayerNorm, MultiHeadLayerNorm

__all__ = ["SLSTMLayer", "SLSTMBlock", "powerlaw_forget_bias"]


def powerlaw_forget_bias(head_dim: int, block_index: int, num_blocks: int) -> torch.Tensor:
    """b_f[j] = 5 - 12 (j / (DH - 1))^(0.3 + 1.3 r), r = block_index / (num_blocks - 1): (DH,).

    Units of one head get forget biases from +5 (long memory) down to -7 (short), deeper blocks skew longer.
    """
    r = block_index / (num_blocks - 1) if num_blocks > 1 else 0.0
    j = torch.arange(head_dim, dtype=torch.float64)
    frac = j / (head_dim - 1) if head_dim > 1 else torch.zeros_like(j)
    return (5.0 - 12.0 * frac ** (0.3 + 1.3 * r)).float()


class SLSTMLayer(nn.Module):
    """The sLSTM layer (the residual branch after the pre-norm).

    Args:
        embedding_dim: E (= NH * DH; the cell runs at model width).
        num_heads: NH.
        conv_kernel_size: width of the causal conv feeding i and f (0: no conv).
        norm_eps: eps of the per-head GroupNorm (1e-5 as the official code).
        block_index, num_blocks: position in the stack (the power-law forget-gate bias init depends on it).
    """

    def __init__(self, embedding_dim: int, num_heads: int = 4, conv_kernel_size: int = 4, norm_eps: float = 1e-5,
                 block_index: int = 0, num_blocks: int = 1):
        super().__init__()
        if embedding_dim % num_heads:
            raise ValueError(f"sLSTM: num_heads={num_heads} must divide embedding_dim={embedding_dim}")
        if conv_kernel_size < 0:
            raise ValueError(f"sLSTM conv_kernel_size must be >= 0, got {conv_kernel_size}")
        self.embedding_dim, self.num_heads = embedding_dim, num_heads
        self.head_dim = embedding_dim // num_heads
        self.block_index, self.num_blocks = block_index, num_blocks
        self.conv1d = CausalConv1d(embedding_dim, conv_kernel_size) if conv_kernel_size > 0 else None
        self.igate = HeadwiseLinear(embedding_dim, embedding_dim, num_heads, bias=False)
        self.fgate = HeadwiseLinear(embedding_dim, embedding_dim, num_heads, bias=False)
        self.zgate = HeadwiseLinear(embedding_dim, embedding_dim, num_heads, bias=False)
        self.ogate = HeadwiseLinear(embedding_dim, embedding_dim, num_heads, bias=False)
        # gate g of head h receives h_{t-1} @ recurrent_kernel[g, h]; gates in the order (i, f, z, o)
        self.recurrent_kernel = nn.Parameter(torch.zeros(4, num_heads, self.head_dim, self.head_dim))
        self.gate_bias = nn.Parameter(torch.zeros(4, num_heads, self.head_dim))
        self.group_norm = MultiHeadLayerNorm(num_heads, self.head_dim, eps=norm_eps, force_float32=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.igate, self.fgate, self.zgate, self.ogate):
            small_init_(lin.weight, self.embedding_dim)
        if self.conv1d is not None:
            self.conv1d.reset_parameters()
        nn.init.zeros_(self.recurrent_kernel)
        with torch.no_grad():
            self.gate_bias.zero_()
            self.gate_bias[1] = powerlaw_forget_bias(self.head_dim, self.block_index, self.num_blocks)
        nn.init.ones_(self.group_norm.weight)

    def init_state(self, batch_size: int, device=None, dtype=None) -> SLSTMBlockState:
        """Fresh state: c, n, m, h each (B, NH, DH) in float32 (float64 for a float64 model); conv (B, K-1, E)
        in ``dtype`` (None when the layer has no conv)."""
        dtype = dtype if dtype is not None else self.igate.weight.dtype
        cd = _cell_dtype(dtype)
        shape = (batch_size, self.num_heads, self.head_dim)
        c, n, m, h = (torch.zeros(shape, device=device, dtype=cd) for _ in range(4))
        conv = None if self.conv1d is None else self.conv1d.init_state(batch_size, device=device, dtype=dtype)
        return SLSTMBlockState(c=c, n=n, m=m, h=h, conv=conv)

    def forward(self, x: torch.Tensor, state: Optional[SLSTMBlockState] = None,
                resets: Optional[torch.Tensor] = None,
                backend: str = "auto") -> Tuple[torch.Tensor, SLSTMBlockState]:
        """x (B, S, E) (already normed) -> (y (B, S, E), new state). ``resets`` (B, S) bool."""
        B, S, E = x.shape
        NH, DH = self.num_heads, self.head_dim
        x = x.to(compute_dtype_for(x, self.igate.weight))  # one cast for the conv and the z, o projections
        if self.conv1d is not None:
            x_c, conv_state = self.conv1d(x, None if state is None else state.conv, resets)
            x_c = F.silu(x_c)
        else:
            x_c, conv_state = x, None
        gates = torch.stack([self.igate(x_c), self.fgate(x_c), self.zgate(x), self.ogate(x)], dim=2)
        # the gates stay in the activations' dtype: the cell computes in float32 (float64) whatever it gets, and
        # the CUDA kernels multiply 16-bit inputs on tensor cores (the values are the projections' either way)
        gates = gates.view(B, S, 4, NH, DH)
        cell_state = None if state is None else (state.c, state.n, state.m, state.h)
        h, (c, n, m, h_last) = cell_call(self, _slstm_unchecked, gates, self.recurrent_kernel, self.gate_bias,
                                         state=cell_state, backend=backend, resets=resets)
        y = self.group_norm(h).to(x.dtype)  # (B, S, E)
        return y, SLSTMBlockState(c=c, n=n, m=m, h=h_last, conv=conv_state)


class SLSTMBlock(nn.Module):
    """Residual sLSTM block followed by a residual gated-GELU FFN (both pre-norm)."""

    def __init__(self, embedding_dim: int, num_heads: int = 4, conv_kernel_size: int = 4, norm_eps: float = 1e-5,
                 ln_eps: float = 1e-5, ffn_proj_factor: float = 1.3, ffn_round_to: int = 64,
                 block_index: int = 0, num_blocks: int = 1, bias: bool = False):
        super().__init__()
        self.embedding_dim, self.num_blocks = embedding_dim, num_blocks
        self.norm = LayerNorm(embedding_dim, eps=ln_eps, bias=False)
        self.layer = SLSTMLayer(embedding_dim, num_heads, conv_kernel_size, norm_eps, block_index, num_blocks)
        self.ffn_norm = LayerNorm(embedding_dim, eps=ln_eps, bias=False)
        self.ffn = GatedFFN(embedding_dim, round_up(ffn_proj_factor * embedding_dim, ffn_round_to), "gelu",
                            bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.norm.weight)
        nn.init.ones_(self.ffn_norm.weight)
        self.layer.reset_parameters()
        small_init_(self.ffn.proj_up_gate.weight, self.embedding_dim)
        small_init_(self.ffn.proj_up.weight, self.embedding_dim)
        wang_init_(self.ffn.proj_down.weight, self.embedding_dim, self.num_blocks)
        for lin in (self.ffn.proj_up_gate, self.ffn.proj_up, self.ffn.proj_down):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def init_state(self, batch_size: int, device=None, dtype=None) -> SLSTMBlockState:
        return self.layer.init_state(batch_size, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, state: Optional[SLSTMBlockState] = None,
                resets: Optional[torch.Tensor] = None, backend: str = "auto",
                chunk_size: int = 64) -> Tuple[torch.Tensor, SLSTMBlockState]:
        """x (B, S, E) -> (B, S, E) and the new SLSTMBlockState (``chunk_size`` is unused: sLSTM is recurrent)."""
        y, st = self.layer(self.norm(x), state=state, resets=resets, backend=backend)
        x = x + y
        return x + self.ffn(self.ffn_norm(x)), st
