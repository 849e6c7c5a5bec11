"""GraphedWindow's bookkeeping (static buffers, chained state, ROSA outside the graph, phases,
gradient accumulation) on the CPU, where it runs its captured function eagerly: windows through it
must equal plain forward/backward windows. The capture itself is checked against eager execution
on the GPU by bench/bench_train.py --cuda-graphs (and test_capture_on_cuda_matches_eager here)."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hierarchos.config import tiny_config
from hierarchos.model import HierarchosLM
from hierarchos.model.losses import lm_loss
from hierarchos.train import cuda_graph
from hierarchos.train.batches import TokenStreams
from hierarchos.train.cuda_graph import GraphedWindow
from hierarchos.train.trainer import TrainConfig, Trainer

REPO = Path(__file__).resolve().parents[1]


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**31)


def _model(seed, device="cpu"):
    torch.manual_seed(seed)
    return HierarchosLM(tiny_config(vocab_size=32)).to(device)


def _windows(seed, n, B=2, T=8, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 32, (B, T), generator=g).to(device), torch.randint(0, 32, (B, T), generator=g).to(device))
            for _ in range(n)]


def _loss(model):
    return lambda out, y: lm_loss(out, y, model.cfg.z_loss_weight)


def _eager_run(model, windows):
    """The reference: plain forward + loss + backward per window, state detached between windows."""
    state, losses = None, []
    for x, y in windows:
        out = model(x, state)
        loss, _ = _loss(model)(out, y)
        loss.backward()
        state = out.state.detach()
        losses.append(loss.detach())
    return losses, state


def _graphed_run(model, windows, **kw):
    window, state, losses = GraphedWindow(model, _loss(model), capture=False, log=lambda *_: None, **kw), None, []
    for x, y in windows:
        loss, _, state = window(x, y, state)
        losses.append(loss.detach().clone())
    return losses, state, window


def _assert_same(a_model, b_model, a_losses, b_losses, a_state, b_state, seed):
    for i, (a, b) in enumerate(zip(a_losses, b_losses)):
        torch.testing.assert_close(a, b, msg=lambda m: f"seed={seed} window {i}: {m}")
    for (name, p), q in zip(a_model.named_parameters(), b_model.parameters()):
        assert (p.grad is None) == (q.grad is None), f"seed={seed} {name}"
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=lambda m: f"seed={seed} grad {name}: {m}")
    assert a_state.pos == b_state.pos
    for (name, s), (_, t) in zip(a_state.tensors(), b_state.tensors()):
        torch.testing.assert_close(s, t, msg=lambda m: f"seed={seed} state {name}: {m}")


def test_chained_windows_equal_plain_windows():
    """Three windows with the state carried (ROSA hints, memory chunks, plan points all in play):
    losses, accumulated gradients and the final state equal the plain loop's."""
    seed = fresh_seed()
    windows = _windows(seed, 3)
    ref_model, model = _model(seed), _model(seed)
    ref_losses, ref_state = _eager_run(ref_model, windows)
    losses, state, window = _graphed_run(model, windows)
    _assert_same(ref_model, model, ref_losses, losses, ref_state, state, seed)
    assert len(window.entries) == 1 and window.replays == 3  # one shape and phase: one entry, reused
    # the returned state lives in the entry's buffers, so the next window needs no copy
    entry = next(iter(window.entries.values()))
    assert [t.data_ptr() for _, t in state.tensors()] == [t.data_ptr() for t in entry.leaves]
    assert [a.num_tokens for a in state.rosa] == [24, 24]  # ROSA automata advanced outside the buffers
    # a new stream (state None, as at an epoch start) through the same entry: its zero state is copied in
    second, _, _ = window(*windows[1], None)
    fresh_losses, _ = _eager_run(_model(seed), windows[1:2])
    torch.testing.assert_close(second, fresh_losses[0], msg=lambda m: f"seed={seed} restart: {m}")


def test_a_foreign_state_is_copied_in_and_phases_get_their_own_entries():
    seed = fresh_seed()
    windows = _windows(seed, 2, T=8) + _windows(seed + 1, 1, T=6) + _windows(seed + 2, 1, T=8)
    ref_model, model = _model(seed), _model(seed)
    ref_losses, ref_state = _eager_run(ref_model, windows)
    losses, state, window = _graphed_run(model, windows)
    _assert_same(ref_model, model, ref_losses, losses, ref_state, state, seed)
    # T=8 from position 0 and 8 share a phase (period lcm(4, 2) = 4); T=6 at 16 is a new shape;
    # T=8 at 22 (phase 2) a new phase
    assert sorted(k[1:3] for k in window.entries) == [(6, 0), (8, 0), (8, 2)], list(window.entries)


