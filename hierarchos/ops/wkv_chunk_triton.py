"""WKV-7 forward, chunk-parallel, in Triton: the prefill's recurrence (no autograd).

The sequential kernel (`wkv_triton.py`) steps through T tokens one after another; at batch 1 a
prompt's call has only 12 (batch, head) pairs, so its few programs each pay T dependent steps. Here
a program steps through T / C chunks instead, and does each chunk's C tokens at once with small
matrix products (the factorisation `wkv7_chunked` in wkv.py derives and documents). Per chunk, with
S_0 the state entering it, cl the inclusive cumulative sum of log_w inside the chunk (g = exp(cl)):

    A_dec = a * exp(cl - log_w), R_dec = r * exp(cl), B_inv = b * exp(-cl), K_inv = k * exp(-cl)
    L_ab = strict_tril(A_dec B_inv^T), L_ak = strict_tril(A_dec K_inv^T)          (C x C)
    M_rb = tril(R_dec B_inv^T),       M_rk = tril(R_dec K_inv^T)
    U = (I - L_ab)^-1 (A_dec S_0^T + L_ak V)      (rows u_t = S_{t-1} a_t)
    O = R_dec S_0^T + M_rb U + M_rk V
    S_C = S_0 diag(g_C) + U^T (b g_C / g) + V^T (k g_C / g)

Every value channel i (a row of S) needs only its own row of S_0 and its own v, so a program owns
`rows` rows of one (batch, head) state and recomputes the small C x C matrices itself. L_ab is
strictly lower triangular, so (I - L_ab)^-1 = (I + L)(I + L^2)(I + L^4)... (L^C = 0): log2(C)
products instead of a triangular solve. The factors exp(-cl) grow as exp(C max|log_w|); with
C = 16 that stays far inside float32 for |log_w| <= 5 (the model's is <= 0.61), which
`wkv7_chunk_forward` does not check (a check would read the GPU).

The products run in full float32 (`input_precision="ieee"`) by default: TF32 would put ~1e-3
relative error into a recurrence that later tokens compound. The sequential kernel stays the
reference; tests/test_wkv_chunk_triton.py holds the two equal under Triton's interpreter.
"""

from __future__ import annotations

import functools

import torch

from ..errors import HierarchosError
from .wkv_inputs import LOW_PRECISION, prepare
from .wkv_triton import triton_unavailable_reason

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    from .wkv_triton import _SUM  # tl.sum's combine function, callable under the interpreter too
except Exception:  # wkv_triton reports why (triton_unavailable_reason)
    triton = None

CHUNK = 16
PRECISIONS = ("ieee", "tf32")


