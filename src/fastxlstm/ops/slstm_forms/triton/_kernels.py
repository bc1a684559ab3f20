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

from ..._intmath import cdiv

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class SLSTMTritonConfig:
    block_b: int = 16    # batch rows per program (>= 16: the M dim of a dot)
    block_j: int = 64    # output units per tile
    block_k: int = 64    # reduction chunk of the recurrent dots
    num_warps: int = 4
    hoist: bool = False  # keep R (all four gates of the head) in registers across steps (one tile only)
    split: int = 1       # > 1: the head's units split over this many programs (the "split" kernels, see below)
    stepwise: bool = False  # split kernels: one launch per step instead of the in-kernel group barrier
    batch_programs: int = 0  # split kernels: at most this many programs along the batch tiles (0: as many as fit)

    def check(self, DH: int) -> None:
        if self.split != 1:
            if self.split < 1 or self.split & (self.split - 1) or DH // self.split < 16 or DH % self.split:
                raise ValueError(f"SLSTMTritonConfig.split must be a power of two with head dim / split >= 16, "
                                 f"got split={self.split} for head dim {DH}")
            if self.block_b < 16 or self.block_b & (self.block_b - 1):
                raise ValueError(f"SLSTMTritonConfig.block_b must be a power of two >= 16, got {self.block_b}")
            return
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
    """Up to DH 64: one program per (16 batch rows, head), BB 16 (the most programs for a given batch), one tile of
    all units, with R held in registers when its four DH x DH gate blocks take at most 32 KB; eight warps at DH 64
    (no spills in the sm_90 builds: Triton 3.9 AOT + cuobjdump: 128-176 registers). From DH 128: the split kernels,
    32 units per program (4 programs per head at DH 128, 8 at DH 256; 16 units in fp32 at DH 256), R's slice on chip
    (benchmarks/NOTES.md). A GPU whose shared memory cannot hold the split kernels' slices gets the one-program-per-
    head tiling instead (see _fallback)."""
    elt = 2 if dtype in (torch.float16, torch.bfloat16) else 4
    if DH <= 64:
        hoist = 4 * DH * DH * elt <= 32 * 1024
        return SLSTMTritonConfig(block_b=16, block_j=DH, block_k=DH, num_warps=8 if DH == 64 else 4, hoist=hoist)
    if elt == 4 and DH == 256:  # 32 fp32 units: 128 KB of R^T slices, over the backward's shared memory
        return SLSTMTritonConfig(block_b=16, split=16, num_warps=8)
    return SLSTMTritonConfig(block_b=16, split=DH // 32, num_warps=4)


#: the persistent one-program-per-head tiling that was the default of DH >= 128 before the split kernels
TILED_LARGE_HEAD = SLSTMTritonConfig(block_b=16, block_j=64, block_k=64, num_warps=8, hoist=False)


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


@triton.jit
def _gate_grads(dh, dc, dn, pi, pf, pz, po, c_prev, n_prev, m_prev):
    """One backward step of the stabilised update, elementwise: given dL/dh_t (dh) and the carried dL/dc_t, dL/dn_t
    (dc, dn) and the step's pre-activations and previous state, returns the carried gradients to c_{t-1}, n_{t-1}
    and the four pre-activation gradients (d_i, d_f, d_z, d_o)."""
    lf, m, ip, fp, z, og, c, n = _gates(pi, pf, pz, po, c_prev, n_prev, m_prev)
    pos = n > 0.0
    safe = tl.where(pos, n, 1.0)
    dc_t = dc + dh * og / safe
    dn_t = dn - tl.where(pos, dh * og * c / (safe * safe), 0.0)
    d_o = dh * (c / safe) * og * (1.0 - og)
    d_z = dc_t * ip * (1.0 - z * z)
    d_i = (dc_t * z + dn_t) * ip
    d_f = (dc_t * c_prev + dn_t * n_prev) * fp * _sigmoid(-pf)
    return dc_t * fp, dn_t * fp, d_i, d_f, d_z, d_o


# ------------------------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------------------------

@triton.jit
def _load_state(src, so, plane, rm2):
    """(c, n, m) of step t-1 for the rows / units at offsets so of the state slot src (read through L2: other
    programs wrote them)."""
    c = tl.load(src + so, mask=rm2, other=0.0, cache_modifier=".cg")
    n = tl.load(src + plane + so, mask=rm2, other=0.0, cache_modifier=".cg")
    m = tl.load(src + 2 * plane + so, mask=rm2, other=0.0, cache_modifier=".cg")
    return c, n, m


@triton.jit
def _step_out(pi, pf, pz, po, c_prev, n_prev, m_prev, g_ptr, xo, GS, dst, so, plane, h_ptr, ho, rm2,
              SAVE_G: tl.constexpr, UP: tl.constexpr):
    """The end of one forward step for a tile: the gate pre-activations kept for the backward (SAVE_G), the gates,
    the new (c, n, m, h) into the state slot dst and h (in h's dtype) at offsets ho."""
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
    tl.store(h_ptr + ho, _r16(h, h_ptr.dtype.element_ty, UP), mask=rm2)

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
            c_prev, n_prev, m_prev = _load_state(src, so, plane, rm2)
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
            _step_out(pi, pf, pz, po, c_prev, n_prev, m_prev, g_ptr, xo, GS, dst, so, plane, h_ptr,
                      (rows[:, None] * S + t) * GS + hd * DH + cols[None, :], rm2, SAVE_G, UP)
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
            dc_c, dn_c, d_i, d_f, d_z, d_o = _gate_grads(dh, dc, dn, pi, pf, pz, po, c_prev, n_prev, m_prev)
            tl.store(cr_ptr + so, dc_c, mask=rm2)
            tl.store(cr_ptr + plane + so, dn_c, mask=rm2)
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
# split kernels: a head's units over P programs, R's slice held on chip, a group barrier per step
# ------------------------------------------------------------------------------------------------------------
#
# Grid (GB, NH, P). Program (pb, hd, pj) owns the BJ = DH / P units pj * BJ + [0, BJ) of head hd, for the batch
# tiles pb, pb + GB, ... (GB <= the number of batch tiles: the grid is kept within the number of SMs so that all
# programs are resident at once). It loads its slice of R (four DH x BJ blocks; DH x BJ of each R_g^T in the
# backward) once and keeps it for the whole sequence, so only h_{t-1} (BB x DH) moves per step.
#
# The P programs of a (pb, hd) group exchange h_{t-1} (forward) or dG_t (backward) through global memory, and
# synchronise once per step on a counter: CTA barrier, one acq_rel atomic add (release: this CTA's stores are
# visible before the count), spin on acquire loads of the counter until all P arrived, CTA barrier. The counter
# only grows (P per step) so it is never reset within a launch. A spin that runs out of patience (a program that
# can never arrive: not all resident) poisons the state with NaN instead of hanging or returning a wrong number.
# With SYNC = False the kernel does the steps [T0, T1) without any barrier: the launcher then runs one launch per
# step (and in the backward one per phase): the CPU interpreter, which runs programs one after another and could
# never pass a barrier, runs the same arithmetic this way, and so can a GPU (cfg.stepwise), for comparison.

@triton.jit
def _group_barrier(cnt_ptr, target, LIMIT: tl.constexpr):
    """All programs of the group have arrived (target = P x steps so far) when this returns. Returns True if the
    wait gave up after LIMIT polls."""
    tl.debug_barrier()
    cur = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu") + 1
    polls = 0
    while (cur < target) & (polls < LIMIT):
        cur = tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")
        polls += 1
    tl.debug_barrier()
    return cur < target


@triton.jit
def _fwd_split_kernel(x_ptr, R_ptr, b_ptr, rst_ptr, st_ptr, h_ptr, g_ptr, cnt_ptr, B, S, NS, NH, NBT, T0, T1,
                      DH: tl.constexpr, BB: tl.constexpr, BJ: tl.constexpr, HAS_RESET: tl.constexpr,
                      SAVE_G: tl.constexpr, SYNC: tl.constexpr, LIMIT: tl.constexpr, IP: tl.constexpr,
                      UP: tl.constexpr):
    pb = tl.program_id(0)
    hd = tl.program_id(1)
    pj = tl.program_id(2)
    GB = tl.num_programs(0)
    P = tl.num_programs(2)
    DT: tl.constexpr = R_ptr.dtype.element_ty
    plane = B * NH * DH
    GS = NH * DH
    RG = NH * DH * DH
    cols = pj * BJ + tl.arange(0, BJ)
    kk = tl.arange(0, DH)
    Rh = R_ptr + hd * DH * DH
    roff = kk[:, None] * DH + cols[None, :]  # R[g, hd][:, cols]: DH x BJ
    r_i = tl.load(Rh + roff)
    r_f = tl.load(Rh + RG + roff)
    r_z = tl.load(Rh + 2 * RG + roff)
    r_o = tl.load(Rh + 3 * RG + roff)
    bo = hd * DH + cols
    b_i = tl.load(b_ptr + bo)[None, :]
    b_f = tl.load(b_ptr + GS + bo)[None, :]
    b_z = tl.load(b_ptr + 2 * GS + bo)[None, :]
    b_o = tl.load(b_ptr + 3 * GS + bo)[None, :]
    cp = cnt_ptr + pb * NH + hd
    poison = tl.full([], 0.0, tl.float32)
    for t in range(T0, T1):
        src = st_ptr + tl.cast(t % NS, tl.int64) * 4 * plane
        dst = st_ptr + tl.cast((t + 1) % NS, tl.int64) * 4 * plane
        for bt in range(pb, NBT, GB):
            rows = (bt * BB + tl.arange(0, BB)).to(tl.int64)
            rmask = rows < B
            rm2 = rmask[:, None]
            srow = (rows * NH + hd) * DH
            so = srow[:, None] + cols[None, :]
            xo = ((rows * S + t) * 4 * GS + hd * DH)[:, None] + cols[None, :]
            pi = tl.load(x_ptr + xo, mask=rm2, other=0.0).to(tl.float32) + b_i
            pf = tl.load(x_ptr + xo + GS, mask=rm2, other=0.0).to(tl.float32) + b_f
            pz = tl.load(x_ptr + xo + 2 * GS, mask=rm2, other=0.0).to(tl.float32) + b_z
            po = tl.load(x_ptr + xo + 3 * GS, mask=rm2, other=0.0).to(tl.float32) + b_o
            c_prev, n_prev, m_prev = _load_state(src, so, plane, rm2)
            c_prev += poison
            hk = tl.load(src + 3 * plane + srow[:, None] + kk[None, :], mask=rm2, other=0.0, cache_modifier=".cg")
            if HAS_RESET:
                keep = (tl.load(rst_ptr + rows * S + t, mask=rmask, other=0) == 0)[:, None]
                c_prev = tl.where(keep, c_prev, 0.0)
                n_prev = tl.where(keep, n_prev, 0.0)
                hk = tl.where(keep, hk, 0.0)
            hk = _r16(hk, DT, UP)
            pi += _dot(hk, r_i, IP, UP)
            pf += _dot(hk, r_f, IP, UP)
            pz += _dot(hk, r_z, IP, UP)
            po += _dot(hk, r_o, IP, UP)
            _step_out(pi, pf, pz, po, c_prev, n_prev, m_prev, g_ptr, xo, GS, dst, so, plane, h_ptr,
                      (rows[:, None] * S + t) * GS + hd * DH + cols[None, :], rm2, SAVE_G, UP)
        if SYNC:
            poison = tl.where(_group_barrier(cp, (t - T0 + 1) * P, LIMIT), float("nan"), poison)


@triton.jit
def _bwd_split_kernel(g_ptr, st_ptr, rst_ptr, RT_ptr, dh_ptr, dg_ptr, cr_ptr, cnt_ptr, B, S, NH, NBT, T0, T1,
                      DH: tl.constexpr, BB: tl.constexpr, BJ: tl.constexpr, HAS_RESET: tl.constexpr,
                      HAS_DH: tl.constexpr, PHASES: tl.constexpr, SYNC: tl.constexpr, LIMIT: tl.constexpr,
                      IP: tl.constexpr, UP: tl.constexpr):
    """Steps t = S - 1 - T0 down to S - T1. PHASES: 3 both phases with the group barrier between them (SYNC), 1
    or 2 only that phase (the stepwise launches). cr as in _bwd_kernel (dc, dn, and the dh ring: each program
    reads and writes only its own units there)."""
    pb = tl.program_id(0)
    hd = tl.program_id(1)
    pj = tl.program_id(2)
    GB = tl.num_programs(0)
    P = tl.num_programs(2)
    DT: tl.constexpr = RT_ptr.dtype.element_ty
    plane = B * NH * DH
    GS = NH * DH
    RG = NH * DH * DH
    cols = pj * BJ + tl.arange(0, BJ)
    kk = tl.arange(0, DH)
    if PHASES != 1:
        RTh = RT_ptr + hd * DH * DH
        roff = kk[:, None] * DH + cols[None, :]  # R_g^T[:, cols] = R_g[cols, :]^T: DH x BJ
        rt_i = tl.load(RTh + roff)
        rt_f = tl.load(RTh + RG + roff)
        rt_z = tl.load(RTh + 2 * RG + roff)
        rt_o = tl.load(RTh + 3 * RG + roff)
    cp = cnt_ptr + pb * NH + hd
    poison = tl.full([], 0.0, tl.float32)
    for tt in range(T0, T1):
        t = S - 1 - tt
        src = st_ptr + tl.cast(t, tl.int64) * 4 * plane
        dhin = cr_ptr + (2 + t % 2) * plane
        dhout = cr_ptr + (2 + (t + 1) % 2) * plane
        if PHASES != 2:
            for bt in range(pb, NBT, GB):
                rows = (bt * BB + tl.arange(0, BB)).to(tl.int64)
                rmask = rows < B
                rm2 = rmask[:, None]
                so = ((rows * NH + hd) * DH)[:, None] + cols[None, :]
                xo = ((rows * S + t) * 4 * GS + hd * DH)[:, None] + cols[None, :]
                dh = tl.load(dhin + so, mask=rm2, other=0.0) + poison
                if HAS_DH:
                    ho = (rows[:, None] * S + t) * GS + hd * DH + cols[None, :]
                    dh += tl.load(dh_ptr + ho, mask=rm2, other=0.0).to(tl.float32)
                dc = tl.load(cr_ptr + so, mask=rm2, other=0.0)
                dn = tl.load(cr_ptr + plane + so, mask=rm2, other=0.0)
                pi = tl.load(g_ptr + xo, mask=rm2, other=0.0)
                pf = tl.load(g_ptr + xo + GS, mask=rm2, other=0.0)
                pz = tl.load(g_ptr + xo + 2 * GS, mask=rm2, other=0.0)
                po = tl.load(g_ptr + xo + 3 * GS, mask=rm2, other=0.0)
                c_prev = tl.load(src + so, mask=rm2, other=0.0)
                n_prev = tl.load(src + plane + so, mask=rm2, other=0.0)
                m_prev = tl.load(src + 2 * plane + so, mask=rm2, other=0.0)
                if HAS_RESET:
                    keep = (tl.load(rst_ptr + rows * S + t, mask=rmask, other=0) == 0)[:, None]
                    c_prev = tl.where(keep, c_prev, 0.0)
                    n_prev = tl.where(keep, n_prev, 0.0)
                dc_c, dn_c, d_i, d_f, d_z, d_o = _gate_grads(dh, dc, dn, pi, pf, pz, po, c_prev, n_prev, m_prev)
                tl.store(cr_ptr + so, dc_c, mask=rm2)
                tl.store(cr_ptr + plane + so, dn_c, mask=rm2)
                tl.store(dg_ptr + xo, d_i, mask=rm2)
                tl.store(dg_ptr + xo + GS, d_f, mask=rm2)
                tl.store(dg_ptr + xo + 2 * GS, d_z, mask=rm2)
                tl.store(dg_ptr + xo + 3 * GS, d_o, mask=rm2)
        if SYNC:
            poison = tl.where(_group_barrier(cp, (tt - T0 + 1) * P, LIMIT), float("nan"), poison)
        if PHASES != 1:
            # dh_{t-1}[cols] = sum_g dG_g,t (all DH units of the head, from every program of the group) @ R_g^T[:, cols]
            for bt in range(pb, NBT, GB):
                rows = (bt * BB + tl.arange(0, BB)).to(tl.int64)
                rmask = rows < B
                rm2 = rmask[:, None]
                xrow = (rows * S + t) * 4 * GS + hd * DH
                gk = xrow[:, None] + kk[None, :]
                acc = _dot(_r16(tl.load(dg_ptr + gk, mask=rm2, other=0.0, cache_modifier=".cg"), DT, UP), rt_i,
                           IP, UP)
                acc += _dot(_r16(tl.load(dg_ptr + gk + GS, mask=rm2, other=0.0, cache_modifier=".cg"), DT, UP),
                            rt_f, IP, UP)
                acc += _dot(_r16(tl.load(dg_ptr + gk + 2 * GS, mask=rm2, other=0.0, cache_modifier=".cg"), DT, UP),
                            rt_z, IP, UP)
                acc += _dot(_r16(tl.load(dg_ptr + gk + 3 * GS, mask=rm2, other=0.0, cache_modifier=".cg"), DT, UP),
                            rt_o, IP, UP)
                if HAS_RESET:
                    keep = (tl.load(rst_ptr + rows * S + t, mask=rmask, other=0) == 0)[:, None]
                    acc = tl.where(keep, acc, 0.0)
                tl.store(dhout + ((rows * NH + hd) * DH)[:, None] + cols[None, :], acc, mask=rm2)


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


def _tiled(DH: int) -> SLSTMTritonConfig:
    """The one-program-per-head kernels for any head dim (the split kernels' fallback)."""
    return TILED_LARGE_HEAD if DH >= 64 else SLSTMTritonConfig(block_b=16, block_j=DH, block_k=DH, num_warps=4)


#: (head dim, dot dtype, config) of split kernels this GPU could not launch (shared memory): the tiled kernels run
#: instead (the same arithmetic up to the order of the reduction)
_TOO_BIG: set = set()

_SPIN_LIMIT = 1 << 22  # polls of the group counter (~1 us each) before a split kernel gives up and poisons


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _split_grid(B: int, S: int, NH: int, cfg: SLSTMTritonConfig, device: torch.device):
    """(batch tiles, batch-tile programs GB, in-kernel barrier?) of the split kernels. With the barrier, every
    program must be resident at once: GB x NH x split is kept within the number of SMs (one program per SM is
    the worst case of occupancy), each program then taking several batch tiles per step; where even GB = 1 does
    not fit, or in the interpreter, or when cfg.stepwise asks for it, one launch per step (no barrier)."""
    NBT = (B + cfg.block_b - 1) // cfg.block_b
    cap = cfg.batch_programs if cfg.batch_programs > 0 else NBT
    if S == 1 or _interpreting() or cfg.stepwise or device.type != "cuda":
        return NBT, min(NBT, cap), False
    per_bt = NH * cfg.split
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    if per_bt > sms:
        return NBT, min(NBT, cap), False
    return NBT, min(NBT, cap, sms // per_bt), True


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
    if cfg.split > 1 and (DH, dd, cfg) in _TOO_BIG:
        cfg = _tiled(DH)
    if cfg.split > 1:
        NBT, GB, sync = _split_grid(B, S, NH, cfg, x.device)
        cnt = torch.zeros(GB * NH, dtype=torch.int32, device=x.device) if sync else h
        common = dict(DH=DH, BB=cfg.block_b, BJ=DH // cfg.split, HAS_RESET=resets is not None, SAVE_G=save,
                      LIMIT=_SPIN_LIMIT, IP=_ip(dd), UP=up, num_warps=cfg.num_warps)
        grid = (GB, NH, cfg.split)
        args = (x, Rd, bf, rst, st, h, G, cnt, B, S, NS, NH, NBT)
        try:
            if sync:
                _fwd_split_kernel[grid](*args, 0, S, SYNC=True, **common)
            else:
                for t in range(S):
                    _fwd_split_kernel[grid](*args, t, t + 1, SYNC=False, **common)
        except triton.runtime.errors.OutOfResources:  # raised at the first launch, before any work was done
            _TOO_BIG.add((DH, dd, cfg))
            return slstm_forward(x, R, b, st, resets, save, _tiled(DH))
        return h, (G if save else None)
    grid = (cdiv(B, cfg.block_b), NH)
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
    if cfg.split > 1 and (DH, dd, cfg) in _TOO_BIG:
        cfg = _tiled(DH)
    if cfg.split > 1:
        NBT, GB, sync = _split_grid(B, S, NH, cfg, G.device)
        cnt = torch.zeros(GB * NH, dtype=torch.int32, device=G.device) if sync else cr
        common = dict(DH=DH, BB=cfg.block_b, BJ=DH // cfg.split, HAS_RESET=resets is not None, HAS_DH=gh is not None,
                      LIMIT=_SPIN_LIMIT, IP=_ip(dd), UP=up, num_warps=cfg.num_warps)
        grid = (GB, NH, cfg.split)
        args = (G, st, rst, RT, gh_arg, dG, cr, cnt, B, S, NH, NBT)
        try:
            if sync:
                _bwd_split_kernel[grid](*args, 0, S, PHASES=3, SYNC=True, **common)
            else:
                for tt in range(S):
                    _bwd_split_kernel[grid](*args, tt, tt + 1, PHASES=1, SYNC=False, **common)
                    _bwd_split_kernel[grid](*args, tt, tt + 1, PHASES=2, SYNC=False, **common)
        except triton.runtime.errors.OutOfResources:  # raised at the first launch, before any work was done
            _TOO_BIG.add((DH, dd, cfg))
            return slstm_backward(G, st, resets, R, x_dtype, gh, gc, gn, ghl, _tiled(DH))
        return dG, cr[0], cr[1], cr[3]
    grid = (cdiv(B, cfg.block_b), NH)
    _bwd_kernel[grid](G, st, rst, RT, gh_arg, dG, cr, B, S, NH, DH=DH, BB=cfg.block_b, BJ=cfg.block_j,
                      BK=cfg.block_k, HAS_RESET=resets is not None, HAS_DH=gh is not None, IP=_ip(dd), UP=up,
                      num_warps=cfg.num_warps)
    return dG, cr[0], cr[1], cr[3]
