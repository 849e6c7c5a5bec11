"""`ckpt-2-inf`: turn a training checkpoint into a clean inference model directory."""

from __future__ import annotations

import argparse

HELP = "turn a training checkpoint into a clean model directory (weights, config, tokenizer)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt-input", required=True, help="checkpoint step dir, or a checkpoints/ root (uses latest)")
    p.add_argument("--inf-output", required=True, help="model directory to write")
    p.add_argument("--ckpt-tok-path", default=None,
                   help="tokenizer to bundle (default: the training run's, found next to the checkpoints)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..data.tokenizers import load_tokenizer
    from ..lora import checkpoint_to_model_dir  # plain checkpoints go on to io

    tok_path = args.ckpt_tok_path
    if tok_path is None:  # OUT_DIR/checkpoints/step-N -> OUT_DIR holds the run's tokenizer
        for candidate in (Path(args.ckpt_input), *Path(args.ckpt_input).resolve().parents[:2]):
            if (candidate / "tokenizer.json").exists() or (candidate / "hierarchos_tokenizer.json").exists():
                tok_path = str(candidate)
                break
    tokenizer = load_tokenizer(tok_path) if tok_path else None
    out = checkpoint_to_model_dir(args.ckpt_input, args.inf_output, tokenizer=tokenizer)
    print(f"wrote model directory {out}" + ("" if tokenizer else " (no tokenizer found: pass --ckpt-tok-path)"))
    return 0
