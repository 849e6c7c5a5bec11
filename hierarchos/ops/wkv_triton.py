"""Fused WKV-7 time mixing in Triton: forward and backward, sequential over T.

One program owns a block of `rows` value channels i of one (batch, head) state S (its rows are
independent: S_t[i, :] only needs S_{t-1}[i, :]) and steps through the tokens with S in registers,
as RWKV-7's own CUDA kernel does. The forward stores S every `chunk` tokens; the backward walks the
chunks in reverse, recomputes each chunk's states forward from its checkpoint into a small scratch
buffer (per program, L2-resident) and runs the adjoint recurrence back through them. Recomputing,
rather than inverting the update, keeps it as stable as the forward. `wkv7_manual_backward` is the
same backward in plain PyTorch (float64-capable), checked against autograd of `wkv7_reference`.
"""

from __future__ import annotations

import functools
import os

import torch

from ..errors import HierarchosError
from .wkv_inputs import kernel_inputs

try:  # triton is optional: without it (or without CUDA) wkv7's 'auto' never picks this path
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    # tl.sum is itself a JIT function, made when triton was imported: the interpreter cannot call
    # it unless TRITON_INTERPRET=1 was set before that import. tl.reduce with the same combine
    # function is what tl.sum runs (float32 in, float32 out) and works in both modes.
    _SUM = tl.standard._sum_combine
except Exception as exc:  # ImportError, or a broken install underneath
    triton = None
    _TRITON_ERROR = f"{type(exc).__name__}: {exc}"
else:
    _TRITON_ERROR = ""

# Tokens between forward checkpoints. The checkpoints (B*H*N*N*4 bytes a chunk) are held from the forward
# to the backward, the backward's scratch (B*H*N*N*4 bytes a token of one chunk) only during its call, so
# a longer spacing holds less for the whole step: 32 holds half of 16's, and on an H100 (bench_wkv --sweep
# chunk, BENCHMARKS.md) timed 2.43 against 2.47-2.52 ms a call at B32 T512 H8 and 3.98 against 3.81-3.96
# at B16 T1024 H12 (8 was 11-13% faster for twice the checkpoints).
CHUNK = 32


# ----------------------------------------------------------------------------- reference backward


def _step(state, decay, a, b, k, v):
    """S_{t-1} -> S_t for one token, batched over (B, H): returns (S_t, u_t = S_{t-1} a_t)."""
    u = torch.einsum("bhij,bhj->bhi", state, a)
    return state * decay[:, :, None, :] + u[..., None] * b[:, :, None, :] + v[..., None] * k[:, :, None, :], u


def wkv7_manual_backward(r, log_w, k, v, a, b, state, d_o, d_state, chunk=CHUNK):
    """The kernel's backward in plain PyTorch (the derivation, float64-capable, slow).

    Inputs (B, T, H, N), state (B, H, N, N) already prepared (same dtype, no None); d_o and
    d_state are the gradients of o and of the final state. Per token t, in reverse, with dS the
    adjoint of S_t:
        dS += do_t r_t^T;  dr_t = S_t^T do_t;  dv_t = dS k_t;  dk_t = dS^T v_t
        u_t = S_{t-1} a_t;  db_t = dS^T u_t;  du_t = dS b_t;  da_t = S_{t-1}^T du_t
        dlog_w_t = w_t * sum_i S_{t-1}[i, :] * dS[i, :]
        dS <- dS diag(w_t) + du_t a_t^T        (the adjoint of S_{t-1})
    S_{t-1} comes from recomputing each chunk forward from its checkpoint, as the kernel does.
    Returns (dr, dlog_w, dk, dv, da, db, d_initial_state).
    """
    seq_len = r.shape[1]
    decay = torch.exp(log_w)
    checkpoints, s = [], state
    for t in range(seq_len):
        if t % chunk == 0:
            checkpoints.append(s)
        s, _ = _step(s, decay[:, t], a[:, t], b[:, t], k[:, t], v[:, t])
    grads = [torch.zeros_like(r) for _ in range(6)]
    dr, dlog_w, dk, dv, da, db = grads
    d_s = d_state.clone()
    for c in reversed(range(len(checkpoints))):
        steps = range(c * chunk, min(seq_len, (c + 1) * chunk))
        s, before = checkpoints[c], []
        for t in steps:
            before.append(s)
            s, _ = _step(s, decay[:, t], a[:, t], b[:, t], k[:, t], v[:, t])
        for t in reversed(steps):
            s_prev = before[t - c * chunk]
            d_s = d_s + d_o[:, t, :, :, None] * r[:, t, :, None, :]
            dr[:, t] = torch.einsum("bhij,bhi->bhj", s, d_o[:, t])
            dv[:, t] = torch.einsum("bhij,bhj->bhi", d_s, k[:, t])
            dk[:, t] = torch.einsum("bhij,bhi->bhj", d_s, v[:, t])
            u = torch.einsum("bhij,bhj->bhi", s_prev, a[:, t])
            db[:, t] = torch.einsum("bhij,bhi->bhj", d_s, u)
            du = torch.einsum("bhij,bhj->bhi", d_s, b[:, t])
            da[:, t] = torch.einsum("bhij,bhi->bhj", s_prev, du)
            dlog_w[:, t] = decay[:, t] * (s_prev * d_s).sum(dim=-2)
            d_s = d_s * decay[:, t, :, None, :] + du[..., None] * a[:, t, :, None, :]
            s = s_prev
    return dr, dlog_w, dk, dv, da, db, d_s


