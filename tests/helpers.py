"""Shared test helpers: relative errors, seeded random inputs, forward+backward runners for the ops.

Kept free of pytest so that benchmarks or one-off scripts can import it too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch

from fastxlstm.ops import mlstm, mlstm_step, slstm


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (b is the reference). Shapes must match exactly (no broadcasting)."""
    assert tuple(a.shape) == tuple(b.shape), f"shape {tuple(a.shape)} != reference shape {tuple(b.shape)}"
    a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
    nb = b64.norm().item()
    nd = (a64 - b64).norm().item()
    if nb == 0.0:
        return nd
    return nd / nb


def assert_finite(name: str, t: Optional[torch.Tensor]) -> None:
    assert t is not None, f"{name}: no gradient"
    bad = (~torch.isfinite(t)).sum().item()
    assert bad == 0, f"{name}: {bad} non-finite values of {t.numel()}"


# ----------------------------------------------------------------------------------------------------------
# mLSTM
# ----------------------------------------------------------------------------------------------------------

MLSTM_INPUTS = ("q", "k", "v", "i", "f")


@dataclass
class MLSTMCase:
    """One random problem, held in float64; ``cast`` gives copies in another dtype (the same values rounded)."""

    tensors: Dict[str, torch.Tensor]  # q, k, v, i, f and optionally C0, n0, m0
    grads_out: Dict[str, torch.Tensor]  # upstream gradients for h, C, n
    has_state: bool = False

    def cast(self, dtype: torch.dtype) -> "MLSTMCase":
        return MLSTMCase({k: t.to(dtype) for k, t in self.tensors.items()},
                         {k: t.to(dtype) for k, t in self.grads_out.items()}, self.has_state)

    def up(self) -> "MLSTMCase":
        """The float64 copy of (possibly rounded) values: the reference input for a low-precision run."""
        return self.cast(torch.float64)

    def slice(self, start: int, stop: int) -> Dict[str, torch.Tensor]:
        """q, k, v, i, f restricted to positions [start, stop)."""
        t = self.tensors
        return {"q": t["q"][:, :, start:stop], "k": t["k"][:, :, start:stop], "v": t["v"][:, :, start:stop],
                "i": t["i"][:, :, start:stop], "f": t["f"][:, :, start:stop]}


def make_mlstm_case(B: int, NH: int, S: int, DQK: int, DV: int, seed: int, with_state: bool = False,
                    i_gen=None, f_gen=None) -> MLSTMCase:
    """q, k, v ~ N(0, 1); i ~ 2 N(0, 1); f ~ 2 N(0, 1) + 2 (never zeros); an initial state with C, n ~ N(0, 1) and
    m ~ U(-3, 3). ``i_gen``/``f_gen`` (generator -> tensor of shape (B, NH, S)) override the gate distributions."""
    g = torch.Generator().manual_seed(seed)
    d = torch.float64
    t = {
        "q": torch.randn(B, NH, S, DQK, generator=g, dtype=d),
        "k": torch.randn(B, NH, S, DQK, generator=g, dtype=d),
        "v": torch.randn(B, NH, S, DV, generator=g, dtype=d),
        "i": i_gen(g) if i_gen is not None else 2.0 * torch.randn(B, NH, S, generator=g, dtype=d),
        "f": f_gen(g) if f_gen is not None else 2.0 * torch.randn(B, NH, S, generator=g, dtype=d) + 2.0,
    }
    if with_state:
        t["C0"] = torch.randn(B, NH, DQK, DV, generator=g, dtype=d)
        t["n0"] = torch.randn(B, NH, DQK, generator=g, dtype=d)
        t["m0"] = torch.rand(B, NH, generator=g, dtype=d) * 6.0 - 3.0
    grads_out = {
        "h": torch.randn(B, NH, S, DV, generator=g, dtype=d),
        "C": torch.randn(B, NH, DQK, DV, generator=g, dtype=d),
        "n": torch.randn(B, NH, DQK, generator=g, dtype=d),
    }
    return MLSTMCase(t, grads_out, with_state)


@dataclass
class MLSTMRun:
    h: torch.Tensor
    C: torch.Tensor
    n: torch.Tensor
    m: torch.Tensor
    grads: Dict[str, torch.Tensor] = field(default_factory=dict)

    def outputs(self) -> Dict[str, torch.Tensor]:
        return {"h": self.h, "C": self.C, "n": self.n, "m": self.m}


