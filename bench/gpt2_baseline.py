"""The baseline every speed benchmark compares against: a Hugging Face GPT-2 fitted to a parameter count.

`fit_gpt2` picks (n_layer, n_embd) whose count is closest to the target (keeping the preferred
width when that lands within 5%), `build_gpt2` builds it with PyTorch SDPA attention and no
dropout. Used by bench_forward (training steps) and bench_generate (`model.generate` with its KV cache).
"""

from __future__ import annotations


def gpt2_count(V, P, L, d):
    """Parameters of GPT2LMHeadModel (tied head): embeddings, positions, L blocks, final norm."""
    return V * d + P * d + L * (12 * d * d + 13 * d) + 2 * d


def fit_gpt2(target, V, P, prefer_d):
    """(n_layer, n_embd) with the count closest to target; n_embd = prefer_d if within 5%."""
    def best_L(d):
        L = max(1, round((target - gpt2_count(V, P, 0, d)) / (12 * d * d + 13 * d)))
        return L, abs(gpt2_count(V, P, L, d) - target) / target
    L, err = best_L(prefer_d)
    if err <= 0.05:
        return L, prefer_d
    d = min(range(64, 2049, 64), key=lambda d: best_L(d)[1])
    return best_L(d)[0], d


def build_gpt2(V, P, L, d, use_cache=False):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=V, n_positions=P, n_embd=d, n_layer=L, n_head=max(1, d // 64), resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, use_cache=use_cache,
                     attn_implementation="sdpa")
    return GPT2LMHeadModel(cfg)
