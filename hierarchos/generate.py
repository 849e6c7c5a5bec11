"""Sampling and the token-by-token generation loops.

The prompt is prefilled with the parallel forward (with `cuda_graph`, through captured chunk graphs:
`hierarchos.prefill`); then each new token is one `step` on a fixed-size state (no re-running the
prompt, no growing cache). Sampling applies the repetition penalty, temperature, top-k and top-p
in that order; temperature 0 is greedy.

Randomness is counter-based: the n-th token sampled for a row with seed s draws the uniforms
`row_noise(s, n)` (a 32-bit integer hash of (s, n, token id), 23-bit uniforms) and picks
argmax(w / -log u) over the unnormalised weights w = exp(logit - max) (0 where top-k / top-p masked
a token), an exact draw from the sampling distribution (the exponential race; normalising would
not move the argmax). Top-p keeps a token while the weights sorted before it sum (`cumsum`, one
running sum) to less than top_p times their total. The noise is a function of (seed, n), not of a
generator's position, so a row gives the same tokens alone or in a batch, on the host or inside a
CUDA graph. `sample_rows` is the batched form with no host reads, on whole vocabulary rows (the
reference); `sample_next` is the one-row host form, which with top-k works on the top-k candidates
only (their noise from `row_noise_at`): on a CPU a full-vocabulary sort, softmax and hash were
~1.7 ms of a token at 50k ids. Masked tokens weigh exactly 0 and trailing zeros leave a running
sum unchanged, so the two give the same tokens (tests hold them equal).

`generate` is the one-row loop (the step with early exit: halted and frozen work is skipped on
the host's word). `generate_batch` runs B prompts of different lengths at once: each row is
prefilled alone with the parallel form, the states are stacked, and every step is the model's
sync-free step (`HierarchosLM.step_sync_free`, per-row positions) plus `sample_rows`, through a
`GraphedStepper`: static buffers, the step and the sampling as one CUDA graph replayed per token
(`cuda_graph=True`, CUDA only), or the same body run eagerly (the CPU and the tests).

Fewer kernels per token (a default-config token is ~100 one-token block steps, and inside a CUDA graph
each small kernel costs its launch whatever its size): `compile_step` runs the body through
torch.compile (inductor, default mode, static shapes, no inductor CUDA graphs of its own; "step" the
whole body with each RWKV block as a nested compile region, "blocks" only the blocks), so elementwise
chains fuse into a few generated kernels; `fused_step` runs each block's one-token time mix after its
matmuls as one Triton kernel (`hierarchos.ops.rwkv_step_triton`). The stepper's own CUDA graph records
the compiled calls. The eager body stays the reference (tests/test_generate_compiled.py and
tests/test_rwkv_step_triton.py hold them equal).
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .errors import HierarchosError
from .model.state import HierarchosState, fill_layout, leaf_layout
from .ops import noise_triton, sampling_kernel
from .ops.amp import autocast_in
from .ops.capture import no_collection_during_capture
from .ops.compile_settings import before_compiling
from .ops.threads import intra_op_threads
from .prefill import ChunkedPrefill, require_fixed_size

_M32 = 0xFFFFFFFF
_HASH_MUL = 0x45D9F3B  # < 2**27: products of 32-bit values stay below 2**59, no int64 overflow


@dataclass
class SamplingConfig:
    temperature: float = 0.7
    top_k: int = 40
    top_p: float = 0.9
    repetition_penalty: float = 1.2
    max_new_tokens: int = 128
    seed: int | None = None


# ---- randomness ----------------------------------------------------------------------------------

def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (two multiply-xorshift rounds) on int64 tensors holding uint32 values."""
    x = ((x >> 16) ^ x) * _HASH_MUL & _M32
    x = ((x >> 16) ^ x) * _HASH_MUL & _M32
    return (x >> 16) ^ x


