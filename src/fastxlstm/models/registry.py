"""The one model registry: ``model_type`` (the string in config.json) -> (config class, model class).

Every place that turns a model_type or a config into a class goes through here: checkpoint loading
(:mod:`fastxlstm.models.io`), :func:`fastxlstm.models.presets.build_model` and the training checkpoints' model
config (:func:`config_from_dict`). A new architecture is one entry in ``MODEL_REGISTRY``.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple, Type

from .xlstm_large import XLSTMLarge, XLSTMLargeConfig
from .xlstm_lm import XLSTMLM, XLSTMLMConfig

__all__ = ["MODEL_REGISTRY", "model_types", "classes_for", "config_from_dict", "model_class_for", "build_from_config"]

MODEL_REGISTRY: Dict[str, Tuple[type, type]] = {
    XLSTMLargeConfig.model_type: (XLSTMLargeConfig, XLSTMLarge),  # "xlstm": the 7B architecture (transformers')
    XLSTMLMConfig.model_type: (XLSTMLMConfig, XLSTMLM),  # "xlstm_lm": the paper's mLSTM/sLSTM stack
}


def model_types() -> list:
    """The known model_type strings, sorted."""
    return sorted(MODEL_REGISTRY)


def classes_for(model_type: Any) -> Tuple[type, type]:
    """(config class, model class) of ``model_type``; ValueError naming the known ones otherwise."""
    if not isinstance(model_type, str) or model_type not in MODEL_REGISTRY:
        raise ValueError(f"model_type {model_type!r} is not one of {model_types()}")
    return MODEL_REGISTRY[model_type]


def config_from_dict(d: Dict[str, Any]):
    """A config from its ``to_dict()`` (the ``model_type`` key picks the class); ValueError for a non-dict, an
    unknown model_type or bad fields."""
    if not isinstance(d, dict):
        raise ValueError(f"config must be a dict, got {type(d).__name__}")
    config_cls, _ = classes_for(d.get("model_type"))
    return config_cls.from_dict(d)


def model_class_for(config: Any) -> Type:
    """The model class for a config object (by its config class)."""
    for config_cls, model_cls in MODEL_REGISTRY.values():
        if isinstance(config, config_cls):
            return model_cls
    names = ", ".join(c.__name__ for c, _ in MODEL_REGISTRY.values())
    raise ValueError(f"config must be one of {names}, got {type(config).__name__}")


def build_from_config(config: Any):
    """The model for a config object (parameters on the current default device)."""
    return model_class_for(config)(config)
