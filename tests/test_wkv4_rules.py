"""WKV-4 input rules and dispatch (hierarchos/ops/wkv4.py) that test_wkv4.py's parity tests do not
pin (found by mutation testing, TESTING.md): the compute dtype from each input, the one-line shape
errors, the empty state, empty sequences, which form `wkv4` runs, and single tokens by hand."""

import math
import random

import pytest
import torch

from hierarchos.ops import wkv4 as W4
from hierarchos.ops.wkv4 import EMPTY_PP, empty_state, wkv4, wkv4_chunked, wkv4_reference, wkv4_step


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**31)


def inputs(seed, B=2, T=4, C=3, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    return randn(C), randn(C), randn(B, T, C), randn(B, T, C)


FORMS = [("reference", wkv4_reference), ("chunked", wkv4_chunked), ("auto", wkv4)]


@pytest.mark.parametrize("which", ["time_decay", "time_first", "k", "v"])
def test_any_float64_input_makes_the_computation_float64(which):
    seed = fresh_seed()
    td, tf, k, v = inputs(seed)
    args = dict(time_decay=td, time_first=tf, k=k, v=v)
    args[which] = args[which].double()
    for name, form in FORMS:
        o, state = form(**args)
        assert o.dtype == torch.float64 and all(s.dtype == torch.float64 for s in state), name
    o, state = wkv4_step(args["time_decay"], args["time_first"], args["k"][:, 0], args["v"][:, 0])
    assert o.dtype == torch.float64 and all(s.dtype == torch.float64 for s in state)
    # bf16 / float32 inputs compute in float32
    o, state = wkv4_reference(td.bfloat16(), tf, k.bfloat16(), v)
    assert o.dtype == torch.float32 and all(s.dtype == torch.float32 for s in state)


def test_one_token_by_hand():
    """From the empty state the first output is v itself (only the token's own term), and the state
    holds it as (aa, bb, pp) = (v, 1, k); the second token sees the first decayed once."""
    td, tf = torch.tensor([0.0], dtype=torch.float64), torch.tensor([0.3], dtype=torch.float64)
    k = torch.tensor([[[0.5], [-0.2]]], dtype=torch.float64)
    v = torch.tensor([[[2.0], [-1.0]]], dtype=torch.float64)
    w = -1.0  # -exp(0)
    a1, b1 = math.exp(0.5) * 2.0, math.exp(0.5)                   # after token 0
    e = math.exp(0.3 - 0.2)                                        # e^{u + k_1}
    want_o1 = (a1 + e * -1.0) / (b1 + e)
    a2, b2 = math.exp(w) * a1 + math.exp(-0.2) * -1.0, math.exp(w) * b1 + math.exp(-0.2)
    for name, form in FORMS:
        o, (aa, bb, pp) = form(td, tf, k, v)
        assert o[0, 0, 0].item() == pytest.approx(2.0, rel=1e-12), name
        assert o[0, 1, 0].item() == pytest.approx(want_o1, rel=1e-12), name
        got_a, got_b = (aa * torch.exp(pp)).item(), (bb * torch.exp(pp)).item()
        assert (got_a, got_b) == (pytest.approx(a2, rel=1e-12), pytest.approx(b2, rel=1e-12)), name
        assert pp.item() == max(0.5 + w, -0.2), name              # the running maximum of the exponents
    o, (aa, bb, pp) = wkv4_step(td, tf, k[:, 0], v[:, 0])
    assert (o.item(), aa.item(), bb.item(), pp.item()) == (2.0, 2.0, 1.0, 0.5)


def test_empty_state_and_empty_sequences():
    aa, bb, pp = empty_state(2, 3, dtype=torch.float64)
    assert aa.shape == bb.shape == pp.shape == (2, 3) and aa.dtype == bb.dtype == pp.dtype == torch.float64
    assert bool((aa == 0).all() and (bb == 0).all() and (pp == EMPTY_PP).all())
    bb += 1
    assert bool((aa == 0).all()), "aa and bb must not share storage"
    assert EMPTY_PP == -1e38 and math.isfinite(torch.tensor(EMPTY_PP, dtype=torch.float32).item())
    td, tf, k, v = inputs(fresh_seed(), T=0)
    state = (torch.ones(2, 3), torch.full((2, 3), 2.0), torch.full((2, 3), 0.5))
    for name, form in FORMS:
        o, out_state = form(td, tf, k, v, state)
        assert o.shape == (2, 0, 3), name
        assert all(torch.equal(a, b) for a, b in zip(out_state, state)), name


def test_wkv4_runs_the_form_it_names(monkeypatch):
    monkeypatch.delenv(W4.ENV_IMPL, raising=False)
    seed = fresh_seed()
    td, tf, k, v = inputs(seed, T=5, dtype=torch.float64)
    frozen = torch.zeros(2, 5, dtype=torch.bool)
    frozen[0, 1] = frozen[1, 0] = True
    want_o, want_s = wkv4_reference(td, tf, k, v, None, frozen)
    calls = []
    for name in ("reference", "step", "chunked"):
        real = getattr(W4, f"wkv4_{name}")
        monkeypatch.setattr(W4, f"wkv4_{name}", lambda *a, _real=real, _n=name, **kw: calls.append(_n) or _real(*a, **kw))
    for impl in ("auto", "reference", "step", "chunked"):
        calls.clear()
        o, s = wkv4(td, tf, k, v, None, frozen, impl=impl, chunk_size=2)
        assert calls == [{"auto": "chunked", "step": "reference"}.get(impl, impl)], impl  # 'step' over T > 1: the scan
        torch.testing.assert_close((o, s), (want_o, want_s), rtol=1e-10, atol=1e-12, msg=lambda m: f"seed={seed} {impl}: {m}")
    for impl in ("auto", "step"):   # one token: the step, with the token's frozen flag
        calls.clear()
        o, s = wkv4(td, tf, k[:, :1], v[:, :1], None, frozen[:, 1:2], impl=impl)
        assert calls == ["step"], impl
        want_o1, want_s1 = wkv4_reference(td, tf, k[:, :1], v[:, :1], None, frozen[:, 1:2])
        assert o.shape == (2, 1, 3)
        torch.testing.assert_close((o, s), (want_o1, want_s1), rtol=1e-12, atol=0)
        assert s[2][0, 0].item() == EMPTY_PP and s[2][1, 0].item() != EMPTY_PP   # row 0's token was frozen
    seen = []
    monkeypatch.setattr(W4, "wkv4_chunked", lambda *a, chunk_size: seen.append(chunk_size) or (None, None))
    wkv4(td, tf, k, v)
    wkv4(td, tf, k, v, chunk_size=3)
    assert seen == [16, 3]


def test_errors_name_the_shapes():
    td, tf, k, v = inputs(fresh_seed(), B=2, T=4, C=3)
    with pytest.raises(ValueError, match=r"^wkv4: k and v must share one \(B, T, C\) shape, got \(2, 4\), \(2, 4, 3\)$"):
        wkv4_reference(td, tf, k[..., 0], v)
    with pytest.raises(ValueError, match=r"^wkv4: k and v must share one \(B, T, C\) shape, got \(2, 4, 3\), \(2, 3, 3\)$"):
        wkv4_reference(td, tf, k, v[:, :3])
    with pytest.raises(ValueError, match=r"^wkv4: time_decay and time_first must be \(3,\), got \(2,\), \(3,\)$"):
        wkv4_reference(td[:2], tf, k, v)
    with pytest.raises(ValueError, match=r"^wkv4: time_decay and time_first must be \(3,\), got \(3,\), \(1, 3\)$"):
        wkv4_reference(td, tf[None], k, v)
    good = empty_state(2, 3)
    for bad in (good[:2], (good[0], good[1], good[2][:1]), (good[0][:, :2], good[1], good[2])):
        with pytest.raises(ValueError, match=r"^wkv4: state must be three \(B, C\) = \(2, 3\) tensors \(aa, bb, pp\)$"):
            wkv4_reference(td, tf, k, v, bad)
    with pytest.raises(ValueError, match=r"^wkv4: frozen must be \(B, T\) = \(2, 4\), got \(2, 3\)$"):
        wkv4_chunked(td, tf, k, v, None, torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"^wkv4_chunked: chunk_size must be >= 1, got 0$"):
        wkv4_chunked(td, tf, k, v, chunk_size=0)
    with pytest.raises(ValueError, match=r"^wkv4: unknown impl 'fast'; expected one of \('auto', 'reference', 'step', 'chunked', 'triton'\)$"):
        W4.resolve_impl("fast", 4)


def test_every_form_carries_the_given_state():
    seed = fresh_seed()
    td, tf, k, v = inputs(seed, T=3, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    state = (torch.randn(2, 3, generator=gen, dtype=torch.float64), torch.rand(2, 3, generator=gen, dtype=torch.float64) + 0.5,
             torch.randn(2, 3, generator=gen, dtype=torch.float64))
    want = wkv4_reference(td, tf, k, v, state)
    assert not torch.allclose(want[0], wkv4_reference(td, tf, k, v)[0])   # the state matters here
    for impl in ("auto", "reference", "step", "chunked"):
        torch.testing.assert_close(wkv4(td, tf, k, v, state, impl=impl), want, rtol=1e-10, atol=1e-12,
                                   msg=lambda m: f"seed={seed} {impl}: {m}")
    one = wkv4_reference(td, tf, k[:, :1], v[:, :1], state)
    for impl in ("auto", "step"):
        torch.testing.assert_close(wkv4(td, tf, k[:, :1], v[:, :1], state, impl=impl), one, rtol=1e-12, atol=0)


def test_mixed_dtypes_compute_as_all_converted_first():
    """One float64 input: every input (and the state) is converted to float64 before any arithmetic, so
    the result is bit-identical to converting them all by hand; float32 inputs round a float64 state."""
    seed = fresh_seed()
    td, tf, k, v = inputs(seed, T=3)                                   # float32
    want = wkv4_reference(td.double(), tf.double(), k.double(), v.double())
    got = wkv4_reference(td, tf, k.double(), v)
    assert all(torch.equal(a, b) for a, b in zip((got[0], *got[1]), (want[0], *want[1]))), f"seed={seed}"
    state64 = tuple(s.double() for s in wkv4_reference(td, tf, k, v)[1])
    out, state = wkv4_reference(td, tf, k, v, state64)
    assert out.dtype == torch.float32 and all(s.dtype == torch.float32 for s in state)


class _Resolved(Exception):
    """Raised by the resolve_impl spy below: the test needs the arguments, not a run."""


@pytest.mark.parametrize("which", [None, "time_decay", "time_first", "k", "v"])
def test_wkv4_asks_resolve_impl_with_the_inputs_device_and_float64(monkeypatch, which):
    """`wkv4` hands `resolve_impl` its impl, T, the inputs' device and whether any input is float64 (the
    Triton kernel computes in float32, so on CUDA a float64 input keeps the chunked form): on the CPU
    every one of these picks the chunked form, so only the arguments show them."""
    seen = []

    def spy(impl, T, device=None, float64=False):
        seen.append((impl, T, device, float64))
        raise _Resolved

    monkeypatch.setattr(W4, "resolve_impl", spy)
    td, tf, k, v = inputs(fresh_seed(), T=5)
    args = dict(time_decay=td, time_first=tf, k=k, v=v)
    if which is not None:
        args[which] = args[which].double()
    with pytest.raises(_Resolved):
        wkv4(**args, impl="chunked")
    assert len(seen) == 1
    impl, T, device, float64 = seen[0]
    assert (impl, T) == ("chunked", 5) and isinstance(device, torch.device) and device == k.device
    assert float64 is (which is not None)


def test_auto_asks_triton_about_the_inputs_device(monkeypatch):
    monkeypatch.delenv(W4.ENV_IMPL, raising=False)
    asked = []
    monkeypatch.setattr(W4, "triton_unavailable_reason", lambda device=None: asked.append(device) or "")
    assert W4.resolve_impl("auto", 8, "cuda:1") == "triton" and asked == ["cuda:1"]
    asked.clear()
    assert W4.resolve_impl("auto", 8, "cpu") == "chunked" and asked == []  # asked only for a CUDA device
