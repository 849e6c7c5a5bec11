"""A linear layer whose output rows start on aligned addresses: the vocabulary head.

cuBLAS chooses its kernel by the alignment of every operand's leading dimension. With an odd
vocabulary (GPT-2's 50,257) the logits (N, V) and their gradient have an odd row stride, and the
three matmuls of the head (forward, input gradient, weight gradient) fall back to align-1 kernels:
measured on an H200 (bench/profile_forward.py, 125m, 16 x 1024 tokens) they took 30.8 of the
step's 47 ms of matmuls. `padded_linear` computes the logits of a weight padded with zero rows to
a multiple of `multiple` and returns the first V columns as a view, so every operand is aligned;
the values are those of `F.linear` (the padded rows only add columns that are cut off).

Padding copies the whole weight, which pays only when the matmul is large: for a handful of rows
(generating a token, a small batch) the copy of a V x d table costs more than the slow kernel
(at V = 50,257, d = 768 it moves ~150 MB per token in fp32), so below `PAD_MIN_ROWS` rows the plain
`F.linear` runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .amp import autocast_dtype

HEAD_ALIGN = 64
PAD_MIN_ROWS = 256  # rows (tokens) below which padding the weight costs more than it saves


def padded_linear(x: torch.Tensor, weight: torch.Tensor, multiple: int = HEAD_ALIGN) -> torch.Tensor:
    """F.linear(x, weight) (no bias) as a view of an (..., V_padded) result; plain F.linear when aligned."""
    out_features = weight.shape[0]
    extra = -out_features % multiple
    if extra == 0 or x.numel() < PAD_MIN_ROWS * x.shape[-1]:
        return F.linear(x, weight)
    amp_dtype = autocast_dtype(x.device.type)
    if amp_dtype is not None:  # cast before padding: one bf16 copy of the table, not an fp32 one cast later
        weight = weight.to(amp_dtype)
    return F.linear(x, F.pad(weight, (0, 0, 0, extra)))[..., :out_features]

