"""RWKV "v8" block and stack: token shift, RWKV-7 time mix, SwiGLU channel mix, DeepEmbed gate.

Every pass runs over a whole sequence at once (the recurrence goes through
`hierarchos.ops.wkv7`) and carries a fixed-size state (two shift vectors and one
matrix per head per block). `time_mix="wkv4"` swaps in the original project's RWKV-4 cell
(`TimeMix4`, recurrence in `hierarchos.ops.wkv4`; state (aa, bb, pp) per channel). A `frozen` mask implements the frozen-token rule used
by the manager's pondering and the worker's shadow passes: a frozen token writes
nothing into the state (w=1, a=0, k=0 for the recurrence, and the token shift skips
it), so running a pass over a frozen token equals not running it at all.

`TimeMixWiring` (the config's tm_* fields) chooses the wiring around the RWKV-7 recurrence: ours
(RWKV-6-style data-dependent token shift, full-rank sigmoid gate, no value residual) or, switch by
switch, BlinkDL's published x070 one (static token shift, low-rank gate, value residual toward
the stack's first layer, x070's initial values). The recurrence is the same in every wiring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import TIME_MIXES, TM_GATES, TM_INITS, TM_TOKEN_SHIFTS
from ..ops import rwkv_step_triton as fused_step
from ..ops.matvec_triton import matvecs_triton, swiglu_triton
from ..ops.amp import to_autocast_dtype
from ..ops.compile_settings import before_compiling
from ..ops.wkv import wkv7, wkv7_no_grad
from ..ops.wkv_chunk_grad_triton import set_recompute_states
from ..ops.wkv4 import EMPTY_PP, wkv4
from .deepembed import DeepEmbedTables

# The recurrence as torch.compile must see it: an opaque call (its chunk loop, up to T / 16
# iterations, would be unrolled into the graph, and its C++/Triton paths are not traceable).
# Wrapping it with torch.compiler.disable imports torch._dynamo, about a second of every CLI
# start, so plain wkv7 stands here until something compiles (`make_recurrence_opaque`).
_wkv7_opaque = wkv7
_wkv4_opaque = wkv4
# WKV-4's chunked form holds (B, T, chunk, C) pairwise weights: chunks of at most 16 tokens
WKV4_MAX_CHUNK = 16


def make_recurrence_opaque() -> None:
    """Before any torch.compile of these blocks: the recurrence becomes a dynamo-disabled call (and the
    compile settings of `ops.compile_settings` are made)."""
    global _wkv7_opaque, _wkv4_opaque
    before_compiling()
    if _wkv7_opaque is wkv7:
        _wkv7_opaque = torch.compiler.disable(wkv7)
    if _wkv4_opaque is wkv4:
        _wkv4_opaque = torch.compiler.disable(wkv4)

# Low-rank widths of the data-dependent mixes (RWKV-6/7 style "LoRA" paths).
MIX_RANK = 32
DECAY_RANK = 64
ICLR_RANK = 32
# Number of token-shift targets of the time mix: receptance, decay, key, value, iclr, gate.
N_MIX = 6


def _f32(t: torch.Tensor) -> torch.Tensor:
    """The recurrence runs in float32 even under bf16/fp16 autocast (float64 stays float64)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def shift_tokens(x: torch.Tensor, prev: torch.Tensor, frozen: torch.Tensor | None):
    """Previous-token features for every position, and the carried shift vector.

    x: (B, T, C); prev: (B, C) the last live token before this call.
    With a frozen mask (B, T) the previous token of t is the last *non-frozen* one.
    """
    if x.shape[1] == 1:  # one token (generation): its previous token is the carried one, frozen or not
        if frozen is None:
            return prev[:, None], x[:, 0]
        return prev[:, None], torch.where(frozen[:, :1], prev, x[:, 0])
    if frozen is None:
        return torch.cat([prev[:, None], x[:, :-1]], dim=1), x[:, -1]
    B, T, C = x.shape
    positions = torch.arange(T, device=x.device).expand(B, T)
    live_upto = torch.where(frozen, torch.full_like(positions, -1), positions).cummax(dim=1).values
    before = torch.cat([torch.full_like(live_upto[:, :1], -1), live_upto[:, :-1]], dim=1)
    x_ext = torch.cat([prev[:, None], x], dim=1)  # index 0 holds the carried vector
    shifted = x_ext.gather(1, (before + 1)[..., None].expand(B, T, C))
    new_prev = x_ext.gather(1, (live_upto[:, -1:] + 1)[..., None].expand(B, 1, C))[:, 0]
    return shifted, new_prev


