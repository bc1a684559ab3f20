"""Small building blocks that keep a bf16 training step lean (no float32 copies of activations kept for backward,
no transposes around tiny batched matmuls). Each computes exactly the function of its plain form; the layers'
tests compare them with it in float64.

- :func:`headwise_linear`: a block-diagonal linear map, in the cheapest form for its block shape.
- :func:`float_gate_linear`: a linear map with FEW outputs (the cells' gate pre-activations) computed and returned
  in float32 from low-precision inputs, keeping only the inputs (which the cell keeps anyway) for the backward.
- :func:`cell_call`: call a cell either in place or, for blocks compiled by ``compile_blocks``, outside the graph.
- :func:`mlstm_cell_call`: the mLSTM cell on the layers' (B, S, features) tensors, the head views taken inside.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["compute_dtype_for", "headwise_linear", "float_gate_linear", "cell_call", "mlstm_cell_call"]


def compute_dtype_for(x: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    """The dtype a plain ``F.linear(x, w)`` computes in: the autocast dtype when autocast is on for x's device,
    otherwise the promotion of the two dtypes."""
    dev = x.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(x.dtype, w.dtype)


# a block this small (in * out elements) is applied as broadcast multiply + sum: a batched matmul with K = 4 runs
# at a fraction of the tensor cores' rate and needs the input transposed to (blocks, tokens, 4) and back
_ELEMENTWISE_MAX_BLOCK = 64
# with this few blocks a dense matmul with the block-diagonal weight (num_blocks times the FLOPs) beats the
# batched matmul's transposes
_DENSE_MAX_BLOCKS = 4


def headwise_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Block-diagonal linear map. x (..., NB * DI), weight (NB, DO, DI) -> (..., NB * DO):
    ``y[..., b, o] = sum_d x[..., b, d] * weight[b, o, d]`` (+ bias (NB * DO,)).

    Forms: tiny blocks (DI * DO <= 64, the mLSTM's 4 x 4) as broadcast multiply + sum over the block (no
    transposes; torch.compile fuses it into one pass over x); few blocks (<= 4, the sLSTM's per-head gates) as one
    dense matmul with the block-diagonal weight; otherwise a batched einsum. Under autocast the weight is cast to
    the autocast dtype, as ``F.linear`` would.
    """
    NB, DO, DI = weight.shape
    lead = x.shape[:-1]
    cd = compute_dtype_for(x, weight)
    # on the CPU the batched einsum is ~5x faster than the broadcast form in eager mode (measured, 2 threads)
    if DI * DO <= _ELEMENTWISE_MAX_BLOCK and (x.is_cuda or torch.compiler.is_compiling()):
        # autocast off: CUDA autocast runs `sum` in float32, which made q, k, v float32 (B, S, I) tensors that the
        # gates and the cell then kept for the backward (+18 GB at the 350m preset, 16k tokens per step)
        with torch.autocast(x.device.type, enabled=False):
            y = _TinyBlocksLinear.apply(x.to(cd).reshape(-1, NB * DI), weight.to(cd))  # (N, NB * DO) in cd
        y = y.reshape(*lead, NB * DO)
    elif NB <= _DENSE_MAX_BLOCKS:
        w = weight.to(cd)
        dense = torch.block_diag(*w.unbind(0)) if NB > 1 else w[0]  # (NB * DO, NB * DI)
        y = F.linear(x.to(cd), dense)
    else:
        y = torch.einsum("...hd,hod->...ho", x.to(cd).reshape(*lead, NB, DI), weight.to(cd))
        y = y.reshape(*lead, NB * DO)
    return y if bias is None else y + bias.to(y.dtype)


# blocks per group of the weight gradient's batched matmul: the group's width (blocks x block size) is kept <= this
_GROUP_WIDTH = 128


