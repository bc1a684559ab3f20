"""The models validate their inputs once, at the edge (issue 14 items 8 and 16): state errors name the path in
the model state (state.blocks[0].C), the layers call the ops' unchecked entry points (a generated token is not
re-validated in every block), and XLSTMLarge's decode step honours ``backend``."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from fastxlstm.models.presets import build_model
from fastxlstm.ops import dispatch

MODELS = ("tiny", "7b-tiny")  # the paper model (mLSTM + sLSTM blocks) and the 7B architecture


def _model(name):
    torch.manual_seed(0)
    return build_model(name).eval()


@pytest.mark.parametrize("name", MODELS)
def test_state_errors_name_the_path(name):
    model = _model(name)
    ids = torch.randint(0, 256, (2, 5))
    st = model(ids).state
    blk0 = st.blocks[0]
    bad_dtype = dataclasses.replace(blk0, C=blk0.C.long())
    with pytest.raises(ValueError, match=r"state\.blocks\[0\]\.C has dtype torch\.int64"):
        model(ids, state=type(st)((bad_dtype,) + tuple(st.blocks[1:])))
    bad_shape = dataclasses.replace(blk0, C=blk0.C[..., :-1])
    with pytest.raises(ValueError, match=r"state\.blocks\[0\]\.C has shape"):
        model(ids, state=type(st)((bad_shape,) + tuple(st.blocks[1:])))
    with pytest.raises(ValueError, match=r"state\.blocks\[0\]\.C has shape \(2, .* expected \(1, "):
        model(ids[:1], state=st)  # another batch size


@pytest.mark.parametrize("name", MODELS)
def test_op_checks_do_not_run_inside_the_model(name, monkeypatch):
    """Prefill and decode go through the unchecked entry points: the op-level validators are never called."""
    model = _model(name)
    ids = torch.randint(0, 256, (2, 6))
    ref = model.generate(ids, 3, temperature=0)

    def boom(*a, **k):
        raise AssertionError("op-level validation ran inside the model")

    for fn in ("_check_mlstm_inputs", "_check_mlstm_state", "_check_resets", "check_tensor"):
        monkeypatch.setattr(dispatch, fn, boom)
    out = model(ids, resets=torch.zeros(2, 6, dtype=torch.bool))
    model(ids[:, :1], state=out.state)
    assert torch.equal(model.generate(ids, 3, temperature=0), ref)
    with pytest.raises(AssertionError, match="op-level"):  # the public op still validates
        dispatch.mlstm(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4),
                       torch.randn(1, 1, 2), torch.randn(1, 1, 2))


@pytest.mark.parametrize("backend,expected", [("reference", "torch"), ("chunkwise", "torch"), ("auto", "auto")])
def test_large_decode_honours_backend(backend, expected, monkeypatch):
    from fastxlstm.models import xlstm_large

    model = _model("7b-tiny")
    ids = torch.randint(0, 256, (2, 4))
    st = model(ids).state
    seen = []
    real = xlstm_large._mlstm_step_unchecked

    def spy(*args):
        seen.append(args[-1])
        return real(*args)

    monkeypatch.setattr(xlstm_large, "_mlstm_step_unchecked", spy)
    got = model(ids[:, :1], state=st, backend=backend).logits
    assert seen and set(seen) == {expected}
    ref = model(ids[:, :1], state=st, backend="auto").logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="backend must be one of"):
        model(ids[:, :1], state=st, backend="fast")
