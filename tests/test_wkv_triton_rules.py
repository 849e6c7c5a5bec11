"""The fused Triton WKV-7 kernels (hierarchos/ops/wkv_triton.py) on shapes small enough for Triton's
interpreter to run every case in well under a second, so that a mutation run can afford them.

What they hold, against autograd of the float64 scan `wkv7_reference` (the recurrence as written in
DESIGN.md, pinned by tests/test_wkv_rules.py): the output, the final state and all seven gradients, for
several row blocks per state (their partial column sums added up), one block, a tail chunk and an exact
multiple of the checkpoint spacing, both load orders (prefetch on and off), batch and heads > 1 (each
program finds its own (b, h)), a gradient of only the state or only one input (the checkpoints are
still stored), an output gradient that is not contiguous; frozen tokens leave the state bit for bit;
state carry across calls; T = 0; the launch rule, the launch arguments each kernel receives (a spy on
`_kernels`), and every one-line error. The long parity sweep is tests/test_wkv_triton.py.
"""

from __future__ import annotations

import pytest
import torch

from hierarchos.errors import HierarchosError
from hierarchos.ops import wkv_triton
from hierarchos.ops.wkv import wkv7_reference
from hierarchos.ops.wkv_triton import _launch_config, triton, triton_unavailable_reason, wkv7_triton
from test_wkv import NAMES, fresh_seed, make_inputs
from triton_launches import Launches

pytestmark = pytest.mark.skipif(triton is None, reason="triton does not import")
TOL = 2e-5  # float32 sequential steps against float64: ~1e-7 seen


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def reference(inputs, state, weight_o, weight_s, wrt=None):
    """float64 o, final state and the gradients of sum(o * weight_o) + sum(s * weight_s)."""
    leaves = {n: x.double().clone().requires_grad_(wrt is None or n in wrt) for n, x in inputs.items()}
    s0 = state.double().clone().requires_grad_(wrt is None or "state" in wrt)
    o, s = wkv7_reference(**leaves, state=s0)
    wanted = [x for x in (*leaves.values(), s0) if x.requires_grad]
    return o.detach(), s.detach(), torch.autograd.grad((o * weight_o).sum() + (s * weight_s).sum(), wanted)


def kernel(inputs, state, weight_o, weight_s, wrt=None, **kw):
    leaves = {n: x.float().clone().requires_grad_(wrt is None or n in wrt) for n, x in inputs.items()}
    s0 = state.float().clone().requires_grad_(wrt is None or "state" in wrt)
    o, s = wkv7_triton(**leaves, state=s0, **kw)
    wanted = [x for x in (*leaves.values(), s0) if x.requires_grad]
    loss = (o * weight_o.float()).sum() + (s * weight_s.float()).sum()
    return o.detach(), s.detach(), torch.autograd.grad(loss, wanted)


def close(got, want, what, seed):
    """Relative error (norm) below TOL, and the same shape."""
    assert got.shape == want.shape, f"seed={seed} {what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()
    assert err < TOL, f"seed={seed} {what}: relative error {err:.2e}"


def weights(seed, inputs, state):
    gen = torch.Generator().manual_seed(seed + 1)
    return (torch.randn(inputs["r"].shape, generator=gen, dtype=torch.float64),
            torch.randn(state.shape, generator=gen, dtype=torch.float64))


