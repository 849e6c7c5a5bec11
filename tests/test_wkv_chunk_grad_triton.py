"""The chunk-parallel WKV-7 backward: its derivation in PyTorch (hierarchos/ops/wkv_chunk_grad.py) against
autograd of the float64 scan, and its Triton kernels (wkv_chunk_grad_triton.py) against the same under
Triton's interpreter on CPU tensors (skipped when triton does not import) and against the sequential
kernel on a GPU (marked gpu). Inputs from a fresh seed each run, printed on failure."""

import random

import pytest
import torch

from hierarchos.errors import HierarchosError
from hierarchos.ops import wkv as W
from hierarchos.ops.wkv import wkv7_reference
from hierarchos.ops.wkv_chunk_grad import wkv7_chunk_manual_backward
from hierarchos.ops.wkv_chunk_grad_triton import triton, wkv7_chunk_grad
from test_wkv import NAMES, freeze, fresh_seed, make_inputs, rel_err

needs_triton = pytest.mark.skipif(triton is None, reason="triton does not import")
TOL32 = 2e-5


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def autograd_of(run, inputs, state, d_o, d_s, dtype):
    """(o, final state, dr, dlog_w, dk, dv, da, db, d_state0) of `run` on fresh leaves of `dtype`."""
    leaves = {n: x.detach().to(dtype).clone().requires_grad_() for n, x in inputs.items()}
    s0 = state.detach().to(dtype).clone().requires_grad_()
    o, s = run(**leaves, state=s0)
    grads = torch.autograd.grad((o, s), [*leaves.values(), s0], (d_o.to(o.dtype), d_s.to(s.dtype)))
    return (o.detach(), s.detach(), *grads)


def upstream(seed, inputs, state):
    gen = torch.Generator().manual_seed(seed + 1)
    return (torch.randn(inputs["r"].shape, generator=gen, dtype=torch.float64),
            torch.randn(state.shape, generator=gen, dtype=torch.float64))


def errors(got, want):
    names = ("o", "state", *(f"d{n}" for n in NAMES), "dstate0")
    return {n: rel_err(g, w) for n, g, w in zip(names, got, want)}


@pytest.mark.parametrize("T, chunk", [(1, 16), (16, 16), (45, 16), (45, 8), (70, 32), (33, 64)])
def test_the_derivation_equals_autograd_of_the_scan_in_float64(T, chunk):
    seed = fresh_seed()
    rng = random.Random(seed)
    inputs, state = make_inputs(seed, B=2, T=T, H=2, N=8)
    mask = torch.tensor([[rng.random() < 0.2 for _ in range(T)] for _ in range(2)])
    inputs = freeze(inputs, mask)                     # a fifth of the tokens frozen
    d_o, d_s = upstream(seed, inputs, state)
    want = autograd_of(wkv7_reference, inputs, state, d_o, d_s, torch.float64)[2:]
    got = wkv7_chunk_manual_backward(**inputs, state=state, d_o=d_o, d_state=d_s, chunk=chunk)
    assert all(x.dtype == torch.float64 for x in got)
    errs = {n: rel_err(g, w) for n, g, w in zip((*NAMES, "state0"), got, want)}
    assert max(errs.values()) < 1e-12, f"seed={seed} T={T} chunk={chunk}: {errs}"


def test_the_derivation_takes_no_upstream_gradient_as_zeros():
    seed = fresh_seed()
    inputs, state = make_inputs(seed, B=1, T=20, H=1, N=8)
    d_o, _ = upstream(seed, inputs, state)
    got = wkv7_chunk_manual_backward(**inputs, state=state, d_o=d_o, d_state=None)
    want = wkv7_chunk_manual_backward(**inputs, state=state, d_o=d_o, d_state=torch.zeros_like(state))
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    nothing = wkv7_chunk_manual_backward(**inputs, state=state, d_o=None, d_state=None)
    assert all(not g.any() for g in nothing)