def _group_blocks(NB: int, width: int) -> int:
    """The largest divisor G of NB with G * width <= _GROUP_WIDTH (at least 1). Runs in every backward of the
    eager path: only the few candidates up to _GROUP_WIDTH // width are tried."""
    for g in range(min(NB, _GROUP_WIDTH // width), 1, -1):
        if NB % g == 0:
            return g
    return 1


def tiny_blocks_weight_grad(gy: torch.Tensor, x: torch.Tensor, NB: int, DO: int, DI: int) -> torch.Tensor:
    """``gw[b, o, d] = sum_n gy[n, b * DO + o] * x[n, b * DI + d]``: gy (N, NB * DO), x (N, NB * DI) -> (NB, DO, DI).

    The weight gradient of a block-diagonal map with tiny blocks is a reduction over all N tokens for very few
    outputs; as a fused multiply + sum (what autograd makes of the broadcast form) it ran as one strided reduction
    per output element (2.5 ms per 16k x 2048 projection on an H200, a third of the 350m step). Here G
    neighbouring blocks form a group and one batched matmul over the groups, (NB/G, G*DO, N) @ (NB/G, N, G*DI),
    computes every group's dense (G*DO, G*DI) product on the tensor cores from the inputs as they lie (row stride
    NB*D, no copies); the block diagonal of each group is the result (G times the FLOPs needed, still tiny).
    """
    N = x.shape[0]
    G = _group_blocks(NB, max(DO, DI))
    NG = NB // G
    a = gy.reshape(N, NG, G * DO).permute(1, 2, 0)  # (NG, G*DO, N)
    b = x.reshape(N, NG, G * DI).permute(1, 0, 2)   # (NG, N, G*DI)
    full = torch.bmm(a, b).view(NG, G, DO, G, DI)
    # the block diagonal as a masked sum (tiny; Inductor's `diagonal` lowering warns on every compile)
    eye = torch.eye(G, device=full.device, dtype=full.dtype).view(1, G, 1, G, 1)
    return (full * eye).sum(3).reshape(NB, DO, DI)


class _TinyBlocksLinear(torch.autograd.Function):
    """y (N, NB*DO) = block-diagonal map of x (N, NB*DI) with weight (NB, DO, DI), both in one dtype.

    Forward and input gradient as broadcast multiply + sum over the block (one fused pass under torch.compile);
    the weight gradient as grouped matmuls (:func:`tiny_blocks_weight_grad`)."""

    @staticmethod
    def forward(ctx, x, weight):
        NB, DO, DI = weight.shape
        ctx.save_for_backward(x, weight)
        return (x.view(-1, NB, 1, DI) * weight).sum(-1).view(-1, NB * DO)

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        NB, DO, DI = weight.shape
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = (gy.reshape(-1, NB, DO, 1) * weight).sum(-2).view(-1, NB * DI)
        if ctx.needs_input_grad[1]:
            gw = tiny_blocks_weight_grad(gy, x, NB, DO, DI)
        return gx, gw


def _gate_dtype(weight: torch.Tensor, xs: Sequence[torch.Tensor]) -> torch.dtype:
    """float32, or float64 when the weight or any input is float64: the dtype the gate products are computed in."""
    acc = torch.promote_types(torch.float32, weight.dtype)
    for x in xs:
        acc = torch.promote_types(acc, x.dtype)
    return acc


class _FloatGateLinear(torch.autograd.Function):
    """y = bias + sum_j x_j @ W_j^T in float32 (float64 if any input is), W = [W_1 | W_2 | ...] split along its
    columns by the widths of the x_j. Saves only the x_j as given (no float32 copies) and the weight."""

    @staticmethod
    def forward(ctx, weight, bias, *xs):
        acc = _gate_dtype(weight, xs)
        widths = [x.shape[-1] for x in xs]
        with torch.autocast(xs[0].device.type, enabled=False):
            ws = weight.to(acc).split(widths, dim=1)
            y = bias.to(acc).expand(*xs[0].shape[:-1], weight.shape[0])
            for x, w in zip(xs, ws):
                y = y + F.linear(x.to(acc), w)
        ctx.save_for_backward(weight, *xs)
        ctx.widths, ctx.acc, ctx.bias_dtype = widths, acc, bias.dtype
        return y

    @staticmethod
    def backward(ctx, gy):
        weight, *xs = ctx.saved_tensors
        acc = ctx.acc
        g2 = gy.to(acc).reshape(-1, gy.shape[-1])  # (N, G)
        gxs, gws = [], []
        with torch.autocast(xs[0].device.type, enabled=False):
            for j, (x, w) in enumerate(zip(xs, weight.to(acc).split(ctx.widths, dim=1))):
                gxs.append((gy.to(acc) @ w).to(x.dtype) if ctx.needs_input_grad[2 + j] else None)
                x2 = x.reshape(-1, x.shape[-1])
                if x.dtype in (torch.float16, torch.bfloat16):
                    # one 16-bit GEMM (float32 accumulation) on x as it is, as autocast's linear layers do: a
                    # float32 copy of x here made torch.compile keep the forward's copy for the backward (+20 GB
                    # at the 350m preset, 16k tokens per step)
                    gws.append((g2.to(x.dtype).t() @ x2).to(acc))
                else:
                    gws.append(g2.t() @ x2.to(acc))
            gw = torch.cat(gws, dim=1).to(weight.dtype)
            gb = g2.sum(0).to(ctx.bias_dtype)
        return (gw, gb, *gxs)


# at most this many rows (tokens) take the decode form of float_gate_linear under torch.compile
_DECODE_ROWS = 256


def float_gate_linear(xs: Sequence[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Gate pre-activations ``bias + cat(xs, -1) @ weight.T`` in float32 (float64 for float64 inputs).

    xs: tensors (..., K_j) of one leading shape (any float dtype, e.g. bf16 activations); weight (G, sum K_j);
    bias (G,). Returns (..., G). Unlike ``F.linear(torch.cat(xs, -1).float(), ...)`` it keeps no concatenated or
    float32 copy of the inputs for the backward (only float32 transients, one input at a time).
    """
    if (torch.compiler.is_compiling() and not torch.is_grad_enabled()
            and math.prod(xs[0].shape[:-1]) <= _DECODE_ROWS):
        # decoding under torch.compile: a few rows, so the product is a broadcast multiply and a sum over K in
        # float32, which Inductor fuses with the casts (and the cat) into one reduction kernel instead of a cast
        # and one or two cuBLAS float32 GEMV kernels per input
        cd = _gate_dtype(weight, xs)
        x = torch.cat([x.to(cd) for x in xs], dim=-1) if len(xs) > 1 else xs[0].to(cd)
        return (x[..., None, :] * weight.to(cd)).sum(-1) + bias.to(cd)
    return _FloatGateLinear.apply(weight, bias, *xs)


@torch.compiler.disable
def _outside_graph(fn, *args, **kwargs):
    return fn(*args, **kwargs)


def cell_call(module: torch.nn.Module, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, run outside any torch.compile graph when ``module._cell_outside_graph`` is set
    (``compile_blocks`` sets it: the cells are Triton kernels or a step loop, both better left to run eagerly)."""
    if getattr(module, "_cell_outside_graph", False):
        return _outside_graph(fn, *args, **kwargs)
    return fn(*args, **kwargs)


def _mlstm_on_heads(q, k, v, gates, num_heads: int, **kwargs):
    from ..ops.dispatch import _mlstm_unchecked  # the unchecked entry: the model validated its inputs once

    def heads(t):
        return t.unflatten(-1, (num_heads, -1)).transpose(1, 2)  # (B, S, NH * D) -> (B, NH, S, D), a view
    g = gates.transpose(1, 2)  # (B, 2 NH, S)
    h, st = _mlstm_unchecked(heads(q), heads(k), heads(v), g[:, :num_heads], g[:, num_heads:], **kwargs)
    return h.transpose(1, 2), st


def mlstm_cell_call(module: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    gates: torch.Tensor, num_heads: int, **kwargs):
    """The mLSTM cell (``ops.dispatch._mlstm_unchecked``, keyword arguments passed on) on the layers' tensors:
    q, k (B, S, NH * DQK), v (B, S, NH * DV), gates (B, S, 2 NH) (the input gates' then the forget gates'
    pre-activations) -> h (B, S, NH, DV) and the cell state (C, n, m).

    The head views are taken inside the call (through :func:`cell_call`, so outside the graph of a compiled block):
    the graph's outputs are then the layer's own (contiguous) tensors. Their incoming gradients must be: with
    dynamic shapes AOTAutograd makes every gradient of a graph output contiguous at run time, and the transposed
    head views as outputs made that a transposing copy of dq, dk and dv in every block (measured on an H200, `350m`:
    144 copies of ~93 us per step). The cells write dq, dk, dv in the (B, S, NH, D) layout, i.e. contiguous here.
    """
    return cell_call(module, _mlstm_on_heads, q, k, v, gates, num_heads, **kwargs)
