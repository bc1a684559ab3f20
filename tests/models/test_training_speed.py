"""The training fast paths against the plain (eager) forms: the chunked cross entropy, the headwise and float32-gate
projections, ``model(ids, labels=...).loss``, activation checkpointing and ``compile_blocks`` (both architectures,
sLSTM blocks included). Equal losses and gradients, relative errors (norm of the difference over the norm of the
reference); random parameters and inputs, never zeros."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastxlstm.layers._fast import _TinyBlocksLinear, float_gate_linear, headwise_linear
from fastxlstm.models.loss import chunked_cross_entropy
from fastxlstm.models.presets import build_model


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def _perturbed(name, seed=0, **overrides):
    torch.manual_seed(seed)
    model = build_model(name, **overrides)
    with torch.no_grad():
        for p in model.parameters():  # every parameter random (a zero init would hide a missing term)
            p.add_(0.05 * torch.randn_like(p))
    return model


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _worst(ga, gb):
    assert set(ga) == set(gb)
    return max(_rel(ga[n], g) for n, g in gb.items() if g.norm() > 0)


# ---------------------------------------------------------------------------------------------------------------
# chunked cross entropy
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cap", [None, 2.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_chunked_ce_equals_cross_entropy_float64(cap, reduction):
    torch.manual_seed(1)
    h = torch.randn(3, 37, 24, dtype=torch.float64, requires_grad=True)
    W = torch.randn(61, 24, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 61, (3, 37))
    t[0, :5] = -100
    t[2, -1] = -100
    z = F.linear(h, W)
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    ref = F.cross_entropy(z.reshape(-1, 61), t.reshape(-1), reduction=reduction)
    if reduction == "none":
        ref = ref.view(3, 37)
    got = chunked_cross_entropy(h, W, t, chunk=10, soft_cap=cap, reduction=reduction)  # 111 rows: a short tail
    assert got.dtype == torch.float64 and got.shape == ref.shape
    assert _rel(got, ref) < 1e-12
    g = torch.rand_like(ref) + 0.5
    gr = torch.autograd.grad(ref, (h, W), g)
    gg = torch.autograd.grad(got, (h, W), g)
    assert _rel(gg[0], gr[0]) < 1e-12 and _rel(gg[1], gr[1]) < 1e-12  # measured ~1e-16


def test_chunked_ce_bf16_autocast_matches_plain():
    """Under CPU autocast both run the head's matmul in bf16 and everything after it in float32."""
    torch.manual_seed(2)
    h = torch.randn(2, 50, 32, requires_grad=True)
    W = torch.randn(100, 32, requires_grad=True)
    t = torch.randint(0, 100, (2, 50))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(h, W).float().reshape(-1, 100), t.reshape(-1))
        got = chunked_cross_entropy(h, W, t, chunk=16)
    assert got.dtype == torch.float32
    assert _rel(got, ref) < 1e-5  # measured ~1e-7
    gr = torch.autograd.grad(ref, (h, W))
    gg = torch.autograd.grad(got, (h, W))
    assert gg[0].dtype == h.dtype and gg[1].dtype == W.dtype
    # the weight gradient sums bf16 products per chunk in float32 (the plain form rounds the whole sum to bf16)
    assert _rel(gg[0], gr[0]) < 1e-2 and _rel(gg[1], gr[1]) < 1e-2  # measured 0 / 2.0e-3


@pytest.mark.parametrize("cap", [None, 2.0])
def test_chunked_ce_fused_chunks_equal_eager(monkeypatch, cap):
    """The CUDA path compiles each chunk's element-wise work (torch.compile); forced here on the CPU: the same loss
    and gradients as the eager chunk functions (float32, bf16 autocast)."""
    import fastxlstm.models.loss as L
    torch.manual_seed(6)
    h = torch.randn(2, 45, 16, requires_grad=True)
    W = torch.randn(37, 16, requires_grad=True)
    t = torch.randint(0, 37, (2, 45))
    t[1, 3] = -100
    out = {}
    for fused in (False, True):
        monkeypatch.setattr(L, "_FORCE_FUSED", fused)
        for ac in (False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=ac):
                loss = chunked_cross_entropy(h, W, t, chunk=32, soft_cap=cap)  # 90 rows: chunks of 32, 32, 26
            out[fused, ac] = (loss, *torch.autograd.grad(loss, (h, W)))
    for ac in (False, True):
        for a, b in zip(out[True, ac], out[False, ac]):
            assert _rel(a, b) < 1e-6  # measured <= 1.5e-7 (float32: fused exp/tanh), 0 under bf16 autocast
    assert L._FUSED  # the compiled functions were used


