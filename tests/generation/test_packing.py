"""Packed projections (fastxlstm.generation.pack_projections): the same function as the unpacked model over a
multi-step decode, no extra memory, and everything around a model keeps working on a packed one (autograd, save /
load, load_state_dict, .to(), unpacking, the transformers export, the CUDA-graph decoder's default and switch).

Measured on the CPU (torch 2.13), packed vs unpacked over 7 prompt tokens + 12 decode steps, worst relative error
over logits and states: float64 6e-16, float32 6e-7 (bf16 logits: 0 here, the same kernels per row block); the
tolerances below are a few times those."""
from __future__ import annotations

import copy

import pytest
import torch

import fastxlstm
from fastxlstm.generation import graph, pack_projections, unpack_projections
from fastxlstm.generation.packing import is_packed
from fastxlstm.layers.ffn import GatedFFN
from fastxlstm.models.xlstm_large import XLSTMLarge, XLSTMLargeConfig

TOL = {torch.float64: 5e-15, torch.float32: 2e-6}


def _config(use_bias=False):
    # odd sizes: E=60, 3 heads, DQK=10 != DV=20 (q, k 30 rows; v, o 60), FFN 91, vocab 97
    return XLSTMLargeConfig(vocab_size=97, hidden_size=60, num_hidden_layers=2, num_heads=3, ffn_proj_factor=1.5,
                            ffn_round_up_to_multiple_of=7, chunk_size=4, use_bias=use_bias, pad_token_id=None,
                            bos_token_id=None, eos_token_id=None)


def _model(dtype=torch.float32, use_bias=False, seed=0):
    torch.manual_seed(seed)
    m = XLSTMLarge(_config(use_bias))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "igate" in name or "fgate" in name:
                # random gates, some extreme (the checkpoint init keeps them constant, which would hide gate bugs)
                p.normal_(0, 2.0 if name.endswith("weight") else 4.0)
            elif "norm" in name:
                p.normal_(1.0, 0.2)
            else:
                p.normal_(0, 0.25)
    return m.to(dtype).eval()


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _decode(model, ids, steps, backend=None):
    """Logits and state after a prompt, then after each of ``steps`` one-token steps (greedy)."""
    outs = []
    kw = {} if backend is None else dict(backend=backend)
    with torch.no_grad():
        out = model(ids, **kw)
        outs.append(out)
        tok = out.logits[:, -1].argmax(-1)
        for _ in range(steps):
            out = model(tok[:, None], state=out.state, **kw)
            outs.append(out)
            tok = out.logits[:, -1].argmax(-1)
    return outs


def _state_list(state):
    return [t for blk in state.blocks for t in (blk.C, blk.n, blk.m)]


def _unique_storage_bytes(model):
    seen = {}
    for p in model.parameters():
        s = p.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_packed_decode_equals_unpacked(dtype, use_bias):
    ref = _model(dtype, use_bias)
    packed = copy.deepcopy(ref)
    assert pack_projections(packed) == 4  # 2 blocks x (mLSTM layer, FFN)
    assert is_packed(packed) and not is_packed(ref)
    ids = torch.randint(0, 97, (3, 7))
    worst = 0.0
    for a, b in zip(_decode(ref, ids, 12), _decode(packed, ids, 12)):
        worst = max(worst, _rel(b.logits, a.logits))
        for x, y in zip(_state_list(a.state), _state_list(b.state)):
            worst = max(worst, _rel(y, x))
    assert worst < TOL[dtype], worst


