"""The chunked prefill (hierarchos.prefill): aligned chunks run at position 0 compute what one parallel
forward over the whole prompt computes, from any starting position; on a GPU the captured graphs
compute what the same pieces run eagerly compute."""

from __future__ import annotations

import math
import random

import pytest
import torch

from hierarchos.errors import HierarchosError
from hierarchos.prefill import ChunkedPrefill, chunk_sizes, plan_pieces, require_fixed_size
from test_sync_free_step import build, fresh_seed

CONFIGS = {
    "all_on": {},
    "deep": dict(h_cycles=3, max_h_steps=3, max_l_steps=3, grad_steps=2, h_stride=3, h_layers=2),
    "q_halting": dict(halting="q"),
    "attention_window": dict(h_block="attention", window_size=3, l_block="attention", pos_encodings="rope"),
    "memory_chunk_3": dict(ltm_chunk=3, ltm_write_threshold=0.0),  # L = lcm(2, 3) = 6
    "stride1_no_rosa": dict(h_stride=1, use_rosa=False),
}


def test_pieces_cover_the_prompt_with_graphs_only_at_aligned_positions():
    rng = random.Random(fresh_seed())
    for _ in range(300):
        align = rng.choice([1, 2, 4, 6, 64])
        sizes = [align * 2 ** k for k in range(rng.randint(0, 4), -1, -1)]
        pos, n = rng.randrange(0, 500), rng.randrange(1, 700)
        pieces = plan_pieces(pos, n, align, sizes)
        assert sum(length for length, _ in pieces) == n
        at = pos
        for i, (length, graphed) in enumerate(pieces):
            if graphed:
                assert at % align == 0 and length in sizes
            else:  # an eager head (up to the next aligned position) or a tail shorter than the smallest graph
                assert i in (0, len(pieces) - 1) and (length < align or i == 0 and (pos + length) % align == 0)
            at += length
        graphed = [length for length, g in pieces if g]
        assert graphed == sorted(graphed, reverse=True)


def test_chunk_sizes_are_multiples_of_the_period_of_every_position_rule():
    build_cfg = build(0).cfg.replace(h_stride=4, ltm_chunk=6)
    assert build_cfg.position_period == 12 == math.lcm(4, 6)
    assert chunk_sizes(build_cfg, 100) == [96, 48, 24, 12]
    assert chunk_sizes(build_cfg, 5) == [12]


def _close(a, b, msg):
    assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-9, atol=1e-9), f"{msg}: differ by {(a - b).abs().max()}"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_chunked_prefill_is_one_forward_from_any_position(name):
    seed = fresh_seed()
    model = build(seed, **CONFIGS[name])
    g = torch.Generator().manual_seed(seed)
    align = model.cfg.position_period
    prefill = ChunkedPrefill(model, 2, max_chunk=4 * align)
    with torch.no_grad():
        for lead, length in ((0, 9 * align + 1), (1 + seed % (2 * align), 5 * align + 3), (align, 4 * align)):
            start = model.init_state(2)
            if lead:
                start = model(torch.randint(0, 7, (2, lead), generator=g), start).state
            prompt = torch.randint(0, 7, (2, length), generator=g)
            want = model(prompt, start.clone())
            logits, state = prefill(prompt, start.clone())
            msg = f"{name} seed={seed} lead={lead} length={length}"
            _close(logits, want.logits[:, -1], msg)
            assert state.pos == want.state.pos == lead + length
            for (key, x), (_, y) in zip(state.tensors(), want.state.tensors(), strict=True):
                _close(x, y, f"{msg}: state {key}")
            after = torch.randint(0, 7, (2, 3), generator=g)  # the ROSA automata and the state carry on alike
            _close(model(after, state).logits, model(after, want.state).logits, f"{msg}: next tokens")
    assert prefill.replays == 0  # nothing captured on the CPU: the graphed pieces ran eagerly at position 0


