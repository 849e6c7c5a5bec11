"""WKV-7 dispatch and input rules (hierarchos/ops/wkv.py, wkv_inputs.py) that the parity tests in
test_wkv.py do not pin (found by mutation testing, TESTING.md): which path `resolve_impl` and
`available_impls` pick for every (device, dtype, T, batch x heads) case -- the CUDA cases decided on
a stand-in for r, with fla / triton availability patched --, what `wkv7` hands to the path it
runs, the compute dtype of the state, and the one-line errors."""

import random
from types import SimpleNamespace

import pytest
import torch

from hierarchos.errors import HierarchosError
from hierarchos.ops import wkv as W
from hierarchos.ops.wkv_inputs import prepare


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**31)


def inputs(seed, B=1, T=3, H=2, N=4, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    shape = (B, T, H, N)
    kappa = torch.nn.functional.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1)
    x = dict(r=torch.randn(*shape, generator=gen, dtype=torch.float64),
             log_w=-0.61 * torch.rand(*shape, generator=gen, dtype=torch.float64),
             k=torch.randn(*shape, generator=gen, dtype=torch.float64),
             v=torch.randn(*shape, generator=gen, dtype=torch.float64),
             a=-kappa, b=kappa * torch.rand(*shape, generator=gen, dtype=torch.float64))
    return {n: t.to(dtype) for n, t in x.items()}


def stand_in(B, T, H, N, cuda=True, dtype=torch.float32):
    """What resolve_impl reads of r: its shape, device flag and dtype."""
    return SimpleNamespace(shape=(B, T, H, N), is_cuda=cuda, dtype=dtype,
                           device=torch.device("cuda" if cuda else "cpu"))


@pytest.fixture
def gpu_paths(monkeypatch):
    """fla imports and triton can run (for any power-of-two head size); set per test."""
    monkeypatch.delenv(W.ENV_IMPL, raising=False)

    def set_(fla: bool, triton: bool):
        monkeypatch.setattr(W, "_fla_importable", lambda: fla)
        monkeypatch.setattr(W, "triton_unavailable_reason", lambda device=None: "" if triton else "no triton here")
        monkeypatch.setattr(W, "chunk_forward_checked", lambda device: triton)
    return set_


# ---- resolve_impl / cuda_choice / available_impls --------------------------------------------


def test_short_calls_take_the_step_and_longer_ones_the_chunked_path(monkeypatch):
    monkeypatch.delenv(W.ENV_IMPL, raising=False)
    x64 = inputs(fresh_seed(), T=2)["r"]                               # float64: no C++ step
    assert W.resolve_impl("auto", x64[:, :1]) == "recurrent"
    assert W.resolve_impl("auto", x64) == "recurrent"                  # T == 2 is still a step
    assert W.resolve_impl("auto", torch.zeros(1, 3, 2, 4, dtype=torch.float64)) == "chunked"
    with torch.no_grad():
        x32 = x64.float()
        assert W.resolve_impl("auto", x32) == ("cpp_step" if W._cpp_kernels() is not None else "recurrent")
        long32 = torch.zeros(1, 40, 2, 4)  # a prompt: the C++ loop too, else the chunked form
        assert W.resolve_impl("auto", long32) == ("cpp_step" if W._cpp_kernels() is not None else "chunked")
        # under torch.compile the traced recurrent step, not the C++ one (numpy breaks the graph)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert W.resolve_impl("auto", x32) == "recurrent"
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
        monkeypatch.setattr(W, "_cpp_kernels", lambda: None)
        assert W.resolve_impl("auto", x32) == "recurrent"


