"""Sampling one token on the CPU in one C++ call (kernels/sampling.cpp): the repetition penalty, the
temperature, top-k, top-p, the counter-based noise and the pick, for `hierarchos.generate.sample_next`
with the noise chat's loop uses (`RowNoiseAt`). In torch these are ~35 ops, ~1.2 ms of a CPU chat token
at a 50k vocabulary (BENCHMARKS.md, issue 17); sample_next keeps them as the reference and the fallback
(no kernel, another device, NaN logits, greedy). The vocabulary-wide part is torch's float32 arithmetic
bit for bit; the few candidates' exp and log are the C library's (tests/test_sync_free_step.py)."""

from __future__ import annotations

import importlib

import torch

try:  # the extension itself: a float model's chat must not announce the quantized kernel's absence
    _sample_token = getattr(importlib.import_module("hierarchos.hierarchos_kernels"), "sample_token", None)
except ImportError:
    _sample_token = None


def available() -> bool:
    return _sample_token is not None


def sample_token(logits: torch.Tensor, seen: torch.Tensor | None, penalty: float, temperature: float, top_k: int,
                 top_p: float, seed: int, counter: int) -> int | None:
    """The token sample_next picks for CPU float32 logits (V,) with the ids `seen` ((V,) bool, or None)
    and the noise of (seed, counter), or None where the kernel does not apply (the caller runs torch)."""
    if (_sample_token is None or logits.device.type != "cpu" or logits.dtype != torch.float32
            or logits.dim() != 1 or not temperature > 0):
        return None
    if seen is not None and (seen.device.type != "cpu" or seen.dtype != torch.bool or seen.shape != logits.shape):
        return None
    token = _sample_token(logits.detach().numpy(), None if seen is None else seen.numpy(), penalty, temperature,
                          max(0, top_k), top_p, seed, counter)
    return None if token < 0 else token
