"""Parity with transformers' xLSTMForCausalLM (offline, CPU): logits both ways, greedy tokens, checkpoint dirs.

transformers runs its native PyTorch kernels here (``chunkwise--native_autograd``, ``native_sequence__native``,
``native`` step, float32 autocast, "inference" mode). Its cache is sized from ``qk_dim``/``v_dim`` properties that
round up to 64 while its layers use ``int(hidden_size * factor)``, so every random config keeps hidden_size *
factor a multiple of 64. Every parameter is randomised: the default init zeroes the gate weights.
"""
from __future__ import annotations

import json
import os
import random
import warnings

import pytest
import torch

from oracles import require_oracle  # noqa: E402

transformers = require_oracle("transformers")
from transformers import xLSTMConfig, xLSTMForCausalLM  # noqa: E402

from fastxlstm.interop.transformers import (config_from_transformers_dict, config_to_transformers_dict,  # noqa: E402
                                            from_transformers_model, to_transformers_config,
                                            to_transformers_model)
from fastxlstm.models.io import from_pretrained  # noqa: E402
from fastxlstm.models.xlstm_large import XLSTMLarge, XLSTMLargeConfig  # noqa: E402
from helpers import rel_err  # noqa: E402

CPU_KERNELS = dict(chunkwise_kernel="chunkwise--native_autograd", sequence_kernel="native_sequence__native",
                   step_kernel="native", mode="inference", autocast_kernel_dtype="float32",
                   inference_state_dtype="float32", return_last_states=True)
LENGTHS = (1, 7, 63, 64, 130)


def random_config(seed: int) -> XLSTMLargeConfig:
    r = random.Random(seed)
    hidden = r.choice([128, 256])
    qk_factor = r.choice([0.25, 0.5, 1.0] if hidden == 256 else [0.5, 1.0])
    return XLSTMLargeConfig(
        vocab_size=r.randint(40, 120), hidden_size=hidden, num_hidden_layers=r.randint(1, 2),
        num_heads=r.choice([1, 2, 4]), qk_dim_factor=qk_factor, v_dim_factor=r.choice([0.5, 1.0]),
        gate_soft_cap=round(r.uniform(4.0, 20.0), 3), output_logit_soft_cap=round(r.uniform(3.0, 40.0), 3),
        norm_eps=r.choice([1e-6, 1e-5, 1e-3]), eps=r.choice([1e-6, 1e-4]), use_bias=r.random() < 0.5,
        norm_reduction_force_float32=r.random() < 0.5, ffn_proj_factor=round(r.uniform(1.2, 3.0), 3),
        ffn_round_up_to_multiple_of=r.choice([16, 64]), chunk_size=64, tie_word_embeddings=False,
        pad_token_id=1, bos_token_id=0, eos_token_id=2)


def randomise_(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("out_norm.bias"):
                continue  # transformers' out_norm has no bias (see fastxlstm.interop.transformers)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * noise)
            elif "igate_preact.bias" in name:
                p.copy_(2 * noise - 2)
            elif "fgate_preact.bias" in name:
                p.copy_(noise + 2)
            elif "gate_preact.weight" in name:
                p.copy_(0.2 * noise)  # gate weights nonzero: the default init would zero them
            else:
                p.copy_(0.25 * noise)


def hf_from(config: XLSTMLargeConfig) -> xLSTMForCausalLM:
    return xLSTMForCausalLM(to_transformers_config(config, **CPU_KERNELS)).eval()


def ids_for(V, S, seed):
    return torch.randint(0, V, (2, S), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=[0, 1, 2])
def pair(request):
    """(ours, transformers') with the same random weights, built in the direction the seed picks."""
    seed = request.param
    config = random_config(seed)
    torch.manual_seed(seed)
    if seed % 2 == 0:  # transformers -> ours
        hf = hf_from(config)
        randomise_(hf, seed)
        ours = from_transformers_model(hf)
    else:  # ours -> transformers
        ours = XLSTMLarge(config)
        randomise_(ours, seed)
        ours.eval()
        hf = to_transformers_model(ours, **CPU_KERNELS)
    return ours, hf


MEASURED = {}


@pytest.mark.parametrize("S", LENGTHS)
def test_logits_agree(pair, S):
    ours, hf = pair
    ids = ids_for(ours.config.vocab_size, S, S)
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids).logits
    err = rel_err(got, ref)
    MEASURED[(id(ours), S)] = err
    assert got.shape == ref.shape and got.dtype == ref.dtype == torch.float32
    assert err < 1e-4, f"S={S}: rel err {err:.2e}"


