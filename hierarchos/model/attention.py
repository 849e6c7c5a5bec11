"""Attention blocks and stack: pre-RMSNorm multi-head attention (SDPA) + SwiGLU, RWKVStack's interface.

The stack is a drop-in for `RWKVStack` (`forward(x, tokens, state, frozen)`, `init_state`), so
either can be a manager or worker stack. Its state is a KV cache: `window_size` = W > 0 keeps
a ring of the W latest entries (fixed size); W = 0 is full causal attention and the cache grows
by one entry per token consumed. The frozen-token rule of the HRM holds: a frozen position
writes nothing (its key/value is seen by no later position and never enters the cache, and it
takes no position), so one call over T tokens equals T calls over one token, frozen or not.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import POS_ENCODINGS
from ..ops.amp import to_autocast_dtype
from .deepembed import DeepEmbedTables

ROPE_BASE = 10000.0


# ---- positions ----------------------------------------------------------------------------------

def rope_angles(positions: torch.Tensor, head_size: int) -> torch.Tensor:
    """(B, T) integer positions -> (B, T, head_size / 2) rotation angles, in float64 so large
    positions (long chats) keep their precision before the cast to the compute dtype."""
    inv_freq = ROPE_BASE ** (-torch.arange(0, head_size, 2, device=positions.device, dtype=torch.float64) / head_size)
    return positions.to(torch.float64)[..., None] * inv_freq


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + N/2) of x (B, H, T, N) by the angles whose cos/sin are (B, 1, T, N/2)."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


def sinusoidal_features(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, T) positions -> (B, T, dim): sin on even channels, cos on odd ones (Vaswani et al.)."""
    inv_freq = 10000.0 ** (-torch.arange(0, dim, 2, device=positions.device, dtype=torch.float64) / dim)
    angles = positions.to(torch.float64)[..., None] * inv_freq                 # (B, T, dim / 2)
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)[..., :dim]


# ---- the block --------------------------------------------------------------------------------------

class SelfAttention(nn.Module):
    """Multi-head attention over [cached entries ; this call's entries] under a boolean mask."""

    def __init__(self, dim: int, head_size: int, n_layers: int):
        super().__init__()
        self.n_heads, self.head_size = dim // head_size, head_size
        self.query = nn.Linear(dim, dim, bias=False)
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        self.output = nn.Linear(dim, dim, bias=False)
        for lin in (self.query, self.key, self.value):
            nn.init.normal_(lin.weight, std=1.0 / math.sqrt(dim))
        nn.init.normal_(self.output.weight, std=0.1 / math.sqrt(dim * n_layers))

    def forward(self, x, rope, cache_key, cache_value, mask):
        """x: (B, T, C); rope: (cos, sin) or None; cache_*: (B, H, S, N); mask: (B, T, S + T) bool,
        or None for plain causal attention with an empty cache. Returns (out, key, value) with
        this call's keys (rotated) and values as (B, H, T, N)."""
        B, T, C = x.shape
        H, N = self.n_heads, self.head_size
        heads = lambda t: t.view(B, T, H, N).transpose(1, 2)  # noqa: E731  (B, H, T, N)
        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            keys = torch.cat([cache_key.to(k.dtype), k], dim=2)
            values = torch.cat([cache_value.to(v.dtype), v], dim=2)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None])
        return self.output(out.transpose(1, 2).reshape(B, T, C)), k, v


class FeedForward(nn.Module):
    """SwiGLU; hidden units gated by the DeepEmbed row of the token (as RWKV's channel mix)."""

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.gate = nn.Linear(dim, ffn_dim, bias=False)
        self.up = nn.Linear(dim, ffn_dim, bias=False)
        self.down = nn.Linear(ffn_dim, dim, bias=False)
        nn.init.normal_(self.down.weight, std=0.1 / math.sqrt(ffn_dim))

    def forward(self, x, deep_gate=None):
        hidden = F.silu(self.gate(x)) * self.up(x)
        if deep_gate is not None:
            hidden = hidden * deep_gate
        return self.down(hidden)


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm whose weight follows the input's dtype (bf16 activations under autocast use the
    fused kernel instead of warning about mixed dtypes)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


