"""Chunked cross entropy over the LM head: the loss of ``hidden @ weight.T`` without the (N, V) float32 logits.

    loss = chunked_cross_entropy(hidden, model.lm_head.weight, targets, chunk=2048, soft_cap=None)

The LM head of a 16k-token step at vocabulary 50,304 produces 824M logits: 1.6 GB in bf16, 3.3 GB more as the
float32 copy a plain ``F.cross_entropy(logits.float(), ...)`` makes, and autograd keeps them (and the softmax) for
the backward. Here the rows are processed ``chunk`` at a time: the forward keeps only each row's log-sum-exp
(float32, N values); the backward recomputes each chunk's logits, forms ``softmax - onehot`` in float32 and
multiplies it back into the gradients of ``hidden`` and ``weight``. Peak extra memory is one chunk's logits.

The matmul runs in the dtype a plain ``F.linear`` would use (the autocast dtype when autocast is on, otherwise the
inputs' common dtype); the logits are float32 from there on (optional soft cap ``cap * tanh(z / cap)``, the
log-sum-exp, the softmax), as the models' eager forward computes them, so both give the same loss.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from ..ops._checks import values_readable

__all__ = ["chunked_cross_entropy", "IGNORE_INDEX"]

IGNORE_INDEX = -100
_REDUCTIONS = ("mean", "sum", "none")
_FORCE_FUSED: Optional[bool] = None  # tests: True compiles the chunk functions on any device


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    dev = hidden.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _capped(zl, cap):
    z = zl.to(torch.promote_types(zl.dtype, torch.float32))
    return z if cap is None else cap * torch.tanh(z / cap)


def _chunk_stats(zl, t, cap):
    """(log-sum-exp, picked logit) per row of the raw logits zl (rows, V), in float32 (float64)."""
    z = _capped(zl, cap)
    return torch.logsumexp(z, dim=-1), z.gather(1, t[:, None])[:, 0]


def _chunk_grad(zl, t, lse, g, cap):
    """d loss / d zl of the rows: g * (softmax(z) - onehot(t)) * dz/dzl, in zl's dtype."""
    z = _capped(zl, cap)
    cols = torch.arange(z.shape[1], device=z.device)
    dz = torch.exp(z - lse[:, None]) - (cols[None, :] == t[:, None]).to(z.dtype)
    dz = dz * g[:, None]
    if cap is not None:  # z here is the capped value: d(cap tanh(x / cap))/dx = 1 - (z / cap)^2
        dz = dz * (1.0 - (z / cap) ** 2)
    return dz.to(zl.dtype)


# the element-wise work on each chunk's (rows, V) logits, fused by torch.compile into one pass each on CUDA (eager:
# ~10 passes over a 2048 x 50k float32 tensor per chunk, ~15% of a 400M model's training step)
_FUSED = {}


def _fused(fn, device_type: str, force: Optional[bool] = None):
    """fn compiled (once, cached) on CUDA unless FASTXLSTM_COMPILE_LOSS=0 or already inside a compiled region; fn as
    it is elsewhere. ``force`` (tests) overrides the choice."""
    use = force if force is not None else (device_type == "cuda" and not torch.compiler.is_compiling()
                                           and os.environ.get("FASTXLSTM_COMPILE_LOSS", "1") != "0")
    if not use:
        return fn
    if fn not in _FUSED:
        _FUSED[fn] = torch.compile(fn, dynamic=False)
    return _FUSED[fn]


