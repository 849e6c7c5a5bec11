"""The trainer's rules pinned against expectations computed here: a window's gradient is the sum over
its detach pieces of (piece length / window length) / accumulation x the piece's loss gradient, with
the state carried (detached) between pieces; the loop's cadence (optimizer steps per epoch with
accumulation, which steps log, validate, save and why, the interrupt save, the eval hook) and what
each logged record holds (the window's loss = its summed NLL over its tokens, ponder per micro-step,
the lr of the window's step); skipped steps reported by number; the resume bookkeeping and its
one-line errors. Tiny models on a 3-window stream, CPU, well under a second each."""

from __future__ import annotations

import copy
import json
import math
import random
from dataclasses import asdict

import pytest
import torch

from hierarchos.config import tiny_config
from hierarchos.errors import HierarchosError
from hierarchos.model import HierarchosLM
from hierarchos.model.losses import LossWeights, lm_loss
from hierarchos.model.rosa import RosaAutomaton
from hierarchos.train.batches import TokenStreams
from hierarchos.train.schedule import lr_at
from hierarchos.train.trainer import CosineSchedule, TrainConfig, Trainer, bits_per_byte


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**31)


def make(seed: int, val: bool = False, rosa: bool = False, **cfg) -> Trainer:
    """Two streams of 31 tokens, chunk 10: windows of 10, 10 and 10 tokens (3 micro-steps an epoch)."""
    torch.manual_seed(seed)
    model = HierarchosLM(tiny_config(vocab_size=32, use_rosa=rosa))
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, 31, (61,), generator=g).tolist()]
    streams = TokenStreams.from_documents(docs, eos_id=31, batch_size=2, chunk=10)
    config = TrainConfig(**{"epochs": 1, "batch_size": 2, "starting_lr": 1e-3, "warmup_steps": 1, "log_every": 1,
                            "eval_every_epoch": 0, **cfg})
    return Trainer(model, streams, config, torch.device("cpu"), val_streams=streams if val else None,
                   val_bytes=0, log=lambda line: None)


def test_defaults():
    c = TrainConfig()
    assert (c.epochs, c.batch_size, c.accumulation_steps, c.starting_lr, c.min_lr, c.warmup_steps,
            c.disable_lr_schedule, c.grad_clip, c.weight_decay, c.detach_every, c.persist_state, c.amp,
            c.save_every, c.keep_checkpoints, c.log_every, c.eval_every_epoch, c.cuda_graphs, c.seed) == (
        3, 4, 1, 1e-4, 1e-6, None, False, 1.0, 0.01, None, True, None, 0, 3, 10, 1, False, 0)
    assert c.loss == LossWeights() and TrainConfig().loss is not c.loss


def test_schedule_applies_lr_at_to_every_group_and_round_trips():
    p, q = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p]}, {"params": [q]}], lr=1.0)
    for total, warmup in ((100, 5), (10, 1), (19, 1), (40, 2), (61, 3), (1, 1)):  # default: 5%, at least 1
        assert CosineSchedule(opt, total, TrainConfig()).warmup_steps == warmup, total
    assert CosineSchedule(opt, 100, TrainConfig(warmup_steps=0)).warmup_steps == 0
    schedule = CosineSchedule(opt, 50, TrainConfig(starting_lr=0.1, min_lr=0.01, warmup_steps=4))
    for step in (0, 3, 4, 30, 49):
        lr = schedule.apply(step)
        assert lr == lr_at(step, 50, 0.1, 0.01, 4, False) and [g["lr"] for g in opt.param_groups] == [lr, lr]
    assert schedule.state_dict() == {"total_steps": 50, "starting_lr": 0.1, "min_lr": 0.01, "disabled": False,
                                     "warmup_steps": 4}
    other = CosineSchedule(opt, 7, TrainConfig(disable_lr_schedule=True))
    assert other.apply(30) == other.starting_lr == 1e-4
    other.load_state_dict(schedule.state_dict())
    assert other.state_dict() == schedule.state_dict() and other.apply(30) == schedule.apply(30)


def test_bits_per_byte():
    assert bits_per_byte(8 * math.log(2), 4) == pytest.approx(2.0, rel=1e-12)
    assert bits_per_byte(3 * math.log(2), 0) == pytest.approx(3.0, rel=1e-12)  # no bytes: over one


