"""WKV-4 (the original RWKV-4 time mix) in Triton: forward and backward, sequential over T.

One program owns a block of channels of one batch row and steps through the tokens with the
stabilised state (aa, bb, pp) in registers, as the original project's CUDA kernel does: every
channel is its own scalar recurrence, so the parallel form needs no chunking and no (L x L)
tiles. The forward writes the state entering every token (three (B, T, C) planes) when a gradient
is wanted; the backward walks the tokens in reverse from those states with the adjoints of
(aa, bb, pp) in registers. `wkv4_manual_backward` is the same derivation in plain PyTorch
(float64-capable), checked against autograd of `wkv4_reference`; it and the kernels follow
torch.maximum's rule at ties (half the gradient to each side), so they match autograd exactly.

Inputs arrive prepared by `hierarchos.ops.wkv4` (w = -exp(time_decay), u = time_first, the state,
the live mask): this module does not import it (it is the lower layer).
"""

from __future__ import annotations

import contextlib
import functools

import torch

from ..errors import HierarchosError
from .wkv_triton import triton_unavailable_reason

try:  # optional, as for the WKV-7 kernel: without it 'auto' never picks this path
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
except Exception:  # ImportError, or a broken install underneath
    triton = None

BLOCK = 32  # channels per program: one warp, and B * C / 32 programs to hide each step's latency


# ----------------------------------------------------------------------------- reference backward


def _token(w, u, aa, bb, pp, k, v):
    """One token's output and updated state from the state before it (the scan's arithmetic)."""
    ww1 = u + k
    p1 = torch.maximum(pp, ww1)
    e1, e2 = torch.exp(pp - p1), torch.exp(ww1 - p1)
    num, den = e1 * aa + e2 * v, e1 * bb + e2
    ww2 = pp + w
    p2 = torch.maximum(ww2, k)
    f1, f2 = torch.exp(ww2 - p2), torch.exp(k - p2)
    return (ww1, p1, e1, e2, num, den, ww2, p2, f1, f2), (f1 * aa + f2 * v, f1 * bb + f2, p2)


def _tie_share(a, b):
    """d max(a, b) / d a under torch.maximum's rule: 1, 0, or 1/2 at a tie."""
    return torch.where(a > b, 1.0, torch.where(a == b, 0.5, 0.0)).to(a.dtype)


def wkv4_manual_backward(w, u, k, v, state, live, d_o, d_state):
    """The kernels' backward in plain PyTorch: w, u (C,), k, v, d_o (B, T, C), state and d_state
    three (B, C) tensors (aa, bb, pp), live (B, T) bool or None. Per token t, in reverse, with
    (gaa, gbb, gpp) the adjoint of the state after t, the output's adjoint and (for a live token)
    the update's are pulled back through the stabilised arithmetic of `_token`.
    Returns (dw (C,), du (C,), dk, dv, (daa, dbb, dpp) of the initial state)."""
    B, T, C = k.shape
    aa, bb, pp = state
    before = []
    for t in range(T):  # the states entering each token
        before.append((aa, bb, pp))
        _, new = _token(w, u, aa, bb, pp, k[:, t], v[:, t])
        if live is not None:
            keep = live[:, t, None]
            new = tuple(torch.where(keep, n, o) for n, o in zip(new, (aa, bb, pp)))
        aa, bb, pp = new
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    dw, du = torch.zeros_like(k[:, 0]), torch.zeros_like(k[:, 0])
    gaa, gbb, gpp = (g.clone() for g in d_state)
    for t in reversed(range(T)):
        aa, bb, pp = before[t]
        kt, vt, go = k[:, t], v[:, t], d_o[:, t]
        (ww1, p1, e1, e2, num, den, ww2, p2, f1, f2), _ = _token(w, u, aa, bb, pp, kt, vt)
        # the output o = num / den
        g_num = go / den
        g_den = -go * num / (den * den)
        g_e1, g_e2 = g_num * aa + g_den * bb, g_num * vt + g_den
        o_aa, o_bb, o_v = g_num * e1, g_den * e1, g_num * e2
        g_p1 = -g_e1 * e1 - g_e2 * e2
        o_pp = g_e1 * e1 + g_p1 * _tie_share(pp, ww1)
        g_ww1 = g_e2 * e2 + g_p1 * _tie_share(ww1, pp)
        # the update, from the adjoint of the state after t
        g_f1, g_f2 = gaa * aa + gbb * bb, gaa * vt + gbb
        g_p2 = -g_f1 * f1 - g_f2 * f2 + gpp
        g_ww2 = g_f1 * f1 + g_p2 * _tie_share(ww2, kt)
        n_k = g_f2 * f2 + g_p2 * _tie_share(kt, ww2)
        n_aa, n_bb, n_pp, n_v, n_w = gaa * f1, gbb * f1, g_ww2, gaa * f2, g_ww2
        if live is not None:  # a frozen token passes the state's adjoint through unchanged
            keep = live[:, t, None]
            n_aa, n_bb, n_pp = (torch.where(keep, n, g) for n, g in ((n_aa, gaa), (n_bb, gbb), (n_pp, gpp)))
            n_k, n_v, n_w = (torch.where(keep, n, 0.0) for n in (n_k, n_v, n_w))
        dk[:, t] = g_ww1 + n_k
        dv[:, t] = o_v + n_v
        du = du + g_ww1
        dw = dw + n_w
        gaa, gbb, gpp = o_aa + n_aa, o_bb + n_bb, o_pp + n_pp
    return dw.sum(0), du.sum(0), dk, dv, (gaa, gbb, gpp)


