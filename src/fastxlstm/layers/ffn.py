"""Gated feed-forward network: ``proj_down(act(proj_up_gate(x)) * proj_up(x))``.

With ``activation="silu"`` this is the 7B's SwiGLU; with ``"gelu"`` the paper's sLSTM-block FFN. Attribute names
match the transformers xLSTM checkpoint keys (``ffn.proj_up_gate``, ``ffn.proj_up``, ``ffn.proj_down``).
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.gate_mul import gate_mul
from ._fast import compute_dtype_for
from ._packing import PackableMixin

__all__ = ["GatedFFN"]

# the gating activations a GatedFFN takes (fastxlstm.ops.gate_mul applies them)
_ACTS = ("gelu", "silu")


class GatedFFN(PackableMixin, nn.Module):
    """Input (..., dim) -> output (..., dim) through a gated hidden layer of width ``hidden_dim``.

    :meth:`pack_projections` stores proj_up_gate and proj_up (two projections of the same input) as row blocks of
    one weight (see :mod:`fastxlstm.layers._packing`): one matmul instead of two, same function and parameters.
    """

    def __init__(self, dim: int, hidden_dim: int, activation: str = "gelu", bias: bool = False):
        super().__init__()
        if activation not in _ACTS:
            raise ValueError(f"activation must be one of {_ACTS}, got {activation!r}")
        if dim < 1 or hidden_dim < 1:
            raise ValueError(f"GatedFFN needs positive dim and hidden_dim, got {dim}, {hidden_dim}")
        self.dim = dim
        self.hidden_dim = hidden_dim
        self.activation = activation
        self.proj_up_gate = nn.Linear(dim, hidden_dim, bias=bias)
        self.proj_up = nn.Linear(dim, hidden_dim, bias=bias)
        self.proj_down = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"GatedFFN expects (..., {self.dim}), got {tuple(getattr(x, 'shape', ()))}")
        # one cast to the compute dtype for both up-projections (autocast would keep a copy per projection)
        x = x.to(compute_dtype_for(x, self.proj_up.weight))
        g = self.packed_group("up")
        if g is None:
            gate, up = self.proj_up_gate(x), self.proj_up(x)
        else:
            gate, up = g.linear(x).split(g.sizes, dim=-1)
        return self.proj_down(gate_mul(gate, up, self.activation))

    def pack_projections(self) -> bool:
        """Pack proj_up_gate and proj_up (see the class docstring). True when packed."""
        return self.pack_group("up", (self.proj_up_gate, self.proj_up))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden_dim={self.hidden_dim}, activation={self.activation!r}"
