"""Several small matrix-vector products in one Triton launch: y_p = act_p(x_p @ W_p^T) for up to four pairs.

A generated token multiplies a handful of rows by many separate weight matrices (the receptance, key
and value projections of every time mix; the gate and the up projection of every channel mix; the
down and up sides of the time mix's low-rank paths); each product is its own cuBLAS launch, and inside
the generation step's CUDA graph a launch costs a few microseconds whatever its size. `matvecs_triton`
does up to MAX_PRODUCTS of them in one launch, reading each weight where it lies (no stacked copy to
keep in step with the parameters), as nn.Linear holds it (out, in) or transposed (in, out: a low-rank
path's x @ down), with an optional activation (none, tanh, sigmoid) on each product's output:
program (b, p, j) computes outputs j*BLOCK_OUT.. of product p for row b. Products may differ in their
widths. `matvecs_reference` is the PyTorch form (the tests hold the kernel to it under
TRITON_INTERPRET=1 on the CPU).

`swiglu_triton` is the channel mix's pair: silu(x W_gate^T) * (x W_up^T), times the token's DeepEmbed
gate, in one launch (each program reads the gate's and the up's rows of its outputs), so the activation
costs no launch of its own; `swiglu_reference` is its PyTorch form.
"""

from __future__ import annotations

import torch

from ..errors import HierarchosError
from .device_check import checked_once
from .wkv_triton import triton, triton_unavailable_reason

if triton is not None:
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    from .wkv_triton import _SUM

MAX_PRODUCTS = 4
BLOCK_OUT, BLOCK_IN = 32, 128  # outputs a program and the width of its reads, for small inputs (launch_config)
ACTIVATIONS = ("none", "tanh", "sigmoid")  # what a product's outputs go through (the kernel's codes 0, 1, 2)
ACTIVATION_FNS = {"none": lambda t: t, "tanh": torch.tanh, "sigmoid": torch.sigmoid}  # the PyTorch forms


def _weight_of(w: torch.Tensor, transposed: bool) -> torch.Tensor:
    return w.t() if transposed else w


def matvecs_reference(xs, weights, acts=None, transposed=None):
    """[act_p(x_p @ W_p^T) for each pair]: xs (B, C_in_p) each; weights (C_out_p, C_in_p) each (nn.Linear's
    layout), or (C_in_p, C_out_p) where transposed[p]; acts names from ACTIVATIONS (default none)."""
    acts = acts or ["none"] * len(xs)
    transposed = transposed or [False] * len(xs)
    return [ACTIVATION_FNS[a](x @ _weight_of(w, t).t()) for x, w, a, t in zip(xs, weights, acts, transposed, strict=True)]


