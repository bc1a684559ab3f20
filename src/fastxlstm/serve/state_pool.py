"""Rows of a batched recurrent state: stack, split, and a fixed pool of per-sequence slots.

A sequence's whole memory is one row of an :class:`~fastxlstm.layers.state.XLSTMState` (every tensor of every
block has the batch on dim 0), so continuous batching needs no paged cache: a pool of ``max_batch`` rows, one per
running request, that the decode step reads and replaces.

States handed to or returned by the model are immutable values. The pool owns its tensors: it copies rows in
(:meth:`StatePool.write`), reads rows out as new tensors (:meth:`StatePool.gather`), and after a decode step
either takes the returned state as its new storage (all slots decoded: no copy) or copies the decoded rows back
(:meth:`StatePool.scatter`).
"""
from __future__ import annotations

from dataclasses import fields
from typing import List, Optional, Sequence

import torch

from ..layers.state import XLSTMState

__all__ = ["StatePool", "stack_states", "split_state", "state_leaves"]


def state_leaves(state: XLSTMState) -> List[torch.Tensor]:
    """The tensors of a state in a fixed order (block by block, field by field; None fields skipped)."""
    out = []
    for blk in state.blocks:
        for f in fields(blk):
            t = getattr(blk, f.name)
            if t is not None:
                out.append(t)
    return out


def _rebuild(template: XLSTMState, leaves: Sequence[torch.Tensor]) -> XLSTMState:
    it = iter(leaves)
    return template.map(lambda _t: next(it))


def stack_states(states: Sequence[XLSTMState]) -> XLSTMState:
    """Concatenate states along the batch (each may hold several rows)."""
    if len(states) == 1:
        return states[0]
    per = [state_leaves(s) for s in states]
    return _rebuild(states[0], [torch.cat(ts, dim=0) for ts in zip(*per)])


def split_state(state: XLSTMState) -> List[XLSTMState]:
    """One single-row state per batch row (new tensors, so rows do not keep the whole batch alive)."""
    B = state.batch_size
    if B == 1:
        return [state]
    return [state.map(lambda t, i=i: t[i:i + 1].clone()) for i in range(B)]


class StatePool:
    """``size`` state slots on one device, allocated from the first row written (shapes and dtypes of the model's
    own state, so any model layout works).

    ``state``: the pooled (size, ...) XLSTMState (rows of free slots hold stale values that are never read).
    """

    def __init__(self, size: int):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        self.size = size
        self.state: Optional[XLSTMState] = None

    def _allocate(self, row: XLSTMState) -> None:
        self.state = row.map(lambda t: torch.zeros((self.size, *t.shape[1:]), dtype=t.dtype, device=t.device))

    def row_nbytes(self) -> int:
        return 0 if self.state is None else self.state.nbytes() // self.size

    def write(self, slot: int, row: XLSTMState) -> None:
        """Copy a single-row state into ``slot``."""
        if row.batch_size != 1:
            raise ValueError(f"write takes a single-row state, got batch {row.batch_size}")
        if self.state is None:
            self._allocate(row)
        for dst, src in zip(state_leaves(self.state), state_leaves(row)):
            dst[slot].copy_(src[0])

    def gather(self, slots: Sequence[int]) -> XLSTMState:
        """The rows of ``slots`` (in that order) as a new state; the whole pool itself when ``slots`` is
        ``0..size-1`` (no copy)."""
        if self._is_all(slots):
            return self.state
        idx = torch.as_tensor(list(slots), dtype=torch.long, device=state_leaves(self.state)[0].device)
        return self.state.map(lambda t: t.index_select(0, idx))

    def scatter(self, slots: Sequence[int], rows: XLSTMState) -> None:
        """Store ``rows`` (row i -> slot ``slots[i]``). When ``slots`` covers the whole pool in order, ``rows``
        becomes the pool's storage (the caller gives up the tensors); otherwise the rows are copied in."""
        if self._is_all(slots):
            self.state = rows
            return
        idx = torch.as_tensor(list(slots), dtype=torch.long, device=state_leaves(self.state)[0].device)
        for dst, src in zip(state_leaves(self.state), state_leaves(rows)):
            dst.index_copy_(0, idx, src)

    def read(self, slot: int) -> XLSTMState:
        """A copy of one slot as a single-row state."""
        return self.state.map(lambda t: t[slot:slot + 1].clone())

    def _is_all(self, slots: Sequence[int]) -> bool:
        return len(slots) == self.size and all(s == i for i, s in enumerate(slots))