class AttentionBlock(nn.Module):
    def __init__(self, dim: int, head_size: int, ffn_dim: int, n_layers: int):
        super().__init__()
        self.norm_attention = RMSNorm(dim, eps=1e-6)
        self.norm_ffn = RMSNorm(dim, eps=1e-6)
        self.attention = SelfAttention(dim, head_size, n_layers)
        # named as RWKV's channel mix so LoRA's `channel_mix` group and the quantizer find it alike
        self.channel_mix = FeedForward(dim, ffn_dim)

    def forward(self, x, rope, cache_key, cache_value, mask, deep_gate=None):
        # the residual stream keeps its dtype; under autocast the projections and SDPA run in bf16
        att, key, value = self.attention(self.norm_attention(x), rope, cache_key, cache_value, mask)
        x = x + att
        return x + self.channel_mix(self.norm_ffn(x), deep_gate), key, value


# ---- the stack ---------------------------------------------------------------------------------------

class AttentionStack(nn.Module):
    """Attention blocks with RWKVStack's interface; the state is a KV cache.

    State: dict with 'key', 'value' (L, B, H, S, N) and 'pos' (B,) int64, the number of entries
    each row has written (= its next position). Slot s of the cache holds the entry at
    position p(s): with a window W, S = W and p(s) is the latest position < pos with p = s mod W
    (a ring); without one, S grows to max(pos) and p(s) = s. A slot whose p(s) is negative or
    not below the row's pos is empty. Position of an entry = the count of live entries before it,
    which is the global token position for passes that freeze nothing (watch, commit).
    """

    def __init__(self, dim: int, n_layers: int, head_size: int, ffn_mult: int, vocab_size: int,
                 use_deepembed: bool, per_block_deepembed: bool, pos_encodings: str = "rope",
                 window_size: int = 0, max_positions: int = 1024):
        super().__init__()
        if pos_encodings not in POS_ENCODINGS:
            raise ValueError(f"pos_encodings {pos_encodings!r}: expected one of {POS_ENCODINGS}")
        self.dim, self.n_layers, self.head_size = dim, n_layers, head_size
        self.n_heads = dim // head_size
        self.pos_encodings, self.window_size = pos_encodings, window_size
        ffn_dim = ffn_mult * dim
        self.blocks = nn.ModuleList(AttentionBlock(dim, head_size, ffn_dim, n_layers) for _ in range(n_layers))
        self.position_table = None
        if pos_encodings == "learned":  # positions past the table share its last row
            self.position_table = nn.Embedding(max_positions, dim)
            nn.init.normal_(self.position_table.weight, std=0.02)
        self.per_block_deepembed = per_block_deepembed
        self.deepembed = DeepEmbedTables(vocab_size, ffn_dim, n_layers, per_block_deepembed) if use_deepembed else None
        self.gradient_checkpointing = False

    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> dict:
        shape = (self.n_layers, batch_size, self.n_heads, self.window_size, self.head_size)
        return {"key": torch.zeros(shape, device=device, dtype=dtype),
                "value": torch.zeros(shape, device=device, dtype=dtype),
                "pos": torch.zeros(batch_size, device=device, dtype=torch.long)}

    def slot_positions(self, pos: torch.Tensor, n_slots: int) -> torch.Tensor:
        """(B,) entries written -> (B, S) position held by each cache slot (negative or >= pos: empty)."""
        s = torch.arange(n_slots, device=pos.device)
        if self.window_size == 0:
            return s.expand(pos.shape[0], n_slots)
        last = pos[:, None] - 1
        return last - torch.remainder(last - s, self.window_size)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, state: dict, frozen: torch.Tensor | None = None):
        """x: (B, T, C) inputs; tokens: (B, T) ids for DeepEmbed; frozen: (B, T) bool or None."""
        B, T, _ = x.shape
        W = self.window_size
        pos_start = state["pos"]
        live = torch.ones(B, T, dtype=torch.long, device=x.device) if frozen is None else (~frozen).long()
        written = live.cumsum(1)                                # (B, T) live entries up to and including t
        positions = pos_start[:, None] + written - live         # a frozen row takes the next live position
        pos_end = pos_start + written[:, -1]
        old_slots = state["key"].shape[3]
        old_pos = self.slot_positions(pos_start, old_slots)     # (B, S)

        # which keys each query sees: cached entries in its window, live earlier entries of this
        # call in its window, and itself (so a frozen query still has a key and reads finite values)
        if old_slots == 0 and frozen is None and W == 0:
            mask = None  # plain causal attention: SDPA's fused causal path
        else:
            q_pos = positions[:, :, None]
            old_ok = ((old_pos >= 0) & (old_pos < pos_start[:, None]))[:, None, :]
            if W:
                old_ok = old_ok & (old_pos[:, None, :] > q_pos - W)
            t = torch.arange(T, device=x.device)
            new_ok = (t[None, :] < t[:, None])[None] & live[:, None, :].bool()
            if W:
                new_ok = new_ok & (positions[:, None, :] > q_pos - W)
            new_ok = new_ok | torch.eye(T, dtype=torch.bool, device=x.device)[None]
            mask = torch.cat([old_ok.expand(B, T, old_slots), new_ok], dim=2)   # (B, T, S + T)

        if self.pos_encodings == "sinusoidal":
            x = x + sinusoidal_features(positions, self.dim).to(x.dtype)
        elif self.pos_encodings == "learned":
            x = x + self.position_table(positions.clamp(max=self.position_table.num_embeddings - 1))
        rope = None
        if self.pos_encodings == "rope":
            angles = rope_angles(positions, self.head_size)[:, None]          # (B, 1, T, N / 2)
            dtype = to_autocast_dtype(x).dtype
            rope = (angles.cos().to(dtype), angles.sin().to(dtype))

        # where each slot of the new cache comes from: an old slot, or the k-th live entry of this call
        new_slots = W if W else int(pos_end.max()) if B else 0
        new_pos = self.slot_positions(pos_end, new_slots)                     # (B, S')
        from_call = new_pos >= pos_start[:, None]
        kth = torch.searchsorted(written.contiguous(), (new_pos - pos_start[:, None] + 1).clamp(min=1))
        source = torch.where(from_call, old_slots + kth.clamp(max=max(T - 1, 0)),
                             torch.arange(new_slots, device=x.device).clamp(max=max(old_slots - 1, 0)))
        filled = (new_pos >= 0) & (new_pos < pos_end[:, None]) & (from_call | (old_slots > 0))
        index = source[:, None, :, None].expand(B, self.n_heads, new_slots, self.head_size)

        gates = self.deepembed.gates(tokens, len(self.blocks)) if self.deepembed is not None else None
        keys, values = [], []
        for i, block in enumerate(self.blocks):
            gate = next(gates) if gates is not None else None
            args = (x, rope, state["key"][i], state["value"][i], mask, gate)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x, key, value = checkpoint(block, *args, use_reentrant=False)
            else:
                x, key, value = block(*args)
            for cache, new, out in ((state["key"][i], key, keys), (state["value"][i], value, values)):
                both = torch.cat([cache, new.to(cache.dtype)], dim=2)          # (B, H, S + T, N)
                out.append(both.gather(2, index) * filled[:, None, :, None].to(cache.dtype))
        return x, {"key": torch.stack(keys), "value": torch.stack(values), "pos": pos_end}


def blocks_summary(cfg) -> str:
    """One line on the stacks' block types for /status; says when the state grows with the context."""
    def one(role: str, block: str) -> str:
        if block != "attention":
            return f"{role} {block}"
        reach = (f"window {cfg.window_size}: KV cache of {cfg.window_size} tokens" if cfg.window_size else
                 "full attention: the KV cache grows with the context")
        return f"{role} attention ({cfg.pos_encodings}, {reach})"
    return f"{one('manager', cfg.h_block)}, {one('worker', cfg.l_block)}"
