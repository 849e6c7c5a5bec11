"""The training objective: each auxiliary term enters with its weight and the documented sign,
and the fused cross-entropy + z-loss equals the plain autograd version (values and gradients)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from hierarchos.model.lm import ModelOutput
from hierarchos.model.losses import LossWeights, cross_entropy_z, cross_entropy_z_reference, lm_loss


def fake_output(logits, ponder, commitment):
    totals = {"ponder": (torch.tensor(ponder) * 4, 4.0), "commitment": (torch.tensor(commitment) * 2, 2.0)}
    return ModelOutput(logits=logits, state=None, totals=totals)


def test_loss_terms_and_weights():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 5)
    targets = torch.tensor([[0, 4, 2]])
    ce = torch.nn.functional.cross_entropy(logits[0], targets[0])
    z = torch.logsumexp(logits[0], -1).pow(2).mean()
    out = fake_output(logits, ponder=2.0, commitment=0.3)
    w = LossWeights(ponder=0.1, commitment=0.5)
    loss, parts = lm_loss(out, targets, z_loss_weight=0.01, weights=w)
    assert math.isclose(float(loss), float(ce) + 0.01 * float(z) + 0.1 * 2.0 + 0.5 * 0.3, rel_tol=1e-6)
    assert math.isclose(float(parts["ce"]), float(ce), rel_tol=1e-6)

    rewarded, _ = lm_loss(out, targets, 0.01, LossWeights(ponder=0.1, commitment=0.5, encourage_thinking=True))
    assert math.isclose(float(rewarded), float(loss) - 2 * 0.1 * 2.0, rel_tol=1e-6)

    adaptive, _ = lm_loss(out, targets, 0.01, LossWeights(ponder=0.1, commitment=0.5, adaptive_ponder=True,
                                                           ponder_target_scale=0.5))
    target = max(1.0, float(ce) * 0.5)
    assert math.isclose(float(adaptive), float(ce) + 0.01 * float(z) + 0.1 * (2.0 - target) ** 2 + 0.15,
                        rel_tol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_fused_cross_entropy_z_matches_reference(dtype):
    seed = random.SystemRandom().randrange(2**31)
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(3, 7, 11, generator=g)).to(dtype)
    targets = torch.randint(0, 11, (3, 7), generator=g)
    targets[torch.rand(3, 7, generator=g) < 0.3] = -100
    w_ce, w_z = torch.rand(2, generator=g).tolist()
    grads = []
    for fn in (cross_entropy_z, cross_entropy_z_reference):
        leaf = logits.clone().requires_grad_(True)
        ce, z = fn(leaf, targets)
        (w_ce * ce + w_z * z).backward()
        grads.append((ce.detach(), z.detach(), leaf.grad))
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    for got, want in zip(grads[0], grads[1]):
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol, msg=lambda m: f"seed={seed}: {m}")


def test_all_targets_ignored_gives_zero_ce():
    logits = torch.randn(2, 3, 4, requires_grad=True)
    ce, z = cross_entropy_z(logits, torch.full((2, 3), -100))
    assert float(ce.detach()) == 0.0 and float(z.detach()) > 0
    (ce + z).backward()
    assert torch.isfinite(logits.grad).all()
