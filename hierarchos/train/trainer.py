"""The training loop: truncated BPTT over token streams, AdamW + warmup/cosine, accumulation,
clipping, mixed precision, NaN/Inf skipping, validation with bits per byte, checkpoints and
exact resume.

A micro-step reads window i of every stream; the recurrent state carries to the next window
(`persist_state`), cut from the graph between windows and every `detach_every` tokens inside
one. Every `accumulation_steps` micro-steps make one optimizer step. A non-finite loss or
gradient skips that optimizer step entirely (reported, never written into the weights). With the
fused AdamW (CUDA, CPU) no value is read on the host per window: the loss, the finiteness and the
ponder cost stay on the device, the skip is a device mask (the fused AdamW's `found_inf`, table
gradients zeroed), and all of it is read on logging steps, checkpoints and at the end.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field

import torch

from ..errors import HierarchosError
from ..model.losses import LossWeights, lm_loss
from .batches import TokenStreams
from .rosa_ahead import WindowHints
from .schedule import build_optimizer, lr_at, skip_step_unless

HINTS_AHEAD = 2  # windows whose ROSA hints are computed ahead of the one training


@dataclass
class TrainConfig:
    epochs: int = 3
    batch_size: int = 4
    accumulation_steps: int = 1
    starting_lr: float = 1e-4
    min_lr: float = 1e-6
    warmup_steps: int | None = None          # default: 5% of the optimizer steps
    disable_lr_schedule: bool = False
    grad_clip: float = 1.0
    weight_decay: float = 0.01
    detach_every: int | None = None          # tokens; None = once per window
    persist_state: bool = True
    amp: bool | None = None                  # None = auto (CUDA only)
    save_every: int = 0                      # optimizer steps between checkpoints (0 = each epoch)
    keep_checkpoints: int = 3
    log_every: int = 10
    eval_every_epoch: int = 1                # validate every N epochs (0: never)
    cuda_graphs: bool = False                # replay each window's forward+backward as a CUDA graph
    seed: int = 0
    loss: LossWeights = field(default_factory=LossWeights)


class CosineSchedule:
    """Holds the schedule's numbers; the rate itself is `lr_at(step, ...)`."""

    def __init__(self, optimizer, total_steps: int, cfg: TrainConfig):
        self.optimizer, self.total_steps = optimizer, total_steps
        self.starting_lr, self.min_lr, self.disabled = cfg.starting_lr, cfg.min_lr, cfg.disable_lr_schedule
        self.warmup_steps = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, total_steps // 20)

    def apply(self, step: int) -> float:
        lr = lr_at(step, self.total_steps, self.starting_lr, self.min_lr, self.warmup_steps, self.disabled)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("total_steps", "starting_lr", "min_lr", "disabled", "warmup_steps")}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def bits_per_byte(nll_nats_sum: float, n_bytes: int) -> float:
    return nll_nats_sum / max(1, n_bytes) / math.log(2)


