"""The sync-free step (HierarchosLM.step_sync_free) and on-device sampling (generate.sample_rows):
what a CUDA graph captures, checked on the CPU.

1. It computes what `step` computes: logits, aux totals and the state bit for bit in float64, on
   random configs with every feature on (early exit that really splits, ROSA, DeepEmbed, memory
   writes, Q halting, attention and WKV-4 stacks), because masked work (frozen rows, rows off a plan
   point) leaves exactly the values that skipped work leaves; leaving the pondering passes out where
   no row is at a plan point (`plan_rows=False`, what GraphedStepper does for those tokens) too.
2. Rows at different positions step together as each would alone.
3. It performs no host synchronisation: under a dispatch mode that raises on every op that reads a
   tensor on the host (`_local_scalar_dense`, `nonzero`, boolean indexing, ...) and on the meta device
   (no data at all), the step and the whole generation body run; the plain `step` fails both checks,
   so the checks can fail. On the meta device a second mode refuses host tensors mixed into device
   work (copies to the device, 0-dim host scalars), which a CUDA graph capture cannot hold.
4. `sample_rows` equals the one-row reference `sample_next` on random logits with the same noise;
   the exponential race draws from the sampling distribution (a chi-square oracle); `row_noise` is
   a function of (seed, counter) only.
"""

from __future__ import annotations

import os
import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from hierarchos.config import tiny_config
from hierarchos.errors import HierarchosError
from hierarchos.generate import GraphedStepper, SamplingConfig, row_noise, row_noise_at, sample_next, sample_rows
from hierarchos.model import HierarchosLM

from early_exit import calibrated

EARLY_EXIT = dict(h_halt_thresh=0.45, l_conv_atol=0.06, max_h_steps=3)
CONFIGS = {
    "all_on": {},
    "deep": dict(h_cycles=3, max_h_steps=3, max_l_steps=3, grad_steps=2, h_stride=3, h_layers=2),
    "stride1_no_rosa_per_block": dict(h_stride=1, use_rosa=False, deepembed_per_block=True, l_layers=2),
    "minimal": dict(h_cycles=1, max_h_steps=1, max_l_steps=0),
    "q_halting": dict(halting="q"),
    "attention_window": dict(h_block="attention", window_size=3, l_block="attention", pos_encodings="rope"),
    "wkv4": dict(time_mix="wkv4"),
    "memory_chunk_3": dict(ltm_chunk=3, ltm_write_threshold=0.0),
}


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**31)


def build(seed, dtype=torch.float64, **overrides):
    torch.manual_seed(seed)
    model = HierarchosLM(tiny_config(**{**EARLY_EXIT, **overrides})).to(dtype)
    with torch.no_grad():  # spread the drift and halting so that early exit happens at init
        model.reasoner.l_drift_proj.weight.normal_(0, 0.3)
        if model.cfg.halting == "q":
            model.reasoner.h_q_head.weight.normal_(0, 0.5)
            model.reasoner.h_q_head.bias.zero_()
        else:
            model.reasoner.h_halt_proj.weight.normal_(0, 0.5)
            model.reasoner.h_halt_proj.bias.zero_()
    return model.eval()


def tokens_for(seed, batch, length):
    return torch.randint(0, 7, (batch, length), generator=torch.Generator().manual_seed(seed))


def run(model, tokens, sync_free, **caps):
    """Step through `tokens` (B, T) from a fresh state: (logits (B, T, V), state, summed totals).
    sync_free: False (`step`), True (`step_sync_free`) or "split" (`step_sync_free` with plan_rows=False
    off the plan points and write_rows=False off the memory's chunk ends, as GraphedStepper runs it)."""
    B, T = tokens.shape
    state, logits, totals = model.init_state(B), [], {}
    for t in range(T):
        if sync_free == "split":  # the pondering passes left out where the host knows they write nothing
            plan_rows = (t + 1) % model.cfg.h_stride == 0
            write_rows = (t + 1) % model.cfg.ltm_chunk == 0
            out = model.step_sync_free(tokens[:, t], state, torch.full((B,), t, dtype=torch.long),
                                       plan_rows=plan_rows, write_rows=write_rows, **caps)
        elif sync_free:
            out = model.step_sync_free(tokens[:, t], state, torch.full((B,), t, dtype=torch.long), **caps)
        else:
            out = model.step(tokens[:, t], state, **caps)
        logits.append(out.logits)
        state = out.state
        for name, (total, count) in out.totals.items():
            s, c = totals.get(name, (0.0, 0.0))
            totals[name] = (s + total, c + count)
    return torch.stack(logits, 1), state, totals


