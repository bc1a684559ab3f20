"""sLSTM backends against the step-by-step reference and against a plain loop over heads and units written here
from the paper's equations (docs/MATH.md section 2), in float64, gradients included.

The loop is deliberately naive and unstabilised (the true semantics: i = exp(pre_i), c and n unscaled); inputs
are kept where exp() cannot overflow in float64. Final states are compared in true form: c exp(m), n exp(m).
"""
from __future__ import annotations

import functools
import math

import pytest
import torch

from helpers import (SLSTMCase, SLSTMRun, assert_finite, compare_slstm, make_slstm_case, record, rel_err,
                     run_slstm, slstm_loss, worst)
from fastxlstm.ops import slstm

BACKENDS = ("reference", "recurrent")
F64_TOL, F32_TOL = 1e-13, 3e-6  # measured <= 1.3e-15 and 6.9e-7; the issue asked for 1e-5 and 1e-4
TOL = {torch.float64: F64_TOL, torch.float32: F32_TOL}
EXACT = 1e-10  # the same function in float64 (no eps in the sLSTM, so no stabiliser convention shows)


def _check(errs, tol, tag):
    record(tag, errs)
    name, value = worst(errs)
    assert value < tol, f"{tag}: worst relative error {name} = {value:.3e} >= {tol:.0e}; all: " + \
        ", ".join(f"{k}={v:.2e}" for k, v in errs.items())


def _sigmoid(x):
    return 1.0 / (1.0 + torch.exp(-x))


def slstm_plain_loop(x, R, b, state=None, resets=None):
    """The paper's sLSTM, one batch row, head and unit at a time, with scalar autograd tensors.

    x (B, S, 4, NH, DH) gates (i, f, z, o); R (4, NH, DH, DH), unit j of gate g reads sum_d h_{t-1}[d] R[g, h, d, j];
    b (4, NH, DH); state (c, n, m, h) in the op's stabilised form (true c = c exp(m)). Returns h (B, S, NH, DH) and
    the true final (c, n) and h_last.
    """
    B, S, _, NH, DH = x.shape
    h_out = [[[[None] * DH for _ in range(NH)] for _ in range(S)] for _ in range(B)]
    c_fin = [[[None] * DH for _ in range(NH)] for _ in range(B)]
    n_fin = [[[None] * DH for _ in range(NH)] for _ in range(B)]
    h_fin = [[[None] * DH for _ in range(NH)] for _ in range(B)]
    zero = x.new_zeros(())
    for bi in range(B):
        for hd in range(NH):
            if state is None:
                c, n, h = [zero] * DH, [zero] * DH, [zero] * DH
            else:
                c0, n0, m0, h0 = state
                c = [c0[bi, hd, j] * torch.exp(m0[bi, hd, j]) for j in range(DH)]
                n = [n0[bi, hd, j] * torch.exp(m0[bi, hd, j]) for j in range(DH)]
                h = [h0[bi, hd, j] for j in range(DH)]
            for t in range(S):
                if resets is not None and bool(resets[bi, t]):
                    c, n, h = [zero] * DH, [zero] * DH, [zero] * DH
                new_c, new_n, new_h = [], [], []
                for j in range(DH):
                    pre = []
                    for g in range(4):
                        acc = x[bi, t, g, hd, j] + b[g, hd, j]
                        for d in range(DH):
                            acc = acc + h[d] * R[g, hd, d, j]
                        pre.append(acc)
                    i_gate = torch.exp(pre[0])
                    f_gate = _sigmoid(pre[1])
                    z = torch.tanh(pre[2])
                    o = _sigmoid(pre[3])
                    cj = f_gate * c[j] + i_gate * z
                    nj = f_gate * n[j] + i_gate
                    new_c.append(cj)
                    new_n.append(nj)
                    new_h.append(o * cj / nj)
                c, n, h = new_c, new_n, new_h
                for j in range(DH):
                    h_out[bi][t][hd][j] = h[j]
            for j in range(DH):
                c_fin[bi][hd][j], n_fin[bi][hd][j], h_fin[bi][hd][j] = c[j], n[j], h[j]

    def stack(nested):
        if isinstance(nested, list):
            return torch.stack([stack(e) for e in nested])
        return nested

    h_seq = stack(h_out) if S > 0 else x.new_zeros(B, 0, NH, DH)
    return h_seq, stack(c_fin), stack(n_fin), stack(h_fin)