@pytest.mark.parametrize("B, T, H, N, rows, chunk, prefetch, sums, scratch", [
    (2, 5, 2, 8, 4, 2, True, "parts", "none"),    # 2 row blocks, 3 chunks with a 1-token tail
    (2, 5, 2, 8, 4, 2, False, "parts", "none"),
    (1, 4, 2, 8, 2, 2, True, "parts", "none"),    # 4 row blocks, an exact multiple of the chunk
    (2, 5, 2, 8, 4, 2, True, "atomic", "none"),   # the row blocks' column sums added by atomics
    (1, 4, 2, 8, 2, 2, False, "atomic", "none"),
    (2, 5, 1, 4, None, 4, False, "atomic", "none"),  # default rows (= N, one block: nothing to add), a 1-token tail
    (1, 1, 1, 4, None, None, True, "parts", "none"),  # one token, the default chunk
    (2, 5, 2, 8, 4, 2, True, "atomic", "keep"),   # the scratch's cache hints change no value
    (2, 5, 2, 8, 4, 2, False, "parts", "keep"),
])
def test_forward_and_every_gradient_match_the_float64_scan(interpret, B, T, H, N, rows, chunk, prefetch, sums,
                                                           scratch):
    seed = fresh_seed()
    inputs, state = make_inputs(seed, B=B, T=T, H=H, N=N)
    weight_o, weight_s = weights(seed, inputs, state)
    kw = {"rows": rows, "prefetch": prefetch, "column_sums": sums, "scratch": scratch,
          **({} if chunk is None else {"chunk": chunk})}
    o, s, grads = kernel(inputs, state, weight_o, weight_s, **kw)
    o_ref, s_ref, grads_ref = reference(inputs, state, weight_o, weight_s)
    assert o.dtype == s.dtype == torch.float32
    close(o, o_ref, "o", seed)
    close(s, s_ref, "state", seed)
    for name, g, g_ref in zip((*NAMES, "state"), grads, grads_ref):
        assert g.dtype == torch.float32, name
        close(g, g_ref, f"d{name}", seed)


@pytest.mark.parametrize("wrt", [("state",), ("v",), ("r", "log_w")])
def test_a_gradient_of_only_some_inputs_still_stores_the_checkpoints(interpret, wrt):
    seed = fresh_seed()
    inputs, state = make_inputs(seed, B=1, T=5, H=1, N=4)
    weight_o, weight_s = weights(seed, inputs, state)
    _, _, grads = kernel(inputs, state, weight_o, weight_s, wrt=wrt, chunk=2)
    _, _, grads_ref = reference(inputs, state, weight_o, weight_s, wrt=wrt)
    assert len(grads) == len(wrt)
    for name, g, g_ref in zip(wrt, grads, grads_ref):
        close(g, g_ref, f"d{name}", seed)


