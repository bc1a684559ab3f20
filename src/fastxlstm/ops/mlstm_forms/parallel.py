"""The mLSTM in its parallel (quadratic) form, with an initial state and resets.

For a target t and a source s <= t in the same document (no reset in (s, t]):

    log D_ts = sum_{j=s+1..t} log f_j + i_s
    init_t   = sum_{j=st..t} log f_j + m_init      (st: start of t's document; m_init = m_0, or 0 after a reset)
    m_t      = max(max_s log D_ts, init_t)          (the recurrent stabiliser, exactly)
    num_t    = exp(init_t - m_t) q_t^T C_0 + sum_s (q_t . k_s) exp(log D_ts - m_t) v_s
    den_t    = the same with n_0 and without v
    h_t      = num_t / (max(|den_t|, exp(-m_t)) + eps)

The segment sums are taken by a masked cumulative sum down each column (starting from 0 at s), not as
differences of one long cumsum: the latter loses all precision in float32 once sum log f reaches -1e4.
C_0 only reaches targets before the first reset. m is a constant for autograd, as in the reference.

Masked-out terms are selected away with ``torch.where``, never multiplied by zero: a NaN or inf in one token's
q, k, v or gates then reaches exactly the outputs the recurrence would reach (that token and later ones of its
document), never earlier tokens nor a later document (packed documents stay isolated). A non-finite v is the one
input a matmul cannot keep apart (0 * NaN = NaN inside W @ v), so it is zeroed before the matmuls and the
outputs it reaches are set to NaN afterwards. See docs/MATH.md.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .._checks import compute_dtype, exp_floor


def _cummax_index(resets: torch.Tensor) -> torch.Tensor:
    """For each t, the index of the last reset <= t (0 when there is none)."""
    S = resets.shape[-1]
    idx = torch.arange(S, device=resets.device).expand_as(resets)
    return torch.where(resets, idx, torch.zeros_like(idx)).cummax(dim=-1).values


def parallel_core(q, k, v, log_f, i, C0, n0, m0, resets: Optional[torch.Tensor], eps: float,
                  want_h: bool = True):
    """The parallel form over leading batch dims ``*``.

    q, k: (*, S, DQK) (q already scaled); v: (*, S, DV); log_f, i: (*, S); C0 (*, DQK, DV); n0 (*, DQK);
    m0 (*); resets: None or bool broadcastable to (*, S). All floating tensors in one compute dtype.
    Returns h (*, S, DV) (None if not want_h) and the final state (C, n, m).
    """
    S = log_f.shape[-1]
    dev = log_f.device
    # F[t', s'] = sum_{j'=s'+1..t'} lf[j'] over positions shifted by one (position 0 = before the sequence).
    lf = F.pad(log_f, (1, 0))
    tri = torch.ones(S + 1, S + 1, dtype=torch.bool, device=dev).tril(-1)
    Fm = torch.where(tri, lf.unsqueeze(-1).expand(*lf.shape, S + 1), lf.new_zeros(()))
    Fm = Fm.cumsum(dim=-2)
    causal = torch.ones(S, S, dtype=torch.bool, device=dev).tril()
    if resets is None:
        valid = causal
        init_sum = Fm[..., 1:, 0]
        init_w_mask = None
        m_init = m0.unsqueeze(-1)
    else:
        resets = resets.expand(log_f.shape)
        seg = resets.long().cumsum(-1)
        valid = causal & (seg.unsqueeze(-1) == seg.unsqueeze(-2))
        start = _cummax_index(resets)
        init_sum = Fm[..., 1:, :].gather(-1, start.unsqueeze(-1)).squeeze(-1)
        init_w_mask = seg == 0  # the initial state only reaches the first document
        m_init = torch.where(init_w_mask, m0.unsqueeze(-1), torch.zeros_like(init_sum))
    init_term = init_sum + m_init
    logD = torch.where(valid, Fm[..., 1:, 1:] + i.unsqueeze(-2), torch.full_like(Fm[..., 1:, 1:], -float("inf")))
    m = torch.maximum(logD.amax(dim=-1), init_term).detach()
    Dexp = torch.exp(logD - m.unsqueeze(-1))
    init_w = torch.exp(init_term - m)
    if init_w_mask is not None:
        init_w = torch.where(init_w_mask, init_w, torch.zeros_like(init_w))

    # a non-finite v (rare) is kept out of the matmuls, and the targets it reaches are poisoned afterwards
    v_bad = ~torch.isfinite(v).all(-1)  # (*, S)
    v0 = torch.where(v_bad.unsqueeze(-1), torch.zeros_like(v), v)
    poison = (valid & v_bad.unsqueeze(-2)).any(-1)  # (*, S): some source of t's document has a bad v
    zero = Dexp.new_zeros(())

    h = None
    if want_h:
        W = torch.where(valid, (q @ k.transpose(-1, -2)) * Dexp, zero)
        qC = q @ C0
        qn = (q @ n0.unsqueeze(-1)).squeeze(-1)
        if init_w_mask is not None:  # after a reset the initial state is selected away (it may hold a NaN)
            qC = torch.where(init_w_mask.unsqueeze(-1), qC, zero)
            qn = torch.where(init_w_mask, qn, zero)
        num = W @ v0 + init_w.unsqueeze(-1) * qC
        den = W.sum(-1) + init_w * qn
        h = num / (torch.maximum(den.abs(), exp_floor(m)) + eps).unsqueeze(-1)
        h = torch.where(poison.unsqueeze(-1), torch.full_like(h, float("nan")), h)

    w_last = Dexp[..., -1, :]  # weights of every source into the final state
    iw_last = init_w[..., -1]
    kw = torch.where(valid[..., -1, :].unsqueeze(-1), k * w_last.unsqueeze(-1), zero)
    C = kw.transpose(-1, -2) @ v0
    n = kw.sum(-2)
    if init_w_mask is None:
        C = iw_last[..., None, None] * C0 + C
        n = iw_last.unsqueeze(-1) * n0 + n
    else:
        keep0 = init_w_mask[..., -1]
        C = torch.where(keep0[..., None, None], iw_last[..., None, None] * C0, zero) + C
        n = torch.where(keep0.unsqueeze(-1), iw_last.unsqueeze(-1) * n0, zero) + n
    C = torch.where(poison[..., -1, None, None], torch.full_like(C, float("nan")), C)
    return h, (C, n, m[..., -1])


def prepare(q, k, v, i, f, state):
    """Cast to the compute dtype, scale q, take log f, and fill in a fresh state."""
    cd = compute_dtype(q.dtype)
    B, NH, S, DQK = q.shape
    DV = v.shape[-1]
    qs = q.to(cd) * (DQK ** -0.5)
    k, v, i = k.to(cd), v.to(cd), i.to(cd)
    log_f = F.logsigmoid(f.to(cd))
    if state is None:
        C0 = q.new_zeros(B, NH, DQK, DV, dtype=cd)
        n0 = q.new_zeros(B, NH, DQK, dtype=cd)
        m0 = q.new_zeros(B, NH, dtype=cd)
    else:
        C0, n0, m0 = (s.to(cd) for s in state)
        m0 = m0.detach()
    return qs, k, v, i, log_f, C0, n0, m0


def mlstm_parallel(q, k, v, i, f, state=None, eps: float = 1e-6, resets: Optional[torch.Tensor] = None):
    """Parallel form of :func:`fastxlstm.ops.mlstm` (memory O(S^2) per head). Returns h, (C, n, m)."""
    qs, k, v, i, log_f, C0, n0, m0 = prepare(q, k, v, i, f, state)
    r = None if resets is None else resets[:, None, :]
    h, st = parallel_core(qs, k, v, log_f, i, C0, n0, m0, r, eps)
    return h.to(q.dtype), st