@needs_triton
@pytest.mark.parametrize("T, N, chunk, forward", [
    (1, 16, 16, "chunk"), (16, 16, 16, "sequential"), (45, 16, 16, "chunk"), (45, 16, 16, "sequential"),
    (70, 32, 32, "chunk"), (33, 64, 16, "sequential"),
])
def test_the_kernels_equal_autograd_of_the_float64_scan(interpret, T, N, chunk, forward):
    seed = fresh_seed()
    rng = random.Random(seed)
    inputs, state = make_inputs(seed, B=2, T=T, H=2, N=N)
    inputs = freeze(inputs, torch.tensor([[rng.random() < 0.2 for _ in range(T)] for _ in range(2)]))
    d_o, d_s = upstream(seed, inputs, state)
    want = autograd_of(wkv7_reference, inputs, state, d_o, d_s, torch.float64)
    run = lambda **kw: wkv7_chunk_grad(**kw, chunk=chunk, forward=forward)  # noqa: E731
    got = autograd_of(run, inputs, state, d_o, d_s, torch.float32)
    assert all(x.dtype == torch.float32 for x in got)
    errs = errors(got, want)
    assert max(errs.values()) < TOL32, f"seed={seed} T={T} N={N} chunk={chunk} forward={forward}: {errs}"


@needs_triton
def test_at_the_models_decay_bound_and_with_the_state_carried(interpret):
    """log_w at the model's bound in every channel (the largest exp(-cl) a chunk forms) over 150 tokens, and
    two calls with the state (and its gradient) carried at a split inside a chunk equal one call."""
    seed = fresh_seed()
    inputs, state = make_inputs(seed, B=1, T=150, H=1, N=16)
    inputs["log_w"] = torch.full_like(inputs["log_w"], -0.61)
    d_o, d_s = upstream(seed, inputs, state)
    want = autograd_of(wkv7_reference, inputs, state, d_o, d_s, torch.float64)
    for chunk in (16, 32):
        errs = errors(autograd_of(lambda **kw: wkv7_chunk_grad(**kw, chunk=chunk), inputs, state, d_o, d_s,
                                  torch.float32), want)
        assert max(errs.values()) < TOL32, f"seed={seed} chunk={chunk}: {errs}"
    at = random.Random(seed).randrange(1, 150)

    def two_calls(state, **x):
        o1, mid = wkv7_chunk_grad(**{n: t[:, :at] for n, t in x.items()}, state=state)
        o2, end = wkv7_chunk_grad(**{n: t[:, at:] for n, t in x.items()}, state=mid)
        return torch.cat([o1, o2], 1), end
    errs = errors(autograd_of(two_calls, inputs, state, d_o, d_s, torch.float32), want)
    assert max(errs.values()) < TOL32, f"seed={seed} carried at {at}: {errs}"


@needs_triton
@pytest.mark.parametrize("scan", ["tf32x3", "tf32"])
def test_the_scans_precision_is_a_launch_option(interpret, scan):
    """The scans across chunks with products on tensor cores (a benchmark option; the interpreter computes
    them in float32, so the kernels here are held to the scan's float64 autograd as the default is)."""
    seed = fresh_seed()
    inputs, state = make_inputs(seed, B=1, T=50, H=2, N=16)
    d_o, d_s = upstream(seed, inputs, state)
    want = autograd_of(wkv7_reference, inputs, state, d_o, d_s, torch.float64)
    for forward in ("chunk", "sequential"):
        run = lambda **kw: wkv7_chunk_grad(**kw, forward=forward, scan_precision=scan)  # noqa: E731
        errs = errors(autograd_of(run, inputs, state, d_o, d_s, torch.float32), want)
        assert max(errs.values()) < TOL32, f"seed={seed} scan={scan} forward={forward}: {errs}"


