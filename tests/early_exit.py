"""A tiny model whose early exit really happens: halting and freezing split the plan points and tokens.

Shared by the parity tests (tests/test_model.py, tests/test_attention.py): a parity test with early
exit on proves nothing unless some plan points halt before others and some tokens freeze.
"""

from __future__ import annotations

import torch

from hierarchos.config import tiny_config
from hierarchos.model import HierarchosLM

# Early exit on: thresholds low enough that some plan points halt and some tokens freeze.
EARLY_EXIT = dict(h_halt_thresh=0.45, l_conv_atol=0.06, max_h_steps=3)


def model_tokens(seed, batch, length):
    return torch.randint(0, 7, (batch, length), generator=torch.Generator().manual_seed(seed))


def calibrated(seed, dtype=torch.float64, **overrides):
    """A tiny model whose halting and freezing split the plan points and tokens roughly in half.

    At init the manager's outputs at plan points share one large component, so every plan point
    halts at the same step, and the drift head's bias keeps every token moving. One calibration
    pass fixes that: the halting head looks along the plan points' first principal direction,
    centred on their mean, and the drift head is centred with l_conv_atol at the 60th percentile of its steps."""
    torch.manual_seed(seed)
    model = HierarchosLM(tiny_config(**{**EARLY_EXIT, **overrides})).to(dtype).eval()
    seen = {}
    hooks = [getattr(model.reasoner, name).register_forward_hook(
        lambda mod, args, out, name=name: seen.setdefault(name, []).append(args[0].detach().flatten(0, -2)))
        for name in ("h_halt_proj", "l_drift_proj")]
    with torch.no_grad():
        model(model_tokens(seed + 1, 2, 16))
        for hook in hooks:
            hook.remove()
        for name in seen:
            seen[name] = torch.cat(seen[name])
        plan = seen["h_halt_proj"]
        centred = plan - plan.mean(0)
        direction = torch.linalg.svd(centred, full_matrices=False).Vh[0]
        spread = (centred @ direction).std().clamp(min=1e-6)
        model.reasoner.h_halt_proj.weight.copy_(2.0 * direction / spread)
        model.reasoner.h_halt_proj.bias.copy_(-(2.0 * direction / spread) @ plan.mean(0))
        worker = seen["l_drift_proj"]
        drift = model.reasoner.l_drift_proj
        drift.weight.normal_(0, 0.3)
        drift.bias.copy_(-drift.weight @ worker.mean(0))
        step = torch.tanh(drift(worker)).abs().amax(-1)
    return _with_atol(model, float(step.quantile(0.6)))


def _with_atol(model, atol):
    model.cfg = model.cfg.replace(l_conv_atol=atol)
    model.reasoner.cfg = model.cfg
    return model
