"""Several matrix-vector products in one launch (hierarchos/ops/matvec_triton.py) against the PyTorch form.

The kernel runs under Triton's interpreter on CPU tensors (TRITON_INTERPRET=1; skipped when triton does
not import), on random inputs from a fresh seed (printed on failure): products of different output
widths (off the kernel's blocks, wider than one block, as narrow as one output) and input widths, one to
four of them, one or several rows, weights as nn.Linear holds them or transposed (also non-contiguous),
each activation into saturation; the refusals; the op's fake form; the model's rule for taking it (plain
bias-free nn.Linear only: a LoRA-wrapped or biased projection keeps its own call); and a GPU check.
"""

from __future__ import annotations

import random
import re

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


@pytest.mark.parametrize("config", [(4, 256, 1), (8, 512, 4), (32, 128, 4), (16, 64, 2)])
def test_every_launch_configuration_equals_reference(interpret, config):
    """Each launch configuration (`launch_config`'s choices and one more) gives the products: outputs off
    the program's block, inputs shorter and longer than one read, a transposed weight, every activation."""
    seed = random.SystemRandom().randrange(2**31)
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(2, k, generator=g) * 2 for k in (300, 40, 600)]
    ws = [torch.randn(70, 300, generator=g) / 17, torch.randn(40, 9, generator=g) / 6, torch.randn(33, 600, generator=g) / 24]
    acts, transposed = ["none", "tanh", "sigmoid"], [False, True, False]
    outs = [x.new_empty(2, mv._weight_of(w, t).shape[0]) for x, w, t in zip(xs, ws, transposed)]
    mv._launch(xs, ws, outs, [mv.ACTIVATIONS.index(a) for a in acts], transposed, config)
    for o, r in zip(outs, mv.matvecs_reference(xs, ws, acts, transposed)):
        torch.testing.assert_close(o, r, atol=2e-5, rtol=2e-5, msg=f"seed {seed}, {config}")


@pytest.mark.parametrize("B, C, F, deep, config", [(1, 48, 100, True, None), (2, 300, 64, False, None),
                                                    (3, 16, 7, True, (4, 256, 1)), (1, 130, 33, False, (8, 64, 2))])
def test_swiglu_kernel_equals_reference(interpret, B, C, F, deep, config):
    """The gate and up products with their activation in one launch: outputs off the program's block, inputs
    shorter and longer than one read, with and without the DeepEmbed gate, activations into saturation."""
    seed = random.SystemRandom().randrange(2**31)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, generator=g) * 3
    w_gate, w_up = torch.randn(F, C, generator=g) / C ** 0.5 * 4, torch.randn(F, C, generator=g) / C ** 0.5
    deep_gate = torch.randn(B, F, generator=g) if deep else None
    want = mv.swiglu_reference(x, w_gate, w_up, deep_gate)
    if config is None:
        got = mv.swiglu_triton(x, w_gate, w_up, deep_gate)
    else:
        got = x.new_empty(B, F)
        mv._swiglu_launch(x, w_gate, w_up, deep_gate, got, config)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5, msg=f"seed {seed}")


def test_swiglu_refusals_are_one_line(interpret):
    x, w = torch.randn(2, 8), torch.randn(5, 8)
    for args, words in (((x, w, torch.randn(5, 9)), "two (F, C)"), ((x, w, w, torch.randn(2, 4)), "DeepEmbed gate"),
                        ((x.double(), w.double(), w.double()), "float32")):
        with pytest.raises(HierarchosError, match=re.escape(words)) as info:
            mv.swiglu_triton(*args)
        assert "\n" not in str(info.value)


def test_launch_configuration_rule():
    """Few outputs a program for plain weights, more for a transposed weight read along long rows, the
    small-input default for transposed short inputs (the low-rank ups)."""
    assert mv.launch_config([768] * 3, [768] * 3, [False] * 3) == (4, 256, 1)
    assert mv.launch_config([64, 64, 128], [768] * 3, [True] * 3) == (8, 512, 4)
    assert mv.launch_config([768] * 3, [64, 64, 128], [True] * 3) == (mv.BLOCK_OUT, mv.BLOCK_IN, 4)


@pytest.mark.parametrize("acts, transposed", [(["tanh", "none", "sigmoid"], [True, False, True]),
                                              (["sigmoid", "tanh", "none"], [False, True, False])])
