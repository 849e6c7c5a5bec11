"""Generation benchmark: batch-1 tokens/s and resident memory after 1k / 8k / 32k tokens of context.

The state is fixed-size, so tokens/s and memory must stay flat as the context grows. For each
context length the prompt is consumed with the parallel prefill, then `--new-tokens` tokens are
generated one `step` at a time; RSS (CPU) or allocated memory (CUDA) is read after each phase.
Prints a table and writes JSON.

    python bench/bench_generate.py --size small --contexts 1024 8192 32768
    python bench/bench_generate.py --size tiny --contexts 1024 --long-generation 20000
    python bench/bench_generate.py --size 125m --contexts 1024 --formats fp32 Q4_0 Q8_0 INT4 Q2_K
    PYTHONPATH=. python bench/bench_generate.py --device cuda --size 125m
    python bench/bench_generate.py --size small --contexts 256 --batch 8 --formats fp32
    PYTHONPATH=. python bench/bench_generate.py --device cuda --size 125m --contexts 1024 --batch 8 --cuda-graph
    PYTHONPATH=. python bench/bench_generate.py --device cuda --size 125m --contexts 1024 --batch 1 --cuda-graph \
        --configs default minimal --gpt2

With several --formats on the CPU, the alternating table also gives each format's bandwidth bound:
the weight bytes one generated token streams (every matrix-vector product of one `step` counted
with its weight's bytes, so the passes per token are in it: forward hooks on the quantized and the
float Linear modules, and each time mix's low-rank matrices, fp16 in the quantized step, once per call;
the small float vectors are left out) against the memory
read bandwidth measured in the same run (best of several multithreaded reads of a 512 MiB buffer,
`stream_read`, at the kernel's thread count, the best of reads before and after the timed rounds; a
torch sum when the kernel is not built). bound tok/s =
bandwidth / bytes per token; "% of bound" = measured tok/s / bound. --fusion-levels times the first
quantized format's step at each level of its C++ fusion (a call per stack pass; + the reasoner's round
and the memory's read; + the encoder and the head: two calls a token; those two calls from `generate`'s
`TokenDecoder`, the state kept as their arrays) in alternating rounds. The generation rows decode as
`generate` does: through the TokenDecoder where a quantized model opens one, else `step` by `step`.

--batch B (fp32 model): `generate_batch` over B prompts of different lengths around the first context
(greedy, no EOS, `--new-tokens` steps of the sync-free step, on CUDA captured with --cuda-graph),
against B = 1 through the same path and through plain `generate` (the early-exit step): tokens/s
counts every row's tokens after the first; time to first token = prefill of every row + first sample,
the median of TTFT_SAMPLES calls (the steppers are kept across calls as chat keeps them, and made --
captured -- by one warm-up call per batch size first, whose seconds are reported apart). Beside them:
the prefill alone (the parallel forward over the first prompt, best of 3: the floor of time to first
token) and, per generate_batch row, where its time to first token goes (prefill, setup, first_sample;
a second call synchronised per phase).
--compile-step MODE...: one set of generate_batch rows per mode (off: the eager step; step: the whole
step through torch.compile; blocks: each RWKV block compiled; fused: each block's one-token time mix as
one Triton kernel, CUDA or TRITON_INTERPRET=1; blocks+fused, step+fused: both; off+full, fused+full: off and fused
with every token on the full body, as before the stepper left the pondering passes out off the plan points),
inside the CUDA graph with --cuda-graph;
compile seconds are part of the warm-up, shown apart. The JSON is rewritten after every row.

    PYTHONPATH=. python bench/bench_generate.py --device cuda --size 125m --contexts 1024 --new-tokens 128 \
        --batch 1 --cuda-graph --configs minimal default --gpt2 --compile-step off fused step step+fused \
        blocks+fused --skip-step-rows --budget-s 380

--configs: reasoning configs of the same shape (default 2,5,5; minimal 1,1,0), one run each.
--gpt2: a Hugging Face GPT-2 of the same parameter count (bench/gpt2_baseline.py), `model.generate`
with its KV cache, greedy, from a first-context prompt, in float32 and (CUDA) bfloat16: time to
first token = generate of 1 token; decode tok/s = the further tokens over the further time. Every
hierarchos path gets its ratio against GPT-2's faster dtype.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dataclasses  # noqa: E402
from dataclasses import replace  # noqa: E402

import torch  # noqa: E402

from gpt2_baseline import build_gpt2, fit_gpt2  # noqa: E402
from hierarchos.config import (DEFAULT_WIRING, MINIMAL_DEPTH, SEED_DEPTH, TIME_MIX_WIRINGS, ModelConfig,  # noqa: E402
                               tiny_config)
from hierarchos.generate import greedy_ids  # noqa: E402
from hierarchos.model import HierarchosLM  # noqa: E402
from hierarchos.ops.threads import intra_op_threads  # noqa: E402

SIZES = {
    "tiny": lambda: tiny_config(vocab_size=4096),
    "small": lambda: ModelConfig(vocab_size=4096, context_dim=256, h_hidden=256, l_hidden=256, h_layers=2,
                                 l_layers=2, ltm_slots=256, h_cycles=2, max_h_steps=2, max_l_steps=2),
    "125m": lambda: ModelConfig(vocab_size=50257, context_dim=768, h_hidden=768, l_hidden=768, h_layers=4,
                                l_layers=4),
}

# "default" is the seeds' (2,5,5), as the issue targets and earlier tables quote it (ModelConfig's default
# depth is minimal now)
CONFIGS = {"default": SEED_DEPTH, "minimal": MINIMAL_DEPTH}
STARTED = time.perf_counter()
TTFT_SAMPLES = 5  # generate_batch rows: time to first token is the median of this many calls


def rss_mib() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def memory_mib(device) -> float:
    return torch.cuda.memory_allocated() / 2**20 if device.type == "cuda" else rss_mib()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def measure(model, fmt: str, weight_bytes: int, args, device) -> list[dict]:
    """Prefill each context in pieces, then time `--new-tokens` steps; one row per context."""
    cfg, rows = model.cfg, []
    for context in args.contexts:
        state = model.init_state(1, device=device)
        prompt = torch.randint(0, cfg.vocab_size, (1, context), device=device)
        start = time.perf_counter()
        for piece in prompt.split(args.prefill_chunk, dim=1):  # prefill in pieces bounds activation memory
            out = model(piece, state, last_logits_only=True)  # as generate prefills
            state = out.state
        sync(device)
        prefill_s = time.perf_counter() - start
        after_prefill = memory_mib(device)
        token = greedy_ids(out.logits[:, -1])
        with intra_op_threads(model.step_threads):  # the token loop as `generate` runs it (argmax too)
            state, token = greedy_tokens(model, state, token, args.warmup)
            sync(device)
            start = time.perf_counter()
            state, token = greedy_tokens(model, state, token, args.new_tokens)
            sync(device)
            elapsed = time.perf_counter() - start
        rows.append({"format": fmt, "weight_bytes": weight_bytes, "context": context,
                     "prefill_tokens_per_s": context / prefill_s,
                     "tokens_per_s": args.new_tokens / elapsed, "memory_after_prefill_mib": after_prefill,
                     "memory_after_generation_mib": memory_mib(device), "state_bytes": state.nbytes(),
                     "rosa_history": state.rosa[0].history_len if state.rosa else 0})
        print(f"{fmt:>5} context {context:>6}: prefill {rows[-1]['prefill_tokens_per_s']:8.0f} tok/s | generate "
              f"{rows[-1]['tokens_per_s']:7.1f} tok/s | memory {after_prefill:8.1f} -> "
              f"{rows[-1]['memory_after_generation_mib']:8.1f} MiB | state {state.nbytes() / 2**20:.2f} MiB",
              flush=True)
    return rows


@torch.no_grad()
def greedy_tokens(model, state, token: torch.Tensor, n: int):
    """`n` greedy tokens from `token` (1,) on `state`, the way `generate` decodes them: a quantized model's
    CPU tokens through its `TokenDecoder` where one opens (the state made at the end), else `step` by
    `step`. Returns (state, the last token)."""
    open_decoder = getattr(model, "token_decoder", None)
    decoder = open_decoder(state) if open_decoder is not None and token.shape[0] == 1 else None
    if decoder is None:
        return step_tokens(model, state, token, n)
    last = int(token[0])
    for _ in range(n):
        last = int(greedy_ids(decoder.step(last).logits))
    return decoder.state(), torch.tensor([last])


def step_tokens(model, state, token: torch.Tensor, n: int):
    """`n` greedy tokens from `token` (B,) on `state`, `step` by `step`. Returns (state, the last tokens)."""
    for _ in range(n):
        out = model.step(token, state)
        state, token = out.state, greedy_ids(out.logits)
    return state, token


@torch.no_grad()
def interleaved_generation(models: dict, args, device) -> dict:
    """Batch-1 generation speed of every format, timed in alternation (best of `--rounds`), so
    that a shared machine's drift hits all formats alike: the fair ratio against fp32. Each step
    feeds the previous one's greedy token, a fresh id tensor, as generation does (a constant token
    tensor let per-token work hide: the quantized step caches a token's DeepEmbed gates by tensor)."""
    states, tokens, best = {}, {}, {fmt: float("inf") for fmt in models}
    for fmt, model in models.items():
        state, token = model.init_state(1, device=device), torch.zeros(1, dtype=torch.long, device=device)
        for _ in range(args.warmup):
            out = model.step(token, state)
            state, token = out.state, greedy_ids(out.logits)
        states[fmt], tokens[fmt] = state, token
    for _ in range(args.rounds):
        for fmt, model in models.items():
            state, token = states[fmt], tokens[fmt]
            sync(device)
            start = time.perf_counter()
            with intra_op_threads(model.step_threads):  # as `generate` runs its token loop
                state, token = greedy_tokens(model, state, token, args.new_tokens)
            sync(device)
            best[fmt] = min(best[fmt], (time.perf_counter() - start) / args.new_tokens)
            states[fmt], tokens[fmt] = state, token
    return {fmt: 1.0 / seconds for fmt, seconds in best.items()}