# ----------------------------------------------------------------------------- kernels


def _wkv4_fwd_kernel(w_ptr, u_ptr, k_ptr, v_ptr, live_ptr, s_ptr, o_ptr, s_out_ptr, saved_ptr, T, C,
                     HAS_LIVE: tl.constexpr, SAVE: tl.constexpr, BLOCK: tl.constexpr):
    """Program (b, channel block): all T tokens of channels [blk*BLOCK, +BLOCK) of row b. The state
    planes are (3, B, C) (aa, bb, pp); `saved` is (3, B, T, C): the state entering each token."""
    b = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < C
    batch = tl.num_programs(0)
    plane = batch.to(tl.int64) * C
    w = tl.load(w_ptr + cols, mask=m, other=0.0)
    u = tl.load(u_ptr + cols, mask=m, other=0.0)
    at = b.to(tl.int64) * C + cols
    aa = tl.load(s_ptr + at, mask=m, other=0.0)
    bb = tl.load(s_ptr + plane + at, mask=m, other=0.0)
    pp = tl.load(s_ptr + 2 * plane + at, mask=m, other=0.0)
    row = b.to(tl.int64) * T * C + cols
    saved_plane = plane * T
    # while, not range(T): Triton 3.6's interpreter cannot iterate a range of a runtime scalar
    # under numpy >= 2.4 (the WKV-7 kernel's note)
    t = 0
    while t < T:
        off = row + t.to(tl.int64) * C
        kt = tl.load(k_ptr + off, mask=m, other=0.0)
        vt = tl.load(v_ptr + off, mask=m, other=0.0)
        if SAVE:
            tl.store(saved_ptr + off, aa, mask=m)
            tl.store(saved_ptr + saved_plane + off, bb, mask=m)
            tl.store(saved_ptr + 2 * saved_plane + off, pp, mask=m)
        ww = u + kt
        p = tl.maximum(pp, ww)
        e1 = tl.exp(pp - p)
        e2 = tl.exp(ww - p)
        tl.store(o_ptr + off, (e1 * aa + e2 * vt) / (e1 * bb + e2), mask=m)
        ww = pp + w
        p = tl.maximum(ww, kt)
        e1 = tl.exp(ww - p)
        e2 = tl.exp(kt - p)
        new_aa = e1 * aa + e2 * vt
        new_bb = e1 * bb + e2
        if HAS_LIVE:
            keep = (tl.load(live_ptr + b.to(tl.int64) * T + t + cols * 0) != 0) & m
            aa = tl.where(keep, new_aa, aa)
            bb = tl.where(keep, new_bb, bb)
            pp = tl.where(keep, p, pp)
        else:
            aa, bb, pp = new_aa, new_bb, p
        t += 1
    tl.store(s_out_ptr + at, aa, mask=m)
    tl.store(s_out_ptr + plane + at, bb, mask=m)
    tl.store(s_out_ptr + 2 * plane + at, pp, mask=m)


