"""The sampler's noise in one Triton kernel (hierarchos/ops/noise_triton.py), run by Triton's
interpreter on CPU tensors (skipped when triton does not import; the GPU machines run it compiled):
the same bits as the PyTorch `row_noise` for random seeds over the whole int64 range of the seeds
the generator draws (< 2**62), counters, batch sizes and vocabularies that do and do not fill the
kernel's blocks; the dispatch takes it on CUDA only; bad arguments are one clear error."""

from __future__ import annotations

import random

import pytest
import torch

from hierarchos.errors import HierarchosError
from hierarchos.generate import row_noise, row_noise_at
from hierarchos.ops import noise_triton
from hierarchos.ops.wkv_triton import triton

pytestmark = pytest.mark.skipif(triton is None, reason="triton does not import")


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("vocab", [1, 7, noise_triton.BLOCK, noise_triton.BLOCK + 1, 3 * noise_triton.BLOCK - 5])
def test_kernel_noise_equals_the_pytorch_noise_bit_for_bit(vocab):
    seed = random.SystemRandom().randrange(2**31)
    g = torch.Generator().manual_seed(seed)
    B = 1 + seed % 4
    seeds = torch.randint(0, 2**62, (B,), generator=g)
    seeds[0] = 2**62 - 1  # the largest seed draw_seed makes
    counters = torch.randint(0, 2**40, (B,), generator=g)
    got = noise_triton.row_noise_triton(seeds, counters, vocab)
    want = row_noise_at(seeds, counters, torch.arange(vocab))
    assert got.dtype == torch.float32 and got.shape == (B, vocab)
    assert torch.equal(got, want), f"seed={seed}: {(got != want).sum()} of {got.numel()} differ"
    assert bool(((got > 0) & (got < 1)).all())


def test_the_dispatch_takes_the_kernel_on_cuda_only(monkeypatch):
    calls = []
    monkeypatch.setattr(noise_triton, "row_noise_triton", lambda *a: calls.append(a) or None)
    seeds, counters = torch.tensor([3]), torch.tensor([4])
    out = row_noise(seeds, counters, 10)  # CPU tensors: the PyTorch form even under the interpreter
    assert calls == [] and torch.equal(out, row_noise_at(seeds, counters, torch.arange(10)))
    assert not noise_triton.fits(seeds) and not noise_triton.fits(torch.tensor([3.0]))


def test_the_dispatch_hands_cuda_rows_to_the_kernel(monkeypatch):
    """Where `fits` says the kernel runs (CUDA seeds) and the counters are int64, `row_noise` returns the
    kernel's uniforms for (seeds, counters, vocab); other counters take the PyTorch form."""
    calls = []
    marker = torch.full((1, 10), 0.5)
    monkeypatch.setattr(noise_triton, "fits", lambda seeds: True)
    monkeypatch.setattr(noise_triton, "checked", lambda device, reference: reference is row_noise_at)
    monkeypatch.setattr(noise_triton, "row_noise_triton", lambda *a: calls.append(a) or marker)
    seeds, counters = torch.tensor([3]), torch.tensor([4])
    assert row_noise(seeds, counters, 10) is marker and len(calls) == 1
    assert calls[0][0] is seeds and calls[0][1] is counters and calls[0][2] == 10
    out = row_noise(seeds, counters.to(torch.int32), 10)
    assert len(calls) == 1 and torch.equal(out, row_noise_at(seeds, counters, torch.arange(10)))


def test_the_kernel_is_checked_once_per_device_and_dropped_where_it_fails(monkeypatch):
    """`checked`: the kernel against the reference once per device (here the CPU under the interpreter):
    passing, it is used; a kernel that gives other bits or does not build is reported once (a warning),
    and never used there; nothing is checked while a CUDA graph capture runs."""
    monkeypatch.setattr(noise_triton, "_CHECKED", {})
    cpu = torch.device("cpu")
    assert noise_triton.checked(cpu, row_noise_at) and noise_triton._CHECKED == {cpu: True}
    monkeypatch.setattr(noise_triton, "row_noise_triton", lambda *a: pytest.fail("checked twice"))
    assert noise_triton.checked(cpu, row_noise_at)  # cached
    for broken, message in ((lambda s, c, v: torch.full((len(s), v), 0.5), "differ"),
                            (lambda s, c, v: (_ for _ in ()).throw(RuntimeError("no compiler")), "no compiler")):
        monkeypatch.setattr(noise_triton, "_CHECKED", {})
        monkeypatch.setattr(noise_triton, "row_noise_triton", broken)
        with pytest.warns(RuntimeWarning, match=f"failed its check on cpu.*{message}"):
            assert not noise_triton.checked(cpu, row_noise_at)
        assert noise_triton._CHECKED == {cpu: False}
        assert not noise_triton.checked(cpu, row_noise_at)  # no second warning: the answer is kept


def test_bad_arguments_are_one_clear_error(monkeypatch):
    with pytest.raises(HierarchosError, match=r"seeds and counters as \(B,\) int64"):
        noise_triton.row_noise_triton(torch.tensor([1, 2]), torch.tensor([1]), 10)
    with pytest.raises(HierarchosError, match=r"seeds and counters as \(B,\) int64"):
        noise_triton.row_noise_triton(torch.tensor([1.0]), torch.tensor([1]), 10)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(HierarchosError, match="the fused sampling noise cannot run: it runs on CUDA tensors"):
        noise_triton.row_noise_triton(torch.tensor([1]), torch.tensor([1]), 10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_kernel_on_cuda_equals_the_pytorch_noise():
    seeds = torch.tensor([0, 2**62 - 1, 987654321], device="cuda")
    counters = torch.tensor([0, 12, 2**33], device="cuda")
    assert noise_triton.checked(seeds.device, row_noise_at)  # the compiled kernel passes its own check
    got = row_noise(seeds, counters, 50257)  # the dispatch: the kernel
    assert torch.equal(got, row_noise_at(seeds, counters, torch.arange(50257, device="cuda")))