def test_packed_path_is_taken_and_gates_stay_float32():
    """One matmul per group in float32; in bf16 q|k|v|o in bf16 plus the gates in float32 (as unpacked)."""
    from fastxlstm.layers import _packing
    model = _model(torch.float32)
    pack_projections(model)
    calls = []
    orig = _packing._LINEAR

    def spy(x, w, b):
        calls.append((tuple(w.shape), x.dtype))
        return orig(x, w, b)

    ids = torch.randint(0, 97, (2, 5))
    _packing._LINEAR = spy
    try:
        with torch.no_grad():
            model(ids)
            assert calls == [((30 + 30 + 60 + 60 + 3 + 3, 60), torch.float32), ((2 * 91, 60), torch.float32)] * 2
            calls.clear()
            ref = _model(torch.float32).to(torch.bfloat16)
            bf = copy.deepcopy(ref)
            pack_projections(bf)
            layer = bf.backbone.blocks[0].mlstm_layer
            x = torch.randn(2, 5, 60, dtype=torch.bfloat16)
            q, k, v, o, gates = layer._projections(x)
            assert calls == [((180, 60), torch.bfloat16)]  # the gates went through float_gate_linear
            assert q.dtype == torch.bfloat16 and gates.dtype == torch.float32
            rq, rk, rv, ro, rgates = ref.backbone.blocks[0].mlstm_layer._projections(x)
            assert torch.equal(rgates, gates)  # the same float32 gate computation
            for got, want in ((q, rq), (k, rk), (v, rv), (o, ro)):
                assert _rel(got, want) < 1e-2
            la, lb = ref(ids).logits, bf(ids).logits
            assert _rel(lb, la) < 2e-2
    finally:
        _packing._LINEAR = orig


def test_greedy_64_steps_identical_float64(monkeypatch):
    ref = _model(torch.float64, seed=1)
    packed = copy.deepcopy(ref)
    pack_projections(packed)
    ids = torch.randint(0, 97, (2, 6))
    monkeypatch.setenv("FASTXLSTM_PACK", "0")  # the eager loop would pack the reference too
    a = ref.generate(ids, 64, do_sample=False, use_cuda_graph=False)
    assert not is_packed(ref)
    b = packed.generate(ids, 64, do_sample=False, use_cuda_graph=False)
    assert torch.equal(a, b)
    assert len(set(a[:, 6:].flatten().tolist())) > 3  # a real sequence, not one repeated token


def test_memory_neutral_and_views():
    model = _model(torch.float32)
    before = _unique_storage_bytes(model)
    n_params = len(list(model.parameters()))
    pack_projections(model)
    assert _unique_storage_bytes(model) == before + 0  # the packed tensors replace the separate storages
    assert len(list(model.parameters())) == n_params
    layer = model.backbone.blocks[0].mlstm_layer
    ptrs = {p.untyped_storage().data_ptr() for p in (layer.q.weight, layer.k.weight, layer.v.weight,
                                                        layer.ogate_preact.weight, layer.igate_preact.weight,
                                                        layer.fgate_preact.weight)}
    assert len(ptrs) == 1
    assert pack_projections(model) == 4  # idempotent
    assert _unique_storage_bytes(model) == before
    assert unpack_projections(model) == 4
    assert not is_packed(model)
    assert _unique_storage_bytes(model) == before
    for p in model.parameters():  # each parameter owns its storage again
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size()


def test_unpack_restores_separate_parameters_same_outputs():
    ref = _model(torch.float64)
    m = copy.deepcopy(ref)
    pack_projections(m)
    unpack_projections(m)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert torch.equal(m(ids).logits, ref(ids).logits)
    for (na, pa), (nb, pb) in zip(ref.named_parameters(), m.named_parameters()):
        assert na == nb and torch.equal(pa, pb)


def test_training_on_packed_model_gives_unpacked_gradients():
    ref = _model(torch.float64)
    packed = copy.deepcopy(ref)
    pack_projections(packed)
    ids = torch.randint(0, 97, (2, 9))
    labels = torch.randint(0, 97, (2, 9))
    for m in (ref, packed):
        m.train()
        m(ids, labels=labels).loss.backward()
    for (na, pa), (nb, pb) in zip(ref.named_parameters(), packed.named_parameters()):
        assert pb.grad is not None, nb
        assert _rel(pb.grad, pa.grad) < TOL[torch.float64], nb
    # an optimizer step updates the parameters in place, hence the packed tensor: the packed (no-grad) forward
    # then computes the updated function
    for m in (ref, packed):
        torch.optim.SGD(m.parameters(), lr=0.1).step()
        m.eval()
    assert is_packed(packed)
    with torch.no_grad():
        assert _rel(packed(ids).logits, ref(ids).logits) < TOL[torch.float64]


