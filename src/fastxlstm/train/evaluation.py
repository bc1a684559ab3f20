"""Evaluation of a model on a token stream with the recurrent state carried through each document."""
from __future__ import annotations

import math
from typing import Dict, Optional

import numpy as np
import torch

from ..data.corpus import TokenStream

__all__ = ["evaluate_stream"]


@torch.no_grad()
def evaluate_stream(model, stream: TokenStream, token_bytes: np.ndarray, seq_len: int = 512,
                    batch_size: int = 8, max_tokens: Optional[int] = None) -> Dict[str, float]:
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
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.reshape(-1),
                                                    reduction="none").reshape(t.shape)
            nll_sum += float((nll.double() * m).sum())
            tok_sum += int(m.sum())
            byte_sum += float((tb[tgt[:, lo:hi]] * mask[:, lo:hi]).sum())
    finally:
        model.train(was_training)
    loss = nll_sum / max(tok_sum, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "bpb": nll_sum / math.log(2) / max(byte_sum, 1.0),
            "tokens": tok_sum, "bytes": int(byte_sum)}