def make_leaves(case: MLSTMCase, grad: bool = True, device=None) -> Dict[str, torch.Tensor]:
    """Fresh leaf copies of the case's tensors (on ``device`` if given); all but m0 require grad when ``grad``."""
    return {k: t.detach().clone().to(device or t.device).requires_grad_(grad and k != "m0")
            for k, t in case.tensors.items()}


def leaf_state(case: MLSTMCase, leaves: Dict[str, torch.Tensor]):
    """(C0, n0, m0) from the leaves, or None for a case without an initial state."""
    return (leaves["C0"], leaves["n0"], leaves["m0"]) if case.has_state else None


def output_grads(case: MLSTMCase, leaves: Dict[str, torch.Tensor], h, C, n) -> Dict[str, torch.Tensor]:
    """Gradients of <h, gh> + <C, gC> + <n, gn> (the case's output gradients) for every leaf but m0; a leaf the
    outputs do not depend on gets zeros."""
    go = {k: t.to(h.device) for k, t in case.grads_out.items()}
    loss = (h * go["h"].to(h.dtype)).sum() + (C * go["C"].to(C.dtype)).sum() + (n * go["n"].to(n.dtype)).sum()
    names = [k for k in leaves if k != "m0"]
    gs = torch.autograd.grad(loss, [leaves[k] for k in names], allow_unused=True)
    return {k: g if g is not None else torch.zeros_like(leaves[k]) for k, g in zip(names, gs)}


def run_mlstm(case: MLSTMCase, backend: str, chunk_size: int = 64, eps: float = 1e-6,
              resets: Optional[torch.Tensor] = None, grad: bool = True) -> MLSTMRun:
    """Forward (and backward of <h, gh> + <C, gC> + <n, gn>) of ``mlstm`` with one backend.

    Gradients are taken for q, k, v, i, f and, with an initial state, C0 and n0 (m gets no gradient)."""
    leaves = make_leaves(case, grad)
    h, (C, n, m) = mlstm(leaves["q"], leaves["k"], leaves["v"], leaves["i"], leaves["f"],
                         state=leaf_state(case, leaves), backend=backend, chunk_size=chunk_size, eps=eps,
                         resets=resets)
    grads = output_grads(case, leaves, h, C, n) if grad else {}
    return MLSTMRun(h.detach(), C.detach(), n.detach(), m.detach(), grads)


def compare_runs(got, ref) -> Dict[str, float]:
    """Relative error of every output and gradient of ``got`` against ``ref`` (keys 'h', 'C', ..., 'd_q', ...)."""
    errs = {k: rel_err(v, ref.outputs()[k]) for k, v in got.outputs().items()}
    for k, v in ref.grads.items():
        assert k in got.grads, f"missing gradient for {k}"
        errs["d_" + k] = rel_err(got.grads[k], v)
    return errs


def run_mlstm_steps(case: MLSTMCase, eps: float = 1e-6, grad: bool = True) -> MLSTMRun:
    """S calls of ``mlstm_step`` (backend 'torch'), carrying the state; same loss as :func:`run_mlstm`."""
    leaves = make_leaves(case, grad)
    state = leaf_state(case, leaves)
    S = leaves["q"].shape[2]
    hs = []
    for t in range(S):
        h_t, state = mlstm_step(leaves["q"][:, :, t], leaves["k"][:, :, t], leaves["v"][:, :, t],
                                leaves["i"][:, :, t], leaves["f"][:, :, t], state, eps=eps, backend="torch")
        hs.append(h_t)
    h = torch.stack(hs, dim=2)
    C, n, m = state
    grads = output_grads(case, leaves, h, C, n) if grad else {}
    return MLSTMRun(h.detach(), C.detach(), n.detach(), m.detach(), grads)


# ----------------------------------------------------------------------------------------------------------
# sLSTM
# ----------------------------------------------------------------------------------------------------------

@dataclass
class SLSTMCase:
    tensors: Dict[str, torch.Tensor]  # x, R, b and optionally c0, n0, m0, h0
    grads_out: Dict[str, torch.Tensor]  # upstream gradients for h (sequence), c_true, n_true, h_last
    has_state: bool = False

    def cast(self, dtype: torch.dtype) -> "SLSTMCase":
        return SLSTMCase({k: t.to(dtype) for k, t in self.tensors.items()},
                         {k: t.to(dtype) for k, t in self.grads_out.items()}, self.has_state)


