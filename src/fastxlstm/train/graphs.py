"""The forward and backward of a training step captured once as a CUDA graph and replayed: :class:`GraphedStep`.

Why: a compiled training step of a fastxlstm model is thousands of kernels (``350m``: ~6,300 per step of 16k
tokens; the Triton cells' launchers alone cost ~0.6 / 1.5 ms of host time per block forward / backward). On a host
CPU that is slow next to the GPU, enqueuing them takes as long as the GPU takes to run them, and the GPU waits. A
replay of the captured graph is one launch.

What is captured: ``loss = loss_fn(*inputs)`` (under autocast when ``autocast_dtype`` is given) and
``(loss * scale).backward()``. The optimizer step, gradient clipping and the learning-rate schedule stay ordinary
calls (a few fused multi-tensor kernels), so schedules, clipping and checkpoints work as before.

Semantics (equal to the plain step; off CUDA the plain step is what runs)::

    step = GraphedStep(model, lambda ids, labels: model(ids, labels=labels).loss, autocast_dtype=torch.bfloat16)
    for ids, labels in batches:               # (B, S) int64 on the model's GPU; the same shapes every call
        loss = step(ids, labels)              # forward + backward: p.grad holds this batch's gradient
        opt.step()
        opt.zero_grad(set_to_none=True)       # allowed: the next call puts the gradients back

- ``accumulate=False`` (default): after a call, ``p.grad`` is the gradient of that call's loss, as after
  ``zero_grad(set_to_none=True); loss.backward()``. The gradients live in the graph's memory pool, where the next
  call's forward reuses their memory (no memory beyond the plain step's): use them before the next call.
- ``accumulate=True``: the gradient is added to ``p.grad`` (None counts as zero), as ``loss.backward()`` does; the
  sums live in buffers of their own (one gradient's worth of memory through the forward; the plain step frees
  gradients during the forward when they were set to None). For gradient accumulation over micro-batches.
- The returned loss (detached, the loss_fn's dtype) is a static tensor: read or clone it before the next call.

Requirements: one CUDA device; no DDP/FSDP wrapper (their communication hooks are not captured); no host reads of
device values inside ``loss_fn`` (fastxlstm models skip their value checks of token ids while a graph is captured:
pass ``check`` to validate each call's inputs, or validate the data once, as the trainer does). A new input shape,
dtype or None-pattern re-captures (warm-up and capture again, ~the time of ``warmup + 1`` plain steps); the first
call also compiles whatever ``loss_fn`` compiles. Randomness inside (dropout) draws new numbers at every replay.
The graph replays the model as it was captured: after changing it (activation checkpointing switched, modules or
parameter tensors replaced; in-place updates such as optimizer steps and ``load_state_dict`` are fine), make a new
GraphedStep.
"""
from __future__ import annotations

import contextlib
from typing import Callable, List, Optional, Sequence

import torch

__all__ = ["GraphedStep", "GraphCaptureError"]


class GraphCaptureError(RuntimeError):
    """The step could not be captured as a CUDA graph. The gradients are as before the call (accumulate=True) or
    None (accumulate=False); running the plain step then gives what the call would have given."""


