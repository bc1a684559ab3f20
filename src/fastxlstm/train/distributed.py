"""torchrun support through PyTorch's own stack: DDP by default, FSDP2 (``fully_shard``) with ``--fsdp``.

Only rank 0 logs and writes files; data is sharded by rank inside each global batch (see data/loader.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..runtime import pick_device

__all__ = ["DistInfo", "init_distributed", "wrap_model", "all_reduce_sum", "broadcast_str", "barrier", "shutdown"]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device_spec: Optional[str]) -> DistInfo:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and start the process group (NCCL on CUDA,
    gloo on CPU). A plain ``python -m fastxlstm`` run is world size 1 with no process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_spec, local_rank)
    if world <= 1:
        return DistInfo(0, 1, 0, device, False)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    created = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
        created = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, created)


def wrap_model(model: torch.nn.Module, info: DistInfo, fsdp: bool) -> torch.nn.Module:
    """DDP (default) or FSDP2 under torchrun; the model itself when single-process.

    FSDP2 shards each block and then the root, in place, so ``model`` stays the module whose state dict the
    checkpoint code gathers; DDP returns a wrapper around it."""
    if not info.distributed:
        if fsdp:
            raise ValueError("--fsdp needs several processes: start with torchrun --nproc-per-node N")
        return model
    if fsdp:
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch < 2.6
            from torch.distributed._composable.fsdp import fully_shard  # type: ignore
        blocks = getattr(model, "blocks", None)
        if blocks is None:
            backbone = getattr(model, "backbone", None)
            blocks = getattr(backbone, "blocks", None)
        for blk in (blocks or []):
            fully_shard(blk)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    if info.device.type == "cuda":
        return DDP(model, device_ids=[info.device.index], output_device=info.device.index)
    return DDP(model)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_str(s: Optional[str], info: DistInfo) -> Optional[str]:
    """Rank 0's string on every rank (e.g. the run directory named by rank 0's clock)."""
    if not info.distributed:
        return s
    # a byte tensor rather than broadcast_object_list, which pickles
    dev = info.device if info.device.type == "cuda" else torch.device("cpu")
    data = (s or "").encode("utf-8") if info.rank == 0 else b""
    n = torch.tensor([len(data), int(s is None)], dtype=torch.int64, device=dev)
    dist.broadcast(n, src=0)
    buf = torch.zeros(int(n[0]), dtype=torch.uint8, device=dev)
    if info.rank == 0 and data:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    if int(n[0]):
        dist.broadcast(buf, src=0)
    return None if int(n[1]) else bytes(buf.cpu().tolist()).decode("utf-8")


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()
