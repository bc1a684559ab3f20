"""Import models from the official ``xlstm`` package (NX-AI) into fastxlstm.

    from fastxlstm.interop.official import from_official
    ours = from_official(official_model)      # xlstm.xLSTMLMModel -> XLSTMLM, xlstm.xLSTMLarge -> XLSTMLarge

The official package is a test oracle here, nothing is imported from it at module import time. What the
conversion has to undo (read from the package's parameter layout, version 2.0.6):

- LayerNorm / per-head GroupNorm weights are stored as ``w - 1`` ("residual weight"); we read the effective weight
  through the modules' ``weight_proxy`` (1 + w).
- sLSTM layer: ``i, f, z, o = fgate(x_c), igate(x_c), zgate(x), ogate(x)``: the module named ``fgate`` feeds the
  input gate and ``igate`` the forget gate. Both read the conv output, so only the names are swapped.
- sLSTM recurrent kernel and bias live in a backend-specific internal layout; the cell's ``_*_int2ext`` methods give
  the backend-independent (NH, DH_in, 4, DH_out) / (NH, 4, DH) forms, which we permute to our (4, NH, DH, DH) /
  (4, NH, DH) with gates in the order (i, f, z, o).
- The gated FFN's ``proj_up`` is one matrix [gate; up] of 2F rows; we split it into ``proj_up_gate`` and ``proj_up``.
- The mLSTM cell's gates read [q; k; v] (q, k after the conv, v before), exactly like ours; its keys are scaled by
  1/sqrt(DH) instead of the queries (same output). The cell eps (1e-6) and norm eps (1e-5) are the same as ours.

The official mLSTM cell builds a causal mask of ``context_length``: run it on sequences no longer than that.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

__all__ = ["from_official", "config_from_official"]


def _is_official_large(model) -> bool:
    try:
        from xlstm.xlstm_large.model import xLSTMLarge
    except Exception:  # pragma: no cover - depends on the install
        return False
    return isinstance(model, xLSTMLarge)


def _weight(norm_module) -> torch.Tensor:
    """The effective multiplier of an official (Multi-head) LayerNorm (``weight_proxy`` = 1 + w when residual)."""
    if getattr(norm_module, "bias", None) is not None:
        raise ValueError(f"{type(norm_module).__name__} with a bias is not supported (the paper's norms have none)")
    w = norm_module.weight_proxy
    if w is None:  # no weight: the identity multiplier
        return torch.ones(norm_module.ndim)
    return w.detach()


def config_from_official(model):
    """The XLSTMLMConfig equivalent to an official ``xLSTMLMModel`` (ValueError for features we do not have)."""
    from ..models.xlstm_lm import XLSTMLMConfig
    cfg = model.config
    stack = model.xlstm_block_stack
    if not getattr(cfg, "add_post_blocks_norm", True):
        raise ValueError("official models without the post-blocks norm are not supported")
    blocks = list(stack.blocks)
    slstm_at = tuple(i for i, b in enumerate(cfg.block_map) if b == 1)
    m_cfg = cfg.mlstm_block.mlstm if cfg.mlstm_block is not None else None
    s_blk = cfg.slstm_block if slstm_at else None
    kw = dict(vocab_size=cfg.vocab_size, embedding_dim=cfg.embedding_dim, num_blocks=cfg.num_blocks,
              slstm_at=slstm_at, bias=bool(cfg.bias), tie_weights=bool(cfg.tie_weights),
              weight_decay_on_embedding=bool(getattr(cfg, "weight_decay_on_embedding", False)),
              ln_eps=float(blocks[0].xlstm_norm.eps))
    round_to = None
    if m_cfg is not None and len(slstm_at) < cfg.num_blocks:
        if not m_cfg.round_proj_up_dim_up:
            raise ValueError("official mLSTM configs that round the up-projection down are not supported")
        m_layer = blocks[[i for i in range(cfg.num_blocks) if i not in slstm_at][0]].xlstm
        round_to = m_cfg.round_proj_up_to_multiple_of
        kw.update(num_heads=m_cfg.num_heads, mlstm_proj_factor=float(m_cfg.proj_factor),
                  conv_kernel_size=m_cfg.conv1d_kernel_size, qkv_proj_blocksize=m_cfg.qkv_proj_blocksize,
                  group_norm_eps=float(m_layer.mlstm_cell.outnorm.eps))
    if s_blk is not None:
        s_cfg = s_blk.slstm
        s_layer = blocks[slstm_at[0]].xlstm
        if s_cfg.function != "slstm":
            raise ValueError(f"official sLSTM function {s_cfg.function!r} is not supported (only 'slstm')")
        if s_cfg.forward_clipval is not None:
            raise ValueError("official sLSTM forward_clipval is not supported")
        ff = s_blk.feedforward
        if ff is None:
            raise ValueError("official sLSTM blocks without a feed-forward are not supported")
        if ff.act_fn != "gelu" or ff.bias != bool(cfg.bias) or not ff.round_proj_up_dim_up:
            raise ValueError(f"official sLSTM feed-forward (act_fn={ff.act_fn!r}, bias={ff.bias}) is not supported: "
                             f"we implement a gated GELU FFN rounded up, with the stack's bias setting")
        if round_to is not None and ff.round_proj_up_to_multiple_of != round_to:
            raise ValueError("the mLSTM up-projection and the sLSTM FFN round to different multiples")
        round_to = ff.round_proj_up_to_multiple_of
        if "group_norm_eps" in kw and float(s_layer.group_norm.eps) != kw["group_norm_eps"]:
            raise ValueError("mLSTM and sLSTM group norms with different eps are not supported")
        kw.update(slstm_num_heads=s_cfg.num_heads, slstm_conv_kernel_size=s_cfg.conv1d_kernel_size,
                  ffn_proj_factor=float(ff.proj_factor), group_norm_eps=float(s_layer.group_norm.eps))
    if round_to is not None:
        kw["round_to"] = round_to
    return XLSTMLMConfig(**kw)


def _convert_state_dict(model, config) -> Dict[str, torch.Tensor]:
    sd: Dict[str, torch.Tensor] = {}
    sd["token_embedding.weight"] = model.token_embedding.weight.detach()
    sd["out_norm.weight"] = _weight(model.xlstm_block_stack.post_blocks_norm)
    if not config.tie_weights:
        sd["lm_head.weight"] = model.lm_head.weight.detach()
    else:
        sd["lm_head.weight"] = sd["token_embedding.weight"]

    def lin(prefix, module):
        sd[prefix + ".weight"] = module.weight.detach()
        if module.bias is not None:
            sd[prefix + ".bias"] = module.bias.detach()

    for idx, (blk, kind) in enumerate(zip(model.xlstm_block_stack.blocks, config.block_types)):
        p = f"blocks.{idx}"
        sd[p + ".norm.weight"] = _weight(blk.xlstm_norm)
        layer = blk.xlstm
        if kind == "m":
            if type(layer).__name__ != "mLSTMLayer":
                raise ValueError(f"block {idx} should be an mLSTM layer, found {type(layer).__name__}")
            if layer.config._inner_embedding_dim != config.inner_dim:
                raise ValueError(f"block {idx}: official inner dim {layer.config._inner_embedding_dim} != "
                                 f"{config.inner_dim}")
            q = p + ".layer"
            lin(q + ".proj_up", layer.proj_up)
            lin(q + ".conv1d", layer.conv1d.conv)
            for name in ("q_proj", "k_proj", "v_proj"):
                lin(f"{q}.{name}", getattr(layer, name))
            lin(q + ".igate", layer.mlstm_cell.igate)
            lin(q + ".fgate", layer.mlstm_cell.fgate)
            sd[q + ".outnorm.weight"] = _weight(layer.mlstm_cell.outnorm)
            sd[q + ".learnable_skip"] = layer.learnable_skip.detach()
            lin(q + ".proj_down", layer.proj_down)
        else:
            if type(layer).__name__ != "sLSTMLayer":
                raise ValueError(f"block {idx} should be an sLSTM layer, found {type(layer).__name__}")
            q = p + ".layer"
            if config.slstm_conv_kernel_size > 0:
                lin(q + ".conv1d", layer.conv1d.conv)
            # the official layer feeds fgate(x_c) into the input gate and igate(x_c) into the forget gate
            sd[q + ".igate.weight"] = layer.fgate.weight.detach()
            sd[q + ".fgate.weight"] = layer.igate.weight.detach()
            sd[q + ".zgate.weight"] = layer.zgate.weight.detach()
            sd[q + ".ogate.weight"] = layer.ogate.weight.detach()
            cell = layer.slstm_cell
            R_ext = cell._recurrent_kernel_int2ext(cell._recurrent_kernel_.detach())  # (NH, DH_in, 4, DH_out)
            b_ext = cell._bias_int2ext(cell._bias_.detach())  # (NH, 4, DH)
            sd[q + ".recurrent_kernel"] = R_ext.permute(2, 0, 1, 3).contiguous()
            sd[q + ".gate_bias"] = b_ext.permute(1, 0, 2).contiguous()
            sd[q + ".group_norm.weight"] = _weight(layer.group_norm)
            sd[p + ".ffn_norm.weight"] = _weight(blk.ffn_norm)
            F_dim = blk.ffn.config._proj_up_dim
            if F_dim != config.ffn_dim:
                raise ValueError(f"block {idx}: official FFN width {F_dim} != {config.ffn_dim}")
            up_w = blk.ffn.proj_up.weight.detach()
            sd[p + ".ffn.proj_up_gate.weight"] = up_w[:F_dim]
            sd[p + ".ffn.proj_up.weight"] = up_w[F_dim:]
            if blk.ffn.proj_up.bias is not None:
                sd[p + ".ffn.proj_up_gate.bias"] = blk.ffn.proj_up.bias.detach()[:F_dim]
                sd[p + ".ffn.proj_up.bias"] = blk.ffn.proj_up.bias.detach()[F_dim:]
            lin(p + ".ffn.proj_down", blk.ffn.proj_down)
    return sd


@torch.no_grad()
def from_official(model: nn.Module, **config_overrides):
    """Convert an official ``xlstm.xLSTMLMModel`` (mLSTM and sLSTM blocks, any sLSTM backend) into an
    :class:`~fastxlstm.models.xlstm_lm.XLSTMLM` computing the same logits, or an official ``xlstm.xLSTMLarge``
    into an :class:`~fastxlstm.models.xlstm_large.XLSTMLarge` (via ``fastxlstm.interop.official_large``).

    The result has the official model's parameter dtype and device, and is in eval mode. Dropout settings of the
    official config are not carried over (we have no dropout). ``config_overrides`` set fields of our config that
    do not change the weights (e.g. ``chunk_size=16``, ``mlstm_backend="reference"``).
    """
    if _is_official_large(model):
        from .official_large import convert_large
        if config_overrides:
            raise ValueError("config overrides are only supported for xLSTMLMModel; convert the xLSTMLarge first")
        return convert_large(model)
    if not (hasattr(model, "xlstm_block_stack") and hasattr(model, "token_embedding") and hasattr(model, "config")):
        raise ValueError(f"from_official needs an xlstm.xLSTMLMModel or xlstm.xLSTMLarge, got {type(model).__name__}")
    from ..models.xlstm_lm import XLSTMLM
    config = config_from_official(model)
    if config_overrides:
        from dataclasses import replace
        allowed = {"chunk_size", "mlstm_backend", "slstm_backend", "cell_eps", "weight_decay_on_embedding"}
        bad = sorted(set(config_overrides) - allowed)
        if bad:
            raise ValueError(f"from_official can only override {sorted(allowed)}, got {bad}")
        config = replace(config, **config_overrides)
    ref = model.token_embedding.weight
    with torch.device("meta"):
        ours = XLSTMLM(config)
    sd = _convert_state_dict(model, config)
    expected = set(ours.state_dict().keys())
    missing, unexpected = expected - set(sd), set(sd) - expected
    if missing or unexpected:
        raise ValueError(f"official model does not map onto XLSTMLM: missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}")
    for name, t in ours.state_dict().items():
        if tuple(sd[name].shape) != tuple(t.shape):
            raise ValueError(f"{name}: official shape {tuple(sd[name].shape)} != ours {tuple(t.shape)}")
    ours = ours.to_empty(device=ref.device).to(ref.dtype)
    if config.tie_weights:  # to_empty re-creates parameters: tie again
        ours.lm_head.weight = ours.token_embedding.weight
    ours.load_state_dict({k: v.to(ref.dtype) for k, v in sd.items()}, strict=True)
    return ours.eval()
