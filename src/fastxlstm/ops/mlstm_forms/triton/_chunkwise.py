"""Chunkwise mLSTM forward and backward in Triton (written from docs/MATH.md section 1).

Layout of the computation (per batch*head "bh", chunk length L, a constexpr independent of S):

    K0 _scalars   grid (NC, BH): per-chunk gate scalars in a padded (BH, NC*L) layout:
                  b = in-chunk cumsum of log sigmoid(f), a = i - b (-inf on padding), seg = in-chunk count of
                  resets, Mloc = segmented running max of a (a reset at r starts a new segment whose first value
                  also includes -b_{r-1}, the stabiliser term of the fresh state m = 0).
    K1 _fwd_state grid (DQK/BK, DV/BV, BH): the sequential recurrence over chunks; writes each chunk's incoming
                  state (C, n, m) to Cbuf/nbuf/mbuf and the final state.
    K2 _fwd_out   grid (NC*L/BT, DV/BV, BH): outputs, tiled inside the chunk (BT x BT causal tiles), the
                  incoming state added as q C_prev.

With m_prev the stabiliser entering a chunk, the stabiliser at t is m_t = b_t + M_t with
M_t = max(m_prev, Mloc_t) where no reset happened since the chunk start (seg_t = 0), else Mloc_t. This is exactly
the recurrent max m_t = max(log f_t + m_{t-1}, i_t) of the reference, unrolled. The decay weights are then
D_tj = exp(a_j - M_t) (same segment, j <= t) and the incoming-state weight exp(m_prev - M_t) (seg_t = 0): both
<= 1, so nothing overflows and a reset never forms -inf - -inf.

The backward uses the same pieces: a reverse recurrence for the state gradients (dC, dn at chunk ends), then
three parallel kernels for dq, dk, dv. The stabiliser is a constant for autograd (it gets no gradient), so the gate
gradients follow from the identities di_j = k_j . dk_j and
d log f_t = sum_{u >= t} (q_u . dq_u - k_u . dk_u) + <dC_S, C_S> + <dn_S, n_S>, which are formed in PyTorch from
per-token dot products written by the kernels (fp32), with the reverse cumsum in float64.

Layouts: q, k, v, h, dh, dq, dk, dv are addressed through their (batch, head, token) strides with a contiguous
last dim (int64 per-chunk bases, int32 offsets inside a chunk), so the layers' (B, S, NH, D) projections seen as
(B, NH, S, D) are read in place and kept for the backward as they are; h, dq, dk, dv are written in the layout of
v, q, k, v. Memory: with ``recompute_states`` the forward drops the chunk states (K1's Cbuf/nbuf/mbuf) and the
backward runs K1 again from k, v, the gate scalars and the initial state (the same kernel on the same data:
bit-identical states).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..._intmath import cdiv, next_pow2


@dataclass(frozen=True)
class MLSTMTritonConfig:
    """Tiling of the chunkwise kernels. ``chunk`` is the chunk length L (state stored every L tokens), ``block_t``
    the token tile inside a chunk (L must be a multiple), ``block_k``/``block_v`` the head-dim tiles.

    ``recompute_states``: whether the backward recomputes the per-chunk states (C, n, m at every chunk start: B*NH
    x S/L x DQK x DV values in q's dtype) by running the forward state kernel again, instead of keeping them from
    the forward (memory: 512 MB per call at 16k tokens, 4 heads, DQK = DV = 512, L = 64). Both give bit-identical
    results (the same kernel on the same inputs). None (the default): :func:`recompute_default`."""

    chunk: int = 128
    block_t: int = 64
    block_k: int = 128
    block_v: int = 128
    block_k_state: int = 64
    block_v_state: int = 64
    num_warps: int = 4
    num_stages: int = 2
    num_warps_state: int = 4
    num_stages_state: int = 2
    recompute_states: Optional[bool] = None

    def __post_init__(self):
        for name in ("chunk", "block_t", "block_k", "block_v", "block_k_state", "block_v_state"):
            val = getattr(self, name)
            if val < 16 or val & (val - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {val}")
        if self.chunk % self.block_t:
            raise ValueError(f"chunk ({self.chunk}) must be a multiple of block_t ({self.block_t})")
        if self.recompute_states not in (None, True, False):
            raise ValueError(f"recompute_states must be None, True or False, got {self.recompute_states!r}")


RECOMPUTE_ENV = "FASTXLSTM_MLSTM_RECOMPUTE"


def recompute_default(DQK: int, DV: int) -> bool:
    """Whether the backward recomputes the chunk states when the config does not say (recompute_states=None).

    The environment variable FASTXLSTM_MLSTM_RECOMPUTE=1 (always recompute) or =0 (always keep them) decides when
    set; otherwise: recompute when one chunk state is large, DQK * DV >= 256 * 256. There the states are most of
    the cell's memory (DQK * DV values per chunk of L tokens, against (2 DQK + 2 DV) L for q, k, v, h) and the state
    kernel a small share of the backward's time; smaller heads keep them."""
    env = os.environ.get(RECOMPUTE_ENV, "").strip()
    if env:
        if env not in ("0", "1"):
            raise ValueError(f"{RECOMPUTE_ENV} must be 0 or 1, got {env!r}")
        return env == "1"
    return DQK * DV >= 256 * 256


CHUNK_ENV = "FASTXLSTM_MLSTM_CHUNK"


def auto_tiling(BH: int, S: int, DQK: int, DV: int, n_sm: int) -> Tuple[int, Optional[int]]:
    """(chunk length, state tile width or None for the default) for B * NH = BH sequences of S tokens on a GPU with
    n_sm SMs: what the default chunk_size 64 means on CUDA (``FASTXLSTM_MLSTM_CHUNK=N`` fixes N instead).

    The two state kernels walk the chunks one after another, one program per (batch x head, state tile); each
    chunk step costs a few microseconds of load latency whatever its length. Measured on an H200
    (benchmarks/sweep_mlstm_chunk.py, forward + backward, 16k tokens per call): heads of 128 / 256 with enough
    programs to fill the GPU (BH x tiles >= n_sm / 2, e.g. batch 8 at 2k) are fastest with chunks of 64 (the
    in-chunk kernels grow with L); with few programs (batch 1-2 at 8k-16k) chunks of 128 with state tiles 32 wide
    (twice the programs) were 10-30% faster in two runs (256 was faster in one run and slower in the other); large
    heads (DQK * DV >= 256 * 256, the 350m's 512 / 512) were ~9% faster with 128 at every context. Never longer
    than the sequence (rounded up to a power of two), never below 64. For 16-bit inputs only (the callers apply it
    to them): float32 tiles need twice the shared memory, and 128 / 256 ran out of it on an H200."""
    bvs = None
    if DQK * DV >= 256 * 256:
        L = 128
    else:
        bk = min(_pow2_at_least16(DQK), 128)
        programs = BH * cdiv(DQK, bk) * cdiv(DV, 64)
        if 2 * programs >= n_sm:
            L = 64
        else:
            L, bvs = 128, 32
    L = max(64, min(L, next_pow2(max(int(S), 1))))
    return L, bvs


def tiling_for(chunk_size: Optional[int], q: torch.Tensor, DV: int) -> Tuple[int, Optional[int]]:
    """(chunk length, state tile width or None) the Triton path runs: ``FASTXLSTM_MLSTM_CHUNK`` (an int, or
    "auto") when set; otherwise an explicit chunk_size other than the default 64 as given; the default (64 or
    None) for 16-bit inputs on CUDA by :func:`auto_tiling`, otherwise (float32, the CPU interpreter) 64."""
    env = os.environ.get(CHUNK_ENV, "").strip().lower()
    if env and env != "auto":
        try:
            val = int(env)
        except ValueError:
            val = -1
        if val not in (16, 32, 64, 128, 256):
            raise ValueError(f"{CHUNK_ENV} must be auto or one of 16, 32, 64, 128, 256, got {env!r}")
        return val, None
    if chunk_size not in (None, 64) and env != "auto":
        return int(chunk_size), None
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and os.environ.get("TRITON_INTERPRET", "0") != "1":
        B, NH, S, DQK = q.shape
        return auto_tiling(B * NH, S, DQK, DV, _sm_count(q.device))
    return 64, None


def with_state_tile(cfg: MLSTMTritonConfig, block_v_state: Optional[int]) -> MLSTMTritonConfig:
    """cfg with the state kernels' DV tile narrowed to block_v_state (None, or not narrower: cfg as it is)."""
    if block_v_state is None or block_v_state >= cfg.block_v_state:
        return cfg
    return replace(cfg, block_v_state=block_v_state)


_SM_COUNT = {}


def _sm_count(device) -> int:
    key = (device.type, device.index)
    if key not in _SM_COUNT:
        _SM_COUNT[key] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[key]


def _pow2_at_least16(x: int) -> int:
    return max(16, next_pow2(int(x)))


def default_config(DQK: int, DV: int, chunk: int = 64, recompute_states: Optional[bool] = None) -> MLSTMTritonConfig:
    """The tuned tiling for head dims (DQK, DV) and chunk length ``chunk`` (a power of two >= 16; the token tile
    is min(64, chunk)). ``recompute_states`` None takes :func:`recompute_default` (the environment variable
    FASTXLSTM_MLSTM_RECOMPUTE=0/1, else recompute for DQK * DV >= 256 * 256)."""
    bk = min(_pow2_at_least16(DQK), 128)
    bv = min(_pow2_at_least16(DV), 128)
    if recompute_states is None:
        recompute_states = recompute_default(DQK, DV)
    # state tiles: 128 x 64 (DQK x DV); large heads (DQK * DV >= 256^2, the 350m's 512 x 512) 64 x 128, the same
    # tile area: the cell's forward + backward 2.58 / 2.70 / 3.41 ms against 3.11 / 3.23 / 4.28 at B x S = 8 x 2k /
    # 2 x 8k / 1 x 16k, chunk 128, bf16 (H200, benchmarks/sweep_mlstm_chunk.py; of 10 tilings the best or within 4%)
    ks, vs = (min(bk, 64), min(bv, 128)) if DQK * DV >= 256 * 256 else (bk, min(bv, 64))
    return MLSTMTritonConfig(chunk=chunk, block_t=min(64, chunk), block_k=bk, block_v=bv,
                             block_k_state=ks, block_v_state=vs, num_warps=4,
                             recompute_states=recompute_states)


# ------------------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------------------

@triton.jit
def _dot(a, b, IP: tl.constexpr, UP: tl.constexpr):
    # UP: the CPU interpreter multiplies bfloat16 blocks as raw integers (its bf16 storage), so there the operands
    # (already rounded to bf16) are widened to fp32 first: the same products, just not on tensor cores
    if UP:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=IP)


