"""WKV-7 with gradients, chunk-parallel backward, in Triton (`wkv_chunk_grad.py` derives it).

The sequential kernel's backward (`wkv_triton.py`) walks every token's adjoint one after another, each
step a handful of reductions across a state tile, and recomputes each checkpoint span's states into a
scratch buffer first. Here the backward is three kernels:

1. the prep kernel of `wkv_chunk_triton` again, its state terms only: every chunk's W, B_end, P and g at
   once;
2. a reverse scan over the chunks, programs owning `rows` rows of one (batch, head) state (the rows are
   independent): dS_0 = dS_C diag(g) + (dS_C B_end^T) W + dO^T P, three small products a chunk, storing
   each chunk's end adjoint dS_C;
3. one program per (batch, head, chunk), all chunks at once: from the chunk's start state S_0 (saved by
   the forward), its dS_C and dO, every input gradient of its tokens by small matrix products (about
   thirty, C x N x N at most): no atomics, no scratch, no per-token reductions.

The forward stores the chunks' start states: the chunk-parallel forward (`run_chunk_forward(starts=...)`)
where its scans take TF32 products or the call has few (batch, head) pairs, else the sequential kernel
with its checkpoints spaced one chunk apart (`forward_kind`). Either holds one N x N float32 state a chunk
for the backward (16 bytes a token and channel at 16 tokens a chunk: about what the call's six inputs take
together). With `recompute_states` (process-wide by `set_recompute_states`, which an activation budget
below 1 turns on) the forward holds the initial state alone and the backward makes the start states again:
the prep forms E as well, and the scan kernel's launch carries the state forward through the chunks beside
the reverse scan (the two are independent; side by side they take the GPU's idle slots).

The products inside a chunk (the prep and the per-chunk gradients) run on tensor cores in TF32 when torch
may use TF32 for matmuls (`torch.backends.cuda.matmul.allow_tf32`, which `train` turns on), else in full
float32 (`input_precision="ieee"`); the scans across chunks, which carry the state and its adjoint
through the whole sequence, take TF32 products too up to TF32_SCAN_MAX_CHUNKS chunks (the error of one
chunk's products, ~1e-3 relative as a TF32 matmul makes, did not compound from chunk to chunk: measured on
an H100 to T = 4096, emulated to T = 16384; the state decays), float32 ones beyond. On an H100
(BENCHMARKS.md) the float32 products were 5-10x slower than TF32 ones, slower than the sequential kernel;
so `wkv7`'s automatic choice takes this path only where TF32 is allowed. "tf32x3" (three TF32 products a product,
about float32's accuracy) and `scan_precision` are launch options for benchmarks. Inside a chunk the
factors exp(+-cl) span exp(C max|log_w|): C = 16 or 32 at the model's |log_w| <= 0.61 (not checked: a
check would read the GPU). tests/test_wkv_chunk_grad_triton.py holds the kernels to the float64 scan's
autograd under Triton's interpreter, and to the sequential kernel on a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from ..errors import HierarchosError
from .device_check import checked_once
from .wkv_chunk_triton import (CHUNK_FORWARD_BELOW_PAIRS, PRECISIONS, check_inputs, check_sizes, default_rows,
                               launch_prep, run_chunk_forward)
from .wkv_inputs import kernel_inputs
from .wkv_triton import default_forward_launch, triton_unavailable_reason, wkv7_triton
from .wkv_triton import run_forward as run_sequential_forward

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    from .wkv_triton import _SUM
except Exception:  # wkv_triton reports why (triton_unavailable_reason)
    triton = None

CHUNK = 16
# The scans across chunks carry the state (forward) and its adjoint (backward) through the sequence. With
# TF32 products inside the chunks they run in TF32 too up to TF32_SCAN_MAX_CHUNKS chunks (T = 16384 at 16
# tokens a chunk), float32 beyond. On an H100 the errors at T = 4096 equal those at T = 200 (state 7.8e-4
# against 8.0e-4, the gradients 3.2e-3 as with float32 scans; the call 10-27% faster); on the CPU, the
# kernels under Triton's interpreter with every dot input truncated to TF32 (the pessimistic rounding) and
# a quarter of the channels decaying 1000x slower, the errors at T = 16384 equal those at T = 1024 (state
# 9.5e-4 / 9.7e-4, worst 2.4e-3): the state decays, so one chunk's rounding fades instead of compounding.
TF32_SCAN_MAX_CHUNKS = 1024
SCAN_PRECISION = "ieee"  # the scans' precision with float32 products, and past TF32_SCAN_MAX_CHUNKS


def default_scan_precision(precision: str, n_chunks: int) -> str:
    """The scans' products: TF32 where the products inside the chunks are TF32 and the call has at most
    TF32_SCAN_MAX_CHUNKS chunks, else float32 ("ieee")."""
    return "tf32" if precision == "tf32" and n_chunks <= TF32_SCAN_MAX_CHUNKS else SCAN_PRECISION


def _wkv7_chunk_scans_kernel(v_ptr, s0_ptr, do_ptr, ds_final_ptr, ws_ptr, g_ptr, starts_ptr, ends_ptr, ds0_ptr,
                             T, n_chunks, forward_programs,
                             H: tl.constexpr, N: tl.constexpr, BI: tl.constexpr, C: tl.constexpr,
                             PREC: tl.constexpr):
    """The scans across chunks, programs owning rows [blk*BI, blk*BI + BI) of one (b, h) state. The first
    `forward_programs` (0, or one per block of rows of every state) carry the state from s0 through the
    chunks in order, S_C = S_0 diag(g) + (S_0 W^T) B_end + V^T E, storing the state entering each chunk
    (starts[(b, h), chunk]; the backward's recompute); the others carry the adjoint from ds_final through
    the chunks in reverse, dS_0 = dS_C diag(g) + (dS_C B_end^T) W + dO^T P, storing it at every chunk's end
    (ends[(b, h), chunk]) and the initial state's (ds0). The two are the same three products a chunk with
    the workspace's slots swapped, and independent of each other, so one launch runs both side by side.
    Tokens past T load V = 0, dO = 0."""
    NB: tl.constexpr = N // BI
    pid = tl.program_id(0)
    rev = pid >= forward_programs
    q = tl.where(rev, pid - forward_programs, pid)
    bh = q // NB
    blk = q % NB
    rows = blk * BI + tl.arange(0, BI)
    cols = tl.arange(0, N)
    steps = tl.arange(0, C)
    tok0 = ((bh // H).to(tl.int64) * T * H + bh % H) * N
    rows_tile = rows[:, None] * N + cols[None, :]
    state = bh.to(tl.int64) * N * N + rows_tile
    if rev:
        x = tl.load(ds_final_ptr + state)
    else:
        x = tl.load(s0_ptr + state)
    slot_a = tl.where(rev, C * N, 0)              # (W, B_end) forward, (B_end, W) in reverse
    slot_b = C * N - slot_a
    slot_z = tl.where(rev, 3 * C * N, 2 * C * N)  # E forward, P in reverse
    tile = steps[:, None] * N + cols[None, :]
    i = 0
    while i < n_chunks:  # a while loop for the interpreter (wkv_triton's forward says why)
        c = tl.where(rev, n_chunks - 1 - i, i)
        chunk_id = bh.to(tl.int64) * n_chunks + c
        t = c * C + steps
        live = (t < T)[:, None]
        off = tok0 + t.to(tl.int64)[:, None] * (H * N) + rows[None, :]
        if rev:
            tl.store(ends_ptr + chunk_id * (N * N) + rows_tile, x)
            y = tl.load(do_ptr + off, mask=live, other=0.0)                              # (C, BI)
        else:
            tl.store(starts_ptr + chunk_id * (N * N) + rows_tile, x)
            y = tl.load(v_ptr + off, mask=live, other=0.0).to(tl.float32)
        base = chunk_id * (4 * C * N)
        m_a = tl.load(ws_ptr + base + slot_a + tile)
        m_b = tl.load(ws_ptr + base + slot_b + tile)
        z = tl.load(ws_ptr + base + slot_z + tile)
        g = tl.load(g_ptr + chunk_id * N + cols)
        xa = tl.dot(x, tl.trans(m_a), input_precision=PREC)                                # (BI, C)
        x = x * g[None, :] + tl.dot(xa, m_b, input_precision=PREC) + tl.dot(tl.trans(y), z, input_precision=PREC)
        i += 1
    if rev:
        tl.store(ds0_ptr + state, x)


def _wkv7_chunk_grad_kernel(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, do_ptr, starts_ptr, ends_ptr,
                            dr_ptr, dw_ptr, dk_ptr, dv_ptr, da_ptr, db_ptr, T, n_chunks,
                            H: tl.constexpr, N: tl.constexpr, C: tl.constexpr, SQUARINGS: tl.constexpr,
                            PREC: tl.constexpr):
    """One (b, h, chunk): the six input gradients of its tokens from its start state S_0, its end adjoint
    dS_C and dO (`wkv_chunk_grad`'s formulas, names as there). Tokens past T load zeros (frozen) and
    store nothing."""
    pid = tl.program_id(0)
    bh = pid // n_chunks
    c = pid % n_chunks
    cols = tl.arange(0, N)
    steps = tl.arange(0, C)
    tok0 = ((bh // H).to(tl.int64) * T * H + bh % H) * N
    t = c * C + steps
    live = (t < T)[:, None]
    off = tok0 + t.to(tl.int64)[:, None] * (H * N) + cols[None, :]
    lw = tl.load(w_ptr + off, mask=live, other=0.0)
    kt = tl.load(k_ptr + off, mask=live, other=0.0).to(tl.float32)
    vt = tl.load(v_ptr + off, mask=live, other=0.0).to(tl.float32)
    at = tl.load(a_ptr + off, mask=live, other=0.0)
    bt = tl.load(b_ptr + off, mask=live, other=0.0)
    rt = tl.load(r_ptr + off, mask=live, other=0.0).to(tl.float32)
    d_o = tl.load(do_ptr + off, mask=live, other=0.0)
    state_tile = pid.to(tl.int64) * (N * N) + cols[:, None] * N + cols[None, :]
    s0 = tl.load(starts_ptr + state_tile)
    ends = tl.load(ends_ptr + state_tile)

    cl = tl.associative_scan(lw, 0, _SUM)
    cl_end = tl.reduce(lw, 0, _SUM)
    e_cl = tl.exp(cl)
    e_x = tl.exp(cl - lw)
    e_m = tl.exp(-cl)
    e_end = tl.exp(cl_end[None, :] - cl)
    a_dec = at * e_x
    r_dec = rt * e_cl
    b_inv = bt * e_m
    k_inv = kt * e_m
    b_end = bt * e_end
    k_end = kt * e_end
    strict = steps[:, None] > steps[None, :]
    inclusive = steps[:, None] >= steps[None, :]
    l_ab = tl.where(strict, tl.dot(a_dec, tl.trans(b_inv), input_precision=PREC), 0.0)
    l_ak = tl.where(strict, tl.dot(a_dec, tl.trans(k_inv), input_precision=PREC), 0.0)
    m_rb = tl.where(inclusive, tl.dot(r_dec, tl.trans(b_inv), input_precision=PREC), 0.0)
    m_rk = tl.where(inclusive, tl.dot(r_dec, tl.trans(k_inv), input_precision=PREC), 0.0)
    inv = tl.where(steps[:, None] == steps[None, :], 1.0, 0.0) + l_ab
    power = l_ab
    for _ in tl.static_range(SQUARINGS):  # (I - L)^-1 = (I + L)(I + L^2)... (L^C = 0)
        power = tl.dot(power, power, input_precision=PREC)
        inv = inv + tl.dot(inv, power, input_precision=PREC)

    u = tl.dot(inv, tl.dot(a_dec, tl.trans(s0), input_precision=PREC) + tl.dot(l_ak, vt, input_precision=PREC),
               input_precision=PREC)                                                        # (C, N) rows u_t
    d_u = tl.dot(tl.trans(m_rb), d_o, input_precision=PREC) + tl.dot(b_end, tl.trans(ends), input_precision=PREC)
    d_rhs = tl.dot(tl.trans(inv), d_u, input_precision=PREC)
    d_l_ab = tl.where(strict, tl.dot(d_rhs, tl.trans(u), input_precision=PREC), 0.0)
    d_l_ak = tl.where(strict, tl.dot(d_rhs, tl.trans(vt), input_precision=PREC), 0.0)
    d_m_rb = tl.where(inclusive, tl.dot(d_o, tl.trans(u), input_precision=PREC), 0.0)
    d_m_rk = tl.where(inclusive, tl.dot(d_o, tl.trans(vt), input_precision=PREC), 0.0)
    d_a_dec = (tl.dot(d_rhs, s0, input_precision=PREC) + tl.dot(d_l_ab, b_inv, input_precision=PREC)
               + tl.dot(d_l_ak, k_inv, input_precision=PREC))
    d_r_dec = (tl.dot(d_o, s0, input_precision=PREC) + tl.dot(d_m_rb, b_inv, input_precision=PREC)
               + tl.dot(d_m_rk, k_inv, input_precision=PREC))
    d_b_inv = (tl.dot(tl.trans(d_l_ab), a_dec, input_precision=PREC)
               + tl.dot(tl.trans(d_m_rb), r_dec, input_precision=PREC))
    d_k_inv = (tl.dot(tl.trans(d_l_ak), a_dec, input_precision=PREC)
               + tl.dot(tl.trans(d_m_rk), r_dec, input_precision=PREC))
    d_b_end = tl.dot(u, ends, input_precision=PREC)
    d_k_end = tl.dot(vt, ends, input_precision=PREC)
    d_g = tl.reduce(s0 * ends, 0, _SUM)
    dv = (tl.dot(tl.trans(m_rk), d_o, input_precision=PREC) + tl.dot(tl.trans(l_ak), d_rhs, input_precision=PREC)
          + tl.dot(k_end, tl.trans(ends), input_precision=PREC))

    end_terms = d_b_end * b_end + d_k_end * k_end
    d_cl = d_r_dec * r_dec - d_b_inv * b_inv - d_k_inv * k_inv - end_terms
    d_clx = d_a_dec * a_dec
    both = d_cl + d_clx
    # sum over t >= s as the total less the sum over t < s (an inclusive scan less the term itself)
    from_here = tl.reduce(both, 0, _SUM)[None, :] - tl.associative_scan(both, 0, _SUM) + both
    d_lw = from_here - d_clx + (tl.reduce(end_terms, 0, _SUM) + d_g * tl.exp(cl_end))[None, :]
    # dr, dk, dv stored in their inputs' dtypes, rounded to nearest even as torch's .to() rounds
    tl.store(dr_ptr + off, (d_r_dec * e_cl).to(dr_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=live)
    tl.store(dw_ptr + off, d_lw, mask=live)
    tl.store(dk_ptr + off, (d_k_inv * e_m + d_k_end * e_end).to(dk_ptr.dtype.element_ty, fp_downcast_rounding="rtne"),
             mask=live)
    tl.store(dv_ptr + off, dv.to(dv_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=live)
    tl.store(da_ptr + off, d_a_dec * e_x, mask=live)
    tl.store(db_ptr + off, d_b_inv * e_m + d_b_end * e_end, mask=live)


@functools.lru_cache(maxsize=None)
def _kernel(interpret: bool):
    """The scans and the per-chunk gradients as Triton JIT functions, or run by Triton's interpreter on CPU
    tensors."""
    if interpret:
        return InterpretedFunction(_wkv7_chunk_scans_kernel), InterpretedFunction(_wkv7_chunk_grad_kernel)
    return (triton.JITFunction(_wkv7_chunk_scans_kernel, do_not_specialize=["T", "n_chunks", "forward_programs"]),
            triton.JITFunction(_wkv7_chunk_grad_kernel, do_not_specialize=["T", "n_chunks"]))


# HIERARCHOS_WKV_TRAIN_FORWARD=chunk|sequential: every call's training forward of that kind, whatever
# `forward_kind`'s rule says (an A/B of whole training steps, e.g. bench_forward.py in two processes)
FORCED_FORWARD = os.environ.get("HIERARCHOS_WKV_TRAIN_FORWARD") or None


def forward_kind(pairs: int, scan_precision: str = SCAN_PRECISION) -> str:
    """The training forward for a call of `pairs` (batch, head) pairs whose scans take `scan_precision`:
    "chunk" with TF32 scans or below CHUNK_FORWARD_BELOW_PAIRS pairs, else "sequential" (or FORCED_FORWARD's
    kind). (With TF32 scans the chunk forward made the whole fwd+bwd call 1-7% faster than the sequential
    kernel's forward at 256 and 192 pairs, the 30M and 125m shapes, in two sweeps on H100s: BENCHMARKS.md;
    with float32 scans the sequential kernel fills the GPU from 66 pairs on and was faster.)"""
    if FORCED_FORWARD is not None:
        if FORCED_FORWARD not in ("chunk", "sequential"):
            raise HierarchosError(f"HIERARCHOS_WKV_TRAIN_FORWARD={FORCED_FORWARD!r}: use chunk or sequential, "
                                  "or unset it for the automatic choice")
        return FORCED_FORWARD
    return "chunk" if scan_precision == "tf32" or pairs < CHUNK_FORWARD_BELOW_PAIRS else "sequential"


class _WKV7ChunkGrad(torch.autograd.Function):
    """Kernel-ready inputs (`kernel_inputs`), T >= 1. o, the final state, the start states and every
    buffer of the backward are float32; gradients of bf16/fp16 r, k, v come back in their dtype. With
    `recompute` the forward holds the initial state in place of the start states, and the backward's scan
    launch makes them again beside the reverse scan."""

    @staticmethod
    def forward(ctx, r, log_w, k, v, a, b, state, chunk, rows, precision, scan_precision, kind, grad_warps, grad_mode,
                recompute):
        batch, seq_len, heads, head_size = r.shape
        n_chunks = -(-seq_len // chunk)
        store = grad_mode and any(ctx.needs_input_grad[:7])
        starts = (state.new_empty(batch * heads * n_chunks * head_size * head_size)
                  if store and not recompute else None)
        if kind == "chunk":
            o, final = run_chunk_forward(r, log_w, k, v, a, b, state, chunk=chunk, rows=rows, precision=precision,
                                         starts=starts, scan_precision=scan_precision)
        else:  # the sequential kernel's checkpoints, one chunk apart, are the chunks' start states
            o, final = run_sequential_forward(r, log_w, k, v, a, b, state, chunk, default_forward_launch(r), starts)
        if store:
            ctx.save_for_backward(r, log_w, k, v, a, b, state if recompute else starts)
        ctx.config = (chunk, rows, precision, scan_precision, grad_warps, recompute)
        return o, final

    @staticmethod
    def backward(ctx, d_o, d_final):
        r, log_w, k, v, a, b, held = ctx.saved_tensors
        chunk, rows, precision, scan_precision, grad_warps, recompute = ctx.config
        batch, seq_len, heads, head_size = r.shape
        n_chunks = -(-seq_len // chunk)
        d_o = torch.zeros_like(log_w) if d_o is None else d_o.float().contiguous()
        shape_s = (batch, heads, head_size, head_size)
        d_final = log_w.new_zeros(shape_s) if d_final is None else d_final.float().contiguous()
        # with `recompute` the start states are made again (`held` is the initial state) by forward scans
        # beside the reverse ones, in the same launch: the prep forms E for them too
        ws, _, g = launch_prep(r, log_w, k, a, b, chunk, precision, terms="state_update" if recompute else "state")
        starts = log_w.new_empty(batch * heads * n_chunks * head_size * head_size) if recompute else held
        ends = torch.empty_like(starts)
        d_state = log_w.new_empty(shape_s)
        # dr, dk, dv in their inputs' dtypes (the kernel's store rounds as .to() would: one pass less a
        # gradient under autocast, where r and v come in bf16), dlog_w, da, db float32
        grads = [torch.empty_like(x) for x in (r, log_w, k, v, a, b)]
        scans, per_chunk = _kernel(not r.is_cuda)
        common = dict(H=heads, N=head_size, C=chunk)
        programs = batch * heads * (head_size // rows)
        forward_programs = programs if recompute else 0
        with torch.cuda.device(r.device) if r.is_cuda else contextlib.nullcontext():
            scans[(forward_programs + programs,)](v, held, d_o, d_final, ws, g, starts, ends, d_state, seq_len,
                                                  n_chunks, forward_programs, BI=rows, PREC=scan_precision,
                                                  num_warps=4, **common)
            per_chunk[(batch * heads * n_chunks,)](r, log_w, k, v, a, b, d_o, starts, ends, *grads, seq_len, n_chunks,
                                                   SQUARINGS=chunk.bit_length() - 2, PREC=precision,
                                                   num_warps=grad_warps, **common)
        dr, dlog_w, dk, dv, da, db = grads
        return (dr, dlog_w, dk, dv, da, db, d_state,
                None, None, None, None, None, None, None, None)


# Whether calls that do not say (`wkv7_chunk_grad(recompute_states=None)`, as `wkv7` calls it) make the start
# states again in the backward instead of holding them from the forward: process-wide, as torch's
# activation_memory_budget is (`set_recompute_states`; `compile_blocks` turns it on with a budget below 1).
RECOMPUTE_STATES = False


def set_recompute_states(on: bool) -> None:
    """Make `wkv7_chunk_grad`'s default hold the initial state alone from the forward to the backward and
    recompute the chunks' start states there (one N x N float32 state a chunk of 16 tokens a (batch, head):
    16 bytes a token and channel, e.g. 201 MB a layer call at 125m B16 T1024), for the prep's E and a scan of
    three products a chunk more in the backward."""
    global RECOMPUTE_STATES
    RECOMPUTE_STATES = bool(on)


def default_precision() -> str:
    """The products inside a chunk: "tf32" where torch may use TF32 for matmuls, else "ieee"."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def wkv7_chunk_grad(r, log_w, k, v, a, b, state=None, *, chunk=CHUNK, rows=None, precision=None, forward=None,
                    grad_warps=4, scan_precision=None, recompute_states=None):
    """WKV-7 with the chunk-parallel backward (CUDA; CPU only under TRITON_INTERPRET=1). Same contract as
    `wkv7_reference`, computing in float32 (float64 inputs too; r, k, v may stay bf16/fp16, upcast as
    loaded). `chunk` tokens a chunk (a power of two >= 16), `rows` state rows a scan program (a power of
    two in [16, N]), `precision` of the products inside a chunk ("ieee", "tf32x3", "tf32"; default
    `default_precision()`), `scan_precision` of the scans' products across chunks (default
    `default_scan_precision`), `forward` "chunk" or "sequential"
    (default by the call's (batch, head) pairs and scans: `forward_kind`), `grad_warps` the per-chunk gradient
    kernel's warps, `recompute_states` whether the backward makes the chunks' start states again instead of
    holding them from the forward (default `RECOMPUTE_STATES`: `set_recompute_states`)."""
    reason = triton_unavailable_reason(r.device)
    if reason:
        raise HierarchosError(f"wkv7 impl 'triton_chunk_grad' cannot run: {reason}; use impl='chunked'")
    r, log_w, k, v, a, b, state = kernel_inputs(r, log_w, k, v, a, b, state)
    batch, seq_len, heads, head_size = r.shape
    rows = rows or default_rows(head_size)
    precision = precision or default_precision()
    check_sizes("triton_chunk_grad", head_size, chunk, rows, precision)
    scan_precision = scan_precision or default_scan_precision(precision, -(-seq_len // chunk))
    if scan_precision not in PRECISIONS:
        raise HierarchosError(f"wkv7 impl 'triton_chunk_grad': scan_precision={scan_precision!r}: use one of "
                              f"{', '.join(PRECISIONS)}")
    kind = forward or forward_kind(batch * heads, scan_precision)
    if kind not in ("chunk", "sequential"):
        raise HierarchosError(f"wkv7_chunk_grad forward={kind!r}: use 'chunk' or 'sequential'")
    if seq_len == 0:
        return log_w.new_zeros(r.shape), state
    recompute = RECOMPUTE_STATES if recompute_states is None else bool(recompute_states)
    args = (r, log_w, k, v, a, b, state, chunk, rows, precision, scan_precision, kind, grad_warps,
            torch.is_grad_enabled(), recompute)
    if r.is_cuda:
        with torch.cuda.device(r.device):
            return _WKV7ChunkGrad.apply(*args)
    return _WKV7ChunkGrad.apply(*args)


_CHECKED: dict = {}  # device -> whether the kernels built and matched the sequential kernel there
CHECK_SHAPE = (1, 2 * CHUNK + 5, 2, 64)  # (B, T, H, N): two chunks and a partial third
CHECK_TOLERANCE = 1e-2  # relative, with TF32 products (measured ~3e-3 on an H100); float32 ones land near 4e-7


def checked(device: torch.device | str) -> bool:
    """Whether the chunk-parallel backward builds on `device` and matches the sequential kernel there with
    TF32 products (outputs, final state and all seven gradients within CHECK_TOLERANCE relative, frozen
    tokens and a partial last chunk included, both forwards, start states held and recomputed): what
    `wkv7`'s automatic choice asks before taking it. Once per device, outside any CUDA graph capture or
    compile trace (`device_check.checked_once`: there an unchecked device is answered False and the sequential
    kernel runs); a failure is reported once."""
    def check(device):
        gen = torch.Generator().manual_seed(0)
        x = check_inputs(CHECK_SHAPE, gen)
        d_o, d_s = (torch.randn(x[n].shape, generator=gen).to(device) for n in ("r", "state"))

        def run(fn):
            leaves = {n: t.to(device).requires_grad_() for n, t in x.items()}
            with torch.enable_grad():
                o, s = fn(**leaves)
                grads = torch.autograd.grad((o, s), list(leaves.values()), (d_o, d_s))
            return tuple(t.detach() for t in (o, s, *grads))
        errors, want = [], run(wkv7_triton)
        for kind, recompute in (("chunk", False), ("sequential", False), ("chunk", True)):
            got = run(functools.partial(wkv7_chunk_grad, precision="tf32", forward=kind, recompute_states=recompute))
            errors += [float((g - w).norm() / w.norm()) for g, w in zip(got, want)]
        return max(errors) < CHECK_TOLERANCE, f"worst relative error {max(errors):.2e} against the sequential kernel"
    return checked_once(_CHECKED, device, check, "the chunk-parallel WKV-7 backward",
                        "calls with gradients keep the sequential kernel there")
