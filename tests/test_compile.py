"""`compile_blocks` (torch.compile of the RWKV blocks, `train --compile`) computes the
same function: loss, every gradient and the step form equal eager mode. The CPU test traces with
dynamo's "eager" backend (graph capture and the graph break around the recurrence are what can go
wrong here; inductor's code generation is exercised on the GPU by `bash bench/gpu.sh train-compile`)."""

from __future__ import annotations

import pytest
import torch

from hierarchos.config import tiny_config
from hierarchos.model import HierarchosLM
from hierarchos.model.losses import lm_loss
from hierarchos.model.rwkv import RWKVBlock, compile_blocks


def _run(compiled: bool):
    torch.manual_seed(0)
    model = HierarchosLM(tiny_config(vocab_size=64))
    if compiled:
        assert compile_blocks(model, backend="eager") == sum(isinstance(m, RWKVBlock) for m in model.modules())
    names = [n for n, _ in model.named_parameters()]
    tokens, targets = torch.randint(0, 64, (2, 13)), torch.randint(0, 64, (2, 13))
    loss, _ = lm_loss(model(tokens), targets, 1e-4)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    state, logits = model.init_state(2), []
    with torch.no_grad():
        for t in range(4):
            out = model.step(tokens[:, t], state)
            state = out.state
            logits.append(out.logits)
    return names, loss.detach(), grads, torch.stack(logits, 1)


