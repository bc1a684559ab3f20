"""The public entry points of the cells: validate the inputs once, then pick a form (no nn.Module here).

    from fastxlstm.ops import mlstm, mlstm_step, slstm

The forms live in ``ops/mlstm_forms/`` and ``ops/slstm_forms/`` (one file per form; no package shares its name
with a function). Every backend computes the same function (docs/MATH.md) and is tested against the
step-by-step reference in float64. Backends are chosen per call with ``backend=``; "auto" picks the fastest one
available for the inputs (Triton kernels on CUDA, the chunkwise PyTorch form elsewhere).

Validation happens here, once, at the public edge. The layers and models call ``_mlstm_unchecked``,
``_mlstm_step_unchecked`` and ``_slstm_unchecked``: the same backend choice without the per-call input checks
(the model checks its token ids, resets and state once in forward; a generated token is not re-validated in every
block). See docs/ARCHITECTURE.md.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._checks import (check_same_device, check_same_dtype, check_shape, check_tensor, compute_dtype)

__all__ = ["mlstm", "mlstm_step", "slstm", "MLSTM_BACKENDS", "SLSTM_BACKENDS", "triton_available"]

MLSTM_BACKENDS = ("auto", "reference", "parallel", "chunkwise", "recurrent", "triton")
SLSTM_BACKENDS = ("auto", "reference", "recurrent", "triton")


def triton_available(device: Optional[torch.device] = None) -> bool:
    """True when the Triton mLSTM kernels can run on ``device`` (a CUDA device and an importable triton)."""
    if device is not None and torch.device(device).type != "cuda":
        return False
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


# ----------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------

def _check_mlstm_state(state, B, NH, DQK, DV, device):
    if state is None:
        return None
    if not isinstance(state, (tuple, list)) or len(state) != 3:
        raise ValueError("state must be a tuple (C, n, m) or None")
    C, n, m = state
    check_tensor("state C", C, 4)
    check_tensor("state n", n, 3)
    if not isinstance(m, torch.Tensor) or m.ndim not in (2, 3):
        raise ValueError(f"state m must be a tensor of shape (B, NH) or (B, NH, 1), got "
                         f"{getattr(m, 'shape', type(m).__name__)}")
    check_tensor("state m", m, m.ndim)
    check_shape("state C", C, (B, NH, DQK, DV), "(B, NH, DQK, DV)")
    check_shape("state n", n, (B, NH, DQK), "(B, NH, DQK)")
    if m.ndim == 3:
        check_shape("state m", m, (B, NH, 1), "(B, NH) or (B, NH, 1)")
        m = m[..., 0]
    else:
        check_shape("state m", m, (B, NH), "(B, NH) or (B, NH, 1)")
    check_same_device(q=torch.empty(0, device=device), state_C=C, state_n=n, state_m=m)
    return C, n, m


def _check_resets(resets, B, S, device):
    if resets is None:
        return None
    if not isinstance(resets, torch.Tensor):
        raise ValueError(f"resets must be a bool tensor of shape (B, S), got {type(resets).__name__}")
    if resets.dtype != torch.bool:
        raise ValueError(f"resets must have dtype torch.bool, got {resets.dtype}")
    check_shape("resets", resets, (B, S), "(B, S)")
    if resets.device != device:
        raise ValueError(f"resets is on {resets.device} but q is on {device}")
    return resets


def _check_mlstm_inputs(q, k, v, i, f):
    check_tensor("q", q, 4)
    check_tensor("k", k, 4)
    check_tensor("v", v, 4)
    check_tensor("i", i, 3)
    check_tensor("f", f, 3)
    B, NH, S, DQK = q.shape
    check_shape("k", k, (B, NH, S, DQK), "must match q (B, NH, S, DQK)")
    if v.shape[:3] != (B, NH, S):
        raise ValueError(f"v has shape {tuple(v.shape)}, expected (B, NH, S, DV) = ({B}, {NH}, {S}, DV)")
    check_shape("i", i, (B, NH, S), "(B, NH, S)")
    check_shape("f", f, (B, NH, S), "(B, NH, S)")
    check_same_dtype(q=q, k=k, v=v)
    check_same_dtype(i=i, f=f)
    device = check_same_device(q=q, k=k, v=v, i=i, f=f)
    if DQK == 0 or v.shape[-1] == 0 or B == 0 or NH == 0:
        raise ValueError(f"empty dimension in q {tuple(q.shape)} / v {tuple(v.shape)}")
    return B, NH, S, DQK, v.shape[-1], device


def _check_eps(eps):
    if not isinstance(eps, (int, float)) or eps < 0 or eps != eps:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    return float(eps)


# ----------------------------------------------------------------------------------------------------------
# mLSTM
# ----------------------------------------------------------------------------------------------------------

def _pick_mlstm_backend(backend: str, q: torch.Tensor, v: torch.Tensor, chunk_size: int = 64,
                        eps: float = 1e-6) -> str:
    if backend not in MLSTM_BACKENDS:
        raise ValueError(f"backend must be one of {MLSTM_BACKENDS}, got {backend!r}")
    if backend == "triton" and eps == 0:
        # eps = 0 with a large stabiliser passed in the interpreter but one GPU check of it failed (2026-11-30,
        # cause not established): until it is, the kernels refuse it and "auto" takes the PyTorch chunkwise form
        raise ValueError("eps=0 is not supported by the Triton mLSTM kernels; use eps > 0, or backend='auto' "
                         "(which runs the PyTorch chunkwise form for eps=0)")
    if backend == "triton":
        if not triton_available(q.device):
            raise ValueError("backend='triton' needs a CUDA device and the triton package "
                             f"(inputs are on {q.device}); use backend='auto' to fall back to PyTorch")
        if not _triton_chunk_ok(chunk_size):
            raise ValueError(f"chunk_size={chunk_size} is not a chunk length of the Triton kernels: backend='triton' "
                             f"takes chunk_size in {TRITON_CHUNK_SIZES} (backend='auto' falls back to PyTorch)")
    if backend != "auto":
        return backend
    return "triton" if (eps != 0 and _triton_fits(q, v.shape[-1], chunk_size)) else "chunkwise"


# Where "auto" uses the Triton kernels: CUDA, a dtype they take, B * NH within one grid axis, and the head dims
# they were built and tested for (<= 512). Anything else runs the PyTorch forms rather than failing.
_TRITON_MAX_HEAD_DIM = 512


def _triton_fits(q: torch.Tensor, DV: int, chunk_size: int = 64) -> bool:
    return (triton_available(q.device) and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and q.shape[0] * q.shape[1] <= 65535 and max(q.shape[-1], DV) <= _TRITON_MAX_HEAD_DIM
            and _triton_chunk_ok(chunk_size))


def _triton_step_fits(q: torch.Tensor) -> bool:
    """Where "auto" uses the fused Triton decode step: any head dims (it walks DQK in blocks and tiles DV), a dtype it
    takes, B * NH within one grid axis."""
    return (triton_available(q.device) and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and q.shape[0] * q.shape[1] <= 65535)


# The Triton kernels' chunk length (state stored every chunk_size tokens): a power of two in [16, 256] (the token
# tile inside a chunk is min(64, chunk_size)). backend="triton" with another chunk_size is a ValueError;
# backend="auto" then runs the PyTorch chunkwise form, which takes any chunk_size.
TRITON_CHUNK_SIZES = (16, 32, 64, 128, 256)


def _triton_chunk_ok(chunk_size: int) -> bool:
    return chunk_size in TRITON_CHUNK_SIZES


def _check_chunk_size(chunk_size):
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return chunk_size


def mlstm(q, k, v, i, f, state=None, backend: str = "auto", chunk_size: int = 64, eps: float = 1e-6,
          resets: Optional[torch.Tensor] = None, return_state: bool = True):
    """The mLSTM cell over a sequence (all heads at once).

    Args:
        q, k: (B, NH, S, DQK) queries and keys (the 1/sqrt(DQK) query scale is applied inside).
        v: (B, NH, S, DV) values.
        i, f: (B, NH, S) input and forget gate pre-activations (exponential input gate, sigmoid forget gate).
        state: optional initial state (C (B, NH, DQK, DV), n (B, NH, DQK), m (B, NH) or (B, NH, 1)), in the
            stabilised form of docs/MATH.md; None is a fresh (zero) state.
        backend: "auto", "reference", "parallel", "chunkwise", "recurrent" or "triton".
        chunk_size: chunk length of the chunkwise forms (any S works, not only multiples). The PyTorch form takes
            any positive int; the Triton kernels take 16, 32, 64, 128 or 256 (backend="triton" raises ValueError
            for another value, backend="auto" then uses the PyTorch form). With 16-bit inputs on CUDA the default
            64 lets the kernels pick a measured tiling (longer chunks where few sequences fill the GPU; the same
            result up to rounding); the environment variable FASTXLSTM_MLSTM_CHUNK=N fixes N.
        eps: added to the normaliser's denominator (in stabilised space, as transformers and the official code).
        resets: optional (B, S) bool; True at t clears the state before token t is read (packed documents).
        return_state: when False return h alone.

    Returns:
        h (B, NH, S, DV) in the dtype of q, and the final state (C, n, m) in float32 (float64 for float64
        inputs), m of shape (B, NH).
    """
    B, NH, S, DQK, DV, device = _check_mlstm_inputs(q, k, v, i, f)
    state = _check_mlstm_state(state, B, NH, DQK, DV, device)
    resets = _check_resets(resets, B, S, device)
    eps = _check_eps(eps)
    _check_chunk_size(chunk_size)
    return _mlstm_unchecked(q, k, v, i, f, state, backend, chunk_size, eps, resets, return_state)


def _mlstm_unchecked(q, k, v, i, f, state=None, backend: str = "auto", chunk_size: int = 64, eps: float = 1e-6,
                     resets: Optional[torch.Tensor] = None, return_state: bool = True):
    """:func:`mlstm` without the input checks (for layers whose model validated its inputs once): the caller
    guarantees the shapes, dtypes and devices :func:`mlstm` checks, and m of shape (B, NH)."""
    B, NH, S, DQK = q.shape
    DV = v.shape[-1]
    device = q.device
    name = _pick_mlstm_backend(backend, q, v, chunk_size, eps)
    if S == 0:  # nothing to read: the state passes through unchanged (every backend agrees by definition)
        from .mlstm_forms.reference import zero_state
        cd = compute_dtype(q.dtype)
        st = zero_state(B, NH, DQK, DV, cd, device) if state is None else tuple(t.to(cd) for t in state)
        h = q.new_zeros(B, NH, 0, DV)
        return (h, st) if return_state else h
    if name == "reference":
        from .mlstm_forms.reference import mlstm_reference
        h, st = mlstm_reference(q, k, v, i, f, state, eps, resets)
    elif name == "parallel":
        from .mlstm_forms.parallel import mlstm_parallel
        h, st = mlstm_parallel(q, k, v, i, f, state, eps, resets)
    elif name == "chunkwise":
        from .mlstm_forms.chunkwise import mlstm_chunkwise
        h, st = mlstm_chunkwise(q, k, v, i, f, state, eps, resets, chunk_size)
    elif name == "recurrent":
        from .mlstm_forms.recurrent import mlstm_recurrent
        h, st = mlstm_recurrent(q, k, v, i, f, state, eps, resets)
    else:  # chunk_size was checked against TRITON_CHUNK_SIZES by _pick_mlstm_backend
        from .mlstm_forms.triton import mlstm_triton
        h, st = mlstm_triton(q, k, v, i, f, state, eps, resets, chunk_size)
    return (h, st) if return_state else h


def mlstm_step(q, k, v, i, f, state, eps: float = 1e-6, backend: str = "auto"):
    """One decoding step of the mLSTM.

    Args:
        q, k: (B, NH, DQK); v: (B, NH, DV); i, f: (B, NH) gate pre-activations.
        state: (C, n, m) as for :func:`mlstm`; None is a fresh state.
        backend: "auto", "torch" or "triton" (a fused kernel that reads and writes the state once).
        A state in another floating dtype is cast to the compute dtype (float32; float64 for float64 inputs), as
        :func:`mlstm` does.

    Returns:
        h (B, NH, DV) in the dtype of q, and the new state (C, n, m) (never modified in place).
    """
    check_tensor("q", q, 3)
    check_tensor("k", k, 3)
    check_tensor("v", v, 3)
    check_tensor("i", i, 2)
    check_tensor("f", f, 2)
    B, NH, DQK = q.shape
    check_shape("k", k, (B, NH, DQK), "must match q (B, NH, DQK)")
    if v.shape[:2] != (B, NH):
        raise ValueError(f"v has shape {tuple(v.shape)}, expected (B, NH, DV) = ({B}, {NH}, DV)")
    check_shape("i", i, (B, NH), "(B, NH)")
    check_shape("f", f, (B, NH), "(B, NH)")
    check_same_dtype(q=q, k=k, v=v)
    check_same_dtype(i=i, f=f)
    device = check_same_device(q=q, k=k, v=v, i=i, f=f)
    DV = v.shape[-1]
    if DQK == 0 or DV == 0 or B == 0 or NH == 0:
        raise ValueError(f"empty dimension in q {tuple(q.shape)} / v {tuple(v.shape)}")
    state = _check_mlstm_state(state, B, NH, DQK, DV, device)
    eps = _check_eps(eps)
    return _mlstm_step_unchecked(q, k, v, i, f, state, eps, backend)


def _mlstm_step_unchecked(q, k, v, i, f, state, eps: float = 1e-6, backend: str = "auto"):
    """:func:`mlstm_step` without the input checks (see :func:`_mlstm_unchecked`)."""
    B, NH, DQK = q.shape
    DV = v.shape[-1]
    device = q.device
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "triton" and not triton_available(device):
        raise ValueError(f"backend='triton' needs a CUDA device and triton (inputs are on {device})")
    cd = compute_dtype(q.dtype)
    if state is None:
        from .mlstm_forms.reference import zero_state
        state = zero_state(B, NH, DQK, DV, cd, device)
    elif any(s.dtype != cd for s in state):  # as mlstm does: the state is carried in the compute dtype
        from ._inplace import inplace_active
        keep_c = inplace_active() and state[0].dtype in (torch.bfloat16, torch.float16)  # the decoder's 16-bit C
        state = tuple(s if (j == 0 and keep_c) else s.to(cd) for j, s in enumerate(state))
    use_triton = backend == "triton" or (backend == "auto" and _triton_step_fits(q))
    if use_triton:
        from .mlstm_forms.triton import mlstm_step_triton
        return mlstm_step_triton(q, k, v, i, f, state, eps)
    from .mlstm_forms.reference import mlstm_step_reference
    h, st = mlstm_step_reference(q, k, v, i, f, state, eps)
    return h.to(q.dtype), st


# ----------------------------------------------------------------------------------------------------------
# sLSTM
# ----------------------------------------------------------------------------------------------------------

# head dims the sLSTM kernels were built and tested for (tiles of 16..64 units; others run the PyTorch form)
_SLSTM_TRITON_HEAD_DIMS = (16, 32, 64, 128, 256)


def _slstm_triton_fits(x: torch.Tensor) -> bool:
    return (triton_available(x.device) and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and x.shape[-1] in _SLSTM_TRITON_HEAD_DIMS and x.shape[3] <= 65535)  # heads: grid axis 1


def _pick_slstm_backend(backend: str, x: torch.Tensor) -> str:
    if backend not in SLSTM_BACKENDS:
        raise ValueError(f"backend must be one of {SLSTM_BACKENDS}, got {backend!r}")
    if backend == "triton":
        if not triton_available(x.device):
            raise ValueError("backend='triton' needs a CUDA device and the triton package "
                             f"(inputs are on {x.device}); use backend='auto' to fall back to PyTorch")
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"backend='triton' takes float16, bfloat16 or float32 x, got {x.dtype}")
        if x.shape[-1] not in _SLSTM_TRITON_HEAD_DIMS:
            raise ValueError(f"backend='triton' supports head dims {_SLSTM_TRITON_HEAD_DIMS}, got x with head dim "
                             f"{x.shape[-1]}; use backend='auto' to fall back to PyTorch")
        return backend
    if backend != "auto":
        return backend
    return "triton" if _slstm_triton_fits(x) else "recurrent"


def slstm(x, R, b, state=None, backend: str = "auto", resets: Optional[torch.Tensor] = None,
          return_state: bool = True):
    """The sLSTM cell over a sequence.

    Args:
        x: (B, S, 4, NH, DH) gate input pre-activations (W x_t), gates in the order (i, f, z, o).
        R: (4, NH, DH, DH) block-diagonal recurrent weights; gate g of head h receives h_{t-1} @ R[g, h].
        b: (4, NH, DH) gate biases.
        state: optional (c, n, m, h), each (B, NH, DH); None is a fresh (zero) state. Where n == 0 (a fresh or
            reset state) the state is empty: the stabiliser m starts from the first input gate, so that step is
            exact for any input gate value.
        backend: "auto", "reference", "recurrent" (one batched matmul per step for all heads and gates) or
            "triton" (CUDA kernels, a persistent program per batch tile and head; head dims 16, 32, 64, 128, 256).
            "auto" is "triton" on CUDA where the kernels apply, else "recurrent".
        resets: optional (B, S) bool; True at t clears the state before token t is read.

    Returns:
        h (B, S, NH, DH) in the dtype of x, and the final state (c, n, m, h) in float32 (float64 for float64).
    """
    check_tensor("x", x, 5)
    check_tensor("R", R, 4)
    check_tensor("b", b, 3)
    B, S, four, NH, DH = x.shape
    if four != 4:
        raise ValueError(f"x must have shape (B, S, 4, NH, DH) with the 4 gates (i, f, z, o) in dim 2, "
                         f"got {tuple(x.shape)}")
    check_shape("R", R, (4, NH, DH, DH), "(4, NH, DH, DH)")
    check_shape("b", b, (4, NH, DH), "(4, NH, DH)")
    check_same_dtype(R=R, b=b)  # x may differ (e.g. bf16 activations with fp32 weights); all run in float32+
    device = check_same_device(x=x, R=R, b=b)
    if B == 0 or NH == 0 or DH == 0:
        raise ValueError(f"empty dimension in x {tuple(x.shape)}")
    if state is not None:
        if not isinstance(state, (tuple, list)) or len(state) != 4:
            raise ValueError("state must be a tuple (c, n, m, h) or None")
        for name, s in zip(("c", "n", "m", "h"), state):
            check_tensor(f"state {name}", s, 3)
            check_shape(f"state {name}", s, (B, NH, DH), "(B, NH, DH)")
            if s.device != device:
                raise ValueError(f"state {name} is on {s.device} but x is on {device}")
        state = tuple(state)
    resets = _check_resets(resets, B, S, device)
    return _slstm_unchecked(x, R, b, state, backend, resets, return_state)


def _slstm_unchecked(x, R, b, state=None, backend: str = "auto", resets: Optional[torch.Tensor] = None,
                     return_state: bool = True):
    """:func:`slstm` without the input checks (see :func:`_mlstm_unchecked`)."""
    name = _pick_slstm_backend(backend, x)
    if name == "triton" and x.shape[1] == 0:
        name = "recurrent"  # nothing to run: the state passes through
    if name == "reference":
        from .slstm_forms.reference import slstm_reference
        h, st = slstm_reference(x, R, b, state, resets)
    elif name == "triton":
        from .slstm_forms.triton import slstm_triton
        h, st = slstm_triton(x, R, b, state, resets)
    else:
        from .slstm_forms.recurrent import slstm_recurrent
        h, st = slstm_recurrent(x, R, b, state, resets)
    return (h, st) if return_state else h