def assert_same_run(a, b, msg):
    (la, sa, ta), (lb, sb, tb) = a, b
    assert torch.equal(la, lb), f"{msg}: logits differ by {(la - lb).abs().max()}"
    assert sa.pos == sb.pos
    for (name, x), (other, y) in zip(sa.tensors(), sb.tensors()):
        assert name == other and torch.equal(x, y), f"{msg}: state {name} differs"
    # a step off every plan point adds no pondering term; the sync-free step adds it with count 0
    assert set(ta) <= set(tb), msg
    for name, (total, count) in tb.items():
        ref_total, ref_count = ta.get(name, (0.0, 0.0))
        assert float(count) == float(ref_count), f"{msg}: count of {name}"
        assert float(total) == float(ref_total), f"{msg}: {name} {float(total)} != {float(ref_total)}"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_sync_free_step_equals_step_bit_for_bit(name):
    seed = fresh_seed()
    model = build(seed, **CONFIGS[name])
    tokens = tokens_for(seed, 2, 10)
    with torch.no_grad():
        assert_same_run(run(model, tokens, False), run(model, tokens, True), f"seed={seed} {name}")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_leaving_out_the_pondering_off_plan_points_changes_nothing(name):
    """plan_rows=False at tokens where no row is at a plan point, write_rows=False where no row closes a
    memory chunk: the same logits, state and totals, bit for bit, as the full sync-free step and as
    `step`."""
    seed = fresh_seed()
    model = build(seed, **CONFIGS[name])
    tokens = tokens_for(seed, 2, 10)
    with torch.no_grad():
        split = run(model, tokens, "split")
        assert_same_run(run(model, tokens, True), split, f"seed={seed} {name} full vs split")
        assert_same_run(run(model, tokens, False), split, f"seed={seed} {name} step vs split")


@pytest.mark.parametrize("name", ["all_on", "q_halting"])
def test_the_split_step_reports_the_same_totals_per_token(name):
    """Per token, the step without its pondering passes gives the totals the full step gives: the same
    names, dtypes and values (the pondering terms with nothing added), in float64 and float32."""
    seed = fresh_seed()
    for dtype in (torch.float64, torch.float32):
        model = build(seed, dtype=dtype, **CONFIGS[name])
        tokens = tokens_for(seed, 2, 8)
        state = model.init_state(2)
        with torch.no_grad():
            for t in range(8):
                pos = torch.full((2,), t, dtype=torch.long)
                # the hints once for both calls (without them each call would extend the automata again)
                hints = torch.tensor([a.push(int(x)) for a, x in zip(state.rosa, tokens[:, t])]) if state.rosa else None
                full = model.step_sync_free(tokens[:, t], state, pos, hints)
                split = model.step_sync_free(tokens[:, t], state, pos, hints,
                                             plan_rows=(t + 1) % model.cfg.h_stride == 0)
                assert full.totals.keys() == split.totals.keys(), (seed, t)
                for key, (total, count) in full.totals.items():
                    other_total, other_count = split.totals[key]
                    for a, b in ((total, other_total), (count, other_count)):
                        a, b = torch.as_tensor(a), torch.as_tensor(b)
                        assert a.dtype == b.dtype and torch.equal(a, b), (seed, dtype, t, key, a, b)
                state = full.state


def test_plan_rows_false_leaves_the_pondering_passes_out():
    """The split is real: off a plan point the manager runs its watch pass only (per round), at a
    plan point the watch pass and every pondering pass; the full sync-free step runs them all."""
    model = build(0, h_cycles=2, max_h_steps=3, max_l_steps=1, h_stride=4)
    calls = []
    model.reasoner.manager.register_forward_hook(lambda *args: calls.append(1))
    state = model.init_state(1)
    token = torch.tensor([1])

    def manager_calls(pos, **kw):
        calls.clear()
        with torch.no_grad():
            model.step_sync_free(token, state, torch.tensor([pos]), **kw)
        return len(calls)

    assert manager_calls(0) == 2 * (1 + 3)
    assert manager_calls(0, plan_rows=False) == 2 * 1
    assert manager_calls(3, plan_rows=True) == 2 * (1 + 3)


def test_write_rows_false_leaves_the_memory_write_out():
    """The write split is real: off a chunk end the memory's write is not computed at all; at one (and
    in the full sync-free step) it is, once per call."""
    model = build(0, ltm_chunk=4)
    writes = []
    write = model.memory._write
    model.memory._write = lambda *args: writes.append(1) or write(*args)
    state = model.init_state(1)

    def write_calls(pos, **kw):
        writes.clear()
        with torch.no_grad():
            model.step_sync_free(torch.tensor([1]), state, torch.tensor([pos]), **kw)
        return len(writes)

    assert (write_calls(0), write_calls(0, write_rows=False), write_calls(3, write_rows=True)) == (1, 0, 1)


@pytest.mark.parametrize("stride,chunk,bodies", [
    (2, 4, {(True, True), (True, False), (False, False)}),   # every chunk end is a plan point
    (2, 3, {(True, True), (True, False), (False, True), (False, False)}),
    (1, 4, {(True, True), (True, False)}),
    (4, 1, {(True, True), (False, True)}),
    (3, 2, {(True, True), (True, False), (False, True), (False, False)}),
])
def test_the_stepper_runs_each_token_on_the_body_its_rows_need(stride, chunk, bodies):
    """Without a GPU: the bodies a stepper keeps for (h_stride, ltm_chunk), the body each token takes
    (some row at a plan point; some row closing a chunk; rows at different positions; both when the
    positions are not known), and 14 tokens through the split bodies equal 14 through the full body:
    tokens and state, bit for bit."""
    seed = fresh_seed()
    model = build(seed, h_stride=stride, ltm_chunk=chunk, ltm_write_threshold=0.0)
    cfg = SamplingConfig(temperature=0.8, top_k=5, top_p=0.9)
    runs = []
    with torch.no_grad():
        for cls in (GraphedStepper, _FullBody):
            out = model(tokens_for(seed, 2, 5))
            start = torch.tensor([5, 9])  # rows four tokens apart
            stepper = cls(model, out.state, start, out.logits[:, -1],
                          torch.zeros(2, model.cfg.vocab_size, dtype=torch.bool), torch.tensor([1, 2]), cfg, {})
            keys, tokens = [], [stepper.token.clone()]
            for _ in range(14):
                keys.append(stepper._key())
                hints = [a.push(int(t)) for a, t in zip(out.state.rosa, tokens[-1])] if out.state.rosa else None
                tokens.append(stepper.advance(hints).clone())
            runs.append((set(stepper._bodies()), keys, torch.stack(tokens), [t.clone() for t in stepper.leaves]))
    (split_bodies, keys, split_tokens, split_leaves), (_, _, full_tokens, full_leaves) = runs
    assert split_bodies == bodies and set(keys) <= bodies
    for i, key in enumerate(keys):  # positions 5 + i and 9 + i are fed at token i
        rows = (5 + i, 9 + i)
        assert key == (any((p + 1) % stride == 0 for p in rows), any((p + 1) % chunk == 0 for p in rows)), (i, key)
    assert len(set(keys)) == len(bodies) or stride == 1 or chunk == 1  # every body taken, where each can be
    assert torch.equal(split_tokens, full_tokens), seed
    assert all(torch.equal(a, b) for a, b in zip(split_leaves, full_leaves)), seed
    stepper.host_pos = None  # positions not known on the host (the meta device): the full body
    assert GraphedStepper._key(stepper) == (True, True)


