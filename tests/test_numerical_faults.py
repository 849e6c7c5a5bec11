"""Numerical faults in training: a batch whose loss is NaN/Inf, a gradient that overflows to Inf,
and an fp16-style loss-scale overflow are each detected, the optimizer step is skipped and reported,
and neither the weights nor the optimizer state change; the steps around the fault train normally. A
huge but finite gradient is clipped, not skipped: the optimizer sees gradients of norm <= grad_clip."""

from __future__ import annotations

import copy

import torch

from hierarchos.config import tiny_config
from hierarchos.model import HierarchosLM
from hierarchos.model.losses import lm_loss
from hierarchos.train.batches import TokenStreams
from hierarchos.train.trainer import TrainConfig, Trainer


def make_trainer(tokens: int = 200, **cfg) -> Trainer:
    torch.manual_seed(0)
    model = HierarchosLM(tiny_config(vocab_size=32))
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 30, (tokens,), generator=g).tolist()]
    streams = TokenStreams.from_documents(docs, eos_id=31, batch_size=2, chunk=12)
    config = TrainConfig(epochs=1, batch_size=2, starting_lr=3e-3, warmup_steps=0, log_every=1, eval_every_epoch=0,
                         **cfg)
    return Trainer(model, streams, config, torch.device("cpu"), log=lambda line: None)


