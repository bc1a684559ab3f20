"""Causal depthwise 1-D convolution with a carried window state and document resets.

Output at t is ``bias + sum_j weight[:, K-1-j] * x[t-j]`` for j = 0..K-1 (kernel K, one filter per channel). The
K-1 inputs before the first token come from ``state`` (zeros when fresh), so a long sequence split into pieces
gives the same output as one pass. ``resets`` (B, S) marks document starts: an input before a reset never reaches
an output at or after it, exactly as if the window had been zeros at the document start (packed training data,
left-padded generation).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..ops._checks import values_readable

__all__ = ["CausalConv1d"]


class CausalConv1d(nn.Module):
    """Depthwise causal conv over (B, S, D) with a (B, K-1, D) window state.

    Parameters: ``weight`` (D, 1, K) (the layout of ``nn.Conv1d(D, D, K, groups=D)``, so weights convert
    1:1 from the official package) and ``bias`` (D,).
    """

    def __init__(self, dim: int, kernel_size: int = 4, bias: bool = True):
        super().__init__()
        if dim < 1:
            raise ValueError(f"CausalConv1d dim must be positive, got {dim}")
        if kernel_size < 1:
            raise ValueError(f"CausalConv1d kernel_size must be >= 1, got {kernel_size}")
        self.dim = dim
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(dim, 1, kernel_size))
        self.bias = nn.Parameter(torch.empty(dim)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv1d's default (fan_in = K for a depthwise filter), which is what the official blocks use too
        bound = 1.0 / math.sqrt(self.kernel_size)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def init_state(self, batch_size: int, device=None, dtype=None) -> torch.Tensor:
        """A fresh (zero) window, (B, K-1, D)."""
        return torch.zeros(batch_size, self.kernel_size - 1, self.dim, device=device,
                           dtype=dtype if dtype is not None else self.weight.dtype)

    def _check(self, x, state, resets):
        if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"CausalConv1d expects x of shape (B, S, {self.dim}), got "
                             f"{tuple(getattr(x, 'shape', ()))}")
        B, S, _ = x.shape
        if state is not None:
            if not isinstance(state, torch.Tensor) or tuple(state.shape) != (B, self.kernel_size - 1, self.dim):
                raise ValueError(f"conv state must have shape (B, K-1, D) = ({B}, {self.kernel_size - 1}, "
                                 f"{self.dim}), got {tuple(getattr(state, 'shape', ()))}")
            if state.device != x.device:
                raise ValueError(f"conv state is on {state.device} but x is on {x.device}")
        if resets is not None:
            if not isinstance(resets, torch.Tensor) or resets.dtype != torch.bool or tuple(resets.shape) != (B, S):
                raise ValueError(f"resets must be a bool tensor of shape (B, S) = ({B}, {S})")

    def forward(self, x: torch.Tensor, state: Optional[torch.Tensor] = None,
                resets: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """x (B, S, D), state (B, K-1, D) or None, resets (B, S) bool or None -> (y (B, S, D), new state).

        The new state is a fresh tensor (the given one is never written to).
        """
        self._check(x, state, resets)
        B, S, D = x.shape
        K = self.kernel_size
        if state is None:
            state = x.new_zeros(B, K - 1, D)
        else:
            state = state.to(x.dtype)
        xp = torch.cat([state, x], dim=1)  # (B, K-1+S, D); xp[:, K-1+t] = x[:, t]
        w = self.weight.to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        # (inside torch.compile or a CUDA graph capture the masked path runs whenever resets are given: it is exact
        # without resets too, and testing for any reset would need the value on the host)
        if resets is not None and (not values_readable(resets) or bool(resets.any())):
            return self._forward_resets(xp, w, b, resets)
        if S == 1 and not torch.compiler.is_compiling():
            # decoding step: one dot product per channel, cheaper than launching a convolution
            y = torch.einsum("bkd,dk->bd", xp, w[:, 0, :])[:, None, :]
            if b is not None:
                y = y + b
        elif torch.compiler.is_compiling():
            # K shifted multiply-adds: Inductor fuses them (and the concatenation) into one pass, where a
            # convolution would stay an external kernel with transposes around it
            y = sum(xp[:, k:k + S] * w[:, 0, k] for k in range(K))
            if b is not None:
                y = y + b
        else:
            y = F.conv1d(xp.transpose(1, 2), w, b, groups=D).transpose(1, 2)
        return y, xp[:, S:].clone() if K > 1 else xp[:, :0].clone()

    def _forward_resets(self, xp, w, b, resets):
        B, L, D = xp.shape
        K = self.kernel_size
        S = L - (K - 1)
        pos = torch.arange(S, device=xp.device)
        # seg[b, t] = the latest reset position <= t (or -K: the carried window is still valid)
        seg = torch.where(resets, pos, torch.full_like(pos, -K)).cummax(dim=1).values  # (B, S)
        # window element k of output t reads input position t - (K-1) + k (negative = carried state)
        win_pos = pos[:, None] - (K - 1) + torch.arange(K, device=xp.device)[None, :]  # (S, K)
        keep = (win_pos[None] >= seg[:, :, None]).to(xp.dtype)  # (B, S, K)
        # y[b, t] = sum_k keep[b, t, k] w[:, k] xp[b, t + k]: K shifted slices (no unfold view: torch.compile's
        # CPU backend corrupted the heap in the backward of the unfold + einsum form, torch 2.13)
        wk = w[:, 0, :]  # (D, K)
        y = sum(xp[:, k:k + S] * (keep[:, :, k:k + 1] * wk[:, k]) for k in range(K))
        if b is not None:
            y = y + b
        # the carried window must not hold inputs from before the last document start either
        last_pos = torch.arange(S - (K - 1), S, device=xp.device)  # positions of the last K-1 inputs
        keep_state = (last_pos[None, :] >= seg[:, -1:]).to(xp.dtype)  # (B, K-1)
        new_state = xp[:, S:] * keep_state[:, :, None]
        return y, new_state