def test_more_shapes_than_kept_run_eagerly_and_say_so(monkeypatch):
    seed = fresh_seed()
    monkeypatch.setattr(cuda_graph, "MAX_GRAPHS", 1)
    windows = _windows(seed, 1, T=8) + _windows(seed + 1, 1, T=4)
    ref_model, model = _model(seed), _model(seed)
    ref_losses, ref_state = _eager_run(ref_model, windows)
    lines = []
    window, state, losses = GraphedWindow(model, _loss(model), capture=False, log=lines.append), None, []
    for x, y in windows:
        loss, _, state = window(x, y, state)
        losses.append(loss.detach())
    _assert_same(ref_model, model, ref_losses, losses, ref_state, state, seed)
    assert len(window.entries) == 1 and len(lines) == 1 and "run eagerly" in lines[0], lines


def test_windows_the_model_decides_on_the_host_run_eagerly_and_still_accumulate():
    """Under capture, a 1-token window and a window with one plan point run eagerly (the model
    reads a tensor on the host there); their gradients still add into the captured windows'
    .grad tensors and count as reached, so accumulated gradients equal plain windows'."""
    seed = fresh_seed()
    windows = _windows(seed, 2, T=8) + _windows(seed + 1, 1, T=1) + _windows(seed + 2, 1, T=2)
    ref_model, model = _model(seed), _model(seed)
    ref_losses, ref_state = _eager_run(ref_model, windows)
    window, state, losses = GraphedWindow(model, _loss(model), capture=True, recorder=cuda_graph.record_eagerly,
                                          log=lambda *_: None), None, []
    grads = None
    for i, (x, y) in enumerate(windows):
        loss, _, state = window(x, y, state)
        losses.append(loss.detach().clone())
        if i == 1:
            grads = {id(p): p.grad for p in model.parameters() if p.grad is not None}
    _assert_same(ref_model, model, ref_losses, losses, ref_state, state, seed)
    assert [k[1] for k in window.entries] == [8]  # T=1 at 16 and T=2 at 17 (one plan point: 17) ran eagerly
    assert all(p.grad is grads[id(p)] for p in model.parameters() if id(p) in grads)  # the same tensors
    assert window.reached == {id(p) for p in model.parameters() if p.grad is not None}


def _trainer(seed, mode, **overrides):
    """mode: 'eager', 'buffers' (GraphedWindow without capture) or 'recorded' (the capture path
    with `record_eagerly` standing in for the CUDA graph: gradients kept and zeroed in place)."""
    torch.manual_seed(seed)
    model = HierarchosLM(tiny_config(vocab_size=32, **overrides))
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, 8, (int(n),), generator=g).tolist() for n in torch.randint(20, 60, (6,), generator=g)]
    streams = TokenStreams.from_documents(docs, eos_id=31, batch_size=2, chunk=12)
    cfg = TrainConfig(epochs=2, batch_size=2, accumulation_steps=2, starting_lr=3e-3, min_lr=1e-4,
                      warmup_steps=2, log_every=1, cuda_graphs=mode != "eager")
    trainer = Trainer(model, streams, cfg, torch.device("cpu"), log=lambda *_: None)
    if mode == "recorded":
        trainer.graphed.capture, trainer.graphed.recorder = True, cuda_graph.record_eagerly
        trainer.drop_grads = False
    return trainer


@pytest.mark.parametrize("reasoning", ["default", "minimal"])
def test_trainer_with_graphed_windows_trains_the_same_run(reasoning):
    """Two epochs with accumulation over 2 windows, the state carried, the last window of an epoch
    shorter: weights and logged losses equal the eager trainer's, with and without the capture
    path's gradient handling. The minimal reasoning config leaves the worker's drift projection
    unreached: its gradient must stay None (AdamW's weight decay would move it on a zero one)."""
    seed = fresh_seed()
    overrides = dict(h_cycles=1, max_h_steps=1, max_l_steps=0) if reasoning == "minimal" else {}
    runs = {}
    for mode in ("eager", "buffers", "recorded"):
        trainer, records = _trainer(seed, mode, **overrides), []
        trainer.log_metrics = records.append
        trainer.run()
        runs[mode] = (trainer, records)
    eager, eager_log = runs["eager"]
    for mode in ("buffers", "recorded"):
        graphed, graphed_log = runs[mode]
        assert graphed.graphed.replays + graphed.graphed.eager_windows == eager.micro_step
        assert [r["loss"] for r in graphed_log] == pytest.approx([r["loss"] for r in eager_log], rel=1e-5), \
            (seed, mode)
        for (name, p), q in zip(eager.model.named_parameters(), graphed.model.parameters()):
            torch.testing.assert_close(p, q, msg=lambda m: f"seed={seed} {mode} {name}: {m}")
    recorded = runs["recorded"][0]
    assert all(e.replay is not None for e in recorded.graphed.entries.values())
    unreached = recorded.model.reasoner.l_drift_proj.weight
    assert (unreached.grad is None) == (reasoning == "minimal")