@pytest.mark.filterwarnings("ignore:this model is saved in transformers")
@pytest.mark.filterwarnings("ignore:backbone.out_norm.bias is nonzero")
def test_save_load_round_trip(tmp_path):
    ref = _model(torch.float32, use_bias=True)
    packed = copy.deepcopy(ref)
    pack_projections(packed)
    packed.save_pretrained(tmp_path / "m")
    loaded = XLSTMLarge.from_pretrained(tmp_path / "m")
    assert not is_packed(loaded)  # an ordinary checkpoint: an unpacked model reads it
    for (na, pa), (nb, pb) in zip(ref.state_dict().items(), loaded.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref(ids).logits)
        assert torch.equal(packed(ids).logits, _decode(packed, ids, 0)[0].logits)
    # the training checkpoint's writer too
    from fastxlstm._fileio import write_safetensors
    from fastxlstm.train.checkpoint import _dedupe
    tensors, aliases = _dedupe(packed.state_dict())
    write_safetensors(str(tmp_path / "ck.safetensors"), tensors)
    from safetensors.torch import load_file
    back = load_file(str(tmp_path / "ck.safetensors"))
    for k, v in ref.state_dict().items():
        assert torch.equal(back[k], v), k


def test_load_state_dict_into_packed_model():
    src = _model(torch.float32, seed=3)
    m = _model(torch.float32, seed=4)
    pack_projections(m)
    m.load_state_dict(src.state_dict())  # in-place copies into the views
    assert is_packed(m)
    ids = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        assert _rel(m(ids).logits, src(ids).logits) < TOL[torch.float32]
    m2 = _model(torch.float32, seed=4)
    pack_projections(m2)
    m2.load_state_dict({k: v.clone() for k, v in src.state_dict().items()}, assign=True)  # replaces them
    with torch.no_grad():
        out = m2(ids).logits
    assert not is_packed(m2)  # noticed at the forward: runs the separate projections
    assert _rel(out, src(ids).logits) < TOL[torch.float32]


@pytest.mark.parametrize("conv", ["dtype", "double", "bf16-and-back"])
def test_to_after_packing_repacks(conv):
    ref = _model(torch.float32)
    m = copy.deepcopy(ref)
    pack_projections(m)
    if conv == "dtype":
        m, ref = m.to(torch.float64), ref.to(torch.float64)
    elif conv == "double":
        m, ref = m.double(), ref.double()
    else:
        m, ref = m.to(torch.bfloat16).float(), ref.to(torch.bfloat16).float()
    assert is_packed(m)  # packed again on the new dtype
    layer = m.backbone.blocks[1].mlstm_layer
    assert layer.q.weight.untyped_storage().data_ptr() == layer.fgate_preact.weight.untyped_storage().data_ptr()
    assert _unique_storage_bytes(m) == _unique_storage_bytes(ref)
    ids = torch.randint(0, 97, (2, 8))
    dt = m.dtype
    for a, b in zip(_decode(ref, ids, 4), _decode(m, ids, 4)):
        assert _rel(b.logits, a.logits) < TOL[dt]


def test_stale_pack_falls_back_to_separate_projections():
    ref = _model(torch.float64)
    m = copy.deepcopy(ref)
    pack_projections(m)
    layer = m.backbone.blocks[0].mlstm_layer
    with torch.no_grad():
        layer.k.weight.data = layer.k.weight.data.clone()  # no longer a view of the packed tensor
    layer.k.weight.data.mul_(1.0)
    ids = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        assert torch.equal(m(ids).logits, ref(ids).logits) or _rel(m(ids).logits, ref(ids).logits) < 1e-14
    with torch.no_grad():
        assert layer.packed_group("proj") is None
        assert m.backbone.blocks[0].ffn.packed_group("up") is not None  # the other groups stay packed


