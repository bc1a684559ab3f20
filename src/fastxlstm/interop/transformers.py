"""transformers' xLSTM-7B checkpoint format (model_type "xlstm", class ``xLSTMForCausalLM``).

Our :class:`~fastxlstm.models.xlstm_large.XLSTMLarge` uses transformers' parameter names, so the state dicts are
identical; what differs is the config. This module converts configs both ways and knows which transformers fields
are kernel/runtime settings that we ignore (they choose mlstm_kernels implementations, not the function computed).

Known differences we do not inherit (docs/MATH.md section 3): transformers' ``qk_dim``/``v_dim`` config
properties round up to 64 while its layers use ``int(hidden_size * factor)`` (its cache breaks unless the two
agree); its "fused" weight mode is not loadable here; its ``add_out_norm=False`` still builds an out_norm; and its out_norm
never has a bias, even with ``use_bias=True`` (the official xLSTMLarge's has one): loading a transformers
directory fills that bias with zeros (the function transformers computes), and exporting a model whose out_norm
bias is nonzero to transformers is refused.

transformers is imported only inside the functions that build transformers objects.
"""
from __future__ import annotations

import warnings
from dataclasses import fields, replace
from typing import Any, Dict

from ..models.xlstm_large import XLSTMLargeConfig

__all__ = ["fill_transformers_gaps", "config_from_transformers_dict", "config_to_transformers_dict", "from_transformers_model",
           "to_transformers_model", "to_transformers_config", "IGNORED_TRANSFORMERS_KEYS"]

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


def to_transformers_config(config: XLSTMLargeConfig, **overrides):
    """A transformers ``xLSTMConfig`` (imports transformers). ``overrides`` set kernel fields, e.g. for CPU:
    ``autocast_kernel_dtype="float32"``."""
    from transformers import xLSTMConfig
    d = config_to_transformers_dict(config)
    for key in ("architectures", "model_type", "fastxlstm_version"):
        d.pop(key, None)
    d.update(overrides)
    return xLSTMConfig(**d)


def from_transformers_model(hf_model, dtype=None):
    """Our ``XLSTMLarge`` with the weights of a transformers ``xLSTMForCausalLM`` (copied, not shared)."""
    import torch

    from ..models.xlstm_large import XLSTMLarge
    config = config_from_transformers_dict(hf_model.config.to_dict())
    model = XLSTMLarge(config)
    sd = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
    if config.tie_word_embeddings:
        # transformers never ties xLSTM weights: keep the tie only if the two matrices are equal
        head, emb = sd.get("lm_head.weight"), sd.get("backbone.embeddings.weight")
        if head is not None and emb is not None and not torch.equal(head, emb):
            config = replace(config, tie_word_embeddings=False)
            model = XLSTMLarge(config)
        else:
            sd.pop("lm_head.weight", None)
    fill_transformers_gaps(config, sd)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"transformers state dict does not match: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}")
    p = next(hf_model.parameters())
    return model.to(device=p.device, dtype=dtype or p.dtype).eval()


def to_transformers_model(model, **config_overrides):
    """A transformers ``xLSTMForCausalLM`` with our model's weights (copied). ``config_overrides`` as in
    :func:`to_transformers_config`."""
    from transformers import xLSTMForCausalLM
    bias = getattr(model.backbone.out_norm, "bias", None)
    if bias is not None and bool((bias != 0).any()):
        raise ValueError("transformers' xLSTM out_norm has no bias, but this model's backbone.out_norm.bias is "
                         "nonzero: it cannot be expressed as a transformers model")
    hf_config = to_transformers_config(model.config, **config_overrides)
    hf = xLSTMForCausalLM(hf_config)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # transformers' xLSTMForCausalLM never ties lm_head to the embedding (it has no tied-weights keys), so a
    # tied model is written as two equal matrices: the function is the same
    if bias is not None:
        sd.pop("backbone.out_norm.bias")
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"state dict does not match transformers' model: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}")
    p = next(model.parameters())
    return hf.to(device=p.device, dtype=p.dtype).eval()