class Trainer:
    def __init__(self, model, train_streams: TokenStreams, cfg: TrainConfig, device: torch.device,
                 val_streams: TokenStreams | None = None, val_bytes: int = 0, log=print):
        self.model, self.cfg, self.device, self.log = model, cfg, device, log
        self.forward_model = model  # the DDP/FSDP wrapper when distributed (hierarchos.train.distributed)
        self.train_streams, self.val_streams, self.val_bytes = train_streams, val_streams, val_bytes
        self.steps_per_epoch = len(train_streams)
        per_epoch = -(-self.steps_per_epoch // cfg.accumulation_steps)  # windows end at epoch ends too
        self.total_opt_steps = max(1, cfg.epochs * per_epoch)
        self.optimizer = build_optimizer(model, cfg.starting_lr, cfg.weight_decay)
        self.schedule = CosineSchedule(self.optimizer, self.total_opt_steps, cfg)
        self.micro_step = 0          # global micro-step counter (data position)
        self.opt_step = 0
        self.skipped_steps = 0
        self.best_val = float("inf")
        self.state = None
        self.last_metrics: dict = {}
        # on_eval(trainer, epoch_end) -> metrics to log, called after every optimizer step (e.g. the
        # lm-eval tasks of `train --eval-tasks`, hierarchos.evaluate.make_train_hook); {} when not due
        self.on_eval = None
        use_amp = cfg.amp if cfg.amp is not None else device.type == "cuda"
        self.amp_dtype = None
        if use_amp and device.type == "cuda":
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.graphed = None  # hierarchos.train.cuda_graph.GraphedWindow under cfg.cuda_graphs
        if cfg.cuda_graphs:
            from .cuda_graph import GraphedWindow

            def backward_scale(loss):
                scaled = loss / cfg.accumulation_steps
                return self.scaler.scale(scaled) if self.scaler else scaled

            self.graphed = GraphedWindow(model, lambda out, y: lm_loss(out, y, model.cfg.z_loss_weight, cfg.loss),
                                         backward_scale=backward_scale, autocast=self._autocast,
                                         capture=device.type == "cuda", log=log)
        # a captured backward writes into the .grad tensors it was captured with: zero them in place
        self.drop_grads = self.graphed is None or not self.graphed.capture
        # the skip rule as a device mask needs the fused AdamW (its found_inf); else read on the host
        self.fused_adamw = all(group.get("fused") for opt in self.optimizer.optimizers
                               if isinstance(opt, torch.optim.AdamW) for group in opt.param_groups)
        self.pending_steps: list = []  # (opt_step, device bool ok) not yet read on the host
        # ROSA's hints of each window, computed while the previous window trains (rosa_ahead); the
        # trainer's states then carry no automata
        self.hints = None
        if model.rosa_embed is not None:
            self.hints = WindowHints(train_streams, model.cfg.rosa_window, model.cfg.rosa_none_id,
                                     carry=cfg.persist_state, pin=device.type == "cuda")

    # ---- pieces ------------------------------------------------------------------------
    @property
    def device_skip(self) -> bool:
        """Skip non-finite steps by a device mask (no host read per window); GradScaler reads its own."""
        return self.scaler is None and self.fused_adamw

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _fresh_state(self):
        state = self.model.init_state(self.train_streams.streams.shape[0], device=self.device,
                                      dtype=next(self.model.parameters()).dtype)
        state.rosa = None  # the hints come from self.hints, whose automata run ahead on their own thread
        return state

    def _window_loss(self, inputs, targets, hints=None):
        """Forward + backward over one window, cut every `detach_every` tokens; returns (nll_sum,
        tokens, parts, finite). `hints`: the window's ROSA hints (B, T) on the CPU (`self.hints`),
        required when the model uses ROSA."""
        cfg = self.cfg
        T = inputs.shape[1]
        piece = cfg.detach_every or T
        if self.hints is not None:
            if hints is None:
                raise ValueError("this model uses ROSA: pass the window's hints (Trainer.hints.get)")
            if self.state is None:  # a state without automata (the model would make a set of its own)
                self.state = self._fresh_state()
        if self.graphed is not None and piece >= T:
            if self.forward_model is not self.model:
                raise HierarchosError("CUDA graphs run in one process: drop --cuda-graphs under torchrun")
            loss, parts, state = self.graphed(inputs, targets, self.state, hints=hints)
            self.state = state if cfg.persist_state else None
            finite = torch.isfinite(loss)  # on the device; non-finite: the step is skipped (_clip_and_step)
            return torch.where(finite, parts["ce"].detach() * inputs.numel(), 0.0), inputs.numel(), parts, finite
        nll_sum, finite, parts = 0.0, torch.ones((), dtype=torch.bool, device=inputs.device), {}
        for start in range(0, T, piece):  # loop over pieces of >= detach_every tokens, not tokens
            x, y = inputs[:, start:start + piece], targets[:, start:start + piece]
            piece_hints = None
            if hints is not None:
                piece_hints = hints[:, start:start + piece].to(x.device, non_blocking=True)
            with self._autocast():
                out = self.forward_model(x, self.state, rosa_hint_ids=piece_hints)
                loss, parts = lm_loss(out, y, self.model.cfg.z_loss_weight, cfg.loss)
            self.state = out.state.detach() if cfg.persist_state else None
            piece_finite = torch.isfinite(loss)
            if not self.device_skip and not piece_finite:  # host path (GradScaler, unfused AdamW)
                finite = piece_finite
                continue
            finite = finite & piece_finite
            scaled = loss * (x.shape[1] / T) / cfg.accumulation_steps
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            nll_sum = nll_sum + torch.where(piece_finite, parts["ce"].detach() * x.numel(), 0.0)
        return nll_sum, inputs.numel(), parts, finite

    def _optimizer_step(self, finite):
        if self.graphed is not None:  # parameters no window reached must look untouched (.grad None)
            with self.graphed.hide_unreached_grads():
                return self._clip_and_step(finite)
        return self._clip_and_step(finite)

    def _clip_and_step(self, finite):
        """Whether the step was taken: a bool, or under `device_skip` a device bool read later."""
        if not self.device_skip and not finite:  # host path: a non-finite window never reaches the scaler
            self.optimizer.zero_grad(set_to_none=self.drop_grads)
            return False
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                              self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):  # FSDP: the norm is a DTensor; the mask must be a plain tensor
            norm = norm.full_tensor()
        if self.device_skip:  # the skip as a mask: nothing is written when ok is false
            ok = torch.isfinite(norm) & finite
            for opt in self.optimizer.optimizers:
                skip_step_unless(opt, ok)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=self.drop_grads)
            return ok
        if not torch.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=self.drop_grads)
            if self.scaler:
                self.scaler.update()
            return False
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=self.drop_grads)
        return True

    @torch.no_grad()
    def evaluate(self) -> dict:
        if self.val_streams is None or len(self.val_streams) == 0:
            return {}
        self.model.eval()
        state, nll, count = None, 0.0, 0
        for i in range(len(self.val_streams)):
            x, y = self.val_streams.batch(i)
            x, y = x.to(self.device), y.to(self.device)
            with self._autocast():
                out = self.model(x, state)
                _, parts = lm_loss(out, y, 0.0)
            # the same carry as training: without persist_state (full attention, whose KV cache would
            # grow through the whole held-out text) every window starts afresh
            state = out.state if self.cfg.persist_state else None
            nll += float(parts["ce"]) * y.numel()
            count += y.numel()
        self.model.train()
        loss = nll / max(1, count)
        # rows of a split text each lose their first target (and the split a short tail): the bytes
        # are the whole text's, so the summed NLL is the mean per scored token times the text's targets
        streams = self.val_streams
        targets = (streams.source_tokens or streams.num_tokens) - 1
        bpb = bits_per_byte(loss * targets, self.val_bytes) if self.val_bytes else None
        return {"val_loss": loss, "val_bpb": bpb}

    # ---- the loop ------------------------------------------------------------------------
    def run(self, on_checkpoint=None, progress=None, stop_requested=lambda: False) -> dict:
        """Train until the configured epochs are done, or until `stop_requested()` is true at an
        optimizer-step boundary. `on_checkpoint(trainer, is_best, reason)` saves; `reason` is
        'step', 'epoch' or 'interrupt'. Metrics go to `on_metrics`-style `self.log_metrics`."""
        try:
            return self._run(on_checkpoint, progress, stop_requested)
        finally:
            if self.hints is not None:
                self.hints.close()

    def _run(self, on_checkpoint, progress, stop_requested) -> dict:
        cfg, model = self.cfg, self.model
        model.train()
        window = self._new_window()
        total_micro = cfg.epochs * self.steps_per_epoch
        while self.micro_step < total_micro:
            epoch, index = divmod(self.micro_step, self.steps_per_epoch)
            if index == 0:
                self.state = None  # each epoch starts the streams afresh
            if window["micro"] == 0:
                lr = self.schedule.apply(self.opt_step)
            host_x, y = self.train_streams.batch(index, epoch)  # the epoch picks a shuffled window order
            x, y = host_x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            hints = None
            if self.hints is not None:
                ahead = range(self.micro_step + 1, min(self.micro_step + 1 + HINTS_AHEAD, total_micro))
                upcoming = [divmod(m, self.steps_per_epoch) for m in ahead]  # in flight on the worker from now
                hints = self.hints.get(epoch, index, upcoming)
            nll, ntok, parts, finite = self._window_loss(x, y, hints)
            self.micro_step += 1
            window["micro"] += 1
            window["finite"] = finite & window["finite"]
            window["nll"] += nll
            window["tokens"] += ntok
            window["ponder"] += parts["ponder"].detach() if "ponder" in parts else 0.0
            if progress is not None:  # the loss shown is the last logged one (no host read per window)
                progress(1, self.last_metrics.get("loss"), lr)  # None until the first log
            end_of_epoch = self.micro_step % self.steps_per_epoch == 0
            if window["micro"] < cfg.accumulation_steps and not end_of_epoch:
                continue
            self.pending_steps.append((self.opt_step, self._optimizer_step(window["finite"])))
            if not self.device_skip:
                self._read_pending_steps()
            self.opt_step += 1
            stopping = stop_requested()
            eval_start = time.perf_counter()
            evals = self.on_eval(self, end_of_epoch) if self.on_eval is not None else {}
            window["start"] += time.perf_counter() - eval_start  # evaluation time is not training time
            if self.opt_step % cfg.log_every == 0 or end_of_epoch or stopping or evals:
                self._read_pending_steps()  # the one host read of these windows
                elapsed = time.perf_counter() - window["start"]
                record = {"step": self.opt_step, "epoch": epoch + 1, "lr": lr,
                          "loss": float(window["nll"]) / max(1, window["tokens"]),
                          "ponder": float(window["ponder"]) / max(1, window["micro"]),
                          "tokens_per_s": window["tokens"] / max(elapsed, 1e-9),
                          "skipped_steps": self.skipped_steps}
                if self.device.type == "cuda":  # the allocator's own count: no device synchronisation
                    record["peak_mem_mib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20)
                if end_of_epoch and cfg.eval_every_epoch and (epoch + 1) % cfg.eval_every_epoch == 0:
                    record.update(self.evaluate())
                record.update(evals)
                self.log_metrics(record)
            window_done = window["micro"] >= cfg.accumulation_steps or end_of_epoch
            save_now = end_of_epoch or (cfg.save_every and self.opt_step % cfg.save_every == 0)
            if save_now and on_checkpoint is not None:
                self._read_pending_steps()
                val = self.last_metrics.get("val_loss") if end_of_epoch else None
                is_best = val is not None and val < self.best_val
                if is_best:
                    self.best_val = val
                on_checkpoint(self, is_best, "epoch" if end_of_epoch else "step")
            if stopping:
                self._read_pending_steps()
                if on_checkpoint is not None and not save_now:
                    on_checkpoint(self, False, "interrupt")
                return {"stopped": True, "opt_step": self.opt_step}
            if window_done:  # after any save, so checkpoint time does not count as training time
                window = self._new_window()
        self._read_pending_steps()
        return {"stopped": False, "opt_step": self.opt_step}

    def _read_pending_steps(self) -> None:
        """Count and report the optimizer steps skipped since the last read (one host read for all)."""
        if not self.pending_steps:
            return
        taken = torch.stack([torch.as_tensor(ok) for _, ok in self.pending_steps]).tolist()
        for (step, _), ok in zip(self.pending_steps, taken):
            if not ok:
                self.skipped_steps += 1
                self.log(f"warning: non-finite loss or gradient at step {step}: step skipped, weights unchanged")
        self.pending_steps = []

    def log_metrics(self, record: dict) -> None:
        """Replaced by the CLI to write metrics.jsonl and update the progress bar."""
        self.last_metrics = record

    @staticmethod
    def _new_window() -> dict:
        return {"micro": 0, "finite": True, "nll": 0.0, "tokens": 0, "ponder": 0.0, "start": time.perf_counter()}

    # ---- resume -----------------------------------------------------------------------------
    def trainer_state(self) -> dict:
        return {"micro_step": self.micro_step, "opt_step": self.opt_step, "skipped_steps": self.skipped_steps,
                "best_val": self.best_val if math.isfinite(self.best_val) else None,
                "train_config": json.loads(json.dumps(asdict(self.cfg), default=str))}

    def state_tensors(self) -> dict:
        """The carried recurrent state, by name (saved with checkpoints for exact resume)."""
        return {} if self.state is None else {name: t for name, t in self.state.tensors()}

    def load_state_tensors(self, tensors: dict) -> None:
        if not tensors:
            self.state = None
            return
        state = self._fresh_state()
        holders = dict(_holders(state))
        for name, tensor in tensors.items():
            slot = holders.get(name)
            if slot is None or tuple(slot[0][slot[1]].shape) != tuple(tensor.shape):
                raise HierarchosError(
                    f"the checkpoint's carried recurrent state ({name} {tuple(tensor.shape)}) does not fit this "
                    "run; resume with the same --batch_size, number of processes and model")
            container, key = slot
            container[key] = tensor.to(self.device)
        state.pos = self.micro_step % self.steps_per_epoch * self.train_streams.chunk
        self.state = state  # ROSA's automata: self.hints replays the epoch's earlier windows itself

    def load_trainer_state(self, state: dict) -> None:
        self.micro_step, self.opt_step = int(state["micro_step"]), int(state["opt_step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        best = state.get("best_val")  # None: no validation yet (a best of 0.0 is a real one)
        self.best_val = float("inf") if best is None else float(best)


def _holders(state):
    """(name, (container, key)) for every tensor slot of a HierarchosState, names as in state.tensors()."""
    def walk(tree, prefix):
        items = tree.items() if isinstance(tree, dict) else enumerate(tree)
        for key, value in items:
            name = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, (dict, list)):
                yield from walk(value, name)
            else:
                yield name, (tree, key)
    yield from walk({"memory": state.memory, "rounds": state.rounds}, "")
