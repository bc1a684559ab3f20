"""What the model configs share: JSON round trips and small predicates for validation."""
from __future__ import annotations

import math
from dataclasses import asdict, fields
from typing import Any, ClassVar, Dict


def is_int(x) -> bool:
    """An int that is not a bool (``True`` is not a valid head count)."""
    return isinstance(x, int) and not isinstance(x, bool)


def is_num(x) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class ConfigDictMixin:
    """``to_dict`` / ``from_dict`` for a config dataclass with a class attribute ``model_type``.

    ``to_dict`` is JSON-ready (tuples become lists) and records ``model_type``; ``from_dict`` accepts exactly the
    class's fields plus an optional matching ``model_type`` and raises ValueError for anything else.
    """

    model_type: ClassVar[str]

    def to_dict(self) -> Dict[str, Any]:
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        d["model_type"] = self.model_type
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]):
        if not isinstance(d, dict):
            raise ValueError(f"config must be a dict, got {type(d).__name__}")
        d = dict(d)
        mt = d.pop("model_type", cls.model_type)
        if mt != cls.model_type:
            raise ValueError(f"config model_type is {mt!r}, expected {cls.model_type!r}")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {unknown}")
        return cls(**d)
