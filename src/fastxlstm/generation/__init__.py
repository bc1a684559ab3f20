"""Text generation: prefill the prompt once, then decode one token at a time on the carried recurrent state.

    from fastxlstm.generation import generate, generate_stream, sample_next_token

- ``eager.py``: the reference loop (any device, any model): ``generate``, ``generate_stream``, ``prepare_prompt``;
- ``sampling.py``: greedy / temperature / top-k / top-p selection of the next token;
- ``packing.py``: ``pack_projections`` / ``unpack_projections``, the same-input projections of a layer as one
  matmul for decoding (memory neutral, reversible; the CUDA-graph decoder packs by default, FASTXLSTM_PACK=0 off).
"""
from __future__ import annotations

from .eager import generate, generate_stream, prepare_prompt
from .packing import pack_projections, unpack_projections
from .sampling import sample_next_token

__all__ = ["generate", "generate_stream", "sample_next_token", "prepare_prompt", "pack_projections",
           "unpack_projections"]