def test_greedy_generation_gives_identical_tokens(pair):
    ours, hf = pair
    ids = ids_for(ours.config.vocab_size, 9, 99)
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12,
                          pad_token_id=ours.config.pad_token_id, eos_token_id=None)
    got = ours.generate(ids, 12, temperature=0)
    assert torch.equal(got, ref)


def test_prefill_then_steps_match_transformers_cache(pair):
    """transformers' cache path (prefill, then one token at a time) against our state path."""
    ours, hf = pair
    ids = ids_for(ours.config.vocab_size, 70, 5)
    with torch.no_grad():
        out = hf(ids[:, :66], use_cache=True)
        ref = [out.logits]
        cache = out.cache
        for t in range(66, 70):
            out = hf(ids[:, t:t + 1], cache=cache, use_cache=True)
            cache = out.cache
            ref.append(out.logits)
    mine = ours(ids[:, :66])
    got, st = [mine.logits], mine.state
    for t in range(66, 70):
        mine = ours(ids[:, t:t + 1], state=st)
        got.append(mine.logits)
        st = mine.state
    assert rel_err(torch.cat(got, 1), torch.cat(ref, 1)) < 1e-4


@pytest.mark.parametrize("shard", [None, "60KB"], ids=["single", "sharded"])
def test_transformers_dir_loads_in_ours(tmp_path, pair, shard):
    ours, hf = pair
    kw = {} if shard is None else {"max_shard_size": shard}
    hf.save_pretrained(tmp_path / "hf", **kw)
    files = os.listdir(tmp_path / "hf")
    assert ("model.safetensors.index.json" in files) == (shard is not None)
    loaded = from_pretrained(tmp_path / "hf")
    assert loaded.config == ours.config
    ids = ids_for(ours.config.vocab_size, 20, 3)
    with torch.no_grad():
        assert rel_err(loaded(ids).logits, hf(ids).logits) < 1e-4


@pytest.mark.parametrize("shard", [None, "60KB"], ids=["single", "sharded"])
def test_our_dir_loads_in_transformers(tmp_path, pair, shard):
    ours, hf = pair
    kw = {} if shard is None else {"max_shard_size": shard}
    ours.save_pretrained(tmp_path / "ours", **kw)
    cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert cfg["model_type"] == "xlstm" and cfg["architectures"] == ["xLSTMForCausalLM"]
    loaded = xLSTMForCausalLM.from_pretrained(tmp_path / "ours", autocast_kernel_dtype="float32").eval()
    # exactly transformers' key set (a zero out_norm bias, which transformers lacks, is not written)
    assert set(loaded.state_dict()) == set(ours.state_dict()) - {"backbone.out_norm.bias"}
    ids = ids_for(ours.config.vocab_size, 20, 4)
    with torch.no_grad():
        assert rel_err(loaded(ids).logits, ours(ids).logits) < 1e-4


def test_tied_config_round_trips_through_transformers(tmp_path):
    """transformers never ties xLSTM weights; a tied model is written as two equal matrices and loads back tied."""
    config = XLSTMLargeConfig(vocab_size=50, hidden_size=128, num_hidden_layers=1, num_heads=2,
                              tie_word_embeddings=True)
    ours = XLSTMLarge(config).eval()
    randomise_(ours, 7)
    hf = to_transformers_model(ours, **CPU_KERNELS)
    ids = ids_for(50, 10, 1)
    with torch.no_grad():
        assert rel_err(ours(ids).logits, hf(ids).logits) < 1e-4
    hf.save_pretrained(tmp_path / "t")
    back = from_pretrained(tmp_path / "t")
    assert back.lm_head.weight is back.backbone.embeddings.weight
    # a transformers dir whose tied-config head differs from the embedding loads untied (what transformers runs)
    with torch.no_grad():
        hf.lm_head.weight.add_(0.1)
    hf.save_pretrained(tmp_path / "u")
    with pytest.warns(UserWarning, match="untied"):
        back = from_pretrained(tmp_path / "u")
    assert not back.config.tie_word_embeddings
    with torch.no_grad():
        assert rel_err(back(ids).logits, hf(ids).logits) < 1e-4