def test_step_counts_and_cpu_settings():
    trainer = make(0, epochs=3, accumulation_steps=2, amp=True)
    assert trainer.steps_per_epoch == 3 and trainer.total_opt_steps == 6  # windows end at epoch ends too
    assert trainer.schedule.total_steps == 6
    assert make(0, epochs=3, accumulation_steps=3).total_opt_steps == 3
    assert make(0, epochs=3, accumulation_steps=4).total_opt_steps == 3
    assert make(0, epochs=0).total_opt_steps == 1
    assert trainer.amp_dtype is None and trainer.scaler is None  # autocast only on CUDA
    assert trainer.device_skip and trainer.drop_grads and trainer.graphed is None and trainer.on_eval is None
    assert (trainer.micro_step, trainer.opt_step, trainer.skipped_steps, trainer.best_val) == (0, 0, 0, math.inf)


@pytest.mark.parametrize("persist", [True, False])
def test_window_gradient_is_the_weighted_sum_over_detach_pieces(persist):
    seed = fresh_seed()
    trainer = make(seed, detach_every=4, accumulation_steps=2, persist_state=persist,
                   loss=LossWeights(ponder=0.3, commitment=0.5))  # the run's weights, not the defaults
    reference = copy.deepcopy(trainer.model)
    x, y = trainer.train_streams.batch(0)
    nll, ntok, parts, finite = trainer._window_loss(x, y)
    # by hand: pieces of 4, 4 and 2 tokens, each loss weighted by its length / 10 and / 2 (accumulation)
    state, expected_nll = None, 0.0
    for start in (0, 4, 8):
        piece_x, piece_y = x[:, start:start + 4], y[:, start:start + 4]
        out = reference(piece_x, state)
        loss, piece_parts = lm_loss(out, piece_y, reference.cfg.z_loss_weight, trainer.cfg.loss)
        (loss * (piece_x.shape[1] / 10) / 2).backward()
        state = out.state.detach() if persist else None
        expected_nll += float(piece_parts["ce"]) * piece_x.numel()
    assert ntok == x.numel() == 20 and bool(finite), f"seed {seed}"
    assert float(nll) == pytest.approx(expected_nll, rel=1e-5), f"seed {seed}"
    assert float(parts["ce"]) == pytest.approx(float(piece_parts["ce"]), rel=1e-6), f"seed {seed}: the last piece's"
    for (name, p), (_, q) in zip(trainer.model.named_parameters(), reference.named_parameters()):
        assert (p.grad is None) == (q.grad is None), f"seed {seed}: {name}"
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-8, msg=lambda m: f"seed {seed} {name}: {m}")
    if persist:
        for (name, a), (_, b) in zip(trainer.state.tensors(), state.tensors()):
            assert torch.equal(a, b) and not a.requires_grad, f"seed {seed}: {name}"
    else:
        assert trainer.state is None


def _recording(trainer):
    """Capture each micro-step's (nll, tokens, ponder), each forward's incoming state, each record."""
    windows, states_none, records = [], [], []
    real_window, real_forward = trainer._window_loss, trainer.forward_model

    def window_loss(x, y, hints=None):
        result = real_window(x, y, hints)
        windows.append((float(result[0]), result[1], float(result[2]["ponder"]), trainer.micro_step))
        return result

    def forward(x, state, **kwargs):
        states_none.append(state is None)
        return real_forward(x, state, **kwargs)

    def log_metrics(record):
        records.append(record)
        trainer.last_metrics = record

    trainer._window_loss, trainer.forward_model, trainer.log_metrics = window_loss, forward, log_metrics
    return windows, states_none, records


def test_loop_cadence_records_and_checkpoints():
    """3 micro-steps an epoch, accumulation 2: optimizer steps after micro-steps 2, 3 (epoch end), 5, 6.
    log_every 3, save_every 3, validation every 2nd epoch."""
    seed = fresh_seed()
    trainer = make(seed, val=True, epochs=2, accumulation_steps=2, log_every=3, save_every=3, eval_every_epoch=2)
    windows, states_none, records = _recording(trainer)
    saves, evals = [], []
    trainer.on_eval = lambda t, epoch_end: evals.append((t.opt_step, epoch_end)) or {}
    result = trainer.run(on_checkpoint=lambda t, best, reason: saves.append((t.opt_step, best, reason)))
    assert result == {"stopped": False, "opt_step": 4}, f"seed {seed}"
    assert trainer.micro_step == 6 and evals == [(1, False), (2, True), (3, False), (4, True)], f"seed {seed}"
    assert states_none == [True, False, False, True, False, False], f"seed {seed}: each epoch starts afresh"
    assert [r["step"] for r in records] == [2, 3, 4] and [r["epoch"] for r in records] == [1, 2, 2], f"seed {seed}"
    micro_of_step = {2: [2], 3: [3, 4], 4: [5]}  # the window each logged step closes (0-based micro-steps)
    for record in records:
        mine = [w for w in windows if w[3] in micro_of_step[record["step"]]]
        assert record["loss"] == pytest.approx(sum(w[0] for w in mine) / sum(w[1] for w in mine), rel=1e-6), seed
        assert record["ponder"] == pytest.approx(sum(w[2] for w in mine) / len(mine), rel=1e-6), seed
        assert record["lr"] == lr_at(record["step"] - 1, 4, 1e-3, 1e-6, 1), f"seed {seed}"
        assert record["tokens_per_s"] > 0 and record["skipped_steps"] == 0
        assert ("val_loss" in record) == (record["step"] == 4), f"seed {seed}: {record}"
    val = records[-1]["val_loss"]
    assert val == trainer.evaluate()["val_loss"] and records[-1]["val_bpb"] is None  # no byte count given
    assert saves == [(2, False, "epoch"), (3, False, "step"), (4, True, "epoch")], f"seed {seed}"
    assert trainer.best_val == val


