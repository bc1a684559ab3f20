"""Bad input to the ops gets a ValueError whose message names the offending argument; never a silent broadcast,
a cast, or a NaN. A second device on a CPU-only machine comes from the "meta" device."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastxlstm.ops import mlstm, mlstm_step, slstm

B, NH, S, DQK, DV, DH = 2, 3, 5, 4, 6, 4
META = torch.device("meta")


def _mlstm_args(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return dict(
        q=torch.randn(B, NH, S, DQK, generator=g, dtype=dtype),
        k=torch.randn(B, NH, S, DQK, generator=g, dtype=dtype),
        v=torch.randn(B, NH, S, DV, generator=g, dtype=dtype),
        i=torch.randn(B, NH, S, generator=g, dtype=dtype),
        f=torch.randn(B, NH, S, generator=g, dtype=dtype) + 2.0,
    )


def _mlstm_state(dtype=torch.float32):
    return (torch.randn(B, NH, DQK, DV, dtype=dtype), torch.randn(B, NH, DQK, dtype=dtype),
            torch.zeros(B, NH, dtype=dtype))


def _with(d, **changes):
    return {**d, **changes}


def _state_with(index, value):
    st = list(_mlstm_state())
    st[index] = value
    return tuple(st)


A = _mlstm_args()

# (id, kwargs for mlstm, regex the message must match)
MLSTM_BAD = [
    ("q-rank3", _with(A, q=A["q"][0]), r"\bq must have 4 dimensions"),
    ("q-rank5", _with(A, q=A["q"][None]), r"\bq must have 4 dimensions"),
    ("q-not-tensor", _with(A, q=A["q"].numpy()), r"\bq must be a torch\.Tensor"),
    ("q-int", _with(A, q=A["q"].long()), r"\bq has dtype"),
    ("k-DQK", _with(A, k=A["k"][..., :3]), r"\bk has shape"),
    ("k-S", _with(A, k=A["k"][:, :, :4]), r"\bk has shape"),
    ("k-B1-broadcast", _with(A, k=A["k"][:1]), r"\bk has shape"),
    ("v-S", _with(A, v=A["v"][:, :, :4]), r"\bv has shape"),
    ("v-NH", _with(A, v=A["v"][:, :2]), r"\bv has shape"),
    ("v-rank3", _with(A, v=A["v"][0]), r"\bv must have 4 dimensions"),
    ("i-S1-broadcast", _with(A, i=A["i"][..., :1]), r"\bi has shape"),
    ("i-rank2", _with(A, i=A["i"][0]), r"\bi must have 3 dimensions"),
    ("f-rank4", _with(A, f=A["f"][..., None]), r"\bf must have 3 dimensions"),
    ("f-NH", _with(A, f=A["f"][:, :1]), r"\bf has shape"),
    ("k-dtype", _with(A, k=A["k"].double()), r"\bk has dtype"),
    ("v-dtype", _with(A, v=A["v"].half()), r"\bv has dtype"),
    ("f-dtype", _with(A, f=A["f"].double()), r"\bf has dtype"),
    ("i-bool", _with(A, i=A["i"] > 0), r"\bi has dtype"),
    ("k-device", _with(A, k=A["k"].to(META)), r"\bk is on meta"),
    ("v-device", _with(A, v=A["v"].to(META)), r"\bv is on meta"),
    ("f-device", _with(A, f=A["f"].to(META)), r"\bf is on meta"),
    ("empty-DQK", _with(A, q=A["q"][..., :0], k=A["k"][..., :0]), r"empty dimension in q"),
    ("empty-DV", _with(A, v=A["v"][..., :0]), r"empty dimension in q"),
    ("state-not-tuple", _with(A, state=_mlstm_state()[0]), r"\bstate must be a tuple"),
    ("state-len2", _with(A, state=_mlstm_state()[:2]), r"\bstate must be a tuple"),
    ("state-C-transposed", _with(A, state=_state_with(0, torch.randn(B, NH, DV, DQK))), r"state C has shape"),
    ("state-C-B1-broadcast", _with(A, state=_state_with(0, torch.randn(1, NH, DQK, DV))), r"state C has shape"),
    ("state-C-rank3", _with(A, state=_state_with(0, torch.randn(B, NH, DQK))), r"state C must have 4 dimensions"),
    ("state-C-int", _with(A, state=_state_with(0, torch.zeros(B, NH, DQK, DV, dtype=torch.long))),
     r"state C has dtype"),
    ("state-n", _with(A, state=_state_with(1, torch.randn(B, NH, DV))), r"state n has shape"),
    ("state-m-rank1", _with(A, state=_state_with(2, torch.zeros(B))), r"state m"),
    ("state-m-last2", _with(A, state=_state_with(2, torch.zeros(B, NH, 2))), r"state m has shape"),
    ("state-m-not-tensor", _with(A, state=_state_with(2, 0.0)), r"state m"),
    ("state-C-device", _with(A, state=_state_with(0, torch.randn(B, NH, DQK, DV, device=META))), r"state.C is on"),
    ("state-m-device", _with(A, state=_state_with(2, torch.zeros(B, NH, device=META))), r"state.m is on"),
    ("resets-int", _with(A, resets=torch.zeros(B, S, dtype=torch.long)), r"resets must have dtype torch\.bool"),
    ("resets-float", _with(A, resets=torch.zeros(B, S)), r"resets must have dtype torch\.bool"),
    ("resets-S+1", _with(A, resets=torch.zeros(B, S + 1, dtype=torch.bool)), r"resets has shape"),
    ("resets-1d", _with(A, resets=torch.zeros(S, dtype=torch.bool)), r"resets has shape"),
    ("resets-B1-broadcast", _with(A, resets=torch.zeros(1, S, dtype=torch.bool)), r"resets has shape"),
    ("resets-list", _with(A, resets=[False] * S), r"resets must be a bool tensor"),
    ("resets-device", _with(A, resets=torch.zeros(B, S, dtype=torch.bool, device=META)), r"resets is on meta"),
    ("backend-name", _with(A, backend="fast"), r"backend must be one of"),
    ("backend-case", _with(A, backend="Chunkwise"), r"backend must be one of"),
    ("backend-triton-on-cpu", _with(A, backend="triton"), r"backend='triton'"),
    ("chunk-0", _with(A, chunk_size=0), r"chunk_size"),
    ("chunk-neg", _with(A, chunk_size=-16), r"chunk_size"),
    ("chunk-float", _with(A, chunk_size=16.0), r"chunk_size"),
    ("chunk-bool", _with(A, chunk_size=True), r"chunk_size"),
    ("chunk-str", _with(A, chunk_size="64"), r"chunk_size"),
    ("eps-neg", _with(A, eps=-1e-6), r"\beps\b"),
    ("eps-nan", _with(A, eps=math.nan), r"\beps\b"),
    ("eps-str", _with(A, eps="1e-6"), r"\beps\b"),
    ("eps-none", _with(A, eps=None), r"\beps\b"),
]


@pytest.mark.parametrize("kwargs,pattern", [c[1:] for c in MLSTM_BAD], ids=[c[0] for c in MLSTM_BAD])
def test_mlstm_bad_input(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        mlstm(**kwargs)


def test_per_backend_cases_exist():
    assert set(PER_BACKEND) <= {c[0] for c in MLSTM_BAD}


# one case of each kind (shape, dtype, device, empty, state, resets, chunk_size, eps): validation happens before
# dispatch, so repeating all of MLSTM_BAD per backend (as before) tested the same code four times
PER_BACKEND = ("k-DQK", "f-dtype", "v-device", "empty-DQK", "state-C-transposed", "state-m-last2", "resets-S+1",
               "chunk-0", "eps-nan")


@pytest.mark.parametrize("backend", ["reference", "parallel", "chunkwise", "recurrent"])
@pytest.mark.parametrize("kwargs,pattern", [c[1:] for c in MLSTM_BAD if c[0] in PER_BACKEND],
                         ids=[c[0] for c in MLSTM_BAD if c[0] in PER_BACKEND])
def test_mlstm_bad_input_every_backend(kwargs, pattern, backend):
    """Validation happens before dispatch: every backend rejects the same inputs the same way."""
    with pytest.raises(ValueError, match=pattern):
        mlstm(**{**kwargs, "backend": backend})


def test_mlstm_valid_inputs_pass():
    """The baseline the bad cases are derived from is itself valid (so each case fails for its own reason)."""
    h, st = mlstm(**A, state=_mlstm_state(), resets=torch.zeros(B, S, dtype=torch.bool), chunk_size=2, eps=0.0)
    assert h.shape == (B, NH, S, DV) and torch.isfinite(h).all()
    # gates may have a dtype other than q's (e.g. float32 gates with bfloat16 q, k, v)
    mlstm(**_with(A, i=A["i"].double(), f=A["f"].double()))
    # an integer chunk_size of any positive size, and an int eps, are fine
    mlstm(**A, chunk_size=1000, eps=0)


def _step_args():
    return {k: v[:, :, 0] for k, v in A.items()}


SA = _step_args()
STEP_BAD = [
    ("q-rank4", _with(SA, q=A["q"]), r"\bq must have 3 dimensions"),
    ("k-DQK", _with(SA, k=SA["k"][..., :2]), r"\bk has shape"),
    ("v-B", _with(SA, v=SA["v"][:1]), r"\bv has shape"),
    ("i-rank3", _with(SA, i=SA["i"][..., None]), r"\bi must have 2 dimensions"),
    ("f-NH1-broadcast", _with(SA, f=SA["f"][:, :1]), r"\bf has shape"),
    ("v-dtype", _with(SA, v=SA["v"].double()), r"\bv has dtype"),
    ("i-device", _with(SA, i=SA["i"].to(META)), r"\bi is on meta"),
    ("state-C", _with(SA, state=_state_with(0, torch.randn(B, NH, DQK, DV + 1))), r"state C has shape"),
    ("state-n-device", _with(SA, state=_state_with(1, torch.randn(B, NH, DQK, device=META))), r"state.n is on"),
    ("state-bad", _with(SA, state="fresh"), r"\bstate must be a tuple"),
    ("eps-neg", _with(SA, eps=-1.0), r"\beps\b"),
    ("backend-name", _with(SA, backend="chunkwise"), r"backend must be"),
    ("backend-triton-on-cpu", _with(SA, backend="triton"), r"backend='triton'"),
    ("empty-DQK", _with(SA, q=SA["q"][..., :0], k=SA["k"][..., :0]), r"empty dimension in q"),
]


@pytest.mark.parametrize("kwargs,pattern", [c[1:] for c in STEP_BAD], ids=[c[0] for c in STEP_BAD])
def test_mlstm_step_bad_input(kwargs, pattern):
    kwargs = dict(kwargs)
    kwargs.setdefault("state", None)
    with pytest.raises(ValueError, match=pattern):
        mlstm_step(**kwargs)


# ----------------------------------------------------------------------------------------------------------
# sLSTM
# ----------------------------------------------------------------------------------------------------------

def _slstm_args(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return dict(x=torch.randn(B, S, 4, NH, DH, generator=g, dtype=dtype),
                R=torch.randn(4, NH, DH, DH, generator=g, dtype=dtype) * 0.3,
                b=torch.randn(4, NH, DH, generator=g, dtype=dtype))


def _slstm_state(index=None, value=None):
    st = [torch.zeros(B, NH, DH), torch.ones(B, NH, DH), torch.zeros(B, NH, DH), torch.zeros(B, NH, DH)]
    if index is not None:
        st[index] = value
    return tuple(st)


X = _slstm_args()
SLSTM_BAD = [
    ("x-rank4", _with(X, x=X["x"][0]), r"\bx must have 5 dimensions"),
    ("x-3-gates", _with(X, x=X["x"][:, :, :3]), r"\bx must have shape \(B, S, 4, NH, DH\)"),
    ("x-gates-last", _with(X, x=X["x"].permute(0, 1, 3, 4, 2)), r"\bx must have shape|\bR has shape"),
    ("x-int", _with(X, x=X["x"].long()), r"\bx has dtype"),
    ("x-numpy", _with(X, x=np.zeros((B, S, 4, NH, DH), dtype=np.float32)), r"\bx must be a torch\.Tensor"),
    ("R-DH", _with(X, R=X["R"][..., :3]), r"\bR has shape"),
    ("R-NH1-broadcast", _with(X, R=X["R"][:, :1]), r"\bR has shape"),
    ("R-rank3", _with(X, R=X["R"][0]), r"\bR must have 4 dimensions"),
    ("b-shape", _with(X, b=X["b"][:, :, :1]), r"\bb has shape"),
    ("b-rank2", _with(X, b=X["b"][0]), r"\bb must have 3 dimensions"),
    ("R-device", _with(X, R=X["R"].to(META)), r"\bR is on meta"),
    ("b-device", _with(X, b=X["b"].to(META)), r"\bb is on meta"),
    ("R-dtype", _with(X, R=X["R"].double()), r"\bR has dtype"),
    ("b-dtype", _with(X, b=X["b"].half()), r"\bb has dtype"),
    ("state-len3", _with(X, state=_slstm_state()[:3]), r"\bstate must be a tuple"),
    ("state-c-shape", _with(X, state=_slstm_state(0, torch.zeros(B, NH, DH + 1))), r"state c has shape"),
    ("state-m-rank2", _with(X, state=_slstm_state(2, torch.zeros(B, NH))), r"state m must have 3 dimensions"),
    ("state-h-device", _with(X, state=_slstm_state(3, torch.zeros(B, NH, DH, device=META))), r"state h is on meta"),
    ("state-n-B1-broadcast", _with(X, state=_slstm_state(1, torch.ones(1, NH, DH))), r"state n has shape"),
    ("resets-int", _with(X, resets=torch.zeros(B, S, dtype=torch.int32)), r"resets must have dtype torch\.bool"),
    ("resets-shape", _with(X, resets=torch.zeros(B, S - 1, dtype=torch.bool)), r"resets has shape"),
    ("backend-name", _with(X, backend="parallel"), r"backend must be one of"),
    ("backend-none", _with(X, backend=None), r"backend must be one of"),
]


@pytest.mark.parametrize("kwargs,pattern", [c[1:] for c in SLSTM_BAD], ids=[c[0] for c in SLSTM_BAD])
def test_slstm_bad_input(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        slstm(**kwargs)


def test_slstm_valid_inputs_pass():
    h, st = slstm(**X, state=_slstm_state(), resets=torch.zeros(B, S, dtype=torch.bool))
    assert h.shape == (B, S, NH, DH) and torch.isfinite(h).all()


def test_bad_backend_for_mlstm_step_is_not_silently_ignored():
    with pytest.raises(ValueError, match="backend"):
        mlstm_step(**SA, state=None, backend="recurrent")
