"""Batches of packed windows, deterministic in (seed, position) so that a run resumes exactly and a global batch
is the same whatever the number of processes.

The training stream is cut into non-overlapping windows of seq_len + 1 tokens (inputs and shifted targets).
Epoch e visits the windows in the order ``permutation(seed, e)``. One optimizer step consumes ``global_batch``
windows (micro_batch x grad_accum x world_size); the position saved in checkpoints is the number of windows
consumed, so it means the same thing on any number of processes.
"""
from __future__ import annotations

from dataclasses import dataclass
import numpy as np
import torch

from .corpus import CorpusError, TokenStream

__all__ = ["Batch", "WindowSampler", "make_batch", "eval_windows"]


@dataclass
class Batch:
    """input_ids (B, S) int64; targets (B, S) int64; resets (B, S) bool (True at a document's first token);
    mask (B, S) bool (False where the target is the first token of the next document: not predictable)."""
    input_ids: torch.Tensor
    targets: torch.Tensor
    resets: torch.Tensor
    mask: torch.Tensor

    def to(self, device) -> "Batch":
        nb = device.type == "cuda" if isinstance(device, torch.device) else False
        return Batch(*(t.to(device, non_blocking=nb) for t in (self.input_ids, self.targets, self.resets, self.mask)))


def make_batch(stream: TokenStream, starts: np.ndarray, seq_len: int) -> Batch:
    """Gather windows tokens[s : s + seq_len + 1] for each start s."""
    idx = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(seq_len + 1, dtype=np.int64)[None, :]
    toks = torch.from_numpy(np.asarray(stream.tokens[idx]).astype(np.int64))
    flags = torch.from_numpy(np.asarray(stream.doc_start[idx]))
    return Batch(input_ids=toks[:, :-1].contiguous(), targets=toks[:, 1:].contiguous(),
                 resets=flags[:, :-1].contiguous(), mask=~flags[:, 1:])


class WindowSampler:
    """Which windows make up each micro-batch of each step, for one rank."""

    def __init__(self, stream: TokenStream, seq_len: int, micro_batch: int, grad_accum: int = 1,
                 world_size: int = 1, rank: int = 0, seed: int = 0):
        if seq_len < 1 or micro_batch < 1 or grad_accum < 1:
            raise ValueError("seq_len, batch_size and grad_accum must be positive")
        self.stream = stream
        self.seq_len = seq_len
        self.micro_batch = micro_batch
        self.grad_accum = grad_accum
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.n_windows = (len(stream) - 1) // seq_len
        if self.n_windows < 1:
            raise CorpusError(f"the training corpus has {len(stream)} tokens, fewer than --seq-len + 1 = "
                              f"{seq_len + 1}; use a shorter --seq-len or more data")
        self._perm_cache = {}

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            self._perm_cache = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)}
        return self._perm_cache[epoch]

    def window_ids(self, position: int, count: int) -> np.ndarray:
        """The ``count`` window indices starting at global ``position`` (wrapping into the next epochs)."""
        out = np.empty(count, dtype=np.int64)
        filled = 0
        while filled < count:
            epoch, off = divmod(position + filled, self.n_windows)
            take = min(count - filled, self.n_windows - off)
            out[filled:filled + take] = self._perm(epoch)[off:off + take]
            filled += take
        return out

    def step_batches(self, position: int):
        """(list of this rank's grad_accum micro-batches, number of valid targets in the whole global batch).

        The global count lets every rank normalise its loss exactly as one process would on the global batch."""
        ids = self.window_ids(position, self.global_batch)
        starts_all = ids * self.seq_len
        # valid targets over the global batch: windows whose target token is not a document start
        idx = starts_all[:, None] + np.arange(1, self.seq_len + 1)[None, :]
        n_valid = int((~np.asarray(self.stream.doc_start[idx])).sum())
        per_micro = self.micro_batch
        micros = []
        for m in range(self.grad_accum):
            lo = (m * self.world_size + self.rank) * per_micro
            micros.append(make_batch(self.stream, starts_all[lo:lo + per_micro], self.seq_len))
        return micros, n_valid


def eval_windows(stream: TokenStream, seq_len: int, n_windows: int) -> np.ndarray:
    """Start offsets of ``n_windows`` held-out windows spread evenly over the stream (fixed for a corpus)."""
    last = len(stream) - seq_len - 1
    if last < 0:
        raise CorpusError(f"the held-out split has {len(stream)} tokens, fewer than --seq-len + 1 = {seq_len + 1}")
    n = max(1, min(n_windows, last + 1))
    return np.unique(np.linspace(0, last, n).round().astype(np.int64))
