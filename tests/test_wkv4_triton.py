"""The fused Triton WKV-4 kernel (hierarchos/ops/wkv4_triton.py) against the float64 scan.

The kernels' backward, written in PyTorch (`wkv4_manual_backward`), is checked against autograd of
`wkv4_reference` in float64 (to rounding, ties of the running maximum included). The kernels run
under Triton's interpreter on CPU tensors (TRITON_INTERPRET=1; skipped when triton does not import)
and compiled on CUDA (marked gpu): outputs, final state and the gradients of all seven inputs
(time_decay, time_first, k, v and the carried aa, bb, pp), with frozen tokens, a carried or empty
state, extreme decays and channel counts that do not fill a block. Fresh seeds, printed on failure.
"""

from __future__ import annotations

import pytest
import torch

from hierarchos.errors import HierarchosError
from hierarchos.ops import wkv4 as W4
from hierarchos.ops import wkv4_triton as W4T
from hierarchos.ops.wkv4 import _prepare, empty_state, wkv4, wkv4_reference
from hierarchos.ops.wkv4_triton import triton, wkv4_manual_backward
from test_wkv4 import fresh_seed, make_inputs
from triton_launches import Launches

NAMES = ("time_decay", "time_first", "k", "v", "aa", "bb", "pp")
needs_triton = pytest.mark.skipif(triton is None, reason="triton does not import")


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def rel_err(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def autograd_reference(td, tf, k, v, state, frozen, weights):
    """o, final state and the gradients of sum(o * g_o) + sum(state * g_s) by float64 autograd."""
    leaves = [x.double().clone().requires_grad_(True) for x in (td, tf, k, v, *state)]
    o, final = wkv4_reference(*leaves[:4], tuple(leaves[4:]), frozen)
    g_o, g_s = weights
    loss = (o * g_o).sum() + sum((s * g).sum() for s, g in zip(final, g_s))
    return o.detach(), [s.detach() for s in final], torch.autograd.grad(loss, leaves)


def weights_for(seed, k):
    gen = torch.Generator().manual_seed(seed + 1)
    B, T, C = k.shape
    return (torch.randn(B, T, C, generator=gen, dtype=torch.float64),
            [torch.randn(B, C, generator=gen, dtype=torch.float64) for _ in range(3)])


@pytest.mark.parametrize("T,frozen_frac", [(1, 0.0), (9, 0.0), (17, 0.3), (23, 0.9)])
def test_manual_backward_is_autograd_of_the_scan(T, frozen_frac):
    seed = fresh_seed()
    td, tf, k, v, state, frozen = make_inputs(seed, T=T, C=6, frozen_frac=frozen_frac)
    weights = weights_for(seed, k)
    _, _, want = autograd_reference(td, tf, k, v, state, frozen if frozen_frac else None, weights)
    w, u, k, v, state, live = _prepare(td, tf, k, v, state, frozen if frozen_frac else None)
    dw, du, dk, dv, d_state = wkv4_manual_backward(w, u, k, v, state, live, *weights)
    got = (dw * w, du, dk, dv, *d_state)  # d/dtime_decay = d/dw * w (w = -exp(time_decay))
    for name, g, ref in zip(NAMES, got, want):
        assert rel_err(g, ref) < 1e-12, f"seed={seed} d{name}: {rel_err(g, ref)}"


def test_manual_backward_splits_the_maximum_at_ties_as_autograd_does():
    """pp == u + k (the output's maximum) and pp + w == k (the update's), exactly, in float64."""
    td = torch.tensor([float(torch.log(torch.tensor(0.25, dtype=torch.float64)))], dtype=torch.float64)  # w = -1/4
    tf = torch.tensor([0.25], dtype=torch.float64)
    k = torch.tensor([[[0.5]]], dtype=torch.float64)
    v = torch.tensor([[[2.0]]], dtype=torch.float64)
    state = (torch.tensor([[1.5]], dtype=torch.float64), torch.tensor([[0.75]], dtype=torch.float64),
             torch.tensor([[0.75]], dtype=torch.float64))
    w, u, kk, vv, st, _ = _prepare(td, tf, k, v, state, None)
    assert float(st[2]) == float(u + kk[0, 0]) and float(st[2] + w) == float(kk[0, 0])  # both ties hold
    weights = ([torch.ones(1, 1, 1, dtype=torch.float64)], [torch.full((1, 1), 0.5, dtype=torch.float64)] * 3)
    weights = (weights[0][0], weights[1])
    _, _, want = autograd_reference(td, tf, k, v, state, None, weights)
    dw, du, dk, dv, d_state = wkv4_manual_backward(w, u, kk, vv, st, None, *weights)
    for name, g, ref in zip(NAMES, (dw * w, du, dk, dv, *d_state), want):
        assert torch.allclose(g, ref, rtol=1e-14, atol=1e-15), f"d{name}: {g} vs {ref}"


def kernel_case(seed, B, T, C, frozen_frac, empty, decay_scale=1.0, key_scale=1.0):
    td, tf, k, v, state, frozen = make_inputs(seed, B=B, T=T, C=C, decay_scale=decay_scale,
                                              key_scale=key_scale, frozen_frac=frozen_frac)
    if empty:
        state = empty_state(B, C, dtype=torch.float64)
    return td, tf, k, v, state, (frozen if frozen_frac else None)


def triton_grads(td, tf, k, v, state, frozen, weights, device="cpu"):
    leaves = [x.float().to(device).clone().requires_grad_(True) for x in (td, tf, k, v, *state)]
    o, final = wkv4(*leaves[:4], tuple(leaves[4:]), None if frozen is None else frozen.to(device), impl="triton")
    g_o, g_s = weights
    loss = (o * g_o.to(o)).sum() + sum((s * g.to(s)).sum() for s, g in zip(final, g_s))
    grads = torch.autograd.grad(loss, leaves)
    return o.detach().cpu(), [s.detach().cpu() for s in final], [g.cpu() for g in grads]


def assert_close_to_reference(seed, got, want, tol, label):
    (o, final, grads), (o_ref, final_ref, grads_ref) = got, want
    errors = {"o": rel_err(o, o_ref)}
    errors.update({f"state.{n}": rel_err(s, r) for n, s, r in zip(("aa", "bb", "pp"), final, final_ref)})
    errors.update({f"d{n}": rel_err(g, r) for n, g, r in zip(NAMES, grads, grads_ref)})
    bad = {n: e for n, e in errors.items() if not e < tol}  # `not <` also catches NaN
    assert not bad, f"seed={seed} {label}: relative errors over {tol}: {bad}"


@needs_triton
@pytest.mark.parametrize("B,T,C,frozen_frac,empty", [(2, 1, 5, 0.0, False), (2, 19, 40, 0.0, True),
                                                     (3, 26, 33, 0.3, False), (1, 12, 64, 0.6, True)])
def test_interpreted_kernel_matches_the_float64_scan(interpret, B, T, C, frozen_frac, empty):
    seed = fresh_seed()
    case = kernel_case(seed, B, T, C, frozen_frac, empty)
    weights = weights_for(seed, case[2])
    want = autograd_reference(*case, weights)
    got = triton_grads(*case, weights)
    assert_close_to_reference(seed, got, want, 1e-5, f"B{B} T{T} C{C}")
    assert got[0].dtype == torch.float32


@needs_triton
def test_interpreted_kernel_with_extreme_decays_and_keys(interpret):
    """Decays from ~0 to ~e^3 per token and keys of scale 5: the running maximum keeps exp in range."""
    seed = fresh_seed()
    case = kernel_case(seed, 2, 21, 7, 0.2, False, decay_scale=3.0, key_scale=5.0)
    weights = weights_for(seed, case[2])
    got, want = triton_grads(*case, weights), autograd_reference(*case, weights)
    assert all(torch.isfinite(g).all() for g in got[2]), f"seed={seed}"
    assert_close_to_reference(seed, got, want, 1e-4, "extreme")


@needs_triton
def test_without_gradients_nothing_is_saved_and_the_values_agree(interpret, monkeypatch):
    seed = fresh_seed()
    td, tf, k, v, state, frozen = kernel_case(seed, 2, 10, 9, 0.3, False)
    with torch.no_grad():
        o, final = wkv4(td.float(), tf.float(), k.float(), v.float(), tuple(s.float() for s in state), frozen,
                        impl="triton")
    o_ref, final_ref = wkv4_reference(td, tf, k, v, state, frozen)
    assert rel_err(o, o_ref) < 1e-5 and all(rel_err(a, b) < 1e-5 for a, b in zip(final, final_ref)), f"seed={seed}"
    empty = wkv4(td.float(), tf.float(), k[:, :0].float(), v[:, :0].float(), None, None, impl="triton")
    assert empty[0].shape == (2, 0, 9) and torch.equal(empty[1][2], torch.full((2, 9), W4.EMPTY_PP))
    # leaves that require grad, under no_grad: the forward still writes nothing for a backward
    launches = Launches(W4T._kernels)
    monkeypatch.setattr(W4T, "_kernels", launches)
    leaves = [x.float().clone().requires_grad_(True) for x in (td, tf, k, v)]
    with torch.no_grad():
        wkv4(*leaves, tuple(s.float() for s in state), frozen, impl="triton")
    wkv4(*leaves, tuple(s.float() for s in state), frozen, impl="triton")
    assert [kw["SAVE"] for *_, kw in launches.calls] == [False, True], f"seed={seed}"


def test_the_triton_impl_says_why_it_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    td, tf, k, v, state, frozen = make_inputs(0, T=4, dtype=torch.float32)
    with pytest.raises(HierarchosError, match=r"^wkv4 impl 'triton' cannot run: .*; use impl='chunked'$"):
        wkv4(td, tf, k, v, state, frozen, impl="triton")


def test_auto_picks_the_kernel_only_for_cuda_sequences(monkeypatch):
    monkeypatch.delenv("HIERARCHOS_WKV_IMPL", raising=False)
    monkeypatch.setattr(W4, "triton_unavailable_reason", lambda device=None: "")
    assert W4.resolve_impl("auto", 8, "cuda") == "triton"
    assert W4.resolve_impl("auto", 8, torch.device("cuda:0")) == "triton"
    assert W4.resolve_impl("auto", 8, "cpu") == "chunked" and W4.resolve_impl("auto", 8) == "chunked"
    assert W4.resolve_impl("auto", 1, "cuda") == "step"  # one token: the step, not a kernel launch
    assert W4.resolve_impl("auto", 8, "cuda", float64=True) == "chunked"  # the kernel computes in float32
    monkeypatch.setattr(W4, "triton_unavailable_reason", lambda device=None: "it needs a CUDA device")
    assert W4.resolve_impl("auto", 8, "cuda") == "chunked"
    monkeypatch.setenv("HIERARCHOS_WKV_IMPL", "reference")
    assert W4.resolve_impl("auto", 8, "cuda") == "reference"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or triton is None, reason="needs CUDA and triton")
