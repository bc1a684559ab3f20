"""Ahead-of-time compilation of the mLSTM kernels for a GPU that is not here (developer tooling).

Used by the tests (every kernel must compile for Hopper with the installed Triton) and by
benchmarks/kernel_resources.py (registers / spills without a GPU). Not imported by the library itself.
"""
from __future__ import annotations

# pointer arguments that carry the 16-bit input dtype; the other pointers are fp32 (int32 / int8 where named)
HALF_PTRS = {"q_ptr", "k_ptr", "v_ptr", "h_ptr", "Cbuf_ptr", "dCbuf_ptr", "dh_ptr", "dq_ptr", "dk_ptr", "dv_ptr"}


# stride arguments of the chunkwise kernels: (batch, head, token) strides of q, k, v, h, dh, dq, dk, dv
STRIDE_SUFFIXES = ("_sb", "_sh", "_st")


def compile_for(fn, constexprs: dict, num_warps: int = 4, num_stages: int = 2, arch: int = 90, dtype: str = "bf16",
                aligned: bool = True):
    """Compiles the @triton.jit kernel ``fn`` for CUDA compute capability ``arch`` down to a cubin and returns
    Triton's compiled kernel (``.asm["cubin"]``, ``.metadata``). Runtime arguments get the types our launchers
    pass: 16-bit (``dtype``) q/k/v/h-like pointers, fp32 other pointers, i32 sizes and strides, fp32 scalars.
    ``aligned``: pointers and strides marked divisible by 16, as Triton's launcher specialises them at run time
    for the usual shapes (16-byte aligned buffers, head dims that are multiples of 16)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, attrs = {}, {}
    for idx, a in enumerate(fn.arg_names):
        if a.endswith("_ptr"):
            sig[a] = "*" + dtype if a in HALF_PTRS else {"seg_ptr": "*i32", "r_ptr": "*i8"}.get(a, "*fp32")
        elif a in ("S", "NC", "NH", "BH", "R") or a.endswith(STRIDE_SUFFIXES):
            sig[a] = "i32"
        elif a in ("scale", "eps"):
            sig[a] = "fp32"
        else:
            sig[a] = "constexpr"
        if aligned and (a.endswith("_ptr") or a.endswith(STRIDE_SUFFIXES)):
            attrs[(idx,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})