def test_capture_needs_cuda():
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device"):
        GraphedWindow(_model(0), _loss(_model(0)), capture=True)


def test_cli_cuda_graphs_on_cpu_is_one_line_exit_2(tmp_path):
    result = subprocess.run([sys.executable, "hierarchos_cli.py", "train", "--tiny", "--device", "cpu",
                             "--cuda-graphs", "--max-steps", "1", "--tokenizer-path", "byte", "--out-dir",
                             str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True, timeout=240,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    assert "--cuda-graphs needs a CUDA device" in lines[-1], lines


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_capture_on_cuda_matches_eager():
    seed = fresh_seed()
    windows = _windows(seed, 3, device="cuda")
    ref_model, model = _model(seed, "cuda"), _model(seed, "cuda")
    ref_losses, ref_state = _eager_run(ref_model, windows)
    window, state, losses = GraphedWindow(model, _loss(model), log=lambda *_: None), None, []
    assert window.capture
    for x, y in windows:
        loss, _, state = window(x, y, state)
        losses.append(loss.detach().clone())
    _assert_same(ref_model, model, ref_losses, losses, ref_state, state, seed)


def test_cuda_graphs_default_on_for_one_cuda_process_with_whole_windows():
    from hierarchos.cli.train import resolve_cuda_graphs

    assert resolve_cuda_graphs(None, "cuda", False, None, 512) is True
    assert resolve_cuda_graphs(None, "cuda", False, 512, 512) is True   # cut at the window's end only
    assert resolve_cuda_graphs(None, "cuda", False, 32, 512) is False   # cuts inside a window
    assert resolve_cuda_graphs(None, "cuda", True, None, 512) is False  # torchrun
    assert resolve_cuda_graphs(None, "cpu", False, None, 512) is False
    assert resolve_cuda_graphs(False, "cuda", False, None, 512) is False  # --no-cuda-graphs
    assert resolve_cuda_graphs(True, "cpu", False, None, 512) is True     # explicit: the CLI then says why not
    assert resolve_cuda_graphs(None, "cuda", False, None, 512, checkpointing=True) is False
    assert resolve_cuda_graphs(None, "cuda", False, None, 512, fp16=True) is False
    assert resolve_cuda_graphs(True, "cuda", False, None, 512, checkpointing=True) is True
    assert resolve_cuda_graphs(None, "cuda", False, None, 512, lora=True) is False  # finetune


def test_a_failed_capture_says_so_once_and_that_shape_runs_eagerly():
    """Whatever a capture refuses (an op that cannot be captured), training goes on: the window
    runs eagerly with the gradients kept as they were, and later windows of the shape do too."""
    seed = fresh_seed()
    windows = _windows(seed, 3, T=8)
    ref_model, model = _model(seed), _model(seed)
    ref_losses, ref_state = _eager_run(ref_model, windows)
    calls = []

    def refusing_recorder(run, warmup, before_capture):
        for _ in range(warmup):  # the warm-up really runs, as on a GPU; then the capture fails
            run()
        before_capture()
        calls.append(1)
        raise RuntimeError("operation not permitted when stream is capturing\nsecond line")

    lines = []
    window = GraphedWindow(model, _loss(model), capture=True, recorder=refusing_recorder, log=lines.append)
    state, losses = None, []
    for x, y in windows:
        loss, _, state = window(x, y, state)
        losses.append(loss.detach().clone())
    _assert_same(ref_model, model, ref_losses, losses, ref_state, state, seed)
    assert calls == [1] and not window.entries and window.eager_windows == 3
    assert len(lines) == 1 and "capturing a 2x8 window failed (RuntimeError: operation not permitted" in lines[0]
    assert "run eagerly" in lines[0] and "second line" not in lines[0]
