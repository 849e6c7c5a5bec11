"""One training window (forward, loss, backward) captured in a CUDA graph and replayed.

A hierarchos training step launches about 5,000 small kernels at T=1024 and 13,700 at T=8192 (the
long-term memory's chunk loop; bench/count_ops.py), each paying Python and dispatcher time. Where
the GPU work per kernel is small (long windows, small batches) the GPU idles in between; a CUDA
graph replays them all with one launch (on an H200 at 125m: 1.65x a step at T=8192, B=2; 1.12x at
T=1024, B=16, where the GPU is busy anyway; 1.46x tokens/s in the `train` loop: BENCHMARKS.md).
`train` uses it by default on one GPU (hierarchos.cli.train.resolve_cuda_graphs); a window shape
whose capture fails runs eagerly. What capture needs, and how it is met here:

- Fixed shapes and addresses: every input (tokens, targets, ROSA hints, the carried recurrent
  state) is copied into buffers owned by the graph. One graph per (batch, length, phase), where
  the phase, the window's start position modulo lcm(ltm_chunk, h_stride), is all of the position
  the model's control flow reads (memory chunk boundaries, plan points).
- No host work inside: ROSA's hints come from a CPU automaton, so they are computed before the
  replay and copied in; the forward and backward have no `.item()` (bench/bench_train.py's
  profile counts host synchronisations), except where one token or one plan point lets the
  step form skip passes (`bool(frozen.all())` in hrm.py): such windows run eagerly.
- Gradients accumulate: the warm-up allocates `.grad` for every parameter the window reaches, so
  the captured backward adds into it in place. Whoever steps the optimizer must zero gradients
  in place (`zero_grad(set_to_none=False)`), never drop them: a dropped `.grad` would leave the
  graph writing into memory nobody reads. A parameter no window of an optimizer step reached
  must still look untouched to the optimizer (`.grad` None, as in eager training: AdamW would
  move a zero-gradient parameter by its momentum and weight decay), so the optimizer steps
  inside `hide_unreached_grads()`, which hides exactly those gradients.
- The carried state: the graph ends by copying the new state into its own input buffers, after
  the backward (which may still read the old state), so consecutive windows chain with no host
  copies; a state from elsewhere (a new epoch, a resume) is copied in first.

With `capture=False` (the CPU, or a GPU run that wants the bookkeeping without the graph) the
same function runs eagerly on the same buffers. The capture step itself is `record_cuda_graph`;
tests swap in `record_eagerly` (same warm-up, gradient and output bookkeeping, the "graph" being
the function run again), and the GPU benchmark checks real replays against eager execution.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from ..model.rosa import rosa_hints
from ..model.state import HierarchosState
from ..ops.capture import no_collection_during_capture, why_capture_failed

MAX_GRAPHS = 4  # distinct window shapes/phases kept captured; more run eagerly


def record_cuda_graph(run: Callable[[], tuple], warmup: int, before_capture: Callable[[], None],
                      pool=None) -> tuple[Callable[[], None], tuple]:
    """Warm `run` up on a side stream (lazy inits, cuBLAS workspaces, Triton JIT), call
    `before_capture`, then capture `run`: (replay, the static outputs every replay rewrites).
    `pool` (torch.cuda.graph_pool_handle()) shares one memory pool between graphs: only for graphs
    whose outputs are all read before another graph of the pool replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    before_capture()
    graph = torch.cuda.CUDAGraph()
    with no_collection_during_capture(), torch.cuda.graph(graph, pool=pool):
        outputs = run()
    return graph.replay, outputs


def record_eagerly(run: Callable[[], tuple], warmup: int, before_capture: Callable[[], None],
                   pool=None) -> tuple[Callable[[], None], tuple]:
    """`record_cuda_graph`'s contract without CUDA: a replay runs `run` again and writes its results
    into the first outputs, as a graph replay rewrites its static outputs (for CPU tests)."""
    for _ in range(warmup):
        run()
    before_capture()
    outputs = run()
    flat = [outputs[0], *outputs[1].values()]

    def replay():
        fresh = run()
        with torch.no_grad():
            torch._foreach_copy_(flat, [fresh[0].detach(), *(v.detach() for v in fresh[1].values())])

    return replay, outputs


def _flatten(state: HierarchosState) -> list[torch.Tensor]:
    return [t for _, t in state.tensors()]


