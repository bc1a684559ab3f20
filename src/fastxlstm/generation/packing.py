"""Packed projections for decoding: fewer, larger matmuls per token, no extra memory.

    from fastxlstm.generation import pack_projections, unpack_projections
    pack_projections(model)      # in place; returns the number of layers packed
    unpack_projections(model)    # back to one storage per parameter

In the xLSTM-7B architecture (:class:`~fastxlstm.models.xlstm_large.XLSTMLarge`) each block projects the same input
six times in its mLSTM layer (q, k, v, output gate, input gate, forget gate) and twice in its FFN (gate, up). A
batch-1 decode step runs each as its own matrix-vector product: 8 launches per block, two of them tiny (E -> heads).
Packed, each group's weights are row blocks of ONE tensor and the layer computes the group with one matmul (two in
bf16/fp16, where the two gates stay a separate float32 product as always): ~190 fewer launches per token for the
32-block 7B. In the paper model (:class:`~fastxlstm.models.xlstm_lm.XLSTMLM`) the sLSTM-block FFN (the same
:class:`~fastxlstm.layers.ffn.GatedFFN`) is packed too, and the mLSTM layer's igate|fgate pair becomes one tensor
(which removes the two per-call concatenations of their weights and biases); its up-projection already is one
matmul and its q / k / v read different inputs (q, k the conv output, v the up-projection), so nothing else
changes there.

The transform is memory neutral and reversible: each parameter becomes a view of the packed tensor (names,
``state_dict``, checkpoints unchanged; ``save_pretrained`` writes ordinary separate tensors that an unpacked model
loads). ``.to(device / dtype)`` packs again; while autograd records gradients for the parameters the layers run the
separate projections (same gradients as unpacked: packing speeds up inference only). Details:
:mod:`fastxlstm.layers._packing`.

The CUDA-graph decoder (:mod:`fastxlstm.generation.graph`) packs a model before it captures a step, and the eager
loop packs an ``XLSTMLarge`` (its CPU decode step measured 1.2-1.8x faster at ``7b-tiny``, +5-13% at ``7b-160m``; the
paper presets showed no measurable change, so the eager loop leaves them as they are), unless the environment
variable ``FASTXLSTM_PACK=0`` is set. Packing stays with the model after ``generate`` returns; a model packed by
hand or by an earlier call stays packed under FASTXLSTM_PACK=0 too: use :func:`unpack_projections`.
"""
from __future__ import annotations

import os

from torch import nn

__all__ = ["pack_projections", "unpack_projections", "is_packed", "packing_default"]


def _packable(model: nn.Module):
    from ..layers._packing import PackableMixin
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return [m for m in model.modules() if isinstance(m, PackableMixin) and hasattr(m, "pack_projections")]


def pack_projections(model: nn.Module) -> int:
    """Pack every packable layer of ``model`` in place (already packed layers are kept). Returns how many layers
    are packed afterwards (0: nothing to pack, e.g. a paper model without sLSTM blocks)."""
    return sum(bool(m.pack_projections()) for m in _packable(model))


def unpack_projections(model: nn.Module) -> int:
    """Give every parameter of a packed layer its own storage again. Returns the number of layers unpacked."""
    n = 0
    for m in _packable(model):
        if m.packed_groups():
            n += 1
        m.unpack_groups()
    return n


def is_packed(model: nn.Module) -> bool:
    """True when at least one layer of ``model`` currently runs packed."""
    return any(m.packed_groups() for m in _packable(model))


def packing_default() -> bool:
    """Whether the CUDA-graph decoder packs: True unless FASTXLSTM_PACK is 0 / false / empty."""
    return os.environ.get("FASTXLSTM_PACK", "1") not in ("0", "", "false", "False")
