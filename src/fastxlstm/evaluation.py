"""Evaluation: next-token loss and bits per byte of a model on token data. One module for both uses:

- :func:`evaluate_windows` scores fixed windows, each from a fresh state (the held-out curve during training;
  split across torchrun ranks);
- :func:`evaluate_stream` reads whole documents with the recurrent state carried from call to call
  (``fastxlstm eval``).

Both score with :func:`lm_loss` and turn nats into bits per byte with the tokenizer's bytes per token. This
module imports no training code, so inference commands can use it.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .data.corpus import TokenStream
from .data.loader import make_batch

__all__ = ["lm_loss", "evaluate_windows", "evaluate_stream", "LN2"]

LN2 = math.log(2.0)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross entropy (nats) over the positions where ``mask`` is True.

    logits (B, S, V) float32, targets (B, S) int64, mask (B, S) bool. Returns a 0-dim tensor."""
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none")
    return (nll * mask.reshape(-1).to(nll.dtype)).sum()


def _summary(nll: float, ntok: float, nbytes: float) -> Dict[str, Any]:
    loss = nll / max(ntok, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "bpb": nll / LN2 / max(nbytes, 1.0),
            "tokens": int(ntok), "bytes": int(nbytes)}


@torch.no_grad()
def evaluate_windows(model: torch.nn.Module, stream: TokenStream, starts: np.ndarray, seq_len: int,
                     token_bytes: torch.Tensor, batch_size: int, device: torch.device, rank: int = 0,
                     world_size: int = 1, autocast: Callable[[], Any] = contextlib.nullcontext,
                     loss_fn: Callable = lm_loss) -> Dict[str, Any]:
    """Loss (nats/token) and bits per byte over the windows ``stream.tokens[s : s + seq_len + 1]`` for s in
    ``starts``, each from a fresh state.

    Under torchrun the windows are split across ranks and the sums all-reduced; every rank runs the same number
    of forward calls (FSDP needs that), the last ones padded with zero-weight repeats. ``token_bytes`` (V,)
    float64: UTF-8 bytes per token id."""
    was_training = model.training
    model.eval()
    per_rank = -(-len(starts) // world_size)
    n_batches = -(-per_rank // batch_size)
    mine = starts[rank::world_size]
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # nll, tokens, bytes
    tb = token_bytes.to(device)
    for b in range(n_batches):
        chunk = mine[b * batch_size:(b + 1) * batch_size]
        weight = 1.0
        if len(chunk) == 0:
            chunk, weight = starts[:1], 0.0
        batch = make_batch(stream, chunk, seq_len).to(device)
        with autocast():
            out = model(batch.input_ids, resets=batch.resets, return_state=False)
        nll = loss_fn(out.logits, batch.targets, batch.mask)
        m = batch.mask
        sums += weight * torch.stack([nll.double(), m.sum().double(), (tb[batch.targets] * m).sum().double()])
    if world_size > 1:
        import torch.distributed as dist
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    model.train(was_training)
    return _summary(*(float(x) for x in sums))


@torch.no_grad()
def evaluate_stream(model, stream: TokenStream, token_bytes: np.ndarray, seq_len: int = 512,
                    batch_size: int = 8, max_tokens: Optional[int] = None) -> Dict[str, Any]:
    """Loss (nats/token), perplexity and bits per byte of ``model`` on ``stream``.

    The stream (at most ``max_tokens`` predicted tokens) is cut into ``batch_size`` contiguous rows read in
    parallel, ``seq_len`` tokens per call, the state carried from call to call and reset at each document's
    first token. Targets that are a document's first token are not scored (nothing predicts them), and each
    row's first input starts from a fresh state.
    """
    n = len(stream) - 1
    if max_tokens is not None:
        n = min(n, max_tokens)
    if n < 1:
        raise ValueError(f"the evaluation data has {len(stream)} tokens; at least 2 are needed")
    rows = max(1, min(batch_size, n))
    row_len = -(-n // rows)
    total = rows * row_len
    tokens = np.zeros(total + 1, dtype=np.int64)
    tokens[:n + 1] = np.asarray(stream.tokens[:n + 1], dtype=np.int64)
    starts = np.zeros(total + 1, dtype=bool)
    starts[:n + 1] = np.asarray(stream.doc_start[:n + 1])
    valid = np.zeros(total, dtype=bool)
    valid[:n] = True
    inp = torch.from_numpy(tokens[:-1].reshape(rows, row_len))
    tgt = torch.from_numpy(tokens[1:].reshape(rows, row_len))
    res = torch.from_numpy(starts[:-1].reshape(rows, row_len))
    mask = torch.from_numpy((valid & ~starts[1:]).reshape(rows, row_len))
    tb = torch.from_numpy(np.asarray(token_bytes, dtype=np.float64))
    device = model.device
    was_training = model.training
    model.eval()
    state = None
    nll_sum, tok_sum, byte_sum = 0.0, 0, 0.0
    try:
        for lo in range(0, row_len, seq_len):
            hi = min(lo + seq_len, row_len)
            out = model(inp[:, lo:hi].to(device), state=state, resets=res[:, lo:hi].to(device), return_state=True)
            state = out.state
            logits = out.logits.float()
            m = mask[:, lo:hi].to(device)
            t = tgt[:, lo:hi].to(device)
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.reshape(-1),
                                  reduction="none").reshape(t.shape)
            nll_sum += float((nll.double() * m).sum())  # summed in float64: long streams
            tok_sum += int(m.sum())
            byte_sum += float((tb[tgt[:, lo:hi]] * mask[:, lo:hi]).sum())
    finally:
        model.train(was_training)
    return _summary(nll_sum, tok_sum, byte_sum)
