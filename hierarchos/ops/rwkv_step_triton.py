"""The one-token RWKV-7 time mix after its matmuls, fused in one Triton kernel.

Generating one token runs each time-mix block as a dozen small kernels between its matmuls: the
decay's soft clamp, the in-context rate's sigmoid, kappa's per-head normalisation, the key's iclr
mix, the frozen-token masks, the WKV-7 state update and read-out, the per-head group norm, the bonus
and the output gate. Inside a CUDA graph each costs a few microseconds of launch latency whatever its
size, so a token of the default reasoning config (~96 layer steps) pays for the count, not the work.
`timemix_step_triton` does all of that in one kernel, one program per (batch row, head) holding the
head's (N, N) state in registers; the matmuls (receptance, key, value, gate, the low-rank paths, the
output projection) stay cuBLAS calls around it.

`timemix_step_reference` is the same function in PyTorch, written as `TimeMix.forward` computes it for
T = 1 (the ground truth of tests/test_rwkv_step_triton.py, run under TRITON_INTERPRET=1 on the CPU).
The block step dispatches with `fits`: `TimeMix.forward` takes the kernel for one token when it is
switched on and can run (CUDA, or the CPU under the interpreter; float32; no autograd), else its own
eager ops. Off by default: `use_fused_step(True)` (the generation stepper's `fused_step`) switches it
on for the step only.

Per batch row and head (vectors over the head's N channels; S[i, j], i a value and j a key channel):
    log_w = -exp(-softplus(-(decay_base + decay_lora)) - 0.5)      iclr = sigmoid(iclr_base + iclr_lora)
    kappa = (k * removal_scale) / max(||k * removal_scale||, 1e-12)  k' = k * (1 + (iclr - 1) * key_iclr_mix)
    b = kappa * iclr; a frozen row: log_w = 0, k' = 0, b = 0 (it writes nothing)
    S' = S diag(exp(log_w)) + (S (-kappa)) b^T + v k'^T;            o = S' r
    out = (group_norm(o) * norm_weight + norm_bias + (sum_j r k' bonus) v) * g,  g = sigmoid(gate) or gate

The low-rank paths before it (the decay's, the in-context rate's, x070's gate and value residual: y_p =
act_p(x_p @ down_p) @ up_p, each two small matmuls and maybe an activation) run as two launches for all of
them, `lowrank_paths_triton`: the first kernel forms every path's hidden vector (its activation applied),
the second every path's up-projection, each spread over blocks of rows and columns; against ~10 launches
a layer step in PyTorch. `lowrank_paths_reference` is the PyTorch form.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..errors import HierarchosError
from .wkv_triton import triton, triton_unavailable_reason

if triton is not None:
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    from .wkv_triton import _SUM

_ENABLED = False


def use_fused_step(on: bool) -> bool:
    """Switch the fused one-token time mix on or off for this process; returns the previous setting."""
    global _ENABLED
    previous, _ENABLED = _ENABLED, bool(on)
    return previous


def enabled() -> bool:
    return _ENABLED


# ----------------------------------------------------------------------------- reference


def timemix_step_reference(r, k, v, decay_lora, iclr_lora, gate, state, frozen, decay_base, iclr_base,
                           removal_scale, key_iclr_mix, bonus, norm_weight, norm_bias, eps: float,
                           gate_sigmoid: bool):
    """The fused function in PyTorch, as TimeMix.forward computes it for one token.

    r, k, v, decay_lora, iclr_lora, gate: (B, C); state (B, H, N, N) float32; frozen (B,) bool or None;
    decay_base, iclr_base, removal_scale, key_iclr_mix, norm_weight, norm_bias: (C,); bonus (H, N).
    Returns (out (B, C) in gate's dtype, the next state (B, H, N, N))."""
    from .wkv import wkv7_recurrent_step

    B, C = r.shape
    H, N = bonus.shape
    f32 = lambda t: t if t.dtype in (torch.float32, torch.float64) else t.float()  # noqa: E731
    log_w = -torch.exp(-F.softplus(-f32(decay_base + decay_lora)) - 0.5)
    iclr = torch.sigmoid(iclr_base + iclr_lora)
    kappa = F.normalize(f32((k * removal_scale).view(B, 1, H, N)), dim=-1)
    k = k * (1 + (iclr - 1) * key_iclr_mix)
    heads = lambda t: f32(t.view(B, 1, H, N))  # noqa: E731
    r_h, k_h, v_h, iclr_h, log_w_h = heads(r), heads(k), heads(v), heads(iclr), log_w.view(B, 1, H, N)
    b_h = kappa * iclr_h
    if frozen is not None:
        live = (~frozen.view(B, 1))[:, :, None, None].to(r_h.dtype)
        log_w_h, k_h, b_h = log_w_h * live, k_h * live, b_h * live
    out, new_state = wkv7_recurrent_step(r_h, log_w_h, k_h, v_h, -kappa, b_h, state)
    normed = F.layer_norm(out, (N,), eps=eps).flatten(2)
    out = torch.addcmul(norm_bias.to(normed.dtype), normed, norm_weight.to(normed.dtype))
    bonus_term = ((r_h * k_h * bonus).sum(-1, keepdim=True) * v_h).reshape(B, 1, C)
    g = (torch.sigmoid(gate) if gate_sigmoid else gate).view(B, 1, C)
    return ((out + bonus_term).to(g.dtype) * g)[:, 0], new_state


ACTIVATIONS = ("none", "tanh", "sigmoid")  # a path's activation between its down and up projection
MAX_PATHS = 4


def lowrank_paths_reference(xs, downs, ups, acts):
    """Every low-rank path y_p = act_p(x_p @ down_p) @ up_p, as TimeMix computes each: xs (B, C) each,
    downs (C, R_p), ups (R_p, C), acts names from ACTIVATIONS. Returns (P, B, C)."""
    fns = {"none": lambda t: t, "tanh": torch.tanh, "sigmoid": torch.sigmoid}
    return torch.stack([fns[act](x @ down) @ up for x, down, up, act in zip(xs, downs, ups, acts, strict=True)])


# ----------------------------------------------------------------------------- kernel

if triton is not None:

    def _timemix_step_kernel(r_ptr, k_ptr, v_ptr, dl_ptr, il_ptr, g_ptr, s_ptr, frozen_ptr, db_ptr, ib_ptr,
                             rs_ptr, km_ptr, bonus_ptr, nw_ptr, nb_ptr, out_ptr, s_out_ptr, eps,
                             H: tl.constexpr, N: tl.constexpr, HAS_FROZEN: tl.constexpr,
                             GATE_SIGMOID: tl.constexpr):
        """One program per (batch row b, head h): the whole one-token time mix of that head."""
        pid = tl.program_id(0)
        b = pid // H
        h = pid % H
        n = tl.arange(0, N)
        vec = b * (H * N) + h * N + n          # the head's channels in a (B, C) tensor
        par = h * N + n                          # ... in a (C,) parameter
        r = tl.load(r_ptr + vec).to(tl.float32)
        k = tl.load(k_ptr + vec).to(tl.float32)
        v = tl.load(v_ptr + vec).to(tl.float32)
        x = tl.load(db_ptr + par).to(tl.float32) + tl.load(dl_ptr + vec).to(tl.float32)
        # softplus(-x) as torch computes it (threshold 20), then the soft clamp of the decay
        y = -x
        softplus = tl.where(y > 20.0, y, tl.log(1.0 + tl.exp(tl.minimum(y, 20.0))))
        log_w = -tl.exp(-softplus - 0.5)
        iclr = 1.0 / (1.0 + tl.exp(-(tl.load(ib_ptr + par).to(tl.float32) + tl.load(il_ptr + vec).to(tl.float32))))
        kr = k * tl.load(rs_ptr + par).to(tl.float32)
        norm = tl.sqrt(tl.reduce(kr * kr, 0, _SUM))
        kappa = kr / tl.maximum(norm, 1e-12)
        kk = k * (1.0 + (iclr - 1.0) * tl.load(km_ptr + par).to(tl.float32))
        bb = kappa * iclr
        if HAS_FROZEN:
            live = 1.0 - tl.load(frozen_ptr + b).to(tl.float32)
            log_w = log_w * live
            kk = kk * live
            bb = bb * live
        # the state update S' = S diag(w) + (S a) b^T + v k^T with a = -kappa, rows i, columns j
        cell = (b * H + h) * N * N + n[:, None] * N + n[None, :]
        s = tl.load(s_ptr + cell)
        sa = tl.reduce(s * (-kappa)[None, :], 1, _SUM)
        s = s * tl.exp(log_w)[None, :] + sa[:, None] * bb[None, :] + v[:, None] * kk[None, :]
        tl.store(s_out_ptr + cell, s)
        o = tl.reduce(s * r[None, :], 1, _SUM)
        # group norm over the head's N outputs, the per-channel affine, the bonus and the gate
        mean = tl.reduce(o, 0, _SUM) / N
        centred = o - mean
        var = tl.reduce(centred * centred, 0, _SUM) / N
        normed = centred / tl.sqrt(var + eps)
        normed = normed * tl.load(nw_ptr + par).to(tl.float32) + tl.load(nb_ptr + par).to(tl.float32)
        bonus = tl.reduce(r * kk * tl.load(bonus_ptr + par).to(tl.float32), 0, _SUM)
        g = tl.load(g_ptr + vec).to(tl.float32)
        if GATE_SIGMOID:
            g = 1.0 / (1.0 + tl.exp(-g))
        tl.store(out_ptr + vec, (normed + bonus * v) * g)


    def _lowrank_down_kernel(x0, x1, x2, x3, d0, d1, d2, d3, h_ptr, R0, R1, R2, R3, O0, O1, O2, O3,
                             A0, A1, A2, A3, C: tl.constexpr, RS: tl.constexpr, BR: tl.constexpr,
                             BC: tl.constexpr):
        """Program (b, p, j): rows j*BR.. of path p's hidden vector act_p(x_p[b] @ down_p) for batch row b,
        stored at h[b, O_p + row]; down_p (C, R_p) row-major; A_p 0 none, 1 tanh, 2 sigmoid. Blocks past a
        path's rank store nothing (the grid is sized by the largest rank)."""
        b = tl.program_id(0)
        p = tl.program_id(1)
        j = tl.program_id(2)
        # one path's pointers and sizes by the program's p (every path float32: one pointer type)
        if p == 0:
            x_ptr, d_ptr, R, off, act = x0, d0, R0, O0, A0
        elif p == 1:
            x_ptr, d_ptr, R, off, act = x1, d1, R1, O1, A1
        elif p == 2:
            x_ptr, d_ptr, R, off, act = x2, d2, R2, O2, A2
        else:
            x_ptr, d_ptr, R, off, act = x3, d3, R3, O3, A3
        rows = j * BR + tl.arange(0, BR)
        live = rows < R
        acc = tl.full((BR,), 0.0, tl.float32)  # (tl.zeros is JIT: see _SUM)
        for c0 in range(0, C, BC):
            cols = c0 + tl.arange(0, BC)
            inside = cols < C
            x = tl.load(x_ptr + b * C + cols, mask=inside, other=0.0)
            w = tl.load(d_ptr + cols[:, None] * R + rows[None, :], mask=inside[:, None] & live[None, :], other=0.0)
            acc += tl.reduce(x[:, None] * w, 0, _SUM)
        # tanh as sign(a) (1 - e) / (1 + e), e = exp(-2|a|): no overflow at either end
        e = tl.exp(-2.0 * tl.abs(acc))
        t = (1.0 - e) / (1.0 + e)
        acc = tl.where(act == 1, tl.where(acc < 0, -t, t), tl.where(act == 2, 1.0 / (1.0 + tl.exp(-acc)), acc))
        tl.store(h_ptr + b * RS + off + rows, acc, mask=live)

    def _lowrank_up_kernel(h_ptr, u0, u1, u2, u3, y_ptr, n_rows, R0, R1, R2, R3, O0, O1, O2, O3,
                           C: tl.constexpr, RS: tl.constexpr, RP: tl.constexpr, BCOL: tl.constexpr):
        """Program (b, p, jc): columns jc*BCOL.. of path p's output y[p, b] = h[b, O_p:O_p + R_p] @ up_p,
        up_p (R_p, C) row-major; RP a power of two >= every rank."""
        b = tl.program_id(0)
        p = tl.program_id(1)
        jc = tl.program_id(2)
        if p == 0:
            u_ptr, R, off = u0, R0, O0
        elif p == 1:
            u_ptr, R, off = u1, R1, O1
        elif p == 2:
            u_ptr, R, off = u2, R2, O2
        else:
            u_ptr, R, off = u3, R3, O3
        cols = jc * BCOL + tl.arange(0, BCOL)
        inside = cols < C
        r = tl.arange(0, RP)
        live = r < R
        hidden = tl.load(h_ptr + b * RS + off + r, mask=live, other=0.0)
        w = tl.load(u_ptr + r[:, None] * C + cols[None, :], mask=live[:, None] & inside[None, :], other=0.0)
        tl.store(y_ptr + (p * n_rows + b) * C + cols, tl.reduce(hidden[:, None] * w, 0, _SUM), mask=inside)


_KERNELS: dict = {}


def _kernel(interpret: bool, fn=None):
    """A kernel (the time mix's by default) as a Triton JIT function, or run by Triton's interpreter on
    CPU tensors (both kept: one process may hold both, as wkv_triton's kernels)."""
    fn = fn or _timemix_step_kernel
    key = (interpret, fn.__name__)
    if key not in _KERNELS:
        _KERNELS[key] = InterpretedFunction(fn) if interpret else triton.JITFunction(fn)
    return _KERNELS[key]


def _launch(r, k, v, decay_lora, iclr_lora, gate, state, frozen, decay_base, iclr_base, removal_scale,
            key_iclr_mix, bonus, norm_weight, norm_bias, eps: float, gate_sigmoid: bool):
    B, C = r.shape
    H, N = bonus.shape
    out = torch.empty(B, C, device=r.device, dtype=torch.float32)
    new_state = torch.empty_like(state)
    frozen_arg = frozen if frozen is not None else r  # an unread pointer without frozen rows
    kernel = _kernel(r.device.type == "cpu")
    kernel[(B * H,)](r, k, v, decay_lora, iclr_lora, gate, state, frozen_arg, decay_base, iclr_base,
                     removal_scale, key_iclr_mix, bonus, norm_weight, norm_bias, out, new_state, float(eps),
                     H=H, N=N, HAS_FROZEN=frozen is not None, GATE_SIGMOID=bool(gate_sigmoid), num_warps=4)
    return out, new_state


# torch.compile sees the kernel as one opaque op (its fake form gives the shapes), so a compiled step
# keeps it as it is; eager callers go through the same op
@torch.library.custom_op("hierarchos::timemix_step", mutates_args=())
def _timemix_step_op(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay_lora: torch.Tensor,
                     iclr_lora: torch.Tensor, gate: torch.Tensor, state: torch.Tensor, frozen: torch.Tensor | None,
                     decay_base: torch.Tensor, iclr_base: torch.Tensor, removal_scale: torch.Tensor,
                     key_iclr_mix: torch.Tensor, bonus: torch.Tensor, norm_weight: torch.Tensor,
                     norm_bias: torch.Tensor, eps: float, gate_sigmoid: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(r, k, v, decay_lora, iclr_lora, gate, state, frozen, decay_base, iclr_base, removal_scale,
                   key_iclr_mix, bonus, norm_weight, norm_bias, eps, gate_sigmoid)


@_timemix_step_op.register_fake
def _(r, k, v, decay_lora, iclr_lora, gate, state, frozen, decay_base, iclr_base, removal_scale, key_iclr_mix,
      bonus, norm_weight, norm_bias, eps, gate_sigmoid):
    return r.new_empty(r.shape, dtype=torch.float32), torch.empty_like(state)


TENSORS = ("r", "k", "v", "decay_lora", "iclr_lora", "gate", "state", "decay_base", "iclr_base", "removal_scale",
           "key_iclr_mix", "bonus", "norm_weight", "norm_bias")


def timemix_step_triton(r, k, v, decay_lora, iclr_lora, gate, state, frozen, decay_base, iclr_base,
                        removal_scale, key_iclr_mix, bonus, norm_weight, norm_bias, eps: float,
                        gate_sigmoid: bool):
    """`timemix_step_reference` in one Triton kernel (CUDA; the CPU under TRITON_INTERPRET=1). float32
    tensors, contiguous; no autograd (generation). Same contract."""
    reason = triton_unavailable_reason(r.device)
    if reason:
        raise HierarchosError(f"the fused one-token time mix cannot run: {reason}")
    H, N = bonus.shape
    if N & (N - 1):
        raise HierarchosError(f"the fused one-token time mix needs a power-of-two head size (got {N}); "
                              "switch it off (use_fused_step(False))")
    args = dict(zip(TENSORS, (r, k, v, decay_lora, iclr_lora, gate, state, decay_base, iclr_base, removal_scale,
                              key_iclr_mix, bonus, norm_weight, norm_bias)))
    bad = [name for name, t in args.items() if t.dtype != torch.float32]
    if bad:
        raise HierarchosError(f"the fused one-token time mix takes float32 tensors ({', '.join(bad)} are not); "
                              "switch it off (use_fused_step(False)) under autocast or in other dtypes")
    args = {name: t.contiguous() for name, t in args.items()}
    if frozen is not None:  # (B,) bool read at b: one flag per row, contiguous
        frozen = frozen.reshape(-1).contiguous()
        if frozen.dtype != torch.bool or frozen.numel() != r.shape[0]:
            raise HierarchosError(f"the fused one-token time mix takes frozen as ({r.shape[0]},) bool, got "
                                  f"{tuple(frozen.shape)} {frozen.dtype}")
    out, new_state = _timemix_step_op(args["r"], args["k"], args["v"], args["decay_lora"], args["iclr_lora"],
                                      args["gate"], args["state"], frozen, args["decay_base"], args["iclr_base"],
                                      args["removal_scale"], args["key_iclr_mix"], args["bonus"],
                                      args["norm_weight"], args["norm_bias"], float(eps), bool(gate_sigmoid))
    return out, new_state


# launch shapes of the low-rank kernels: hidden rows a program and the width of its reads of x and down;
# output columns a program of the up-projection
DOWN_ROWS, DOWN_COLS, UP_COLS = 16, 128, 64


def _launch_lowrank(xs, downs, ups, codes):
    P = len(xs)
    B, C = xs[0].shape
    ranks = [d.shape[1] for d in downs]
    offsets = [sum(ranks[:p]) for p in range(P)]
    hidden = xs[0].new_empty(B, sum(ranks))
    y = xs[0].new_empty(P, B, C)
    pad = lambda items, fill: list(items) + [fill] * (MAX_PATHS - P)  # noqa: E731  (absent paths: rank 0)
    interpret = xs[0].device.type == "cpu"
    largest = max(ranks)
    down = _kernel(interpret, _lowrank_down_kernel)
    down[(B, P, -(-largest // DOWN_ROWS))](*pad(xs, xs[0]), *pad(downs, downs[0]), hidden, *pad(ranks, 0),
                                           *pad(offsets, 0), *pad(codes, 0), C=C, RS=sum(ranks), BR=DOWN_ROWS,
                                           BC=DOWN_COLS, num_warps=4)
    up = _kernel(interpret, _lowrank_up_kernel)
    up[(B, P, -(-C // UP_COLS))](hidden, *pad(ups, ups[0]), y, B, *pad(ranks, 0), *pad(offsets, 0), C=C,
                                 RS=sum(ranks), RP=triton.next_power_of_2(largest), BCOL=UP_COLS, num_warps=4)
    return y


@torch.library.custom_op("hierarchos::lowrank_paths", mutates_args=())
def _lowrank_paths_op(xs: list[torch.Tensor], downs: list[torch.Tensor], ups: list[torch.Tensor],
                      codes: list[int]) -> torch.Tensor:
    return _launch_lowrank(xs, downs, ups, codes)


@_lowrank_paths_op.register_fake
def _(xs, downs, ups, codes):
    return xs[0].new_empty(len(xs), *xs[0].shape)


def lowrank_paths_triton(xs, downs, ups, acts):
    """`lowrank_paths_reference` in two Triton launches (CUDA; the CPU under TRITON_INTERPRET=1): 1 to
    MAX_PATHS paths, float32, xs (B, C) each, downs (C, R_p), ups (R_p, C); no autograd. Returns (P, B, C)."""
    reason = triton_unavailable_reason(xs[0].device if xs else torch.device("cpu"))
    if reason:
        raise HierarchosError(f"the fused low-rank paths cannot run: {reason}")
    if not 1 <= len(xs) <= MAX_PATHS or not len(xs) == len(downs) == len(ups) == len(acts):
        raise HierarchosError(f"the fused low-rank paths take 1 to {MAX_PATHS} paths, each an input, a down and an "
                              f"up projection and an activation (got {len(xs)}, {len(downs)}, {len(ups)}, {len(acts)})")
    bad = [a for a in acts if a not in ACTIVATIONS]
    if bad:
        raise HierarchosError(f"the fused low-rank paths: unknown activation {bad[0]!r} (one of {', '.join(ACTIVATIONS)})")
    B, C = xs[0].shape
    for p, (x, down, up) in enumerate(zip(xs, downs, ups)):
        if x.shape != (B, C) or down.dim() != 2 or down.shape[0] != C or up.shape != (down.shape[1], C):
            raise HierarchosError(f"the fused low-rank paths: path {p} has x {tuple(x.shape)}, down "
                                  f"{tuple(down.shape)}, up {tuple(up.shape)}; want (B, C), (C, R), (R, C) with "
                                  f"(B, C) = {(B, C)}")
        if {x.dtype, down.dtype, up.dtype} != {torch.float32}:
            raise HierarchosError(f"the fused low-rank paths take float32 tensors (path {p} has "
                                  f"{x.dtype}, {down.dtype}, {up.dtype}); switch the fused step off "
                                  "(use_fused_step(False)) in other dtypes")
    codes = [ACTIVATIONS.index(a) for a in acts]
    return _lowrank_paths_op([x.contiguous() for x in xs], [d.contiguous() for d in downs],
                             [u.contiguous() for u in ups], codes)


def fits(x: torch.Tensor, head_size: int = 1) -> bool:
    """Whether TimeMix takes the kernel for a block input x (B, 1, C): switched on, float32,
    no autograd, a power-of-two head size, a device the kernel runs on (the channel mix asks the same,
    without a head size, for its fused projections)."""
    return (_ENABLED and x.dtype == torch.float32 and not torch.is_grad_enabled() and triton is not None
            and not head_size & (head_size - 1)
            and (x.is_cuda or (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")))
