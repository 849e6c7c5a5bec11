"""`train`: train a model from scratch (or from --model-path weights) on local or Hugging Face data.

Maps the flags onto ModelConfig / TrainConfig in one place, gets the data's token arrays
(train_data: the memory-mapped token cache), restores a resumed run's flags (resume), runs the Trainer with a progress bar, writes checkpoints under OUT_DIR/checkpoints and the
final model directory to OUT_DIR. Ctrl+C saves a resumable checkpoint and exits cleanly.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from ..config import (BLOCK_TYPES, FIELD_ALIASES, HALTING_RULES, POS_ENCODINGS, TIME_MIX_WIRINGS, TIME_MIXES,
                      TM_GATES, TM_INITS, TM_TOKEN_SHIFTS, ModelConfig)
from ..errors import HierarchosError
from .resume import given_flags, run_args, track_given

HELP = "train a model (from scratch or from --model-path weights) on local or Hugging Face data"

ARCH_FLAGS = ("context_dim", "persistent_dim", "ltm_slots", "ltm_key_dim", "ltm_val_dim", "ltm_topk",
              "h_hidden", "l_hidden", "h_layers", "l_layers", "h_cycles", "max_h_steps", "max_l_steps",
              "l_conv_atol", "h_stride", "h_halt_thresh", "grad_steps", "head_size", "ffn_mult", "vocab_size",
              "h_block", "l_block", "pos_encodings", "window_size", "halting", "q_explore_prob",
              "time_mix", "tm_token_shift", "tm_gate", "tm_value_residual", "tm_init")
# on/off architecture flags (--name / --no-name)
ARCH_BOOLS = ("tm_value_residual",)
# the block-type flags (seed 000/003's Transformer stacks); the other flags are numbers
ARCH_CHOICES = {"h_block": BLOCK_TYPES, "l_block": BLOCK_TYPES, "pos_encodings": POS_ENCODINGS,
                "halting": HALTING_RULES, "time_mix": TIME_MIXES, "tm_token_shift": TM_TOKEN_SHIFTS,
                "tm_gate": TM_GATES, "tm_init": TM_INITS}
ARCH_HELP = {"h_cycles": "reasoning rounds (manager watch, plans, worker), each fed the previous round's output "
                         "(default 1; the seeds' depth: --h_cycles 2 --max_h_steps 5 --max_l_steps 5)",
             "max_h_steps": "most pondering passes per plan point, halted early by --halting (default 1: the "
                            "minimal depth, which scored best on the quality benchmark; the seeds used 5)",
             "max_l_steps": "most worker shadow passes per token before its commit pass (default 0; the seeds "
                            "used 5)",
             "h_block": "manager stack blocks: rwkv7 (default) or attention (RMSNorm, SDPA, SwiGLU)",
             "l_block": "worker stack blocks: rwkv7 (default) or attention",
             "pos_encodings": "positions of attention blocks: rope (default), sinusoidal, learned, none",
             "window_size": "sliding attention window in tokens (0, the default: full causal attention, whose "
                            "KV cache grows with the context)",
             "halting": "pondering's halting rule: act (Graves, default) or q (seed 003's Q-learning head)",
             "q_explore_prob": "--halting q: probability that a plan point gets a random minimum of passes "
                               "in training (default 0.1)",
             "time_mix": "time mix of RWKV blocks: rwkv7 (default) or wkv4 (seeds 001/004's RWKV-4 cell: "
                         "time_decay/time_first, state aa/bb/pp)",
             "tm_token_shift": "RWKV-7 token shift: static (x070's per-channel mixes, default) or ddlerp "
                               "(hierarchos' data-dependent lerps)",
             "tm_gate": "RWKV-7 output gate: lowrank (x070's sigmoid(x G1) G2, default) or sigmoid_full "
                        "(hierarchos' C x C)",
             "tm_value_residual": "RWKV-7 value residual: each layer's value lerped toward its stack's first "
                                  "layer's (x070; default on, --no-tm-value-residual for hierarchos' wiring)",
             "tm_init": "RWKV-7 time-mix initial values: x070 (default) or hierarchos"}


def _spellings(name: str) -> list[str]:
    """--name, --name-with-dashes and the original projects' names for the same field (FIELD_ALIASES:
    --halt-max-steps, --l-cycles, --H_layers, --expansion, ...), each once."""
    names = [name] + [alias for alias, target in FIELD_ALIASES.items() if target == name and alias != "hidden_size"]
    flags = [f"--{n}" for n in names] + [f"--{n.replace('_', '-')}" for n in names]
    return list(dict.fromkeys(flags))


def add_wiring_argument(group, default_note: str) -> None:
    """--time-mix-wiring: all four tm_* switches at once, by TIME_MIX_WIRINGS name (see `arch_overrides`)."""
    group.add_argument("--time-mix-wiring", "--time_mix_wiring", dest="time_mix_wiring", default=None,
                       choices=tuple(TIME_MIX_WIRINGS),
                       help=f"all four RWKV-7 wiring switches at once: x070 (BlinkDL's published RWKV-7) or "
                            f"hierarchos (its own older wiring); {default_note}; a --tm-* flag given beside it "
                            "wins for its switch")


def arch_overrides(args, names) -> dict:
    """The architecture fields the flags `names` set, on top of --time-mix-wiring's four (a --tm-* flag wins)."""
    given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    return {**TIME_MIX_WIRINGS.get(args.time_mix_wiring, {}), **given}


