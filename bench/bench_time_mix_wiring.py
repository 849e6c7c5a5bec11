"""The RWKV-7 time-mix wiring on a small associative-recall task (issue 19, item 3): ours vs x070.

Task (multi-query associative recall, as in Zoology's MQAR): each sequence lists P key-value pairs
(`k1 v1 k2 v2 ...`, keys distinct, from KEYS key tokens and VALUES value tokens), then the P keys
again in a fresh random order, each followed by a slot whose target is the value paired with that
key earlier; loss and accuracy count only those value slots. Model: token embedding -> RWKVStack
(the project's RWKV-7 blocks, DeepEmbed off) -> LayerNorm -> linear head; the time mix wired by one
of the rows below (each x070 difference alone, and all of them). AdamW, constant LR, fresh random
batches every step (no repeats), accuracy on a fixed held-out set of EVAL sequences at the listed
steps. Also the parameter counts of every wiring at width 768 (one time mix, a layer after the
first, and the default 768-wide HierarchosLM).

CPU:  python bench/bench_time_mix_wiring.py --json bench/results/time_mix_wiring.json
(defaults: 2 layers, width 64, head 16, 400 steps, seeds 0 1 2, accuracy at steps 200 and 400)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from hierarchos.config import TIME_MIX_WIRINGS, ModelConfig  # noqa: E402
from hierarchos.io import atomic_write_text  # noqa: E402
from hierarchos.model import HierarchosLM  # noqa: E402
from hierarchos.model.rwkv import RWKVStack, TimeMix, TimeMixWiring  # noqa: E402

# the ablation's rows: hierarchos' own wiring, each x070 difference alone, and the whole x070 wiring
# (the default since the quality benchmark's wiring table); each row names all four fields
OURS = TIME_MIX_WIRINGS["hierarchos"]
VARIANTS = {
    "hierarchos": OURS,
    "+static_shift": dict(OURS, tm_token_shift="static"),
    "+lowrank_gate": dict(OURS, tm_gate="lowrank"),
    "+value_residual": dict(OURS, tm_value_residual=True),
    "+x070_init": dict(OURS, tm_init="x070"),
    "x070": TIME_MIX_WIRINGS["x070"],
}


def wiring_of(fields: dict) -> TimeMixWiring:
    return TimeMixWiring.from_config(ModelConfig(**fields))


def recall_batch(batch: int, pairs: int, keys: int, values: int, gen: torch.Generator):
    """(tokens (B, 4P), targets (B, 4P) with -100 outside the query value slots). Token ids: keys
    0..keys-1, values keys..keys+values-1; the slot after a query key holds its value (teacher
    forcing, as MQAR's query-then-answer layout)."""
    key_ids = torch.stack([torch.randperm(keys, generator=gen)[:pairs] for _ in range(batch)])      # (B, P)
    value_ids = keys + torch.randint(0, values, (batch, pairs), generator=gen)                         # (B, P)
    order = torch.stack([torch.randperm(pairs, generator=gen) for _ in range(batch)])                 # (B, P)
    query_keys, query_values = key_ids.gather(1, order), value_ids.gather(1, order)
    context = torch.stack([key_ids, value_ids], dim=2).flatten(1)                                      # k v k v ...
    queries = torch.stack([query_keys, query_values], dim=2).flatten(1)
    tokens = torch.cat([context, queries], dim=1)
    targets = torch.full_like(tokens, -100)
    # the model at a query key predicts the next token: its value
    targets[:, 2 * pairs::2] = query_values
    return tokens, targets


class RecallModel(nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int, head_size: int, wiring: TimeMixWiring):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.stack = RWKVStack(dim, layers, head_size, 4, vocab, use_deepembed=False, per_block_deepembed=False,
                               wkv_chunk=16, wiring=wiring)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        y, _ = self.stack(x, tokens, self.stack.init_state(tokens.shape[0]))
        return self.head(self.norm(y))


def accuracy(model, tokens, targets) -> float:
    with torch.no_grad():
        pred = model(tokens).argmax(-1)
    mask = targets != -100
    return (pred[mask] == targets[mask]).float().mean().item()


def run_one(fields: dict, seed: int, args) -> dict:
    vocab = args.keys + args.values
    torch.manual_seed(seed)  # the same seed gives every wiring the same data and the same embedding/head
    model = RecallModel(vocab, args.width, args.layers, args.head_size, wiring_of(fields))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    data = torch.Generator().manual_seed(seed)
    eval_tokens, eval_targets = recall_batch(args.eval, args.pairs, args.keys, args.values,
                                             torch.Generator().manual_seed(10_000 + seed))
    acc, losses, start = {}, [], time.perf_counter()
    for step in range(1, args.steps + 1):
        tokens, targets = recall_batch(args.batch, args.pairs, args.keys, args.values, data)
        loss = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step in args.at:
            acc[step] = accuracy(model.eval(), eval_tokens, eval_targets)
            model.train()
    return dict(acc=acc, final_loss=statistics.fmean(losses[-20:]), seconds=time.perf_counter() - start,
                params=sum(p.numel() for p in model.stack.parameters()))


def parameter_counts(width: int = 768) -> dict:
    """Per wiring: one time mix (a layer after the first; the first has no value-residual path) and
    the default 768-wide model (ModelConfig() widths, GPT-2's vocabulary, embedding counted once)."""
    out = {}
    for name, fields in VARIANTS.items():
        tm = TimeMix(width, 64, 1, 12, 32, wiring_of(fields))
        with torch.device("meta"):  # shapes only: the 768-wide model is not materialised
            model = HierarchosLM(ModelConfig(**fields))
        out[name] = dict(time_mix=sum(p.numel() for p in tm.parameters()), model=model.num_parameters())
    base = out["hierarchos"]["time_mix"]
    for row in out.values():
        row["ours_over_this"] = round(base / row["time_mix"], 4)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--head-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--at", type=int, nargs="+", default=[200, 400], help="steps at which accuracy is measured")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--pairs", type=int, default=8, help="key-value pairs per sequence (sequence = 4 x pairs)")
    p.add_argument("--keys", type=int, default=64)
    p.add_argument("--values", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--eval", type=int, default=512, help="held-out sequences")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write the results here (atomically)")
    args = p.parse_args(argv)
    args.at = sorted(set(s for s in args.at if s <= args.steps))
    torch.set_num_threads(args.threads)

    counts = parameter_counts()
    print("parameters at width 768 (time mix of a layer after the first; whole default model):")
    for name, row in counts.items():
        print(f"  {name:16s} time mix {row['time_mix']:>9,}  model {row['model']:>12,}  "
              f"ours/this {row['ours_over_this']:.3f}")

    results = {}
    for name in args.variants:
        runs = {}
        for seed in args.seeds:
            runs[seed] = run_one(VARIANTS[name], seed, args)
            accs = " ".join(f"@{s}={runs[seed]['acc'][s]:.3f}" for s in args.at)
            print(f"  {name:16s} seed {seed}: {accs}  loss {runs[seed]['final_loss']:.3f}  "
                  f"{runs[seed]['seconds']:.0f}s", flush=True)
        results[name] = runs

    print(f"\nassociative recall: {args.layers} layers, width {args.width}, {args.pairs} pairs, {args.steps} steps, "
          f"seeds {args.seeds}; accuracy on {args.eval} held-out sequences (mean [min, max])")
    header = f"{'wiring':16s} {'stack params':>12s} " + " ".join(f"{'acc@' + str(s):>22s}" for s in args.at)
    print(header)
    summary = {}
    for name, runs in results.items():
        row = {}
        cells = []
        for s in args.at:
            vals = [r["acc"][s] for r in runs.values()]
            row[s] = dict(mean=statistics.fmean(vals), min=min(vals), max=max(vals))
            cells.append(f"{row[s]['mean']:.3f} [{row[s]['min']:.2f}, {row[s]['max']:.2f}]".rjust(22))
        summary[name] = row
        params = next(iter(runs.values()))["params"]
        print(f"{name:16s} {params:>12,} " + " ".join(cells))
    if args.json:
        payload = dict(task=vars(args) | {"kind": "multi-query associative recall"}, parameter_counts_768=counts,
                       runs={n: {str(s): r for s, r in runs.items()} for n, runs in results.items()},
                       summary=summary, machine=dict(platform=platform.platform(), torch=torch.__version__,
                                                     threads=args.threads, loadavg=os.getloadavg()))
        atomic_write_text(args.json, json.dumps(payload, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
