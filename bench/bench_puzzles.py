"""Sudoku (and maze) benchmark (issue 21): hierarchos (RWKV-7 blocks, and attention blocks) against a plain
non-causal Transformer encoder of the same parameter count, trained the same way on the same puzzles.

Every model is trained by hierarchos.train.puzzle_trainer with one configuration: the same training
puzzles (1,000 by default) with on-the-fly augmentation, the same batches in the same order, the
same steps, segments (deep supervision, one update per segment), Q-learning halting, per-puzzle
embeddings (sign-SGD rows) and optimizer. The baseline is a plain `nn.TransformerEncoder` (every
cell sees every cell in one pass; learned positions; no state carried between segments, so its
segments repeat one forward: the same number of updates, no extra thinking). Its width is chosen
so its parameter count (without the per-puzzle table) matches hierarchos's.

Reported per model: parameters, training time, exact-puzzle accuracy on unseen test puzzles
(1,000+ hard 9x9 by default), blank-cell accuracy, mean thinking segments, Spearman correlation of
segments with the solver's difficulty, exact accuracy after k segments, and exact accuracy and
mean segments per difficulty quartile. Prints a table; writes JSON (atomically).

    python bench/bench_puzzles.py --device cuda --out bench/results/puzzles.json        # the device run
    python bench/bench_puzzles.py --device cpu --tiny                                  # 4x4 smoke run

`--task maze` runs the same comparison on mazes (30x30 by default, 6x6 with --tiny; `--size N`), or
the task is the one of `--data`; maze results add open-cell, path-cell and valid-shortest-path accuracy.

`--time-steps N` times the trainer's step instead (issue 21's blocker): per model, the reference loop
(`--no-fast-step`), the fast step run eagerly and, on CUDA, the fast step replayed as CUDA graphs,
each on its own copy of the model and the same batches, N steps per round, the variants in
alternation for `--rounds` rounds (best and median reported: the machine may be shared). Also per
step: host reads, operators dispatched and those outside the captured segment function, and how
far each variant's weights ended from the reference's (every variant runs the same steps with the
same random draws: 0 on the CPU). Without `--data` the batches are valid grids that need no
generator (the step's cost depends on shapes, not on how hard a puzzle is).

    python bench/bench_puzzles.py --device cpu --tiny --time-steps 5 --rounds 5 --models hierarchos-rwkv7
    python bench/bench_puzzles.py --device cuda --time-steps 10 --rounds 3 --models hierarchos-rwkv7

`--compile` runs hierarchos' RWKV blocks through torch.compile (`compile_blocks`, as `puzzle train
--compile` does): with `--time-steps` as one more variant (the fast step, with its graphs on CUDA,
on compiled blocks), in a training run for every model that has RWKV blocks (the calibration too).
`--compile-backend aot_eager` traces without generating code (the CPU tests).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hierarchos.config import tiny_config  # noqa: E402
from hierarchos.model.losses import LossWeights  # noqa: E402
from hierarchos.model.puzzle import (PuzzleConfig, PuzzleOutput, PuzzleSolver, default_puzzle_base,  # noqa: E402
                                     puzzle_model_config)
from hierarchos.model.puzzle_embedding import PuzzleEmbedding  # noqa: E402
from hierarchos.model.rwkv import compile_blocks  # noqa: E402
from hierarchos.train.puzzle_trainer import PuzzleTrainConfig, PuzzleTrainer, evaluate_puzzles  # noqa: E402


class TransformerPuzzleBaseline(nn.Module):
    """A plain non-causal Transformer encoder over [PUZZLE] + cells: token + learned position embeddings,
    `nn.TransformerEncoder` (pre-norm, GELU), a digit head per cell and a Q head on the PUZZLE
    position (it sees the whole grid, as seed 003's Q head reads position 0). Segments carry nothing."""

    def __init__(self, puzzle: PuzzleConfig, d_model: int, layers: int, heads: int):
        super().__init__()
        self.puzzle_cfg = puzzle
        self.embed = nn.Embedding(puzzle.vocab_size, d_model)
        self.pos_embed = nn.Parameter(torch.randn(puzzle.seq_len, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, puzzle.num_answers)
        self.q_head = nn.Linear(d_model, 2)
        with torch.no_grad():
            self.q_head.weight.zero_()
            self.q_head.bias.fill_(-5.0)
        self.puzzle_embedding = PuzzleEmbedding(puzzle.num_puzzle_ids, d_model) if puzzle.num_puzzle_ids else None

    def init_state(self, batch_size, device=None, dtype=None):
        return torch.zeros(batch_size, 0, device=device)  # nothing is carried

    def forward(self, inputs, puzzle_ids, state):
        tokens = torch.cat([torch.full_like(inputs[:, :1], self.puzzle_cfg.puzzle_token), inputs], 1).long()
        x = self.embed(tokens) + self.pos_embed
        if self.puzzle_embedding is not None:
            x = torch.cat([x[:, :1] + self.puzzle_embedding(puzzle_ids)[:, None], x[:, 1:]], 1)
        h = self.norm(self.encoder(x))
        q = self.q_head(h[:, 0]).float()
        return PuzzleOutput(logits=self.head(h[:, 1:]), q_halt=q[:, 0], q_continue=q[:, 1], state=state)


def core_parameters(model: nn.Module) -> int:
    """Parameters without the per-puzzle table (its size depends on the data, not the model)."""
    table = model.puzzle_embedding.table.weight if getattr(model, "puzzle_embedding", None) is not None else None
    seen, total = set(), 0
    for p in model.parameters():
        if p is table or id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def matched_baseline(puzzle: PuzzleConfig, target: int, layers: int, heads: int) -> TransformerPuzzleBaseline:
    """The baseline whose width (a multiple of 2*heads) gives the parameter count closest to `target`."""
    def count(d: int) -> int:
        return core_parameters(TransformerPuzzleBaseline(PuzzleConfig(**{**puzzle.to_dict(), "num_puzzle_ids": 0}),
                                                         d, layers, heads))

    step = 2 * heads
    low, high = step, step * 512
    while high - low > step:  # the count grows with the width: bisect on multiples of `step`
        mid = (low + high) // (2 * step) * step
        low, high = (mid, high) if count(mid) < target else (low, mid)
    width = min((low, high), key=lambda d: abs(count(d) - target))
    return TransformerPuzzleBaseline(puzzle, width, layers, heads)


def build_models(args, puzzle: PuzzleConfig) -> dict[str, nn.Module]:
    base = tiny_config(use_rosa=False) if args.tiny else default_puzzle_base()
    if args.hidden_size:
        base = base.replace(context_dim=args.hidden_size, h_hidden=args.hidden_size, l_hidden=args.hidden_size)
    models = {}
    for name in args.models:
        torch.manual_seed(args.seed)
        if name == "hierarchos-rwkv7":
            models[name] = PuzzleSolver(puzzle_model_config(puzzle, base), puzzle)
        elif name == "hierarchos-attention":
            cfg = base.replace(h_block="attention", l_block="attention")
            models[name] = PuzzleSolver(puzzle_model_config(puzzle, cfg), puzzle)
    if "transformer" in args.models:
        reference = next((m for m in models.values()), None)
        target = core_parameters(reference) if reference is not None else core_parameters(
            PuzzleSolver(puzzle_model_config(puzzle, base), puzzle))
        torch.manual_seed(args.seed)
        models["transformer"] = matched_baseline(puzzle, target, args.baseline_layers, args.baseline_heads)
    return models


def quartile_table(difficulty: np.ndarray, segments: np.ndarray, solved: np.ndarray) -> list[dict]:
    """Exact accuracy and mean segments per difficulty quartile (fewer bins when values repeat)."""
    edges = np.unique(np.quantile(difficulty, [0, 0.25, 0.5, 0.75, 1.0]))
    if len(edges) < 2:
        return [{"difficulty": [float(difficulty.min()), float(difficulty.max())], "puzzles": int(len(difficulty)),
                 "exact": float(solved.mean()), "mean_segments": float(segments.mean())}]
    rows = []
    for i in range(len(edges) - 1):
        last = i == len(edges) - 2
        mask = (difficulty >= edges[i]) & ((difficulty <= edges[i + 1]) if last else (difficulty < edges[i + 1]))
        if mask.any():
            rows.append({"difficulty": [float(edges[i]), float(edges[i + 1])], "puzzles": int(mask.sum()),
                         "exact": float(solved[mask].mean()), "mean_segments": float(segments[mask].mean())})
    return rows


def load_or_generate(args):
    from hierarchos.puzzles.dataset import load_puzzles

    if args.data:
        data = Path(args.data)
        return load_puzzles(data / "train.safetensors"), load_puzzles(data / "test.safetensors")
    if args.task == "maze":
        from hierarchos.puzzles.maze import make_splits as maze_splits

        size = args.size or (6 if args.tiny else 30)
        print(f"generating {args.train_puzzles} train + {args.test_puzzles} test {size}x{size} mazes (seed "
              f"{args.seed})...", flush=True)
        return maze_splits(args.train_puzzles, args.test_puzzles, size=size, seed=args.seed)
    from hierarchos.puzzles.sudoku import make_splits

    size = args.size or (4 if args.tiny else 9)
    print(f"generating {args.train_puzzles} train + {args.test_puzzles} test {size}x{size} puzzles (seed {args.seed}, "
          f"{args.workers} workers)...", flush=True)
    return make_splits(args.train_puzzles, args.test_puzzles, size=size, seed=args.seed, workers=args.workers)


def train_config(args, steps: int, train_puzzles: int) -> PuzzleTrainConfig:
    return PuzzleTrainConfig(epochs=max(1, math.ceil(steps * args.batch_size / train_puzzles)),
                             batch_size=args.batch_size, starting_lr=args.lr, min_lr=args.lr / 10,
                             max_steps=steps, augment=args.augment, log_every=max(1, steps // 10),
                             seed=args.seed, loss=LossWeights())


def seconds_per_step(model: nn.Module, train_set, args, device) -> dict:
    """Seconds per training step of `model`'s configuration on this device: a copy trained for 2 and
    then 12 steps (the first steps carry the lazy initialisation and compilation); the difference / 10.
    The model itself is not touched."""
    import copy

    def timed(steps: int) -> float:
        trial = copy.deepcopy(model)
        if args.compile:
            compile_blocks(trial, backend=args.compile_backend)
        trainer = PuzzleTrainer(trial, train_set, train_config(args, steps, len(train_set.inputs)), device,
                                log=lambda line: None)
        trainer.log_metrics = lambda record: None
        t0 = time.perf_counter()
        trainer.run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    short, long = timed(2), timed(12)
    return {"seconds_per_step": max((long - short) / 10, 1e-6), "short_s": short, "long_s": long,
            "wall_s": time.perf_counter() - t0}


def timing_puzzles(size: int, count: int, seed: int):
    """`count` valid size x size Sudoku (a base grid and the generator's symmetries, half the cells
    blank; ids 1..count): batches of the right shapes for timing, with no solver search."""
    from hierarchos.puzzles.dataset import PuzzleSet
    from hierarchos.puzzles.sudoku import augment

    box = int(round(size ** 0.5))
    base = np.array([(r * box + r // box + c) % size + 1 for r in range(size) for c in range(size)], dtype=np.uint8)
    rng = np.random.default_rng(seed)
    blank = rng.random((count, size * size)) < 0.5
    inputs, solutions = augment(np.where(blank, 0, base).astype(np.uint8), np.tile(base, (count, 1)), rng)
    return PuzzleSet(inputs, solutions, np.arange(1, count + 1, dtype=np.int32), np.zeros(count, np.float32),
                     {"task": "sudoku", "size": size, "split": "train", "seed": seed, "format_version": 1})


HOST_READS = {"__bool__", "__float__", "__int__", "__index__", "item", "tolist", "nonzero", "coalesce", "numpy"}


def count_step(trainer, steps) -> dict:
    """One more step of `trainer`, counted: host reads (tensor methods that bring a value back: a
    synchronisation on a GPU), operators dispatched (about one kernel launch each on a GPU;
    count_ops.py's rule for views), and of those the ones dispatched outside the fast step's
    segment function (`SegmentRunner._run`), which a CUDA graph replay does not replace."""
    import collections

    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from count_ops import VIEWS

    where = {"inside": False}
    tally = collections.Counter()

    class Reads(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in HOST_READS:
                tally["host_reads_per_step"] += 1
            return func(*args, **(kwargs or {}))

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] not in VIEWS:
                tally["ops_per_step"] += 1
                tally["ops_outside_segment_fn"] += not where["inside"]
            return func(*args, **(kwargs or {}))

    runner = trainer.segments
    if runner is not None:
        def inside(*args, **kwargs):
            where["inside"] = True
            try:
                return run(*args, **kwargs)
            finally:
                where["inside"] = False
        run, runner._run = runner._run, inside
    try:
        with Reads(), Ops():
            steps(trainer, 1)
    finally:
        if runner is not None:
            del runner._run  # back to the method
    return {key: tally[key] for key in ("host_reads_per_step", "ops_per_step", "ops_outside_segment_fn")}


def time_steps(args, models: dict, train_set, device) -> dict:
    """ms per training step of each model under the reference loop, the fast step and (CUDA) its
    graphs; see the module docstring."""
    import copy
    import statistics

    from hierarchos.train.puzzle_trainer import PuzzleTrainer

    variants = {"reference": dict(fast_step=False), "fast": dict(cuda_graphs=False)}
    if device.type == "cuda":
        variants["fast+graphs"] = dict(cuda_graphs=True)
    if args.compile:  # the fastest step above, on compiled blocks
        fastest = list(variants)[-1]
        variants[fastest + "+compile"] = dict(variants[fastest])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    results = {}
    for name, model in models.items():
        model.to(device)
        trainers = {}
        for variant, extra in variants.items():
            cfg = PuzzleTrainConfig(epochs=10**6, batch_size=args.batch_size, starting_lr=args.lr,
                                    min_lr=args.lr / 10, augment=args.augment, seed=args.seed, **extra)
            copied = copy.deepcopy(model)
            if variant.endswith("+compile"):
                compile_blocks(copied, backend=args.compile_backend)
            trainers[variant] = PuzzleTrainer(copied, train_set, cfg, device, log=lambda line: None)

        def steps(trainer, count):
            updates = trainer.updates
            for _ in range(count):
                inputs, solutions, ids, _ = trainer.batch(trainer.step)
                trainer._set_lr()
                torch.manual_seed(args.seed * 1_000_003 + trainer.step)  # every variant: the same draws
                trainer.train_batch(inputs, solutions, ids)
                trainer.step += 1
            return trainer.updates - updates

        times = {variant: [] for variant in variants}
        segments = {variant: 0 for variant in variants}
        reserved = {}
        for variant, trainer in trainers.items():  # lazy initialisation, captures: one batch of each shape
            before = torch.cuda.memory_reserved(device) if device.type == "cuda" else 0
            last = trainer.batches_per_epoch - 1
            for index in sorted({0, last} if len(trainer.batch_rows(last)[0]) < args.batch_size else {0}):
                trainer.step = index
                steps(trainer, 1)
            trainer.step = 1
            if device.type == "cuda":  # what the warm-up kept: optimizer state, caches, the graphs' pools
                reserved[variant] = (torch.cuda.memory_reserved(device) - before) / 2**30
        sync()
        for round_index in range(args.rounds):
            order = list(variants) if round_index % 2 == 0 else list(reversed(variants))
            for variant in order:
                t0 = time.perf_counter()
                segments[variant] += steps(trainers[variant], args.time_steps)
                sync()
                times[variant].append((time.perf_counter() - t0) / args.time_steps * 1000)
        counts = {variant: count_step(trainer, steps) for variant, trainer in trainers.items()}
        # the same steps, batches and draws: how far each variant's weights are from the reference's
        # (0 on the CPU, where the fast step is bit for bit the reference; a GPU's atomics may differ)
        reference = list(trainers["reference"].model.parameters())
        for variant, trainer in trainers.items():
            counts[variant]["max_abs_weight_diff"] = max(
                float((p.detach().double() - q.detach().double()).abs().max())
                for p, q in zip(trainer.model.parameters(), reference))
        rows = {}
        for variant in variants:
            seg = segments[variant] / (args.rounds * args.time_steps)
            rows[variant] = {"ms_per_step_best": min(times[variant]),
                             "ms_per_step_median": statistics.median(times[variant]),
                             "ms_per_step_rounds": times[variant], "segments_per_step": seg,
                             "ms_per_segment_best": min(times[variant]) / max(seg, 1e-9),
                             **counts[variant], "warmup_reserved_gib": reserved.get(variant)}
        runner = trainers.get("fast+graphs")
        if runner is not None and runner.segments is not None:
            rows["fast+graphs"].update(replays=runner.segments.replays, eager_segments=runner.segments.eager_segments)
        results[name] = {"parameters": core_parameters(model), "variants": rows}
        model.cpu()
    return results


def print_timing(results: dict, args, device) -> None:
    header = (f"{'model':<22}{'step':<14}{'ms/step best':>14}{'median':>10}{'segments':>10}{'ms/segment':>12}"
              f"{'host reads':>12}{'ops':>9}{'ops outside':>13}{'speedup':>9}{'max |dw|':>10}")
    print(f"\n{args.time_steps} steps x {args.rounds} rounds per variant, batch {args.batch_size}, up to "
          f"{args.max_segments} segments, device {device}\n" + header + "\n" + "-" * len(header))
    for name, r in results.items():
        ref = r["variants"]["reference"]["ms_per_step_best"]
        for variant, row in r["variants"].items():
            print(f"{name:<22}{variant:<14}{row['ms_per_step_best']:>14.1f}{row['ms_per_step_median']:>10.1f}"
                  f"{row['segments_per_step']:>10.2f}{row['ms_per_segment_best']:>12.1f}"
                  f"{row['host_reads_per_step']:>12}"
                  f"{row['ops_per_step']:>9}{row['ops_outside_segment_fn']:>13}{ref / row['ms_per_step_best']:>8.2f}x"
                  f"{row['max_abs_weight_diff']:>10.1e}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="puzzle directory with train/test.safetensors (default: generate)")
    p.add_argument("--tiny", action="store_true", help="4x4 puzzles (6x6 mazes), tiny models, a few steps (CPU smoke)")
    p.add_argument("--task", choices=["sudoku", "maze"], default="sudoku",
                   help="puzzles to generate (with --data: the file's task)")
    p.add_argument("--size", type=int, default=None, help="grid side to generate (default 9, mazes 30; tiny 4 / 6)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", default=["hierarchos-rwkv7", "hierarchos-attention", "transformer"],
                   choices=["hierarchos-rwkv7", "hierarchos-attention", "transformer"])
    p.add_argument("--train-puzzles", type=int, default=None, help="default 1000 (tiny: 300)")
    p.add_argument("--test-puzzles", type=int, default=None, help="default 1000 (tiny: 200)")
    p.add_argument("--workers", type=int, default=8, help="generator processes")
    p.add_argument("--steps", type=int, default=None, help="training steps per model (default 6000; tiny: 30)")
    p.add_argument("--batch-size", type=int, default=None, help="default 128 (tiny: 32)")
    p.add_argument("--max-segments", type=int, default=None, help="default 8 (tiny: 2)")
    p.add_argument("--lr", type=float, default=None, help="default 3e-4 (tiny: 1e-3)")
    p.add_argument("--hidden-size", type=int, default=None, help="hierarchos width (default: puzzle train's)")
    p.add_argument("--baseline-layers", type=int, default=None, help="default 8 (tiny: 2)")
    p.add_argument("--baseline-heads", type=int, default=None, help="default 8 (tiny: 2)")
    p.add_argument("--no-augment", dest="augment", action="store_false")
    p.add_argument("--no-puzzle-emb", dest="puzzle_emb", action="store_false")
    p.add_argument("--eval-limit", type=int, default=None)
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop a model's training after this many minutes (a safety net for a device budget; the "
                        "schedule still spans --steps, so a cut run ends at a higher rate); reported per model")
    p.add_argument("--minutes", type=float, default=None,
                   help="set --steps so that the FIRST of --models trains for this many minutes (a calibration run of a "
                        "copy, 2 and 12 steps, the difference timed, gives its seconds per step); every model then "
                        "trains those steps on the same batches, and the schedule spans them, so the learning rate "
                        "decays fully (the calibration is reported)")
    p.add_argument("--time-steps", type=int, default=None, metavar="N",
                   help="time the training step instead (N steps per round and variant; see the docstring)")
    p.add_argument("--rounds", type=int, default=3, help="--time-steps rounds (the variants alternate)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile hierarchos' RWKV blocks (a --time-steps variant; a training run's models)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend for --compile")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/puzzles[-tiny].json)")
    args = p.parse_args(argv)
    tiny = args.tiny
    defaults = dict(train_puzzles=(300, 1000), test_puzzles=(200, 1000), steps=(30, 6000), batch_size=(32, 128),
                    max_segments=(2, 8), lr=(1e-3, 3e-4), baseline_layers=(2, 8), baseline_heads=(2, 8))
    for name, (small, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if tiny else full)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    stem = "puzzles" if args.task == "sudoku" or args.data else "puzzles-maze"
    if args.time_steps:
        stem += "-time"
    out_path = Path(args.out or f"bench/results/{stem}{'-tiny' if tiny else ''}.json")
    if args.time_steps:
        from hierarchos.io import atomic_write_text
        from hierarchos.puzzles.dataset import load_puzzles

        size = args.size or (4 if tiny else 9)
        train_set = (load_puzzles(Path(args.data) / "train.safetensors") if args.data
                     else timing_puzzles(size, 2 * args.batch_size, args.seed))
        size = train_set.size
        puzzle = PuzzleConfig(size=size, num_puzzle_ids=train_set.num_puzzle_ids if args.puzzle_emb else 0,
                              max_segments=args.max_segments, task=train_set.task, num_tokens=train_set.num_tokens)
        results = time_steps(args, build_models(args, puzzle), train_set, device)
        print_timing(results, args, device)
        payload = {"benchmark": "bench_puzzles --time-steps",
                   "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                   "torch": torch.__version__, "threads": torch.get_num_threads(), "args": vars(args), "size": size,
                   "results": results}
        atomic_write_text(out_path, json.dumps(payload, indent=1) + "\n")
        print(f"\nwrote {out_path}")
        return 0

    started = time.perf_counter()
    train_set, test_set = load_or_generate(args)
    generation_s = time.perf_counter() - started
    size, task = train_set.size, train_set.task
    if test_set.task != task or test_set.size != size:
        print(f"error: the test set holds {test_set.size}x{test_set.size} {test_set.task} puzzles, the training set "
              f"{size}x{size} {task}; pass a --data directory of one task and size", file=sys.stderr)
        return 2
    puzzle = PuzzleConfig(size=size, num_puzzle_ids=train_set.num_puzzle_ids if args.puzzle_emb else 0,
                          max_segments=args.max_segments, task=task, num_tokens=train_set.num_tokens)
    models = build_models(args, puzzle)
    length = f"{args.minutes:g} min" if args.minutes else f"{args.steps} steps"
    print(f"{len(train_set.inputs)} train / {len(test_set.inputs)} test {size}x{size} {task} puzzles; test difficulty "
          f"median {np.median(test_set.difficulty):g}, max {test_set.difficulty.max():g}; {length} x batch "
          f"{args.batch_size}, up to {args.max_segments} segments; device {device}", flush=True)
    results = {}
    for name, model in models.items():
        model.to(device)
        calibration = None
        if args.minutes and not results:  # the first model's time sizes the steps every model trains
            calibration = seconds_per_step(model, train_set, args, device)
            args.steps = max(1, int(args.minutes * 60 / calibration["seconds_per_step"]))
            print(f"{name}: {calibration['seconds_per_step'] * 1000:.1f} ms/step (calibration {calibration['wall_s']:.1f} "
                  f"s) -> {args.steps} steps in {args.minutes:g} min, for every model", flush=True)
        steps = args.steps
        cfg = train_config(args, steps, len(train_set.inputs))
        if args.compile:
            compile_blocks(model, backend=args.compile_backend)
        trainer = PuzzleTrainer(model, train_set, cfg, device, log=lambda line: print(line, file=sys.stderr))

        def log_metrics(record, name=name):
            print(f"  {name} step {record['step']}: loss {record['loss']:.3f} cells {record['cell_acc']:.3f} "
                  f"exact {record['exact']:.3f} segments {record['segments']:.2f} "
                  f"({record['puzzles_per_s']:.0f} puzzles/s)", flush=True)

        trainer.log_metrics = log_metrics
        params = core_parameters(model)
        print(f"{name}: {params:,} parameters (without the per-puzzle table)", flush=True)
        t0 = time.perf_counter()
        budget = args.max_minutes * 60 if args.max_minutes else float("inf")
        stopped = trainer.run(stop_requested=lambda: time.perf_counter() - t0 > budget)["stopped"]
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = evaluate_puzzles(model, test_set, device, batch_size=max(256, args.batch_size),
                                  limit=args.eval_limit, all_segments=True)
        eval_s = time.perf_counter() - t0
        n = result["puzzles"]
        segments, solved = np.array(result.pop("segments")), np.array(result.pop("solved"))
        results[name] = {"parameters": params, "train_seconds": train_s, "eval_seconds": eval_s,
                         "planned_steps": steps, "calibration": calibration, "steps": trainer.step, "updates": trainer.updates, "cut_by_max_minutes": stopped, **result,
                         "by_difficulty_quartile": quartile_table(test_set.difficulty[:n], segments, solved)}
        if isinstance(model, PuzzleSolver):
            results[name]["config"] = model.cfg.to_dict()
        else:
            results[name]["config"] = {"d_model": model.embed.embedding_dim, "layers": args.baseline_layers,
                                       "heads": args.baseline_heads}
        model.cpu()

    maze = task == "maze"  # mazes add the valid-shortest-path share
    header = (f"{'model':<22}{'params':>11}{'exact':>8}{'cells':>8}" + (f"{'valid':>8}" if maze else "")
              + f"{'segments':>10}{'rho(seg,diff)':>15}{'steps':>7}{'train s':>9}")
    print("\n" + header + "\n" + "-" * len(header))
    for name, r in results.items():
        rho = r["spearman_segments_difficulty"]
        print(f"{name:<22}{r['parameters']:>11,}{r['exact']:>8.3f}{r['cells']:>8.3f}"
              + (f"{r['valid_path']:>8.3f}" if maze else "") + f"{r['mean_segments']:>10.2f}"
              f"{'n/a' if rho is None else f'{rho:.3f}':>15}{r['steps']:>7}{r['train_seconds']:>9.0f}")
    payload = {"benchmark": "bench_puzzles", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
               "torch": torch.__version__, "args": vars(args), "generation_seconds": generation_s,
               "train_puzzles": len(train_set.inputs), "test_puzzles": len(test_set.inputs), "size": size, "task": task,
               "test_difficulty": {"median": float(np.median(test_set.difficulty)),
                                   "max": float(test_set.difficulty.max())},
               "results": results}
    from hierarchos.io import atomic_write_text

    atomic_write_text(out_path, json.dumps(payload, indent=1) + "\n")
    print(f"\nwrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
