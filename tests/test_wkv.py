"""WKV-7 parity tests: every implementation against the term-by-term reference scan.

Random inputs follow the model's ranges (log_w in [-0.61, 0], a = -kappa,
b = kappa * iclr) and come from a fresh seed each run, printed on failure.
"""

import os
import random

import pytest
import torch
import torch.nn.functional as F

from hierarchos.errors import HierarchosError
from hierarchos.ops import wkv7
from hierarchos.ops.wkv import (
    _cpp_kernels,
    wkv7_cpp_step,
    ENV_IMPL,
    available_impls,
    resolve_impl,
    wkv7_chunked,
    wkv7_fla,
    wkv7_recurrent_step,
    wkv7_reference,
)

NAMES = ("r", "log_w", "k", "v", "a", "b")


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**31)


def make_inputs(seed, B=2, T=20, H=2, N=8, dtype=torch.float64, device="cpu"):
    """Six (B, T, H, N) inputs in the model's ranges and a nonzero initial state."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float64)

    shape = (B, T, H, N)
    log_w = -0.61 * rand(*shape)
    kappa = F.normalize(randn(*shape), dim=-1)
    iclr = rand(*shape)
    inputs = {
        "r": randn(*shape), "log_w": log_w, "k": 0.5 * randn(*shape), "v": randn(*shape),
        "a": -kappa, "b": kappa * iclr,
    }
    state = 0.5 * randn(B, H, N, N)
    to = dict(dtype=dtype, device=device)
    return {n: x.to(**to) for n, x in inputs.items()}, state.to(**to)


def rel_err(x, y):
    return ((x.double() - y.double()).norm() / y.double().norm()).item()


def freeze(inputs, mask):
    """Make the tokens where mask (B, T) is True frozen: log_w = b = k = 0."""
    out = dict(inputs)
    for n in ("log_w", "b", "k"):
        out[n] = inputs[n].masked_fill(mask[:, :, None, None], 0.0)
    return out


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("T, chunk_size", [(1, 16), (5, 16), (16, 16), (37, 16), (64, 32), (50, 8), (33, 64)])
def test_chunked_matches_reference_float64(T, chunk_size):
    seed = fresh_seed()
    inputs, state = make_inputs(seed, T=T)
    o_ref, s_ref = wkv7_reference(**inputs, state=state)
    o, s = wkv7_chunked(**inputs, state=state, chunk_size=chunk_size)
    assert o.dtype == s.dtype == torch.float64
    torch.testing.assert_close(o, o_ref, rtol=1e-9, atol=1e-9, msg=lambda m: f"seed={seed} o: {m}")
    torch.testing.assert_close(s, s_ref, rtol=1e-9, atol=1e-9, msg=lambda m: f"seed={seed} state: {m}")


@pytest.mark.parametrize("T", [1, 2, 9])
def test_recurrent_matches_reference_float64(T):
    seed = fresh_seed()
    inputs, state = make_inputs(seed, T=T)
    o_ref, s_ref = wkv7_reference(**inputs, state=state)
    o, s = wkv7_recurrent_step(**inputs, state=state)
    torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12, msg=lambda m: f"seed={seed} o: {m}")
    torch.testing.assert_close(s, s_ref, rtol=1e-12, atol=1e-12, msg=lambda m: f"seed={seed} state: {m}")


def test_zero_state_default():
    seed = fresh_seed()
    inputs, state = make_inputs(seed, T=7)
    o_none, s_none = wkv7_chunked(**inputs, chunk_size=4)
    o_zero, s_zero = wkv7_reference(**inputs, state=torch.zeros_like(state))
    torch.testing.assert_close(o_none, o_zero, rtol=1e-9, atol=1e-9, msg=lambda m: f"seed={seed}: {m}")
    torch.testing.assert_close(s_none, s_zero, rtol=1e-9, atol=1e-9, msg=lambda m: f"seed={seed}: {m}")


@pytest.mark.parametrize("chunk_size", [16, 32, 64])
def test_chunked_float32_close_to_float64_reference(chunk_size):
    seed = fresh_seed()
    inputs, state = make_inputs(seed, B=2, T=150, H=2, N=32)
    o_ref, s_ref = wkv7_reference(**inputs, state=state)
    inputs32 = {n: x.float() for n, x in inputs.items()}
    o, s = wkv7_chunked(**inputs32, state=state.float(), chunk_size=chunk_size)
    assert o.dtype == s.dtype == torch.float32
    assert rel_err(o, o_ref) < 1e-4, f"seed={seed} o rel err {rel_err(o, o_ref)}"
    assert rel_err(s, s_ref) < 1e-4, f"seed={seed} state rel err {rel_err(s, s_ref)}"


def test_low_precision_inputs_are_upcast():
    seed = fresh_seed()
    inputs, state = make_inputs(seed, T=10)
    bf16 = {n: x.bfloat16() for n, x in inputs.items()}
    o_ref, s_ref = wkv7_reference(**{n: x.double() for n, x in bf16.items()})
    for run in (wkv7_reference, wkv7_recurrent_step, wkv7_chunked):
        o, s = run(**bf16)
        assert o.dtype == s.dtype == torch.float32, run.__name__
        assert rel_err(o, o_ref) < 1e-5, f"seed={seed} {run.__name__}"


# ----------------------------------------------------------------------------- gradients


def _grads(run, inputs, state, weight_o, weight_s):
    leaves = {n: x.clone().requires_grad_(True) for n, x in inputs.items()}
    state = state.clone().requires_grad_(True)
    o, s = run(**leaves, state=state)
    loss = (o * weight_o).sum() + (s * weight_s).sum()
    return torch.autograd.grad(loss, [*leaves.values(), state])


@pytest.mark.parametrize("T, chunk_size", [(23, 8), (32, 16), (3, 16)])
def test_chunked_gradients_match_reference(T, chunk_size):
    seed = fresh_seed()
    inputs, state = make_inputs(seed, T=T)
    gen = torch.Generator().manual_seed(seed + 1)
    weight_o = torch.randn(inputs["r"].shape, generator=gen, dtype=torch.float64)
    weight_s = torch.randn(state.shape, generator=gen, dtype=torch.float64)
    ref = _grads(wkv7_reference, inputs, state, weight_o, weight_s)
    got = _grads(lambda **kw: wkv7_chunked(**kw, chunk_size=chunk_size), inputs, state, weight_o, weight_s)
    for name, g, g_ref in zip((*NAMES, "state"), got, ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-8, msg=lambda m: f"seed={seed} d{name}: {m}")


def test_chunked_gradcheck():
    seed = fresh_seed()
    inputs, state = make_inputs(seed, B=1, T=5, H=1, N=3)
    leaves = [x.clone().requires_grad_(True) for x in (*inputs.values(), state)]

    def run(*xs):
        return wkv7_chunked(*xs[:6], state=xs[6], chunk_size=2)

    assert torch.autograd.gradcheck(run, leaves, eps=1e-6, atol=1e-6), f"seed={seed}"


# ----------------------------------------------------------------------------- state carry and frozen tokens


@pytest.mark.parametrize("run", [
    lambda **kw: wkv7_chunked(**kw, chunk_size=8),
    wkv7_recurrent_step,
], ids=["chunked", "recurrent"])
def test_state_carry_equals_one_call(run):
    seed = fresh_seed()
    T = 29
    split = random.Random(seed).randrange(1, T)
    inputs, state = make_inputs(seed, T=T)
    o_all, s_all = run(**inputs, state=state)
    o_first, s_mid = run(**{n: x[:, :split] for n, x in inputs.items()}, state=state)
    o_second, s_end = run(**{n: x[:, split:] for n, x in inputs.items()}, state=s_mid)
    msg = lambda m: f"seed={seed} split={split}: {m}"  # noqa: E731
    torch.testing.assert_close(torch.cat([o_first, o_second], dim=1), o_all, rtol=1e-9, atol=1e-9, msg=msg)
    torch.testing.assert_close(s_end, s_all, rtol=1e-9, atol=1e-9, msg=msg)


@pytest.mark.parametrize("run", [
    wkv7_reference,
    wkv7_recurrent_step,
    lambda **kw: wkv7_chunked(**kw, chunk_size=4),
], ids=["reference", "recurrent", "chunked"])
def test_frozen_tokens_leave_state_unchanged(run):
    seed = fresh_seed()
    inputs, state = make_inputs(seed, T=11)
    frozen = freeze(inputs, torch.ones(2, 11, dtype=torch.bool))   # r, v, a stay random
    _, s = run(**frozen, state=state)
    torch.testing.assert_close(s, state, rtol=1e-12, atol=1e-12, msg=lambda m: f"seed={seed}: {m}")


def test_interleaved_frozen_tokens_do_not_change_the_result():
    seed = fresh_seed()
    rng = random.Random(seed)
    T, extra = 17, 13
    inputs, state = make_inputs(seed, B=1, T=T + extra)
    keep = sorted(rng.sample(range(T + extra), T))
    mask = torch.ones(1, T + extra, dtype=torch.bool)
    mask[0, keep] = False
    interleaved = freeze(inputs, mask)
    plain = {n: x[:, keep] for n, x in inputs.items()}
    msg = lambda m: f"seed={seed}: {m}"  # noqa: E731
    o_plain, s_plain = wkv7_reference(**plain, state=state)
    for run in (wkv7_reference, lambda **kw: wkv7_chunked(**kw, chunk_size=8)):
        o, s = run(**interleaved, state=state)
        torch.testing.assert_close(s, s_plain, rtol=1e-9, atol=1e-9, msg=msg)
        torch.testing.assert_close(o[:, keep], o_plain, rtol=1e-9, atol=1e-9, msg=msg)


# ----------------------------------------------------------------------------- dispatch


def test_dispatcher_on_cpu(monkeypatch):
    monkeypatch.delenv(ENV_IMPL, raising=False)
    seed = fresh_seed()
    long_inputs, state = make_inputs(seed, T=12)
    short_inputs, _ = make_inputs(seed, T=1)
    assert resolve_impl("auto", long_inputs["r"]) == "chunked"
    assert resolve_impl("auto", short_inputs["r"]) == "recurrent"
    assert resolve_impl("reference", long_inputs["r"]) == "reference"
    built = {"cpp_step"} if _cpp_kernels() is not None else set()
    assert set(available_impls("cpu")) == {"reference", "recurrent", "chunked"} | built

    o_ref, s_ref = wkv7_reference(**long_inputs, state=state)
    for impl in ("auto", "reference", "recurrent", "chunked"):
        o, s = wkv7(**long_inputs, state=state, impl=impl, chunk_size=8)
        torch.testing.assert_close(o, o_ref, rtol=1e-9, atol=1e-9, msg=lambda m: f"seed={seed} {impl}: {m}")
        torch.testing.assert_close(s, s_ref, rtol=1e-9, atol=1e-9, msg=lambda m: f"seed={seed} {impl}: {m}")

    monkeypatch.setenv(ENV_IMPL, "reference")
    assert resolve_impl("auto", long_inputs["r"]) == "reference"
    assert resolve_impl("chunked", long_inputs["r"]) == "chunked"   # explicit impl wins
    monkeypatch.setenv(ENV_IMPL, "fast-please")
    with pytest.raises(HierarchosError):
        resolve_impl("auto", long_inputs["r"])


def test_cuda_choice_takes_fla_for_few_batch_head_pairs_only():
    """The CUDA rule (pure, so the CPU checks it): fla's chunked kernel where our sequential kernel
    cannot fill the GPU (few (batch, head) pairs), ours otherwise; each alone when the other is absent."""
    from hierarchos.ops.wkv import FLA_BELOW_PAIRS, cuda_choice

    heads = 12
    few, many = (FLA_BELOW_PAIRS - 1) // heads, -(-FLA_BELOW_PAIRS // heads)   # B=5 -> 60 pairs, B=6 -> 72
    assert cuda_choice(few, heads, triton_ok=True, fla_ok=True) == "fla"
    assert cuda_choice(many, heads, triton_ok=True, fla_ok=True) == "triton"
    assert cuda_choice(many, heads, triton_ok=False, fla_ok=True) == "fla"
    assert cuda_choice(few, heads, triton_ok=True, fla_ok=False) == "triton"
    assert cuda_choice(few, heads, triton_ok=False, fla_ok=False) == "chunked"


def test_bad_arguments_raise():
    inputs, _ = make_inputs(fresh_seed(), T=4)
    with pytest.raises(ValueError):
        wkv7(**inputs, impl="cuda-magic")
    with pytest.raises(ValueError):
        wkv7_chunked(**inputs, chunk_size=0)
    with pytest.raises(ValueError):
        wkv7_chunked(**inputs, chunk_size=65)
    with pytest.raises(ValueError):
        wkv7_reference(**{**inputs, "k": inputs["k"][:, :3]})
    if not torch.cuda.is_available():
        with pytest.raises(HierarchosError):
            wkv7(**inputs, impl="fla")


# ----------------------------------------------------------------------------- CUDA


def _fla_ready():
    return torch.cuda.is_available() and "fla" in available_impls("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_chunked_on_cuda_matches_reference():
    seed = fresh_seed()
    inputs, state = make_inputs(seed, B=2, T=100, H=4, N=64, dtype=torch.float32, device="cuda")
    o_ref, s_ref = wkv7_reference(**{n: x.double() for n, x in inputs.items()}, state=state.double())
    o, s = wkv7_chunked(**inputs, state=state)
    assert rel_err(o, o_ref) < 1e-3, f"seed={seed} o rel err {rel_err(o, o_ref)}"   # TF32 matmuls allowed
    assert rel_err(s, s_ref) < 1e-3, f"seed={seed} state rel err {rel_err(s, s_ref)}"


@pytest.mark.gpu
@pytest.mark.skipif(not _fla_ready(), reason="needs CUDA and fla-core")
@pytest.mark.parametrize("T", [1, 63, 100])
def test_fla_matches_reference(T):
    seed = fresh_seed()
    inputs, state = make_inputs(seed, B=2, T=T, H=4, N=64, dtype=torch.float32, device="cuda")
    gen = torch.Generator().manual_seed(seed + 1)
    weight_o = torch.randn(inputs["r"].shape, generator=gen).cuda()
    weight_s = torch.randn(state.shape, generator=gen).cuda()
    o_ref, s_ref = wkv7_reference(**inputs, state=state)
    o, s = wkv7_fla(**inputs, state=state)
    assert o.dtype == s.dtype == torch.float32
    tol = 5e-3   # fla's Triton dots may run in TF32
    assert rel_err(o, o_ref) < tol, f"seed={seed} o rel err {rel_err(o, o_ref)}"
    assert rel_err(s, s_ref) < tol, f"seed={seed} state rel err {rel_err(s, s_ref)}"
    ref = _grads(wkv7_reference, inputs, state, weight_o, weight_s)
    got = _grads(wkv7_fla, inputs, state, weight_o, weight_s)
    for name, g, g_ref in zip((*NAMES, "state"), got, ref):
        assert rel_err(g, g_ref) < tol, f"seed={seed} d{name} rel err {rel_err(g, g_ref)}"


def test_cpp_step_matches_reference_float32():
    """The C++ loop (the CPU's recurrence without autograd: generation's step and a prompt's whole
    sequence, whose (batch, head) pairs run on the kernel's pool from kWkvParallelTokens = 16 tokens)
    against the float64 scan."""
    if _cpp_kernels() is None:
        if os.environ.get("HIERARCHOS_REQUIRE_KERNEL") == "1":
            pytest.fail("HIERARCHOS_REQUIRE_KERNEL=1 but the C++ kernel is not built")
        pytest.skip("the C++ kernel is not built")
    for T in (1, 2, 3, 15, 16, 41):
        seed = fresh_seed()
        inputs, state = make_inputs(seed, B=2, T=T, H=3, N=16)
        o_ref, s_ref = wkv7_reference(**inputs, state=state)
        f32 = {n: x.float() for n, x in inputs.items()}
        state32 = state.float()
        o, s = wkv7_cpp_step(**f32, state=state32)
        assert o.dtype == s.dtype == torch.float32
        torch.testing.assert_close(o.double(), o_ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"seed={seed}: {m}")
        torch.testing.assert_close(s.double(), s_ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"seed={seed}: {m}")
        assert torch.equal(state32, state.float())  # the input state is a value: untouched
        with torch.no_grad():
            assert resolve_impl("auto", f32["r"][:, :1]) == "cpp_step"
            assert resolve_impl("auto", f32["r"]) == "cpp_step"  # every length
        assert resolve_impl("auto", f32["r"][:, :1].requires_grad_()) == "recurrent"  # autograd: torch path
        assert resolve_impl("auto", torch.zeros(1, 3, 2, 4, requires_grad=True)) == "chunked"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_state", [True, False])
def test_the_no_grad_operator_is_wkv7_and_its_fake_form_gives_the_shapes(dtype, with_state):
    """`wkv7_no_grad` (the recurrence as one opaque operator for a compiled block without gradients) equals
    `wkv7`; its outputs are new tensors; its fake form (what torch.compile traces) has their shapes and dtypes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from hierarchos.ops.wkv import wkv7_no_grad

    seed = fresh_seed()
    x, state = make_inputs(seed, T=37, dtype=dtype)
    state = state if with_state else None
    args = [x[n] for n in NAMES]
    with torch.no_grad():  # the operator's contract: wkv7 without gradients (on the CPU: the C++ loop when built)
        want_o, want_s = wkv7(*args, state=state)
    o, s = wkv7_no_grad(*args, state, 32)
    assert torch.equal(o, want_o) and torch.equal(s, want_s), seed
    assert all(t is not u for t in (o, s) for u in (*args, state))
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in args]
        fo, fs = wkv7_no_grad(*fake, None if state is None else mode.from_tensor(state), 32)
    assert (fo.shape, fo.dtype, fs.shape, fs.dtype) == (o.shape, o.dtype, s.shape, s.dtype)
    assert (fo.stride(), fs.stride()) == (o.stride(), s.stride())  # compiled code indexes by the fake's layout
    torch.library.opcheck(torch.ops.hierarchos.wkv7_no_grad.default, (*args, state, 32))
