"""Continuous batching over recurrent states: one model thread, a fixed pool of state slots.

Every iteration of the model thread:

1. takes in new requests and aborts (a disconnected client, a stop sequence seen by the HTTP side) and ends
   requests past their deadline; a freed slot is reusable in the same iteration;
2. gives free slots to waiting requests (first come, first served), looking up the prefix cache;
3. runs at most ``prefill_budget`` prompt tokens of prefill, at most ``prefill_chunk`` per request (long prompts
   go in chunks over several iterations; requests whose next chunks have the same length are prefilled together
   as one batch);
4. runs ONE decode step for every request that has finished its prefill: ``step(tokens (B, 1), state)`` on the
   whole pool (B = max_batch, no copy; idle rows compute garbage that is never read) when at least a third of
   the slots decode, else on the gathered rows of those requests (copied back after); then samples each row
   with its own parameters and its own seeded generator.

So a new request joins the running batch as soon as its prompt is read, a finished one leaves at once, and a long
prompt delays the running requests' next token by one chunk's prefill at most. All torch calls happen in this
one thread; the HTTP side only submits requests and receives token events on its asyncio loop.

Each sequence's output depends only on its own prompt and parameters, never on the other requests in the batch
(rows of a batched call do not interact; exactly equal in float64, equal up to float rounding otherwise).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Deque, Dict, List, Optional, Sequence, Tuple

import torch

from ..generation.sampling import _check_sampling, sample_next_token
from .backend import DecodeBackend
from .prefix_cache import PrefixCache
from .state_pool import StatePool, split_state, stack_states

__all__ = ["SamplingParams", "Engine", "RequestHandle", "QueueFull", "EngineClosed"]

log = logging.getLogger("fastxlstm.serve")


class QueueFull(Exception):
    """The server holds ``max_batch + max_queue`` requests already (HTTP 429)."""


class EngineClosed(Exception):
    """The engine is stopped or its model thread died (HTTP 503)."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding parameters. temperature 0 = greedy; seed None = a random seed per request."""
    max_tokens: int
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    eos_token_ids: Tuple[int, ...] = ()

    def check(self, vocab_size: int) -> "SamplingParams":
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        _check_sampling(self.temperature, self.top_k, self.top_p, None, vocab_size)
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# events sent to the HTTP side: ("token", id) | ("eos", id) | ("finish", "length"|"stop"|"abort")
#                                | ("error", (http status, message))
Event = Tuple[str, object]


class RequestHandle:
    """The HTTP side's end of a request: ``async for kind, value in handle`` until a "finish" or "error" event."""

    def __init__(self, engine: "Engine", rid: int, loop: asyncio.AbstractEventLoop):
        self.engine = engine
        self.id = rid
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self._ended = False

    def abort(self) -> None:
        """Free the request's slot at the next iteration of the model thread (idempotent)."""
        if not self.cancelled:
            self.cancelled = True
            self.engine._wake.set()

    def __aiter__(self):
        return self

    async def __anext__(self) -> Event:
        if self._ended:
            raise StopAsyncIteration
        ev = await self.queue.get()
        self._ended = ev[0] in ("finish", "error")
        return ev

    async def next_events(self) -> List[Event]:
        """The next event and all others already delivered (a stream that fell behind catches up in one write);
        [] after the last."""
        if self._ended:
            return []
        out = [await self.queue.get()]
        while out[-1][0] not in ("finish", "error") and not self.queue.empty():
            out.append(self.queue.get_nowait())
        self._ended = out[-1][0] in ("finish", "error")
        return out


class _Request:
    __slots__ = ("handle", "prompt", "params", "prefix_len", "deadline", "slot", "pos", "state", "next_token",
                 "generated", "generator", "phase", "submitted")

    def __init__(self, handle, prompt, params, prefix_len, deadline):
        self.handle = handle
        self.prompt: List[int] = prompt
        self.params: SamplingParams = params
        self.prefix_len: Optional[int] = prefix_len
        self.deadline = deadline
        self.slot: Optional[int] = None
        self.pos = 0                # prompt tokens read so far
        self.state = None           # the single-row state during prefill
        self.next_token = 0         # the token to feed at the next decode step
        self.generated = 0
        self.generator: Optional[torch.Generator] = None
        self.phase = "waiting"      # waiting -> prefill -> decode
        self.submitted = time.monotonic()


