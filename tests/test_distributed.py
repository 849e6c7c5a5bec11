"""Two gloo processes under DDP compute the same averaged gradients as one process on the global batch."""

from __future__ import annotations

import os
import random
import socket

import torch
import torch.multiprocessing as mp

from hierarchos.config import tiny_config
from hierarchos.model import HierarchosLM
from hierarchos.model.losses import lm_loss
from hierarchos.train.distributed import DistInfo, shard_rows, wrap_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 16, (4, 13), generator=g)


def _model(seed):
    torch.manual_seed(seed)
    return HierarchosLM(tiny_config(vocab_size=16))


def _grads(model, tokens, forward):
    out = forward(tokens[:, :-1])
    loss, _ = lm_loss(out, tokens[:, 1:], model.cfg.z_loss_weight)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _worker(rank, world, port, seed, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        info = DistInfo(rank, world, rank)
        model = _model(seed)
        ddp = wrap_model(model, info, torch.device("cpu"))
        grads = _grads(model, shard_rows(_batch(seed), info), ddp)
        if rank == 0:
            from safetensors.torch import save_file

            save_file(grads, os.path.join(out_dir, "ddp.safetensors"))
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_gradients_equal_single_process(tmp_path):
    seed = random.SystemRandom().randrange(2**31)
    mp.spawn(_worker, args=(2, _free_port(), seed, str(tmp_path)), nprocs=2, join=True)
    from safetensors.torch import load_file

    ddp = load_file(str(tmp_path / "ddp.safetensors"))
    model = _model(seed)
    single = _grads(model, _batch(seed), model)
    assert ddp.keys() == single.keys(), f"seed={seed}"
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"seed={seed} {name}: {m}")
