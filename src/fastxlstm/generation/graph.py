"""CUDA-graph decoding: one token through every block, the state update and the choice of the next token,
captured once as a CUDA graph and replayed per token.

An eager decode step of the 7B launches ~1,230 kernels from Python; on an H200 the host then needs ~40 ms per
token while the GPU works ~6.6 ms. A replayed graph launches them all with one call, so the GPU runs back to back.

What the graph holds (all static buffers, allocated once per batch size and reused by every call):

- ``tok`` (B,) int64: the token fed at this step; the graph overwrites it with the token it chooses;
- ``state``: the model's recurrent state (fp32), updated in place: the fused mLSTM step kernel writes C over itself
  (see ``fastxlstm.ops._inplace``), the other (small) tensors are copied back;
- ``u`` (B,): the uniform numbers of this step's sampling, drawn from the caller's generator before each replay
  with the same call the eager sampler makes, so a seed gives the same tokens on both paths;
- ``finished`` (B,) bool: rows that emitted an end-of-sequence token keep emitting the fill token.

Before the first capture the model's same-input projections are packed in place (``pack_projections``: one
matmul per group instead of up to six, memory neutral, the same function); FASTXLSTM_PACK=0 turns that off. Each
block's step is then compiled with torch.compile (:func:`compile_mode`, default "blocks": one graph per block type,
shared by all blocks of the type) and runs through :func:`_call_block`, which writes the new state into the static
buffers inside the compiled graph. ``state_dtype`` (:func:`decode_state_dtype`) may keep the C buffers in bf16.

Sampling parameters that change shapes or the captured code (greedy or not, top_k, whether top_p is used) are part of
the cache key; temperature and top_p are device scalars filled per call. Each call runs its prompt straight into
the static buffers (``prefill(..., into=decoder.state)``: each block writes its new state there as soon as it has
run) and clears ``finished``: nothing leaks between calls. Memory stays flat: no step allocates.

The eager loop in :mod:`fastxlstm.generation.eager` is the reference this path is tested against (greedy tokens are
identical in float32; see tests/gpu/test_generation_graph_gpu.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import torch

from ..layers.state import MLSTMBlockState, XLSTMState
from ._modes import choice, env_choice, inference
from .packing import pack_projections
from .packing import packing_default as pack_default
from .sampling import pick_with_uniform, sample_next_token

__all__ = ["graph_decoding_available", "GraphDecoder", "get_decoder", "prefill", "compile_mode", "COMPILE_MODES",
           "decode_state_dtype"]

# how many captured graphs a model keeps (each holds its own static state of B rows)
_MAX_GRAPHS = 4
# False only in the CPU tests, which run the captured body eagerly to check the logic around it
_CAPTURE = True


COMPILE_MODES = ("blocks", "full", "off")


def compile_mode(value=None) -> str:
    """How the captured step is compiled: "blocks" (default): each block's one-token forward through one
    torch.compile'd call shared by the blocks of a type (Inductor fuses norms, gates, soft caps, the conv window,
    the residual adds; compiled once per block type and batch size, not once per block); "full": the whole
    forward as one compiled function (longer compiles); "off": the eager step.

    ``value`` None reads FASTXLSTM_COMPILE_DECODE ("blocks", "full", "off"; "1" is "blocks", "0" is "off").
    True / False are "blocks" / "off"."""
    if isinstance(value, bool):
        return "blocks" if value else "off"
    what = "decode compile mode"
    if value is None:
        return env_choice("FASTXLSTM_COMPILE_DECODE", "blocks", _COMPILE_ALIASES, what)
    if not isinstance(value, str):
        raise ValueError(f"{what} must be one of {COMPILE_MODES} (or a bool), got {value!r}")
    return choice(value, _COMPILE_ALIASES, f"{what} (compile=)")


_COMPILE_ALIASES = {**{m: m for m in COMPILE_MODES}, "1": "blocks", "true": "blocks", "on": "blocks", "0": "off",
                    "false": "off"}


_STATE_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                 "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def decode_state_dtype(value=None) -> torch.dtype:
    """The dtype of the decoder's C buffers: ``value`` (a torch dtype or a name) or FASTXLSTM_DECODE_STATE."""
    if value is None:
        return env_choice("FASTXLSTM_DECODE_STATE", "fp32", _STATE_DTYPES, "decode state dtype")
    if isinstance(value, str):
        return choice(value, _STATE_DTYPES, "decode state dtype")
    if value not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"decode state dtype must be torch.float32, torch.bfloat16 or torch.float16, got {value!r}")
    return value