FUSION_LEVELS = ("stack", "round", "token", "loop")


def set_fusion_level(model, level: str) -> None:
    """A quantized model's CPU generation at one level of fusion (attach_fused_steps gives "token"):
    stack = one C++ call per stack pass (the round, the memory's read, the encoder and the head in
    Python); round = + the reasoner's round and the memory's read as one call each; token = + the
    encoder and the head inside those two calls. Bench-only: the lower levels undo parts of what
    attach_fused_steps did (the Python paths are the references the tests hold equal)."""
    from hierarchos.model.lm import HierarchosLM
    from hierarchos.model.memory import LongTermMemory
    from hierarchos.quant import fused_step

    fused_step.attach_fused_steps(model)  # (the token level's model; "loop" decodes it through a TokenDecoder)
    model.reasoner.__dict__.pop("_round_call", None)
    if level not in ("token", "loop") and isinstance(model, fused_step.FusedTokenLM):
        model.__class__ = HierarchosLM
    if level == "stack":
        model.memory.__class__ = LongTermMemory
        model.reasoner._round_call = lambda *a, **k: None  # the fused shadow loop stays; the round runs in Python


def level_tokens(model, level: str, state, token, n: int):
    """`n` greedy tokens at a fusion level: `step` by `step`, or ("loop") through generate's TokenDecoder."""
    return (greedy_tokens if level == "loop" else step_tokens)(model, state, token, n)


def fusion_generation(model, args, device) -> dict:
    """Batch-1 generation of one quantized model at each fusion level (FUSION_LEVELS), timed in
    alternation over `--rounds` rounds of `--new-tokens` tokens, greedy tokens fed back: the rounds' tok/s
    per level (best and median are what the table shows)."""
    rates = {level: [] for level in FUSION_LEVELS}
    state, token = model.init_state(1, device=device), torch.zeros(1, dtype=torch.long, device=device)
    with torch.no_grad(), intra_op_threads(model.step_threads):
        for level in FUSION_LEVELS:  # warm every path
            set_fusion_level(model, level)
            state, token = level_tokens(model, level, state, token, args.warmup)
        for _ in range(args.rounds):
            for level in FUSION_LEVELS:
                set_fusion_level(model, level)
                start = time.perf_counter()
                state, token = level_tokens(model, level, state, token, args.new_tokens)
                rates[level].append(args.new_tokens / (time.perf_counter() - start))
    set_fusion_level(model, "token")
    return rates


