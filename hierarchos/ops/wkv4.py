"""RWKV-4 time mixing (WKV-4, the original project's cell) as pure functions: scan, step, chunked,
and the dispatcher (the fused Triton kernel for CUDA is `wkv4_triton.py`).

Per channel, with decay w = -exp(time_decay) < 0 and bonus u = time_first, the recurrence
over the live (non-frozen) tokens is

    a_t = e^w a_{t-1} + e^{k_t} v_t,    b_t = e^w b_{t-1} + e^{k_t}
    o_t = (a_{t-1} + e^{u + k_t} v_t) / (b_{t-1} + e^{u + k_t})

stored as (aa, bb, pp) with a = aa * e^pp, b = bb * e^pp and pp the running maximum of the
exponents seen (the original's overflow guard), so pp_t = max(pp_{t-1} + w, k_t). The empty
state is aa = bb = 0, pp = EMPTY_PP. A frozen token (mask (B, T), True = frozen) writes nothing:
aa, bb, pp stay as they are (no decay either), while its output is still computed from the state
and its own bonus term, so a pass over a frozen token equals not running it for later tokens.
Every path computes in float32 (float64 for float64 inputs) with autocast off, and returns
(o (B, T, C), (aa, bb, pp) each (B, C)).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .amp import autocast_off
from .wkv_inputs import compute_dtype
from .wkv4_triton import triton_unavailable_reason, wkv4_triton_prepared

EMPTY_PP = -1e38    # the original's initial pp: exp(EMPTY_PP - anything finite) == 0, and it fits float32
IMPLS = ("auto", "reference", "step", "chunked", "triton")
ENV_IMPL = "HIERARCHOS_WKV_IMPL"  # shared with wkv7: 'reference' selects the scan here too


def empty_state(batch: int, channels: int, device=None, dtype=torch.float32):
    """(aa, bb, pp) of a state that has seen nothing."""
    zeros = torch.zeros(batch, channels, device=device, dtype=dtype)
    return zeros, zeros.clone(), torch.full_like(zeros, EMPTY_PP)


def _prepare(time_decay, time_first, k, v, state, frozen):
    """Shapes checked, everything in the compute dtype; returns w, u, k, v, (aa, bb, pp), live."""
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"wkv4: k and v must share one (B, T, C) shape, got {tuple(k.shape)}, {tuple(v.shape)}")
    B, T, C = k.shape
    if time_decay.shape != (C,) or time_first.shape != (C,):
        raise ValueError(f"wkv4: time_decay and time_first must be ({C},), got "
                         f"{tuple(time_decay.shape)}, {tuple(time_first.shape)}")
    dtype = compute_dtype(k, v, time_decay, time_first)
    w = -torch.exp(time_decay.to(dtype))
    u, k, v = time_first.to(dtype), k.to(dtype), v.to(dtype)
    if state is None:
        state = empty_state(B, C, k.device, dtype)
    else:
        if len(state) != 3 or any(s.shape != (B, C) for s in state):
            raise ValueError(f"wkv4: state must be three (B, C) = {(B, C)} tensors (aa, bb, pp)")
        state = tuple(s.to(dtype) for s in state)
    if frozen is not None and frozen.shape != (B, T):
        raise ValueError(f"wkv4: frozen must be (B, T) = {(B, T)}, got {tuple(frozen.shape)}")
    live = None if frozen is None else ~frozen.bool()
    return w, u, k, v, state, live


# ----------------------------------------------------------------------------- scans


def wkv4_reference(time_decay, time_first, k, v, state=None, frozen=None):
    """Ground truth: the original's stable recurrence, one token at a time."""
    w, u, k, v, (aa, bb, pp), live = _prepare(time_decay, time_first, k, v, state, frozen)
    outputs = []
    for t in range(k.shape[1]):
        kt, vt = k[:, t], v[:, t]
        # output: the state so far plus this token with the bonus u
        ww = u + kt
        p = torch.maximum(pp, ww)
        e1, e2 = torch.exp(pp - p), torch.exp(ww - p)
        outputs.append((e1 * aa + e2 * vt) / (e1 * bb + e2))
        # update: decay the state once, add this token
        ww = pp + w
        p = torch.maximum(ww, kt)
        e1, e2 = torch.exp(ww - p), torch.exp(kt - p)
        new = (e1 * aa + e2 * vt, e1 * bb + e2, p)
        if live is not None:  # a frozen token leaves the state as it was
            keep = live[:, t, None]
            new = tuple(torch.where(keep, n, old) for n, old in zip(new, (aa, bb, pp)))
        aa, bb, pp = new
    o = torch.stack(outputs, dim=1) if outputs else k.new_zeros(k.shape)
    return o, (aa, bb, pp)