class HeadNorm(nn.Module):
    """Group norm with one group per head: a layer norm over each head's N channels (one fused
    kernel forward and backward; CPU group_norm is slow on one token), then a per-channel affine."""

    def __init__(self, n_heads: int, head_size: int, eps: float = 64e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_heads * head_size))
        self.bias = nn.Parameter(torch.zeros(n_heads * head_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, H, N) -> (B, T, H*N)
        normed = F.layer_norm(x, x.shape[-1:], eps=self.eps).flatten(2)
        return torch.addcmul(self.bias.to(normed.dtype), normed, self.weight.to(normed.dtype))


@dataclass(frozen=True)
class TimeMixWiring:
    """How the RWKV-7 time mix is wired around its recurrence (the config's tm_* fields).

    The defaults are hierarchos' own wiring; `TimeMixWiring(**TIME_MIX_WIRINGS["x070"])`-style
    settings give BlinkDL's published RWKV-7 (x070) time mix. Each field is one difference:
    token_shift  "ddlerp": RWKV-6's data-dependent lerps (a shared rank-32 path per target);
                 "static": x070's per-channel lerp weights, one vector per target
    gate         "sigmoid_full": sigmoid(W_g x) with a C x C W_g;
                 "lowrank": x070's sigmoid(x G1) G2 (rank ~5 sqrt(C), not bounded to (0, 1))
    value_residual  x070: every layer after the first lerps its value toward the first layer's
                 value of the same stack and token, with a data-dependent low-rank gate
    init         "hierarchos" or "x070" initial values of the parameters both forms share
    """

    token_shift: str = "ddlerp"
    gate: str = "sigmoid_full"
    value_residual: bool = False
    init: str = "hierarchos"

    @classmethod
    def from_config(cls, cfg) -> "TimeMixWiring":
        return cls(cfg.tm_token_shift, cfg.tm_gate, cfg.tm_value_residual, cfg.tm_init)

    def check(self) -> "TimeMixWiring":
        for name, value, choices in (("token_shift", self.token_shift, TM_TOKEN_SHIFTS),
                                     ("gate", self.gate, TM_GATES), ("init", self.init, TM_INITS)):
            if value not in choices:
                raise ValueError(f"TimeMixWiring: unknown {name} {value!r} (one of {choices})")
        return self


def x070_rank(scale: float, dim: int) -> int:
    """x070's suggested width of a low-rank path: scale * sqrt(C) rounded to a multiple of 32 (at
    least 32), capped at the width as our other low-rank paths are."""
    return min(dim, max(32, 32 * round(scale * math.sqrt(dim) / 32)))


def _orthogonal(rows: int, cols: int, gain: float) -> torch.Tensor:
    """An orthogonal (rows, cols) matrix times gain, x070's init of its up-projections and square
    weights (a tall matrix gets sqrt(rows / cols) more, as there)."""
    extra = math.sqrt(rows / cols) if rows > cols else 1.0
    return nn.init.orthogonal_(torch.empty(rows, cols), gain=gain * extra)


# x070's token-shift weight exponents per target (receptance, decay, key, value, iclr, gate): the
# weight on the previous token of channel c is 1 - (c / C) ** (p * (1 - layer / L))
X070_SHIFT_POWERS = (0.2, 0.9, 0.7, 0.7, 0.9, 0.2)


def _plain_linears(*modules: nn.Module) -> bool:
    """Whether every module is a plain bias-free nn.Linear, whose weight alone is its function (a LoRA or
    quantized wrapper is not: the fused one-token projections read `.weight` directly), watched by no hook
    (a hook observes module calls, which the fused products do not make)."""
    return all(type(m) is nn.Linear and m.bias is None and not (m._forward_hooks or m._forward_pre_hooks)
               for m in modules)


def _one_token_projection(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """linear(x) for one token x (B, 1, C_in) in the fused step: through `matvecs_triton` where the module
    is a plain Linear (the 125m output projection's launch 2.9 against cuBLAS's 3.2 us on an H100, and one
    kernel kind fewer in the step; BENCHMARKS.md, issue 17)."""
    if _plain_linears(linear):
        B = x.shape[0]
        return matvecs_triton([x.reshape(B, -1)], [linear.weight])[0].view(B, 1, -1)
    return linear(x)


class TimeMix(nn.Module):
    """RWKV-7 time mix: token shift, decay, in-context rate, delta-rule state; wired as `wiring` says."""

    def __init__(self, dim: int, head_size: int, layer_id: int, n_layers: int, wkv_chunk: int,
                 wiring: TimeMixWiring | None = None):
        super().__init__()
        self.wiring = wiring = (wiring or TimeMixWiring()).check()
        self.dim, self.head_size, self.n_heads = dim, head_size, dim // head_size
        self.wkv_chunk = wkv_chunk
        self.layer_id = layer_id
        depth = layer_id / max(1, n_layers - 1) if n_layers > 1 else 0.0
        ramp = torch.arange(dim) / dim
        mix_rank, decay_rank, iclr_rank = (min(r, dim) for r in (MIX_RANK, DECAY_RANK, ICLR_RANK))
        # token-shift mixes: `mix` (6, C) is the per-target lerp weight in both forms; ddlerp adds
        # a data-dependent rank-32 correction computed from one shared base lerp
        self.mix = nn.Parameter(torch.stack([1.0 - ramp.pow(0.3 + 0.5 * depth)] * N_MIX))
        if wiring.token_shift == "ddlerp":
            self.mix_base = nn.Parameter(1.0 - ramp.pow(1.0 - 0.5 * depth))
            self.mix_down = nn.Parameter(torch.empty(dim, N_MIX * mix_rank).uniform_(-1e-2, 1e-2))
            self.mix_up = nn.Parameter(torch.empty(N_MIX, mix_rank, dim).uniform_(-1e-2, 1e-2))
        # decay: log w = -exp(-softplus(-(w0 + lora)) - 0.5), in (-e^-0.5, 0)
        self.decay_base = nn.Parameter(-6.0 + 5.0 * ramp.pow(0.85 + depth))
        self.decay_down = nn.Parameter(torch.empty(dim, decay_rank).uniform_(-1e-2, 1e-2))
        self.decay_up = nn.Parameter(torch.empty(decay_rank, dim).uniform_(-1e-2, 1e-2))
        # in-context learning rate
        self.iclr_base = nn.Parameter(torch.zeros(dim))
        self.iclr_down = nn.Parameter(torch.empty(dim, iclr_rank).uniform_(-1e-2, 1e-2))
        self.iclr_up = nn.Parameter(torch.empty(iclr_rank, dim).uniform_(-1e-2, 1e-2))
        self.removal_scale = nn.Parameter(torch.full((dim,), 0.85))  # kappa = normalize(k * this)
        self.key_iclr_mix = nn.Parameter(torch.ones(dim))            # k <- k * (1 + (iclr - 1) * this)
        self.bonus = nn.Parameter(torch.full((self.n_heads, head_size), 0.1))
        self.receptance = nn.Linear(dim, dim, bias=False)
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        if wiring.gate == "sigmoid_full":
            self.gate = nn.Linear(dim, dim, bias=False)
        else:  # x070's gate starts as a constant vector (zero down-projection) and learns its input path
            gate_rank = x070_rank(5.0, dim)
            self.gate_down = nn.Parameter(torch.zeros(dim, gate_rank))
            self.gate_up = nn.Parameter(_orthogonal(gate_rank, dim, 0.1))
        self.value_residual = wiring.value_residual and layer_id > 0  # the first layer is the target
        # a bool, not the layer index, is what the forward reads: torch.compile guards on an int attribute's
        # value, so `layer_id == 0` compiled a variant per layer (4x the compiles of a 4-layer stack)
        self.sets_v_first = wiring.value_residual and layer_id == 0
        if self.value_residual:  # x070's init: mostly the first layer's value at the start (sigmoid(0.73))
            value_rank = x070_rank(1.7, dim)
            self.value_residual_base = nn.Parameter(0.73 - 0.4 * (torch.arange(dim) / max(1, dim - 1) - 0.5))
            self.value_residual_down = nn.Parameter(torch.zeros(dim, value_rank))
            self.value_residual_up = nn.Parameter(_orthogonal(value_rank, dim, 0.1))
        self.output = nn.Linear(dim, dim, bias=False)
        self.norm = HeadNorm(self.n_heads, head_size)
        for lin in (self.receptance, self.key, self.value) + ((self.gate,) if wiring.gate == "sigmoid_full" else ()):
            nn.init.uniform_(lin.weight, -0.5 / math.sqrt(dim), 0.5 / math.sqrt(dim))
        nn.init.normal_(self.output.weight, std=0.1 / math.sqrt(dim))
        if wiring.init == "x070":
            self._init_x070(layer_id, n_layers)

    @torch.no_grad()
    def _init_x070(self, layer_id: int, n_layers: int) -> None:
        """x070's initial values (its model constructor plus the weight init of its training script)
        for the parameters both wirings share; what only ddlerp or the full gate has keeps ours."""
        dim, N = self.dim, self.head_size
        depth = layer_id / max(1, n_layers - 1) if n_layers > 1 else 0.0
        shallow = 1.0 - layer_id / n_layers
        channel = torch.arange(dim, dtype=torch.float32)
        linear = channel / max(1, dim - 1) - 0.5                   # -0.5 .. 0.5 over the width
        within = (channel % N - (N - 1) / 2) / max(1, (N - 1) / 2)  # -1 .. 1 inside each head
        zigzag = within * within.abs()
        ramp = channel / dim
        self.mix.copy_(torch.stack([1.0 - ramp.pow(p * shallow) for p in X070_SHIFT_POWERS]))
        # decay: a wider spread than ours (-6 .. 0 plus a per-head zigzag); 0.5 offsets the soft clamp
        spread = -6.0 + 6.0 * (channel / max(1, dim - 1)).pow(1.0 + depth ** 0.3)
        self.decay_base.copy_(spread + 0.5 + 2.5 * zigzag)
        self.iclr_base.copy_(-0.19 + 0.3 * zigzag + 0.4 * linear)
        for down, up in ((self.decay_down, self.decay_up), (self.iclr_down, self.iclr_up)):
            down.zero_()  # the low-rank paths start at zero and learn through the orthogonal up side
            up.copy_(_orthogonal(*up.shape, 0.1))
        self.removal_scale.copy_(0.71 - 0.1 * linear)
        self.key_iclr_mix.fill_(1.02)
        self.bonus.fill_(-0.04)
        self.receptance.weight.copy_(_orthogonal(dim, dim, 1.0))
        self.value.weight.copy_(_orthogonal(dim, dim, 1.0))
        self.key.weight.copy_(_orthogonal(dim, dim, 0.1))
        self.output.weight.zero_()  # each block starts as the identity on the residual stream
        self.norm.weight.fill_(((1 + layer_id) / n_layers) ** 0.7)

    def _mixes(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The six token-shifted inputs as one (6, B, T, C) tensor (unbound by the caller: indexing
        it six times costs six zero-filled grads)."""
        if self.wiring.token_shift == "static":
            return torch.addcmul(x, delta, self.mix.to(x.dtype)[:, None, None])
        B, T, C = x.shape
        base = torch.addcmul(x, delta, self.mix_base.to(x.dtype))
        lora = torch.tanh(base @ self.mix_down).view(B * T, N_MIX, -1).transpose(0, 1)  # (6, B*T, R)
        lora = torch.bmm(lora, self.mix_up).view(N_MIX, B, T, C)  # bmm: einsum's dispatch costs ~0.1 ms a call
        return torch.addcmul(x, delta, self.mix.to(lora.dtype)[:, None, None] + lora)

    def forward(self, x, shift_prev, wkv_state, frozen=None, v_first=None):
        """Returns (output, new shift vector, new wkv state, v_first): v_first is this layer's value
        when it is its stack's first layer, else the one passed in (None unless value_residual)."""
        B, T, C = x.shape
        H, N = self.n_heads, self.head_size
        x = to_autocast_dtype(x)  # the mixes in bf16 under autocast (the state keeps its own dtype)
        x_prev, new_shift = shift_tokens(x, shift_prev.to(x.dtype), frozen)
        xr, xw, xk, xv, xa, xg = self._mixes(x, x_prev - x).unbind(0)

        fused = T == 1 and fused_step.fits(x, N)
        if fused and _plain_linears(self.receptance, self.key, self.value):  # one launch for the three
            r, k, v = (t.view(B, 1, C) for t in matvecs_triton(
                [xr.reshape(B, C), xk.reshape(B, C), xv.reshape(B, C)],
                [self.receptance.weight, self.key.weight, self.value.weight]))
        else:
            r, k, v = self.receptance(xr), self.key(xk), self.value(xv)
        if self.sets_v_first:
            v_first = v
        elif self.value_residual and v_first is None:
            raise ValueError("TimeMix: value_residual needs the first layer's value (v_first)")
        if fused:  # generation: the low-rank paths in two kernels, the tail in one
            out, new_wkv = self._fused_step(xw, xa, xg, xv, r, k, v, v_first, wkv_state, frozen)
            return out, new_shift.to(shift_prev.dtype), new_wkv, v_first
        if self.value_residual:
            lerp = torch.sigmoid(self.value_residual_base + (xv @ self.value_residual_down) @ self.value_residual_up)
            v = v + (v_first.to(v.dtype) - v) * lerp
        if self.wiring.gate == "sigmoid_full":
            g = torch.sigmoid(self.gate(xg))
        else:
            g = torch.sigmoid(xg @ self.gate_down) @ self.gate_up
        decay_logit = self.decay_base + torch.tanh(xw @ self.decay_down) @ self.decay_up
        log_w = -torch.exp(-F.softplus(-_f32(decay_logit)) - 0.5)
        iclr = torch.sigmoid(self.iclr_base + (xa @ self.iclr_down) @ self.iclr_up)
        kappa = F.normalize(_f32((k * self.removal_scale).view(B, T, H, N)), dim=-1)
        k = k * (1 + (iclr - 1) * self.key_iclr_mix)

        heads = lambda t: _f32(t.view(B, T, H, N))  # noqa: E731  (B, T, H, N)
        # r, k, v reach a sequence's recurrence in their own dtype (under autocast r and v are bf16
        # matmul outputs, so a float32 copy would hold the same values in twice the memory; k is float32
        # by now, scaled by float32 parameters); every path upcasts them exactly, the Triton kernel as it
        # loads them
        low = heads if T == 1 else (lambda t: t.view(B, T, H, N))  # noqa: E731
        r_h, k_h, v_h, iclr_h, log_w_h = low(r), low(k), low(v), heads(iclr), log_w.view(B, T, H, N)
        b_h = kappa * iclr_h
        if frozen is not None:  # frozen-token rule: w=1, a=0, k=0 writes nothing (a bool factor keeps each dtype)
            live = (~frozen)[:, :, None, None]
            log_w_h, k_h, b_h = log_w_h * live, k_h * live, b_h * live
        # one token is a few ops that torch.compile traces and fuses (the compiled generation step; a
        # dynamo-disabled call is not allowed inside its nested regions); longer calls stay opaque: as one
        # operator when traced without gradients (the compiled prefill: no graph break), else as a
        # dynamo-disabled call with its autograd
        if T == 1:
            recurrence = wkv7
        elif torch.compiler.is_compiling() and not torch.is_grad_enabled():
            recurrence = wkv7_no_grad  # (a custom op: takes state and chunk_size by name too)
        else:
            recurrence = _wkv7_opaque
        out, new_wkv = recurrence(r_h, log_w_h, k_h, v_h, -kappa, b_h, state=wkv_state, chunk_size=self.wkv_chunk)
        out = self.norm(out.view(B, T, H, N))  # in the recurrence's precision (float32 under autocast)
        bonus = ((_f32(r_h) * _f32(k_h) * self.bonus).sum(-1, keepdim=True) * _f32(v_h)).reshape(B, T, C)
        out = self.output((out + bonus).to(g.dtype) * g)
        return out, new_shift.to(shift_prev.dtype), new_wkv, v_first

    def _fused_step(self, xw, xa, xg, xv, r, k, v, v_first, wkv_state, frozen):
        """`forward` after the projections for one token through `hierarchos.ops.rwkv_step_triton`: every
        low-rank path (decay, in-context rate, x070's gate and value residual) in two kernels, the value
        residual's lerp here, everything elementwise and the recurrence in the time-mix kernel; the full
        gate's matmul stays a matmul. Returns (output, new wkv state)."""
        B, C = r.shape[0], self.dim
        flat = lambda t: t.reshape(B, C)  # noqa: E731
        full_gate = self.wiring.gate == "sigmoid_full"
        paths = [(xw, self.decay_down, self.decay_up, "tanh"), (xa, self.iclr_down, self.iclr_up, "none")]
        if not full_gate:
            paths.append((xg, self.gate_down, self.gate_up, "sigmoid"))
        if self.value_residual:
            paths.append((xv, self.value_residual_down, self.value_residual_up, "none"))
        xs, downs, ups, acts = zip(*paths)
        lora = fused_step.lowrank_paths_triton([flat(x) for x in xs], downs, ups, acts)
        gate = flat(self.gate(xg)) if full_gate else lora[2]
        residual = (flat(v_first).to(v.dtype), lora[-1], self.value_residual_base) if self.value_residual else None
        out, new_wkv = fused_step.timemix_step_triton(
            flat(r), flat(k), flat(v), lora[0], lora[1], gate, wkv_state,
            None if frozen is None else frozen.reshape(B), self.decay_base, self.iclr_base, self.removal_scale,
            self.key_iclr_mix, self.bonus, self.norm.weight, self.norm.bias, self.norm.eps, full_gate,
            value_residual=residual)  # (the value residual's lerp inside the kernel: one launch less a layer)
        return _one_token_projection(self.output, out.view(B, 1, C)), new_wkv


class TimeMix4(nn.Module):
    """RWKV-4 time mix (seeds 001/004): token shift with static per-channel mixes, per-channel
    decay (w = -exp(time_decay)) and bonus (time_first), output = W_o (sigmoid(r) * WKV-4)."""

    def __init__(self, dim: int, layer_id: int, n_layers: int, wkv_chunk: int):
        super().__init__()
        self.wkv_chunk = min(wkv_chunk, WKV4_MAX_CHUNK)
        # RWKV-4's initialisation: decay speeds spread over the channels (fast to slow), deeper
        # layers remember longer; the bonus zigzags around log(0.3)
        depth = layer_id / max(1, n_layers - 1) if n_layers > 1 else 0.0
        shallow = 1.0 - layer_id / max(1, n_layers)
        channel = torch.arange(dim) / max(1, dim - 1)
        ramp = torch.arange(dim) / dim
        self.time_decay = nn.Parameter(-5.0 + 8.0 * channel.pow(0.7 + 1.3 * depth))
        zigzag = 0.5 * (((torch.arange(dim) + 1) % 3) - 1).float()
        self.time_first = nn.Parameter(torch.full((dim,), math.log(0.3)) + zigzag)
        self.mix_key = nn.Parameter(ramp.pow(shallow))
        self.mix_value = nn.Parameter(ramp.pow(shallow) + 0.3 * depth)
        self.mix_receptance = nn.Parameter(ramp.pow(0.5 * shallow))
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        self.receptance = nn.Linear(dim, dim, bias=False)
        self.output = nn.Linear(dim, dim, bias=False)
        for lin in (self.receptance, self.key, self.value):
            nn.init.uniform_(lin.weight, -0.5 / math.sqrt(dim), 0.5 / math.sqrt(dim))
        nn.init.normal_(self.output.weight, std=0.1 / math.sqrt(dim))

    def forward(self, x, shift_prev, wkv_state, frozen=None):
        """wkv_state: (B, 3, C) holding aa, bb, pp; frozen tokens write nothing into it."""
        x = to_autocast_dtype(x)
        x_prev, new_shift = shift_tokens(x, shift_prev.to(x.dtype), frozen)
        k = self.key(torch.lerp(x_prev, x, self.mix_key.to(x.dtype)))
        v = self.value(torch.lerp(x_prev, x, self.mix_value.to(x.dtype)))
        r = self.receptance(torch.lerp(x_prev, x, self.mix_receptance.to(x.dtype)))
        wkv, new_state = _wkv4_opaque(self.time_decay, self.time_first, k, v, tuple(wkv_state.unbind(1)), frozen,
                                      chunk_size=self.wkv_chunk)
        out = self.output(torch.sigmoid(r) * wkv.to(r.dtype))
        return out, new_shift.to(shift_prev.dtype), torch.stack(new_state, dim=1).to(wkv_state.dtype)


class ChannelMix(nn.Module):
    """SwiGLU feed-forward on token-shifted input; hidden units gated by the DeepEmbed row of the token."""

    def __init__(self, dim: int, ffn_dim: int, layer_id: int, n_layers: int):
        super().__init__()
        depth = layer_id / max(1, n_layers - 1) if n_layers > 1 else 0.0
        self.mix = nn.Parameter(1.0 - (torch.arange(dim) / dim).pow(1.0 - 0.5 * depth))
        self.gate = nn.Linear(dim, ffn_dim, bias=False)
        self.up = nn.Linear(dim, ffn_dim, bias=False)
        self.down = nn.Linear(ffn_dim, dim, bias=False)
        nn.init.normal_(self.down.weight, std=0.1 / math.sqrt(ffn_dim))

    def forward(self, x, shift_prev, deep_gate=None, frozen=None):
        x = to_autocast_dtype(x)
        x_prev, new_shift = shift_tokens(x, shift_prev.to(x.dtype), frozen)
        xk = torch.addcmul(x, x_prev - x, self.mix.to(x.dtype))
        B, T, C = x.shape
        fused = T == 1 and fused_step.fits(x) and (deep_gate is None or (
            deep_gate.dtype == torch.float32 and tuple(deep_gate.shape) == (B, 1, self.up.out_features)))
        if fused and _plain_linears(self.gate, self.up):  # generation: the products and the activation in one launch
            hidden = swiglu_triton(xk.reshape(B, C), self.gate.weight, self.up.weight,
                                   None if deep_gate is None else deep_gate.reshape(B, -1)).view(B, 1, -1)
        else:
            hidden = F.silu(self.gate(xk)) * self.up(xk)
            if deep_gate is not None:
                hidden = hidden * deep_gate
        return self.down(hidden), new_shift.to(shift_prev.dtype)  # (cuBLAS's launch beat ours at K = 4C)


class RWKVBlock(nn.Module):
    def __init__(self, dim, head_size, ffn_dim, layer_id, n_layers, wkv_chunk, time_mix="rwkv7", wiring=None):
        super().__init__()
        self.ln_time = nn.LayerNorm(dim)
        self.ln_channel = nn.LayerNorm(dim)
        if time_mix == "wkv4":
            self.time_mix = TimeMix4(dim, layer_id, n_layers, wkv_chunk)
        else:
            self.time_mix = TimeMix(dim, head_size, layer_id, n_layers, wkv_chunk, wiring)
        self.channel_mix = ChannelMix(dim, ffn_dim, layer_id, n_layers)

    def forward(self, x, tm_shift, wkv_state, cm_shift, deep_gate=None, frozen=None, v_first=None):
        """Returns (x, tm_shift, wkv_state, cm_shift, v_first); v_first is the stack's first-layer
        value for the value residual (None without one), passed from block to block."""
        if isinstance(self.time_mix, TimeMix4):
            att, tm_shift, wkv_state = self.time_mix(self.ln_time(x), tm_shift, wkv_state, frozen)
        else:
            att, tm_shift, wkv_state, v_first = self.time_mix(self.ln_time(x), tm_shift, wkv_state, frozen, v_first)
        x = x + att
        ffn, cm_shift = self.channel_mix(self.ln_channel(x), cm_shift, deep_gate, frozen)
        return x + ffn, tm_shift, wkv_state, cm_shift, v_first


class RWKVStack(nn.Module):
    """A stack of RWKV blocks with one DeepEmbed table (or one per block) and a stacked state.

    State: dict with 'tm_shift' (L, B, C), 'wkv' (L, B, H, N, N) float32, 'cm_shift' (L, B, C);
    with time_mix "wkv4", 'wkv' is (L, B, 3, C) float32: aa, bb, pp per channel.
    """

    def __init__(self, dim: int, n_layers: int, head_size: int, ffn_mult: int, vocab_size: int,
                 use_deepembed: bool, per_block_deepembed: bool, wkv_chunk: int, time_mix: str = "rwkv7",
                 wiring: TimeMixWiring | None = None):
        super().__init__()
        if time_mix not in TIME_MIXES:
            raise ValueError(f"RWKVStack: unknown time_mix {time_mix!r}")
        self.dim, self.n_layers, self.head_size, self.time_mix = dim, n_layers, head_size, time_mix
        ffn_dim = ffn_mult * dim
        self.blocks = nn.ModuleList(
            RWKVBlock(dim, head_size, ffn_dim, i, n_layers, wkv_chunk, time_mix, wiring) for i in range(n_layers))
        self.per_block_deepembed = per_block_deepembed
        self.deepembed = DeepEmbedTables(vocab_size, ffn_dim, n_layers, per_block_deepembed) if use_deepembed else None
        self.gradient_checkpointing = False

    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> dict:
        L, C, N = self.n_layers, self.dim, self.head_size
        wkv_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        if self.time_mix == "wkv4":  # aa = bb = 0, pp = EMPTY_PP: nothing seen yet
            wkv = torch.zeros(L, batch_size, 3, C, device=device, dtype=wkv_dtype)
            wkv[:, :, 2] = EMPTY_PP
        else:
            wkv = torch.zeros(L, batch_size, C // N, N, N, device=device, dtype=wkv_dtype)
        return {
            "tm_shift": torch.zeros(L, batch_size, C, device=device, dtype=dtype),
            "wkv": wkv,
            "cm_shift": torch.zeros(L, batch_size, C, device=device, dtype=dtype),
        }

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, state: dict, frozen: torch.Tensor | None = None):
        """x: (B, T, C) inputs; tokens: (B, T) ids for DeepEmbed; frozen: (B, T) bool or None."""
        tm, wkv, cm = [], [], []
        gates = self.deepembed.gates(tokens, len(self.blocks)) if self.deepembed is not None else None
        # the value residual's target: the first block's value of these same tokens, computed in this
        # call, so the step form passes it along exactly as the parallel form does (no new state)
        v_first = None
        for i, block in enumerate(self.blocks):
            gate = next(gates) if gates is not None else None
            args = (x, state["tm_shift"][i], state["wkv"][i], state["cm_shift"][i], gate, frozen, v_first)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x, s_tm, s_wkv, s_cm, v_first = checkpoint(block, *args, use_reentrant=False)
            else:
                x, s_tm, s_wkv, s_cm, v_first = block(*args)
            tm.append(s_tm), wkv.append(s_wkv), cm.append(s_cm)
        return x, {"tm_shift": torch.stack(tm), "wkv": torch.stack(wkv), "cm_shift": torch.stack(cm)}


def recompile_limit_name() -> str:
    """dynamo's cap on compiled variants per code object: `recompile_limit` (torch >= 2.6), earlier
    `cache_size_limit` (kept there as a deprecated alias, which a `delattr` -- unittest.mock,
    monkeypatch -- hides for the rest of the process)."""
    import torch._dynamo

    return "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"


def allow_recompiles(n: int = 64) -> None:
    """Raise dynamo's variant cap to at least n: one code object (a block's forward) serves every
    block, pass and shape, more variants than the default cap of 8."""
    import torch._dynamo

    limit = recompile_limit_name()
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), n))