class Engine:
    """The scheduler: a fixed pool of ``max_batch`` state slots, a queue of at most ``max_queue`` waiting
    requests, one model thread (``start``/``stop``).

    Args:
        backend: a :class:`~fastxlstm.serve.backend.DecodeBackend` (e.g. ``EagerBackend(model)``).
        max_batch: state slots = most sequences decoded together.
        max_queue: most requests waiting for a slot; beyond, ``submit`` raises :class:`QueueFull`.
        prefill_chunk: most prompt tokens of one request prefilled per iteration (a longer prompt takes several).
        prefill_budget: most prompt tokens prefilled per iteration over all requests (default: prefill_chunk):
            bounds how long the running requests wait for their next token when new requests arrive.
        prefix_cache_bytes: size bound of the prefix-state cache (0: off).
        request_timeout: seconds from submission after which a request is ended with an error.
    """

    def __init__(self, backend: DecodeBackend, max_batch: int = 64, max_queue: int = 256,
                 prefill_chunk: int = 512, prefix_cache_bytes: int = 1 << 30, request_timeout: float = 600.0,
                 prefill_budget: Optional[int] = None):
        prefill_budget = prefill_chunk if prefill_budget is None else prefill_budget
        for name, v, lo in (("max_batch", max_batch, 1), ("max_queue", max_queue, 0),
                            ("prefill_chunk", prefill_chunk, 1), ("prefill_budget", prefill_budget, 1)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if not request_timeout > 0:
            raise ValueError(f"request_timeout must be > 0 seconds, got {request_timeout!r}")
        self.backend = backend
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.prefill_budget = prefill_budget
        self.request_timeout = float(request_timeout)
        self.cache = PrefixCache(prefix_cache_bytes)
        self.pool = StatePool(max_batch)
        self._free: List[int] = list(range(max_batch))
        self._lock = threading.Lock()
        self._inbox: Deque[_Request] = deque()
        self._waiting: Deque[_Request] = deque()
        self._running: List[_Request] = []      # holding a slot (prefill or decode), in admission order
        self._inflight = 0
        self._wake = threading.Event()
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        self._outbox: List[Tuple[RequestHandle, Event]] = []
        self._ids = itertools.count(1)
        self._seed_rng = random.Random()
        self.dead: Optional[str] = None
        self.counters = {"requests": 0, "finished": 0, "aborted": 0, "timeouts": 0, "rejected": 0, "errors": 0,
                         "generated_tokens": 0, "prompt_tokens": 0, "decode_steps": 0, "gathered_steps": 0,
                         "prefill_calls": 0}

    # ------------------------------------------------------------------------------------------------------
    # life cycle
    # ------------------------------------------------------------------------------------------------------

    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="fastxlstm-serve-model", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """End the model thread; requests still running get an error event."""
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # ------------------------------------------------------------------------------------------------------
    # the HTTP side (event loop thread)
    # ------------------------------------------------------------------------------------------------------

    def submit(self, prompt: Sequence[int], params: SamplingParams, prefix_len: Optional[int] = None
               ) -> RequestHandle:
        """Queue a request; call from a running asyncio loop (events are delivered on it).

        prompt: token ids (at least one, each in [0, vocab_size)); prefix_len: the length of a shared prefix
        whose state goes through the prefix cache (0 < prefix_len < len(prompt)), or None.
        Raises ValueError for bad input, QueueFull when full, EngineClosed when stopped.
        """
        prompt = [int(t) for t in prompt]
        V = self.backend.vocab_size
        if not prompt:
            raise ValueError("the prompt is empty (at least one token is needed)")
        lo, hi = min(prompt), max(prompt)
        if lo < 0 or hi >= V:
            raise ValueError(f"prompt token ids must lie in [0, {V}), got min {lo} max {hi}")
        params.check(V)
        if prefix_len is not None and not 0 < prefix_len < len(prompt):
            prefix_len = None
        if self.cache.capacity_bytes == 0:
            prefix_len = None
        if self.dead is not None or self._stop:
            raise EngineClosed(self.dead or "the server is shutting down")
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._inflight >= self.max_batch + self.max_queue:
                self.counters["rejected"] += 1
                raise QueueFull(f"the server is busy: {self._inflight} requests running or queued "
                                f"(max_batch {self.max_batch} + max_queue {self.max_queue}); retry later")
            self._inflight += 1
            self.counters["requests"] += 1
            handle = RequestHandle(self, next(self._ids), loop)
            self._inbox.append(_Request(handle, prompt, params, prefix_len,
                                        time.monotonic() + self.request_timeout))
        self._wake.set()
        return handle

    def stats(self) -> dict:
        running = list(self._running)
        return {
            "max_batch": self.max_batch, "max_queue": self.max_queue,
            "slots_in_use": self.max_batch - len(self._free),
            "free_slots": len(self._free),
            "decoding": sum(r.phase == "decode" for r in running),
            "prefilling": sum(r.phase == "prefill" for r in running),
            "waiting": len(self._waiting) + len(self._inbox),
            "inflight": self._inflight,
            "state_bytes_per_slot": self.pool.row_nbytes(),
            "prefix_cache": self.cache.stats(),
            **self.counters,
        }

    # ------------------------------------------------------------------------------------------------------
    # the model thread
    # ------------------------------------------------------------------------------------------------------

    def _emit(self, req: _Request, ev: Event) -> None:
        self._outbox.append((req.handle, ev))

    def _flush(self) -> None:
        if not self._outbox:
            return
        items, self._outbox = self._outbox, []
        by_loop: Dict[asyncio.AbstractEventLoop, list] = {}
        for h, ev in items:
            by_loop.setdefault(h.loop, []).append((h, ev))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

    def _finish(self, req: _Request, ev: Event) -> None:
        """End a request (running or waiting): free its slot, send its last event."""
        if req.slot is not None:
            self._free.append(req.slot)
            self._free.sort()
            req.slot = None
        if req in self._running:
            self._running.remove(req)
        req.state = None
        req.phase = "done"
        with self._lock:
            self._inflight -= 1
        kind, val = ev
        if kind == "finish":
            self.counters["aborted" if val == "abort" else "finished"] += 1
        self._emit(req, ev)

    def _run(self) -> None:
        try:
            while not self._stop:
                self._wake.clear()  # before taking the inbox: a request submitted after this sets it again
                with self._lock:
                    while self._inbox:
                        self._waiting.append(self._inbox.popleft())
                if not self._waiting and not self._running:
                    self._wake.wait(0.05)
                    continue
                self._reap()
                self._admit()
                self._prefill()
                self._decode()
                self._flush()
        except BaseException as e:  # pragma: no cover - a bug or a broken device: fail everything, loudly
            log.exception("the model thread died")
            self.dead = f"the model thread died: {type(e).__name__}: {e}"
        finally:
            reason = self.dead or "the server is shutting down"
            with self._lock:
                pending = list(self._inbox)
                self._inbox.clear()
            for req in pending + list(self._waiting) + list(self._running):
                self._finish(req, ("error", (503, reason)))
            self._waiting.clear()
            self._flush()

    def _reap(self) -> None:
        now = time.monotonic()
        for queue in (self._waiting, self._running):
            for req in list(queue):
                if req.handle.cancelled:
                    if queue is self._waiting:
                        self._waiting.remove(req)
                    self._finish(req, ("finish", "abort"))
                elif now > req.deadline:
                    if queue is self._waiting:
                        self._waiting.remove(req)
                    self.counters["timeouts"] += 1
                    self._finish(req, ("error", (504, f"the request took longer than the server's timeout of "
                                                     f"{self.request_timeout:g} s")))

    def _admit(self) -> None:
        while self._free and self._waiting:
            req = self._waiting.popleft()
            req.slot = self._free.pop(0)
            req.phase = "prefill"
            seed = req.params.seed if req.params.seed is not None else self._seed_rng.getrandbits(63)
            if not req.params.greedy:
                req.generator = torch.Generator(device=self.backend.device)
                req.generator.manual_seed(seed)
            if req.prefix_len is not None:
                hit = self.cache.get(req.prompt[:req.prefix_len])
                if hit is not None:
                    req.state = hit
                    req.pos = req.prefix_len
            self.counters["prompt_tokens"] += len(req.prompt)
            self._running.append(req)

    def _chunk_end(self, req: _Request) -> int:
        # the prefix boundary is always a chunk boundary: a cache hit then runs the same computation as a miss
        stop = req.prefix_len if (req.prefix_len is not None and req.pos < req.prefix_len) else len(req.prompt)
        return min(req.pos + self.prefill_chunk, stop)

    def _prefill(self) -> None:
        budget = self.prefill_budget
        plan: List[Tuple[_Request, int]] = []
        for req in self._running:
            if req.phase != "prefill":
                continue
            end = self._chunk_end(req)
            if plan and end - req.pos > budget:
                break
            plan.append((req, end))
            budget -= end - req.pos
            if budget <= 0:
                break
        if not plan:
            return
        groups: Dict[Tuple[int, bool], List[Tuple[_Request, int]]] = {}
        for req, end in plan:
            groups.setdefault((end - req.pos, req.state is not None), []).append((req, end))
        dev = self.backend.device
        for (_, has_state), items in groups.items():
            reqs = [r for r, _ in items]
            try:
                ids = torch.tensor([r.prompt[r.pos:end] for r, end in items], dtype=torch.long, device=dev)
                state = stack_states([r.state for r in reqs]) if has_state else None
                logits, new_state = self.backend.prefill(ids, state)
                self.counters["prefill_calls"] += 1
                rows = split_state(new_state)
                # the first new token, for the requests whose prompt ends with this chunk (an intermediate chunk
                # must not draw from the request's generator)
                done = [i for i, (r, end) in enumerate(items) if end == len(r.prompt)]
                first = dict(zip(done, self._sample([reqs[i] for i in done], logits[done]))) if done else {}
            except Exception as e:
                self._fail(reqs, e)
                continue
            for i, (req, end) in enumerate(items):
                req.pos = end
                req.state = rows[i]
                if req.prefix_len is not None and end == req.prefix_len:
                    self.cache.put(req.prompt[:end], rows[i])
                if end < len(req.prompt):
                    continue
                self.pool.write(req.slot, rows[i])
                req.state = None
                req.phase = "decode"
                self._accept(req, first[i])

    def _decode(self) -> None:
        rows = sorted((r for r in self._running if r.phase == "decode"), key=lambda r: r.slot)
        if not rows:
            return
        try:
            slots = [r.slot for r in rows]
            dev = self.backend.device
            if 3 * len(rows) >= self.max_batch:
                # step the whole pool (idle rows get token 0 and their outputs are ignored): gathering and
                # scattering the active rows would move each of their states 4 more times, dearer than stepping
                # the idle rows when at least a third of the slots decode. The shape stays (max_batch, 1).
                feed = [0] * self.max_batch
                for r in rows:
                    feed[r.slot] = r.next_token
                logits, state = self.backend.step(torch.tensor(feed, dtype=torch.long, device=dev)[:, None],
                                                  self.pool.state)
                self.pool.state = state  # the rows of prefilling requests are rewritten when their prefill ends
                if len(rows) < self.max_batch:
                    logits = logits[torch.tensor(slots, device=dev)]
            else:
                toks = torch.tensor([[r.next_token] for r in rows], dtype=torch.long, device=dev)
                logits, state = self.backend.step(toks, self.pool.gather(slots))
                self.pool.scatter(slots, state)
                self.counters["gathered_steps"] += 1
            nxt = self._sample(rows, logits)
        except Exception as e:
            self._fail(rows, e)
            return
        self.counters["decode_steps"] += 1
        for req, tok in zip(rows, nxt):
            self._accept(req, tok)

    def _accept(self, req: _Request, tok: int) -> None:
        """A new token of ``req``: send it, and end the request on eos or at max_tokens."""
        req.generated += 1
        self.counters["generated_tokens"] += 1
        if tok in req.params.eos_token_ids:
            self._emit(req, ("eos", tok))
            self._finish(req, ("finish", "stop"))
            return
        self._emit(req, ("token", tok))
        if req.generated >= req.params.max_tokens:
            self._finish(req, ("finish", "length"))
        else:
            req.next_token = tok

    def _sample(self, reqs: List[_Request], logits: torch.Tensor) -> List[int]:
        """One token per row, each with its request's parameters and generator; one host transfer."""
        out = logits.float().argmax(dim=-1)
        for i, req in enumerate(reqs):
            p = req.params
            if not p.greedy:
                out[i] = sample_next_token(logits[i:i + 1], p.temperature, p.top_k, p.top_p, do_sample=True,
                                           generator=req.generator)[0]
        return out.tolist()

    def _fail(self, reqs: List[_Request], e: Exception) -> None:
        log.exception("model call failed for %d request(s)", len(reqs))
        self.counters["errors"] += 1
        msg = f"the model failed on this request: {type(e).__name__}: {e}"
        for req in reqs:
            self._finish(req, ("error", (500, msg)))


def _deliver(batch) -> None:
    for handle, ev in batch:
        handle.queue.put_nowait(ev)
