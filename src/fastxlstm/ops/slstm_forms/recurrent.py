"""The sLSTM recurrence, vectorised: per step one batched matmul for all heads and all four gates.

R (4, NH, DH, DH) is laid out once as (NH, DH, 4*DH), so h_{t-1} (NH, B, DH) @ R gives every gate's
recurrent input in a single bmm; the pointwise update is shared with the reference. No data-dependent Python
control flow, so the step is friendly to torch.compile.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._checks import compute_dtype
from .reference import slstm_pointwise, zero_state


def slstm_recurrent(x, R, b, state=None, resets: Optional[torch.Tensor] = None):
    """Same contract as :func:`fastxlstm.ops.slstm`: x (B, S, 4, NH, DH) -> h (B, S, NH, DH), final state."""
    B, S, _, NH, DH = x.shape
    in_dtype = x.dtype
    cd = compute_dtype(x.dtype)
    xb = (x.to(cd) + b.to(cd)).permute(1, 0, 3, 2, 4)  # (S, B, NH, 4, DH): bias folded in once
    Rcat = R.to(cd).permute(1, 2, 0, 3).reshape(NH, DH, 4 * DH)
    if state is None:
        state = zero_state(B, NH, DH, cd, x.device)
    c, n, m, h = (s.to(cd) for s in state)
    keep = None if resets is None else (~resets).to(cd).t().reshape(S, B, 1, 1)
    out = []
    for t in range(S):
        if keep is not None:
            kt = keep[t]
            c, n, m, h = c * kt, n * kt, m * kt, h * kt
        rec = torch.bmm(h.transpose(0, 1), Rcat).transpose(0, 1).reshape(B, NH, 4, DH)
        pre = xb[t] + rec
        c, n, m, h = slstm_pointwise(pre[:, :, 0], pre[:, :, 1], pre[:, :, 2], pre[:, :, 3], c, n, m)
        out.append(h)
    hs = torch.stack(out, dim=1) if out else x.new_zeros(B, 0, NH, DH, dtype=cd)
    return hs.to(in_dtype), (c, n, m, h)
