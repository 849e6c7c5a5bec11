"""Grow a trained model directory without changing what it computes (hierarchos.model.grow).

    python scripts/expand_model.py --old-model-path runs/tiny --output-dir runs/tiny-grown \
        --context_dim 512 --h_layers 3 --l_layers 3 --ltm_slots 2048 --vocab_size 50304

Any ModelConfig field may be given, with dashes or underscores. vocab_size, ltm_slots, the widths
(whole multiples of the old ones) and the layer counts grow, and use_rosa / use_deepembed /
deepembed_per_block turn on, by function-preserving constructions;
fields that do not change parameter shapes (max_length, h_cycles, ...) are copied into the new
config as given. The tokenizer, memory metadata, extras such as prompt_template and the training
history are kept, plus one history entry describing the growth. The directory is written atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from hierarchos.cli import OneLineParser  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

from hierarchos import __version__  # noqa: E402
from hierarchos.config import FIELD_ALIASES, ModelConfig  # noqa: E402
from hierarchos.data.tokenizers import META_FILE, TOKENIZER_FILE, load_tokenizer  # noqa: E402
from hierarchos.errors import HierarchosError  # noqa: E402
from hierarchos.io import (CONFIG_FILE, WEIGHTS_FILE, load_model_dir, read_config_payload,  # noqa: E402
                           recover_interrupted, save_model_dir)
from hierarchos.model import HierarchosLM  # noqa: E402
from hierarchos.model.grow import FEATURES, FIXED, GROWABLE, expand, growth_summary  # noqa: E402

FIELDS = {f.name: f for f in dataclasses.fields(ModelConfig)}
SHAPE_FIELDS = (*GROWABLE, *FEATURES, *FIXED)  # the fields that decide the weights' shapes


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _field_type(name: str):
    default = FIELDS[name].default
    return _bool if isinstance(default, bool) else type(default)


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old-model-path", "--old_model_path", required=True,
                        help="model directory to grow (as written by `train --out-dir`)")
    parser.add_argument("--output-dir", "--output_dir", "--output-path", "--output_path", dest="output_dir",
                        required=True, help="new model directory (must differ from the old one)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the new parameters' init (default 0)")
    group = parser.add_argument_group("config fields to change (None: keep)")
    for name in FIELDS:
        spellings = [name] + [alias for alias, target in FIELD_ALIASES.items() if target == name]
        flags = sorted({f"--{s}" for s in spellings} | {f"--{s.replace('_', '-')}" for s in spellings},
                       key=lambda flag: (flag != f"--{name}", flag))
        group.add_argument(*flags, dest=name, type=_field_type(name), default=None, metavar=name.upper())
    return parser.parse_args(argv)


# ---- reading the old directory, with clear messages for legacy files --------------------------

def _weight_names(path: Path) -> set[str]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            names = set(handle.keys())
            aliases = json.loads((handle.metadata() or {}).get("hierarchos_aliases", "{}"))
    except FileNotFoundError:
        raise HierarchosError(f"{path}: weights file missing; the save was incomplete, "
                              "pick another model directory") from None
    except Exception as exc:  # safetensors raises its own error types for bad headers
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise HierarchosError(f"{path}: weights file is truncated or corrupt ({reason}); "
                              "re-save it or restore it from a checkpoint") from None
    return names | {alias for alias, target in aliases.items() if target in names}


def check_legacy(old_dir: Path) -> list[str]:
    """Explain, in one line, an old directory the current code cannot load: a config JSON lacking
    a field the weights need, or weights lacking a tensor. Returns notes for fields that were
    absent but whose defaults fit the weights."""
    config_path, weights_path = old_dir / CONFIG_FILE, old_dir / WEIGHTS_FILE
    if not config_path.is_file():
        return []  # load_model_dir explains a directory that is not a model directory
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return []  # load_model_dir's message names the line and column
    if not isinstance(data, dict):
        return []
    present = {FIELD_ALIASES.get(key, key) for key in data}
    absent = [name for name in FIELDS if name not in present]
    cfg, _ = read_config_payload(data, str(config_path))
    with torch.device("meta"):  # shapes only, no memory
        expected = {name: tuple(t.shape) for name, t in HierarchosLM(cfg).state_dict().items()}
    found = _weight_names(weights_path)
    missing = [name for name in expected if name not in found]
    shaping = [name for name in absent if name in SHAPE_FIELDS]
    if shaping and (missing or _shape_mismatch(weights_path, expected, found)):
        fields = ", ".join(f"'{name}' (default {FIELDS[name].default!r} assumed)" for name in shaping)
        raise HierarchosError(f"{config_path}: lacks config field(s) {fields} and {WEIGHTS_FILE} does not fit "
                              "the defaults; add the fields with the values the model was trained with")
    if missing:
        names = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        written_by = data.get("hierarchos_version", "an older version")
        raise HierarchosError(f"{weights_path}: lacks tensor(s) {names} that this hierarchos ({__version__}) "
                              f"expects (written by hierarchos {written_by}); grow it with the version "
                              "that wrote it, or re-train / convert it with this version first")
    return [f"note: {config_path} has no '{name}' field; assumed the default {FIELDS[name].default!r} "
            "(the weights fit it)" for name in absent]


def _shape_mismatch(path: Path, expected: dict, found: set[str]) -> bool:
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        return any(tuple(handle.get_slice(name).get_shape()) != shape
                   for name, shape in expected.items() if name in found and name in handle.keys())


def _load_tokenizer(old_dir: Path):
    if not any((old_dir / name).is_file() for name in (META_FILE, TOKENIZER_FILE, "tokenizer_config.json")):
        return None
    return load_tokenizer(str(old_dir))


# ---- main ---------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    old_dir, out_dir = Path(args.old_model_path), Path(args.output_dir)
    if out_dir.resolve() == old_dir.resolve():
        raise HierarchosError(f"--output-dir {out_dir}: is the old model directory; write the grown model "
                              "to a new directory")
    changes = {name: getattr(args, name) for name in FIELDS if getattr(args, name) is not None}
    if not changes:
        raise HierarchosError("nothing to grow: pass at least one config field, e.g. --context_dim, "
                              "--h_layers, --ltm_slots or --vocab_size")
    recover_interrupted(old_dir)
    for note in check_legacy(old_dir):
        print(note, file=sys.stderr)
    model, meta = load_model_dir(old_dir)
    grown = expand(model, seed=args.seed, **changes)
    summary = growth_summary(model.cfg, grown.cfg)
    if not summary:
        raise HierarchosError(f"nothing to grow: every given field equals {old_dir}'s config")
    tokenizer = _load_tokenizer(old_dir)
    history = meta.get("training_history") or []
    history = list(history) if isinstance(history, list) else [history]
    history.append({"growth": summary, "from": str(old_dir), "seed": args.seed,
                    "date": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    extra = {key: meta[key] for key in meta.get("extra_keys") or [] if key in meta}
    save_model_dir(out_dir, grown, tokenizer, history=history, extra=extra)

    changed = ", ".join(f"{name} {old} -> {new}" for name, (old, new) in summary.items())
    print(f"{old_dir} -> {out_dir}: {changed}; parameters {model.num_parameters():,} -> "
          f"{grown.num_parameters():,} ({grown.num_parameters(with_deepembed=False):,} without DeepEmbed tables)")
    n_d = grown.cfg.context_dim // model.cfg.context_dim
    if n_d > 1 and "commitment_threshold" not in changes:
        print(f"note: the worker commitment sums over context_dim, so it is now {n_d}x larger (threshold scaled "
              f"to match); train with --commitment_loss_weight divided by {n_d} for the same loss")
    if "ltm_slots" in summary:
        print(f"note: the {grown.cfg.ltm_slots - model.cfg.ltm_slots} new memory slots are dormant (never read) "
              "until allocated: see hierarchos.model.grow.activate_slots")
    if tokenizer is None:
        print(f"note: {old_dir} has no tokenizer files; none copied")
    elif "vocab_size" in summary and tokenizer.vocab_size < grown.cfg.vocab_size:
        print(f"note: the tokenizer ({tokenizer.vocab_size} ids) was copied unchanged; ids "
              f"{tokenizer.vocab_size}..{grown.cfg.vocab_size - 1} have no text until the tokenizer is extended")
    return 0


if __name__ == "__main__":
    from hierarchos.cli import script_entry

    script_entry(main)
