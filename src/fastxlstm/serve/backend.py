"""The model calls of the server, behind one small interface so that a faster decode engine (e.g. CUDA graphs)
can replace the eager one without touching the scheduler.

A backend has:

- ``prefill(ids, state=None) -> (logits, state)``: ids (B, S) int64 on the model's device, state a B-row
  XLSTMState to continue from (None: fresh); returns float32 logits (B, V) of the last position and the state
  after the last token, as fresh tensors (the scheduler may keep them in its prefix cache).
- ``step(tokens, state) -> (logits, state)``: tokens (B, 1), one decode step on a B-row state; returns (B, V)
  logits and the new state. Mostly B = max_batch and ``state`` is the state the previous ``step`` returned (the
  scheduler's pool), otherwise a gathered subset of its rows. The scheduler keeps the returned state as its pool,
  writes rows of new requests into it in place, and passes it back to the next ``step``: a backend with static
  buffers (CUDA graphs) may return them, as long as it does not overwrite a returned state before it is passed
  back (e.g. two state buffers used in turn). Logits are read before the next call.
- ``device``, ``vocab_size``.

Both are called from the scheduler's single model thread only.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..layers.state import XLSTMState

__all__ = ["DecodeBackend", "EagerBackend"]


class DecodeBackend:
    """Interface (see the module docstring)."""

    device: torch.device
    vocab_size: int

    def prefill(self, ids: torch.Tensor, state: Optional[XLSTMState] = None) -> Tuple[torch.Tensor, XLSTMState]:
        raise NotImplementedError

    def step(self, tokens: torch.Tensor, state: XLSTMState) -> Tuple[torch.Tensor, XLSTMState]:
        raise NotImplementedError


class EagerBackend(DecodeBackend):
    """Plain ``model(ids, state=...)`` calls in eval mode without autograd (any device, any fastxlstm model)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()
        self.device = model.device
        self.vocab_size = int(model.vocab_size)

    @torch.no_grad()
    def prefill(self, ids, state=None):
        out = self.model(ids, state=state)
        return out.logits[:, -1], out.state

    @torch.no_grad()
    def step(self, tokens, state):
        out = self.model(tokens, state=state)
        return out.logits[:, 0], out.state
