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

__all__ = ["DecodeBackend", "EagerBackend", "GraphBackend", "graph_backend_available"]


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
        # logits of the last position only: a prefill chunk needs no more
        out = self.model(ids, state=state, logits_to_keep=1)
        return out.logits[:, -1], out.state

    @torch.no_grad()
    def step(self, tokens, state):
        # the tokens were chosen from the model's own logits: valid by construction, so no per-step input checks
        out = self.model._forward(tokens, state, None, True)
        return out.logits[:, 0], out.state


def graph_backend_available(model) -> bool:
    """True when the CUDA-graph decoder (``fastxlstm.generation.graph``, logits mode) exists and can run
    ``model`` (CUDA parameters, not float64)."""
    from ..generation import graph
    return bool(graph.graph_decoding_available(model))


class GraphBackend(DecodeBackend):
    """Whole-pool decode steps replayed as one CUDA graph (the generation package's graph decoder in logits mode:
    the scheduler samples each row itself); prefill and steps on a subset of rows run eagerly.

    The decoder's static state becomes the scheduler's pool: the first whole-pool step copies the pool into it
    once, returns it, and from then on the scheduler passes it back (no copy) and writes new requests' rows into
    it in place; the graph updates it in place at each replay.
    """

    def __init__(self, model: torch.nn.Module, max_batch: int):
        self.eager = EagerBackend(model)
        self.model = self.eager.model
        self.device = self.eager.device
        self.vocab_size = self.eager.vocab_size
        self.max_batch = max_batch
        self._dec = None

    def prefill(self, ids, state=None):
        return self.eager.prefill(ids, state)

    @torch.no_grad()
    def step(self, tokens, state):
        if tokens.shape[0] != self.max_batch:
            return self.eager.step(tokens, state)
        if self._dec is None:
            from ..generation.graph import get_decoder
            self._dec = get_decoder(self.model, self.max_batch, sample=None, top_k=None, use_top_p=False,
                                    eos=None, fill=None)
        dec = self._dec
        if state is not dec.state:
            dec.load(state, tokens.reshape(-1))
        return dec.step_logits(tokens.reshape(-1)), dec.state