@needs_triton
@pytest.mark.parametrize("T, forward", [(45, "chunk"), (45, "sequential"), (16, "chunk"), (7, "sequential")])
def test_start_states_recomputed_in_the_backward(interpret, monkeypatch, T, forward):
    """recompute_states: the forward holds the initial state, not a state a chunk, and the backward's
    recomputed start states give the gradients of the held ones (bit for bit after the chunk forward, whose
    scan is the recompute's; within float32 rounding after the sequential one), frozen tokens included;
    `set_recompute_states` makes it the default."""
    from hierarchos.ops import wkv_chunk_grad_triton as grad

    seed = fresh_seed()
    rng = random.Random(seed)
    inputs, state = make_inputs(seed, B=2, T=T, H=2, N=16, dtype=torch.float32)
    inputs = freeze(inputs, torch.tensor([[rng.random() < 0.2 for _ in range(T)] for _ in range(2)]))
    d_o, d_s = upstream(seed, inputs, state)
    held = lambda **kw: wkv7_chunk_grad(**kw, forward=forward, recompute_states=False)  # noqa: E731
    want = autograd_of(held, inputs, state, d_o, d_s, torch.float32)
    saved = []
    real_save = torch.autograd.function.FunctionCtx.save_for_backward
    monkeypatch.setattr(torch.autograd.function.FunctionCtx, "save_for_backward",
                        lambda ctx, *t: (saved.append(t), real_save(ctx, *t))[1])
    monkeypatch.setattr(grad, "RECOMPUTE_STATES", False)
    grad.set_recompute_states(True)
    got = autograd_of(lambda **kw: wkv7_chunk_grad(**kw, forward=forward), inputs, state, d_o, d_s, torch.float32)
    assert saved[-1][-1].shape == state.shape, "the forward held more than the initial state"
    if forward == "chunk":
        assert all(torch.equal(g, w) for g, w in zip(got, want)), f"seed={seed}"
    else:
        errs = errors(got, want)
        assert max(errs.values()) < 1e-6, f"seed={seed}: {errs}"
    reference = autograd_of(wkv7_reference, inputs, state, d_o, d_s, torch.float64)
    errs = errors(got, reference)
    assert max(errs.values()) < TOL32, f"seed={seed}: {errs}"


@needs_triton
def test_bf16_rkv_keep_their_dtype_and_no_grad_holds_nothing(interpret, monkeypatch):
    seed = fresh_seed()
    inputs, state = make_inputs(seed, B=1, T=21, H=2, N=16, dtype=torch.float32)
    mixed = {n: x.bfloat16() if n in ("r", "k", "v") else x for n, x in inputs.items()}
    d_o, d_s = upstream(seed, inputs, state)
    got = autograd_of(wkv7_chunk_grad, mixed, state, d_o, d_s, torch.float32)   # leaves float32: upcast
    leaves = {n: x.clone().requires_grad_() for n, x in mixed.items()}
    o, s = wkv7_chunk_grad(**leaves, state=state)
    torch.autograd.backward((o, s), (d_o.float(), d_s.float()))
    assert o.dtype == torch.float32 and leaves["r"].grad.dtype == torch.bfloat16
    assert rel_err(leaves["v"].grad, got[5]) < 1e-2, f"seed={seed}"
    # the kernel stores the bf16 gradients itself: within one bf16 step of the float32 ones (Triton's
    # interpreter truncates where the GPU rounds to nearest even; the GPU test holds that to .to()'s rounding)
    for name, i in (("r", 2), ("k", 4), ("v", 5)):
        torch.testing.assert_close(leaves[name].grad.float(), got[i], rtol=2 ** -7, atol=1e-30)
    saved = []
    monkeypatch.setattr(torch.autograd.function.FunctionCtx, "save_for_backward",
                        lambda ctx, *t: saved.append(t))
    with torch.no_grad():
        o_ng, s_ng = wkv7_chunk_grad(**leaves, state=state)
    assert not saved and torch.equal(o_ng, o.detach()) and torch.equal(s_ng, s.detach())
    empty = wkv7_chunk_grad(**{n: x[:, :0] for n, x in inputs.items()}, state=state)
    assert empty[0].shape == (1, 0, 2, 16) and torch.equal(empty[1], state)


