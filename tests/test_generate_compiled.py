"""The compiled generation step (`GraphedStepper(compile_step=...)`, `generate_batch(compile_step=...)`)
against the eager step it compiles, on the CPU.

1. Both modes ("step": the whole `_advance` as one compiled function; "blocks": each RWKV block
   compiled) give the eager stepper's tokens, state and aux totals over several tokens, B = 1 and 2,
   rows at different positions, frozen worker tokens (early exit at init), rows ending at EOS.
   The fast tests trace with the "aot_eager" backend (dynamo + functionalization of the in-place
   state write-back, no code generation: the same ops, so equal to float rounding); the slow ones
   run inductor's C++ code (fp32 reassociation: a tolerance).
2. The whole step traces as one graph: no graph breaks (torch._dynamo.explain), with ROSA hints,
   DeepEmbed and the long-term memory on.
3. A compiled stepper is kept apart from an eager one in generate_batch's stepper cache, and a bad
   mode is a one-line error.
"""

from __future__ import annotations

import pytest
import torch

from hierarchos.errors import HierarchosError
from hierarchos.generate import GraphedStepper, SamplingConfig, generate_batch, row_noise
from hierarchos.model import HierarchosLM

from early_exit import calibrated

pytestmark = pytest.mark.usefixtures("one_thread")

def build(seed: int, **overrides) -> HierarchosLM:
    """The parity tests' calibrated tiny model in float32: plan points halt at different passes and
    worker tokens freeze at different passes."""
    return calibrated(seed, dtype=torch.float32, **overrides)


@torch.no_grad()
def start(model, prompts, seeds):
    """generate_batch's start of a batch: each prompt prefilled alone, states stacked."""
    from hierarchos.generate import stack_states

    outs = [model(torch.tensor([p]), model.init_state(1)) for p in prompts]
    state = stack_states(model, [o.state for o in outs]) if len(outs) > 1 else outs[0].state
    V = model.cfg.vocab_size
    seen = torch.zeros(len(prompts), V, dtype=torch.bool)
    for b, p in enumerate(prompts):
        seen[b, torch.tensor(p)] = True
    return (state, torch.tensor([o.state.pos for o in outs]), torch.cat([o.logits[:, -1] for o in outs]), seen,
            torch.tensor(seeds, dtype=torch.int64))


@torch.no_grad()
def stepped(model, prompts, cfg, n, **kw):
    """(tokens (n + 1, B), final leaves, totals) of a stepper fed its own samples n times."""
    state, *rest = start(model, prompts, seeds=list(range(11, 11 + len(prompts))))
    stepper = GraphedStepper(model, state, *rest, cfg, {}, **kw)
    tokens = [stepper.token.clone()]
    for i in range(n):
        if i == 1:  # compiled on the first call; later calls must reuse it (guards that hold), not recompile
            from torch._dynamo.utils import counters

            compiled_frames = counters["frames"]["ok"]
        hints = [a.push(int(t)) for a, t in zip(state.rosa, tokens[-1])] if state.rosa is not None else None
        tokens.append(stepper.advance(hints).clone())
    if kw.get("compile_step") and n > 1:
        assert counters["frames"]["ok"] == compiled_frames, "the compiled step recompiled"
    totals = {k: (torch.as_tensor(t).double(), torch.as_tensor(c).double()) for k, (t, c) in stepper.totals.items()}
    return torch.stack(tokens), [t.clone() for t in stepper.leaves], totals, stepper


def assert_same_run(eager, compiled, atol):
    tokens_e, leaves_e, totals_e, _ = eager
    tokens_c, leaves_c, totals_c, _ = compiled
    assert torch.equal(tokens_e, tokens_c), (tokens_e.T, tokens_c.T)
    assert len(leaves_e) == len(leaves_c)
    for a, b in zip(leaves_e, leaves_c):
        torch.testing.assert_close(b, a, atol=atol, rtol=atol)
    assert totals_e.keys() == totals_c.keys()
    for name in totals_e:
        torch.testing.assert_close(totals_c[name][0], totals_e[name][0], atol=atol * 10, rtol=atol)
        torch.testing.assert_close(totals_c[name][1], totals_e[name][1])


PROMPTS = {1: [[1, 2, 3, 4, 5]], 2: [[1, 2, 3, 4, 5], [6, 0, 2]]}  # two rows at different positions


@pytest.mark.parametrize("mode", ["step", "blocks"])
@pytest.mark.parametrize("batch", [1, 2])
def test_traced_step_equals_eager(mode, batch):
    model = build(3)
    cfg = SamplingConfig(temperature=0.9, top_k=20, top_p=0.95, repetition_penalty=1.3)
    eager = stepped(model, PROMPTS[batch], cfg, 5)
    compiled = stepped(model, PROMPTS[batch], cfg, 5, compile_step=mode, compile_backend="aot_eager")
    assert compiled[3].compile_seconds is not None and eager[3].compile_seconds is None
    assert_same_run(eager, compiled, atol=1e-5)


def test_the_model_really_freezes_worker_tokens_here():
    """The frozen-token path is exercised: some worker pass of the stepped tokens sees a frozen token
    (worker_steps below its cap), so the compiled masks are compared where they matter."""
    model = build(3)
    _, _, totals, _ = stepped(model, PROMPTS[2], SamplingConfig(temperature=0.0), 5)
    total, count = totals["worker_steps"]
    assert float(total) < model.cfg.max_l_steps * float(count)