def test_a_start_given_host_positions_reads_nothing_back(monkeypatch):
    """generate_batch passes the positions it knows: making or loading a stepper then reads nothing
    from the device (a read would wait for the prefill queued before it, so the setup could not overlap
    it), and the stepper keeps the given positions."""
    seed = fresh_seed()
    model = build(seed)
    cfg = SamplingConfig(temperature=0.8, top_k=5, top_p=0.9)
    with torch.no_grad():
        out = model(tokens_for(seed, 2, 5))
        args = (out.state, torch.tensor([5, 9]), out.logits[:, -1], torch.zeros(2, model.cfg.vocab_size, dtype=torch.bool),
                torch.tensor([1, 2]))

        def no_read(*_a, **_k):
            raise AssertionError("the stepper's start read the device")
        with monkeypatch.context() as patch:
            for name in ("tolist", "item", "__int__", "__bool__"):
                patch.setattr(torch.Tensor, name, no_read)
            stepper = GraphedStepper(model, *args, cfg, {}, host_positions=[5, 9])
            stepper.load(*args, host_positions=[7, 3])
        assert stepper.host_pos == [7, 3]
        stepper.load(*args)  # not given: read from row_pos
        assert stepper.host_pos == [5, 9]


@pytest.mark.parametrize("caps", [dict(h_cycles=1, max_h_steps=1, max_l_steps=0), dict(h_halt_thresh=1.0),
                                  dict(max_l_steps=1, h_halt_thresh=0.3)])
def test_sync_free_step_equals_step_with_split_early_exit_and_caps(caps):
    """The calibrated model: plan points halt at different passes and tokens freeze at different passes
    (tests/early_exit.py), so the step's host skips really happen and the masks really matter."""
    seed = fresh_seed()
    model = calibrated(seed)
    tokens = tokens_for(seed, 3, 12)
    with torch.no_grad():
        ref, sync_free = run(model, tokens, False), run(model, tokens, True)
        assert_same_run(ref, sync_free, f"seed={seed} default caps")
        assert_same_run(run(model, tokens, False, **caps), run(model, tokens, True, **caps), f"seed={seed} {caps}")


def test_float32_sync_free_step_equals_step():
    seed = fresh_seed()
    model = build(seed, dtype=torch.float32)
    tokens = tokens_for(seed, 2, 9)
    with torch.no_grad():
        assert_same_run(run(model, tokens, False), run(model, tokens, True), f"seed={seed} float32")


def _row_state(model, prefix):
    """State and last logits after `prefix` (1-row) by the parallel form."""
    out = model(torch.tensor([prefix]))
    return out.state, out.logits[0, -1]


def test_rows_at_different_positions_step_as_each_row_alone():
    """Rows prefilled to different lengths (so at different phases of the plan stride and the memory
    chunk) then stepped together equal each row stepped alone by `step`."""
    from hierarchos.generate import stack_states

    seed = fresh_seed()
    model = build(seed, ltm_chunk=3, h_stride=2)
    lengths = [5, 2, 8]
    prompts = [tokens_for(seed + i, 1, n)[0].tolist() for i, n in enumerate(lengths)]
    nxt = tokens_for(seed + 9, len(lengths), 4)
    with torch.no_grad():
        alone = []
        for b, prompt in enumerate(prompts):
            state, _ = _row_state(model, prompt)
            logits = []
            for t in range(nxt.shape[1]):
                out = model.step(nxt[b:b + 1, t], state)
                logits.append(out.logits[0])
                state = out.state
            alone.append((torch.stack(logits), state))
        state = stack_states(model, [_row_state(model, p)[0] for p in prompts])
        pos = torch.tensor(lengths)
        for t in range(nxt.shape[1]):
            out = model.step_sync_free(nxt[:, t], state, pos + t)
            state = out.state
            for b in range(len(lengths)):
                torch.testing.assert_close(out.logits[b], alone[b][0][t], rtol=1e-12, atol=1e-12,
                                           msg=lambda m: f"seed={seed} row {b} token {t}: {m}")
    from hierarchos.generate import batch_dims

    for dim, (name, leaf) in zip(batch_dims(model), state.tensors()):
        for b in range(len(lengths)):
            ref = dict(alone[b][1].tensors())[name]
            torch.testing.assert_close(leaf.select(dim, b), ref.select(dim, 0), rtol=1e-12, atol=1e-12,
                                       msg=lambda m: f"seed={seed} row {b} state {name}: {m}")