def test_gated_ffn_packing_with_bias_and_autocast():
    torch.manual_seed(0)
    ffn = GatedFFN(13, 29, activation="gelu", bias=True)
    with torch.no_grad():
        for p in ffn.parameters():
            p.normal_()
    ref = copy.deepcopy(ffn)
    assert ffn.pack_projections()
    x = torch.randn(3, 5, 13)
    with torch.no_grad():
        assert _rel(ffn(x), ref(x)) < 1e-6
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a, b = ffn(x), ref(x)
        assert a.dtype == b.dtype == torch.bfloat16 and _rel(a, b) < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_paper_model_packs_gates_and_slstm_ffn(dtype):
    torch.manual_seed(0)
    # [mLSTM, sLSTM]: the mLSTM layer's igate|fgate and the sLSTM block's FFN are the packable groups
    ref = fastxlstm.build_model("tiny").to(dtype).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "igate" in name or "fgate" in name:
                p.normal_(0, 0.5)
    m = copy.deepcopy(ref)
    assert pack_projections(m) == 2
    ids = torch.randint(0, 256, (2, 9))
    worst = 0.0
    for a, b in zip(_decode(ref, ids, 6), _decode(m, ids, 6)):
        worst = max(worst, _rel(b.logits, a.logits))
    assert worst < TOL[dtype], worst
    a = ref.generate(ids, 40, do_sample=False, use_cuda_graph=False)
    assert torch.equal(a, m.generate(ids, 40, do_sample=False, use_cuda_graph=False))


def test_transformers_export_of_packed_model():
    pytest.importorskip("transformers")
    from fastxlstm.interop.transformers import to_transformers_model
    # transformers derives the head sizes from multiples of 64 of hidden_size * factor: E=128 keeps them equal
    cfg = XLSTMLargeConfig(vocab_size=97, hidden_size=128, num_hidden_layers=2, num_heads=4, use_bias=True,
                           pad_token_id=None, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    ref = XLSTMLarge(cfg).eval()
    m = copy.deepcopy(ref)
    pack_projections(m)
    hf_a, hf_b = to_transformers_model(ref), to_transformers_model(m)
    sa, sb = hf_a.state_dict(), hf_b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_pack_projections_errors():
    with pytest.raises(ValueError, match="must be a torch.nn.Module"):
        pack_projections("model")


# ------------------------------------------------------------------------------------------------------------
# the CUDA-graph decoder (its logic on the CPU: the captured body runs eagerly)
# ------------------------------------------------------------------------------------------------------------

@pytest.fixture
def no_capture(monkeypatch):
    monkeypatch.setattr(graph, "_CAPTURE", False)


def test_graph_decoder_packs_by_default(no_capture, monkeypatch):
    ref = _model(torch.float32, seed=2)
    m = copy.deepcopy(ref)
    ids = torch.randint(0, 97, (2, 6))
    monkeypatch.setenv("FASTXLSTM_PACK", "0")
    a = ref.generate(ids, 20, do_sample=False, use_cuda_graph=False)
    assert not is_packed(ref)
    monkeypatch.delenv("FASTXLSTM_PACK")
    b = m.generate(ids, 20, do_sample=False, use_cuda_graph=True)
    assert is_packed(m)
    assert torch.equal(a, b)


def test_eager_loop_packs_the_7b_architecture_only(monkeypatch):
    monkeypatch.delenv("FASTXLSTM_PACK", raising=False)
    large = _model(torch.float32, seed=2)
    ids = torch.randint(0, 97, (2, 6))
    list(large.generate_stream(ids, 3, do_sample=False, use_cuda_graph=False))
    assert is_packed(large)
    torch.manual_seed(0)
    paper = fastxlstm.build_model("tiny").eval()
    paper.generate(ids, 3, do_sample=False, use_cuda_graph=False)
    assert not is_packed(paper)  # no measurable gain in its eager step: left as it is
    monkeypatch.setenv("FASTXLSTM_PACK", "0")
    other = _model(torch.float32, seed=2)
    other.generate(ids, 3, do_sample=False, use_cuda_graph=False)
    assert not is_packed(other)


@pytest.mark.parametrize("how", ["env", "argument"])
def test_graph_decoder_pack_switch(no_capture, monkeypatch, how):
    m = _model(torch.float32, seed=2)
    ids = torch.randint(0, 97, (2, 6))
    if how == "env":
        monkeypatch.setenv("FASTXLSTM_PACK", "0")
        m.generate(ids, 5, do_sample=False, use_cuda_graph=True)
    else:
        graph.get_decoder(m, 2, False, None, False, None, None, pack=False)
    assert not is_packed(m)
    graph.get_decoder(m, 2, False, None, False, None, None, pack=True)
    assert is_packed(m)