def compile_blocks(model: nn.Module, backend: str = "inductor", fall_back: bool = False,
                   memory_budget: float | None = None) -> int:
    """torch.compile every RWKV block of `model` in place (`nn.Module.compile`: parameter names and
    state dicts stay as they are), and the chunk segments of its long-term memory (anything with a
    `compile_segments`: `LongTermMemory`, whose top-k addressing stays eager); returns the number of
    blocks compiled. `fall_back`: a block whose compile fails runs eagerly (dynamo's suppress_errors,
    process-wide) instead of raising. `memory_budget` (0 < b <= 1; None leaves torch's setting): the
    compiled regions keep about that fraction of the activations their default partition would save
    for the backward and recompute the rest in it, cheapest first by FLOPs (torch's
    `activation_memory_budget`, process-wide, read when each region compiles: set before the first call);
    below 1 the recurrence's chunk-parallel backward also makes its chunks' start states again instead of
    holding them from the forward (`wkv_chunk_grad_triton.set_recompute_states`, process-wide too), and
    the memory its chunks' tables (`LongTermMemory.recompute_chunks`).

    Blocks, not the whole model: the HRM loop around them has data-dependent pass counts and
    several sequence lengths (watch over T tokens, pondering over T / h_stride plan points, the
    one-token step), and compiling it whole did not finish its first step in 200 s on an H100.
    A block is the fusible part (norms, token shift, the low-rank mixes, gates, SwiGLU); the
    recurrence inside it stays an opaque call. One code object serves every block, so the
    cache holds the variants (frozen mask or not, DeepEmbed gate or not, lengths) for all of them.
    """
    import torch._dynamo

    make_recurrence_opaque()
    if memory_budget is not None:
        import torch._functorch.config

        if not 0 < memory_budget <= 1:
            raise ValueError(f"compile_blocks: memory_budget must be in (0, 1], got {memory_budget}")
        torch._functorch.config.activation_memory_budget = float(memory_budget)
        set_recompute_states(memory_budget < 1)
    if fall_back:
        torch._dynamo.config.suppress_errors = True
    allow_recompiles()
    count = 0
    for module in model.modules():
        if isinstance(module, RWKVBlock):
            module.compile(backend=backend, dynamic=None)
            count += 1
        elif hasattr(module, "compile_segments"):  # the memory (no import of model.memory here)
            module.compile_segments(backend)
            if memory_budget is not None:
                module.recompute_chunks(memory_budget < 1)
    return count


