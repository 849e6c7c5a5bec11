"""`eval`: score a model directory on lm-eval tasks (offline local tasks or hub tasks) and/or bits per byte.
A quantized model (its directory or the .gguf file alone) is scored as `chat` runs it: on the C++ kernel
(the numpy reference without it) or, with --device vulkan, with its matmuls on the Vulkan device.

Prints one table of metrics on stdout; `--output PATH.json` also writes them (atomically) with the
lm-eval config of the run. Task names pass through to lm-eval; the local ones ship in
hierarchos/eval_tasks and need no network.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from ..errors import HierarchosError

HELP = "evaluate a model directory on lm-eval tasks (local Shakespeare tasks work offline) and bits per byte"


def _limit(text: str) -> int | float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of examples or a fraction below 1, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive limit, got {text!r}")
    return value if value < 1 else int(value)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..eval_tasks import local_task_names

    p.add_argument("--model-path", "--model_path", required=True, metavar="DIR",
                   help="model directory (train --out-dir, ckpt-2-inf output, or a checkpoint step-* dir "
                        "with --tokenizer-path), or a quantized directory / .gguf file (quantize --out-dir): "
                        "scored on the same kernel as chat")
    p.add_argument("--tokenizer-path", metavar="DIR",
                   help="tokenizer (default: the model directory's; a checkpoint's is in the run's --out-dir)")
    p.add_argument("--tasks", nargs="+", metavar="TASK", default=[],
                   help=f"lm-eval task names; offline local tasks: {', '.join(local_task_names())}; "
                        "hub tasks such as hellaswag or arc_easy need their dataset cached or the hub reachable")
    p.add_argument("--batch-size", "--batch_size", "--eval-batch-size", type=int, default=8, metavar="N",
                   help="requests scored per forward (default 8)")
    p.add_argument("--limit", type=_limit, default=None, metavar="N",
                   help="at most N examples per task (or a fraction below 1)")
    p.add_argument("--num-fewshot", type=int, default=None, metavar="K", help="few-shot examples (task default: 0)")
    p.add_argument("--device", default="auto",
                   help="auto | cpu | cuda | cuda:N; quantized models: auto | cpu | vulkan")
    p.add_argument("--chunk-size", type=int, default=512, metavar="T",
                   help="tokens per row fed per forward; longer inputs carry the state across pieces (default 512)")
    p.add_argument("--max-gen-toks", type=int, default=256, metavar="N",
                   help="generation cap for generate_until tasks that set none (default 256)")
    p.add_argument("--bootstrap-iters", type=int, default=1000, metavar="N",
                   help="bootstrap draws for standard errors (0: none; default 1000)")
    p.add_argument("--bpb-file", metavar="TEXTFILE", help="also report bits per byte on this UTF-8 text file")
    p.add_argument("--output", metavar="PATH.json", help="write the metrics and run config as JSON")


def _number(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 1e6 else f"{value:.4g}"


def format_table(metrics: dict[str, dict[str, float]]) -> str:
    """task | metric | value | stderr, one metric per line."""
    rows = [("task", "metric", "value", "stderr")]
    for task, row in metrics.items():
        for metric, value in row.items():
            if metric.endswith("_stderr") or "_stderr," in metric:
                continue
            stderr_key = metric.replace(",", "_stderr,", 1) if "," in metric else f"{metric}_stderr"
            stderr = row.get(stderr_key)
            rows.append((task, metric, _number(value), "" if stderr is None else _number(stderr)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(r, widths)).rstrip() for r in rows)


def run(args: argparse.Namespace) -> int:
    if not args.tasks and not args.bpb_file:
        raise HierarchosError("nothing to evaluate: pass --tasks NAME ... and/or --bpb-file TEXTFILE")
    for flag in ("batch_size", "chunk_size", "max_gen_toks"):
        if getattr(args, flag) < 1:
            raise HierarchosError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.output and not args.output.endswith(".json"):
        raise HierarchosError(f"--output {args.output}: expected a .json path")

    from .. import evaluate
    from ..io import TRAINER_STATE_FILE, atomic_write_text

    if not args.tokenizer_path and (Path(args.model_path) / TRAINER_STATE_FILE).is_file():
        raise HierarchosError(f"{args.model_path}: a training checkpoint holds no tokenizer; pass --tokenizer-path "
                              "with the run's --out-dir (or export it with `hierarchos ckpt-2-inf`)")

    if args.tasks:
        evaluate.lm_class()  # a missing lm-eval is one clear line before the model loads
    tasks = evaluate.load_tasks(args.tasks) if args.tasks else []  # a bad task name fails before loading weights
    # a quantized directory or .gguf file runs on the same kernel path as `chat` (or --device vulkan)
    model, tokenizer, kind = evaluate.load_model(args.model_path, args.device, args.tokenizer_path)
    if args.tasks:
        lm = evaluate.lm_class()(model=model, tokenizer=tokenizer, batch_size=args.batch_size,
                                 chunk_size=args.chunk_size, max_gen_toks=args.max_gen_toks)
        lm.name = args.model_path
    where = kind if kind != "full precision" else f"on {next(model.parameters()).device}"
    print(f"model: {args.model_path} ({model.num_parameters():,} parameters, tokenizer {tokenizer.name}) "
          f"{where}", file=sys.stderr)

    metrics: dict[str, dict[str, float]] = {}
    report: dict = {"model_path": args.model_path, "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if tasks:
        outcome = evaluate.evaluate_tasks(lm, tasks, limit=args.limit, num_fewshot=args.num_fewshot,
                                          bootstrap_iters=args.bootstrap_iters)
        metrics.update(outcome["metrics"])
        results = outcome["results"]
        kept = ("config", "n-shot", "versions", "n-samples", "lm_eval_version", "git_hash", "pretty_env_info")
        report["lm_eval"] = {key: results.get(key) for key in kept}
    if args.bpb_file:
        bpb = evaluate.bits_per_byte_file(args.bpb_file, model, tokenizer, chunk_size=args.chunk_size)
        report["bpb_file"] = bpb
        metrics[f"bpb:{Path(args.bpb_file).name}"] = {"bits_per_byte": bpb["bits_per_byte"],
                                           "token_perplexity": bpb["token_perplexity"]}
    report["metrics"] = metrics
    print(format_table(metrics))
    if args.output:
        atomic_write_text(args.output, json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote {args.output}", file=sys.stderr)
    return 0