def test_compiled_blocks_compute_the_same_function():
    names, loss, grads, steps = _run(False)
    c_names, c_loss, c_grads, c_steps = _run(True)
    assert c_names == names  # in-place compile: parameter names (and so checkpoints) unchanged
    torch.testing.assert_close(c_loss, loss, rtol=1e-6, atol=1e-7)
    assert grads.keys() == c_grads.keys() and len(grads) == len(names)
    for name in grads:
        torch.testing.assert_close(c_grads[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)
    torch.testing.assert_close(c_steps, steps, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_inductor_compiled_blocks_match_eager_on_cuda(monkeypatch):
    """Inductor's generated kernels compute the same gradients (float32, TF32 off: under bf16 the
    two runs round differently, and small low-rank gradients differ by a few percent). The recurrence
    is our exact Triton kernel in both: 'auto' would pick fla's chunked kernel for this small call,
    whose TF32-class rounding (up to ~2e-3) is not what this test is about."""
    monkeypatch.setenv("HIERARCHOS_WKV_IMPL", "triton")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    eager = HierarchosLM(tiny_config(vocab_size=64, context_dim=64, h_hidden=64, l_hidden=64, head_size=16)).cuda()
    compiled = HierarchosLM(eager.cfg).cuda()
    compiled.load_state_dict(eager.state_dict())
    compile_blocks(compiled)
    tokens = torch.randint(0, 64, (4, 64), device="cuda")
    for model in (eager, compiled):
        loss, _ = lm_loss(model(tokens), tokens, 1e-4)
        loss.backward()
    for (name, p), (_, q) in zip(eager.named_parameters(), compiled.named_parameters()):
        if p.grad is not None:
            rel = (p.grad - q.grad).norm() / p.grad.norm().clamp_min(1e-12)
            assert rel < 1e-3, (name, float(rel))


def test_compile_blocks_compiles_every_block_and_runs_the_compiled_graphs():
    """compile_blocks really compiles: each block gets a compiled call, and a forward runs graphs that
    the backend compiled (a backend that records what it is given; nothing compiled records nothing)."""
    torch._dynamo.reset()
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.manual_seed(0)
    model = HierarchosLM(tiny_config(vocab_size=64))
    blocks = [m for m in model.modules() if isinstance(m, RWKVBlock)]
    assert compile_blocks(model, backend=recording_backend) == len(blocks) > 0
    assert all(b._compiled_call_impl is not None for b in blocks)
    model(torch.randint(0, 64, (2, 9)))
    assert graphs, "no graph reached the backend: nothing was compiled"
    ops = {str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == "call_function"}
    assert any("linear" in op or "matmul" in op for op in ops), ops  # the blocks' projections are in them


def test_deeper_stacks_compile_no_more_variants():
    """One compiled variant serves every layer: the forward reads no per-layer integer (dynamo guards on
    an int attribute's value, so `layer_id == 0` once compiled a variant per layer). A model with twice
    the layers per stack compiles the same number of graphs."""
    counts = []
    for layers in (2, 4):
        torch._dynamo.reset()
        graphs = []
        torch.manual_seed(0)
        model = HierarchosLM(tiny_config(vocab_size=64, h_layers=layers, l_layers=layers))
        compile_blocks(model, backend=lambda gm, example_inputs: graphs.append(gm) or gm.forward)
        with torch.no_grad():
            model(torch.randint(0, 64, (2, 9)))
        counts.append(len(graphs))
    torch._dynamo.reset()
    assert counts[0] > 0 and counts[1] == counts[0], counts


def test_compile_default_is_on_only_for_captured_cuda_training(monkeypatch):
    import importlib.util

    from hierarchos.cli.train import resolve_compile

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "triton" else None)
    assert resolve_compile(None, "cuda", True) is True
    assert resolve_compile(None, "cuda", False) is False    # eager windows: compiling was not measured to pay
    assert resolve_compile(None, "cpu", False) is False
    assert resolve_compile(False, "cuda", True) is False    # --no-compile
    assert resolve_compile(True, "cpu", False) is True      # --compile asked for
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert resolve_compile(None, "cuda", True) is False     # no triton: inductor cannot build GPU code


def test_a_block_that_fails_to_compile_runs_eagerly_when_falling_back():
    """The default-on compile (fall_back=True) must never stop training: a backend that raises leaves the
    blocks eager with the eager values; asked for explicitly (fall_back=False) the failure is raised."""
    import torch._dynamo

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no compiler here")

    before = torch._dynamo.config.suppress_errors
    try:
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = HierarchosLM(tiny_config(vocab_size=64))
        tokens = torch.randint(0, 64, (2, 9))
        with torch.no_grad():
            want = model(tokens).logits
        compile_blocks(model, backend=broken_backend)
        with pytest.raises(Exception, match="no compiler here"):
            model(tokens)
        torch._dynamo.reset()
        compile_blocks(model, backend=broken_backend, fall_back=True)
        assert torch._dynamo.config.suppress_errors is True
        with torch.no_grad():
            torch.testing.assert_close(model(tokens).logits, want, rtol=0, atol=0)
    finally:
        torch._dynamo.config.suppress_errors = before
        torch._dynamo.reset()


def _memory_run(memory, T, pos0, seed=0):
    """reads, new state, and the gradients of e and of the memory's parameters for one call."""
    gen = torch.Generator().manual_seed(seed)
    dev = memory.keys.device
    e = torch.randn(2, T, memory.query.in_features, generator=gen).to(dev).requires_grad_()
    state = {k: (v + 0.01 * torch.randn(v.shape, generator=gen).to(dev)) if k != "writes" else v
             for k, v in memory.init_state(2, memory.query.in_features, dev).items()}
    memory.zero_grad()
    reads, new = memory(e, state, pos0)
    loss = reads.pow(2).sum() + new["delta"].pow(2).sum() + new["momentum"].sum() + new["surprise"].pow(2).sum()
    loss.backward()
    # (write_gates get no gradient from a call in which no chunk closes)
    return reads, new, e.grad, {n: None if p.grad is None else p.grad.clone() for n, p in memory.named_parameters()}


def _assert_same_memory_run(got, want, rtol, atol):
    torch.testing.assert_close(got[0], want[0], rtol=rtol, atol=atol)
    for key in want[1]:
        torch.testing.assert_close(got[1][key], want[1][key], rtol=rtol, atol=atol, msg=key)
    torch.testing.assert_close(got[2], want[2], rtol=rtol, atol=atol, msg="e.grad")
    for name in want[3]:
        if want[3][name] is None:
            assert got[3][name] is None, name
        else:
            torch.testing.assert_close(got[3][name], want[3][name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("T, pos0", [(23, 5), (8, 0), (3, 1)])  # chunks cut mid-way, whole, none closed
def test_compiled_memory_segments_compute_the_same_function(T, pos0):
    from hierarchos.model.memory import LongTermMemory

    torch._dynamo.reset()
    torch.manual_seed(0)
    memory = LongTermMemory(16, 32, 8, 8, 3, 4, 0.0)
    want = _memory_run(memory, T, pos0)
    assert memory.compile_segments(backend="aot_eager") is True
    _assert_same_memory_run(_memory_run(memory, T, pos0), want, 1e-5, 1e-6)
    memory.uncompile_segments()
    assert memory._segment_call is None


def test_compile_blocks_leaves_the_memory_eager_under_cpu_inductor():
    """CPU inductor gave the memory's segment wrong gradients (see compile_segments): compile_blocks
    compiles it with any backend but that one, and on CUDA."""
    model = HierarchosLM(tiny_config(vocab_size=64))
    assert model.memory.compile_segments("inductor") is False and model.memory._segment_call is None
    assert model.memory.compile_segments() is False  # inductor is the default
    compile_blocks(model, backend="eager")
    assert model.memory._segment_call is not None
    from hierarchos.model.rwkv import uncompile_blocks
    uncompile_blocks(model)
    assert model.memory._segment_call is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("T, pos0", [(23, 5), (512, 0)])
def test_inductor_compiled_memory_matches_eager_on_cuda(T, pos0):
    from hierarchos.model.memory import LongTermMemory

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch._dynamo.reset()
    torch.manual_seed(0)
    memory = LongTermMemory(64, 256, 32, 32, 4, 64, 0.0).cuda()
    want = _memory_run(memory, T, pos0)
    assert memory.compile_segments() is True
    _assert_same_memory_run(_memory_run(memory, T, pos0), want, 1e-4, 1e-5)


def _block_saved_bytes(budget: float | None) -> tuple[int, dict]:
    """Bytes a compiled block's forward saves for its backward (parameters aside) under `budget`, and
    the gradients of one backward. The "aot_eager_decomp_partition" backend runs the same min-cut
    partition as inductor (where the budget acts) without generating code."""
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = HierarchosLM(tiny_config(vocab_size=64))
    block = next(m for m in model.modules() if isinstance(m, RWKVBlock))
    compile_blocks(block, backend="aot_eager_decomp_partition", memory_budget=budget)
    B, T, C = 2, 16, block.ln_time.normalized_shape[0]
    N = block.time_mix.head_size
    x = torch.randn(B, T, C, requires_grad=True)
    args = (x, torch.zeros(B, C), torch.zeros(B, C // N, N, N), torch.zeros(B, C))
    params = {p.data_ptr() for p in block.parameters()}
    storages = {}

    def pack(t):
        if t.dtype.is_floating_point and t.data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = block(*args)[0]
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}
    grads["x"] = x.grad.clone()
    return sum(storages.values()), grads


def test_an_activation_budget_recomputes_instead_of_saving(monkeypatch):
    """compile_blocks(memory_budget=): the compiled block saves less for its backward and computes the
    same gradients (recomputed in the backward); the setting is torch's process-wide one, and below 1 the
    chunk-parallel WKV backward's default recomputes its start states too (also process-wide)."""
    import torch._functorch.config as functorch_config
    from hierarchos.ops import wkv_chunk_grad_triton as chunk_grad

    monkeypatch.setattr(functorch_config, "activation_memory_budget", functorch_config.activation_memory_budget)
    monkeypatch.setattr(chunk_grad, "RECOMPUTE_STATES", False)
    full, grads = _block_saved_bytes(None)
    assert functorch_config.activation_memory_budget == 1.0  # None leaves torch's setting
    assert not chunk_grad.RECOMPUTE_STATES
    low, low_grads = _block_saved_bytes(0.1)
    assert functorch_config.activation_memory_budget == 0.1 and chunk_grad.RECOMPUTE_STATES
    assert 0 < low < 0.75 * full, (low, full)  # (the opaque recurrence saves its own part either way)
    assert low_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(low_grads[name], grads[name], rtol=1e-5, atol=1e-6, msg=name)
    torch._dynamo.reset()


def test_an_activation_budget_below_1_has_the_memory_recompute_its_chunks(monkeypatch):
    """compile_blocks(memory_budget=F) turns the long-term memory's recomputed chunks on below 1 and off at 1;
    without a budget it leaves them as they were."""
    import torch._functorch.config as functorch_config
    from hierarchos.ops import wkv_chunk_grad_triton as chunk_grad

    monkeypatch.setattr(functorch_config, "activation_memory_budget", functorch_config.activation_memory_budget)
    monkeypatch.setattr(chunk_grad, "RECOMPUTE_STATES", False)
    model = HierarchosLM(tiny_config(vocab_size=64))
    memory = model.memory
    assert not memory.recompute
    compile_blocks(model, backend="aot_eager")
    assert not memory.recompute
    compile_blocks(model, backend="aot_eager", memory_budget=0.5)
    assert memory.recompute
    compile_blocks(model, backend="aot_eager", memory_budget=1.0)
    assert not memory.recompute
    torch._dynamo.reset()


@pytest.mark.parametrize("budget", [0.0, -0.5, 1.5])
def test_compile_blocks_rejects_a_budget_outside_0_1(budget):
    with pytest.raises(ValueError, match=r"memory_budget must be in \(0, 1\]"):
        compile_blocks(HierarchosLM(tiny_config(vocab_size=64)), backend="eager", memory_budget=budget)
