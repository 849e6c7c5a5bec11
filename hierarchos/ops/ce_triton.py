"""Cross-entropy + z-loss over the vocabulary in two Triton kernels (forward and backward).

The (N, V) logits are the largest tensor of a training step (16k tokens x 50k vocabulary =
1.6 GB in bf16). The PyTorch form (`hierarchos.model.losses._CrossEntropyZ`, the reference)
upcasts them to float32 and makes several passes (logsumexp, gather, exp, scale, scatter,
cast back), each over a 3.3 GB float32 temporary. Here one program per row reads the logits
once in the forward (an online logsumexp in float32 plus the target's logit) and once in the
backward, writing the gradient softmax * coef - onehot * coef_ce straight in the logits' dtype:
no float32 temporary of the logits' size exists. Rows may be a strided view (the padded head of
`hierarchos.ops.aligned`); columns must be contiguous.
"""

from __future__ import annotations

import functools

import torch

from .wkv_triton import triton, triton_unavailable_reason

if triton is not None:  # optional: without it the PyTorch form of the loss runs everywhere
    import triton.language as tl
    from .wkv_triton import _SUM
    from triton.runtime.interpreter import InterpretedFunction

    _MAX = tl.standard._elementwise_max  # tl.max is a JIT function; see wkv_triton's note on _SUM
    # "no logit" in masked lanes: finite, so max/exp never see -inf - -inf (a global a kernel
    # reads must be a constexpr)
    FLOOR = tl.constexpr(-1e30)


def _ce_fwd_kernel(x_ptr, t_ptr, lse_ptr, pick_ptr, V, stride, BLOCK: tl.constexpr):
    """Row `program_id`: lse = logsumexp(x[row, :V]) and picked = x[row, target] in float32."""
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride
    cols = tl.arange(0, BLOCK)
    m = tl.full((BLOCK,), FLOOR, tl.float32)   # per-lane running max
    s = tl.full((BLOCK,), 0.0, tl.float32)    # per-lane sum of exp(x - m) (tl.zeros is JIT: see _SUM)
    start = 0
    while start < V:  # while, not range: Triton's interpreter cannot range over a runtime scalar
        idx = start + cols
        x = tl.where(idx < V, tl.load(base + idx, mask=idx < V, other=0.0).to(tl.float32), FLOOR)
        m_new = tl.maximum(m, x)
        s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
        start += BLOCK
    top = tl.reduce(m, 0, _MAX)
    lse = top + tl.log(tl.reduce(s * tl.exp(m - top), 0, _SUM))  # lanes never loaded add exp(FLOOR - top) = 0
    tl.store(lse_ptr + row, lse)
    tl.store(pick_ptr + row, tl.load(base + tl.load(t_ptr + row)).to(tl.float32))


def _ce_bwd_kernel(x_ptr, t_ptr, lse_ptr, coef_ptr, coef_ce_ptr, g_ptr, V, stride, g_stride,
                   BLOCK: tl.constexpr):
    """d/dx of coef_ce * (lse - x[target]) + coef_z-part: exp(x - lse) * coef - [col == target] * coef_ce."""
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride
    out = g_ptr + row * g_stride
    lse = tl.load(lse_ptr + row)
    coef = tl.load(coef_ptr + row)
    coef_ce = tl.load(coef_ce_ptr + row)
    target = tl.load(t_ptr + row)
    cols = tl.arange(0, BLOCK)
    start = 0
    while start < V:
        idx = start + cols
        live = idx < V
        x = tl.load(base + idx, mask=live, other=0.0).to(tl.float32)
        g = tl.exp(x - lse) * coef - tl.where(idx == target, coef_ce, 0.0)
        tl.store(out + idx, g.to(g_ptr.dtype.element_ty), mask=live)
        start += BLOCK


@functools.lru_cache(maxsize=None)
def _kernels(interpret: bool):
    """(forward, backward): compiled for CUDA tensors, or Triton's interpreter for CPU tensors (tests)."""
    if interpret:
        return InterpretedFunction(_ce_fwd_kernel), InterpretedFunction(_ce_bwd_kernel)
    # V and the strides are only compared and multiplied: specializing on them only recompiles
    return (triton.JITFunction(_ce_fwd_kernel, do_not_specialize=["V", "stride"]),
            triton.JITFunction(_ce_bwd_kernel, do_not_specialize=["V", "stride", "g_stride"]))


def _block(vocab: int) -> tuple[int, int]:
    block = min(4096, triton.next_power_of_2(max(vocab, 16)))
    return block, (8 if block >= 4096 else 4)


class _CrossEntropyZTriton(torch.autograd.Function):
    """(mean NLL over non-ignored targets, mean lse^2 over all rows) of logits (N, V); the contract
    of `hierarchos.model.losses._CrossEntropyZ`, float32 results, gradient in the logits' dtype."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index):
        if logits.stride(-1) != 1:
            logits = logits.contiguous()
        rows, vocab = logits.shape
        valid = targets != ignore_index
        # an id outside the vocabulary would read another row's memory here: clamped (the data
        # pipeline checks ids against the vocabulary before training)
        safe_targets = targets.clamp(0, vocab - 1).contiguous()
        lse = logits.new_empty(rows, dtype=torch.float32)
        picked = torch.empty_like(lse)
        block, warps = _block(vocab)
        fwd, _ = _kernels(not logits.is_cuda)
        if rows:
            fwd[(rows,)](logits, safe_targets, lse, picked, vocab, logits.stride(0), BLOCK=block, num_warps=warps)
        n_valid = valid.sum().clamp(min=1)
        ctx.save_for_backward(logits, safe_targets, lse, valid, n_valid)
        return ((lse - picked) * valid).sum() / n_valid, lse.pow(2).mean()

    @staticmethod
    def backward(ctx, grad_ce, grad_z):
        logits, targets, lse, valid, n_valid = ctx.saved_tensors
        rows, vocab = logits.shape
        grad_ce = lse.new_zeros(()) if grad_ce is None else grad_ce.float()
        grad_z = lse.new_zeros(()) if grad_z is None else grad_z.float()
        coef_ce = (grad_ce * valid / n_valid).contiguous()
        coef = (coef_ce + grad_z * 2.0 * lse / max(rows, 1)).contiguous()
        grad = torch.empty((rows, vocab), dtype=logits.dtype, device=logits.device)
        block, warps = _block(vocab)
        _, bwd = _kernels(not logits.is_cuda)
        if rows:
            bwd[(rows,)](logits, targets, lse, coef, coef_ce, grad, vocab, logits.stride(0), grad.stride(0),
                         BLOCK=block, num_warps=warps)
        return grad, None, None


def triton_loss_fits(logits: torch.Tensor) -> bool:
    """The kernels can take these logits: a CUDA (or interpreted CPU) float tensor of bf16/fp16/fp32."""
    return (logits.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and not triton_unavailable_reason(logits.device))


def cross_entropy_z_triton(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100):
    """logits (N, V), targets (N,) -> (cross-entropy, z-loss) through the Triton kernels."""
    reason = triton_unavailable_reason(logits.device)
    if reason:
        from ..errors import HierarchosError
        raise HierarchosError(f"the Triton loss cannot run: {reason}; use impl='torch'")
    if logits.is_cuda:
        with torch.cuda.device(logits.device):
            return _CrossEntropyZTriton.apply(logits, targets, ignore_index)
    return _CrossEntropyZTriton.apply(logits, targets, ignore_index)
