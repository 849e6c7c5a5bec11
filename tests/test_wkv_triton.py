"""Parity tests for the fused Triton WKV-7 kernel (hierarchos/ops/wkv_triton.py).

The kernel's backward, written in PyTorch, is checked against autograd of the reference scan
(float64, no triton needed). The kernels themselves run under Triton's interpreter on CPU
tensors (TRITON_INTERPRET=1, skipped when triton does not import) and compiled on CUDA
(marked gpu): outputs, final state and all seven gradients against the float64 reference.
Inputs come from a fresh seed each run, printed on failure.
"""

import random

import pytest
import torch

from hierarchos.errors import HierarchosError
from hierarchos.ops import wkv7
from hierarchos.ops.wkv import resolve_impl, wkv7_reference
from hierarchos.ops.wkv_triton import triton, wkv7_manual_backward, wkv7_triton
from test_wkv import NAMES, freeze, fresh_seed, make_inputs, rel_err

needs_triton = pytest.mark.skipif(triton is None, reason="triton does not import")
TOL32 = 1e-5   # float32 sequential scan vs the float64 reference: ~1e-7 seen


@pytest.fixture
def interpret(monkeypatch):
    """Run the Triton kernels on CPU tensors through Triton's interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def reference_grads(inputs, state, weight_o, weight_s):
    """o, final state and the gradients of sum(o * weight_o) + sum(s * weight_s), float64 autograd."""
    leaves = {n: x.double().clone().requires_grad_(True) for n, x in inputs.items()}
    s0 = state.double().clone().requires_grad_(True)
    o, s = wkv7_reference(**leaves, state=s0)
    grads = torch.autograd.grad((o * weight_o).sum() + (s * weight_s).sum(), [*leaves.values(), s0])
    return o.detach(), s.detach(), grads


def triton_grads(inputs, state, weight_o, weight_s, **kw):
    leaves = {n: x.float().clone().requires_grad_(True) for n, x in inputs.items()}
    s0 = state.float().clone().requires_grad_(True)
    o, s = wkv7_triton(**leaves, state=s0, **kw)
    loss = (o * weight_o.to(o)).sum() + (s * weight_s.to(s)).sum()
    return o.detach(), s.detach(), torch.autograd.grad(loss, [*leaves.values(), s0])


def weights(seed, inputs, state):
    gen = torch.Generator().manual_seed(seed + 1)
    return (torch.randn(inputs["r"].shape, generator=gen, dtype=torch.float64),
            torch.randn(state.shape, generator=gen, dtype=torch.float64))


def assert_matches(seed, got, ref, tol, label=""):
    (o, s, grads), (o_ref, s_ref, grads_ref) = got, ref
    errors = {"o": rel_err(o, o_ref), "state": rel_err(s, s_ref)}
    errors.update({f"d{n}": rel_err(g, g_ref) for n, g, g_ref in zip((*NAMES, "state"), grads, grads_ref)})
    bad = {n: e for n, e in errors.items() if not e < tol}   # `not <` also catches NaN
    assert not bad, f"seed={seed} {label} rel errors over {tol}: {bad}"


# ----------------------------------------------------------------------------- the derivation


@pytest.mark.parametrize("T, chunk", [(1, 4), (7, 3), (16, 16), (33, 16)])
def test_manual_backward_matches_autograd_float64(T, chunk):
    seed = fresh_seed()
    inputs, state = make_inputs(seed, B=2, T=T, H=2, N=8)
    weight_o, weight_s = weights(seed, inputs, state)
    _, _, ref = reference_grads(inputs, state, weight_o, weight_s)
    got = wkv7_manual_backward(**inputs, state=state, d_o=weight_o, d_state=weight_s, chunk=chunk)
    for name, g, g_ref in zip((*NAMES, "state"), got, ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10, msg=lambda m: f"seed={seed} d{name}: {m}")


# ----------------------------------------------------------------------------- kernels (interpreter)


@needs_triton
@pytest.mark.parametrize("T, N, rows, prefetch", [
    (1, 16, 16, True), (7, 16, 8, True), (16, 32, 16, True), (33, 16, 16, True), (100, 16, 16, True),
    (7, 16, 8, False), (33, 32, 8, False),
])
def test_kernel_matches_reference(interpret, T, N, rows, prefetch):
    seed = fresh_seed()
    inputs, state = make_inputs(seed, B=1, T=T, H=2, N=N)
    weight_o, weight_s = weights(seed, inputs, state)
    ref = reference_grads(inputs, state, weight_o, weight_s)
    got = triton_grads(inputs, state, weight_o, weight_s, rows=rows, prefetch=prefetch)
    assert got[0].dtype == got[1].dtype == torch.float32
    assert_matches(seed, got, ref, TOL32, f"T={T} N={N} rows={rows} prefetch={prefetch}")


@needs_triton
def test_kernel_state_carry_equals_one_call(interpret):
    seed = fresh_seed()
    T = 21
    split = random.Random(seed).randrange(1, T)
    inputs, state = make_inputs(seed, B=1, T=T, H=1, N=16, dtype=torch.float32)
    o_all, s_all = wkv7_triton(**inputs, state=state)
    o_first, s_mid = wkv7_triton(**{n: x[:, :split] for n, x in inputs.items()}, state=state)
    o_second, s_end = wkv7_triton(**{n: x[:, split:] for n, x in inputs.items()}, state=s_mid)
    msg = lambda m: f"seed={seed} split={split}: {m}"  # noqa: E731
    torch.testing.assert_close(torch.cat([o_first, o_second], dim=1), o_all, rtol=1e-5, atol=1e-5, msg=msg)
    torch.testing.assert_close(s_end, s_all, rtol=1e-5, atol=1e-5, msg=msg)


@needs_triton
def test_kernel_frozen_tokens(interpret):
    """All-frozen tokens leave S exactly as it was; interleaved frozen tokens change nothing."""
    seed = fresh_seed()
    rng = random.Random(seed)
    inputs, state = make_inputs(seed, B=1, T=20, H=1, N=16, dtype=torch.float32)
    _, s = wkv7_triton(**freeze(inputs, torch.ones(1, 20, dtype=torch.bool)), state=state)
    assert torch.equal(s, state), f"seed={seed}"   # w = 1, b = k = 0: every step is exact
    keep = sorted(rng.sample(range(20), 11))
    mask = torch.ones(1, 20, dtype=torch.bool)
    mask[0, keep] = False
    o, s = wkv7_triton(**freeze(inputs, mask), state=state)
    o_plain, s_plain = wkv7_reference(**{n: x[:, keep] for n, x in inputs.items()}, state=state)
    torch.testing.assert_close(s, s_plain, rtol=1e-5, atol=1e-5, msg=lambda m: f"seed={seed}: {m}")
    torch.testing.assert_close(o[:, keep], o_plain, rtol=1e-5, atol=1e-5, msg=lambda m: f"seed={seed}: {m}")


@needs_triton
def test_kernel_edge_inputs(interpret):
    """T == 0, state None, non-contiguous and bf16 inputs, forced through wkv7(impl='triton')."""
    seed = fresh_seed()
    inputs, state = make_inputs(seed, B=2, T=9, H=2, N=16, dtype=torch.float32)
    o, s = wkv7(**{n: x[:, :0] for n, x in inputs.items()}, state=state, impl="triton")
    assert o.shape == (2, 0, 2, 16) and torch.equal(s, state)

    o, s = wkv7(**inputs, impl="triton")                                   # state None = zeros
    o_ref, s_ref = wkv7_reference(**inputs)
    assert rel_err(o, o_ref) < TOL32 and rel_err(s, s_ref) < TOL32, f"seed={seed}"

    # (B, H, T, N) storage seen as (B, T, H, N): every input non-contiguous
    strided = {n: x.transpose(1, 2).contiguous().transpose(1, 2) for n, x in inputs.items()}
    assert not strided["r"].is_contiguous()
    o, s = wkv7(**strided, state=state.transpose(-1, -2).contiguous().transpose(-1, -2), impl="triton")
    o_ref, s_ref = wkv7_reference(**inputs, state=state)
    assert rel_err(o, o_ref) < TOL32 and rel_err(s, s_ref) < TOL32, f"seed={seed}"

    bf16 = {n: x.bfloat16() for n, x in inputs.items()}
    o, s = wkv7(**bf16, state=state, impl="triton")
    o_ref, s_ref = wkv7_reference(**{n: x.double() for n, x in bf16.items()}, state=state.double())
    assert o.dtype == s.dtype == torch.float32
    assert rel_err(o, o_ref) < TOL32 and rel_err(s, s_ref) < TOL32, f"seed={seed}"

    leaves = {n: x.clone().requires_grad_(True) for n, x in bf16.items()}   # grads come back as bf16
    o, s = wkv7(**leaves, impl="triton")
    (o.sum() + s.sum()).backward()
    assert all(x.grad is not None and x.grad.dtype == torch.bfloat16 for x in leaves.values())


@needs_triton
def test_kernel_keeps_bf16_rkv_and_equals_their_float32_copies(interpret):
    """The model's call under autocast: r, k, v bf16 (matmul outputs), log_w, a, b float32. The kernel
    reads them as they are (what it saves for the backward is bf16, no float32 copy) and gives the same
    outputs and gradients as their float32 copies, the gradients rounded once to bf16."""
    seed = fresh_seed()
    inputs, state = make_inputs(seed, B=2, T=19, H=2, N=16, dtype=torch.float32)
    mixed = {n: x.bfloat16() if n in ("r", "k", "v") else x for n, x in inputs.items()}
    upcast = {n: x.float() for n, x in mixed.items()}
    weight_o = torch.randn(inputs["r"].shape, generator=torch.Generator().manual_seed(seed))
    saved = []

    def run(xs):
        leaves = {n: x.clone().requires_grad_(True) for n, x in xs.items()}
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
            o, s = wkv7_triton(**leaves, state=state, chunk=8)
        grads = torch.autograd.grad((o * weight_o).sum() + s.sum(), list(leaves.values()))
        return o, s, dict(zip(leaves, grads))

    o, s, grads = run(mixed)
    assert saved.count(torch.bfloat16) == 3 and o.dtype == s.dtype == torch.float32
    saved.clear()
    o32, s32, grads32 = run(upcast)
    assert torch.bfloat16 not in saved
    torch.testing.assert_close(o, o32, rtol=0, atol=0, msg=lambda m: f"seed={seed}: {m}")
    torch.testing.assert_close(s, s32, rtol=0, atol=0, msg=lambda m: f"seed={seed}: {m}")
    for name, g in grads.items():
        assert g.dtype == mixed[name].dtype, name
        torch.testing.assert_close(g, grads32[name].to(g.dtype), rtol=0, atol=0, msg=lambda m: f"seed={seed} d{name}: {m}")


@needs_triton
def test_no_grad_calls_hold_nothing_for_a_backward(interpret, monkeypatch):
    """Under no_grad the forward writes no checkpoints, even for leaves that require grad (a custom
    Function's forward sees needs_input_grad True there); with gradients on it does."""
    from hierarchos.ops import wkv_triton as WT
    from triton_launches import Launches

    launches = Launches(WT._kernels)
    monkeypatch.setattr(WT, "_kernels", launches)
    inputs, state = make_inputs(fresh_seed(), B=1, T=9, H=1, N=16, dtype=torch.float32)
    leaves = {n: x.clone().requires_grad_(True) for n, x in inputs.items()}
    with torch.no_grad():
        o, _ = wkv7_triton(**leaves, state=state)
    assert [kw["STORE_CKPT"] for *_, kw in launches.calls] == [False] and not o.requires_grad
    o, _ = wkv7_triton(**leaves, state=state)
    assert [kw["STORE_CKPT"] for *_, kw in launches.calls] == [False, True] and o.requires_grad


# ----------------------------------------------------------------------------- dispatch


def test_triton_is_never_auto_on_cpu_and_forcing_it_is_one_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("HIERARCHOS_WKV_IMPL", raising=False)
    inputs, _ = make_inputs(fresh_seed(), T=12, dtype=torch.float32)
    assert resolve_impl("auto", inputs["r"]) == "chunked"
    with pytest.raises(HierarchosError, match="triton"):
        wkv7(**inputs, impl="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if triton is not None:   # a head size the kernel cannot tile is a one-line error too
        odd, _ = make_inputs(fresh_seed(), T=3, N=12, dtype=torch.float32)
        with pytest.raises(HierarchosError, match="power-of-two"):
            wkv7(**odd, impl="triton")


# ----------------------------------------------------------------------------- CUDA (compiled)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or triton is None, reason="needs CUDA and triton")
@pytest.mark.parametrize("T, sums", [(1, "parts"), (100, "parts"), (333, "parts"), (100, "atomic"), (333, "atomic")])
def test_compiled_kernel_on_cuda_matches_reference(monkeypatch, T, sums):
    monkeypatch.delenv("HIERARCHOS_WKV_IMPL", raising=False)
    seed = fresh_seed()
    inputs, state = make_inputs(seed, B=2, T=T, H=4, N=64)
    weight_o, weight_s = weights(seed, inputs, state)
    ref = reference_grads(inputs, state, weight_o, weight_s)
    cuda = {n: x.float().cuda() for n, x in inputs.items()}
    got = triton_grads(cuda, state.cuda(), weight_o.cuda(), weight_s.cuda(), column_sums=sums)
    assert_matches(seed, tuple(x.cpu() if torch.is_tensor(x) else [g.cpu() for g in x] for x in got), ref, 1e-5)
    if T > 2:
        assert resolve_impl("auto", cuda["r"].requires_grad_()) == "triton"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or triton is None, reason="needs CUDA and triton")
def test_compiled_kernel_default_launch_at_the_models_batch_matches_reference(monkeypatch):
    """B16 H12: 192 (batch, head) pairs, so on an H100/H200 the forward runs 8 rows a program and the
    backward 16 (occupancy_rows), with atomic column sums: still the float64 reference's values."""
    monkeypatch.delenv("HIERARCHOS_WKV_IMPL", raising=False)
    seed = fresh_seed()
    inputs, state = make_inputs(seed, B=16, T=40, H=12, N=64)
    weight_o, weight_s = weights(seed, inputs, state)
    ref = reference_grads(inputs, state, weight_o, weight_s)
    cuda = {n: x.float().cuda() for n, x in inputs.items()}
    got = triton_grads(cuda, state.cuda(), weight_o.cuda(), weight_s.cuda())
    assert_matches(seed, tuple(x.cpu() if torch.is_tensor(x) else [g.cpu() for g in x] for x in got), ref, 1e-5)
