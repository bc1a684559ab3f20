"""The sLSTM cell, step by step (docs/MATH.md section 2), written to read like the equations.

Gates in the order (i, f, z, o). Exponential input gate, sigmoid forget gate, stabilised with m as the mLSTM
(m starts at 0 for a fresh state; the official code's m_1 = pre_i gives the same h). m gets no gradient: h does
not depend on it.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .._checks import compute_dtype

SLSTMState = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def zero_state(B: int, NH: int, DH: int, dtype, device) -> SLSTMState:
    return tuple(torch.zeros(B, NH, DH, dtype=dtype, device=device) for _ in range(4))  # type: ignore


def slstm_pointwise(pre_i, pre_f, pre_z, pre_o, c, n, m):
    """The gate nonlinearities and the state update, given the four pre-activations (all (B, NH, DH))."""
    log_f = F.logsigmoid(pre_f)
    m_new = torch.maximum(log_f + m.detach(), pre_i).detach()
    i_p = torch.exp(pre_i - m_new)
    f_p = torch.exp(log_f + m.detach() - m_new)
    c_new = f_p * c + i_p * torch.tanh(pre_z)
    n_new = f_p * n + i_p
    # n > 0 always in exact arithmetic; the guard only catches an underflow of exp() to 0 (then c is 0 too).
    safe_n = torch.where(n_new > 0, n_new, torch.ones_like(n_new))
    h_new = torch.sigmoid(pre_o) * c_new / safe_n
    return c_new, n_new, m_new, h_new


def slstm_reference(x, R, b, state: Optional[SLSTMState] = None, resets: Optional[torch.Tensor] = None):
    """x: (B, S, 4, NH, DH); R: (4, NH, DH, DH); b: (4, NH, DH); state (c, n, m, h) each (B, NH, DH).

    Returns h (B, S, NH, DH) in the input dtype and the final state in the compute dtype.
    """
    B, S, _, NH, DH = x.shape
    in_dtype = x.dtype
    cd = compute_dtype(x.dtype)
    x, R, b = x.to(cd), R.to(cd), b.to(cd)
    if state is None:
        state = zero_state(B, NH, DH, cd, x.device)
    c, n, m, h = (s.to(cd) for s in state)
    out = []
    for t in range(S):
        if resets is not None:
            keep = ~resets[:, t].view(B, 1, 1)
            c, n, m, h = (torch.where(keep, s, torch.zeros_like(s)) for s in (c, n, m, h))
        gates = []
        for g in range(4):
            rec = torch.einsum("bhd,hde->bhe", h, R[g])
            gates.append(x[:, t, g] + rec + b[g])
        c, n, m, h = slstm_pointwise(gates[0], gates[1], gates[2], gates[3], c, n, m)
        out.append(h)
    hs = torch.stack(out, dim=1) if out else x.new_zeros(B, 0, NH, DH)
    return hs.to(in_dtype), (c, n, m, h)