def test_chunked_ce_rejects_bad_input():
    h, W = torch.randn(2, 3, 8), torch.randn(10, 8)
    t = torch.randint(0, 10, (2, 3))
    with pytest.raises(ValueError, match="targets must lie in"):
        chunked_cross_entropy(h, W, torch.full((2, 3), 10))
    with pytest.raises(ValueError, match="targets has shape"):
        chunked_cross_entropy(h, W, t[:, :2])
    with pytest.raises(ValueError, match="weight must have shape"):
        chunked_cross_entropy(h, torch.randn(10, 7), t)
    with pytest.raises(ValueError, match="chunk must be"):
        chunked_cross_entropy(h, W, t, chunk=0)
    with pytest.raises(ValueError, match="soft_cap"):
        chunked_cross_entropy(h, W, t, soft_cap=-1.0)
    with pytest.raises(ValueError, match="reduction"):
        chunked_cross_entropy(h, W, t, reduction="avg")
    with pytest.raises(ValueError, match="integer"):
        chunked_cross_entropy(h, W, t.float())
    # every position ignored: mean is 0, not NaN
    assert chunked_cross_entropy(h, W, torch.full((2, 3), -100)).item() == 0.0


# ---------------------------------------------------------------------------------------------------------------
# the lean projections
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(8, 4, 4), (3, 16, 16), (1, 12, 12), (6, 8, 10)])
def test_headwise_linear_forms_equal_einsum(shape):
    """Each form (broadcast-sum for tiny blocks, dense block-diagonal for few blocks, einsum) is the same map."""
    NB, DO, DI = shape
    torch.manual_seed(3)
    x = torch.randn(2, 7, NB * DI, dtype=torch.float64, requires_grad=True)
    W = torch.randn(NB, DO, DI, dtype=torch.float64, requires_grad=True)
    b = torch.randn(NB * DO, dtype=torch.float64, requires_grad=True)
    ref = torch.einsum("...hd,hod->...ho", x.reshape(2, 7, NB, DI), W).reshape(2, 7, NB * DO) + b
    got = headwise_linear(x, W, b)
    assert _rel(got, ref) < 1e-14
    g = torch.randn_like(ref)
    for a, r in zip(torch.autograd.grad(got, (x, W, b), g), torch.autograd.grad(ref, (x, W, b), g)):
        assert _rel(a, r) < 1e-14
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert headwise_linear(x.float(), W.float()).dtype == torch.bfloat16  # as nn.Linear under autocast


@pytest.mark.parametrize("shape", [(512, 4, 4), (6, 4, 4), (7, 2, 4), (3, 4, 2), (64, 8, 8)])
def test_tiny_blocks_linear_equals_einsum(shape):
    """The tiny-block form (CUDA / compiled path): broadcast forward and input gradient, grouped-matmul weight
    gradient, on a strided input (a split of a wider tensor, as the mLSTM layer's x_m), DO != DI included."""
    NB, DO, DI = shape
    torch.manual_seed(5)
    wide = torch.randn(19, 2 * NB * DI, dtype=torch.float64, requires_grad=True)
    x = wide[:, NB * DI:]  # row stride 2 * NB * DI
    W = torch.randn(NB, DO, DI, dtype=torch.float64, requires_grad=True)
    ref = torch.einsum("nhd,hod->nho", x.reshape(19, NB, DI), W).reshape(19, NB * DO)
    got = _TinyBlocksLinear.apply(x, W)
    assert _rel(got, ref) < 1e-14
    g = torch.randn_like(ref)
    for a, r in zip(torch.autograd.grad(got, (wide, W), g), torch.autograd.grad(ref, (wide, W), g)):
        assert _rel(a, r) < 1e-14  # measured <= 2e-16
    # bf16: the weight gradient sums in float32 inside the matmul, like the dense form
    xb, Wb, gb = x.detach().bfloat16(), W.detach().bfloat16().requires_grad_(), g.bfloat16()
    gw = torch.autograd.grad(_TinyBlocksLinear.apply(xb, Wb), Wb, gb)[0]
    exact = torch.einsum("nho,nhd->hod", gb.double().view(19, NB, DO), xb.double().view(19, NB, DI))
    assert gw.dtype == torch.bfloat16 and _rel(gw, exact) < 1e-2  # one bf16 rounding: ~2e-3


