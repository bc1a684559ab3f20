"""What a model's forward returns."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..layers.state import XLSTMState


@dataclass
class CausalLMOutput:
    """logits: (B, S, V) float32; state: the state after the last token (None when return_state=False)."""
    logits: torch.Tensor
    state: Optional[XLSTMState] = None
