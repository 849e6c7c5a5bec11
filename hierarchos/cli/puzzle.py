"""`puzzle`: reasoning puzzles (Sudoku, mazes) from the command line: `generate`, `train`, `eval`.

A subcommand of its own rather than `train --task sudoku`: its inputs (puzzle files, no tokenizer,
no text sources), its loop (segments with one update each, Q-learning halting per puzzle,
per-puzzle embeddings) and its metrics (exact puzzles, blank cells, thinking segments against
difficulty) share almost none of `train`'s flags, so a mode of `train` would be mostly flags that
do nothing. The architecture flags are `train`'s (same names and aliases) where they apply.
The task (Sudoku or maze), grid size and cell tokens come from the data file; the model records
them, and a model given puzzles of another task or size stops with one line.

    hierarchos puzzle generate --out DATA --train 1000 --test 1000
    hierarchos puzzle train --data DATA --out-dir MODEL
    hierarchos puzzle eval --model-path MODEL --data DATA/test.safetensors
    hierarchos puzzle generate --task maze --size 30 --out MAZES ...   (then train/eval as above)
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from ..errors import HierarchosError

HELP = "reasoning puzzles (Sudoku, mazes): generate puzzle files, train a model on them, evaluate it"

# train's architecture flags that mean something for a puzzle model (no vocabulary, no ROSA)
ARCH = ("context_dim", "h_hidden", "l_hidden", "h_layers", "l_layers", "head_size", "ffn_mult", "h_cycles",
        "max_h_steps", "max_l_steps", "h_stride", "h_halt_thresh", "l_conv_atol", "grad_steps", "h_block", "l_block",
        "pos_encodings", "window_size", "halting", "q_explore_prob", "time_mix", "persistent_dim", "ltm_slots",
        "ltm_key_dim", "ltm_val_dim", "ltm_topk", "tm_token_shift", "tm_gate", "tm_value_residual", "tm_init")
TRAIN_FILE, TEST_FILE = "train.safetensors", "test.safetensors"


def _number(kind, test, what):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


POSITIVE = _number(int, lambda v: v >= 1, "a positive integer")
COUNT = _number(int, lambda v: v >= 0, "an integer >= 0")
RATE = _number(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
NONNEG = _number(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
PROB = _number(float, lambda v: 0.0 <= v <= 1.0, "a probability in [0, 1]")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from . import _add_global_flags

    actions = p.add_subparsers(dest="puzzle_action", metavar="ACTION")
    generate = actions.add_parser("generate", help="write train/test Sudoku or maze puzzle files into a directory")
    _add_global_flags(generate, in_subcommand=True)
    try:
        from .puzzle_generate import add_generate_arguments
    except ModuleNotFoundError as exc:  # the generator ships separately; the other actions still work
        if "puzzle_generate" not in str(exc):
            raise
        generate.set_defaults(generate_missing=True)
    else:
        add_generate_arguments(generate)
    train = actions.add_parser("train", help="train a puzzle model (segments, Q-learning halting, per-puzzle "
                                             "embeddings) on a puzzle directory")
    _add_global_flags(train, in_subcommand=True)
    _add_train_arguments(train)
    evaluate = actions.add_parser("eval", help="exact-puzzle and cell accuracy, thinking segments vs difficulty")
    _add_global_flags(evaluate, in_subcommand=True)
    _add_eval_arguments(evaluate)


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    from .train import add_arch_argument, add_wiring_argument

    data = p.add_argument_group("data")
    data.add_argument("--data", required=True, metavar="PATH",
                      help=f"puzzle directory (its {TRAIN_FILE}, from `puzzle generate`) or a puzzle file")
    data.add_argument("--val", metavar="PATH", help="puzzle file (or directory: its test file) scored while "
                      "training (exact/cell accuracy in metrics.jsonl); default: none")
    data.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                      help="a random symmetry of the task per puzzle and step (Sudoku: digits, bands, rows, "
                           "stacks, columns, transposition; mazes: rotations and reflections); on by default")
    model = p.add_argument_group("model")
    model.add_argument("--out-dir", default="./hierarchos_puzzle_model", metavar="DIR",
                       help="model directory written at the end (checkpoints under DIR/checkpoints)")
    model.add_argument("--tiny", action="store_true", help="a tiny architecture for quick CPU runs")
    add_wiring_argument(model, "default hierarchos here, the wiring of the puzzle runs on record (x070 is the "
                               "language model's default)")
    for name in ARCH:
        add_arch_argument(model, name)
    model.add_argument("--hidden-size", "--hidden_size", dest="hidden_size", type=POSITIVE, default=None,
                       help="every width (context_dim, h_hidden, l_hidden) not given on its own")
    model.add_argument("--max-segments", type=POSITIVE, default=8, metavar="M",
                       help="most segments (reads of the grid) a puzzle may think for (default 8)")
    model.add_argument("--halt-explore-prob", type=PROB, default=0.1,
                       help="share of training puzzles made to think a random 2..M segments before they may "
                            "halt (seed 003's exploration; default 0.1)")
    model.add_argument("--puzzle-emb", action=argparse.BooleanOptionalAction, default=True,
                       help="a learned vector per training puzzle id (sparse rows, sign-SGD); test puzzles (id 0) "
                            "share the zero vector")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=POSITIVE, default=20)
    opt.add_argument("--batch-size", "--batch_size", type=POSITIVE, default=64)
    opt.add_argument("--starting-lr", "--lr", dest="starting_lr", type=RATE, default=3e-4)
    opt.add_argument("--min-lr", type=NONNEG, default=3e-5)
    opt.add_argument("--warmup-steps", type=COUNT, default=None, help="default: 5%% of the steps")
    opt.add_argument("--weight-decay", type=NONNEG, default=0.1)
    opt.add_argument("--grad-clip", type=NONNEG, default=1.0, help="0: no clipping")
    opt.add_argument("--puzzle-emb-lr", type=RATE, default=1e-3, help="sign-SGD step of the per-puzzle rows")
    opt.add_argument("--puzzle-emb-decay", type=NONNEG, default=0.1, help="weight decay of the batch's rows")
    opt.add_argument("--q-loss-weight", type=NONNEG, default=0.5, help="weight of the halting Q losses")
    opt.add_argument("--ponder-loss-weight", type=NONNEG, default=0.01)
    opt.add_argument("--commitment-loss-weight", type=NONNEG, default=0.5)
    opt.add_argument("--max-steps", "--steps", dest="max_steps", type=POSITIVE, default=None,
                     help="stop after N steps (batches of puzzles; each runs up to M segments, one update each)")
    opt.add_argument("--seed", type=COUNT, default=0)
    run = p.add_argument_group("run")
    run.add_argument("--device", default="auto", help="auto | cpu | cuda")
    run.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (auto on CUDA)")
    run.add_argument("--log-every", type=POSITIVE, default=10)
    run.add_argument("--save-every", type=COUNT, default=0, help="steps between checkpoints (0: each epoch)")
    run.add_argument("--keep-checkpoints", type=POSITIVE, default=3)
    run.add_argument("--eval-every", type=COUNT, default=0, help="steps between --val scores (0: each epoch)")
    run.add_argument("--eval-limit", type=POSITIVE, default=None, help="score at most N --val puzzles while training")
    run.add_argument("--resume-from-ckpt", metavar="PATH",
                     help="OUT_DIR/checkpoints or a step-* dir: continue that run (its architecture; pass the same "
                          "--data, --batch-size and --seed)")
    run.add_argument("--fast-step", action=argparse.BooleanOptionalAction, default=True,
                     help="no host reads inside a segment (one per segment decides whether the next runs); "
                          "--no-fast-step runs the plain reference loop, which computes the same")
    run.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                     help="replay each segment's forward, Q target, loss, backward and clip as a CUDA graph, "
                          "one per batch size and segment (default: on with CUDA; a refused capture runs eagerly; "
                          "--no-cuda-graphs for eager)")
    run.add_argument("--compile", action="store_true",
                     help="torch.compile the RWKV blocks (opt-in; the first steps compile)")


def _add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-path", "--model_path", required=True, metavar="DIR",
                   help="the --out-dir of `puzzle train` (or one of its checkpoints/step-* dirs)")
    p.add_argument("--data", required=True, metavar="PATH", help=f"puzzle file, or a directory (its {TEST_FILE})")
    p.add_argument("--batch-size", "--batch_size", type=POSITIVE, default=256)
    p.add_argument("--limit", type=POSITIVE, default=None, help="score the first N puzzles only")
    p.add_argument("--all-segments", action="store_true",
                   help="run every puzzle for all M segments and also report exact accuracy after each segment "
                        "(the scored answer is still the one it halted with)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (auto on CUDA)")
    p.add_argument("--output", metavar="PATH.json", help="also write the metrics (and per-puzzle segments) as JSON")


def run(args: argparse.Namespace) -> int:
    action = getattr(args, "puzzle_action", None)
    if action is None:
        raise HierarchosError("puzzle: give an action: generate, train or eval (see `hierarchos puzzle --help`)")
    if action == "generate":
        if getattr(args, "generate_missing", False):
            raise HierarchosError("puzzle generate: the generator (hierarchos.cli.puzzle_generate) is not installed")
        from .puzzle_generate import run_generate

        return run_generate(args)
    return run_train(args) if action == "train" else run_eval(args)


# ---- shared ------------------------------------------------------------------------------------

def _puzzle_file(path: str, split_file: str) -> Path:
    given = Path(path)
    return given / split_file if given.is_dir() else given


def _load(path: str, split_file: str, flag: str):
    from ..puzzles.dataset import load_puzzles

    file = _puzzle_file(path, split_file)
    if not file.exists():
        raise HierarchosError(f"{flag} {path}: no puzzle file {file}; generate one with "
                              "`hierarchos puzzle generate --out DIR`")
    return load_puzzles(file)


# ---- train -------------------------------------------------------------------------------------

def _build_model(args, train_set):
    from ..config import TIME_MIX_WIRINGS, ModelConfig, tiny_config
    from ..model.puzzle import PuzzleConfig, PuzzleSolver, default_puzzle_base, puzzle_model_config

    from .train import arch_overrides

    given = arch_overrides(args, ARCH)
    if args.hidden_size is not None:
        given = {**{name: args.hidden_size for name in ("context_dim", "h_hidden", "l_hidden")}, **given}
    # the tiny base keeps the puzzle default's wiring too (see default_puzzle_base)
    base = tiny_config(use_rosa=False, **TIME_MIX_WIRINGS["hierarchos"]) if args.tiny else default_puzzle_base()
    if "attention" not in (given.get("h_block", base.h_block), given.get("l_block", base.l_block)):
        for flag, name in (("--pos-encodings", "pos_encodings"), ("--window-size", "window_size")):
            if name in given:
                raise HierarchosError(f"{flag} {given[name]}: RWKV stacks have no attention; add --h-block "
                                      "attention and/or --l-block attention, or drop the flag")
    try:
        base = ModelConfig(**{**base.to_dict(), **given})
    except TypeError as exc:  # a bug: ARCH names a field ModelConfig lacks
        raise AssertionError(exc) from None
    # the task, grid and cell tokens are the data's: the model records them and eval checks them
    puzzle = PuzzleConfig(size=train_set.size, num_puzzle_ids=train_set.num_puzzle_ids if args.puzzle_emb else 0,
                          max_segments=args.max_segments, halt_explore_prob=args.halt_explore_prob,
                          task=train_set.task, num_tokens=train_set.num_tokens)
    return PuzzleSolver(puzzle_model_config(puzzle.validate(), base.validate()), puzzle)


def run_train(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from ..io import load_checkpoint, read_config, resolve_checkpoint, save_checkpoint, save_model_files
    from ..model.losses import LossWeights
    from ..model.puzzle import PuzzleConfig, PuzzleSolver
    from ..train.puzzle_trainer import PuzzleTrainConfig, PuzzleTrainer, check_fit
    from .train import pick_device

    if args.min_lr > args.starting_lr:
        raise HierarchosError(f"--min-lr {args.min_lr} is above --starting-lr {args.starting_lr}; lower --min-lr")
    device = pick_device(args.device)
    if args.cuda_graphs and device.type != "cuda":
        raise HierarchosError(f"--cuda-graphs needs a CUDA device (this run is on {device.type}); drop the flag")
    if args.cuda_graphs and not args.fast_step:
        raise HierarchosError("--cuda-graphs replays the fast step; drop --no-fast-step or --cuda-graphs")
    train_set = _load(args.data, TRAIN_FILE, "--data")
    val_set = _load(args.val, TEST_FILE, "--val") if args.val else None
    torch.manual_seed(args.seed)
    out_dir = Path(args.out_dir)
    ckpt_root = out_dir / "checkpoints"
    resume_dir = None
    if args.resume_from_ckpt:  # the architecture is the checkpoint's
        resume_dir = resolve_checkpoint(args.resume_from_ckpt)
        cfg, meta = read_config(resume_dir)
        model = PuzzleSolver(cfg, PuzzleConfig.from_dict(meta.get("puzzle"), str(resume_dir)))
        ignored = [name for name in ("time_mix_wiring", *ARCH) if getattr(args, name) is not None]
        if ignored:
            flags = ", ".join("--" + name.replace("_", "-") for name in ignored)
            print(f"resume: the architecture is the checkpoint's; ignoring {flags}")
    else:
        model = _build_model(args, train_set)
    puzzle = model.puzzle_cfg
    check_fit(puzzle, train_set, f"--data {args.data}", "resume with the data the checkpoint was trained on")
    if puzzle.num_puzzle_ids and train_set.num_puzzle_ids > puzzle.num_puzzle_ids:
        raise HierarchosError(f"--data {args.data}: puzzle ids go up to {train_set.num_puzzle_ids} but the "
                              f"checkpoint's table has {puzzle.num_puzzle_ids} rows; resume with the same data")
    if val_set is not None:
        check_fit(puzzle, val_set, f"--val {args.val}", "score puzzles of the training data's task and size")
    model.to(device)
    if args.compile:
        from ..model.rwkv import compile_blocks

        print(f"compile: torch.compile on for {compile_blocks(model)} RWKV blocks (the first steps compile)")
    tcfg = PuzzleTrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, starting_lr=args.starting_lr, min_lr=args.min_lr,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        puzzle_emb_lr=args.puzzle_emb_lr, puzzle_emb_decay=args.puzzle_emb_decay, q_weight=args.q_loss_weight,
        augment=args.augment, max_steps=args.max_steps, log_every=args.log_every, save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints, eval_every=args.eval_every, eval_limit=args.eval_limit,
        amp=args.amp, seed=args.seed, fast_step=args.fast_step, cuda_graphs=args.cuda_graphs,
        loss=LossWeights(ponder=args.ponder_loss_weight, commitment=args.commitment_loss_weight, q=args.q_loss_weight))
    trainer = PuzzleTrainer(model, train_set, tcfg, device, val_set, log=lambda line: print(line, file=sys.stderr))
    if resume_dir is not None:
        state = load_checkpoint(resume_dir, model, trainer.optimizer)
        trainer.load_trainer_state(state, str(resume_dir))
        print(f"resumed from {resume_dir} at step {trainer.step}")
    graphs = tcfg.cuda_graphs if tcfg.cuda_graphs is not None else device.type == "cuda"
    n_params = sum(p.numel() for p in model.parameters())
    table = puzzle.num_puzzle_ids * model.cfg.context_dim if puzzle.num_puzzle_ids else 0
    print(f"model: {n_params - table:,} parameters (+{table:,} in the per-puzzle table) | device {device} | "
          f"{puzzle.size}x{puzzle.size} {puzzle.task}, up to {puzzle.max_segments} segments | blocks "
          f"{model.cfg.h_block}/{model.cfg.l_block}, halting {model.cfg.halting} | step "
          + ("reference" if not tcfg.fast_step else "fast, cuda graphs " + ("on" if graphs else "off")))
    print(f"data: {len(train_set.inputs)} training puzzles ({train_set.num_puzzle_ids} ids), augment "
          f"{'on' if args.augment else 'off'}, {trainer.batches_per_epoch} steps per epoch, {trainer.total_steps} steps"
          + (f"; scoring {args.val} ({len(val_set.inputs)} puzzles)" if val_set is not None else ""))

    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.jsonl"
    bar = tqdm(total=trainer.total_steps, initial=trainer.step, unit="step", dynamic_ncols=True, mininterval=1.0)

    def log_metrics(record):
        trainer.last_metrics = record
        with open(metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({**record, "time": time.time()}) + "\n")
        shown = {"loss": f"{record['loss']:.3f}", "cells": f"{record['cell_acc']:.3f}",
                 "exact": f"{record['exact']:.3f}", "seg": f"{record['segments']:.2f}"}
        if "val_exact" in record:
            shown["val_exact"] = f"{record['val_exact']:.3f}"
            bar.write(f"step {record['step']}: val exact {record['val_exact']:.4f}, cells {record['val_cells']:.4f}, "
                      f"segments {record['val_mean_segments']:.2f}")
        bar.set_postfix(shown, refresh=False)

    trainer.log_metrics = log_metrics
    history_entry = {"task": puzzle.task, "size": puzzle.size, "dataset": str(_puzzle_file(args.data, TRAIN_FILE)),
                     "puzzles": len(train_set.inputs), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    extra = {"puzzle": puzzle.to_dict()}

    def on_checkpoint(t, is_best, reason):  # noqa: ARG001
        state = {**t.trainer_state(), "training_history": [{**history_entry, "steps": t.step}]}
        save_checkpoint(ckpt_root, t.step, model, t.optimizer, None, state, keep=tcfg.keep_checkpoints,
                        is_best=bool(is_best), extra=extra)

    stop = {"flag": False}

    def on_signal(signum, frame):  # noqa: ARG001
        if stop["flag"]:
            raise KeyboardInterrupt
        stop["flag"] = True
        print("\ninterrupt: saving a resumable checkpoint after this step (Ctrl+C again to abort)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, on_signal)
    try:
        result = trainer.run(on_checkpoint=on_checkpoint, progress=lambda record: bar.update(1),
                             stop_requested=lambda: stop["flag"])
    finally:
        bar.close()
        signal.signal(signal.SIGINT, previous)
    if result["stopped"]:
        print(f"stopped at step {trainer.step}; resume with --resume-from-ckpt {ckpt_root}")
        return 0
    save_model_files(out_dir, model, None, history=[{**history_entry, "steps": trainer.step}], extra=extra)
    print(f"saved puzzle model {out_dir}; score it with: hierarchos puzzle eval --model-path {out_dir} "
          f"--data DIR/{TEST_FILE}")
    return 0


# ---- eval --------------------------------------------------------------------------------------

def run_eval(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..io import atomic_write_text
    from ..train.puzzle_trainer import check_fit, evaluate_puzzles, load_puzzle_model
    from .train import pick_device

    device = pick_device(args.device)
    model, _ = load_puzzle_model(args.model_path, device)
    puzzles = _load(args.data, TEST_FILE, "--data")
    size, task = model.puzzle_cfg.size, model.puzzle_cfg.task
    check_fit(model.puzzle_cfg, puzzles, f"--data {args.data}", f"score it with a model trained on {puzzles.size}x"
              f"{puzzles.size} {puzzles.task} puzzles")
    total = len(puzzles.inputs) if args.limit is None else min(args.limit, len(puzzles.inputs))
    started = time.perf_counter()
    with tqdm(total=total, unit="puzzle", dynamic_ncols=True, mininterval=1.0, file=sys.stderr) as bar:
        result = evaluate_puzzles(model, puzzles, device, batch_size=args.batch_size, limit=args.limit,
                                  all_segments=args.all_segments, amp=args.amp, progress=bar.update)
    elapsed = time.perf_counter() - started
    rho = result["spearman_segments_difficulty"]
    print(f"puzzles            {result['puzzles']} ({size}x{size} {task}, {args.data})")
    print(f"exact accuracy     {result['exact']:.4f}" + (" (whole grid)" if task == "maze" else ""))
    print(f"cell accuracy      {result['cells']:.4f} ({'open' if task == 'maze' else 'blank'} cells)")
    if task == "maze":
        print(f"path cells         {result['path_cells']:.4f} (the solution's path cells marked)")
        print(f"valid paths        {result['valid_path']:.4f} (marked cells are the unique shortest path)")
    print(f"mean segments      {result['mean_segments']:.3f} of {result['max_segments']}")
    print(f"segments vs difficulty (Spearman) {'n/a (constant)' if rho is None else f'{rho:.3f}'}")
    if "exact_by_segment" in result:
        by_segment = " ".join(f"{k + 1}:{v:.3f}" for k, v in enumerate(result["exact_by_segment"]))
        print(f"exact after k segments {by_segment}")
    print(f"time               {elapsed:.1f}s ({result['puzzles'] / max(elapsed, 1e-9):.1f} puzzles/s, {device})")
    if args.output:
        payload = {"model_path": str(args.model_path), "data": str(_puzzle_file(args.data, TEST_FILE)),
                   "device": str(device), "seconds": elapsed, **result,
                   "difficulty": [float(v) for v in puzzles.difficulty[:result["puzzles"]]]}
        atomic_write_text(args.output, json.dumps(payload, indent=1) + "\n")
        print(f"wrote {args.output}")
    return 0