def test_the_pieces_at_position_zero_need_the_alignment():
    """Run a graphed piece at a position that is not a multiple of L and the answer changes: the
    check above would catch a wrong period."""
    seed = fresh_seed()
    model = build(seed, ltm_chunk=3, ltm_write_threshold=0.0)
    prompt = torch.randint(0, 7, (1, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        start = model(prompt[:, :2], model.init_state(1)).state
        want = model(prompt, start.clone()).logits[:, -1]
        wrong = ChunkedPrefill(model, 1, max_chunk=12)
        wrong.align, wrong.sizes = 2, [12, 6, 2]  # h_stride's period alone, ignoring the memory's 3
        got, _ = wrong(prompt, start.clone())
    assert not torch.allclose(got, want, rtol=1e-9, atol=1e-9), seed


def test_reasoning_caps_reach_every_piece():
    """chat's /mode caps (fewer cycles and steps) apply to the eager and the graphed pieces alike."""
    seed = fresh_seed()
    model = build(seed, **CONFIGS["deep"])
    caps = dict(h_cycles=2, max_h_steps=1, max_l_steps=2)
    prefill = ChunkedPrefill(model, 1, caps=caps, max_chunk=2 * model.cfg.position_period)
    prompt = torch.randint(0, 7, (1, 5 * model.cfg.position_period + 2), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        start = model(prompt[:, :1], model.init_state(1), **caps).state
        want = model(prompt[:, 1:], start.clone(), **caps)
        uncapped = model(prompt[:, 1:], start.clone())
        logits, state = prefill(prompt[:, 1:], start.clone())
    _close(logits, want.logits[:, -1], f"seed={seed}")
    assert not torch.allclose(uncapped.logits[:, -1], want.logits[:, -1], rtol=1e-9, atol=1e-9)
    assert prefill.capture_error is None and prefill.graphs == {}


def test_graphs_need_a_fixed_size_state():
    full = build(0, h_block="attention", l_block="attention", window_size=0, pos_encodings="rope")
    with pytest.raises(HierarchosError, match="fixed-size state.*--no-cuda-graph"):
        require_fixed_size(full)
    require_fixed_size(build(0, **CONFIGS["attention_window"]))
    require_fixed_size(build(0))


def test_capture_needs_cuda():
    model = build(0)
    with pytest.raises(HierarchosError, match="CUDA device"):
        ChunkedPrefill(model, 1, capture=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["all_on", "deep", "memory_chunk_3"])
def test_captured_prefill_is_the_eager_pieces_on_the_gpu(name):
    seed = fresh_seed()
    model = build(seed, dtype=torch.float32, **CONFIGS[name]).cuda()
    align = model.cfg.position_period
    eager = ChunkedPrefill(model, 1, max_chunk=8 * align)
    graphs = ChunkedPrefill(model, 1, max_chunk=8 * align, capture=True)
    g = torch.Generator().manual_seed(seed)
    graphed = 0
    with torch.no_grad():
        for lead, length in ((0, 15 * align + 1), (1, 8 * align + 2)):
            graphed += sum(1 for _, g_ in plan_pieces(lead, length, align, graphs.sizes) if g_)
            start = model.init_state(1, device="cuda")
            if lead:
                start = model(torch.randint(0, 7, (1, lead), generator=g).cuda(), start).state
            prompt = torch.randint(0, 7, (1, length), generator=g).cuda()
            want, want_state = eager(prompt, start.clone())
            got, got_state = graphs(prompt, start.clone())
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), f"{name} seed={seed}"
            for (key, x), (_, y) in zip(got_state.tensors(), want_state.tensors(), strict=True):
                assert torch.allclose(x, y, rtol=1e-4, atol=1e-5), f"{name} seed={seed}: {key}"
    assert graphs.capture_error is None and graphs.replays == graphed > 0


def test_a_failed_capture_leaves_every_piece_eager_and_says_why(monkeypatch):
    """The capture path with the CUDA calls stood in for: the second size's capture fails, so no graph
    is kept (a half set would be as good, but one rule is simpler to trust), the buffers hold the
    state as before, and prompts still prefill exactly."""
    seed = fresh_seed()
    model = build(seed)
    prefill = ChunkedPrefill(model, 1, max_chunk=4 * model.cfg.position_period)
    recorded = []

    def record(n, pool):
        if recorded:
            raise torch.AcceleratorError("CUDA error: operation not permitted when stream is capturing\nmore")
        recorded.append(n)
        prefill.graphs[n] = object()

    monkeypatch.setattr(prefill, "_warm", lambda warmup: [prefill._body(n) for n in prefill.sizes])
    monkeypatch.setattr(prefill, "_record", record)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    before = [t.clone() for t in prefill.leaves]
    prefill._capture(1)
    assert recorded == prefill.sizes[:1] and prefill.graphs == {}
    assert prefill.capture_error == "AcceleratorError: CUDA error: operation not permitted when stream is capturing"
    assert all(torch.equal(a, b) for a, b in zip(prefill.leaves, before))
    prompt = torch.randint(0, 7, (1, 5 * model.cfg.position_period + 1), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = model(prompt, model.init_state(1))
        logits, _ = prefill(prompt, model.init_state(1))
    _close(logits, want.logits[:, -1], f"seed={seed}")


def test_autocast_prefill_runs_the_matmuls_in_bfloat16_and_keeps_the_state_float32():
    """`autocast=torch.bfloat16` (what `train` runs): close to the float32 prefill at bfloat16's
    precision, not equal to it (autocast is on), the state and logits in float32, and generate_batch's
    eager path honours `prefill_autocast` too."""
    from hierarchos.generate import SamplingConfig, generate_batch

    seed = fresh_seed()
    model = build(seed, dtype=torch.float32)
    align = model.cfg.position_period
    prompt = torch.randint(0, 7, (1, 6 * align + 3), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        exact, _ = ChunkedPrefill(model, 1, max_chunk=2 * align)(prompt, model.init_state(1))
        prefill = ChunkedPrefill(model, 1, max_chunk=2 * align, autocast=torch.bfloat16)
        logits, state = prefill(prompt, model.init_state(1))
    assert logits.dtype == torch.float32 and all(t.dtype == torch.float32 for _, t in state.tensors())
    assert not torch.equal(logits, exact), seed
    assert torch.allclose(logits, exact, atol=0.1, rtol=0.1), f"seed={seed}: {(logits - exact).abs().max()}"
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=1)
    amp = generate_batch(model, [prompt[0].tolist()], cfg, prefill_autocast=torch.bfloat16)
    fp32 = generate_batch(model, [prompt[0].tolist()], cfg)
    # (no closeness check of the states: bf16 can flip a discrete decision, a memory write or a halt)
    pairs = list(zip((t for _, t in amp.state.tensors()), (t for _, t in fp32.state.tensors())))
    assert all(a.dtype == b.dtype for a, b in pairs), seed
    assert any(not torch.equal(a, b) for a, b in pairs), f"seed={seed}: generate_batch ignored prefill_autocast"


def _counting_backend(graphs: list):
    """A torch.compile backend that runs the traced graph as it is and records each one it is given."""
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return backend


@pytest.mark.parametrize("name", ["all_on", "deep"])
def test_compiled_blocks_prefill_is_one_forward_and_compiles_once_for_every_length(name):
    """`compile_blocks`: the blocks of the prefill's forward run compiled (dynamo traces them at load:
    the counting backend sees graphs), the answer is the eager forward's, prompts of several lengths
    from several positions (other chunk sizes, plan-point counts, heads and tails) compile nothing
    after the load (dynamic lengths, short pieces warmed), and outside the prefill's calls the
    blocks are as they were."""
    import torch._dynamo

    torch._dynamo.reset()
    seed = fresh_seed()
    model = build(seed, **CONFIGS[name])
    align = model.cfg.position_period
    graphs: list = []
    prefill = ChunkedPrefill(model, 1, max_chunk=4 * align, compile_blocks=_counting_backend(graphs))
    compiled_at_load = len(graphs)
    assert compiled_at_load > 0, "no block was compiled"
    # the recurrence is one operator inside the blocks' graphs (no graph break around it)
    ops = {str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == "call_function"}
    assert any("wkv7_no_grad" in op for op in ops), ops
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, length in enumerate((7 * align + 2, 4 * align + 5, 2 * align + align // 2 + 1)):
            prompt = torch.randint(0, 7, (1, length), generator=g)
            start = model.init_state(1)
            if i:
                start = model(prompt[:, :i], start).state
            want = model(prompt, start.clone())
            logits, state = prefill(prompt, start.clone())
            _close(logits, want.logits[:, -1], f"{name} seed={seed} length={length}")
            for (key, x), (_, y) in zip(state.tensors(), want.state.tensors(), strict=True):
                _close(x, y, f"{name} seed={seed} length={length}: state {key}")
        assert len(graphs) == compiled_at_load, f"{len(graphs) - compiled_at_load} compiles after the load"
    assert all(block._compiled_call_impl is None for block in prefill.block_calls.blocks)
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_captured_prefill_with_compiled_blocks_is_the_eager_pieces_on_the_gpu():
    """inductor-compiled blocks recorded in the chunk graphs: the eager pieces' answer (float32, TF32 off)."""
    seed = fresh_seed()
    model = build(seed, dtype=torch.float32, **CONFIGS["deep"]).cuda()
    align = model.cfg.position_period
    eager = ChunkedPrefill(model, 1, max_chunk=8 * align)
    compiled = ChunkedPrefill(model, 1, max_chunk=8 * align, capture=True, compile_blocks="inductor")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for length in (15 * align + 1, 8 * align + 2):
            prompt = torch.randint(0, 7, (1, length), generator=g).cuda()
            want, want_state = eager(prompt, model.init_state(1, device="cuda"))
            got, got_state = compiled(prompt, model.init_state(1, device="cuda"))
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), f"seed={seed}: {(got - want).abs().max()}"
            for (key, x), (_, y) in zip(got_state.tensors(), want_state.tensors(), strict=True):
                assert torch.allclose(x, y, rtol=1e-4, atol=1e-4), f"seed={seed}: {key}"
    assert compiled.capture_error is None and compiled.replays > 0


def test_generate_batch_with_a_compiled_prefill_generates_the_same_tokens():
    """generate_batch(compile_prefill=backend) on the CPU: the prompt through ChunkedPrefill with compiled
    blocks (no graphs), kept in `steppers` for the next call, and the same greedy tokens as without."""
    import torch._dynamo

    from hierarchos.generate import SamplingConfig, generate_batch

    torch._dynamo.reset()
    seed = fresh_seed()
    model = build(seed)
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 7, (3 * model.cfg.position_period + 1,), generator=g).tolist()
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=6)
    graphs, steppers = [], {}
    want = generate_batch(model, [prompt], cfg).tokens
    got = generate_batch(model, [prompt], cfg, compile_prefill=_counting_backend(graphs), steppers=steppers).tokens
    assert got == want, seed
    prefills = [p for key, p in steppers.items() if key[0] == "prefill"]
    assert len(prefills) == 1 and prefills[0].block_calls is not None and not prefills[0].graphs and graphs
    torch._dynamo.reset()