@needs_triton
def test_bad_calls_are_one_line_errors(interpret):
    inputs, state = make_inputs(0, B=1, T=5, H=1, N=16, dtype=torch.float32)
    for kw, what in ((dict(chunk=8), "chunk=8"), (dict(chunk=24), "chunk=24"), (dict(rows=8), "rows"),
                     (dict(precision="fp8"), "precision"), (dict(scan_precision="bf16"), "scan_precision='bf16'"),
                     (dict(forward="both"), "forward='both'")):
        with pytest.raises(HierarchosError, match=what):
            wkv7_chunk_grad(**inputs, state=state, **kw)
    small, small_state = make_inputs(0, B=1, T=5, H=1, N=8, dtype=torch.float32)
    with pytest.raises(HierarchosError, match="head size"):
        wkv7_chunk_grad(**small, state=small_state)


def test_without_triton_or_cuda_it_says_so(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inputs, state = make_inputs(0, B=1, T=5, H=1, N=16, dtype=torch.float32)
    with pytest.raises(HierarchosError, match="impl 'triton_chunk_grad' cannot run"):
        wkv7_chunk_grad(**inputs, state=state)


@needs_triton
def test_the_device_check_passes_once_and_a_wrong_kernel_is_reported_and_left_alone(interpret, monkeypatch):
    from hierarchos.ops import wkv_chunk_grad_triton as grad

    monkeypatch.setattr(grad, "CHECK_SHAPE", (1, 37, 1, 16))   # the interpreter is slow at N = 64
    monkeypatch.setattr(grad, "_CHECKED", {})
    assert grad.checked("cpu") and grad._CHECKED == {torch.device("cpu"): True}
    monkeypatch.setattr(grad, "_CHECKED", {})
    real = grad.wkv7_chunk_grad
    monkeypatch.setattr(grad, "wkv7_chunk_grad", lambda *a, **kw: [x * 1.05 for x in real(*a, **kw)])
    with pytest.warns(RuntimeWarning, match="backward failed its check on cpu .*worst relative error"):
        assert not grad.checked("cpu")
    assert not grad.checked("cpu")                           # answered from the cache, no second warning


def test_the_automatic_choice_takes_it_for_gradients_where_tf32_is_allowed():
    assert W.cuda_choice(16, 12, triton_ok=True, fla_ok=True, seq_len=1024, tf32=True) == "triton_chunk_grad"
    assert W.cuda_choice(2, 12, triton_ok=True, fla_ok=False, seq_len=8192, tf32=True) == "triton_chunk_grad"
    assert W.cuda_choice(16, 12, triton_ok=True, fla_ok=True, seq_len=1024, tf32=False) == "triton"
    assert W.cuda_choice(2, 12, triton_ok=True, fla_ok=True, seq_len=8192, tf32=False) == "fla"
    assert W.cuda_choice(1, 12, triton_ok=True, fla_ok=True, seq_len=1024, needs_grad=False,
                         tf32=True) == "triton_chunk"
    assert W.cuda_choice(16, 12, triton_ok=False, fla_ok=False, tf32=True) == "chunked"
    assert W.cuda_choice(16, 12, triton_ok=True, fla_ok=False, tf32=True, head_size=8) == "triton"


def test_the_training_forward_is_the_chunk_one_with_tf32_scans_or_few_pairs():
    from hierarchos.ops.wkv_chunk_grad_triton import forward_kind

    assert forward_kind(256, "tf32") == forward_kind(8, "tf32") == forward_kind(8, "ieee") == "chunk"
    assert forward_kind(65, "ieee") == "chunk" and forward_kind(66, "ieee") == "sequential"
    assert forward_kind(192, "tf32x3") == forward_kind(192) == "sequential"


def test_the_training_forward_can_be_forced_for_an_ab(monkeypatch):
    """HIERARCHOS_WKV_TRAIN_FORWARD (read at import into FORCED_FORWARD) overrides the rule either way; a
    value that is not a kind is a one-line error."""
    from hierarchos.ops import wkv_chunk_grad_triton as grad

    monkeypatch.setattr(grad, "FORCED_FORWARD", "sequential")
    assert grad.forward_kind(256, "tf32") == grad.forward_kind(8, "ieee") == "sequential"
    monkeypatch.setattr(grad, "FORCED_FORWARD", "chunk")
    assert grad.forward_kind(192, "ieee") == "chunk"
    monkeypatch.setattr(grad, "FORCED_FORWARD", "fast")
    with pytest.raises(HierarchosError, match="HIERARCHOS_WKV_TRAIN_FORWARD='fast': use chunk or sequential"):
        grad.forward_kind(192, "tf32")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or triton is None, reason="needs CUDA and triton")
