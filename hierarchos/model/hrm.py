"""Hierarchical reasoning: a manager stack (slow, plans) and a worker stack (fast, executes).

Each pass runs over the whole sequence at once. One round (of `h_cycles`):
  1. manager watch: H over all tokens on u_t + feedback from the worker's previous round at t-1;
  2. pondering at plan points (every `h_stride`-th token): up to `max_h_steps` passes of H over
     the plan points, each on its own shadow state; a plan point halts (ACT) once its accumulated
     halting probability reaches `h_halt_thresh`, or (`halting="q"`, seed 003) once its Q head's
     halt logit beats its continue logit, and is frozen in later passes;
  3. plans reach tokens strictly after their plan point, LERPed within the stride;
  4. worker: up to `max_l_steps` shadow passes refine a per-token drift (frozen once it
     converges under `l_conv_atol`), then a commit pass gives the output and the real state.
Only the last `grad_steps` passes of each loop carry gradients (HRM's one-step gradient): of the
rounds, and of the worker's shadow passes, whose commit pass always does. The shadow loop gets its
own last step(s): with the commit counted as the loop's last pass (an earlier rule), no shadow pass
recorded a graph at grad_steps = 1, so the worker could not shape the drift it produces (only
`l_drift_proj` after it learned), and that drift, ~15x the token's part of the worker's input at
initialisation, held training near its unigram loss for the first hundreds of steps (BENCHMARKS.md,
"Learning quality"). Pondering is different: a plan point's plan is made of the passes up to the one
it halts at, which differs from point to point, so every pondering pass records a graph one step
deep (the previous pass's refinement enters as a constant, except between the last `grad_steps`
passes). With only the last pass recording one (an earlier rule), a point that halted before the
cap gave the manager no gradient at all, and once ACT learned to halt early (its ponder cost pushes
it there) the manager, watch pass included, stopped learning.
The halting rule and the freezing rule act identically for one call over T tokens and for
T calls over one token, where halted/frozen work is skipped.

The sync-free step (`forward(..., row_pos=)`, one token per row at per-row positions) makes none
of those decisions on the host: every pass up to the cap runs, halted plan points and frozen tokens
write nothing (the frozen-token rule), a row that is not at a plan point ponders fully frozen and
keeps its plans (`torch.where`), so shapes and pass counts are static and a CUDA graph can hold it.
It computes what the skipping step computes: skipped work and masked work leave the same values.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .attention import AttentionStack
from .rwkv import RWKVStack, TimeMixWiring


def _grad(enabled: bool):
    return contextlib.nullcontext() if enabled else torch.no_grad()


def one_token_alpha(pos0: int, stride: int) -> float:
    """The LERP weight of the two latest plans for the token at host position pos0, as `_plan` forms
    it: (pos0 - (floor(pos0 / s) * s - 1)) in float32, divided by s in float32."""
    return float(np.float32(pos0 - ((pos0 // stride) * stride - 1)) / np.float32(stride))


def add_total(totals: dict, name: str, value: torch.Tensor, count: float) -> None:
    """Adds to an aux total (name -> (sum, count)), as every loop here reports its terms."""
    total, n = totals.get(name, (0.0, 0.0))
    totals[name] = (total + value, n + count)


def _stack(cfg: ModelConfig, block: str, dim: int, n_layers: int) -> nn.Module:
    """A manager or worker stack of the configured block type (both have one interface)."""
    common = dict(head_size=cfg.head_size, ffn_mult=cfg.ffn_mult, vocab_size=cfg.vocab_size,
                  use_deepembed=cfg.use_deepembed, per_block_deepembed=cfg.deepembed_per_block)
    if block == "attention":
        return AttentionStack(dim, n_layers, **common, pos_encodings=cfg.pos_encodings,
                              window_size=cfg.window_size, max_positions=cfg.max_length)
    return RWKVStack(dim, n_layers, **common, wkv_chunk=cfg.wkv_chunk_size, time_mix=cfg.time_mix,
                     wiring=TimeMixWiring.from_config(cfg))


class HierarchicalReasoner(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, hh, lh = cfg.context_dim, cfg.h_hidden, cfg.l_hidden
        self.manager = _stack(cfg, cfg.h_block, hh, cfg.h_layers)
        self.worker = _stack(cfg, cfg.l_block, lh, cfg.l_layers)
        self.h_input_proj = nn.Linear(d, hh)
        self.l_feedback_proj = nn.Linear(d, hh, bias=False)
        if cfg.halting == "q":
            # seed 003's Q head: (halt, continue) logits, zero weights and bias -5 (equal logits: no
            # plan point halts before the cap until the head has learned)
            self.h_q_head = nn.Linear(hh, 2)
        else:
            self.h_halt_proj = nn.Linear(hh, 1)
        self.h_to_context = nn.Linear(hh, d)
        self.l_input_proj = nn.Linear(2 * d, lh)
        self.l_drift_proj = nn.Linear(lh, d)
        self.l_to_out = nn.Linear(lh, d)
        # instrumentation (benchmarks): a list here collects each pondering call's halting step of
        # every plan point, (B, P) per round, in call order; None (the default) records nothing
        self.halting_record: list | None = None
        with torch.no_grad():
            self.l_feedback_proj.weight.mul_(0.1)
            self.l_drift_proj.weight.mul_(0.1)
            if cfg.halting == "q":
                self.h_q_head.weight.zero_()
                self.h_q_head.bias.fill_(-5.0)
            else:
                self.h_halt_proj.bias.fill_(-1.0)

    # ---- state -------------------------------------------------------------------------
    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> list[dict]:
        cfg = self.cfg
        zeros = lambda: torch.zeros(batch_size, cfg.context_dim, device=device, dtype=dtype)  # noqa: E731
        return [{
            "watch": self.manager.init_state(batch_size, device, dtype),
            "ponder": [self.manager.init_state(batch_size, device, dtype) for _ in range(cfg.max_h_steps)],
            "plan_prev": zeros(), "plan_last": zeros(),
            "explore": [self.worker.init_state(batch_size, device, dtype) for _ in range(cfg.max_l_steps)],
            "commit": self.worker.init_state(batch_size, device, dtype),
            "last_out": zeros(),
        } for _ in range(cfg.h_cycles)]

    # ---- forward ------------------------------------------------------------------------
    def forward(self, u, tokens, rounds: list[dict], pos0: int, *, h_cycles=None, max_h_steps=None,
                max_l_steps=None, h_halt_thresh=None, q_halt: list | None = None,
                row_pos: torch.Tensor | None = None, plan_rows: bool = True):
        """u: (B, T, d) encoded inputs at global positions pos0..; returns (y, new rounds, totals).

        With `halting="q"`, each round appends to `q_halt` (when given) the pair (halt logit of the
        plan point leading each token (B, T), whether a plan point of this call leads it (T,)): the
        Q loss's halt term needs the final predictions, which only the caller has.

        `row_pos` (B,) int64 selects the sync-free step: T = 1, row b at global position row_pos[b]
        (`pos0` is then unused); no host reads, every pass runs (see module doc). Its totals' counts
        are tensors (the plan rows are counted on the device). `plan_rows=False` tells the sync-free
        step that no row is at a plan point ((row_pos + 1) % h_stride != 0 in every row, which the
        caller knows without reading the device): its pondering passes, which would write nothing,
        are left out, so a captured step for such tokens holds fewer passes; the same values."""
        cfg = self.cfg
        n_cycles, n_ponder, n_explore, thresh = self.depth(h_cycles, max_h_steps, max_l_steps, h_halt_thresh)
        totals: dict = {}
        new_rounds = [dict(r) for r in rounds]
        y_prev_round = None
        for r in range(n_cycles):
            grad_round = torch.is_grad_enabled() and r >= n_cycles - cfg.grad_steps
            with _grad(grad_round):
                feedback = None
                if r > 0:  # worker output of the previous round at t-1
                    feedback = torch.cat([rounds[r - 1]["last_out"][:, None], y_prev_round[:, :-1]], dim=1)
                y, new_rounds[r] = self._round(u, tokens, rounds[r], feedback, pos0, n_ponder, n_explore,
                                               thresh, totals, q_halt=q_halt, row_pos=row_pos, plan_rows=plan_rows)
            y_prev_round = y
        return y_prev_round, new_rounds, totals

    def depth(self, h_cycles=None, max_h_steps=None, max_l_steps=None, h_halt_thresh=None) -> tuple:
        """(manager cycles, pondering passes, shadow passes, halting threshold) under chat's reasoning
        caps (each at most the configured value; None: the configured one)."""
        cfg = self.cfg
        return (min(h_cycles or cfg.h_cycles, cfg.h_cycles), min(max_h_steps or cfg.max_h_steps, cfg.max_h_steps),
                cfg.max_l_steps if max_l_steps is None else min(max_l_steps, cfg.max_l_steps),
                cfg.h_halt_thresh if h_halt_thresh is None else h_halt_thresh)

    def _round(self, u, tokens, rs, feedback, pos0, n_ponder, n_explore, thresh, totals, q_halt=None,
               row_pos=None, plan_rows=True):
        B, T, _ = u.shape
        new = dict(rs)
        grad_on = torch.is_grad_enabled()
        sync_free = row_pos is not None

        # 1. manager watch
        h_in = self.h_input_proj(u)
        if feedback is not None:
            h_in = h_in + self.l_feedback_proj(feedback)
        watch_out, new["watch"] = self.manager(h_in, tokens, rs["watch"])

        if sync_free:  # 2. and 3. with per-row plan points, decided on the device
            context = self._plan_step(u, watch_out, tokens, rs, new, row_pos, n_ponder, thresh, grad_on, totals,
                                      plan_rows)
        else:
            context = self._plan(u, watch_out, tokens, rs, new, pos0, n_ponder, thresh, grad_on, totals, q_halt)

        # 4. worker: shadow exploration of the drift, then the commit pass
        drift, new["explore"] = self._explore(u, context, tokens, rs["explore"], n_explore, grad_on, sync_free, totals)
        plan_in = context if drift is None else context + drift
        z, new["commit"] = self.worker(self.l_input_proj(torch.cat([u, plan_in], -1)), tokens, rs["commit"])
        y = u + self.l_to_out(z)
        new["last_out"] = y[:, -1].to(rs["last_out"].dtype)  # the state keeps its dtype under autocast
        return y, new

    def _explore(self, u, context, tokens, states, n_explore, grad_on, sync_free, totals):
        """The worker's shadow passes over u (B, T, d) with its plans `context`: returns (the drift (B, T, d),
        the new shadow states). Each pass refines the drift; a token whose step falls under
        l_conv_atol is frozen (writes nothing in later passes). No shadow pass (the minimal depth): the
        drift is None, which stands for zeros (the commit pass then reads the plans as they are)."""
        cfg = self.cfg
        B, T, _ = u.shape
        if n_explore == 0:
            add_total(totals, "worker_steps", u.new_zeros(()), float(B * T))
            return None, list(states)
        drift = torch.zeros_like(u)
        frozen = torch.zeros(B, T, dtype=torch.bool, device=u.device)
        explore = list(states)
        worker_steps = u.new_zeros(())
        for p in range(n_explore):
            # frozen tokens write nothing: when every token is frozen (step form) the pass is skipped;
            # the sync-free step runs it (a host read of the mask is what it avoids), to the same effect
            if sync_free or not (T == 1 and p > 0 and bool(frozen.all())):
                worker_steps = worker_steps + (~frozen).sum()
                with _grad(grad_on and p >= n_explore - cfg.grad_steps):  # the drift's last step(s)
                    z, explore[p] = self.worker(self.l_input_proj(torch.cat([u, context + drift], -1)), tokens,
                                                states[p], frozen if p > 0 else None)
                step = torch.tanh(self.l_drift_proj(z)) * (~frozen)[..., None]
                drift = drift + step
                frozen = frozen | (step.abs().amax(-1) < cfg.l_conv_atol)
            add_total(totals, "commitment", F.relu(drift.pow(2).sum(-1) - cfg.commitment_threshold).sum(), B * T)
        add_total(totals, "worker_steps", worker_steps, float(B * T))
        return drift, explore

    def _plan(self, u, watch_out, tokens, rs, new, pos0, n_ponder, thresh, grad_on, totals, q_halt):
        """Sections 2 and 3 over T tokens at positions pos0..: the context (B, T, d) of every token;
        the pondering states and the two latest plans go into `new`."""
        cfg = self.cfg
        B, T, _ = u.shape

        # 2. pondering at plan points (global positions p with (p + 1) % stride == 0)
        s = cfg.h_stride
        first = (s - 1 - pos0) % s
        if self._plan_one_applies(u):
            return self._plan_one(u, watch_out, tokens, rs, new, pos0, first == 0, n_ponder, thresh, grad_on, totals)
        plan_idx = torch.arange(first, max(first, T), s, device=u.device)
        n_plan = plan_idx.numel()
        plans = u.new_zeros(B, 0, cfg.context_dim)
        halt_logit = u.new_zeros(B, 1)
        if n_plan and cfg.halting == "q":
            plans, new["ponder"], halt_logit = self._ponder_q(watch_out[:, plan_idx], tokens[:, plan_idx],
                                                              rs["ponder"], n_ponder, grad_on, totals)
        elif n_plan:
            plans, new["ponder"] = self._ponder(watch_out[:, plan_idx], tokens[:, plan_idx], rs["ponder"],
                                                n_ponder, thresh, grad_on, totals)

        # 3. plans -> tokens: LERP between the two latest plans strictly before each token
        plans_ext = torch.cat([rs["plan_prev"][:, None], rs["plan_last"][:, None], plans], dim=1)
        g = torch.arange(pos0, pos0 + T, device=u.device)
        before = torch.div(g, s, rounding_mode="floor")           # plan points < g since position 0
        n_in_call = before - pos0 // s
        alpha = ((g - (before * s - 1)).to(u.dtype) / s)[None, :, None]
        context = plans_ext[:, n_in_call] + alpha * (plans_ext[:, n_in_call + 1] - plans_ext[:, n_in_call])
        new["plan_prev"], new["plan_last"] = plans_ext[:, -2], plans_ext[:, -1]
        if q_halt is not None and cfg.halting == "q":
            # token g is led by the latest plan point strictly before it (its context's weight alpha
            # on that plan reaches 1 at the next plan point); in this call when n_in_call >= 1
            q_halt.append((halt_logit[:, (n_in_call - 1).clamp(min=0)], n_in_call >= 1))
        return context

    def _plan_one_applies(self, u) -> bool:
        return u.shape[1] == 1 and self.cfg.halting != "q" and u.dtype == torch.float32

    def _plan_one(self, u, watch_out, tokens, rs, new, pos0, is_plan, n_ponder, thresh, grad_on, totals):
        """`_plan` for one token (T = 1, ACT halting, float32) at host position pos0, with the index
        arithmetic done on the host: the same values, a tenth of the small ops of a generated token."""
        plan_prev, plan_last = rs["plan_prev"], rs["plan_last"]
        alpha = one_token_alpha(pos0, self.cfg.h_stride)
        context = (plan_prev + alpha * (plan_last - plan_prev))[:, None]
        if is_plan:
            plans, new["ponder"] = self._ponder(watch_out, tokens, rs["ponder"], n_ponder, thresh, grad_on, totals)
            new["plan_prev"], new["plan_last"] = plan_last, plans[:, -1]
        return context

    def _plan_step(self, u, watch_out, tokens, rs, new, row_pos, n_ponder, thresh, grad_on, totals, plan_rows):
        """Sections 2 and 3 for one token per row at positions row_pos (B,), without host reads: every
        row ponders; a row that is not a plan point starts halted (frozen from pass 0, so it writes
        nothing and weighs nothing) and keeps its two latest plans. With `plan_rows=False` (no row is
        at a plan point) the pondering passes are left out: the shadow states stay as they are, as
        the fully halted passes would leave them, and the totals get the same names with nothing
        added. Returns the context (B, 1, d)."""
        s = self.cfg.h_stride
        plan = None
        if not plan_rows:  # the names and dtypes the pondering adds (totals in u's dtype, counts in float32)
            for name in ("q_continue", "manager_steps") if self.cfg.halting == "q" else ("ponder", "manager_steps"):
                add_total(totals, name, u.new_zeros(()), u.new_zeros((), dtype=torch.float32))
        else:
            is_plan = torch.remainder(row_pos + 1, s) == 0                      # (B,)
            not_plan = ~is_plan[:, None]                                         # (B, 1): halted from the start
            count = is_plan.sum().to(torch.float32)                              # plan points, on the device
            if self.cfg.halting == "q":
                plan, new["ponder"], _ = self._ponder_q(watch_out, tokens, rs["ponder"], n_ponder, grad_on, totals,
                                                        halted=not_plan, count=count)
            else:
                plan, new["ponder"] = self._ponder(watch_out, tokens, rs["ponder"], n_ponder, thresh, grad_on,
                                                   totals, halted=not_plan, count=count)
        # the LERP of section 3 for T = 1 (n_in_call = 0): plan_prev + alpha (plan_last - plan_prev)
        before = torch.div(row_pos, s, rounding_mode="floor")
        alpha = ((row_pos - (before * s - 1)).to(u.dtype) / s)[:, None]          # (B, 1)
        plan_prev, plan_last = rs["plan_prev"], rs["plan_last"]
        context = plan_prev + alpha * (plan_last - plan_prev)
        if plan is not None:
            keep = is_plan[:, None]
            new["plan_prev"] = torch.where(keep, plan_last, plan_prev)
            new["plan_last"] = torch.where(keep, plan[:, 0].to(plan_last.dtype), plan_last)
        return context[:, None]

    def _ponder_pass(self, p, injected, refinement, plan_tokens, state, halted, n_ponder, grad_on, masked):
        """Pondering pass p (both halting rules): the manager over the watch output plus the previous
        pass's refinement, halted points frozen (from pass 0 when `masked`: rows halted before they
        start). In training every pass records a graph, one step deep: the refinement from the previous
        pass enters as a constant, except between the last `grad_steps` passes (see the module doc).
        Returns (output, new shadow state, refinement for the next pass)."""
        if grad_on and p <= n_ponder - self.cfg.grad_steps:
            refinement = refinement.detach()
        with _grad(grad_on):
            pass_in = injected + refinement
            z, state = self.manager(pass_in, plan_tokens, state, halted if (p > 0 or masked) else None)
            return z, state, z - pass_in

    def _ponder(self, z, plan_tokens, states, n_ponder, thresh, grad_on, totals, halted=None, count=None):
        """ACT over plan points z (B, P, H): returns (plans (B, P, d), new pondering states).

        `halted` (B, P): points that do not ponder (the sync-free step's rows off a plan point),
        then every pass runs and `count` (a tensor) is the number of pondering points."""
        B, P, _ = z.shape
        states = list(states)
        masked = halted is not None
        halted = torch.zeros(B, P, dtype=torch.bool, device=z.device) if halted is None else halted
        remainder = z.new_ones(B, P)
        mix = torch.zeros_like(z)
        expected_steps = z.new_zeros(B, P)
        halting_step = z.new_zeros(B, P)
        injected = z  # the watch output is injected into every pass (HRM input injection)
        refinement = torch.zeros_like(z)
        for p in range(n_ponder):
            if not masked and P == 1 and p > 0 and bool(halted.all()):
                break  # halted plan points write nothing into later shadow states
            z, states[p], refinement = self._ponder_pass(p, injected, refinement, plan_tokens, states[p], halted,
                                                         n_ponder, grad_on, masked)
            halt_prob = torch.sigmoid(self.h_halt_proj(z)).squeeze(-1).to(z.dtype)
            active = ~halted
            accumulated = 1.0 - remainder * (1.0 - halt_prob)
            stop = active & ((accumulated >= thresh) if (thresh < 1.0 and p < n_ponder - 1) else
                             torch.full_like(active, p == n_ponder - 1))
            weight = torch.where(stop, remainder, halt_prob * remainder) * active
            mix = mix + weight[..., None] * z
            expected_steps = expected_steps + (p + 1) * weight
            halting_step = torch.where(stop, torch.full_like(halting_step, p + 1), halting_step)
            remainder = torch.where(active & ~stop, remainder * (1.0 - halt_prob), remainder)
            halted = halted | stop
        count = float(B * P) if count is None else count
        if self.halting_record is not None:
            self.halting_record.append(halting_step.detach())
        add_total(totals, "ponder", expected_steps.sum(), count)
        add_total(totals, "manager_steps", halting_step.sum(), count)
        return self.h_to_context(mix), states

    def _ponder_q(self, z, plan_tokens, states, n_ponder, grad_on, totals, halted=None, count=None):
        """Q-learning halting over plan points z (B, P, H) (seed 003): returns (plans (B, P, d), new
        pondering states, the halt logit of each point's halting pass (B, P)).

        A point halts at the first pass whose halt logit beats its continue logit (and that honours
        its exploration minimum in training), or at the last pass; it is frozen in later passes, as
        with ACT, and its plan is that pass's output (no mix). The continue logit of a pass that went
        on is trained towards the next pass's best Q, sigmoid(max(halt, continue)), or sigmoid(halt)
        when the next pass is the cap (seed 003's bootstrapped target, no gradient through it).
        `halted` and `count` as in `_ponder`."""
        B, P, _ = z.shape
        states = list(states)
        masked = halted is not None
        halted = torch.zeros(B, P, dtype=torch.bool, device=z.device) if halted is None else halted
        min_steps = self._explore_min_steps(B, P, n_ponder, z.device)
        chosen = torch.zeros_like(z)
        halt_logit = z.new_zeros(B, P)
        halting_step = z.new_zeros(B, P)
        continue_loss = z.new_zeros(())
        prev_continue = None  # continue logits of the previous pass
        injected = z  # the watch output is injected into every pass (HRM input injection)
        refinement = torch.zeros_like(z)
        for p in range(n_ponder):
            if not masked and P == 1 and p > 0 and bool(halted.all()):
                break  # halted plan points write nothing into later shadow states
            z, states[p], refinement = self._ponder_pass(p, injected, refinement, plan_tokens, states[p], halted,
                                                         n_ponder, grad_on, masked)
            q = self.h_q_head(z).to(z.dtype)                          # (B, P, 2): halt, continue
            q_halt, q_continue = q[..., 0], q[..., 1]
            active = ~halted
            last = p == n_ponder - 1
            if prev_continue is not None:  # the points still active went on from the previous pass
                target = torch.sigmoid(q_halt if last else torch.maximum(q_halt, q_continue)).detach()
                loss = F.binary_cross_entropy_with_logits(prev_continue, target, reduction="none")
                continue_loss = continue_loss + (loss * active).sum()
            stop = active & (((q_halt > q_continue) & (p + 1 >= min_steps)) | last)
            chosen = torch.where(stop[..., None], z, chosen)
            halt_logit = torch.where(stop, q_halt, halt_logit)
            halting_step = torch.where(stop, torch.full_like(halting_step, p + 1), halting_step)
            halted = halted | stop
            prev_continue = q_continue
        count = float(B * P) if count is None else count
        if self.halting_record is not None:
            self.halting_record.append(halting_step.detach())
        add_total(totals, "q_continue", continue_loss, count)
        add_total(totals, "manager_steps", halting_step.sum(), count)
        return self.h_to_context(chosen), states, halt_logit

    def _explore_min_steps(self, B, P, n_ponder, device):
        """Seed 003's exploration, in training only: with probability q_explore_prob a plan point may not
        halt before a random number of passes in [2, n_ponder]; otherwise (and in eval) after 1. Drawn from
        the global RNG (torch.manual_seed makes a run repeatable)."""
        prob = self.cfg.q_explore_prob
        if not self.training or prob <= 0 or n_ponder < 2:
            return 1
        explore = torch.rand(B, P, device=device) < prob
        draw = torch.randint(2, n_ponder + 1, (B, P), device=device)
        return torch.where(explore, draw, torch.ones_like(draw))
