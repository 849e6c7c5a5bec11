"""LoRA adapters through `peft`: which Linear layers take them, wrapping, saving, loading, merging.

A finetune wraps a loaded `HierarchosLM` in a `peft.PeftModel` (the base weights frozen, only the
low-rank A/B matrices train) and writes a standard peft adapter directory (`adapter_config.json`
+ `adapter_model.safetensors`) plus `hierarchos_adapter.json`: the base model's shape-determining
config, so that loading the adapter onto another architecture or size is a one-line error rather
than a shape traceback from deep inside peft. `merge_adapter` folds the adapter into the base
weights (`merge_and_unload`) and gives back a plain `HierarchosLM`; `checkpoint_to_model_dir` does
the same for a finetune's training checkpoint. This module sits above `io` (whose atomic writes it
uses); `io` never imports it.

Targets are named by group (`time_mix`, `channel_mix`, `memory`, `bridges`, `encoder`) or by a
module-name suffix (`time_mix.key`, `channel_mix.down`, `reasoner.h_to_context`). The tied output
head and the lookup tables (embedding, ROSA, DeepEmbed) are never targets: the head shares the
embedding's storage, and the tables are indexed, not multiplied (DESIGN 3.1).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import HierarchosError
from .io import WEIGHTS_FILE, atomic_files, load_weights, read_config, resolve_checkpoint, save_model_dir
from .io import checkpoint_to_model_dir as plain_checkpoint_to_model_dir
from .model import HierarchosLM

ADAPTER_META_FILE = "hierarchos_adapter.json"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"

TARGET_GROUPS = {
    # the token mixer of either block type: RWKV's time mix, or an attention block's projections
    "time_mix": ("time_mix.receptance", "time_mix.key", "time_mix.value", "time_mix.gate", "time_mix.output",
                 "attention.query", "attention.key", "attention.value", "attention.output"),
    "attention": ("attention.query", "attention.key", "attention.value", "attention.output"),
    "channel_mix": ("channel_mix.gate", "channel_mix.up", "channel_mix.down"),
    "memory": ("memory.query", "memory.target"),
    "bridges": ("reasoner.h_input_proj", "reasoner.l_feedback_proj", "reasoner.h_to_context",
                "reasoner.l_input_proj", "reasoner.l_drift_proj", "reasoner.l_to_out"),
    "encoder": ("encoder",),
}
DEFAULT_TARGETS = ("time_mix", "channel_mix")
# Config fields that fix the shapes of the weights an adapter attaches to.
SHAPE_FIELDS = ("vocab_size", "context_dim", "h_hidden", "l_hidden", "h_layers", "l_layers", "head_size",
                "ffn_mult", "persistent_dim", "ltm_slots", "ltm_key_dim", "ltm_val_dim", "use_deepembed",
                "deepembed_per_block", "use_rosa", "tm_gate")  # (only a full-rank time-mix gate is a Linear)


@dataclass
class LoraSettings:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))

    def validate(self) -> "LoraSettings":
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise HierarchosError(f"--lora_r {self.r!r}: must be a positive integer (e.g. 8)")
        if not self.alpha > 0:
            raise HierarchosError(f"--lora_alpha {self.alpha!r}: must be > 0 (e.g. 16)")
        if not 0.0 <= self.dropout < 1.0:
            raise HierarchosError(f"--lora-dropout {self.dropout!r}: must be in [0, 1)")
        if not self.targets:
            raise HierarchosError("--lora-target: name at least one group or module "
                                  f"(groups: {', '.join(TARGET_GROUPS)})")
        return self


def linear_names(model: torch.nn.Module) -> list[str]:
    """Full names of the Linear layers LoRA may target (never the tied head)."""
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name != "lm_head"]


def resolve_targets(model: torch.nn.Module, targets: list[str]) -> list[str]:
    """Expand groups and suffixes into the full module names they match, in model order."""
    names = linear_names(model)
    chosen: set[str] = set()
    for target in targets:
        if target in ("lm_head", "head"):
            raise HierarchosError("--lora-target lm_head: the output head is tied to the token embedding; "
                                  "LoRA cannot target it (pick from: " + ", ".join(TARGET_GROUPS) + ")")
        suffixes = TARGET_GROUPS.get(target, (target,))
        matched = [n for n in names if any(n == s or n.endswith("." + s) for s in suffixes)]
        if not matched:
            raise HierarchosError(
                f"--lora-target {target!r} matches no Linear layer of this model; use a group "
                f"({', '.join(TARGET_GROUPS)}) or a module suffix such as time_mix.key or channel_mix.down")
        chosen.update(matched)
    return [n for n in names if n in chosen]


def wrap(model: torch.nn.Module, settings: LoraSettings):
    """A `peft.PeftModel` around `model` with fresh adapters (B = 0: the function is unchanged)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise HierarchosError("LoRA needs the peft package: pip install peft") from None
    settings.validate()
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=resolve_targets(model, settings.targets), bias="none")
    return get_peft_model(model, config)


def base_model(peft_model) -> torch.nn.Module:
    return peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model


def shape_config(cfg: ModelConfig) -> dict:
    return {name: getattr(cfg, name) for name in SHAPE_FIELDS}


