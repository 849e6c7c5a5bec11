"""Prompt prefill through CUDA graphs: the parallel forward over fixed-size, aligned chunks.

Eager, a prefill dispatches thousands of small kernels from the host (the default reasoning config's
24 stack passes); a graph replays a chunk's kernels with one host call. On an H100 at 125m, for a
1,024-token prompt: 161.5 -> 105.5 ms in the default config (what is left is GPU work) and 29.7 ->
17.4 ms in the minimal one (BENCHMARKS.md, "Prefill through captured chunk graphs").

A captured chunk bakes in every index the forward derives from `state.pos`: plan points (every
`h_stride`-th position) and the long-term memory's chunk closes (every `ltm_chunk`-th). Both repeat
with the period L = lcm(h_stride, ltm_chunk), so a chunk of a multiple of L tokens captured at a
position that is a multiple of L computes the right function at every such position. A prompt is
consumed as: an eager head up to the next multiple of L, aligned chunks through the graphs (sizes
L * 2^k, the largest that fits first), an eager tail of fewer than L tokens. Splitting the prompt is
exact: the forward carries its state across calls (the tests hold chunked == one call); ROSA's hints
are computed on the host for the whole prompt first and fed to each piece.

`ChunkedPrefill` without `capture` runs the same pieces eagerly (CPU, tests): the reference the
graphs are checked against on the GPU (tests/test_prefill.py). With `compile_blocks` every RWKV block
of the prefill's forward runs through torch.compile (dynamic lengths: one variant serves every chunk
size and pass, the pondering passes' plan points included), installed for the prefill's own calls
only, and the graphs record the compiled kernels: the blocks' elementwise work (token shift, low-rank
mixes, norms, gates, SwiGLU) fused, as training fuses it.
"""

from __future__ import annotations

import contextlib

import torch

from .errors import HierarchosError
from .model.rosa import rosa_hints
from .model.rwkv import BlockCalls, allow_recompiles, make_recurrence_opaque
from .model.state import HierarchosState, fill_layout, leaf_layout
from .ops.amp import autocast_in
from .ops.capture import no_collection_during_capture, why_capture_failed


def compiled_block_calls(model, backend):
    """Every RWKV block's forward through torch.compile with dynamic lengths, to be installed around a
    call (`BlockCalls`): a prompt's pieces and passes come in many lengths (each chunk size, its plan
    points, an eager head and tail), and one symbolic-length variant serves them all, where static
    shapes would compile a variant per length and pass. Without gradients the recurrence is one opaque
    operator inside the block's graph (`ops.wkv.wkv7_no_grad`)."""
    make_recurrence_opaque()
    allow_recompiles()
    options = {"mode": "default"} if backend == "inductor" else {}
    return _DynamicBlockCalls(model, lambda block: torch.compile(block._call_impl, backend=backend, dynamic=True,
                                                                 **options))


class _DynamicBlockCalls(BlockCalls):
    """`BlockCalls` with dynamo's duck shaping off while they are in force: with it on, a length
    that happens to equal a fixed size (64 tokens and the head size, 32 plan points and a low-rank
    width) is made that constant, and each such length compiles a variant of its own."""

    def __enter__(self) -> "_DynamicBlockCalls":
        import torch.fx.experimental._config as shape_config

        self._shapes = shape_config.patch(use_duck_shape=False)
        self._shapes.__enter__()
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self._shapes.__exit__(*exc)


def require_fixed_size(model) -> None:
    """A CUDA graph (a captured step or prefill) holds state buffers of fixed sizes."""
    cfg = model.cfg
    if "attention" in (cfg.h_block, cfg.l_block) and not cfg.window_size:
        raise HierarchosError("a CUDA graph needs a fixed-size state; full attention (window_size 0) grows its KV "
                              "cache every token: use --no-cuda-graph or a windowed attention model")


def chunk_sizes(cfg, max_chunk: int) -> list[int]:
    """The captured chunk sizes, largest first: L * 2^k up to `max_chunk` (at least L =
    cfg.position_period)."""
    align = cfg.position_period
    sizes, size = [], align
    while size <= max(max_chunk, align):
        sizes.append(size)
        size *= 2
    return sizes[::-1]


def plan_pieces(pos: int, n: int, align: int, sizes: list[int]) -> list[tuple[int, bool]]:
    """The prompt of n tokens starting at `pos` as (length, through a graph) pieces in order."""
    pieces = []
    head = min(n, -pos % align)
    if head:
        pieces.append((head, False))
    left = n - head
    for size in sizes:
        while left >= size:
            pieces.append((size, True))
            left -= size
    if left:
        pieces.append((left, False))
    return pieces


