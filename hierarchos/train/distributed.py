"""Multi-process training under `torchrun`: process group, DDP wrapping, stream sharding.

Under `torchrun --nproc_per_node=N` every rank builds the same streams (global batch =
N x batch_size streams) and keeps rows rank, rank+N, ...: the data-parallel equivalent of
a distributed sampler for stream batching. Gradients are averaged by DDP, so N ranks on the
global batch compute the same update as one process would; only rank 0 logs and saves.
"""

from __future__ import annotations

import atexit
import os
import socket
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


def _loopback_interface() -> str | None:
    """The loopback interface's name ("lo" on Linux, "lo0" on macOS), or None where none is listed."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except (OSError, AttributeError):  # Windows has no if_nameindex before 3.8 and gloo uses libuv there
        return None
    return next((n for n in names if n == "lo" or n.startswith("lo0")), None)


def _pin_single_node_gloo_to_loopback(world: int) -> None:
    """Gloo picks the interface its peers connect to from the hostname's address. A one-node run
    needs nothing but loopback, and pinning it there removes the hostname lookup and any interface
    a sandbox does not route from the picture (a CI run once hung inside a gloo test until CI's
    limit; the cause was not reproduced here). A user's GLOO_SOCKET_IFNAME wins."""
    if "GLOO_SOCKET_IFNAME" in os.environ or int(os.environ.get("LOCAL_WORLD_SIZE", "0")) != world:
        return
    loopback = _loopback_interface()
    if loopback:
        os.environ["GLOO_SOCKET_IFNAME"] = loopback


def init_from_env(device_type: str) -> DistInfo:
    """Join the process group torchrun describes in the environment (no-op for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if backend == "gloo":
            _pin_single_node_gloo_to_loopback(world)
        dist.init_process_group(backend=backend)
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


# ---- FSDP2: full state dicts for checkpoints -----------------------------------------------------
# Under `fully_shard` every parameter is a DTensor holding this rank's shard. Checkpoints and model
# directories stay the plain, unsharded format of a single-process run: every rank takes part in
# gathering (a collective), rank 0 writes, and loading hands each rank the full tensors to re-shard.
# Optimizer states are re-keyed from parameter names (what torch's helpers use) to the integer
# positions a plain `optimizer.state_dict()` has, so checkpoints move between FSDP, DDP and one process.

def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, **kw)


def _names_in_order(model: torch.nn.Module, optimizer) -> list[list[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]


def full_model_state(model: torch.nn.Module) -> dict:
    """Unsharded state dict on CPU (complete on rank 0). Collective: call on every rank."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return get_model_state_dict(model, options=_options(cpu_offload=True))


def full_optimizer_state(model: torch.nn.Module, optimizers) -> dict:
    """{str(i): plain state dict} for each optimizer of an OptimizerSet, unsharded (rank 0). Collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    out = {}
    for i, opt in enumerate(optimizers.optimizers):
        by_name = get_optimizer_state_dict(model, opt, options=_options(cpu_offload=True))
        order = _names_in_order(model, opt)
        flat = [n for group in order for n in group]
        index = {n: j for j, n in enumerate(flat)}
        groups = []
        for group, names in zip(by_name.get("param_groups", []), order):
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": [index[n] for n in names]})
        out[str(i)] = {"state": {index[n]: s for n, s in by_name.get("state", {}).items() if n in index},
                       "param_groups": groups}
    return out


def load_full_model_state(model: torch.nn.Module, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict
    set_model_state_dict(model, state, options=_options())


def load_full_optimizer_state(model: torch.nn.Module, optimizers, state: dict) -> None:
    """Inverse of `full_optimizer_state`: every rank passes the full dict, each keeps its shard."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    if set(state) != {str(i) for i in range(len(optimizers.optimizers))}:
        raise ValueError(f"expected {len(optimizers.optimizers)} optimizer states, found {sorted(state)}")
    for i, opt in enumerate(optimizers.optimizers):
        plain = state[str(i)]
        flat = [n for group in _names_in_order(model, opt) for n in group]
        by_name = {"state": {flat[int(j)]: s for j, s in plain["state"].items()},
                   "param_groups": [{**{k: v for k, v in g.items() if k != "params"},
                                     "params": [flat[int(j)] for j in g["params"]]} for g in plain["param_groups"]]}
        set_optimizer_state_dict(model, opt, by_name, options=_options())
