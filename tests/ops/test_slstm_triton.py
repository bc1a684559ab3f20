"""The Triton sLSTM kernels on CPU through the Triton interpreter (TRITON_INTERPRET=1), against the float64
step-by-step reference: outputs, final state (compared as the true c exp(m), n exp(m)) and every gradient (x, R,
b, initial c, n, h), with resets, initial states, extreme gate values, several tilings, fp32/bf16/fp16 inputs.

TRITON_INTERPRET must be set before triton's JIT functions are created and must not leak into other tests of the
process, so the checks run in one subprocess (this file run as a script with the variable set) that prints the
measured relative errors as JSON; the tests below assert on them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

# name -> (B, S, NH, DH, dtype, with_state, resets, gates, tiling)
#   B = 3 is not a multiple of the batch tile (16): rows are masked
#   tiling "default": the launcher's choice (up to DH 64: one tile, R held in registers; DH 128: split kernels);
#   "j16k16" / "j16k32" / "tiled_large": several output tiles and reduction chunks per step in one program per
#   head; "split*": a head's units over several programs (in the interpreter: one launch per step, no barrier)
CASES = {
    "fp32_fresh_S7_DH16": (3, 7, 2, 16, "float32", False, None, "normal", "default"),
    "fp32_state_resets_S19_DH32": (3, 19, 2, 32, "float32", True, "mixed", "normal", "default"),
    "fp32_state_resets_S19_DH32_tiled": (3, 19, 2, 32, "float32", True, "mixed", "normal", "j16k16"),
    "fp32_extreme_state_resets_S19_DH32_tiled": (3, 19, 2, 32, "float32", True, "mixed", "extreme", "j16k32"),
    "fp32_extreme_fresh_S7_DH16": (3, 7, 2, 16, "float32", False, None, "extreme", "default"),
    "bf16_state_resets_S19_DH32_tiled": (3, 19, 2, 32, "bfloat16", True, "mixed", "normal", "j16k16"),
    "bf16_extreme_fresh_resets_S7_DH16": (3, 7, 2, 16, "bfloat16", False, "mixed", "extreme", "default"),
    "fp16_state_S7_DH32": (3, 7, 2, 32, "float16", True, None, "normal", "default"),
    "fp32_step_S1_DH32_state": (3, 1, 2, 32, "float32", True, None, "normal", "default"),
    # the one-program-per-head tiling of large heads (tiles of 64 units, chunks of 64: 2 x 2 per step)
    "bf16_tiled_j64k64_S6_DH128": (3, 6, 1, 128, "bfloat16", True, "mixed", "normal", "tiled_large"),
    # the default of large heads: the split kernels (4 programs of 32 units at DH 128)
    "bf16_default_S5_DH128": (3, 5, 1, 128, "bfloat16", True, "mixed", "normal", "default"),
    # the split kernels (a head's units over 2 / 4 programs, R's slice held on chip; here one launch per step)
    "fp32_state_resets_S19_DH32_split2": (3, 19, 2, 32, "float32", True, "mixed", "normal", "split2"),
    "bf16_extreme_state_resets_S11_DH64_split4": (3, 11, 2, 64, "bfloat16", True, "mixed", "extreme", "split4"),
    "fp16_fresh_S7_DH32_split2": (3, 7, 1, 32, "float16", False, None, "normal", "split2"),
    # 35 rows = 3 batch tiles taken by ONE program per (head, unit slice): the loop over batch tiles
    "fp32_B35_state_resets_S9_DH32_split2_onebatchprogram": (35, 9, 2, 32, "float32", True, "mixed", "normal",
                                                             "split2_gb1"),
    "fp32_step_S1_DH32_state_split2": (3, 1, 2, 32, "float32", True, None, "normal", "split2"),
}
# a few times the worst measured error of each dtype (Triton 3.9 interpreter: fp32 7.3e-7 (d_x, extreme gates),
# bf16 3.3e-3 (d_R), fp16 5.2e-4 (d_h0))
TOL = {"float32": 5e-6, "bfloat16": 1.5e-2, "float16": 2e-3}


def _resets(kind, B, S):
    import torch
    if kind is None:
        return None
    r = torch.zeros(B, S, dtype=torch.bool)
    r[0, 0] = True  # at the very start: the initial state is discarded
    if S > 4:
        r[1, 3] = r[1, 4] = True  # consecutive
        r[2, S - 1] = True  # at the last step
    return r


def _run(tensors, grads_out, fn, x_dtype, w_dtype, resets, with_state):
    import torch
    L = {k: v.detach().clone().to(x_dtype if k == "x" else w_dtype).requires_grad_(k != "m0")
         for k, v in tensors.items()}
    state = (L["c0"], L["n0"], L["m0"], L["h0"]) if with_state else None
    h, (c, n, m, hl) = fn(L["x"], L["R"], L["b"], state, resets)
    scale = torch.exp(m.detach().double())
    c_true, n_true = c.double() * scale, n.double() * scale
    loss = ((h.double() * grads_out["h"]).sum() + (c_true * grads_out["c"]).sum() + (n_true * grads_out["n"]).sum()
            + (hl.double() * grads_out["h_last"]).sum())
    names = [k for k in L if k != "m0"]
    gs = torch.autograd.grad(loss, [L[k] for k in names])
    out = {"h": h, "c_true": c_true, "n_true": n_true, "h_last": hl}
    out.update({"d_" + k: g for k, g in zip(names, gs)})
    return out


def _worker() -> dict:
    """Runs inside the subprocess (TRITON_INTERPRET=1)."""
    import torch

    sys.path.insert(0, os.path.dirname(HERE))
    from helpers import make_slstm_case, rel_err
    from fastxlstm.ops.slstm_forms.reference import slstm_reference
    from fastxlstm.ops.slstm_forms.triton import slstm_triton
    from fastxlstm.ops.slstm_forms.triton._kernels import TILED_LARGE_HEAD, SLSTMTritonConfig

    tilings = {"default": None, "j16k16": SLSTMTritonConfig(block_j=16, block_k=16),
               "j16k32": SLSTMTritonConfig(block_j=16, block_k=32),
               "split2": SLSTMTritonConfig(split=2), "split4": SLSTMTritonConfig(split=4),
               "split2_gb1": SLSTMTritonConfig(split=2, batch_programs=1),
               "tiled_large": TILED_LARGE_HEAD}
    results = {}
    for idx, (name, (B, S, NH, DH, dt, with_state, rk, gates, tiling)) in enumerate(CASES.items()):
        dtype = getattr(torch, dt)
        case = make_slstm_case(B, S, NH, DH, seed=10 + idx, with_state=with_state)
        t = dict(case.tensors)
        if gates == "extreme":  # input gate in [-200, 30], forget gate in [-30, 30] (pre-activations before h R)
            g = torch.Generator().manual_seed(idx)
            x = t["x"].clone()
            x[:, :, 0] = torch.rand(x[:, :, 0].shape, generator=g, dtype=torch.float64) * 230.0 - 200.0
            x[:, :, 1] = torch.rand(x[:, :, 1].shape, generator=g, dtype=torch.float64) * 60.0 - 30.0
            t["x"] = x
        t["x"] = t["x"].to(dtype).double()  # the reference sees exactly the rounded inputs
        resets = _resets(rk, B, S)
        cfg = tilings[tiling]
        got = _run(t, case.grads_out, lambda x, R, b, s, r: slstm_triton(x, R, b, s, r, cfg), dtype,
                   torch.float32, resets, with_state)
        ref = _run(t, case.grads_out, slstm_reference, torch.float64, torch.float64, resets, with_state)
        errs = {k: rel_err(got[k], ref[k]) for k in ref}
        errs["finite"] = all(bool(torch.isfinite(v).all()) for v in got.values())
        errs["h_dtype_ok"] = got["h"].dtype == dtype
        # the no-grad path (a ring of two state slots, nothing saved: what decoding runs) gives the same numbers
        with torch.no_grad():
            st = tuple(t[k].float() for k in ("c0", "n0", "m0", "h0")) if with_state else None
            h2, (c2, n2, m2, hl2) = slstm_triton(t["x"].to(dtype), t["R"].float(), t["b"].float(), st, resets, cfg)
        errs["nograd_same"] = bool(torch.equal(h2, got["h"].detach())) and bool(torch.equal(hl2, got["h_last"]))
        results[name] = errs

    # item 3 of issue 11: a fresh or just-reset state gives an exact first step for any input gate value
    # (h = sigmoid(o) tanh(z); with m starting at 0, pre_i = -200 underflowed exp() and gave h = 0)
    B, S, NH, DH = 2, 3, 2, 16
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, S, 4, NH, DH, generator=g)
    x[:, :, 0] = torch.tensor([-200.0, -104.0, 60.0])[None, :, None, None]
    R = torch.randn(4, NH, DH, DH, generator=g) / 4
    b = torch.zeros(4, NH, DH)
    resets = torch.zeros(B, S, dtype=torch.bool)
    resets[:, 1] = resets[:, 2] = True  # every step starts from an empty state
    with torch.no_grad():
        h, _ = slstm_triton(x, R, b, None, resets)
    xd = x.double()
    want = torch.sigmoid(xd[:, :, 3]) * torch.tanh(xd[:, :, 2])
    results["first_step_exact"] = rel_err(h, want)

    # a GPU whose shared memory cannot hold the split kernels' slices (Triton raises OutOfResources at the first
    # launch) gets the one-program-per-head kernels instead, for the forward and the backward, and remembers it
    import triton.runtime.errors as terr
    from fastxlstm.ops.slstm_forms.triton import _kernels as K

    class _NoResources:
        def __getitem__(self, grid):
            def launch(*a, **k):
                raise terr.OutOfResources(262144, 232448, "shared memory")
            return launch

    case = make_slstm_case(3, 5, 1, 64, seed=99, with_state=True)
    xs = case.tensors["x"].float().requires_grad_()
    Rs = case.tensors["R"].float()
    bs = case.tensors["b"].float()
    h_t, _ = slstm_triton(xs, Rs, bs, None, None, K.TILED_LARGE_HEAD)
    (gx_t,) = torch.autograd.grad(h_t.sum(), [xs])
    saved = K._fwd_split_kernel, K._bwd_split_kernel
    K._fwd_split_kernel = K._bwd_split_kernel = _NoResources()
    try:
        h_s, _ = slstm_triton(xs, Rs, bs, None, None, SLSTMTritonConfig(split=2))
        (gx_s,) = torch.autograd.grad(h_s.sum(), [xs])
    finally:
        K._fwd_split_kernel, K._bwd_split_kernel = saved
    results["oor_fallback"] = {"same": bool(torch.equal(h_s, h_t) and torch.equal(gx_s, gx_t)),
                               "remembered": (64, torch.float32, SLSTMTritonConfig(split=2)) in K._TOO_BIG}
    K._TOO_BIG.clear()

    # inputs the kernels do not take are refused with a clear error
    refused = {}
    for label, shape, dtp in (("float64", (1, 2, 4, 1, 16), torch.float64), ("DH24", (1, 2, 4, 1, 24), torch.float32)):
        xx = torch.zeros(shape, dtype=dtp)
        DHx = shape[-1]
        try:
            slstm_triton(xx, torch.zeros(4, 1, DHx, DHx, dtype=dtp), torch.zeros(4, 1, DHx, dtype=dtp))
            refused[label] = "no error"
        except ValueError as e:
            refused[label] = str(e)
    results["refused"] = refused
    return results


@pytest.fixture(scope="module")
def interp_results():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker"], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"interpreter worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")][-1]
    return json.loads(line[len("RESULTS "):])


@pytest.mark.parametrize("name", list(CASES))
def test_kernels_match_reference(interp_results, name):
    errs = dict(interp_results[name])
    assert errs.pop("finite"), f"{name}: non-finite outputs or gradients"
    assert errs.pop("h_dtype_ok"), f"{name}: h is not in x's dtype"
    assert errs.pop("nograd_same"), f"{name}: the no-grad path gives other numbers than the autograd path"
    tol = TOL[CASES[name][4]]
    bad = {k: v for k, v in errs.items() if not v < tol}
    assert not bad, f"{name}: relative errors over {tol}: {bad} (all: {errs})"
    assert ("d_c0" in errs) == CASES[name][5]


def test_first_step_exact_for_any_input_gate(interp_results):
    assert interp_results["first_step_exact"] < 1e-6


def test_split_kernels_fall_back_when_out_of_shared_memory(interp_results):
    assert interp_results["oor_fallback"] == {"same": True, "remembered": True}


def test_unsupported_inputs_refused(interp_results):
    r = interp_results["refused"]
    assert "float16, bfloat16 or float32" in r["float64"], r
    assert "head dims" in r["DH24"], r


def test_import_is_lazy():
    code = ("import sys, importlib, fastxlstm, fastxlstm.ops; "
            "t = importlib.import_module('fastxlstm.ops.slstm_forms.triton'); "
            "assert callable(t.slstm_triton); print('triton' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def _aot_worker() -> None:
    """Compiles the kernels for sm_90 (Hopper) with the installed Triton, down to a cubin, without a GPU: the
    interpreter above checks the math, this checks that the real compiler accepts the kernels in the launchers'
    configurations (Triton 3.9 here; the GPU runs use 3.6)."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastxlstm.ops.slstm_forms.triton import _kernels as K

    def comp(fn, sig, cons, nw):
        # pointers 16-byte aligned, as the JIT specialises torch's allocations (vectorised, pipelined loads)
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if a.endswith("_ptr")}
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cons, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": nw, "num_stages": 3})
        assert len(k.asm["cubin"]) > 0
        print("compiled", fn.__name__, cons, flush=True)

    for DH, dt, tdt in ((256, "bf16", torch.bfloat16), (64, "bf16", torch.bfloat16), (32, "fp32", torch.float32)):
        cfg = K.default_config(DH, tdt) if DH <= 64 else K.TILED_LARGE_HEAD
        fsig = dict(x_ptr="*" + dt, R_ptr="*" + dt, b_ptr="*fp32", rst_ptr="*u8", st_ptr="*fp32", h_ptr="*" + dt,
                    g_ptr="*fp32", B="i32", S="i32", NS="i32", NH="i32")
        bsig = dict(g_ptr="*fp32", st_ptr="*fp32", rst_ptr="*u8", RT_ptr="*" + dt, dh_ptr="*" + dt, dg_ptr="*fp32",
                    cr_ptr="*fp32", B="i32", S="i32", NH="i32")
        common = dict(DH=DH, BB=cfg.block_b, BJ=cfg.block_j, BK=cfg.block_k, HAS_RESET=True,
                      IP="ieee", UP=False)
        for k in list(common) + ["SAVE_G", "HOIST"]:
            fsig[k] = "constexpr"
        for k in list(common) + ["HAS_DH"]:
            bsig[k] = "constexpr"
        comp(K._fwd_kernel, fsig, dict(common, SAVE_G=True, HOIST=cfg.hoist), cfg.num_warps)
        comp(K._bwd_kernel, bsig, dict(common, HAS_DH=True), cfg.num_warps)
    # the split kernels with their in-kernel group barrier (atomics + spin loop), as the launchers configure them
    for DH, dt, tdt, P in ((256, "bf16", torch.bfloat16, 8), (128, "bf16", torch.bfloat16, 4),
                           (64, "fp32", torch.float32, 2)):
        cfg = K.SLSTMTritonConfig(split=P)
        fsig = dict(x_ptr="*" + dt, R_ptr="*" + dt, b_ptr="*fp32", rst_ptr="*u8", st_ptr="*fp32", h_ptr="*" + dt,
                    g_ptr="*fp32", cnt_ptr="*i32", B="i32", S="i32", NS="i32", NH="i32", NBT="i32", T0="i32",
                    T1="i32")
        bsig = dict(g_ptr="*fp32", st_ptr="*fp32", rst_ptr="*u8", RT_ptr="*" + dt, dh_ptr="*" + dt, dg_ptr="*fp32",
                    cr_ptr="*fp32", cnt_ptr="*i32", B="i32", S="i32", NH="i32", NBT="i32", T0="i32", T1="i32")
        common = dict(DH=DH, BB=cfg.block_b, BJ=DH // P, HAS_RESET=True, SYNC=True, LIMIT=K._SPIN_LIMIT,
                      IP="ieee", UP=False)
        for k in list(common) + ["SAVE_G"]:
            fsig[k] = "constexpr"
        for k in list(common) + ["HAS_DH", "PHASES"]:
            bsig[k] = "constexpr"
        comp(K._fwd_split_kernel, fsig, dict(common, SAVE_G=True), cfg.num_warps)
        comp(K._bwd_split_kernel, bsig, dict(common, HAS_DH=True, PHASES=3), cfg.num_warps)
    print("AOT OK")


def test_kernels_compile_for_hopper():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--aot"], env=env, capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0 and "ptxas" in proc.stderr and ("not found" in proc.stderr or "No such" in proc.stderr):
        pytest.skip("this Triton install has no ptxas to compile with")
    assert proc.returncode == 0 and "AOT OK" in proc.stdout, proc.stderr[-4000:]


if __name__ == "__main__" and "--aot" in sys.argv:
    _aot_worker()

if __name__ == "__main__" and "--worker" in sys.argv:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    print("RESULTS " + json.dumps(_worker()))