def add_arch_argument(group, name: str) -> None:
    """The flag of ModelConfig field `name` (both spellings, default None: unset keeps the config's value)."""
    if name in ARCH_BOOLS:
        group.add_argument(*_spellings(name), dest=name, action=argparse.BooleanOptionalAction, default=None,
                           help=ARCH_HELP[name])
    elif name in ARCH_CHOICES:
        group.add_argument(*_spellings(name), dest=name, choices=ARCH_CHOICES[name], default=None,
                           help=ARCH_HELP[name])
    else:
        kind = float if name in ("l_conv_atol", "h_halt_thresh", "q_explore_prob") else int
        group.add_argument(*_spellings(name), dest=name, type=kind, default=None, help=ARCH_HELP.get(name))


def add_arguments(p: argparse.ArgumentParser) -> None:
    first_action = len(p._actions)
    data = p.add_argument_group("data")
    data.add_argument("--train", "--dataset-file", metavar="PATH",
                      help="local data file or folder (json/jsonl/txt/csv/parquet); default: the bundled Shakespeare "
                           "corpus")
    data.add_argument("--hf_dataset", "--hf-dataset", metavar="NAME_OR_PATH")
    data.add_argument("--hf_dataset_config", "--hf-dataset-config")
    data.add_argument("--hf_dataset_split", "--hf-dataset-split", default="train")
    data.add_argument("--hf-streaming", action="store_true",
                      help="read --hf_dataset in datasets' streaming mode (never downloaded whole) into the token "
                           "cache, which holds only its token ids")
    data.add_argument("--text_column", "--text-column")
    data.add_argument("--prompt_column", "--prompt-column")
    data.add_argument("--completion_column", "--completion-column")
    data.add_argument("--kayla", action="store_true")
    data.add_argument("--pre_chunked_dataset", "--pre-chunked-dataset", action="store_true",
                      help="--train is a pre-chunked JSONL (input_ids per line), read lazily")
    data.add_argument("--pre_pt_dataset", "--pre-pt-dataset", action="store_true",
                      help="--train is a folder of tensor chunk files + manifest.jsonl (scripts/dataset_chunk_create.py)")
    data.add_argument("--auto-max-length", action="store_true",
                      help="set --max_length from the longest record (rounded up to 16, at most 8192)")
    data.add_argument("--val", metavar="PATH", help="validation file (default: hold out --val-fraction)")
    data.add_argument("--val-fraction", type=float, default=0.05)
    data.add_argument("--max_length", "--max-length", type=int, default=None,
                      help="tokens per training window (default 1024, or the loaded model's)")
    data.add_argument("--training-chunk-size", type=int, default=None, help="alias of --max_length")
    data.add_argument("--tokenizer-path", default=None, help="HF tokenizer dir or hub name, or byte | char | bpe:N")
    data.add_argument("--token-cache", metavar="DIR", default=None,
                      help="where tokenized corpora are kept (one subdirectory per data + tokenizer; reused while "
                           "nothing changed); default $HIERARCHOS_TOKEN_CACHE or ~/.cache/hierarchos/token_cache")
    data.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=True,
                      help="read the streams' windows in a seeded order that changes every epoch (--no-shuffle: "
                           "in corpus order)")
    model = p.add_argument_group("model")
    model.add_argument("--model-path", help="start from this model directory's weights (fresh optimizer)")
    model.add_argument("--out-dir", default="./hierarchos_model")
    model.add_argument("--tiny", action="store_true", help="a tiny architecture for quick CPU runs")
    model.add_argument("--grow-every-chars", type=int, default=None, metavar="N",
                       help="continual learning: one more manager and worker block per N characters of training "
                            "text in the model's history (added function-preservingly)")
    add_wiring_argument(model, "default x070, since the quality benchmark's wiring table")
    for name in ARCH_FLAGS:
        add_arch_argument(model, name)
    # seed 000's trainer (AI-OS `hrm-hf train-actv1`) names for the same choices
    model.add_argument("--hidden-size", "--hidden_size", dest="hidden_size", type=int, default=None,
                       help="every width (context_dim, h_hidden, l_hidden) not given on its own")
    model.add_argument("--num-heads", "--num_heads", dest="num_heads", type=int, default=None,
                       help="heads per manager block: head_size = h_hidden / N (must divide l_hidden too)")
    model.add_argument("--model", dest="ambiguous_model", default=None, help=argparse.SUPPRESS)
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=3)
    opt.add_argument("--batch_size", "--batch-size", type=int, default=4)
    opt.add_argument("--accumulation-steps", type=int, default=1)
    opt.add_argument("--starting-lr", type=float, default=1e-4)
    opt.add_argument("--min-lr", type=float, default=1e-6)
    opt.add_argument("--warmup-steps", type=int, default=None)
    opt.add_argument("--disable-lr-schedule", action="store_true")
    opt.add_argument("--grad-clip", type=float, default=1.0)
    opt.add_argument("--weight-decay", type=float, default=0.01)
    opt.add_argument("--ponder-loss-weight", type=float, default=0.01)
    opt.add_argument("--commitment-loss-weight", type=float, default=0.5)
    opt.add_argument("--q-loss-weight", type=float, default=0.5, help="--halting q: weight of the Q head's loss")
    opt.add_argument("--commitment-threshold", type=float, default=None)
    opt.add_argument("--encourage-thinking", action="store_true")
    opt.add_argument("--adaptive-ponder", action="store_true")
    opt.add_argument("--ponder-target-scale", type=float, default=0.5)
    opt.add_argument("--detach-every-n-steps", type=int, default=None,
                     help="cut the gradient every N tokens inside a window (default: once per window)")
    opt.add_argument("--persist-state", dest="persist_state", action="store_true", default=True,
                     help="carry the recurrent state from window to window (the default)")
    opt.add_argument("--no-persist-state", dest="persist_state", action="store_false",
                     help="start every window from a fresh state instead of carrying it")
    opt.add_argument("--gradient-checkpointing", action="store_true")
    opt.add_argument("--seed", type=int, default=0)
    run = p.add_argument_group("run")
    run.add_argument("--device", default="auto", help="auto | cpu | cuda | dml")
    run.add_argument("--amp", action="store_true", default=None, help="mixed precision (auto on CUDA)")
    run.add_argument("--no-amp", dest="amp", action="store_false")
    run.add_argument("--save-every", type=int, default=0, help="optimizer steps between checkpoints (0: per epoch)")
    run.add_argument("--keep-checkpoints", type=int, default=3)
    run.add_argument("--resume-from-ckpt", metavar="PATH",
                     help="checkpoint dir, or OUT_DIR/checkpoints: alone, it restores the run's architecture, "
                          "tokenizer, data, schedule and position; --epochs/--max-steps given again set a new "
                          "run length, --override-scheduling with new rates a new schedule")
    run.add_argument("--override-scheduling", action="store_true",
                     help="when resuming, use the new --starting-lr/--min-lr/schedule flags, not the checkpoint's")
    run.add_argument("--reset-halt-bias", type=float, default=None, metavar="B",
                     help="set the manager's halting bias to B after loading weights (e.g. -2.0)")
    run.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                     help="torch.compile the RWKV blocks (default: on for CUDA training with CUDA graphs, where "
                          "it pays: 147 -> 116 ms a 125m step, BENCHMARKS.md; 30-100 s of compilation in the "
                          "first steps; a block that fails to compile runs eagerly). --no-compile: eager blocks")
    run.add_argument("--force-compile", action="store_true", help="compile even where it is known to hang "
                     "(Windows CPU)")
    run.add_argument("--activation-budget", type=float, default=None, metavar="F",
                     help="compiled blocks keep about this fraction (0 < F <= 1) of the activations they would "
                          "save for the backward and recompute the rest there: less GPU memory for some speed "
                          "(torch's activation_memory_budget; needs the blocks compiled; default: torch's 1.0); "
                          "below 1 the recurrence's backward also recomputes its per-chunk states, and the "
                          "memory its chunks")
    run.add_argument("--fsdp", action="store_true", help="under torchrun: shard with FSDP2 instead of DDP")
    run.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                     help="capture each window's forward+backward in a CUDA graph and replay it (default: on "
                          "for one-process bf16 CUDA training with whole windows and no gradient checkpointing; "
                          "1.46x tokens/s in the training loop on an H200, see BENCHMARKS.md; "
                          "--no-cuda-graphs for eager)")
    run.add_argument("--num_workers", "--num-workers", type=int, default=None,
                     help="deprecated, ignored: windows are read from the memory-mapped token cache (no loader "
                          "workers needed) and tokenization uses every core")
    run.add_argument("--log-every", type=int, default=10)
    run.add_argument("--eval-every-epoch", type=int, default=1, metavar="N",
                     help="validate (and run --eval-tasks) every N epochs (0: never)")
    run.add_argument("--eval-tasks", nargs="+", metavar="TASK", default=None,
                     help="lm-eval tasks run on the model during training (see `eval`); metrics go to "
                          "metrics.jsonl as eval/<task>/<metric>")
    run.add_argument("--eval-steps", type=int, default=0, metavar="N",
                     help="also run --eval-tasks every N optimizer steps (0: at epoch ends only)")
    run.add_argument("--eval-batch-size", type=int, default=8, metavar="N", help="requests per forward in --eval-tasks")
    run.add_argument("--eval-limit", type=int, default=None, metavar="N", help="at most N examples per eval task")
    run.add_argument("--max-steps", "--steps", dest="max_steps", type=int, default=None,
                     help="stop after this many optimizer steps; the warm-up + cosine schedule then spans "
                          "these N steps (the LR reaches --min-lr at step N)")
    run.add_argument("--log-file", metavar="PATH", default=None,
                     help="also append the metrics records (JSON lines) to this file")
    run.add_argument("--quantize-on-complete", action="store_true",
                     help="after training, also write a quantized model to OUT_DIR-QTYPE (see the quantize command)")
    run.add_argument("--qtype", type=str.upper, choices=("INT4", "Q4_0", "Q8_0", "Q2_K"), default="INT4",
                     help="format for --quantize-on-complete (default: INT4)")
    track_given(p, first_action)  # --resume-from-ckpt restores only the flags not given again