class _ChunkedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, cap, cdtype):
        N = hidden.shape[0]
        acc = torch.promote_types(cdtype, torch.float32)  # float32 (float64 for a float64 model)
        lse = torch.empty(N, device=hidden.device, dtype=acc)
        picked = torch.empty(N, device=hidden.device, dtype=acc)
        w = weight.to(cdtype)
        valid = targets != IGNORE_INDEX
        safe_t = torch.where(valid, targets, torch.zeros_like(targets))
        stats = _fused(_chunk_stats, hidden.device.type, _FORCE_FUSED)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, N, chunk):
                zl = F.linear(hidden[s:s + chunk].to(cdtype), w)
                lse[s:s + chunk], picked[s:s + chunk] = stats(zl, safe_t[s:s + chunk], cap)
        nll = torch.where(valid, lse - picked, torch.zeros_like(lse))
        ctx.save_for_backward(hidden, weight, safe_t, valid, lse)
        ctx.chunk, ctx.cap, ctx.cdtype = chunk, cap, cdtype
        return nll

    @staticmethod
    def backward(ctx, g_nll):
        hidden, weight, safe_t, valid, lse = ctx.saved_tensors
        chunk, cap, cdtype = ctx.chunk, ctx.cap, ctx.cdtype
        N = hidden.shape[0]
        w = weight.to(cdtype)
        g = torch.where(valid, g_nll.to(lse.dtype), torch.zeros_like(lse))
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gh = torch.empty_like(hidden) if need_h else None
        gw = torch.zeros(weight.shape, device=weight.device, dtype=lse.dtype) if need_w else None
        grad = _fused(_chunk_grad, hidden.device.type, _FORCE_FUSED)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, N, chunk):
                hc = hidden[s:s + chunk].to(cdtype)
                # d nll / d z = softmax(z) - onehot(t), times the incoming gradient of each row, in cdtype
                dz = grad(F.linear(hc, w), safe_t[s:s + chunk], lse[s:s + chunk], g[s:s + chunk], cap)
                if need_h:
                    gh[s:s + chunk] = (dz @ w).to(hidden.dtype)
                if need_w:
                    gw += (dz.t() @ hc).to(gw.dtype)
        return gh, (gw.to(weight.dtype) if need_w else None), None, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 2048,
                          soft_cap: Optional[float] = None, reduction: str = "mean",
                          ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Cross entropy of the logits ``soft_cap(hidden @ weight.T)`` against ``targets``, ``chunk`` rows at a time.

    Args:
        hidden: (..., E) final hidden states (after the output norm), any float dtype.
        weight: (V, E) the LM head's weight.
        targets: (...) int target ids in [0, V), or ``ignore_index`` for positions that do not count.
        chunk: rows per chunk (peak extra memory ~ chunk * V * 10 bytes in bf16).
        soft_cap: None, or the 7B's output soft cap: logits = cap * tanh(z / cap) (applied in float32).
        reduction: "mean" (over the counted positions; 0 when none counts), "sum", or "none" (shape of targets,
            0 at ignored positions).
        ignore_index: the target value that marks positions without a loss (-100, as ``F.cross_entropy``).

    Returns:
        The loss in float32 (float64 when hidden and weight are float64). Equal (to float32 rounding of the sums) to
        ``F.cross_entropy(soft_cap(F.linear(hidden, weight).float()), targets)`` under the same autocast state.
    """
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point() or hidden.ndim < 1:
        raise ValueError(f"hidden must be a float tensor (..., E), got {getattr(hidden, 'dtype', type(hidden))}")
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must have shape (V, E={hidden.shape[-1]}), got {tuple(getattr(weight, 'shape', ()))}")
    if not isinstance(targets, torch.Tensor) or targets.dtype.is_floating_point or targets.dtype == torch.bool \
            or targets.is_complex():
        raise ValueError(f"targets must be an integer tensor, got {getattr(targets, 'dtype', type(targets))}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets has shape {tuple(targets.shape)}, expected hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    if hidden.device != weight.device or targets.device != hidden.device:
        raise ValueError(f"hidden ({hidden.device}), weight ({weight.device}) and targets ({targets.device}) "
                         f"must be on one device")
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    if soft_cap is not None and (not isinstance(soft_cap, (int, float)) or isinstance(soft_cap, bool)
                                 or not soft_cap > 0 or soft_cap == float("inf")):
        raise ValueError(f"soft_cap must be None or a positive finite number, got {soft_cap!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    V = weight.shape[0]
    t = targets.reshape(-1).long()
    if ignore_index != IGNORE_INDEX:
        t = torch.where(t == ignore_index, torch.full_like(t, IGNORE_INDEX), t)
    if t.numel() and values_readable(t):
        counted = t[t != IGNORE_INDEX]
        if counted.numel():
            lo, hi = torch.stack(torch.aminmax(counted)).tolist()
            if lo < 0 or hi >= V:
                raise ValueError(f"targets must lie in [0, {V}) or equal ignore_index={ignore_index}, "
                                 f"got min {lo} max {hi}")
    h = hidden.reshape(-1, hidden.shape[-1])
    nll = _ChunkedCE.apply(h, weight, t, chunk, None if soft_cap is None else float(soft_cap),
                           _compute_dtype(hidden, weight))
    if reduction == "none":
        return nll.view(targets.shape)
    total = nll.sum()
    if reduction == "sum":
        return total
    return total / (t != IGNORE_INDEX).sum().clamp_min(1)