def test_an_output_gradient_that_is_not_contiguous_and_one_output_unused(interpret):
    """sum(o)'s gradient is a stride-0 expansion: the kernel reads it as a dense (B, T, H, N) array only
    after it is made contiguous. The final state unused: its gradient is zero."""
    seed = fresh_seed()
    inputs, state = make_inputs(seed, B=1, T=4, H=2, N=4)
    leaves = {n: x.float().clone().requires_grad_(True) for n, x in inputs.items()}
    o, _ = wkv7_triton(**leaves, state=state.float(), chunk=2)
    got = torch.autograd.grad(3.0 * o.sum(), list(leaves.values()))
    ref_leaves = {n: x.clone().requires_grad_(True) for n, x in inputs.items()}
    o_ref, _ = wkv7_reference(**ref_leaves, state=state)
    want = torch.autograd.grad(3.0 * o_ref.sum(), list(ref_leaves.values()))
    for name, g, g_ref in zip(NAMES, got, want):
        close(g, g_ref, f"d{name}", seed)
    leaves = {n: x.float().clone().requires_grad_(True) for n, x in inputs.items()}
    _, s = wkv7_triton(**leaves, state=state.float(), chunk=2)
    weight_s = torch.randn(s.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    got = torch.autograd.grad((s * weight_s.float()).sum(), list(leaves.values()))
    ref_leaves = {n: x.clone().requires_grad_(True) for n, x in inputs.items()}
    _, s_ref = wkv7_reference(**ref_leaves, state=state)
    want = torch.autograd.grad((s_ref * weight_s).sum(), list(ref_leaves.values()), allow_unused=True)
    assert want[0] is None and torch.equal(got[0], torch.zeros_like(got[0]))  # the state never reads r
    for name, g, g_ref in list(zip(NAMES, got, want))[1:]:
        close(g, g_ref, f"d{name}", seed)


def test_frozen_tokens_leave_the_state_bit_for_bit_and_carry_across_calls(interpret):
    """Frozen (log_w = k = b = 0) tokens: S_t = S_{t-1} exactly; o_t = S r_t. Two calls chained through
    the returned state equal one call."""
    seed = fresh_seed()
    inputs, state = make_inputs(seed, B=2, T=6, H=1, N=4, dtype=torch.float32)
    frozen = dict(inputs)
    for name in ("log_w", "k", "b"):
        frozen[name] = torch.zeros_like(inputs[name])
    o, s = wkv7_triton(**frozen, state=state, chunk=4)
    assert torch.equal(s, state), f"seed={seed}"
    want_o = torch.einsum("bhij,bthj->bthi", state.double(), inputs["r"].double())
    close(o, want_o, "o of frozen tokens", seed)
    o_all, s_all = wkv7_triton(**inputs, state=state, chunk=4)
    o_1, s_mid = wkv7_triton(**{n: x[:, :2] for n, x in inputs.items()}, state=state, chunk=4)
    o_2, s_end = wkv7_triton(**{n: x[:, 2:] for n, x in inputs.items()}, state=s_mid, chunk=4)
    close(torch.cat([o_1, o_2], dim=1), o_all, "o split", seed)
    close(s_end, s_all, "state split", seed)


def test_empty_sequence_no_state_and_float64_inputs(interpret):
    seed = fresh_seed()
    inputs, state = make_inputs(seed, B=2, T=3, H=1, N=4)  # float64
    o, s = wkv7_triton(**{n: x[:, :0] for n, x in inputs.items()}, state=state)
    assert o.shape == (2, 0, 1, 4) and o.dtype == torch.float32
    assert s.dtype == torch.float32 and torch.equal(s, state.float())
    o, s = wkv7_triton(**inputs)  # no state: zeros
    o_ref, s_ref = wkv7_reference(**inputs)
    assert o.dtype == s.dtype == torch.float32
    close(o, o_ref, "o", seed)
    close(s, s_ref, "state", seed)


def test_launch_rule():
    """Default: min(N, 8) rows per program; warps = rows * N / 1024 clamped to 1..8."""
    assert _launch_config(64, None, None) == (8, 1)
    assert _launch_config(4, None, None) == (4, 1)
    assert _launch_config(64, 64, None) == (64, 4)
    assert _launch_config(128, 16, None) == (16, 2)
    assert _launch_config(256, 256, None) == (256, 8)
    assert _launch_config(128, 8, None) == (8, 1)
    assert _launch_config(64, 16, 2) == (16, 2)
    assert _launch_config(1, None, None) == (1, 1)
    for head_size, rows in ((64, 64), (256, 256), (128, 16), (64, None)):  # Triton takes an int number of warps
        assert [type(x) for x in _launch_config(head_size, rows, None)] == [int, int]
    for head_size, rows in ((12, None), (64, 3), (64, 128), (16, 32), (8, -2), (0, None)):
        with pytest.raises(HierarchosError) as err:
            _launch_config(head_size, rows, None)
        shown = rows or min(head_size, 8)
        assert str(err.value) == (f"wkv7 impl 'triton' needs a power-of-two head size (got {head_size}) "
                                  f"divided by rows={shown}; use impl='chunked'")


def test_occupancy_rows_takes_the_largest_candidate_that_keeps_every_sm_busy():
    """pairs x N / rows programs must reach PROGRAMS_PER_SM per SM (4 x 132 = 528 on an H100)."""
    fwd, bwd = wkv_triton.FORWARD_ROWS, wkv_triton.BACKWARD_ROWS
    assert wkv_triton.PROGRAMS_PER_SM == 4
    assert wkv_triton.occupancy_rows(64, 16 * 12, 132, bwd) == 16    # 768 programs
    assert wkv_triton.occupancy_rows(64, 16 * 12, 132, fwd) == 8     # 1,536
    assert wkv_triton.occupancy_rows(64, 8 * 12, 132, bwd) == 8      # 16 rows: 384 < 528
    assert wkv_triton.occupancy_rows(64, 132, 132, bwd) == 16        # exactly 528
    assert wkv_triton.occupancy_rows(64, 131, 132, bwd) == 8
    assert wkv_triton.occupancy_rows(64, 2 * 12, 132, bwd) == 4      # none reaches it: the smallest
    assert wkv_triton.occupancy_rows(64, 1, 132, fwd) == 4
    assert wkv_triton.occupancy_rows(8, 1000, 1, bwd) == 8           # 16 rows do not divide N = 8
    assert wkv_triton.occupancy_rows(2, 1000, 1, bwd) == 2           # no candidate fits: min(N, 8)
    assert wkv_triton.occupancy_rows(12, 1000, 1, bwd) == 4          # 8 <= 12 but does not divide it
    assert wkv_triton.occupancy_rows(9, 1, 1, bwd) == 8              # none divides 9: min(N, 8)


def test_the_launches_of_a_call_follow_occupancy_on_a_gpu_and_the_given_rows_otherwise():
    launches = wkv_triton._launches
    assert launches(64, 16 * 12, None, None, 132) == ((8, 1), (16, 1))     # the 125m model at B16 on an H100
    assert launches(64, 2 * 12, None, None, 132) == ((4, 1), (4, 1))       # B2: every SM wants programs
    assert launches(64, 8 * 12, None, None, 132) == ((8, 1), (8, 1))
    assert launches(64, 16 * 12, None, 4, 132) == ((8, 4), (16, 4))        # num_warps as given
    assert launches(64, 16 * 12, 32, None, 132) == ((32, 2), (32, 2))      # rows as given: both kernels
    assert launches(64, 16 * 12, None, None, None) == ((8, 1), (8, 1))     # the interpreter: min(N, 8)
    assert launches(4, 1000, None, None, None) == ((4, 1), (4, 1))
    with pytest.raises(HierarchosError, match="power-of-two"):
        launches(12, 16, None, None, 132)


def test_column_sums_default_to_atomics_on_cuda_unless_determinism_is_asked_for():
    assert wkv_triton._default_column_sums(False) == "parts"
    assert wkv_triton._default_column_sums(True) == "atomic"
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert wkv_triton._default_column_sums(True) == "parts"
    finally:
        torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("fwd_rows, bwd_rows, atomic", [(4, 2, True), (2, 8, False), (8, 4, True)])
def test_forward_and_backward_may_run_different_row_blocks(interpret, fwd_rows, bwd_rows, atomic):
    """On CUDA the two kernels take their rows apart (occupancy_rows): the checkpoints hold whole states,
    so a backward with other row blocks than its forward still gives every gradient."""
    seed = fresh_seed()
    inputs, state = make_inputs(seed, B=2, T=5, H=2, N=8, dtype=torch.float32)
    weight_o, weight_s = weights(seed, inputs, state)
    leaves = [inputs[n].clone().requires_grad_(True) for n in NAMES]
    s0 = state.clone().requires_grad_(True)
    launches = (_launch_config(8, fwd_rows, None), _launch_config(8, bwd_rows, None))
    o, s = wkv_triton._WKV7Triton.apply(*leaves, s0, launches, 2, True, atomic, ("", ""), True)
    grads = torch.autograd.grad((o * weight_o.float()).sum() + (s * weight_s.float()).sum(), [*leaves, s0])
    o_ref, s_ref, grads_ref = reference(inputs, state, weight_o, weight_s)
    close(o, o_ref, "o", seed)
    for name, g, g_ref in zip((*NAMES, "state"), grads, grads_ref):
        close(g, g_ref, f"d{name}", seed)


def test_an_unknown_column_sums_mode_is_a_one_line_error(interpret):
    inputs, state = make_inputs(fresh_seed(), B=1, T=2, H=1, N=4, dtype=torch.float32)
    with pytest.raises(HierarchosError) as err:
        wkv7_triton(**inputs, state=state, column_sums="atomics")
    assert str(err.value) == "wkv7_triton column_sums='atomics': use 'parts' or 'atomic'"
    with pytest.raises(HierarchosError) as err:
        wkv7_triton(**inputs, state=state, scratch="l2")
    assert str(err.value) == "wkv7_triton scratch='l2': use one of none, keep"


def test_where_the_kernels_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu_only = "it runs on CUDA tensors (on the CPU only under TRITON_INTERPRET=1, for tests)"
    assert triton_unavailable_reason("cpu") == cpu_only
    assert triton_unavailable_reason(torch.device("cpu")) == cpu_only
    inputs, state = make_inputs(fresh_seed(), B=1, T=2, H=1, N=4, dtype=torch.float32)
    with pytest.raises(HierarchosError) as err:
        wkv7_triton(**inputs, state=state)
    assert str(err.value) == f"wkv7 impl 'triton' cannot run: {cpu_only}; use impl='chunked'"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert triton_unavailable_reason("cpu") == cpu_only
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_unavailable_reason("cpu") == ""
    if not torch.cuda.is_available():  # no device named: the compiled kernels need CUDA
        assert triton_unavailable_reason() == "it needs a CUDA device"
        assert triton_unavailable_reason("meta") == "it needs a CUDA device"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a CUDA device (or none, below) on any host
    assert triton_unavailable_reason() == triton_unavailable_reason("cuda") == ""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert triton_unavailable_reason() == triton_unavailable_reason("cuda") == "it needs a CUDA device"
    monkeypatch.setattr(wkv_triton, "triton", None)
    monkeypatch.setattr(wkv_triton, "_TRITON_ERROR", "ImportError: no triton")
    assert triton_unavailable_reason("cpu") == "triton does not import (ImportError: no triton); pip install triton"


def test_the_kernels_are_built_once_for_every_length():
    """Compiled (CUDA): JIT functions of the two kernels that do not specialize on T or the sizes made from
    it, so one compile serves every sequence length; interpreted (CPU): the same two functions."""
    from triton.runtime.interpreter import InterpretedFunction

    fwd, bwd = wkv_triton._kernels(False)
    assert isinstance(fwd, triton.JITFunction) and isinstance(bwd, triton.JITFunction)
    assert fwd.fn is wkv_triton._wkv7_fwd_kernel and bwd.fn is wkv_triton._wkv7_bwd_kernel
    assert [p.name for p in fwd.params if p.do_not_specialize] == ["T", "n_chunks"]
    assert [p.name for p in bwd.params if p.do_not_specialize] == ["T", "n_chunks", "part_stride"]
    fwd, bwd = wkv_triton._kernels(True)
    assert isinstance(fwd, InterpretedFunction) and isinstance(bwd, InterpretedFunction)
    assert fwd.fn is wkv_triton._wkv7_fwd_kernel and bwd.fn is wkv_triton._wkv7_bwd_kernel


def _guarded(x: torch.Tensor) -> torch.Tensor:
    """x (float32) in the middle of a larger buffer of NaNs: a read past either end of x turns into NaN."""
    pad = 4 * x.shape[-1] * x.shape[-2]
    storage = torch.full((x.numel() + 2 * pad,), float("nan"))
    view = storage[pad:pad + x.numel()].view(x.shape)
    view.copy_(x)
    return view


@pytest.mark.parametrize("chunk", [2, 4])
@pytest.mark.parametrize("prefetch", [True, False])
def test_no_read_outside_the_inputs(interpret, prefetch, chunk):
    """A tail chunk (T = 5; chunk 2: one token past T, chunk 4: three, so the backward's prefetch of token t-1
    runs on tail tokens too) must not read tokens past T: every input, the initial state and the output
    gradient sit between runs of NaN, so a read outside them that reaches the output, the carried state or
    its adjoint turns the output or a gradient into NaN."""
    seed = fresh_seed()
    inputs, state = make_inputs(seed, B=1, T=5, H=1, N=4, dtype=torch.float32)
    weight_o, weight_s = weights(seed, inputs, state)
    leaves = {n: _guarded(x).requires_grad_(True) for n, x in inputs.items()}
    s0 = _guarded(state).requires_grad_(True)
    o, s = wkv7_triton(**leaves, state=s0, chunk=chunk, prefetch=prefetch)
    got = torch.autograd.grad([o, s], [*leaves.values(), s0],
                              grad_outputs=[_guarded(weight_o.float()), _guarded(weight_s.float())])
    o_ref, s_ref, grads_ref = reference(inputs, state, weight_o, weight_s)
    close(o, o_ref, "o", seed)
    close(s, s_ref, "state", seed)
    for name, g, g_ref in zip((*NAMES, "state"), got, grads_ref):
        close(g, g_ref, f"d{name}", seed)


def test_the_launch_knobs_reach_both_kernels(interpret, monkeypatch):
    """rows, num_warps, chunk and prefetch as given (or their defaults) reach the forward and backward launches,
    with one program per row block of each (b, h); the checkpoints are stored (the full B*H*n_chunks*N*N buffer)
    only when a gradient is wanted; the backward gets its scratch (one chunk of states per program) and the
    stride between the partial sums; T = 0 launches nothing. num_warps only matters compiled (the interpreter
    ignores it), so it is checked here as the launch receives it."""
    launches = Launches(wkv_triton._kernels)
    monkeypatch.setattr(wkv_triton, "_kernels", launches)
    seed = fresh_seed()
    inputs, state = make_inputs(seed, B=1, T=5, H=2, N=8, dtype=torch.float32)
    weight_o, weight_s = weights(seed, inputs, state)
    o, s, grads = kernel(inputs, state, weight_o, weight_s, rows=4, num_warps=2, chunk=2, prefetch=False)
    (fwd, grid_f, args_f, kw_f), (bwd, grid_b, args_b, kw_b) = launches.calls
    assert (fwd, bwd) == ("fwd", "bwd") and grid_f == grid_b == (1 * 2 * 2,)
    assert kw_f == {"H": 2, "N": 8, "BI": 4, "C": 2, "STORE_CKPT": True, "PREFETCH": False, "num_warps": 2}
    assert kw_b == {"H": 2, "N": 8, "BI": 4, "C": 2, "PREFETCH": False, "ATOMIC": False,
                    "SCRATCH_STORE": "evict_last", "SCRATCH_LOAD": "evict_first", "num_warps": 2}  # scratch="keep"
    assert args_f[10:] == (5, 3) and args_f[9].numel() == 1 * 2 * 3 * 8 * 8   # T, n_chunks; the checkpoints
    assert args_b[9].numel() == 4 * 2 * 4 * 8 and args_b[17:] == (5, 3, 1 * 5 * 2 * 8)  # scratch; T, n_chunks, stride
    assert [args_b[i].shape[0] for i in (10, 11, 12, 14, 15)] == [2] * 5  # one partial sum per row block
    o_ref, s_ref, grads_ref = reference(inputs, state, weight_o, weight_s)
    close(o, o_ref, "o", seed)
    for name, g, g_ref in zip((*NAMES, "state"), grads, grads_ref):
        close(g, g_ref, f"d{name}", seed)

    launches.calls.clear()  # atomic column sums: one zeroed buffer per column gradient, ATOMIC on
    _, _, grads = kernel(inputs, state, weight_o, weight_s, rows=4, chunk=2, column_sums="atomic")
    (_, _, args_b, kw_b) = launches.calls[1]
    assert kw_b["ATOMIC"] is True and [args_b[i].shape[0] for i in (10, 11, 12, 14, 15)] == [1] * 5
    for name, g, g_ref in zip((*NAMES, "state"), grads, grads_ref):
        close(g, g_ref, f"d{name}", seed)
    launches.calls.clear()  # scratch="none": the cache's own policy
    kernel(inputs, state, weight_o, weight_s, rows=4, chunk=2, scratch="none")
    assert (launches.calls[1][3]["SCRATCH_STORE"], launches.calls[1][3]["SCRATCH_LOAD"]) == ("", "")
    launches.calls.clear()  # one row block: nothing to add, so plain stores even when atomic is asked for
    kernel(inputs, state, weight_o, weight_s, rows=8, chunk=2, column_sums="atomic")
    assert launches.calls[1][3]["ATOMIC"] is False

    launches.calls.clear()  # no gradient wanted: no checkpoints; the defaults
    o, s = wkv7_triton(**inputs, state=state)
    ((fwd, grid_f, args_f, kw_f),) = launches.calls
    assert grid_f == (1 * 2 * 1,) and args_f[10:] == (5, 1) and args_f[9].numel() == 1
    assert kw_f == {"H": 2, "N": 8, "BI": 8, "C": 32, "STORE_CKPT": False, "PREFETCH": True, "num_warps": 1}
    close(o, o_ref, "o", seed)
    close(s, s_ref, "state", seed)

    launches.calls.clear()
    o, s = wkv7_triton(**{n: x[:, :0] for n, x in inputs.items()}, state=state)
    assert launches.calls == [] and o.shape == (1, 0, 2, 8) and torch.equal(s, state)
