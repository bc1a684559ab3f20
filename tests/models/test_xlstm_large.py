"""XLSTMLarge (the 7B architecture): config validation, init, prefill + decode == full forward, resets, states."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from fastxlstm.models.state import MLSTMBlockState, XLSTMState
from fastxlstm.models.xlstm_large import XLSTMLarge, XLSTMLargeConfig, round_up_to_multiple
from helpers import rel_err

V = 61


def tiny_config(**kw) -> XLSTMLargeConfig:
    base = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_heads=2, chunk_size=8,
                qk_dim_factor=0.5, v_dim_factor=1.0, ffn_proj_factor=2.0, ffn_round_up_to_multiple_of=16,
                pad_token_id=1, bos_token_id=0, eos_token_id=2)
    base.update(kw)
    return XLSTMLargeConfig(**base)


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (the default init zeroes the gate weights, which would hide gate bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm_mlstm.weight") or name.endswith("norm_ffn.weight") or "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            elif "igate_preact.bias" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 2 - 1)
            elif "fgate_preact.bias" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) + 2)
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return model


def make_model(dtype=torch.float32, seed=0, **kw) -> XLSTMLarge:
    torch.manual_seed(seed)
    return randomise(XLSTMLarge(tiny_config(**kw)), seed).to(dtype).eval()


def ids_for(B, S, seed=1):
    return torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------------------------

def test_default_config_is_the_released_7b():
    c = XLSTMLargeConfig()
    assert (c.hidden_size, c.num_heads, c.num_hidden_layers, c.vocab_size) == (4096, 8, 32, 50304)
    assert (c.qk_head_dim, c.v_head_dim, c.ffn_dim) == (256, 512, 10944)
    with torch.device("meta"):
        model = XLSTMLarge(c)
    assert model.num_parameters() == 6_865_424_896
    st = model.init_state(1, device="meta")
    # spec section 5: 32 x 8 x (256 x 512 + 256 + 1) fp32 values per sequence
    assert st.nbytes() == 32 * 8 * (256 * 512 + 256 + 1) * 4


@pytest.mark.parametrize("kw", [
    dict(hidden_size=0), dict(hidden_size=33), dict(num_heads=3), dict(vocab_size=True), dict(num_heads=2.0),
    dict(qk_dim_factor=-0.5), dict(gate_soft_cap=0.0), dict(norm_eps=-1.0), dict(eps=float("nan")),
    dict(use_bias=1), dict(pad_token_id=V), dict(eos_token_id=-1), dict(chunk_size=0),
    dict(ffn_round_up_to_multiple_of=0), dict(output_logit_soft_cap=float("inf")),
])
def test_bad_config(kw):
    with pytest.raises(ValueError):
        tiny_config(**kw)


def test_config_dict_round_trip_and_errors():
    c = tiny_config(gate_soft_cap=None, tie_word_embeddings=True)
    d = c.to_dict()
    assert d["model_type"] == "xlstm"
    assert XLSTMLargeConfig.from_dict(d) == c
    with pytest.raises(ValueError, match="unknown"):
        XLSTMLargeConfig.from_dict({**d, "bogus": 1})
    with pytest.raises(ValueError, match="model_type"):
        XLSTMLargeConfig.from_dict({**d, "model_type": "xlstm_lm"})
    assert round_up_to_multiple(4096 * 2.667, 64) == 10944


def test_init_follows_the_spec():
    torch.manual_seed(0)
    c = tiny_config(hidden_size=64, num_heads=4, num_hidden_layers=3)
    m = XLSTMLarge(c)
    layer = m.backbone.blocks[1].mlstm_layer
    assert torch.all(layer.igate_preact.weight == 0) and torch.all(layer.fgate_preact.weight == 0)
    assert torch.all(layer.igate_preact.bias == -10)
    assert torch.allclose(layer.fgate_preact.bias, torch.linspace(3, 6, 4))
    assert torch.all(layer.multihead_norm.weight == 1) and torch.all(m.backbone.out_norm.weight == 1)
    small = math.sqrt(2 / (5 * 64))
    emb_std = m.backbone.embeddings.weight.std().item()
    assert abs(emb_std - small) / small < 0.1
    wang = 2 / 3 / math.sqrt(64)
    assert abs(layer.out_proj.weight.std().item() - wang) / wang < 0.2


def test_tied_embeddings():
    m = make_model(tie_word_embeddings=True)
    assert m.lm_head.weight is m.backbone.embeddings.weight
    untied = make_model()
    assert m.num_parameters() == untied.num_parameters() - V * 32


# --------------------------------------------------------------------------------------------------------------
# forward: forms agree, prefill + decode == full forward
# --------------------------------------------------------------------------------------------------------------

def test_chunkwise_matches_float64_reference():
    m = make_model(torch.float64)
    ids = ids_for(2, 21)
    ref = m(ids, backend="reference").logits
    for backend in ("chunkwise", "parallel", "recurrent", "auto"):
        out = m(ids, backend=backend).logits
        assert out.dtype == torch.float32  # logits are always float32
        assert rel_err(out, ref) < 1e-6, backend


@pytest.mark.parametrize("S,split", [(16, 8), (16, 5), (21, 13), (9, 1), (24, 16)])
def test_prefill_then_decode_equals_full_forward(S, split):
    m = make_model()
    ids = ids_for(3, S)
    full = m(ids).logits
    out = m(ids[:, :split])
    logits, state = [out.logits], out.state
    for t in range(split, S):
        out = m(ids[:, t:t + 1], state=state)
        logits.append(out.logits)
        state = out.state
    err = rel_err(torch.cat(logits, dim=1), full)
    assert err < 1e-4, err
    # and the final state equals the one-pass state
    one = m(ids).state
    for a, b in zip(state.blocks, one.blocks):
        assert rel_err(a.C * torch.exp(a.m)[..., None, None], b.C * torch.exp(b.m)[..., None, None]) < 1e-4


def test_sequence_continuation_equals_one_pass():
    m = make_model()
    ids = ids_for(2, 30)
    full = m(ids).logits
    a = m(ids[:, :11])
    b = m(ids[:, 11:], state=a.state)
    assert rel_err(torch.cat([a.logits, b.logits], 1), full) < 1e-4


def test_state_is_not_modified_in_place():
    m = make_model()
    ids = ids_for(2, 10)
    st = m(ids).state
    copy = st.map(lambda t: t.clone())
    m(ids[:, :1], state=st)
    m(ids, state=st)
    m(ids[:, :1], state=st, resets=torch.ones(2, 1, dtype=torch.bool))
    for a, b in zip(st.blocks, copy.blocks):
        assert torch.equal(a.C, b.C) and torch.equal(a.n, b.n) and torch.equal(a.m, b.m)


def test_state_layout():
    m = make_model()
    st = m.init_state(3)
    assert len(st) == 2 and st.batch_size == 3
    blk = st.blocks[0]
    assert isinstance(blk, MLSTMBlockState) and blk.conv is None
    assert blk.C.shape == (3, 2, 8, 16) and blk.n.shape == (3, 2, 8) and blk.m.shape == (3, 2)
    assert blk.C.dtype == torch.float32
    out = m(ids_for(3, 5), state=st)
    assert out.state.blocks[1].C.shape == (3, 2, 8, 16)
    assert m(ids_for(3, 5), return_state=False).state is None
    # a fresh state is the same as no state
    assert torch.equal(m(ids_for(3, 5), state=st).logits, m(ids_for(3, 5)).logits)


def test_resets_equal_fresh_documents():
    m = make_model()
    ids = ids_for(2, 19)
    resets = torch.zeros(2, 19, dtype=torch.bool)
    resets[0, 7] = True
    resets[1, 12] = True
    out = m(ids, resets=resets).logits
    assert rel_err(out[0, 7:], m(ids[:1, 7:]).logits[0]) < 1e-4
    assert rel_err(out[1, 12:], m(ids[1:, 12:]).logits[0]) < 1e-4
    assert rel_err(out[1, :12], m(ids[1:, :12]).logits[0]) < 1e-4
    # a reset while decoding one token discards the carried state for that row only
    st = m(ids[:, :5]).state
    r = torch.tensor([[True], [False]])
    step = m(ids[:, 5:6], state=st, resets=r).logits
    assert rel_err(step[0], m(ids[:1, 5:6]).logits[0]) < 1e-5
    assert rel_err(step[1], m(ids[1:, :6]).logits[0, -1:]) < 1e-4


def test_logits_are_float32_and_soft_capped():
    m = make_model(output_logit_soft_cap=2.0)
    out = m(ids_for(2, 6)).logits
    assert out.dtype == torch.float32 and out.abs().max() < 2.0
    mb = make_model(torch.bfloat16)
    lb = mb(ids_for(2, 6)).logits
    assert lb.dtype == torch.float32 and torch.isfinite(lb).all()
    assert rel_err(lb, make_model()(ids_for(2, 6)).logits) < 5e-2


def test_gradients_reach_every_parameter():
    m = make_model().train()
    out = m(ids_for(2, 12))
    out.logits.logsumexp(-1).mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


# --------------------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------------------

def test_bad_inputs():
    m = make_model()
    ids = ids_for(2, 5)
    with pytest.raises(ValueError, match="integer"):
        m(ids.float())
    with pytest.raises(ValueError, match="shape"):
        m(ids[0])
    with pytest.raises(ValueError, match=r"\[0, 61\)"):
        m(torch.full((2, 5), V))
    with pytest.raises(ValueError, match=r"\[0, 61\)"):
        m(torch.full((2, 5), -1))
    with pytest.raises(ValueError, match="length 0"):
        m(ids[:, :0])
    with pytest.raises(ValueError):
        m([[1, 2, 3]])
    with pytest.raises(ValueError, match="resets"):
        m(ids, resets=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="resets"):
        m(ids, resets=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="XLSTMState"):
        m(ids, state=(torch.zeros(1),))
    with pytest.raises(ValueError, match="shape"):
        m(ids, state=m.init_state(3))
    st = m.init_state(2)
    with pytest.raises(ValueError, match="blocks"):
        m(ids, state=XLSTMState(st.blocks[:1]))
    bad = XLSTMState((replace(st.blocks[0], conv=torch.zeros(2, 3, 32)),) + st.blocks[1:])
    with pytest.raises(ValueError, match="None"):
        m(ids, state=bad)
    with pytest.raises(ValueError, match="backend"):
        m(ids, backend="nope")
    with pytest.raises(ValueError, match="batch_size"):
        m.init_state(0)
    with pytest.raises(ValueError, match="XLSTMLargeConfig"):
        XLSTMLarge({"hidden_size": 32})


def test_num_parameters_and_base_helpers():
    m = make_model()
    E = 32
    total = sum(p.numel() for p in m.parameters())
    assert m.num_parameters() == total
    assert m.num_parameters(exclude_embeddings=True) == total - 2 * V * E
    tied = make_model(tie_word_embeddings=True)
    assert tied.num_parameters(exclude_embeddings=True) == total - 2 * V * E
    assert m.vocab_size == V and m.device.type == "cpu" and m.dtype == torch.float32


def test_bfloat16_prefill_and_decode():
    m = make_model(torch.bfloat16)
    ids = ids_for(2, 12)
    full = m(ids).logits
    out = m(ids[:, :9])
    logits, st = [out.logits], out.state
    assert st.blocks[0].C.dtype == torch.float32  # states stay float32 in a bf16 model
    for t in range(9, 12):
        out = m(ids[:, t:t + 1], state=st)
        logits.append(out.logits)
        st = out.state
    assert torch.isfinite(torch.cat(logits, 1)).all()
    assert rel_err(torch.cat(logits, 1), full) < 5e-2