def _mode_for(model, compile) -> str:
    # the default compiles on CUDA only (the CPU tests run the body without capture, uncompiled unless asked)
    if compile is None and "FASTXLSTM_COMPILE_DECODE" not in os.environ and model.device.type != "cuda":
        return "off"
    return compile_mode(compile)


def _call_block(blk, x, state, *rest):
    """``blk(x, state, *rest)``, then an mLSTM block's new state written into ``state``'s tensors (the decoder's
    static buffers) inside the compiled graph: Inductor then stores each new state tensor straight into its buffer
    from the kernel that computes it, instead of a copy per tensor after the step. A tensor the block already
    updated in place (the Triton step kernel's C) is the buffer itself and is skipped. sLSTM block states (a few
    (B, NH, DH) tensors) are left to the copy after the step: written here, they made Inductor fail at batch size 1
    (torch 2.13, ``KeyError`` in its loop body, after the graph break around the sLSTM kernel)."""
    y, new = blk(x, state, *rest)
    if not isinstance(state, MLSTMBlockState) or new is None:
        return y, new
    for dst, src in _pairs(state, new):
        if src is not dst:  # identity, not data_ptr(): this runs inside the compiled graph
            dst.copy_(src)
    return y, state


_BLOCK_CALL = None


def _compiled_block_call():
    """One torch.compile'd ``blk(*args)`` for every block of every model (Dynamo keeps one graph per block type,
    batch size and dtype and guards on the block's type and attributes, not on its identity, so the 32 blocks of
    the 7B share one compiled graph)."""
    global _BLOCK_CALL
    if _BLOCK_CALL is None:
        import torch._dynamo
        cfg = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, name) and getattr(cfg, name) < 64:
                setattr(cfg, name, 64)
        _BLOCK_CALL = torch.compile(_call_block, dynamic=False)
    return _BLOCK_CALL


@contextlib.contextmanager
def _block_runner(model, runner):
    prev = model.__dict__.get("_block_runner")
    model._block_runner = runner
    try:
        yield
    finally:
        if prev is None:
            model.__dict__.pop("_block_runner", None)
        else:
            model._block_runner = prev


def graph_decoding_available(model) -> bool:
    """True when the CUDA-graph decoder can run this model: parameters on a CUDA device, not float64."""
    try:
        p = next(model.parameters())
    except StopIteration:
        return False
    return (p.is_cuda and torch.cuda.is_available() and model.dtype != torch.float64) or not _CAPTURE


@torch.no_grad()
def prefill(model, ids: torch.Tensor, resets: Optional[torch.Tensor], chunk_len: int = 8192,
            state: Optional[XLSTMState] = None,
            into: Optional[XLSTMState] = None) -> Tuple[torch.Tensor, XLSTMState]:
    """Run the prompt (B, S) through the model in chunks of ``chunk_len`` tokens, carrying the state.

    Returns the logits of the last position (B, V) float32 and the state after the prompt. Only the last position
    gets logits (a 16k-token prompt of a 50k vocabulary would otherwise make 3.3 GB of float32 logits), and the
    activations of one chunk at a time are alive, so memory is flat in the prompt length. Inputs must be valid
    (the public entry points check them).

    ``into``: a state of the model's layout for B rows (the graph decoder's static buffers). Each block's new
    state is then written into it as soon as the block has run, and the buffers are what the next block and chunk
    see: no second whole state exists at any time (the transient is one block's new state), and nothing is
    copied at load. Buffers of another dtype (a 16-bit C) receive the state rounded at the last chunk only; the
    chunks before carry exact values. The returned state holds ``into``'s tensors.
    """
    S = ids.shape[1]
    logits = None
    starts = list(range(0, S, chunk_len))
    for a in starts:
        b = min(S, a + chunk_len)
        runner = None if into is None else _into_runner(into, last=a == starts[-1])
        with contextlib.nullcontext() if runner is None else _block_runner(model, runner):
            out = model._forward(ids[:, a:b], state, None if resets is None else resets[:, a:b], True,
                                 logits_to_keep=1)
        if runner is not None and runner.calls != len(into.blocks):
            raise RuntimeError(f"prefill into buffers: the model ran {runner.calls} blocks, the buffers hold "
                               f"{len(into.blocks)}")
        logits, state = out.logits[:, -1], out.state
        del out
    return logits, state