def run_loop(case: SLSTMCase, resets=None) -> SLSTMRun:
    leaves = {k: t.detach().clone().to(torch.float64).requires_grad_(k != "m0") for k, t in case.tensors.items()}
    state = (leaves["c0"], leaves["n0"], leaves["m0"], leaves["h0"]) if case.has_state else None
    h, c_true, n_true, h_last = slstm_plain_loop(leaves["x"], leaves["R"], leaves["b"], state, resets)
    loss = slstm_loss(h, c_true, n_true, h_last, {k: v.to(torch.float64) for k, v in case.grads_out.items()})
    names = [k for k in leaves if k != "m0"]
    grads = dict(zip(names, torch.autograd.grad(loss, [leaves[k] for k in names])))
    return SLSTMRun(h.detach(), c_true.detach(), n_true.detach(), h_last.detach(), grads)


@functools.lru_cache(maxsize=None)
def _case(B, S, NH, DH, with_state, seed=0):
    return make_slstm_case(B, S, NH, DH, seed=seed + 100 * S + with_state, with_state=with_state)


@functools.lru_cache(maxsize=None)
def _reference(B, S, NH, DH, with_state, dtype):
    return run_slstm(_case(B, S, NH, DH, with_state).cast(dtype).cast(torch.float64), "reference")


