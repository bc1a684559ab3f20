"""Opt-in in-place state updates, for the CUDA-graph decode engine only (internal; not public API).

The public ops never modify a state they are given. The decode engine keeps the recurrent state in static
buffers that a captured CUDA graph reads and writes on every replay; copying a new 7B state (134.5 MB per
sequence) into them after every step would double the step's memory traffic. Inside
``inplace_state_updates()`` the fused mLSTM step kernel writes the new C over the given C (each program reads a
tile of C before it writes the same tile, so this is race-free) and returns that same tensor; the engine then skips
the copy for every returned tensor that already is its static buffer.
"""
from __future__ import annotations

import contextlib

# a plain module global (not a thread-local), so that torch.compile can trace a read of it (and guard on it)
_ACTIVE = False


def inplace_active() -> bool:
    return _ACTIVE


@contextlib.contextmanager
def inplace_state_updates():
    global _ACTIVE
    prev = _ACTIVE
    _ACTIVE = True
    try:
        yield
    finally:
        _ACTIVE = prev