# ---- no host synchronisation -------------------------------------------------------------------------

class HostReadError(AssertionError):
    pass


class NoHostReads(TorchDispatchMode):
    """Raises on every op whose result needs the tensor's values on the host: a scalar read
    (`.item()`, `bool(t)`, `int(t)`, `if t:`), data-dependent shapes (nonzero, boolean masks,
    unique, masked_select), or a comparison of whole tensors (`torch.equal`). On a GPU each is a
    device synchronisation and makes a CUDA graph capture fail."""

    FORBIDDEN = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "masked_select", "equal", "_unique",
                 "_unique2", "unique_dim", "unique_consecutive", "repeat_interleave", "allclose", "argwhere"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._overloadpacket.__name__
        if name in self.FORBIDDEN:
            raise HostReadError(f"host read: aten.{name}")
        if name in ("index", "index_put", "index_put_"):  # a boolean index has a data-dependent size
            indices = args[1] if len(args) > 1 else ()
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ()):
                raise HostReadError(f"host read: aten.{name} with a boolean mask")
        return func(*args, **(kwargs or {}))


def test_the_detector_catches_host_reads():
    x = torch.ones(3)
    for read in (lambda: x.sum().item(), lambda: bool(x.all()), lambda: int(x[0]), lambda: x[x > 0],
                 lambda: x.nonzero()):
        with pytest.raises(HostReadError), NoHostReads():
            read()


@pytest.mark.parametrize("name", ["all_on", "q_halting", "attention_window", "wkv4"])
def test_the_sync_free_step_reads_nothing_on_the_host_and_the_plain_step_does(name):
    seed = fresh_seed()
    model = build(seed, **CONFIGS[name])
    tokens = tokens_for(seed, 2, 6)
    with torch.no_grad():
        state = model.init_state(2)
        for t in range(tokens.shape[1]):
            hints = torch.tensor([a.push(int(x)) for a, x in zip(state.rosa, tokens[:, t])]) if state.rosa else None
            with NoHostReads():
                out = model.step_sync_free(tokens[:, t], state, torch.full((2,), t), hints)
            state = out.state
        state = model.init_state(2)
        with pytest.raises(HostReadError), NoHostReads():  # the host's early exit reads the masks
            for t in range(tokens.shape[1]):
                state = model.step(tokens[:, t], state).state


class NoHostTensors(TorchDispatchMode):
    """Raises on an op that mixes a host tensor into device work (a tensor built on the host and
    copied over, or a 0-dim host tensor read as a scalar): inside a CUDA graph capture the first is
    illegal and the second is baked in as a constant. Run on the meta device, where every tensor the
    step makes on purpose is on the device."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        devices = {t.device.type for t in tree_flatten((args, kwargs or {}))[0] if isinstance(t, torch.Tensor)}
        if "cpu" in devices and len(devices) > 1 or (func._overloadpacket.__name__ == "_to_copy"
                                                     and "cpu" in devices and (kwargs or {}).get("device") is not None):
            raise HostReadError(f"host tensor in device work: {func}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["all_on", "q_halting", "attention_window", "wkv4"])
def test_on_the_meta_device_the_sync_free_step_runs_and_the_plain_step_cannot(name):
    """Meta tensors have no data: any host read raises. The sync-free step runs through (so it
    reads nothing, whatever the op) and takes no host tensor in; the plain step stops at its first
    host decision."""
    model = build(0, **{**CONFIGS[name], "use_rosa": False}).to("meta")
    token = torch.zeros(2, dtype=torch.long, device="meta")
    with torch.no_grad():
        state = model.init_state(2, device="meta")
        with NoHostTensors():
            for t in range(4):
                out = model.step_sync_free(token, state, torch.full((2,), t, device="meta"))
                state = out.state
        assert out.logits.shape == (2, model.cfg.vocab_size) and out.logits.device.type == "meta"
        with pytest.raises((RuntimeError, NotImplementedError)):
            model.step(token, model.init_state(2, device="meta"))
        stepper = GraphedStepper(model, state, torch.full((2,), 4, device="meta"), out.logits, torch.zeros_like(
            out.logits, dtype=torch.bool), torch.tensor([1, 2], device="meta"), SamplingConfig(top_k=5), {})
        with NoHostTensors():
            stepper._body()  # the whole captured body: step, copies, history, sampling


def test_the_host_tensor_detector_catches_copies_and_host_scalars():
    x = torch.zeros(3, device="meta")
    for bad in (lambda: torch.tensor([1.0, 2.0, 3.0]).to("meta"), lambda: x + torch.tensor(2.0)):
        with pytest.raises(HostReadError), NoHostTensors():
            bad()


def test_the_generation_body_reads_nothing_on_the_host():
    """GraphedStepper's body (what the CUDA graph holds): step, state copy-back, history, sampling."""
    seed = fresh_seed()
    model = build(seed, dtype=torch.float32)
    cfg = SamplingConfig(temperature=0.8, top_k=5, top_p=0.9, repetition_penalty=1.3)
    with torch.no_grad():
        out = model(tokens_for(seed, 2, 5))
        stepper = GraphedStepper(model, out.state, torch.full((2,), 5), out.logits[:, -1],
                                 torch.zeros(2, model.cfg.vocab_size, dtype=torch.bool), torch.tensor([1, 2]), cfg, {})
        for _ in range(3):
            stepper.hints.copy_(torch.tensor([a.push(int(t)) for a, t in zip(out.state.rosa, stepper.token)]))
            with NoHostReads():
                stepper._body()
    assert int(stepper.counter[0]) == 3 and int(stepper.pos[0]) == 8


