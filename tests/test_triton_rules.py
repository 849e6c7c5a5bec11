"""Rules of the Triton modules (hierarchos/ops/ce_triton.py, hierarchos/ops/wkv_triton.py) that their
parity tests (tests/test_losses.py, tests/test_wkv_triton.py) do not reach: which logits the Triton loss
says it can take, and the launch configuration of the WKV-7 kernel. The kernels themselves run under
Triton's interpreter on CPU tensors (TRITON_INTERPRET=1); skipped where triton does not import."""

from __future__ import annotations

import pytest
import torch

from hierarchos.ops.wkv_triton import triton

pytestmark = pytest.mark.skipif(triton is None, reason="triton does not import")


@pytest.mark.parametrize("dtype, fits", [(torch.float32, True), (torch.bfloat16, True), (torch.float16, True),
                                         (torch.float64, False), (torch.int64, False)])
def test_the_triton_loss_takes_float_logits_where_its_kernels_run(monkeypatch, dtype, fits):
    """bf16 / fp16 / fp32 logits on a device the kernels run on (the CPU under the interpreter); never
    float64 (the kernels compute in float32), and not on the CPU without the interpreter."""
    from hierarchos.ops.ce_triton import triton_loss_fits

    logits = torch.zeros(2, 5, dtype=dtype)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_loss_fits(logits) is fits
    monkeypatch.delenv("TRITON_INTERPRET")
    assert triton_loss_fits(logits) is False


def test_the_triton_loss_of_one_row_matches_the_reference(monkeypatch):
    """One row (the z-loss mean divides by rows = 1): values and gradients equal the PyTorch form."""
    from hierarchos.model.losses import cross_entropy_z

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    g = torch.Generator().manual_seed(3)
    wide = 3 * torch.randn(1, 37, generator=g)
    targets = torch.tensor([5])
    results = []
    for impl in ("triton", "torch"):
        leaf = wide.clone().requires_grad_(True)
        ce, z = cross_entropy_z(leaf, targets, impl=impl)
        (0.7 * ce + 0.3 * z).backward()
        results.append((ce.detach(), z.detach(), leaf.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