def wkv4_step(time_decay, time_first, k, v, state=None, frozen=None):
    """One token (generation): k, v (B, C), frozen (B,) or None; returns (o (B, C), state).

    The scan's arithmetic for a single token without the (B, T) bookkeeping; a frozen row's
    state comes back bit-for-bit unchanged."""
    w, u, k, v, (aa, bb, pp), live = _prepare(time_decay, time_first, k[:, None], v[:, None], state,
                                              None if frozen is None else frozen[:, None])
    k, v = k[:, 0], v[:, 0]
    with_bonus = u + k
    top = torch.maximum(pp, with_bonus)
    from_state, from_token = torch.exp(pp - top), torch.exp(with_bonus - top)
    out = (from_state * aa + from_token * v) / (from_state * bb + from_token)
    decayed = pp + w
    new_pp = torch.maximum(decayed, k)
    from_state, from_token = torch.exp(decayed - new_pp), torch.exp(k - new_pp)
    new = (from_state * aa + from_token * v, from_state * bb + from_token, new_pp)
    if live is not None:
        new = tuple(torch.where(live, n, old) for n, old in zip(new, (aa, bb, pp)))
    return out, new


# ----------------------------------------------------------------------------- chunked


def wkv4_chunked(time_decay, time_first, k, v, state=None, frozen=None, chunk_size=16):
    """Chunk-parallel WKV-4 (CPU or GPU, differentiable by autograd): no loop over tokens.

    Inside a chunk of L tokens, with c_i the number of live tokens up to i (inclusive) and
    e_t = c_t - live_t the number before t, token i < t reaches the output of t with the
    exponent w (e_t - c_i) + k_i, token t itself with u + k_t, and the chunk's start state with
    pp + w e_t. Every (t, i) exponent is formed from the integer gap times w (never as a
    difference of two large sums, so any decay stays exact), a row maximum is subtracted, and
    the weighted sums are plain reductions over i: (B, chunks, L, L, C) memory, hence small L.
    Each chunk's end state is the same construction at t = end; a loop over chunks (T / L
    iterations of elementwise work) carries (aa, bb, pp) across, with pp the same running
    maximum as the scan's. T is padded with frozen tokens.
    """
    if chunk_size < 1:
        raise ValueError(f"wkv4_chunked: chunk_size must be >= 1, got {chunk_size}")
    w, u, k, v, (aa, bb, pp), live = _prepare(time_decay, time_first, k, v, state, frozen)
    B, T, C = k.shape
    if T == 0:
        return k.new_zeros(k.shape), (aa, bb, pp)
    L = min(chunk_size, T)
    n = -(-T // L)
    pad = n * L - T
    live = torch.ones(B, T, dtype=torch.bool, device=k.device) if live is None else live
    live = F.pad(live, (0, pad), value=False).view(B, n, L)
    k = F.pad(k, (0, 0, 0, pad)).view(B, n, L, C)
    v = F.pad(v, (0, 0, 0, pad)).view(B, n, L, C)
    neg_inf = k.new_full((), float("-inf"))  # a fill, not a host copy: capturable in a CUDA graph

    count = live.to(k.dtype).cumsum(-1)                        # c_t (B, n, L)
    before = count - live.to(k.dtype)                          # e_t
    # exponents of token i (columns) as seen from the output of token t (rows): (B, n, L, L, C)
    gap = (before[..., :, None] - count[..., None, :]).clamp(min=0)
    rows = torch.arange(L, device=k.device)
    earlier = (rows[None, :] < rows[:, None]) & live[..., None, :]            # i < t and i live
    diagonal = (rows[None, :] == rows[:, None])[..., None]                     # (L, L, 1)
    pair = torch.where(earlier[..., None], gap[..., None] * w + k[:, :, None], neg_inf)
    pair = torch.where(diagonal, (u + k)[:, :, :, None], pair)               # own token with the bonus

    # each chunk's own end state (what its live tokens add), as (aa, bb, pp) with its own maximum
    to_end = torch.where(live[..., None], (count[..., -1:] - count)[..., None] * w + k, neg_inf)  # (B, n, L, C)
    end_pp = to_end.amax(dim=2).clamp(min=EMPTY_PP)                           # (B, n, C)
    end_weight = torch.exp(to_end - end_pp[:, :, None])
    end_aa, end_bb = (end_weight * v).sum(2), end_weight.sum(2)
    end_decay = count[..., -1:] * w                                          # (B, n, C): w per live token

    starts = []  # (aa, bb, pp) at each chunk's start
    for c in range(n):
        starts.append((aa, bb, pp))
        decayed = pp + end_decay[:, c]
        p = torch.maximum(decayed, end_pp[:, c])
        e1, e2 = torch.exp(decayed - p), torch.exp(end_pp[:, c] - p)
        aa, bb, pp = e1 * aa + e2 * end_aa[:, c], e1 * bb + e2 * end_bb[:, c], p
    start_aa, start_bb, start_pp = (torch.stack(s, dim=1)[:, :, None] for s in zip(*starts))  # (B, n, 1, C)

    from_start = start_pp + before[..., None] * w                            # (B, n, L, C)
    # the maximum only keeps exp in range; o does not depend on it, so no gradient through it
    top = torch.maximum(pair.amax(dim=3), from_start).detach()
    weight = torch.exp(pair - top[:, :, :, None])
    start_weight = torch.exp(from_start - top)
    num = (weight * v[:, :, None]).sum(3) + start_weight * start_aa
    den = weight.sum(3) + start_weight * start_bb
    o = (num / den).reshape(B, n * L, C)[:, :T]
    return o, (aa, bb, pp)


# ----------------------------------------------------------------------------- dispatch


def resolve_impl(impl: str, T: int, device: torch.device | str | None = None, float64: bool = False) -> str:
    """'auto' (or $HIERARCHOS_WKV_IMPL=reference) -> the scan; the step for T == 1; for longer
    inputs the Triton kernel on CUDA where triton runs (float32: it computes in float32, so float64
    inputs keep the chunked form's float64), else chunked."""
    if impl not in IMPLS:
        raise ValueError(f"wkv4: unknown impl {impl!r}; expected one of {IMPLS}")
    if impl == "auto" and os.environ.get(ENV_IMPL, "").strip() == "reference":
        return "reference"  # other values name WKV-7 kernels; they leave WKV-4 on its own choice
    if impl != "auto":
        return impl
    if T == 1:
        return "step"
    cuda = device is not None and torch.device(device).type == "cuda"
    return "triton" if cuda and not float64 and not triton_unavailable_reason(device) else "chunked"


def wkv4(time_decay, time_first, k, v, state=None, frozen=None, impl="auto", chunk_size=16):
    """Run WKV-4 with the chosen implementation; k, v (B, T, C), state (aa, bb, pp) or None."""
    float64 = compute_dtype(time_decay, time_first, k, v) == torch.float64
    name = resolve_impl(impl, k.shape[1], k.device, float64)
    with autocast_off(k.device.type):  # exp and the running sums stay float32 under autocast
        if name == "triton":
            w, u, k, v, state, live = _prepare(time_decay, time_first, k, v, state, frozen)
            return wkv4_triton_prepared(w, u, k, v, state, live)
        if name == "chunked":
            return wkv4_chunked(time_decay, time_first, k, v, state, frozen, chunk_size=chunk_size)
        if name == "step" and k.shape[1] == 1:
            out, state = wkv4_step(time_decay, time_first, k[:, 0], v[:, 0], state,
                                   None if frozen is None else frozen[:, 0])
            return out[:, None], state
        return wkv4_reference(time_decay, time_first, k, v, state, frozen)