class _FullBody(GraphedStepper):
    """Every token on the full body (the pondering passes masked off the plan points): the reference
    for the stepper's plan-point split."""

    def _bodies(self):
        return ((True, True),)

    def _key(self):
        return True, True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["all_on", "q_halting", "deep"])
def test_cuda_graphs_of_the_split_step_equal_the_full_step(name):
    """On the GPU, captured: the graphs of the split step (plan-point tokens, memory chunk ends, the
    others) give the tokens and the state that one graph of the full step gives, over 13 tokens (plan
    points, chunk ends and others in turn)."""
    seed = fresh_seed()
    model = build(seed, dtype=torch.float32, **CONFIGS[name]).cuda()
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=16)
    runs = []
    with torch.no_grad():
        for cls in (GraphedStepper, _FullBody):
            out = model(tokens_for(seed, 2, 6).cuda())
            start = torch.tensor([6, 6], device="cuda")
            stepper = cls(model, out.state, start, out.logits[:, -1],
                          torch.zeros(2, model.cfg.vocab_size, dtype=torch.bool, device="cuda"),
                          torch.tensor([1, 2], device="cuda"), cfg, {}, capture=True)
            tokens = [stepper.token.clone()]
            for _ in range(13):
                hints = [a.push(int(t)) for a, t in zip(out.state.rosa, tokens[-1])] if out.state.rosa else None
                tokens.append(stepper.advance(hints).clone())
            runs.append((torch.stack(tokens), [t.clone() for t in stepper.leaves], set(stepper.graphs),
                         set(stepper._bodies())))
    (split_tokens, split_leaves, split_graphs, split_bodies), (full_tokens, full_leaves, full_graphs, _) = runs
    assert split_graphs == split_bodies and len(split_bodies) >= 3 and full_graphs == {(True, True)}
    assert torch.equal(split_tokens, full_tokens), (seed, split_tokens.T, full_tokens.T)
    for a, b in zip(full_leaves, split_leaves):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m: f"seed={seed} {name}: {m}")


def test_capture_outside_cuda_is_one_clear_error():
    model = build(0, dtype=torch.float32)
    with torch.no_grad():
        out = model(tokens_for(0, 1, 3))
    with pytest.raises(HierarchosError, match="cuda_graph=True needs the model on a CUDA device"):
        GraphedStepper(model, out.state, torch.tensor([3]), out.logits[:, -1],
                       torch.zeros(1, model.cfg.vocab_size, dtype=torch.bool), torch.tensor([0]), SamplingConfig(), {},
                       capture=True)


# ---- sampling ----------------------------------------------------------------------------------------

SAMPLING = [SamplingConfig(temperature=0.0, repetition_penalty=1.0), SamplingConfig(temperature=0.0),
            SamplingConfig(temperature=0.7, top_k=40, top_p=0.9, repetition_penalty=1.2),
            SamplingConfig(temperature=1.3, top_k=0, top_p=1.0, repetition_penalty=1.0),
            SamplingConfig(temperature=0.5, top_k=3, top_p=1.0, repetition_penalty=0.8),
            SamplingConfig(temperature=1.0, top_k=0, top_p=0.5, repetition_penalty=1.5)]


@pytest.mark.parametrize("cfg", SAMPLING, ids=lambda c: f"t{c.temperature}k{c.top_k}p{c.top_p}r{c.repetition_penalty}")
def test_sample_rows_equals_the_one_row_reference(cfg):
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    B, V = 6, 50
    logits = torch.randn(B, V, generator=g) * 3
    logits[0, :10] = logits[0, 10]  # ties
    histories = [torch.randint(0, V, (int(n),), generator=g).tolist() for n in torch.randint(0, 12, (B,), generator=g)]
    seen = torch.zeros(B, V, dtype=torch.bool)
    for b, history in enumerate(histories):
        seen[b, history] = True
    for counter in range(5):
        noise = row_noise(torch.arange(B) + seed, torch.full((B,), counter), V)
        with NoHostReads():
            rows = sample_rows(logits, seen, cfg, noise)
        ref = [sample_next(logits[b], histories[b], cfg, noise=noise[b]) for b in range(B)]
        assert rows.tolist() == ref, f"seed={seed} counter={counter}"