# ----------------------------------------------------------------------------------------------------------
# against the plain loop (the paper's equations)
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("with_state", [False, True], ids=["fresh", "state"])
@pytest.mark.parametrize("S", [1, 6])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_plain_loop(backend, S, with_state):
    case = _case(2, S, 2, 3, with_state)
    got = run_slstm(case, backend)
    _check(compare_slstm(got, run_loop(case)), EXACT, f"slstm {backend} vs loop S={S} state={with_state}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_plain_loop_with_resets(backend):
    S = 7
    case = _case(2, S, 2, 3, True, seed=9)
    resets = torch.zeros(2, S, dtype=torch.bool)
    resets[0, 3] = True
    resets[1, 0] = resets[1, 5] = resets[1, 6] = True
    got = run_slstm(case, backend, resets=resets)
    _check(compare_slstm(got, run_loop(case, resets)), EXACT, f"slstm {backend} vs loop with resets")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_input_gate_is_stabilised(backend, dtype):
    """pre_i up to ~40 (exp(40) = 2e17 overflows float32 without the stabiliser): no NaN/Inf, and the result is
    still the paper's function, computed unstabilised by the loop in float64."""
    S = 6
    case = _case(2, S, 2, 3, True, seed=4)
    x = case.tensors["x"].clone()
    g = torch.Generator().manual_seed(5)
    x[:, :, 0] = torch.rand(x[:, :, 0].shape, generator=g, dtype=torch.float64) * 80.0 - 40.0
    case = SLSTMCase({**case.tensors, "x": x}, case.grads_out, True).cast(dtype)
    got = run_slstm(case, backend)
    for k, v in {**got.outputs(), **got.grads}.items():
        assert_finite(k, v)
    # the true c, n are ~exp(40): compare h (and grads) where float32 can represent things; c, n relatively.
    _check(compare_slstm(got, run_loop(case)), TOL[dtype], f"slstm {backend} large pre_i {dtype}")


# ----------------------------------------------------------------------------------------------------------
# against the reference
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("with_state", [False, True], ids=["fresh", "state"])
@pytest.mark.parametrize("S", [1, 7, 65])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, S, with_state, dtype):
    B, NH, DH = 2, 3, 8
    case = _case(B, S, NH, DH, with_state).cast(dtype)
    got = run_slstm(case, backend)
    assert got.h.dtype == dtype and got.h.shape == (B, S, NH, DH)
    for k, g in got.grads.items():
        assert_finite(f"d_{k}", g)
    _check(compare_slstm(got, _reference(B, S, NH, DH, with_state, dtype)), TOL[dtype],
           f"slstm {backend} S={S} state={with_state} {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_final_state_layout(backend):
    case = _case(2, 7, 3, 8, True)
    t = case.tensors
    h, (c, n, m, h_last) = slstm(t["x"], t["R"], t["b"], state=(t["c0"], t["n0"], t["m0"], t["h0"]),
                                 backend=backend)
    for s in (c, n, m, h_last):
        assert s.shape == (2, 3, 8) and s.dtype == torch.float64
    assert torch.equal(h_last, h[:, -1]), "the state's h is the last output"
    assert (n > 0).all(), "n is positive in every reachable state"


# ----------------------------------------------------------------------------------------------------------
# state carry-over and resets
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("with_state", [False, True], ids=["fresh", "state"])
@pytest.mark.parametrize("split", [1, 10, 30])
@pytest.mark.parametrize("backend", BACKENDS)
def test_split_equals_one_pass(backend, split, with_state):
    S = 31
    case = _case(2, S, 3, 8, with_state)
    one = run_slstm(case, backend)
    leaves = {k: v.detach().clone().requires_grad_(k != "m0") for k, v in case.tensors.items()}
    state = (leaves["c0"], leaves["n0"], leaves["m0"], leaves["h0"]) if with_state else None
    hs = []
    for lo, hi in ((0, split), (split, S)):
        h, state = slstm(leaves["x"][:, lo:hi], leaves["R"], leaves["b"], state=state, backend=backend)
        hs.append(h)
    h = torch.cat(hs, dim=1)
    c, n, m, h_last = state
    scale = torch.exp(m.detach())
    loss = slstm_loss(h, c * scale, n * scale, h_last, case.grads_out)
    names = [k for k in leaves if k != "m0"]
    grads = dict(zip(names, torch.autograd.grad(loss, [leaves[k] for k in names])))
    errs = {"h": rel_err(h, one.h), "c_true": rel_err(c * scale, one.c_true), "n_true": rel_err(n * scale, one.n_true),
            "h_last": rel_err(h_last, one.h_last)}
    errs.update({"d_" + k: rel_err(g, one.grads[k]) for k, g in grads.items()})
    _check(errs, EXACT, f"slstm split {backend} at {split} state={with_state}")


@pytest.mark.parametrize("r", [0, 9, 30])
@pytest.mark.parametrize("backend", BACKENDS)
def test_reset_equals_separate_documents(backend, r):
    S = 31
    case = _case(2, S, 3, 8, True, seed=r)
    t = case.tensors
    resets = torch.zeros(2, S, dtype=torch.bool)
    resets[0, r] = True
    got = run_slstm(case, backend, resets=resets)
    for k, g in got.grads.items():
        assert_finite(f"d_{k}", g)
    parts = []
    if r > 0:
        st = tuple(t[k][0:1] for k in ("c0", "n0", "m0", "h0"))
        parts.append(slstm(t["x"][0:1, :r], t["R"], t["b"], state=st, backend=backend)[0])
    h2, (c2, n2, m2, hl2) = slstm(t["x"][0:1, r:], t["R"], t["b"], state=None, backend=backend)
    parts.append(h2)
    h1, (c1, n1, m1, hl1) = slstm(t["x"][1:2], t["R"], t["b"], state=tuple(t[k][1:2] for k in ("c0", "n0", "m0", "h0")),
                                  backend=backend)
    errs = {"h row0": rel_err(got.h[0:1], torch.cat(parts, dim=1)),
            "c row0": rel_err(got.c_true[0:1], c2 * torch.exp(m2)), "h_last row0": rel_err(got.h_last[0:1], hl2),
            "h row1": rel_err(got.h[1:2], h1), "c row1": rel_err(got.c_true[1:2], c1 * torch.exp(m1))}
    ref = run_slstm(case, "reference", resets=resets)
    errs.update({"ref " + k: v for k, v in compare_slstm(got, ref).items()})
    _check(errs, EXACT, f"slstm reset {backend} r={r}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_reset_blocks_gradient_to_previous_document(backend):
    S, r = 20, 8
    case = _case(2, S, 2, 4, True, seed=3)
    leaves = {k: v.detach().clone().requires_grad_(k != "m0") for k, v in case.tensors.items()}
    resets = torch.zeros(2, S, dtype=torch.bool)
    resets[0, r] = True
    h, _ = slstm(leaves["x"], leaves["R"], leaves["b"],
                 state=tuple(leaves[k] for k in ("c0", "n0", "m0", "h0")), backend=backend, resets=resets)
    h[0, r:].pow(2).sum().backward()
    gx = leaves["x"].grad
    assert_finite("d_x", gx)
    assert gx[0, :r].abs().max().item() == 0.0, "gradient leaks across the reset"
    assert gx[0, r:].abs().max().item() > 0.0
    for k in ("c0", "n0", "h0"):
        assert_finite(f"d_{k}", leaves[k].grad)
        assert leaves[k].grad[0].abs().max().item() == 0.0, f"d_{k} leaks across the reset"


# ----------------------------------------------------------------------------------------------------------
# API details
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS + ("auto",))
def test_return_state_false_returns_tensor(backend):
    case = _case(2, 7, 3, 8, True)
    t = case.tensors
    out = slstm(t["x"], t["R"], t["b"], state=(t["c0"], t["n0"], t["m0"], t["h0"]), backend=backend,
                return_state=False)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 7, 3, 8)
    h, _ = slstm(t["x"], t["R"], t["b"], state=(t["c0"], t["n0"], t["m0"], t["h0"]), backend=backend)
    assert torch.equal(out, h)  # the same values, not only the shape


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_auto_works_on_cpu(dtype):
    case = _case(2, 65, 3, 8, True).cast(dtype)
    _check(compare_slstm(run_slstm(case, "auto"), _reference(2, 65, 3, 8, True, dtype)), TOL[dtype],
           f"slstm auto {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_not_modified(backend):
    case = _case(2, 7, 3, 8, True)
    t = {k: v.clone() for k, v in case.tensors.items()}
    slstm(t["x"], t["R"], t["b"], state=(t["c0"], t["n0"], t["m0"], t["h0"]), backend=backend)
    for k, v in case.tensors.items():
        assert torch.equal(t[k], v), f"{backend} modified {k} in place"


def test_plain_loop_is_not_trivial():
    """Guard the guard: the loop reacts to R (memory mixing), to b and to the state, so agreement means something."""
    case = _case(1, 4, 2, 3, True)
    base = run_loop(case)
    for key in ("R", "b", "c0", "h0"):
        t = dict(case.tensors)
        t[key] = t[key] + 0.1
        other = run_loop(SLSTMCase(t, case.grads_out, True))
        assert rel_err(other.h, base.h) > 1e-3, f"the loop ignores {key}"
    assert math.isfinite(base.h.abs().sum().item())


# ----------------------------------------------------------------------------------------------------------
# the first step from an empty state is exact for any input gate (issue 11, item 3)
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["fresh", "reset", "zero state"])
@pytest.mark.parametrize("backend", BACKENDS + ("auto",))
def test_first_step_exact_for_any_input_gate(backend, how):
    """From an empty state h_1 = sigmoid(o) tanh(z) whatever the input gate: the stabiliser starts from it.
    (With m starting at 0, pre_i = -200 underflowed exp() in float32 and gave h = 0; -95 lost precision.)"""
    B, S, NH, DH = 2, 3, 2, 4
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, S, 4, NH, DH, generator=g)
    x[:, :, 0] = torch.tensor([-200.0, -95.0, 80.0])[None, :, None, None]
    R = torch.randn(4, NH, DH, DH, generator=g)
    b = torch.zeros(4, NH, DH)
    want = torch.sigmoid(x[:, 0, 3].double()) * torch.tanh(x[:, 0, 2].double())
    state = None
    if how == "reset":  # a state with history, cleared by a reset before the first token
        state = tuple(torch.rand(B, NH, DH, generator=g) + 0.5 for _ in range(4))
    elif how == "zero state":  # what a layer's init_state gives
        state = tuple(torch.zeros(B, NH, DH) for _ in range(4))
    resets = torch.ones(B, S, dtype=torch.bool) if how == "reset" else None
    h, (c, n, m, h_last) = slstm(x, R, b, state=state, backend=backend, resets=resets)
    assert rel_err(h[:, 0], want) < 1e-6
    if how == "reset":  # every step reset: each one is a first step, its stabiliser its own input gate
        assert torch.equal(m, x[:, -1, 0])
        want_all = torch.sigmoid(x[:, :, 3].double()) * torch.tanh(x[:, :, 2].double())
        assert rel_err(h, want_all) < 1e-6


def test_empty_state_gradient_is_finite():
    """The -inf stabiliser of an empty state yields no NaN in the gradients (no inf * 0, no -inf - -inf)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 4, 2, 4, generator=g, dtype=torch.float64)
    x[:, :, 0] = -300.0
    x.requires_grad_()
    R = torch.randn(4, 2, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(4, 2, 4, dtype=torch.float64, requires_grad=True)
    resets = torch.zeros(2, 5, dtype=torch.bool)
    resets[0, 2] = True
    for backend in BACKENDS:
        h, _ = slstm(x, R, b, backend=backend, resets=resets)
        gx, gR, gb = torch.autograd.grad(h.sum(), [x, R, b])
        for name, t in (("d_x", gx), ("d_R", gR), ("d_b", gb)):
            assert_finite(f"{backend} {name}", t)
        assert gx.abs().sum() > 0