def row_noise(seeds: torch.Tensor, counters: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniforms in (0, 1), (B, vocab) float32, for the counters[b]-th token of the row seeded seeds[b]
    ((B,) int64 each). A pure function of (seed, counter, token id): no generator state, no host reads.
    On CUDA one Triton kernel (`ops.noise_triton`: ~57 element-wise kernels a token in PyTorch), the
    same bits as `row_noise_at` over every id, which the CPU runs (checked once per device first)."""
    if noise_triton.fits(seeds) and counters.dtype == torch.int64 and noise_triton.checked(seeds.device, row_noise_at):
        return noise_triton.row_noise_triton(seeds, counters, vocab)
    return row_noise_at(seeds, counters, torch.arange(vocab, device=seeds.device, dtype=torch.int64))


def row_noise_at(seeds: torch.Tensor, counters: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """`row_noise`'s uniforms at the token ids `ids` only ((n,) int64): (B, n), the same values."""
    seeds, counters = seeds.to(torch.int64), counters.to(torch.int64)
    row = _mix32((seeds & _M32) ^ _mix32(((seeds >> 32) + 0x9E3779B9) & _M32))
    row = _mix32(row ^ ((counters + 0x632BE5AB) & _M32))                                  # (B,)
    ids = ids.to(torch.int64)
    bits = _mix32(_mix32(row[:, None] ^ ((ids * 0x27D4EB2F + 0x165667B1) & _M32)) ^ row[:, None])
    return ((bits >> 9).to(torch.float32) + 0.5) / float(1 << 23)                        # 23 bits: exact


@dataclass(frozen=True)
class RowNoiseAt:
    """The counter-based noise of one row's `counter`-th token as a function of token ids (`row_noise_at`:
    ids (n,) -> uniforms (n,)), carrying its key: with it sample_next can run whole in one C++ call."""
    seed: int
    counter: int

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        seeds = torch.tensor([self.seed], device=ids.device)
        return row_noise_at(seeds, torch.tensor([self.counter], device=ids.device), ids)[0]


def draw_seed(cfg: SamplingConfig, generator: torch.Generator | None = None) -> int:
    """The seed of one generation call: from `generator` (one draw), else cfg.seed, else torch's global RNG."""
    if generator is not None:
        return int(torch.randint(0, 2**62, (1,), generator=generator))
    if cfg.seed is not None:
        return int(cfg.seed)
    return int(torch.randint(0, 2**62, (1,)))


# ---- sampling --------------------------------------------------------------------------------------

def greedy_ids(logits: torch.Tensor) -> torch.Tensor:
    """`logits.argmax(-1)` (the first of equal maxima; a NaN counts as the maximum), through numpy for
    float32 logits on the CPU: torch's CPU argmax took ~44 us for 50k ids against numpy's ~4, ~2% of a
    quantized 125m token (BENCHMARKS.md, issue 17). Elsewhere torch's own argmax (no host read)."""
    if logits.dtype is torch.float32 and logits.is_cpu and logits.dim() > 0:
        return torch.from_numpy(np.asarray(logits.detach().numpy().argmax(-1), dtype=np.int64))
    return logits.argmax(-1)


def sample_next(logits: torch.Tensor, history: list[int], cfg: SamplingConfig,
                generator: torch.Generator | None = None, noise: torch.Tensor | Callable | None = None, *,
                seen: torch.Tensor | None = None) -> int:
    """Pick the next token id from logits (V,) given the ids seen so far (`history`, or `seen`: a (V,)
    bool mask of them): the one-row host form of `sample_rows` (the same token). `noise`: uniforms (V,)
    in (0, 1) (`row_noise`), or a function of token ids returning theirs (`row_noise_at`), so that only
    the candidates' are computed; drawn from `generator` when not given."""
    logits = logits.float()
    if seen is None and history and cfg.repetition_penalty != 1.0:
        seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        seen[torch.tensor(history, device=logits.device)] = True
    if isinstance(noise, RowNoiseAt):  # the whole of what follows in one C++ call, where it applies
        token = sampling_kernel.sample_token(logits, seen if cfg.repetition_penalty != 1.0 else None,
                                             cfg.repetition_penalty, cfg.temperature, cfg.top_k, cfg.top_p,
                                             noise.seed, noise.counter)
        if token is not None:
            return token
    if cfg.repetition_penalty != 1.0:
        if seen is not None:  # on the seen ids only: the values sample_rows' whole-row `where` gives them
            at = seen.nonzero().squeeze(1)
            picked = logits[at]
            penalised = torch.where(picked > 0, picked / cfg.repetition_penalty, picked * cfg.repetition_penalty)
            logits = logits.index_put((at,), penalised)
    if cfg.temperature <= 0:
        return int(greedy_ids(logits))
    logits = logits / cfg.temperature
    vocab = logits.numel()
    ids = None  # the candidates' token ids, ascending (None: every id)
    if 0 < cfg.top_k < logits.numel():
        kth = torch.topk(logits, cfg.top_k).values[-1]
        ids = (logits >= kth).nonzero().squeeze(1)  # (ties at the k-th value stay, as in sample_rows)
        logits = logits[ids]
    weights = _top_p_weights(logits, cfg.top_p)
    if noise is None:  # one uniform per vocabulary id, as the counter-based noise has
        noise = torch.rand(vocab, generator=generator).clamp(min=2.0**-24).to(logits.device)
    if callable(noise):
        u = noise(ids if ids is not None else torch.arange(logits.numel(), device=logits.device))
    else:
        u = noise if ids is None else noise[ids]
    pick = int((weights / -u.log()).argmax())  # the first of equal maxima, in id order as in sample_rows
    return pick if ids is None else int(ids[pick])


def _top_p_weights(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """exp(logits - max) along the last dim, zeroed where top-p drops the token: sorted by logit
    (descending, stable), a token is kept while the weights before it sum to less than top_p times
    the total (a -inf logit weighs 0; `cumsum` is one running sum, so trailing zeros change nothing)."""
    weights = torch.exp(logits - logits.amax(-1, keepdim=True))
    if 0 < top_p < 1.0:
        _, order = logits.sort(dim=-1, descending=True, stable=True)
        sorted_w = weights.gather(-1, order)
        cumulative = sorted_w.cumsum(-1)
        drop = cumulative - sorted_w >= top_p * cumulative[..., -1:]  # keep the token that crosses top_p
        weights = weights.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), 0.0)
    return weights