@pytest.mark.parametrize("cfg", SAMPLING, ids=lambda c: f"t{c.temperature}k{c.top_k}p{c.top_p}r{c.repetition_penalty}")
def test_one_row_sampling_on_the_candidates_is_the_full_vocabulary_rows(cfg):
    """`sample_next` with top-k works on the candidates only, their noise computed at their ids
    (`row_noise_at`, as `generate` passes it), the history as a mask: the same token as `sample_rows`
    on the whole vocabulary, at a vocabulary where the tails matter (ties at the k-th value included)."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    V = 3000
    for trial in range(20):
        logits = torch.randn(V, generator=g) * float(torch.rand((), generator=g) * 6 + 0.1)
        if trial % 4 == 0:  # a tie across the k-th value
            top = logits.topk(max(1, cfg.top_k) + 3).indices
            logits[top[-6:]] = float(logits[top[-4]])
        history = torch.randint(0, V, (int(torch.randint(0, 40, (), generator=g)),), generator=g).tolist()
        seen = torch.zeros(V, dtype=torch.bool)
        seen[history] = True
        seeds = torch.tensor([seed + trial])
        for counter in range(4):
            c = torch.tensor([counter])
            full = row_noise(seeds, c, V)
            assert torch.equal(row_noise_at(seeds, c, torch.tensor([7, 0, V - 1]))[0], full[0, [7, 0, V - 1]])
            want = int(sample_rows(logits[None], seen[None], cfg, full)[0])
            by_ids = sample_next(logits, [], cfg, noise=lambda ids: row_noise_at(seeds, c, ids)[0], seen=seen)
            by_list = sample_next(logits, history, cfg, noise=full[0])
            assert by_ids == by_list == want, f"seed={seed} trial={trial} counter={counter}"


def test_top_k_and_top_p_sampling_draws_from_the_truncated_distribution():
    """Oracle: logits whose top-k / top-p truncation is known by hand; over 20,000 counters the one-row
    sampler's frequencies match the renormalised kept probabilities (chi-square), and no dropped token
    is ever drawn."""
    seed = fresh_seed()
    probs = torch.tensor([0.05, 0.3, 0.02, 0.25, 0.2, 0.08, 0.1])
    cfg = SamplingConfig(temperature=1.0, top_k=5, top_p=0.85, repetition_penalty=1.0)
    # top-5: 0.3 0.25 0.2 0.1 0.08, renormalised by 0.93; before 0.1 the kept mass is 0.75 / 0.93 = 0.806
    # < 0.85 (kept), before 0.08 it is 0.85 / 0.93 = 0.914 (dropped)
    kept = {1: 0.3, 3: 0.25, 4: 0.2, 6: 0.1}
    n = 20000
    seeds = torch.tensor([seed])
    counts = torch.zeros(7)
    for counter in range(n):
        c = torch.tensor([counter])
        counts[sample_next(probs.log(), [], cfg, noise=lambda ids: row_noise_at(seeds, c, ids)[0])] += 1
    assert all(counts[i] == 0 for i in range(7) if i not in kept), f"seed={seed} {counts.tolist()}"
    total = sum(kept.values())
    chi2 = sum(float((counts[i] - n * p / total) ** 2 / (n * p / total)) for i, p in kept.items())
    assert chi2 < 40, f"seed={seed} counts {counts.tolist()} chi2 {chi2}"


def test_row_noise_values_are_pinned():
    """A seeded chat gives the same text in every release: the noise's values for two (seed, counter)
    pairs, as 23-bit integers (u = (n + 0.5) / 2^23), the same from `row_noise` and `row_noise_at`."""
    seeds, counters = torch.tensor([12345, 2**40 + 7]), torch.tensor([7, 0])
    want = [[5336214, 1321997, 8130479, 8168933, 351266], [2051920, 1118775, 6717993, 1966512, 7282764]]
    got = row_noise(seeds, counters, 5)
    assert torch.equal(got, (torch.tensor(want, dtype=torch.float32) + 0.5) / 2**23)
    assert torch.equal(row_noise_at(seeds, counters, torch.tensor([4, 1])), got[:, [4, 1]])
    assert row_noise_at(seeds.to(torch.int32), counters.to(torch.int32), torch.tensor([4], dtype=torch.int32)).dtype \
        == torch.float32


@pytest.mark.parametrize("form", ["one row", "rows"])
def test_sampling_rules_by_hand(form):
    """Oracles for each rule, in both forms: the repetition penalty (2) divides a seen positive logit and
    multiplies a seen negative one (so a seen 0.9 falls under an unseen 0.8, a seen -0.5 under -0.55);
    top-k 1 is greedy; top-p over tied weights keeps the lowest ids, the token that reaches top_p
    exactly dropped; large logits (exp would overflow without the max taken off) and rows far apart
    (each row takes its own max) sample as small ones do."""
    def pick(logits, cfg, seen_ids=(), counter=0):
        V = logits.shape[-1]
        seen = torch.zeros(V, dtype=torch.bool)
        seen[list(seen_ids)] = True
        noise = row_noise(torch.tensor([99]), torch.tensor([counter]), V)
        if form == "rows":
            return int(sample_rows(logits[None], seen[None], cfg, noise)[0])
        return sample_next(logits, list(seen_ids), cfg, noise=noise[0])

    greedy = SamplingConfig(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=2.0)
    assert pick(torch.tensor([0.9, 0.8, -3.0]), greedy) == 0
    assert pick(torch.tensor([0.9, 0.8, -3.0]), greedy, seen_ids=[0]) == 1     # 0.45 < 0.8
    assert pick(torch.tensor([2.0, 1.9, -3.0]), greedy, seen_ids=[0]) == 1     # 1.0 < 1.9
    assert pick(torch.tensor([-0.5, -0.55, -3.0]), greedy, seen_ids=[0]) == 1  # -1.0 < -0.55
    assert pick(torch.tensor([-0.5, -0.55, -3.0]), greedy, seen_ids=[2]) == 0  # -6.0: still last
    top1 = SamplingConfig(temperature=5.0, top_k=1, top_p=1.0, repetition_penalty=1.0)
    flat = torch.tensor([0.0, 0.3, 0.1, 0.29])
    assert {pick(flat, top1, counter=c) for c in range(40)} == {1}
    ties = SamplingConfig(temperature=1.0, top_k=0, top_p=0.5, repetition_penalty=1.0)
    four = torch.tensor([1.0, 1.0, 1.0, 1.0, float("-inf")])  # ids 0..3 tied, 4 weightless
    drawn = {pick(four, ties, counter=c) for c in range(200)}
    assert drawn == {0, 1}, drawn  # before id 2 the kept weight is exactly half: dropped
    wide = SamplingConfig(temperature=1.0, top_k=3, top_p=0.9, repetition_penalty=1.0)
    small = torch.tensor([0.5, 2.0, 1.0, -1.0, 1.5])
    for counter in range(30):
        assert pick(small + 200.0, wide, counter=counter) == pick(small, wide, counter=counter)
    if form == "rows":  # two rows 300 apart: each row's own weights
        noise = row_noise(torch.tensor([5, 6]), torch.tensor([0, 0]), 5)
        both = sample_rows(torch.stack([small, small + 300.0]), torch.zeros(2, 5, dtype=torch.bool), wide, noise)
        alone = [int(sample_rows(row[None], torch.zeros(1, 5, dtype=torch.bool), wide, n[None])[0])
                 for row, n in zip((small, small + 300.0), noise)]
        assert both.tolist() == alone


def test_one_row_sampling_from_a_generator_is_the_rows_form_on_its_draws():
    """Without counter-based noise the one-row form draws one uniform per vocabulary id from the
    generator (clamped away from 0): the rows form on those very uniforms picks the same token."""
    seed = fresh_seed()
    cfg = SamplingConfig(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.3)
    V = 500
    for trial in range(10):
        logits = torch.randn(V, generator=torch.Generator().manual_seed(seed + trial)) * 3
        got = sample_next(logits, [3, 7], cfg, generator=torch.Generator().manual_seed(trial))
        u = torch.rand(V, generator=torch.Generator().manual_seed(trial)).clamp(min=2.0**-24)
        seen = torch.zeros(1, V, dtype=torch.bool)
        seen[0, [3, 7]] = True
        assert got == int(sample_rows(logits[None], seen, cfg, u[None])[0]), f"seed={seed} trial={trial}"


def test_the_exponential_race_draws_from_the_distribution():
    """Oracle: over 20,000 counters the tokens' frequencies match p (chi-square, 3 degrees of freedom,
    p-value far below 1e-6 for a threshold of 40)."""
    seed = fresh_seed()
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    cfg = SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0)
    n = 20000
    noise = row_noise(torch.full((n,), seed), torch.arange(n), 4)
    tokens = sample_rows(probs.log().expand(n, 4), torch.zeros(n, 4, dtype=torch.bool), cfg, noise)
    counts = torch.bincount(tokens, minlength=4).double()
    chi2 = float(((counts - n * probs) ** 2 / (n * probs)).sum())
    assert chi2 < 40, f"seed={seed} counts {counts.tolist()} chi2 {chi2}"


def test_row_noise_is_a_function_of_seed_and_counter():
    seed = fresh_seed()
    V = 1000
    a = row_noise(torch.tensor([seed, seed + 1, seed]), torch.tensor([0, 0, 1]), V)
    alone = row_noise(torch.tensor([seed + 1]), torch.tensor([0]), V)
    assert torch.equal(a[1], alone[0])                      # a row's noise does not depend on the others
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2])
    assert float(a.min()) > 0 and float(a.max()) < 1
    big = row_noise(torch.tensor([seed]), torch.tensor([7]), 200_000)[0].double()
    assert abs(float(big.mean()) - 0.5) < 0.005 and abs(float(big.var()) - 1 / 12) < 0.002, seed
    assert torch.equal(row_noise(torch.tensor([2**62 + 5, -3]), torch.tensor([3, 3]), 10).isfinite(),
                       torch.ones(2, 10, dtype=torch.bool))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_cuda_graph_generation_equals_eager(temperature):
    """The captured body against the same body run eagerly on the GPU: the same tokens and the same
    state (the same kernels in the same order; tolerance for nondeterministic reductions), and no
    synchronisation inside a replay (torch's sync debug mode turned to errors)."""
    from hierarchos.generate import generate_batch

    seed = fresh_seed()
    model = build(seed, dtype=torch.float32).cuda()
    cfg = SamplingConfig(temperature=temperature, max_new_tokens=24)
    prompts = [tokens_for(seed + i, 1, n)[0].tolist() for i, n in enumerate([7, 3, 12])]
    eager = generate_batch(model, prompts, cfg, seeds=[1, 2, 3])
    graphed = generate_batch(model, prompts, cfg, seeds=[1, 2, 3], cuda_graph=True)
    assert graphed.tokens == eager.tokens, seed
    for (name, a), (_, b) in zip(eager.state.tensors(), graphed.state.tensors()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"seed={seed} {name}: {m}")

    plain = build(seed, dtype=torch.float32, use_rosa=False).cuda()
    with torch.no_grad():
        out = plain(tokens_for(seed, 2, 5).cuda())
        stepper = GraphedStepper(plain, out.state, torch.full((2,), 5, device="cuda"), out.logits[:, -1],
                                 torch.zeros(2, plain.cfg.vocab_size, dtype=torch.bool, device="cuda"),
                                 torch.tensor([1, 2], device="cuda"), cfg, {}, capture=True)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(5):
                stepper.advance()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert int(stepper.pos[0]) == 10 and set(stepper.graphs) == set(stepper._bodies())


def test_copy_into_copies_every_pair_in_one_foreach_for_equal_dtypes(monkeypatch):
    """The stepper's state write-back: every buffer gets its value (a cast where the dtypes differ), a
    value that is its buffer is skipped, and the equal-dtype pairs go through one foreach copy."""
    from hierarchos.generate import copy_into

    calls = []
    real = torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_copy_", lambda a, b: calls.append(len(a)) or real(a, b))
    buffers = [torch.zeros(3), torch.zeros(2, 2, dtype=torch.float64), torch.zeros(4), torch.zeros(1, dtype=torch.long)]
    same = buffers[2]
    values = [torch.arange(3.0), torch.ones(2, 2, dtype=torch.float32), same, torch.tensor([7])]
    same.fill_(5)
    copy_into(buffers, values)
    assert torch.equal(buffers[0], torch.arange(3.0))
    assert buffers[1].dtype == torch.float64 and torch.equal(buffers[1], torch.ones(2, 2, dtype=torch.float64))
    assert torch.equal(buffers[2], torch.full((4,), 5.0)) and torch.equal(buffers[3], torch.tensor([7]))
    assert calls == [2]  # buffers 0 and 3 (float32, long); 1 was cast by copy_, 2 is its own value
    with pytest.raises(ValueError):
        copy_into(buffers, values[:2])


@pytest.mark.parametrize("cfg", SAMPLING, ids=lambda c: f"t{c.temperature}k{c.top_k}p{c.top_p}r{c.repetition_penalty}")
def test_sampling_in_one_call_picks_the_torch_token(cfg, monkeypatch):
    """`sample_next` with chat's counter-based noise (`RowNoiseAt`) in one C++ call (ops/sampling_kernel.py)
    picks the token torch's ops pick (the call off), at a vocabulary where the tails matter, with ties at
    the k-th value, +-inf logits and a seen mask; a different pick may only be a near-tie of scores (the
    candidates' exp and log rounded by another library)."""
    from hierarchos.generate import RowNoiseAt, _top_p_weights
    from hierarchos.ops import sampling_kernel

    if not sampling_kernel.available():
        if os.environ.get("HIERARCHOS_REQUIRE_KERNEL") == "1":
            pytest.fail("HIERARCHOS_REQUIRE_KERNEL=1 but the C++ kernel (with sample_token) does not load")
        pytest.skip("C++ kernel not built")
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    V, calls, real = 5000, [], sampling_kernel._sample_token
    monkeypatch.setattr(sampling_kernel, "_sample_token", lambda *a: calls.append(1) or real(*a))
    for trial in range(40):
        logits = torch.randn(V, generator=g) * float(torch.rand((), generator=g) * 6 + 0.1)
        if trial % 3 == 0:
            top = logits.topk(max(1, cfg.top_k) + 3).indices
            logits[top[-6:]] = float(logits[top[-4]])
        if trial % 4 == 1:
            logits[torch.randint(0, V, (5,), generator=g)] = float("-inf")
        seen = torch.rand(V, generator=g) < 0.01
        noise = RowNoiseAt(seed + trial, trial)
        fast = sample_next(logits, [], cfg, noise=noise, seen=seen)
        with monkeypatch.context() as m:
            m.setattr(sampling_kernel, "_sample_token", None)
            slow = sample_next(logits, [], cfg, noise=noise, seen=seen)
            assert slow == sample_next(logits, [], cfg, noise=lambda ids: noise(ids), seen=seen)  # the key is not used
        if fast != slow:  # only a near-tie of the two tokens' scores, computed as torch does
            ref = logits.clone()
            if cfg.repetition_penalty != 1.0:
                ref[seen] = torch.where(ref[seen] > 0, ref[seen] / cfg.repetition_penalty,
                                        ref[seen] * cfg.repetition_penalty)
            ref = ref / cfg.temperature
            scores = _top_p_weights(ref, cfg.top_p) / -noise(torch.arange(V)).log()
            assert abs(float(scores[fast] - scores[slow])) <= 1e-5 * float(scores[slow]), f"seed={seed} trial={trial}"
    assert len(calls) == (40 if cfg.temperature > 0 else 0)


def test_sampling_call_falls_back_and_checks_its_arguments():
    from hierarchos.ops import sampling_kernel

    if not sampling_kernel.available():
        pytest.skip("C++ kernel not built")
    logits = torch.randn(100)
    logits[3] = float("nan")
    assert sampling_kernel.sample_token(logits, None, 1.2, 0.7, 5, 0.9, 1, 0) is None  # NaN: torch decides
    assert sampling_kernel.sample_token(torch.randn(100, dtype=torch.float64), None, 1.2, 0.7, 5, 0.9, 1, 0) is None
    assert sampling_kernel.sample_token(torch.randn(100), None, 1.2, 0.0, 5, 0.9, 1, 0) is None  # greedy: argmax
    raw = sampling_kernel._sample_token
    with pytest.raises(ValueError, match="seen must be"):
        raw(torch.randn(100).numpy(), torch.zeros(99, dtype=torch.bool).numpy(), 1.2, 0.7, 5, 0.9, 1, 0)
    with pytest.raises(ValueError, match="temperature"):
        raw(torch.randn(100).numpy(), None, 1.2, 0.0, 5, 0.9, 1, 0)