class BlockCalls:
    """Calls for every RWKV block of a model (`make_call(block)`, a compiled form of its forward, say),
    in force only inside `with self:`; outside, the blocks run as before (eager, or as `compile_blocks`
    left them). The generation step and the prompt prefill each install their own compiled blocks for
    their own calls this way, so one model serves training, prefill and the step, each compiled as it
    needs (static one-token shapes for the step, dynamic lengths for the prefill)."""

    def __init__(self, model: nn.Module, make_call):
        self.blocks = [m for m in model.modules() if isinstance(m, RWKVBlock)]
        self.calls = [make_call(block) for block in self.blocks]
        self._saved: list = []

    def __enter__(self) -> "BlockCalls":
        self._saved.append([block._compiled_call_impl for block in self.blocks])
        for block, call in zip(self.blocks, self.calls):
            block._compiled_call_impl = call
        return self

    def __exit__(self, *exc) -> None:
        for block, call in zip(self.blocks, self._saved.pop()):
            block._compiled_call_impl = call


def uncompile_blocks(model: nn.Module) -> None:
    """Undo `compile_blocks` (nn.Module.compile keeps the compiled call beside the module)."""
    for module in model.modules():
        if isinstance(module, RWKVBlock):
            module._compiled_call_impl = None
        elif hasattr(module, "uncompile_segments"):
            module.uncompile_segments()