def _into_runner(into: XLSTMState, last: bool):
    """A block runner (see ``models.base._run_block``) for :func:`prefill` into buffers: the blocks run in order,
    the i-th call's new state goes into ``into.blocks[i]`` and the buffer is returned in its place, when the buffer
    holds the value exactly (same dtypes) or this is the last chunk (earlier chunks of 16-bit buffers carry the
    exact value and write nothing)."""
    def run(blk, *args):
        y, new = blk(*args)
        if run.calls >= len(into.blocks):
            raise RuntimeError(f"prefill into buffers: the model runs more blocks than the buffers hold "
                               f"({len(into.blocks)})")
        buf = into.blocks[run.calls]
        run.calls += 1
        if new is None:
            return y, new
        if not (last or _same_dtypes(buf, new)):
            return y, new
        _copy_block_(buf, new)
        return y, buf
    run.calls = 0
    return run


def _pairs(dst, src):
    """(dst tensor, src tensor) of the two block states' fields that both have."""
    for f in dataclasses.fields(dst):
        d, s = getattr(dst, f.name), getattr(src, f.name)
        if d is not None and s is not None:
            yield d, s


def _same_dtypes(dst, src) -> bool:
    return all(d.dtype == s.dtype for d, s in _pairs(dst, src))


def _copy_block_(dst, src) -> None:
    """dst <- src field by field (block states of one type); a tensor that already is its destination (an in-place
    update) is skipped."""
    for d, s in _pairs(dst, src):
        if s.data_ptr() != d.data_ptr():
            d.copy_(s)


def _state_tensors(state: XLSTMState) -> List[Optional[torch.Tensor]]:
    return [getattr(blk, f.name) for blk in state.blocks for f in dataclasses.fields(blk)]


def _copy_state_(dst: XLSTMState, src: XLSTMState) -> None:
    """dst <- src, block by block (see :func:`_copy_block_`)."""
    for d, s in zip(dst.blocks, src.blocks):
        _copy_block_(d, s)


@dataclass(frozen=True)
class _Key:
    batch_size: int
    dtype: torch.dtype
    sample: Optional[bool]  # None: logits mode (no token choice inside the graph)
    top_k: Optional[int]
    use_top_p: bool
    eos: Optional[Tuple[int, ...]]
    fill: Optional[int]
    params: int  # fingerprint of the parameters' storage: a model moved or cast gets new graphs
    compile: str  # one of COMPILE_MODES
    state_dtype: torch.dtype = torch.float32  # dtype of the mLSTM matrix memories C in the static state


