"""Training: the loop (``train``), its config (``TrainConfig``), checkpoints and torchrun support.

    from fastxlstm.train import TrainConfig, train
    summary = train(TrainConfig(preset="tiny", steps=100))
"""
from .config import TrainConfig

__all__ = ["TrainConfig", "train"]


def __getattr__(name):
    if name == "train":
        from .trainer import train
        return train
    raise AttributeError(f"module 'fastxlstm.train' has no attribute {name!r}")
