"""from_official: the official xlstm package's xLSTMLMModel (an oracle) and our XLSTMLM give the same logits.

Every parameter is randomised first (gates, norms stored as w - 1, skip, recurrent kernels, conv), so a swapped
or mis-permuted tensor shows. CPU knobs of the official package: sLSTM backend "vanilla" (the default "cuda"
compiles a kernel), and context_length >= the sequence length (its mLSTM cell uses the parallel torch form with a
causal mask of that size).
"""
from __future__ import annotations

import pytest
import torch

from helpers import rel_err, record

from oracles import require_oracle  # noqa: E402

xlstm = require_oracle("xlstm")  # listed in the [dev] extra (Python >= 3.11); the oracle for these tests

from fastxlstm.interop.official import from_official  # noqa: E402
from fastxlstm.models.xlstm_lm import XLSTMLM  # noqa: E402

V = 61


def official_model(seed=0, E=32, num_blocks=3, slstm_at=(1,), heads=4, slstm_heads=4, slstm_conv=4, bias=False,
                   tie=False, mlstm=True, context_length=32):
    from xlstm import (FeedForwardConfig, mLSTMBlockConfig, mLSTMLayerConfig, sLSTMBlockConfig, sLSTMLayerConfig,
                       xLSTMLMModel, xLSTMLMModelConfig)
    torch.manual_seed(seed)
    cfg = xLSTMLMModelConfig(
        mlstm_block=(mLSTMBlockConfig(mlstm=mLSTMLayerConfig(conv1d_kernel_size=4, qkv_proj_blocksize=4,
                                                             num_heads=heads)) if mlstm else None),
        slstm_block=sLSTMBlockConfig(slstm=sLSTMLayerConfig(backend="vanilla", num_heads=slstm_heads,
                                                            conv1d_kernel_size=slstm_conv),
                                     feedforward=FeedForwardConfig(proj_factor=1.3, act_fn="gelu", bias=bias)),
        context_length=context_length, num_blocks=num_blocks, embedding_dim=E, slstm_at=list(slstm_at),
        vocab_size=V, bias=bias, tie_weights=tie)
    model = xLSTMLMModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim > 1 else 0.5))
    return model.eval()


def _ids(B, S, seed=1):
    return torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(seed))


CASES = {
    "m-s-m": dict(),
    "s-m-s-m, 2 heads, tied, bias": dict(num_blocks=4, slstm_at=(0, 2), slstm_heads=2, tie=True, bias=True),
    "mLSTM only": dict(num_blocks=2, slstm_at=()),
    "sLSTM only, no conv": dict(num_blocks=2, mlstm=False, slstm_at=(0, 1), slstm_conv=0),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("S", [16, 19])
def test_logits_parity(case, S):
    """chunk_size 4: S = 16 is a multiple of it, 19 is not."""
    official = official_model(**CASES[case])
    ours = from_official(official, chunk_size=4)
    assert isinstance(ours, XLSTMLM) and not ours.training
    if CASES[case].get("tie"):
        assert ours.lm_head.weight is ours.token_embedding.weight
    ids = _ids(2, S)
    with torch.no_grad():
        want = official(ids)
        got = ours(ids).logits
    err = rel_err(got, want)
    record(f"official parity {case} S={S}", {"logits": err})
    assert err < 1e-4, err


def test_parity_prefill_then_decode():
    official = official_model(seed=3)
    ours = from_official(official, chunk_size=4)
    ids = _ids(2, 13, seed=4)
    with torch.no_grad():
        want = official(ids)
        out = ours(ids[:, :6])
        logits, st = [out.logits], out.state
        for t in range(6, 13):
            out = ours(ids[:, t:t + 1], state=st)
            logits.append(out.logits)
            st = out.state
    err = rel_err(torch.cat(logits, 1), want)
    record("official parity prefill 6 + 7 decode steps", {"logits": err})
    assert err < 1e-4, err


def test_parity_survives_a_real_mistake():
    """The test can fail: swapping our sLSTM i/f projections (the official names are swapped) breaks parity."""
    official = official_model(seed=5)
    ours = from_official(official, chunk_size=4)
    ids = _ids(2, 12)
    with torch.no_grad():
        want = official(ids)
        layer = ours.blocks[1].layer
        w = layer.igate.weight.clone()
        layer.igate.weight.copy_(layer.fgate.weight)
        layer.fgate.weight.copy_(w)
        assert rel_err(ours(ids).logits, want) > 1e-2


def test_from_official_rejects_other_things():
    with pytest.raises(ValueError):
        from_official(torch.nn.Linear(2, 2))
    official = official_model(num_blocks=2, slstm_at=())
    with pytest.raises(ValueError):
        from_official(official, embedding_dim=64)  # only weight-independent fields may be overridden


def test_official_large_dispatches_to_convert_large():
    """An official xLSTMLarge goes to interop.official_large. CPU knobs: the mlstm_kernels "native" (torch)
    kernels and mode="inference" (its "train" mode with native kernels fails a shape assertion on CPU)."""
    from xlstm.xlstm_large.model import xLSTMLarge, xLSTMLargeConfig

    from fastxlstm.models.xlstm_large import XLSTMLarge
    torch.manual_seed(0)
    cfg = xLSTMLargeConfig(embedding_dim=64, num_heads=4, num_blocks=2, vocab_size=V,
                           chunkwise_kernel="chunkwise--native_autograd", sequence_kernel="native_sequence__native",
                           step_kernel="native", mode="inference", chunk_size=16)
    official = xLSTMLarge(cfg)
    with torch.no_grad():
        for p in official.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    official.eval()
    ours = from_official(official)
    assert isinstance(ours, XLSTMLarge)
    ids = _ids(2, 20)
    with torch.no_grad():
        want = official(ids)
        want = want[0] if isinstance(want, tuple) else want
        err = rel_err(ours(ids).logits, want)
    record("official parity xLSTMLarge (via convert_large) S=20", {"logits": err})
    assert err < 1e-4, err
    with pytest.raises(ValueError):
        from_official(official, chunk_size=4)