def test_cuda_calls_follow_cuda_choice_on_batch_times_heads(gpu_paths):
    gpu_paths(fla=True, triton=True)
    assert W.resolve_impl("auto", stand_in(5, 64, 12, 64)) == "fla"       # 60 pairs < 66
    assert W.resolve_impl("auto", stand_in(6, 64, 12, 64)) == "triton"    # 72 pairs
    assert W.resolve_impl("auto", stand_in(5, 64, 16, 64)) == "triton"    # 80 pairs
    assert W.resolve_impl("auto", stand_in(1, 64, 1, 64, dtype=torch.float64)) == "chunked"
    assert W.resolve_impl("auto", stand_in(5, 64, 16, 48)) == "fla"       # N = 48: triton cannot run it
    assert W.resolve_impl("auto", stand_in(2, 64, 2, 8)) == "triton"      # N = 8: fla's tl.dot needs >= 16
    assert W.resolve_impl("auto", stand_in(2, 64, 2, 16)) == "fla"
    assert W.resolve_impl("auto", stand_in(2, 64, 2, 12)) == "chunked"    # neither kernel runs N = 12
    assert W.resolve_impl("auto", stand_in(5, 64, 16, 64, cuda=False)) == "chunked"
    gpu_paths(fla=False, triton=True)
    assert W.resolve_impl("auto", stand_in(5, 64, 12, 64)) == "triton"
    assert W.resolve_impl("auto", stand_in(5, 64, 16, 48)) == "chunked"
    gpu_paths(fla=True, triton=False)
    assert W.resolve_impl("auto", stand_in(6, 64, 12, 64)) == "fla"
    assert W.cuda_choice(6, 11, triton_ok=True, fla_ok=True) == "triton"     # exactly FLA_BELOW_PAIRS
    assert W.cuda_choice(5, 13, triton_ok=True, fla_ok=True) == "fla"        # 65


def test_calls_without_gradients_take_the_chunk_parallel_forward(gpu_paths, monkeypatch):
    gpu_paths(fla=True, triton=True)
    T = W.CHUNK_FORWARD_MIN_T
    for B, H in ((1, 12), (5, 13)):                                      # 12 and 65 pairs
        assert W.resolve_impl("auto", stand_in(B, T, H, 64), needs_grad=False) == "triton_chunk"
        assert W.resolve_impl("auto", stand_in(B, T, H, 64)) == "fla"       # gradients: as before
    assert W.CHUNK_FORWARD_BELOW_PAIRS == 66
    for B, H in ((6, 11), (16, 12)):                                     # 66 and 192 pairs: the sequential kernel
        assert W.resolve_impl("auto", stand_in(B, T, H, 64), needs_grad=False) == "triton"
    assert W.resolve_impl("auto", stand_in(1, T - 1, 12, 64), needs_grad=False) == "fla"   # too short
    assert W.resolve_impl("auto", stand_in(1, T, 2, 8), needs_grad=False) == "triton"      # N < 16: no tl.dot
    assert W.resolve_impl("auto", stand_in(1, T, 2, 16), needs_grad=False) == "triton_chunk"
    assert W.resolve_impl("auto", stand_in(1, T, 12, 64, dtype=torch.float64), needs_grad=False) == "chunked"
    assert W.resolve_impl("auto", stand_in(1, T, 12, 64, cuda=False), needs_grad=False) == "chunked"
    gpu_paths(fla=True, triton=False)
    assert W.resolve_impl("auto", stand_in(1, T, 12, 64), needs_grad=False) == "fla"
    gpu_paths(fla=False, triton=True)
    monkeypatch.setattr(W, "chunk_forward_checked", lambda device: False)   # it failed its check here
    assert W.resolve_impl("auto", stand_in(1, T, 12, 64), needs_grad=False) == "triton"


def test_wkv7_tells_resolve_impl_whether_gradients_are_needed(monkeypatch):
    seen = []
    real = W.resolve_impl
    monkeypatch.setattr(W, "resolve_impl", lambda impl, r, needs_grad=True: seen.append(needs_grad) or real(impl, r))
    x = inputs(fresh_seed(), T=5)
    W.wkv7(**x)                                                       # no input requires grad
    leaf = {**x, "k": x["k"].clone().requires_grad_(True)}
    W.wkv7(**leaf)
    with torch.no_grad():
        W.wkv7(**leaf)
    W.wkv7(**x, state=torch.zeros(1, 2, 4, 4, dtype=torch.float64, requires_grad=True))
    assert seen == [False, True, False, True]


