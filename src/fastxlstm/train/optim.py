"""The optimizer side of training: AdamW parameter groups and the learning-rate schedule."""
from __future__ import annotations

import math
from typing import Any, Dict, List

import torch

from .config import TrainConfig

__all__ = ["lr_at", "optimizer_groups", "build_optimizer", "set_lr"]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over ``warmup_steps`` to ``lr``, then cosine decay to ``min_lr_ratio * lr`` at ``steps``.
    ``step`` counts finished optimizer steps (0 for the first update)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    lo = cfg.lr * cfg.min_lr_ratio
    return lo + 0.5 * (cfg.lr - lo) * (1.0 + math.cos(math.pi * progress))


def optimizer_groups(model: torch.nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Weight decay on weight matrices only: the model's own ``optim_groups`` (every fastxlstm model has one; it
    knows which parameters are recurrent kernels, norms, skips and embeddings)."""
    if not hasattr(model, "optim_groups"):
        raise ValueError(f"{type(model).__name__} has no optim_groups(weight_decay); train a fastxlstm model")
    return model.optim_groups(weight_decay)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over :func:`optimizer_groups` (fused on CUDA without FSDP)."""
    adam_kw = {"fused": True} if device.type == "cuda" and not cfg.fsdp else {}
    return torch.optim.AdamW(optimizer_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=1e-8, **adam_kw)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
