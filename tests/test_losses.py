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

    # adaptive: (ponder - max(1, scale * ce))^2, with a ponder far enough from the target that a power
    # other than 2 shows
    far = fake_output(logits, ponder=3.5, commitment=0.3)
    adaptive, _ = lm_loss(far, targets, 0.01, LossWeights(ponder=0.1, commitment=0.5, adaptive_ponder=True,
                                                           ponder_target_scale=0.5))
    target = max(1.0, float(ce) * 0.5)
    assert math.isclose(float(adaptive), float(ce) + 0.01 * float(z) + 0.1 * (3.5 - target) ** 2 + 0.15,
                        rel_tol=1e-6)
    assert parts.keys() == {"ce", "z_loss", "ponder", "commitment"}
    assert [float(parts[k]) for k in ("z_loss", "ponder", "commitment")] == pytest.approx([float(z), 2.0, 0.3])


def test_loss_without_pondering_terms():
    """A model that reports no ponder or commitment (Q halting reports no ponder) adds nothing for them."""
    logits, targets = torch.randn(1, 3, 5), torch.tensor([[0, 4, 2]])
    out = ModelOutput(logits=logits, state=None, totals={})
    loss, parts = lm_loss(out, targets, 0.0, LossWeights(ponder=0.3, commitment=0.7))
    assert math.isclose(float(loss), float(torch.nn.functional.cross_entropy(logits[0], targets[0])), rel_tol=1e-6)
    assert float(parts["ponder"]) == 0.0 and float(parts["commitment"]) == 0.0


@pytest.mark.parametrize("fn", [cross_entropy_z, cross_entropy_z_reference])
def test_ignored_targets_by_hand(fn):
    """ce = mean NLL over the targets that are not ignore_index (any id may be the ignored one);
    one valid target gives exactly its NLL; z-loss = mean logsumexp^2 over every row."""
    logits = torch.randn(4, 6, dtype=torch.float64)
    nll = -torch.log_softmax(logits, -1)
    targets = torch.tensor([3, 1, 3, 5])
    ce, z = fn(logits, targets, ignore_index=3)
    assert float(ce) == pytest.approx((float(nll[1, 1]) + float(nll[3, 5])) / 2, rel=1e-12)
    assert float(z) == pytest.approx(float(torch.logsumexp(logits, -1).pow(2).mean()), rel=1e-12)
    ce_one, _ = fn(logits, torch.tensor([3, 3, 3, 2]), ignore_index=3)
    assert float(ce_one) == pytest.approx(float(nll[3, 2]), rel=1e-12)
    out = ModelOutput(logits=logits[None], state=None, totals={})
    loss, _ = lm_loss(out, targets[None], 0.0, ignore_index=3)
    assert float(loss) == pytest.approx(float(ce), rel=1e-12)


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


# ----------------------------------------------------------------------------- the Triton kernels
try:
    import triton  # noqa: F401
except Exception:  # noqa: BLE001
    triton = None
needs_triton = pytest.mark.skipif(triton is None, reason="triton does not import")


@needs_triton
@pytest.mark.parametrize("dtype, vocab, padded", [(torch.float32, 11, False), (torch.float32, 300, True),
                                                  (torch.bfloat16, 5000, True), (torch.float16, 64, False)])
def test_triton_cross_entropy_z_matches_reference(monkeypatch, dtype, vocab, padded):
    """Under Triton's interpreter (CPU): values and gradients equal the PyTorch form, for several
    vocabulary blocks (5000 > 4096), a strided row view (the padded head) and ignored targets."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    seed = random.SystemRandom().randrange(2**31)
    g = torch.Generator().manual_seed(seed)
    wide = (4 * torch.randn(2, 5, vocab + (7 if padded else 0), generator=g)).to(dtype)
    logits_of = (lambda t: t[..., :vocab]) if padded else (lambda t: t)
    targets = torch.randint(0, vocab, (2, 5), generator=g)
    targets[torch.rand(2, 5, generator=g) < 0.3] = -100
    w_ce, w_z = torch.rand(2, generator=g).tolist()
    results = []
    for impl in ("triton", "torch"):
        leaf = wide.clone().requires_grad_(True)
        ce, z = cross_entropy_z(logits_of(leaf), targets, impl=impl)
        (w_ce * ce + w_z * z).backward()
        results.append((ce.detach(), z.detach(), leaf.grad))
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    for name, got, want in zip(("ce", "z", "grad"), *results):
        assert got.dtype == want.dtype, name
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol,
                                   msg=lambda m: f"seed={seed} {name}: {m}")
    if padded:  # the columns past the vocabulary get no gradient
        assert torch.count_nonzero(results[0][2][..., vocab:]) == 0


@needs_triton
def test_triton_cross_entropy_z_extreme_logits(monkeypatch):
    """-inf logits (a masked vocabulary) and large magnitudes give finite, correct values."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    logits = torch.tensor([[0.0, float("-inf"), 80.0, -80.0], [1e4, 1e4, float("-inf"), 0.0]])
    targets = torch.tensor([2, 1])
    got = cross_entropy_z(logits, targets, impl="triton")
    want = cross_entropy_z_reference(logits, targets)
    for a, b in zip(got, want):
        # atol: one float32 ulp at 1e4 is ~1e-3, so either order of summation may land a ulp apart
        assert torch.isfinite(a) and torch.allclose(a, b, rtol=1e-5, atol=2e-3), (got, want)


