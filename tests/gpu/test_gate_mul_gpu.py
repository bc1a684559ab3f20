"""The fused act(a) * b kernel on the GPU: against float64 and the eager pair of kernels, on the packed layouts
of the 7B prefill (strided column slices), through the layers that use it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("act", ["silu", "sigmoid", "gelu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gate_mul_vs_float64(act, dtype):
    from fastxlstm.ops.gate_mul import gate_mul
    ref_fn = {"silu": F.silu, "sigmoid": torch.sigmoid, "gelu": F.gelu}[act]
    g = torch.Generator(device="cuda").manual_seed(0)
    for B, S, D in ((1, 4097, 10944), (2, 333, 4096), (3, 77, 1001)):
        packed = (3 * torch.randn(B, S, 2 * D, device="cuda", generator=g)).to(dtype)
        a, b = packed[..., :D], packed[..., D:]
        with torch.no_grad():
            y = gate_mul(a, b, act)
        ref = ref_fn(a.double()) * b.double()
        err = float((y.double() - ref).norm() / ref.norm())
        eager = float(((ref_fn(a) * b).double() - ref).norm() / ref.norm())
        assert y.is_contiguous() and y.dtype == dtype and y.shape == a.shape
        assert err <= eager * 1.05 + 1e-7, (B, S, D, err, eager)