def sample_rows(logits: torch.Tensor, seen: torch.Tensor, cfg: SamplingConfig, noise: torch.Tensor) -> torch.Tensor:
    """Sampling for B rows at once with no host reads: logits (B, V), seen (B, V) bool (the ids in each
    row's history), noise (B, V) uniforms -> token ids (B,) int64 on the logits' device."""
    logits = logits.float()
    if cfg.repetition_penalty != 1.0:
        penalised = torch.where(logits > 0, logits / cfg.repetition_penalty, logits * cfg.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if cfg.temperature <= 0:
        return logits.argmax(-1)
    logits = logits / cfg.temperature
    if 0 < cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return (_top_p_weights(logits, cfg.top_p) / -noise.log()).argmax(-1)


# ---- one row -------------------------------------------------------------------------------------------

@torch.no_grad()
def generate(model, prompt_ids: list[int], cfg: SamplingConfig, *, state=None, eos_id: int | None = None,
             on_token: Callable[[int, object], bool | None] | None = None,
             should_stop: Callable[[], bool] = lambda: False, generator: torch.Generator | None = None,
             keep_eos: bool = False, on_first_token: Callable[[int], None] | None = None, **caps):
    """Prefill `prompt_ids` on `state`, then sample up to `max_new_tokens` with `step`.

    `on_token(token, step_output)` runs after each token went through the model (its output
    carries the per-token aux totals: a ModelOutput, or a quantized model's `DecodedToken` with the same
    logits, totals and state); returning True ends generation there. `should_stop()` is
    checked before each token (Ctrl+C). With `keep_eos` a sampled EOS is appended to the returned
    ids (not fed to the model). `on_first_token(token)` runs as soon as the first token is sampled
    (time to first token). Returns (new token ids, final state). `caps`: reasoning caps."""
    if not prompt_ids:
        raise ValueError("generate needs at least one prompt token")
    device = next(model.parameters()).device
    seed = draw_seed(cfg, generator) if cfg.temperature > 0 else 0
    if state is None:
        state = model.init_state(1, device=device)
    out = model(torch.tensor([prompt_ids], device=device), state, last_logits_only=True, **caps)
    logits, state = out.logits[0, -1], out.state
    seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)  # the ids seen so far
    seen[torch.tensor(prompt_ids, device=logits.device)] = True
    new: list[int] = []
    # a quantized model's CPU tokens through its two C++ calls, the state kept as their arrays (see
    # quant/fused_step.TokenDecoder): `step`'s state of tensors is made once, at the end
    open_decoder = getattr(model, "token_decoder", None)
    decoder = open_decoder(state, **caps) if open_decoder is not None else None
    # the whole token loop, sampling included, at the step's thread count (a quantized model's: one):
    # torch's OpenMP workers, woken by a two-thread op between steps, spin on the cores the kernel's
    # pool wants next (ops/threads.py); setting the count around the step alone left the sampler at two
    with intra_op_threads(getattr(model, "step_threads", None)):
        for n in range(cfg.max_new_tokens):
            if should_stop():
                break
            noise = None
            if cfg.temperature > 0:  # the n-th token's uniforms, computed for the candidates only
                noise = RowNoiseAt(seed, n)
            token = sample_next(logits, [], cfg, generator, noise=noise, seen=seen)
            if n == 0 and on_first_token is not None:
                on_first_token(token)
            if eos_id is not None and token == eos_id:
                if keep_eos:
                    new.append(token)
                break
            new.append(token)
            seen[token] = True
            if decoder is not None:
                out = decoder.step(token)
                logits = out.logits
            else:
                out = model.step(torch.tensor([token], device=device), state, **caps)
                logits, state = out.logits[0], out.state
            if on_token is not None and on_token(token, out):
                break
    if decoder is not None:
        state = decoder.state()
    return new, state


# ---- batches and CUDA graphs ---------------------------------------------------------------------------

def batch_dims(model) -> list[int]:
    """The batch dimension of each state tensor (in `HierarchosState.tensors()` order): where the
    shapes of a 1-row and a 2-row initial state differ."""
    one, two = model.init_state(1, device="meta"), model.init_state(2, device="meta")
    dims = []
    for (name, a), (_, b) in zip(one.tensors(), two.tensors()):
        dims.append(next(i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y))
    return dims


def stack_states(model, states: list) -> object:
    """One batch state from 1-row states (their ROSA automata in row order; pos of the first)."""
    if any(block == "attention" for block in (model.cfg.h_block, model.cfg.l_block)) and not model.cfg.window_size:
        raise HierarchosError("batched generation needs fixed-size states; full attention (window_size 0) grows "
                              "its KV cache per row: use a windowed attention model or generate one prompt at a time")
    dims = batch_dims(model)
    leaves = [torch.cat(parts, dim) for dim, parts in zip(dims, zip(*[[t for _, t in s.tensors()] for s in states]))]
    rosa = None if states[0].rosa is None else [a for s in states for a in s.rosa]
    return states[0].with_leaves(leaves, states[0].pos, rosa)