def _chunk_fwd_kernel(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, s0_ptr, o_ptr, s_out_ptr, T, n_chunks,
                      H: tl.constexpr, N: tl.constexpr, BI: tl.constexpr, C: tl.constexpr,
                      SQUARINGS: tl.constexpr, PREC: tl.constexpr):
    """One program: rows [blk*BI, blk*BI + BI) of the state of one (b, h), all T tokens, C at a time.
    Tokens past T load zeros (frozen: they change nothing)."""
    NB: tl.constexpr = N // BI
    pid = tl.program_id(0)
    bh = pid // NB
    blk = pid % NB
    rows = blk * BI + tl.arange(0, BI)                    # value channels i held here
    cols = tl.arange(0, N)                                # key channels j
    steps = tl.arange(0, C)                               # tokens inside a chunk
    tok0 = ((bh // H).to(tl.int64) * T * H + bh % H) * N  # element (b, 0, h, 0) of a (B, T, H, N) input
    state0 = bh.to(tl.int64) * N * N
    s = tl.load(s0_ptr + state0 + rows[:, None] * N + cols[None, :])  # (BI, N)
    strict = steps[:, None] > steps[None, :]
    inclusive = steps[:, None] >= steps[None, :]
    eye = tl.where(steps[:, None] == steps[None, :], 1.0, 0.0)
    c = 0
    while c < n_chunks:  # while, not range: the interpreter (see wkv_triton's forward)
        t = c * C + steps
        live = (t < T)[:, None]
        off = tok0 + t.to(tl.int64)[:, None] * (H * N)                      # (C, 1)
        lw = tl.load(w_ptr + off + cols[None, :], mask=live, other=0.0)      # (C, N)
        kt = tl.load(k_ptr + off + cols[None, :], mask=live, other=0.0).to(tl.float32)
        at = tl.load(a_ptr + off + cols[None, :], mask=live, other=0.0)
        bt = tl.load(b_ptr + off + cols[None, :], mask=live, other=0.0)
        rt = tl.load(r_ptr + off + cols[None, :], mask=live, other=0.0).to(tl.float32)
        vt = tl.load(v_ptr + off + rows[None, :], mask=live, other=0.0).to(tl.float32)  # (C, BI)
        cl = tl.associative_scan(lw, 0, _SUM)                                # inclusive cumulative log decay
        cl_end = tl.reduce(lw, 0, _SUM)                                       # (N,) the whole chunk's
        grow = tl.exp(-cl)
        a_dec = at * tl.exp(cl - lw)
        r_dec = rt * tl.exp(cl)
        b_inv = bt * grow
        k_inv = kt * grow
        to_end = tl.exp(cl_end[None, :] - cl)
        l_ab = tl.where(strict, tl.dot(a_dec, tl.trans(b_inv), input_precision=PREC), 0.0)   # (C, C)
        l_ak = tl.where(strict, tl.dot(a_dec, tl.trans(k_inv), input_precision=PREC), 0.0)
        m_rb = tl.where(inclusive, tl.dot(r_dec, tl.trans(b_inv), input_precision=PREC), 0.0)
        m_rk = tl.where(inclusive, tl.dot(r_dec, tl.trans(k_inv), input_precision=PREC), 0.0)
        inv = eye + l_ab                                  # (I - L)^-1 = (I + L)(I + L^2)(I + L^4)...
        power = l_ab
        for _ in tl.static_range(SQUARINGS):
            power = tl.dot(power, power, input_precision=PREC)
            inv = inv + tl.dot(inv, power, input_precision=PREC)
        s_t = tl.trans(s)                                                     # (N, BI)
        rhs = tl.dot(a_dec, s_t, input_precision=PREC) + tl.dot(l_ak, vt, input_precision=PREC)
        u = tl.dot(inv, rhs, input_precision=PREC)                           # (C, BI): u_t = S_{t-1} a_t
        o = (tl.dot(r_dec, s_t, input_precision=PREC) + tl.dot(m_rb, u, input_precision=PREC)
             + tl.dot(m_rk, vt, input_precision=PREC))
        tl.store(o_ptr + off + rows[None, :], o, mask=live)
        s = (s * tl.exp(cl_end)[None, :] + tl.dot(tl.trans(u), bt * to_end, input_precision=PREC)
             + tl.dot(tl.trans(vt), kt * to_end, input_precision=PREC))
        c += 1
    tl.store(s_out_ptr + state0 + rows[:, None] * N + cols[None, :], s)


@functools.lru_cache(maxsize=None)
def _kernel(interpret: bool):
    """The kernel as a Triton JIT function, or run by Triton's interpreter on CPU tensors."""
    if interpret:
        return InterpretedFunction(_chunk_fwd_kernel)
    return triton.JITFunction(_chunk_fwd_kernel, do_not_specialize=["T", "n_chunks"])


def default_rows(head_size: int) -> int:
    """Rows of the state a program owns: 16 (the smallest tile tl.dot takes) up to the head size."""
    return min(head_size, 16)


def wkv7_chunk_forward(r, log_w, k, v, a, b, state=None, *, chunk=CHUNK, rows=None, num_warps=None,
                       precision="ieee"):
    """WKV-7 forward through the chunk-parallel Triton kernel (CUDA; CPU only under
    TRITON_INTERPRET=1). No autograd: for prefill and other no-grad calls (an input that requires
    grad under grad mode is an error). Same contract as `wkv7_reference` otherwise, computing in
    float32 (float64 inputs too); r, k, v may stay bf16/fp16 (upcast as loaded). `chunk` tokens a
    step (a power of two >= 16), `rows` state rows a program (a power of two, 16 <= rows <= N),
    `precision` of the small products ("ieee" float32, or "tf32" for benchmarks)."""
    reason = triton_unavailable_reason(r.device)
    if reason:
        raise HierarchosError(f"wkv7 impl 'triton_chunk' cannot run: {reason}; use impl='chunked'")
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (r, log_w, k, v, a, b, state)):
        raise HierarchosError("wkv7 impl 'triton_chunk' is forward only (no gradients); use impl='triton' "
                              "for training, or call it under torch.no_grad()")
    r, log_w, k, v, a, b, state = prepare(r, log_w, k, v, a, b, state, keep_low_rkv=True)
    r, k, v = (x.contiguous() if x.dtype in LOW_PRECISION else x.float().contiguous() for x in (r, k, v))
    log_w, a, b, state = (x.float().contiguous() for x in (log_w, a, b, state))
    batch, seq_len, heads, head_size = r.shape
    rows = rows or default_rows(head_size)
    if chunk < 16 or chunk & (chunk - 1):
        raise HierarchosError(f"wkv7 impl 'triton_chunk': chunk={chunk} must be a power of two >= 16")
    if head_size < 16 or head_size & (head_size - 1) or rows < 16 or rows & (rows - 1) or head_size % rows:
        raise HierarchosError(f"wkv7 impl 'triton_chunk' needs a power-of-two head size >= 16 (got {head_size}) "
                              f"and rows a power of two in [16, N] (got {rows}); use impl='triton'")
    if precision not in PRECISIONS:
        raise HierarchosError(f"wkv7 impl 'triton_chunk': precision={precision!r}: use one of {', '.join(PRECISIONS)}")
    o = torch.empty(r.shape, dtype=torch.float32, device=r.device)
    final = torch.empty_like(state)
    if seq_len == 0:
        return o, state
    n_chunks = -(-seq_len // chunk)
    grid = (batch * heads * (head_size // rows),)
    warps = num_warps or 4
    launch = _kernel(not r.is_cuda)[grid]
    args = (r, log_w, k, v, a, b, state, o, final, seq_len, n_chunks)
    meta = dict(H=heads, N=head_size, BI=rows, C=chunk, SQUARINGS=chunk.bit_length() - 2, PREC=precision,
                num_warps=warps)
    if r.is_cuda:
        with torch.cuda.device(r.device):
            launch(*args, **meta)
    else:
        launch(*args, **meta)
    return o, final
