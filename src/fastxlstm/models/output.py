"""What a model's forward returns."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..layers.state import XLSTMState


@dataclass
class CausalLMOutput:
    """logits: (B, S, V) float32, or None when the forward was given ``labels`` (the loss is then computed from
    the hidden states chunk by chunk, without the logits); state: the state after the last token (None when
    return_state=False); loss: the cross entropy against ``labels`` (None without labels)."""
    logits: Optional[torch.Tensor]
    state: Optional[XLSTMState] = None
    loss: Optional[torch.Tensor] = None