class GraphedStep:
    """Forward + backward of ``loss_fn(*inputs)`` as one CUDA graph (see the module docstring).

    Args:
        model: the module whose parameters receive gradients.
        loss_fn: ``loss_fn(*inputs) -> loss`` (a one-element tensor that requires grad); called with the graph's
            static copies of the inputs (tensors or None).
        accumulate: add to ``p.grad`` (True) or replace it (False, default).
        autocast_dtype: run ``loss_fn`` under ``torch.autocast`` with this dtype (e.g. torch.bfloat16); None: off.
        warmup: plain steps on a side stream before the capture (compilation, Triton and cuBLAS warm-up); their
            gradients are discarded.
        check: called as ``check(*inputs)`` on every call before anything runs (validation on the caller's
            tensors; raise to refuse).
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[..., torch.Tensor], *, accumulate: bool = False,
                 autocast_dtype: Optional[torch.dtype] = None, warmup: int = 2,
                 check: Optional[Callable[..., None]] = None):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable")
        if not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an integer >= 1 (the capture needs warmed-up kernels), got {warmup!r}")
        self.model, self.loss_fn, self.check = model, loss_fn, check
        self.accumulate, self.autocast_dtype, self.warmup = bool(accumulate), autocast_dtype, warmup
        self.captures = 0                   # how many times a graph was captured (a new input signature each)
        self._sig = None
        self._graph: Optional[torch.cuda.CUDAGraph] = None
        self._static: List[Optional[torch.Tensor]] = []
        self._scale: Optional[torch.Tensor] = None
        self._loss: Optional[torch.Tensor] = None
        self._params: List[torch.nn.Parameter] = []
        self._grads: List[Optional[torch.Tensor]] = []

    # ------------------------------------------------------------------------------------------------------
    def __call__(self, *inputs: Optional[torch.Tensor], scale: float = 1.0) -> torch.Tensor:
        """Run forward + backward of ``loss_fn(*inputs)``; the gradient of ``scale * loss`` goes to ``p.grad``.
        Returns the (unscaled) loss, detached: a static tensor on CUDA, overwritten by the next call."""
        for i, t in enumerate(inputs):
            if t is not None and not isinstance(t, torch.Tensor):
                raise TypeError(f"input {i} must be a tensor or None, got {type(t).__name__}")
        if self.check is not None:
            self.check(*inputs)
        tensors = [t for t in inputs if t is not None]
        device = tensors[0].device if tensors else next(self.model.parameters()).device
        if device.type != "cuda":
            return self._plain(inputs, scale, device.type)
        sig = tuple(None if t is None else (tuple(t.shape), t.dtype, t.device) for t in inputs)
        if sig != self._sig:
            self._capture(inputs, sig, device)
        for s, t in zip(self._static, inputs):
            if s is not None:
                s.copy_(t, non_blocking=True)
        self._scale.fill_(float(scale))
        if self.accumulate:
            self._bind_sums()
        self._graph.replay()
        if not self.accumulate:
            for p, g in zip(self._params, self._grads):
                p.grad = g
        return self._loss

    # ------------------------------------------------------------------------------------------------------
    def _autocast(self, device_type: str):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.autocast_dtype)

    def _body(self, inputs: Sequence[Optional[torch.Tensor]], scale, device_type: str) -> torch.Tensor:
        with self._autocast(device_type):
            loss = self.loss_fn(*inputs)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
            raise ValueError("loss_fn must return a one-element tensor that requires grad, got "
                             + (f"shape {tuple(loss.shape)}, requires_grad={loss.requires_grad}"
                                if isinstance(loss, torch.Tensor) else type(loss).__name__))
        (loss.float().reshape(()) * scale).backward()
        return loss.detach().reshape(())

    def _plain(self, inputs, scale: float, device_type: str) -> torch.Tensor:
        """The same step without a graph (off CUDA): what the graph replays."""
        if not self.accumulate:
            self.model.zero_grad(set_to_none=True)
        return self._body(inputs, float(scale), device_type)

    def _bind_sums(self) -> None:
        """accumulate=True: point p.grad at the graph's sum buffers, carrying over what p.grad held (None: zero)."""
        fresh = [s for p, s in zip(self._params, self._grads) if p.grad is None]
        if fresh:
            torch._foreach_zero_(fresh)
        for p, s in zip(self._params, self._grads):
            g = p.grad
            if g is not None and g is not s:
                if g.shape != s.shape:
                    raise ValueError(f"a parameter's .grad has shape {tuple(g.shape)}, expected {tuple(s.shape)}")
                s.copy_(g)
            p.grad = s

    def _capture(self, inputs, sig, device: torch.device) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]  # parameters() lists a shared one once
        if not params:
            raise ValueError("the model has no parameters that require grad")
        if any(p.device != device for p in params):
            raise ValueError(f"GraphedStep needs the model's parameters on the inputs' device {device}")
        # forget a previous capture first (its pool is freed with it)
        self._graph, self._sig, self._static, self._loss, self._grads = None, None, [], None, []
        # accumulate: the caller's gradients are carried into the new sums after the capture. replace: they are
        # dropped now (they may be the previous graph's, whose memory pool is freed only once nothing refers to it)
        before = [p.grad for p in params] if self.accumulate else [None] * len(params)
        if not self.accumulate:
            self.model.zero_grad(set_to_none=True)
        static = [None if t is None else t.detach().clone() for t in inputs]
        scale = torch.ones((), dtype=torch.float32, device=device)
        if self.accumulate:
            sums = [torch.zeros_like(p) for p in params]
        try:
            def reset_grads():
                for i, p in enumerate(params):
                    p.grad = sums[i] if self.accumulate else None

            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    reset_grads()
                    self._body(static, scale, "cuda")
            torch.cuda.current_stream(device).wait_stream(side)
            reset_grads()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                loss = self._body(static, scale, "cuda")
        except Exception as e:
            for p, g in zip(params, before):
                p.grad = g
            raise GraphCaptureError(f"could not capture the training step as a CUDA graph: "
                                    f"{type(e).__name__}: {e}") from e
        self._graph, self._sig, self._static, self._scale, self._loss = graph, sig, static, scale, loss
        self._params = params
        if self.accumulate:
            self._grads = sums
            for p, g in zip(params, before):   # what the caller had, carried into the sums by _bind_sums
                p.grad = g
        else:
            self._grads = [p.grad for p in params]
        self.captures += 1
