"""Input checks shared by the WKV-7 paths (`wkv.py`, `wkv_triton.py`): one (B, T, H, N) shape for the
six inputs, the compute dtype (float64 when any input is float64, else float32; WKV-4's `wkv4.py` uses
the same rule) and the initial state (zeros when None). The lowest layer of the WKV ops: it imports
none of them."""

from __future__ import annotations

import torch


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32 (bf16/fp16 are upcast)."""
    return torch.float64 if any(x.dtype == torch.float64 for x in tensors) else torch.float32


LOW_PRECISION = (torch.bfloat16, torch.float16)


def prepare(r, log_w, k, v, a, b, state, keep_low_rkv: bool = False):
    """Check shapes, upcast the six inputs and make the initial state (zeros if None).

    `keep_low_rkv`: r, k and v stay in bfloat16/float16 when they come so and the compute dtype is
    float32 (for a kernel that upcasts them as it loads them: under autocast they come from bf16
    matmuls, so a float32 copy holds the same values in twice the memory)."""
    inputs = (r, log_w, k, v, a, b)
    if r.dim() != 4 or any(x.shape != r.shape for x in inputs):
        shapes = [tuple(x.shape) for x in inputs]
        raise ValueError(f"wkv7: r, log_w, k, v, a, b must share one (B, T, H, N) shape, got {shapes}")
    batch, _, heads, head_size = r.shape
    dtype = compute_dtype(*inputs)
    keep = (0, 2, 3) if keep_low_rkv and dtype == torch.float32 else ()
    inputs = tuple(x if i in keep and x.dtype in LOW_PRECISION else x.to(dtype) for i, x in enumerate(inputs))
    if state is None:
        state = r.new_zeros(batch, heads, head_size, head_size, dtype=dtype)
    elif state.shape != (batch, heads, head_size, head_size):
        raise ValueError(f"wkv7: state must be (B, H, N, N) = {(batch, heads, head_size, head_size)}, "
                         f"got {tuple(state.shape)}")
    else:
        state = state.to(dtype)
    return (*inputs, state)


def kernel_inputs(r, log_w, k, v, a, b, state):
    """`prepare` for the Triton kernels, which compute in float32: every input contiguous float32
    (float64 ones too), except r, k and v that come in bfloat16/float16 (the kernels upcast them as
    they load them)."""
    r, log_w, k, v, a, b, state = prepare(r, log_w, k, v, a, b, state, keep_low_rkv=True)
    r, k, v = (x.contiguous() if x.dtype in LOW_PRECISION else x.float().contiguous() for x in (r, k, v))
    log_w, a, b, state = (x.float().contiguous() for x in (log_w, a, b, state))
    return r, log_w, k, v, a, b, state