@pytest.mark.parametrize("T", [2, 100, 333])
def test_compiled_kernel_on_cuda_matches_reference(monkeypatch, T):
    monkeypatch.delenv("HIERARCHOS_WKV_IMPL", raising=False)
    seed = fresh_seed()
    case = kernel_case(seed, 2, T, 96, 0.3, False)
    weights = weights_for(seed, case[2])
    got = triton_grads(*case, weights, device="cuda")
    assert_close_to_reference(seed, got, autograd_reference(*case, weights), 1e-5, f"cuda T{T}")
    assert W4.resolve_impl("auto", T, "cuda") == "triton"


# ----------------------------------------------------------------------------- launch rules


@needs_triton
def test_the_launches(interpret, monkeypatch):
    """One program per (row, 32 channels), one warp; the live mask as uint8 (k's pointer stands in when
    there is none, unread); the per-token states saved, three (B, T, C) planes, only when a gradient is
    wanted; the backward's per-row partial sums of dw and du (B, C), added over the rows."""
    launches = Launches(W4T._kernels)
    monkeypatch.setattr(W4T, "_kernels", launches)
    seed = fresh_seed()
    td, tf, k, v, state, frozen = kernel_case(seed, 2, 6, 40, 0.3, False)
    weights = weights_for(seed, k)
    got = triton_grads(td, tf, k, v, state, frozen, weights)
    (f, grid_f, args_f, kw_f), (b, grid_b, args_b, kw_b) = launches.calls
    assert (f, b) == ("fwd", "bwd") and grid_f == grid_b == (2, 2)
    assert kw_f == {"HAS_LIVE": True, "SAVE": True, "BLOCK": 32, "num_warps": 1}
    assert kw_b == {"HAS_LIVE": True, "BLOCK": 32, "num_warps": 1}
    assert args_f[4].dtype == torch.uint8 and torch.equal(args_f[4].bool(), ~frozen)
    assert args_f[8].shape == (3, 2, 6, 40) and args_f[9:] == (6, 40)
    assert args_b[4] is args_f[4] and args_b[5] is args_f[8]
    assert args_b[11].shape == args_b[12].shape == (2, 40) and args_b[13:] == (6, 40)
    assert_close_to_reference(seed, got, autograd_reference(td, tf, k, v, state, frozen, weights), 1e-5, "launch")

    launches.calls.clear()  # a gradient without a mask: k's pointer in the mask's place in both kernels
    got = triton_grads(td, tf, k, v, state, None, weights)
    (_, _, args_f, kw_f), (_, _, args_b, kw_b) = launches.calls
    assert kw_f["HAS_LIVE"] is False and kw_b["HAS_LIVE"] is False
    assert args_f[4] is args_f[2] and args_b[4] is args_b[2]
    assert_close_to_reference(seed, got, autograd_reference(td, tf, k, v, state, None, weights), 1e-5, "no mask")

    launches.calls.clear()  # no tokens: no launch
    o, final = wkv4(td.float(), tf.float(), k[:, :0].float(), v[:, :0].float(), None, None, impl="triton")
    assert launches.calls == [] and o.shape == (2, 0, 40)

    launches.calls.clear()  # no gradient, no mask: nothing saved, k's pointer in the mask's place
    with torch.no_grad():
        wkv4(td.float(), tf.float(), k.float(), v.float(), tuple(s.float() for s in state), None, impl="triton")
    ((f, grid_f, args_f, kw_f),) = launches.calls
    assert kw_f == {"HAS_LIVE": False, "SAVE": False, "BLOCK": 32, "num_warps": 1}
    assert args_f[4] is args_f[2] and args_f[8].numel() == 1


