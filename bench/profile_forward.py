"""Where the GPU time of one forward+backward step goes, by kernel kind, for bench_forward's models.

Runs bench_forward's step (hierarchos + lm_loss, or the equal-size GPT-2) under torch.profiler and
adds up device time per kernel kind (matmul, our WKV kernel, inductor-fused, elementwise,
reductions, copies/casts, indexing, norms/softmax, sort/top-k, other), next to the operator
counts and the largest aten operators by self device time, and for hierarchos by part (embeddings,
memory, encoder, the HRM's glue, manager and worker stacks, head; forward and backward apart:
`part_times`); `--memory` adds what one forward saves for its backward, by part (`saved_by_part`), and
the step's CUDA peak; `--compile --activation-budget F [F ...]` one hierarchos row per activation memory
budget of its compiled blocks (train's --activation-budget). The same step is timed without the profiler
first, so the table's "share" is of real busy time, not of profiler overhead.

    PYTHONPATH=. python bench/profile_forward.py --device cuda --size 125m --seq-len 1024 --batch 16 \
        --models hierarchos:minimal gpt2 --json $OUT/profile_forward.json
CPU smoke (operators only, there are no device kernels):
    PYTHONPATH=. python bench/profile_forward.py --device cpu --size tiny --seq-len 128 --batch 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench.bench_forward import (CONFIGS, SIZES, build_gpt2, fit_gpt2, gpt2_count, hier_cfg,  # noqa: E402
                                 hier_counts, loss_fn, machine_info)
from hierarchos.model.lm import HierarchosLM  # noqa: E402
from hierarchos.model.rwkv import compile_blocks  # noqa: E402
from hierarchos.ops.wkv_chunk_grad_triton import set_recompute_states  # noqa: E402

# first match wins; names are CUDA kernel names (lower-cased)
KINDS = (
    ("wkv (ours)", ("wkv",)),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90_", "sm80_", "ampere_", "magma", "splitk")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "efficient")),
    ("inductor fused", ("triton_",)),
    ("norm/softmax", ("layer_norm", "layernorm", "softmax", "group_norm", "batch_norm")),
    ("sort/top-k", ("sort", "topk", "radix", "bitonic", "cub::")),
    ("indexing", ("index", "gather", "scatter", "embedding", "cat_", "catarray")),
    ("copy/cast", ("copy", "fill")),
    ("reduction", ("reduce",)),
    ("elementwise", ("elementwise",)),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def make_model(spec: str, size: str, max_t: int):
    """'hierarchos:<config>' or 'gpt2' (fitted to hierarchos' parameter count, as in bench_forward)."""
    name, _, config = spec.partition(":")
    if name == "hierarchos":
        return HierarchosLM(hier_cfg(size, config or "minimal", use_rosa=False))
    if name == "gpt2":
        V, P = SIZES[size]["vocab_size"], max(max_t, 1024)
        n_hier, _ = hier_counts(hier_cfg(size, "minimal"))
        L, d = fit_gpt2(n_hier, V, P, SIZES[size]["context_dim"])
        model = build_gpt2(V, P, L, d)
        model.fitted = dict(n_layer=L, n_embd=d, params=gpt2_count(V, P, L, d))
        return model
    raise SystemExit(f"profile_forward: unknown model {spec!r}; use hierarchos:<{'|'.join(CONFIGS)}> or gpt2")


# hierarchos' parts for the by-part table: (label, module path); the innermost annotated module wins, so
# "reasoner" holds the HRM's own glue (projections, LERP, halting), not its stacks
PARTS = (("embeddings", "embed"), ("embeddings", "rosa_embed"), ("memory", "memory"), ("encoder", "encoder"),
         ("hrm glue", "reasoner"), ("manager stack", "reasoner.manager"), ("worker stack", "reasoner.worker"),
         ("head", "out_norm"), ("head", "lm_head"))
PART_PREFIX = "part: "
EVALUATE = "autograd::engine::evaluate_function"


def annotate_parts(model, labels: list | None = None) -> list:
    """Forward hooks that wrap each of PARTS' modules in a profiler range named PART_PREFIX + label,
    and keep the labels of the open ranges in `labels` (innermost last) when it is given; returns the
    hook handles (remove them to undo)."""
    handles, open_ranges = [], []

    def enter(label):
        def hook(module, inputs):
            rng = torch.autograd.profiler.record_function(PART_PREFIX + label)
            rng.__enter__()
            open_ranges.append(rng)
            if labels is not None:
                labels.append(label)
        return hook

    def leave(module, inputs, output):
        open_ranges.pop().__exit__(None, None, None)
        if labels is not None:
            labels.pop()

    modules = dict(model.named_modules())
    for label, path in PARTS:
        if modules.get(path) is not None:
            handles += [modules[path].register_forward_pre_hook(enter(label)), modules[path].register_forward_hook(leave)]
    return handles


def _ancestors(ev):
    while ev is not None:
        yield ev
        ev = ev.cpu_parent


def part_times(events, steps: int, device: bool, count: bool = False) -> dict:
    """{label: {"forward": ms, "backward": ms}} per step from a profile of `annotate_parts`' model.

    A forward kernel belongs to the innermost part range it was launched in ("outside" when none: the
    loss, the step's own glue). A backward kernel belongs to the part whose forward operator made its
    autograd node: the node's evaluate_function event carries the sequence number of that operator
    ("backward, unmatched" when none has it, e.g. AccumulateGrad). Times are the device kernels'
    durations (`device`), else the operators' own CPU time (a CPU run has no kernels); `count`: the
    number of operator events instead (the attribution alone, free of timing noise)."""
    def cost(ev):
        if count:
            return 1.0
        if device:
            return sum(k.duration for k in ev.kernels) / 1e3
        return ev.self_cpu_time_total / 1e3

    def own_part(ev):
        return next((a.name[len(PART_PREFIX):] for a in _ancestors(ev) if a.name.startswith(PART_PREFIX)), None)

    def node_of(ev):  # the outermost evaluate_function event above ev, if it runs in the backward
        return next((a for a in reversed(list(_ancestors(ev))) if a.name.startswith(EVALUATE)), None)

    forward_part = {}
    for ev in events:
        if ev.sequence_nr >= 0 and node_of(ev) is None:
            forward_part.setdefault(ev.sequence_nr, own_part(ev) or "outside")
    parts: dict = {}
    for ev in events:
        ms = cost(ev)
        if not ms or ev.device_type != torch.autograd.DeviceType.CPU:
            continue
        node = node_of(ev)
        if node is None:
            label, phase = own_part(ev) or "outside", "forward"
        else:
            label, phase = forward_part.get(node.sequence_nr, "backward, unmatched"), "backward"
        entry = parts.setdefault(label, {"forward": 0.0, "backward": 0.0})
        entry[phase] += ms / steps
    return dict(sorted(parts.items(), key=lambda kv: -(kv[1]["forward"] + kv[1]["backward"])))


def saved_by_part(model, forward, groups: dict | None = None) -> dict:
    """MiB that `forward()` (a training forward of `model`, returning the loss) leaves saved for its
    backward, by the innermost PARTS module that saved it ("outside" when none: the loss; every part of
    a model without PARTS' modules): each storage counted once, at its full size, parameters' storages
    left out. The backward then runs and frees them. What a step holds at its peak, besides the
    weights, gradients and optimizer state, is about this (plus the backward's own transients).
    `groups`, when given, is filled with what those storages were: "part | dtype | shape" -> [tensors,
    MiB], the shape being the first saved view of each storage (what says which activation it is)."""
    labels: list = []
    handles = annotate_parts(model, labels)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set = set()
    parts: dict = {}

    def pack(t):
        storage = t.untyped_storage()
        key = (storage.data_ptr(), str(t.device))
        if key not in seen and key[0] not in params:
            seen.add(key)
            label = labels[-1] if labels else "outside"
            parts[label] = parts.get(label, 0.0) + storage.nbytes() / 2**20
            if groups is not None:
                group = groups.setdefault(f"{label} | {str(t.dtype).replace('torch.', '')} | {tuple(t.shape)}", [0, 0.0])
                group[0] += 1
                group[1] += storage.nbytes() / 2**20
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = forward()
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    return dict(sorted(parts.items(), key=lambda kv: -kv[1]))


def profile_one(spec: str, args, dev, budget: float | None = None) -> dict:
    """One model's row; `budget`: hierarchos' compiled blocks under that activation memory budget
    (compile_blocks' memory_budget); every other compile runs at torch's default, 1.0."""
    import torch._dynamo
    import torch._functorch.config

    torch._dynamo.reset()  # a fresh compile per row: the budget is read when a region compiles
    torch._functorch.config.activation_memory_budget = 1.0
    set_recompute_states(False)  # (compile_blocks turns it on for a budget below 1)
    torch.manual_seed(0)
    model = make_model(spec, args.size, args.seq_len).to(dev).train()
    fwd = model
    if args.compile:
        if isinstance(model, HierarchosLM):
            compile_blocks(model, memory_budget=budget)
        else:
            fwd = torch.compile(model)
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if dev.type == "cuda" else contextlib.nullcontext
    V = SIZES[args.size]["vocab_size"]
    x = torch.randint(0, V, (args.batch, args.seq_len + 1), generator=torch.Generator().manual_seed(0)).to(dev)

    def forward():
        with amp():
            return loss_fn(fwd, x[:, :-1], x[:, 1:])[0]

    def step():
        forward().backward()
        model.zero_grad(set_to_none=True)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    t0 = time.perf_counter()
    step(), sync()
    first_ms = (time.perf_counter() - t0) * 1e3
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step(), sync()
        times.append(time.perf_counter() - t0)
    step_ms = statistics.median(times) * 1e3

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        sync()
    n = args.steps
    parts = None
    if isinstance(model, HierarchosLM):  # a second profile with the part ranges (hooks add host work)
        handles = annotate_parts(model)
        with profile(activities=activities) as parts_prof:
            for _ in range(args.steps):
                step()
            sync()
        for h in handles:
            h.remove()
        parts = part_times(parts_prof.events(), n, dev.type == "cuda")
    saved = None
    if args.memory:  # after the timed steps: every compile is done, so only the step's tensors are saved
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        try:  # (saved-tensor hooks around compiled regions are newer ground: a failure is reported, not fatal)
            groups: dict = {}
            saved = dict(by_part=saved_by_part(model if fwd is model else fwd, forward, groups))
            saved["total"] = sum(saved["by_part"].values())
            saved["largest"] = dict(sorted(groups.items(), key=lambda kv: -kv[1][1])[:args.rows])
            if dev.type == "cuda":
                saved["step_peak"] = torch.cuda.max_memory_allocated(dev) / 2**20
        except Exception as exc:  # noqa: BLE001
            saved = dict(error=f"{type(exc).__name__}: {exc}"[:300])
        model.zero_grad(set_to_none=True)
    kinds: dict[str, dict] = {}
    by_kernel: dict[str, list] = {}  # kernel name -> [launches a step, ms a step]
    launches = 0
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            k = kinds.setdefault(kind_of(ev.name), dict(ms=0.0, kernels=0, top={}))
            us = ev.time_range.elapsed_us()  # the kernel's own duration on the device
            k["ms"] += us / 1e3 / n
            k["kernels"] += 1
            k["top"][ev.name[:90]] = k["top"].get(ev.name[:90], 0.0) + us / 1e3 / n
            entry = by_kernel.setdefault(ev.name[:120], [0.0, 0.0])
            entry[0] += 1 / n
            entry[1] += us / 1e3 / n
        elif ev.name in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC"):
            launches += 1
    busy = sum(k["ms"] for k in kinds.values())
    for k in kinds.values():
        k["kernels"] = k["kernels"] / n
        k["top"] = dict(sorted(k["top"].items(), key=lambda kv: -kv[1])[:3])
    ops = sorted((e for e in prof.key_averages() if e.key.startswith("aten::")),
                 key=lambda e: -(getattr(e, "self_device_time_total", 0) or getattr(e, "self_cpu_time_total", 0)))
    top_ops = [dict(op=e.key, calls=e.count / n,
                    device_ms=getattr(e, "self_device_time_total", 0) / 1e3 / n,
                    cpu_ms=e.self_cpu_time_total / 1e3 / n) for e in ops[:args.rows]]
    label = spec if budget is None else f"{spec}@{budget:g}"
    result = dict(model=label, activation_budget=budget, compile=args.compile, T=args.seq_len, batch=args.batch,
                  step_ms=step_ms,
                  first_step_ms=first_ms, tokens_per_s=args.batch * args.seq_len / (step_ms / 1e3),
                  device_busy_ms=busy, busy_fraction=busy / step_ms if step_ms else None,
                  launches_per_step=launches / n, kinds=kinds, top_ops=top_ops, parts=parts, saved_mib=saved,
                  top_kernels=dict(sorted(by_kernel.items(), key=lambda kv: -kv[1][1])[:args.kernels]),
                  params=getattr(model, "fitted", None) or dict(params=sum(p.numel() for p in model.parameters())))
    del model, fwd
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return result


def print_result(r: dict) -> None:
    print(f"\n{r['model']}{' (compiled)' if r['compile'] else ''} T={r['T']} B={r['batch']}: "
          f"{r['step_ms']:.1f} ms/step ({r['tokens_per_s']:,.0f} tok/s), device busy {r['device_busy_ms']:.1f} ms "
          f"({100 * (r['busy_fraction'] or 0):.0f}%), {r['launches_per_step']:.0f} launches/step, "
          f"first step {r['first_step_ms']:.0f} ms")
    if r["kinds"]:
        print(f"  {'kind':<16} {'ms/step':>9} {'share':>6} {'kernels':>8}  largest")
        for kind, k in sorted(r["kinds"].items(), key=lambda kv: -kv[1]["ms"]):
            top = next(iter(k["top"]), "")
            print(f"  {kind:<16} {k['ms']:9.2f} {100 * k['ms'] / r['device_busy_ms']:5.1f}% {k['kernels']:8.0f}  {top}")
    if r.get("parts"):
        total = sum(p["forward"] + p["backward"] for p in r["parts"].values())
        print(f"  {'part':<20} {'forward ms':>10} {'backward ms':>11} {'share':>6}")
        for label, p in r["parts"].items():
            both = p["forward"] + p["backward"]
            print(f"  {label:<20} {p['forward']:10.2f} {p['backward']:11.2f} {100 * both / total if total else 0:5.1f}%")
    if (r.get("saved_mib") or {}).get("error"):
        print(f"  saved for the backward: not measured ({r['saved_mib']['error']})")
    elif r.get("saved_mib"):
        m = r["saved_mib"]
        peak = f", the step's peak {m['step_peak']:,.0f} MiB allocated" if "step_peak" in m else ""
        print(f"  saved for the backward: {m['total']:,.0f} MiB{peak}")
        for label, mib in m["by_part"].items():
            print(f"    {label:<20} {mib:10,.1f} MiB")
        if m.get("largest"):
            print("  the largest groups of saved storages (part | dtype | shape: tensors, MiB)")
            for group, (count, mib) in m["largest"].items():
                print(f"    {group:<60} {count:5d} {mib:10,.1f}")
    if r.get("top_kernels"):
        print(f"  {'kernel (the largest by device time)':<100} {'launches':>8} {'ms':>7}")
        for name, (count, ms) in r["top_kernels"].items():
            print(f"  {name[:100]:<100} {count:8.0f} {ms:7.3f}")
    print(f"  {'aten operator':<40} {'calls':>7} {'device ms':>10} {'cpu ms':>8}")
    for o in r["top_ops"]:
        print(f"  {o['op']:<40} {o['calls']:7.0f} {o['device_ms']:10.2f} {o['cpu_ms']:8.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=SIZES, default="125m")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--models", nargs="+", default=["hierarchos:minimal", "gpt2"])
    ap.add_argument("--compile", action="store_true", help="compile hierarchos' RWKV blocks / the whole GPT-2")
    ap.add_argument("--activation-budget", type=float, nargs="+", default=[None], metavar="F",
                    help="with --compile: one hierarchos row per budget, its compiled blocks keeping about that "
                         "fraction of their saved activations (train's --activation-budget)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--kernels", type=int, default=0, metavar="N",
                    help="also list the N largest device kernels by time a step (name, launches, ms)")
    ap.add_argument("--memory", action="store_true",
                    help="also the MiB one forward saves for its backward, by part, and (CUDA) the step's peak")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    print(f"profile_forward: {' '.join(sys.argv[1:])}\nmachine: {json.dumps(machine_info(dev))}")
    results = []
    if args.activation_budget != [None] and not args.compile:
        ap.error("--activation-budget applies to compiled blocks: add --compile")
    for spec in args.models:
        for budget in args.activation_budget if spec.startswith("hierarchos") else [None]:
            results.append(profile_one(spec, args, dev, budget))
            print_result(results[-1])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=machine_info(dev), args=vars(args), results=results), f, indent=2)


if __name__ == "__main__":
    main()
