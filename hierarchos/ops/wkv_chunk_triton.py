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

Every value channel i (a row of S) needs only its own row of S_0 and its own v. A first kernel forms
every chunk's state-free matrices at once (one program per chunk); a second, whose programs own `rows`
rows of one (batch, head) state, scans the chunks in order with five small products a chunk on its
critical path. (Forming them inside the scan instead, eighteen products a chunk on that path and no
workspace, was 1.6-1.7x slower on an H100: BENCHMARKS.md.) L_ab is strictly lower triangular, so
(I - L_ab)^-1 = (I + L)(I + L^2)(I + L^4)... (L^C = 0): log2(C) products instead of a triangular solve. The factors exp(-cl) grow as exp(C max|log_w|); with
C = 16 that stays far inside float32 for |log_w| <= 5 (the model's is <= 0.61), which
`wkv7_chunk_forward` does not check (a check would read the GPU).

The products run in full float32 (`input_precision="ieee"`) by default: TF32 would put ~1e-3
relative error into a recurrence that later tokens compound. The sequential kernel stays the
reference: tests/test_wkv_chunk_triton.py holds this one to the float64 scan under Triton's interpreter
and to the sequential kernel on a GPU, and `checked` compares the two once per device before `wkv7`
takes this one.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from ..errors import HierarchosError
from .device_check import checked_once
from .wkv_inputs import kernel_inputs
from .wkv_triton import triton_unavailable_reason, wkv7_triton

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    from .wkv_triton import _SUM  # tl.sum's combine function, callable under the interpreter too
except Exception:  # wkv_triton reports why (triton_unavailable_reason)
    triton = None

CHUNK = 16
# Calls with fewer (batch, head) pairs than this take the chunk-parallel forward (`wkv.cuda_choice` for
# the prefill, `wkv_chunk_grad_triton.forward_kind` for training with float32 scans); from it on the
# sequential kernel fills the GPU (4 programs an SM of an H100 at 8 rows a program) and was 2x faster at
# B16 T1024 H12 with float32 products.
CHUNK_FORWARD_BELOW_PAIRS = 66
PRECISIONS = ("ieee", "tf32x3", "tf32")  # float32; three TF32 products a product; one


def _wkv7_chunk_prep_kernel(r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, ws_ptr, q_ptr, g_ptr, T, n_chunks,
                            H: tl.constexpr, N: tl.constexpr, C: tl.constexpr, SQUARINGS: tl.constexpr,
                            PREC: tl.constexpr, WITH_E: tl.constexpr, WITH_Q: tl.constexpr):
    """First pass, one program per (b, h, chunk), all chunks at once: everything of a chunk
    that does not depend on the state entering it (the module's formulas with U and O expanded in S_0):
        W = (I - L_ab)^-1 A_dec, U_v = (I - L_ab)^-1 L_ak            so U = W S_0^T + U_v V
        P = R_dec + M_rb W, Q = M_rb U_v + M_rk                         so O = P S_0^T + Q V
        B_end = b g_C / g, E = U_v^T B_end + k g_C / g                  so S_C = S_0 g_C + (S_0 W^T) B_end + V^T E
    stored as ws[pid] = (W, B_end, E, P) (4, C, N), q[pid] = Q (C, C), g[pid] = g_C (N). Without WITH_E (the
    backward's reverse scan needs only W, B_end, P and g) E is neither formed nor stored, without WITH_Q
    (only the forward's outputs need Q) Q."""
    pid = tl.program_id(0)
    bh = pid // n_chunks
    c = pid % n_chunks
    cols = tl.arange(0, N)
    steps = tl.arange(0, C)
    tok0 = ((bh // H).to(tl.int64) * T * H + bh % H) * N
    t = c * C + steps
    live = (t < T)[:, None]
    off = tok0 + t.to(tl.int64)[:, None] * (H * N)
    lw = tl.load(w_ptr + off + cols[None, :], mask=live, other=0.0)
    kt = tl.load(k_ptr + off + cols[None, :], mask=live, other=0.0).to(tl.float32)
    at = tl.load(a_ptr + off + cols[None, :], mask=live, other=0.0)
    bt = tl.load(b_ptr + off + cols[None, :], mask=live, other=0.0)
    rt = tl.load(r_ptr + off + cols[None, :], mask=live, other=0.0).to(tl.float32)
    cl = tl.associative_scan(lw, 0, _SUM)
    cl_end = tl.reduce(lw, 0, _SUM)
    grow = tl.exp(-cl)
    a_dec = at * tl.exp(cl - lw)
    r_dec = rt * tl.exp(cl)
    b_inv = bt * grow
    k_inv = kt * grow
    to_end = tl.exp(cl_end[None, :] - cl)
    strict = steps[:, None] > steps[None, :]
    inclusive = steps[:, None] >= steps[None, :]
    l_ab = tl.where(strict, tl.dot(a_dec, tl.trans(b_inv), input_precision=PREC), 0.0)
    m_rb = tl.where(inclusive, tl.dot(r_dec, tl.trans(b_inv), input_precision=PREC), 0.0)
    inv = tl.where(steps[:, None] == steps[None, :], 1.0, 0.0) + l_ab
    power = l_ab
    for _ in tl.static_range(SQUARINGS):
        power = tl.dot(power, power, input_precision=PREC)
        inv = inv + tl.dot(inv, power, input_precision=PREC)
    w = tl.dot(inv, a_dec, input_precision=PREC)                       # (C, N)
    p = r_dec + tl.dot(m_rb, w, input_precision=PREC)
    b_end = bt * to_end
    tile = steps[:, None] * N + cols[None, :]
    base = pid.to(tl.int64) * (4 * C * N)
    tl.store(ws_ptr + base + tile, w)
    tl.store(ws_ptr + base + C * N + tile, b_end)
    tl.store(ws_ptr + base + 3 * C * N + tile, p)
    tl.store(g_ptr + pid.to(tl.int64) * N + cols, tl.exp(cl_end))
    if WITH_E:
        l_ak = tl.where(strict, tl.dot(a_dec, tl.trans(k_inv), input_precision=PREC), 0.0)
        u_v = tl.dot(inv, l_ak, input_precision=PREC)                  # (C, C)
        e = tl.dot(tl.trans(u_v), b_end, input_precision=PREC) + kt * to_end
        tl.store(ws_ptr + base + 2 * C * N + tile, e)
        if WITH_Q:
            m_rk = tl.where(inclusive, tl.dot(r_dec, tl.trans(k_inv), input_precision=PREC), 0.0)
            q = tl.dot(m_rb, u_v, input_precision=PREC) + m_rk
            tl.store(q_ptr + pid.to(tl.int64) * (C * C) + steps[:, None] * C + steps[None, :], q)


def _wkv7_chunk_scan_kernel(v_ptr, s0_ptr, ws_ptr, q_ptr, g_ptr, o_ptr, s_out_ptr, starts_ptr, T, n_chunks,
                            H: tl.constexpr, N: tl.constexpr, BI: tl.constexpr, C: tl.constexpr,
                            PREC: tl.constexpr, STORE_STARTS: tl.constexpr):
    """Second pass: rows [blk*BI, blk*BI + BI) of one (b, h) state through the chunks in order, five
    small products a chunk (the first pass's docstring has them). Tokens past T load zeros. With
    STORE_STARTS the state entering each chunk goes to starts[(b, h), chunk] (for a backward)."""
    NB: tl.constexpr = N // BI
    pid = tl.program_id(0)
    bh = pid // NB
    blk = pid % NB
    rows = blk * BI + tl.arange(0, BI)
    cols = tl.arange(0, N)
    steps = tl.arange(0, C)
    tok0 = ((bh // H).to(tl.int64) * T * H + bh % H) * N
    state0 = bh.to(tl.int64) * N * N
    s = tl.load(s0_ptr + state0 + rows[:, None] * N + cols[None, :])
    tile = steps[:, None] * N + cols[None, :]
    c = 0
    while c < n_chunks:
        chunk_id = bh.to(tl.int64) * n_chunks + c
        if STORE_STARTS:
            tl.store(starts_ptr + chunk_id * (N * N) + rows[:, None] * N + cols[None, :], s)
        base = chunk_id * (4 * C * N)
        w = tl.load(ws_ptr + base + tile)
        b_end = tl.load(ws_ptr + base + C * N + tile)
        e = tl.load(ws_ptr + base + 2 * C * N + tile)
        g = tl.load(g_ptr + chunk_id * N + cols)
        t = c * C + steps
        live = (t < T)[:, None]
        off = tok0 + t.to(tl.int64)[:, None] * (H * N)
        vt = tl.load(v_ptr + off + rows[None, :], mask=live, other=0.0).to(tl.float32)   # (C, BI)
        p = tl.load(ws_ptr + base + 3 * C * N + tile)
        q = tl.load(q_ptr + chunk_id * (C * C) + steps[:, None] * C + steps[None, :])
        o = tl.dot(p, tl.trans(s), input_precision=PREC) + tl.dot(q, vt, input_precision=PREC)
        tl.store(o_ptr + off + rows[None, :], o, mask=live)
        sw = tl.dot(s, tl.trans(w), input_precision=PREC)                                # (BI, C)
        s = (s * g[None, :] + tl.dot(sw, b_end, input_precision=PREC)
             + tl.dot(tl.trans(vt), e, input_precision=PREC))
        c += 1
    tl.store(s_out_ptr + state0 + rows[:, None] * N + cols[None, :], s)


@functools.lru_cache(maxsize=None)
def _kernel(interpret: bool):
    """The two kernels as Triton JIT functions, or run by Triton's interpreter on CPU tensors."""
    kernels = (_wkv7_chunk_prep_kernel, _wkv7_chunk_scan_kernel)
    if interpret:
        return tuple(InterpretedFunction(k) for k in kernels)
    return tuple(triton.JITFunction(k, do_not_specialize=["T", "n_chunks"]) for k in kernels)


def default_rows(head_size: int) -> int:
    """Rows of the state a program owns: 16 (the smallest tile tl.dot takes) up to the head size."""
    return min(head_size, 16)


def check_sizes(impl: str, head_size: int, chunk: int, rows: int, precision: str) -> None:
    """The one-line errors for launch sizes the chunk kernels cannot take (tl.dot tiles are >= 16)."""
    if chunk < 16 or chunk & (chunk - 1):
        raise HierarchosError(f"wkv7 impl {impl!r}: chunk={chunk} must be a power of two >= 16")
    if head_size < 16 or head_size & (head_size - 1) or rows < 16 or rows & (rows - 1) or head_size % rows:
        raise HierarchosError(f"wkv7 impl {impl!r} needs a power-of-two head size >= 16 (got {head_size}) "
                              f"and rows a power of two in [16, N] (got {rows}); use impl='triton'")
    if precision not in PRECISIONS:
        raise HierarchosError(f"wkv7 impl {impl!r}: precision={precision!r}: use one of {', '.join(PRECISIONS)}")


def wkv7_chunk_forward(r, log_w, k, v, a, b, state=None, *, chunk=CHUNK, rows=None, num_warps=None,
                       precision="ieee"):
    """WKV-7 forward through the chunk-parallel Triton kernel (CUDA; CPU only under
    TRITON_INTERPRET=1). No autograd: for prefill and other no-grad calls (an input that requires
    grad under grad mode is an error). Same contract as `wkv7_reference` otherwise, computing in
    float32 (float64 inputs too); r, k, v may stay bf16/fp16 (upcast as loaded). `chunk` tokens a
    step (a power of two >= 16), `rows` state rows a program (a power of two, 16 <= rows <= N),
    `precision` of the small products ("ieee" float32, or "tf32x3" / "tf32" on tensor cores, for
    benchmarks). The two kernels meet in a workspace of ~18 KB a (batch, head, chunk)."""
    reason = triton_unavailable_reason(r.device)
    if reason:
        raise HierarchosError(f"wkv7 impl 'triton_chunk' cannot run: {reason}; use impl='chunked'")
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (r, log_w, k, v, a, b, state)):
        raise HierarchosError("wkv7 impl 'triton_chunk' is forward only (no gradients); use impl='triton' "
                              "for training, or call it under torch.no_grad()")
    r, log_w, k, v, a, b, state = kernel_inputs(r, log_w, k, v, a, b, state)
    seq_len, head_size = r.shape[1], r.shape[-1]
    rows = rows or default_rows(head_size)
    check_sizes("triton_chunk", head_size, chunk, rows, precision)
    if seq_len == 0:
        return torch.zeros(r.shape, dtype=torch.float32, device=r.device), state
    return run_chunk_forward(r, log_w, k, v, a, b, state, chunk=chunk, rows=rows, num_warps=num_warps,
                             precision=precision)


def prep_buffers(r: torch.Tensor, chunk: int, n_chunks: int, with_q: bool = True):
    """The workspace the prep kernel fills for a call of r's shape: ws (pairs * n_chunks, 4, C, N),
    q (pairs * n_chunks, C, C; one element without `with_q`), g (pairs * n_chunks, N), float32."""
    batch, _, heads, head_size = r.shape
    chunks = batch * heads * n_chunks
    new = functools.partial(torch.empty, dtype=torch.float32, device=r.device)
    return (new((chunks, 4, chunk, head_size)), new((chunks, chunk, chunk) if with_q else (1,)),
            new((chunks, head_size)))


PREP_TERMS = ("all", "state", "state_update")


def launch_prep(r, log_w, k, a, b, chunk, precision="ieee", num_warps=4, terms="all"):
    """The first kernel on kernel-ready inputs (`kernel_inputs`, T >= 1): every chunk's (W, B_end, E, P),
    Q and g (`prep_buffers`). `terms`: "all" (the forward's), "state" (W, B_end, P and g alone: the
    backward's reverse scan; E's slot left unwritten, Q not made) or "state_update" (the same and E: what
    carrying the state through the chunks needs too; Q not made)."""
    if terms not in PREP_TERMS:
        raise ValueError(f"launch_prep: terms={terms!r}, use one of {PREP_TERMS}")
    batch, seq_len, heads, head_size = r.shape
    n_chunks = -(-seq_len // chunk)
    ws, q, g = prep_buffers(r, chunk, n_chunks, with_q=terms == "all")
    prep, _ = _kernel(not r.is_cuda)
    with torch.cuda.device(r.device) if r.is_cuda else contextlib.nullcontext():
        prep[(batch * heads * n_chunks,)](r, log_w, k, a, b, ws, q, g, seq_len, n_chunks, H=heads, N=head_size,
                                          C=chunk, SQUARINGS=chunk.bit_length() - 2,  # (I + L)(I + L^2)...
                                          PREC=precision, WITH_E=terms != "state", WITH_Q=terms == "all",
                                          num_warps=num_warps)
    return ws, q, g


def run_chunk_forward(r, log_w, k, v, a, b, state, *, chunk=CHUNK, rows=None, num_warps=None, precision="ieee",
                      starts=None, scan_precision=None):
    """Both kernels on kernel-ready inputs (T >= 1, sizes checked): (o, final state). `starts`, a float32
    (B * H * n_chunks * N * N) buffer, also receives the state entering every chunk. `scan_precision`: the
    scan's products (default `precision`, which the prep's take)."""
    batch, seq_len, heads, head_size = r.shape
    rows = rows or default_rows(head_size)
    n_chunks = -(-seq_len // chunk)
    o = torch.empty(r.shape, dtype=torch.float32, device=r.device)
    final = torch.empty_like(state)
    ws, q, g = launch_prep(r, log_w, k, a, b, chunk, precision, num_warps or 4)
    _, scan = _kernel(not r.is_cuda)
    with torch.cuda.device(r.device) if r.is_cuda else contextlib.nullcontext():
        scan[(batch * heads * (head_size // rows),)](
            v, state, ws, q, g, o, final, final if starts is None else starts, seq_len, n_chunks,
            H=heads, N=head_size, BI=rows, C=chunk, PREC=scan_precision or precision, STORE_STARTS=starts is not None,
            num_warps=num_warps or 4)
    return o, final


_CHECKED: dict = {}  # device -> whether the kernels built and matched the sequential kernel there


def check_inputs(shape: tuple[int, int, int, int], gen: torch.Generator) -> dict:
    """A device check's call (CPU tensors): the six (B, T, H, N) inputs in the model's ranges with a fifth
    of the tokens frozen, and an initial state."""
    kappa = torch.nn.functional.normalize(torch.randn(shape, generator=gen), dim=-1)
    live = (torch.rand(shape[:2], generator=gen) > 0.2)[:, :, None, None]
    return dict(r=torch.randn(shape, generator=gen), log_w=-0.61 * torch.rand(shape, generator=gen) * live,
                k=torch.randn(shape, generator=gen) * live, v=torch.randn(shape, generator=gen), a=-kappa,
                b=kappa * torch.rand(shape, generator=gen) * live,
                state=torch.randn(shape[0], shape[2], shape[3], shape[3], generator=gen))


def checked(device: torch.device | str) -> bool:
    """Whether the chunk forward builds on `device` and matches the sequential kernel there (relative
    error under 1e-4 on outputs and state, frozen tokens and a partial last chunk included): what
    `wkv7`'s automatic choice asks before taking it. Checked once per device, outside any CUDA graph
    capture (`device_check.checked_once`: during a capture an unchecked device is answered False, so the
    sequential kernel is captured). A failure is reported once and the device keeps the sequential
    kernel for calls without gradients too."""
    def check(device):
        inputs = check_inputs((1, 2 * CHUNK + 5, 2, 64), torch.Generator().manual_seed(0))
        x = {n: t.to(device) for n, t in inputs.items()}
        with torch.no_grad():
            got, want = wkv7_chunk_forward(**x), wkv7_triton(**x)
        errors = [float((g - w).norm() / w.norm()) for g, w in zip(got, want)]
        return max(errors) < 1e-4, f"relative errors {errors} against the sequential kernel"
    return checked_once(_CHECKED, device, check, "the chunk-parallel WKV-7 forward",
                        "calls without gradients keep the sequential kernel there")