def test_float_gate_linear_equals_cat_linear():
    torch.manual_seed(4)
    xs = [torch.randn(2, 7, k, dtype=torch.float64, requires_grad=True) for k in (5, 6, 7)]
    W = torch.randn(4, 18, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    ref = F.linear(torch.cat(xs, -1), W, b)
    got = float_gate_linear(xs, W, b)
    assert got.dtype == torch.float64 and _rel(got, ref) < 1e-14
    g = torch.randn_like(ref)
    for a, r in zip(torch.autograd.grad(got, (*xs, W, b), g), torch.autograd.grad(ref, (*xs, W, b), g)):
        assert _rel(a, r) < 1e-14
    # bf16 activations, float32 weights: a float32 result (also under autocast), gradients in the inputs' dtypes
    xb = [x.detach().bfloat16().requires_grad_() for x in xs]
    Wf, bf = W.detach().float().requires_grad_(), b.detach().float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = float_gate_linear(xb, Wf, bf)
    assert y.dtype == torch.float32
    exact = F.linear(torch.cat([x.double() for x in xb], -1), W.detach(), b.detach())
    assert _rel(y, exact) < 1e-6  # float32 accumulation of exact bf16 inputs (a bf16 result would be ~2e-3)
    g = torch.randn_like(y)
    y.backward(g)
    assert all(x.grad.dtype == torch.bfloat16 for x in xb) and Wf.grad.dtype == torch.float32
    # the weight gradient: one bf16 GEMM on the bf16 inputs (float32 accumulation; g rounded to bf16)
    gw_exact = g.double().reshape(-1, 4).t() @ torch.cat([x.detach().double() for x in xb], -1).reshape(-1, 18)
    assert _rel(Wf.grad, gw_exact) < 1e-2  # measured ~2e-3


# ---------------------------------------------------------------------------------------------------------------
# the model-level fast paths
# ---------------------------------------------------------------------------------------------------------------

_ARCHS = [("tiny", dict(num_blocks=3, slstm_at=(1,))),                              # mLSTM, sLSTM, mLSTM
          ("7b-tiny", dict(num_hidden_layers=2, output_logit_soft_cap=3.0))]      # a soft cap that matters


@pytest.mark.parametrize("name,overrides", _ARCHS)
def test_logits_at_equals_forward_logits(name, overrides):
    """_logits_at (the head at selected positions only: the experiments' sparse loss) gives forward's logits there,
    the 7B's output soft cap included; a bad mask is a clear error."""
    model = _perturbed(name, seed=3, **overrides).double()
    ids = torch.randint(0, model.vocab_size, (2, 11))
    mask = torch.rand(2, 11, generator=torch.Generator().manual_seed(0)) < 0.4
    with torch.no_grad():
        full = model(ids, return_state=False).logits
        got = model._logits_at(ids, mask)
    assert got.shape == (int(mask.sum()), model.vocab_size) and _rel(got, full[mask]) < 1e-12
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        model._logits_at(ids, mask[:, :5])


@pytest.mark.parametrize("name,overrides", _ARCHS)
def test_labels_loss_equals_logits_loss_float64(name, overrides):
    model = _perturbed(name, **overrides).double()
    ids = torch.randint(0, 256, (2, 19))
    labels = torch.randint(0, 256, (2, 19))
    labels[1, :4] = -100
    # the plain loss in float64 from the final hidden states (forward()'s logits are float32 by contract)
    out_norm = model.out_norm if name == "tiny" else model.backbone.out_norm
    seen = []
    hook = out_norm.register_forward_hook(lambda mod, inp, out: seen.append(out))
    out = model(ids, return_state=False)
    hook.remove()
    z = model.lm_head(seen[0])
    cap = getattr(model.config, "output_logit_soft_cap", None)
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    ref = F.cross_entropy(z.reshape(-1, 256), labels.reshape(-1))
    assert _rel(ref, F.cross_entropy(out.logits.reshape(-1, 256), labels.reshape(-1))) < 1e-6  # float32 logits
    ref.backward()
    g_ref = _grads(model)
    model.zero_grad(set_to_none=True)
    model.loss_chunk_size = 7  # several chunks and a tail
    out2 = model(ids, labels=labels, return_state=False)
    assert out2.logits is None and out2.loss.dtype == torch.float64
    out2.loss.backward()
    assert _rel(out2.loss, ref) < 1e-12
    assert _worst(_grads(model), g_ref) < 1e-10  # measured ~1e-15
    s = model(ids, labels=labels, loss_reduction="sum", return_state=False).loss
    assert _rel(s, ref * (labels != -100).sum()) < 1e-12
    with pytest.raises(ValueError, match="labels must be a tensor of shape"):
        model(ids, labels=labels[:, :3])


@pytest.mark.parametrize("name,overrides", _ARCHS)
def test_activation_checkpointing_gives_equal_loss_and_grads(name, overrides):
    model = _perturbed(name, **overrides)
    ids = torch.randint(0, 256, (2, 23))
    labels = torch.randint(0, 256, (2, 23))
    loss = model(ids, labels=labels, return_state=False).loss
    loss.backward()
    g0 = _grads(model)
    model.zero_grad(set_to_none=True)
    model.set_activation_checkpointing(True)
    assert model.gradient_checkpointing
    loss_ckpt = model(ids, labels=labels, return_state=False).loss
    loss_ckpt.backward()
    assert _rel(loss_ckpt, loss) < 1e-6 and _worst(_grads(model), g0) < 1e-6  # measured 0 (same ops recomputed)
    with pytest.raises(ValueError, match="enabled must be a bool"):
        model.set_activation_checkpointing("yes")


@pytest.mark.parametrize("name,overrides", _ARCHS)
def test_bf16_autocast_step_labels_vs_logits(name, overrides):
    """A bf16 autocast training step (what the GPU runs), on the CPU: the chunked loss equals the logits' loss."""
    model = _perturbed(name, **overrides)
    ids = torch.randint(0, 256, (2, 21))
    labels = torch.randint(0, 256, (2, 21))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids, return_state=False).logits
        ref = F.cross_entropy(logits.reshape(-1, 256), labels.reshape(-1))
    ref.backward()
    g_ref = _grads(model)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=labels, return_state=False).loss
    loss.backward()
    assert torch.isfinite(loss) and _rel(loss, ref) < 1e-4  # measured ~1e-7
    assert _worst(_grads(model), g_ref) < 3e-2  # bf16 matmuls in both; measured ~2e-3 (head weight)