def _wkv4_bwd_kernel(w_ptr, u_ptr, k_ptr, v_ptr, live_ptr, saved_ptr, do_ptr, ds_ptr,
                     dk_ptr, dv_ptr, ds0_ptr, dw_ptr, du_ptr, T, C,
                     HAS_LIVE: tl.constexpr, BLOCK: tl.constexpr):
    """Program (b, channel block), tokens T-1 .. 0: the adjoint of `_wkv4_fwd_kernel` (the
    derivation is `wkv4_manual_backward`). dw and du are per-row partial sums (B, C)."""
    b = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < C
    batch = tl.num_programs(0)
    plane = batch.to(tl.int64) * C
    w = tl.load(w_ptr + cols, mask=m, other=0.0)
    u = tl.load(u_ptr + cols, mask=m, other=0.0)
    at = b.to(tl.int64) * C + cols
    gaa = tl.load(ds_ptr + at, mask=m, other=0.0)
    gbb = tl.load(ds_ptr + plane + at, mask=m, other=0.0)
    gpp = tl.load(ds_ptr + 2 * plane + at, mask=m, other=0.0)
    dw = tl.full([BLOCK], 0.0, tl.float32)
    du = tl.full([BLOCK], 0.0, tl.float32)
    row = b.to(tl.int64) * T * C + cols
    saved_plane = plane * T
    t = T - 1
    while t >= 0:
        off = row + t.to(tl.int64) * C
        aa = tl.load(saved_ptr + off, mask=m, other=0.0)
        bb = tl.load(saved_ptr + saved_plane + off, mask=m, other=0.0)
        pp = tl.load(saved_ptr + 2 * saved_plane + off, mask=m, other=0.0)
        kt = tl.load(k_ptr + off, mask=m, other=0.0)
        vt = tl.load(v_ptr + off, mask=m, other=0.0)
        go = tl.load(do_ptr + off, mask=m, other=0.0)
        # the output o = num / den
        ww1 = u + kt
        p1 = tl.maximum(pp, ww1)
        e1 = tl.exp(pp - p1)
        e2 = tl.exp(ww1 - p1)
        num = e1 * aa + e2 * vt
        den = e1 * bb + e2
        g_num = go / den
        g_den = -go * num / (den * den)
        g_e1 = g_num * aa + g_den * bb
        g_e2 = g_num * vt + g_den
        g_p1 = -g_e1 * e1 - g_e2 * e2
        o_pp = g_e1 * e1 + g_p1 * tl.where(pp > ww1, 1.0, tl.where(pp == ww1, 0.5, 0.0))
        g_ww1 = g_e2 * e2 + g_p1 * tl.where(ww1 > pp, 1.0, tl.where(ww1 == pp, 0.5, 0.0))
        # the update, from the adjoint of the state after t
        ww2 = pp + w
        p2 = tl.maximum(ww2, kt)
        f1 = tl.exp(ww2 - p2)
        f2 = tl.exp(kt - p2)
        g_f1 = gaa * aa + gbb * bb
        g_f2 = gaa * vt + gbb
        g_p2 = -g_f1 * f1 - g_f2 * f2 + gpp
        g_ww2 = g_f1 * f1 + g_p2 * tl.where(ww2 > kt, 1.0, tl.where(ww2 == kt, 0.5, 0.0))
        n_k = g_f2 * f2 + g_p2 * tl.where(kt > ww2, 1.0, tl.where(kt == ww2, 0.5, 0.0))
        n_aa = gaa * f1
        n_bb = gbb * f1
        n_pp = g_ww2
        n_v = gaa * f2
        n_w = g_ww2
        if HAS_LIVE:
            keep = (tl.load(live_ptr + b.to(tl.int64) * T + t + cols * 0) != 0) & m
            n_aa = tl.where(keep, n_aa, gaa)
            n_bb = tl.where(keep, n_bb, gbb)
            n_pp = tl.where(keep, n_pp, gpp)
            n_k = tl.where(keep, n_k, 0.0)
            n_v = tl.where(keep, n_v, 0.0)
            n_w = tl.where(keep, n_w, 0.0)
        tl.store(dk_ptr + off, g_ww1 + n_k, mask=m)
        tl.store(dv_ptr + off, g_num * e2 + n_v, mask=m)
        du += g_ww1
        dw += n_w
        gaa = g_num * e1 + n_aa
        gbb = g_den * e1 + n_bb
        gpp = o_pp + n_pp
        t -= 1
    tl.store(ds0_ptr + at, gaa, mask=m)
    tl.store(ds0_ptr + plane + at, gbb, mask=m)
    tl.store(ds0_ptr + 2 * plane + at, gpp, mask=m)
    tl.store(dw_ptr + at, dw, mask=m)
    tl.store(du_ptr + at, du, mask=m)