COMPILE_MODES = ("step", "blocks")


def compile_mode(compile_step: bool | str) -> str | None:
    """`compile_step` as a mode: False/None -> None (eager), True -> "step", or one of COMPILE_MODES."""
    if compile_step in (False, None):
        return None
    mode = "step" if compile_step is True else compile_step
    if mode not in COMPILE_MODES:
        raise HierarchosError(f"compile_step={compile_step!r}: use True, False or one of {', '.join(COMPILE_MODES)}")
    return mode


def compile_step_function(fn: Callable, backend: str = "inductor") -> Callable:
    """torch.compile for the generation step: inductor in its default mode (no CUDA graphs of its own:
    the stepper captures the compiled call in its graph), static shapes. Every stepper compiles the same
    code objects (`GraphedStepper._advance`, or the blocks' call), one variant per batch size, caps and
    sampling, so dynamo's recompile limit is raised as `compile_blocks` raises it. `backend`: another
    torch.compile backend (the tests' "aot_eager" traces the same graph without generating code)."""
    from .model.rwkv import allow_recompiles

    allow_recompiles()
    before_compiling()
    options = {"mode": "default"} if backend == "inductor" else {}
    return torch.compile(fn, backend=backend, dynamic=False, **options)


def _block_without_passthrough(block, x, tm_shift, wkv_state, cm_shift, deep_gate=None, frozen=None, v_first=None):
    """A block's forward whose outputs alias none of its inputs (what a nested compile region requires:
    torch 2.11 refuses one that returns an input): the first layer's value, which later layers pass
    through unchanged, comes back as None unless this block made it."""
    x, tm_shift, wkv_state, cm_shift, v_out = type(block).forward(block, x, tm_shift, wkv_state, cm_shift, deep_gate,
                                                                  frozen, v_first)
    return x, tm_shift, wkv_state, cm_shift, (None if v_out is v_first else v_out)


def _region_forward(region, block, x, tm_shift, wkv_state, cm_shift, deep_gate=None, frozen=None, v_first=None):
    """`RWKVBlock.forward` through the nested region, the passed-through first-layer value put back."""
    x, tm_shift, wkv_state, cm_shift, v_out = region(block, x, tm_shift, wkv_state, cm_shift, deep_gate, frozen,
                                                     v_first)
    return x, tm_shift, wkv_state, cm_shift, (v_first if v_out is None else v_out)


class _BlockRegions:
    """compile_step="step": while the compiled step runs (and is traced), every RWKV block's forward is one
    nested compile region (`torch.compiler.nested_compile_region`, where this torch has it): dynamo traces
    and inductor compiles a block once per variant and stamps it out for the ~100 block calls of a
    default-config token, instead of lowering each call anew (the whole step's compile time is mostly
    that). The glue between blocks still fuses around them. Installed as instance attributes for the
    call only; eager forwards are untouched."""

    _region = None

    def __init__(self, model, fn: Callable):
        from .model.rwkv import RWKVBlock

        self.fn = fn
        self.blocks = [m for m in model.modules() if isinstance(m, RWKVBlock)]
        make = getattr(torch.compiler, "nested_compile_region", None)
        if make is not None and _BlockRegions._region is None:
            _BlockRegions._region = make(_block_without_passthrough)  # one function object: its variants are shared
        region = _BlockRegions._region if make is not None else None
        # the same objects every call: dynamo guards on them, new ones would recompile the step each time
        self.forwards = ([functools.partial(_region_forward, region, block) for block in self.blocks]
                         if region is not None else None)

    def __call__(self, *args):
        if self.forwards is None:
            return self.fn(*args)
        for block, forward in zip(self.blocks, self.forwards):
            block.forward = forward
        try:
            return self.fn(*args)
        finally:
            for block in self.blocks:
                del block.forward


class _WithFusedStep:
    """fused_step=True: the one-token time mix of every RWKV-7 block through the fused Triton kernel
    (`hierarchos.ops.rwkv_step_triton`), switched on for the step only (the prefill keeps the parallel form)."""

    def __init__(self, advance: Callable):
        self.advance = advance

    def __call__(self, *args):
        from .ops.rwkv_step_triton import use_fused_step

        previous = use_fused_step(True)
        try:
            return self.advance(*args)
        finally:
            use_fused_step(previous)


class _CompiledBlocks:
    """compile_step="blocks": the stepper's `_advance` runs eagerly, but every RWKV block inside it runs
    compiled (one compiled call per block, installed only for the step: `BlockCalls`; the prefill
    compiles its own). The block is the fusible unit (norms, token shift, low-rank mixes, gates, the
    one-token recurrence, SwiGLU); the few variants (frozen mask or not) serve every block and pass, so
    it compiles in a fraction of the whole step's time and leaves the HRM's glue between blocks as eager
    kernels."""

    def __init__(self, model, advance: Callable, backend: str):
        from .model.rwkv import BlockCalls

        self.advance = advance
        self.calls = BlockCalls(model, lambda block: compile_step_function(block._call_impl, backend))

    def __call__(self, *args):
        with self.calls:
            return self.advance(*args)


