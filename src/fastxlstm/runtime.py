"""Where and how fast a command runs: the device (``--device``) and the CPU threads (``--threads``)."""
from __future__ import annotations

from typing import Optional

__all__ = ["pick_device"]


def pick_device(spec: Optional[str], local_rank: int = 0):
    """torch.device for ``--device`` (None/"auto": cuda:<local_rank> when CUDA is available, else the CPU)."""
    import torch
    if spec is None or spec == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"--device {spec!r} is not a device (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {spec}: CUDA is not available on this machine")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
        if dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise ValueError(f"--device {spec}: unsupported device type {dev.type}")
    return dev