# ----------------------------------------------------------------------------- launch


@functools.lru_cache(maxsize=None)
def _kernels(interpret: bool):
    """(forward, backward), compiled for CUDA tensors or run by the interpreter on CPU tensors."""
    if interpret:
        return InterpretedFunction(_wkv4_fwd_kernel), InterpretedFunction(_wkv4_bwd_kernel)
    return (triton.JITFunction(_wkv4_fwd_kernel, do_not_specialize=["T"]),
            triton.JITFunction(_wkv4_bwd_kernel, do_not_specialize=["T"]))


class _WKV4Triton(torch.autograd.Function):
    """w, u (C,); k, v (B, T, C); state (3, B, C); live (B, T) uint8 or None; all contiguous float32."""

    @staticmethod
    def forward(ctx, w, u, k, v, state, live, grad_mode):
        B, T, C = k.shape
        # grad_mode: gradients were on at the call (they are off inside forward, and needs_input_grad
        # is True for leaves that require grad even under no_grad): nothing is saved otherwise
        save = grad_mode and any(ctx.needs_input_grad[:5])
        o = torch.empty_like(k)
        final = torch.empty_like(state)
        saved = k.new_empty((3, B, T, C) if save else (1,))
        fwd, _ = _kernels(not k.is_cuda)
        grid = (B, -(-C // BLOCK))
        fwd[grid](w, u, k, v, live if live is not None else k, state, o, final, saved, T, C,
                  HAS_LIVE=live is not None, SAVE=save, BLOCK=BLOCK, num_warps=1)
        if save:
            ctx.save_for_backward(w, u, k, v, saved, live)
        return o, final

    @staticmethod
    def backward(ctx, d_o, d_final):
        w, u, k, v, saved, live = ctx.saved_tensors
        B, T, C = k.shape
        # autograd materializes the gradient of an unused output as zeros: both are tensors
        d_o, d_final = d_o.float().contiguous(), d_final.float().contiguous()
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        d_state = k.new_empty((3, B, C))
        dw, du = k.new_empty(B, C), k.new_empty(B, C)
        _, bwd = _kernels(not k.is_cuda)
        bwd[(B, -(-C // BLOCK))](w, u, k, v, live if live is not None else k, saved, d_o, d_final,
                                 dk, dv, d_state, dw, du, T, C, HAS_LIVE=live is not None, BLOCK=BLOCK,
                                 num_warps=1)
        return dw.sum(0), du.sum(0), dk, dv, d_state, None, None


def wkv4_triton_prepared(w, u, k, v, state, live):
    """WKV-4 through the Triton kernels on inputs `hierarchos.ops.wkv4` prepared: w = -exp(time_decay)
    and u (C,), k, v (B, T, C), state (aa, bb, pp) each (B, C), live (B, T) bool or None. Computes
    in float32 (float64 inputs too); returns (o (B, T, C), (aa, bb, pp))."""
    reason = triton_unavailable_reason(k.device)
    if reason:
        raise HierarchosError(f"wkv4 impl 'triton' cannot run: {reason}; use impl='chunked'")
    w, u, k, v = (x.float().contiguous() for x in (w, u, k, v))
    stacked = torch.stack([s.float() for s in state]).contiguous()
    if k.shape[1] == 0:
        return k.new_zeros(k.shape), tuple(stacked.unbind(0))
    mask = None if live is None else live.to(torch.uint8).contiguous()
    # Triton launches on the current device
    with torch.cuda.device(k.device) if k.is_cuda else contextlib.nullcontext():
        o, final = _WKV4Triton.apply(w, u, k, v, stacked, mask, torch.is_grad_enabled())
    return o, tuple(final.unbind(0))