def test_triton_loss_without_its_runtime_is_a_clear_error(monkeypatch):
    """On CPU tensors without the interpreter the Triton path says why it cannot run."""
    from hierarchos.errors import HierarchosError

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(HierarchosError, match="Triton loss cannot run"):
        cross_entropy_z(torch.randn(2, 5), torch.tensor([1, 2]), impl="triton")
    with pytest.raises(ValueError, match="unknown impl"):
        cross_entropy_z(torch.randn(2, 5), torch.tensor([1, 2]), impl="fast")


def test_the_package_and_its_loss_work_without_triton():
    """triton is optional: with it unimportable, hierarchos imports, the loss runs its PyTorch form,
    and asking for the Triton form is a one-line error naming the fix."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, hierarchos, hierarchos.model.losses as losses\n"
            "ce, z = losses.cross_entropy_z(torch.randn(3, 5), torch.tensor([1, 2, 3]))\n"
            "assert torch.isfinite(ce) and torch.isfinite(z)\n"
            "try:\n"
            "    losses.cross_entropy_z(torch.randn(3, 5), torch.tensor([1, 2, 3]), impl='triton')\n"
            "except Exception as exc:\n"
            "    print(type(exc).__name__, exc)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "HierarchosError the Triton loss cannot run: triton does not import" in result.stdout, result.stdout


@pytest.mark.parametrize("ignore_index", [-100, 0, 1000])
def test_any_ignore_index_matches_the_reference(ignore_index):
    """The ignored rows' targets may be negative, a real id or past the vocabulary (1000 with V = 13):
    the loss and its gradient equal PyTorch's cross-entropy with that ignore_index."""
    seed = random.SystemRandom().randrange(2**31)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, 13, generator=g, dtype=torch.float64)
    targets = torch.randint(1, 13, (6,), generator=g)
    targets[::2] = ignore_index
    ours_in, ref_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ce, z = cross_entropy_z(ours_in, targets, ignore_index=ignore_index, impl="torch")
    ref_ce, ref_z = cross_entropy_z_reference(ref_in, targets, ignore_index=ignore_index)
    assert torch.allclose(ce, ref_ce, atol=1e-12) and torch.allclose(z, ref_z, atol=1e-12), f"seed={seed}"
    (ce + 0.1 * z).backward()
    (ref_ce + 0.1 * ref_z).backward()
    assert torch.allclose(ours_in.grad, ref_in.grad, atol=1e-12), f"seed={seed}"


def test_one_class_vocabulary_with_ignored_targets_by_hand():
    """V = 1 (the degenerate vocabulary): every valid target is class 0 with NLL 0, ignored rows of any
    ignore_index (negative, past the vocabulary) read nothing outside the row; z = mean(logit^2) and
    its gradient 2 * logit / N; the cross-entropy's gradient is 0."""
    logits = torch.tensor([[0.5], [-1.5], [2.0]], dtype=torch.float64, requires_grad=True)
    for ignore_index in (-100, 7):
        ce, z = cross_entropy_z(logits, torch.tensor([0, ignore_index, ignore_index]), ignore_index=ignore_index,
                                impl="torch")
        assert ce.item() == 0.0
        assert z.item() == pytest.approx((0.25 + 2.25 + 4.0) / 3, rel=1e-12)
        (grad,) = torch.autograd.grad(ce + z, logits)
        assert grad.flatten().tolist() == pytest.approx([2 * 0.5 / 3, 2 * -1.5 / 3, 2 * 2.0 / 3], rel=1e-12)
