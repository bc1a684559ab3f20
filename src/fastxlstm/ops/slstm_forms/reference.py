"""The sLSTM cell, step by step (docs/MATH.md section 2), written to read like the equations.

Gates in the order (i, f, z, o). Exponential input gate, sigmoid forget gate, stabilised with m as the mLSTM.
m gets no gradient: h does not depend on it.

An empty state (n == 0, elementwise: a fresh state, or one cleared by a reset; n > 0 in every other reachable
state, and |c| <= n) carries nothing into the next step, so there the stabiliser starts from the input gate,
m_t = pre_i (the official code's rule, per unit): the first step is exact for any input gate value, e.g.
pre_i = -200 gives h = sigmoid(o) tanh(z), where m = 0 would underflow exp(pre_i) to 0. The m of an empty
state is ignored.
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
    # an empty state's m is -inf: f_p = exp(-inf) = 0 exactly (no inf * 0, no NaN in the gradient), m_new = pre_i
    m_prev = torch.where(n.detach() == 0, torch.full_like(m, float("-inf")), m.detach())
    m_new = torch.maximum(log_f + m_prev, pre_i).detach()
    i_p = torch.exp(pre_i - m_new)
    f_p = torch.exp(log_f + m_prev - m_new)
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
