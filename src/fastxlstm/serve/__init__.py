"""``fastxlstm serve``: an OpenAI-compatible HTTP server with continuous batching over recurrent states.

    fastxlstm serve --model DIR [--host 127.0.0.1 --port 8000 --max-batch 64 ...]

Needs the ``serve`` extra (``pip install fastxlstm[serve]``: FastAPI, uvicorn, pydantic, jinja2). Pieces:

- :mod:`.scheduler`: :class:`Engine`, the continuous-batching scheduler (one model thread, a pool of state slots,
  chunked prefill, prefix-state cache, timeouts, a bounded queue);
- :mod:`.backend`: the model calls behind ``prefill`` / ``step`` (:class:`EagerBackend`);
- :mod:`.state_pool`, :mod:`.prefix_cache`: rows of batched states, the LRU of prefix states;
- :mod:`.chat`: chat templates and stop sequences; :mod:`.app`: the FastAPI app; :mod:`.server`: building and
  running it (also in a background thread: :class:`ServerThread`).

Nothing here is imported by ``import fastxlstm``.
"""
from __future__ import annotations

_LAZY = {
    "Engine": ("fastxlstm.serve.scheduler", "Engine"),
    "SamplingParams": ("fastxlstm.serve.scheduler", "SamplingParams"),
    "EagerBackend": ("fastxlstm.serve.backend", "EagerBackend"),
    "DecodeBackend": ("fastxlstm.serve.backend", "DecodeBackend"),
    "create_app": ("fastxlstm.serve.app", "create_app"),
    "build_app": ("fastxlstm.serve.server", "build_app"),
    "ServerThread": ("fastxlstm.serve.server", "ServerThread"),
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib
        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'fastxlstm.serve' has no attribute {name!r}")