def test_config_conversion():
    default = config_from_transformers_dict(xLSTMConfig().to_dict())
    assert default == XLSTMLargeConfig()
    c = random_config(5)
    assert config_from_transformers_dict(config_to_transformers_dict(c)) == c
    assert config_from_transformers_dict(to_transformers_config(c).to_dict()) == c
    d = config_to_transformers_dict(c)
    with pytest.raises(ValueError, match="weight_mode"):
        config_from_transformers_dict({**d, "weight_mode": "fused"})
    with pytest.raises(ValueError, match="agree"):
        config_from_transformers_dict({**d, "embedding_dim": c.hidden_size * 2})
    with pytest.raises(ValueError, match="model_type"):
        config_from_transformers_dict({**d, "model_type": "mamba"})
    with pytest.warns(UserWarning, match="brand_new_field"):
        assert config_from_transformers_dict({**d, "brand_new_field": 1}) == c
    assert config_from_transformers_dict({**d, "eos_token_id": [2, 0]}).eos_token_id == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        alias_only = {k: v for k, v in d.items() if k not in ("hidden_size", "num_hidden_layers")}
        assert config_from_transformers_dict(alias_only) == c


# (hidden_size, num_heads, qk_dim_factor, v_dim_factor) -> does transformers run it? Decided by running it below,
# and predicted exactly by transformers_head_dim_mismatch, including a config whose widths transformers rounds up
# but whose head sizes still agree (130 / 65 heads).
HEAD_DIM_CASES = [(64, 4, 0.5, 1.0),   # the 7b-tiny preset: qk heads 8 in the layers, 16 in transformers' cache
                  (64, 2, 1.0, 1.0), (128, 2, 0.5, 1.0), (64, 1, 0.5, 0.5), (96, 2, 1.0, 1.0), (192, 3, 0.5, 1.0),
                  (130, 65, 0.5, 1.0)]


@pytest.mark.parametrize("hidden,heads,qkf,vf", HEAD_DIM_CASES)
def test_head_size_check_is_exactly_what_transformers_runs(tmp_path, hidden, heads, qkf, vf):
    from fastxlstm.interop.transformers import TransformersCompatibilityWarning, transformers_head_dim_mismatch
    config = XLSTMLargeConfig(vocab_size=48, hidden_size=hidden, num_hidden_layers=1, num_heads=heads,
                              qk_dim_factor=qkf, v_dim_factor=vf, chunk_size=16, ffn_proj_factor=1.0,
                              ffn_round_up_to_multiple_of=16, pad_token_id=None, bos_token_id=None,
                              eos_token_id=None)
    predicted_ok = transformers_head_dim_mismatch(config) is None
    ours = XLSTMLarge(config).eval()
    randomise_(ours, hidden + heads)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours.save_pretrained(tmp_path / "ck")
    warned = [w for w in caught if issubclass(w.category, TransformersCompatibilityWarning)]
    assert len(warned) == (0 if predicted_ok else 1)
    # transformers loads the directory either way; whether it then runs (its cached forward) is the truth
    hf = xLSTMForCausalLM.from_pretrained(tmp_path / "ck", autocast_kernel_dtype="float32").eval()
    ids = ids_for(48, 9, hidden)
    with torch.no_grad():
        try:
            ref = hf(ids, use_cache=True).logits
            runs = True
        except (RuntimeError, ValueError):
            runs = False
        assert runs == predicted_ok, f"transformers runs={runs}, predicted {predicted_ok}"
        if runs:
            assert rel_err(ours(ids).logits, ref) < 1e-4
            gen = hf.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0,
                              eos_token_id=None)
            assert torch.equal(ours.generate(ids, 4, temperature=0), gen)
    if predicted_ok:
        assert isinstance(to_transformers_model(ours, **CPU_KERNELS), xLSTMForCausalLM)
    else:
        assert "cache gives the" in str(warned[0].message)
        with pytest.raises(ValueError, match="fail in its first cached forward"):
            to_transformers_config(config)
        with pytest.raises(ValueError, match="fail in its first cached forward"):
            to_transformers_model(ours, **CPU_KERNELS)
    assert from_pretrained(tmp_path / "ck").config == config  # fastxlstm reads it back in every case


def test_7b_tiny_preset_is_flagged():
    from fastxlstm.interop.transformers import transformers_head_dim_mismatch
    from fastxlstm.models.presets import get_preset
    assert "qk heads 16 features" in transformers_head_dim_mismatch(get_preset("7b-tiny"))
    assert transformers_head_dim_mismatch(get_preset("7b")) is None