if triton is not None:

    def _matvecs_kernel(x0, x1, x2, x3, w0, w1, w2, w3, y0, y1, y2, y3, N0, N1, N2, N3, K0, K1, K2, K3,
                        SO0, SO1, SO2, SO3, SI0, SI1, SI2, SI3, A0, A1, A2, A3, KMAX: tl.constexpr,
                        BN: tl.constexpr, BK: tl.constexpr):
        """Program (b, p, j): outputs j*BN.. of product p for row b, y_p[b, o] = act_p(sum_i W_p[o, i]
        x_p[b, i]) with W_p[o, i] at w_p + o * SO_p + i * SI_p; x_p (B, K_p) and y_p (B, N_p) contiguous;
        A_p 0 none, 1 tanh, 2 sigmoid. Blocks past a product's width store nothing (the grid is sized by
        the widest); the loop runs to the widest input (a constant), reads masked past each one's own."""
        b = tl.program_id(0)
        p = tl.program_id(1)
        j = tl.program_id(2)
        if p == 0:  # one product's pointers and sizes by the program's p (all float32: one pointer type)
            x_ptr, w_ptr, y_ptr, n_out, k_in, s_out, s_in, act = x0, w0, y0, N0, K0, SO0, SI0, A0
        elif p == 1:
            x_ptr, w_ptr, y_ptr, n_out, k_in, s_out, s_in, act = x1, w1, y1, N1, K1, SO1, SI1, A1
        elif p == 2:
            x_ptr, w_ptr, y_ptr, n_out, k_in, s_out, s_in, act = x2, w2, y2, N2, K2, SO2, SI2, A2
        else:
            x_ptr, w_ptr, y_ptr, n_out, k_in, s_out, s_in, act = x3, w3, y3, N3, K3, SO3, SI3, A3
        rows = j * BN + tl.arange(0, BN)
        live = rows < n_out
        acc = tl.full((BN,), 0.0, tl.float32)  # (tl.zeros is JIT: see _SUM)
        for k0 in range(0, KMAX, BK):
            cols = k0 + tl.arange(0, BK)
            inside = cols < k_in
            x = tl.load(x_ptr + b * k_in + cols, mask=inside, other=0.0)
            w = tl.load(w_ptr + rows[:, None] * s_out + cols[None, :] * s_in, mask=live[:, None] & inside[None, :],
                        other=0.0)
            acc += tl.reduce(w * x[None, :], 1, _SUM)
        # tanh as sign(a) (1 - e) / (1 + e), e = exp(-2|a|), and the sigmoid from exp(-|a|): no overflow
        # at either end
        e = tl.exp(-2.0 * tl.abs(acc))
        t = (1.0 - e) / (1.0 + e)
        h = tl.exp(-tl.abs(acc))
        sig = tl.where(acc < 0, h / (1.0 + h), 1.0 / (1.0 + h))
        acc = tl.where(act == 1, tl.where(acc < 0, -t, t), tl.where(act == 2, sig, acc))
        tl.store(y_ptr + b * n_out + rows, acc, mask=live)

    def _swiglu_kernel(x_ptr, wg_ptr, wu_ptr, dg_ptr, y_ptr, n_out, k_in, KMAX: tl.constexpr, BN: tl.constexpr,
                       BK: tl.constexpr, HAS_DG: tl.constexpr):
        """Program (b, j): outputs j*BN.. of row b, y = silu(x W_g^T) * (x W_u^T) (* the DeepEmbed gate dg
        with HAS_DG); W_g, W_u (n_out, k_in) contiguous, x (B, k_in), dg and y (B, n_out)."""
        b = tl.program_id(0)
        j = tl.program_id(1)
        rows = j * BN + tl.arange(0, BN)
        live = rows < n_out
        acc_g = tl.full((BN,), 0.0, tl.float32)
        acc_u = tl.full((BN,), 0.0, tl.float32)
        for k0 in range(0, KMAX, BK):
            cols = k0 + tl.arange(0, BK)
            inside = cols < k_in
            x = tl.load(x_ptr + b * k_in + cols, mask=inside, other=0.0)
            at = rows[:, None] * k_in + cols[None, :]
            both = live[:, None] & inside[None, :]
            acc_g += tl.reduce(tl.load(wg_ptr + at, mask=both, other=0.0) * x[None, :], 1, _SUM)
            acc_u += tl.reduce(tl.load(wu_ptr + at, mask=both, other=0.0) * x[None, :], 1, _SUM)
        h = tl.exp(-tl.abs(acc_g))  # the sigmoid from exp(-|a|), as the products' kernel forms it
        sig = tl.where(acc_g < 0, h / (1.0 + h), 1.0 / (1.0 + h))
        y = acc_g * sig * acc_u
        if HAS_DG:
            y = y * tl.load(dg_ptr + b * n_out + rows, mask=live, other=0.0)
        tl.store(y_ptr + b * n_out + rows, y, mask=live)


_KERNELS: dict = {}


def _kernel(interpret: bool, fn=None):
    """A kernel of this module (`_matvecs_kernel` unless `fn`) as a Triton JIT function, or run by Triton's
    interpreter on CPU tensors (both kept)."""
    fn = fn or _matvecs_kernel
    if (fn, interpret) not in _KERNELS:
        _KERNELS[fn, interpret] = InterpretedFunction(fn) if interpret else triton.JITFunction(fn)
    return _KERNELS[fn, interpret]


SWIGLU_CONFIG = (2, 128, 1)  # outputs a program (each reads a gate and an up row), input columns a read, warps


def swiglu_reference(x, w_gate, w_up, deep_gate=None):
    """silu(x @ w_gate^T) * (x @ w_up^T) (* deep_gate): the channel mix's hidden activation, x (B, C),
    weights (F, C) as nn.Linear holds them, deep_gate (B, F) or None."""
    hidden = torch.nn.functional.silu(x @ w_gate.t()) * (x @ w_up.t())
    return hidden if deep_gate is None else hidden * deep_gate


