"""The xLSTM cells as functions (no nn.Module here).

    from fastxlstm.ops import mlstm, mlstm_step, slstm

``dispatch.py`` holds these entry points (validation and the choice of backend); the forms live one file each in
``mlstm_forms/`` (reference, parallel, chunkwise, recurrent, triton/) and ``slstm_forms/``. See docs/MATH.md for
the equations every form implements.
"""
from __future__ import annotations

from .dispatch import (MLSTM_BACKENDS, SLSTM_BACKENDS, mlstm, mlstm_step, slstm, triton_available)

__all__ = ["mlstm", "mlstm_step", "slstm", "MLSTM_BACKENDS", "SLSTM_BACKENDS", "triton_available"]