def test_stop_saves_an_interrupt_checkpoint_unless_it_just_saved():
    seed = fresh_seed()
    trainer = make(seed)
    _, _, records = _recording(trainer)
    trainer.cfg.log_every = 10
    saves = []
    result = trainer.run(on_checkpoint=lambda t, best, reason: saves.append((t.opt_step, best, reason)),
                         stop_requested=lambda: trainer.opt_step >= 1)
    assert result == {"stopped": True, "opt_step": 1} and saves == [(1, False, "interrupt")]
    assert [r["step"] for r in records] == [1]  # the stopping step is logged
    trainer = make(seed, save_every=2)
    saves = []
    result = trainer.run(on_checkpoint=lambda t, best, reason: saves.append((t.opt_step, reason)),
                         stop_requested=lambda: trainer.opt_step >= 2)
    assert result == {"stopped": True, "opt_step": 2} and saves == [(2, "step")]
    trainer = make(seed)
    assert trainer.run(stop_requested=lambda: trainer.opt_step >= 2) == {"stopped": True, "opt_step": 2}


def test_eval_hook_metrics_force_a_log_line():
    seed = fresh_seed()
    trainer = make(seed, log_every=100)
    _, _, records = _recording(trainer)
    trainer.on_eval = lambda t, epoch_end: {"hook": 1.5} if t.opt_step == 1 else {}
    trainer.run()
    assert [(r["step"], r.get("hook")) for r in records] == [(1, 1.5), (3, None)], f"seed {seed}"


def test_skipped_steps_are_counted_and_reported_by_number():
    trainer = make(0)
    lines = []
    trainer.log = lines.append
    trainer.pending_steps = [(0, True), (1, False), (2, torch.tensor(False)), (3, torch.tensor(True))]
    trainer._read_pending_steps()
    assert trainer.skipped_steps == 2 and trainer.pending_steps == []
    assert lines == [f"warning: non-finite loss or gradient at step {s}: step skipped, weights unchanged" for s in (1, 2)]
    trainer._read_pending_steps()
    assert trainer.skipped_steps == 2 and len(lines) == 2


def test_evaluate_without_validation_and_mode_restored():
    trainer = make(0)
    assert trainer.evaluate() == {}
    trainer.val_streams = TokenStreams(torch.zeros(1, 1, dtype=torch.long), 10)  # no window at all
    assert len(trainer.val_streams) == 0 and trainer.evaluate() == {}
    trainer = make(0, val=True)
    trainer.val_bytes = 40
    metrics = trainer.evaluate()
    assert trainer.model.training
    # two rows of 31 tokens score 60 targets; the text's 62 tokens have 61: the mean NLL per scored
    # token counts for every target of the text, whose bytes val_bytes counts
    assert metrics["val_bpb"] == pytest.approx(metrics["val_loss"] * 61 / 40 / math.log(2), rel=1e-9)


def test_trainer_state_round_trip_and_defaults():
    trainer = make(0, accumulation_steps=2)
    trainer.micro_step, trainer.opt_step, trainer.skipped_steps = 5, 3, 1
    state = trainer.trainer_state()
    assert state == {"micro_step": 5, "opt_step": 3, "skipped_steps": 1, "best_val": None,
                     "train_config": json.loads(json.dumps(asdict(trainer.cfg), default=str))}
    assert state["train_config"]["accumulation_steps"] == 2 and json.dumps(state)
    trainer.best_val = 1.25
    assert trainer.trainer_state()["best_val"] == 1.25
    other = make(0)
    other.best_val, other.skipped_steps = 0.5, 9
    other.load_trainer_state({"micro_step": "5", "opt_step": 3.0, "best_val": None})
    assert (other.micro_step, other.opt_step, other.skipped_steps, other.best_val) == (5, 3, 0, math.inf)
    other.load_trainer_state({"micro_step": 1, "opt_step": 1, "skipped_steps": 4, "best_val": 0.0})
    assert (other.skipped_steps, other.best_val) == (4, 0.0)


