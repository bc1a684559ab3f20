"""Triton kernels of the sLSTM recurrence: a persistent program per (batch tile, head) loops over time.

Forward, per step t and per tile of BJ output units: four dots h_{t-1} (BB x DH) @ R[g, head][:, tile]
(DH x BJ), plus x_t + b, then the stabilised exponential gating (reference.slstm_pointwise, elementwise). The
state (c, n, m, h) lives in a float32 buffer ``st`` of NS slots (NS = S + 1 when training: every step's state is
kept for the backward; NS = 2 otherwise: a ring), slot 0 holding the initial state. A step reads slot t % NS and
writes slot (t + 1) % NS; h_{t-1} is re-read from there by every tile, and a CTA barrier (tl.debug_barrier)
separates the steps (one CTA reads back only what it wrote itself, so the barrier makes the writes visible).
When training, the gate pre-activations (x + b + h R) are kept too (float32, x's layout).

Backward, per step from S - 1 down to 0: phase 1 recomputes the gates from the kept pre-activations and state
and writes dG_t (the pre-activation gradients, float32, x's layout) and the carried dc, dn; after a barrier,
phase 2 forms dh_{t-1} = sum_g dG_g,t @ R[g, head]^T from a transposed copy of R (plain dots of loaded tiles,
no transposed register operand). dx = dG, db and dR (one batched matmul over (h_{t-1}, dG_t)) are formed in
PyTorch by the caller.

Resets: a reset before t clears c, n, h (an empty state, n == 0: the stabiliser then starts from the input gate,
as in the reference); in the backward the reset cuts dc, dn (f' = 0 on an empty state) and dh_{t-1}.

16-bit inputs multiply in their own dtype on tensor cores (h and dG rounded to it, fp32 accumulation); fp32
inputs use IEEE fp32 dots unless torch's float32 matmul precision allows TF32. Batch rows beyond B are masked.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class SLSTMTritonConfig:
    block_b: int = 16    # batch rows per program (>= 16: the M dim of a dot)
    block_j: int = 64    # output units per tile
    block_k: int = 64    # reduction chunk of the recurrent dots
    num_warps: int = 4
    hoist: bool = False  # keep R (all four gates of the head) in registers across steps (one tile only)

    def check(self, DH: int) -> None:
        for name in ("block_b", "block_j", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"SLSTMTritonConfig.{name} must be a power of two >= 16, got {v}")
        if DH % self.block_j or DH % self.block_k:
            raise ValueError(f"SLSTMTritonConfig: block_j={self.block_j} and block_k={self.block_k} must divide "
                             f"the head dim {DH}")
        if self.hoist and (self.block_j != DH or self.block_k != DH):
            raise ValueError("SLSTMTritonConfig.hoist needs block_j == block_k == the head dim")


@functools.lru_cache(maxsize=None)
def default_config(DH: int, dtype: torch.dtype) -> SLSTMTritonConfig:
    """BB 16 (the most programs for a given batch); one tile of all units up to DH 64, with R held in registers
    when its four DH x DH gate blocks take at most 32 KB; tiles of 64 units and reduction chunks of 64 above. Eight
    warps from DH 64: no spills in the sm_90 builds (Triton 3.9 AOT + cuobjdump: 128-176 registers; four warps
    spill at DH 256; benchmarks/NOTES.md)."""
    elt = 2 if dtype in (torch.float16, torch.bfloat16) else 4
    if DH <= 64:
        hoist = 4 * DH * DH * elt <= 32 * 1024
        return SLSTMTritonConfig(block_b=16, block_j=DH, block_k=DH, num_warps=8 if DH == 64 else 4, hoist=hoist)
    return SLSTMTritonConfig(block_b=16, block_j=64, block_k=64, num_warps=8, hoist=False)


# ------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------

@triton.jit
def _dot(a, b, IP: tl.constexpr, UP: tl.constexpr):
    # UP: the CPU interpreter multiplies bfloat16 blocks as raw integers, so there the (already rounded) operands
    # are widened to fp32 first: the same products
    if UP:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=IP)


@triton.jit
def _r16(x, dt: tl.constexpr, UP: tl.constexpr):
    """fp32 -> dt rounding to nearest even (the interpreter's own bf16 conversion truncates; UP rounds on the
    bits first so that the interpreter tests see the GPU's rounding)."""
    if UP:
        if dt == tl.bfloat16:
            b = x.to(tl.uint32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
            x = b.to(tl.float32, bitcast=True)
    return x.to(dt)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _gates(pi, pf, pz, po, c_prev, n_prev, m_prev):
    """The stabilised update (reference.slstm_pointwise). An empty state (n == 0) starts m from the input gate
    and carries nothing (f' = 0 exactly, no exp of -inf - -inf)."""
    empty = n_prev == 0.0
    lf = tl.minimum(pf, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(pf)))  # log sigmoid(pf)
    m_new = tl.where(empty, pi, tl.maximum(lf + m_prev, pi))
    ip = tl.exp(pi - m_new)
    fp = tl.where(empty, 0.0, tl.exp(tl.minimum(lf + m_prev - m_new, 0.0)))
    z = _tanh(pz)
    og = _sigmoid(po)
    c = fp * c_prev + ip * z
    n = fp * n_prev + ip
    return lf, m_new, ip, fp, z, og, c, n


# ------------------------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------------------------

@triton.jit
def _fwd_kernel(x_ptr, R_ptr, b_ptr, rst_ptr, st_ptr, h_ptr, g_ptr, B, S, NS, NH,
                DH: tl.constexpr, BB: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr,
                HAS_RESET: tl.constexpr, SAVE_G: tl.constexpr, HOIST: tl.constexpr,
                IP: tl.constexpr, UP: tl.constexpr):
    pid_b = tl.program_id(0)
    hd = tl.program_id(1)
    DT: tl.constexpr = R_ptr.dtype.element_ty  # dot operand dtype (R is given in it)
    rows = (pid_b * BB + tl.arange(0, BB)).to(tl.int64)
    rmask = rows < B
    rm2 = rmask[:, None]
    plane = B * NH * DH  # one state tensor (B, NH, DH) in a slot; a slot holds c, n, m, h
    srow = (rows * NH + hd) * DH  # (BB,) offset of (row, head) in a plane
    GS = NH * DH  # gate stride in x (B, S, 4, NH, DH)
    Rh = R_ptr + hd * DH * DH
    RG = NH * DH * DH
    ar = tl.arange(0, BJ)
    if HOIST:
        roff = tl.arange(0, DH)[:, None] * DH + tl.arange(0, DH)[None, :]
        r_i = tl.load(Rh + roff)
        r_f = tl.load(Rh + RG + roff)
        r_z = tl.load(Rh + 2 * RG + roff)
        r_o = tl.load(Rh + 3 * RG + roff)
    for t in range(S):
        src = st_ptr + tl.cast(t % NS, tl.int64) * 4 * plane
        dst = st_ptr + tl.cast((t + 1) % NS, tl.int64) * 4 * plane
        if HAS_RESET:
            keep = tl.load(rst_ptr + rows * S + t, mask=rmask, other=0) == 0
        xrow = (rows * S + t) * 4 * GS + hd * DH  # (BB,)
        for j in range(0, DH, BJ):
            cols = j + ar
            so = srow[:, None] + cols[None, :]
            xo = xrow[:, None] + cols[None, :]
            bo = hd * DH + cols
            # the loads that do not depend on h_{t-1} first: their latency overlaps the dots
            pi = tl.load(x_ptr + xo, mask=rm2, other=0.0).to(tl.float32) + tl.load(b_ptr + bo)[None, :]
            pf = tl.load(x_ptr + xo + GS, mask=rm2, other=0.0).to(tl.float32) + tl.load(b_ptr + GS + bo)[None, :]
            pz = tl.load(x_ptr + xo + 2 * GS, mask=rm2, other=0.0).to(tl.float32) \
                + tl.load(b_ptr + 2 * GS + bo)[None, :]
            po = tl.load(x_ptr + xo + 3 * GS, mask=rm2, other=0.0).to(tl.float32) \
                + tl.load(b_ptr + 3 * GS + bo)[None, :]
            c_prev = tl.load(src + so, mask=rm2, other=0.0, cache_modifier=".cg")
            n_prev = tl.load(src + plane + so, mask=rm2, other=0.0, cache_modifier=".cg")
            m_prev = tl.load(src + 2 * plane + so, mask=rm2, other=0.0, cache_modifier=".cg")
            if HAS_RESET:
                c_prev = tl.where(keep[:, None], c_prev, 0.0)
                n_prev = tl.where(keep[:, None], n_prev, 0.0)
            acc_i = tl.zeros((BB, BJ), dtype=tl.float32)
            acc_f = tl.zeros((BB, BJ), dtype=tl.float32)
            acc_z = tl.zeros((BB, BJ), dtype=tl.float32)
            acc_o = tl.zeros((BB, BJ), dtype=tl.float32)
            for k in range(0, DH, BK):
                ks = k + tl.arange(0, BK)
                hk = tl.load(src + 3 * plane + srow[:, None] + ks[None, :], mask=rm2, other=0.0,
                             cache_modifier=".cg")
                if HAS_RESET:
                    hk = tl.where(keep[:, None], hk, 0.0)
                hk = _r16(hk, DT, UP)
                if HOIST:
                    acc_i += _dot(hk, r_i, IP, UP)
                    acc_f += _dot(hk, r_f, IP, UP)
                    acc_z += _dot(hk, r_z, IP, UP)
                    acc_o += _dot(hk, r_o, IP, UP)
                else:
                    roff2 = ks[:, None] * DH + cols[None, :]
                    acc_i += _dot(hk, tl.load(Rh + roff2), IP, UP)
                    acc_f += _dot(hk, tl.load(Rh + RG + roff2), IP, UP)
                    acc_z += _dot(hk, tl.load(Rh + 2 * RG + roff2), IP, UP)
                    acc_o += _dot(hk, tl.load(Rh + 3 * RG + roff2), IP, UP)
            pi += acc_i
            pf += acc_f
            pz += acc_z
            po += acc_o
            if SAVE_G:
                tl.store(g_ptr + xo, pi, mask=rm2)
                tl.store(g_ptr + xo + GS, pf, mask=rm2)
                tl.store(g_ptr + xo + 2 * GS, pz, mask=rm2)
                tl.store(g_ptr + xo + 3 * GS, po, mask=rm2)
            lf, m, ip, fp, z, og, c, n = _gates(pi, pf, pz, po, c_prev, n_prev, m_prev)
            h = og * c / tl.where(n > 0.0, n, 1.0)
            tl.store(dst + so, c, mask=rm2)
            tl.store(dst + plane + so, n, mask=rm2)
            tl.store(dst + 2 * plane + so, m, mask=rm2)
            tl.store(dst + 3 * plane + so, h, mask=rm2)
            ho = (rows[:, None] * S + t) * GS + hd * DH + cols[None, :]
            tl.store(h_ptr + ho, _r16(h, h_ptr.dtype.element_ty, UP), mask=rm2)
        tl.debug_barrier()


# ------------------------------------------------------------------------------------------------------------
# backward
# ------------------------------------------------------------------------------------------------------------

@triton.jit
def _bwd_kernel(g_ptr, st_ptr, rst_ptr, RT_ptr, dh_ptr, dg_ptr, cr_ptr, B, S, NH,
                DH: tl.constexpr, BB: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr,
                HAS_RESET: tl.constexpr, HAS_DH: tl.constexpr, IP: tl.constexpr, UP: tl.constexpr):
    """cr (4, B, NH, DH) float32: dc, dn (carried, in place), and a ring of two slots for dh from the recurrence;
    on entry dc, dn = the final state's gradients and slot (S - 1) % 2 = the last h's; on exit dc, dn and slot 1
    are the gradients to the initial c, n, h."""
    pid_b = tl.program_id(0)
    hd = tl.program_id(1)
    DT: tl.constexpr = RT_ptr.dtype.element_ty
    rows = (pid_b * BB + tl.arange(0, BB)).to(tl.int64)
    rmask = rows < B
    rm2 = rmask[:, None]
    plane = B * NH * DH
    srow = (rows * NH + hd) * DH
    GS = NH * DH
    RTh = RT_ptr + hd * DH * DH
    RG = NH * DH * DH
    ar = tl.arange(0, BJ)
    for tt in range(S):
        t = S - 1 - tt
        src = st_ptr + tl.cast(t, tl.int64) * 4 * plane  # state before step t (slot t of S + 1)
        dhin = cr_ptr + (2 + t % 2) * plane
        dhout = cr_ptr + (2 + (t + 1) % 2) * plane
        if HAS_RESET:
            keep = tl.load(rst_ptr + rows * S + t, mask=rmask, other=0) == 0
        xrow = (rows * S + t) * 4 * GS + hd * DH
        # phase 1: the gate pre-activation gradients of step t and the carried dc, dn
        for j in range(0, DH, BJ):
            cols = j + ar
            so = srow[:, None] + cols[None, :]
            xo = xrow[:, None] + cols[None, :]
            dh = tl.load(dhin + so, mask=rm2, other=0.0, cache_modifier=".cg")
            if HAS_DH:
                ho = (rows[:, None] * S + t) * GS + hd * DH + cols[None, :]
                dh += tl.load(dh_ptr + ho, mask=rm2, other=0.0).to(tl.float32)
            dc = tl.load(cr_ptr + so, mask=rm2, other=0.0, cache_modifier=".cg")
            dn = tl.load(cr_ptr + plane + so, mask=rm2, other=0.0, cache_modifier=".cg")
            pi = tl.load(g_ptr + xo, mask=rm2, other=0.0)
            pf = tl.load(g_ptr + xo + GS, mask=rm2, other=0.0)
            pz = tl.load(g_ptr + xo + 2 * GS, mask=rm2, other=0.0)
            po = tl.load(g_ptr + xo + 3 * GS, mask=rm2, other=0.0)
            c_prev = tl.load(src + so, mask=rm2, other=0.0)
            n_prev = tl.load(src + plane + so, mask=rm2, other=0.0)
            m_prev = tl.load(src + 2 * plane + so, mask=rm2, other=0.0)
            if HAS_RESET:
                c_prev = tl.where(keep[:, None], c_prev, 0.0)
                n_prev = tl.where(keep[:, None], n_prev, 0.0)
            lf, m, ip, fp, z, og, c, n = _gates(pi, pf, pz, po, c_prev, n_prev, m_prev)
            pos = n > 0.0
            safe = tl.where(pos, n, 1.0)
            dc_t = dc + dh * og / safe
            dn_t = dn - tl.where(pos, dh * og * c / (safe * safe), 0.0)
            d_o = dh * (c / safe) * og * (1.0 - og)
            d_z = dc_t * ip * (1.0 - z * z)
            d_i = (dc_t * z + dn_t) * ip
            d_f = (dc_t * c_prev + dn_t * n_prev) * fp * _sigmoid(-pf)
            tl.store(cr_ptr + so, dc_t * fp, mask=rm2)
            tl.store(cr_ptr + plane + so, dn_t * fp, mask=rm2)
            tl.store(dg_ptr + xo, d_i, mask=rm2)
            tl.store(dg_ptr + xo + GS, d_f, mask=rm2)
            tl.store(dg_ptr + xo + 2 * GS, d_z, mask=rm2)
            tl.store(dg_ptr + xo + 3 * GS, d_o, mask=rm2)
        tl.debug_barrier()
        # phase 2: dh_{t-1} = sum_g dG_g,t @ R[g, head]^T (zero across a reset)
        for j in range(0, DH, BJ):
            cols = j + ar
            acc = tl.zeros((BB, BJ), dtype=tl.float32)
            for g in range(4):
                for k in range(0, DH, BK):
                    ks = k + tl.arange(0, BK)
                    dgk = tl.load(dg_ptr + xrow[:, None] + g * GS + ks[None, :], mask=rm2, other=0.0,
                                  cache_modifier=".cg")
                    rt = tl.load(RTh + g * RG + ks[:, None] * DH + cols[None, :])
                    acc += _dot(_r16(dgk, DT, UP), rt, IP, UP)
            if HAS_RESET:
                acc = tl.where(keep[:, None], acc, 0.0)
            tl.store(dhout + srow[:, None] + cols[None, :], acc, mask=rm2)
        tl.debug_barrier()


# ------------------------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------------------------

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _dot_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32


def _ip(dot_dtype: torch.dtype) -> str:
    if dot_dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _check_inputs(x, R, cfg: SLSTMTritonConfig) -> None:
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"the Triton sLSTM takes float16, bfloat16 or float32 x, got {x.dtype}")
    DH = x.shape[-1]
    if DH not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"the Triton sLSTM supports head dims {SUPPORTED_HEAD_DIMS}, got {DH}")
    cfg.check(DH)


