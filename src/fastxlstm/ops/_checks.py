"""Input validation shared by the ops: every bad input gets a ValueError that names the argument."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, x, ndim: int, dtypes: Sequence[torch.dtype] = _FLOAT_DTYPES) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if x.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {x.dtype}; expected one of {[str(d) for d in dtypes]}")
    return x


def values_readable(x: torch.Tensor) -> bool:
    """Whether the host may read ``x``'s values now (a value check's ``.tolist()``): not inside torch.compile (it
    would split the graph) nor while a CUDA graph is being captured (a device-to-host copy is not allowed there;
    fastxlstm.train.graphs captures training steps)."""
    if torch.compiler.is_compiling():
        return False
    return not (x.is_cuda and torch.cuda.is_current_stream_capturing())


def check_shape(name: str, x: torch.Tensor, shape: Sequence[int], what: str = "") -> None:
    if tuple(x.shape) != tuple(shape):
        extra = f" ({what})" if what else ""
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)}{extra}")


def check_same_device(**tensors: Optional[torch.Tensor]) -> torch.device:
    device = None
    first = None
    for name, t in tensors.items():
        if t is None:
            continue
        if device is None:
            device, first = t.device, name
        elif t.device != device:
            raise ValueError(f"{name} is on {t.device} but {first} is on {device}: all inputs must share a device")
    return device


def check_same_dtype(**tensors: Optional[torch.Tensor]) -> torch.dtype:
    dtype = None
    first = None
    for name, t in tensors.items():
        if t is None:
            continue
        if dtype is None:
            dtype, first = t.dtype, name
        elif t.dtype != dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but {first} has dtype {dtype}: they must match")
    return dtype


def exp_floor(m: torch.Tensor) -> torch.Tensor:
    """exp(-m), the normaliser's lower bound in stabilised space, kept >= the smallest normal number of m's dtype:
    where exp(-m) underflows (m > ~87 in float32) a zero denominator (q_t = 0, or a padded token) would otherwise
    give 0 / 0 with eps = 0 (docs/MATH.md, "eps")."""
    return torch.exp(-m).clamp_min(torch.finfo(m.dtype).tiny)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """States and accumulations are at least float32; float64 inputs stay float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32