def test_load_state_tensors_fits_the_run_or_says_why():
    seed = fresh_seed()
    trainer = make(seed, rosa=True)
    trainer.run(stop_requested=lambda: trainer.opt_step >= 2)
    saved = {k: v.clone() for k, v in trainer.state_tensors().items()}
    assert saved and trainer.state_tensors().keys() == dict(trainer.state.tensors()).keys()
    resumed = make(seed, rosa=True)
    assert resumed.state is None and resumed.state_tensors() == {}
    resumed.load_state_tensors({})
    assert resumed.state is None
    resumed.micro_step = 2
    resumed.load_state_tensors(saved)
    assert {k: v for k, v in resumed.state.tensors()}.keys() == saved.keys()
    assert all(torch.equal(t, saved[k]) for k, t in resumed.state.tensors()), f"seed {seed}"
    assert resumed.state.pos == 2 * 10  # micro-step 2 of the epoch, windows of 10 tokens
    # no automata in the state: the hints come from resumed.hints, which replays the 20 tokens each
    # stream consumed before window 2 (tests/test_rosa_ahead.py pins those hints)
    assert resumed.state.rosa is None and resumed.hints is not None and make(seed).hints is None
    resumed.micro_step = 4  # the second window of the second epoch
    resumed.load_state_tensors(saved)
    assert resumed.state.pos == 10
    name = next(iter(saved))
    for bad in ({**saved, "memory.nope": torch.zeros(1)}, {**saved, name: torch.zeros(7, 1)}):
        key = "memory.nope" if "memory.nope" in bad else name
        with pytest.raises(HierarchosError) as info:
            resumed.load_state_tensors(bad)
        assert str(info.value) == (
            f"the checkpoint's carried recurrent state ({key} {tuple(bad[key].shape)}) does not fit this run; resume "
            "with the same --batch_size, number of processes and model")


