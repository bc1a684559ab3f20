"""Parity with the official ``xlstm.xlstm_large.model.xLSTMLarge`` (CPU: mlstm_kernels' native torch kernels).

The official package is a test oracle only. Its CPU-capable configuration is
``fastxlstm.interop.official_large.OFFICIAL_CPU_KERNELS`` (native chunkwise/sequence/step kernels, float32
autocast, "inference" mode so that any length works and the state is returned).
"""
from __future__ import annotations

import pytest
import torch

from oracles import require_oracle  # noqa: E402

require_oracle("xlstm.xlstm_large.model")
from xlstm.xlstm_large.model import xLSTMLarge, xLSTMLargeConfig  # noqa: E402

from fastxlstm.interop.official_large import (OFFICIAL_CPU_KERNELS, config_from_official_large,  # noqa: E402
                                              convert_large)
from helpers import rel_err  # noqa: E402

V = 67


def official(weight_mode="single", use_bias=False, add_out_norm=True, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(embedding_dim=64, num_heads=2, num_blocks=2, vocab_size=V, chunk_size=16, weight_mode=weight_mode,
               use_bias=use_bias, add_out_norm=add_out_norm, gate_soft_cap=12.0, output_logit_soft_cap=20.0,
               ffn_proj_factor=1.7, ffn_round_up_to_multiple_of=32, **OFFICIAL_CPU_KERNELS)
    cfg.update(kw)
    om = xLSTMLarge(xLSTMLargeConfig(**cfg)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(om.named_parameters()):
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * noise)
            elif "gate_preact.bias" in name:  # i|f (fused) or i / f: a spread of gate biases
                p.copy_(2 * noise)
            else:
                p.copy_(0.25 * noise)
    return om


def ids_for(S, seed=0, B=2):
    return torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(seed))


CASES = [dict(), dict(weight_mode="fused"), dict(use_bias=True), dict(add_out_norm=False),
         dict(weight_mode="fused", use_bias=True, qk_dim_factor=0.25, v_dim_factor=0.5)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_logits_match_official(case):
    om = official(**case)
    ours = convert_large(om)
    for S in (1, 7, 16, 37):
        ids = ids_for(S, S)
        with torch.no_grad():
            ref, _ = om(ids)
        got = ours(ids).logits
        err = rel_err(got, ref)
        assert err < 1e-4, f"S={S}: rel err {err:.2e}"


def test_decoding_and_state_match_official():
    om = official(use_bias=True)
    ours = convert_large(om)
    ids = ids_for(25, 3)
    with torch.no_grad():
        ref_logits, ref_state = om(ids[:, :20])
        refs = [ref_logits]
        for t in range(20, 25):
            lg, ref_state = om(ids[:, t:t + 1], ref_state)
            refs.append(lg)
    out = ours(ids[:, :20])
    got, st = [out.logits], out.state
    for t in range(20, 25):
        out = ours(ids[:, t:t + 1], state=st)
        got.append(out.logits)
        st = out.state
    assert rel_err(torch.cat(got, 1), torch.cat(refs, 1)) < 1e-4
    for i, blk in enumerate(st.blocks):
        C, n, m = ref_state[i]
        # compare the true (unstabilised) states: C * exp(m)
        ours_C = blk.C * torch.exp(blk.m)[..., None, None]
        ref_C = C * torch.exp(m.reshape(blk.m.shape))[..., None, None]
        assert rel_err(ours_C, ref_C) < 1e-4
        assert rel_err(blk.n * torch.exp(blk.m)[..., None], n * torch.exp(m.reshape(blk.m.shape))[..., None]) < 1e-4


def test_config_mapping_and_errors():
    om = official(weight_mode="fused", use_bias=True)
    c = config_from_official_large(om.config)
    assert (c.hidden_size, c.num_hidden_layers, c.num_heads, c.vocab_size) == (64, 2, 2, V)
    assert c.use_bias and c.gate_soft_cap == 12.0 and c.output_logit_soft_cap == 20.0
    assert c.ffn_dim == om.backbone.blocks[0].ffn.up_proj_dim
    ours = convert_large(om)
    assert ours.num_parameters() == sum(p.numel() for p in om.parameters())
    with pytest.raises(ValueError, match="xLSTMLarge"):
        convert_large(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="lacks"):
        config_from_official_large({"embedding_dim": 64})


def test_converted_model_is_independent():
    om = official()
    ours = convert_large(om)
    with torch.no_grad():
        om.embedding.weight.add_(1.0)
    assert not torch.equal(ours.backbone.embeddings.weight, om.embedding.weight)
