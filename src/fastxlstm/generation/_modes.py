"""The inference mode every generation path runs the model in."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def inference(model):
    """Eval mode and no autograd for the block inside; a model that was training is put back in training mode.

    Set around each model call (not around a whole stream), so the caller's code between two yielded tokens runs
    with its own settings. The mode is switched only when the model is training: ``Module.train`` walks every
    submodule, a quarter of a tiny model's CPU decode step if done per token."""
    was_training = model.training
    if was_training:
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            model.train(True)