# flag -> (test, what it must be); None values mean "not given" and pass
FLAG_RULES = {
    "epochs": (lambda v: v >= 1, ">= 1"), "batch_size": (lambda v: v >= 1, ">= 1"),
    "accumulation_steps": (lambda v: v >= 1, ">= 1"), "log_every": (lambda v: v >= 1, ">= 1"),
    "keep_checkpoints": (lambda v: v >= 1, ">= 1"), "max_length": (lambda v: v >= 2, ">= 2 tokens"),
    "training_chunk_size": (lambda v: v >= 2, ">= 2 tokens"), "max_steps": (lambda v: v >= 1, ">= 1"),
    "warmup_steps": (lambda v: v >= 0, ">= 0"), "save_every": (lambda v: v >= 0, ">= 0 (0: once per epoch)"),
    "detach_every_n_steps": (lambda v: v >= 1, ">= 1 token"), "eval_every_epoch": (lambda v: v >= 0, ">= 0"),
    "starting_lr": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "min_lr": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "grad_clip": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0 (0: no clipping)"),
    "weight_decay": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "val_fraction": (lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
    "ponder_loss_weight": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "commitment_loss_weight": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "q_loss_weight": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "commitment_threshold": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "ponder_target_scale": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "reset_halt_bias": (lambda v: math.isfinite(v), "a finite number"),
    "grow_every_chars": (lambda v: v >= 1, ">= 1 character"),
    "eval_steps": (lambda v: v >= 0, ">= 0 (0: at epoch ends only)"),
    "eval_batch_size": (lambda v: v >= 1, ">= 1"), "eval_limit": (lambda v: v >= 1, ">= 1"),
    "hidden_size": (lambda v: v >= 1, ">= 1"), "num_heads": (lambda v: v >= 1, ">= 1"),
    "activation_budget": (lambda v: 0 < v <= 1, "in (0, 1] (a fraction of the activations kept)"),
}


def resolve_cuda_graphs(requested: bool | None, device_type: str, distributed: bool,
                        detach_every: int | None, window: int, *, checkpointing: bool = False,
                        fp16: bool = False, lora: bool = False) -> bool:
    """--cuda-graphs / --no-cuda-graphs as given; unset, on wherever a captured window is known to
    stand for the eager one: one CUDA process, whole windows (no --detach-every-n-steps cut inside
    one), and the combinations run captured on a GPU so far: not with gradient checkpointing
    (its recompute and RNG bookkeeping under capture are untested), fp16's GradScaler (GPUs
    without bf16) or a LoRA finetune. Asked for explicitly, those run captured too; a refused
    capture runs eagerly."""
    if requested is not None:
        return requested
    return (device_type == "cuda" and not distributed and not (detach_every and detach_every < window)
            and not checkpointing and not fp16 and not lora)


def resolve_compile(requested: bool | None, device_type: str, cuda_graphs: bool) -> bool:
    """--compile / --no-compile as given; unset, on where compiling the blocks was measured to pay:
    CUDA with the window captured (the fused glue of the blocks counts once the launches are gone;
    eager, compiling gained nothing measurable), and inductor's GPU backend (triton) importable."""
    if requested is not None:
        return requested
    return device_type == "cuda" and cuda_graphs and importlib.util.find_spec("triton") is not None


def budget_needs_compile(budget: float) -> None:
    raise HierarchosError(f"--activation-budget {budget:g}: only compiled blocks recompute activations, and the "
                          "blocks are not compiled in this run; add --compile, or drop the flag "
                          "(--gradient-checkpointing recomputes eager blocks)")


def check_flags(args: argparse.Namespace) -> None:
    """One line naming the first flag whose value cannot work (before any data is read)."""
    for name, (ok, what) in FLAG_RULES.items():
        value = getattr(args, name, None)
        if value is not None and not ok(value):
            raise HierarchosError(f"--{name.replace('_', '-')} {value}: must be {what}")
    if args.ambiguous_model is not None:
        raise HierarchosError(f"--model {args.ambiguous_model}: say which: --tokenizer-path NAME for a Hugging Face "
                              "tokenizer (what --model names in seed 000's trainer), or --model-path DIR to start "
                              "from a hierarchos model")
    check_attention_flags(args)
    if args.activation_budget is not None and args.compile is False:
        budget_needs_compile(args.activation_budget)
    if args.min_lr > args.starting_lr:
        raise HierarchosError(f"--min-lr {args.min_lr} is above --starting-lr {args.starting_lr}: the schedule "
                              "decays from the starting rate down to the minimum; lower --min-lr")


def check_attention_flags(args: argparse.Namespace) -> None:
    """--pos-encodings / --window-size act on attention blocks only: with RWKV stacks (whose
    recurrence carries order in a fixed-size state) they would silently do nothing."""
    if "attention" in (args.h_block, args.l_block) or args.model_path:
        if args.window_size is not None and args.window_size < 0:
            raise HierarchosError(f"--window-size {args.window_size}: must be >= 0 (0: full causal attention)")
        return
    for flag, value, what in (("--pos-encodings", args.pos_encodings, "no position encodings"),
                              ("--window-size", args.window_size, "no attention window")):
        if value is not None and value != "none":
            raise HierarchosError(f"{flag} {value}: RWKV stacks have {what} (their recurrence carries order); "
                                  "add --h-block attention and/or --l-block attention, or drop the flag")


def attention_persist_state(cfg: ModelConfig, args: argparse.Namespace) -> bool:
    """Full causal attention (window 0) keeps every token in its KV cache: carried from window to
    window the cache would grow through the whole epoch, so such a run starts every window afresh."""
    full = [name for name in ("h_block", "l_block") if getattr(cfg, name) == "attention" and not cfg.window_size]
    if not full or not args.persist_state:
        return args.persist_state
    if "persist_state" in given_flags(args):
        raise HierarchosError("--persist-state with full attention (window_size 0): the KV cache would grow with "
                              "every window of the epoch; give --window-size W to carry a bounded cache")
    print("attention: full causal attention (window 0); each training window starts from a fresh state "
          "(its KV cache grows with the context); --window-size W bounds it and carries it from window to window")
    return False


def seed000_widths(args: argparse.Namespace, given: dict, base: ModelConfig) -> dict:
    """--hidden-size fills the widths not given on their own; --num-heads sets head_size from h_hidden."""
    extra = {}
    if args.hidden_size is not None:
        extra = {name: args.hidden_size for name in ("context_dim", "h_hidden", "l_hidden") if name not in given}
    if args.num_heads is not None:
        if "head_size" in given:
            raise HierarchosError("--num-heads and --head-size both set the head size; give one")
        h_hidden = {**given, **extra}.get("h_hidden", base.h_hidden)
        l_hidden = {**given, **extra}.get("l_hidden", base.l_hidden)
        if h_hidden % args.num_heads or l_hidden % (h_hidden // args.num_heads):
            raise HierarchosError(f"--num-heads {args.num_heads}: must divide h_hidden {h_hidden} into heads that "
                                  f"also divide l_hidden {l_hidden}; pick another count or width")
        extra["head_size"] = h_hidden // args.num_heads
    return extra


def pick_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise HierarchosError(f"--device cuda: this torch ({torch.__version__}) sees no CUDA device; "
                                  "use --device cpu or install a CUDA build of torch")
        return torch.device("cuda")
    if name in ("dml", "directml"):
        try:
            import torch_directml  # noqa: F401
        except ImportError:
            raise HierarchosError("--device dml needs the torch-directml package (Windows): "
                                  "pip install torch-directml, or use --device cpu") from None
        return torch_directml.device()
    raise HierarchosError(f"--device {name!r}: expected auto, cpu, cuda or dml")


def all_ranks_stream_state(tensors: dict, info) -> dict:
    """The carried recurrent state of every rank's streams (each rank trains its own), named
    `rank{r}.NAME` when distributed; a collective there, so every rank calls it."""
    if not info.enabled:
        return tensors
    import torch.distributed as dist

    per_rank = [None] * info.world_size
    dist.all_gather_object(per_rank, {k: v.detach().cpu() for k, v in tensors.items()})
    return {f"rank{r}.{k}": v for r, part in enumerate(per_rank) for k, v in part.items()}


def this_rank_stream_state(tensors: dict, info) -> dict:
    """This rank's part of a checkpoint's carried state (see `all_ranks_stream_state`)."""
    ranked = any(k.startswith("rank") and "." in k and k.split(".", 1)[0][4:].isdigit() for k in tensors)
    world = info.world_size if info.enabled else 1
    saved = len({k.split(".", 1)[0] for k in tensors}) if ranked else 1
    if tensors and saved != world:
        raise HierarchosError(f"the checkpoint carries the recurrent state of {saved} process(es), this run has "
                              f"{world}; resume with the same number of processes (torchrun --nproc_per_node)")
    if not ranked:
        return tensors
    prefix = f"rank{info.rank if info.enabled else 0}."
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def resumed_tokenizer(resume, args):
    """On resume, the run's own tokenizer (saved in its OUT_DIR at the start), unless
    --tokenizer-path is given again; None when there is nothing to resume or nothing saved."""
    if resume is None or "tokenizer_path" in given_flags(args):
        return None
    from ..data.tokenizers import META_FILE, load_tokenizer

    return load_tokenizer(str(resume.run_dir)) if (resume.run_dir / META_FILE).is_file() else None


def run(args: argparse.Namespace, lora=None) -> int:
    """Train; with `lora` (a hierarchos.lora.LoraSettings, from `finetune`) the loaded model is wrapped
    in LoRA adapters, only they train, and OUT_DIR receives the adapter instead of a model directory."""
    import torch

    from ..config import ModelConfig, tiny_config
    from ..data import bundled_corpus_path
    from ..data.sources import DataSpec
    from ..io import load_checkpoint, load_model_dir, save_checkpoint, save_model_files
    from ..model import HierarchosLM
    from ..model import rosa as rosa_mod
    from ..model.losses import LossWeights
    from ..train.batches import TokenStreams
    from ..train.trainer import TrainConfig, Trainer

    resume = None
    if args.resume_from_ckpt:  # before anything reads the flags: the checkpoint's fill the ones not given
        from .resume import prepare

        resume = prepare(args, ARCH_FLAGS)
    if args.training_chunk_size and not args.max_length:
        args.max_length = args.training_chunk_size
    check_flags(args)
    if args.num_workers is not None:
        print("--num_workers: deprecated and ignored (training windows are read from the memory-mapped token "
              "cache, which needs no loader workers; tokenization uses every core)", file=sys.stderr)
    from ..train.distributed import init_from_env, shard_rows, wrap_model

    device = pick_device(args.device)
    dist_info = init_from_env(device.type)
    if dist_info.enabled and device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
    if args.cuda_graphs and device.type != "cuda":
        raise HierarchosError(f"--cuda-graphs needs a CUDA device (this run is on {device.type}); "
                              "drop the flag or use --device cuda")
    if args.cuda_graphs and dist_info.enabled:
        raise HierarchosError("--cuda-graphs runs in one process; drop it under torchrun")
    torch.manual_seed(args.seed)
    out_dir = Path(args.out_dir)
    main_rank = dist_info.is_main
    if not main_rank:  # one rank speaks for the run
        import os

        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process

    # ---- data and tokenizer ----
    spec = DataSpec(train=args.train, hf_dataset=args.hf_dataset, hf_dataset_config=args.hf_dataset_config,
                    hf_dataset_split=args.hf_dataset_split, text_column=args.text_column,
                    prompt_column=args.prompt_column, completion_column=args.completion_column, kayla=args.kayla,
                    streaming=args.hf_streaming)
    pretokenized = args.pre_chunked_dataset or args.pre_pt_dataset
    if args.pre_chunked_dataset and args.pre_pt_dataset:
        raise HierarchosError("--pre_chunked_dataset and --pre_pt_dataset are mutually exclusive: pass one")
    if pretokenized and (args.hf_dataset or not args.train):
        raise HierarchosError("--pre_chunked_dataset/--pre_pt_dataset read the path given with --train "
                              "(not --hf_dataset): pass --train PATH")
    if spec.train is None and spec.hf_dataset is None:
        spec.train = str(bundled_corpus_path())
        print(f"data: no --train/--hf_dataset given; using the bundled corpus {spec.train}")
    base_meta = None
    if args.model_path:
        model, base_meta = load_model_dir(args.model_path)
    from .train_data import prepare as prepare_data

    data = prepare_data(args, spec, resume, dist_info, resumed_tokenizer(resume, args))
    tokenizer = data.tokenizer
    # ---- model ----
    if resume is not None:  # the checkpoint's architecture (its weights are loaded below)
        if tokenizer.vocab_size > resume.config.vocab_size:
            raise HierarchosError(f"the tokenizer has {tokenizer.vocab_size} tokens, the checkpoint's model "
                                  f"{resume.config.vocab_size} ({resume.checkpoint}); resume with the run's own "
                                  "tokenizer (drop --tokenizer-path)")
        model = HierarchosLM(resume.config)
    elif not args.model_path:
        overrides = arch_overrides(args, ARCH_FLAGS)
        overrides.update(seed000_widths(args, overrides, tiny_config() if args.tiny else ModelConfig()))
        overrides["vocab_size"] = tokenizer.vocab_size
        if args.max_length:
            overrides["max_length"] = args.max_length
        if args.commitment_threshold is not None:
            overrides["commitment_threshold"] = args.commitment_threshold
        cfg = tiny_config(**overrides) if args.tiny else ModelConfig(**overrides).validate()
        model = HierarchosLM(cfg)
    if args.grow_every_chars and "attention" in (model.cfg.h_block, model.cfg.l_block):
        raise HierarchosError("--grow-every-chars grows RWKV stacks only; drop it for attention blocks")
    if args.grow_every_chars and model.cfg.halting == "q":
        raise HierarchosError("--grow-every-chars grows ACT models only; drop it for --halting q")
    if args.grow_every_chars and model.cfg.time_mix == "wkv4":
        raise HierarchosError("--grow-every-chars grows RWKV-7 blocks only; drop it for --time-mix wkv4")
    from ..train.continual import grow_for_data

    n_chars = data.n_chars
    model, growth = grow_for_data(model, tokenizer.vocab_size, list((base_meta or {}).get("training_history") or []),
                                  n_chars, None if resume else args.grow_every_chars, allow_growth=lora is None)
    cfg = model.cfg
    args.persist_state = attention_persist_state(cfg, args)
    model.to(device)
    if lora is not None:
        from ..lora import wrap

        model = wrap(model, lora)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"lora: r={lora.r} alpha={lora.alpha} dropout={lora.dropout} on {', '.join(lora.targets)}: "
              f"{trainable:,} trainable parameters; the base weights stay frozen")
    if args.gradient_checkpointing:
        model.set_gradient_checkpointing(True)
    chunk = args.max_length or cfg.max_length
    try:  # every rank sees the same B x world streams and reads its own rows: disjoint shards
        train_streams = TokenStreams.from_tokens(data.train_tokens, args.batch_size * dist_info.world_size, chunk,
                                                 shuffle_seed=args.seed if args.shuffle else None)
        train_streams.streams = shard_rows(train_streams.streams, dist_info)  # this rank's streams
    except ValueError as exc:
        raise HierarchosError(f"training data: {exc}; use more data or a smaller --batch_size") from None
    val_streams = None
    if data.val_tokens is not None:  # as many rows as a training batch (one window each at least): a
        # batch-1 pass over a long held-out text was most of a short GPU run's time
        val_rows = max(1, min(args.batch_size, len(data.val_tokens) // (chunk + 1)))
        val_streams = TokenStreams.from_tokens(data.val_tokens, val_rows, chunk)
    val_bytes = data.val_bytes

    fp16 = (device.type == "cuda" and args.amp is not False and not torch.cuda.is_bf16_supported())
    args.cuda_graphs = resolve_cuda_graphs(args.cuda_graphs, device.type, dist_info.enabled,
                                           args.detach_every_n_steps, chunk,
                                           checkpointing=bool(args.gradient_checkpointing), fp16=fp16,
                                           lora=lora is not None)
    tcfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, accumulation_steps=args.accumulation_steps,
                       starting_lr=args.starting_lr, min_lr=args.min_lr, warmup_steps=args.warmup_steps,
                       disable_lr_schedule=args.disable_lr_schedule, grad_clip=args.grad_clip,
                       weight_decay=args.weight_decay, detach_every=args.detach_every_n_steps,
                       persist_state=args.persist_state, amp=args.amp, save_every=args.save_every,
                       keep_checkpoints=args.keep_checkpoints, log_every=args.log_every, seed=args.seed,
                       eval_every_epoch=args.eval_every_epoch, cuda_graphs=args.cuda_graphs,
                       loss=LossWeights(ponder=args.ponder_loss_weight, commitment=args.commitment_loss_weight,
                                        encourage_thinking=args.encourage_thinking,
                                        adaptive_ponder=args.adaptive_ponder,
                                        ponder_target_scale=args.ponder_target_scale, q=args.q_loss_weight))
    if args.cuda_graphs and args.detach_every_n_steps and args.detach_every_n_steps < chunk:
        raise HierarchosError("--cuda-graphs captures whole windows; drop --detach-every-n-steps "
                              f"({args.detach_every_n_steps} < --max_length {chunk})")
    # wrap first: fully_shard swaps the parameters for sharded ones, which the optimizer must hold
    forward_model = wrap_model(model, dist_info, device, fsdp=args.fsdp)
    sharded = bool(args.fsdp and dist_info.enabled)
    trainer = Trainer(model, train_streams, tcfg, device, val_streams, val_bytes,
                      log=lambda line: print(line, file=sys.stderr))
    trainer.forward_model = forward_model
    if args.max_steps is not None and args.max_steps < trainer.total_opt_steps:
        # the run ends at --max-steps: the schedule spans those steps (nanoGPT, the HF Trainer), not
        # the epochs it will not reach
        from ..train.trainer import CosineSchedule

        trainer.schedule = CosineSchedule(trainer.optimizer, args.max_steps, tcfg)
    asked = args.compile
    args.compile = resolve_compile(args.compile, device.type, bool(tcfg.cuda_graphs))
    if args.compile or args.force_compile:
        if sys.platform == "win32" and device.type == "cpu" and not args.force_compile:
            print("compile: skipped on Windows CPU (known to hang); --force-compile overrides", file=sys.stderr)
        else:
            from ..model.rwkv import compile_blocks

            # by default a block that fails to compile runs eagerly; asked for, a failure is an error
            count = compile_blocks(model, fall_back=asked is None and not args.force_compile,
                                   memory_budget=args.activation_budget)
            why = " (the default with CUDA graphs; --no-compile for eager blocks)" if asked is None else ""
            budget = "" if args.activation_budget is None else f", activation budget {args.activation_budget:g}"
            print(f"compile: torch.compile on for {count} RWKV blocks{why}{budget}; the first steps compile")
    if args.activation_budget is not None and not (args.compile or args.force_compile):
        budget_needs_compile(args.activation_budget)
    ckpt_root = out_dir / "checkpoints"
    if args.resume_from_ckpt:
        loaders = {}
        if sharded:
            from ..train.distributed import load_full_model_state, load_full_optimizer_state

            loaders = {"load_model": lambda tensors: load_full_model_state(model, tensors),
                       "load_optimizer": lambda opt_state: load_full_optimizer_state(model, trainer.optimizer,
                                                                                    opt_state)}
        state = load_checkpoint(args.resume_from_ckpt, model, trainer.optimizer,
                                None if args.override_scheduling else trainer.schedule, **loaders)
        trainer.load_trainer_state(state)
        trainer.load_state_tensors(this_rank_stream_state(state.get("_stream_state", {}), dist_info))
        resumed_history = state.get("training_history")
        print(f"resumed from {args.resume_from_ckpt} at step {trainer.opt_step}")

    if args.reset_halt_bias is not None:
        with torch.no_grad():
            if model.cfg.halting == "q":  # the halt logit's bias (the continue logit's is left alone)
                model.reasoner.h_q_head.bias[0].fill_(args.reset_halt_bias)
            else:
                model.reasoner.h_halt_proj.bias.fill_(args.reset_halt_bias)
        print(f"reset the manager's halting bias to {args.reset_halt_bias}")
    history = list((base_meta or {}).get("training_history", []) or [])
    if args.resume_from_ckpt and isinstance(resumed_history, list) and resumed_history:
        history = resumed_history[:-1]  # the last entry is this run's, rewritten below
        growth = {k: v for k, v in resumed_history[-1].items() if "growth" in k} if isinstance(
            resumed_history[-1], dict) else growth
    run_entry = {"dataset": data.name, "template": data.template, "tokens": train_streams.num_tokens,
                 "chars": n_chars, **growth,
                 "epochs": tcfg.epochs, "steps": 0,
                 "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    n_params, n_core = model.num_parameters(), model.num_parameters(with_deepembed=False)
    print(f"model: {n_params:,} parameters ({n_core:,} without DeepEmbed tables) | device {device} | "
          f"amp {trainer.amp_dtype} | cuda graphs {'on' if tcfg.cuda_graphs else 'off'} | vocab {cfg.vocab_size} "
          f"({tokenizer.name})")
    if cfg.use_rosa and not rosa_mod.cpp_automaton_available():
        print("rosa: the C++ kernel is not built, so ROSA's hints come from the Python automaton, which can hold "
              "a fast device back (build it: python kernels/build.py)")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        print(f"gpu: {props.name}, {props.total_memory / 2**30:.1f} GiB, sm {props.major}.{props.minor}; "
              f"TF32 on, cudnn.benchmark on")
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        if isinstance(train_streams.streams, torch.Tensor):
            train_streams.streams = train_streams.streams.pin_memory()  # lets the per-step copies overlap
    print(f"data: {data.name} ({data.template}), {train_streams.num_tokens:,} training tokens in "
          f"{args.batch_size} streams x {chunk}-token windows, {len(train_streams)} windows per epoch"
          + (f", validation {val_streams.num_tokens:,} tokens in {val_streams.streams.shape[0]} streams"
             if val_streams else ""))

    if getattr(args, "eval_tasks", None):  # lm-eval tasks on the in-memory model (hierarchos.evaluate)
        from tqdm import tqdm as _tqdm

        from ..evaluate import make_train_hook

        if not args.eval_every_epoch and not args.eval_steps:
            raise HierarchosError("--eval-tasks would never run with --eval-every-epoch 0: pass --eval-steps N "
                                  "or --eval-every-epoch N")
        trainer.on_eval = make_train_hook(model, tokenizer, args.eval_tasks, every_epoch=args.eval_every_epoch,
                                          every_steps=args.eval_steps, batch_size=args.eval_batch_size,
                                          limit=args.eval_limit, autocast_dtype=trainer.amp_dtype,
                                          log=lambda line: main_rank and _tqdm.write(line, file=sys.stderr))

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out_dir)  # beside the checkpoints from the start, for ckpt-2-inf and resumes
    metrics_path = out_dir / "metrics.jsonl"
    metrics_files = [metrics_path]  # and a --log-file copy
    if args.log_file:
        metrics_files.append(Path(args.log_file))
        metrics_files[-1].parent.mkdir(parents=True, exist_ok=True)
    stop = {"flag": False}

    def on_signal(signum, frame):  # noqa: ARG001
        if stop["flag"]:
            raise KeyboardInterrupt
        stop["flag"] = True
        print("\ninterrupt: saving a resumable checkpoint at the end of this step (Ctrl+C again to abort)",
              file=sys.stderr)

    previous_handler = signal.signal(signal.SIGINT, on_signal)

    from tqdm import tqdm

    bar = tqdm(total=tcfg.epochs * len(train_streams), initial=trainer.micro_step, unit="win",
               disable=not main_rank, dynamic_ncols=True, mininterval=1.0)

    def progress(n, loss, lr):
        bar.update(n)
        shown = {"lr": f"{lr:.2e}"} if loss is None else {"loss": f"{loss:.3f}", "lr": f"{lr:.2e}"}
        bar.set_postfix(shown, refresh=False)

    def log_metrics(record):
        trainer.last_metrics = record
        if not main_rank:
            return
        record = {**record, "time": time.time()}
        for path in metrics_files:
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                        lr=f"{record['lr']:.2e}", ponder=f"{record['ponder']:.2f}", refresh=False)
        if "val_loss" in record:
            bpb = record.get("val_bpb")
            bar.write(f"epoch {record['epoch']}: train loss {record['loss']:.4f}, val loss {record['val_loss']:.4f}"
                      + (f", val {bpb:.3f} bits/byte" if bpb is not None else ""))

    trainer.log_metrics = log_metrics

    def gathered() -> dict:
        """FSDP: the unsharded model and optimizer states (every rank must take part)."""
        if not sharded:
            return {}
        from ..train.distributed import full_model_state, full_optimizer_state

        return {"model_state": full_model_state(model), "optimizer_state": full_optimizer_state(model, trainer.optimizer)}

    ckpt_extra = {"prompt_template": data.template}
    saved_args = run_args(args)  # what `--resume-from-ckpt DIR` alone restores
    if lora is not None:  # ckpt-2-inf rebuilds the adapters from these and merges them
        from dataclasses import asdict

        ckpt_extra["lora"] = asdict(lora)

    def on_checkpoint(t, is_best, reason):
        states = gathered()
        streams = all_ranks_stream_state(t.state_tensors(), dist_info)
        if not main_rank:
            return
        state = {**t.trainer_state(), "training_history": history + [{**run_entry, "steps": t.opt_step}],
                 "run_args": saved_args, "data": data.identity}
        save_checkpoint(ckpt_root, t.opt_step, model, t.optimizer, t.schedule, state,
                        keep=tcfg.keep_checkpoints, is_best=bool(is_best),
                        extra_tensors={f"stream_state.{k}": v for k, v in streams.items()},
                        extra=ckpt_extra, **states)

    interactive = sys.stdin is not None and sys.stdin.isatty() and main_rank

    def stop_requested() -> bool:
        if args.max_steps is not None and trainer.opt_step >= args.max_steps:
            return True
        if stop["flag"] and interactive:  # a person is there: ask (non-interactive runs just save and stop)
            bar.clear()
            answer = input("\ninterrupted: [p]ause (save a checkpoint and exit), [s]top without saving, "
                           "or [c]ontinue? ").strip().lower()[:1]
            if answer == "c":
                stop["flag"] = False
            elif answer == "s":
                raise KeyboardInterrupt
        return stop["flag"]
    try:
        result = trainer.run(on_checkpoint=on_checkpoint, progress=progress, stop_requested=stop_requested)
    finally:
        bar.close()
        signal.signal(signal.SIGINT, previous_handler)
    if result["stopped"] and stop["flag"]:
        print(f"stopped at step {trainer.opt_step}; resume with --resume-from-ckpt {ckpt_root}")
        return 0
    history.append({**run_entry, "steps": trainer.opt_step})
    final_state = gathered().get("model_state")
    if not main_rank:
        return 0
    if lora is not None:
        from ..lora import save_adapter

        save_adapter(out_dir, model, lora, {"base_model_path": str(args.model_path), "training_history": history,
                                            "prompt_template": data.template})
        print(f"saved LoRA adapter {out_dir} (adapter_config.json, adapter_model.safetensors); fold it into "
              f"a model with: hierarchos merge-lora --model-path {args.model_path} --lora-adapter-path {out_dir} "
              "--out-dir MERGED")
        return 0
    save_model_files(out_dir, model, tokenizer, history=history, extra={"prompt_template": data.template},
                     state=final_state)
    print(f"saved model directory {out_dir} (model.safetensors, hierarchos_config.json, tokenizer)")
    if args.quantize_on_complete:
        from ..quant.quantized_dir import quantize_model_dir
        from .quantize import default_out_dir, report

        quant_dir = default_out_dir(str(out_dir), args.qtype)
        print(report(quantize_model_dir(out_dir, quant_dir, args.qtype), quant_dir))
    return 0
