"""The mLSTM in chunkwise form (PyTorch): linear in S, parallel inside chunks of length L.

1. Every chunk's own contribution to the state at its end (sources in the chunk only; stabilised by their
   max) comes from the parallel form, for all chunks at once.
2. A short scan over chunks combines them into the state entering each chunk, under one joint stabiliser:
       m_next = max(b_L + m_prev, m_loc),  C_next = exp(b_L + m_prev - m_next) C_prev + exp(m_loc - m_next) C_loc
   (a chunk holding a reset does not carry C_prev: its m_loc already includes the fresh start's term).
3. The parallel form with each chunk's incoming state gives all outputs, again for all chunks at once.

S need not be a multiple of L: the tail is padded with tokens that leave the state unchanged (log f = 0,
i = -1e30, whose exp is exactly 0), so the final state is the one after the last real token.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .parallel import parallel_core, prepare

_NEG = -1e30  # a finite "minus infinity": exp() of it is 0 and it never meets another infinity


def mlstm_chunkwise(q, k, v, i, f, state=None, eps: float = 1e-6, resets: Optional[torch.Tensor] = None,
                    chunk_size: int = 64):
    """Chunkwise form of :func:`fastxlstm.ops.mlstm`. Returns h (B, NH, S, DV) and the final (C, n, m)."""
    B, NH, S, DQK = q.shape
    DV = v.shape[-1]
    qs, k, v, i, log_f, C0, n0, m0 = prepare(q, k, v, i, f, state)
    L = max(1, min(chunk_size, S))
    NC = -(-S // L)
    pad = NC * L - S
    if pad:
        qs = F.pad(qs, (0, 0, 0, pad))
        k = F.pad(k, (0, 0, 0, pad))
        v = F.pad(v, (0, 0, 0, pad))
        log_f = F.pad(log_f, (0, pad), value=0.0)
        i = F.pad(i, (0, pad), value=_NEG)
        if resets is not None:
            resets = F.pad(resets, (0, pad), value=False)
    qc = qs.view(B, NH, NC, L, DQK)
    kc = k.view(B, NH, NC, L, DQK)
    vc = v.view(B, NH, NC, L, DV)
    lfc = log_f.view(B, NH, NC, L)
    ic = i.view(B, NH, NC, L)
    rc = None if resets is None else resets.view(B, 1, NC, L)

    # 1. each chunk's own contribution to its end state (no incoming state: C=0, m=-inf)
    zC = C0.new_zeros(B, NH, NC, DQK, DV)
    zn = n0.new_zeros(B, NH, NC, DQK)
    zm = m0.new_full((B, NH, NC), _NEG)
    _, (C_loc, n_loc, m_loc) = parallel_core(qc, kc, vc, lfc, ic, zC, zn, zm, rc, eps, want_h=False)

    # 2. scan over chunks
    a = lfc.sum(-1)  # total log f of each chunk
    carry = None if rc is None else ~rc.any(-1).expand(B, NH, NC)
    C, n, m = C0, n0, m0
    Cs, ns, ms = [], [], []
    for c in range(NC):
        Cs.append(C)
        ns.append(n)
        ms.append(m)
        m_carry = a[..., c] + m
        if carry is None:
            m_new = torch.maximum(m_carry, m_loc[..., c]).detach()
            w_prev = torch.exp(m_carry - m_new)
        else:
            cc = carry[..., c]
            m_new = torch.where(cc, torch.maximum(m_carry, m_loc[..., c]), m_loc[..., c]).detach()
            w_prev = torch.where(cc, torch.exp(m_carry - m_new), torch.zeros_like(m_new))
        w_loc = torch.exp(m_loc[..., c] - m_new)
        C_prev, n_prev = w_prev[..., None, None] * C, w_prev[..., None] * n
        if carry is not None:  # a chunk with a reset drops the old state by selection (it may hold a NaN)
            C_prev = torch.where(cc[..., None, None], C_prev, torch.zeros_like(C_prev))
            n_prev = torch.where(cc[..., None], n_prev, torch.zeros_like(n_prev))
        C = C_prev + w_loc[..., None, None] * C_loc[:, :, c]
        n = n_prev + w_loc[..., None] * n_loc[:, :, c]
        m = m_new

    # 3. all outputs from the chunks' incoming states
    Cin = torch.stack(Cs, dim=2)
    nin = torch.stack(ns, dim=2)
    min_ = torch.stack(ms, dim=2)
    h, _ = parallel_core(qc, kc, vc, lfc, ic, Cin, nin, min_, rc, eps)
    h = h.reshape(B, NH, NC * L, DV)[:, :, :S]
    return h.to(q.dtype), (C, n, m)
