"""RWKV-7 "generalized delta rule" time mixing (WKV) as pure functions.

Every path computes the same recurrence (below) in float32, or float64 for float64
inputs, and returns `(o, final_state)`: a plain scan (the ground truth), a small-T
step for generation, a chunk-parallel PyTorch version, fla-core's CUDA kernel and our own
fused Triton kernel (forward and backward, `wkv_triton.py`).

Per batch b and head h the state S is an (N, N) matrix, S[i, j] with i a value channel
and j a key channel. Inputs r, log_w, k, v, a, b have shape (B, T, H, N); for each t:

    S_t = S_{t-1} * exp(log_w_t)[None, :] + (S_{t-1} @ a_t)[:, None] * b_t[None, :]
          + v_t[:, None] * k_t[None, :]
    o_t = S_t @ r_t

that is S_t = S_{t-1} (diag(w_t) + a_t b_t^T) + v_t k_t^T. The model feeds
a = -kappa, b = kappa * iclr and log_w in [-0.61, 0]. A token with log_w = 0, b = 0,
k = 0 ("frozen") leaves S unchanged, whatever its r, v and a.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import HierarchosError
from .amp import autocast_off
from .wkv_inputs import prepare as _prepare
from .wkv_chunk_grad_triton import checked as chunk_grad_checked
from .wkv_chunk_grad_triton import wkv7_chunk_grad
from .wkv_chunk_triton import CHUNK_FORWARD_BELOW_PAIRS
from .wkv_chunk_triton import checked as chunk_forward_checked
from .wkv_chunk_triton import wkv7_chunk_forward
from .wkv_triton import triton_unavailable_reason, wkv7_triton

IMPLS = ("auto", "reference", "recurrent", "cpp_step", "chunked", "fla", "triton", "triton_chunk", "triton_chunk_grad")
ENV_IMPL = "HIERARCHOS_WKV_IMPL"
MAX_CHUNK_SIZE = 64  # |log_w| <= 0.61 keeps exp(0.61 * 64) ~ 1e17 far below float32's max
LOG_W_MIN = -0.61    # the model's decay bound: log_w = -exp(-softplus(.) - 0.5) > -e^-0.5 = -0.6065


# ----------------------------------------------------------------------------- scans


def wkv7_reference(r, log_w, k, v, a, b, state=None):
    """Ground truth: the recurrence written term by term, one token at a time.

    Returns o (B, T, H, N) and the final state (B, H, N, N), both in the compute dtype
    (float64 for float64 inputs, else float32).
    """
    r, log_w, k, v, a, b, state = _prepare(r, log_w, k, v, a, b, state)
    outputs = []
    for t in range(r.shape[1]):
        decay = torch.exp(log_w[:, t])                                  # (B, H, N) over keys j
        state_a = torch.einsum("bhij,bhj->bhi", state, a[:, t])         # S_{t-1} a_t, before decay
        state = (state * decay[:, :, None, :]
                 + state_a[:, :, :, None] * b[:, t, :, None, :]
                 + v[:, t, :, :, None] * k[:, t, :, None, :])
        outputs.append(torch.einsum("bhij,bhj->bhi", state, r[:, t]))
    o = torch.stack(outputs, dim=1) if outputs else r.new_zeros(r.shape)
    return o, state


def wkv7_recurrent_step(r, log_w, k, v, a, b, state=None):
    """The scan for tiny T (generation, usually T == 1), batched over B and H.

    Each step is one rank-2 update, S * w + [S a, v] @ [b; k], and one matrix-vector
    product for the output. Same contract as `wkv7_reference`.
    """
    r, log_w, k, v, a, b, state = _prepare(r, log_w, k, v, a, b, state)
    outputs = []
    for t in range(r.shape[1]):
        left = torch.cat([state @ a[:, t, :, :, None], v[:, t, :, :, None]], dim=-1)  # (B, H, N, 2)
        right = torch.stack([b[:, t], k[:, t]], dim=-2)                                # (B, H, 2, N)
        state = torch.baddbmm(
            (state * torch.exp(log_w[:, t, :, None, :])).flatten(0, 1),
            left.flatten(0, 1), right.flatten(0, 1),
        ).view_as(state)
        outputs.append((state @ r[:, t, :, :, None]).squeeze(-1))
    o = torch.stack(outputs, dim=1) if outputs else r.new_zeros(r.shape)
    return o, state


# ----------------------------------------------------------------------------- chunked


def wkv7_chunked(r, log_w, k, v, a, b, state=None, chunk_size=32):
    """Chunk-parallel WKV-7 in plain PyTorch (CPU or GPU, differentiable by autograd).

    T is padded with frozen tokens (all zeros) to n_chunks * C, C = chunk_size. Inside a
    chunk, with g_t = exp(cl_t) and cl_t the inclusive cumulative sum of log_w, every
    pairwise decay exp(cl_t - cl_s) is factored as exp(cl_t) * exp(-cl_s). This needs
    |cl| <= C * max|log_w| to stay far from float32's exp overflow (about 88): with the
    model's |log_w| <= 0.61 and C <= 64 that is at most ~39 (values up to ~1e17), so
    chunk_size is capped at 64 and log_w must lie in [-0.61, 0] (not checked: a check
    would synchronise the GPU).

    With u_t = S_{t-1} a_t and S_0 the chunk's initial state, stacked as rows:
        (I - L_ab) U = A_dec S_0^T + L_ak V            (strictly lower triangular L)
        O            = R_dec S_0^T + M_rb U + M_rk V    (lower triangular M)
        S_C          = S_0 diag(g_C) + U^T B_end + V^T K_end
    where A_dec = a * g_{t-1}, R_dec = r * g_t, L_xy = tril(X_dec Y_inv^T, -1),
    M_xy = tril(X_dec Y_inv^T), Y_inv = y / g_s, Y_end = y * g_C / g_s. U is linear in
    S_0, so one triangular solve per chunk (for all chunks at once) gives the chunk
    transition S_C = S_0 A_c + D_c and O = P S_0^T + Q. A loop over chunks then chains
    the states, and all outputs follow in parallel from each chunk's S_0.

    Returns o (B, T, H, N) and the true final state (B, H, N, N) in the compute dtype.
    """
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"wkv7_chunked: chunk_size must be in [1, {MAX_CHUNK_SIZE}], got {chunk_size}")
    r, log_w, k, v, a, b, state = _prepare(r, log_w, k, v, a, b, state)
    batch, seq_len, heads, head_size = r.shape
    if seq_len == 0:
        return r.new_zeros(r.shape), state
    n_chunks = -(-seq_len // chunk_size)
    pad = n_chunks * chunk_size - seq_len

    def to_chunks(x):  # (B, T, H, N) -> (B, H, n_chunks, C, N), padded with frozen zeros
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        return x.view(batch, n_chunks, chunk_size, heads, head_size).permute(0, 3, 1, 2, 4)

    r, log_w, k, v, a, b = (to_chunks(x) for x in (r, log_w, k, v, a, b))

    cum_log = log_w.cumsum(dim=-2)                       # cl_t, inclusive
    grow = torch.exp(-cum_log)                           # 1 / g_s
    a_dec = a * torch.exp(cum_log - log_w)               # a_t * g_{t-1}
    r_dec = r * torch.exp(cum_log)                       # r_t * g_t
    b_inv, k_inv = b * grow, k * grow
    to_end = torch.exp(cum_log[..., -1:, :] - cum_log)   # g_C / g_s, computed directly
    b_end, k_end = b * to_end, k * to_end

    L_ab = torch.tril(a_dec @ b_inv.transpose(-1, -2), diagonal=-1)   # (..., C, C)
    L_ak = torch.tril(a_dec @ k_inv.transpose(-1, -2), diagonal=-1)
    M_rb = torch.tril(r_dec @ b_inv.transpose(-1, -2))
    M_rk = torch.tril(r_dec @ k_inv.transpose(-1, -2))

    # U = W S_0^T + U_v: solve for both right-hand sides at once.
    eye = torch.eye(chunk_size, dtype=r.dtype, device=r.device)
    rhs = torch.cat([a_dec, L_ak @ v], dim=-1)                        # (..., C, 2N)
    solved = torch.linalg.solve_triangular(eye - L_ab, rhs, upper=False, unitriangular=True)
    W, U_v = solved.split(head_size, dim=-1)                           # (..., C, N) each

    out_from_state = r_dec + M_rb @ W                                  # P: O = P S_0^T + Q
    out_local = M_rb @ U_v + M_rk @ v                                  # Q
    transition = torch.diag_embed(torch.exp(cum_log[..., -1, :])) + W.transpose(-1, -2) @ b_end  # A_c
    injection = U_v.transpose(-1, -2) @ b_end + v.transpose(-1, -2) @ k_end                       # D_c

    chunk_states = []                                                  # each chunk's S_0
    # unbind, not transition[:, :, c]: indexing inside the loop makes every chunk's backward
    # zero-fill a full (B, H, n_chunks, N, N) gradient, quadratic in the number of chunks
    for trans_c, inject_c in zip(transition.unbind(2), injection.unbind(2)):
        chunk_states.append(state)
        state = state @ trans_c + inject_c
    start_states = torch.stack(chunk_states, dim=2)                    # (B, H, n_chunks, N, N)

    o = out_from_state @ start_states.transpose(-1, -2) + out_local    # (B, H, n_chunks, C, N)
    o = o.permute(0, 2, 3, 1, 4).reshape(batch, n_chunks * chunk_size, heads, head_size)
    return o[:, :seq_len], state


# ----------------------------------------------------------------------------- fla (CUDA)


@functools.lru_cache(maxsize=1)
def _fla_importable() -> bool:
    try:
        from fla.ops.generalized_delta_rule import chunk_dplr_delta_rule  # noqa: F401
    except Exception:  # ImportError, or a broken triton install underneath
        return False
    return True


def wkv7_fla(r, log_w, k, v, a, b, state=None, *, lower_bound=None, operands=torch.float32):
    """CUDA fast path through fla-core's chunked DPLR delta rule (Triton kernels, chunk-parallel).

    fla's `chunk_dplr_delta_rule(q, k, v, a, b, gk, ...)` runs, per head,
        S'_t = (diag(exp(gk_t)) + b_t a_t^T) S'_{t-1} + k_t v_t^T,   o_t = scale * S'_t^T q_t
    on a (K, V) state S' (a first contracts with the state before decay), inputs laid out
    (B, T, H, *). That is our recurrence with S' = S^T, q = r, gk = log_w, scale = 1.
    `lower_bound` (e.g. LOG_W_MIN, the model's bound) promises log_w >= lower_bound, which lets
    fla use chunks of 64 on its tensor-core scheme (16 otherwise); frozen tokens (log_w = 0) are
    allowed. `operands`: the dtype r, k, v, a, b are handed over in (log_w and the state stay
    float32). fla computes in float32 with its dots possibly in TF32 (float64 inputs too); o and
    the final state come back as float32.
    """
    if not _fla_importable():
        raise HierarchosError("wkv7 impl 'fla' needs the fla-core package (pip install fla-core) "
                              "and a working triton; use impl='chunked' instead")
    if not r.is_cuda:
        raise HierarchosError("wkv7 impl 'fla' runs on CUDA tensors only; use impl='chunked' on CPU")
    from fla.ops.generalized_delta_rule import chunk_dplr_delta_rule

    r, log_w, k, v, a, b, state = _prepare(r, log_w, k, v, a, b, state)
    r, k, v, a, b = (x.to(operands) for x in (r, k, v, a, b))
    log_w, state = log_w.float(), state.float()
    with warnings.catch_warnings():
        # fla warns about float32 on some platforms and about T < H looking head-first;
        # we ask for float32 on purpose and our layout is always (B, T, H, N).
        warnings.filterwarnings("ignore", message=".*does not support float32.*")
        warnings.filterwarnings("ignore", message=".*format mismatch.*")
        o, final_state = chunk_dplr_delta_rule(
            q=r, k=k, v=v, a=a, b=b, gk=log_w, scale=1.0,
            initial_state=state.transpose(-1, -2).contiguous(),   # (B, H, K, V)
            output_final_state=True, lower_bound=lower_bound,
        )
    return o.float(), final_state.float().transpose(-1, -2)


# ----------------------------------------------------------------------------- dispatch


@functools.lru_cache(maxsize=None)
def _cpp_kernels():
    """The C++ extension (kernels/) when built, else None: its step is an optional fast path."""
    try:
        import importlib

        ext = importlib.import_module("hierarchos.hierarchos_kernels")
    except ImportError:
        return None
    return ext if hasattr(ext, "wkv7_steps") else None


def _cpp_step_fits(r: torch.Tensor) -> bool:
    # not under torch.compile: the C++ step goes through numpy, which dynamo cannot trace (a graph break
    # per layer step); the traced recurrent step is what a compiled generation step fuses
    return (r.device.type == "cpu" and r.dtype == torch.float32 and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and _cpp_kernels() is not None)


def wkv7_cpp_step(r, log_w, k, v, a, b, state=None):
    """`wkv7_recurrent_step` fused in C++ (CPU, float32, no autograd): one call instead of a dozen
    small torch ops per token, which dominate generation, and the prompt's whole sequence in one
    call (its (batch, head) pairs on the kernel's pool). Same contract as `wkv7_reference`."""
    ext = _cpp_kernels()
    if ext is None:
        raise HierarchosError("wkv7 impl 'cpp_step' needs the C++ kernel; build it with `bash setup.sh`")
    r, log_w, k, v, a, b, state = _prepare(r, log_w, k, v, a, b, state)
    if r.dtype != torch.float32 or r.device.type != "cpu":
        raise HierarchosError("wkv7 impl 'cpp_step' runs float32 CPU tensors only")
    out, new_state = ext.wkv7_steps(*(x.detach().contiguous().numpy() for x in (state, r, log_w, k, v, a, b)))
    return torch.from_numpy(out), torch.from_numpy(new_state)


def available_impls(device: torch.device | str | None = None) -> tuple[str, ...]:
    """Implementations that can run now (on `device` when given): 'fla' needs CUDA + fla-core,
    'triton' CUDA + triton, 'cpp_step' the built C++ kernel (CPU). Forward-only 'triton_chunk' (where
    'triton' runs) is left out: these are the paths with gradients."""
    names = ("reference", "recurrent", "chunked") + (("cpp_step",) if _cpp_kernels() is not None else ())
    cuda_ok = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if cuda_ok and _fla_importable():
        names += ("fla",)
    return names + ("triton",) if cuda_ok and _triton_fits_cuda() else names


def _triton_fits_cuda(head_size: int = 64) -> bool:
    """Our Triton kernel can run on CUDA: triton imports, a GPU is there, N is a power of two."""
    return head_size & (head_size - 1) == 0 and not triton_unavailable_reason("cuda")


# Below this many (batch, head) pairs per call our sequential kernel, which runs N/8 programs per
# pair stepping through all T tokens, leaves most of the GPU idle, and fla's chunk-parallel kernel
# wins: on an H200, 125m minimal, full training step under a CUDA graph, B=2 T=8192 (24 pairs)
# 209.7 ms with fla vs 282.7 ms with ours; B=16 T=1024 (192 pairs) 157.1 vs 164.7 ms, and the
# default config 399.4 vs 390.1 ms (BENCHMARKS.md, bench/gpu.sh table). 66 pairs = 528 programs of
# ours = 4 per multiprocessor of an H100/H200.
FLA_BELOW_PAIRS = 66


# fla's chunked kernels multiply (chunk x N) tiles with tl.dot, which needs every dimension >= 16:
# with smaller heads their Triton compile fails inside the backward (seen on an H200, head size 8)
FLA_MIN_HEAD_SIZE = 16


# A call that needs no gradient (prefill, evaluation) of at least CHUNK_FORWARD_MIN_T tokens and with
# fewer than CHUNK_FORWARD_BELOW_PAIRS (batch, head) pairs runs the chunk-parallel forward
# (`wkv_chunk_triton`): T / 16 dependent steps instead of T. H100, no-grad forward, N=64 (BENCHMARKS.md,
# "A chunk-parallel forward for the prefill"): B=1 T=1024 H=12 0.35-0.42 ms against the sequential
# kernel's 0.39-0.68, B=1 T=256 0.18 against 0.22; B=16 T=1024 1.77 against 0.87 (with many pairs the
# sequential kernel already fills the GPU and the chunk form's extra products cost more). The pair
# bound is FLA_BELOW_PAIRS' (4 programs per SM for the sequential kernel), measured at 12 and 192 only;
# the chunk-parallel backward's forward takes it where its scans are float32 (`wkv_chunk_grad_triton.forward_kind`).
CHUNK_FORWARD_MIN_T = 32


def cuda_choice(batch: int, heads: int, triton_ok: bool, fla_ok: bool, seq_len: int = 0,
                needs_grad: bool = True, head_size: int = 64, tf32: bool = False) -> str:
    """The CUDA path for a call with `batch` x `heads` (batch, head) pairs: without gradients, with
    at least CHUNK_FORWARD_MIN_T tokens and fewer than CHUNK_FORWARD_BELOW_PAIRS pairs our
    chunk-parallel forward; with gradients where TF32 is allowed (`tf32`), our chunk-parallel
    backward with TF32 products inside the chunks (1.7-4.2x the sequential kernel's fwd+bwd on an H100 at
    the 30M, 125m and T=8192 shapes, relative error ~3e-3 like fla's: BENCHMARKS.md); else fla's chunked
    kernel when there are too few pairs to fill the GPU (FLA_BELOW_PAIRS), else our Triton kernel; the
    other when only one of them can run; the chunked PyTorch path when neither can."""
    if (triton_ok and not needs_grad and seq_len >= CHUNK_FORWARD_MIN_T and head_size >= 16
            and batch * heads < CHUNK_FORWARD_BELOW_PAIRS):
        return "triton_chunk"
    if triton_ok and needs_grad and tf32 and head_size >= 16:
        return "triton_chunk_grad"
    if fla_ok and (batch * heads < FLA_BELOW_PAIRS or not triton_ok):
        return "fla"
    return "triton" if triton_ok else "chunked"


def resolve_impl(impl: str, r: torch.Tensor, needs_grad: bool = True) -> str:
    """The implementation `wkv7` will run for input `r` (shape (B, T, H, N)).

    impl='auto' is first replaced by $HIERARCHOS_WKV_IMPL when that is set; an explicit
    impl wins over the variable. 'auto' then picks the C++ sequential loop ('cpp_step') for float32
    CPU tensors without autograd when the kernel is built, at any length (a prompt's pairs run on the
    kernel's pool: B1 T1024 H12 N64 on 2 cores 16.7 ms against the chunked form's 43.2); else the
    recurrent step for T <= 2; for CUDA
    tensors (not float64) `cuda_choice`: our chunk-parallel forward for calls that need no gradient
    (`needs_grad` False) of at least CHUNK_FORWARD_MIN_T tokens with few (batch, head) pairs -- a
    prompt's prefill at small batch -- once it has passed its check on the device
    (`wkv_chunk_triton.checked`); for calls with gradients where torch may use TF32
    (`torch.backends.cuda.matmul.allow_tf32`, which `train` sets) our chunk-parallel backward
    (`wkv_chunk_grad_triton`, TF32 products inside a chunk, float32 across chunks); else fla-core's chunked kernel (when it imports) for calls with few
    (batch, head) pairs -- long sequences at small batch -- and heads of at least
    FLA_MIN_HEAD_SIZE; our sequential Triton kernel otherwise; the chunked path on the CPU. fla
    passes our float64 check with TF32-class errors (<= 1.9e-3 relative on outputs, state and all
    seven gradients, frozen tokens and state carry included; ours 1.5e-7):
    HIERARCHOS_WKV_IMPL=triton keeps the exact kernel.
    """
    if impl not in IMPLS:
        raise ValueError(f"wkv7: unknown impl {impl!r}; expected one of {IMPLS}")
    if impl == "auto":
        impl = os.environ.get(ENV_IMPL, "").strip() or "auto"
        if impl not in IMPLS:
            raise HierarchosError(f"{ENV_IMPL}={impl!r} is not a wkv7 impl; use one of {', '.join(IMPLS)}")
    if impl != "auto":
        return impl
    if _cpp_step_fits(r):  # float32 on the CPU without autograd, any length
        return "cpp_step"
    if r.shape[1] <= 2:
        return "recurrent"
    if r.is_cuda and r.dtype != torch.float64:
        choose = functools.partial(cuda_choice, r.shape[0], r.shape[2], _triton_fits_cuda(r.shape[-1]),
                                   r.shape[-1] >= FLA_MIN_HEAD_SIZE and _fla_importable(), r.shape[1],
                                   head_size=r.shape[-1], tf32=torch.backends.cuda.matmul.allow_tf32)
        name = choose(needs_grad)
        if name == "triton_chunk" and not chunk_forward_checked(r.device):  # did not build or match here
            name = choose(True, tf32=False)
        elif name == "triton_chunk_grad" and not chunk_grad_checked(r.device):
            name = choose(needs_grad, tf32=False)
        return name
    return "chunked"


def wkv7(r, log_w, k, v, a, b, state=None, impl="auto", chunk_size=32):
    """Run the WKV-7 recurrence with the chosen implementation (see `resolve_impl`).

    Inputs (B, T, H, N), state (B, H, N, N) or None for zeros. Returns (o, final_state)
    in float32 (float64 for float64 inputs); the caller casts back.
    """
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad
                                                 for x in (r, log_w, k, v, a, b, state))
    name = resolve_impl(impl, r, needs_grad)
    with autocast_off(r.device.type):  # the state accumulates in float32 under autocast too
        if name == "chunked":
            return wkv7_chunked(r, log_w, k, v, a, b, state, chunk_size=chunk_size)
        run = {"reference": wkv7_reference, "recurrent": wkv7_recurrent_step, "cpp_step": wkv7_cpp_step,
               "fla": wkv7_fla, "triton": wkv7_triton, "triton_chunk": wkv7_chunk_forward,
               "triton_chunk_grad": wkv7_chunk_grad}[name]
        return run(r, log_w, k, v, a, b, state)


# A call without gradients as one opaque operator for torch.compile (its fake form gives the shapes): a
# compiled block then traces through the recurrence instead of breaking its graph around a
# dynamo-disabled call (three frames a variant, and no fusion across the call). The prefill's compiled
# blocks take it; a call that needs gradients keeps the disabled call and its autograd.
@torch.library.custom_op("hierarchos::wkv7_no_grad", mutates_args=())
def wkv7_no_grad(r: torch.Tensor, log_w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                 b: torch.Tensor, state: Optional[torch.Tensor], chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`wkv7` under no_grad (the automatic implementation); outputs contiguous (the fake form's layout, which
    compiled code indexes by) and new (never an input)."""
    with torch.no_grad():
        o, final = wkv7(r, log_w, k, v, a, b, state=state, chunk_size=chunk_size)
    o, final = o.contiguous(), final.contiguous()
    return o if o is not r else o.clone(), final if final is not state else final.clone()


@wkv7_no_grad.register_fake
def _(r, log_w, k, v, a, b, state, chunk_size):
    dtype = torch.float64 if torch.float64 in (r.dtype, log_w.dtype) else torch.float32
    B, T, H, N = r.shape
    return r.new_empty((B, T, H, N), dtype=dtype), r.new_empty((B, H, N, N), dtype=dtype)
