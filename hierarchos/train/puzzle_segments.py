"""The puzzle trainer's fast step: the segments of one batch with no host read inside a segment,
each segment's forward + Q target + loss + backward + clip replayed as a CUDA graph.

It computes what `PuzzleTrainer.train_batch_reference` computes (tests/test_puzzle_trainer_speed.py
holds the two equal over several steps with exploration, halting and a skipped segment), with every
host read of that loop moved onto the device:

- the step's metrics add up in one float64 device vector (the reference adds Python floats of the
  same values in the same order) and are read once, at the end of the step, with the skipped
  segments;
- a non-finite loss skips the update by masks: the fused AdamW's `found_inf` (weights, moments and
  step count stay as they were), zeroed DeepEmbed gradients (LazyRowAdam moves only rows with a
  nonzero gradient; its masked form, whose host-free cost is nothing for a puzzle vocabulary of
  n + 2 rows) and the per-puzzle rows' sign step masked off;
- one host read per segment remains, `halted.all()`: it decides whether another segment runs, and
  a segment is an optimizer update, so it must be known before the next one is launched.

The per-puzzle table is kept out of the autograd graph: its rows for the batch are gathered into a
leaf (B, d) that a forward hook hands the model in place of the embedding's output, and the sign
step (`sign_step_rows`) adds that leaf's gradient into the rows. The sparse embedding backward
would drop the padding row with a boolean index (a host read) and hand back a new sparse tensor
every time, neither of which a graph can hold; the rows the step moves are the same.

Capture (CUDA; `record_eagerly` stands in on the CPU): one graph per (batch size, segment index),
since the state's shapes (attention KV caches) and the model's phase (memory chunks, plan points)
move with the segment. The batch's cells and the carried state are copied into buffers the graph
owns; every parameter's `.grad` is None when the segment starts, so the captured backward writes
fresh gradients into the graph's own tensors, handed to the optimizer after each replay. The
optimizer step stays outside the graph (eager, a few fused launches): the schedule changes its
rate every step, and a capturable AdamW would change what checkpoints hold. A shape whose capture
fails runs eagerly, and so does every segment of a model with full (unwindowed) attention, whose
KV cache is sized by a host read.

Every segment graph draws on one memory pool. A graph's outputs (gradients, the new state, the
metrics, `ok`) stay allocated as long as the graph does, so a later capture never writes over them;
an earlier graph's temporaries may hold a later graph's outputs, which is safe because every output
is read before the next replay (the step reads each segment's outputs, and copies its state into
the next segment's buffers, before launching the next one; `ok` of segment k is overwritten only by
replaying graph k or an earlier-captured one, which the step does not do before its final read).
With a private pool per graph, the 9x9 default model at batch 128 held ~6.7 GB per segment graph:
54 GB for 8 segments, out of memory on an 80 GB card beside a second run.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..model.puzzle import cell_predictions
from ..model.state import HierarchosState
from ..ops.capture import why_capture_failed
from .cuda_graph import _flatten, record_cuda_graph
from .schedule import LazyRowAdam, lazy_row_adam_masked, skip_step_unless
from .sign_sgd import SparseSignSGD

MAX_BATCH_SIZES = 2  # batch sizes kept captured (a full batch and an epoch's last, shorter one)


@torch.no_grad()
def sign_step_rows(table: torch.Tensor, rows: torch.Tensor, row_grads: torch.Tensor, lr: float, decay: float,
                   ok: torch.Tensor) -> None:
    """SparseSignSGD's step from the batch's row gradients, with no host read: row r (r in `rows`,
    r != 0) <- r * (1 - lr * decay) - lr * sign(sum of its gradients); every other row, and every
    row when `ok` (a device bool) is false, keeps its exact value. Row 0 is the padding row."""
    touched = torch.zeros(table.shape[0], dtype=torch.bool, device=table.device).index_fill_(0, rows, True)
    touched[0] = False
    summed = torch.zeros_like(table).index_add_(0, rows, row_grads.to(table.dtype))
    moved = table * (1.0 - lr * decay) - lr * torch.sign(summed)
    table.copy_(torch.where((touched & ok)[:, None], moved, table))


@dataclass
class _Batch:
    """Buffers of one batch size that every segment's graph reads."""
    inputs: torch.Tensor
    solutions: torch.Tensor
    ids: torch.Tensor
    rows: torch.Tensor            # ids as table rows (ids above the table read the padding row 0)
    active: torch.Tensor          # (B,) bool: puzzles still thinking
    vectors: torch.Tensor | None  # (B, d) leaf: the batch's per-puzzle rows, the model's embedding output