@triton.jit
def _r16(x, dt: tl.constexpr, UP: tl.constexpr):
    """fp32 -> dt (a 16-bit type: a dot operand or a stored result), rounding to nearest even. The CPU
    interpreter's conversion to bfloat16 truncates (twice the error, and biased), so there (UP) bfloat16 is rounded
    on the bits first: the interpreter tests then see the GPU's rounding errors, not larger ones."""
    if UP:
        if dt == tl.bfloat16:
            b = x.to(tl.uint32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
            x = b.to(tl.float32, bitcast=True)
    return x.to(dt)


@triton.jit
def _segmax_combine(v1, f1, v2, f2):
    # segmented running max: a flagged element starts a new segment
    return tl.where(f2 > 0, v2, tl.maximum(v1, v2)), tl.maximum(f1, f2)


@triton.jit
def _split2(x, ok):
    """float64 -> (hi, lo) fp32 pair with hi + lo = x to ~2^-48 relative (lo = 0 where not ok, e.g. at -inf)."""
    hi = x.to(tl.float32)
    lo = (tl.where(ok, x, 0.0) - tl.where(ok, hi, 0.0).to(tl.float64)).to(tl.float32)
    return hi, lo


@triton.jit
def _pair_max(m_prev, hi, lo):
    """max(m_prev, hi + lo) as a pair (m_prev is a plain fp32): compared on hi, which decides up to one ulp."""
    use = m_prev > hi
    return tl.where(use, m_prev, hi), tl.where(use, 0.0, lo)


@triton.jit
def _hbase(bh, NH, s_b, s_h):
    """Offset (int64: bh is) of head bh = b * NH + head in a (B, NH, S, D) tensor with batch / head strides s_b, s_h.
    q, k, v, h, dh, dq, dk, dv are addressed as base + token * s_t + d (the last dim contiguous): any layout whose
    last dim is contiguous, e.g. the (B, S, NH, D) projections seen as (B, NH, S, D), is read and written in place.
    Offsets inside a chunk stay int32 (the launcher copies a tensor whose 2 L * s_t would not fit)."""
    return (bh // NH) * s_b + (bh % NH) * s_h


@triton.jit(do_not_specialize=["S", "NC"])
def _scalars_kernel(f_ptr, i_ptr, r_ptr, b_ptr, a_ptr, seg_ptr, M_ptr, bl_ptr, al_ptr, Ml_ptr, S, NC, NH,
                    HAS_RESET: tl.constexpr, L: tl.constexpr):
    c = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    t = c * L + tl.arange(0, L)
    valid = t < S
    f = tl.load(f_ptr + bh * S + t, mask=valid, other=0.0).to(tl.float32)
    ig = tl.load(i_ptr + bh * S + t, mask=valid, other=0.0).to(tl.float32)
    # log sigmoid(f), stable for both signs
    lf = tl.minimum(f, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(f)))
    lf = tl.where(valid, lf, 0.0).to(tl.float64)
    # float64 sums, kept as (hi, lo) fp32 pairs: a and M reach |sum log f| over the chunk (1e5 and more for very
    # negative forget pre-activations) while the kernels need their O(1) differences a_j - M_t and m_t = b_t + M_t;
    # one fp32 each lost ulp(|b|) of those (h errors up to 1e-2, see benchmarks/NOTES.md "Large negative f")
    b = tl.cumsum(lf, 0)
    if HAS_RESET:
        rst = tl.load(r_ptr + (bh // NH) * S + t, mask=valid, other=0).to(tl.int32)
    else:
        rst = tl.zeros([L], dtype=tl.int32)
    seg = tl.cumsum(rst, 0)
    a = tl.where(valid, ig.to(tl.float64) - b, float("-inf"))
    e = tl.where(rst > 0, tl.maximum(a, lf - b), a)
    Mloc, _ = tl.associative_scan((e, rst), 0, _segmax_combine)
    o = bh * NC * L + t
    bh_, bl_ = _split2(b, t >= 0)
    ah_, al_ = _split2(a, valid)
    Mh_, Ml_ = _split2(Mloc, Mloc > float("-inf"))
    tl.store(b_ptr + o, bh_)
    tl.store(bl_ptr + o, bl_)
    tl.store(a_ptr + o, ah_)
    tl.store(al_ptr + o, al_)
    tl.store(seg_ptr + o, seg)
    tl.store(M_ptr + o, Mh_)
    tl.store(Ml_ptr + o, Ml_)


@triton.jit(do_not_specialize=["S", "NC"])
def _fwd_state_kernel(k_ptr, v_ptr, b_ptr, a_ptr, seg_ptr, M_ptr, bl_ptr, al_ptr, Ml_ptr, C0_ptr, n0_ptr, m0_ptr,
                      Cbuf_ptr, nbuf_ptr, mbuf_ptr, Cout_ptr, nout_ptr, mout_ptr, S, NC, NH,
                      k_sb, k_sh, k_st, v_sb, v_sh, v_st,
                      DQK: tl.constexpr, DV: tl.constexpr, HAS_STATE: tl.constexpr, L: tl.constexpr,
                      BK: tl.constexpr, BV: tl.constexpr, IP: tl.constexpr, UP: tl.constexpr):
    pk = tl.program_id(0)
    pv = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    dk = pk * BK + tl.arange(0, BK)
    dv = pv * BV + tl.arange(0, BV)
    mk = dk < DQK
    mv = dv < DV
    cofs = dk[:, None] * DV + dv[None, :]
    cmask = mk[:, None] & mv[None, :]
    if HAS_STATE:
        C = tl.load(C0_ptr + bh * DQK * DV + cofs, mask=cmask, other=0.0).to(tl.float32)
        n = tl.load(n0_ptr + bh * DQK + dk, mask=mk, other=0.0).to(tl.float32)
        m = tl.load(m0_ptr + bh).to(tl.float32)
    else:
        C = tl.zeros([BK, BV], dtype=tl.float32)
        n = tl.zeros([BK], dtype=tl.float32)
        m = tl.sum(tl.zeros([1], dtype=tl.float32), 0)
    tt = tl.arange(0, L)
    kh = _hbase(bh, NH, k_sb, k_sh)
    vh = _hbase(bh, NH, v_sb, v_sh)
    for c in range(0, NC):
        sbase = (bh * NC + c) * DQK * DV
        tl.store(Cbuf_ptr + sbase + cofs, _r16(C, Cbuf_ptr.dtype.element_ty, UP), mask=cmask)
        if pv == 0:
            tl.store(nbuf_ptr + (bh * NC + c) * DQK + dk, n, mask=mk)
        if (pv == 0) & (pk == 0):
            tl.store(mbuf_ptr + bh * NC + c, m)
        so = bh * NC * L + c * L
        segL = tl.load(seg_ptr + so + L - 1)
        MLh, MLl = _chunk_end_stab(seg_ptr, M_ptr, Ml_ptr, so, m, L)
        G = tl.where(segL == 0, tl.exp((m - MLh) - MLl), 0.0)
        a = tl.load(a_ptr + so + tt)
        al = tl.load(al_ptr + so + tt)
        seg = tl.load(seg_ptr + so + tt)
        w = tl.exp(tl.where(seg == segL, (a - MLh) + (al - MLl), float("-inf")))
        t = c * L + tt
        mt = t < S
        t0 = tl.cast(c, tl.int64) * L
        # a 64-bit chunk base + int32 in-chunk offsets (64-bit offsets everywhere spilled: 936 against 312 bytes
        # with a 64-bit base, ptxas sm_90)
        kk = tl.load(k_ptr + (kh + t0 * k_st) + (tt[:, None] * k_st + dk[None, :]), mask=mt[:, None] & mk[None, :],
                     other=0.0)
        vv = tl.load(v_ptr + (vh + t0 * v_st) + (tt[:, None] * v_st + dv[None, :]), mask=mt[:, None] & mv[None, :],
                     other=0.0)
        kw = kk.to(tl.float32) * w[:, None]
        # 16-bit operands (the gate-weighted keys rounded once): fp32/tf32 operands here measured 1.7x slower
        C = G * C + _dot(tl.trans(_r16(kw, vv.dtype, UP)), vv, IP, UP)
        n = G * n + tl.sum(kw, 0)
        m = (tl.load(b_ptr + so + L - 1) + MLh) + (tl.load(bl_ptr + so + L - 1) + MLl)
    tl.store(Cout_ptr + bh * DQK * DV + cofs, C, mask=cmask)
    if pv == 0:
        tl.store(nout_ptr + bh * DQK + dk, n, mask=mk)
    if (pv == 0) & (pk == 0):
        tl.store(mout_ptr + bh, m)


@triton.jit
def _chunk_end_stab(seg_ptr, M_ptr, Ml_ptr, so, m_prev, L: tl.constexpr):
    """The stabiliser M_L at the chunk's last token as a (hi, lo) pair: max(m_prev, Mloc_L) without a reset in
    the chunk, else Mloc_L."""
    segL = tl.load(seg_ptr + so + L - 1)
    h0 = tl.load(M_ptr + so + L - 1)
    l0 = tl.load(Ml_ptr + so + L - 1)
    Mh, Ml = _pair_max(m_prev, h0, l0)
    return tl.where(segL == 0, Mh, h0), tl.where(segL == 0, Ml, l0)


@triton.jit
def _row_stab(b_ptr, seg_ptr, M_ptr, bl_ptr, Ml_ptr, so, rr, m_prev):
    """Per-row stabiliser pieces for in-chunk rows rr: (M_t as a (hi, lo) pair, seg_t, state weight
    exp(m_prev - M_t) or 0, m_t = b_t + M_t). The pairs make a_j - M_t and b_t + M_t exact to fp32 rounding of
    the result, whatever the size of the chunk's log-forget sum (see _scalars_kernel)."""
    seg = tl.load(seg_ptr + so + rr)
    Mh0 = tl.load(M_ptr + so + rr)
    Ml0 = tl.load(Ml_ptr + so + rr)
    Mh, Ml = _pair_max(m_prev, Mh0, Ml0)
    Mh = tl.where(seg == 0, Mh, Mh0)
    Ml = tl.where(seg == 0, Ml, Ml0)
    st = tl.where(seg == 0, tl.exp((m_prev - Mh) - Ml), 0.0)
    mt = (tl.load(b_ptr + so + rr) + Mh) + (tl.load(bl_ptr + so + rr) + Ml)
    return Mh, Ml, seg, st, mt


@triton.jit
def _decay(a_ptr, al_ptr, seg_ptr, so, rk, Mh, Ml, seg, rq):
    """The decay tile D[t, j] = exp(a_j - M_t) (rows rq, columns rk; 0 outside j <= t in one segment)."""
    a = tl.load(a_ptr + so + rk)
    al = tl.load(al_ptr + so + rk)
    segk = tl.load(seg_ptr + so + rk)
    keep = (rk[None, :] <= rq[:, None]) & (segk[None, :] == seg[:, None])
    return tl.exp(tl.where(keep, (a[None, :] - Mh[:, None]) + (al[None, :] - Ml[:, None]), float("-inf")))


@triton.jit
def _decay_T(a_ptr, al_ptr, seg_ptr, so, rk, Mh, Ml, seg, rq):
    """The transposed decay tile D^T[j, t] (rows rk, columns rq), formed directly (no register transpose)."""
    a = tl.load(a_ptr + so + rk)
    al = tl.load(al_ptr + so + rk)
    segk = tl.load(seg_ptr + so + rk)
    keep = (rk[:, None] <= rq[None, :]) & (segk[:, None] == seg[None, :])
    return tl.exp(tl.where(keep, (a[:, None] - Mh[None, :]) + (al[:, None] - Ml[None, :]), float("-inf")))


@triton.jit(do_not_specialize=["S", "NC"])
def _fwd_out_kernel(q_ptr, k_ptr, v_ptr, b_ptr, a_ptr, seg_ptr, M_ptr, bl_ptr, al_ptr, Ml_ptr,
                    Cbuf_ptr, nbuf_ptr, mbuf_ptr,
                    h_ptr, den_ptr, mo_ptr, S, NC, NH, scale, eps,
                    q_sb, q_sh, q_st, k_sb, k_sh, k_st, v_sb, v_sh, v_st, h_sb, h_sh, h_st,
                    DQK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr, BT: tl.constexpr,
                    BK: tl.constexpr, BV: tl.constexpr, IP: tl.constexpr, UP: tl.constexpr):
    NQ: tl.constexpr = L // BT
    pid = tl.program_id(0)
    pv = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    c = pid // NQ
    qi = pid % NQ
    so = bh * NC * L + c * L
    rq = qi * BT + tl.arange(0, BT)
    tq = c * L + rq
    mq = tq < S
    dv = pv * BV + tl.arange(0, BV)
    mv = dv < DV
    t0 = tl.cast(c, tl.int64) * L
    qb = _hbase(bh, NH, q_sb, q_sh) + t0 * q_st
    kb = _hbase(bh, NH, k_sb, k_sh) + t0 * k_st
    vb = _hbase(bh, NH, v_sb, v_sh) + t0 * v_st
    m_prev = tl.load(mbuf_ptr + bh * NC + c)
    Mh, Ml, seg, st, mt = _row_stab(b_ptr, seg_ptr, M_ptr, bl_ptr, Ml_ptr, so, rq, m_prev)
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    den = tl.zeros([BT], dtype=tl.float32)
    sbase = (bh * NC + c) * DQK * DV
    for k0 in range(0, DQK, BK):
        dk = k0 + tl.arange(0, BK)
        mk = dk < DQK
        qq = tl.load(q_ptr + qb + (rq[:, None] * q_st + dk[None, :]), mask=mq[:, None] & mk[None, :], other=0.0)
        Cb = tl.load(Cbuf_ptr + sbase + dk[:, None] * DV + dv[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
        acc += _dot(qq, Cb.to(qq.dtype), IP, UP)
        nb = tl.load(nbuf_ptr + (bh * NC + c) * DQK + dk, mask=mk, other=0.0)
        den += tl.sum(qq.to(tl.float32) * nb[None, :], 1)
    acc = acc * (st * scale)[:, None]
    den = den * (st * scale)
    for kj in range(0, qi + 1):
        rk = kj * BT + tl.arange(0, BT)
        tk = c * L + rk
        mkv = tk < S
        s = tl.zeros([BT, BT], dtype=tl.float32)
        for k0 in range(0, DQK, BK):
            dk = k0 + tl.arange(0, BK)
            mk = dk < DQK
            qq = tl.load(q_ptr + qb + (rq[:, None] * q_st + dk[None, :]), mask=mq[:, None] & mk[None, :],
                         other=0.0)
            kk = tl.load(k_ptr + kb + (rk[:, None] * k_st + dk[None, :]), mask=mkv[:, None] & mk[None, :],
                         other=0.0)
            s += _dot(qq, tl.trans(kk), IP, UP)
        D = _decay(a_ptr, al_ptr, seg_ptr, so, rk, Mh, Ml, seg, rq)
        P = s * D * scale
        den += tl.sum(P, 1)
        vv = tl.load(v_ptr + vb + (rk[:, None] * v_st + dv[None, :]), mask=mkv[:, None] & mv[None, :], other=0.0)
        acc += _dot(_r16(P, vv.dtype, UP), vv, IP, UP)
    Z = tl.maximum(tl.abs(den), tl.maximum(tl.exp(-mt), 1.1754943508222875e-38)) + eps  # floor: see exp_floor
    hh = acc / Z[:, None]
    hb = _hbase(bh, NH, h_sb, h_sh) + t0 * h_st
    tl.store(h_ptr + hb + (rq[:, None] * h_st + dv[None, :]), _r16(hh, h_ptr.dtype.element_ty, UP),
             mask=mq[:, None] & mv[None, :])
    if pv == 0:
        tl.store(den_ptr + bh * S + tq, den, mask=mq)
        tl.store(mo_ptr + bh * S + tq, mt, mask=mq)


@triton.jit(do_not_specialize=["S"])
def _bwd_prep_kernel(h_ptr, dh_ptr, den_ptr, m_ptr, rz_ptr, dd_ptr, S, NH, eps,
                     h_sb, h_sh, h_st, dh_sb, dh_sh, dh_st,
                     DV: tl.constexpr, BR: tl.constexpr, BV: tl.constexpr):
    # per token: rz = 1 / Z with Z = max(|den|, exp(-m)) + eps, and dden = -(dh . h) / Z on the |den| branch
    # (m is a constant for autograd, so the exp(-m) branch passes no gradient). Grid (S / BR, BH)
    bh = tl.program_id(1).to(tl.int64)
    t = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    mr = t < S
    rows = bh * S + t
    hrow = _hbase(bh, NH, h_sb, h_sh) + t * h_st
    grow = _hbase(bh, NH, dh_sb, dh_sh) + t * dh_st
    acc = tl.zeros([BR], dtype=tl.float32)
    for v0 in range(0, DV, BV):
        dv = v0 + tl.arange(0, BV)
        msk = mr[:, None] & (dv < DV)[None, :]
        hh = tl.load(h_ptr + hrow[:, None] + dv[None, :], mask=msk, other=0.0).to(tl.float32)
        gg = tl.load(dh_ptr + grow[:, None] + dv[None, :], mask=msk, other=0.0).to(tl.float32)
        acc += tl.sum(hh * gg, 1)
    den = tl.load(den_ptr + rows, mask=mr, other=1.0)
    mt = tl.load(m_ptr + rows, mask=mr, other=0.0)
    floor = tl.maximum(tl.exp(-mt), 1.1754943508222875e-38)  # see exp_floor (ops/_checks.py)
    rz = 1.0 / (tl.maximum(tl.abs(den), floor) + eps)
    sgn = tl.where(den > 0, 1.0, tl.where(den < 0, -1.0, 0.0))
    dd = tl.where(tl.abs(den) > floor, -acc * rz * sgn, 0.0)
    tl.store(rz_ptr + rows, rz, mask=mr)
    tl.store(dd_ptr + rows, dd, mask=mr)


@triton.jit(do_not_specialize=["S", "NC"])
def _bwd_state_kernel(q_ptr, dh_ptr, rz_ptr, dd_ptr, seg_ptr, M_ptr, Ml_ptr, mbuf_ptr, dCT_ptr, dnT_ptr,
                      dCbuf_ptr, dnbuf_ptr, dC0_ptr, dn0_ptr, Cbuf_ptr, nbuf_ptr, E_ptr,
                      S, NC, BH, NH, scale, q_sb, q_sh, q_st, dh_sb, dh_sh, dh_st,
                      DQK: tl.constexpr, DV: tl.constexpr, HAS_DSTATE: tl.constexpr, L: tl.constexpr,
                      BK: tl.constexpr, BV: tl.constexpr, IP: tl.constexpr, UP: tl.constexpr):
    pk = tl.program_id(0)
    pv = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    dk = pk * BK + tl.arange(0, BK)
    dv = pv * BV + tl.arange(0, BV)
    mk = dk < DQK
    mv = dv < DV
    cofs = dk[:, None] * DV + dv[None, :]
    cmask = mk[:, None] & mv[None, :]
    if HAS_DSTATE:
        dC = tl.load(dCT_ptr + bh * DQK * DV + cofs, mask=cmask, other=0.0).to(tl.float32)
        dn = tl.load(dnT_ptr + bh * DQK + dk, mask=mk, other=0.0).to(tl.float32)
    else:
        dC = tl.zeros([BK, BV], dtype=tl.float32)
        dn = tl.zeros([BK], dtype=tl.float32)
    tt = tl.arange(0, L)
    qh = _hbase(bh, NH, q_sb, q_sh)
    gh = _hbase(bh, NH, dh_sb, dh_sh)
    for cc in range(0, NC):
        c = NC - 1 - cc
        tl.store(dCbuf_ptr + (bh * NC + c) * DQK * DV + cofs, _r16(dC, dCbuf_ptr.dtype.element_ty, UP), mask=cmask)
        if pv == 0:
            tl.store(dnbuf_ptr + (bh * NC + c) * DQK + dk, dn, mask=mk)
        so = bh * NC * L + c * L
        m_prev = tl.load(mbuf_ptr + bh * NC + c)
        segL = tl.load(seg_ptr + so + L - 1)
        MLh, MLl = _chunk_end_stab(seg_ptr, M_ptr, Ml_ptr, so, m_prev, L)
        G = tl.where(segL == 0, tl.exp((m_prev - MLh) - MLl), 0.0)
        # Eg_c = G_c (<dC_c, C_{c-1}> + <dn_c, n_{c-1}>): the part of d(chunk-end log-gate sum) that comes from
        # the incoming state (the in-chunk part is summed per token from k . dk_inter, see _backward)
        Cp = tl.load(Cbuf_ptr + (bh * NC + c) * DQK * DV + cofs, mask=cmask, other=0.0).to(tl.float32)
        e = tl.sum(tl.sum(dC * Cp, 1), 0)
        if pv == 0:
            e += tl.sum(dn * tl.load(nbuf_ptr + (bh * NC + c) * DQK + dk, mask=mk, other=0.0), 0)
        tl.store(E_ptr + ((pk * tl.num_programs(1) + pv) * BH + bh) * NC + c, G * e)
        seg = tl.load(seg_ptr + so + tt)
        Mth, Mtl = _pair_max(m_prev, tl.load(M_ptr + so + tt), tl.load(Ml_ptr + so + tt))
        st = tl.where(seg == 0, tl.exp((m_prev - Mth) - Mtl), 0.0) * scale
        t = c * L + tt
        mt = t < S
        t0 = tl.cast(c, tl.int64) * L
        qq = tl.load(q_ptr + (qh + t0 * q_st) + (tt[:, None] * q_st + dk[None, :]), mask=mt[:, None] & mk[None, :],
                     other=0.0)
        dh = tl.load(dh_ptr + (gh + t0 * dh_st) + (tt[:, None] * dh_st + dv[None, :]),
                     mask=mt[:, None] & mv[None, :], other=0.0)
        rz = tl.load(rz_ptr + bh * S + t, mask=mt, other=0.0)
        dd = tl.load(dd_ptr + bh * S + t, mask=mt, other=0.0)
        dnum = dh.to(tl.float32) * (rz * st)[:, None]
        dC = G * dC + _dot(tl.trans(qq), _r16(dnum, qq.dtype, UP), IP, UP)
        dn = G * dn + tl.sum(qq.to(tl.float32) * (st * dd)[:, None], 0)
    tl.store(dC0_ptr + bh * DQK * DV + cofs, dC, mask=cmask)
    if pv == 0:
        tl.store(dn0_ptr + bh * DQK + dk, dn, mask=mk)


@triton.jit
def _col_weights(a_ptr, al_ptr, seg_ptr, M_ptr, Ml_ptr, so, rk, m_prev, L: tl.constexpr):
    """Weights of in-chunk columns rk in the chunk's outgoing state: exp(a_j - M_L) in the last segment."""
    segL = tl.load(seg_ptr + so + L - 1)
    MLh, MLl = _chunk_end_stab(seg_ptr, M_ptr, Ml_ptr, so, m_prev, L)
    a = tl.load(a_ptr + so + rk)
    al = tl.load(al_ptr + so + rk)
    segk = tl.load(seg_ptr + so + rk)
    w = tl.exp(tl.where(segk == segL, (a - MLh) + (al - MLl), float("-inf")))
    return w


@triton.jit
def _acc_dot(acc, X, B, dt: tl.constexpr, IP: tl.constexpr, UP: tl.constexpr, SPLIT: tl.constexpr):
    """acc += X @ B with the fp32 tile X rounded to B's dtype; SPLIT: its rounding error as a second 16-bit
    operand, one more dot (see _backward)."""
    Xh = _r16(X, dt, UP)
    acc += _dot(Xh, B, IP, UP)
    if SPLIT:
        acc += _dot(_r16(X - Xh.to(tl.float32), dt, UP), B, IP, UP)
    return acc


@triton.jit
def _split_diag(X, rr, rc):
    """(X without its diagonal, the diagonal as a vector over rows): the tile's entries with rr == rc."""
    diag = rr[:, None] == rc[None, :]
    return tl.where(diag, 0.0, X), tl.sum(tl.where(diag, X, 0.0), 1)


@triton.jit
def _dq_tile(v_ptr, dh_ptr, vb, gb, v_st, dh_st, a_ptr, al_ptr, seg_ptr, so, c, kj, rq, mq, Mh, Ml, seg, rz, dd, S,
             DV: tl.constexpr, L: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, IP: tl.constexpr,
             UP: tl.constexpr):
    """X = dP * D for the query rows rq and key tile kj (dP = dh v^T / Z + d den); with the key rows and mask.
    vb, gb: the chunk's bases in v and dh."""
    rk = kj * BT + tl.arange(0, BT)
    tk = c * L + rk
    mkv = tk < S
    dP = tl.zeros([BT, BT], dtype=tl.float32)
    for v0 in range(0, DV, BV):
        dv = v0 + tl.arange(0, BV)
        mv = dv < DV
        dh = tl.load(dh_ptr + gb + (rq[:, None] * dh_st + dv[None, :]), mask=mq[:, None] & mv[None, :], other=0.0)
        vv = tl.load(v_ptr + vb + (rk[:, None] * v_st + dv[None, :]), mask=mkv[:, None] & mv[None, :], other=0.0)
        dP += _dot(dh, tl.trans(vv), IP, UP)
    dP = dP * rz[:, None] + dd[:, None]
    return dP * _decay(a_ptr, al_ptr, seg_ptr, so, rk, Mh, Ml, seg, rq), rk, mkv


@triton.jit(do_not_specialize=["S", "NC"])
def _bwd_dq_kernel(q_ptr, k_ptr, v_ptr, dh_ptr, rz_ptr, dd_ptr, b_ptr, a_ptr, seg_ptr, M_ptr, bl_ptr, al_ptr, Ml_ptr,
                   Cbuf_ptr, nbuf_ptr, mbuf_ptr, dq_ptr, qdq_ptr, S, NC, BH, NH, scale,
                   q_sb, q_sh, q_st, k_sb, k_sh, k_st, v_sb, v_sh, v_st, dh_sb, dh_sh, dh_st, dq_sb, dq_sh, dq_st,
                   DQK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr, BT: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr, IP: tl.constexpr, UP: tl.constexpr,
                   SPLIT: tl.constexpr):
    NQ: tl.constexpr = L // BT
    pid = tl.program_id(0)
    pk = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    c = pid // NQ
    qi = pid % NQ
    so = bh * NC * L + c * L
    rq = qi * BT + tl.arange(0, BT)
    tq = c * L + rq
    mq = tq < S
    dk = pk * BK + tl.arange(0, BK)
    mk = dk < DQK
    t0 = tl.cast(c, tl.int64) * L
    qb = _hbase(bh, NH, q_sb, q_sh) + t0 * q_st
    kb = _hbase(bh, NH, k_sb, k_sh) + t0 * k_st
    vb = _hbase(bh, NH, v_sb, v_sh) + t0 * v_st
    gb = _hbase(bh, NH, dh_sb, dh_sh) + t0 * dh_st
    m_prev = tl.load(mbuf_ptr + bh * NC + c)
    Mh, Ml, seg, st, mt = _row_stab(b_ptr, seg_ptr, M_ptr, bl_ptr, Ml_ptr, so, rq, m_prev)
    rz = tl.load(rz_ptr + bh * S + tq, mask=mq, other=0.0)
    dd = tl.load(dd_ptr + bh * S + tq, mask=mq, other=0.0)
    qq = tl.load(q_ptr + qb + (rq[:, None] * q_st + dk[None, :]), mask=mq[:, None] & mk[None, :], other=0.0)
    dt = qq.dtype
    acc = tl.zeros([BT, BK], dtype=tl.float32)
    sbase = (bh * NC + c) * DQK * DV
    for v0 in range(0, DV, BV):
        dv = v0 + tl.arange(0, BV)
        mv = dv < DV
        dh = tl.load(dh_ptr + gb + (rq[:, None] * dh_st + dv[None, :]), mask=mq[:, None] & mv[None, :], other=0.0)
        Cb = tl.load(Cbuf_ptr + sbase + dk[:, None] * DV + dv[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
        acc += _dot(dh, tl.trans(Cb.to(dt)), IP, UP)
    nb = tl.load(nbuf_ptr + (bh * NC + c) * DQK + dk, mask=mk, other=0.0)
    # 1/Z is applied to the fp32 products, never rounded into a 16-bit dh (see _bwd_dk_kernel)
    acc = (acc * rz[:, None] + dd[:, None] * nb[None, :]) * st[:, None]
    for kj in range(0, qi):
        X, rk, mkv = _dq_tile(v_ptr, dh_ptr, vb, gb, v_st, dh_st, a_ptr, al_ptr, seg_ptr, so, c, kj, rq, mq, Mh, Ml,
                              seg, rz, dd, S, DV, L, BT, BV, IP, UP)
        kk = tl.load(k_ptr + kb + (rk[:, None] * k_st + dk[None, :]), mask=mkv[:, None] & mk[None, :], other=0.0)
        acc = _acc_dot(acc, X, kk, dt, IP, UP, SPLIT)
    # the diagonal tile last, its diagonal (the token's own term) apart: q.dq is written without it (see _backward)
    X, rk, mkv = _dq_tile(v_ptr, dh_ptr, vb, gb, v_st, dh_st, a_ptr, al_ptr, seg_ptr, so, c, qi, rq, mq, Mh, Ml,
                          seg, rz, dd, S, DV, L, BT, BV, IP, UP)
    X, xd = _split_diag(X, rq, rk)
    kk = tl.load(k_ptr + kb + (rk[:, None] * k_st + dk[None, :]), mask=mkv[:, None] & mk[None, :], other=0.0)
    acc = _acc_dot(acc, X, kk, dt, IP, UP, SPLIT)
    tl.store(qdq_ptr + (pk * BH + bh) * S + tq, tl.sum(qq.to(tl.float32) * acc, 1) * scale, mask=mq)
    dq = (acc + xd[:, None] * kk.to(tl.float32)) * scale
    dqb = _hbase(bh, NH, dq_sb, dq_sh) + t0 * dq_st
    tl.store(dq_ptr + dqb + (rq[:, None] * dq_st + dk[None, :]), _r16(dq, dq_ptr.dtype.element_ty, UP),
             mask=mq[:, None] & mk[None, :])


@triton.jit
def _dk_tile(dh_ptr, v_ptr, vb, gb, v_st, dh_st, b_ptr, a_ptr, seg_ptr, M_ptr, bl_ptr, al_ptr, Ml_ptr, rz_ptr,
             dd_ptr, so, c, qi, rk, mkv, m_prev, bh, S, scale,
             DV: tl.constexpr, L: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, IP: tl.constexpr,
             UP: tl.constexpr):
    """X^T = (dP D)^T * scale for the key rows rk and query tile qi; with the query rows and mask. vb, gb: the
    chunk's bases in v and dh."""
    rq = qi * BT + tl.arange(0, BT)
    tq = c * L + rq
    mq = tq < S
    Mh, Ml, seg, st, mt = _row_stab(b_ptr, seg_ptr, M_ptr, bl_ptr, Ml_ptr, so, rq, m_prev)
    rz = tl.load(rz_ptr + bh * S + tq, mask=mq, other=0.0)
    dd = tl.load(dd_ptr + bh * S + tq, mask=mq, other=0.0)
    dPT = tl.zeros([BT, BT], dtype=tl.float32)
    for v0 in range(0, DV, BV):
        dv = v0 + tl.arange(0, BV)
        mv = dv < DV
        vv = tl.load(v_ptr + vb + (rk[:, None] * v_st + dv[None, :]), mask=mkv[:, None] & mv[None, :], other=0.0)
        dh = tl.load(dh_ptr + gb + (rq[:, None] * dh_st + dv[None, :]), mask=mq[:, None] & mv[None, :], other=0.0)
        dPT += _dot(vv, tl.trans(dh), IP, UP)
    # dh and v are exact 16-bit inputs: their products are exact in fp32, and 1/Z is applied afterwards
    # (rounding dh / Z to 16 bits first was one more rounding in every product, for nothing; see _backward
    # for why the gate gradients are sensitive to such roundings)
    dPT = dPT * rz[None, :] + dd[None, :]
    DT = _decay_T(a_ptr, al_ptr, seg_ptr, so, rk, Mh, Ml, seg, rq)
    return dPT * DT * scale, rq, mq


@triton.jit(do_not_specialize=["S", "NC"])
def _bwd_dk_kernel(q_ptr, k_ptr, v_ptr, dh_ptr, rz_ptr, dd_ptr, b_ptr, a_ptr, seg_ptr, M_ptr, bl_ptr, al_ptr, Ml_ptr,
                   dCbuf_ptr, dnbuf_ptr, mbuf_ptr, dk_ptr, kdk_ptr, kdki_ptr, kdd_ptr, S, NC, BH, NH, scale,
                   q_sb, q_sh, q_st, k_sb, k_sh, k_st, v_sb, v_sh, v_st, dh_sb, dh_sh, dh_st, dk_sb, dk_sh, dk_st,
                   DQK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr, BT: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr, IP: tl.constexpr, UP: tl.constexpr,
                   SPLIT: tl.constexpr):
    NQ: tl.constexpr = L // BT
    pid = tl.program_id(0)
    pk = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    c = pid // NQ
    kj = pid % NQ
    so = bh * NC * L + c * L
    rk = kj * BT + tl.arange(0, BT)
    tk = c * L + rk
    mkv = tk < S
    dk = pk * BK + tl.arange(0, BK)
    mk = dk < DQK
    t0 = tl.cast(c, tl.int64) * L
    qb = _hbase(bh, NH, q_sb, q_sh) + t0 * q_st
    kb = _hbase(bh, NH, k_sb, k_sh) + t0 * k_st
    vb = _hbase(bh, NH, v_sb, v_sh) + t0 * v_st
    gb = _hbase(bh, NH, dh_sb, dh_sh) + t0 * dh_st
    m_prev = tl.load(mbuf_ptr + bh * NC + c)
    w = _col_weights(a_ptr, al_ptr, seg_ptr, M_ptr, Ml_ptr, so, rk, m_prev, L)
    kk = tl.load(k_ptr + kb + (rk[:, None] * k_st + dk[None, :]), mask=mkv[:, None] & mk[None, :], other=0.0)
    dt = kk.dtype
    acc = tl.zeros([BT, BK], dtype=tl.float32)
    sbase = (bh * NC + c) * DQK * DV
    for v0 in range(0, DV, BV):
        dv = v0 + tl.arange(0, BV)
        mv = dv < DV
        vv = tl.load(v_ptr + vb + (rk[:, None] * v_st + dv[None, :]), mask=mkv[:, None] & mv[None, :], other=0.0)
        dCb = tl.load(dCbuf_ptr + sbase + dk[:, None] * DV + dv[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
        acc += _dot(vv, tl.trans(dCb.to(dt)), IP, UP)
    dnb = tl.load(dnbuf_ptr + (bh * NC + c) * DQK + dk, mask=mk, other=0.0)
    acc = (acc + dnb[None, :]) * w[:, None]
    tl.store(kdki_ptr + (pk * BH + bh) * S + tk, tl.sum(kk.to(tl.float32) * acc, 1), mask=mkv)
    for qi in range(kj + 1, NQ):
        X, rq, mq = _dk_tile(dh_ptr, v_ptr, vb, gb, v_st, dh_st, b_ptr, a_ptr, seg_ptr, M_ptr, bl_ptr, al_ptr, Ml_ptr,
                             rz_ptr, dd_ptr, so, c, qi, rk, mkv, m_prev, bh, S, scale, DV, L, BT, BV, IP, UP)
        qq = tl.load(q_ptr + qb + (rq[:, None] * q_st + dk[None, :]), mask=mq[:, None] & mk[None, :], other=0.0)
        acc = _acc_dot(acc, X, qq, dt, IP, UP, SPLIT)
    # the diagonal tile last, its diagonal apart (as in _bwd_dq_kernel)
    X, rq, mq = _dk_tile(dh_ptr, v_ptr, vb, gb, v_st, dh_st, b_ptr, a_ptr, seg_ptr, M_ptr, bl_ptr, al_ptr, Ml_ptr,
                         rz_ptr, dd_ptr, so, c, kj, rk, mkv, m_prev, bh, S, scale, DV, L, BT, BV, IP, UP)
    X, xd = _split_diag(X, rk, rq)
    qq = tl.load(q_ptr + qb + (rq[:, None] * q_st + dk[None, :]), mask=mq[:, None] & mk[None, :], other=0.0)
    acc = _acc_dot(acc, X, qq, dt, IP, UP, SPLIT)
    kf = kk.to(tl.float32)
    tl.store(kdk_ptr + (pk * BH + bh) * S + tk, tl.sum(kf * acc, 1), mask=mkv)
    dd_k = xd[:, None] * qq.to(tl.float32)
    tl.store(kdd_ptr + (pk * BH + bh) * S + tk, tl.sum(kf * dd_k, 1), mask=mkv)
    acc += dd_k
    dkb = _hbase(bh, NH, dk_sb, dk_sh) + t0 * dk_st
    tl.store(dk_ptr + dkb + (rk[:, None] * dk_st + dk[None, :]), _r16(acc, dk_ptr.dtype.element_ty, UP),
             mask=mkv[:, None] & mk[None, :])


@triton.jit(do_not_specialize=["S", "NC"])
def _bwd_dv_kernel(q_ptr, k_ptr, dh_ptr, rz_ptr, b_ptr, a_ptr, seg_ptr, M_ptr, bl_ptr, al_ptr, Ml_ptr,
                   dCbuf_ptr, mbuf_ptr, dv_ptr, S, NC, NH, scale,
                   q_sb, q_sh, q_st, k_sb, k_sh, k_st, dh_sb, dh_sh, dh_st, dv_sb, dv_sh, dv_st,
                   DQK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr, BT: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr, IP: tl.constexpr, UP: tl.constexpr):
    NQ: tl.constexpr = L // BT
    pid = tl.program_id(0)
    pv = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    c = pid // NQ
    kj = pid % NQ
    so = bh * NC * L + c * L
    rk = kj * BT + tl.arange(0, BT)
    tk = c * L + rk
    mkv = tk < S
    dv = pv * BV + tl.arange(0, BV)
    mv = dv < DV
    t0 = tl.cast(c, tl.int64) * L
    qb = _hbase(bh, NH, q_sb, q_sh) + t0 * q_st
    kb = _hbase(bh, NH, k_sb, k_sh) + t0 * k_st
    gb = _hbase(bh, NH, dh_sb, dh_sh) + t0 * dh_st
    m_prev = tl.load(mbuf_ptr + bh * NC + c)
    w = _col_weights(a_ptr, al_ptr, seg_ptr, M_ptr, Ml_ptr, so, rk, m_prev, L)
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    sbase = (bh * NC + c) * DQK * DV
    for k0 in range(0, DQK, BK):
        dk = k0 + tl.arange(0, BK)
        mk = dk < DQK
        kk = tl.load(k_ptr + kb + (rk[:, None] * k_st + dk[None, :]), mask=mkv[:, None] & mk[None, :], other=0.0)
        dCb = tl.load(dCbuf_ptr + sbase + dk[:, None] * DV + dv[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
        acc += _dot(kk, dCb.to(kk.dtype), IP, UP)
    acc = acc * w[:, None]
    for qi in range(kj, NQ):
        rq = qi * BT + tl.arange(0, BT)
        tq = c * L + rq
        mq = tq < S
        Mh, Ml, seg, st, mt = _row_stab(b_ptr, seg_ptr, M_ptr, bl_ptr, Ml_ptr, so, rq, m_prev)
        rz = tl.load(rz_ptr + bh * S + tq, mask=mq, other=0.0)
        sT = tl.zeros([BT, BT], dtype=tl.float32)
        for k0 in range(0, DQK, BK):
            dk = k0 + tl.arange(0, BK)
            mk = dk < DQK
            kk = tl.load(k_ptr + kb + (rk[:, None] * k_st + dk[None, :]), mask=mkv[:, None] & mk[None, :],
                         other=0.0)
            qq = tl.load(q_ptr + qb + (rq[:, None] * q_st + dk[None, :]), mask=mq[:, None] & mk[None, :],
                         other=0.0)
            sT += _dot(kk, tl.trans(qq), IP, UP)
        DT = _decay_T(a_ptr, al_ptr, seg_ptr, so, rk, Mh, Ml, seg, rq)
        dh = tl.load(dh_ptr + gb + (rq[:, None] * dh_st + dv[None, :]), mask=mq[:, None] & mv[None, :], other=0.0)
        acc += _dot(_r16(sT * DT * (scale * rz)[None, :], dh.dtype, UP), dh, IP, UP)
    dvb = _hbase(bh, NH, dv_sb, dv_sh) + t0 * dv_st
    tl.store(dv_ptr + dvb + (rk[:, None] * dv_st + dv[None, :]), _r16(acc, dv_ptr.dtype.element_ty, UP),
             mask=mkv[:, None] & mv[None, :])


# ------------------------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------------------------

def _ip(dtype: torch.dtype) -> str:
    """Dot precision for fp32 operands: IEEE unless the caller allowed TF32 (torch's matmul precision flag)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _upcast_dots(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"


def _strides(t: torch.Tensor):
    """(batch, head, token) strides of a (B, NH, S, D) tensor, 0 along a dim of size 1 (its only index is 0, and
    torch gives such dims arbitrary strides)."""
    return tuple(0 if t.shape[d] == 1 else t.stride(d) for d in range(3))


def _in_place_ok(t: torch.Tensor, L: int) -> bool:
    """Whether the kernels can address t as it is: last dim contiguous, and the int32 offsets inside a chunk
    (token < 2 L, times the token stride, plus the head dim) cannot overflow."""
    st = 0 if t.shape[2] == 1 else t.stride(2)
    return (t.shape[3] == 1 or t.stride(3) == 1) and 2 * L * st + t.shape[3] < 2 ** 31


def _as_kernel_input(t: torch.Tensor, L: int) -> torch.Tensor:
    """t itself when the kernels can read it in place (any batch / head / token strides), else a contiguous copy."""
    return t if _in_place_ok(t, L) else t.contiguous()


def _empty_in_layout_of(ref: torch.Tensor, D: int, dtype: torch.dtype) -> torch.Tensor:
    """An empty (B, NH, S, D) tensor laid out like ref: a (B, S, NH, D) buffer seen as (B, NH, S, D) when ref has
    its heads inside its tokens (the layers' transposed projections: the caller's transpose back is then free, and
    a gradient in that layout needs no copy in autograd), else contiguous."""
    B, NH, S = ref.shape[:3]
    if NH > 1 and S > 1 and ref.stride(1) < ref.stride(2):
        return torch.empty(B, S, NH, D, device=ref.device, dtype=dtype).transpose(1, 2)
    return torch.empty(B, NH, S, D, device=ref.device, dtype=dtype)


def _states(k, v, sc, C0, n0, m0, S, NC, cfg: MLSTMTritonConfig, dtype: torch.dtype):
    """K1: every chunk's incoming state (Cbuf in ``dtype``, nbuf, mbuf) and the final state (C, n, m). The forward
    and, with cfg.recompute_states, the backward call this with the same inputs: the same kernel on the same data,
    so the recomputed states are bit-identical to the forward's."""
    B, NH, _, DQK = k.shape
    DV = v.shape[-1]
    BH = B * NH
    dev = k.device
    f32 = torch.float32
    # the chunk states are only ever consumed as dot operands in q's dtype, so they are stored in it (half the
    # traffic for bf16); the recurrence itself runs in fp32 registers
    Cbuf = torch.empty(BH, NC, DQK, DV, device=dev, dtype=dtype)
    nbuf = torch.empty(BH, NC, DQK, device=dev, dtype=f32)
    mbuf = torch.empty(BH, NC, device=dev, dtype=f32)
    C = torch.empty(B, NH, DQK, DV, device=dev, dtype=f32)
    n = torch.empty(B, NH, DQK, device=dev, dtype=f32)
    m = torch.empty(B, NH, device=dev, dtype=f32)
    has_state = C0 is not None
    BKs, BVs = cfg.block_k_state, cfg.block_v_state
    grid = (cdiv(DQK, BKs), cdiv(DV, BVs), BH)
    _fwd_state_kernel[grid](k, v, *sc, C0 if has_state else C, n0 if has_state else n,
                            m0 if has_state else m, Cbuf, nbuf, mbuf, C, n, m, S, NC, NH, *_strides(k), *_strides(v),
                            DQK=DQK, DV=DV, HAS_STATE=has_state, L=cfg.chunk, BK=BKs, BV=BVs, IP=_ip(dtype),
                            UP=_upcast_dots(dtype), num_warps=cfg.num_warps_state, num_stages=cfg.num_stages_state)
    return Cbuf, nbuf, mbuf, C, n, m


def _forward(q, k, v, i, f, C0, n0, m0, resets, eps, cfg: MLSTMTritonConfig):
    """q, k, v: (B, NH, S, D) with any batch / head / token strides and a contiguous last dim (_in_place_ok).
    Returns h (B, NH, S, DV) in v's layout, the final state, the gate scalars (sb, sa, sseg, sM, sbl, sal, sMl),
    the chunk states (Cbuf, nbuf, mbuf) and the per-token (den, m) that the backward reads."""
    B, NH, S, DQK = q.shape
    DV = v.shape[-1]
    BH = B * NH
    L = cfg.chunk
    NC = cdiv(S, L)
    dev = q.device
    f32 = torch.float32
    sb = torch.empty(BH, NC * L, device=dev, dtype=f32)
    sa = torch.empty_like(sb)
    sM = torch.empty_like(sb)
    sbl, sal, sMl = torch.empty_like(sb), torch.empty_like(sb), torch.empty_like(sb)  # the pairs' low parts
    sseg = torch.empty(BH, NC * L, device=dev, dtype=torch.int32)
    has_reset = resets is not None
    r_arg = resets.to(torch.int8).contiguous() if has_reset else sb
    _scalars_kernel[(NC, BH)](f, i, r_arg, sb, sa, sseg, sM, sbl, sal, sMl, S, NC, NH, HAS_RESET=has_reset, L=L)
    sc = (sb, sa, sseg, sM, sbl, sal, sMl)

    Cbuf, nbuf, mbuf, C, n, m = _states(k, v, sc, C0, n0, m0, S, NC, cfg, q.dtype)
    ip = _ip(q.dtype)
    up = _upcast_dots(q.dtype)
    h = _empty_in_layout_of(v, DV, q.dtype)
    den = torch.empty(B, NH, S, device=dev, dtype=f32)
    mt = torch.empty(B, NH, S, device=dev, dtype=f32)
    BK, BV = min(cfg.block_k, _pow2_at_least16(DQK)), min(cfg.block_v, _pow2_at_least16(DV))
    grid = (NC * (L // cfg.block_t), cdiv(DV, BV), BH)
    _fwd_out_kernel[grid](q, k, v, *sc, Cbuf, nbuf, mbuf, h, den, mt, S, NC, NH, DQK ** -0.5, eps,
                          *_strides(q), *_strides(k), *_strides(v), *_strides(h),
                          DQK=DQK, DV=DV, L=L, BT=cfg.block_t, BK=BK, BV=BV, IP=ip, UP=up,
                          num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return h, C, n, m, sc, (Cbuf, nbuf, mbuf), (den, mt)


def _backward(q, k, v, f, h, dh, dC, dn, sc, states, dm, eps, cfg: MLSTMTritonConfig):
    """states: the forward's (Cbuf, nbuf, mbuf); dm: its (den, m) per token. dq, dk, dv come back in the layouts
    of q, k, v (see _empty_in_layout_of); dh is read with its own strides."""
    B, NH, S, DQK = q.shape
    DV = v.shape[-1]
    BH = B * NH
    L = cfg.chunk
    NC = cdiv(S, L)
    dev = q.device
    f32 = torch.float32
    sb, sa, sseg, sM, sbl, sal, sMl = sc
    Cbuf, nbuf, mbuf = states
    den, mt = dm
    scale = DQK ** -0.5
    ip = _ip(q.dtype)
    up = _upcast_dots(q.dtype)
    dh = _as_kernel_input(dh, L)
    rz = torch.empty(B, NH, S, device=dev, dtype=f32)
    dd = torch.empty_like(rz)
    BR = 32
    _bwd_prep_kernel[(cdiv(S, BR), BH)](h, dh, den, mt, rz, dd, S, NH, eps, *_strides(h), *_strides(dh),
                                        DV=DV, BR=BR, BV=min(128, _pow2_at_least16(DV)), num_warps=4)
    has_dstate = dC is not None or dn is not None
    dCT = dC.float().contiguous() if dC is not None else torch.zeros(B, NH, DQK, DV, device=dev, dtype=f32)
    dnT = dn.float().contiguous() if dn is not None else torch.zeros(B, NH, DQK, device=dev, dtype=f32)
    dCbuf = torch.empty(BH, NC, DQK, DV, device=dev, dtype=q.dtype)
    dnbuf = torch.empty(BH, NC, DQK, device=dev, dtype=f32)
    dC0 = torch.empty(B, NH, DQK, DV, device=dev, dtype=f32)
    dn0 = torch.empty(B, NH, DQK, device=dev, dtype=f32)
    BKs, BVs = cfg.block_k_state, cfg.block_v_state
    grid = (cdiv(DQK, BKs), cdiv(DV, BVs), BH)
    Epart = torch.empty(grid[0] * grid[1], BH, NC, device=dev, dtype=f32)
    _bwd_state_kernel[grid](q, dh, rz, dd, sseg, sM, sMl, mbuf, dCT, dnT, dCbuf, dnbuf, dC0, dn0, Cbuf, nbuf, Epart,
                            S, NC, BH, NH, scale, *_strides(q), *_strides(dh),
                            DQK=DQK, DV=DV, HAS_DSTATE=has_dstate, L=L, BK=BKs, BV=BVs, IP=ip, UP=up,
                            num_warps=cfg.num_warps_state, num_stages=cfg.num_stages_state)
    BK, BV = min(cfg.block_k, _pow2_at_least16(DQK)), min(cfg.block_v, _pow2_at_least16(DV))
    BT = cfg.block_t
    NK = cdiv(DQK, BK)
    dq = _empty_in_layout_of(q, DQK, q.dtype)
    dk = _empty_in_layout_of(k, DQK, k.dtype)
    dv = _empty_in_layout_of(v, DV, v.dtype)
    qdq = torch.empty(NK, BH, S, device=dev, dtype=f32)
    kdk = torch.empty(NK, BH, S, device=dev, dtype=f32)
    kdki = torch.empty(NK, BH, S, device=dev, dtype=f32)
    kdd = torch.empty(NK, BH, S, device=dev, dtype=f32)
    nt = NC * (L // BT)
    # 16-bit inputs: the in-chunk gradient tiles (dP D for dq, dP^T D^T for dk) go into the tensor-core dots as two
    # 16-bit parts (value + rounding error), one more dot each. q.dq and k.dk, from which the gate gradients are
    # formed, cancel to ~1/sqrt(D) of their terms, so a single rounding cost d_f 1.8e-2 (bf16, DQK=512) and
    # 9e-3 (DQK=128); split: 2.6e-3 and 1.7e-3 (float64 reference, same inputs)
    split = q.dtype != torch.float32
    qkvh = (*_strides(q), *_strides(k), *_strides(v), *_strides(dh))
    _bwd_dq_kernel[(nt, NK, BH)](q, k, v, dh, rz, dd, *sc, Cbuf, nbuf, mbuf, dq, qdq, S, NC, BH, NH, scale,
                                 *qkvh, *_strides(dq),
                                 DQK=DQK, DV=DV, L=L, BT=BT, BK=BK, BV=BV, IP=ip, UP=up, SPLIT=split,
                                 num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    _bwd_dk_kernel[(nt, NK, BH)](q, k, v, dh, rz, dd, *sc, dCbuf, dnbuf, mbuf, dk, kdk, kdki, kdd, S, NC, BH, NH,
                                 scale, *qkvh, *_strides(dk),
                                 DQK=DQK, DV=DV, L=L, BT=BT, BK=BK, BV=BV, IP=ip, UP=up,
                                 SPLIT=split, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    _bwd_dv_kernel[(nt, cdiv(DV, BV), BH)](q, k, dh, rz, *sc, dCbuf, mbuf, dv, S, NC, NH, scale,
                                           *_strides(q), *_strides(k), *_strides(dh), *_strides(dv),
                                           DQK=DQK, DV=DV, L=L, BT=BT, BK=BK, BV=BV, IP=ip, UP=up,
                                           num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    di, df = _gate_grads(f, qdq, kdk, kdki, kdd, Epart, B, NH, S, NC, L)
    return dq, dk, dv, di, df, dC0, dn0


def _gate_grads(f, qdq, kdk, kdki, kdd, Epart, B, NH, S, NC, L):
    """(d i, d f) from the kernels' per-token dot products (fp32 partials, summed over their first axis)."""
    # gate gradients from the per-token dot products (see the module docstring). Summed inside each chunk, with
    # the pairs that cancel kept apart: for t in chunk c,
    #   d log f_t = sum_{u >= t} (q.dq - k.dk_intra)_u + sum_{j < t} (k.dk_inter)_j + Eg_c
    # where k.dk_inter is the part of k.dk that flows through the chunk's outgoing state and Eg_c the incoming
    # state's share (algebraically the same as the global reverse cumsum, far less cancellation in bf16).
    # q.dq and k.dk come without each token's own (diagonal) term, which is in both and cancels exactly: kept in,
    # it is O(1) and its fp32 rounding swamped d log f wherever the true value is small (strong decay: f ~ -15
    # gave 0.88 relative error). di = k.dk needs it back: kdd is that term.
    kdk = kdk.sum(0).view(B, NH, S)
    kdki = kdki.sum(0).view(B, NH, S)
    di = kdk + kdd.sum(0).view(B, NH, S)
    pad = NC * L - S
    g = torch.nn.functional.pad((qdq.sum(0).view(B, NH, S) - (kdk - kdki)).double(), (0, pad)).view(B, NH, NC, L)
    x = torch.nn.functional.pad(kdki.double(), (0, pad)).view(B, NH, NC, L)
    dlf = g.flip(-1).cumsum(-1).flip(-1) + (x.cumsum(-1) - x) + Epart.double().sum(0).view(B, NH, NC, 1)
    dlf = dlf.view(B, NH, NC * L)[..., :S]
    df = dlf * torch.sigmoid(-f.double())
    return di, df


class _MLSTMTritonFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, i, f, C0, n0, m0, resets, eps, cfg):
        L = cfg.chunk
        # q, k, v as given (copied only without a contiguous last dim): they are also the tensors kept for the
        # backward, so a transposed view of the layer's projections costs no copy and no extra memory
        qc, kc, vc = (_as_kernel_input(t, L) for t in (q, k, v))
        ic, fc = i.float().contiguous(), f.float().contiguous()
        C0c = C0.float().contiguous() if C0 is not None else None
        n0c = n0.float().contiguous() if n0 is not None else None
        m0c = m0.detach().float().contiguous() if m0 is not None else None
        h, C, n, m, sc, states, dm = _forward(qc, kc, vc, ic, fc, C0c, n0c, m0c, resets, eps, cfg)
        recompute = cfg.recompute_states
        if recompute is None:
            recompute = recompute_default(q.shape[-1], v.shape[-1])
        # recompute: keep the initial state instead of the chunk states (one state against S / L of them)
        kept = (C0c, n0c, m0c) if recompute else states
        ctx.save_for_backward(qc, kc, vc, fc, h, *sc, *kept, *dm)
        ctx.eps, ctx.cfg, ctx.recompute = eps, cfg, recompute
        ctx.dtypes = (i.dtype, f.dtype, None if C0 is None else C0.dtype, None if n0 is None else n0.dtype)
        ctx.mark_non_differentiable(m)
        return h, C, n, m

    @staticmethod
    def backward(ctx, dh, dC, dn, dm):
        qc, kc, vc, fc, h, *rest = ctx.saved_tensors
        sc, kept, dmt = tuple(rest[:7]), tuple(rest[7:10]), tuple(rest[10:])
        if ctx.recompute:
            S = qc.shape[2]
            states = _states(kc, vc, sc, *kept, S, cdiv(S, ctx.cfg.chunk), ctx.cfg, qc.dtype)[:3]
        else:
            states = kept
        if dh is None:
            dh = torch.zeros_like(h)
        dq, dk, dv, di, df, dC0, dn0 = _backward(qc, kc, vc, fc, h, dh, dC, dn, sc, states, dmt, ctx.eps, ctx.cfg)
        del states
        has_state = ctx.dtypes[2] is not None
        idt, fdt, cdt, ndt = ctx.dtypes
        dC0 = dC0.to(cdt) if has_state else None
        dn0 = dn0.to(ndt) if has_state else None
        return dq, dk, dv, di.to(idt), df.to(fdt), dC0, dn0, None, None, None, None


def mlstm_chunkwise_triton(q, k, v, i, f, state=None, eps: float = 1e-6, resets: Optional[torch.Tensor] = None,
                           config: Optional[MLSTMTritonConfig] = None):
    """The mLSTM over a sequence with the Triton chunkwise kernels (inputs already validated).

    q, k: (B, NH, S, DQK); v: (B, NH, S, DV); i, f: (B, NH, S); state None or (C, n, m) with m (B, NH).
    Returns h (B, NH, S, DV) in q's dtype and the final state (C, n, m) in float32.

    Layouts: q, k, v are read in place whatever their batch / head / token strides, as long as their last dim is
    contiguous (else they are copied once); e.g. ``x.view(B, S, NH, D).transpose(1, 2)`` of a (B, S, NH * D)
    projection costs no copy, and those are the tensors kept for the backward. h is returned in v's layout (for
    that view: ``h.transpose(1, 2)`` is contiguous), and the gradients of q, k, v in their layouts.

    Memory: ``config.recompute_states`` (None: :func:`recompute_default`, which the environment variable
    FASTXLSTM_MLSTM_RECOMPUTE=0/1 overrides) makes the backward recompute the per-chunk states instead of keeping
    them from the forward; the results are bit-identical either way.
    """
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"the Triton mLSTM kernels take float16, bfloat16 or float32 inputs, got {q.dtype}")
    B, NH, S, DQK = q.shape
    DV = v.shape[-1]
    if B * NH > 65535:  # batch*heads is a grid axis of size at most 65535
        raise ValueError(f"the Triton mLSTM kernels take B * NH <= 65535, got {B} * {NH}")
    cfg = config if config is not None else default_config(DQK, DV)
    if S == 0:
        if state is None:
            z = torch.zeros
            return (q.new_zeros(B, NH, 0, DV), (z(B, NH, DQK, DV, device=q.device), z(B, NH, DQK, device=q.device),
                                                 z(B, NH, device=q.device)))
        C0, n0, m0 = state
        return q.new_zeros(B, NH, 0, DV), (C0.float() * 1, n0.float() * 1, m0.detach().float() * 1)
    C0, n0, m0 = state if state is not None else (None, None, None)
    h, C, n, m = _MLSTMTritonFn.apply(q, k, v, i, f, C0, n0, m0, resets, float(eps), cfg)
    return h, (C, n, m)
