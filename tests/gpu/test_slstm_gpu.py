"""The Triton sLSTM kernels on a CUDA GPU at real sizes, against the float64 step-by-step reference (a shorter S,
the reference is a Python loop), plus a long sequence against the float64 recurrent form, the decoding step, and
a model with sLSTM blocks (Triton vs PyTorch, gradients included).

Run on the device machine: pytest -q tests/gpu/test_slstm_gpu.py (skipped without CUDA).
Tolerances (relative L2 error): bf16 < 1.5e-2, fp32 with IEEE dots (TF32 off) < 1e-4.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import make_slstm_case, rel_err  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TOL = {torch.bfloat16: 1.5e-2, torch.float32: 1e-4}

# (B, S, NH, DH, with_state, resets, extreme gates)
SHAPES = [
    (16, 128, 4, 256, True, True, False),   # the paper's sLSTM at E=1024
    (16, 160, 8, 128, False, True, False),
    (16, 160, 16, 64, True, False, True),
    (3, 97, 2, 32, True, True, True),       # B not a multiple of the batch tile
    (1, 64, 4, 16, False, False, False),
    (40, 33, 2, 64, True, True, False),     # several batch tiles
]


def _resets(B, S):
    g = torch.Generator().manual_seed(7)
    r = torch.rand(B, S, generator=g) < 0.02
    r[0, 0] = True
    r[-1, S // 2] = r[-1, S // 2 + 1] = True
    return r.cuda()


def _case(B, S, NH, DH, with_state, extreme, seed=0):
    case = make_slstm_case(B, S, NH, DH, seed=seed, with_state=with_state)
    if extreme:  # input gate in [-200, 30], forget gate in [-30, 30]
        g = torch.Generator().manual_seed(seed + 1)
        x = case.tensors["x"]
        x[:, :, 0] = torch.rand(x[:, :, 0].shape, generator=g, dtype=torch.float64) * 230.0 - 200.0
        x[:, :, 1] = torch.rand(x[:, :, 1].shape, generator=g, dtype=torch.float64) * 60.0 - 30.0
    return case


def _run(case, backend, x_dtype, w_dtype, resets, with_state, grad=True):
    from fastxlstm.ops import slstm
    L = {k: v.detach().clone().cuda().to(x_dtype if k == "x" else w_dtype).requires_grad_(grad and k != "m0")
         for k, v in case.tensors.items()}
    state = (L["c0"], L["n0"], L["m0"], L["h0"]) if with_state else None
    h, (c, n, m, hl) = slstm(L["x"], L["R"], L["b"], state=state, backend=backend, resets=resets)
    scale = torch.exp(m.detach().double())
    out = {"h": h, "c_true": c.double() * scale, "n_true": n.double() * scale, "h_last": hl}
    if grad:
        go = {k: v.cuda() for k, v in case.grads_out.items()}
        loss = ((h.double() * go["h"]).sum() + (out["c_true"] * go["c"]).sum() + (out["n_true"] * go["n"]).sum()
                + (hl.double() * go["h_last"]).sum())
        names = [k for k in L if k != "m0"]
        out.update({"d_" + k: g for k, g in zip(names, torch.autograd.grad(loss, [L[k] for k in names]))})
    return out


@pytest.fixture(autouse=True)
def _ieee_fp32():
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # fp32 inputs -> IEEE dots in the kernels
    yield
    torch.set_float32_matmul_precision(old)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:4])))
def test_triton_vs_reference(shape, dtype):
    B, S, NH, DH, with_state, has_resets, extreme = shape
    case = _case(B, S, NH, DH, with_state, extreme)
    case.tensors["x"] = case.tensors["x"].to(dtype).double()  # the reference sees the rounded inputs
    resets = _resets(B, S) if has_resets else None
    got = _run(case, "triton", dtype, torch.float32, resets, with_state)
    ref = _run(case, "reference", torch.float64, torch.float64, resets, with_state)
    assert got["h"].dtype == dtype
    errs = {k: rel_err(got[k], ref[k]) for k in ref}
    bad = {k: v for k, v in errs.items() if not v < TOL[dtype]}
    assert not bad, f"relative errors over {TOL[dtype]}: {bad} (all: {errs})"
    for k, v in got.items():
        assert torch.isfinite(v).all(), k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("DH", [256, 64])
def test_long_sequence_vs_float64(DH, dtype):
    """S = 2048 forward (no drift over a long recurrence), extreme gates and resets, against the float64
    recurrent form (itself tested to 1e-10 against the reference)."""
    B, S, NH = 16, 2048, 1024 // DH
    case = _case(B, S, NH, DH, True, True, seed=3)
    case.tensors["x"] = case.tensors["x"].to(dtype).double()
    resets = _resets(B, S)
    with torch.no_grad():
        got = _run(case, "triton", dtype, torch.float32, resets, True, grad=False)
        ref = _run(case, "recurrent", torch.float64, torch.float64, resets, True, grad=False)
    errs = {k: rel_err(got[k], ref[k]) for k in ref}
    assert all(v < TOL[dtype] for v in errs.values()), errs


@pytest.mark.parametrize("DH", [256, 64, 16])
def test_decode_steps_equal_one_pass(DH):
    """S one-token calls (the generation path, no autograd) give the sequence call's outputs and final state."""
    from fastxlstm.ops import slstm
    B, S, NH = 5, 24, max(1, 512 // DH)
    case = _case(B, S, NH, DH, True, False, seed=5)
    t = {k: v.cuda().float() for k, v in case.tensors.items()}
    x = t["x"].to(torch.bfloat16)
    st = (t["c0"], t["n0"], t["m0"], t["h0"])
    with torch.no_grad():
        h_all, fin = slstm(x, t["R"], t["b"], state=st, backend="triton")
        hs = []
        for i in range(S):
            h_i, st = slstm(x[:, i:i + 1], t["R"], t["b"], state=st, backend="triton")
            hs.append(h_i)
    assert rel_err(torch.cat(hs, dim=1), h_all) < 1e-6  # the same arithmetic (S = 1 is its own specialisation)
    for a, b in zip(st, fin):
        assert rel_err(a, b) < 1e-6


def test_model_with_slstm_blocks_triton_vs_pytorch():
    """A small xLSTM[1:1] model (sLSTM head dim 64) on CUDA: logits and parameter gradients with the Triton sLSTM
    match the PyTorch recurrent form (fp32, IEEE)."""
    from fastxlstm.models.xlstm_lm import XLSTMLM, XLSTMLMConfig
    torch.manual_seed(0)
    outs = {}
    for backend in ("triton", "recurrent"):
        torch.manual_seed(0)
        cfg = XLSTMLMConfig(vocab_size=256, embedding_dim=128, num_blocks=2, slstm_at=(1,), num_heads=2,
                            slstm_num_heads=2, chunk_size=16, slstm_backend=backend)
        model = XLSTMLM(cfg).cuda()
        with torch.no_grad():  # a non-zero recurrent kernel, so that memory mixing is exercised
            for mod in model.modules():
                if hasattr(mod, "recurrent_kernel"):
                    mod.recurrent_kernel.normal_(0, 0.1)
        ids = torch.randint(0, 256, (3, 77), generator=torch.Generator().manual_seed(1)).cuda()
        out = model(ids)
        logits = out.logits if hasattr(out, "logits") else out[0]
        logits.float().pow(2).mean().backward()
        outs[backend] = (logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                                           if p.grad is not None})
    lt, gt = outs["triton"]
    lr, gr = outs["recurrent"]
    assert rel_err(lt, lr) < 1e-5
    worst = max(rel_err(gt[k], gr[k]) for k in gr)
    assert worst < 1e-4, worst


