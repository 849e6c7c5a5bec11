"""The fused one-token RWKV-7 time mix (hierarchos/ops/rwkv_step_triton.py) against its references.

The kernel runs under Triton's interpreter on CPU tensors (TRITON_INTERPRET=1; skipped when triton
does not import). Checked, on random inputs from a fresh seed (printed on failure):
1. the kernel equals `timemix_step_reference` (output and next state), with and without frozen rows,
   both gate forms, softplus inputs past its threshold;
2. `timemix_step_reference` equals the WKV-7 ground truth (`wkv7_reference`) with the time mix's
   tail written out here, so the reference is not a copy of the kernel's own derivation;
3. wired into the model (`use_fused_step(True)`), a block's one-token forward and the whole sync-free
   step equal the unfused ones for our wiring and x070's; a frozen row's state is left as it was;
4. the dispatcher leaves the prefill (T > 1), autograd and other dtypes on the eager path, and a
   device the kernel cannot run on is a one-line error from the stepper.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from hierarchos.config import tiny_config
from hierarchos.errors import HierarchosError
from hierarchos.generate import SamplingConfig, generate_batch
from hierarchos.model import HierarchosLM
from hierarchos.ops import rwkv_step_triton as fused
from hierarchos.ops.wkv import wkv7_reference
from hierarchos.ops.wkv_triton import triton

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(triton is None, reason="triton does not import")]


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def fused_on():
    previous = fused.use_fused_step(True)
    yield
    fused.use_fused_step(previous)


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**31)


def inputs(seed, B=3, H=2, N=8, frozen=True, gate_sigmoid=True):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, scale=1.0: torch.randn(*shape, generator=g) * scale  # noqa: E731
    C = H * N
    decay_lora = rnd(B, C, scale=8.0)  # some -x past softplus's threshold of 20 with the base below
    return dict(r=rnd(B, C), k=rnd(B, C), v=rnd(B, C), decay_lora=decay_lora, iclr_lora=rnd(B, C),
                gate=rnd(B, C), state=rnd(B, H, N, N, scale=0.3),
                frozen=(torch.rand(B, generator=g) < 0.5) if frozen else None,
                decay_base=rnd(C, scale=6.0), iclr_base=rnd(C), removal_scale=rnd(C), key_iclr_mix=rnd(C),
                bonus=rnd(H, N), norm_weight=rnd(C), norm_bias=rnd(C), eps=64e-5, gate_sigmoid=gate_sigmoid)


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("gate_sigmoid", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 4), (3, 2, 8), (2, 4, 16)])
@pytest.mark.parametrize("residual", [False, True])
def test_kernel_equals_reference(interpret, frozen, gate_sigmoid, shape, residual):
    seed = fresh_seed()
    B, H, N = shape
    args = inputs(seed, B, H, N, frozen, gate_sigmoid)
    if residual:  # x070's value residual (its lerp weight on both sides of 0.5: both of torch.lerp's forms)
        g = torch.Generator().manual_seed(seed + 1)
        args["value_residual"] = (torch.randn(B, H * N, generator=g), torch.randn(B, H * N, generator=g) * 3,
                                  torch.randn(H * N, generator=g))
    if frozen:
        args["frozen"][0] = True  # at least one frozen row
    out_ref, state_ref = fused.timemix_step_reference(**args)
    out, state = fused.timemix_step_triton(**args)
    torch.testing.assert_close(out, out_ref, atol=2e-5, rtol=2e-5, msg=f"seed {seed}")
    torch.testing.assert_close(state, state_ref, atol=2e-6, rtol=2e-6, msg=f"seed {seed}")
    if frozen:
        for b in torch.nonzero(args["frozen"]).flatten().tolist():
            assert torch.equal(state[b], args["state"][b])  # a frozen row writes nothing


def test_reference_takes_the_value_residual_as_the_block_does():
    """The reference's value residual is x070's lerp of the value toward the first layer's, and the same
    function with that value passed in."""
    seed = fresh_seed()
    a = inputs(seed, frozen=False)
    g = torch.Generator().manual_seed(seed + 1)
    B, C = a["r"].shape
    v_first, path, base = torch.randn(B, C, generator=g), torch.randn(B, C, generator=g), torch.randn(C, generator=g)
    with_residual = fused.timemix_step_reference(**a, value_residual=(v_first, path, base))
    w = torch.sigmoid(base + path)
    lerped = fused.timemix_step_reference(**{**a, "v": a["v"] + w * (v_first - a["v"])})
    for x, y in zip(with_residual, lerped):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6, msg=f"seed {seed}")


def test_reference_equals_the_recurrence_written_out():
    seed = fresh_seed()
    a = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
         for k, v in inputs(seed, frozen=True).items()}
    out, state = fused.timemix_step_reference(**a)
    B, C = a["r"].shape
    H, N = a["bonus"].shape
    log_w = -torch.exp(-F.softplus(-(a["decay_base"] + a["decay_lora"])) - 0.5)
    iclr = torch.sigmoid(a["iclr_base"] + a["iclr_lora"])
    kr = (a["k"] * a["removal_scale"]).view(B, H, N)
    kappa = kr / kr.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    k = (a["k"] * (1 + (iclr - 1) * a["key_iclr_mix"])).view(B, H, N)
    b = kappa * iclr.view(B, H, N)
    live = (~a["frozen"]).double()[:, None, None]
    log_w, k, b = log_w.view(B, H, N) * live, k * live, b * live
    r, v = a["r"].view(B, H, N), a["v"].view(B, H, N)
    o, s = wkv7_reference(r[:, None], log_w[:, None], k[:, None], v[:, None], -kappa[:, None], b[:, None],
                          state=a["state"])
    o = o[:, 0]
    normed = (o - o.mean(-1, keepdim=True)) / torch.sqrt(o.var(-1, unbiased=False, keepdim=True) + a["eps"])
    normed = normed.reshape(B, C) * a["norm_weight"] + a["norm_bias"]
    bonus = ((r * k * a["bonus"]).sum(-1, keepdim=True) * v).reshape(B, C)
    expected = (normed + bonus) * torch.sigmoid(a["gate"])
    torch.testing.assert_close(out, expected, msg=f"seed {seed}")
    torch.testing.assert_close(state, s, msg=f"seed {seed}")


WIRINGS = {"ours": dict(tm_token_shift="ddlerp", tm_gate="sigmoid_full", tm_value_residual=False),
           "x070": dict(tm_token_shift="static", tm_gate="lowrank", tm_value_residual=True, h_layers=2)}


@pytest.mark.parametrize("wiring", WIRINGS)
def test_block_step_with_the_kernel_equals_without(interpret, wiring):
    seed = fresh_seed()
    torch.manual_seed(seed)
    model = HierarchosLM(tiny_config(**WIRINGS[wiring])).eval()
    with torch.no_grad():  # x070's zero-initialised paths would hide differences: make every weight count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    tokens = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with torch.no_grad():
        state = model(tokens, model.init_state(2)).state
        args = (torch.tensor([3, 4]), state, torch.tensor([3, 3]), torch.tensor([0, 1]))
        plain = model.step_sync_free(*args)
        previous = fused.use_fused_step(True)
        try:
            with_kernel = model.step_sync_free(*args)
        finally:
            fused.use_fused_step(previous)
    torch.testing.assert_close(with_kernel.logits, plain.logits, atol=1e-5, rtol=1e-5, msg=f"seed {seed}")
    for (name, a), (_, b) in zip(plain.state.tensors(), with_kernel.state.tensors()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=f"{name}, seed {seed}")


def test_one_block_with_a_frozen_row(interpret, fused_on):
    seed = fresh_seed()
    torch.manual_seed(seed)
    block = HierarchosLM(tiny_config()).reasoner.worker.blocks[0].time_mix.eval()
    x, shift = torch.randn(2, 1, 16), torch.randn(2, 16)
    state = torch.randn(2, 2, 8, 8) * 0.3
    frozen = torch.tensor([[True], [False]])
    with torch.no_grad():
        out, new_shift, new_state, _ = block(x, shift, state, frozen)
        fused.use_fused_step(False)
        out_ref, shift_ref, state_ref, _ = block(x, shift, state, frozen)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5, msg=f"seed {seed}")
    torch.testing.assert_close(new_shift, shift_ref)
    torch.testing.assert_close(new_state, state_ref, atol=1e-6, rtol=1e-6, msg=f"seed {seed}")
    assert torch.equal(new_state[0], state[0])


def test_the_dispatcher_keeps_prefill_autograd_and_other_dtypes_eager(interpret, fused_on, monkeypatch):
    calls = []
    monkeypatch.setattr(fused, "timemix_step_triton", lambda *a, **k: calls.append(1) or (_ for _ in ()).throw(
        AssertionError("the kernel was called")))
    torch.manual_seed(0)
    model = HierarchosLM(tiny_config()).eval()
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3, 4]]))         # T = 4, 2 plan points (stride 2): the parallel form
        model.double().step(torch.tensor([1]), model.init_state(1))         # float64
    model.float()
    assert calls == []
    x = torch.zeros(1, 1, 16)
    assert not fused.fits(x, 8)                                            # autograd on (passes with gradients)
    with torch.no_grad():
        assert fused.fits(x, 8) and not fused.fits(x, 6) and not fused.fits(x.double(), 8)
    with torch.no_grad(), pytest.raises(AssertionError, match="kernel was called"):
        model.step(torch.tensor([1]), model.init_state(1))                  # and it is taken where it fits


def test_the_stepper_refuses_a_device_the_kernel_cannot_run_on(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = HierarchosLM(tiny_config()).eval()
    with pytest.raises(HierarchosError, match="fused_step=True.*cannot run on cpu"):
        generate_batch(model, [[1, 2]], SamplingConfig(temperature=0.0, max_new_tokens=2), fused_step=True)


def test_generate_batch_with_the_kernel_equals_without(interpret):
    torch.manual_seed(fresh_seed())
    model = HierarchosLM(tiny_config()).eval()
    cfg = SamplingConfig(temperature=0.8, max_new_tokens=5)
    prompts = [[1, 2, 3], [4, 5]]
    plain = generate_batch(model, prompts, cfg, seeds=[1, 2])
    fused_run = generate_batch(model, prompts, cfg, seeds=[1, 2], fused_step=True)
    assert fused_run.tokens == plain.tokens
    for (_, a), (_, b) in zip(plain.state.tensors(), fused_run.state.tensors()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert not fused.enabled()  # switched on for the step only


# ---- on a GPU: the compiled kernel, and the stepper's CUDA graph around it ------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", [(1, 12, 64), (4, 2, 64), (2, 3, 32)])
@pytest.mark.parametrize("frozen", [False, True])
def test_kernel_on_cuda_equals_reference(shape, frozen):
    seed = fresh_seed()
    args = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in inputs(seed, *shape, frozen).items()}
    out_ref, state_ref = fused.timemix_step_reference(**args)
    out, state = fused.timemix_step_triton(**args)
    torch.testing.assert_close(out, out_ref, atol=5e-5, rtol=5e-5, msg=f"seed {seed}")
    torch.testing.assert_close(state, state_ref, atol=5e-6, rtol=5e-6, msg=f"seed {seed}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_step_in_a_cuda_graph_equals_the_eager_graph():
    torch.manual_seed(fresh_seed())
    model = HierarchosLM(tiny_config(head_size=8)).cuda().eval()
    cfg = SamplingConfig(temperature=0.8, max_new_tokens=12)
    prompts = [[1, 2, 3, 4, 5], [6, 0, 2]]
    eager = generate_batch(model, prompts, cfg, seeds=[1, 2], cuda_graph=True)
    with_kernel = generate_batch(model, prompts, cfg, seeds=[1, 2], cuda_graph=True, fused_step=True)
    assert with_kernel.tokens == eager.tokens
    for (name, a), (_, b) in zip(eager.state.tensors(), with_kernel.state.tensors()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_fits_takes_power_of_two_heads_float32_no_grad_and_a_device_the_kernel_runs_on(fused_on, monkeypatch):
    """`fits` by its rule: every power of two head size (1 = 2^0 included; the kernel runs it, checked
    against the reference), no other; on the CPU only under TRITON_INTERPRET=1 (unset or "0": no)."""
    x = torch.zeros(2, 1, 16)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with torch.no_grad():
        assert [n for n in range(1, 70) if fused.fits(x, n)] == [1, 2, 4, 8, 16, 32, 64]
        args = inputs(fresh_seed(), 2, 3, 1)
        out_ref, state_ref = fused.timemix_step_reference(**args)
        out, state = fused.timemix_step_triton(**args)
        torch.testing.assert_close(out, out_ref, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(state, state_ref, atol=2e-6, rtol=2e-6)
        for value in (None, "0"):
            if value is None:
                monkeypatch.delenv("TRITON_INTERPRET")
            else:
                monkeypatch.setenv("TRITON_INTERPRET", value)
            assert not fused.fits(x, 8), value
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert not fused.fits(torch.zeros(2, 1, 16, device="meta"), 8)  # neither CUDA nor the CPU
        fused.use_fused_step(False)
        assert not fused.fits(x, 8)


def test_reference_in_bf16_computes_the_recurrence_in_float32_as_time_mix_does():
    """The reference is TimeMix's one-token function: with a bf16 block (bf16 projections, a float32
    state) it upcasts the decay, the removal key and the heads to float32 before the recurrence, as
    TimeMix.forward's eager path does (`_f32`): the next state agrees to float32 rounding (the two may
    run the recurrence by different kernels), not merely to bf16's 1e-3."""
    from hierarchos.model.rwkv import shift_tokens

    seed = fresh_seed()
    torch.manual_seed(seed)
    tm = HierarchosLM(tiny_config()).reasoner.worker.blocks[0].time_mix.eval()
    with torch.no_grad():
        for p in tm.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    tm = tm.bfloat16()
    x, shift = torch.randn(2, 1, 16).bfloat16(), torch.randn(2, 16).bfloat16()
    state = torch.randn(2, 2, 8, 8) * 0.3
    with torch.no_grad():
        out, _, new_state, _ = tm(x, shift, state)
        x_prev, _ = shift_tokens(x, shift, None)
        xr, xw, xk, xv, xa, xg = tm._mixes(x, x_prev - x).unbind(0)
        r, k, v = tm.receptance(xr), tm.key(xk), tm.value(xv)
        full_gate = tm.wiring.gate == "sigmoid_full"
        g = tm.gate(xg) if full_gate else torch.sigmoid(xg @ tm.gate_down) @ tm.gate_up
        flat = lambda t: t.reshape(2, 16)  # noqa: E731
        o, s = fused.timemix_step_reference(
            flat(r), flat(k), flat(v), flat(torch.tanh(xw @ tm.decay_down) @ tm.decay_up),
            flat((xa @ tm.iclr_down) @ tm.iclr_up), flat(g), state, None, tm.decay_base, tm.iclr_base,
            tm.removal_scale, tm.key_iclr_mix, tm.bonus, tm.norm.weight, tm.norm.bias, tm.norm.eps, full_gate)
    assert s.dtype == torch.float32 and o.dtype == torch.bfloat16
    torch.testing.assert_close(s, new_state, atol=1e-6, rtol=1e-6, msg=f"seed {seed}")
    torch.testing.assert_close(tm.output(o.view(2, 1, 16)), out, msg=f"seed {seed}")


