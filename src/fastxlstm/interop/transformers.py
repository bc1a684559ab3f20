"""transformers' xLSTM-7B checkpoint format (model_type "xlstm", class ``xLSTMForCausalLM``).

Our :class:`~fastxlstm.models.xlstm_large.XLSTMLarge` uses transformers' parameter names, so the state dicts are
identical; what differs is the config. This module converts configs both ways and knows which transformers fields
are kernel/runtime settings that we ignore (they choose mlstm_kernels implementations, not the function computed).

The config mapping itself (and the exact check of the head sizes transformers derives differently, which makes
:func:`to_transformers_config` refuse and ``save_pretrained`` warn) lives in
:mod:`fastxlstm.models.xlstm_large_format` and is re-exported here. Known differences we do not inherit: its "fused" weight mode is not loadable here; its ``add_out_norm=False`` still builds an out_norm; and its out_norm
never has a bias, even with ``use_bias=True`` (the official xLSTMLarge's has one): loading a transformers
directory fills that bias with zeros (the function transformers computes), and exporting a model whose out_norm
bias is nonzero to transformers is refused.

transformers is imported only inside the functions that build transformers objects.
"""
from __future__ import annotations

from dataclasses import replace

from ..models.xlstm_large import XLSTMLargeConfig
from ..models.xlstm_large_format import (IGNORED_TRANSFORMERS_KEYS, TransformersCompatibilityWarning,  # noqa: F401
                                         config_from_transformers_dict, config_to_transformers_dict,
                                         fill_transformers_gaps, transformers_head_dim_mismatch)

__all__ = ["fill_transformers_gaps", "config_from_transformers_dict", "config_to_transformers_dict",
           "from_transformers_model", "to_transformers_model", "to_transformers_config", "IGNORED_TRANSFORMERS_KEYS",
           "transformers_head_dim_mismatch", "TransformersCompatibilityWarning"]


def to_transformers_config(config: XLSTMLargeConfig, **overrides):
    """A transformers ``xLSTMConfig`` (imports transformers). ``overrides`` set kernel fields, e.g. for CPU:
    ``autocast_kernel_dtype="float32"``. Raises ValueError for a config whose head sizes transformers derives
    differently (see :func:`transformers_head_dim_mismatch`): transformers could not run it."""
    from transformers import xLSTMConfig
    if isinstance(config, XLSTMLargeConfig):
        problem = transformers_head_dim_mismatch(config)
        if problem is not None:
            raise ValueError(f"config: {problem}")
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