class ChunkedPrefill:
    """Prefill of B rows that share a position (generation prefills each prompt as its own row).

    One instance per model, batch size and reasoning caps; its graphs (`capture`, CUDA) are made once,
    at construction, on a scratch state, and replayed for every later prompt. The state buffers and
    the last logits are the instance's own; `__call__` copies a caller's state in and returns a new
    state (copies)."""

    def __init__(self, model, batch_size: int = 1, *, caps: dict | None = None, capture: bool = False,
                 max_chunk: int = 1024, warmup: int = 2, autocast: torch.dtype | None = None,
                 compile_blocks: str | None = None):
        cfg = model.cfg
        self.model, self.caps = model, dict(caps or {})
        device = next(model.parameters()).device
        # `autocast` (torch.bfloat16): the forward's matmuls in that dtype, as `train` runs them; the
        # state and the logits stay in the model's dtype (autocast's weight cache off: a graph replays
        # the casts instead of keeping tensors made during capture)
        self.autocast, self.device_type = autocast, device.type
        if capture:
            if device.type != "cuda":
                raise HierarchosError(f"a captured prefill needs the model on a CUDA device (it is on {device}); "
                                      "prefill without capture on this device")
            require_fixed_size(model)
        self.align = cfg.position_period
        self.sizes = chunk_sizes(cfg, max_chunk)
        scratch = model.init_state(batch_size, device=device)
        self.leaves = [t.clone() for _, t in scratch.tensors()]
        self._layout = leaf_layout({"memory": scratch.memory, "rounds": scratch.rounds})
        self.tokens = {n: torch.zeros(batch_size, n, dtype=torch.long, device=device) for n in self.sizes}
        self.hints = ({n: torch.zeros(batch_size, n, dtype=torch.long, device=device) for n in self.sizes}
                      if cfg.use_rosa else None)
        self.logits = torch.zeros(batch_size, cfg.vocab_size, device=device, dtype=scratch.memory["delta"].dtype)
        # `compile_blocks` (a torch.compile backend: "inductor"; the tests' "aot_eager"): the blocks'
        # compiled calls, in force inside `_run` only (the model's other callers keep theirs)
        self.block_calls = compiled_block_calls(model, compile_blocks) if compile_blocks else None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.capture_error: str | None = None  # why the graphs were given up (then every piece runs eagerly)
        self.replays = 0
        if capture:
            self._capture(warmup)
        elif self.block_calls is not None:
            with torch.no_grad():
                for n in self.sizes:  # every chunk size's and short piece's variants compiled at load
                    self._body(n)
                self._compile_variants()

    # ---- the body ------------------------------------------------------------------------------------
    def _state(self, pos: int) -> HierarchosState:
        tree = fill_layout(self._layout, self.leaves)
        return HierarchosState(pos=pos, memory=tree["memory"], rounds=tree["rounds"], rosa=None)

    def _run(self, tokens: torch.Tensor, hints: torch.Tensor | None, pos: int) -> None:
        """The forward over `tokens` (B, n) at `pos` on the buffers, in place: the new state into the
        leaves, the last position's logits into `self.logits`."""
        with autocast_in(self.device_type, self.autocast, cache_enabled=False), \
                self.block_calls or contextlib.nullcontext():
            out = self.model(tokens, self._state(pos), rosa_hint_ids=hints, last_logits_only=True, **self.caps)
        for buffer, new in zip(self.leaves, (t for _, t in out.state.tensors()), strict=True):
            buffer.copy_(new)
        self.logits.copy_(out.logits[:, -1])

    def _body(self, n: int) -> None:
        # captured at position 0; valid at every multiple of L (module doc)
        self._run(self.tokens[n], self.hints[n] if self.hints is not None else None, 0)

    def _warm(self, warmup: int) -> None:
        """Every size run `warmup` times on a side stream (lazy inits, cuBLAS workspaces, Triton JIT)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(warmup):
                for n in self.sizes:
                    self._body(n)
            self._compile_variants()
        torch.cuda.current_stream().wait_stream(side)

    def _compile_variants(self) -> None:
        """With compiled blocks: run short pieces at two positions, so that the variants an eager head
        or tail needs (one-token passes specialise; a plan point or none in a piece) are compiled here,
        at load, and not at the first prompt that has them. Leaves the buffers as they were."""
        if self.block_calls is None:
            return
        saved = [t.clone() for t in self.leaves]
        small = self.sizes[-1]
        for pos in (0, 1):
            for n in sorted({1, 2, 3, self.align - 1} - {0}):
                n = min(n, small)
                self._run(self.tokens[small][:, :n], self.hints[small][:, :n] if self.hints is not None else None, pos)
        for buffer, value in zip(self.leaves, saved):
            buffer.copy_(value)

    def _record(self, n: int, pool) -> None:
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), no_collection_during_capture(), torch.cuda.graph(graph, pool=pool):
            self._body(n)
        self.graphs[n] = graph

    def _capture(self, warmup: int) -> None:
        """Warm up, then capture a graph per size; if any capture fails (a host read in some model's
        forward, say), no graph is kept and every piece runs eagerly: `capture_error` says why."""
        saved = [t.clone() for t in self.leaves]
        self._warm(warmup)
        pool = torch.cuda.graph_pool_handle()  # pieces run one after another: one pool serves all
        try:
            for n in self.sizes:
                self._record(n, pool)
        except RuntimeError as exc:  # (torch.AcceleratorError is one)
            self.graphs.clear()
            self.capture_error = why_capture_failed(exc)
        for buffer, value in zip(self.leaves, saved):
            buffer.copy_(value)

    # ---- a prompt ------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, state: HierarchosState) -> tuple[torch.Tensor, HierarchosState]:
        """tokens (B, T) after `state` -> (the last position's logits (B, V), the new state). The
        state's ROSA automata are extended in place, as the forward does."""
        T = tokens.shape[1]
        for buffer, value in zip(self.leaves, (t for _, t in state.tensors()), strict=True):
            buffer.copy_(value)
        rosa, hints = state.rosa, None
        if self.model.cfg.use_rosa:
            hints, rosa = rosa_hints(tokens, rosa, self.model.cfg.rosa_window, self.model.cfg.rosa_none_id)
        pos, start = state.pos, 0
        for n, graphed in plan_pieces(state.pos, T, self.align, self.sizes):
            piece = tokens[:, start:start + n]
            piece_hints = hints[:, start:start + n] if hints is not None else None
            if graphed:
                self.tokens[n].copy_(piece)
                if piece_hints is not None:
                    self.hints[n].copy_(piece_hints)
                if n in self.graphs:
                    self.graphs[n].replay()
                    self.replays += 1
                else:
                    self._body(n)
            else:
                self._run(piece, piece_hints, pos)
            pos += n
            start += n
        return self.logits.clone(), state.with_leaves([t.clone() for t in self.leaves], pos, rosa)