def test_available_impls_per_device(gpu_paths, monkeypatch):
    base = ("reference", "recurrent", "chunked") + (("cpp_step",) if W._cpp_kernels() is not None else ())
    gpu_paths(fla=True, triton=True)
    assert W.available_impls("cuda") == base + ("fla", "triton")
    assert W.available_impls(torch.device("cuda", 0)) == base + ("fla", "triton")
    assert W.available_impls("cpu") == base
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert W.available_impls() == base
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert W.available_impls() == base + ("fla", "triton")
    gpu_paths(fla=False, triton=True)
    assert W.available_impls("cuda") == base + ("triton",)
    assert W.available_impls("cpu") == base
    gpu_paths(fla=True, triton=False)
    assert W.available_impls("cuda") == base + ("fla",)
    monkeypatch.setattr(W, "_cpp_kernels", lambda: None)
    assert W.available_impls("cpu") == ("reference", "recurrent", "chunked")


# ---- wkv7 runs what resolve_impl names, with its chunk size -----------------------------------


def test_wkv7_default_is_auto_and_passes_the_chunk_size(monkeypatch):
    monkeypatch.delenv(W.ENV_IMPL, raising=False)
    seed = fresh_seed()
    x = inputs(seed, T=5)
    o_ref, s_ref = W.wkv7_reference(**x)
    o, s = W.wkv7(**x)                                                # impl defaults to 'auto'
    torch.testing.assert_close((o, s), (o_ref, s_ref), rtol=1e-12, atol=1e-12, msg=lambda m: f"seed={seed}: {m}")
    seen = []
    real = W.wkv7_chunked
    monkeypatch.setattr(W, "wkv7_chunked", lambda *a, chunk_size: seen.append(chunk_size) or real(*a, chunk_size=chunk_size))
    W.wkv7(**x)
    W.wkv7(**x, chunk_size=4)
    assert seen == [32, 4]
    monkeypatch.setattr(W, "wkv7_chunked", real)
    with pytest.raises(ValueError, match="chunk_size must be in"):
        W.wkv7(**x, impl="chunked", chunk_size=65)


def test_wkv7_runs_the_cpp_step_and_refuses_triton_on_the_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    seed = fresh_seed()
    x = inputs(seed, T=2, dtype=torch.float32)
    if W._cpp_kernels() is not None:
        with torch.no_grad():
            o, s = W.wkv7(**x, impl="cpp_step")
        o_ref, s_ref = W.wkv7_reference(**x)
        torch.testing.assert_close((o, s), (o_ref, s_ref), rtol=1e-5, atol=1e-5, msg=lambda m: f"seed={seed}: {m}")
    with pytest.raises(HierarchosError, match=r"^wkv7 impl 'triton' cannot run: "):
        W.wkv7(**x, impl="triton")


# ---- errors ---------------------------------------------------------------------------------


def test_errors_name_the_cause(monkeypatch):
    x = inputs(fresh_seed())
    with pytest.raises(ValueError, match=r"^wkv7: unknown impl 'magic'; expected one of \('auto', 'reference', "):
        W.resolve_impl("magic", x["r"])
    monkeypatch.setenv(W.ENV_IMPL, "fast-please")
    with pytest.raises(HierarchosError, match=r"^HIERARCHOS_WKV_IMPL='fast-please' is not a wkv7 impl; use one of "
                                              r"auto, reference, recurrent, cpp_step, chunked, fla, triton, triton_chunk, "
                                              r"triton_chunk_grad$"):
        W.resolve_impl("auto", x["r"])
    monkeypatch.delenv(W.ENV_IMPL)
    if not W._fla_importable():
        with pytest.raises(HierarchosError, match=r"^wkv7 impl 'fla' needs the fla-core package \(pip install "
                                                  r"fla-core\) and a working triton; use impl='chunked' instead$"):
            W.wkv7_fla(**x)
    monkeypatch.setattr(W, "_fla_importable", lambda: True)
    with pytest.raises(HierarchosError, match=r"^wkv7 impl 'fla' runs on CUDA tensors only; use impl='chunked' on CPU$"):
        W.wkv7_fla(**x)
    monkeypatch.setattr(W, "_cpp_kernels", lambda: object())           # "built", so the dtype check decides
    with pytest.raises(HierarchosError, match=r"^wkv7 impl 'cpp_step' runs float32 CPU tensors only$"):
        W.wkv7_cpp_step(**x)                                              # float64
    monkeypatch.setattr(W, "_cpp_kernels", lambda: None)
    with pytest.raises(HierarchosError, match=r"^wkv7 impl 'cpp_step' needs the C\+\+ kernel; build it with `bash setup.sh`$"):
        W.wkv7_cpp_step(**x)


