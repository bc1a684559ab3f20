"""fastxlstm: xLSTM (mLSTM and sLSTM) in PyTorch, with Triton kernels for the GPU.

The public surface is small:

- ``fastxlstm.ops``: ``mlstm``, ``mlstm_step``, ``slstm`` (the cells as functions, several backends).
- models, configs, ``from_pretrained`` (a model, run or checkpoint directory), ``load_tokenizer`` and
  ``from_official`` (imported lazily, so ``import fastxlstm`` stays light; ``dir(fastxlstm)`` lists them).
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    # name: (module, attribute)
    "XLSTMLMConfig": ("fastxlstm.models.xlstm_lm", "XLSTMLMConfig"),
    "XLSTMLM": ("fastxlstm.models.xlstm_lm", "XLSTMLM"),
    "XLSTMLargeConfig": ("fastxlstm.models.xlstm_large", "XLSTMLargeConfig"),
    "XLSTMLarge": ("fastxlstm.models.xlstm_large", "XLSTMLarge"),
    "XLSTMState": ("fastxlstm.layers.state", "XLSTMState"),
    "MLSTMBlockState": ("fastxlstm.layers.state", "MLSTMBlockState"),
    "SLSTMBlockState": ("fastxlstm.layers.state", "SLSTMBlockState"),
    "CausalLMOutput": ("fastxlstm.models.output", "CausalLMOutput"),
    "build_model": ("fastxlstm.models.presets", "build_model"),
    "get_preset": ("fastxlstm.models.presets", "get_preset"),
    "list_presets": ("fastxlstm.models.presets", "list_presets"),
    "from_pretrained": ("fastxlstm.loading", "from_pretrained"),
    "load_tokenizer": ("fastxlstm.loading", "load_tokenizer_for"),
    "from_official": ("fastxlstm.interop.official", "from_official"),
}

__all__ = ["__version__", "ops", *_LAZY]


def __getattr__(name):
    if name == "ops":
        import importlib
        return importlib.import_module("fastxlstm.ops")
    if name in _LAZY:
        import importlib
        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'fastxlstm' has no attribute {name!r}")


def __dir__():
    """The public names, the lazily imported ones included (they are not in the module's namespace yet)."""
    return sorted(set(__all__) | {n for n in globals() if n.startswith("__")})