def copy_into(buffers: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    """buffers[i].copy_(values[i]) for every pair, the ones of equal dtype as one foreach copy (a few
    kernels for the state's ~100 leaves instead of one each: the captured step replays every launch per
    token); a value that already is its buffer is left alone."""
    same = [(b, v) for b, v in zip(buffers, values, strict=True) if v is not b and v.dtype == b.dtype]
    for b, v in zip(buffers, values):
        if v is not b and v.dtype != b.dtype:
            b.copy_(v)
    if same:
        torch._foreach_copy_([b for b, _ in same], [v for _, v in same])


def _host_positions(row_pos: torch.Tensor, given: list[int] | None = None) -> list[int] | None:
    """The rows' positions as host ints: `given` (the caller knows them: no device read, so a start
    queued behind the prefill does not wait for it), else read once, when a generation starts; None on
    the meta device (no values: every token then runs the full body)."""
    if given is not None:
        return [int(p) for p in given]
    return None if row_pos.is_meta else [int(p) for p in row_pos.tolist()]


class GraphedStepper:
    """The generation step on static buffers: one body = the sync-free model step on the fed token,
    the state copied back into its buffers, the token added to the row's history, the next token
    sampled (`sample_rows`) into the token buffer, aux totals summed on the device. With `capture`
    (CUDA only) the body is warmed up and captured once per stepper and each token is one replay;
    without it the same body runs eagerly (CPU, tests). The host's work per token: the ROSA hints of
    the fed token written into their buffer, and the sampled tokens read back (to stream them).
    The buffers are the stepper's own (copies); `load` puts the next generation's start into them,
    so one capture serves every later call with the same batch size, caps and sampling.
    With `compile_step` ("step" or True: the in-place part of the body, `_advance`, as one compiled
    function; "blocks": each RWKV block inside it compiled, `_CompiledBlocks`) it runs compiled, compiled
    on the first call (during the warm-up when capturing; `compile_seconds` says how long).
    `fused_step`: each RWKV-7 block's one-token time mix after its matmuls runs as one Triton kernel
    (`hierarchos.ops.rwkv_step_triton`; CUDA, float32), with or without compiling.
    Several bodies, one per (plan_rows, write_rows) pair a token can need: a token at which some row
    reaches a plan point runs the pondering passes, every other token the step without them
    (`plan_rows=False`: in the full step they would write nothing for those rows); likewise a token at
    which some row closes a memory chunk runs the memory's write, every other token the step without it
    (`write_rows=False`: ~15 whole-table operations a token that every row would discard). The host
    knows every row's position without reading the device, so it picks the body (and, captured, its
    graph) per token: of a default-config token's 24 stack passes, 10 are pondering ones, and 3 tokens
    in 4 (h_stride 4) need none of them; 63 tokens in 64 (ltm_chunk 64) need no memory write."""

    def __init__(self, model, state, row_pos: torch.Tensor, logits: torch.Tensor, seen: torch.Tensor,
                 seeds: torch.Tensor, cfg: SamplingConfig, caps: dict, *, capture: bool = False, warmup: int = 2,
                 compile_step: bool | str = False, compile_backend: str = "inductor", fused_step: bool = False,
                 host_positions: list[int] | None = None):
        device = logits.device
        if capture and device.type != "cuda":
            raise HierarchosError(f"cuda_graph=True needs the model on a CUDA device (it is on {device}); "
                                  "generate without a CUDA graph on this device")
        if capture or compile_step:
            require_fixed_size(model)
        self.model, self.cfg, self.caps, self.capture = model, cfg, dict(caps), capture
        # copies: a state entry the prefill left unchanged (a pass beyond the caps) is the caller's tensor
        self.leaves = [t.clone() for _, t in state.tensors()]
        self.state = state.with_leaves(self.leaves, state.pos, state.rosa)
        # the state's layout with leaf indices (what `_advance` rebuilds it from: no Python ints that
        # change per call, such as state.pos, reach a compiled step's guards)
        self._layout = leaf_layout({"memory": state.memory, "rounds": state.rounds})
        self.compile_step = compile_mode(compile_step)
        if self.compile_step == "step":
            self._advance_fn = _BlockRegions(model, compile_step_function(self._advance, compile_backend))
        elif self.compile_step == "blocks":
            self._advance_fn = _CompiledBlocks(model, self._advance, compile_backend)
        else:
            self._advance_fn = self._advance
        if fused_step:
            from .ops.matvec_triton import checked
            from .ops.wkv_triton import triton_unavailable_reason

            reason = triton_unavailable_reason(device)
            if reason:
                raise HierarchosError(f"fused_step=True: the fused one-token time mix cannot run on {device}: {reason}; "
                                      "generate without it")
            # checked here, not inside the compiled or captured step (where it cannot run); a failure is
            # reported once and the step keeps its eager kernels
            fused_step = checked(device)
        self.fused_step = fused_step
        if fused_step:
            self._advance_fn = _WithFusedStep(self._advance_fn)
        self.compile_seconds: float | None = None
        self._compiled: set = set()  # the bodies ((plan_rows, write_rows) pairs) compiled so far
        self.stride = model.cfg.h_stride
        self.chunk = model.memory.chunk
        self.host_pos = _host_positions(row_pos, host_positions)  # each row's position, kept on the host
        self.pos = row_pos.clone()
        self.seen = seen.clone()
        self.seeds = seeds.clone()
        self.counter = torch.zeros_like(self.pos)
        B = self.pos.shape[0]
        self.token = self._sample(logits)                          # the first token, eagerly
        self.hints = torch.zeros(B, dtype=torch.long, device=device)
        self.totals: dict = {}
        self.graphs: dict = {}  # (plan_rows, write_rows) -> captured graph
        self.replays = self.loads = 0
        if capture:
            self._capture(warmup)
        elif self.compile_step:
            self._warm(1)  # every body compiled now, not at the token that first needs it

    def load(self, state, row_pos: torch.Tensor, logits: torch.Tensor, seen: torch.Tensor,
             seeds: torch.Tensor, host_positions: list[int] | None = None) -> None:
        """Start a new generation on the same buffers (same batch size and state layout): the state,
        positions, histories and seeds copied in, counters and totals zeroed, the first token sampled.
        With `host_positions` (row_pos's values) nothing here reads the device."""
        copy_into(self.leaves, [t for _, t in state.tensors()])  # (one foreach copy: part of time to first token)
        self.state.rosa, self.state.pos = state.rosa, state.pos
        self.pos.copy_(row_pos)
        self.host_pos = _host_positions(row_pos, host_positions)
        self.seen.copy_(seen)
        self.seeds.copy_(seeds)
        self.counter.zero_()
        self.token.copy_(self._sample(logits))
        for total, count in self.totals.values():
            total.zero_(), count.zero_()
        self.loads += 1

    def _sample(self, logits, seen=None, seeds=None, counter=None):
        """The next token of every row from `logits`, by the rows' seeds and counters (the stepper's
        buffers unless others are passed: `_advance` passes the ones it was called with)."""
        seen, seeds, counter = (self.seen if seen is None else seen, self.seeds if seeds is None else seeds,
                                self.counter if counter is None else counter)
        noise = row_noise(seeds, counter, logits.shape[-1]) if self.cfg.temperature > 0 else None
        return sample_rows(logits, seen, self.cfg, noise)

    def _advance(self, token, leaves, pos, counter, seen, seeds, hints, plan_rows=True, write_rows=True) -> dict:
        """The step on the buffers passed in, in place: the sync-free model step on `token`, the new state
        copied into `leaves`, positions and counters advanced, the token added to `seen`, the next token
        sampled into `token`. Returns the step's aux totals (name -> (total, count)). A pure function of
        its arguments and the model (what `compile_step` compiles; `plan_rows` and `write_rows` are
        constants of each compiled variant)."""
        tree = fill_layout(self._layout, leaves)
        state = HierarchosState(pos=0, memory=tree["memory"], rounds=tree["rounds"], rosa=None)
        out = self.model.step_sync_free(token, state, pos, hints, plan_rows=plan_rows, write_rows=write_rows,
                                        **self.caps)
        copy_into(leaves, [t for _, t in out.state.tensors()])
        pos.add_(1)
        counter.add_(1)
        seen.scatter_(1, token[:, None], True)
        token.copy_(self._sample(out.logits, seen, seeds, counter))
        return out.totals

    def _bodies(self) -> tuple:
        """The (plan_rows, write_rows) pairs this stepper's tokens can need: both values of each flag
        whose event does not come at every token, less (False, True) where every chunk end is a plan
        point (ltm_chunk a multiple of h_stride: a row closing a chunk is at a plan point)."""
        plans = (True, False) if self.stride > 1 else (True,)
        writes = (True, False) if self.chunk > 1 else (True,)
        return tuple((p, w) for p in plans for w in writes if p or not w or self.chunk % self.stride)

    def _key(self) -> tuple:
        """(plan_rows, write_rows) of the next fed token, from the host's positions: whether some row
        reaches a plan point, whether some row closes a memory chunk (both True when unknown)."""
        if self.host_pos is None:
            return True, True
        return (self.stride == 1 or any((p + 1) % self.stride == 0 for p in self.host_pos),
                self.chunk == 1 or any((p + 1) % self.chunk == 0 for p in self.host_pos))

    def _body(self, key: tuple = (True, True)) -> None:
        hints = self.hints if self.model.cfg.use_rosa else None
        args = (self.token, self.leaves, self.pos, self.counter, self.seen, self.seeds, hints, *key)
        if self.compile_step and key not in self._compiled:  # a variant's first call compiles: timed apart
            if self.pos.is_cuda:
                torch.cuda.synchronize(self.pos.device)
            start = time.perf_counter()
            totals = self._advance_fn(*args)
            if self.pos.is_cuda:
                torch.cuda.synchronize(self.pos.device)
            self._compiled.add(key)
            self.compile_seconds = (self.compile_seconds or 0.0) + time.perf_counter() - start
        else:
            totals = self._advance_fn(*args)
        for name, (total, count) in totals.items():
            if name not in self.totals:
                self.totals[name] = (torch.zeros((), device=self.pos.device, dtype=torch.float64),
                                     torch.zeros((), device=self.pos.device, dtype=torch.float64))
            acc_total, acc_count = self.totals[name]
            acc_total.add_(total)  # a device tensor or a Python number (a kernel argument: no copy to capture)
            acc_count.add_(count)

    def _warm(self, warmup: int) -> None:
        """Run every body `warmup` times on the buffers, then put the buffers back as they were: lazy
        inits, the allocator and (compile_step) each body's compilation happen here, not at a later
        token. On CUDA on a side stream, as capture wants."""
        saved = [t.clone() for t in (*self.leaves, self.pos, self.counter, self.seen, self.token)]
        side = torch.cuda.Stream() if self.pos.is_cuda else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            for _ in range(warmup):
                for key in self._bodies():
                    self._body(key)
        if side is not None:
            torch.cuda.current_stream().wait_stream(side)
        for buffer, value in zip((*self.leaves, self.pos, self.counter, self.seen, self.token), saved):
            buffer.copy_(value)
        for total, count in self.totals.values():
            total.zero_(), count.zero_()

    def _capture(self, warmup: int) -> None:
        """Warm-up (`_warm`), then capture each body as its own graph."""
        self._warm(warmup)
        for key in self._bodies():
            graph = torch.cuda.CUDAGraph()
            with no_collection_during_capture(), torch.cuda.graph(graph):
                self._body(key)
            self.graphs[key] = graph
        # capturing recorded the bodies without running them: the buffers still hold the start

    def advance(self, hints: list[int] | None = None) -> torch.Tensor:
        """Feed the current tokens (their ROSA hints from the host) and sample the next; returns the
        token buffer (B,), read it before the next call."""
        if hints is not None:
            self.hints.copy_(torch.tensor(hints, dtype=torch.long), non_blocking=True)
        key = self._key()
        if key in self.graphs:
            self.graphs[key].replay()
        else:
            self._body(key)
        if self.host_pos is not None:
            self.host_pos = [p + 1 for p in self.host_pos]
        self.replays += 1
        return self.token

    def final_state(self, pos: int):
        """The state after the fed tokens (a copy: the buffers stay the stepper's)."""
        return self.state.with_leaves([t.clone() for t in self.leaves], pos, self.state.rosa)


@dataclass
class BatchResult:
    tokens: list[list[int]]          # new ids per row (an EOS kept with keep_eos)
    # the batch state after the last step; a row that ended before the others was fed on (static
    # shapes), so its part holds more than its tokens; all rows ending together (B = 1) hold theirs
    state: object
    totals: dict                     # name -> (sum, count) of the aux terms over the generated steps
    first_token_seconds: float       # prefill of every row + the first sampling
    seconds: float                   # the whole call


@torch.no_grad()
def generate_batch(model, prompts: list[list[int]], cfg: SamplingConfig, *, states: list | None = None,
                   eos_id: int | None = None, seeds: list[int] | None = None,
                   generator: torch.Generator | None = None,
                   on_token: Callable[[int, int], bool | None] | None = None,
                   should_stop: Callable[[], bool] = lambda: False, keep_eos: bool = False,
                   cuda_graph: bool = False, compile_step: bool | str = False, fused_step: bool = False,
                   steppers: dict | None = None, prefill_autocast: torch.dtype | None = None,
                   compile_prefill: bool | str = False, clock: Callable[[], float] = time.perf_counter,
                   timings: dict | None = None,
                   **caps) -> BatchResult:
    """Generate for B prompts of any lengths at once. Row b equals `generate(model, prompts[b], cfg
    with seed seeds[b])` alone: each prompt is prefilled alone (the parallel form, on states[b] or a
    fresh state), then the rows step together, each at its own position, through `GraphedStepper`.

    `seeds`: one per row (default: drawn with `draw_seed`, one call per row). `on_token(row, token)`
    runs after a row's token went through the model; True ends that row. A row also ends at EOS;
    the call ends when every row has. `cuda_graph`: capture the step and prefill the prompts through
    captured chunk graphs (`hierarchos.prefill.ChunkedPrefill`; CUDA only). `compile_step`: run
    the step through torch.compile (True or "step": the whole step, "blocks": each RWKV block; see
    `GraphedStepper`; with `cuda_graph` the graph records the compiled calls). `fused_step`: the blocks'
    one-token time mix as one Triton kernel each (see `GraphedStepper`). `steppers`: a dict
    the caller keeps (chat): a stepper made for this batch size, caps and sampling is reused from it,
    so its graph is captured once, not per call. `prefill_autocast` (torch.bfloat16): the prompts'
    forward under autocast in that dtype (the state stays in the model's dtype; the step does not
    change). `compile_prefill` (True: inductor, or a torch.compile backend's name): the prompts go
    through `ChunkedPrefill` with every RWKV block compiled (dynamic lengths; its graphs, with
    `cuda_graph`, record the compiled kernels), made once per caps like the graphs. `timings`: a dict
    that receives the seconds of the phases before the first token (prefill, setup, first_sample; the
    device synchronised at each mark, so pass it only to measure)."""
    if not prompts or any(not p for p in prompts):
        raise ValueError("generate_batch needs at least one prompt, each of at least one token")
    start = clock()
    device = next(model.parameters()).device
    B = len(prompts)
    last_mark = [start]

    def mark(phase: str) -> None:
        if timings is not None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            now = clock()
            timings[phase] = now - last_mark[0]
            last_mark[0] = now
    if seeds is None:
        seeds = [draw_seed(cfg, generator) if cfg.temperature > 0 else 0 for _ in range(B)]
    prefill = None
    prefill_backend = "inductor" if compile_prefill is True else (compile_prefill or None)
    if cuda_graph or prefill_backend:  # the prompts through chunk graphs (hierarchos.prefill), made once per caps
        pkey = ("prefill", tuple(sorted(caps.items())), prefill_autocast, cuda_graph, prefill_backend)
        prefill = steppers.get(pkey) if steppers is not None else None
        if prefill is None:
            prefill = ChunkedPrefill(model, 1, caps=caps, capture=cuda_graph, autocast=prefill_autocast,
                                     compile_blocks=prefill_backend)
            if steppers is not None:
                steppers[pkey] = prefill
    row_states, last_logits = [], []
    for b, prompt in enumerate(prompts):
        state = states[b] if states is not None else model.init_state(1, device=device)
        if prefill is not None:
            logits, new_state = prefill(torch.tensor([prompt], device=device), state)
        else:
            with autocast_in(device.type, prefill_autocast):
                out = model(torch.tensor([prompt], device=device), state, last_logits_only=True, **caps)
            logits, new_state = out.logits[:, -1].to(model.persistent.dtype), out.state  # (autocast's dtype back)
        row_states.append(new_state)
        last_logits.append(logits)
    mark("prefill")
    state = stack_states(model, row_states) if B > 1 else row_states[0]
    positions = [s.pos for s in row_states]
    vocab = last_logits[0].shape[-1]
    seen = torch.zeros(B, vocab, dtype=torch.bool)
    for b, prompt in enumerate(prompts):
        seen[b, torch.tensor(prompt)] = True
    # no host read until the first token's: the copies below do not wait for the prefill queued
    # before them (a blocking copy would), so the setup's host work overlaps the prefill on the device
    # (pageable sources are staged at once, so non_blocking is safe with these temporaries)
    to_device = lambda t: t.to(device, non_blocking=True)  # noqa: E731
    start_args = (state, to_device(torch.tensor(positions)), torch.cat(last_logits), to_device(seen),
                  to_device(torch.tensor(seeds, dtype=torch.int64)))
    key = (B, cuda_graph, compile_mode(compile_step), fused_step, tuple(sorted(caps.items())), cfg.temperature, cfg.top_k, cfg.top_p,
           cfg.repetition_penalty)
    stepper = steppers.get(key) if steppers is not None else None
    if stepper is None:
        stepper = GraphedStepper(model, *start_args, cfg, caps, capture=cuda_graph, compile_step=compile_step,
                                 fused_step=fused_step, host_positions=positions)
        if steppers is not None:
            steppers[key] = stepper
    else:
        stepper.load(*start_args, host_positions=positions)
    mark("setup")
    new: list[list[int]] = [[] for _ in range(B)]
    fed = [0] * B
    done = [False] * B
    tokens = stepper.token.tolist()
    mark("first_sample")
    first_token_seconds = clock() - start
    for n in range(cfg.max_new_tokens):
        if should_stop():
            break
        for b, token in enumerate(tokens):
            if not done[b] and eos_id is not None and token == eos_id:
                done[b] = True
                if keep_eos:
                    new[b].append(token)
        if all(done):
            break
        for b, token in enumerate(tokens):
            if not done[b]:
                new[b].append(token)
                fed[b] += 1
        hints = [a.push(t) for a, t in zip(state.rosa, tokens)] if state.rosa is not None else None
        finished = list(done)
        tokens = stepper.advance(hints).tolist()  # the one host read of a step: the sampled tokens
        for b in range(B):
            if not finished[b] and on_token is not None and on_token(b, new[b][-1]):
                done[b] = True
        if all(done):
            break
    totals = {name: (total, count) for name, (total, count) in stepper.totals.items()}
    final = stepper.final_state(max(p + f for p, f in zip(positions, fed)))
    return BatchResult(new, final, totals, first_token_seconds, clock() - start)