def read_bandwidth(repeats: int = 5) -> dict:
    """Memory read bandwidth of this machine now (GB/s): the kernel's multithreaded streaming read of a
    512 MiB buffer at its thread count, best of `repeats`; a torch sum when the kernel is not built."""
    import numpy as np

    buffer = np.ones(512 << 20, dtype=np.uint8)
    try:
        from hierarchos.quant import kernel
        if kernel.backend_name() != "cpp":
            raise ImportError
        threads = kernel.get_threads()
        read, how = (lambda: kernel.stream_read(buffer, threads)), f"kernel stream_read, {threads} threads"
    except ImportError:
        as_torch = torch.from_numpy(buffer.view(np.float32))
        read, how = (lambda: float(as_torch.sum())), f"torch sum, {torch.get_num_threads()} threads"
    read()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        read()
        best = min(best, time.perf_counter() - start)
    return {"gb_per_s": buffer.nbytes / best / 1e9, "method": how}


@torch.no_grad()
def bytes_per_token(model, device) -> dict:
    """Weight bytes one `step` streams: each Linear call (quantized or float) adds its weight's bytes
    once per input row (batch 1: once per call), so passes per token are counted, not assumed."""
    from torch import nn

    try:
        from hierarchos.quant.model import QuantLinear
    except ImportError:  # pragma: no cover - the package always has it
        QuantLinear = ()
    from hierarchos.model.rwkv import TimeMix

    counts = {"bytes": 0, "calls": 0, "low_rank_bytes": 0}
    # the time mix's low-rank matrices are weights streamed every pass too: fp16 in the quantized step
    # (hierarchos.quant.fused_step keeps them so), the parameters' own dtype in a float model
    quantized = any(isinstance(m, QuantLinear) for m in model.modules()) if QuantLinear else False
    low_rank = ("mix_down", "mix_up", "decay_down", "decay_up", "iclr_down", "iclr_up", "gate_down", "gate_up",
                "value_residual_down", "value_residual_up")

    def hook(module, inputs, output):
        rows = inputs[0].reshape(-1, inputs[0].shape[-1]).shape[0]
        weight = module.weight_q.nbytes if isinstance(module, QuantLinear) else \
            module.weight.numel() * module.weight.element_size()
        counts["bytes"] += weight * rows
        counts["calls"] += 1

    def time_mix_hook(module, inputs, output):
        params = [getattr(module, name) for name in low_rank if hasattr(module, name)]
        size = sum(p.numel() * (2 if quantized else p.element_size()) for p in params)
        counts["bytes"] += size
        counts["low_rank_bytes"] += size

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, QuantLinear))]
    handles += [m.register_forward_hook(time_mix_hook) for m in model.modules() if isinstance(m, TimeMix)]
    try:
        state = model.init_state(1, device=device)
        token = torch.zeros(1, dtype=torch.long, device=device)
        state = model.step(token, state).state  # warm-up: lazily built things are not per-token
        counts.update(bytes=0, calls=0, low_rank_bytes=0)
        tokens = 4
        for _ in range(tokens):
            state = model.step(token, state).state
    finally:
        for handle in handles:
            handle.remove()
    return {"bytes": counts["bytes"] / tokens, "linear_calls": counts["calls"] / tokens,
            "low_rank_bytes": counts["low_rank_bytes"] / tokens}


# off: the eager step; step / blocks: torch.compile of the whole step / of each RWKV block; fused: the
# blocks' one-token time mix as one Triton kernel (hierarchos.ops.rwkv_step_triton), alone or compiled around
COMPILE_MODES = ("off", "step", "blocks", "fused", "blocks+fused", "step+fused", "off+full", "fused+full",
                 "fused+prefill", "blocks+fused+prefill", "step+fused+prefill")


def step_options(mode: str) -> dict:
    """generate_batch's compile_step / fused_step / compile_prefill for a --compile-step mode ("+full" is
    not an option of generate_batch: see `full_body_only`; "+prefill": the prompt's blocks compiled too)."""
    parts = mode.split("+")
    compiled = [p for p in parts if p in ("step", "blocks")]
    return {"compile_step": compiled[0] if compiled else False, "fused_step": "fused" in parts,
            "compile_prefill": "prefill" in parts}


@torch.no_grad()
def row_sampling(args, new_tokens: int):
    """The generate_batch rows' sampling: greedy, or with --chat-sampling chat's defaults (temperature
    0.7, top-k 40, top-p 0.9, repetition penalty 1.2) from a fixed seed, so every mode draws the same
    tokens (the noise is a function of seed, counter and id)."""
    from hierarchos.generate import SamplingConfig

    if getattr(args, "chat_sampling", False):
        return SamplingConfig(max_new_tokens=new_tokens, seed=0)
    return SamplingConfig(temperature=0.0, max_new_tokens=new_tokens)


