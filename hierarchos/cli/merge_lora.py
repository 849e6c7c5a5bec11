"""`merge-lora`: fold a LoRA adapter into its base model and write a standalone model directory."""

from __future__ import annotations

import argparse
from datetime import datetime, timezone

HELP = "fold a LoRA adapter (from finetune) into its base model: a standalone model directory"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-path", "--model_path", required=True, metavar="DIR", help="the base model directory")
    p.add_argument("--lora-adapter-path", "--lora_adapter_path", required=True, metavar="DIR",
                   help="the adapter directory written by finetune")
    p.add_argument("--out-dir", "--out_dir", required=True, metavar="DIR", help="model directory to write")


def run(args: argparse.Namespace) -> int:
    from ..data.tokenizers import load_tokenizer
    from ..io import load_model_dir, save_model_dir
    from ..lora import load_adapter, merge_adapter, read_adapter_meta

    model, meta = load_model_dir(args.model_path)
    adapter_meta = read_adapter_meta(args.lora_adapter_path)
    merged = merge_adapter(load_adapter(model, args.lora_adapter_path, args.model_path))
    history = adapter_meta.get("training_history")
    if not isinstance(history, list):  # an adapter from elsewhere: keep the base's history, note the merge
        history = list(meta.get("training_history") or [])
        history.append({"dataset": f"lora:{args.lora_adapter_path}", "template": None, "tokens": None,
                        "date": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    extra = {k: meta[k] for k in meta.get("extra_keys") or [] if k in meta}
    if adapter_meta.get("prompt_template"):
        extra["prompt_template"] = adapter_meta["prompt_template"]
    out = save_model_dir(args.out_dir, merged, load_tokenizer(args.model_path), history=history, extra=extra)
    print(f"wrote model directory {out} (base {args.model_path} + adapter {args.lora_adapter_path}, merged)")
    return 0
