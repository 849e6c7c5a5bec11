"""The chunk-parallel WKV-7 forward (hierarchos/ops/wkv_chunk_triton.py) against the float64 scan and
the sequential kernel: under Triton's interpreter on CPU tensors (skipped when triton does not
import), and compiled on CUDA (marked gpu). Inputs from a fresh seed each run, printed on failure."""

import random

import pytest
import torch

from hierarchos.errors import HierarchosError
from hierarchos.ops.wkv import wkv7_reference
from hierarchos.ops.wkv_chunk_triton import triton, wkv7_chunk_forward
from hierarchos.ops.wkv_triton import wkv7_triton
from test_wkv import freeze, fresh_seed, make_inputs, rel_err

needs_triton = pytest.mark.skipif(triton is None, reason="triton does not import")
TOL32 = 1e-5


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def f32(inputs):
    return {n: x.float() for n, x in inputs.items()}


def check(seed, got, want, label=""):
    errors = {"o": rel_err(got[0], want[0]), "state": rel_err(got[1], want[1])}
    bad = {n: e for n, e in errors.items() if not e < TOL32}
    assert not bad, f"seed={seed} {label}: {bad}"


@needs_triton
@pytest.mark.parametrize("T, N, rows, chunk", [
    (1, 16, 16, 16), (16, 16, 16, 16), (17, 16, 16, 16), (45, 32, 16, 16), (45, 32, 32, 32), (100, 64, 64, 16),
])
def test_matches_the_float64_scan(interpret, T, N, rows, chunk):
    seed = fresh_seed()
    inputs, state = make_inputs(seed, B=2, T=T, H=2, N=N)
    got = wkv7_chunk_forward(**f32(inputs), state=state.float(), rows=rows, chunk=chunk)
    assert got[0].dtype == got[1].dtype == torch.float32 and got[0].shape == inputs["r"].shape
    check(seed, got, wkv7_reference(**inputs, state=state), f"T={T} N={N} rows={rows} chunk={chunk}")


@needs_triton
def test_at_the_models_decay_bound_over_a_long_prompt(interpret):
    """log_w at the model's bound in every channel (the largest exp(-cl) a chunk forms), 600 tokens."""
    seed = fresh_seed()
    inputs, state = make_inputs(seed, B=1, T=600, H=1, N=64)
    inputs["log_w"] = torch.full_like(inputs["log_w"], -0.61)
    for chunk in (16, 64):
        got = wkv7_chunk_forward(**f32(inputs), state=state.float(), chunk=chunk)
        check(seed, got, wkv7_reference(**inputs, state=state), f"chunk={chunk}")


@needs_triton
def test_frozen_tokens_and_state_carry(interpret):
    """Frozen tokens change nothing (all frozen: the state comes back bit for bit), and two calls with
    the state carried between them at a split inside a chunk equal one call."""
    seed = fresh_seed()
    rng = random.Random(seed)
    inputs, state = make_inputs(seed, B=1, T=40, H=2, N=16, dtype=torch.float32)
    _, s = wkv7_chunk_forward(**freeze(inputs, torch.ones(1, 40, dtype=torch.bool)), state=state)
    assert torch.equal(s, state), f"seed={seed}"
    keep = sorted(rng.sample(range(40), 23))
    mask = torch.ones(1, 40, dtype=torch.bool)
    mask[0, keep] = False
    o, s = wkv7_chunk_forward(**freeze(inputs, mask), state=state)
    o_plain, s_plain = wkv7_reference(**{n: x[:, keep] for n, x in inputs.items()}, state=state)
    check(seed, (o[:, keep], s), (o_plain, s_plain), "frozen")
    at = rng.randrange(1, 40)
    o1, mid = wkv7_chunk_forward(**{n: x[:, :at] for n, x in inputs.items()}, state=state)
    o2, end = wkv7_chunk_forward(**{n: x[:, at:] for n, x in inputs.items()}, state=mid)
    check(seed, (torch.cat([o1, o2], 1), end), wkv7_reference(**inputs, state=state), f"carried at {at}")


