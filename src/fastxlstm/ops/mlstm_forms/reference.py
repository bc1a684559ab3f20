"""The mLSTM cell, step by step, exactly as docs/MATH.md section 1 defines it.

This is the definition every other backend is tested against. It runs in any floating dtype (float64 for
tests); half-precision inputs are computed in float32. The stabiliser m is a constant for autograd (it gets no
gradient): without eps, h does not depend on m at all, so holding it fixed gives the true gradient, and every
backend does the same so that all forms compute one function.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .._checks import compute_dtype, exp_floor

MLSTMState = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def zero_state(B: int, NH: int, DQK: int, DV: int, dtype: torch.dtype, device) -> MLSTMState:
    return (
        torch.zeros(B, NH, DQK, DV, dtype=dtype, device=device),
        torch.zeros(B, NH, DQK, dtype=dtype, device=device),
        torch.zeros(B, NH, dtype=dtype, device=device),
    )


def mlstm_step_reference(q, k, v, i, f, state: MLSTMState, eps: float = 1e-6):
    """One token. q, k: (B, NH, DQK); v: (B, NH, DV); i, f: (B, NH); state (C, n, m).

    Returns h (B, NH, DV) in the compute dtype and the new state.
    """
    C, n, m = state
    cd = compute_dtype(q.dtype)
    q, k, v, i, f = (x.to(cd) for x in (q, k, v, i, f))
    m = m.detach()
    log_f = F.logsigmoid(f)
    m_new = torch.maximum(log_f + m, i).detach()
    f_p = torch.exp(log_f + m - m_new)
    i_p = torch.exp(i - m_new)
    C_new = f_p[..., None, None] * C + i_p[..., None, None] * (k[..., :, None] * v[..., None, :])
    n_new = f_p[..., None] * n + i_p[..., None] * k
    q_s = q * (q.shape[-1] ** -0.5)
    num = torch.einsum("bhd,bhde->bhe", q_s, C_new)
    den = (q_s * n_new).sum(-1)
    h = num / (torch.maximum(den.abs(), exp_floor(m_new)) + eps)[..., None]
    return h, (C_new, n_new, m_new)


def mlstm_reference(q, k, v, i, f, state: Optional[MLSTMState] = None, eps: float = 1e-6,
                    resets: Optional[torch.Tensor] = None):
    """Whole sequence, one step at a time. q, k: (B, NH, S, DQK); v: (B, NH, S, DV); i, f: (B, NH, S).

    resets: (B, S) bool; where True the state is cleared (to a fresh state) before token t is read.
    Returns h (B, NH, S, DV) in the input dtype and the final state (C, n, m) in the compute dtype.
    """
    B, NH, S, DQK = q.shape
    DV = v.shape[-1]
    cd = compute_dtype(q.dtype)
    if state is None:
        state = zero_state(B, NH, DQK, DV, cd, q.device)
    C, n, m = (s.to(cd) for s in state)
    hs = []
    for t in range(S):
        if resets is not None:
            keep = ~resets[:, t].view(B, 1)
            C = torch.where(keep[..., None, None], C, torch.zeros_like(C))
            n = torch.where(keep[..., None], n, torch.zeros_like(n))
            m = torch.where(keep, m, torch.zeros_like(m))
        h, (C, n, m) = mlstm_step_reference(q[:, :, t], k[:, :, t], v[:, :, t], i[:, :, t], f[:, :, t],
                                            (C, n, m), eps)
        hs.append(h)
    h = torch.stack(hs, dim=2) if hs else q.new_zeros(B, NH, 0, DV, dtype=cd)
    return h.to(q.dtype), (C, n, m)
