"""The paper's mLSTM block (xLSTM, NeurIPS 2024; docs/MATH.md section 3): pre up-projection, factor 2.

    x -> LayerNorm -> proj_up (E -> 2I) -> split (x_m, z)
    x_c = SiLU(causal conv(x_m));  q = W_q x_c,  k = W_k x_c,  v = W_v x_m   (block-diagonal, 4x4 blocks)
    i~, f~ = Linear([q; k; v])  (one scalar per head)
    h~ = GroupNorm_per_head(mLSTM cell(q, k, v, i~, f~))
    out = x + proj_down((h~ + skip * x_c) * SiLU(z))

The recurrent state is the cell's (C, n, m) plus the conv window, carried as an ``MLSTMBlockState``.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .state import MLSTMBlockState
# the unchecked entry points: the model validated its inputs once (docs/ARCHITECTURE.md)
from ..ops.dispatch import _mlstm_step_unchecked
from ._fast import float_gate_linear, headwise_linear, mlstm_cell_call
from ._packing import PackableMixin
from .conv import CausalConv1d
from .norm import LayerNorm, MultiHeadLayerNorm

__all__ = ["HeadwiseLinear", "MLSTMLayer", "MLSTMBlock", "round_up", "small_init_", "wang_init_"]


def round_up(x: float, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= x (the official code's up-projection rounding)."""
    return int(math.ceil(x / multiple) * multiple)


def small_init_(w: torch.Tensor, dim: int) -> torch.Tensor:
    """N(0, sqrt(2 / (5 dim))) ("Transformers without Tears"), for embeddings and input-side projections."""
    return nn.init.normal_(w, mean=0.0, std=math.sqrt(2.0 / (5.0 * dim)))


def wang_init_(w: torch.Tensor, dim: int, num_blocks: int) -> torch.Tensor:
    """N(0, 2 / (L sqrt(dim))), for projections that write into the residual stream."""
    return nn.init.normal_(w, mean=0.0, std=2.0 / max(num_blocks, 1) / math.sqrt(dim))