def make_slstm_case(B: int, S: int, NH: int, DH: int, seed: int, with_state: bool = False) -> SLSTMCase:
    """x ~ N(0, 1) per gate (forget gate shifted by +2), R ~ N(0, 1)/sqrt(DH), b ~ 0.5 N(0, 1); an initial state
    with c ~ N(0, 1), n ~ U(0.5, 1.5) (n is positive in any reachable state), m ~ U(-1, 1), h ~ N(0, 0.5)."""
    g = torch.Generator().manual_seed(seed)
    d = torch.float64
    x = torch.randn(B, S, 4, NH, DH, generator=g, dtype=d)
    x[:, :, 1] += 2.0
    t = {
        "x": x,
        "R": torch.randn(4, NH, DH, DH, generator=g, dtype=d) / DH ** 0.5,
        "b": 0.5 * torch.randn(4, NH, DH, generator=g, dtype=d),
    }
    if with_state:
        t["c0"] = torch.randn(B, NH, DH, generator=g, dtype=d)
        t["n0"] = torch.rand(B, NH, DH, generator=g, dtype=d) + 0.5
        t["m0"] = torch.rand(B, NH, DH, generator=g, dtype=d) * 2.0 - 1.0
        t["h0"] = 0.5 * torch.randn(B, NH, DH, generator=g, dtype=d)
    grads_out = {
        "h": torch.randn(B, S, NH, DH, generator=g, dtype=d),
        "c": torch.randn(B, NH, DH, generator=g, dtype=d),
        "n": torch.randn(B, NH, DH, generator=g, dtype=d),
        "h_last": torch.randn(B, NH, DH, generator=g, dtype=d),
    }
    return SLSTMCase(t, grads_out, with_state)


@dataclass
class SLSTMRun:
    h: torch.Tensor  # (B, S, NH, DH)
    c_true: torch.Tensor  # c * exp(m): the unstabilised cell state, comparable across stabiliser conventions
    n_true: torch.Tensor
    h_last: torch.Tensor
    grads: Dict[str, torch.Tensor] = field(default_factory=dict)

    def outputs(self) -> Dict[str, torch.Tensor]:
        return {"h": self.h, "c_true": self.c_true, "n_true": self.n_true, "h_last": self.h_last}


def slstm_loss(run_h, c_true, n_true, h_last, go) -> torch.Tensor:
    d = run_h.dtype
    return ((run_h * go["h"].to(d)).sum() + (c_true * go["c"].to(c_true.dtype)).sum()
            + (n_true * go["n"].to(n_true.dtype)).sum() + (h_last * go["h_last"].to(h_last.dtype)).sum())


def run_slstm(case: SLSTMCase, backend: str, resets: Optional[torch.Tensor] = None,
              grad: bool = True) -> SLSTMRun:
    """Forward (and backward) of ``slstm``. The final c, n are compared as c exp(m), n exp(m) (m detached, as
    the op's convention says), which is the true state whatever stabiliser a backend picks."""
    leaves = {k: t.detach().clone().requires_grad_(grad and k != "m0") for k, t in case.tensors.items()}
    state = (leaves["c0"], leaves["n0"], leaves["m0"], leaves["h0"]) if case.has_state else None
    h, (c, n, m, h_last) = slstm(leaves["x"], leaves["R"], leaves["b"], state=state, backend=backend,
                                 resets=resets)
    scale = torch.exp(m.detach())
    c_true, n_true = c * scale, n * scale
    grads: Dict[str, torch.Tensor] = {}
    if grad:
        loss = slstm_loss(h, c_true, n_true, h_last, case.grads_out)
        names = [k for k in leaves if k != "m0"]
        gs = torch.autograd.grad(loss, [leaves[k] for k in names], allow_unused=True)
        for k, gk in zip(names, gs):
            grads[k] = gk if gk is not None else torch.zeros_like(leaves[k])
    return SLSTMRun(h.detach(), c_true.detach(), n_true.detach(), h_last.detach(), grads)


# an SLSTMRun has the same outputs()/grads interface, so the comparison is the same
compare_slstm = compare_runs


def worst(errs: Dict[str, float]) -> Tuple[str, float]:
    k = max(errs, key=lambda name: errs[name])
    return k, errs[k]


def record(tag: str, errs: Dict[str, float]) -> None:
    """Append measured errors as a JSON line to $FASTXLSTM_ERR_LOG when set (for reports); a no-op otherwise."""
    import json
    import os

    path = os.environ.get("FASTXLSTM_ERR_LOG")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps({"tag": tag, **errs}) + "\n")


def run_interpreted(code: str, timeout: int = 600) -> str:
    """Run ``code`` in a fresh Python with TRITON_INTERPRET=1 (Triton kernels on the CPU; the variable must be set
    before the kernels are created, so never in this process); it must print "OK". Returns its stdout."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout
