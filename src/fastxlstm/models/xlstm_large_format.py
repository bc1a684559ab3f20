"""XLSTMLargeConfig <-> transformers' xLSTMConfig dicts (the ``config.json`` of a transformers ``xLSTMForCausalLM``
directory, model_type "xlstm"), and what transformers derives differently.

Lives beside :class:`~fastxlstm.models.xlstm_large.XLSTMLargeConfig` so that checkpoint I/O (models/io.py) reads and
writes the 7B format without importing :mod:`fastxlstm.interop`; :mod:`fastxlstm.interop.transformers` re-exports
these names and adds the conversions that need transformers itself. Nothing here imports transformers.

Head sizes: transformers' layers use ``int(hidden_size * factor)`` for the q/k and v widths, as we do, but its
recurrent cache is sized from the config properties ``qk_dim``/``v_dim``, which round ``hidden_size * factor`` up to
a multiple of 64 (``round_up_to_next_multiple_of``), with head sizes ``qk_dim // num_heads`` and
``v_dim // num_heads``. Where those head sizes differ from the layers' (e.g. hidden_size=64, qk_dim_factor=0.5:
cache 16, layers 8) transformers loads the directory and then fails in its first cached forward or ``generate``.
:func:`transformers_head_dim_mismatch` tells exactly when.
"""
from __future__ import annotations

import warnings
from dataclasses import fields
from typing import Any, Dict, Optional

from .xlstm_large import XLSTMLargeConfig

__all__ = ["fill_transformers_gaps", "config_from_transformers_dict", "config_to_transformers_dict",
           "transformers_head_dim_mismatch", "IGNORED_TRANSFORMERS_KEYS", "TransformersCompatibilityWarning"]


class TransformersCompatibilityWarning(UserWarning):
    """A 7B-architecture checkpoint that fastxlstm reads but transformers' xLSTMForCausalLM would not run."""


