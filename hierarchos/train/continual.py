"""Continual learning (seed 002): keep training an existing model on new data, growing it as needed.

`train --model-path DIR` on new data:
  * tokenizer: the model's own, or `--tokenizer-path`. A char tokenizer is extended with the new
    data's unseen characters (old ids keep their characters); any other tokenizer must give every
    old id the same token as the model's (else one clear error), and may add tokens after them.
  * vocabulary: when the tokenizer has more tokens than the model, the embedding (tied head), ROSA
    and DeepEmbed tables grow (`grow_vocab`: old rows kept, old-token logits unchanged).
  * layers: with `--grow-every-chars N` the model holds one more manager and one more worker
    block for every N characters of training text in its history (this run's included), added
    by `add_layers` (identity at init, so the function is unchanged).
Each run's history entry records its characters and what grew, so the next run knows.
"""

from __future__ import annotations

from typing import Callable, Iterable

from ..data.tokenizers import Tokenizer, changed_ids, extend_char_tokenizer, load_tokenizer
from ..errors import HierarchosError


def continual_tokenizer(model_path: str, spec: str | None, texts: Iterable[str]) -> Tokenizer:
    """The tokenizer to continue training the model at `model_path` on `texts` with."""
    base = load_tokenizer(model_path)
    texts = list(texts)
    if spec is None or (spec == "char" and base.kind == "char"):
        return extend_char_tokenizer(base, texts) if base.kind == "char" else base
    tokenizer = load_tokenizer(spec, texts)
    changed = changed_ids(base, tokenizer)
    if changed:
        raise HierarchosError(
            f"--tokenizer-path {spec}: it gives old token ids other tokens than {model_path}'s tokenizer "
            f"({'; '.join(changed[:3])}); continue with the model's own tokenizer (drop --tokenizer-path), "
            "one that only appends tokens after it, or `char` for a char model")
    return tokenizer


def grow_for_data(model, vocab_size: int, history: list, chars: int | None, grow_every_chars: int | None,
                  *, allow_growth: bool = True, log: Callable[[str], None] = print):
    """Grow `model` for this run: vocabulary to `vocab_size`, layers by `--grow-every-chars`.
    Returns (model, record): `record` goes into this run's history entry."""
    from ..model.grow import add_layers, grow_vocab

    record: dict = {}
    old_vocab = model.cfg.vocab_size
    if vocab_size > old_vocab:
        if not allow_growth:
            raise HierarchosError(f"the tokenizer has {vocab_size} tokens, the model {old_vocab}: a LoRA finetune "
                                  "cannot grow the vocabulary; run `train --model-path` on this data first")
        model = grow_vocab(model, vocab_size)
        record["vocab_growth"] = [old_vocab, vocab_size]
        log(f"continual learning: vocabulary {old_vocab} -> {vocab_size} ({vocab_size - old_vocab} new tokens; "
            "old rows kept, new rows start near the mean)")
    if grow_every_chars:
        if grow_every_chars < 1:
            raise HierarchosError(f"--grow-every-chars {grow_every_chars}: must be a positive number of characters")
        seen = sum(int(entry.get("chars") or 0) for entry in history if isinstance(entry, dict)) + int(chars or 0)
        done = sum(int(entry.get("layer_growths") or 0) for entry in history if isinstance(entry, dict))
        due = seen // grow_every_chars - done
        if due > 0:
            if not allow_growth:
                raise HierarchosError("--grow-every-chars: a LoRA finetune cannot add layers; run "
                                      "`train --model-path` instead")
            cfg = model.cfg
            model = add_layers(model, h_layers=cfg.h_layers + due, l_layers=cfg.l_layers + due)
            record["layer_growths"] = due
            log(f"continual learning: {seen:,} characters seen -> {due} more manager and worker block(s) "
                f"({cfg.h_layers}+{cfg.l_layers} -> {model.cfg.h_layers}+{model.cfg.l_layers} layers; "
                "new blocks start as the identity)")
    return model, record
