"""Choosing the next token from logits: greedy, temperature, top-k, top-p (nucleus), seeded."""
from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["sample_next_token", "pick_with_uniform", "apply_repetition_penalty"]


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

def check_repetition_penalty(repetition_penalty) -> float:
    if not isinstance(repetition_penalty, (int, float)) or isinstance(repetition_penalty, bool) \
            or not math.isfinite(repetition_penalty) or repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be a finite number > 0 (1 = off), got {repetition_penalty!r}")
    return float(repetition_penalty)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """The CTRL / transformers repetition penalty: the logits (B, V) of the tokens marked in ``seen`` (B, V)
    bool are divided by ``penalty`` where positive and multiplied by it where negative (penalty > 1 makes
    repeats less likely)."""
    if penalty == 1.0:
        return logits
    if seen.shape != logits.shape or seen.dtype != torch.bool:
        raise ValueError(f"seen must be a bool tensor of the logits' shape {tuple(logits.shape)}, got "
                         f"{seen.dtype} {tuple(seen.shape)}")
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                      top_p: Optional[float] = None, do_sample: Optional[bool] = None,
                      generator: Optional[torch.Generator] = None, repetition_penalty: float = 1.0,
                      seen: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pick the next token from logits (B, V): greedy (argmax, first index on ties) when not sampling, else
    sample from softmax(logits / temperature) restricted to the top_k tokens and to the smallest set whose
    probability reaches top_p (the most likely token is always kept). Returns (B,) int64.

    Sampling draws one uniform number per row (``torch.rand(B, generator=generator)``) and inverts the cumulative
    distribution (:func:`pick_with_uniform`), the same deterministic function the CUDA-graph decoder captures, so
    both paths choose the same token for the same logits and seed. A tiny temperature (e.g. 1e-40) tends to
    greedy without overflow (the logits are shifted by their maximum before the division).

    repetition_penalty (default 1: off) with seen (B, V) bool, the tokens already in each row: see
    :func:`apply_repetition_penalty`; applied before greedy selection or temperature."""
    sample = _check_sampling(temperature, top_k, top_p, do_sample, logits.shape[-1])
    penalty = check_repetition_penalty(repetition_penalty)
    if penalty != 1.0:
        if seen is None:
            raise ValueError("repetition_penalty needs seen, the (B, V) bool mask of tokens already in each row")
        logits = apply_repetition_penalty(logits.float(), seen, penalty)
    if not sample:
        return logits.float().argmax(dim=-1)
    u = torch.rand(logits.shape[0], generator=generator, device=logits.device)
    return pick_with_uniform(logits, u, temperature, top_k, top_p)


def pick_with_uniform(logits: torch.Tensor, u: torch.Tensor, temperature, top_k: Optional[int] = None,
                      top_p=None) -> torch.Tensor:
    """Sample by inverse CDF: the token whose cumulative probability first reaches ``u * total``.

    logits (B, V); u (B,) uniform in [0, 1); temperature a float > 0 or a 0-dim tensor; top_k an int or None;
    top_p a float, a 0-dim tensor or None. No host synchronisation and no data-dependent shapes, so this runs
    inside a captured CUDA graph. A token of probability 0 (masked by top-k / top-p) is never chosen: the target
    is at least the smallest positive float, and the chosen index is the first whose cumulative sum reaches it.
    """
    x = logits.float()
    x = (x - x.amax(dim=-1, keepdim=True)) / temperature  # the maximum is 0: exp never overflows
    V = x.shape[-1]
    if top_k is not None and top_k < V:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p is not None and (isinstance(top_p, torch.Tensor) or top_p < 1):
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p
        above = probs.cumsum(dim=-1) - probs
        drop_sorted = above >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    cdf = torch.softmax(x, dim=-1).cumsum(dim=-1)
    target = (u.float()[:, None] * cdf[:, -1:]).clamp_min(torch.finfo(torch.float32).tiny)
    return (cdf < target).sum(dim=-1).clamp_(max=V - 1)
