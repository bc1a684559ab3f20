"""Every mLSTM form against the float64 step-by-step reference (issue 2; docs/MATH.md section 1).

The reference (ops/mlstm_forms/reference.py) is the definition. Each backend must match it in outputs, final state and
gradients of q, k, v, i, f and of the initial state (C, n): relative error ||a - b|| / ||b|| below 1e-5 in
float64 and 1e-4 in float32, where the float32 run is compared to the float64 reference computed from the same
(rounded) values. m is a stabiliser without gradient, so the loss used for gradients reads h, C and n only.

Set FASTXLSTM_ERR_LOG=/some/file.jsonl to collect the measured errors.
"""
from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings, strategies as st

from helpers import (MLSTMCase, assert_finite, compare_runs, make_mlstm_case, record, rel_err, run_mlstm,
                     run_mlstm_steps, worst)
from fastxlstm.ops import mlstm, mlstm_step

F64_TOL = 1e-9  # measured <= 3.2e-11 (random shapes with DQK=1), <= 2.5e-13 elsewhere; the issue asked 1e-5
F32_TOL = 2e-5  # measured <= 6.2e-6 (extreme gates), 3.6e-6 elsewhere; the issue asked for 1e-4
TOL = {torch.float64: F64_TOL, torch.float32: F32_TOL}

BACKENDS = ("parallel", "chunkwise", "recurrent")
# (backend, chunk_size): chunk sizes only matter for the chunkwise form; 128 > every S below but 200.
FORMS = [("parallel", 64), ("recurrent", 64)] + [("chunkwise", c) for c in (1, 16, 64, 128)]
LENGTHS = (1, 7, 63, 65, 200)
B, NH, DQK, DV = 2, 2, 6, 9  # DQK != DV on purpose


@functools.lru_cache(maxsize=None)
def _case(S: int, with_state: bool, seed: int = 0) -> MLSTMCase:
    return make_mlstm_case(B, NH, S, DQK, DV, seed=1000 * S + 7 * with_state + seed, with_state=with_state)


@functools.lru_cache(maxsize=None)
def _reference(S: int, with_state: bool, dtype: torch.dtype):
    """float64 reference of the values as rounded to ``dtype`` (cached: it is the slow part)."""
    case = _case(S, with_state).cast(dtype).up()
    return run_mlstm(case, "reference")


def _check(errs, tol, tag):
    record(tag, errs)
    name, value = worst(errs)
    assert value < tol, f"{tag}: worst relative error {name} = {value:.3e} >= {tol:.0e}; all: " + \
        ", ".join(f"{k}={v:.2e}" for k, v in errs.items())


# ----------------------------------------------------------------------------------------------------------
# each form against the reference
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("with_state", [False, True], ids=["fresh", "state"])
@pytest.mark.parametrize("S", LENGTHS)
@pytest.mark.parametrize("backend,chunk_size", FORMS, ids=[f"{b}-L{c}" for b, c in FORMS])
def test_form_matches_reference(backend, chunk_size, S, with_state, dtype):
    case = _case(S, with_state).cast(dtype)
    got = run_mlstm(case, backend, chunk_size=chunk_size)
    assert got.h.dtype == dtype, "h must come back in the dtype of q"
    assert got.h.shape == (B, NH, S, DV)
    assert got.C.shape == (B, NH, DQK, DV) and got.n.shape == (B, NH, DQK) and got.m.shape == (B, NH)
    for k, g in got.grads.items():
        assert_finite(f"d_{k}", g)
    errs = compare_runs(got, _reference(S, with_state, dtype))
    _check(errs, TOL[dtype], f"{backend}-L{chunk_size} S={S} state={with_state} {dtype}")


@pytest.mark.parametrize("backend,chunk_size", [("parallel", 64), ("recurrent", 64), ("chunkwise", 16),
                                                ("chunkwise", 1)])
def test_float64_forms_agree_to_rounding(backend, chunk_size):
    """Stricter than the issue: in float64 every form is the same function up to rounding. This catches a
    different stabiliser convention (m_0, the max over the initial state), which shows only through eps and
    would hide under the 1e-5 bound."""
    S = 65
    case = _case(S, True)
    errs = compare_runs(run_mlstm(case, backend, chunk_size=chunk_size), _reference(S, True, torch.float64))
    _check(errs, 1e-10, f"tight {backend}-L{chunk_size}")