@pytest.mark.parametrize("cfg_name", ["split8_B300", "split4_DH128", "split16", "stepwise_fallback"])
def test_split_kernels_barrier_vs_stepwise_and_reference(cfg_name):
    """The split kernels with their in-kernel group barrier equal the same kernels launched once per step (no
    barrier: the arithmetic the CPU interpreter tests check) bit for bit, and the float64 reference within
    tolerance; B = 300 (19 batch tiles: fewer batch programs than tiles, each looping over several), many heads
    (more programs than SMs: the stepwise fallback), gradients included."""
    from fastxlstm.ops.slstm_forms.triton import slstm_triton
    from fastxlstm.ops.slstm_forms.triton._kernels import SLSTMTritonConfig, _split_grid
    B, S, NH, DH, P = {"split8_B300": (300, 67, 4, 256, 8), "split4_DH128": (16, 131, 8, 128, 4),
                       "split16": (5, 64, 4, 256, 16), "stepwise_fallback": (3, 29, 72, 64, 2)}[cfg_name]
    cfg = SLSTMTritonConfig(split=P)
    _, GB, sync = _split_grid(B, S, NH, cfg, torch.device("cuda"))
    assert sync == (cfg_name != "stepwise_fallback")
    if cfg_name == "split8_B300":
        assert GB < (B + 15) // 16
    case = _case(B, S, NH, DH, True, True, seed=11)
    case.tensors["x"] = case.tensors["x"].to(torch.bfloat16).double()
    resets = _resets(B, S)
    t = {k: v.cuda() for k, v in case.tensors.items()}
    outs = {}
    for mode, c in (("barrier", cfg), ("stepwise", SLSTMTritonConfig(split=P, stepwise=True))):
        L = {k: v.detach().clone().to(torch.bfloat16 if k == "x" else torch.float32).requires_grad_(k != "m0")
             for k, v in t.items()}
        h, (c_, n_, m_, hl) = slstm_triton(L["x"], L["R"], L["b"], (L["c0"], L["n0"], L["m0"], L["h0"]), resets, c)
        go = {k: v.cuda() for k, v in case.grads_out.items()}
        loss = (h.double() * go["h"]).sum() + (c_.double() * go["c"]).sum() + (hl.double() * go["h_last"]).sum()
        names = ["x", "R", "b", "c0", "n0", "h0"]
        grads = torch.autograd.grad(loss, [L[k] for k in names])
        outs[mode] = [h, c_, n_, m_, hl] + list(grads)
    for a, b in zip(outs["barrier"], outs["stepwise"]):
        assert torch.isfinite(a).all()
        assert torch.equal(a, b)
    if cfg_name != "stepwise_fallback":  # (the reference at 72 heads is slow; the fallback is the same kernel)
        ref = _run(case, "reference", torch.float64, torch.float64, resets, True)
        got = _run(case, "triton", torch.bfloat16, torch.float32, resets, True)
        errs = {k: rel_err(got[k], ref[k]) for k in ref}
        assert all(v < TOL[torch.bfloat16] for v in errs.values()), errs