@pytest.mark.parametrize("after_compile_blocks", [False, True])
def test_the_whole_step_traces_as_one_graph(after_compile_blocks, monkeypatch):
    """Also after `compile_blocks` made the multi-token recurrence a dynamo-disabled call in this
    process (training then chatting in one process; the full suite failed here): one token's
    recurrence is still traced."""
    import hierarchos.model.rwkv as rwkv

    if after_compile_blocks:
        monkeypatch.setattr(rwkv, "_wkv7_opaque", torch.compiler.disable(rwkv.wkv7))
    model = build(5)
    assert model.cfg.use_rosa and model.cfg.use_deepembed
    state, *rest = start(model, PROMPTS[2], seeds=[1, 2])
    stepper = GraphedStepper(model, state, *rest, SamplingConfig(temperature=0.8), {})
    args = (stepper.token, stepper.leaves, stepper.pos, stepper.counter, stepper.seen, stepper.seeds, stepper.hints)
    with torch.no_grad():
        explained = torch._dynamo.explain(stepper._advance)(*args)
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    assert explained.graph_count == 1


def test_generate_batch_compiled_equals_eager_with_rows_ending_at_eos():
    model = build(7)
    cfg = SamplingConfig(temperature=0.9, max_new_tokens=6)
    prompts = [[1, 2, 3, 4, 5], [6, 0, 2]]
    eager = generate_batch(model, prompts, cfg, seeds=[4, 9])
    eos = eager.tokens[0][2]  # row 0 ends at its third token; row 1 goes on (or ends at its own)
    eager = generate_batch(model, prompts, cfg, seeds=[4, 9], eos_id=eos, keep_eos=True)
    steppers: dict = {}
    import hierarchos.generate as G

    original = G.GraphedStepper.__init__

    def traced(self, *args, **kw):
        original(self, *args, **{**kw, "compile_backend": "aot_eager"})

    G.GraphedStepper.__init__ = traced
    try:
        compiled = generate_batch(model, prompts, cfg, seeds=[4, 9], eos_id=eos, keep_eos=True, compile_step=True,
                                  steppers=steppers)
    finally:
        G.GraphedStepper.__init__ = original
    assert compiled.tokens == eager.tokens and eager.tokens[0][-1] == eos and len(eager.tokens[0]) == 3
    for (_, a), (_, b) in zip(eager.state.tensors(), compiled.state.tensors()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    (key,) = steppers
    assert "step" in key  # the compiled stepper's cache key is not the eager one's


def test_a_bad_compile_mode_is_one_line():
    model = build(1)
    with pytest.raises(HierarchosError, match="compile_step='fast'.*step, blocks"):
        generate_batch(model, [[1, 2]], SamplingConfig(temperature=0.0, max_new_tokens=2), compile_step="fast")


def test_row_noise_traces_to_the_same_uniforms():
    """The counter-based noise is integer arithmetic: compiled (inductor's C++) it must give the same bits."""
    seeds, counters = torch.tensor([3, 2**40 + 5]), torch.tensor([0, 17])
    compiled = torch.compile(row_noise, backend="aot_eager", dynamic=False)
    assert torch.equal(compiled(seeds, counters, 50), row_noise(seeds, counters, 50))


# ---- inductor's generated code (slow: the whole tiny step compiles in ~2 minutes on one core) ----------


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["step", "blocks"])
@pytest.mark.parametrize("batch", [1, 2])
def test_inductor_step_equals_eager(mode, batch):
    model = build(3)
    cfg = SamplingConfig(temperature=0.9, top_k=20, top_p=0.95, repetition_penalty=1.3)
    eager = stepped(model, PROMPTS[batch], cfg, 4)
    compiled = stepped(model, PROMPTS[batch], cfg, 4, compile_step=mode)
    assert_same_run(eager, compiled, atol=1e-4)


# ---- on a GPU: the compiled step inside the stepper's CUDA graph ------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode, overrides", [("blocks", {}), ("step", dict(h_cycles=1, max_h_steps=1, max_l_steps=1))])
def test_compiled_step_in_a_cuda_graph_equals_the_eager_graph(mode, overrides):
    """Captured with the compiled calls inside (inductor's Triton kernels, cuBLAS between them) against the
    captured eager body: the same tokens, the state to float32 reassociation."""
    model = build(3, **overrides).cuda()
    cfg = SamplingConfig(temperature=0.8, max_new_tokens=12)
    prompts = [[1, 2, 3, 4, 5], [6, 0, 2], [3, 3, 1, 0, 6, 2, 5]]
    eager = generate_batch(model, prompts, cfg, seeds=[1, 2, 3], cuda_graph=True)
    steppers: dict = {}
    compiled = generate_batch(model, prompts, cfg, seeds=[1, 2, 3], cuda_graph=True, compile_step=mode,
                              steppers=steppers)
    (stepper,) = [s for key, s in steppers.items() if key[0] != "prefill"]  # the prompt's chunk graphs apart
    assert set(stepper.graphs) == set(stepper._bodies()) and stepper.compile_seconds is not None
    assert compiled.tokens == eager.tokens
    for (name, a), (_, b) in zip(eager.state.tensors(), compiled.state.tensors()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("mode", ["step", "blocks"])
def test_traced_step_with_the_fused_kernels_equals_eager(mode, monkeypatch):
    """What chat runs on CUDA by default (compiled blocks around the fused one-token kernels: the products',
    the low-rank paths' and the time mix's custom ops), traced by dynamo and AOT autograd with the kernels
    run by Triton's interpreter: the same tokens and state as the eager step, and no recompile per token."""
    from hierarchos.ops.wkv_triton import triton

    if triton is None:
        pytest.skip("triton does not import")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = build(3)
    cfg = SamplingConfig(temperature=0.9, top_k=20, top_p=0.95, repetition_penalty=1.3)
    eager = stepped(model, PROMPTS[2], cfg, 4)
    compiled = stepped(model, PROMPTS[2], cfg, 4, compile_step=mode, compile_backend="aot_eager", fused_step=True)
    assert_same_run(eager, compiled, atol=1e-5)