@pytest.mark.parametrize("with_state", [False, True], ids=["fresh", "state"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_mlstm_step_matches_reference(dtype, with_state):
    """S calls of mlstm_step (backend 'torch') equal one call of the sequence reference, gradients included."""
    S = 63
    case = _case(S, with_state).cast(dtype)
    got = run_mlstm_steps(case)
    assert got.h.dtype == dtype
    errs = compare_runs(got, _reference(S, with_state, dtype))
    _check(errs, TOL[dtype], f"mlstm_step S={S} state={with_state} {dtype}")


def test_mlstm_step_fresh_state_equals_none():
    case = _case(7, False)
    t = case.tensors
    args = [t[k][:, :, 0] for k in ("q", "k", "v", "i", "f")]
    zero = (torch.zeros(B, NH, DQK, DV, dtype=torch.float64), torch.zeros(B, NH, DQK, dtype=torch.float64),
            torch.zeros(B, NH, dtype=torch.float64))
    h0, st0 = mlstm_step(*args, None, backend="torch")
    h1, st1 = mlstm_step(*args, zero, backend="torch")
    assert rel_err(h0, h1) == 0.0
    for a, b in zip(st0, st1):
        assert rel_err(a, b) == 0.0


def test_mlstm_step_does_not_modify_state_in_place():
    case = _case(7, True)
    t = case.tensors
    state = (t["C0"].clone(), t["n0"].clone(), t["m0"].clone())
    before = [s.clone() for s in state]
    mlstm_step(*[t[k][:, :, 0] for k in ("q", "k", "v", "i", "f")], state, backend="torch")
    for s, b in zip(state, before):
        assert torch.equal(s, b)


# ----------------------------------------------------------------------------------------------------------
# state carry-over
# ----------------------------------------------------------------------------------------------------------

def _split_run(case: MLSTMCase, backend: str, split: int, chunk_size: int):
    """Run [0, split) then [split, S) carrying the state; returns (h, C, n, m) and gradients (same loss)."""
    leaves = {k: t.detach().clone().requires_grad_(k != "m0") for k, t in case.tensors.items()}
    state = (leaves["C0"], leaves["n0"], leaves["m0"]) if case.has_state else None
    S = leaves["q"].shape[2]
    hs = []
    for lo, hi in ((0, split), (split, S)):
        part = [leaves[k][:, :, lo:hi] for k in ("q", "k", "v", "i", "f")]
        h, state = mlstm(*part, state=state, backend=backend, chunk_size=chunk_size)
        hs.append(h)
    h = torch.cat(hs, dim=2)
    C, n, m = state
    go = case.grads_out
    loss = (h * go["h"]).sum() + (C * go["C"]).sum() + (n * go["n"]).sum()
    names = [k for k in leaves if k != "m0"]
    grads = dict(zip(names, torch.autograd.grad(loss, [leaves[k] for k in names])))
    return h.detach(), C.detach(), n.detach(), m.detach(), grads


@pytest.mark.parametrize("with_state", [False, True], ids=["fresh", "state"])
@pytest.mark.parametrize("split", [1, 13, 16, 36])
@pytest.mark.parametrize("backend", ("reference",) + BACKENDS)
def test_split_equals_one_pass(backend, split, with_state):
    S, chunk_size = 37, 8
    case = _case(S, with_state)
    one = run_mlstm(case, backend, chunk_size=chunk_size)
    h, C, n, m, grads = _split_run(case, backend, split, chunk_size)
    errs = {"h": rel_err(h, one.h), "C": rel_err(C, one.C), "n": rel_err(n, one.n), "m": rel_err(m, one.m)}
    errs.update({"d_" + k: rel_err(g, one.grads[k]) for k, g in grads.items()})
    _check(errs, 1e-10, f"split {backend} at {split} state={with_state}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_parallel_with_state_equals_recurrent(dtype):
    case = _case(65, True).cast(dtype)
    par = run_mlstm(case, "parallel")
    rec = run_mlstm(case, "recurrent")
    _check(compare_runs(par, rec), TOL[dtype], f"parallel vs recurrent with state {dtype}")


# ----------------------------------------------------------------------------------------------------------
# extreme gates
# ----------------------------------------------------------------------------------------------------------

S_EXTREME = 2048
# float32 bound for the extreme test. With i ~ U(-15, 15) the stabiliser m is large, exp(-m) no longer floors the
# denominator |n^T q|, which then cancels at some positions (|h| reaches ~1e3 where the median is ~0.5): the
# problem itself is ill-conditioned in float32, and the reference run in float32 is off by 1.7e-4 on h and 4.5e-4
# on gradients there (1e-6 with the -10 bias). No form can be asked to beat the definition run in the same
# precision by much, so the bound is max(1e-4, 3 x the float32 reference's own error), quantity by quantity.
EXTREME_F32_FLOOR = 1e-4
EXTREME_F32_FACTOR = 3.0


def _extreme_i(kind):
    def gen(g):
        u = torch.rand(1, 2, S_EXTREME, generator=g, dtype=torch.float64) * 30.0 - 15.0
        return u - 10.0 if kind == "shifted" else u
    return gen


def _extreme_f(g):
    return torch.rand(1, 2, S_EXTREME, generator=g, dtype=torch.float64) * 30.0 - 15.0


@functools.lru_cache(maxsize=None)
def _extreme_case(kind: str) -> MLSTMCase:
    return make_mlstm_case(1, 2, S_EXTREME, 8, 12, seed=77 if kind == "shifted" else 78, with_state=False,
                           i_gen=_extreme_i(kind), f_gen=_extreme_f)


@functools.lru_cache(maxsize=None)
def _extreme_reference(kind: str, dtype: torch.dtype):
    return run_mlstm(_extreme_case(kind).cast(dtype).up(), "reference")


@functools.lru_cache(maxsize=None)
def _extreme_f32_bounds(kind: str):
    """Per-quantity float32 bounds: the float32 reference's own error against the float64 one, times 3."""
    own = compare_runs(run_mlstm(_extreme_case(kind).cast(torch.float32), "reference"),
                       _extreme_reference(kind, torch.float32))
    record(f"extreme {kind} reference-in-float32", own)
    return {k: max(EXTREME_F32_FLOOR, EXTREME_F32_FACTOR * v) for k, v in own.items()}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["shifted", "plain"], ids=["i=U(-15,15)-10", "i=U(-15,15)"])
def test_extreme_gates(kind, backend, dtype):
    """Input pre-activations U(-15, 15) (optionally -10, the 7B's bias), forget U(-15, 15), S = 2048: no NaN or
    Inf anywhere, and the forms still agree with the float64 reference."""
    case = _extreme_case(kind).cast(dtype)
    got = run_mlstm(case, backend, chunk_size=64)
    for name, t in {**got.outputs(), **{"d_" + k: g for k, g in got.grads.items()}}.items():
        assert_finite(name, t)
    ref = _extreme_reference(kind, dtype)
    errs = compare_runs(got, ref)
    record(f"extreme {kind} {backend} {dtype}", errs)
    bounds = {k: F64_TOL for k in errs} if dtype == torch.float64 else _extreme_f32_bounds(kind)
    bad = {k: v for k, v in errs.items() if v >= bounds[k]}
    assert not bad, f"extreme {kind} {backend} {dtype}: " + ", ".join(f"{k}={v:.2e}" for k, v in errs.items())


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_gates_with_resets(backend):
    """The 7B's regime (input bias -10) with packed documents: resets at random positions (including runs of
    consecutive ones and position 0) must not create NaN/Inf through -inf arithmetic, forward or backward."""
    kind = "shifted"
    case = _extreme_case(kind).cast(torch.float32)
    g = torch.Generator().manual_seed(3)
    resets = torch.rand(1, S_EXTREME, generator=g) < 0.01
    resets[0, 0] = True
    resets[0, 1000:1003] = True
    got = run_mlstm(case, backend, chunk_size=64, resets=resets)
    for name, t in {**got.outputs(), **{"d_" + k: v for k, v in got.grads.items()}}.items():
        assert_finite(name, t)
    ref = run_mlstm(case.up(), "reference", resets=resets)
    own = compare_runs(run_mlstm(case, "reference", resets=resets), ref)
    errs = compare_runs(got, ref)
    record(f"extreme+resets {backend}", errs)
    bad = {k: v for k, v in errs.items() if v >= max(EXTREME_F32_FLOOR, EXTREME_F32_FACTOR * own[k])}
    assert not bad, f"extreme+resets {backend}: " + ", ".join(f"{k}={v:.2e}" for k, v in errs.items())


# ----------------------------------------------------------------------------------------------------------
# resets (packed documents)
# ----------------------------------------------------------------------------------------------------------

def _resets(S, rows):
    r = torch.zeros(len(rows), S, dtype=torch.bool)
    for b, positions in enumerate(rows):
        for p in positions:
            r[b, p] = True
    return r


RESET_CASES = [(0, False), (13, False), (16, False), (13, True), (16, True), (36, True)]


@pytest.mark.parametrize("r,with_state", RESET_CASES, ids=[f"r{r}-{'state' if s else 'fresh'}" for r, s in RESET_CASES])
@pytest.mark.parametrize("backend", ("reference",) + BACKENDS)
def test_reset_equals_separate_documents(backend, r, with_state):
    """Row 0 has a reset at r: its outputs equal document [0, r) (from the initial state) followed by document
    [r, S) from a fresh state, and its final state is the second document's. Row 1 (no reset) is untouched."""
    S, chunk_size = 37, 8
    case = _case(S, with_state, seed=r + 1)
    resets = _resets(S, [[r], []])
    got = run_mlstm(case, backend, chunk_size=chunk_size, resets=resets)
    for k, g in got.grads.items():
        assert_finite(f"d_{k}", g)

    t = case.tensors
    row = lambda x, lo, hi: x[0:1, :, lo:hi]  # noqa: E731
    parts = []
    if r > 0:
        st0 = (t["C0"][0:1], t["n0"][0:1], t["m0"][0:1]) if with_state else None
        h1, _ = mlstm(*[row(t[k], 0, r) for k in ("q", "k", "v", "i", "f")], state=st0, backend=backend,
                      chunk_size=chunk_size)
        parts.append(h1)
    h2, (C2, n2, m2) = mlstm(*[row(t[k], r, S) for k in ("q", "k", "v", "i", "f")], state=None, backend=backend,
                             chunk_size=chunk_size)
    parts.append(h2)
    h_sep = torch.cat(parts, dim=2)
    st1 = (t["C0"][1:2], t["n0"][1:2], t["m0"][1:2]) if with_state else None
    h_row1, (C_r1, n_r1, m_r1) = mlstm(*[t[k][1:2] for k in ("q", "k", "v", "i", "f")], state=st1,
                                       backend=backend, chunk_size=chunk_size)
    errs = {
        "h row0": rel_err(got.h[0:1], h_sep), "C row0": rel_err(got.C[0:1], C2), "n row0": rel_err(got.n[0:1], n2),
        "m row0": rel_err(got.m[0:1], m2), "h row1": rel_err(got.h[1:2], h_row1), "C row1": rel_err(got.C[1:2], C_r1),
    }
    # And against the reference with the same resets, gradients included.
    errs.update({"ref " + k: v for k, v in compare_runs(got, run_mlstm(case, "reference", resets=resets)).items()})
    _check(errs, 1e-10, f"reset {backend} r={r} state={with_state}")


@pytest.mark.parametrize("backend", ("reference",) + BACKENDS)
def test_reset_blocks_gradient_to_previous_document(backend):
    """A loss on row 0's outputs after the reset has exactly no gradient (and no NaN) before the reset."""
    S, r = 37, 20
    case = _case(S, True, seed=5)
    leaves = {k: v.detach().clone().requires_grad_(k != "m0") for k, v in case.tensors.items()}
    resets = _resets(S, [[r], [3]])
    h, _ = mlstm(*[leaves[k] for k in ("q", "k", "v", "i", "f")], state=(leaves["C0"], leaves["n0"], leaves["m0"]),
                 backend=backend, chunk_size=8, resets=resets)
    h[0, :, r:].pow(2).sum().backward()
    for k in ("q", "k", "v", "i", "f"):
        g = leaves[k].grad
        assert_finite(f"d_{k}", g)
        assert g[0, :, :r].abs().max().item() == 0.0, f"d_{k} leaks across the reset"
        assert g[0, :, r:].abs().max().item() > 0.0, f"d_{k} is zero after the reset (a test that cannot fail?)"
    for k in ("C0", "n0"):
        assert_finite(f"d_{k}", leaves[k].grad)
        assert leaves[k].grad[0].abs().max().item() == 0.0, f"d_{k} leaks across the reset"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("backend,chunk_size", FORMS, ids=[f"{b}-L{c}" for b, c in FORMS])
def test_many_resets_match_reference(backend, chunk_size, dtype):
    """Resets at 0, at chunk boundaries, consecutive ones and the last token, with an initial state."""
    S = 65
    case = _case(S, True, seed=3).cast(dtype)
    resets = _resets(S, [[0, 16, 17, 40, 64], [5, 6, 7, 63, 64]])
    got = run_mlstm(case, backend, chunk_size=chunk_size, resets=resets)
    for k, g in got.grads.items():
        assert_finite(f"d_{k}", g)
    ref = run_mlstm(case.up(), "reference", resets=resets)
    _check(compare_runs(got, ref), TOL[dtype], f"many resets {backend}-L{chunk_size} {dtype}")


# ----------------------------------------------------------------------------------------------------------
# true gradients, API details, random shapes
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ("reference",) + BACKENDS)
def test_gradcheck_with_eps_zero(backend):
    """With eps = 0, h does not depend on the stabiliser m at all, so holding m fixed (no gradient) must give the
    true gradient: finite differences agree. This checks the m-without-gradient convention itself."""
    case = make_mlstm_case(1, 2, 5, 3, 4, seed=11, with_state=True)
    t = case.tensors
    names = ("q", "k", "v", "i", "f", "C0", "n0")
    leaves = [t[k].clone().requires_grad_() for k in names]

    def fn(q, k, v, i, f, C0, n0):
        h, (C, n, m) = mlstm(q, k, v, i, f, state=(C0, n0, t["m0"]), backend=backend, chunk_size=2, eps=0.0)
        # the true (unstabilised) final state is C exp(m): a function of the inputs alone
        return h, C * torch.exp(m)[..., None, None], n * torch.exp(m)[..., None]

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", ("reference",) + BACKENDS + ("auto",))
def test_return_state_false_returns_tensor(backend):
    case = _case(7, True)
    t = case.tensors
    out = mlstm(*[t[k] for k in ("q", "k", "v", "i", "f")], state=(t["C0"], t["n0"], t["m0"]), backend=backend,
                return_state=False)
    assert isinstance(out, torch.Tensor) and out.shape == (B, NH, 7, DV)
    h, _ = mlstm(*[t[k] for k in ("q", "k", "v", "i", "f")], state=(t["C0"], t["n0"], t["m0"]), backend=backend)
    assert torch.equal(out, h)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_auto_works_on_cpu(dtype):
    case = _case(65, True).cast(dtype)
    got = run_mlstm(case, "auto")
    _check(compare_runs(got, _reference(65, True, dtype)), TOL[dtype], f"auto {dtype}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_inputs(backend, dtype):
    """Half inputs: h comes back in the input dtype, the state in float32 (the op's contract), and the result is
    the float64 reference's up to half-precision rounding of h (2^-8 relative for bfloat16)."""
    S = 65
    case = _case(S, True).cast(dtype)
    got = run_mlstm(case, backend, chunk_size=16, grad=False)
    assert got.h.dtype == dtype
    assert got.C.dtype == got.n.dtype == got.m.dtype == torch.float32
    errs = compare_runs(got, run_mlstm(case.up(), "reference", grad=False))
    # measured 1.7e-3 (bfloat16) and 1.9e-4 (float16), every form
    _check(errs, 5e-3 if dtype == torch.bfloat16 else 1e-3, f"half {backend} {dtype}")


def test_state_m_may_have_trailing_unit_dim():
    case = _case(7, True)
    t = case.tensors
    args = [t[k] for k in ("q", "k", "v", "i", "f")]
    h0, st0 = mlstm(*args, state=(t["C0"], t["n0"], t["m0"]), backend="chunkwise")
    h1, st1 = mlstm(*args, state=(t["C0"], t["n0"], t["m0"][..., None]), backend="chunkwise")
    assert torch.equal(h0, h1) and st1[2].shape == (B, NH)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_not_modified(backend):
    case = _case(65, True)
    t = {k: v.clone() for k, v in case.tensors.items()}
    mlstm(*[t[k] for k in ("q", "k", "v", "i", "f")], state=(t["C0"], t["n0"], t["m0"]), backend=backend,
          chunk_size=16, resets=_resets(65, [[3], [40]]))
    for k, v in case.tensors.items():
        assert torch.equal(t[k], v), f"{backend} modified {k} in place"


@settings(max_examples=20, deadline=None, derandomize=True)
@given(b=st.integers(1, 2), nh=st.integers(1, 3), s=st.integers(1, 40), dqk=st.integers(1, 9),
       dv=st.integers(1, 9), chunk=st.integers(1, 20), with_state=st.booleans(),
       backend=st.sampled_from(BACKENDS), seed=st.integers(0, 2 ** 16))
def test_random_shapes(b, nh, s, dqk, dv, chunk, with_state, backend, seed):
    case = make_mlstm_case(b, nh, s, dqk, dv, seed=seed, with_state=with_state)
    got = run_mlstm(case, backend, chunk_size=chunk)
    ref = run_mlstm(case, "reference")
    _check(compare_runs(got, ref), F64_TOL, f"random {backend} B={b} NH={nh} S={s} {dqk}x{dv} L={chunk}")


def _unstabilised_reference(q, k, v, i, f, C0, n0, m0, eps):
    """An implementation that shares no code with the ops: the recurrence on the true (unstabilised) state,
    C_t = sigmoid(f_t) C_{t-1} + exp(i_t) k_t v_t^T (n alike; C_0 = exp(m_0) C0), in float64, and
    h_t = q_t^T C_t / (max(|q_t^T n_t|, 1) + eps exp(m_t)) with q scaled by 1/sqrt(DQK), where m_t is the
    stabiliser in closed form, m_t = max(sum_{j<=t} log f_j + m_0, max_s (sum_{s<j<=t} log f_j + i_s)) (a constant
    for autograd). Returns h and the true final state (C, n) with m."""
    B, NH, S, DQK = q.shape
    lf = torch.log(torch.sigmoid(f))
    cum = torch.cumsum(lf, -1)
    C = torch.exp(m0)[..., None, None] * C0
    n = torch.exp(m0)[..., None] * n0
    hs = []
    for t in range(S):
        C = torch.sigmoid(f[..., t])[..., None, None] * C + torch.exp(i[..., t])[..., None, None] * (
            k[..., t, :, None] * v[..., t, None, :])
        n = torch.sigmoid(f[..., t])[..., None] * n + torch.exp(i[..., t])[..., None] * k[..., t, :]
        seg = cum[..., t:t + 1] - cum[..., :t + 1]  # sum_{s<j<=t} log f_j for s = 0..t
        m_t = torch.maximum(cum[..., t] + m0, (seg + i[..., :t + 1]).amax(-1)).detach()
        qs = q[..., t, :] * DQK ** -0.5
        num = torch.einsum("bhd,bhde->bhe", qs, C)
        den = (qs * n).sum(-1)
        hs.append(num / (torch.maximum(den.abs(), torch.ones_like(den)) + eps * torch.exp(m_t))[..., None])
    return torch.stack(hs, 2), C, n, m_t


@pytest.mark.parametrize("with_state", [False, True], ids=["fresh", "state"])
def test_mlstm_step_matches_unstabilised_reference(with_state):
    """mlstm_step (S calls) against an independent implementation (above), outputs and gradients; the check of
    test_mlstm_step_matches_reference compares against a reference built on the same step function."""
    S = 20
    case = make_mlstm_case(2, 2, S, 6, 9, seed=77, with_state=with_state)
    got = run_mlstm_steps(case)
    t = {k: v.detach().clone().requires_grad_(k != "m0") for k, v in case.tensors.items()}
    C0 = t.get("C0", torch.zeros(2, 2, 6, 9, dtype=torch.float64))
    n0 = t.get("n0", torch.zeros(2, 2, 6, dtype=torch.float64))
    m0 = t.get("m0", torch.zeros(2, 2, dtype=torch.float64))
    h, C, n, m = _unstabilised_reference(t["q"], t["k"], t["v"], t["i"], t["f"], C0, n0, m0, 1e-6)
    em = torch.exp(got.m)
    errs = {"h": rel_err(got.h, h), "m": rel_err(got.m, m), "C": rel_err(got.C * em[..., None, None], C),
            "n": rel_err(got.n * em[..., None], n)}
    # gradients of <h, gh> + <C_stab, gC> + <n_stab, gn> with the stabilised state C_stab = C exp(-m)
    go = case.grads_out
    loss = (h * go["h"]).sum() + (C * torch.exp(-m)[..., None, None] * go["C"]).sum() \
        + (n * torch.exp(-m)[..., None] * go["n"]).sum()
    names = [k for k in t if k != "m0"]
    for k, g in zip(names, torch.autograd.grad(loss, [t[k] for k in names])):
        errs["d_" + k] = rel_err(got.grads[k], g)
    _check(errs, 1e-10, f"mlstm_step vs unstabilised state={with_state}")
