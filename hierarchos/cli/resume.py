"""`train --resume-from-ckpt DIR`: what a checkpoint restores on its own, and which flags may change.

A checkpoint's trainer_state.json carries the run's flags (`run_args`); resuming with the one flag
restores them (data, tokenizer, window, batch, schedule, run length), the model is rebuilt from the
checkpoint's own config, and the data position comes from the trainer state. Flags given again
override the saved ones where the seeds say they may (epochs, --max-steps, --override-scheduling
with new rates); architecture or data-layout flags that contradict the checkpoint are one error line.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import HierarchosError

GIVEN = "given_flags"  # the Namespace attribute: dests of the flags on the command line

# never restored from a checkpoint: how to resume, where to run, and one-off actions
NOT_RESTORED = {"resume_from_ckpt", "override_scheduling", "device", "cuda_graphs", "fsdp", "reset_halt_bias",
                "model_path", "log_file", "auto_max_length", "training_chunk_size", "command", "debug",
                "threads", GIVEN}
# the data layout a position in the data means something for: a different value is an error
LAYOUT = ("train", "hf_dataset", "hf_dataset_config", "hf_dataset_split", "text_column", "prompt_column",
          "completion_column", "kayla", "pre_chunked_dataset", "pre_pt_dataset", "max_length", "batch_size",
          "tokenizer_path", "seed", "shuffle")
RUN_LENGTH = ("epochs", "max_steps")  # either given on resume: the other is not restored


def track_given(parser: argparse.ArgumentParser, first_action: int = 0) -> None:
    """Make the parser's actions from index `first_action` on record their dest in
    `namespace.given_flags` when their flag is on the command line (argparse fills defaults
    silently, so `--epochs 3` and no --epochs look alike otherwise)."""
    for action in parser._actions[first_action:]:
        base = type(action)
        if getattr(base, "_records_given", False):
            continue

        def __call__(self, parser, namespace, values, option_string=None, _base=base):
            given = getattr(namespace, GIVEN, None)
            if given is None:
                given = set()
                setattr(namespace, GIVEN, given)
            given.add(self.dest)
            _base.__call__(self, parser, namespace, values, option_string)

        action.__class__ = type(base.__name__, (base,), {"__call__": __call__, "_records_given": True})


def given_flags(args: argparse.Namespace) -> set[str]:
    return set(getattr(args, GIVEN, None) or ())


def run_args(args: argparse.Namespace) -> dict:
    """The flags a checkpoint keeps (JSON values only)."""
    kept = {}
    for key, value in vars(args).items():
        if key in NOT_RESTORED or key.startswith("_") or callable(value):
            continue
        if value is None or isinstance(value, (bool, int, float, str)) or (
                isinstance(value, list) and all(isinstance(v, (bool, int, float, str)) for v in value)):
            kept[key] = _absolute(key, value)
    return kept


PATHS = ("train", "val", "token_cache")  # kept absolute: a resume may start from another directory


def _absolute(key: str, value):
    return str(Path(value).expanduser().resolve()) if key in PATHS and isinstance(value, str) else value


@dataclass
class Resume:
    checkpoint: Path   # the step directory
    run_dir: Path      # OUT_DIR of the run that wrote it (its tokenizer, metrics)
    state: dict        # trainer_state.json
    config: object     # the checkpoint's ModelConfig
    meta: dict         # the rest of its hierarchos_config.json


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def prepare(args: argparse.Namespace, arch_flags: tuple[str, ...]) -> Resume:
    """Read the checkpoint, restore the flags not given on this command line into `args`, and check
    that the given ones do not contradict it. Reads only JSON (no weights yet)."""
    from ..io import CONFIG_FILE, TRAINER_STATE_FILE, read_config_payload, resolve_checkpoint

    step_dir = resolve_checkpoint(args.resume_from_ckpt)
    texts = {}
    for name in (TRAINER_STATE_FILE, CONFIG_FILE):
        try:
            texts[name] = json.loads((step_dir / name).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise HierarchosError(f"{step_dir / name}: missing from the checkpoint; resume from another "
                                  "checkpoint") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HierarchosError(f"{step_dir / name}: not valid JSON ({' '.join(str(exc).split())}); the "
                                  "checkpoint is corrupt, resume from another one") from None
    state = texts[TRAINER_STATE_FILE]
    if not isinstance(state, dict):
        raise HierarchosError(f"{step_dir / TRAINER_STATE_FILE}: expected a JSON object; the checkpoint is corrupt")
    config, meta = read_config_payload(texts[CONFIG_FILE], str(step_dir / CONFIG_FILE))
    given = given_flags(args)
    for name in arch_flags:  # the architecture is the checkpoint's
        value = getattr(args, name, None)
        if name in given and value is not None and getattr(config, name, value) != value:
            raise HierarchosError(f"{_flag(name)} {value} contradicts the checkpoint ({name} = "
                                  f"{getattr(config, name)} in {step_dir}); drop the flag to resume, or start "
                                  "a new run without --resume-from-ckpt")
    saved = state.get("run_args")
    if isinstance(saved, dict):
        for name in LAYOUT:
            if name in given and name in saved and saved[name] != _absolute(name, getattr(args, name, None)):
                raise HierarchosError(f"{_flag(name)} {getattr(args, name)} contradicts the checkpoint (the run "
                                      f"used {_flag(name)} {saved[name]}, {step_dir}); drop the flag to resume "
                                      "where it stopped, or start a new run without --resume-from-ckpt")
        skip = set(RUN_LENGTH) if given & set(RUN_LENGTH) else set()
        for name, value in saved.items():
            if name in given or name in NOT_RESTORED or name in skip or not hasattr(args, name):
                continue
            setattr(args, name, value)
    run_dir = step_dir.parent.parent  # OUT_DIR/checkpoints/step-N
    if "out_dir" not in given:
        args.out_dir = str(run_dir)
    return Resume(step_dir, run_dir, state, config, meta)