class FaultyForward:
    """The model's forward, with `fault(out)` applied to the outputs of the listed calls."""

    def __init__(self, model, calls: set[int], fault):
        self.model, self.calls, self.fault, self.count = model, calls, fault, 0

    def __call__(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        self.count += 1
        if self.count in self.calls:
            out.logits = self.fault(out.logits)
        return out


def optimizer_state(trainer: Trainer) -> list:
    """The optimizers' per-parameter state (moments, step counts), not their param_groups, whose
    learning rate the schedule changes at every step, skipped or not."""
    return [copy.deepcopy(opt.state_dict()["state"]) for opt in trainer.optimizer.optimizers]


def run_with_fault(trainer: Trainer, fault_call: int, fault) -> tuple[list, list]:
    """Run, snapshotting (weights, optimizer state) around every optimizer step; returns the
    snapshots and the log lines."""
    trainer.forward_model = FaultyForward(trainer.model, {fault_call}, fault)
    logs, snaps = [], []
    trainer.log = logs.append
    snaps.append((copy.deepcopy(trainer.model.state_dict()), optimizer_state(trainer)))

    def stop():
        snaps.append((copy.deepcopy(trainer.model.state_dict()), optimizer_state(trainer)))
        return trainer.opt_step >= 4

    trainer.run(stop_requested=stop)
    return snaps, logs


def same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def assert_only_step_skipped(trainer, snaps, logs, skipped_step: int):
    assert trainer.skipped_steps == 1 and trainer.opt_step == 4
    assert any(f"step {skipped_step}" in line and "skipped" in line for line in logs), logs
    for step in range(4):  # snaps[i] is the state before optimizer step i
        unchanged = same(snaps[step][0], snaps[step + 1][0]) and same(snaps[step][1], snaps[step + 1][1])
        assert unchanged == (step == skipped_step), step
    for tensor in snaps[-1][0].values():
        assert torch.isfinite(tensor.float()).all()


def test_nan_or_inf_loss_in_one_batch_is_skipped():
    for poison in (float("nan"), float("inf")):
        trainer = make_trainer()
        snaps, logs = run_with_fault(trainer, 2, lambda logits, p=poison: logits + p)
        assert_only_step_skipped(trainer, snaps, logs, skipped_step=1)


def test_gradient_overflow_is_skipped():
    """A finite loss whose backward overflows float32: the gradient norm is Inf, so the step is skipped."""
    class Explode(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * 1e38 * 1e38  # inf

    trainer = make_trainer()
    snaps, logs = run_with_fault(trainer, 3, Explode.apply)
    assert_only_step_skipped(trainer, snaps, logs, skipped_step=2)


class ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by a huge finite factor (a loss scale
    that nothing unscales), so the raw gradient norm lies far above any sensible clip."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * 1e5


def grad_norm(parameters) -> float:
    """The global 2-norm of the gradients, in float64, computed here (not by torch's clip helper)."""
    squares = [p.grad.detach().double().pow(2).sum() for p in parameters if p.grad is not None]
    return float(torch.stack(squares).sum().sqrt())


def grads_the_optimizer_sees(trainer: Trainer, steps: int) -> tuple[list[float], list]:
    """Run `steps` optimizer steps with ScaleGrad on every window, recording the gradient norm at
    the moment the optimizer steps (and the first step's gradients)."""
    trainer.forward_model = FaultyForward(trainer.model, set(range(1, 1000)), ScaleGrad.apply)
    seen, first, step = [], [], trainer.optimizer.step

    def recording_step(*args, **kwargs):
        seen.append(grad_norm(trainer.model.parameters()))
        if not first:
            first.extend(p.grad.detach().clone() if p.grad is not None else None for p in trainer.model.parameters())
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    trainer.run(stop_requested=lambda: trainer.opt_step >= steps)
    return seen, first


def test_clipping_bounds_the_gradient_norm_the_optimizer_sees():
    """The rule that defines clipping: whatever the raw gradient, the optimizer steps on gradients of
    global norm <= grad_clip (their direction kept), and with clipping off, on the raw gradients.
    (Checked on the gradients: Adam's step alone is bounded by its lr whatever the gradient.)"""
    clip = 0.5
    clipped = make_trainer(grad_clip=clip)
    raw = make_trainer(grad_clip=0.0)  # the same model and data (seed 0), clipping off
    reference = copy.deepcopy(raw.model)

    # the raw first-step gradient, by hand: one forward/backward of the first window
    x, y = raw.train_streams.batch(0)
    out = reference(x)
    out.logits = ScaleGrad.apply(out.logits)
    lm_loss(out, y, reference.cfg.z_loss_weight, raw.cfg.loss)[0].backward()
    raw_norm = grad_norm(reference.parameters())
    assert raw_norm > 100 * clip, raw_norm

    seen_clipped, first_clipped = grads_the_optimizer_sees(clipped, 3)
    seen_raw, _ = grads_the_optimizer_sees(raw, 3)
    assert clipped.skipped_steps == raw.skipped_steps == 0
    assert len(seen_clipped) == len(seen_raw) == 3
    assert all(clip * (1 - 1e-4) <= norm <= clip * (1 + 1e-6) for norm in seen_clipped), seen_clipped
    assert abs(seen_raw[0] - raw_norm) <= 1e-4 * raw_norm, (seen_raw[0], raw_norm)
    assert all(norm > 100 * clip for norm in seen_raw), seen_raw
    for (name, p), got in zip(reference.named_parameters(), first_clipped):  # scaled, not bent
        want = None if p.grad is None else p.grad * (clip / raw_norm)
        assert (got is None) == (want is None), name
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-7, msg=lambda m: f"{name}: {m}")
    for tensor in clipped.model.state_dict().values():
        assert torch.isfinite(tensor.float()).all()


def test_fp16_overflow_is_skipped_and_the_scale_backs_off():
    """fp16 training with GradScaler (what the trainer runs on CUDA GPUs without bf16), here under
    CPU fp16 autocast with a scale far too large: the scaled fp16 gradients overflow, unscale_ finds
    Inf, the step is skipped and the scale halves, until it fits and training proceeds."""
    trainer = make_trainer(tokens=1500)
    trainer.amp_dtype = torch.float16
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 18, growth_interval=1000)
    weights, optim = copy.deepcopy(trainer.model.state_dict()), optimizer_state(trainer)
    trainer.run(stop_requested=lambda: trainer.opt_step >= 1)
    assert trainer.skipped_steps == 1 and trainer.scaler.get_scale() == 2.0 ** 17
    assert same(weights, trainer.model.state_dict()) and same(optim, optimizer_state(trainer))
    # (CPU fp16 is emulated and slow: stop at the first step that fits)
    trainer.run(stop_requested=lambda: trainer.skipped_steps < trainer.opt_step)
    assert trainer.skipped_steps < trainer.opt_step <= 16 and not same(weights, trainer.model.state_dict())
    for tensor in trainer.model.state_dict().values():
        assert torch.isfinite(tensor.float()).all()


def test_skip_is_read_late_on_logging_steps_and_still_exact():
    """With the fused AdamW the trainer reads nothing on the host per window: between logging steps
    the steps' outcomes wait on the device (pending), the non-finite step is still never written into
    the weights or optimizer state, and it is reported with its own step number at the next log."""
    trainer = make_trainer()
    trainer.cfg.log_every = 4
    assert trainer.device_skip
    pending = []
    trainer.forward_model = FaultyForward(trainer.model, {2}, lambda logits: logits + float("nan"))
    logs, snaps = [], [(copy.deepcopy(trainer.model.state_dict()), optimizer_state(trainer))]
    trainer.log = logs.append

    def stop():
        pending.append(len(trainer.pending_steps))
        snaps.append((copy.deepcopy(trainer.model.state_dict()), optimizer_state(trainer)))
        return trainer.opt_step >= 4

    trainer.run(stop_requested=stop)
    assert pending[:3] == [1, 2, 3], pending   # steps 0-2 not read yet: no log before step 4
    assert_only_step_skipped(trainer, snaps, logs, skipped_step=1)