def test_prepare_names_the_shapes_and_upcasts_the_state():
    x = inputs(fresh_seed(), B=2, T=3, H=2, N=4, dtype=torch.float32)
    bad = dict(x, k=x["k"][:, :2])
    with pytest.raises(ValueError, match=r"^wkv7: r, log_w, k, v, a, b must share one \(B, T, H, N\) shape, got "
                                         r"\[\(2, 3, 2, 4\), \(2, 3, 2, 4\), \(2, 2, 2, 4\), "):
        prepare(*bad.values(), None)
    with pytest.raises(ValueError, match=r"^wkv7: state must be \(B, H, N, N\) = \(2, 2, 4, 4\), got \(2, 2, 4, 3\)$"):
        prepare(*x.values(), torch.zeros(2, 2, 4, 3))
    for state_dtype in (torch.float64, torch.bfloat16):
        *_, state = prepare(*x.values(), torch.ones(2, 2, 4, 4, dtype=state_dtype))
        assert state.dtype == torch.float32 and bool((state == 1).all())
    *_, state = prepare(*{n: t.double() for n, t in x.items()}.values(), torch.ones(2, 2, 4, 4))
    assert state.dtype == torch.float64


def test_empty_sequences_and_chunk_size_one():
    seed = fresh_seed()
    x = inputs(seed, B=2, T=0, H=2, N=4)
    state = torch.randn(2, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    for run in (W.wkv7_reference, W.wkv7_recurrent_step, W.wkv7_chunked):
        o, s = run(**x, state=state)
        assert o.shape == (2, 0, 2, 4) and o.dtype == torch.float64 and torch.equal(s, state), run.__name__
    x = inputs(seed, T=5)
    want = W.wkv7_reference(**x, state=state[:1])
    torch.testing.assert_close(W.wkv7_chunked(**x, state=state[:1], chunk_size=1), want, rtol=1e-10, atol=1e-12,
                               msg=lambda m: f"seed={seed}: {m}")
    for bad in (0, 65):
        with pytest.raises(ValueError, match=rf"^wkv7_chunked: chunk_size must be in \[1, 64\], got {bad}$"):
            W.wkv7_chunked(**x, chunk_size=bad)


def test_the_optional_backends_are_found_by_import(monkeypatch):
    """`_fla_importable`: whether fla's DPLR kernel imports (False when fla is missing or its import
    fails); `_cpp_kernels`: the built extension if it imports and has the step (`wkv7_steps`), else None
    (not built, or an old build without it). Stand-in modules in sys.modules, lru_cache bypassed."""
    import sys
    import types

    fla = {name: types.ModuleType(name) for name in ("fla", "fla.ops", "fla.ops.generalized_delta_rule")}
    fla["fla.ops.generalized_delta_rule"].chunk_dplr_delta_rule = lambda *a, **k: None
    for name, module in fla.items():
        monkeypatch.setitem(sys.modules, name, module)
    assert W._fla_importable.__wrapped__() is True
    monkeypatch.setitem(sys.modules, "fla.ops.generalized_delta_rule", types.ModuleType("empty"))
    assert W._fla_importable.__wrapped__() is False  # an fla without the kernel
    monkeypatch.setitem(sys.modules, "fla", None)  # not installed: the import raises ImportError
    assert W._fla_importable.__wrapped__() is False

    built = types.ModuleType("hierarchos.hierarchos_kernels")
    built.wkv7_steps = lambda *a: None
    monkeypatch.setitem(sys.modules, "hierarchos.hierarchos_kernels", built)
    assert W._cpp_kernels.__wrapped__() is built
    monkeypatch.setitem(sys.modules, "hierarchos.hierarchos_kernels", types.ModuleType("old_build"))
    assert W._cpp_kernels.__wrapped__() is None
    monkeypatch.setitem(sys.modules, "hierarchos.hierarchos_kernels", None)  # not built
    assert W._cpp_kernels.__wrapped__() is None
