"""Several matrix-vector products in one launch (hierarchos/ops/matvec_triton.py) against the PyTorch form.

The kernel runs under Triton's interpreter on CPU tensors (TRITON_INTERPRET=1; skipped when triton does
not import), on random inputs from a fresh seed (printed on failure): products of different output
widths (off the kernel's blocks, wider than one block, as narrow as one output), one to four of them,
one or several rows; the refusals; the op's fake form; the model's rule for taking it (plain bias-free
nn.Linear only: a LoRA-wrapped or biased projection keeps its own call); and a GPU check.
"""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from hierarchos.errors import HierarchosError
from hierarchos.ops import matvec_triton as mv
from hierarchos.ops.wkv_triton import triton

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(triton is None, reason="triton does not import")]


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def pairs(seed, B, K, widths):
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(B, K, generator=g) for _ in widths],
            [torch.randn(n, K, generator=g) / K ** 0.5 for n in widths])


@pytest.mark.parametrize("B, K, widths", [
    (1, 16, [16]),
    (3, 100, [64, 33, 200]),          # widths and the input off the blocks, one wider than several blocks
    (2, 128, [1, 32, 31, 256]),       # four products, one of a single output
    (1, 300, [96, 96]),               # the channel mix's form: one input twice
])
def test_kernel_equals_reference(interpret, B, K, widths):
    seed = random.SystemRandom().randrange(2**31)
    xs, ws = pairs(seed, B, K, widths)
    if len(widths) == 2:
        xs[1] = xs[0]
    out = mv.matvecs_triton(xs, ws)
    ref = mv.matvecs_reference(xs, ws)
    assert [tuple(o.shape) for o in out] == [(B, n) for n in widths]
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, atol=2e-5, rtol=2e-5, msg=f"seed {seed}")


def test_reference_is_each_product():
    xs, ws = pairs(0, 2, 8, [3, 5])
    for y, x, w in zip(mv.matvecs_reference(xs, ws), xs, ws):
        torch.testing.assert_close(y, torch.nn.functional.linear(x, w))


def test_every_refusal_is_one_line(interpret, monkeypatch):
    xs, ws = pairs(0, 2, 16, [8, 8])

    def refused(match, xs=xs, ws=ws):
        with pytest.raises(HierarchosError, match=match):
            mv.matvecs_triton(list(xs), list(ws))

    refused(r"1 to 4 \(input, weight\) pairs \(got 2 inputs and 1 weights\)", ws=ws[:1])
    refused(r"1 to 4 .*\(got 5 inputs and 5 weights\)", xs=(xs * 3)[:5], ws=(ws * 3)[:5])
    refused(r"pair 1 has x \(2, 16\) and weight \(8, 12\); want \(2, 16\) and \(C_out, 16\)", ws=(ws[0], ws[1][:, :12]))
    refused(r"pair 1 has x \(2, 16\) and weight \(8, 16\); want \(3, 16\)", xs=(torch.zeros(3, 16), xs[1]))
    refused("take float32 tensors \\(pair 1 has torch.float32 and torch.float16\\)", ws=(ws[0], ws[1].half()))
    monkeypatch.delenv("TRITON_INTERPRET")
    refused("the fused matrix-vector products cannot run: ")


def test_the_ops_fake_form_gives_each_products_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    xs, ws = pairs(0, 3, 8, [4, 6])
    with FakeTensorMode() as mode:
        out = torch.ops.hierarchos.matvecs([mode.from_tensor(x) for x in xs], [mode.from_tensor(w) for w in ws])
    assert [(tuple(o.shape), o.dtype) for o in out] == [((3, 4), torch.float32), ((3, 6), torch.float32)]


def test_the_model_takes_it_for_plain_bias_free_linears_only():
    from hierarchos.model.rwkv import _plain_linears

    plain, biased = nn.Linear(4, 4, bias=False), nn.Linear(4, 4)

    class Wrapped(nn.Module):  # a LoRA or quantized wrapper: its weight alone is not its function
        def __init__(self):
            super().__init__()
            self.weight = plain.weight

    assert _plain_linears(plain, plain) and not _plain_linears(plain, biased) and not _plain_linears(Wrapped())


def test_the_block_step_takes_it_and_a_wrapped_projection_keeps_its_own_call(interpret, monkeypatch):
    """With the fused step on, one token through an RWKV-7 block runs its r/k/v and gate/up projections
    through one launch each (counted) and equals the block without the fused step; a projection that is
    not a plain Linear is called as itself."""
    from hierarchos.config import tiny_config
    from hierarchos.model import HierarchosLM
    from hierarchos.ops import rwkv_step_triton as fused

    torch.manual_seed(random.SystemRandom().randrange(2**31))
    block = HierarchosLM(tiny_config()).reasoner.worker.blocks[0].eval()
    calls = []
    real = mv._matvecs_op
    monkeypatch.setattr("hierarchos.ops.matvec_triton._matvecs_op", lambda xs, ws: calls.append(len(ws)) or real(xs, ws))
    C = block.ln_time.normalized_shape[0]
    N = block.time_mix.head_size
    args = (torch.randn(2, 1, C), torch.randn(2, C), torch.randn(2, C // N, N, N) * 0.3, torch.randn(2, C))
    with torch.no_grad():
        plain = block(*args)
        previous = fused.use_fused_step(True)
        try:
            with_kernels = block(*args)
            assert calls == [3, 2]  # r, k, v; gate, up
            block.channel_mix.up = nn.Linear(C, block.channel_mix.up.out_features, bias=True)
            calls.clear()
            block(*args)
            assert calls == [3]  # the biased up projection: the channel mix keeps its own calls
        finally:
            fused.use_fused_step(previous)
    for a, b in zip(plain, with_kernels):
        if a is not None:
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("B, widths", [(1, [768, 768, 768]), (4, [3072, 3072]), (2, [100, 5])])
def test_kernel_on_cuda_equals_reference(B, widths):
    seed = random.SystemRandom().randrange(2**31)
    xs, ws = pairs(seed, B, 768, widths)
    xs, ws = [x.cuda() for x in xs], [w.cuda() for w in ws]
    torch.backends.cuda.matmul.allow_tf32 = False
    for o, r in zip(mv.matvecs_triton(xs, ws), mv.matvecs_reference(xs, ws)):
        torch.testing.assert_close(o, r, atol=5e-5, rtol=5e-5, msg=f"seed {seed}")
