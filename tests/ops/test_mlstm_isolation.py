"""A non-finite value in one token reaches only what the recurrence reaches (issue 14, item 1).

The recurrent definition spreads a NaN in token t's q, k, v or gates forward only, and never across a reset: the
state is cleared before the next document's first token. The parallel and chunkwise forms compute all pairs at
once, so a masked-out (s > t, or other document) term must be selected away, not multiplied by zero (0 * NaN is
NaN). Here: every form, a NaN (or inf) planted at one token, with and without an initial state and a reset; the
outputs before the token and after the reset must be finite and equal to the clean run's.
"""
from __future__ import annotations

import pytest
import torch

from helpers import make_mlstm_case
from fastxlstm.ops import mlstm

S, T_BAD, T_RESET = 23, 9, 14
FORMS = [("reference", 64), ("parallel", 64), ("recurrent", 64), ("chunkwise", 4), ("chunkwise", 5),
         ("chunkwise", 64)]


def _inputs(with_state):
    case = make_mlstm_case(2, 2, S, 6, 5, seed=3, with_state=with_state)
    t = {k: v.clone() for k, v in case.tensors.items()}
    state = (t.pop("C0"), t.pop("n0"), t.pop("m0")) if with_state else None
    return t, state


def _plant(t, name, value):
    t = {k: v.clone() for k, v in t.items()}
    if t[name].ndim == 4:
        t[name][:, :, T_BAD, 1] = value
    else:
        t[name][:, :, T_BAD] = value
    return t


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("name", ["q", "k", "v", "i", "f"])
@pytest.mark.parametrize("with_reset", [False, True], ids=["noreset", "reset"])
@pytest.mark.parametrize("with_state", [False, True], ids=["fresh", "state"])
@pytest.mark.parametrize("backend,chunk_size", FORMS, ids=[f"{b}-L{c}" for b, c in FORMS])
def test_bad_token_stays_in_its_document(backend, chunk_size, with_state, with_reset, name, value):
    t, state = _inputs(with_state)
    resets = None
    if with_reset:
        resets = torch.zeros(2, S, dtype=torch.bool)
        resets[:, T_RESET] = True
        resets[1, 2] = True  # a second document boundary before the bad token in one row
    args = lambda d: [d[k] for k in ("q", "k", "v", "i", "f")]  # noqa: E731
    h0, st0 = mlstm(*args(t), state=state, backend=backend, chunk_size=chunk_size, resets=resets)
    h1, st1 = mlstm(*args(_plant(t, name, value)), state=state, backend=backend, chunk_size=chunk_size,
                    resets=resets)
    assert torch.isfinite(h0).all()
    before = h1[:, :, :T_BAD]
    assert torch.isfinite(before).all(), f"{name}={value} at t={T_BAD} reached earlier tokens"
    torch.testing.assert_close(before, h0[:, :, :T_BAD], rtol=1e-12, atol=0)
    if with_reset:
        after = h1[:, :, T_RESET:]
        assert torch.isfinite(after).all(), f"{name}={value} at t={T_BAD} crossed the reset at {T_RESET}"
        torch.testing.assert_close(after, h0[:, :, T_RESET:], rtol=1e-12, atol=0)
        for a, b in zip(st1, st0):  # the final state belongs to the last document only
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    elif value != value:
        # a NaN does reach its own token (later ones too, except for q), as in the recurrence: not hidden
        assert not torch.isfinite(h1[:, :, T_BAD]).all()