def batched_generation(model, args, device, rows: list, on_row=lambda: None) -> list[dict]:
    """--batch: decode tok/s and time to first token of generate_batch at B and 1 for each --compile-step
    mode, of generate at 1, and the prefill alone (the parallel forward: the floor of time to first token)."""
    from hierarchos.generate import SamplingConfig, generate

    cfg = row_sampling(args, args.new_tokens)
    context = args.contexts[0]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, model.cfg.vocab_size, (max(1, context - 7 * b),), generator=g).tolist()
               for b in range(args.batch)]
    generate(model, prompts[0][:16], SamplingConfig(temperature=0.0, max_new_tokens=4))  # lazy inits
    ids = torch.tensor([prompts[0]], device=device)
    model(ids, model.init_state(1, device=device))

    def best_of_3(prefill) -> float:
        best = float("inf")
        for _ in range(3):
            sync(device)
            start = time.perf_counter()
            prefill(ids, model.init_state(1, device=device))
            sync(device)
            best = min(best, time.perf_counter() - start)
        return best

    best = best_of_3(model)
    rows.append({"how": "prefill", "batch": 1, "context": len(prompts[0]), "cuda_graph": False, "compile_step": "off",
                 "time_to_first_token_s": best, "decode_tokens_per_s": float("nan"), "tokens": 0})
    print(f"{'prefill alone':>14} B= 1 context {len(prompts[0])}: {best * 1000:8.1f} ms (the parallel forward, "
          "best of 3)", flush=True)
    on_row()
    if args.cuda_graph:  # the same prompt through the captured chunk graphs that generate_batch uses
        from hierarchos.prefill import ChunkedPrefill

        sync(device)
        start = time.perf_counter()
        prefill = ChunkedPrefill(model, 1, capture=True)
        sync(device)
        capture_s = time.perf_counter() - start
        captured = best_of_3(prefill)
        rows.append({"how": "prefill", "batch": 1, "context": len(prompts[0]), "cuda_graph": True,
                     "compile_step": "off", "time_to_first_token_s": captured, "warmup_s": capture_s,
                     "chunk_graphs": prefill.sizes, "replays_per_prompt": prefill.replays / 3,
                     "decode_tokens_per_s": float("nan"), "tokens": 0})
        print(f"{'prefill graphs':>14} B= 1 context {len(prompts[0])}: {captured * 1000:8.1f} ms (chunk graphs "
              f"{prefill.sizes}, best of 3; capture {capture_s:.1f} s)", flush=True)
        exact, _ = prefill(ids, model.init_state(1, device=device))
        del prefill
        on_row()
        if args.prefill_autocast:  # the same graphs with the forward under bf16 autocast, and what it costs in logits
            sync(device)
            start = time.perf_counter()
            prefill = ChunkedPrefill(model, 1, capture=True, autocast=torch.bfloat16)
            sync(device)
            capture_s = time.perf_counter() - start
            captured = best_of_3(prefill)
            amp, _ = prefill(ids, model.init_state(1, device=device))
            diff, same = float((amp - exact).abs().max()), bool(amp.argmax(-1).eq(exact.argmax(-1)).all())
            rows.append({"how": "prefill", "batch": 1, "context": len(prompts[0]), "cuda_graph": True,
                         "compile_step": "off", "prefill_autocast": "bf16", "time_to_first_token_s": captured,
                         "warmup_s": capture_s, "max_abs_logit_diff_vs_fp32": diff, "same_argmax_as_fp32": same,
                         "decode_tokens_per_s": float("nan"), "tokens": 0})
            print(f"{'prefill bf16':>14} B= 1 context {len(prompts[0])}: {captured * 1000:8.1f} ms (chunk graphs, "
                  f"bf16 autocast; max |logit - fp32's| {diff:.3g}, same argmax {same})", flush=True)
            del prefill
            on_row()
    reference: dict = {}  # batch size -> the first mode's tokens: the other modes' agreement with them
    for mode in args.compile_step:
        if args.budget_s and time.perf_counter() - STARTED > args.budget_s:  # a device's time limit: skip, say so
            rows.append({"how": "generate_batch", "batch": len(prompts), "context": context, "compile_step": mode,
                         "cuda_graph": args.cuda_graph, "error": f"skipped: past --budget-s {args.budget_s:.0f}"})
            print(f"{'generate_batch':>14} compile {mode}: {rows[-1]['error']}", flush=True)
            on_row()
            continue
        try:
            mode_rows(model, mode, prompts, cfg, args, device, rows, reference, on_row)
        except Exception as exc:  # one failing mode (a compile error on this machine) leaves the others
            rows.append({"how": "generate_batch", "batch": len(prompts), "context": context, "compile_step": mode,
                         "cuda_graph": args.cuda_graph, "error": f"{type(exc).__name__}: {exc}"[:2000]})
            print(f"{'generate_batch':>14} compile {mode}: FAILED {rows[-1]['error'][:300]}", flush=True)
            on_row()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    sync(device)
    start, first = time.perf_counter(), []
    new, _ = generate(model, prompts[0], cfg, on_first_token=lambda _t: first.append(time.perf_counter()))
    sync(device)
    seconds, first_s = time.perf_counter() - start, first[0] - start
    rows.append({"how": "generate", "batch": 1, "context": context, "cuda_graph": False, "compile_step": "off",
                 "tokens": len(new), "time_to_first_token_s": first_s,
                 "decode_tokens_per_s": len(new) / max(seconds - first_s, 1e-9), "load_average": os.getloadavg()})
    print(f"{'generate':>14} B= 1 context ~{context}: time to first token {first_s * 1000:8.1f} ms | "
          f"decode {rows[-1]['decode_tokens_per_s']:8.1f} tok/s", flush=True)
    on_row()
    return rows


