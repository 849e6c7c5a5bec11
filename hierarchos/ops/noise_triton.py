"""The sampler's counter-based noise for a whole vocabulary in one Triton kernel (CUDA).

Sampling a token needs one uniform per vocabulary id and row (`hierarchos.generate.row_noise`: a
32-bit integer hash of the row's seed, its token counter and the id). In PyTorch that is ~57 small
element-wise kernels a token (three multiply-xorshift rounds, each a shift, an xor, a multiply and a
mask, over (B, V) int64 tensors, plus the row's own hash over (B,)); inside a CUDA graph each costs a
few microseconds of launch latency (by that count ~0.2 ms of a minimal-depth token's ~1.35 ms; not
yet timed: the GPU benchmarks decoded greedily). Here one kernel does it: each program hashes its
row's (seed, counter) and a block of ids.

The arithmetic is `row_noise_at`'s in uint32 lanes (wrapping products and logical shifts are what the
PyTorch form's int64 lanes masked to 32 bits after every step compute), so the uniforms are
bit-identical to the PyTorch form (tests/test_noise_triton.py, under Triton's interpreter on the
CPU; the GPU checks run it compiled).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import HierarchosError
from .device_check import checked_once
from .wkv_triton import triton, triton_unavailable_reason

if triton is not None:
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

BLOCK = 1024  # ids per program

if triton is not None:

    def _row_noise_kernel(seeds_ptr, counters_ptr, out_ptr, V, BLOCK: tl.constexpr):
        # uint32 lanes: a product wraps mod 2**32 and a shift is logical, which is what the PyTorch form
        # gets with int64 lanes and `& 0xFFFFFFFF` after every step (no sign to go wrong). The rounds are
        # written out: the interpreter cannot call a nested jit function.
        row_id = tl.program_id(0)
        ids = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        seed = tl.load(seeds_ptr + row_id).to(tl.int64)
        counter = tl.load(counters_ptr + row_id).to(tl.int64)
        mul = tl.full((), 0x45D9F3B, tl.uint32)
        # row = mix32((seed mod 2**32) ^ mix32((seed >> 32) + 0x9E3779B9))
        x = (seed >> 32).to(tl.uint32) + tl.full((), 0x9E3779B9, tl.uint32)
        x = ((x >> 16) ^ x) * mul
        x = ((x >> 16) ^ x) * mul
        x = (x >> 16) ^ x
        x = seed.to(tl.uint32) ^ x
        x = ((x >> 16) ^ x) * mul
        x = ((x >> 16) ^ x) * mul
        x = (x >> 16) ^ x
        # row = mix32(row ^ (counter + 0x632BE5AB))
        x = x ^ (counter.to(tl.uint32) + tl.full((), 0x632BE5AB, tl.uint32))
        x = ((x >> 16) ^ x) * mul
        x = ((x >> 16) ^ x) * mul
        row = (x >> 16) ^ x
        # bits = mix32(mix32(row ^ (id * 0x27D4EB2F + 0x165667B1)) ^ row)
        y = ids.to(tl.uint32) * tl.full((), 0x27D4EB2F, tl.uint32) + tl.full((), 0x165667B1, tl.uint32)
        y = row ^ y
        y = ((y >> 16) ^ y) * mul
        y = ((y >> 16) ^ y) * mul
        y = (y >> 16) ^ y
        y = y ^ row
        y = ((y >> 16) ^ y) * mul
        y = ((y >> 16) ^ y) * mul
        y = (y >> 16) ^ y
        u = ((y >> 9).to(tl.float32) + 0.5) / 8388608.0  # 2**23: 23 bits, exact in float32
        tl.store(out_ptr + row_id * V + ids, u, mask=ids < V)


_KERNELS: dict = {}


def _kernel(interpret: bool):
    """The kernel as a Triton JIT function, or run by Triton's interpreter on CPU tensors (both kept: one
    process may hold both, as wkv_triton's kernels)."""
    if interpret not in _KERNELS:
        _KERNELS[interpret] = (InterpretedFunction(_row_noise_kernel) if interpret
                               else triton.JITFunction(_row_noise_kernel))
    return _KERNELS[interpret]


def _launch(seeds: torch.Tensor, counters: torch.Tensor, vocab: int) -> torch.Tensor:
    B = seeds.shape[0]
    out = torch.empty(B, vocab, device=seeds.device, dtype=torch.float32)
    _kernel(seeds.device.type == "cpu")[(B, triton.cdiv(vocab, BLOCK))](seeds, counters, out, vocab, BLOCK=BLOCK)
    return out


# an opaque op to torch.compile (its fake form gives the shape), as the fused time mix is
@torch.library.custom_op("hierarchos::row_noise", mutates_args=())
def _row_noise_op(seeds: torch.Tensor, counters: torch.Tensor, vocab: int) -> torch.Tensor:
    return _launch(seeds, counters, vocab)


@_row_noise_op.register_fake
def _(seeds, counters, vocab):
    return seeds.new_empty((seeds.shape[0], vocab), dtype=torch.float32)


def row_noise_triton(seeds: torch.Tensor, counters: torch.Tensor, vocab: int) -> torch.Tensor:
    """`hierarchos.generate.row_noise` in one kernel: seeds, counters (B,) int64 -> (B, vocab) float32
    uniforms, the same bits. CUDA, or the CPU under TRITON_INTERPRET=1 (tests)."""
    reason = triton_unavailable_reason(seeds.device)
    if reason:
        raise HierarchosError(f"the fused sampling noise cannot run: {reason}")
    if seeds.dtype != torch.int64 or counters.dtype != torch.int64 or seeds.shape != counters.shape or seeds.dim() != 1:
        raise HierarchosError(f"the fused sampling noise takes seeds and counters as (B,) int64, got "
                              f"{tuple(seeds.shape)} {seeds.dtype} and {tuple(counters.shape)} {counters.dtype}")
    return _row_noise_op(seeds.contiguous(), counters.contiguous(), int(vocab))


_CHECKED: dict = {}  # device -> whether the kernel gave the reference's bits there


def checked(device: torch.device, reference: Callable) -> bool:
    """Whether the kernel runs on `device` and gives `reference(seeds, counters, ids)`'s bits there (the
    PyTorch form, passed in: it lives in the generation layer above). Checked once per device, outside a
    CUDA graph capture (`device_check.checked_once`: during a capture an unchecked device is answered
    False, so the caller captures the PyTorch form). A kernel that fails to build or to match is reported
    once and never used on that device: sampling goes on with the PyTorch form."""
    def check(device):
        seeds = torch.tensor([0, 2**62 - 1, 987654321], device=device)
        counters = torch.tensor([0, 7, 2**33], device=device)
        vocab = 2 * BLOCK + 3  # a partial last block
        ok = bool(torch.equal(row_noise_triton(seeds, counters, vocab),
                              reference(seeds, counters, torch.arange(vocab, device=device))))
        return ok, "its uniforms differ from the PyTorch form's"
    return checked_once(_CHECKED, device, check, "the fused sampling noise kernel", "sampling uses the PyTorch form there")


def fits(seeds: torch.Tensor) -> bool:
    """Whether `row_noise` takes the kernel: triton imports and the rows' seeds are on a CUDA device
    (the CPU keeps the PyTorch form, which the candidate-only sampler needs anyway)."""
    return triton is not None and seeds.is_cuda and seeds.dtype == torch.int64