@pytest.mark.parametrize("B, T, H", [(2, 333, 4), (16, 1024, 12), (1, 4100, 2)])
def test_on_cuda_equals_the_sequential_kernel(B, T, H):
    """Float32 products to the sequential kernel within 1e-5, TF32 ones within 1e-2 (both forwards, start
    states held or recomputed), frozen tokens and a partial last chunk included; bf16 r, k, v's gradients
    rounded by the kernel; and wkv7's automatic choice takes it with TF32 on."""
    from hierarchos.ops.wkv_triton import wkv7_triton

    seed = fresh_seed()
    rng = random.Random(seed)
    inputs, state = make_inputs(seed, B=B, T=T, H=H, N=64, dtype=torch.float32, device="cuda")
    inputs = freeze(inputs, torch.tensor([[rng.random() < 0.2 for _ in range(T)] for _ in range(B)], device="cuda"))
    d_o, d_s = (x.cuda() for x in upstream(seed, inputs, state))
    want = autograd_of(wkv7_triton, inputs, state, d_o, d_s, torch.float32)
    for precision, tol in (("ieee", 1e-5), ("tf32", 1e-2)):
        for forward in ("chunk", "sequential"):
            run = lambda **kw: wkv7_chunk_grad(**kw, precision=precision, forward=forward)  # noqa: E731
            errs = errors(autograd_of(run, inputs, state, d_o, d_s, torch.float32), want)
            assert max(errs.values()) < tol, f"seed={seed} {precision} {forward}: {errs}"
            run = lambda **kw: wkv7_chunk_grad(**kw, precision=precision, forward=forward,  # noqa: E731
                                               recompute_states=True)
            errs = errors(autograd_of(run, inputs, state, d_o, d_s, torch.float32), want)
            assert max(errs.values()) < tol, f"seed={seed} {precision} {forward} recomputed states: {errs}"
    # bf16 r, k, v (autocast's): their gradients stored in bf16 by the kernel, rounded to nearest as .to()
    # rounds (kernels specialised for bf16 pointers may differ from the float32 ones in the last float32
    # bits, so a value near a rounding tie may land one bf16 step away; truncation would move half of them)
    mixed = {n: x.bfloat16() if n in ("r", "k", "v") else x for n, x in inputs.items()}
    upcast = autograd_of(wkv7_chunk_grad, mixed, state, d_o, d_s, torch.float32)
    leaves = {n: x.clone().requires_grad_() for n, x in mixed.items()}
    o, s = wkv7_chunk_grad(**leaves, state=state)
    torch.autograd.backward((o, s), (d_o.float(), d_s.float()))
    for name, i in (("r", 2), ("k", 4), ("v", 5)):
        got, want = leaves[name].grad, upcast[i]
        # one bf16 step of the float32 run's value, give or take the float32 run's own rounding (a value
        # that sums to near zero carries the terms' rounding, ~1e-6 of the largest gradient, not its own)
        slack = 2 ** -7 * want.abs() + 1e-5 * want.abs().max()
        off = (got.float() - want).abs() > slack
        assert not off.any(), (f"seed={seed} d{name}: {int(off.sum())} of {off.numel()} values beyond one bf16 step, "
                               f"worst {float(((got.float() - want).abs() / want.abs().clamp_min(1e-30)).max()):.3e} relative")
        rounded = (got == want.bfloat16()).float().mean().item()
        assert rounded > 0.99, f"seed={seed} d{name}: {rounded:.4f} of the values rounded to nearest"
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert W.resolve_impl("auto", inputs["r"], needs_grad=True) == "triton_chunk_grad"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


