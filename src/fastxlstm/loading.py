"""Find and load a model and its tokenizer from whatever directory a user points at: a model directory
(config.json + safetensors, ours or a transformers xLSTM one), a run directory of ``fastxlstm train`` (its final
``model/``, else its newest checkpoint), a ``latest`` pointer to a run, or one training checkpoint.

Used by ``fastxlstm.from_pretrained`` and the inference commands (generate, eval, chat, convert); it imports
training code only when the directory holds nothing but a training checkpoint.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Tuple

__all__ = ["resolve_run_dir", "find_model_dir", "config_from_dict", "from_pretrained", "load_tokenizer_for",
           "load_model_and_tokenizer"]


def resolve_run_dir(path: str) -> str:
    """Follow a ``latest`` pointer: a symlink (by the OS) or a text file holding the run's name or path."""
    path = os.fspath(path)
    if os.path.isfile(path) and os.path.getsize(path) < 4096 and os.path.basename(path) == "latest":
        with open(path, "r", encoding="utf-8") as f:
            target = f.read().strip()
        if target:
            return target if os.path.isabs(target) else os.path.join(os.path.dirname(path), target)
    return path


def find_model_dir(path) -> Tuple[Optional[str], Optional[str]]:
    """(directory holding config.json + weights, or None; training checkpoint directory, or None) for ``path``.

    A run directory gives its final ``model/`` when training finished, else its newest checkpoint."""
    path = resolve_run_dir(os.fspath(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such directory")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"{path}: not a directory")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path, None
    if os.path.isfile(os.path.join(path, "model", "config.json")):
        return os.path.join(path, "model"), None
    if os.path.isfile(os.path.join(path, "trainer_state.json")):
        return None, path
    if os.path.isdir(os.path.join(path, "checkpoints")):
        from .train.checkpoint import latest_checkpoint  # a run stopped before its end: training format
        ck = latest_checkpoint(os.path.join(path, "checkpoints"))
        if ck is not None:
            return None, ck
    raise FileNotFoundError(f"{path}: no config.json, model/ or checkpoints/ found (not a model or run directory)")


def config_from_dict(d: dict):
    """Rebuild a model config from its ``to_dict()`` output (``model_type`` picks the class: models/registry.py)."""
    from .models.registry import config_from_dict as _from_dict
    return _from_dict(d)


def _tokenizer_dirs(model_dir: Optional[str], ckpt_dir: Optional[str]):
    if model_dir is not None:
        return [model_dir, os.path.dirname(os.path.abspath(model_dir))]
    return [ckpt_dir, os.path.dirname(os.path.dirname(os.path.abspath(ckpt_dir)))]


def from_pretrained(path, device=None, dtype=None):
    """Load a model from a model directory, a run directory (its final model, else its newest checkpoint), a
    ``latest`` pointer or a training checkpoint. ``device`` / ``dtype``: where and in which dtype to put the
    weights (default: CPU, as stored). Returns the model in eval mode."""
    import torch
    from .models.io import from_pretrained as _load_dir
    try:
        model_dir, ckpt_dir = find_model_dir(path)
    except FileNotFoundError:
        if os.path.isdir(resolve_run_dir(os.fspath(path))):
            # neither a model nor a run: the model-directory loader names what is missing (CheckpointError)
            return _load_dir(resolve_run_dir(os.fspath(path)), device=device, dtype=dtype)
        raise
    if model_dir is not None:
        return _load_dir(model_dir, device=device, dtype=dtype)
    from .models.presets import build_model
    from .train.checkpoint import load_checkpoint
    model_sd, _, _, _, mcfg = load_checkpoint(ckpt_dir, load_optimizer=False)
    with torch.device("meta"):
        model = build_model(config_from_dict(mcfg["config"]))
    model.load_state_dict(model_sd, assign=True, strict=True)
    model = model.to(device=device or "cpu")
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model.eval()


def load_tokenizer_for(path, vocab_size: Optional[int] = None):
    """The tokenizer stored with the model at ``path`` (its directory or the run directory around it): a
    tokenizer.json, or raw bytes (tokenizer_config.json {"type": "bytes"}, or a 256-token vocabulary)."""
    from .data.tokenizers import ByteTokenizer, HFTokenizer
    model_dir, ckpt_dir = find_model_dir(path)
    for d in _tokenizer_dirs(model_dir, ckpt_dir):
        if os.path.isfile(os.path.join(d, "tokenizer.json")):
            return HFTokenizer.from_file(os.path.join(d, "tokenizer.json"))
        cfg_path = os.path.join(d, "tokenizer_config.json")
        if os.path.isfile(cfg_path):
            try:
                with open(cfg_path, encoding="utf-8") as f:
                    kind = json.load(f).get("type")
            except (ValueError, UnicodeDecodeError, AttributeError):
                kind = None
            if kind == "bytes":
                return ByteTokenizer()
            # a transformers tokenizer_config.json without its tokenizer.json: keep looking
    if vocab_size == 256:
        return ByteTokenizer()
    raise FileNotFoundError(f"{os.fspath(path)}: no tokenizer.json beside the model (vocab {vocab_size}); pass "
                            f"a tokenizer file")


def load_model_and_tokenizer(path, device=None, dtype=None, tokenizer: Optional[str] = None):
    """(model, tokenizer) from ``path`` as :func:`from_pretrained`; ``tokenizer``: a tokenizer.json (or its
    directory) to use instead of the stored one. Checks that the tokenizer fits the model's vocabulary."""
    from .data.tokenizers import HFTokenizer
    model = from_pretrained(path, device=device, dtype=dtype)
    if tokenizer is not None:
        tok = HFTokenizer.from_file(tokenizer)
    else:
        tok = load_tokenizer_for(path, model.vocab_size)
    if tok.vocab_size > model.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the model only {model.vocab_size}")
    return model, tok