def adapter_files(directory: Path, peft_model, settings: LoraSettings, meta: dict) -> None:
    """Write the adapter's files into `directory` (a temp dir the caller publishes)."""
    peft_model.save_pretrained(str(directory), safe_serialization=True)
    (directory / "README.md").unlink(missing_ok=True)  # peft's model-card stub says nothing about us
    payload = {"lora": asdict(settings), "base_config": shape_config(base_model(peft_model).cfg), **meta}
    (directory / ADAPTER_META_FILE).write_text(json.dumps(payload, indent=2, sort_keys=True), encoding="utf-8")


def save_adapter(out_dir: str | os.PathLike, peft_model, settings: LoraSettings, meta: dict | None = None) -> Path:
    """Write the adapter files into `out_dir`, which may hold other things (a finetune's checkpoints
    and metrics): each file is staged and renamed into place, the weights first and our metadata
    last (`io.atomic_files`), so a kill in between never leaves new metadata beside old weights."""
    with atomic_files(out_dir, "adapter-files", first=(PEFT_WEIGHTS_FILE,), last=(ADAPTER_META_FILE,)) as tmp:
        adapter_files(tmp, peft_model, settings, dict(meta or {}))
    return Path(out_dir)


def read_adapter_meta(adapter_dir: str | os.PathLike) -> dict:
    directory = Path(adapter_dir)
    if not directory.is_dir():
        raise HierarchosError(f"{directory}: LoRA adapter directory not found; pass the --out-dir of a finetune")
    if not (directory / PEFT_CONFIG_FILE).is_file() or not (directory / PEFT_WEIGHTS_FILE).is_file():
        found = ", ".join(sorted(p.name for p in directory.iterdir())[:12]) or "nothing"
        raise HierarchosError(f"{directory}: not a LoRA adapter directory (needs {PEFT_CONFIG_FILE} and "
                              f"{PEFT_WEIGHTS_FILE}; found: {found}); pass the --out-dir of a finished finetune")
    meta_path = directory / ADAPTER_META_FILE
    if not meta_path.is_file():
        return {}
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HierarchosError(f"{meta_path}: not valid JSON ({exc}); re-run the finetune or delete the file") from None
    if not isinstance(meta, dict):
        raise HierarchosError(f"{meta_path}: expected a JSON object; re-run the finetune")
    return meta


def check_compatible(cfg: ModelConfig, meta: dict, adapter_dir: str | os.PathLike, model_path: str = "the model") -> None:
    """One line naming the fields where the adapter's base and this model differ."""
    base = meta.get("base_config")
    if not isinstance(base, dict):
        return
    ours = shape_config(cfg)
    diff = [f"{k}={base.get(k)!r} (model has {ours[k]!r})" for k in SHAPE_FIELDS if k in base and base[k] != ours[k]]
    if diff:
        raise HierarchosError(f"{adapter_dir}: this LoRA adapter was trained for another architecture or size: "
                              f"{', '.join(diff[:6])}; use it with the base model it was trained on, not {model_path}")


def load_adapter(model: torch.nn.Module, adapter_dir: str | os.PathLike, model_path: str = "the model"):
    """The base `model` wrapped with the adapter in `adapter_dir`, checked against the base first."""
    try:
        from peft import PeftModel
    except ImportError:
        raise HierarchosError("LoRA needs the peft package: pip install peft") from None
    meta = read_adapter_meta(adapter_dir)
    check_compatible(model.cfg, meta, adapter_dir, model_path)
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except Exception as exc:  # peft/safetensors raise many types: foreign names/shapes, or a corrupt file
        reason = " ".join(str(exc).split())[:240] or type(exc).__name__
        raise HierarchosError(f"{adapter_dir}: the LoRA adapter does not fit {model_path} or is corrupt "
                              f"({reason}); use it with the base model it was trained on, or re-run the "
                              "finetune") from None


def merge_adapter(peft_model) -> torch.nn.Module:
    """Fold the adapter into the base weights: a plain HierarchosLM computing the same function."""
    return peft_model.merge_and_unload()


def checkpoint_to_model_dir(ckpt_path: str | os.PathLike, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    """`ckpt-2-inf`: a clean model directory from a training checkpoint. A LoRA finetune's
    checkpoint holds the wrapped model's weights: its adapters are rebuilt from the settings in
    its config and merged; a plain checkpoint goes through `io.checkpoint_to_model_dir`."""
    directory = resolve_checkpoint(ckpt_path)
    cfg, meta = read_config(directory)
    if not isinstance(meta.get("lora"), dict):
        return plain_checkpoint_to_model_dir(directory, out_dir, tokenizer)
    wrapped = wrap(HierarchosLM(cfg), LoraSettings(**meta["lora"]))
    load_weights(wrapped, directory / WEIGHTS_FILE)
    model = merge_adapter(wrapped)
    model.memory.source_names = list(meta.get("memory_sources") or [])
    extra = {k: meta[k] for k in meta.get("extra_keys") or [] if k in meta and k != "lora"}
    return save_model_dir(out_dir, model, tokenizer, history=meta.get("training_history"), extra=extra)
