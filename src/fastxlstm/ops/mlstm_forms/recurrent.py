"""The mLSTM as a recurrence over the sequence (PyTorch): one state update per token, constant memory in the
forward. Gates and the query scale are prepared for the whole sequence once, then each step is a few fused ops.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._checks import exp_floor
from .parallel import prepare


def mlstm_recurrent(q, k, v, i, f, state=None, eps: float = 1e-6, resets: Optional[torch.Tensor] = None):
    """Recurrent form of :func:`fastxlstm.ops.mlstm`. Returns h (B, NH, S, DV) and the final (C, n, m)."""
    B, NH, S, DQK = q.shape
    qs, k, v, i, log_f, C, n, m = prepare(q, k, v, i, f, state)
    keep = None if resets is None else (~resets).view(B, 1, S)
    hs = []
    for t in range(S):
        if keep is not None:  # selected away, not multiplied by 0: a NaN before a reset must not cross it
            kt = keep[..., t].expand(m.shape)
            C = torch.where(kt[..., None, None], C, torch.zeros_like(C))
            n = torch.where(kt[..., None], n, torch.zeros_like(n))
            m = torch.where(kt, m, torch.zeros_like(m))
        lf_t = log_f[:, :, t]
        m_new = torch.maximum(lf_t + m, i[:, :, t]).detach()
        f_p = torch.exp(lf_t + m - m_new)
        i_p = torch.exp(i[:, :, t] - m_new)
        k_t = k[:, :, t]
        C = f_p[..., None, None] * C + (i_p[..., None] * k_t).unsqueeze(-1) * v[:, :, t].unsqueeze(-2)
        n = f_p[..., None] * n + i_p[..., None] * k_t
        q_t = qs[:, :, t].unsqueeze(-2)
        num = (q_t @ C).squeeze(-2)
        den = (q_t @ n.unsqueeze(-1)).squeeze(-1).squeeze(-1)
        hs.append(num / (torch.maximum(den.abs(), exp_floor(m_new)) + eps).unsqueeze(-1))
        m = m_new
    h = torch.stack(hs, dim=2)
    return h.to(q.dtype), (C, n, m)
