"""HierarchosLM: embeddings (+ROSA) -> long-term memory read -> encoder -> HRM -> tied head.

`forward(tokens, state)` runs the parallel form over a whole sequence; `step(token, state)`
consumes one token. Both carry the same fixed-size `HierarchosState` (plus ROSA's bounded
automaton) and compute the same function: the tests hold them equal. `step_sync_free` is the
step with no host reads (per-row positions as a tensor, every pass run under masks, ROSA hints
passed in): what a CUDA graph captures, equal to `step` (tests/test_sync_free_step.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..ops.aligned import padded_linear
from ..ops.threads import intra_op_threads
from .hrm import HierarchicalReasoner
from .memory import LongTermMemory
from .rosa import RosaAutomaton, rosa_hints
from .state import HierarchosState


@dataclass
class ModelOutput:
    logits: torch.Tensor                       # (B, T, V) for forward, (B, V) for step
    state: HierarchosState
    totals: dict = field(default_factory=dict)  # name -> (sum, count) of auxiliary terms
    # halting="q": (halt logit of the plan point leading each token, per round (R, B, T); whether a
    # plan point of this call leads the token (T,)), for the Q loss's halt term (losses.py)
    q_halt: tuple | None = None

    @property
    def aux(self) -> dict:
        """Means of the auxiliary terms: ponder, commitment, worker_steps, manager_steps."""
        return {name: total / count for name, (total, count) in self.totals.items() if count}


class HierarchosLM(nn.Module):
    # torch's intra-op threads during `step` / `step_sync_free` (None: torch's own setting). The
    # quantized model sets 1: its matmuls run on the kernel's pool (hierarchos.ops.threads says why).
    step_threads: int | None = None

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg.validate()
        d = cfg.context_dim
        self.embed = nn.Embedding(cfg.vocab_size, d)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.rosa_embed = None
        if cfg.use_rosa:
            self.rosa_embed = nn.Embedding(cfg.rosa_vocab, d)
            nn.init.normal_(self.rosa_embed.weight, std=0.002)
        self.memory = LongTermMemory(d, cfg.ltm_slots, cfg.ltm_key_dim, cfg.ltm_val_dim, cfg.ltm_topk,
                                     cfg.ltm_chunk, cfg.ltm_write_threshold)
        self.persistent = nn.Parameter(torch.randn(cfg.persistent_dim) * 0.02)
        self.encoder = nn.Linear(d + cfg.ltm_val_dim + cfg.persistent_dim, d)
        self.reasoner = HierarchicalReasoner(cfg)
        self.out_norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.embed.weight  # tied

    # ---- bookkeeping -----------------------------------------------------------------
    def num_parameters(self, *, with_deepembed: bool = True) -> int:
        seen, total = set(), 0
        for name, p in self.named_parameters():
            # the head is tied to the embedding (a quantized model stores the two apart): count it once
            if id(p) in seen or name.startswith("lm_head.") or (not with_deepembed and ".deepembed." in name):
                continue
            seen.add(id(p))
            total += p.numel()
        for name, module in self.named_modules():  # quantized blocks (hierarchos.quant.model) are not parameters
            count = getattr(module, "quantized_numel", 0)
            if count and name != "lm_head" and (with_deepembed or ".deepembed." not in f"{name}."):
                total += count  # the head is the embedding table's twin (tied), counted once as above
        return total

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.reasoner.manager.gradient_checkpointing = enabled
        self.reasoner.worker.gradient_checkpointing = enabled

    def init_state(self, batch_size: int = 1, device=None, dtype=None) -> HierarchosState:
        # `persistent` is a plain float parameter in every form of the model (the quantized one
        # replaces the embedding table by quantized blocks)
        device = device if device is not None else self.persistent.device
        dtype = dtype if dtype is not None else self.persistent.dtype
        rosa = None
        if self.cfg.use_rosa:
            rosa = [RosaAutomaton(self.cfg.rosa_window, self.cfg.rosa_none_id) for _ in range(batch_size)]
        return HierarchosState(
            pos=0,
            memory=self.memory.init_state(batch_size, self.cfg.context_dim, device, dtype),
            rounds=self.reasoner.init_state(batch_size, device, dtype),
            rosa=rosa,
        )

    # ---- forward --------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, state: HierarchosState | None = None, *,
                rosa_hint_ids: torch.Tensor | None = None, last_logits_only: bool = False, **caps) -> ModelOutput:
        """tokens: (B, T) ids. `rosa_hint_ids` may be precomputed (data pipeline); else the
        state's automata are extended in place. `last_logits_only`: logits (B, 1, V) for the last
        position alone (a prompt's prefill: the head over every position was ~30% of a CPU prefill's
        arithmetic at 125m). `caps`: h_cycles, max_h_steps, max_l_steps, h_halt_thresh (chat's
        reasoning modes; each at most the configured value)."""
        B, T = tokens.shape
        if state is None:
            state = self.init_state(B)
        e = self.embed(tokens)
        rosa = state.rosa
        if self.rosa_embed is not None:
            if rosa_hint_ids is None:
                rosa_hint_ids, rosa = rosa_hints(tokens, rosa, self.cfg.rosa_window, self.cfg.rosa_none_id)
            e = e + self.rosa_embed(rosa_hint_ids)
        reads, memory_state = self.memory(e, state.memory, state.pos)
        persistent = self.persistent.to(e.dtype).expand(B, T, -1)
        u = F.gelu(self.encoder(torch.cat([e, reads, persistent], dim=-1)))
        q_halt = [] if self.cfg.halting == "q" else None
        y, rounds, totals = self.reasoner(u, tokens, state.rounds, state.pos, q_halt=q_halt, **caps)
        logits = self.head(self.out_norm(y[:, -1:] if last_logits_only else y))
        new_state = HierarchosState(pos=state.pos + T, memory=memory_state, rounds=rounds, rosa=rosa)
        if q_halt:
            q_halt = (torch.stack([logit for logit, _ in q_halt]), q_halt[0][1])
        return ModelOutput(logits=logits, state=new_state, totals=totals, q_halt=q_halt or None)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of the tied head. On a GPU the float head runs with its output rows padded to an
        aligned stride (`padded_linear`: an odd vocabulary otherwise gets cuBLAS's slow align-1
        kernels); the quantized model's head is another module and is called as it is."""
        if type(self.lm_head) is nn.Linear and h.device.type != "cpu":
            return padded_linear(h, self.lm_head.weight)
        return self.lm_head(h)

    def step(self, token: torch.Tensor, state: HierarchosState | None = None, **caps) -> ModelOutput:
        """Consume one token per row: token (B,) -> logits (B, V) and the next state."""
        if self.step_threads is None:  # (no context manager where torch.compile traces the step)
            out = self.forward(token.view(-1, 1), state, **caps)
        else:
            with intra_op_threads(self.step_threads):
                out = self.forward(token.view(-1, 1), state, **caps)
        out.logits = out.logits[:, 0]
        return out

    def step_sync_free(self, token: torch.Tensor, state: HierarchosState, row_pos: torch.Tensor,
                       rosa_hint_ids: torch.Tensor | None = None, plan_rows: bool = True, write_rows: bool = True,
                       **caps) -> ModelOutput:
        """`step` with every decision on the device: token (B,), row b at global position row_pos[b]
        ((B,) int64; rows may differ) -> logits (B, V) and the next state (its `pos` is state.pos + 1,
        bookkeeping for equal rows; the caller advances row_pos). Static shapes and pass counts for
        given caps, no host reads when the ROSA hints (B,) are passed in (the automata are host code:
        without hints they are extended here, which copies the tokens to the host). Totals' counts
        are device tensors. Stacks with full attention (a growing KV cache) read its length on the host.
        `plan_rows=False`: the caller knows that no row is at a plan point ((row_pos + 1) % h_stride != 0
        everywhere); the pondering passes, which would write nothing, are left out (same values).
        `write_rows=False`: likewise no row closes a memory chunk ((row_pos + 1) % ltm_chunk != 0); the
        memory's write is left out (`LongTermMemory.step`)."""
        if self.step_threads is None:
            return self._step_sync_free(token, state, row_pos, rosa_hint_ids, plan_rows, write_rows, **caps)
        with intra_op_threads(self.step_threads):
            return self._step_sync_free(token, state, row_pos, rosa_hint_ids, plan_rows, write_rows, **caps)

    def _step_sync_free(self, token, state, row_pos, rosa_hint_ids, plan_rows, write_rows, **caps) -> ModelOutput:
        tokens = token.view(-1, 1)
        B = tokens.shape[0]
        e = self.embed(tokens)
        rosa = state.rosa
        if self.rosa_embed is not None:
            if rosa_hint_ids is None:
                hints, rosa = rosa_hints(tokens, rosa, self.cfg.rosa_window, self.cfg.rosa_none_id)
            else:
                hints = rosa_hint_ids.view(-1, 1)
            e = e + self.rosa_embed(hints)
        reads, memory_state = self.memory.step(e, state.memory, row_pos, write_rows)
        persistent = self.persistent.to(e.dtype).expand(B, 1, -1)
        u = F.gelu(self.encoder(torch.cat([e, reads, persistent], dim=-1)))
        y, rounds, totals = self.reasoner(u, tokens, state.rounds, state.pos, row_pos=row_pos, plan_rows=plan_rows,
                                          **caps)
        logits = self.head(self.out_norm(y))[:, 0]
        new_state = HierarchosState(pos=state.pos + 1, memory=memory_state, rounds=rounds, rosa=rosa)
        return ModelOutput(logits=logits, state=new_state, totals=totals)
