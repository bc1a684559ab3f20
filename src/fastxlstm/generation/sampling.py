"""Choosing the next token from logits: greedy, temperature, top-k, top-p (nucleus), seeded."""
from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["sample_next_token"]


def _check_int(name, v, lo=None):
    if not isinstance(v, int) or isinstance(v, bool) or (lo is not None and v < lo):
        raise ValueError(f"{name} must be an int" + (f" >= {lo}" if lo is not None else "") + f", got {v!r}")
    return v


def _check_sampling(temperature, top_k, top_p, do_sample, vocab_size):
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not math.isfinite(temperature) \
            or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if do_sample is not None and not isinstance(do_sample, bool):
        raise ValueError(f"do_sample must be None or a bool, got {do_sample!r}")
    if do_sample and temperature == 0:
        raise ValueError("do_sample=True needs temperature > 0 (temperature=0 means greedy)")
    if top_k is not None:
        _check_int("top_k", top_k, 1)
    if top_p is not None and (not isinstance(top_p, (int, float)) or isinstance(top_p, bool)
                              or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
    sample = (temperature > 0) if do_sample is None else do_sample
    return sample


# ----------------------------------------------------------------------------------------------------------

def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                      top_p: Optional[float] = None, do_sample: Optional[bool] = None,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Pick the next token from logits (B, V): greedy (argmax, first index on ties) when not sampling, else
    sample from softmax(logits / temperature) (any temperature > 0: a tiny one is greedy in the limit, ties
    sampled uniformly) restricted to the top_k tokens and to the smallest set whose
    probability reaches top_p (the most likely token is always kept). Returns (B,) int64."""
    sample = _check_sampling(temperature, top_k, top_p, do_sample, logits.shape[-1])
    logits = logits.float()
    if not sample:
        return logits.argmax(dim=-1)
    # shifted by the row max before the division (softmax, top-k and top-p do not change): a tiny temperature
    # (1e-40) then gives 0 for the best tokens and -inf for the rest, i.e. greedy with ties sampled, instead of
    # inf / inf = NaN inside multinomial
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    V = logits.shape[-1]
    if top_k is not None and top_k < V:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p
        above = probs.cumsum(dim=-1) - probs
        drop_sorted = above >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