@dataclass
class _Entry:
    x: torch.Tensor
    y: torch.Tensor
    hints: torch.Tensor | None
    leaves: list[torch.Tensor]       # the carried state's buffers: inputs, then overwritten with the outputs
    template: HierarchosState        # structure of the state (its tensors are `leaves`)
    run: Callable[[], tuple]         # the captured function (eager form)
    replay: Callable[[], None] | None = None  # the captured graph's replay
    reached: frozenset = frozenset()  # ids of the parameters the captured backward writes
    outputs: tuple | None = None     # (loss, parts) written by every replay


class GraphedWindow:
    """`window(x, y, state) -> (loss, parts, new_state)` with the backward already done.

    `loss_fn(out, y) -> (loss, parts)`; `backward_scale(loss) -> tensor to backpropagate`
    (accumulation division, GradScaler). `autocast()` is entered inside the captured region.
    """

    def __init__(self, model, loss_fn, *, backward_scale=lambda loss: loss, autocast=contextlib.nullcontext,
                 capture: bool | None = None, warmup: int = 2, recorder=None, log=print):
        self.model, self.loss_fn, self.backward_scale, self.autocast = model, loss_fn, backward_scale, autocast
        self.device = next(model.parameters()).device
        self.capture = (self.device.type == "cuda") if capture is None else capture
        if self.capture and recorder is None and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, not {self.device}")
        self.recorder = recorder or record_cuda_graph
        self.warmup, self.log = warmup, log
        cfg = model.cfg
        self.period = cfg.position_period
        self.entries: dict[tuple, _Entry] = {}
        self.eager_keys: set[tuple] = set()
        self.replays = 0        # windows through an entry (replayed, or run on its buffers)
        self.eager_windows = 0  # windows run plainly (host decisions, or more shapes than MAX_GRAPHS)
        self.reached: set[int] = set()  # parameters some window reached since the last optimizer step

    # ---- the call ------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, y: torch.Tensor, state: HierarchosState | None,
                 hints: torch.Tensor | None = None):
        """`hints`: the window's ROSA hints (B, T), computed by the caller on the CPU (the trainer's
        `WindowHints`, one window ahead); without them the state's automata make them here, from x's
        tokens (a copy back from the GPU waits for all queued work)."""
        model = self.model
        B, T = x.shape
        if state is None:
            state = model.init_state(B, device=self.device, dtype=next(model.parameters()).dtype)
        rosa = state.rosa
        if model.rosa_embed is not None:  # CPU automata: before the replay, never inside it
            if hints is None:
                hints, rosa = rosa_hints(x, rosa, model.cfg.rosa_window, model.cfg.rosa_none_id)
            hints = hints.to(x.device, non_blocking=True)
        else:
            hints = None
        if self.capture and self._decides_on_host(T, state.pos):
            return self._eager(x, y, hints, state, rosa)
        leaves = _flatten(state)
        key = (B, T, state.pos % self.period, tuple((tuple(t.shape), t.dtype) for t in leaves))
        entry = self.entries.get(key)
        if entry is None and key not in self.eager_keys:
            if len(self.entries) < MAX_GRAPHS:
                entry = self._build(key, x, y, hints, state)
            else:
                self.eager_keys.add(key)
                self.log(f"cuda graphs: {MAX_GRAPHS} window shapes captured already; "
                         f"windows of shape {B}x{T} (phase {key[2]}) run eagerly")
        if entry is None:
            return self._eager(x, y, hints, state, rosa)
        entry.x.copy_(x, non_blocking=True)
        entry.y.copy_(y, non_blocking=True)
        if hints is not None:
            entry.hints.copy_(hints, non_blocking=True)
        if any(a.data_ptr() != b.data_ptr() for a, b in zip(leaves, entry.leaves)):
            torch._foreach_copy_(entry.leaves, leaves)  # not the previous replay's output: copy it in
        if entry.replay is not None:
            entry.replay()
            self.reached |= entry.reached
            loss, parts = entry.outputs
        else:
            loss, parts = entry.run()
        self.replays += 1
        return loss, parts, entry.template.with_leaves(entry.leaves, state.pos + T, rosa)

    # ---- building ---------------------------------------------------------------------------
    def _forward_backward(self, x, y, hints, state):
        with self.autocast():
            out = self.model(x, state, rosa_hint_ids=hints)
            loss, parts = self.loss_fn(out, y)
        self.backward_scale(loss).backward()
        return loss, parts, out.state

    def _decides_on_host(self, T: int, pos: int) -> bool:
        """One token (the worker may skip converged passes) or one plan point (pondering may stop
        once it halts): the model reads a tensor on the host, which a capture cannot hold."""
        s = self.model.cfg.h_stride
        return T == 1 or len(range((s - 1 - pos) % s, T, s)) == 1

    @contextlib.contextmanager
    def hide_unreached_grads(self):
        """Around the optimizer step (and clipping): gradients of parameters no window reached
        since the last step are None inside, and their (zero) tensors come back after."""
        hidden = []
        if self.capture:
            for p in self.model.parameters():
                if p.grad is not None and id(p) not in self.reached:
                    hidden.append((p, p.grad))
                    p.grad = None
        try:
            yield
        finally:
            for p, grad in hidden:
                p.grad = grad
            self.reached.clear()

    def _eager(self, x, y, hints, state, rosa):
        self.eager_windows += 1
        x, y = x.to(self.device), y.to(self.device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        kept = [p.grad for p in params]
        if self.capture:  # a fresh backward shows what this window reaches; added into the kept tensors
            for p in params:
                p.grad = None
        loss, parts, new_state = self._forward_backward(x, y, None if hints is None else hints.to(self.device),
                                                        HierarchosState(state.pos, state.memory, state.rounds, None))
        if self.capture:
            for p, grad in zip(params, kept):
                if p.grad is not None:
                    self.reached.add(id(p))
                    if grad is not None:
                        grad.add_(p.grad)
                        p.grad = grad
                else:
                    p.grad = grad
        new_state = new_state.detach()
        return loss, parts, HierarchosState(new_state.pos, new_state.memory, new_state.rounds, rosa)

    def _build(self, key, x, y, hints, state) -> _Entry:
        dev = self.device
        leaves = [t.detach().to(dev).clone() for t in _flatten(state)]
        template = state.with_leaves(leaves, state.pos, None)
        entry = _Entry(x=x.to(dev).clone(), y=y.to(dev).clone(),
                       hints=None if hints is None else hints.to(dev).clone(), leaves=leaves, template=template,
                       run=lambda: None)

        def run():
            loss, parts, new_state = self._forward_backward(entry.x, entry.y, entry.hints, entry.template)
            # after the backward, which may read the old state: the next window starts from here
            torch._foreach_copy_(entry.leaves, [t.detach() for t in _flatten(new_state)])
            return loss, parts

        entry.run = run
        if self.capture:
            try:
                self._capture(entry)
            except Exception as exc:  # noqa: BLE001 - whatever a capture refuses, the eager window can do
                self.eager_keys.add(key)
                self.log(f"cuda graphs: capturing a {key[0]}x{key[1]} window failed ({why_capture_failed(exc)}); "
                         "windows of this shape run eagerly")
                return None
        self.entries[key] = entry
        return entry

    def _capture(self, entry: _Entry) -> None:
        """Warm up with every .grad None (so the warm-up shows which parameters the window reaches),
        then capture with each reached parameter's .grad being the tensor it was before, where it
        had one: graphs captured earlier write into those very tensors, so they must never change.
        Afterwards gradients and the state hold what they held before (the warm-up, and the eager
        stand-in's capture run, really ran)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        grads = [p.grad for p in params]
        values = [None if g is None else g.clone() for g in grads]
        leaves = [t.clone() for t in entry.leaves]
        for p in params:
            p.grad = None

        def before_capture():
            entry.reached = frozenset(id(p) for p in params if p.grad is not None)
            for p, grad in zip(params, grads):
                if p.grad is None or grad is not None:  # unreached: as it was; reached: its own tensor
                    p.grad = grad

        try:
            entry.replay, entry.outputs = self.recorder(entry.run, max(1, self.warmup), before_capture)
        except BaseException:
            # a capture records without running, so the kept tensors were never written by it; the
            # warm-up wrote only fresh ones: every parameter gets its gradient back as it was
            for p, grad, value in zip(params, grads, values):
                p.grad = grad
                if value is not None:
                    grad.copy_(value)
            raise
        for p, value in zip(params, values):
            if value is not None:
                p.grad.copy_(value)
            elif p.grad is not None:  # first reached by this window: the graph writes here, zeroed
                p.grad.zero_()
        torch._foreach_copy_(entry.leaves, leaves)
        B, T = entry.x.shape
        self.log(f"cuda graphs: captured a {B}x{T} training window")
