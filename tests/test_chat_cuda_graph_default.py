"""Whether `chat` steps through a CUDA graph when the user does not say: on exactly where capture
works (a full-precision model on CUDA whose state has a fixed size), off elsewhere; an explicit
--cuda-graph / --no-cuda-graph always wins (hierarchos.cli.chat.resolve_cuda_graph)."""

from __future__ import annotations

import pytest
import torch

from hierarchos.cli.chat import add_arguments, resolve_cuda_graph
from hierarchos.config import tiny_config

RWKV = tiny_config()
FULL_ATTENTION = tiny_config(h_block="attention", l_block="attention")
WINDOWED = tiny_config(h_block="attention", l_block="attention", window_size=8)
MIXED_FULL = tiny_config(l_block="attention")


@pytest.mark.parametrize("device,cfg,expected", [
    ("cuda", RWKV, True), ("cuda", WINDOWED, True), ("cuda", FULL_ATTENTION, False), ("cuda", MIXED_FULL, False),
    ("cpu", RWKV, False), ("cpu", WINDOWED, False), ("meta", RWKV, False)])
def test_default_is_on_exactly_where_capture_works(device, cfg, expected):
    assert resolve_cuda_graph(None, torch.device(device), cfg) is expected


@pytest.mark.parametrize("requested", [True, False])
@pytest.mark.parametrize("device,cfg", [("cuda", RWKV), ("cpu", RWKV), ("cuda", FULL_ATTENTION)])
def test_an_explicit_flag_wins(requested, device, cfg):
    assert resolve_cuda_graph(requested, torch.device(device), cfg) is requested


@pytest.mark.parametrize("argv,expected", [([], None), (["--cuda-graph"], True), (["--no-cuda-graph"], False),
                                           (["--cuda_graph"], True)])
def test_the_flag_parses_to_three_states(argv, expected):
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert p.parse_args(["--model-path", "m", *argv]).cuda_graph is expected