@torch.no_grad()  # as generation runs them: a grad-mode call would recompile the compiled step
def kernels_per_token(stepper, device) -> dict | None:
    """The kernels, copies and fills one token launches (what a graph replay holds), counted by the
    profiler over one step of each of the stepper's bodies run outside its graphs (its compiled calls as
    they are: the same stepper, so nothing recompiles): {"plan": a token where a row reaches a plan point,
    "other": the other tokens' body (h_stride > 1), "chunk_end": a plan point that also closes a memory
    chunk, "mean": over lcm(h_stride, ltm_chunk) tokens}. CUDA only; None where
    the profiler cannot count."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    counts, by_kernel = {}, {}
    try:
        for key in stepper._bodies():
            stepper._body(key)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                stepper._body(key)
                torch.cuda.synchronize()
            events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            count = len(events)
            if not count:  # some versions keep device events only in kineto's results
                count = sum(1 for e in prof.profiler.kineto_results.events()
                            if e.device_type() == torch.autograd.DeviceType.CUDA)
            if not count:
                return None
            counts[key] = count
            if key[0] and not by_kernel:  # a plan point's body: its kernels by kind (run alone, no graph)
                by_kernel = kernel_kinds(events)
    except Exception as exc:  # no CUPTI here: the rows go on without the count
        print(f"kernel count unavailable: {type(exc).__name__}: {exc}", flush=True)
        return None
    # the mean over lcm(h_stride, ltm_chunk) positions, each on the body a lone row there runs
    s, c = stepper.stride, stepper.chunk
    period = math.lcm(s, c)
    keys = [((p + 1) % s == 0 or s == 1, (p + 1) % c == 0 or c == 1) for p in range(period)]
    plan = counts.get((True, False), counts.get((True, True)))
    return {"plan": plan, "other": counts.get((False, False), plan), "chunk_end": counts.get((True, True)),
            "mean": sum(counts.get(k, counts.get((True, True))) for k in keys) / period,  # (+full: one body)
            "plan_by_kernel": by_kernel}


def kernel_kinds(events) -> dict:
    """Profiler device events grouped by kernel name with trailing numbers dropped (inductor's
    triton_poi_fused_..._12 -> triton_poi_fused_...): name -> {"count", "us"}, most time first."""
    import re

    kinds: dict = {}
    for e in events:
        name = re.sub(r"(_\d+)+$", "", e.name)[:120]
        entry = kinds.setdefault(name, {"count": 0, "us": 0.0})
        entry["count"] += 1
        entry["us"] += e.time_range.elapsed_us()
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1]["us"]))


@contextlib.contextmanager
def full_body_only(on: bool):
    """A "+full" mode: every token runs the stepper's full body (the pondering passes of the plan points
    and the memory's chunk-end write included, masked off them), as before the step split those tokens
    from the others: the A/B of the split in one run."""
    from hierarchos.generate import GraphedStepper

    saved = GraphedStepper._bodies, GraphedStepper._key
    if on:
        GraphedStepper._bodies, GraphedStepper._key = (lambda self: ((True, True),)), (lambda self: (True, True))
    try:
        yield
    finally:
        GraphedStepper._bodies, GraphedStepper._key = saved


def mode_rows(model, mode: str, prompts, cfg, args, device, rows: list, reference: dict, on_row) -> None:
    with full_body_only(mode.endswith("+full")):
        _mode_rows(model, mode, prompts, cfg, args, device, rows, reference, on_row)


def _mode_rows(model, mode: str, prompts, cfg, args, device, rows: list, reference: dict, on_row) -> None:
    """The generate_batch rows of one --compile-step mode (B and, when B > 1, 1)."""
    from hierarchos.generate import generate_batch

    options = step_options(mode)
    # chat keeps its steppers and captures at load: the same here, one warm-up per batch size (its
    # seconds = compile, capture and first-call costs, reported apart), so time to first token is
    # prefill + first sample, as a chat user sees it
    steppers, warmup_s = {}, {}
    for n in sorted({len(prompts), 1}):
        sync(device)
        start = time.perf_counter()
        generate_batch(model, [p[:16] for p in prompts[:n]], row_sampling(args, 4),
                       cuda_graph=args.cuda_graph, steppers=steppers, **options)
        sync(device)
        warmup_s[n] = time.perf_counter() - start
    steps = {key: stepper for key, stepper in steppers.items() if key[0] != "prefill"}  # the prefill's graphs apart
    compile_s = {key[0]: stepper.compile_seconds for key, stepper in steps.items()}
    kernels = {key[0]: kernels_per_token(stepper, device) for key, stepper in steps.items()}
    # whether the fused step really runs (a failed device check turns it off with one warning: a row
    # must say so, or it is read as the fused path's rate)
    fused_active = {key[0]: stepper.fused_step for key, stepper in steps.items()}
    for rows_in in (prompts, prompts[:1]) if len(prompts) > 1 else (prompts,):
        B = len(rows_in)
        sync(device)
        result = generate_batch(model, rows_in, cfg, cuda_graph=args.cuda_graph, steppers=steppers, **options)
        sync(device)
        seconds, first_s, tokens = result.seconds, result.first_token_seconds, sum(len(t) for t in result.tokens)
        # time to first token is a host-bound prefill whose single samples spread ~2x on a busy host:
        # the median of this call's and TTFT_SAMPLES - 1 one-token calls'
        samples = [first_s]
        for _ in range(TTFT_SAMPLES - 1):
            sync(device)
            samples.append(generate_batch(model, rows_in, replace(cfg, max_new_tokens=1), cuda_graph=args.cuda_graph,
                                          steppers=steppers, **options).first_token_seconds)
        ttft = statistics.median(samples)
        phases: dict = {}  # a second call, synchronised per phase: where the time to first token goes
        generate_batch(model, rows_in, replace(cfg, max_new_tokens=1), cuda_graph=args.cuda_graph,
                       steppers=steppers, timings=phases, **options)
        # greedy tokens against the first mode's: equal up to float32 reassociation (a near tie may flip)
        first = reference.setdefault(B, (mode, result.tokens))
        agree = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))
                 for x, y in zip(first[1], result.tokens)]
        rows.append({"how": "generate_batch", "batch": B, "context": len(rows_in[0]), "cuda_graph": args.cuda_graph,
                     "compile_step": mode, "warmup_s": warmup_s[B], "compile_s": compile_s.get(B), "tokens": tokens,
                     "time_to_first_token_s": ttft, "time_to_first_token_samples_s": samples,
                     "time_to_first_token_phases_s": phases,
                     "decode_tokens_per_s": tokens / max(seconds - first_s, 1e-9),
                     "tokens_agreeing_with": first[0], "agreeing_prefix_per_row": agree,
                     "token_ids": result.tokens,  # to compare greedy runs across calls
                     "device_ops_per_token": kernels.get(B), "fused_step_active": fused_active.get(B),
                     "load_average": os.getloadavg()})
        print(f"{'generate_batch':>14} B={B:>2} context ~{len(rows_in[0])} {mode:>12}: time to first token "
              f"{ttft * 1000:8.1f} ms (median of {len(samples)}; "
              f"{', '.join(f'{k} {v * 1000:.1f}' for k, v in phases.items())}) | decode "
              f"{rows[-1]['decode_tokens_per_s']:8.1f} tok/s (all rows) | warm-up {warmup_s[B]:.1f} s"
              + (f" (compile {compile_s[B]:.1f} s)" if compile_s.get(B) else "")
              + f" | tokens as {first[0]}: {agree} of {[len(t) for t in result.tokens]}"
              + (f" | kernels+copies per token {({k: v for k, v in kernels[B].items() if k != 'plan_by_kernel'})}"
                 if kernels.get(B) else "")
              + (" | FUSED STEP OFF (its device check failed: see the warning above)"
                 if options["fused_step"] and not fused_active.get(B) else ""), flush=True)
        kinds = (kernels.get(B) or {}).get("plan_by_kernel") or {}
        if kinds:
            total = sum(v["us"] for v in kinds.values())
            print(f"    a plan point's kernels run one by one outside the graph: {sum(v['count'] for v in kinds.values())} "
                  f"kernels, {total:.0f} us of device time; by kind (count, us):", flush=True)
            for name, v in list(kinds.items())[:14]:
                print(f"      {v['count']:5d} {v['us']:8.1f}  {name}", flush=True)
        on_row()


@torch.no_grad()
def long_generation(model, n: int, device) -> list[dict]:
    """One long generation from an empty state: memory and speed sampled as tokens accumulate."""
    state = model.init_state(1, device=device)
    token = torch.zeros(1, dtype=torch.long, device=device)
    marks = sorted({m for m in (1000, 5000, 10000, 20000, n) if m <= n})
    rows, done, start = [], 0, time.perf_counter()
    for mark in marks:
        while done < mark:
            out = model.step(token, state)
            state, token = out.state, greedy_ids(out.logits)
            done += 1
        sync(device)
        now = time.perf_counter()
        previous = rows[-1]["generated"] if rows else 0
        rows.append({"generated": done, "tokens_per_s": (done - previous) / (now - start),
                     "memory_mib": memory_mib(device), "state_bytes": state.nbytes()})
        start = now
        print(f"generated {done:>6}: {rows[-1]['tokens_per_s']:7.1f} tok/s | memory "
              f"{rows[-1]['memory_mib']:8.1f} MiB | state {state.nbytes() / 2**20:.2f} MiB", flush=True)
    return rows


@torch.no_grad()
def gpt2_generation(params: int, vocab: int, args, device) -> list[dict]:
    """HF GPT-2 of `params` parameters: time to first token and decode tok/s of `generate` (KV cache)."""
    context = args.contexts[0]
    positions = max(1024, context + args.new_tokens)
    L, d = fit_gpt2(params, vocab, positions, 768)
    prompt = torch.randint(0, vocab, (1, context), generator=torch.Generator().manual_seed(0)).to(device)
    rows = []
    for dtype in (torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float32,):
        model = build_gpt2(vocab, positions, L, d, use_cache=True).to(device, dtype).eval()
        n = sum(p.numel() for p in model.parameters())

        def timed(new):
            sync(device)
            start = time.perf_counter()
            model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True,
                           pad_token_id=0)
            sync(device)
            return time.perf_counter() - start
        timed(args.new_tokens)  # warm-up at full length (a fresh machine's first run came out at half speed)
        first = min(timed(1) for _ in range(3))
        whole = min(timed(args.new_tokens) for _ in range(3))
        rows.append({"dtype": str(dtype).replace("torch.", ""), "n_layer": L, "n_embd": d, "params": n,
                     "context": context, "time_to_first_token_s": first,
                     "decode_tokens_per_s": (args.new_tokens - 1) / max(whole - first, 1e-9)})
        print(f"GPT-2 {L}x{d} ({n / 1e6:.1f}M, {rows[-1]['dtype']}): time to first token {first * 1000:.1f} ms | "
              f"decode {rows[-1]['decode_tokens_per_s']:.1f} tok/s", flush=True)
        del model
    return rows


@torch.no_grad()
def sampled_generation(models: dict, args, device) -> dict:
    """Decode tokens/s of `generate` (chat's loop on the CPU) with chat's default sampling (temperature
    0.7, top-k 40, top-p 0.9, repetition penalty 1.2) after a 64-token prompt: the model step plus what
    sampling costs a token, which the argmax rows leave out. Best of --rounds, per format."""
    from hierarchos.generate import SamplingConfig, generate

    g = torch.Generator().manual_seed(0)
    rates = {}
    for fmt, model in models.items():
        prompt = torch.randint(0, model.cfg.vocab_size, (64,), generator=g).tolist()
        best = 0.0
        for _ in range(max(1, args.rounds)):
            stamps: list[float] = []
            generate(model, prompt, SamplingConfig(max_new_tokens=args.new_tokens + 1, seed=0),
                     on_token=lambda _t, _o: stamps.append(time.perf_counter()))
            if len(stamps) > 1:
                best = max(best, (len(stamps) - 1) / (stamps[-1] - stamps[0]))
        rates[fmt] = best
        print(f"{fmt:>5} generate() with chat's default sampling: {best:.1f} tok/s", flush=True)
    return rates


def run(args, config: str = "default", results: list | None = None, on_row=lambda: None) -> dict:
    """One reasoning config; its result dict is appended to `results` first and filled as rows come
    (`on_row` saves the JSON after each: a run cut short keeps what it measured)."""
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    torch.manual_seed(0)
    fields = {**CONFIGS[config], **TIME_MIX_WIRINGS[args.wiring]}
    float_model = HierarchosLM(dataclasses.replace(SIZES[args.size](), **fields).validate()).to(device).eval()
    cfg = float_model.cfg
    rows, kernel_info, models = [], None, {}
    result = {"config": config, "wiring": args.wiring, "batched": [], "rows": rows, "size": args.size,
              "params": float_model.num_parameters(),
              "params_without_deepembed": float_model.num_parameters(with_deepembed=False),
              "machine": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                          "torch": torch.__version__, "device": str(device),
                          "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None}}
    if results is not None:
        results.append(result)
    for fmt in [] if args.skip_step_rows else args.formats:
        if fmt == "fp32":
            model, weight_bytes = float_model, 4 * float_model.num_parameters()
        else:  # the same weights, quantized, on the C++ kernel (CPU)
            if device.type != "cpu":
                raise SystemExit(f"--formats {fmt}: quantized models run on the CPU kernel; use --device cpu")
            from hierarchos.quant import kernel
            from hierarchos.quant.model import build_quantized_model, quantize_tensors, quantized_bytes

            model = build_quantized_model(cfg, quantize_tensors(float_model, fmt))
            weight_bytes = quantized_bytes(model)
            kernel_info = {"backend": kernel.backend_name(), "isa": kernel.get_isa(), "threads": kernel.get_threads()}
            print(f"{fmt}: {weight_bytes / 2**20:.1f} MiB of weights ({kernel_info})", flush=True)
        rows += measure(model, fmt, weight_bytes, args, device)
        models[fmt] = model
    timed = args.rounds > 0 and len(models) > 1
    # the bound's bandwidth: the best read before and after the timed rounds (on a shared host it moved
    # by 1.6x between runs minutes apart; the best is what the machine can deliver, a bound to hold)
    before = read_bandwidth() if timed and device.type == "cpu" else None
    interleaved = interleaved_generation(models, args, device) if timed else {}
    bound = {}
    if interleaved and device.type == "cpu":
        after = read_bandwidth()
        bandwidth = max(before, after, key=lambda b: b["gb_per_s"])
        bandwidth = {**bandwidth, "method": f"{bandwidth['method']}, best of before ({before['gb_per_s']:.1f}) and "
                                            f"after ({after['gb_per_s']:.1f}) the timed rounds"}
        print(f"memory read bandwidth: {bandwidth['gb_per_s']:.1f} GB/s ({bandwidth['method']})", flush=True)
        for fmt, model in models.items():
            streamed = bytes_per_token(model, device)
            bound[fmt] = {**streamed, "bandwidth_gb_per_s": bandwidth["gb_per_s"],
                          "bandwidth_method": bandwidth["method"],
                          "bound_tokens_per_s": bandwidth["gb_per_s"] * 1e9 / streamed["bytes"],
                          "tokens_per_s": interleaved[fmt]}
            bound[fmt]["fraction_of_bound"] = interleaved[fmt] / bound[fmt]["bound_tokens_per_s"]
    sampled = sampled_generation(models, args, device) if args.sampled else {}
    fusion = {}
    quantized = [fmt for fmt in models if fmt != "fp32"]
    if args.fusion_levels and quantized:
        fusion = {"format": quantized[0], "tokens_per_s": fusion_generation(models[quantized[0]], args, device)}
    del models
    batch_rows = batched_generation(float_model, args, device, result["batched"], on_row) if args.batch else []
    long_rows = long_generation(float_model, args.long_generation, device) if args.long_generation else []
    result.update({"batched": batch_rows, "long_generation": long_rows, "interleaved_tokens_per_s": interleaved,
                   "sampled_tokens_per_s": sampled, "fusion_levels": fusion,
                   "bandwidth_bound": bound, "load_average": os.getloadavg(), "kernel": kernel_info,
                   "torch_threads": torch.get_num_threads()})
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=SIZES, default="small")
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 32768])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--prefill-chunk", type=int, default=2048)
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--formats", nargs="+", default=["fp32"], choices=("fp32", "INT4", "Q4_0", "Q8_0", "Q2_K"),
                    help="fp32 (PyTorch) and/or quantized formats on the C++ kernel (CPU)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="with several --formats: time generation in this many alternating rounds (best kept)")
    ap.add_argument("--long-generation", type=int, default=0, metavar="N",
                    help="also generate N tokens from an empty state, sampling memory at 1k/5k/10k/20k")
    ap.add_argument("--batch", type=int, default=0, metavar="B",
                    help="also time batched generation of B prompts against B = 1 (see the module doc)")
    ap.add_argument("--cuda-graph", action="store_true", help="--batch on CUDA: capture the step as a CUDA graph")
    ap.add_argument("--configs", nargs="+", choices=CONFIGS, default=["default"],
                    help="reasoning configs, one run each (minimal: 1,1,0)")
    ap.add_argument("--wiring", choices=TIME_MIX_WIRINGS, default=DEFAULT_WIRING,
                    help=f"the RWKV-7 time-mix wiring (default {DEFAULT_WIRING}, the models' default)")
    ap.add_argument("--gpt2", action="store_true",
                    help="also time a Hugging Face GPT-2 of the same parameter count (model.generate, KV cache)")
    ap.add_argument("--compile-step", nargs="+", choices=COMPILE_MODES, default=["off"], metavar="MODE",
                    help="--batch: one generate_batch row per mode: off (eager step), step (torch.compile of the "
                         "whole step), blocks (of each RWKV block), fused (the one-token time mix as one Triton "
                         "kernel), blocks+fused, step+fused; off+full, fused+full: every token on the full body; "
                         "+prefill: the prompt's chunk graphs with compiled blocks too (time to first token); "
                         "compile time is part of the warm-up, shown apart")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="--batch: start no further --compile-step mode after this many seconds of the run "
                         "(skipped modes get a row saying so); 0: no limit")
    ap.add_argument("--skip-step-rows", action="store_true",
                    help="leave out the per-context step rows (prefill pieces + plain step): --batch rows only")
    ap.add_argument("--prefill-autocast", action="store_true",
                    help="--cuda-graph: one more prefill row with the chunk graphs' forward under bf16 autocast "
                         "(its time and its logits against the float32 prefill's)")
    ap.add_argument("--chat-sampling", action="store_true",
                    help="the generate_batch rows (--batch) sample as chat does instead of greedily (the GPU "
                         "step's sampler and its noise kernel timed too)")
    ap.add_argument("--sampled", action="store_true",
                    help="also time `generate` (chat's CPU loop) with chat's default sampling, per format")
    ap.add_argument("--fusion-levels", action="store_true",
                    help="CPU: also time the first quantized format at each fusion level of its step (stack, "
                         "round, token, loop: see set_fusion_level) in --rounds alternating rounds")
    ap.add_argument("--tf32", action="store_true",
                    help="CUDA: float32 matmuls on TF32 tensor cores for both models (as `train` runs them)")
    ap.add_argument("--json", default=None, help="default bench/results/generate_<device>.json")
    args = ap.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.tf32:  # before the GPT-2 baseline too: both models run their float32 rows the same way
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    path = Path(args.json or f"bench/results/generate_{device.type}.json")
    results, gpt2 = [], []

    def save() -> None:  # after every row: a run cut short (a device's time limit) keeps what it measured
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"runs": results, "gpt2": gpt2, "argv": sys.argv[1:]}, indent=2))
        tmp.replace(path)

    if args.gpt2:  # first: the baseline every row is compared with, measured before any long compile
        with torch.device("meta"):  # only counted: no weights made
            params = HierarchosLM(SIZES[args.size]()).num_parameters(with_deepembed=False)
        gpt2 += gpt2_generation(params, SIZES[args.size]().vocab_size, args, device)
        save()
    for config in args.configs:
        print(f"=== {args.size}, reasoning config {config}, wiring {args.wiring}", flush=True)
        run(args, config, results, save)
        save()
        print_run(results[-1], args)
    if gpt2:
        best = max(gpt2, key=lambda r: r["decode_tokens_per_s"])
        print(f"\nagainst GPT-2 {best['n_layer']}x{best['n_embd']} ({best['params'] / 1e6:.1f}M, {best['dtype']}, "
              f"model.generate with KV cache): {best['decode_tokens_per_s']:.1f} tok/s, time to first token "
              f"{best['time_to_first_token_s'] * 1000:.1f} ms")
        print("| config | path | B | time to first token ms | decode tok/s | vs GPT-2 | warm-up s (compile s) "
              "| kernels per token |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for result in results:
            for r in result["batched"]:
                if "error" in r:
                    print(f"| {result['config']} | {path_label(r)} | {r['batch']} | failed: {r['error'][:120]} |")
                    continue
                r["vs_gpt2"] = r["decode_tokens_per_s"] / r["batch"] / best["decode_tokens_per_s"]
                ratio = "-" if r["how"] == "prefill" else f"{r['vs_gpt2']:.2f}x"
                print(f"| {result['config']} | {path_label(r)} | {r['batch']} | "
                      f"{r['time_to_first_token_s'] * 1000:.1f} | {r['decode_tokens_per_s']:.1f} | "
                      f"{ratio} | {warmup_label(r)} | {r.get('device_ops_per_token') or '-'} |")
            for r in result["rows"]:
                r["vs_gpt2"] = r["tokens_per_s"] / best["decode_tokens_per_s"]
                print(f"| {result['config']} | step ({r['format']}, context {r['context']}) | 1 | - | "
                      f"{r['tokens_per_s']:.1f} | {r['vs_gpt2']:.2f}x | - | - |")
    save()
    print(f"json: {path}")


def path_label(r: dict) -> str:
    label = r["how"] + (" (CUDA graph)" if r["cuda_graph"] else "")
    label += f", {r['prefill_autocast']} autocast" if r.get("prefill_autocast") else ""
    return label + (f", {r['compile_step']}" if r.get("compile_step", "off") != "off" else "")


def warmup_label(r: dict) -> str:
    if r.get("warmup_s") is None:
        return "-"
    return f"{r['warmup_s']:.1f}" + (f" ({r['compile_s']:.1f})" if r.get("compile_s") else "")


def print_run(result: dict, args) -> None:
    base = {r["context"]: r["tokens_per_s"] for r in result["rows"] if r["format"] == "fp32"}
    print("\n| format | weights MiB | context | prefill tok/s | generate tok/s | vs fp32 | memory after prefill MiB "
          "| after generation MiB | state MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in result["rows"]:
        ratio = f"{r['tokens_per_s'] / base[r['context']]:.2f}x" if r["context"] in base else "-"
        print(f"| {r['format']} | {r['weight_bytes'] / 2**20:.1f} | {r['context']} | "
              f"{r['prefill_tokens_per_s']:.0f} | {r['tokens_per_s']:.1f} | {ratio} | "
              f"{r['memory_after_prefill_mib']:.1f} | {r['memory_after_generation_mib']:.1f} | "
              f"{r['state_bytes'] / 2**20:.2f} |")
    if result["interleaved_tokens_per_s"]:
        rates = result["interleaved_tokens_per_s"]
        print(f"\ngeneration, formats timed in alternation (best of {args.rounds} rounds of {args.new_tokens} tokens):")
        bound = result["bandwidth_bound"]
        print("| format | tok/s | vs fp32 | weight MB streamed per token | Linear calls per token | "
              "bound tok/s (at GB/s read) | % of bound |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for fmt, rate in rates.items():
            ratio = f"{rate / rates['fp32']:.2f}x" if "fp32" in rates else "-"
            b = bound.get(fmt)
            extra = (f"{b['bytes'] / 1e6:,.1f} ({b.get('low_rank_bytes', 0) / 1e6:,.1f} low-rank) | "
                     f"{b['linear_calls']:.0f} | {b['bound_tokens_per_s']:.1f} ({b['bandwidth_gb_per_s']:.1f}) | "
                     f"{100 * b['fraction_of_bound']:.0f}%") if b else "- | - | - | -"
            print(f"| {fmt} | {rate:.2f} | {ratio} | {extra} |")
        print(f"load average at the end: {' '.join(f'{v:.2f}' for v in result['load_average'])}")
    if result.get("fusion_levels"):
        fusion = result["fusion_levels"]
        print(f"\n{fusion['format']} generation by fusion level ({args.rounds} alternating rounds of {args.new_tokens} "
              "tokens; stack: a C++ call per stack pass; round: + the round and the memory read; token: + encoder "
              "and head, two calls a token; loop: those calls from generate's TokenDecoder, no state between "
              "tokens):")
        print("| level | tok/s best | tok/s median | rounds |")
        print("|---|---:|---:|---|")
        for level, rates in fusion["tokens_per_s"].items():
            print(f"| {level} | {max(rates):.1f} | {statistics.median(rates):.1f} | "
                  f"{' '.join(f'{r:.0f}' for r in rates)} |")
    if result["batched"]:
        print("\n| path | B | context | time to first token ms | decode tok/s (all rows) | warm-up s (compile s) |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in result["batched"]:
            if "error" in r:
                print(f"| {path_label(r)} | {r['batch']} | ~{r['context']} | failed: {r['error'][:120]} |")
                continue
            print(f"| {path_label(r)} | {r['batch']} | ~{r['context']} | "
                  f"{r['time_to_first_token_s'] * 1000:.1f} | {r['decode_tokens_per_s']:.1f} | {warmup_label(r)} |")
    if result["long_generation"]:
        print("\n| generated tokens | tok/s since previous row | memory MiB | state MiB |")
        print("|---:|---:|---:|---:|")
        for r in result["long_generation"]:
            print(f"| {r['generated']} | {r['tokens_per_s']:.1f} | {r['memory_mib']:.1f} | "
                  f"{r['state_bytes'] / 2**20:.2f} |")


if __name__ == "__main__":
    main()