def _swiglu_launch(x, w_gate, w_up, deep_gate, out, config=None):
    B, K = x.shape
    n_out = w_gate.shape[0]
    block_out, block_in, warps = config or SWIGLU_CONFIG
    _kernel(x.device.type == "cpu", _swiglu_kernel)[(B, -(-n_out // block_out))](
        x, w_gate, w_up, deep_gate if deep_gate is not None else x, out, n_out, K, KMAX=K, BN=block_out,
        BK=block_in, HAS_DG=deep_gate is not None, num_warps=warps)


@torch.library.custom_op("hierarchos::swiglu_matvec", mutates_args=())
def _swiglu_op(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
               deep_gate: torch.Tensor | None) -> torch.Tensor:
    out = x.new_empty(x.shape[0], w_gate.shape[0])
    _swiglu_launch(x, w_gate, w_up, deep_gate, out)
    return out


@_swiglu_op.register_fake
def _(x, w_gate, w_up, deep_gate):
    return x.new_empty(x.shape[0], w_gate.shape[0])


def swiglu_triton(x, w_gate, w_up, deep_gate=None):
    """`swiglu_reference` in one Triton launch (CUDA; the CPU under TRITON_INTERPRET=1): the gate and up
    products and the activation together, one launch and no round trip of the two products through memory
    (the fused step's channel mix: BENCHMARKS.md, issue 17). float32, no autograd."""
    reason = triton_unavailable_reason(x.device)
    if reason:
        raise HierarchosError(f"the fused gate and up products cannot run: {reason}")
    B, K = x.shape
    if w_gate.shape != w_up.shape or w_gate.dim() != 2 or w_gate.shape[1] != K:
        raise HierarchosError(f"the fused gate and up products: x {tuple(x.shape)}, gate {tuple(w_gate.shape)}, up "
                              f"{tuple(w_up.shape)}; want (B, C) and two (F, C)")
    if deep_gate is not None and tuple(deep_gate.shape) != (B, w_gate.shape[0]):
        raise HierarchosError(f"the fused gate and up products: the DeepEmbed gate is {tuple(deep_gate.shape)}, "
                              f"want ({B}, {w_gate.shape[0]})")
    tensors = [x, w_gate, w_up] + ([] if deep_gate is None else [deep_gate])
    if any(t.dtype != torch.float32 for t in tensors):
        raise HierarchosError("the fused gate and up products take float32 tensors; switch the fused step off "
                              "(use_fused_step(False)) in other dtypes")
    return _swiglu_op(x.contiguous(), w_gate.contiguous(), w_up.contiguous(),
                      None if deep_gate is None else deep_gate.contiguous())


def launch_config(widths: list[int], ks: list[int], transposed: list[bool]) -> tuple[int, int, int]:
    """(outputs a program, input columns a read, warps) for products of these output widths and input
    widths. A launch is bound by how many loads are in flight, not by arithmetic: few outputs a program
    make many programs (a 768 x 768 product: 192 of them at 4 outputs against 24 at 32). Swept at the
    125m step's shapes on an H100 (bench/bench_step_matvecs.py; BENCHMARKS.md, issue 17): receptance, key
    and value 16.1 -> 3.5 us, the channel mix's gate and up 28.1 -> 5.1 us, the low-rank downs (a transposed
    (768, r) weight read along its rows) 4.3 -> 2.5 us; the low-rank ups (inputs of r <= 128) keep 32
    outputs a program (1.9 us, the launch's own floor)."""
    if any(transposed):
        return (8, 512, 4) if max(ks) >= 256 else (BLOCK_OUT, BLOCK_IN, 4)
    return 4, 256, 1


def _launch(xs, weights, outs, codes, transposed, config=None):
    """One launch of the kernel into `outs`; `config` (outputs a program, input columns a read, warps),
    else `launch_config`'s."""
    B = xs[0].shape[0]
    P = len(xs)
    pad = lambda items, fill: list(items) + [fill] * (MAX_PRODUCTS - P)  # noqa: E731  (absent products: width 0)
    shapes = [_weight_of(w, t).shape for w, t in zip(weights, transposed)]
    strides = [(w.stride(1), w.stride(0)) if t else w.stride() for w, t in zip(weights, transposed)]
    widths, ks = [n for n, _ in shapes], [k for _, k in shapes]
    block_out, block_in, warps = config or launch_config(widths, ks, transposed)
    _kernel(xs[0].device.type == "cpu")[(B, P, -(-max(widths) // block_out))](
        *pad(xs, xs[0]), *pad(weights, weights[0]), *pad(outs, outs[0]), *pad(widths, 0),
        *pad(ks, 0), *pad([so for so, _ in strides], 0), *pad([si for _, si in strides], 0),
        *pad(codes, 0), KMAX=max(ks), BN=block_out, BK=block_in, num_warps=warps)


# torch.compile sees a launch as one opaque op (its fake form gives the shapes)
@torch.library.custom_op("hierarchos::matvecs", mutates_args=())
def _matvecs_op(xs: list[torch.Tensor], weights: list[torch.Tensor], codes: list[int],
                transposed: list[bool]) -> list[torch.Tensor]:
    widths = [_weight_of(w, t).shape[0] for w, t in zip(weights, transposed)]
    outs = [xs[0].new_empty(xs[0].shape[0], n) for n in widths]
    _launch(xs, weights, outs, codes, transposed)
    return outs


@_matvecs_op.register_fake
def _(xs, weights, codes, transposed):
    return [xs[0].new_empty(xs[0].shape[0], _weight_of(w, t).shape[0]) for w, t in zip(weights, transposed)]


def matvecs_triton(xs, weights, acts=None, transposed=None):
    """`matvecs_reference` in one Triton launch (CUDA; the CPU under TRITON_INTERPRET=1): 1 to
    MAX_PRODUCTS pairs, float32, xs (B, C_in_p) each, weights (C_out_p, C_in_p) or, transposed,
    (C_in_p, C_out_p); no autograd. Returns one new (B, C_out_p) tensor a product."""
    reason = triton_unavailable_reason(xs[0].device if xs else torch.device("cpu"))
    if reason:
        raise HierarchosError(f"the fused matrix-vector products cannot run: {reason}")
    acts = list(acts or ["none"] * len(xs))
    transposed = [bool(t) for t in (transposed or [False] * len(xs))]
    if not 1 <= len(xs) <= MAX_PRODUCTS or not len(xs) == len(weights) == len(acts) == len(transposed):
        raise HierarchosError(f"the fused matrix-vector products take 1 to {MAX_PRODUCTS} (input, weight) pairs "
                              f"(got {len(xs)} inputs, {len(weights)} weights, {len(acts)} activations)")
    bad = [a for a in acts if a not in ACTIVATIONS]
    if bad:
        raise HierarchosError(f"the fused matrix-vector products: unknown activation {bad[0]!r} (one of "
                              f"{', '.join(ACTIVATIONS)})")
    B = xs[0].shape[0]
    for p, (x, w, t) in enumerate(zip(xs, weights, transposed)):
        if x.dim() != 2 or x.shape[0] != B or w.dim() != 2 or _weight_of(w, t).shape[1] != x.shape[1]:
            raise HierarchosError(f"the fused matrix-vector products: pair {p} has x {tuple(x.shape)} and weight "
                                  f"{tuple(w.shape)}{' (transposed)' if t else ''}; want ({B}, C_in) and "
                                  f"{'(C_in, C_out)' if t else '(C_out, C_in)'}")
        if x.dtype != torch.float32 or w.dtype != torch.float32:
            raise HierarchosError(f"the fused matrix-vector products take float32 tensors (pair {p} has {x.dtype} "
                                  f"and {w.dtype}); switch the fused step off (use_fused_step(False)) in other dtypes")
    return _matvecs_op([x.contiguous() for x in xs], list(weights), [ACTIVATIONS.index(a) for a in acts], transposed)


_CHECKED: dict = {}


def checked(device: torch.device) -> bool:
    """Whether the kernel builds on `device` and agrees with `matvecs_reference` there (products of
    several widths, a transposed and a strided weight, each activation), asked once per device outside a
    CUDA graph capture (`device_check.checked_once`); a failure is reported once and the one-token step
    keeps its eager kernels there."""
    def check(device):
        g = torch.Generator().manual_seed(0)
        xs = [torch.randn(2, k, generator=g).to(device) * 3 for k in (96, 160, 33)]
        ws = [torch.randn(70, 96, generator=g), torch.randn(160, 40, generator=g), torch.randn(200, 33, generator=g)]
        ws = [w.to(device) for w in ws]
        acts, transposed = ["none", "tanh", "sigmoid"], [False, True, False]
        # the reference in float64: a float32 one runs on TF32 tensor cores wherever the caller allows them
        # (chat and train do), and differs from the kernel's float32 sums by ~1e-3
        want = matvecs_reference([x.double() for x in xs], [w.double() for w in ws], acts, transposed)
        ok = all(torch.allclose(a.double(), b, rtol=1e-4, atol=1e-4)
                 for a, b in zip(matvecs_triton(xs, ws, acts, transposed), want))
        return ok, "its products differ from the PyTorch form's"
    return checked_once(_CHECKED, device, check, "the fused matrix-vector kernel", "the one-token step keeps its "
                        "eager kernels there")