def _hf_round_up(x: float, multiple_of: int) -> int:
    # transformers' round_up_to_next_multiple_of (and the xlstm package's), the same float arithmetic
    return int(((x + multiple_of - 1) // multiple_of) * multiple_of)


def transformers_head_dim_mismatch(config: XLSTMLargeConfig) -> Optional[str]:
    """None if transformers runs this config as we do; else a sentence saying which head size its cache would
    get wrong. Exact: compares transformers' cache head sizes (``round_up(hidden_size * factor, 64) // num_heads``)
    with its layers' (``int(hidden_size * factor) // num_heads``, which are ours)."""
    problems = []
    for name, factor, ours in (("qk", config.qk_dim_factor, config.qk_head_dim),
                               ("v", config.v_dim_factor, config.v_head_dim)):
        theirs = _hf_round_up(config.hidden_size * factor, 64) // config.num_heads
        if theirs != ours:
            problems.append(f"its cache gives the {name} heads {theirs} features (hidden_size * {name}_dim_factor = "
                            f"{config.hidden_size * factor:g} rounded up to a multiple of 64, // num_heads) while its "
                            f"layers, like ours, use {ours} (int(hidden_size * {name}_dim_factor) // num_heads)")
    if not problems:
        return None
    return ("transformers' xLSTMForCausalLM would load it and then fail in its first cached forward or generate: "
            + "; ".join(problems) + ". Make hidden_size * qk_dim_factor and hidden_size * "
            "v_dim_factor multiples of 64 for a transformers-compatible model")


# kernel choices and runtime switches: they pick an implementation, not the function computed
IGNORED_TRANSFORMERS_KEYS = frozenset({
    "chunkwise_kernel", "sequence_kernel", "step_kernel", "mode", "return_last_states", "autocast_kernel_dtype",
    "inference_state_dtype", "max_inference_chunksize", "use_cache",
})
# generic PreTrainedConfig bookkeeping that transformers may write into any config.json
_GENERIC_KEYS = frozenset({
    "architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path", "output_hidden_states",
    "output_attentions", "return_dict", "is_encoder_decoder", "id2label", "label2id", "problem_type",
    "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params",
    "chunk_size_feed_forward", "is_decoder", "add_cross_attention", "cross_attention_hidden_size",
    "tie_encoder_decoder", "finetuning_task", "pruned_heads", "torchscript", "use_return_dict",
    "output_scores", "return_dict_in_generate", "model_type", "fastxlstm_version", "_attn_implementation",
    "_experts_implementation", "num_labels", "initializer_range",
})
# transformers' defaults: the native PyTorch kernels (they run on CPU; switch to triton ones on a GPU)
_TRANSFORMERS_KERNEL_DEFAULTS = {
    "chunkwise_kernel": "chunkwise--native_autograd",
    "sequence_kernel": "native_sequence__native",
    "step_kernel": "native",
    "mode": "inference",
    "return_last_states": True,
    "autocast_kernel_dtype": "bfloat16",
    "inference_state_dtype": "float32",
    "max_inference_chunksize": 16384,
    "weight_mode": "single",
    "use_cache": True,
}


def fill_transformers_gaps(config: XLSTMLargeConfig, tensors) -> None:
    """Add, in place, the tensors a transformers checkpoint lacks by construction (its out_norm has no bias)."""
    import torch
    key = "backbone.out_norm.bias"
    if config.use_bias and config.add_out_norm and key not in tensors:
        like = tensors.get("backbone.out_norm.weight")
        tensors[key] = torch.zeros(config.hidden_size, dtype=like.dtype if like is not None else torch.float32)


def config_from_transformers_dict(d: Dict[str, Any]) -> XLSTMLargeConfig:
    """An ``XLSTMLargeConfig`` from a transformers xLSTMConfig dict (config.json or ``config.to_dict()``).

    Aliases are resolved (embedding_dim = hidden_size, num_blocks = num_hidden_layers; a mismatch is an error),
    kernel fields are ignored, ``weight_mode`` must be "single", a list eos_token_id keeps its first id.
    Unknown keys give a warning (not an error: newer transformers releases add bookkeeping fields).
    """
    if not isinstance(d, dict):
        raise ValueError(f"config must be a dict, got {type(d).__name__}")
    d = dict(d)
    mt = d.get("model_type", "xlstm")
    if mt != "xlstm":
        raise ValueError(f"not a transformers xLSTM config: model_type is {mt!r}, expected 'xlstm'")
    for alias, name in (("embedding_dim", "hidden_size"), ("num_blocks", "num_hidden_layers")):
        a, b = d.pop(alias, None), d.get(name)
        if b is None:
            d[name] = a
        elif a is not None and a != b:
            raise ValueError(f"config has {alias}={a!r} but {name}={b!r}; they must agree")
    wm = d.pop("weight_mode", "single")
    if wm != "single":
        raise ValueError(f"weight_mode={wm!r} is not supported (only 'single': separate q, k, v, gate weights)")
    eos = d.get("eos_token_id")
    if isinstance(eos, (list, tuple)):
        d["eos_token_id"] = int(eos[0]) if eos else None
    known = {f.name for f in fields(XLSTMLargeConfig)}
    kwargs = {}
    unknown = []
    for key, val in d.items():
        if key in known:
            if val is not None or key in ("gate_soft_cap", "output_logit_soft_cap", "pad_token_id", "bos_token_id",
                                          "eos_token_id"):
                kwargs[key] = val
        elif key in IGNORED_TRANSFORMERS_KEYS or key in _GENERIC_KEYS:
            continue
        else:
            unknown.append(key)
    if unknown:
        warnings.warn(f"ignoring unknown xLSTM config fields: {sorted(unknown)}", stacklevel=2)
    for key in ("gate_soft_cap", "output_logit_soft_cap", "norm_eps", "eps", "qk_dim_factor", "v_dim_factor",
                "ffn_proj_factor"):
        if isinstance(kwargs.get(key), int) and not isinstance(kwargs.get(key), bool):
            kwargs[key] = float(kwargs[key])
    return XLSTMLargeConfig(**kwargs)


def config_to_transformers_dict(config: XLSTMLargeConfig) -> Dict[str, Any]:
    """A config.json dict that transformers' ``xLSTMConfig`` reads (and that we read back losslessly)."""
    if not isinstance(config, XLSTMLargeConfig):
        raise ValueError(f"expected an XLSTMLargeConfig, got {type(config).__name__}")
    from .. import __version__
    d = config.to_dict()
    d["embedding_dim"] = config.hidden_size
    d["num_blocks"] = config.num_hidden_layers
    d.update(_TRANSFORMERS_KERNEL_DEFAULTS)
    d["architectures"] = ["xLSTMForCausalLM"]
    d["model_type"] = "xlstm"
    d["fastxlstm_version"] = __version__
    return d
