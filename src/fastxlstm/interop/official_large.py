"""Convert the official ``xlstm.xlstm_large.model.xLSTMLarge`` (the 7B architecture) to our XLSTMLarge.

The official module tree differs from transformers' (and ours) only in two names: the token embedding is
``embedding`` (not ``backbone.embeddings``), and the "fused" weight mode concatenates q|k|v|o, i|f and
up_gate|up into single matrices, which we split. Its config fields map one to one (embedding_dim -> hidden_size,
num_blocks -> num_hidden_layers); its kernel fields pick mlstm_kernels implementations and are ignored. It never
ties the head to the embedding.

To run the official model on a CPU (as the parity tests do), use :data:`OFFICIAL_CPU_KERNELS`: the native PyTorch
kernels of mlstm_kernels, float32 autocast, and "inference" mode (any sequence length, returns the state).

The ``xlstm`` package is imported only by the functions that build official objects.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ..models.xlstm_large import XLSTMLarge, XLSTMLargeConfig

__all__ = ["convert_large", "config_from_official_large", "OFFICIAL_CPU_KERNELS"]

OFFICIAL_CPU_KERNELS = dict(
    chunkwise_kernel="chunkwise--native_autograd",
    sequence_kernel="native_sequence__native",
    step_kernel="native",
    mode="inference",
    return_last_states=True,
    autocast_kernel_dtype="float32",
    inference_state_dtype="float32",
)


def config_from_official_large(cfg) -> XLSTMLargeConfig:
    """Our config from an official ``xLSTMLargeConfig`` (a dataclass) or its dict."""
    d = cfg if isinstance(cfg, dict) else vars(cfg)
    try:
        return XLSTMLargeConfig(
            vocab_size=d["vocab_size"],
            hidden_size=d["embedding_dim"],
            num_hidden_layers=d["num_blocks"],
            num_heads=d["num_heads"],
            qk_dim_factor=float(d.get("qk_dim_factor", 0.5)),
            v_dim_factor=float(d.get("v_dim_factor", 1.0)),
            gate_soft_cap=None if d.get("gate_soft_cap") is None else float(d["gate_soft_cap"]),
            output_logit_soft_cap=(None if d.get("output_logit_soft_cap") is None
                                   else float(d["output_logit_soft_cap"])),
            norm_eps=float(d.get("norm_eps", 1e-6)),
            eps=float(d.get("eps", 1e-6)),
            use_bias=bool(d.get("use_bias", False)),
            norm_reduction_force_float32=bool(d.get("norm_reduction_force_float32", True)),
            add_out_norm=bool(d.get("add_out_norm", True)),
            ffn_proj_factor=float(d.get("ffn_proj_factor", 2.6667)),
            ffn_round_up_to_multiple_of=int(d.get("ffn_round_up_to_multiple_of", 64)),
            chunk_size=int(d.get("chunk_size", 64)),
            tie_word_embeddings=False,
            pad_token_id=None, bos_token_id=None, eos_token_id=None,
        )
    except KeyError as exc:
        raise ValueError(f"official xLSTMLarge config lacks the field {exc}") from None


def _split(t: torch.Tensor, sizes, names, prefix, out: Dict[str, torch.Tensor], suffix: str) -> None:
    if t.shape[0] != sum(sizes):
        raise ValueError(f"{prefix}: fused tensor has {t.shape[0]} rows, expected {sum(sizes)}")
    for name, part in zip(names, torch.split(t, list(sizes), dim=0)):
        out[f"{prefix}.{name}.{suffix}"] = part.clone()


def _convert_state_dict(sd: Dict[str, torch.Tensor], config: XLSTMLargeConfig) -> Dict[str, torch.Tensor]:
    qk, v, nh, ffn = config.qk_dim, config.v_dim, config.num_heads, config.ffn_dim
    out: Dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        t = t.detach()
        if key == "embedding.weight":
            out["backbone.embeddings.weight"] = t.clone()
            continue
        prefix, _, suffix = key.rpartition(".")
        if prefix.endswith("mlstm_layer.qkv_opreact"):
            base = prefix[: -len(".qkv_opreact")]
            _split(t, (qk, qk, v, v), ("q", "k", "v", "ogate_preact"), base, out, suffix)
        elif prefix.endswith("mlstm_layer.ifgate_preact"):
            base = prefix[: -len(".ifgate_preact")]
            _split(t, (nh, nh), ("igate_preact", "fgate_preact"), base, out, suffix)
        elif prefix.endswith("ffn.proj_up_gate_z"):
            base = prefix[: -len(".proj_up_gate_z")]
            _split(t, (ffn, ffn), ("proj_up_gate", "proj_up"), base, out, suffix)
        else:
            out[key] = t.clone()
    return out


def convert_large(model, dtype: Optional[torch.dtype] = None) -> XLSTMLarge:
    """Our XLSTMLarge computing the same function as the official ``xLSTMLarge`` ``model`` (weights copied).

    The result is on the official model's device, in its dtype unless ``dtype`` is given.
    """
    if not hasattr(model, "config") or not hasattr(model, "embedding") or not hasattr(model, "backbone"):
        raise ValueError(f"expected an official xlstm.xlstm_large.model.xLSTMLarge, got {type(model).__name__}")
    config = config_from_official_large(model.config)
    sd = _convert_state_dict(model.state_dict(), config)
    ours = XLSTMLarge(config)
    expected = ours.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ValueError(f"official state dict does not map onto XLSTMLarge: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}")
    for key, t in sd.items():
        if tuple(t.shape) != tuple(expected[key].shape):
            raise ValueError(f"{key}: official shape {tuple(t.shape)}, expected {tuple(expected[key].shape)}")
    ours.load_state_dict(sd, strict=True)
    p = next(model.parameters())
    return ours.to(device=p.device, dtype=dtype or p.dtype).eval()