@needs_triton
def test_a_stack_trains_through_it_as_through_the_reference(interpret, monkeypatch):
    """The model's wiring (x070, frozen tokens, T not a multiple of the chunk): a 2-layer stack's outputs,
    final state and every parameter's gradient through `wkv7`'s chunk-parallel backward equal those through
    the reference scan (both float32)."""
    from test_time_mix_wiring import X070, frozen_mask, stack

    seed = fresh_seed()
    s = stack(X070, seed, n_layers=2, dim=32, head=16).float()
    B, T = 2, 37
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, 32, generator=g)
    tokens = torch.randint(0, 11, (B, T), generator=g)
    frozen = frozen_mask(B, T, seed)
    results = {}
    for impl in ("triton_chunk_grad", "reference"):
        monkeypatch.setenv(W.ENV_IMPL, impl)
        s.zero_grad()
        y, st = s(x, tokens, s.init_state(B, dtype=torch.float32), frozen)
        (y.square().sum() + st["wkv"].sum()).backward()
        results[impl] = (y.detach(), st["wkv"].detach(), {n: p.grad.clone() for n, p in s.named_parameters()})
    (yc, wc, gc), (yr, wr, gr) = results["triton_chunk_grad"], results["reference"]
    assert rel_err(yc, yr) < 1e-5 and rel_err(wc, wr) < 1e-5, f"seed={seed}"
    bad = {n: rel_err(gc[n], gr[n]) for n in gr if gr[n].norm() > 0 and not rel_err(gc[n], gr[n]) < 1e-4}
    assert not bad, f"seed={seed}: {bad}"


def test_the_scans_take_tf32_with_tf32_products_up_to_the_measured_length():
    from hierarchos.ops.wkv_chunk_grad_triton import TF32_SCAN_MAX_CHUNKS, default_scan_precision

    assert default_scan_precision("tf32", 1) == "tf32"
    assert default_scan_precision("tf32", TF32_SCAN_MAX_CHUNKS) == "tf32"
    assert default_scan_precision("tf32", TF32_SCAN_MAX_CHUNKS + 1) == "ieee"
    assert default_scan_precision("ieee", 1) == "ieee" and default_scan_precision("tf32x3", 2) == "ieee"


@needs_triton
def test_a_models_gradients_are_the_same_with_the_states_recomputed(interpret, monkeypatch):
    """A tiny model's training step through the chunk-parallel backward (forced: `wkv7` takes it on CUDA only):
    every parameter's gradient bit for bit the same with the chunks' start states recomputed in the backward
    as with them held (at the model's few (batch, head) pairs the forward is the chunk one, whose scan is the
    recompute's), the manager's pondering pass over the plan points and a stateful second window included."""
    from hierarchos.config import tiny_config
    from hierarchos.model.lm import HierarchosLM
    from hierarchos.model.losses import lm_loss
    from hierarchos.ops import wkv_chunk_grad_triton as grad

    monkeypatch.setenv(W.ENV_IMPL, "triton_chunk_grad")
    torch.manual_seed(fresh_seed())
    model = HierarchosLM(tiny_config(context_dim=32, h_hidden=32, l_hidden=32, head_size=16, max_h_steps=1,
                                     max_l_steps=1, h_cycles=1))
    tokens = torch.randint(0, 64, (2, 37))

    def gradients(recompute):
        monkeypatch.setattr(grad, "RECOMPUTE_STATES", recompute)
        model.zero_grad(set_to_none=True)
        out = model(tokens[:, :18], model.init_state(2))
        loss, _ = lm_loss(out, tokens[:, 1:19], 1e-4)
        loss2, _ = lm_loss(model(tokens[:, 18:36], out.state.detach()), tokens[:, 19:37], 1e-4)
        (loss + loss2).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    held, recomputed = gradients(False), gradients(True)
    assert held.keys() == recomputed.keys() and len(held) > 10
    assert [n for n in held if not torch.equal(held[n], recomputed[n])] == []