class GraphDecoder:
    """One captured decode step for a fixed batch size and sampling mode. Build through :func:`get_decoder`.

    Usage: ``load(state, first_tokens)`` then, per step, ``step(generator)`` which returns the (B,) tokens chosen
    (a view of the static buffer: clone it if it must outlive the next step).
    """

    def __init__(self, model, key: _Key):
        self.model = model
        self.key = key
        # torch.compile fuses the element-wise work between the matmuls (norms, gates, soft caps, residuals); the
        # graph then replays the fused kernels
        self._fwd = torch.compile(model._forward, dynamic=False) if key.compile == "full" else model._forward
        self._runner = _compiled_block_call() if key.compile == "blocks" else None
        B = key.batch_size
        dev = model.device
        self.tok = torch.zeros(B, dtype=torch.long, device=dev)
        self.u = torch.zeros(B, dtype=torch.float32, device=dev)
        self.finished = torch.zeros(B, dtype=torch.bool, device=dev)
        self.temperature = torch.ones((), dtype=torch.float32, device=dev)
        self.top_p = torch.ones((), dtype=torch.float32, device=dev)
        self.eos = None if key.eos is None else torch.tensor(key.eos, dtype=torch.long, device=dev)
        # zeros in the state's shapes and dtypes, except that the C matrices (nearly all of the state) may be kept
        # in a 16-bit dtype (half the state traffic per step); allocated once, in their final dtype
        layout = self._layout = model.init_state(B, device="meta")  # the model's own state dtypes (read_state)
        self.state = XLSTMState(tuple(
            (dataclasses.replace(b, C=b.C.to(key.state_dtype))
             if isinstance(b, MLSTMBlockState) and key.state_dtype != torch.float32 else b).map(
                lambda t: torch.zeros(t.shape, dtype=t.dtype, device=dev))
            for b in layout.blocks))
        self.logits = (torch.zeros(B, model.vocab_size, dtype=torch.float32, device=dev)
                       if key.sample is None else None)
        # _CAPTURE is False only in the CPU tests, which run the same body eagerly to check the logic around it
        self.graph = torch.cuda.CUDAGraph() if _CAPTURE else None
        if self.graph is not None:
            self._capture()

    def _body(self) -> None:
        from ..ops._inplace import inplace_state_updates
        with inplace_state_updates(), _block_runner(self.model, self._runner):
            out = self._fwd(self.tok[:, None], self.state, None, True)
        logits = out.logits[:, -1]
        if self.key.sample is None:  # logits mode (the server samples per request on the host side)
            self.logits.copy_(logits)
            _copy_state_(self.state, out.state)
            return
        if self.key.sample:
            nxt = pick_with_uniform(logits, self.u, self.temperature, self.key.top_k,
                                    self.top_p if self.key.use_top_p else None)
        else:
            nxt = logits.argmax(dim=-1)
        if self.eos is not None:
            nxt = torch.where(self.finished, torch.full_like(nxt, self.key.fill), nxt)
            self.finished.logical_or_(torch.isin(nxt, self.eos))
        self.tok.copy_(nxt)
        _copy_state_(self.state, out.state)

    def _capture(self) -> None:
        with inference(self.model):
            # warm up on a side stream (Triton compiles and autotunes, cuBLAS picks its kernels), then capture
            from ._gemv import gemv_enabled, skinny_linears
            gemv = skinny_linears(self.model) if (self.key.batch_size == 1 and gemv_enabled()) \
                else contextlib.nullcontext()
            with gemv:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(2):
                        self._body()
                torch.cuda.current_stream().wait_stream(side)
                with torch.cuda.graph(self.graph):
                    self._body()

    def load(self, state: Optional[XLSTMState], first: torch.Tensor, temperature: float = 1.0, top_p=None,
             finished: Optional[torch.Tensor] = None) -> None:
        """Start a new sequence batch: the state after the prompt (None: already in ``self.state``, as
        ``prefill(..., into=decoder.state)`` leaves it), the first generated tokens (B,) (fed at the next step),
        the sampling parameters and the rows already finished."""
        if state is not None:
            _copy_state_(self.state, state)
        self.tok.copy_(first)
        self.temperature.fill_(float(temperature) if temperature else 1.0)
        self.top_p.fill_(1.0 if top_p is None else float(top_p))
        if finished is None:
            self.finished.zero_()
        else:
            self.finished.copy_(finished)

    def step_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits mode: feed ``tokens`` (B,) on the static state and return the (B, V) logits of this step (the
        static buffer: read or copy it before the next step)."""
        if self.key.sample is not None:
            raise ValueError("step_logits needs a decoder built with sample=None (logits mode)")
        self.tok.copy_(tokens.reshape(-1))
        self.step()
        return self.logits

    def step(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if self.key.sample:
            # the same draw as the eager sampler's (torch.rand(B, generator=...)), written into the static buffer
            self.u.copy_(torch.rand(self.key.batch_size, generator=generator, device=self.u.device))
        if self.graph is not None:
            self.graph.replay()
        else:
            with inference(self.model):
                self._body()
        return self.tok

    def read_state(self) -> XLSTMState:
        """A copy of the current state (a value: later steps do not change it), in the model's state dtypes
        (a 16-bit C buffer is returned as float32)."""
        return XLSTMState(tuple(
            dataclasses.replace(b, **{f.name: getattr(b, f.name).to(getattr(ref, f.name).dtype, copy=True)
                                      for f in dataclasses.fields(b) if getattr(b, f.name) is not None})
            for b, ref in zip(self.state.blocks, self._layout.blocks)))


def _fingerprint(model) -> int:
    return hash(tuple((p.data_ptr(), p.dtype) for p in model.parameters()))


def get_decoder(model, batch_size: int, sample: bool, top_k: Optional[int], use_top_p: bool,
                eos: Optional[List[int]], fill: Optional[int], compile=None,
                pack: Optional[bool] = None, state_dtype: Optional[torch.dtype] = None) -> GraphDecoder:
    """The cached decoder for this model, batch size and sampling mode (captured on first use; a few are kept,
    least recently used dropped first).

    ``compile``: see :func:`compile_mode` (default "blocks", or FASTXLSTM_COMPILE_DECODE).

    ``state_dtype``: dtype of the mLSTM matrix memories C in the decoder's static state: float32 (default) or, as
    an approximation that halves the state traffic (what bounds large batches), bfloat16 / float16; None reads
    FASTXLSTM_DECODE_STATE ("fp32", "bf16", "fp16"). The C update is computed in float32 and rounded once per
    step. States read back (``read_state``) are float32 again.

    ``pack`` (default: True unless FASTXLSTM_PACK=0): first pack the model's same-input projections in place
    (:func:`fastxlstm.generation.pack_projections`: one matmul per group, memory neutral, same function). False
    leaves the model as it is."""
    from ._gemv import gemv_mode
    gemv_mode()  # a bad FASTXLSTM_GEMV is refused here, not inside the capture (and its compile fallback)
    if pack_default() if pack is None else pack:
        pack_projections(model)  # before the fingerprint: packing moves the parameters into the packed tensors
    cache: "OrderedDict[_Key, GraphDecoder]" = model.__dict__.setdefault("_fastxlstm_graphs", OrderedDict())
    key = _Key(batch_size, model.dtype, None if sample is None else bool(sample), top_k if sample else None,
               bool(use_top_p and sample),
               None if eos is None else tuple(eos), fill if eos is not None else None, _fingerprint(model),
               _mode_for(model, compile), decode_state_dtype(state_dtype))
    dec = cache.get(key)
    if dec is not None:
        cache.move_to_end(key)
        return dec
    stale = [k for k in cache if k.params != key.params]
    for k in stale:
        del cache[k]
    while len(cache) >= _MAX_GRAPHS:
        cache.popitem(last=False)
    if (stale or len(cache) == 0) and torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        dec = GraphDecoder(model, key)
    except Exception as exc:  # noqa: BLE001 - a compiler failure must not stop generation
        if key.compile == "off":
            raise
        import warnings
        warnings.warn(f"torch.compile of the decode step failed ({type(exc).__name__}: {str(exc)[:300]}); "
                      "capturing the uncompiled step instead (FASTXLSTM_COMPILE_DECODE=off skips the attempt)")
        # kept under the key asked for, so the failing compile is not tried again at every call
        dec = GraphDecoder(model, dataclasses.replace(key, compile="off"))
    cache[key] = dec
    return dec


def clear_graphs(model) -> None:
    """Drop every captured decode graph of ``model`` (and their static buffers)."""
    model.__dict__.pop("_fastxlstm_graphs", None)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def graph_stream(model, ids, max_new_tokens, temperature, top_k, top_p, sample, eos, fill, generator, resets,
                 final: Optional[list], sync_every: int) -> Iterator[torch.Tensor]:
    """The CUDA-graph twin of ``eager._stream``: same arguments, same tokens, same stopping rule.

    ``sync_every``: how often (in steps) the host checks whether every row has finished. 1 checks every step,
    exactly as the eager loop; larger values let the host run ahead of the GPU, and then up to ``sync_every - 1``
    steps of fill tokens may follow the point where every row had finished: ``generate`` trims them.
    """
    B = ids.shape[0]
    # with two or more new tokens the decoder exists before the prompt runs, and the prompt's state goes straight
    # into its static buffers (no second copy of the state, nothing copied at load)
    dec = (get_decoder(model, B, sample, top_k, top_p is not None and top_p < 1, eos, fill)
           if max_new_tokens >= 2 else None)
    with inference(model):
        logits, state = prefill(model, ids, resets, into=None if dec is None else dec.state)
    if max_new_tokens == 0:
        if final is not None:
            final.append(state)
        return
    tok = sample_next_token(logits, temperature, top_k, top_p, do_sample=sample, generator=generator)
    finished = torch.zeros(B, dtype=torch.bool, device=ids.device)
    eos_t = None if eos is None else torch.tensor(eos, device=ids.device)
    if eos_t is not None:
        finished = torch.isin(tok, eos_t)
    if max_new_tokens == 1 or (eos_t is not None and bool(finished.all())):
        if final is not None:
            final.append(state if dec is None else dec.read_state())
        yield tok
        return
    del state
    dec.load(None, tok, temperature, top_p, finished)
    yield tok.clone()
    for step in range(1, max_new_tokens):
        new = dec.step(generator).clone()  # feeds the previous token, chooses this one
        done = step == max_new_tokens - 1
        if not done and eos_t is not None and step % sync_every == 0 and bool(dec.finished.all()):
            done = True
        if done and final is not None:
            final.append(dec.read_state())  # the state after the last fed token (this one is not fed)
        yield new
        if done:
            return
