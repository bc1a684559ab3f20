"""The inference mode every generation path runs the model in, and the parser of generation's named options."""
from __future__ import annotations

import contextlib
import os
from typing import Any, Mapping

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


def choice(value: str, aliases: Mapping[str, Any], what: str) -> Any:
    """The option ``value`` (case and surrounding blanks ignored) looked up in ``aliases`` (accepted spelling ->
    canonical value); anything else is a ValueError naming ``what`` and the accepted spellings."""
    v = value.strip().lower()
    if v not in aliases:
        raise ValueError(f"{what} must be one of {', '.join(aliases)}, got {value!r}")
    return aliases[v]


def env_choice(var: str, default: str, aliases: Mapping[str, Any], what: str) -> Any:
    """:func:`choice` of the environment variable ``var`` (unset or blank: ``default``)."""
    return choice(os.environ.get(var, "").strip() or default, aliases, f"{what} ({var})")
