"""Text generation: prefill the prompt once, then decode one token at a time on the carried recurrent state.

    from fastxlstm.generation import generate, generate_stream, sample_next_token

- ``eager.py``: the reference loop (any device, any model): ``generate``, ``generate_stream``, ``prepare_prompt``;
- ``sampling.py``: greedy / temperature / top-k / top-p selection of the next token.
"""
from __future__ import annotations

from .eager import generate, generate_stream, prepare_prompt
from .sampling import sample_next_token

__all__ = ["generate", "generate_stream", "sample_next_token", "prepare_prompt"]
