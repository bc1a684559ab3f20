"""The recurrent state of a model: one small typed entry per block, never a dict of magic strings.

States are immutable values: layers return new tensors and never write into a state they were given, so a
carried state can be backpropagated through (stateful training) and reused (branching generation).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional, Tuple, Union

import torch


def _map(obj, fn):
    return replace(obj, **{f.name: (None if getattr(obj, f.name) is None else fn(getattr(obj, f.name)))
                           for f in fields(obj)})


@dataclass(frozen=True)
class MLSTMBlockState:
    """State of one mLSTM block: the cell's (C, n, m) and the causal conv's window.

    C: (B, NH, DQK, DV), n: (B, NH, DQK), m: (B, NH), all float32 (stabilised form of the spec).
    conv: (B, K-1, D) the last K-1 inputs of the causal conv (None for blocks without a conv, e.g. the 7B).
    """
    C: torch.Tensor
    n: torch.Tensor
    m: torch.Tensor
    conv: Optional[torch.Tensor] = None

    def map(self, fn) -> "MLSTMBlockState":
        return _map(self, fn)


@dataclass(frozen=True)
class SLSTMBlockState:
    """State of one sLSTM block: the cell's (c, n, m, h), each (B, NH, DH), and the causal conv's window."""
    c: torch.Tensor
    n: torch.Tensor
    m: torch.Tensor
    h: torch.Tensor
    conv: Optional[torch.Tensor] = None

    def map(self, fn) -> "SLSTMBlockState":
        return _map(self, fn)


BlockState = Union[MLSTMBlockState, SLSTMBlockState]


@dataclass(frozen=True)
class XLSTMState:
    """The whole model's state: ``blocks[i]`` belongs to block i."""
    blocks: Tuple[BlockState, ...]

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, idx: int) -> BlockState:
        return self.blocks[idx]

    def __iter__(self):
        return iter(self.blocks)

    @property
    def batch_size(self) -> int:
        first = self.blocks[0]
        return (first.C if isinstance(first, MLSTMBlockState) else first.c).shape[0]

    def map(self, fn) -> "XLSTMState":
        """Apply ``fn`` to every tensor (e.g. ``lambda t: t.detach()`` or ``lambda t: t[idx]``)."""
        return XLSTMState(tuple(b.map(fn) for b in self.blocks))

    def detach(self) -> "XLSTMState":
        return self.map(lambda t: t.detach())

    def to(self, *args, **kwargs) -> "XLSTMState":
        return self.map(lambda t: t.to(*args, **kwargs))

    def select(self, index) -> "XLSTMState":
        """Rows of the batch (an int list, slice or bool mask): e.g. to drop finished sequences."""
        return self.map(lambda t: t[index])

    def nbytes(self) -> int:
        total = 0
        for b in self.blocks:
            for f in fields(b):
                t = getattr(b, f.name)
                if t is not None:
                    total += t.numel() * t.element_size()
        return total