@dataclass
class _Entry:
    leaves: list                  # the carried state's buffers (inputs of the graph)
    template: object              # the state built on `leaves`
    replay: Callable[[], None] | None = None
    outputs: tuple | None = None  # (loss, dict) rewritten by every replay
    names: list = field(default_factory=list)  # keys of the state leaves in the outputs dict


def _leaves(state) -> list | None:
    """The state's tensors, or None for a state a graph cannot carry."""
    if isinstance(state, HierarchosState):
        return _flatten(state)
    if isinstance(state, torch.Tensor):
        return [state]
    return None


def _rebuilt(template, leaves: list):
    return leaves[0] if isinstance(template, torch.Tensor) else template.with_leaves(leaves, template.pos, None)


class SegmentRunner:
    """Runs the segments of a batch for `PuzzleTrainer.train_batch` (see the module docstring).
    `capture`: replay graphs (CUDA); `recorder`: `record_cuda_graph`, or `record_eagerly` in tests."""

    def __init__(self, model, cfg, device: torch.device, optimizer, *, capture: bool, autocast, cell_loss,
                 q_losses, recorder=None, warmup: int = 2, log=print):
        self.model, self.cfg, self.device, self.optimizer, self.log = model, cfg, device, optimizer, log
        self.capture, self.recorder, self.warmup = capture, recorder or record_cuda_graph, warmup
        arch = getattr(model, "cfg", None)
        if capture and arch is not None and "attention" in (arch.h_block, arch.l_block) and not arch.window_size:
            # a full-attention KV cache is sized by a host read of its end positions (frozen rows
            # write nothing), which no capture can hold: say so once instead of failing every capture
            log("cuda graphs: full attention sizes its KV cache on the host; puzzle segments run eagerly "
                "(a --window-size attention cache has a fixed size and is captured)")
            self.capture = False
        self.autocast, self.cell_loss, self.q_losses = autocast, cell_loss, q_losses
        embedding = getattr(model, "puzzle_embedding", None)
        self.table = embedding.table.weight if embedding is not None else None
        self.params = [p for p in model.parameters() if p.requires_grad and p is not self.table]
        for opt in optimizer.optimizers:  # a puzzle vocabulary has n + 2 rows: masks cost less than a host read
            if isinstance(opt, LazyRowAdam):
                opt.update = lazy_row_adam_masked
        self.fused = all(group.get("fused") for opt in optimizer.optimizers if isinstance(opt, torch.optim.AdamW)
                         for group in opt.param_groups)
        self.pool = None  # the segment graphs' shared memory pool (made at the first capture)
        self.batches: dict[int, _Batch] = {}
        self.entries: dict[tuple, _Entry] = {}
        self.eager_keys: set[tuple] = set()
        self.replays = 0         # segments run by a graph (or its eager stand-in)
        self.eager_segments = 0  # segments run plainly

    # ---- one batch -----------------------------------------------------------------------------
    def train_batch(self, inputs, solutions, ids, min_segments: torch.Tensor):
        """Runs the segments; returns (record, segments run, [segments whose update was skipped])."""
        model = self.model
        M = model.puzzle_cfg.max_segments
        B = inputs.shape[0]
        batch = self._batch(inputs, solutions, ids)
        state = model.init_state(B, device=self.device, dtype=next(model.parameters()).dtype)
        halted = torch.zeros(B, dtype=torch.bool, device=self.device)
        used = torch.zeros(B, dtype=torch.long, device=self.device)
        solved_at_halt = torch.zeros(B, dtype=torch.bool, device=self.device)
        sums = torch.zeros(5, dtype=torch.float64, device=self.device)  # loss, cell, q_halt, q_continue, cell_acc
        oks = []
        k = 0
        for k in range(1, M + 1):
            loss, out, grads, state = self._segment(k, batch, state)
            ok = out["ok"]
            self._update(grads, out.get("vectors_grad"), batch.rows, ok)
            oks.append(ok)
            with torch.no_grad():
                sums += out["metrics"]
                stop = batch.active & ((out["wants_halt"] & (k >= min_segments)) | (k == M))
                used = torch.where(stop, torch.full_like(used, k), used)
                solved_at_halt = torch.where(stop, out["solved"], solved_at_halt)
                halted = halted | stop
                batch.active.copy_(~halted)
            if bool(halted.all()):  # the one host read of a segment: does another one run?
                break
        tail = torch.stack([used.float().mean(), solved_at_halt.float().mean()]).double()
        values = torch.cat([sums, tail, torch.stack(oks).double()]).tolist()  # the one read of the step
        names = ("loss", "cell_loss", "q_halt", "q_continue", "cell_acc")
        record = {name: value / k for name, value in zip(names, values)}
        record.update(segments=values[5], exact=values[6], puzzles=B)
        skipped = [segment for segment, ok in enumerate(values[7:], start=1) if not ok]
        return record, k, skipped

    def _batch(self, inputs, solutions, ids) -> _Batch:
        B = inputs.shape[0]
        batch = self.batches.get(B)
        if batch is None:
            new = lambda t: torch.empty_like(t, device=self.device)  # noqa: E731
            vectors = None
            if self.table is not None:
                vectors = torch.zeros(B, self.table.shape[1], dtype=self.table.dtype, device=self.device,
                                      requires_grad=True)
            batch = _Batch(new(inputs), new(solutions), new(ids), new(ids),
                           torch.ones(B, dtype=torch.bool, device=self.device), vectors)
            if len(self.batches) < MAX_BATCH_SIZES:
                self.batches[B] = batch
        batch.inputs.copy_(inputs)
        batch.solutions.copy_(solutions)
        batch.ids.copy_(ids)
        if self.table is not None:  # what PuzzleEmbedding reads for an id above its table: row 0
            batch.rows.copy_(torch.where(ids > self.table.shape[0] - 1, torch.zeros_like(ids), ids))
        batch.active.fill_(True)
        return batch

    # ---- one segment ---------------------------------------------------------------------------
    def _run(self, k: int, batch: _Batch, state):
        """Forward, the next segment's Q values (no gradient), loss, backward, clip: device work only.
        Returns (loss, outputs, gradients by parameter index, the new state, not detached)."""
        model, cfg = self.model, self.cfg
        M = model.puzzle_cfg.max_segments
        for p in self.params:  # the backward writes fresh gradients (a graph's own tensors)
            p.grad = None
        hook = None
        if self.table is not None:
            batch.vectors.grad = None
            with torch.no_grad():
                batch.vectors.copy_(self.table.index_select(0, batch.rows))
            hook = model.puzzle_embedding.register_forward_hook(lambda module, args, output: batch.vectors)
        try:
            with self.autocast():
                out = model(batch.inputs, batch.ids, state)
                cell_loss, _ = self.cell_loss(model, out, batch.solutions, batch.active, cfg.loss)
            right = cell_predictions(out.logits.detach(), model.puzzle_cfg.answer_offset) == batch.solutions
            solved = right.all(-1)
            following = None
            if k < M:
                with torch.no_grad(), self.autocast():
                    following = model(batch.inputs, batch.ids, out.state.detach())
        finally:
            if hook is not None:
                hook.remove()
        q_halt, q_continue = self.q_losses(out, solved, batch.active, following, next_is_last=k + 1 == M)
        loss = cell_loss + cfg.q_weight * (q_halt + q_continue)
        loss.backward()  # a non-finite loss still runs: its update is masked off (SegmentRunner._update)
        torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        with torch.no_grad():
            n_active = batch.active.sum().clamp(min=1)
            cell_acc = (right.float().mean(-1) * batch.active).sum() / n_active
            metrics = torch.stack([t.detach().double() for t in (loss, cell_loss, q_halt, q_continue, cell_acc)])
        outputs = {"metrics": metrics, "solved": solved, "wants_halt": (out.q_halt > out.q_continue).detach(),
                   "ok": torch.isfinite(loss.detach())}
        grads = {i: p.grad for i, p in enumerate(self.params) if p.grad is not None}
        if self.table is not None:
            outputs["vectors_grad"] = batch.vectors.grad
        return loss.detach(), outputs, grads, out.state

    def _segment(self, k: int, batch: _Batch, state):
        leaves = _leaves(state) if self.capture else None
        key = (batch.inputs.shape[0], k)
        if leaves is None or key in self.eager_keys or self.batches.get(key[0]) is not batch:
            self.eager_segments += 1
            loss, out, grads, new_state = self._run(k, batch, state)
            return loss, out, grads, new_state.detach()
        entry = self.entries.get(key) or self._build(key, batch, state, leaves)
        if entry is None:
            return self._segment(k, batch, state)  # now in eager_keys
        if any(a.data_ptr() != b.data_ptr() for a, b in zip(leaves, entry.leaves)):
            torch._foreach_copy_(entry.leaves, leaves)
        entry.replay()
        self.replays += 1
        loss, out = entry.outputs
        grads = {int(name[5:]): t for name, t in out.items() if name.startswith("grad.")}
        new_state = _rebuilt(entry.template, [out[name] for name in entry.names])
        if isinstance(new_state, HierarchosState):
            new_state.pos = state.pos + batch.inputs.shape[1] + 1
        return loss, out, grads, new_state

    def _build(self, key, batch: _Batch, state, leaves) -> _Entry | None:
        buffers = [t.detach().clone() for t in leaves]
        template = buffers[0] if isinstance(state, torch.Tensor) else state.with_leaves(buffers, state.pos, None)
        entry = _Entry(leaves=buffers, template=template)

        def run():
            loss, out, grads, new_state = self._run(key[1], batch, entry.template)
            state_leaves = [t.detach() for t in _leaves(new_state)]
            entry.names = [f"state.{i}" for i in range(len(state_leaves))]
            return loss, {**out, **{f"grad.{i}": g for i, g in grads.items()},
                          **dict(zip(entry.names, state_leaves))}

        saved = [t.clone() for t in buffers]
        # warm-up runs draw no random numbers the reference would not (CPU: the stand-in really runs)
        rng = torch.random.fork_rng(devices=[]) if self.device.type == "cpu" else contextlib.nullcontext()
        try:
            if self.pool is None and self.device.type == "cuda":
                self.pool = torch.cuda.graph_pool_handle()
            with rng:
                entry.replay, entry.outputs = self.recorder(run, max(1, self.warmup), lambda: None, pool=self.pool)
        except Exception as exc:  # noqa: BLE001 - whatever a capture refuses, the eager segment can do
            self.eager_keys.add(key)
            self.log(f"cuda graphs: capturing puzzle segment {key[1]} of a batch of {key[0]} failed "
                     f"({why_capture_failed(exc)}); it runs eagerly")
            return None
        finally:
            for p in self.params:
                p.grad = None
        torch._foreach_copy_(entry.leaves, saved)
        self.entries[key] = entry
        if key[1] == 1:
            self.log(f"cuda graphs: capturing the puzzle segments of a batch of {key[0]}")
        return entry

    # ---- the update ----------------------------------------------------------------------------
    def _update(self, grads: dict, vectors_grad, rows, ok: torch.Tensor) -> None:
        """The optimizer step of one segment, skipped by device masks when `ok` is false."""
        for i, p in enumerate(self.params):
            p.grad = grads.get(i)
        for opt in self.optimizer.optimizers:
            if isinstance(opt, SparseSignSGD):
                if vectors_grad is not None:
                    group = opt.param_groups[0]
                    sign_step_rows(self.table, rows, vectors_grad, group["lr"], group["weight_decay"], ok)
            elif (isinstance(opt, torch.optim.AdamW) and self.fused) or isinstance(opt, LazyRowAdam):
                skip_step_unless(opt, ok)
                opt.step()
                if isinstance(opt, torch.optim.AdamW):
                    opt.found_inf = None
            elif bool(ok):  # an unfused optimizer cannot take the mask: one host read
                opt.step()
        for p in self.params:  # graphs own these tensors; eager training drops them as zero_grad would
            p.grad = None
