"""Text in, text out: a tokenizer around :func:`fastxlstm.generation.generate_stream`."""
from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = ["sample_text"]


def sample_text(model, tokenizer, prompt: str, max_new_tokens: int, seed: int = 0, temperature: float = 0.8,
                top_k: Optional[int] = None, top_p: Optional[float] = None,
                stream: Optional[Callable[[str], None]] = None) -> str:
    """Prompt + a sampled continuation as text; ``stream`` receives each decoded piece as it is produced
    (multi-byte UTF-8 characters are held back until complete)."""
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("the prompt is empty")
    x = torch.tensor([ids], dtype=torch.long, device=model.device)
    dec = tokenizer.stream_decoder()
    pieces = [prompt]
    if stream is not None:
        stream(prompt)
    for tok in model.generate_stream(x, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                     seed=seed):
        piece = dec.push(int(tok[0]))
        if piece:
            pieces.append(piece)
            if stream is not None:
                stream(piece)
    tail = dec.flush()
    if tail:
        pieces.append(tail)
        if stream is not None:
            stream(tail)
    return "".join(pieces)
