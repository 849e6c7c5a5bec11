"""Sampling and the token-by-token generation loop.

The prompt is prefilled with one parallel forward; then each new token is one `step` on a
fixed-size state (no re-running the prompt, no growing cache). Sampling applies the
repetition penalty, temperature, top-k and top-p in that order; temperature 0 is greedy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class SamplingConfig:
    temperature: float = 0.7
    top_k: int = 40
    top_p: float = 0.9
    repetition_penalty: float = 1.2
    max_new_tokens: int = 128
    seed: int | None = None


def sample_next(logits: torch.Tensor, history: list[int], cfg: SamplingConfig,
                generator: torch.Generator | None = None) -> int:
    """Pick the next token id from logits (V,) given the ids seen so far."""
    logits = logits.float().clone()
    if cfg.repetition_penalty != 1.0 and history:
        seen = torch.tensor(sorted(set(history)), device=logits.device)
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / cfg.repetition_penalty, picked * cfg.repetition_penalty)
    if cfg.temperature <= 0:
        return int(logits.argmax())
    logits = logits / cfg.temperature
    if 0 < cfg.top_k < logits.numel():
        kth = torch.topk(logits, cfg.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= cfg.top_p  # keep the token that crosses top_p
        logits[order[drop]] = float("-inf")
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@torch.no_grad()
def generate(model, prompt_ids: list[int], cfg: SamplingConfig, *, state=None, eos_id: int | None = None,
             on_token: Callable[[int, object], bool | None] | None = None,
             should_stop: Callable[[], bool] = lambda: False, generator: torch.Generator | None = None,
             keep_eos: bool = False, **caps):
    """Prefill `prompt_ids` on `state`, then sample up to `max_new_tokens` with `step`.

    `on_token(token, step_output)` runs after each token went through the model (its output
    carries the per-token aux totals); returning True ends generation there. `should_stop()` is
    checked before each token (Ctrl+C). With `keep_eos` a sampled EOS is appended to the returned
    ids (not fed to the model). Returns (new token ids, final state). `caps`: reasoning caps."""
    if not prompt_ids:
        raise ValueError("generate needs at least one prompt token")
    device = next(model.parameters()).device
    if generator is None and cfg.seed is not None:
        generator = torch.Generator().manual_seed(cfg.seed)
    if state is None:
        state = model.init_state(1, device=device)
    history = list(prompt_ids)
    out = model(torch.tensor([prompt_ids], device=device), state, **caps)
    logits, state = out.logits[0, -1], out.state
    new: list[int] = []
    for _ in range(cfg.max_new_tokens):
        if should_stop():
            break
        token = sample_next(logits, history, cfg, generator)
        if eos_id is not None and token == eos_id:
            if keep_eos:
                new.append(token)
            break
        new.append(token)
        history.append(token)
        out = model.step(torch.tensor([token], device=device), state, **caps)
        logits, state = out.logits[0], out.state
        if on_token is not None and on_token(token, out):
            break
    return new, state
