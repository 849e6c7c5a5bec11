"""Models for the LoRA tests (test_lora, test_lora_rules): a tiny byte-vocabulary model, and
adapters given random values (fresh ones have B = 0, no effect, so merging would test nothing)."""

from __future__ import annotations

import torch

from hierarchos.config import tiny_config
from hierarchos.model import HierarchosLM


def tiny_model(seed=0, **overrides) -> HierarchosLM:
    torch.manual_seed(seed)
    return HierarchosLM(tiny_config(vocab_size=260, **overrides))


def randomise_adapters(peft_model, seed=1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
