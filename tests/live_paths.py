"""Give x070's zero-initialised paths small random values, for gradient checks.

x070's initial values (the default wiring) zero each RWKV-7 block's output projection and the
`down` side of its low-rank paths, so every block starts as the identity and, at the first step,
nothing inside a time mix gets a gradient. A test asking "does every parameter get a gradient?" of
such a model would then fail for a reason that is by design, or, written around it, prove nothing
about the block's inside. `wake_zero_paths` fills exactly those tensors from a seeded generator.
"""

from __future__ import annotations

import torch

ZERO_AT_INIT = ("time_mix.output.weight", "time_mix.decay_down", "time_mix.iclr_down", "time_mix.gate_down",
                "time_mix.value_residual_down")


def wake_zero_paths(model: torch.nn.Module, seed: int, std: float = 0.05) -> list[str]:
    """Fill every all-zero tensor named in ZERO_AT_INIT with N(0, std^2) values; returns their names."""
    g = torch.Generator().manual_seed(seed)
    woken = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(ZERO_AT_INIT) and not p.any():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p) * std)
                woken.append(name)
    return woken
