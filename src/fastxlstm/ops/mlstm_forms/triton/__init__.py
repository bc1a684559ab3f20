"""Triton kernels for the mLSTM (CUDA; the CPU interpreter TRITON_INTERPRET=1 runs them too, for tests).

    mlstm_triton(q, k, v, i, f, state, eps, resets, chunk_size) -> (h, (C, n, m))
    mlstm_step_triton(q, k, v, i, f, state, eps) -> (h, (C, n, m))

Both are differentiable (torch.autograd.Function). triton is imported only when one of them is first called, so
``import fastxlstm`` stays light. The kernels live in _chunkwise.py (sequence) and _step.py (decode step).
fp32 inputs use IEEE fp32 dot products unless ``torch.set_float32_matmul_precision`` allows TF32.
"""
from __future__ import annotations

from typing import Optional


def mlstm_triton(q, k, v, i, f, state=None, eps: float = 1e-6, resets=None, chunk_size: Optional[int] = None):
    """Chunkwise mLSTM over a sequence (inputs validated by fastxlstm.ops.mlstm).

    q, k: (B, NH, S, DQK); v: (B, NH, S, DV); i, f: (B, NH, S); state None or (C (B, NH, DQK, DV), n (B, NH, DQK),
    m (B, NH)); resets None or (B, S) bool. Returns h (B, NH, S, DV) in q's dtype and (C, n, m) in float32.
    ``chunk_size``: the kernels' chunk length (the state is stored every chunk_size tokens), a power of two in
    [16, 256]. None or the default 64 means "tuned" for 16-bit inputs on CUDA: 64 where the batch x heads fill the
    GPU, 128 (with narrower state tiles) for long sequences at small batch, 128 for heads with DQK * DV >= 256^2 (fewer
    sequential steps in the state kernels; measured, see ``_chunkwise.auto_tiling``), the same results up to
    rounding; ``FASTXLSTM_MLSTM_CHUNK=N`` fixes N. Any S works (no padding needed by the caller), and S is not a
    compile-time constant, so new lengths do not recompile.
    """
    from ._chunkwise import default_config, mlstm_chunkwise_triton, tiling_for, with_state_tile
    L, bvs = tiling_for(chunk_size, q, v.shape[-1])
    cfg = with_state_tile(default_config(q.shape[-1], v.shape[-1], chunk=L), bvs)
    return mlstm_chunkwise_triton(q, k, v, i, f, state, eps, resets, cfg)


def mlstm_step_triton(q, k, v, i, f, state, eps: float = 1e-6):
    """One fused decode step: q, k (B, NH, DQK); v (B, NH, DV); i, f (B, NH); state (C, n, m), never None.
    Returns h (B, NH, DV) in q's dtype and the new state in float32 (the inputs are not modified)."""
    from ._step import mlstm_step_triton_impl
    return mlstm_step_triton_impl(q, k, v, i, f, state, eps)


__all__ = ["mlstm_triton", "mlstm_step_triton"]
