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


def test_the_loss_block_is_the_vocabulary_rounded_up_to_a_power_of_two_from_16_to_4096():
    """One program reads a row in blocks of next_power_of_2(V) lanes, at least 16, at most 4096; the
    4096-lane block runs in 8 warps, smaller ones in 4 (bench_loss's choice; a launch rule only)."""
    from hierarchos.ops.ce_triton import _block

    assert [_block(v) for v in (1, 11, 16, 17, 300, 2048, 4095, 4096, 50257)] == [
        (16, 4), (16, 4), (16, 4), (32, 4), (512, 4), (2048, 4), (4096, 8), (4096, 8), (4096, 8)]


def _loss_and_grad(logits, targets, ignore_index, impl, weights=(0.6, 0.4)):
    from hierarchos.model.losses import cross_entropy_z

    leaf = logits.detach().requires_grad_(True)
    ce, z = cross_entropy_z(leaf, targets, ignore_index=ignore_index, impl=impl)
    (weights[0] * ce + weights[1] * z).backward()
    return ce.detach(), z.detach(), leaf.grad


def test_the_triton_loss_of_column_strided_logits_matches_the_reference(monkeypatch):
    """Logits whose columns are not adjacent (every other column of a wider tensor, or a transpose)
    are made contiguous first: the kernels read a row's columns as adjacent."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    g = torch.Generator().manual_seed(7)
    targets = torch.tensor([0, 4, 9, 2])
    for logits in (torch.randn(4, 20, generator=g)[:, ::2], torch.randn(10, 4, generator=g).t()):
        assert logits.stride(-1) != 1
        for got, want in zip(_loss_and_grad(logits, targets, -100, "triton"),
                             _loss_and_grad(logits, targets, -100, "torch")):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ignore_index", [-100, 1000])
def test_an_ignored_target_never_reads_outside_its_row(monkeypatch, ignore_index):
    """An ignored row's target id (-100, or an id past the vocabulary) is clamped into the row before
    the kernel reads the target's logit: the logits sit between runs of +inf (before them, after
    them and in the two padding columns of every row), so a read outside the row would make the
    ignored row's loss inf * 0 = nan."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    rows, vocab, pad, guard = 3, 13, 2, 1200
    storage = torch.full((2 * guard + rows * (vocab + pad),), float("inf"))
    wide = storage[guard:guard + rows * (vocab + pad)].view(rows, vocab + pad)
    wide[:, :vocab] = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(1))
    logits = wide[:, :vocab]
    targets = torch.tensor([ignore_index, 5, ignore_index])
    got = _loss_and_grad(logits, targets, ignore_index, "triton")
    # the PyTorch form's gather does not take an ignore_index past the vocabulary: its own spelling
    want = _loss_and_grad(logits.contiguous(), torch.where(targets == ignore_index, -100, targets), -100, "torch")
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_compiled_loss_kernels_are_built_once_for_every_vocabulary_and_stride():
    """For CUDA tensors `_kernels(False)` builds triton.JITFunctions (building one needs no GPU) of the
    forward and backward bodies that do not specialize on the vocabulary size or the row strides (only
    compared and multiplied), so one compile serves every model; interpreted (CPU): the same two bodies.
    (wkv_triton's twin: test_wkv_triton_rules.test_the_kernels_are_built_once_for_every_length.)"""
    from triton.runtime.interpreter import InterpretedFunction

    from hierarchos.ops import ce_triton

    fwd, bwd = ce_triton._kernels.__wrapped__(False)  # not lru_cache's copy
    assert isinstance(fwd, triton.JITFunction) and isinstance(bwd, triton.JITFunction)
    assert fwd.fn is ce_triton._ce_fwd_kernel and bwd.fn is ce_triton._ce_bwd_kernel
    assert [p.name for p in fwd.params if p.do_not_specialize] == ["V", "stride"]
    assert [p.name for p in bwd.params if p.do_not_specialize] == ["V", "stride", "g_stride"]
    fwd, bwd = ce_triton._kernels.__wrapped__(True)
    assert isinstance(fwd, InterpretedFunction) and isinstance(bwd, InterpretedFunction)
    assert fwd.fn is ce_triton._ce_fwd_kernel and bwd.fn is ce_triton._ce_bwd_kernel