def test_the_ops_fake_form_gives_the_kernels_shapes_and_dtypes():
    """What torch.compile sees of the op (its registered fake form): out (B, C) float32 beside inputs of
    another dtype, the next state shaped and typed as the state; checked under FakeTensorMode."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = inputs(0, B=3, H=2, N=4)
    args["r"] = args["r"].double()  # the fake out is float32 whatever r is, as the kernel's
    args["state"] = args["state"].double()
    with FakeTensorMode() as mode:
        fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        out, state = torch.ops.hierarchos.timemix_step(*(fake[k] for k in (
            "r", "k", "v", "decay_lora", "iclr_lora", "gate", "state", "frozen", "decay_base", "iclr_base",
            "removal_scale", "key_iclr_mix", "bonus", "norm_weight", "norm_bias", "eps", "gate_sigmoid")))
    assert (tuple(out.shape), out.dtype) == ((3, 8), torch.float32)
    assert (tuple(state.shape), state.dtype) == ((3, 2, 4, 4), torch.float64)


def test_every_refusal_of_the_kernel_is_one_line_that_says_why(monkeypatch):
    """timemix_step_triton's refusals, each checked alone: no device to run on (the CPU without
    TRITON_INTERPRET=1), a head size that is not a power of two, tensors that are not float32 (named),
    a frozen mask that is not bool or not one flag per row."""
    from hierarchos.ops.wkv_triton import triton_unavailable_reason

    def refused(message, **changes):
        args = {**inputs(0, B=3, H=2, N=4, frozen=False), **changes}
        with pytest.raises(HierarchosError) as info:
            fused.timemix_step_triton(**args)
        assert str(info.value) == message

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = triton_unavailable_reason(torch.device("cpu"))
    assert reason
    refused(f"the fused one-token time mix cannot run: {reason}")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    six = inputs(0, B=3, H=2, N=6, frozen=False)
    refused("the fused one-token time mix needs a power-of-two head size (got 6); switch it off "
            "(use_fused_step(False))", **six)
    a = inputs(0, B=3, H=2, N=4, frozen=False)
    refused("the fused one-token time mix takes float32 tensors (r, bonus are not); switch it off "
            "(use_fused_step(False)) under autocast or in other dtypes", r=a["r"].double(), bonus=a["bonus"].half())
    refused("the fused one-token time mix takes frozen as (3,) bool, got (3,) torch.int64",
            frozen=torch.tensor([0, 1, 0]))
    refused("the fused one-token time mix takes frozen as (3,) bool, got (2,) torch.bool",
            frozen=torch.tensor([True, False]))


# ---- the low-rank paths (decay, in-context rate, x070's gate and value residual) in two launches --------


def lowrank_inputs(seed, B, C, ranks, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(B, C, generator=g) * scale for _ in ranks]
    downs = [torch.randn(C, r, generator=g) / C ** 0.5 for r in ranks]
    ups = [torch.randn(r, C, generator=g) / r ** 0.5 for r in ranks]
    return xs, downs, ups


@pytest.mark.parametrize("B, C, ranks, acts", [
    (1, 16, [16], ["tanh"]),
    (3, 100, [64, 32, 128, 48], ["tanh", "none", "sigmoid", "none"]),   # C and a rank off the blocks
    (2, 64, [32, 32, 32], ["sigmoid", "tanh", "none"]),
    (2, 256, [8, 200], ["none", "tanh"]),                               # a rank past one up-projection tile
])
def test_lowrank_paths_kernel_equals_reference(interpret, B, C, ranks, acts):
    seed = fresh_seed()
    xs, downs, ups = lowrank_inputs(seed, B, C, ranks, scale=4.0)  # tanh and sigmoid well into saturation
    out = fused.lowrank_paths_triton(xs, downs, ups, acts)
    ref = fused.lowrank_paths_reference(xs, downs, ups, acts)
    assert [(tuple(o.shape), o.dtype) for o in out] == [((B, C), torch.float32)] * len(ranks)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, atol=2e-5, rtol=2e-5, msg=f"seed {seed}")


def test_lowrank_paths_reference_is_each_path_written_out():
    seed = fresh_seed()
    xs, downs, ups = lowrank_inputs(seed, 2, 12, [4, 6, 5])
    ref = fused.lowrank_paths_reference(xs, downs, ups, ["tanh", "none", "sigmoid"])
    torch.testing.assert_close(ref[0], torch.tanh(xs[0] @ downs[0]) @ ups[0])
    torch.testing.assert_close(ref[1], (xs[1] @ downs[1]) @ ups[1])
    torch.testing.assert_close(ref[2], torch.sigmoid(xs[2] @ downs[2]) @ ups[2])


def test_lowrank_paths_run_as_two_launches(interpret, monkeypatch):
    """Every path's hidden vector in one launch (the down projections, transposed, with their activations),
    every up-projection in a second."""
    from hierarchos.ops import matvec_triton

    calls = []
    real = matvec_triton._matvecs_op
    monkeypatch.setattr(matvec_triton, "_matvecs_op", lambda xs, ws, codes, t: calls.append((len(ws), codes, t))
                        or real(xs, ws, codes, t))
    xs, downs, ups = lowrank_inputs(0, 2, 16, [8, 4, 8])
    fused.lowrank_paths_triton(xs, downs, ups, ["tanh", "none", "sigmoid"])
    assert calls == [(3, [1, 0, 2], [True] * 3), (3, [0, 0, 0], [True] * 3)]


def test_every_refusal_of_the_lowrank_paths_is_one_line(interpret, monkeypatch):
    xs, downs, ups = lowrank_inputs(0, 2, 16, [8, 8])

    def refused(match, xs=xs, downs=downs, ups=ups, acts=("tanh", "none")):
        with pytest.raises(HierarchosError, match=match):
            fused.lowrank_paths_triton(list(xs), list(downs), list(ups), list(acts))

    refused(r"1 to 4 paths.*\(got 2, 2, 2, 1\)", acts=("tanh",))
    refused(r"1 to 4 paths.*\(got 5, 5, 5, 5\)", xs=(xs * 3)[:5], downs=(downs * 3)[:5], ups=(ups * 3)[:5],
            acts=("none",) * 5)
    refused("unknown activation 'relu'", acts=("relu", "none"))
    refused(r"path 1 has x \(2, 16\), down \(16, 8\), up \(4, 16\)", ups=(ups[0], ups[1][:4]))
    refused("take float32 tensors \\(pair 0 has torch.float64", xs=(xs[0].double(), xs[1]))
    monkeypatch.delenv("TRITON_INTERPRET")
    refused("cannot run: ")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("B, ranks", [(1, [64, 32, 128, 32]), (4, [64, 32])])
def test_lowrank_kernel_on_cuda_equals_reference(B, ranks):
    seed = fresh_seed()
    xs, downs, ups = (list(map(torch.Tensor.cuda, ts)) for ts in lowrank_inputs(seed, B, 768, ranks, scale=2.0))
    acts = ["tanh", "none", "sigmoid", "none"][:len(ranks)]
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = fused.lowrank_paths_reference(xs, downs, ups, acts)
    for o, r in zip(fused.lowrank_paths_triton(xs, downs, ups, acts), ref):
        torch.testing.assert_close(o, r, atol=5e-5, rtol=5e-5, msg=f"seed {seed}")
