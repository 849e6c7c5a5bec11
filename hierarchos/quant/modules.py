"""The modules a quantized model runs: `QuantLinear` (a Linear whose weight is in quantized blocks),
`QuantEmbedding` (row lookups from a quantized table) and the `ProjectionGroup`s that run a layer's
projections of one tensor in one kernel call.

They sit below both `quant.model` (which decides the formats and builds the model out of them) and
`quant.fused_step` (whose one-token calls read their blocks directly), so neither has to import the
other's module at call time. `activations_as_used` gives the float values of the 8-bit activation
blocks the kernel's integer dot products use (the prefill's dense path multiplies those).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..errors import HierarchosError
from . import formats, kernel, vulkan
from .gguf_io import QuantTensor

# From this many rows on (prompt prefill), QuantLinear dequantizes W once per call and runs a float
# GEMM on the activations the kernel would have used: the same function to float rounding, and
# the BLAS GEMM beats the integer kernel there (bench/bench_kernels.py: batch 64 is 0.5-1.1x torch).
DENSE_FROM_ROWS = 32


def activations_as_used(x: np.ndarray, qtype: str) -> np.ndarray:
    """The float values of the 8-bit activation blocks the kernel's integer dot products use for x:
    the C++ kernel's own quantizer when it is built (the same bits as the reference below, tested;
    the numpy one took ~20% of a quantized prefill), else `activations_as_used_reference`."""
    fast = kernel.activations_as_used
    return fast(x, qtype) if fast is not None else activations_as_used_reference(x, qtype)


def activations_as_used_reference(x: np.ndarray, qtype: str) -> np.ndarray:
    """`activations_as_used` in numpy, from the formats' definitions (formats.py)."""
    if qtype == "Q2_K":
        codes, d, _ = formats.quantize_q8_k_activations(x)
        block = formats.QK_K
    else:
        codes, d = formats.quantize_q8_0_activations(x)
        block = 32
    n, cols = x.shape
    return (codes.reshape(n, cols // block, block).astype(np.float32) * d[:, :, None]).reshape(n, cols)


class QuantLinear(nn.Module):
    """y = x @ W.T (+ b) with W in quantized blocks; activations are quantized on the fly by the kernel."""

    def __init__(self, weight: QuantTensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight_q = weight
        self.in_features, self.out_features = weight.cols, weight.rows
        self.quantized_numel = weight.rows * weight.cols
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.vk_weight = None  # the blocks on the Vulkan device, once place_on_vulkan ran
        self.group: ProjectionGroup | None = None  # set by fuse_projections

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:
            raise HierarchosError("quantized weights cannot be trained; learn with the full-precision model "
                                  "(chat --enable-quantized-learning --shadow-model-path DIR)")
        if self.group is not None:
            fused = self.group.take(self, x)
            if fused is not None:
                y = torch.from_numpy(fused)
                y = (y if y.dtype == x.dtype else y.to(x.dtype)).reshape(*x.shape[:-1], self.out_features)
                return y + self.bias if self.bias is not None else y
        shape = x.shape
        flat = x.detach().reshape(-1, self.in_features)
        if flat.dtype != torch.float32 or flat.device.type != "cpu":  # (skip the no-op .to: it costs per token)
            flat = flat.to("cpu", torch.float32)
        flat = flat.contiguous().numpy()
        if self.vk_weight is not None:  # every batch size: the shader tiles rows itself
            y = torch.from_numpy(vulkan.vk_matmul(self.vk_weight, flat))
        elif flat.shape[0] >= DENSE_FROM_ROWS:
            y = self.dense_matmul(flat)
        else:
            y = torch.from_numpy(kernel.matmul(self.weight_q.data, self.weight_q.qtype, self.in_features, flat))
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        y = y.reshape(*shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y

    def dense_matmul(self, flat: np.ndarray) -> torch.Tensor:
        """kernel.matmul's function through a float GEMM: x rounded to the kernel's 8-bit activation
        blocks (Q8_0, or Q8_K for Q2_K) and W dequantized; only the order of float sums differs."""
        w = torch.from_numpy(kernel.dequantize(self.weight_q.data, self.weight_q.qtype, self.in_features))
        x = torch.from_numpy(activations_as_used(flat, self.weight_q.qtype))
        return x @ w.T

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.weight_q.qtype}" + (
            ", vulkan" if self.vk_weight is not None else "")


def _input_key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), t._version, tuple(t.shape), t.stride(), t.dtype, t.device)


class ProjectionGroup:
    """QuantLinears that read one tensor (or slices of one), run by one kernel.matmul_many call.

    The first member called computes every member's output from the tensor its own input comes from
    and keeps the others' results, each with the key of the input it used (holding that input, so its
    storage cannot be reused meanwhile); a member whose input has that key takes its result, any other
    call runs the group again (or the member alone when the inputs cannot be derived). Only the
    kernel's small-batch CPU path is fused (not Vulkan, not the dense prefill path)."""

    def __init__(self, members: list[tuple[QuantLinear, int | None]]):
        self.members = members
        self.pending: dict[int, tuple[tuple, torch.Tensor, np.ndarray]] = {}
        self.weights = [(m.weight_q.data, m.weight_q.qtype, m.in_features) for m, _ in members]

    def _inputs(self, member: QuantLinear, x: torch.Tensor) -> list[torch.Tensor] | None:
        index = next(i for m, i in self.members if m is member)
        if index is None:
            return [x] * len(self.members)
        base = x._base
        if base is None or base.dim() < 2 or not 0 <= index < base.shape[0] or _input_key(base[index]) != _input_key(x):
            return None
        if any(not 0 <= i < base.shape[0] for _, i in self.members):
            return None
        return [base[i] for _, i in self.members]

    def take(self, member: QuantLinear, x: torch.Tensor) -> np.ndarray | None:
        """member's output for x (rows, out_features) from the group's one call, or None: run alone."""
        hit = self.pending.pop(id(member), None)
        key = _input_key(x)
        if hit is not None and hit[0] == key:
            return hit[2]
        rows = x.numel() // max(1, x.shape[-1])
        if (x.device.type != "cpu" or x.dtype != torch.float32 or rows >= DENSE_FROM_ROWS
                or any(m.vk_weight is not None for m, _ in self.members)):
            return None
        inputs = self._inputs(member, x)
        if inputs is None:
            return None
        flats = [t.detach().reshape(-1, m.in_features).contiguous().numpy() for (m, _), t in zip(self.members, inputs)]
        outputs = kernel.matmul_many(self.weights, flats)
        self.pending.clear()
        own = None
        for (m, _), t, y in zip(self.members, inputs, outputs):
            if m is member:
                own = y
            else:
                self.pending[id(m)] = (_input_key(t), t, y)
        return own


class QuantEmbedding(nn.Module):
    """Row lookups from a quantized table: only the rows asked for are dequantized."""

    def __init__(self, table: QuantTensor):
        super().__init__()
        self.table = table
        self.num_embeddings, self.embedding_dim = table.rows, table.cols
        self.quantized_numel = table.rows * table.cols

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.detach().reshape(-1).to("cpu", torch.int64).numpy()
        rows = kernel.dequantize_rows(self.table.data, self.table.qtype, self.table.cols, flat)
        return torch.from_numpy(rows).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.table.qtype}"