def test_progress_and_speed_exclude_evaluation_time(monkeypatch):
    """A fake clock that ticks 1 s per reading: each window is read at its start, around the eval hook
    (whose second counts as evaluation, not training) and at its log line: 20 tokens in 2 s."""
    import types

    import hierarchos.train.trainer as trainer_mod

    ticks = iter(range(1000))
    monkeypatch.setattr(trainer_mod, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    trainer = make(0)
    _, _, records = _recording(trainer)
    calls = []
    trainer.run(progress=lambda n, loss, lr: calls.append((n, loss, lr)))
    assert [r["tokens_per_s"] for r in records] == [10.0, 10.0, 10.0]
    lrs = [lr_at(step, 3, 1e-3, 1e-6, 1) for step in range(3)]
    assert calls == [(1, None, lrs[0]), (1, records[0]["loss"], lrs[1]), (1, records[1]["loss"], lrs[2])]


def test_each_epoch_reads_its_own_shuffled_window_order():
    seed = fresh_seed()
    trainer = make(seed, epochs=2)
    trainer.train_streams.shuffle_seed = 7
    assert trainer.train_streams.shuffled and len(trainer.train_streams) == 3
    seen = []
    real = trainer._window_loss

    def window_loss(x, y, hints=None):
        seen.append((x.clone(), y.clone(), hints is None))  # a model without ROSA gets no hints
        return real(x, y, hints)

    trainer._window_loss = window_loss
    trainer.run()
    expected = [trainer.train_streams.batch(i, epoch) for epoch in (0, 1) for i in range(3)]
    assert len(seen) == 6 and all(host for _, _, host in seen), f"seed {seed}"
    for (x, y, _), (ex, ey) in zip(seen, expected):
        assert torch.equal(x, ex) and torch.equal(y, ey), f"seed {seed}"
    assert not all(torch.equal(seen[i][0], seen[i + 3][0]) for i in range(3)), f"seed {seed}: epochs in one order"


class _Explode(torch.autograd.Function):
    """Identity forward; an infinite gradient backward (a finite loss whose gradient overflows)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def _poison_forward(trainer, at: int, poison=lambda logits: logits + float("nan"), on_model: bool = False,
                    record=lambda x: 1) -> list:
    """Wrap the trainer's forward (`trainer.forward_model`, or `trainer.model.forward` with on_model) so
    that its call number `at` (1-based) returns poisoned logits; returns the list the wrapper appends
    `record(x)` to on every call."""
    owner, name = (trainer.model, "forward") if on_model else (trainer, "forward_model")
    calls, real = [], getattr(owner, name)

    def forward(x, *args, **kwargs):
        out = real(x, *args, **kwargs)
        calls.append(record(x))
        if len(calls) == at:
            out.logits = poison(out.logits)
        return out

    setattr(owner, name, forward)
    return calls


@pytest.mark.parametrize("fault", ["nan_loss", "inf_grad"])
def test_host_path_skips_a_non_finite_step_and_reads_it_at_once(fault):
    """Without the fused AdamW's found_inf (unfused, or a GradScaler) the skip is decided on the host:
    each step's outcome is read right away, and the faulty step changes no weight."""
    seed = fresh_seed()
    trainer = make(seed, log_every=100)
    trainer.fused_adamw = False
    assert not trainer.device_skip
    calls = _poison_forward(trainer, 2, (lambda logits: logits + float("nan")) if fault == "nan_loss" else _Explode.apply)
    lines, pending, weights = [], [], [copy.deepcopy(trainer.model.state_dict())]
    trainer.log = lines.append

    def stop():
        pending.append(len(trainer.pending_steps))
        weights.append(copy.deepcopy(trainer.model.state_dict()))
        dropped.append(all(p.grad is None for p in trainer.model.parameters()))
        return False

    dropped = []
    trainer.run(stop_requested=stop)
    assert pending == [0, 0, 0] and trainer.skipped_steps == 1, f"seed {seed}"
    assert dropped == [True, True, True]  # after the skipped step too (zeroed in place, they would carry on)
    assert lines == ["warning: non-finite loss or gradient at step 1: step skipped, weights unchanged"]
    changed = [any(not torch.equal(a[k], b[k]) for k in a) for a, b in zip(weights, weights[1:])]
    assert changed == [True, False, True], f"seed {seed}"
    assert all(p.grad is None for p in trainer.model.parameters())  # dropped after every step, taken or not


def test_resume_replays_rosa_over_this_epochs_shuffled_prefix():
    seed = fresh_seed()
    trainer = make(seed, rosa=True, epochs=2)
    trainer.train_streams.shuffle_seed = 11
    trainer.run(stop_requested=lambda: trainer.opt_step >= 2)
    saved = {k: v.clone() for k, v in trainer.state_tensors().items()}
    resumed = make(seed, rosa=True, epochs=2)
    resumed.train_streams.shuffle_seed = 11
    resumed.micro_step = 4  # epoch 1, window 1
    resumed.load_state_tensors(saved)
    cfg, streams = resumed.model.cfg, resumed.train_streams
    assert not torch.equal(streams.prefix(1, 1), streams.prefix(1, 0)), f"seed {seed}: epochs in one order"
    hints = resumed.hints.get(1, 1)  # the first window after the resume: out of sequence, so replayed
    assert resumed.hints.replays == 1
    window = streams.batch(1, 1)[0]
    for r, row in enumerate(streams.prefix(1, 1).tolist()):
        by_hand = RosaAutomaton(cfg.rosa_window, cfg.rosa_none_id)
        by_hand.extend(row)  # this epoch's shuffled windows before window 1, not epoch 0's
        assert hints[r].tolist() == by_hand.extend(window[r].tolist()), f"seed {seed}: row {r}"


def test_the_default_log_keeps_the_last_record():
    trainer = make(0)
    trainer.run()
    assert trainer.last_metrics["step"] == 3 and trainer.last_metrics["epoch"] == 1


def test_a_fresh_state_has_the_models_dtype():
    trainer = make(0)
    trainer.model.double()
    assert {t.dtype for _, t in trainer._fresh_state().tensors() if t.is_floating_point()} == {torch.float64}


def test_the_device_skip_path_drops_the_gradients_after_every_step():
    """Eager training (no captured backward writing into .grad) drops the gradients after each step
    rather than zeroing them in place: a parameter no later window reaches must look untouched to
    the optimizer (.grad None), not zero (AdamW moves a zero-gradient parameter by momentum and decay)."""
    trainer = make(0, log_every=100)
    assert trainer.device_skip and trainer.drop_grads
    grads = []
    trainer.run(stop_requested=lambda: grads.append([p.grad for p in trainer.model.parameters()]) or False)
    assert len(grads) == 3 and all(g is None for step in grads for g in step)


def test_a_distributed_norm_is_made_a_plain_tensor_before_the_skip_mask(monkeypatch):
    """Under FSDP clip_grad_norm_ returns a DTensor; the skip mask (and found_inf) needs the plain
    tensor its full_tensor() gives. A stand-in with only full_tensor() is what the step may read."""
    real = torch.nn.utils.clip_grad_norm_
    calls = []

    class Distributed:
        def __init__(self, norm):
            self.norm = norm

        def full_tensor(self):
            calls.append(1)
            return self.norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: Distributed(real(*a, **k)))
    trainer = make(0, log_every=100)
    before = copy.deepcopy(trainer.model.state_dict())
    trainer.run()
    assert len(calls) == 3 and trainer.skipped_steps == 0 and trainer.opt_step == 3
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_host_path_drops_the_accumulated_gradients_of_a_skipped_step():
    """Accumulation over 2 windows, the second non-finite: the first window's gradients are dropped
    with the skipped step (not zeroed in place), so the step after it starts from no gradient."""
    trainer = make(1, log_every=100, accumulation_steps=2)
    trainer.fused_adamw = False
    calls = _poison_forward(trainer, 2)
    dropped = []
    trainer.run(stop_requested=lambda: dropped.append(all(p.grad is None for p in trainer.model.parameters())) or False)
    assert trainer.skipped_steps == 1 and dropped == [True, True]


