"""The one-token RWKV-7 time mix after its matmuls, fused in one Triton kernel.

Generating one token runs each time-mix block as a dozen small kernels between its matmuls: the
decay's soft clamp, the in-context rate's sigmoid, kappa's per-head normalisation, the key's iclr
mix, the frozen-token masks, the WKV-7 state update and read-out, the per-head group norm, the bonus
and the output gate. Inside a CUDA graph each costs a few microseconds of launch latency whatever its
size, so a token of the default reasoning config (~96 layer steps) pays for the count, not the work.
`timemix_step_triton` does all of that in one kernel, one program per (batch row, head) holding the
head's (N, N) state in registers, x070's value residual (the lerp toward the first layer's value)
included; the products around it are `matvec_triton` launches (receptance, key and value in one, the
output projection, the low-rank paths below in two; the channel mix's gate and up with their activation
in one), the full gate's and the channel mix's down projection cuBLAS's.

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
them, `lowrank_paths_triton` (`matvec_triton`'s products: every path's hidden vector with its activation,
then every up-projection), against ~10 launches a layer step in PyTorch. `lowrank_paths_reference` is the
PyTorch form.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..errors import HierarchosError
from .matvec_triton import ACTIVATION_FNS, MAX_PRODUCTS, matvecs_triton
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
                           gate_sigmoid: bool, value_residual=None):
    """The fused function in PyTorch, as TimeMix.forward computes it for one token.

    r, k, v, decay_lora, iclr_lora, gate: (B, C); state (B, H, N, N) float32; frozen (B,) bool or None;
    decay_base, iclr_base, removal_scale, key_iclr_mix, norm_weight, norm_bias: (C,); bonus (H, N).
    value_residual: None, or (v_first (B, C), its low-rank path's output (B, C), its base (C,)): the value
    first goes to lerp(v, v_first, sigmoid(base + path)), as x070's layers after the first take it.
    Returns (out (B, C) in gate's dtype, the next state (B, H, N, N))."""
    from .wkv import wkv7_recurrent_step

    if value_residual is not None:
        v_first, vr_lora, vr_base = value_residual
        v = torch.lerp(v, v_first.to(v.dtype), torch.sigmoid(vr_base + vr_lora))
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


MAX_PATHS = MAX_PRODUCTS  # low-rank paths a call


def lowrank_paths_reference(xs, downs, ups, acts):
    """Every low-rank path y_p = act_p(x_p @ down_p) @ up_p, as TimeMix computes each: xs (B, C) each,
    downs (C, R_p), ups (R_p, C), acts names from matvec_triton.ACTIVATIONS. Returns the P outputs (B, C)."""
    return [ACTIVATION_FNS[act](x @ down) @ up for x, down, up, act in zip(xs, downs, ups, acts, strict=True)]


# ----------------------------------------------------------------------------- kernel

if triton is not None:

    def _timemix_step_kernel(r_ptr, k_ptr, v_ptr, dl_ptr, il_ptr, g_ptr, s_ptr, frozen_ptr, db_ptr, ib_ptr,
                             rs_ptr, km_ptr, bonus_ptr, nw_ptr, nb_ptr, vf_ptr, vl_ptr, vb_ptr, out_ptr, s_out_ptr,
                             eps, H: tl.constexpr, N: tl.constexpr, HAS_FROZEN: tl.constexpr,
                             GATE_SIGMOID: tl.constexpr, HAS_VR: tl.constexpr):
        """One program per (batch row b, head h): the whole one-token time mix of that head (with HAS_VR
        the value residual's lerp first: v + w (v_first - v), w = sigmoid(base + path), as torch.lerp
        computes it for w < 0.5 and, from the other end, for w >= 0.5)."""
        pid = tl.program_id(0)
        b = pid // H
        h = pid % H
        n = tl.arange(0, N)
        vec = b * (H * N) + h * N + n          # the head's channels in a (B, C) tensor
        par = h * N + n                          # ... in a (C,) parameter
        r = tl.load(r_ptr + vec).to(tl.float32)
        k = tl.load(k_ptr + vec).to(tl.float32)
        v = tl.load(v_ptr + vec).to(tl.float32)
        if HAS_VR:
            w = 1.0 / (1.0 + tl.exp(-(tl.load(vb_ptr + par).to(tl.float32) + tl.load(vl_ptr + vec).to(tl.float32))))
            vf = tl.load(vf_ptr + vec).to(tl.float32)
            v = tl.where(w < 0.5, v + w * (vf - v), vf - (vf - v) * (1.0 - w))
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


_KERNELS: dict = {}


def _kernel(interpret: bool):
    """The kernel as a Triton JIT function, or run by Triton's interpreter on CPU tensors (both kept:
    one process may hold both, as wkv_triton's kernels)."""
    if interpret not in _KERNELS:
        _KERNELS[interpret] = (InterpretedFunction(_timemix_step_kernel) if interpret
                               else triton.JITFunction(_timemix_step_kernel))
    return _KERNELS[interpret]


def _launch(r, k, v, decay_lora, iclr_lora, gate, state, frozen, decay_base, iclr_base, removal_scale,
            key_iclr_mix, bonus, norm_weight, norm_bias, eps: float, gate_sigmoid: bool, v_first=None,
            vr_lora=None, vr_base=None):
    B, C = r.shape
    H, N = bonus.shape
    out = torch.empty(B, C, device=r.device, dtype=torch.float32)
    new_state = torch.empty_like(state)
    frozen_arg = frozen if frozen is not None else r  # an unread pointer without frozen rows
    has_vr = v_first is not None
    kernel = _kernel(r.device.type == "cpu")
    kernel[(B * H,)](r, k, v, decay_lora, iclr_lora, gate, state, frozen_arg, decay_base, iclr_base,
                     removal_scale, key_iclr_mix, bonus, norm_weight, norm_bias, v_first if has_vr else r,
                     vr_lora if has_vr else r, vr_base if has_vr else r, out, new_state, float(eps),
                     H=H, N=N, HAS_FROZEN=frozen is not None, GATE_SIGMOID=bool(gate_sigmoid), HAS_VR=has_vr,
                     num_warps=4)
    return out, new_state


# torch.compile sees the kernel as one opaque op (its fake form gives the shapes), so a compiled step
# keeps it as it is; eager callers go through the same op
@torch.library.custom_op("hierarchos::timemix_step", mutates_args=())
def _timemix_step_op(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay_lora: torch.Tensor,
                     iclr_lora: torch.Tensor, gate: torch.Tensor, state: torch.Tensor, frozen: torch.Tensor | None,
                     decay_base: torch.Tensor, iclr_base: torch.Tensor, removal_scale: torch.Tensor,
                     key_iclr_mix: torch.Tensor, bonus: torch.Tensor, norm_weight: torch.Tensor,
                     norm_bias: torch.Tensor, eps: float, gate_sigmoid: bool, v_first: torch.Tensor | None = None,
                     vr_lora: torch.Tensor | None = None,
                     vr_base: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(r, k, v, decay_lora, iclr_lora, gate, state, frozen, decay_base, iclr_base, removal_scale,
                   key_iclr_mix, bonus, norm_weight, norm_bias, eps, gate_sigmoid, v_first, vr_lora, vr_base)


@_timemix_step_op.register_fake
def _(r, k, v, decay_lora, iclr_lora, gate, state, frozen, decay_base, iclr_base, removal_scale, key_iclr_mix,
      bonus, norm_weight, norm_bias, eps, gate_sigmoid, v_first=None, vr_lora=None, vr_base=None):
    return r.new_empty(r.shape, dtype=torch.float32), torch.empty_like(state)


TENSORS = ("r", "k", "v", "decay_lora", "iclr_lora", "gate", "state", "decay_base", "iclr_base", "removal_scale",
           "key_iclr_mix", "bonus", "norm_weight", "norm_bias")


def timemix_step_triton(r, k, v, decay_lora, iclr_lora, gate, state, frozen, decay_base, iclr_base,
                        removal_scale, key_iclr_mix, bonus, norm_weight, norm_bias, eps: float,
                        gate_sigmoid: bool, value_residual=None):
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
    if value_residual is not None:
        args.update(zip(("v_first", "vr_lora", "vr_base"), value_residual))
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
                                      args["norm_weight"], args["norm_bias"], float(eps), bool(gate_sigmoid),
                                      args.get("v_first"), args.get("vr_lora"), args.get("vr_base"))
    return out, new_state


def lowrank_paths_triton(xs, downs, ups, acts):
    """`lowrank_paths_reference` in two launches (`matvec_triton.matvecs_triton`: every path's hidden
    vector with its activation, then every up-projection; CUDA, or the CPU under TRITON_INTERPRET=1): 1
    to MAX_PATHS paths, float32, xs (B, C) each, downs (C, R_p), ups (R_p, C); no autograd. Returns the
    P outputs (B, C)."""
    if not 1 <= len(xs) <= MAX_PATHS or not len(xs) == len(downs) == len(ups) == len(acts):
        raise HierarchosError(f"the fused low-rank paths take 1 to {MAX_PATHS} paths, each an input, a down and an "
                              f"up projection and an activation (got {len(xs)}, {len(downs)}, {len(ups)}, {len(acts)})")
    for p, (x, down, up) in enumerate(zip(xs, downs, ups)):
        if down.dim() != 2 or up.shape != (down.shape[1], x.shape[-1]):
            raise HierarchosError(f"the fused low-rank paths: path {p} has x {tuple(x.shape)}, down "
                                  f"{tuple(down.shape)}, up {tuple(up.shape)}; want (B, C), (C, R), (R, C)")
    every = [True] * len(xs)  # down (C, R) and up (R, C): both the transpose of nn.Linear's layout
    hidden = matvecs_triton(xs, downs, acts, transposed=every)
    return matvecs_triton(hidden, ups, transposed=every)


def fits(x: torch.Tensor, head_size: int = 1) -> bool:
    """Whether TimeMix takes the kernel for a block input x (B, 1, C): switched on, float32,
    no autograd, a power-of-two head size, a device the kernels run on (the channel mix asks the same,
    without a head size, for its fused projections). The generation stepper switches it on only where the
    products' kernel passed its device check (`matvec_triton.checked`)."""
    return (_ENABLED and x.dtype == torch.float32 and not torch.is_grad_enabled() and triton is not None
            and not head_size & (head_size - 1)
            and (x.is_cuda or (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")))
