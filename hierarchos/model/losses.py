"""The training objective: cross-entropy plus the auxiliary terms.

loss = CE + z_loss_weight * mean(logsumexp^2) + ponder_weight * ponder_term + commitment_weight * commitment,
where ponder_term is the expected number of pondering steps, its negation with
`encourage_thinking` (reward thinking), or with `adaptive_ponder` the squared distance to a
target that grows with the CE loss (harder text earns more thinking). With `halting="q"` the
model's Q head adds seed 003's loss, `q * (q_halt + q_continue)` (`q_halt_loss`).

CE and the z-loss share one log-partition and one fused backward (`cross_entropy_z`): the
(B, T, vocab) logits are the largest tensor of a step, so each extra pass over them counts;
`cross_entropy_z_reference` is the plain autograd version the tests compare it with. On a GPU
the same contract runs as two Triton kernels (`hierarchos.ops.ce_triton`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ops.ce_triton import cross_entropy_z_triton, triton_loss_fits


@dataclass
class LossWeights:
    ponder: float = 0.01
    commitment: float = 0.5
    encourage_thinking: bool = False
    adaptive_ponder: bool = False
    ponder_target_scale: float = 0.5
    q: float = 0.5  # halting="q": weight of the Q head's loss (seed 003 uses 0.5)


def _wide(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


class _CrossEntropyZ(torch.autograd.Function):
    """(mean NLL over non-ignored targets, mean logsumexp^2 over all rows) of logits (N, V)."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index):
        wide = _wide(logits)
        lse = torch.logsumexp(wide, dim=-1)                                  # (N,)
        valid = targets != ignore_index
        safe_targets = torch.where(valid, targets, 0)  # any ignore_index, negative or past the vocabulary
        picked = wide.gather(-1, safe_targets[:, None])[:, 0]
        n_valid = valid.sum().clamp(min=1)
        ce = ((lse - picked) * valid).sum() / n_valid
        ctx.save_for_backward(logits, safe_targets, lse, valid, n_valid)
        return ce, lse.pow(2).mean()

    @staticmethod
    def backward(ctx, grad_ce, grad_z):
        logits, targets, lse, valid, n_valid = ctx.saved_tensors
        coef_ce = grad_ce * valid / n_valid                                  # (N,)
        coef = coef_ce + grad_z * 2.0 * lse / lse.numel()
        grad = _wide(logits) - lse[:, None]
        grad = grad.exp_().mul_(coef[:, None])                              # softmax * coefficient
        grad.scatter_add_(-1, targets[:, None], -coef_ce[:, None].to(grad.dtype))
        return grad.to(logits.dtype), None, None


def cross_entropy_z(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, impl: str = "auto"):
    """logits (..., V), targets (...) -> (cross-entropy, z-loss), one fused backward.

    impl: 'torch' (`_CrossEntropyZ`), 'triton' (`hierarchos.ops.ce_triton`: one read of the logits
    per pass, no float32 copy of them), or 'auto': Triton for CUDA logits when triton imports,
    float64 and CPU logits through PyTorch."""
    flat, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"cross_entropy_z: unknown impl {impl!r}; expected auto, torch or triton")
    if impl == "triton" or (impl == "auto" and logits.is_cuda and triton_loss_fits(logits)):
        return cross_entropy_z_triton(flat, flat_targets, ignore_index)
    return _CrossEntropyZ.apply(flat, flat_targets, ignore_index)


def cross_entropy_z_reference(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100):
    wide = _wide(logits.reshape(-1, logits.shape[-1]))
    ce = F.cross_entropy(wide, targets.reshape(-1), ignore_index=ignore_index)
    return ce, torch.logsumexp(wide, -1).pow(2).mean()


def q_halt_loss(out, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """The halt term of seed 003's Q loss for a language model: BCE-with-logits of a plan point's halt
    logit (at its halting pass) against whether its prediction was right.

    "Right" for a language model: the tokens a plan point leads (those after it, up to and including
    the next plan point) are the ones its plan reaches; each of their predictions is right when the
    argmax of its next-token logits is its target. A token's BCE is linear in its target, so the mean
    of the per-token BCEs over the tokens a point leads is the point's BCE against its accuracy there
    (a soft target: the halt Q estimates the share of right predictions); points are weighted by how
    many valid targets they lead. Tokens whose plan point lies before this call have no logit here."""
    halt_logits, leads = out.q_halt                                         # (R, B, T), (T,)
    halt_logits = _wide(halt_logits)  # bf16 logits under autocast: the BCE in float32
    right = (out.logits.argmax(-1) == targets).to(halt_logits.dtype)        # (B, T)
    counted = (targets != ignore_index) & leads                             # (B, T)
    bce = F.binary_cross_entropy_with_logits(halt_logits, right.expand_as(halt_logits), reduction="none")
    return (bce * counted).sum() / (counted.sum() * halt_logits.shape[0]).clamp(min=1)


def lm_loss(out, targets: torch.Tensor, z_loss_weight: float, weights: LossWeights | None = None,
            ignore_index: int = -100):
    """out: ModelOutput of a forward over (B, T); targets: (B, T) next-token ids.

    Returns (loss, parts) with parts holding detached tensors for logging."""
    weights = weights or LossWeights()
    ce, z_loss = cross_entropy_z(out.logits, targets, ignore_index)
    aux = out.aux
    zero = ce.new_zeros(())
    ponder = aux.get("ponder", zero)
    commitment = aux.get("commitment", zero)
    if weights.encourage_thinking:
        ponder_term = -ponder
    elif weights.adaptive_ponder:
        target = (ce.detach() * weights.ponder_target_scale).clamp(min=1.0)
        ponder_term = (ponder - target).pow(2)
    else:
        ponder_term = ponder
    loss = ce + z_loss_weight * z_loss + weights.ponder * ponder_term + weights.commitment * commitment
    parts = {"ce": ce.detach(), "z_loss": z_loss.detach(), "ponder": torch.as_tensor(ponder).detach(),
             "commitment": torch.as_tensor(commitment).detach()}
    if getattr(out, "q_halt", None) is not None:
        q_halt = q_halt_loss(out, targets, ignore_index)
        q_continue = aux.get("q_continue", zero)
        loss = loss + weights.q * (q_halt + q_continue)
        parts["q_halt"], parts["q_continue"] = q_halt.detach(), torch.as_tensor(q_continue).detach()
    return loss, parts
