"""Small predicates for config validation (bools are not numbers here: ``True`` is not a valid head count)."""
from __future__ import annotations

import math


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
