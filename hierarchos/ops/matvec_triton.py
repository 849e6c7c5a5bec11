"""Several small matrix-vector products in one Triton launch: y_p = x_p @ W_p^T for up to four pairs.

A generated token multiplies a handful of rows by many separate weight matrices (the receptance, key
and value projections of every time mix; the gate and the up projection of every channel mix); each
product is its own cuBLAS launch, and inside the generation step's CUDA graph a launch costs a few
microseconds whatever its size. `matvecs_triton` does up to MAX_PRODUCTS of them in one launch, reading
each nn.Linear weight (out, in) where it lies (no stacked copy to keep in step with the parameters):
program (b, p, j) computes outputs j*BLOCK_OUT.. of product p for row b. Products may differ in their
output width; they share the input width. `matvecs_reference` is the PyTorch form (the tests hold the
kernel to it under TRITON_INTERPRET=1 on the CPU).
"""

from __future__ import annotations

import torch

from ..errors import HierarchosError
from .wkv_triton import triton, triton_unavailable_reason

if triton is not None:
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    from .wkv_triton import _SUM

MAX_PRODUCTS = 4
BLOCK_OUT, BLOCK_IN = 32, 128  # outputs a program; the width of its reads along the input


def matvecs_reference(xs, weights):
    """[x_p @ W_p^T for each pair]: xs (B, C_in) each, weights (C_out_p, C_in) each (nn.Linear's layout)."""
    return [x @ w.t() for x, w in zip(xs, weights, strict=True)]


if triton is not None:

    def _matvecs_kernel(x0, x1, x2, x3, w0, w1, w2, w3, y0, y1, y2, y3, N0, N1, N2, N3,
                        K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """Program (b, p, j): outputs j*BN.. of product p for row b, y_p[b] = W_p @ x_p[b], W_p (N_p, K)
        row-major; blocks past a product's width store nothing (the grid is sized by the widest)."""
        b = tl.program_id(0)
        p = tl.program_id(1)
        j = tl.program_id(2)
        if p == 0:  # one product's pointers by the program's p (every tensor float32: one pointer type)
            x_ptr, w_ptr, y_ptr, n_out = x0, w0, y0, N0
        elif p == 1:
            x_ptr, w_ptr, y_ptr, n_out = x1, w1, y1, N1
        elif p == 2:
            x_ptr, w_ptr, y_ptr, n_out = x2, w2, y2, N2
        else:
            x_ptr, w_ptr, y_ptr, n_out = x3, w3, y3, N3
        rows = j * BN + tl.arange(0, BN)
        live = rows < n_out
        acc = tl.full((BN,), 0.0, tl.float32)  # (tl.zeros is JIT: see _SUM)
        for k0 in range(0, K, BK):
            cols = k0 + tl.arange(0, BK)
            inside = cols < K
            x = tl.load(x_ptr + b * K + cols, mask=inside, other=0.0)
            w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=live[:, None] & inside[None, :], other=0.0)
            acc += tl.reduce(w * x[None, :], 1, _SUM)
        tl.store(y_ptr + b * n_out + rows, acc, mask=live)


_KERNELS: dict = {}


def _kernel(interpret: bool):
    """The kernel as a Triton JIT function, or run by Triton's interpreter on CPU tensors (both kept)."""
    if interpret not in _KERNELS:
        _KERNELS[interpret] = InterpretedFunction(_matvecs_kernel) if interpret else triton.JITFunction(_matvecs_kernel)
    return _KERNELS[interpret]


def _launch(xs, weights):
    B, K = xs[0].shape
    outs = [xs[0].new_empty(B, w.shape[0]) for w in weights]
    P = len(xs)
    pad = lambda items: list(items) + [items[0]] * (MAX_PRODUCTS - P)  # noqa: E731  (absent products: width 0)
    widths = [w.shape[0] for w in weights] + [0] * (MAX_PRODUCTS - P)
    _kernel(xs[0].device.type == "cpu")[(B, P, -(-max(widths) // BLOCK_OUT))](
        *pad(xs), *pad(weights), *pad(outs), *widths, K=K, BN=BLOCK_OUT, BK=BLOCK_IN, num_warps=4)
    return outs


# torch.compile sees the launch as one opaque op (its fake form gives the shapes)
@torch.library.custom_op("hierarchos::matvecs", mutates_args=())
def _matvecs_op(xs: list[torch.Tensor], weights: list[torch.Tensor]) -> list[torch.Tensor]:
    return _launch(xs, weights)


@_matvecs_op.register_fake
def _(xs, weights):
    return [xs[0].new_empty(xs[0].shape[0], w.shape[0]) for w in weights]


def matvecs_triton(xs, weights):
    """`matvecs_reference` in one Triton launch (CUDA; the CPU under TRITON_INTERPRET=1): 1 to
    MAX_PRODUCTS pairs, float32, xs (B, C_in) each, weights (C_out_p, C_in); no autograd."""
    reason = triton_unavailable_reason(xs[0].device if xs else torch.device("cpu"))
    if reason:
        raise HierarchosError(f"the fused matrix-vector products cannot run: {reason}")
    if not 1 <= len(xs) <= MAX_PRODUCTS or len(xs) != len(weights):
        raise HierarchosError(f"the fused matrix-vector products take 1 to {MAX_PRODUCTS} (input, weight) pairs "
                              f"(got {len(xs)} inputs and {len(weights)} weights)")
    B, K = xs[0].shape
    for p, (x, w) in enumerate(zip(xs, weights)):
        if x.shape != (B, K) or w.dim() != 2 or w.shape[1] != K:
            raise HierarchosError(f"the fused matrix-vector products: pair {p} has x {tuple(x.shape)} and weight "
                                  f"{tuple(w.shape)}; want ({B}, {K}) and (C_out, {K})")
        if x.dtype != torch.float32 or w.dtype != torch.float32:
            raise HierarchosError(f"the fused matrix-vector products take float32 tensors (pair {p} has {x.dtype} "
                                  f"and {w.dtype}); switch the fused step off (use_fused_step(False)) in other dtypes")
    return _matvecs_op([x.contiguous() for x in xs], [w.contiguous() for w in weights])