@needs_triton
def test_the_compiled_kernels_serve_every_length():
    """Compiled (CUDA): JIT functions of the two kernel bodies that do not specialize on T, so one compile
    serves every sequence length; interpreted (CPU): the same two bodies."""
    from triton.runtime.interpreter import InterpretedFunction

    fwd, bwd = W4T._kernels(False)
    assert isinstance(fwd, triton.JITFunction) and isinstance(bwd, triton.JITFunction)
    assert fwd.fn is W4T._wkv4_fwd_kernel and bwd.fn is W4T._wkv4_bwd_kernel
    assert [p.name for p in fwd.params if p.do_not_specialize] == ["T"]
    assert [p.name for p in bwd.params if p.do_not_specialize] == ["T"]
    fwd, bwd = W4T._kernels(True)
    assert isinstance(fwd, InterpretedFunction) and isinstance(bwd, InterpretedFunction)
    assert fwd.fn is W4T._wkv4_fwd_kernel and bwd.fn is W4T._wkv4_bwd_kernel


@needs_triton
def test_the_kernel_splits_the_update_maximum_at_a_tie(interpret):
    """pp + w == k and u + k == pp exactly in float32 (w = -1/4 given as prepared), at the last token, whose
    state the loss reads (a tie inside the sequence is invisible: only aa e^pp reaches later tokens): the
    kernel's gradients are the float64 manual backward's, which equals autograd at ties (test above)."""
    w = torch.tensor([-0.25])
    u = torch.tensor([0.25])
    k = torch.tensor([[[0.5]]])
    v = torch.tensor([[[2.0]]])
    state = (torch.tensor([[1.5]]), torch.tensor([[0.75]]), torch.tensor([[0.75]]))
    leaves = [x.clone().requires_grad_(True) for x in (w, u, k, v, *state)]
    o, final = W4T.wkv4_triton_prepared(*leaves[:4], tuple(leaves[4:]), None)
    g_o = torch.tensor([[[1.0]]])
    g_s = [torch.tensor([[0.5]]), torch.tensor([[-0.25]]), torch.tensor([[1.0]])]
    loss = (o * g_o).sum() + sum((s * g).sum() for s, g in zip(final, g_s))
    got = torch.autograd.grad(loss, leaves)
    dw, du, dk, dv, d_state = wkv4_manual_backward(*(x.double() for x in (w, u, k, v)),
                                                   tuple(s.double() for s in state), None, g_o.double(),
                                                   [g.double() for g in g_s])
    for name, g, ref in zip(("w", "u", "k", "v", "aa", "bb", "pp"), got, (dw, du, dk, dv, *d_state)):
        assert torch.allclose(g.double(), ref, rtol=1e-6, atol=1e-7), f"d{name}: {g} vs {ref}"
