"""Multi-process training under `torchrun`: process group, DDP wrapping, stream sharding.

Under `torchrun --nproc_per_node=N` every rank builds the same streams (global batch =
N x batch_size streams) and keeps rows rank, rank+N, ...: the data-parallel equivalent of
a distributed sampler for stream batching. Gradients are averaged by DDP, so N ranks on the
global batch compute the same update as one process would; only rank 0 logs and saves.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _leave_process_group() -> None:
    """Tear the group down at exit (NCCL warns about leaked resources otherwise)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def init_from_env(device_type: str) -> DistInfo:
    """Join the process group torchrun describes in the environment (no-op for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        atexit.register(_leave_process_group)
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    return info


def shard_rows(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """This rank's streams: rows rank, rank + world_size, ..."""
    return tensor[info.rank::info.world_size] if info.enabled else tensor


def wrap_model(model: torch.nn.Module, info: DistInfo, device: torch.device, fsdp: bool = False):
    """The module to call for forward passes: DDP (or FSDP2 `fully_shard`) when distributed."""
    if not info.enabled:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for stack in (model.reasoner.manager, model.reasoner.worker):
            for block in stack.blocks:
                fully_shard(block)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel

    # a window may leave some parameters without a gradient (the drift head without worker
    # shadow passes, the memory's write gates in a window with no write before a read)
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def all_reduce_mean(value: float, info: DistInfo) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / info.world_size