@needs_triton
def test_bf16_rkv_equal_their_float32_copies_float64_is_float32_and_state_none(interpret):
    seed = fresh_seed()
    inputs, state = make_inputs(seed, B=1, T=21, H=2, N=16, dtype=torch.float32)
    mixed = {n: x.bfloat16() if n in ("r", "k", "v") else x for n, x in inputs.items()}
    o, s = wkv7_chunk_forward(**mixed, state=state)
    o32, s32 = wkv7_chunk_forward(**f32(mixed), state=state)
    assert torch.equal(o, o32) and torch.equal(s, s32), f"seed={seed}"
    as64 = wkv7_chunk_forward(**{n: x.double() for n, x in inputs.items()}, state=state.double())
    as32 = wkv7_chunk_forward(**inputs, state=state)         # float64 inputs are computed in float32
    assert all(torch.equal(x, y) and x.dtype == torch.float32 for x, y in zip(as64, as32)), f"seed={seed}"
    o, s = wkv7_chunk_forward(**inputs)                      # state None: zeros
    check(seed, (o, s), wkv7_reference(**inputs), "state None")
    o, s = wkv7_chunk_forward(**{n: x[:, :0] for n, x in inputs.items()}, state=state)
    assert o.shape == (1, 0, 2, 16) and torch.equal(s, state)


@needs_triton
def test_bad_calls_are_one_line_errors(interpret):
    inputs, state = make_inputs(0, B=1, T=5, H=1, N=16, dtype=torch.float32)
    leaf = {**inputs, "r": inputs["r"].clone().requires_grad_(True)}
    with pytest.raises(HierarchosError, match="forward only"):
        wkv7_chunk_forward(**leaf, state=state)
    with torch.no_grad():  # under no_grad a leaf is fine
        wkv7_chunk_forward(**leaf, state=state)
    for kw, what in ((dict(chunk=8), "chunk=8"), (dict(chunk=24), "chunk=24"), (dict(rows=8), "rows"),
                     (dict(precision="fp8"), "precision")):
        with pytest.raises(HierarchosError, match=what):
            wkv7_chunk_forward(**inputs, state=state, **kw)
    small, small_state = make_inputs(0, B=1, T=5, H=1, N=8, dtype=torch.float32)
    with pytest.raises(HierarchosError, match="head size"):
        wkv7_chunk_forward(**small, state=small_state)


@needs_triton
def test_the_device_check_passes_once_and_a_broken_kernel_is_reported_and_left_alone(interpret, monkeypatch):
    from hierarchos.ops import wkv_chunk_triton as chunk

    monkeypatch.setattr(chunk, "_CHECKED", {})
    assert chunk.checked("cpu") and chunk._CHECKED == {torch.device("cpu"): True}
    monkeypatch.setattr(chunk, "_CHECKED", {})
    monkeypatch.setattr(chunk, "wkv7_chunk_forward", lambda **kw: (torch.zeros_like(kw["r"]), kw["state"]))
    with pytest.warns(RuntimeWarning, match="failed its check on cpu .*relative errors"):
        assert not chunk.checked("cpu")
    assert not chunk.checked("cpu")                          # answered from the cache, no second warning

    def broken(**kw):
        raise RuntimeError("PTX too new for this driver")
    monkeypatch.setattr(chunk, "_CHECKED", {})
    monkeypatch.setattr(chunk, "wkv7_chunk_forward", broken)
    with pytest.warns(RuntimeWarning, match="RuntimeError: PTX too new"):
        assert not chunk.checked(torch.device("cpu"))


def test_without_triton_or_cuda_it_says_so(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inputs, state = make_inputs(0, B=1, T=5, H=1, N=16, dtype=torch.float32)
    with pytest.raises(HierarchosError, match="impl 'triton_chunk' cannot run"):
        wkv7_chunk_forward(**inputs, state=state)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("B, T, rows, chunk", [(1, 1000, 16, 16), (3, 77, 64, 32), (2, 333, 32, 16)])
def test_compiled_on_cuda_matches_the_sequential_kernel_and_the_scan(B, T, rows, chunk):
    seed = fresh_seed()
    inputs, state = make_inputs(seed, B=B, T=T, H=4, N=64)
    cuda = {n: x.float().cuda() for n, x in inputs.items()}
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # the kernel's own products stay float32 regardless
    try:
        got = wkv7_chunk_forward(**cuda, state=state.float().cuda(), rows=rows, chunk=chunk)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    check(seed, [x.cpu() for x in got], wkv7_reference(**inputs, state=state), "vs scan")
    with torch.no_grad():
        seq = wkv7_triton(**cuda, state=state.float().cuda())
    check(seed, got, seq, "vs sequential kernel")
