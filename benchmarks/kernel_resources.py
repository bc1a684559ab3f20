"""Registers, spill stack and shared memory of every mLSTM Triton kernel for sm_90 (Hopper), without a GPU.

    python benchmarks/kernel_resources.py            # the default tilings of shapes A and B

Compiles each kernel with the installed Triton down to a cubin (as tests/ops/test_mlstm_triton.py's AOT test does)
and reads its resource usage with the cuobjdump that ships with Triton. A non-zero STACK means registers spilled
to local memory: a cheap, offline first check of a kernel change before spending GPU time on it (it does not say
how fast the kernel is). Numbers are for the installed Triton; the H200 runs Triton 3.6.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import triton

from fastxlstm.ops.mlstm_forms.triton import _chunkwise as ck
from fastxlstm.ops.mlstm_forms.triton import _step as st
from fastxlstm.ops.mlstm_forms.triton._aot import compile_for

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resources(fn, constexprs: dict, num_warps: int, num_stages: int) -> dict:
    k = compile_for(fn, constexprs, num_warps=num_warps, num_stages=num_stages)
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as fh:
        fh.write(k.asm["cubin"])
    out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", fh.name], capture_output=True, text=True).stdout
    os.unlink(fh.name)
    got = {"smem": k.metadata.shared}
    for key, pat in (("regs", r"REG:(\d+)"), ("stack", r"STACK:(\d+)")):
        m = re.search(pat, out)
        got[key] = int(m.group(1)) if m else None
    return got


def main() -> None:
    if not os.path.exists(CUOBJDUMP):
        sys.exit(f"no cuobjdump at {CUOBJDUMP}: this Triton install cannot report resources")
    print(f"triton {triton.__version__}, sm_90; bf16 inputs")
    print(f"{'kernel':22s} {'shape':6s} {'regs':>5s} {'stack':>6s} {'smem':>7s}")
    for shape, (DQK, DV) in (("A", (128, 128)), ("B", (256, 512))):
        cfg = ck.default_config(DQK, DV)
        base = dict(DQK=DQK, DV=DV, L=cfg.chunk, IP="ieee", UP=False)
        BK, BV = min(cfg.block_k, DQK), min(cfg.block_v, DV)
        par = dict(base, BT=cfg.block_t, BK=BK, BV=BV)
        state = dict(base, BK=cfg.block_k_state, BV=cfg.block_v_state)
        jobs = [
            ("_fwd_state_kernel", ck._fwd_state_kernel, dict(state, HAS_STATE=True), "state"),
            ("_fwd_out_kernel", ck._fwd_out_kernel, par, "par"),
            ("_bwd_state_kernel", ck._bwd_state_kernel, dict(state, HAS_DSTATE=True), "state"),
            ("_bwd_dq_kernel", ck._bwd_dq_kernel, dict(par, SPLIT=True), "par"),
            ("_bwd_dk_kernel", ck._bwd_dk_kernel, dict(par, SPLIT=True), "par"),
            ("_bwd_dv_kernel", ck._bwd_dv_kernel, par, "par"),
        ]
        for name, fn, cons, kind in jobs:
            nw = cfg.num_warps_state if kind == "state" else cfg.num_warps
            ns = cfg.num_stages_state if kind == "state" else cfg.num_stages
            r = resources(fn, cons, nw, ns)
            print(f"{name:22s} {shape:6s} {r['regs']!s:>5s} {r['stack']!s:>6s} {r['smem']:>7d}", flush=True)
    r = resources(st._step_kernel, dict(DQK=256, DV=512, BK=64, BV=64), 4, 2)
    print(f"{'_step_kernel':22s} {'7B':6s} {r['regs']!s:>5s} {r['stack']!s:>6s} {r['smem']:>7d}")


if __name__ == "__main__":
    main()