# ----------------------------------------------------------------------------- kernels


def _wkv7_fwd_kernel(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, s0_ptr, o_ptr, s_out_ptr, ckpt_ptr,
                     T, n_chunks,
                     H: tl.constexpr, N: tl.constexpr, BI: tl.constexpr, C: tl.constexpr,
                     STORE_CKPT: tl.constexpr, PREFETCH: tl.constexpr):
    """One program: rows [blk*BI, blk*BI + BI) of the state of one (b, h), all T tokens.

    Tokens past T (the last chunk's tail) load log_w = k = b = 0: frozen, S unchanged. With
    PREFETCH the inputs of token t+1 are loaded while token t computes, so a step waits on its
    arithmetic rather than on a memory round trip.
    """
    NB: tl.constexpr = N // BI
    pid = tl.program_id(0)
    bh = pid // NB
    blk = pid % NB
    rows = blk * BI + tl.arange(0, BI)                    # value channels i held here
    cols = tl.arange(0, N)                                # key channels j
    tok0 = ((bh // H).to(tl.int64) * T * H + bh % H) * N  # element (b, 0, h, 0) of a (B, T, H, N) input
    tile = rows[:, None] * N + cols[None, :]              # (BI, N) offsets inside one N x N state
    state0 = bh.to(tl.int64) * N * N
    s = tl.load(s0_ptr + state0 + tile)
    if PREFETCH:  # token 0's inputs
        n_lw = tl.load(w_ptr + tok0 + cols, mask=(cols * 0) < T, other=0.0)
        n_k = tl.load(k_ptr + tok0 + cols, mask=(cols * 0) < T, other=0.0).to(tl.float32)
        n_a = tl.load(a_ptr + tok0 + cols, mask=(cols * 0) < T, other=0.0)
        n_b = tl.load(b_ptr + tok0 + cols, mask=(cols * 0) < T, other=0.0)
        n_r = tl.load(r_ptr + tok0 + cols, mask=(cols * 0) < T, other=0.0).to(tl.float32)
        n_v = tl.load(v_ptr + tok0 + rows, mask=(rows * 0) < T, other=0.0).to(tl.float32)
    # while, not range(n_chunks): Triton 3.6's interpreter cannot index a range by a runtime
    # scalar under numpy >= 2.4 (it holds scalars as 1-element arrays)
    c = 0
    while c < n_chunks:
        if STORE_CKPT:  # the state entering chunk c, for the backward's recompute
            tl.store(ckpt_ptr + (bh.to(tl.int64) * n_chunks + c) * N * N + tile, s)
        for tt in range(C):
            t = c * C + tt
            off = tok0 + t.to(tl.int64) * (H * N)
            row_live = (rows * 0 + t) < T
            if PREFETCH:
                lw, kt, at, bt, rt, vt = n_lw, n_k, n_a, n_b, n_r, n_v
                nxt = (cols * 0 + t + 1) < T
                n_lw = tl.load(w_ptr + off + H * N + cols, mask=nxt, other=0.0)
                n_k = tl.load(k_ptr + off + H * N + cols, mask=nxt, other=0.0).to(tl.float32)
                n_a = tl.load(a_ptr + off + H * N + cols, mask=nxt, other=0.0)
                n_b = tl.load(b_ptr + off + H * N + cols, mask=nxt, other=0.0)
                n_r = tl.load(r_ptr + off + H * N + cols, mask=nxt, other=0.0).to(tl.float32)
                n_v = tl.load(v_ptr + off + H * N + rows, mask=(rows * 0 + t + 1) < T, other=0.0).to(tl.float32)
            else:
                col_live = (cols * 0 + t) < T
                lw = tl.load(w_ptr + off + cols, mask=col_live, other=0.0)
                kt = tl.load(k_ptr + off + cols, mask=col_live, other=0.0).to(tl.float32)
                at = tl.load(a_ptr + off + cols, mask=col_live, other=0.0)
                bt = tl.load(b_ptr + off + cols, mask=col_live, other=0.0)
                rt = tl.load(r_ptr + off + cols, mask=col_live, other=0.0).to(tl.float32)
                vt = tl.load(v_ptr + off + rows, mask=row_live, other=0.0).to(tl.float32)
            u = tl.reduce(s * at[None, :], 1, _SUM)           # S_{t-1} a_t, rows i
            s = s * tl.exp(lw)[None, :] + u[:, None] * bt[None, :] + vt[:, None] * kt[None, :]
            tl.store(o_ptr + off + rows, tl.reduce(s * rt[None, :], 1, _SUM), mask=row_live)
        c += 1
    tl.store(s_out_ptr + state0 + tile, s)


def _wkv7_bwd_kernel(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, do_ptr, ds_out_ptr, ckpt_ptr, scratch_ptr,
                     dr_ptr, dw_ptr, dk_ptr, dv_ptr, da_ptr, db_ptr, ds0_ptr,
                     T, n_chunks, part_stride,
                     H: tl.constexpr, N: tl.constexpr, BI: tl.constexpr, C: tl.constexpr,
                     PREFETCH: tl.constexpr, ATOMIC: tl.constexpr,
                     SCRATCH_STORE: tl.constexpr, SCRATCH_LOAD: tl.constexpr):
    """The adjoint recurrence of `wkv7_manual_backward` for the same rows as the forward program.

    dv is row-local and written whole; dr, dlog_w, dk, da, db sum over all N rows, so each row
    block writes its partial sum at slice `blk` (stride part_stride) and the caller adds them up,
    or, with ATOMIC, adds it into one zeroed buffer (no N/BI-fold partials in memory; the order of
    the N/BI additions then varies from run to run, so the last bits do).
    PREFETCH as in the forward: the recompute loads token t+1, the reverse loop token t-1 and
    the state before it, while token t computes. SCRATCH_STORE / SCRATCH_LOAD: the cache eviction
    policies of the scratch's stores and loads ("" for the default).
    """
    NB: tl.constexpr = N // BI
    pid = tl.program_id(0)
    bh = pid // NB
    blk = pid % NB
    rows = blk * BI + tl.arange(0, BI)
    cols = tl.arange(0, N)
    tok0 = ((bh // H).to(tl.int64) * T * H + bh % H) * N
    tile = rows[:, None] * N + cols[None, :]
    state0 = bh.to(tl.int64) * N * N
    part = blk.to(tl.int64) * part_stride * (1 - ATOMIC)
    scratch = pid.to(tl.int64) * (C * BI * N) + tl.arange(0, BI)[:, None] * N + cols[None, :]
    ds = tl.load(ds_out_ptr + state0 + tile)
    c = n_chunks - 1
    while c >= 0:  # chunks in reverse (a while loop for the interpreter, as in the forward)
        s = tl.load(ckpt_ptr + (bh.to(tl.int64) * n_chunks + c) * N * N + tile)
        if PREFETCH:  # the chunk's first token
            off = tok0 + (c * C).to(tl.int64) * (H * N)
            live = (cols * 0 + c * C) < T
            n_lw = tl.load(w_ptr + off + cols, mask=live, other=0.0)
            n_k = tl.load(k_ptr + off + cols, mask=live, other=0.0).to(tl.float32)
            n_a = tl.load(a_ptr + off + cols, mask=live, other=0.0)
            n_b = tl.load(b_ptr + off + cols, mask=live, other=0.0)
            n_v = tl.load(v_ptr + off + rows, mask=(rows * 0 + c * C) < T, other=0.0).to(tl.float32)
        for tt in range(C):  # recompute: scratch[tt] = S before token c*C + tt
            t = c * C + tt
            off = tok0 + t.to(tl.int64) * (H * N)
            tl.store(scratch_ptr + scratch + tt * (BI * N), s, eviction_policy=SCRATCH_STORE)
            if PREFETCH:
                lw, kt, at, bt, vt = n_lw, n_k, n_a, n_b, n_v
                nxt = (cols * 0 + t + 1) < T
                n_lw = tl.load(w_ptr + off + H * N + cols, mask=nxt, other=0.0)
                n_k = tl.load(k_ptr + off + H * N + cols, mask=nxt, other=0.0).to(tl.float32)
                n_a = tl.load(a_ptr + off + H * N + cols, mask=nxt, other=0.0)
                n_b = tl.load(b_ptr + off + H * N + cols, mask=nxt, other=0.0)
                n_v = tl.load(v_ptr + off + H * N + rows, mask=(rows * 0 + t + 1) < T, other=0.0).to(tl.float32)
            else:
                col_live = (cols * 0 + t) < T
                lw = tl.load(w_ptr + off + cols, mask=col_live, other=0.0)
                kt = tl.load(k_ptr + off + cols, mask=col_live, other=0.0).to(tl.float32)
                at = tl.load(a_ptr + off + cols, mask=col_live, other=0.0)
                bt = tl.load(b_ptr + off + cols, mask=col_live, other=0.0)
                vt = tl.load(v_ptr + off + rows, mask=(rows * 0 + t) < T, other=0.0).to(tl.float32)
            u = tl.reduce(s * at[None, :], 1, _SUM)
            s = s * tl.exp(lw)[None, :] + u[:, None] * bt[None, :] + vt[:, None] * kt[None, :]
        tl.debug_barrier()  # scratch written by some threads is read by others below
        if PREFETCH:  # the chunk's last token and the state before it
            t = c * C + C - 1
            off = tok0 + t.to(tl.int64) * (H * N)
            live = (cols * 0 + t) < T
            row_live = (rows * 0 + t) < T
            n_sp = tl.load(scratch_ptr + scratch + (C - 1) * (BI * N), eviction_policy=SCRATCH_LOAD)
            n_lw = tl.load(w_ptr + off + cols, mask=live, other=0.0)
            n_k = tl.load(k_ptr + off + cols, mask=live, other=0.0).to(tl.float32)
            n_a = tl.load(a_ptr + off + cols, mask=live, other=0.0)
            n_b = tl.load(b_ptr + off + cols, mask=live, other=0.0)
            n_r = tl.load(r_ptr + off + cols, mask=live, other=0.0).to(tl.float32)
            n_v = tl.load(v_ptr + off + rows, mask=row_live, other=0.0).to(tl.float32)
            n_do = tl.load(do_ptr + off + rows, mask=row_live, other=0.0)
        for tt_rev in range(C):
            tt = C - 1 - tt_rev
            t = c * C + tt
            off = tok0 + t.to(tl.int64) * (H * N)
            col_live = (cols * 0 + t) < T
            row_live = (rows * 0 + t) < T
            if PREFETCH:
                s_prev, lw, kt, at, bt, rt, vt, dot = n_sp, n_lw, n_k, n_a, n_b, n_r, n_v, n_do
                prv = ((cols * 0 + tt) > 0) & ((cols * 0 + t - 1) < T)   # token t-1, inside this chunk
                row_prv = ((rows * 0 + tt) > 0) & ((rows * 0 + t - 1) < T)
                n_sp = tl.load(scratch_ptr + scratch + (tt - 1) * (BI * N), mask=(tile * 0 + tt) > 0, other=0.0,
                               eviction_policy=SCRATCH_LOAD)
                n_lw = tl.load(w_ptr + off - H * N + cols, mask=prv, other=0.0)
                n_k = tl.load(k_ptr + off - H * N + cols, mask=prv, other=0.0).to(tl.float32)
                n_a = tl.load(a_ptr + off - H * N + cols, mask=prv, other=0.0)
                n_b = tl.load(b_ptr + off - H * N + cols, mask=prv, other=0.0)
                n_r = tl.load(r_ptr + off - H * N + cols, mask=prv, other=0.0).to(tl.float32)
                n_v = tl.load(v_ptr + off - H * N + rows, mask=row_prv, other=0.0).to(tl.float32)
                n_do = tl.load(do_ptr + off - H * N + rows, mask=row_prv, other=0.0)
            else:
                s_prev = tl.load(scratch_ptr + scratch + tt * (BI * N), eviction_policy=SCRATCH_LOAD)
                lw = tl.load(w_ptr + off + cols, mask=col_live, other=0.0)
                kt = tl.load(k_ptr + off + cols, mask=col_live, other=0.0).to(tl.float32)
                at = tl.load(a_ptr + off + cols, mask=col_live, other=0.0)
                bt = tl.load(b_ptr + off + cols, mask=col_live, other=0.0)
                rt = tl.load(r_ptr + off + cols, mask=col_live, other=0.0).to(tl.float32)
                vt = tl.load(v_ptr + off + rows, mask=row_live, other=0.0).to(tl.float32)
                dot = tl.load(do_ptr + off + rows, mask=row_live, other=0.0)
            decay = tl.exp(lw)
            ds = ds + dot[:, None] * rt[None, :]
            tl.store(dv_ptr + off + rows, tl.reduce(ds * kt[None, :], 1, _SUM), mask=row_live)
            u = tl.reduce(s_prev * at[None, :], 1, _SUM)
            du = tl.reduce(ds * bt[None, :], 1, _SUM)
            g_r = tl.reduce(s * dot[:, None], 0, _SUM)          # this block's share of the column sums
            g_k = tl.reduce(ds * vt[:, None], 0, _SUM)
            g_b = tl.reduce(ds * u[:, None], 0, _SUM)
            g_a = tl.reduce(s_prev * du[:, None], 0, _SUM)
            g_w = tl.reduce(s_prev * ds, 0, _SUM) * decay
            if ATOMIC:
                tl.atomic_add(dr_ptr + off + cols, g_r, mask=col_live, sem="relaxed")
                tl.atomic_add(dk_ptr + off + cols, g_k, mask=col_live, sem="relaxed")
                tl.atomic_add(db_ptr + off + cols, g_b, mask=col_live, sem="relaxed")
                tl.atomic_add(da_ptr + off + cols, g_a, mask=col_live, sem="relaxed")
                tl.atomic_add(dw_ptr + off + cols, g_w, mask=col_live, sem="relaxed")
            else:
                tl.store(dr_ptr + part + off + cols, g_r, mask=col_live)
                tl.store(dk_ptr + part + off + cols, g_k, mask=col_live)
                tl.store(db_ptr + part + off + cols, g_b, mask=col_live)
                tl.store(da_ptr + part + off + cols, g_a, mask=col_live)
                tl.store(dw_ptr + part + off + cols, g_w, mask=col_live)
            ds = ds * decay[None, :] + du[:, None] * at[None, :]
            s = s_prev
        tl.debug_barrier()  # the next chunk overwrites scratch that this one's threads read
        c -= 1
    tl.store(ds0_ptr + state0 + tile, ds)


# ----------------------------------------------------------------------------- launch


def triton_unavailable_reason(device: torch.device | str | None = None) -> str:
    """'' when the kernel can run on `device` (CUDA, or the CPU under TRITON_INTERPRET=1), else why not."""
    if triton is None:
        return f"triton does not import ({_TRITON_ERROR}); pip install triton"
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cpu":
        return "" if os.environ.get("TRITON_INTERPRET") == "1" else \
            "it runs on CUDA tensors (on the CPU only under TRITON_INTERPRET=1, for tests)"
    if not torch.cuda.is_available():
        return "it needs a CUDA device"
    return ""


@functools.lru_cache(maxsize=None)
def _kernels(interpret: bool):
    """(forward, backward) as Triton JIT functions, or run by Triton's interpreter on CPU tensors.

    Built on first use rather than decorated at import, so one process can hold both: the
    interpreter for CPU tensors and compiled kernels for CUDA tensors.
    """
    if interpret:
        return InterpretedFunction(_wkv7_fwd_kernel), InterpretedFunction(_wkv7_bwd_kernel)
    # T and the sizes derived from it are only compared and multiplied: specializing on them
    # (Triton's default for T == 1 and T % 16 == 0) would only recompile for new lengths
    scalars = ["T", "n_chunks", "part_stride"]
    return (triton.JITFunction(_wkv7_fwd_kernel, do_not_specialize=scalars[:2]),
            triton.JITFunction(_wkv7_bwd_kernel, do_not_specialize=scalars))


def _launch_config(head_size: int, rows: int | None, num_warps: int | None):
    """(rows, warps) of one kernel's launch: `rows` value channels per program (default min(N, 8)), in
    rows * N / 1024 warps (one warp reduces with shuffles only) unless `num_warps` is given."""
    rows = rows or min(head_size, 8)
    if head_size & (head_size - 1) or not 1 <= rows <= head_size or head_size % rows:
        raise HierarchosError(f"wkv7 impl 'triton' needs a power-of-two head size (got {head_size}) "
                              f"divided by rows={rows}; use impl='chunked'")
    return rows, num_warps or max(1, min(8, rows * head_size // 1024))


FORWARD_ROWS, BACKWARD_ROWS = (8, 4), (16, 8, 4)   # the candidates, largest first
PROGRAMS_PER_SM = 4


def occupancy_rows(head_size: int, pairs: int, sms: int, candidates: tuple[int, ...]) -> int:
    """The largest candidate row count whose launch still has PROGRAMS_PER_SM programs per SM
    (pairs x N / rows of them; the smallest candidate when none does). Each program steps through the
    tokens one after another, so a launch with few programs leaves SMs idle, and one with more, smaller
    programs than it needs pays more per-token reductions and, in the backward, more column sums.
    From bench_wkv on an H100 (132 SMs, N=64, atomic column sums): backward+forward B16 T1024 H12 16 rows
    3.88 ms, 8 rows 4.43; B2 T8192 4 rows 13.6 ms, 16 rows 18.6; no-grad forward B16 8 rows 0.83 ms,
    16 rows 0.91; B2 4 rows 4.69, 8 rows 4.99."""
    fitting = [r for r in candidates if r <= head_size and head_size % r == 0]
    if not fitting:
        return min(head_size, 8)
    return next((r for r in fitting if pairs * (head_size // r) >= PROGRAMS_PER_SM * sms), fitting[-1])


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int | None:
    """The SM count of a CUDA tensor's device (what the launch rule sizes for); None on the CPU (the
    interpreter)."""
    if device.type != "cuda":
        return None
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _launches(head_size: int, pairs: int, rows: int | None, num_warps: int | None, sms: int | None):
    """((rows, warps) of the forward, (rows, warps) of the backward) for a call of `pairs` (batch, head)
    pairs: `rows` as given for both, else by occupancy on a GPU of `sms` SMs (None: the interpreter,
    min(N, 8) for both)."""
    if rows is not None or sms is None:
        return (_launch_config(head_size, rows, num_warps),) * 2
    return tuple(_launch_config(head_size, occupancy_rows(head_size, pairs, sms, c), num_warps)
                 for c in (FORWARD_ROWS, BACKWARD_ROWS))


def default_forward_launch(r: torch.Tensor) -> tuple[int, int]:
    """The forward's (rows, warps) for input r (B, T, H, N) by the default rule (`_launches`)."""
    return _launches(r.shape[-1], r.shape[0] * r.shape[2], None, None, sm_count(r.device))[0]


def _default_column_sums(is_cuda: bool) -> str:
    """Atomics on CUDA (1.1-1.3x faster backward, no N/rows-fold partials), unless the user asked torch
    for deterministic algorithms; the interpreter (CPU tests) adds the parts in order."""
    return "atomic" if is_cuda and not torch.are_deterministic_algorithms_enabled() else "parts"


def run_forward(r, log_w, k, v, a, b, state, chunk, launch, checkpoints=None, prefetch=True):
    """The forward kernel on kernel-ready inputs (T >= 1) with `launch` = (rows, warps): (o, final state)
    float32. `checkpoints`, a float32 (B * H * n_chunks * N * N) buffer, also receives the state entering
    every `chunk` tokens (the backward's recompute starts there; the chunk-parallel backward's chunks)."""
    batch, seq_len, heads, head_size = r.shape
    rows, num_warps = launch
    o = torch.empty_like(r, dtype=torch.float32)
    final = torch.empty_like(state)
    fwd, _ = _kernels(not r.is_cuda)
    fwd[(batch * heads * (head_size // rows),)](
        r, log_w, k, v, a, b, state, o, final, state.new_empty(1) if checkpoints is None else checkpoints, seq_len,
        -(-seq_len // chunk), H=heads, N=head_size, BI=rows, C=chunk, STORE_CKPT=checkpoints is not None,
        PREFETCH=prefetch, num_warps=num_warps)
    return o, final


class _WKV7Triton(torch.autograd.Function):
    """Inputs contiguous (B, T, H, N), T >= 1: log_w, a, b float32, r, k, v float32 or bf16/fp16 (the
    kernels upcast them as they load them; their gradients come back in their dtype); state contiguous
    float32 (B, H, N, N). o, the final state, the checkpoints and the backward's buffers are float32."""

    @staticmethod
    def forward(ctx, r, log_w, k, v, a, b, state, launches, chunk, prefetch, atomic, scratch_hints, grad_mode):
        batch, seq_len, heads, head_size = r.shape
        n_chunks = -(-seq_len // chunk)
        # grad_mode: whether the call was made with gradients on (inside forward they are always off, and
        # needs_input_grad says only which inputs require grad: under no_grad nothing is held)
        store = grad_mode and any(ctx.needs_input_grad[:7])
        ckpt = state.new_empty(batch * heads * n_chunks * head_size * head_size) if store else None
        o, final = run_forward(r, log_w, k, v, a, b, state, chunk, launches[0], ckpt, prefetch)
        if store:
            ctx.save_for_backward(r, log_w, k, v, a, b, ckpt)
        ctx.config = (launches[1], chunk, n_chunks, prefetch, atomic, scratch_hints)  # the backward's rows may differ
        return o, final

    @staticmethod
    def backward(ctx, d_o, d_final):
        r, log_w, k, v, a, b, ckpt = ctx.saved_tensors
        (rows, num_warps), chunk, n_chunks, prefetch, atomic, scratch_hints = ctx.config
        batch, seq_len, heads, head_size = r.shape
        f32 = log_w  # a float32 input: new buffers take its dtype and device
        d_o = torch.zeros_like(f32) if d_o is None else d_o.float().contiguous()
        shape_s = (batch, heads, head_size, head_size)
        d_final = f32.new_zeros(shape_s) if d_final is None else d_final.float().contiguous()
        blocks = head_size // rows
        grid = (batch * heads * blocks,)
        # row blocks > 1: each writes its own partial sums of the column gradients, added below,
        # or (atomic) adds them into one zeroed buffer
        atomic = atomic and blocks > 1
        parts = [f32.new_zeros((1, *r.shape)) if atomic else f32.new_empty((blocks, *r.shape)) for _ in range(5)]
        dv = f32.new_empty(r.shape)  # float32, cast below (rounded as torch rounds, on every device)
        d_state = f32.new_empty(shape_s)
        scratch = f32.new_empty(grid[0] * chunk * rows * head_size)
        _, bwd = _kernels(not r.is_cuda)
        bwd[grid](r, log_w, k, v, a, b, d_o, d_final, ckpt, scratch,
                  parts[0], parts[1], parts[2], dv, parts[3], parts[4], d_state,
                  seq_len, n_chunks, r.numel(),
                  H=heads, N=head_size, BI=rows, C=chunk, PREFETCH=prefetch, ATOMIC=atomic,
                  SCRATCH_STORE=scratch_hints[0], SCRATCH_LOAD=scratch_hints[1], num_warps=num_warps)
        dr, dlog_w, dk, da, db = (p[0] if len(p) == 1 else p.sum(dim=0) for p in parts)
        return dr.to(r.dtype), dlog_w, dk.to(k.dtype), dv.to(v.dtype), da, db, d_state, None, None, None, None, None, None


SCRATCH_HINTS = {"none": ("", ""), "keep": ("evict_last", "evict_first")}


def wkv7_triton(r, log_w, k, v, a, b, state=None, *, rows=None, num_warps=None, chunk=CHUNK, prefetch=True,
                column_sums=None, scratch="keep"):
    """WKV-7 through the fused Triton kernels (CUDA; CPU only under TRITON_INTERPRET=1).

    Same contract as `wkv7_reference`, except that it always computes in float32 and returns
    float32 (float64 inputs too); r, k and v in bfloat16/float16 stay so (the kernels upcast them as
    they load them, exactly: under autocast they are bf16 matmul outputs, and a float32 copy would
    only double what the call writes and holds for its backward). `rows` value channels per program and `num_warps` are launch knobs
    for benchmarks: by default on CUDA each kernel takes the rows `occupancy_rows` picks for this call's
    (batch, head) pairs and the GPU's SM count (the forward and the backward separately: the
    checkpoints hold whole states, so they need not agree), min(N, 8) under the interpreter. `chunk`
    is the checkpoint spacing; `prefetch` loads the next token's inputs while the current one
    computes; `column_sums` how the backward adds the row blocks' shares of dr, dlog_w, dk, da, db:
    "parts" (each block writes its own, summed afterwards in a fixed order: bit-reproducible, N/rows x
    the gradients' memory for a moment) or "atomic" (added into one buffer by atomics: no extra
    memory, the last bits vary run to run); default atomic on CUDA unless
    `torch.use_deterministic_algorithms` is on, parts under the interpreter. `scratch`: "keep" (the
    default) asks L2 to keep the backward's recompute scratch (stores evict_last, loads evict_first:
    2-4% faster in bench_wkv at every spacing measured), "none" leaves the cache policy alone.
    """
    reason = triton_unavailable_reason(r.device)
    if reason:
        raise HierarchosError(f"wkv7 impl 'triton' cannot run: {reason}; use impl='chunked'")
    r, log_w, k, v, a, b, state = kernel_inputs(r, log_w, k, v, a, b, state)
    if r.shape[1] == 0:
        return log_w.new_zeros(r.shape), state
    launches = _launches(r.shape[-1], r.shape[0] * r.shape[2], rows, num_warps, sm_count(r.device))
    column_sums = column_sums or _default_column_sums(r.is_cuda)
    if column_sums not in ("parts", "atomic"):
        raise HierarchosError(f"wkv7_triton column_sums={column_sums!r}: use 'parts' or 'atomic'")
    atomic = column_sums == "atomic"
    if scratch not in SCRATCH_HINTS:
        raise HierarchosError(f"wkv7_triton scratch={scratch!r}: use one of {', '.join(SCRATCH_HINTS)}")
    hints = SCRATCH_HINTS[scratch]
    args = (r, log_w, k, v, a, b, state, launches, chunk, prefetch, atomic, hints, torch.is_grad_enabled())
    if r.is_cuda:
        with torch.cuda.device(r.device):  # Triton launches on the current device
            return _WKV7Triton.apply(*args)
    return _WKV7Triton.apply(*args)