def slstm_forward(x, R, b, st, resets, save: bool, cfg: Optional[SLSTMTritonConfig] = None):
    """Runs the forward kernel. x (B, S, 4, NH, DH) contiguous; R (4, NH, DH, DH); b (4, NH, DH); st the state
    buffer (NS, 4, B, NH, DH) float32 with the initial state in slot 0 (NS = S + 1 if ``save`` else 2); resets
    None or (B, S) bool. Returns h (B, S, NH, DH) in x's dtype and the pre-activations (float32, x's layout) when
    ``save`` (else None). The final state is st[S % NS]."""
    B, S, _, NH, DH = x.shape
    cfg = cfg or default_config(DH, x.dtype)
    _check_inputs(x, R, cfg)
    dd = _dot_dtype(x.dtype)
    up = _interpreting() and dd == torch.bfloat16
    Rd = R.to(dd).contiguous()
    bf = b.to(torch.float32).contiguous()
    h = torch.empty(B, S, NH, DH, dtype=x.dtype, device=x.device)
    G = torch.empty(B, S, 4, NH, DH, dtype=torch.float32, device=x.device) if save else h
    NS = st.shape[0]
    rst = resets.contiguous().view(torch.uint8) if resets is not None else h
    grid = ((B + cfg.block_b - 1) // cfg.block_b, NH)  # (triton.cdiv is slow from Python)
    _fwd_kernel[grid](x, Rd, bf, rst, st, h, G, B, S, NS, NH, DH=DH, BB=cfg.block_b, BJ=cfg.block_j,
                      BK=cfg.block_k, HAS_RESET=resets is not None, SAVE_G=save, HOIST=cfg.hoist, IP=_ip(dd),
                      UP=up, num_warps=cfg.num_warps)
    return h, (G if save else None)


def slstm_backward(G, st, resets, R, x_dtype, gh, gc, gn, ghl, cfg: Optional[SLSTMTritonConfig] = None):
    """Runs the backward kernel. G (B, S, 4, NH, DH) the saved pre-activations, st (S + 1, 4, B, NH, DH) the saved
    states; gh (B, S, NH, DH) or None, gc, gn, ghl (B, NH, DH) or None: the output gradients. Returns dG (float32,
    x's layout) and the gradients to the initial c, n, h."""
    B, S, _, NH, DH = G.shape
    cfg = cfg or default_config(DH, x_dtype)
    dd = _dot_dtype(x_dtype)
    up = _interpreting() and dd == torch.bfloat16
    RT = R.to(dd).transpose(-1, -2).contiguous()
    dG = torch.empty_like(G)
    cr = torch.zeros(4, B, NH, DH, dtype=torch.float32, device=G.device)
    if gc is not None:
        cr[0].copy_(gc)
    if gn is not None:
        cr[1].copy_(gn)
    if ghl is not None:
        cr[2 + (S - 1) % 2].copy_(ghl)
    gh_arg = gh.contiguous() if gh is not None else cr
    rst = resets.contiguous().view(torch.uint8) if resets is not None else cr
    grid = ((B + cfg.block_b - 1) // cfg.block_b, NH)  # (triton.cdiv is slow from Python)
    _bwd_kernel[grid](G, st, rst, RT, gh_arg, dG, cr, B, S, NH, DH=DH, BB=cfg.block_b, BJ=cfg.block_j,
                      BK=cfg.block_k, HAS_RESET=resets is not None, HAS_DH=gh is not None, IP=_ip(dd), UP=up,
                      num_warps=cfg.num_warps)
    return dG, cr[0], cr[1], cr[3]
