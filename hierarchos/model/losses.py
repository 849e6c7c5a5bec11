"""The training objective: cross-entropy plus the model's auxiliary terms.

loss = CE + z_loss_weight * logsumexp^2 + ponder_weight * ponder_term + commitment_weight * commitment,
where ponder_term is the expected number of pondering steps, its negation with
`encourage_thinking` (reward thinking), or with `adaptive_ponder` the squared distance to a
target that grows with the CE loss (harder text earns more thinking).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossWeights:
    ponder: float = 0.01
    commitment: float = 0.5
    encourage_thinking: bool = False
    adaptive_ponder: bool = False
    ponder_target_scale: float = 0.5


def lm_loss(out, targets: torch.Tensor, z_loss_weight: float, weights: LossWeights | None = None,
            ignore_index: int = -100):
    """out: ModelOutput of a forward over (B, T); targets: (B, T) next-token ids.

    Returns (loss, parts) with parts holding detached floats-as-tensors for logging."""
    weights = weights or LossWeights()
    logits = out.logits
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                         ignore_index=ignore_index)
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
    loss = ce + z_loss_weight * aux.get("z_loss", zero) + weights.ponder * ponder_term \
        + weights.commitment * commitment
    parts = {"ce": ce.detach(), "ponder": torch.as_tensor(ponder).detach(),
             "commitment": torch.as_tensor(commitment).detach()}
    return loss, parts
