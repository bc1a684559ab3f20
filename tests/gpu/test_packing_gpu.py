"""Packed projections on a GPU: the CUDA-graph decoder (which packs by default) against the eager loop of an
UNPACKED copy of the model, in float32 (greedy tokens equal for 256 tokens) and bf16 (logits within tolerance,
also with the batch-1 Triton GEMV), .to("cuda") of a packed model, memory, and the FASTXLSTM_PACK=0 switch.

Run on the device machine: pytest -q tests/gpu/test_packing_gpu.py (skipped without CUDA).
"""
from __future__ import annotations

import copy

import pytest
import torch

import fastxlstm
from fastxlstm.generation import graph, pack_projections, unpack_projections
from fastxlstm.generation.packing import is_packed

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _large(dtype=torch.float32, layers=4, device="cuda", use_bias=False):
    torch.manual_seed(0)
    cfg = fastxlstm.XLSTMLargeConfig(vocab_size=512, hidden_size=256, num_hidden_layers=layers, num_heads=2,
                                     use_bias=use_bias)
    with torch.device(device):
        m = fastxlstm.XLSTMLarge(cfg)
    with torch.no_grad():  # random gates (the checkpoint init keeps them near constant)
        for blk in m.backbone.blocks:
            blk.mlstm_layer.igate_preact.weight.normal_(0, 0.1)
            blk.mlstm_layer.fgate_preact.weight.normal_(0, 0.1)
    return m.to(dtype).eval()


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("use_bias", [False, True])
def test_packed_graph_greedy_256_equals_unpacked_eager_fp32(monkeypatch, use_bias):
    ref = _large(use_bias=use_bias)
    model = copy.deepcopy(ref)
    ids = torch.randint(3, 512, (2, 33), device="cuda")
    monkeypatch.setenv("FASTXLSTM_PACK", "0")  # the eager loop packs the 7B architecture by default
    a = ref.generate(ids, 256, do_sample=False, use_cuda_graph=False)
    a1 = ref.generate(ids[:1], 256, do_sample=False, use_cuda_graph=False)
    monkeypatch.delenv("FASTXLSTM_PACK")
    b = model.generate(ids, 256, do_sample=False, use_cuda_graph=True)
    assert is_packed(model) and not is_packed(ref)
    assert torch.equal(a, b)
    c = model.generate(ids[:1], 256, do_sample=False, use_cuda_graph=True)  # B=1
    assert torch.equal(a1, c)


@pytest.mark.parametrize("gemv", ["0", "1", "auto"])
@pytest.mark.parametrize("B", [1, 5])
def test_packed_graph_logits_bf16(monkeypatch, gemv, B):
    """Logits mode of the packed (and, by default, compiled) graph against the unpacked eager forward, step by step
    on the same tokens, both measured against the float32 model with the same weights: the graph is as accurate
    as the eager bf16 path (other kernels, other roundings, not more error)."""
    monkeypatch.setenv("FASTXLSTM_GEMV", gemv)
    ref = _large(torch.bfloat16)
    model = copy.deepcopy(ref)
    ref32 = copy.deepcopy(ref).float()
    ids = torch.randint(3, 512, (B, 20), device="cuda")
    with torch.no_grad():
        logits, st = graph.prefill(model, ids, None)
        dec = graph.get_decoder(model, B, None, None, False, None, None)
        assert is_packed(model)
        dec.load(st, torch.zeros(B, dtype=torch.long, device="cuda"))
        out, out32 = ref(ids), ref32(ids)
        s16, s32 = out.state, out32.state
        err_graph = _rel(logits, out32.logits[:, -1])
        err_eager = _rel(out.logits[:, -1], out32.logits[:, -1])
        worst = _rel(logits, out.logits[:, -1])
        for _ in range(24):
            tok = torch.randint(3, 512, (B,), device="cuda")
            r, r32 = ref(tok[:, None], state=s16), ref32(tok[:, None], state=s32)
            s16, s32 = r.state, r32.state
            got = dec.step_logits(tok)
            worst = max(worst, _rel(got, r.logits[:, -1]))
            err_graph = max(err_graph, _rel(got, r32.logits[:, -1]))
            err_eager = max(err_eager, _rel(r.logits[:, -1], r32.logits[:, -1]))
    print(f"bf16 packed graph, B={B}, gemv={gemv}: worst logits rel err vs unpacked eager {worst:.2e}; vs float32: "
          f"graph {err_graph:.2e}, eager {err_eager:.2e}")
    assert err_graph <= 1.5 * err_eager + 2e-3
    assert worst < 5e-2


def test_to_cuda_keeps_packing_and_memory():
    cpu = _large(torch.float32, device="cpu")
    ref = copy.deepcopy(cpu).to("cuda")
    base = torch.cuda.memory_allocated()
    pack_projections(cpu)
    torch.cuda.synchronize()
    model = cpu.to("cuda")
    assert is_packed(model)
    layer = model.backbone.blocks[0].mlstm_layer
    assert layer.q.weight.is_cuda and layer.q.weight.untyped_storage().data_ptr() == \
        layer.fgate_preact.weight.untyped_storage().data_ptr()
    grown = torch.cuda.memory_allocated() - base
    ref_bytes = sum(p.numel() * p.element_size() for p in ref.parameters())
    assert abs(grown - ref_bytes) < 0.01 * ref_bytes, (grown, ref_bytes)  # one copy of the weights, not two
    ids = torch.randint(3, 512, (2, 9), device="cuda")
    with torch.no_grad():
        assert _rel(model(ids).logits, ref(ids).logits) < 1e-5
    before = torch.cuda.memory_allocated()
    model.to(torch.bfloat16)
    assert is_packed(model)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= before  # the float32 packed tensors were freed
    unpack_projections(model)
    assert not is_packed(model)


def test_pack_switch_off(monkeypatch):
    monkeypatch.setenv("FASTXLSTM_PACK", "0")
    ref = _large()
    model = copy.deepcopy(ref)
    ids = torch.randint(3, 512, (3, 12), device="cuda")
    b = model.generate(ids, 64, do_sample=False, use_cuda_graph=True)
    assert not is_packed(model)
    assert torch.equal(b, ref.generate(ids, 64, do_sample=False, use_cuda_graph=False))