def _cell_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class HeadwiseLinear(nn.Module):
    """Block-diagonal linear map: the input is cut into ``num_blocks`` equal pieces, each mapped on its own.

    weight: (num_blocks, out_features // num_blocks, in_features // num_blocks) (the official layout).
    Input (..., in_features) -> output (..., out_features).
    """

    def __init__(self, in_features: int, out_features: int, num_blocks: int, bias: bool = False):
        super().__init__()
        if num_blocks < 1 or in_features % num_blocks or out_features % num_blocks:
            raise ValueError(f"HeadwiseLinear: {num_blocks} blocks must divide in_features={in_features} "
                             f"and out_features={out_features}")
        self.in_features, self.out_features, self.num_blocks = in_features, out_features, num_blocks
        self.weight = nn.Parameter(torch.empty(num_blocks, out_features // num_blocks, in_features // num_blocks))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        small_init_(self.weight, in_features // num_blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the cheapest form for the block shape (see fastxlstm.layers._fast.headwise_linear); under autocast it
        # computes in the autocast dtype like nn.Linear
        return headwise_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, blocks={self.num_blocks}, bias={self.bias is not None}"


def _reset_rows(state: Optional[MLSTMBlockState], resets: Optional[torch.Tensor]):
    """For a one-token call: rows with a reset start from a fresh state (a new tensor; the input is untouched)."""
    if state is None or resets is None or not bool(resets.any()):
        return state
    keep = ~resets[:, 0]

    def clear(t):
        return torch.where(keep.view(-1, *([1] * (t.ndim - 1))), t, torch.zeros_like(t))

    return state.map(clear)


class MLSTMLayer(PackableMixin, nn.Module):
    """The mLSTM layer (everything inside the residual branch except the pre-norm).

    :meth:`pack_projections` keeps igate and fgate as the two row blocks of one weight (see
    :mod:`fastxlstm.layers._packing`), so inference skips the per-call concatenation of the two (two small
    kernels per layer and token). proj_up is already one matmul, and q / k / v read different inputs.

    Args:
        embedding_dim: E.
        num_heads: NH cell heads; the inner width I = round_up(proj_factor * E, round_to) must be divisible by it.
        proj_factor, round_to: up-projection factor (2) and rounding (64).
        conv_kernel_size: causal conv width (4).
        qkv_proj_blocksize: block size of the block-diagonal q/k/v projections (4).
        bias: biases on proj_up / q / k / v / proj_down (the paper: none).
        norm_eps: eps of the per-head GroupNorm (the official code uses 1e-5).
        cell_eps: eps of the cell's normaliser (1e-6).
        num_blocks: number of blocks of the model (wang init of proj_down).
    """

    def __init__(self, embedding_dim: int, num_heads: int = 4, proj_factor: float = 2.0, round_to: int = 64,
                 conv_kernel_size: int = 4, qkv_proj_blocksize: int = 4, bias: bool = False,
                 norm_eps: float = 1e-5, cell_eps: float = 1e-6, num_blocks: int = 1):
        super().__init__()
        inner = round_up(proj_factor * embedding_dim, round_to)
        if inner % num_heads:
            raise ValueError(f"inner dim {inner} (= round_up({proj_factor} * {embedding_dim}, {round_to})) is not "
                             f"divisible by num_heads={num_heads}")
        if inner % qkv_proj_blocksize:
            raise ValueError(f"inner dim {inner} is not divisible by qkv_proj_blocksize={qkv_proj_blocksize}")
        if conv_kernel_size < 1:
            raise ValueError(f"the mLSTM layer needs a conv kernel >= 1, got {conv_kernel_size}")
        self.embedding_dim, self.inner_dim, self.num_heads = embedding_dim, inner, num_heads
        self.head_dim = inner // num_heads
        self.cell_eps, self.num_blocks = float(cell_eps), num_blocks
        nqkv = inner // qkv_proj_blocksize
        self.proj_up = nn.Linear(embedding_dim, 2 * inner, bias=bias)
        self.conv1d = CausalConv1d(inner, conv_kernel_size, bias=True)
        self.q_proj = HeadwiseLinear(inner, inner, nqkv, bias=bias)
        self.k_proj = HeadwiseLinear(inner, inner, nqkv, bias=bias)
        self.v_proj = HeadwiseLinear(inner, inner, nqkv, bias=bias)
        # the official cell reads its gates from [q; k; v] (q, k after the conv, v before it), in that order
        self.igate = nn.Linear(3 * inner, num_heads, bias=True)
        self.fgate = nn.Linear(3 * inner, num_heads, bias=True)
        self.outnorm = MultiHeadLayerNorm(num_heads, self.head_dim, eps=norm_eps, force_float32=True)
        self.learnable_skip = nn.Parameter(torch.ones(inner))
        self.proj_down = nn.Linear(inner, embedding_dim, bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        E = self.embedding_dim
        small_init_(self.proj_up.weight, E)
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            small_init_(lin.weight, E)  # the model width, not the block size (as the official init)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        wang_init_(self.proj_down.weight, E, self.num_blocks)
        for lin in (self.proj_up, self.proj_down):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        self.conv1d.reset_parameters()
        nn.init.zeros_(self.igate.weight)
        nn.init.normal_(self.igate.bias, 0.0, 0.1)
        nn.init.zeros_(self.fgate.weight)
        with torch.no_grad():
            self.fgate.bias.copy_(torch.linspace(3.0, 6.0, self.num_heads))
        nn.init.ones_(self.learnable_skip)
        nn.init.ones_(self.outnorm.weight)

    def pack_projections(self) -> bool:
        """Pack igate and fgate (see the class docstring). True when packed."""
        return self.pack_group("gates", (self.igate, self.fgate))

    def init_state(self, batch_size: int, device=None, dtype=None) -> MLSTMBlockState:
        """Fresh state: C (B, NH, DH, DH), n (B, NH, DH), m (B, NH) in float32 (float64 for a float64 model),
        conv (B, K-1, I) in ``dtype`` (default: the parameters' dtype)."""
        dtype = dtype if dtype is not None else self.proj_up.weight.dtype
        cd = _cell_dtype(dtype)
        B, NH, DH = batch_size, self.num_heads, self.head_dim
        return MLSTMBlockState(
            C=torch.zeros(B, NH, DH, DH, device=device, dtype=cd),
            n=torch.zeros(B, NH, DH, device=device, dtype=cd),
            m=torch.zeros(B, NH, device=device, dtype=cd),
            conv=self.conv1d.init_state(B, device=device, dtype=dtype),
        )

    def forward(self, x: torch.Tensor, state: Optional[MLSTMBlockState] = None,
                resets: Optional[torch.Tensor] = None, backend: str = "auto",
                chunk_size: int = 64) -> Tuple[torch.Tensor, MLSTMBlockState]:
        """x (B, S, E) (already normed) -> (y (B, S, E), new state). ``resets`` (B, S) bool."""
        B, S, _ = x.shape
        NH, DH, I = self.num_heads, self.head_dim, self.inner_dim
        if S == 1 and resets is not None:
            state, resets = _reset_rows(state, resets), None
        x_m, z = self.proj_up(x).split(I, dim=-1)
        x_c, conv_state = self.conv1d(x_m, None if state is None else state.conv, resets)
        x_c = F.silu(x_c)
        q, k, v = self.q_proj(x_c), self.k_proj(x_c), self.v_proj(x_m)
        # gate pre-activations from [q; k; v] in float32 (NH outputs each): exp(i) amplifies any bf16 rounding of
        # them. One call for both gates; it keeps no concatenated or float32 copy of q, k, v for the backward
        g = self.packed_group("gates")
        if g is None:
            w_if = torch.cat([self.igate.weight, self.fgate.weight], dim=0)
            b_if = torch.cat([self.igate.bias, self.fgate.bias], dim=0)
        else:
            w_if, b_if = g.rows(0, 2)  # the same values, already side by side
        gates = float_gate_linear((q, k, v), w_if, b_if)
        i_pre, f_pre = gates.split(NH, dim=-1)  # (B, S, NH) each
        cell_state = None if state is None else (state.C, state.n, state.m)
        if S == 1:
            step_backend = "triton" if backend == "triton" else (
                "auto" if backend == "auto" else "torch")
            h, (C, n, m) = _mlstm_step_unchecked(q.view(B, NH, DH), k.view(B, NH, DH), v.view(B, NH, DH),
                                                 i_pre.reshape(B, NH), f_pre.reshape(B, NH), cell_state,
                                                 self.cell_eps, step_backend)
            h = h.view(B, 1, NH, DH)
        else:
            h, (C, n, m) = mlstm_cell_call(self, q, k, v, gates, NH, state=cell_state, backend=backend,
                                           chunk_size=chunk_size, eps=self.cell_eps, resets=resets)  # (B, S, NH, DH)
        # (B, S, I) in the projections' dtype (bf16 under autocast: x itself is float32 there, from the pre-norm,
        # and casting to it would make float32 copies of every tensor below); normalised before the rounding
        h = self.outnorm(h).to(x_c.dtype)
        h = (h + self.learnable_skip.to(x_c.dtype) * x_c) * F.silu(z)
        return self.proj_down(h), MLSTMBlockState(C=C, n=n, m=m, conv=conv_state)


class MLSTMBlock(nn.Module):
    """Residual pre-norm mLSTM block: ``x + MLSTMLayer(LayerNorm(x))``. Same arguments as :class:`MLSTMLayer`
    plus ``ln_eps`` for the pre-norm."""

    def __init__(self, embedding_dim: int, ln_eps: float = 1e-5, **layer_kwargs):
        super().__init__()
        self.norm = LayerNorm(embedding_dim, eps=ln_eps, bias=False)
        self.layer = MLSTMLayer(embedding_dim, **layer_kwargs)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.norm.weight)
        self.layer.reset_parameters()

    def init_state(self, batch_size: int, device=None, dtype=None) -> MLSTMBlockState:
        return self.layer.init_state(batch_size, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, state: Optional[MLSTMBlockState] = None,
                resets: Optional[torch.Tensor] = None, backend: str = "auto",
                chunk_size: int = 64) -> Tuple[torch.Tensor, MLSTMBlockState]:
        """x (B, S, E) -> (x + branch (B, S, E), new MLSTMBlockState)."""
        y, st = self.layer(self.norm(x), state=state, resets=resets, backend=backend, chunk_size=chunk_size)
        return x + y, st