def test_validation_every_third_epoch_and_a_tie_is_not_a_new_best():
    """eval_every_epoch=3 over 3 epochs validates at the end of epoch 3 only; with the weights held
    (learning rate 0) every validation gives the same loss, and a tie with the best is not a new best."""
    trainer = make(0, val=True, epochs=3, eval_every_epoch=3, log_every=100, starting_lr=0.0, min_lr=0.0)
    _, _, records = _recording(trainer)
    saves = []
    trainer.run(on_checkpoint=lambda t, best, reason: saves.append((t.opt_step, best, reason)))
    assert [("val_loss" in r) for r in records] == [False, False, True]
    again = make(0, val=True, epochs=2, eval_every_epoch=1, log_every=100, starting_lr=0.0, min_lr=0.0)
    _, _, records = _recording(again)
    saves = []
    again.run(on_checkpoint=lambda t, best, reason: saves.append((t.opt_step, best, reason)))
    assert records[0]["val_loss"] == records[1]["val_loss"] == again.best_val
    assert saves == [(3, True, "epoch"), (6, False, "epoch")]


def test_loss_of_a_one_token_window_and_speed_under_a_second(monkeypatch):
    """The logged loss is the summed NLL over the window's tokens, also for a window of one token; the
    speed is tokens over seconds, also when a window takes less than a second (a clock of 0.25 s ticks)."""
    import types

    import hierarchos.train.trainer as trainer_mod

    ticks = iter(range(1000))
    monkeypatch.setattr(trainer_mod, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks) / 4))
    torch.manual_seed(0)
    model = HierarchosLM(tiny_config(vocab_size=32))
    streams = TokenStreams.from_documents([[3, 4, 5]], eos_id=31, batch_size=1, chunk=1)
    trainer = Trainer(model, streams, TrainConfig(epochs=1, batch_size=1, warmup_steps=1, log_every=1),
                      torch.device("cpu"), log=lambda line: None)
    windows, _, records = _recording(trainer)
    trainer.run()
    assert [w[1] for w in windows] and all(w[1] == 1 for w in windows)
    assert [r["loss"] for r in records] == pytest.approx([w[0] for w in windows], rel=1e-6)
    assert [r["tokens_per_s"] for r in records] == [2.0] * len(records)  # 1 token in 2 ticks


def test_graphed_windows_follow_persist_state_and_count_a_skipped_window_as_no_loss():
    """With cuda_graphs (on the CPU: GraphedWindow without capture) the run equals the eager one with
    persist_state off too, and a non-finite window (the second) is skipped and logged with loss 0."""
    seed = fresh_seed()
    runs = []
    for graphs in (False, True):  # the run's own loss weights in both
        trainer, records = make(seed, persist_state=False, cuda_graphs=graphs, loss=LossWeights(ponder=0.3)), []
        trainer.log_metrics = records.append  # not _recording: a wrapped forward is refused under graphs
        trainer.run()
        runs.append((trainer, records))
    (eager, eager_log), (graphed, graphed_log) = runs
    assert graphed.graphed is not None and graphed.state is None
    assert graphed.drop_grads and all(p.grad is None for p in graphed.model.parameters())  # no capture: dropped
    assert [r["loss"] for r in graphed_log] == pytest.approx([r["loss"] for r in eager_log], rel=1e-5), seed
    for p, q in zip(eager.model.parameters(), graphed.model.parameters()):
        torch.testing.assert_close(p, q, msg=lambda m: f"seed={seed}: {m}")
    trainer = make(seed, cuda_graphs=True)
    _poison_forward(trainer, 2, on_model=True)
    records = []
    trainer.log_metrics = records.append
    trainer.run()
    assert trainer.skipped_steps == 1 and records[1]["loss"] == 0.0 and records[0]["loss"] > 0, seed


