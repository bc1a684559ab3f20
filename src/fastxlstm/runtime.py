"""Where and how fast a command runs: the device (``--device``) and the CPU threads (``--threads``)."""
from __future__ import annotations

import os
import sys
from typing import Optional

__all__ = ["pick_device", "configure_cpu", "auto_threads", "available_cores"]


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


def available_cores() -> int:
    """The CPUs this process may run on (its affinity mask, e.g. under taskset or a container quota)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _busy_cores_now(window_s: float = 0.25) -> Optional[float]:
    """Cores kept busy by other processes right now: the machine's CPU use over ``window_s`` seconds (Linux
    /proc/stat), or None where that cannot be read. Unlike the load average it does not remember the last minute
    (a pip install just before a run would otherwise cost it its second core for the whole run)."""
    import time

    def sample():
        with open("/proc/stat", encoding="ascii") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return sum(vals), idle

    try:
        t0, i0 = sample()
        time.sleep(window_s)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if t1 <= t0:
        return None
    return (1.0 - (i1 - i0) / (t1 - t0)) * (os.cpu_count() or 1)


def auto_threads() -> int:
    """A thread count that degrades gracefully on a shared CPU: the allowed cores minus those other processes keep
    busy right now (measured over a quarter of a second; the 1-minute load average where /proc/stat is missing),
    at least 1. On an idle machine: every allowed core."""
    cores = available_cores()
    busy = _busy_cores_now()
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except (AttributeError, OSError):
            busy = 0.0
    return max(1, min(cores, cores - int(busy + 0.5)))


def configure_cpu(threads: Optional[int] = None) -> int:
    """Set the CPU thread count and the OpenMP wait policy; returns the thread count.

    OpenMP threads spin while they wait for each other by default: with another busy process on the same cores
    a spinning thread takes the time the working one needs, and a run can be 10-20x slower. PASSIVE waiting
    (threads sleep) costs a few per cent on an idle machine and removes that cliff. The policy is read once, when
    torch loads its OpenMP runtime, so call this BEFORE ``import torch`` (the CLI does); afterwards only the
    thread count can still change. An explicit OMP_WAIT_POLICY / OMP_NUM_THREADS in the environment wins.

    threads: None or 0 for :func:`auto_threads`, else that many. Results can differ in the last bits between
    thread counts: pass the same explicit count to reproduce a run bit for bit on another load."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if threads is not None and threads < 0:
        raise ValueError(f"threads must be >= 0, got {threads}")
    if threads:
        n = int(threads)
    elif os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        n = int(os.environ["OMP_NUM_THREADS"])
    else:
        n = auto_threads()
    if "torch" in sys.modules:
        # torch is running already (a library user, a test): only an explicit count changes it
        import torch
        if threads:
            torch.set_num_threads(n)
        else:
            n = torch.get_num_threads()
    else:
        os.environ["OMP_NUM_THREADS"] = str(n)
        os.environ.setdefault("MKL_NUM_THREADS", str(n))
    return n