def test_activations_and_transposed_weights_of_several_input_widths(interpret, acts, transposed):
    seed = random.SystemRandom().randrange(2**31)
    g = torch.Generator().manual_seed(seed)
    ins, outs = [40, 130, 7], [33, 5, 64]
    xs = [torch.randn(2, k, generator=g) * 3 for k in ins]
    ws = [torch.randn(k, n, generator=g) if t else torch.randn(n, k, generator=g)
          for k, n, t in zip(ins, outs, transposed)]
    ws[1] = ws[1].t().contiguous().t()  # a non-contiguous weight: read through its strides
    out = mv.matvecs_triton(xs, ws, acts, transposed)
    ref = mv.matvecs_reference(xs, ws, acts, transposed)
    assert [tuple(o.shape) for o in out] == [(2, n) for n in outs]
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, atol=2e-5, rtol=2e-5, msg=f"seed {seed}")


def test_reference_is_each_product():
    xs, ws = pairs(0, 2, 8, [3, 5])
    for y, x, w in zip(mv.matvecs_reference(xs, ws), xs, ws):
        torch.testing.assert_close(y, torch.nn.functional.linear(x, w))
    y, = mv.matvecs_reference(xs[:1], [ws[0].t()], ["tanh"], [True])
    torch.testing.assert_close(y, torch.tanh(xs[0] @ ws[0].t()))


def test_every_refusal_is_one_line(interpret, monkeypatch):
    xs, ws = pairs(0, 2, 16, [8, 8])

    def refused(match, xs=xs, ws=ws, acts=None, transposed=None):
        with pytest.raises(HierarchosError, match=match):
            mv.matvecs_triton(list(xs), list(ws), acts, transposed)

    refused(r"1 to 4 \(input, weight\) pairs \(got 2 inputs, 1 weights, 2 activations\)", ws=ws[:1])
    refused(r"1 to 4 .*\(got 5 inputs, 5 weights, 5 activations\)", xs=(xs * 3)[:5], ws=(ws * 3)[:5])
    refused("unknown activation 'gelu' \\(one of none, tanh, sigmoid\\)$", acts=["gelu", "none"])
    refused(r"pair 1 has x \(2, 16\) and weight \(8, 12\); want \(2, C_in\) and \(C_out, C_in\)",
            ws=(ws[0], ws[1][:, :12]))
    refused(r"pair 1 has x \(2, 16\) and weight \(8, 16\) \(transposed\); want \(2, C_in\) and \(C_in, C_out\)",
            transposed=[False, True])
    refused(r"pair 1 has x \(2, 16\) and weight \(8, 16\); want \(3, C_in\)", xs=(torch.zeros(3, 16), xs[1]))
    refused("take float32 tensors \\(pair 1 has torch.float32 and torch.float16\\)", ws=(ws[0], ws[1].half()))
    monkeypatch.delenv("TRITON_INTERPRET")
    refused("the fused matrix-vector products cannot run: ")


