"""The puzzle trainer's fast step (hierarchos.train.puzzle_segments) against the reference loop
(`PuzzleTrainer.train_batch_reference`), on tiny 4x4 Sudoku.

What they hold: over several steps with exploration, per-puzzle halting and an epoch's shorter last
batch, the fast step, eager and with the graph bookkeeping (`record_eagerly` standing in for
the CUDA graph), gives the reference's metrics, update count, weights and optimizer state exactly;
a non-finite segment is skipped exactly as the reference skips it, with the same warning; a
capture that fails falls back to the eager segment; the host is read once per segment and once
per step; the sign step of the per-puzzle rows matches a hand computation and moves only the
batch's rows.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import math
import random

import pytest
import torch
from torch.overrides import TorchFunctionMode

from hierarchos.train.cuda_graph import record_eagerly
from hierarchos.train.puzzle_segments import sign_step_rows
from hierarchos.train.sign_sgd import SparseSignSGD
from test_puzzle_train import _trainer, tiny_model, tiny_puzzles

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

HOST_READS = {"__bool__", "__float__", "__int__", "__index__", "item", "tolist", "nonzero", "coalesce", "numpy"}


class CountHostReads(TorchFunctionMode):
    """Counts the tensor methods that read a value back to the host (on a GPU: a synchronisation)."""

    def __init__(self):
        super().__init__()
        self.reads = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.reads[name] += 1
        return func(*args, **(kwargs or {}))


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**31)


def _setup(seed: int, dtype=torch.float64, puzzles: int = 12, max_segments: int = 3, device: str = "cpu",
           names=("reference", "eager", "graphed"), **arch):
    """A model whose Q head halts some puzzles early, half the puzzles exploring, and three trainers
    of copies of it: reference, fast eager, fast with the graph bookkeeping (on CUDA: real graphs)."""
    torch.manual_seed(seed)
    data = tiny_puzzles(puzzles, seed)
    model = tiny_model(num_ids=puzzles, max_segments=max_segments, **arch).to(dtype)
    model.puzzle_cfg.halt_explore_prob = 0.5
    with torch.no_grad():
        model.q_head.weight.normal_(0.0, 0.5)
    # puzzles of even id want to halt, the others to continue (a learned Q head alone may treat every
    # puzzle of an untrained model alike; a rule on the cells could pick the same side for a whole
    # draw of puzzles): some steps end before M segments
    model.register_forward_hook(lambda module, args, out: dataclasses.replace(
        out, q_halt=out.q_halt + torch.where(args[1] % 2 == 0, 10.0, -10.0).to(out.q_halt.dtype)))
    logs = {name: [] for name in names}
    trainers = {}
    for name in logs:
        trainer = _trainer(copy.deepcopy(model).to(device), data, device, batch_size=5, epochs=3,
                           cuda_graphs=name == "graphed", puzzle_emb_lr=0.05, amp=False)  # float32 on CUDA too
        trainer.log = logs[name].append
        if device == "cpu":
            trainer.graph_recorder = record_eagerly
        trainers[name] = trainer
    return trainers, logs


def _step_all(trainers, step: int, seed: int) -> dict:
    records = {}
    for name, trainer in trainers.items():
        inputs, solutions, ids, _ = trainer.batch(step)
        torch.manual_seed(seed + step)  # the same exploration draws for every trainer
        run = trainer.train_batch_reference if name == "reference" else trainer.train_batch
        records[name] = run(inputs, solutions, ids)
        trainer.step += 1
    return records


def _same_weights_and_moments(a, b) -> list[str]:
    """Names of the parameters or optimizer state tensors that differ (bit for bit)."""
    differ = [name for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()) if not torch.equal(p, q)]
    for opt_a, opt_b in zip(a.optimizer.optimizers, b.optimizer.optimizers):
        for p_a, p_b in zip((p for g in opt_a.param_groups for p in g["params"]),
                            (p for g in opt_b.param_groups for p in g["params"])):
            state_a, state_b = opt_a.state.get(p_a, {}), opt_b.state.get(p_b, {})
            assert state_a.keys() == state_b.keys()
            differ += [f"{type(opt_a).__name__}.{key}" for key in state_a
                       if not torch.equal(torch.as_tensor(state_a[key]), torch.as_tensor(state_b[key]))]
    return differ


def _assert_records_equal(records: dict, seed: int) -> None:
    want = records["reference"]
    for name in ("eager", "graphed"):
        got = records[name]
        assert got.keys() == want.keys(), name
        for key in want:  # NaN equals NaN here: a skipped segment's loss is summed by both
            same = got[key] == want[key] or (math.isnan(got[key]) and math.isnan(want[key]))
            assert same, f"seed {seed}: {name} {key} {got[key]!r} != reference {want[key]!r}"


@pytest.mark.parametrize("dtype, arch", [
    (torch.float64, {}), (torch.float32, {}),
    # KV caches that grow from segment to segment (full attention: not captured, see below) or a
    # window's ring; the manager's Q halting, which draws random numbers
    (torch.float64, dict(h_block="attention", l_block="attention")),
    (torch.float64, dict(h_block="attention", l_block="attention", window_size=8)), (torch.float64, dict(halting="q"))])
def test_fast_step_equals_the_reference_loop(dtype, arch):
    seed = fresh_seed()
    trainers, logs = _setup(seed, dtype, **arch)
    segments = []
    for step in range(7):  # 12 puzzles in batches of 5: every third batch is the shorter last one
        records = _step_all(trainers, step, seed)
        _assert_records_equal(records, seed)
        segments.append(records["reference"]["segments"])
        for name in ("eager", "graphed"):
            assert trainers[name].updates == trainers["reference"].updates, f"seed {seed}: {name}"
            assert not _same_weights_and_moments(trainers["reference"], trainers[name]), \
                f"seed {seed}: {name} step {step}: {_same_weights_and_moments(trainers['reference'], trainers[name])}"
    # the steps really halted and explored: not every puzzle ran every segment, nor only one
    assert any(1.0 < s < 3.0 for s in segments), f"seed {seed}: segments {segments}"
    runner = trainers["graphed"].segments
    assert not trainers["eager"].segments.entries and not any(logs["eager"])
    if arch.get("h_block") == "attention" and not arch.get("window_size"):  # a host read sizes its cache
        assert not runner.capture and runner.replays == 0 and "full attention" in logs["graphed"][0]
        return
    assert runner.eager_segments == 0 and runner.replays == trainers["graphed"].updates
    assert {key[0] for key in runner.entries} == {5, 2}  # a full batch and the epoch's last


def _poison(model, when):
    """Non-finite Q logits in the forward passes of the segments `when(state_pos)` picks (with gradient)."""
    flag = {"on": False}

    def pre(module, args):
        flag["on"] = torch.is_grad_enabled() and when(args[2].pos)

    model.register_forward_pre_hook(pre)
    model.q_head.register_forward_hook(lambda module, args, out: out * float("nan") if flag["on"] else None)
    return flag


def test_a_non_finite_segment_is_skipped_as_the_reference_skips_it():
    seed = fresh_seed()
    trainers, logs = _setup(seed, max_segments=3)
    seq_len = trainers["reference"].model.puzzle_cfg.seq_len
    switch = {"step": 0}
    for trainer in trainers.values():  # the second segment of step 1, and every segment of step 3
        _poison(trainer.model, lambda pos: (switch["step"] == 1 and pos == seq_len) or switch["step"] == 3)
    for step in range(5):
        switch["step"] = step
        before = {name: p.detach().clone() for name, p in trainers["reference"].model.named_parameters()}
        records = _step_all(trainers, step, seed)
        if step == 3:  # every segment non-finite: nothing moved
            assert all(torch.equal(p, before[name]) for name, p in trainers["reference"].model.named_parameters())
        _assert_records_equal(records, seed)
        for name in ("eager", "graphed"):
            assert trainers[name].updates == trainers["reference"].updates
            assert not _same_weights_and_moments(trainers["reference"], trainers[name]), f"seed {seed}: {name}"
    assert any("step 1 segment 2: update skipped" in line for line in logs["reference"])
    assert logs["eager"] == logs["reference"]
    assert [line for line in logs["graphed"] if "warning" in line] == logs["reference"]
    assert sum("step 3 segment" in line for line in logs["reference"]) >= 1


def test_a_refused_capture_runs_the_segment_eagerly():
    seed = fresh_seed()
    trainers, logs = _setup(seed)

    def refuse(run, warmup, before_capture):
        raise RuntimeError("operation not permitted when stream is capturing")

    trainers["graphed"].graph_recorder = refuse
    for step in range(3):
        _assert_records_equal(_step_all(trainers, step, seed), seed)
    assert not _same_weights_and_moments(trainers["reference"], trainers["graphed"])
    runner = trainers["graphed"].segments
    assert runner.replays == 0 and runner.eager_segments == trainers["graphed"].updates
    assert any("capturing puzzle segment 1" in line and "runs eagerly" in line for line in logs["graphed"])


def test_the_host_is_read_once_per_segment_and_once_per_step():
    seed = fresh_seed()
    trainers, _ = _setup(seed)
    for name in ("eager", "graphed"):
        trainer = trainers[name]
        inputs, solutions, ids, _ = trainer.batch(0)
        for _ in range(2):  # the second step replays the captured segments
            before = trainer.updates
            with CountHostReads() as counter:
                trainer.train_batch(inputs, solutions, ids)
            ran = trainer.updates - before  # segments of this step (none skipped)
            assert set(counter.reads) <= {"__bool__", "tolist"}, (name, counter.reads)
            assert counter.reads["tolist"] == 1 and counter.reads["__bool__"] == ran >= 1, (name, counter.reads)
    inputs, solutions, ids, _ = trainers["reference"].batch(0)
    with CountHostReads() as counter:
        trainers["reference"].train_batch_reference(inputs, solutions, ids)
    assert sum(counter.reads.values()) > 6  # what the fast step removed: six and more per segment


def test_sign_step_rows_by_hand_and_only_the_batch_rows_move():
    table = torch.tensor([[0.0, 0.0], [1.0, -2.0], [0.5, 0.5], [3.0, 3.0]])
    rows = torch.tensor([1, 1, 2, 0])            # row 1 twice (its gradients are summed), 0 the padding row
    grads = torch.tensor([[1.0, -1.0], [-3.0, 0.5], [0.0, 2.0], [9.0, 9.0]])
    lr, decay = 0.1, 0.5
    expected = table.clone()
    expected[1] = table[1] * (1 - lr * decay) - lr * torch.tensor([-1.0, -1.0])  # sums (-2, -0.5)
    expected[2] = table[2] * (1 - lr * decay) - lr * torch.tensor([0.0, 1.0])    # sign(0) = 0: decay only
    moved = table.clone()
    sign_step_rows(moved, rows, grads, lr, decay, torch.tensor(True))
    assert torch.allclose(moved, expected, rtol=0, atol=1e-7)
    assert torch.equal(moved[0], table[0]) and torch.equal(moved[3], table[3])  # padding, not in the batch
    kept = table.clone()
    sign_step_rows(kept, rows, grads, lr, decay, torch.tensor(False))
    assert torch.equal(kept, table)
    # the sparse optimizer it stands for, on the same gradients, moves the rows to the same values
    weight = torch.nn.Parameter(table.clone())
    embedding = torch.nn.Embedding(4, 2, padding_idx=0, sparse=True)
    embedding.weight = weight
    (embedding(rows) * grads).sum().backward()
    SparseSignSGD([weight], lr=lr, weight_decay=decay).step()
    assert torch.equal(weight.detach(), moved)


def test_fast_step_is_the_default_and_the_reference_one_flag_away():
    seed = fresh_seed()
    torch.manual_seed(seed)
    data = tiny_puzzles(6, seed)
    trainer = _trainer(tiny_model(num_ids=6, max_segments=2), data, batch_size=6, fast_step=False)
    inputs, solutions, ids, _ = trainer.batch(0)
    trainer.train_batch(inputs, solutions, ids)
    assert trainer.segments is None and trainer.updates == 2  # the reference loop ran
    fast = _trainer(tiny_model(num_ids=6, max_segments=2), data, batch_size=6)
    fast.train_batch(inputs, solutions, ids)
    assert fast.segments is not None and not fast.segments.capture  # CPU: eager, no graphs
    assert fast.updates == 2


def test_bench_time_steps_counts_what_the_fast_step_removed(tmp_path):
    """bench_puzzles.py --time-steps on tiny puzzles: both variants timed, the JSON written, and the
    counts it reports are the fast step's: one host read per segment plus one, and most operators
    inside the segment function a CUDA graph replays."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_puzzles.py"
    spec = importlib.util.spec_from_file_location("bench_puzzles", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "time.json"
    assert bench.main(["--tiny", "--device", "cpu", "--time-steps", "1", "--rounds", "2", "--batch-size", "4",
                       "--models", "transformer", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]["transformer"]["variants"]
    assert set(rows) == {"reference", "fast"}
    fast, reference = rows["fast"], rows["reference"]
    assert fast["segments_per_step"] == reference["segments_per_step"] == 2.0  # an untrained Q head: no halt
    assert fast["host_reads_per_step"] == 3 < reference["host_reads_per_step"]
    assert reference["ops_outside_segment_fn"] == reference["ops_per_step"]
    assert fast["ops_outside_segment_fn"] < fast["ops_per_step"] / 2
    assert len(fast["ms_per_step_rounds"]) == 2 and fast["ms_per_step_best"] > 0
    assert fast["max_abs_weight_diff"] == 0.0  # the same steps and draws: the reference's weights exactly


def test_bench_time_steps_times_compiled_blocks_as_one_more_variant(tmp_path):
    """--compile adds the fast step on compiled RWKV blocks (traced by aot_eager here: no code
    generated), timed beside the others on the same steps and draws, ending at the reference's weights."""
    import importlib.util
    import json
    from pathlib import Path

    from hierarchos.model.rwkv import uncompile_blocks

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_puzzles.py"
    spec = importlib.util.spec_from_file_location("bench_puzzles", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    compiled = []
    original = bench.compile_blocks

    def compile_and_record(model, backend="inductor"):
        compiled.append((model, backend))
        return original(model, backend=backend)

    bench.compile_blocks = compile_and_record
    out = tmp_path / "time.json"
    import torch._dynamo.utils

    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    try:
        assert bench.main(["--tiny", "--device", "cpu", "--time-steps", "1", "--rounds", "1", "--batch-size", "4",
                           "--models", "hierarchos-rwkv7", "--compile", "--compile-backend", "aot_eager",
                           "--out", str(out)]) == 0
    finally:
        for model, _ in compiled:
            uncompile_blocks(model)
    rows = json.loads(out.read_text())["results"]["hierarchos-rwkv7"]["variants"]
    assert set(rows) == {"reference", "fast", "fast+compile"}
    assert len(compiled) == 1 and compiled[0][1] == "aot_eager"  # only the compiled variant's copy
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > before  # its blocks were traced
    assert rows["fast+compile"]["ms_per_step_best"] > 0
    assert rows["fast+compile"]["segments_per_step"] == rows["fast"]["segments_per_step"]
    assert rows["fast+compile"]["max_abs_weight_diff"] < 1e-5


def test_a_third_batch_size_runs_eagerly_and_still_equals_the_reference():
    seed = fresh_seed()
    trainers, _ = _setup(seed)
    for step in range(3):  # captures the full batch (5) and the epoch's last (2)
        _step_all(trainers, step, seed)
    records = {}
    for name, trainer in trainers.items():
        inputs, solutions, ids, _ = trainer.batch(3)
        torch.manual_seed(seed)
        run = trainer.train_batch_reference if name == "reference" else trainer.train_batch
        records[name] = run(inputs[:3], solutions[:3], ids[:3])
    _assert_records_equal(records, seed)
    runner = trainers["graphed"].segments
    assert {key[0] for key in runner.entries} == {5, 2} and runner.eager_segments >= 1
    assert not _same_weights_and_moments(trainers["reference"], trainers["graphed"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_cuda_graph_segments_match_the_reference_loop():
    """The captured segments on a GPU (real graphs, one memory pool for all of them) against the
    reference loop, float32, 7 steps with halting and the epoch's shorter batch: the same metrics (read
    once at each step's end, after all its replays) and weights to float32 rounding, every segment
    replayed."""
    seed = fresh_seed()
    trainers, logs = _setup(seed, torch.float32, device="cuda", names=("reference", "graphed"))
    for step in range(7):
        records = _step_all(trainers, step, seed)
        want, got = records["reference"], records["graphed"]
        assert got["segments"] == want["segments"] and got["exact"] == want["exact"], f"seed {seed} step {step}"
        for key in ("loss", "cell_loss", "cell_acc"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), f"seed {seed} step {step} {key}"
        assert trainers["graphed"].updates == trainers["reference"].updates
    for (name, p), q in zip(trainers["reference"].model.named_parameters(), trainers["graphed"].model.parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-5), f"seed {seed}: {name} differs by {(p - q).abs().max():.2e}"
    runner = trainers["graphed"].segments
    assert runner.pool is not None and runner.eager_segments == 0, logs["graphed"]
    assert runner.replays == trainers["graphed"].updates and {key[0] for key in runner.entries} == {5, 2}
