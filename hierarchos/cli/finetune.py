"""`finetune`: LoRA-finetune a trained model (peft) on new data; writes a standard adapter directory.

Takes every data, optimisation and run flag of `train` (the same loop, checkpoints, resume and
Ctrl+C handling), loads `--model-path`, freezes it, and trains only LoRA adapters on the chosen
Linear layers. OUT_DIR gets `adapter_config.json` + `adapter_model.safetensors` (peft's format)
and `hierarchos_adapter.json`; `merge-lora` folds them into a standalone model directory.
"""

from __future__ import annotations

import argparse

from ..errors import HierarchosError
from . import train as train_cli

HELP = "LoRA-finetune a trained model on new data (writes a peft adapter directory)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    train_cli.add_arguments(p)
    p.set_defaults(out_dir="./hierarchos_lora")
    lora = p.add_argument_group("lora")
    lora.add_argument("--lora_r", "--lora-r", type=int, default=8, help="adapter rank (default 8)")
    lora.add_argument("--lora_alpha", "--lora-alpha", type=float, default=16.0, help="scaling alpha (default 16)")
    lora.add_argument("--lora-dropout", "--lora_dropout", type=float, default=0.05, help="dropout on the adapter input")
    lora.add_argument("--lora-target", "--lora_target", nargs="+", default=None, metavar="NAME",
                      help="groups (time_mix, channel_mix, memory, bridges, encoder) or module suffixes "
                           "(e.g. time_mix.key); default: time_mix channel_mix")


def run(args: argparse.Namespace) -> int:
    from ..lora import DEFAULT_TARGETS, LoraSettings

    if not args.model_path:
        raise HierarchosError("finetune needs --model-path DIR: the trained model directory to adapt")
    if args.quantize_on_complete:
        raise HierarchosError("finetune writes an adapter, not a model: run merge-lora, then quantize the merged "
                              "directory (drop --quantize-on-complete)")
    settings = LoraSettings(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                            targets=list(args.lora_target or DEFAULT_TARGETS)).validate()
    return train_cli.run(args, lora=settings)