def test_the_ops_fake_form_gives_each_products_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    xs, ws = pairs(0, 3, 8, [4, 6])
    with FakeTensorMode() as mode:
        out = torch.ops.hierarchos.matvecs([mode.from_tensor(x) for x in xs], [mode.from_tensor(w) for w in ws],
                                           [0, 1], [False, False])
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
    """With the fused step on, one token through an RWKV-7 block runs its r/k/v, gate/up, output and down
    projections through one launch each, gate and up with their activation (counted; the down projection stays cuBLAS's) and equals the block without the fused step; a projection
    that is not a plain Linear, or that a hook watches, is called as itself."""
    from hierarchos.config import tiny_config
    from hierarchos.model import HierarchosLM
    from hierarchos.ops import rwkv_step_triton as fused

    torch.manual_seed(random.SystemRandom().randrange(2**31))
    block = HierarchosLM(tiny_config()).reasoner.worker.blocks[0].eval()
    assert mv.checked(torch.device("cpu"))  # the device check's own products, before the spy counts
    calls = []
    real = mv._matvecs_op
    monkeypatch.setattr("hierarchos.ops.matvec_triton._matvecs_op",
                        lambda xs, ws, codes, t: calls.append(len(ws) if not any(t) else "low-rank")
                        or real(xs, ws, codes, t))
    swiglu, real_swiglu = [], mv._swiglu_op
    monkeypatch.setattr("hierarchos.ops.matvec_triton._swiglu_op",
                        lambda *a: swiglu.append(1) or real_swiglu(*a))
    C = block.ln_time.normalized_shape[0]
    N = block.time_mix.head_size
    args = (torch.randn(2, 1, C), torch.randn(2, C), torch.randn(2, C // N, N, N) * 0.3, torch.randn(2, C))
    with torch.no_grad():
        plain = block(*args)
        previous = fused.use_fused_step(True)
        try:
            with_kernels = block(*args)
            # r, k, v; the low-rank paths (2); the output projection (gate and up: one swiglu launch, below)
            assert calls == [3, "low-rank", "low-rank", 1] and swiglu == [1]
            seen = []
            handle = block.time_mix.output.register_forward_hook(lambda *a: seen.append(1))
            calls.clear()
            block(*args)
            assert calls == [3, "low-rank", "low-rank"] and seen == [1]  # a watched projection: its own call
            handle.remove()
            block.channel_mix.up = nn.Linear(C, block.channel_mix.up.out_features, bias=True)
            calls.clear()
            swiglu.clear()
            block(*args)
            assert calls == [3, "low-rank", "low-rank", 1] and swiglu == []  # a biased up: the channel mix's own calls
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("B, F, deep", [(1, 3072, True), (3, 100, False)])
def test_swiglu_on_cuda_equals_reference(B, F, deep):
    seed = random.SystemRandom().randrange(2**31)
    g = torch.Generator().manual_seed(seed)
    x, w_gate, w_up = torch.randn(B, 768, generator=g), torch.randn(F, 768, generator=g) / 28, torch.randn(F, 768, generator=g) / 28
    deep_gate = torch.randn(B, F, generator=g) if deep else None
    args = [t.cuda() if t is not None else None for t in (x, w_gate, w_up, deep_gate)]
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.testing.assert_close(mv.swiglu_triton(*args), mv.swiglu_reference(*args), atol=5e-5, rtol=5e-5,
                               msg=f"seed {seed}")


def _tf32(t: torch.Tensor) -> torch.Tensor:
    """t rounded toward zero to TF32's 10 mantissa bits (what a tensor core reads of a float32 operand)."""
    return (t.contiguous().view(torch.int32) & ~0x1FFF).view(torch.float32)


def test_the_device_check_holds_when_float32_matmuls_run_on_tf32(interpret, monkeypatch):
    """chat and train allow TF32 for float32 matmuls on CUDA; the check's reference must not run there
    (it did: every H100 run with TF32 on turned the fused step off). Emulated here: the PyTorch form
    given float32 operands computes on TF32-rounded ones, as cuBLAS would; the check still passes."""
    real = mv.matvecs_reference

    def tf32_reference(xs, ws, acts=None, transposed=None):
        if xs[0].dtype == torch.float32:
            xs, ws = [_tf32(x) for x in xs], [_tf32(w) for w in ws]
        return real(xs, ws, acts, transposed)

    monkeypatch.setattr(mv, "matvecs_reference", tf32_reference)
    monkeypatch.setattr(mv, "_CHECKED", {})
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 160, generator=g) * 3, torch.randn(70, 160, generator=g)
    assert not torch.allclose(tf32_reference([x], [w])[0], real([x], [w])[0], rtol=1e-4, atol=1e-4)  # it bites
    assert mv.checked(torch.device("cpu"))


def test_the_device_check_passes_here_and_a_failing_one_keeps_the_eager_step(interpret, monkeypatch):
    """`checked`: once per device against the reference; a kernel that gives other products (or does not
    build) is reported once, and a stepper asked for the fused step then keeps its eager kernels."""
    from hierarchos.config import tiny_config
    from hierarchos.generate import SamplingConfig, generate_batch
    from hierarchos.model import HierarchosLM

    monkeypatch.setattr(mv, "_CHECKED", {})
    assert mv.checked(torch.device("cpu")) and mv._CHECKED == {torch.device("cpu"): True}
    monkeypatch.setattr(mv, "_CHECKED", {})
    monkeypatch.setattr(mv, "matvecs_triton", lambda xs, ws, acts, t: [w.new_zeros(x.shape[0], w.shape[1] if tt
                                                                                   else w.shape[0])
                                                                       for x, w, tt in zip(xs, ws, t)])
    steppers: dict = {}
    model = HierarchosLM(tiny_config()).eval()
    with pytest.warns(RuntimeWarning, match="the fused matrix-vector kernel failed its check on cpu .*eager kernels"):
        generate_batch(model, [[1, 2]], SamplingConfig(temperature=0.0, max_new_tokens=2), fused_step=True,
                       steppers=steppers)
    assert [s.fused_step for s in steppers.values()] == [False]
    assert mv._CHECKED == {torch.device("cpu"): False}  # asked once: the next stepper reads the answer


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_device_check_passes_on_cuda_with_tf32_allowed(monkeypatch):
    """As chat and train run CUDA (TF32 for float32 matmuls): the check still passes there."""
    monkeypatch.setattr(mv, "_CHECKED", {})
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    assert mv.checked(torch.device("cuda"))
