"""The Triton mLSTM kernels on a CUDA GPU at real head sizes, against the float64 step-by-step reference.

Run on the device machine: pytest -q tests/gpu/test_mlstm_triton_gpu.py (skipped without CUDA).
Tolerances (relative L2 error): bf16 < 1e-2, fp32 with IEEE dots (TF32 off) < 1e-4.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import leaf_state, make_leaves, make_mlstm_case, output_grads, rel_err  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TOL = {torch.bfloat16: 1e-2, torch.float32: 1e-4}

# (B, NH, S, DQK, DV, with_state, resets)
SHAPES = [
    (2, 2, 301, 128, 128, True, True),
    (1, 2, 389, 256, 512, True, False),
    (2, 1, 257, 64, 256, False, True),
    (1, 1, 150, 512, 64, True, False),
]


def _resets(B, S, device):
    g = torch.Generator().manual_seed(7)
    r = torch.rand(B, S, generator=g) < 0.01
    r[0, 0] = True
    r[-1, min(S - 1, 128)] = True  # exactly on a chunk boundary of the default tiling
    r[-1, min(S - 1, 129)] = True
    return r.to(device)


def _run(case, fn, dtype, resets):
    c = case.cast(dtype)
    leaves = make_leaves(c, device="cuda")
    h, (C, n, m) = fn(leaves["q"], leaves["k"], leaves["v"], leaves["i"], leaves["f"], leaf_state(c, leaves), resets)
    out = {"h": h, "C": C, "n": n, "m": m}
    out.update({"d_" + k: g for k, g in output_grads(case, leaves, h, C, n).items()})
    return out


@pytest.fixture(autouse=True)
def _ieee_fp32():
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # fp32 inputs -> IEEE dots in the kernels
    yield
    torch.set_float32_matmul_precision(old)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])))
def test_sequence_vs_reference(shape, dtype):
    from fastxlstm.ops.mlstm_forms.reference import mlstm_reference
    from fastxlstm.ops.mlstm_forms.triton import mlstm_triton
    B, NH, S, DQK, DV, with_state, with_resets = shape
    case = make_mlstm_case(B, NH, S, DQK, DV, seed=S + DQK, with_state=with_state).cast(dtype).up()
    resets = _resets(B, S, "cuda") if with_resets else None
    got = _run(case, lambda q, k, v, i, f, s, r: mlstm_triton(q, k, v, i, f, s, 1e-6, r), dtype,
               resets)
    ref = _run(case, lambda q, k, v, i, f, s, r: mlstm_reference(q, k, v, i, f, s, 1e-6, r), torch.float64,
               resets)
    errs = {k: rel_err(got[k], ref[k]) for k in ref}
    for k, t in got.items():
        assert torch.isfinite(t).all(), f"{k} has non-finite values"
    bad = {k: v for k, v in errs.items() if not v < TOL[dtype]}
    assert not bad, f"over {TOL[dtype]}: {bad}; all: {errs}"


def _cache_size(kernel) -> int:
    caches = getattr(kernel, "device_caches", None)
    if caches is not None:
        return sum(len(v[0]) for v in caches.values())
    return sum(len(v) for v in getattr(kernel, "cache", {}).values())


def test_new_lengths_and_batches_do_not_recompile():
    from fastxlstm.ops.mlstm_forms.triton import _chunkwise as ck
    from fastxlstm.ops.mlstm_forms.triton import mlstm_triton
    kernels = [ck._scalars_kernel, ck._fwd_state_kernel, ck._fwd_out_kernel]

    def call(B, S):
        q = torch.randn(B, 2, S, 64, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(B, 2, S, 64, device="cuda", dtype=torch.bfloat16)
        g = torch.randn(B, 2, S, device="cuda")
        mlstm_triton(q, q, v, g, g + 3)

    call(1, 100)
    before = [_cache_size(kn) for kn in kernels]
    for B, S in ((3, 517), (2, 1000), (5, 33), (1, 4099)):
        call(B, S)
    torch.cuda.synchronize()
    assert [_cache_size(kn) for kn in kernels] == before


@pytest.mark.parametrize("B", [1, 64, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_step_vs_reference(B, dtype):
    from fastxlstm.ops import mlstm_step
    from fastxlstm.ops.mlstm_forms.reference import mlstm_step_reference
    NH, DQK, DV = 8, 256, 512
    g = torch.Generator(device="cuda").manual_seed(B)
    x = [torch.randn(B, NH, d, device="cuda", generator=g).to(dtype) for d in (DQK, DQK, DV)]
    i = 2 * torch.randn(B, NH, device="cuda", generator=g)
    f = 2 * torch.randn(B, NH, device="cuda", generator=g) + 2
    C = torch.randn(B, NH, DQK, DV, device="cuda", generator=g)
    n = torch.randn(B, NH, DQK, device="cuda", generator=g)
    m = torch.randn(B, NH, device="cuda", generator=g)
    C_copy = C.clone()
    h, (C1, n1, m1) = mlstm_step(*x, i.to(dtype), f.to(dtype), (C, n, m), backend="triton")
    assert torch.equal(C, C_copy), "the input state was modified"
    ref = mlstm_step_reference(*(t.double() for t in x), i.to(dtype).double(), f.to(dtype).double(),
                               (C.double(), n.double(), m.double()))
    hr, (Cr, nr, mr) = ref
    assert h.dtype == dtype and C1.dtype == torch.float32
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert rel_err(h, hr) < tol
    for a, b in ((C1, Cr), (n1, nr), (m1, mr)):
        assert rel_err(a, b) < 1e-5


def test_public_op_dispatches_to_triton():
    from fastxlstm.ops import mlstm
    from fastxlstm.ops.mlstm_forms.triton import mlstm_triton
    g = torch.Generator(device="cuda").manual_seed(3)
    q, k = (torch.randn(2, 2, 77, 64, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(2, 2, 77, 128, device="cuda", generator=g, dtype=torch.bfloat16)
    i, f = torch.randn(2, 2, 77, device="cuda", generator=g), torch.randn(2, 2, 77, device="cuda", generator=g) + 3
    h1, (C1, n1, m1) = mlstm(q, k, v, i, f, backend="triton")
    h2, (C2, n2, m2) = mlstm_triton(q, k, v, i, f)
    assert torch.equal(h1, h2) and torch.equal(C1, C2) and torch.equal(m1, m2)