def test_graphed_windows_refuse_a_wrapped_forward_in_one_line():
    trainer = make(0, cuda_graphs=True)
    trainer.forward_model = lambda *a, **k: None  # e.g. DDP's wrapper under torchrun
    with pytest.raises(HierarchosError) as err:
        trainer.run()
    assert str(err.value) == "CUDA graphs run in one process: drop --cuda-graphs under torchrun"


def test_host_path_runs_every_piece_of_a_window_after_a_non_finite_one():
    """Host path, windows of 10 tokens cut every 5: a non-finite first piece skips only its own
    backward; the second piece still runs (its loss is logged and it carries the state on)."""
    trainer = make(2, log_every=100, detach_every=5)
    trainer.fused_adamw = False
    calls = _poison_forward(trainer, 1, record=lambda x: x.shape[1])
    trainer.run()
    assert calls == [5] * 6 and trainer.skipped_steps == 1


def test_a_window_with_one_non_finite_piece_is_skipped_even_if_its_gradient_is_finite(monkeypatch):
    """Device-skip path, windows cut every 5 tokens: a first piece whose loss is non-finite while its
    gradient is finite (a non-finite constant term) still makes the whole window's step a skip."""
    import hierarchos.train.trainer as trainer_mod

    calls, real = [], trainer_mod.lm_loss

    def lm_loss(*args, **kwargs):
        loss, parts = real(*args, **kwargs)
        calls.append(1)
        return (loss + float("nan") if len(calls) == 1 else loss), parts

    monkeypatch.setattr(trainer_mod, "lm_loss", lm_loss)
    trainer = make(3, log_every=100, detach_every=5)
    assert trainer.device_skip
    before = copy.deepcopy(trainer.model.state_dict())
    trainer.run(stop_requested=lambda: True)  # stop after the first step
    assert trainer.skipped_steps == 1 and len(calls) == 2
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_a_skipped_window_is_logged_with_loss_0_on_the_device_skip_path():
    trainer = make(4)
    assert trainer.device_skip
    calls = _poison_forward(trainer, 2)
    _, _, records = _recording(trainer)
    trainer.run()
    assert trainer.skipped_steps == 1 and records[1]["loss"] == 0.0 and records[0]["loss"] > 0


def test_validation_without_a_byte_count_reports_no_bits_per_byte():
    """val_bytes defaults to 0, "not known": validation then reports val_bpb None, not a rate per byte."""
    torch.manual_seed(0)
    model = HierarchosLM(tiny_config(vocab_size=32))
    streams = TokenStreams.from_documents([list(range(31)) * 2], eos_id=31, batch_size=2, chunk=10)
    trainer = Trainer(model, streams, TrainConfig(epochs=1, batch_size=2), torch.device("cpu"),
                      val_streams=streams, log=lambda line: None)
    metrics = trainer.evaluate()
    assert metrics["val_bpb"] is None and math.isfinite(metrics["val_loss"])


def test_graphed_windows_tell_the_trainers_log_when_a_shape_runs_eagerly(monkeypatch):
    from hierarchos.train import cuda_graph

    monkeypatch.setattr(cuda_graph, "MAX_GRAPHS", 0)
    torch.manual_seed(0)
    streams = TokenStreams.from_documents([list(range(31)) * 2], eos_id=31, batch_size=2, chunk=10)
    lines = []
    trainer = Trainer(HierarchosLM(tiny_config(vocab_size=32)), streams,
                      TrainConfig(epochs=1, batch_size=2, cuda_graphs=True), torch.device("cpu"), log=lines.append)
    trainer.run()
    assert lines and lines[0].startswith("cuda graphs: 0 window shapes captured already; windows of shape 2x10")


def _validation_by_hand(model, streams, carry: bool) -> float:
    """Summed NLL over every validation token / their number, each window from the last one's state
    (carry) or from a fresh one."""
    model.eval()
    state, nll, count = None, 0.0, 0
    with torch.no_grad():
        for i in range(len(streams)):
            x, y = streams.batch(i)
            out = model(x, state)
            nll += float(lm_loss(out, y, 0.0)[1]["ce"]) * y.numel()
            count += y.numel()
            state = out.state if carry else None
    model.train()
    return nll / count


