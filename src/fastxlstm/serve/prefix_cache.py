"""A bounded LRU of recurrent states after shared prompt prefixes (e.g. a chat's system prompt).

A recurrent model's memory after a prefix is one fixed-size state, so the prefill of a prefix that many requests
share (a system prompt and the template around it) can be computed once and its state reused. Entries are keyed
by the exact token ids of the prefix (no hashing collisions) and evicted least-recently-used when the total size
of the stored states exceeds ``capacity_bytes``.

Exactness: the scheduler always splits a prompt's prefill at the prefix boundary (cold or not), so a request that
hits the cache runs the very same computation after the boundary as one that misses: same tokens.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Optional, Sequence, Tuple

from ..layers.state import XLSTMState

__all__ = ["PrefixCache"]


class PrefixCache:
    """LRU map ``tuple(token ids) -> single-row XLSTMState``, bounded by the states' bytes (0 disables it)."""

    def __init__(self, capacity_bytes: int):
        if not isinstance(capacity_bytes, int) or capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be an int >= 0, got {capacity_bytes!r}")
        self.capacity_bytes = capacity_bytes
        self._entries: "OrderedDict[Tuple[int, ...], Tuple[XLSTMState, int]]" = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, prefix: Sequence[int]) -> Optional[XLSTMState]:
        """The stored state after ``prefix`` (and mark it recently used), or None (counted as a miss)."""
        key = tuple(prefix)
        with self._lock:
            hit = self._entries.get(key)
            if hit is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return hit[0]

    def put(self, prefix: Sequence[int], state: XLSTMState) -> bool:
        """Store the state after ``prefix`` (never modified afterwards: states are values). Returns False when it
        does not fit at all."""
        if state.batch_size != 1:
            raise ValueError(f"the prefix cache stores single-row states, got batch {state.batch_size}")
        size = state.nbytes()
        if size > self.capacity_bytes:
            return False
        key = tuple(prefix)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            while self._entries and self.bytes + size > self.capacity_bytes:
                _, (_, nb) = self._entries.popitem(last=False)
                self.bytes -= nb
                self.evictions += 1
            self._entries[key] = (state, size)
            self.bytes += size
        return True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0

    def stats(self) -> dict:
        return {"entries": len(self._entries), "bytes": self.bytes, "capacity_bytes": self.capacity_bytes,
                "hits": self.hits, "misses": self.misses, "evictions": self.evictions}
