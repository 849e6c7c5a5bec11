"""Whether `chat` steps through a CUDA graph when the user does not say: on exactly where capture
works (a full-precision model on CUDA whose state has a fixed size), off elsewhere; an explicit
--cuda-graph / --no-cuda-graph always wins (hierarchos.cli.chat.resolve_cuda_graph). The same for
the fused one-token time mix inside that graph (resolve_fused_step): on wherever the step is
captured on CUDA with Triton installed; asking for it without the graph is one line
(tests/test_chat_compile_step.py)."""

from __future__ import annotations

import pytest
import torch

from hierarchos.cli.chat import (add_arguments, resolve_compile_prefill, resolve_compile_step, resolve_cuda_graph,
                                 resolve_fused_step, resolve_tf32)
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


# ---- the fused one-token time mix inside the captured step (resolve_fused_step) ----------------------

@pytest.mark.parametrize("resolve", [resolve_fused_step, resolve_compile_prefill])
@pytest.mark.parametrize("cuda_graph,device,triton_reason,expected", [
    (True, "cuda", "", True), (True, "cuda", "triton does not import (x); pip install triton", False),
    (False, "cuda", "", False), (False, "cpu", "", False), (True, "cpu", "", False)])
def test_the_fused_step_and_compiled_prefill_are_on_wherever_the_captured_step_runs_on_cuda_with_triton(
        monkeypatch, resolve, cuda_graph, device, triton_reason, expected):
    from hierarchos.ops import wkv_triton

    monkeypatch.setattr(wkv_triton, "triton_unavailable_reason", lambda device=None: triton_reason)
    assert resolve(None, cuda_graph, torch.device(device)) is expected


@pytest.mark.parametrize("requested", [True, False])
def test_an_explicit_fused_step_flag_wins(requested):
    assert resolve_fused_step(requested, False, torch.device("cpu")) is requested


@pytest.mark.parametrize("argv,expected", [([], None), (["--fused-step"], True), (["--no-fused-step"], False)])
def test_the_fused_step_flag_parses_to_three_states(argv, expected):
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert p.parse_args(["--model-path", "m", *argv]).fused_step is expected



# ---- TF32 for float32 matmuls on CUDA (resolve_tf32) ---------------------------------------------------

@pytest.mark.parametrize("requested,device,expected", [
    (None, "cuda", True), (None, "cpu", False), (False, "cuda", False), (True, "cuda", True), (False, "cpu", False)])
def test_tf32_is_on_for_cuda_unless_turned_off(requested, device, expected):
    assert resolve_tf32(requested, torch.device(device)) is expected


def test_asking_for_tf32_off_cuda_is_a_one_line_error():
    from hierarchos.errors import HierarchosError

    with pytest.raises(HierarchosError, match=r"^--tf32 applies to CUDA matmuls \(the model runs on cpu\); drop the flag$"):
        resolve_tf32(True, torch.device("cpu"))


@pytest.mark.parametrize("argv,expected", [([], None), (["--tf32"], True), (["--no-tf32"], False)])
def test_the_tf32_flag_parses_to_three_states(argv, expected):
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert p.parse_args(["--model-path", "m", *argv]).tf32 is expected


# ---- compiled blocks inside the captured step (resolve_compile_step) --------------------------------------

@pytest.mark.parametrize("cuda_graph,device,triton_reason,expected", [
    (True, "cuda", "", "blocks"), (True, "cuda", "triton does not import (x); pip install triton", "off"),
    (False, "cuda", "", "off"), (False, "cpu", "", "off"), (True, "cpu", "", "off")])
def test_compiled_blocks_are_on_wherever_the_captured_step_runs_on_cuda_with_triton(monkeypatch, cuda_graph, device,
                                                                                     triton_reason, expected):
    from hierarchos.ops import wkv_triton

    monkeypatch.setattr(wkv_triton, "triton_unavailable_reason", lambda device=None: triton_reason)
    assert resolve_compile_step(None, cuda_graph, torch.device(device)) == expected


@pytest.mark.parametrize("requested", ["off", "step", "blocks"])
def test_an_explicit_compile_step_wins(requested):
    assert resolve_compile_step(requested, True, torch.device("cuda")) == requested


def test_compile_step_is_unset_unless_given():
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert p.parse_args(["--model-path", "m"]).compile_step is None
    assert p.parse_args(["--model-path", "m", "--compile-step", "off"]).compile_step == "off"


# ---- compiled blocks inside the prompt's chunk graphs (resolve_compile_prefill) ----------------------------

@pytest.mark.parametrize("requested", [True, False])
@pytest.mark.parametrize("argv_flag", ["--compile-prefill", "--no-compile-prefill"])
def test_the_compile_prefill_flag_parses_to_three_states_and_wins(requested, argv_flag):
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert p.parse_args(["--model-path", "m"]).compile_prefill is None
    assert p.parse_args(["--model-path", "m", argv_flag]).compile_prefill is (argv_flag == "--compile-prefill")
    assert resolve_compile_prefill(requested, False, torch.device("cpu")) is requested