def test_validation_without_persist_state_starts_every_window_afresh_and_one_token_is_its_nll():
    """persist_state off (full attention's choice): every validation window starts from a fresh state,
    as in training; on, each window carries the last one's. A validation set of a single token reports
    that token's NLL (divided by its count of 1)."""
    fresh = make(0, val=True, persist_state=False)
    carried = make(0, val=True)
    by_hand_fresh = _validation_by_hand(copy.deepcopy(fresh.model), fresh.val_streams, carry=False)
    by_hand_carried = _validation_by_hand(copy.deepcopy(carried.model), carried.val_streams, carry=True)
    assert abs(by_hand_fresh - by_hand_carried) > 1e-4  # the carried state changes the later windows
    assert fresh.evaluate()["val_loss"] == pytest.approx(by_hand_fresh, rel=1e-6)
    assert carried.evaluate()["val_loss"] == pytest.approx(by_hand_carried, rel=1e-6)
    one = make(0)
    one.val_streams = TokenStreams.from_documents([[3]], eos_id=31, batch_size=1, chunk=1)
    assert len(one.val_streams) == 1 and one.val_streams.batch(0)[1].numel() == 1
    expected = _validation_by_hand(copy.deepcopy(one.model), one.val_streams, carry=True)
    assert one.evaluate()["val_loss"] == pytest.approx(expected, rel=1e-6) and expected > 0


def test_rosa_hints_run_exactly_the_next_two_windows_ahead_each_computed_once():
    """`run` asks `self.hints` for each window in order with the next two windows (fewer at the end of
    training, across the epoch boundary) in flight; every window's automata are fed exactly once, in
    order (a wrong look-ahead would still give the right hints, by recomputing windows)."""
    trainer = make(fresh_seed(), rosa=True, epochs=2)  # 2 epochs of 3 windows
    assert trainer.hints.carry is True and trainer.hints.pin is False  # CPU: nothing to pin
    cfg = trainer.model.cfg
    assert (trainer.hints.window, trainer.hints.none_id) == (cfg.rosa_window, cfg.rosa_none_id)
    asked, computed = [], []
    get, compute = trainer.hints.get, trainer.hints._compute

    def spy_get(epoch, index, upcoming=()):
        asked.append(((epoch, index), [tuple(key) for key in upcoming]))
        return get(epoch, index, upcoming)

    trainer.hints.get = spy_get
    trainer.hints._compute = lambda epoch, index: computed.append((epoch, index)) or compute(epoch, index)
    trainer.run()
    keys = [(e, i) for e in (0, 1) for i in range(3)]
    assert asked == [(key, keys[m + 1:m + 3]) for m, key in enumerate(keys)]
    assert computed == keys and trainer.hints.replays == 0
    assert make(0, rosa=True, persist_state=False).hints.carry is False  # no carried state: no carried automata
    assert make(0).hints is None  # no ROSA, no hints


def test_rosa_hints_for_a_cuda_trainer_are_pinned():
    """The hints of a trainer on a CUDA device are made in page-locked memory (an asynchronous copy);
    the trainer is only built here (no CUDA needed)."""
    torch.manual_seed(0)
    model = HierarchosLM(tiny_config(vocab_size=32, use_rosa=True))
    streams = TokenStreams.from_documents([list(range(31)) * 2], eos_id=31, batch_size=2, chunk=10)
    config = TrainConfig(epochs=1, batch_size=2, amp=False)
    assert Trainer(model, streams, config, torch.device("cuda"), log=lambda line: None).hints.pin is True


def test_a_rosa_window_without_hints_is_refused_in_one_line():
    trainer = make(0, rosa=True)
    x, y = trainer.train_streams.batch(0)
    with pytest.raises(ValueError, match=r"^this model uses ROSA: pass the window's hints \(Trainer\.hints\.get\)$"):
        trainer._window_loss(x, y)


def test_a_rosa_trainer_hands_the_model_a_state_without_automata_and_carries_it():
    """The first window gets the trainer's fresh state (no automata: the hints come from `self.hints`;
    given None the model would make a set of its own), and each later window the state the one before
    returned."""
    trainer = make(fresh_seed(), rosa=True)  # one epoch of 3 windows, the state carried
    given, returned, forward = [], [], trainer.model.forward

    def recording(x, state=None, **kw):
        given.append(state)
        out = forward(x, state, **kw)
        returned.append(out.state)
        return out

    trainer.model.forward = recording
    trainer.run()
    assert len(given) == 3 and given[0] is not None and given[0].rosa is None and given[0].pos == 0
    for before, after in zip(returned, given[1:]):
        assert after.rosa is None and after.pos == before.pos > 0
        pairs = list(zip(after.tensors(), before.tensors()))
        assert pairs and all(na == nb and torch.equal(a, b) for (na, a), (nb, b) in pairs)
