"""Command-line interface: one argparse subcommand per module in this package.

`main(argv)` parses, dispatches, and is the one place that turns a `HierarchosError`
into a single `error: ...` line with exit code 2 (`--debug` shows the traceback instead).
Each command module exposes `HELP`, `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

from ..errors import HierarchosError

# subcommand name -> module under hierarchos.cli (train, chat, quantize, ... arrive later)
COMMANDS = {
    "train": "train",
    "ckpt-2-inf": "ckpt_2_inf",
    "demo": "demo",
    "chat": "chat",
    "quantize": "quantize",
    "eval": "eval",
    "finetune": "finetune",
    "merge-lora": "merge_lora",
    "puzzle": "puzzle",
}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _add_global_flags(parser: argparse.ArgumentParser, *, in_subcommand: bool) -> None:
    # The same flags are accepted before and after the subcommand; in the subcommand's
    # parser their defaults are SUPPRESS so they never overwrite a value given earlier.
    default = (lambda value: argparse.SUPPRESS) if in_subcommand else (lambda value: value)
    parser.add_argument("--debug", action="store_true", default=default(False),
                        help="show full tracebacks instead of one-line errors")
    parser.add_argument("--threads", type=_positive_int, metavar="N", default=default(None),
                        help="number of CPU threads torch may use (default: torch's choice)")


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one `error:` line with the fix (see --help), exit code 2, like every other
    error of the CLI (argparse would print the whole usage block first)."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message}; see `{self.prog} --help`\n")


def _load(name: str) -> ModuleType:
    return importlib.import_module(f"{__name__}.{COMMANDS[name]}")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="hierarchos",
        description="Train, finetune, quantize and chat with hierarchos hybrid recurrent language models.")
    _add_global_flags(parser, in_subcommand=False)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = _load(name)
        sub = subparsers.add_parser(name, help=module.HELP, description=module.HELP)
        _add_global_flags(sub, in_subcommand=True)
        module.add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: usage error (2) or --help (0)
        return exc.code if isinstance(exc.code, int) else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2

    try:
        if args.threads is not None:
            import os

            import torch

            torch.set_num_threads(args.threads)
            os.environ["HIERARCHOS_THREADS"] = str(args.threads)  # the C++ kernel reads it when loaded
        return int(_load(args.command).run(args) or 0)
    except HierarchosError as exc:
        if args.debug:
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130


def script_entry(script_main) -> None:
    """Entry for scripts/*.py: run `script_main()`, turning a HierarchosError into one line + exit 2."""
    try:
        sys.exit(script_main())
    except HierarchosError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        sys.exit(exc.exit_code)
