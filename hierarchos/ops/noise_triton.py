"""The sampler's counter-based noise for a whole vocabulary in one Triton kernel (CUDA).

Sampling a token needs one uniform per vocabulary id and row (`hierarchos.generate.row_noise`: a
32-bit integer hash of the row's seed, its token counter and the id). In PyTorch that is ~57 small
element-wise kernels a token (three multiply-xorshift rounds, each a shift, an xor, a multiply and a
mask, over (B, V) int64 tensors, plus the row's own hash over (B,)); inside a CUDA graph each costs a
few microseconds of launch latency, about a fifth of a minimal-depth token's GPU time. Here one
kernel does it: each program hashes its row's (seed, counter) and a block of ids.

The arithmetic is `row_noise_at`'s, on int64 lanes holding uint32 values (no product reaches 2**63:
the multipliers are below 2**30), so the uniforms are bit-identical to the PyTorch form
(tests/test_noise_triton.py, under Triton's interpreter on the CPU; the GPU checks run it compiled).
"""

from __future__ import annotations

import torch

from ..errors import HierarchosError
from .wkv_triton import triton, triton_unavailable_reason

if triton is not None:
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

BLOCK = 1024  # ids per program

if triton is not None:

    def _row_noise_kernel(seeds_ptr, counters_ptr, out_ptr, V, BLOCK: tl.constexpr):
        # the multiply-xorshift rounds are written out: the interpreter cannot call a nested jit function
        row_id = tl.program_id(0)
        ids = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        seed = tl.load(seeds_ptr + row_id).to(tl.int64)
        counter = tl.load(counters_ptr + row_id).to(tl.int64)
        # row = mix32((seed & M32) ^ mix32(((seed >> 32) + 0x9E3779B9) & M32))
        x = ((seed >> 32) + 0x9E3779B9) & 0xFFFFFFFF
        x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
        x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
        x = (x >> 16) ^ x
        x = (seed & 0xFFFFFFFF) ^ x
        x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
        x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
        x = (x >> 16) ^ x
        # row = mix32(row ^ ((counter + 0x632BE5AB) & M32))
        x = x ^ ((counter + 0x632BE5AB) & 0xFFFFFFFF)
        x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
        x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
        row = (x >> 16) ^ x
        # bits = mix32(mix32(row ^ ((id * 0x27D4EB2F + 0x165667B1) & M32)) ^ row)
        y = row ^ ((ids.to(tl.int64) * 0x27D4EB2F + 0x165667B1) & 0xFFFFFFFF)
        y = ((y >> 16) ^ y) * 0x45D9F3B & 0xFFFFFFFF
        y = ((y >> 16) ^ y) * 0x45D9F3B & 0xFFFFFFFF
        y = (y >> 16) ^ y
        y = y ^ row
        y = ((y >> 16) ^ y) * 0x45D9F3B & 0xFFFFFFFF
        y = ((y >> 16) ^ y) * 0x45D9F3B & 0xFFFFFFFF
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


def fits(seeds: torch.Tensor) -> bool:
    """Whether `row_noise` takes the kernel: triton imports and the rows' seeds are on a CUDA device
    (the CPU keeps the PyTorch form, which the candidate-only sampler needs anyway)."""
    return triton is not None and seeds.is_cuda and seeds.dtype == torch.int64