@pytest.mark.slow
def test_compile_blocks_matches_eager_with_and_without_checkpointing():
    """compile_blocks (Inductor on the CPU, cells outside the graph) + chunked loss (+ checkpointing): equal loss
    and gradients. One block graph serves all blocks of a type (no recompiles per block). ~2 min on 2 cores."""
    from torch._dynamo.utils import counters
    for name, overrides in [("tiny", dict(num_blocks=3, slstm_at=(1,))),
                            ("7b-tiny", dict(num_hidden_layers=3, output_logit_soft_cap=3.0))]:
        model = _perturbed(name, **overrides)
        ids = torch.randint(0, 256, (2, 21))
        labels = torch.randint(0, 256, (2, 21))

        def step():
            model.zero_grad(set_to_none=True)
            loss = model(ids, labels=labels, return_state=False).loss
            loss.backward()
            return loss.detach(), _grads(model)

        l0, g0 = step()
        counters.clear()
        model.compile_blocks()
        l1, g1 = step()
        graphs = counters["stats"]["unique_graphs"]
        assert _rel(l1, l0) < 1e-5 and _worst(g1, g0) < 1e-4, name  # measured ~1e-7 / ~3e-6
        model.set_activation_checkpointing(True)
        l2, g2 = step()
        assert _rel(l2, l0) < 1e-5 and _worst(g2, g0) < 1e-4, name
        assert counters["stats"]["unique_graphs"] == graphs  # no new graphs for checkpointing or more blocks
        assert graphs <= 8, graphs


@pytest.mark.parametrize("name", ["tiny", "7b-tiny"])
def test_cell_gets_the_layers_contiguous_tensors(monkeypatch, name):
    """Both mLSTM layers hand the cell their own (B, S, features) tensors, contiguous, and take the head views inside
    ``mlstm_cell_call``: under ``compile_blocks`` those tensors are the compiled graph's outputs, and a strided
    output made AOTAutograd copy its gradient (dq, dk, dv of every block) to contiguous on every step. The cell's
    result equals the direct call on the head views."""
    import fastxlstm.layers._fast as fast
    seen = []
    real = fast._mlstm_on_heads

    def spy(q, k, v, gates, num_heads, **kw):
        seen.append((q, k, v, gates, num_heads))
        return real(q, k, v, gates, num_heads, **kw)
    monkeypatch.setattr(fast, "_mlstm_on_heads", spy)
    model = _perturbed(name)
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    model(ids)
    assert seen
    for q, k, v, gates, NH in seen:
        assert all(t.is_contiguous() and t.dim() == 3 for t in (q, k, v, gates))
        assert gates.shape[-1] == 2 * NH and gates.dtype == torch.float32
        B, S = q.shape[:2]
        from fastxlstm.ops.dispatch import _mlstm_unchecked
        heads = lambda t: t.view(B, S, NH, -1).transpose(1, 2)  # noqa: E731
        h_ref, _ = _mlstm_unchecked(heads(q), heads(k), heads(v), gates[..., :NH].transpose(1, 2),
                                    gates[..., NH:].transpose(1, 2))
        h, _ = real(q, k, v, gates, NH)
        assert h.shape == (B, S, NH, v.shape[-1] // NH) and torch.equal(h, h_ref.transpose(1, 2))
