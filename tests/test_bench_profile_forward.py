"""bench/profile_forward.py's by-part attribution, on the CPU (operators' own time stands in for kernels)."""

import os
import sys

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))

from profile_forward import annotate_parts, part_times, saved_by_part  # noqa: E402
from hierarchos.config import tiny_config  # noqa: E402
from hierarchos.model.lm import HierarchosLM  # noqa: E402
from hierarchos.model.losses import lm_loss  # noqa: E402


def _profile(model, tokens, steps=2):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            out = model(tokens[:, :-1])
            lm_loss(out, tokens[:, 1:], 0.0)[0].backward()
    return prof.events()


def test_parts_cover_forward_and_backward_of_each_module():
    torch.manual_seed(0)
    model = HierarchosLM(tiny_config(use_rosa=False))
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 17))
    handles = annotate_parts(model)
    parts = part_times(_profile(model, tokens), 2, device=False)
    for label in ("memory", "manager stack", "worker stack", "head", "encoder", "hrm glue"):
        assert parts[label]["forward"] > 0, label
        assert parts[label]["backward"] > 0, label  # the backward found its forward operators' part
    assert parts["embeddings"]["forward"] > 0
    for h in handles:
        h.remove()
    assert not model.memory._forward_pre_hooks and not model.memory._forward_hooks


def test_backward_goes_to_the_part_that_made_the_node():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(64, 64)     # "embeddings" in PARTS
            self.memory = nn.Linear(64, 64)    # "memory"

    model = Two()
    x = torch.randn(256, 64, requires_grad=True)
    annotate_parts(model)

    def run():
        h = model.embed(x)
        for _ in range(20):  # the memory part does 20x the work, forward and backward
            h = torch.tanh(model.memory(h))
        h.sum().backward()

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    # counted in operator events, not time: on a loaded machine one preempted operator outweighed the
    # memory's 20x work (CI, once)
    parts = part_times(prof.events(), 1, device=False, count=True)
    assert parts["memory"]["backward"] > 10 * parts["embeddings"]["backward"] > 0
    assert parts["memory"]["forward"] > 10 * parts["embeddings"]["forward"] > 0
    assert "outside" in parts  # the sum and the loss's seed live outside every part
    timed = part_times(prof.events(), 1, device=False)
    assert timed["memory"]["forward"] > 0 and timed["memory"]["backward"] > 0  # (the times themselves)


def test_saved_tensors_are_counted_once_by_the_part_that_saved_them():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(64, 64)     # "embeddings"
            self.memory = nn.Linear(64, 64)    # "memory"

        def forward(self, x):
            y = self.embed(x)                  # the embed part saves x (its weight, a parameter, is not counted)
            h = torch.tanh(self.memory(y))     # the memory part saves y; tanh, outside it, saves h
            return (h * h).sum()               # saves h twice more: one storage, counted once

    model = Two()
    x = torch.randn(256, 64, requires_grad=True)
    groups = {}
    saved = saved_by_part(model, lambda: model(x), groups)
    one = 256 * 64 * 4 / 2**20
    assert saved == {"embeddings": one, "memory": one, "outside": one}
    assert groups == {f"{part} | float32 | (256, 64)": [1, one] for part in ("embeddings", "memory", "outside")}
    assert model.embed.weight.grad is not None  # the backward ran
    assert not model.memory._forward_hooks  # the hooks are gone
