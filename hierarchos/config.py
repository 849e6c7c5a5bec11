"""Model configuration: the single source of architecture truth.

`ModelConfig` holds every architecture field (defaults from the original project's
newest README), round-trips through JSON, and validates itself: a bad value raises
`HierarchosError` naming the field and why.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from .errors import HierarchosError

CONFIG_VERSION = 1
BLOCK_TYPES = ("rwkv7", "attention")
TIME_MIXES = ("rwkv7", "wkv4")  # of RWKV blocks: RWKV-7's delta rule, or the original RWKV-4 cell
POS_ENCODINGS = ("rope", "sinusoidal", "learned", "none")  # of attention blocks
HALTING_RULES = ("act", "q")  # Graves ACT (DESIGN 3.4) or seed 003's Q-learning head
# RWKV-7 time-mix wiring (issue 19): one switch per difference from BlinkDL's published x070 form,
# so each can be ablated alone; TIME_MIX_WIRINGS names the two complete settings
TM_TOKEN_SHIFTS = ("ddlerp", "static")       # RWKV-6-style data-dependent lerps | x070's per-channel mixes
TM_GATES = ("sigmoid_full", "lowrank")        # sigmoid(W_g x), C x C | x070's sigmoid(x G1) G2, unbounded
TM_INITS = ("hierarchos", "x070")            # initial values: ours | x070's (decay spread, zero output, ...)
TIME_MIX_WIRINGS = {
    "hierarchos": dict(tm_token_shift="ddlerp", tm_gate="sigmoid_full", tm_value_residual=False, tm_init="hierarchos"),
    "x070": dict(tm_token_shift="static", tm_gate="lowrank", tm_value_residual=True, tm_init="x070"),
}
# The default wiring is x070's: on the quality benchmark (BENCHMARKS.md, "The time-mix wiring
# table") it scored 0.12 bits/byte better than ours at each of three learning rates, with 6% fewer
# parameters. A saved config with none of the wiring fields predates them and means LEGACY_WIRING.
DEFAULT_WIRING = "x070"
LEGACY_WIRING = "hierarchos"
# Reasoning depths (h_cycles, max_h_steps, max_l_steps). The default is MINIMAL_DEPTH: on the quality
# benchmark (BENCHMARKS.md, "Learning quality") it scored best at equal tokens, at 2.2x the training
# rate of the seeds' depth, SEED_DEPTH, which `--h_cycles 2 --max_h_steps 5 --max_l_steps 5` selects.
MINIMAL_DEPTH = dict(h_cycles=1, max_h_steps=1, max_l_steps=0)
SEED_DEPTH = dict(h_cycles=2, max_h_steps=5, max_l_steps=5)

# Names the original projects (seed 000/002, AI-OS) use for the same fields.
FIELD_ALIASES = {
    "hidden_size": "context_dim",
    "H_layers": "h_layers",
    "L_layers": "l_layers",
    "H_cycles": "h_cycles",
    "halt_max_steps": "max_h_steps",
    "L_cycles": "max_l_steps",
    "l_cycles": "max_l_steps",
    "expansion": "ffn_mult",
}


@dataclass
class ModelConfig:
    # vocabulary and widths
    vocab_size: int = 50257
    context_dim: int = 768
    h_hidden: int = 768
    l_hidden: int = 768
    h_layers: int = 2
    l_layers: int = 2
    head_size: int = 64
    ffn_mult: int = 4
    # RWKV time mix: "rwkv7" (generalized delta rule) or "wkv4" (seeds 001/004's RWKV-4 cell)
    time_mix: str = "rwkv7"
    wkv_chunk_size: int = 32
    # the RWKV-7 time mix's wiring around the recurrence (TIME_MIX_WIRINGS; defaults: DEFAULT_WIRING,
    # x070's; model directories saved before these fields existed load as LEGACY_WIRING): token
    # shift, output gate, value residual (each layer's value lerped toward its stack's first
    # layer's) and init
    tm_token_shift: str = TIME_MIX_WIRINGS[DEFAULT_WIRING]["tm_token_shift"]
    tm_gate: str = TIME_MIX_WIRINGS[DEFAULT_WIRING]["tm_gate"]
    tm_value_residual: bool = TIME_MIX_WIRINGS[DEFAULT_WIRING]["tm_value_residual"]
    tm_init: str = TIME_MIX_WIRINGS[DEFAULT_WIRING]["tm_init"]
    # block type of each stack: "rwkv7" or "attention" (seeds 000/003: RMSNorm, SDPA, SwiGLU);
    # the attention blocks' positions ("rope", "sinusoidal", "learned" (max_length rows), "none")
    # and sliding window (0 = full causal attention, whose KV cache grows with the context)
    h_block: str = "rwkv7"
    l_block: str = "rwkv7"
    pos_encodings: str = "rope"
    window_size: int = 0
    # long-term memory (Titans)
    persistent_dim: int = 128
    ltm_slots: int = 1024
    ltm_key_dim: int = 128
    ltm_val_dim: int = 128
    ltm_topk: int = 4
    ltm_chunk: int = 64
    ltm_write_threshold: float = 0.0
    # hierarchical reasoning: MINIMAL_DEPTH by default (one manager cycle, one pondering pass, the
    # worker's commit pass only); SEED_DEPTH is the seeds' (see MINIMAL_DEPTH for why)
    h_cycles: int = MINIMAL_DEPTH["h_cycles"]
    max_h_steps: int = MINIMAL_DEPTH["max_h_steps"]
    max_l_steps: int = MINIMAL_DEPTH["max_l_steps"]
    l_conv_atol: float = 1e-4
    h_stride: int = 4
    h_halt_thresh: float = 0.9
    # pondering's halting rule: "act" (Graves, h_halt_thresh) or "q" (seed 003: halt when the Q head's
    # halt logit beats its continue logit; in training a plan point gets, with probability
    # q_explore_prob, a random minimum of 2..max_h_steps passes)
    halting: str = "act"
    q_explore_prob: float = 0.1
    grad_steps: int = 1
    commitment_threshold: float = 0.05
    # input features
    use_deepembed: bool = True
    deepembed_per_block: bool = False
    use_rosa: bool = True
    rosa_window: int = 4096
    # loss terms that belong to the model
    z_loss_weight: float = 1e-4
    # training-length hint (generation is not capped by it)
    max_length: int = 1024

    # ---- derived -------------------------------------------------------------
    @property
    def rosa_vocab(self) -> int:
        """ROSA table rows: one per token plus the reserved 'no hint' id."""
        return self.vocab_size + 1

    @property
    def rosa_none_id(self) -> int:
        return self.vocab_size

    # ---- validation ----------------------------------------------------------
    def validate(self) -> "ModelConfig":
        def bad(name: str, why: str) -> None:
            raise HierarchosError(f"config field '{name}' = {getattr(self, name)!r}: {why}")

        for name in ("vocab_size", "context_dim", "h_hidden", "l_hidden", "h_layers", "l_layers",
                     "head_size", "ffn_mult", "wkv_chunk_size", "persistent_dim", "ltm_slots",
                     "ltm_key_dim", "ltm_val_dim", "ltm_topk", "ltm_chunk", "h_cycles",
                     "max_h_steps", "h_stride", "grad_steps", "rosa_window", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                bad(name, "must be a positive integer")
        if isinstance(self.max_l_steps, bool) or not isinstance(self.max_l_steps, int) or self.max_l_steps < 0:
            bad("max_l_steps", "must be an integer >= 0 (0 = commit pass only)")
        for name in ("context_dim", "h_hidden", "l_hidden"):
            if getattr(self, name) % self.head_size:
                bad(name, f"must be a multiple of head_size={self.head_size}")
        if self.ltm_topk > self.ltm_slots:
            bad("ltm_topk", f"cannot exceed ltm_slots={self.ltm_slots}")
        if self.time_mix not in TIME_MIXES:
            bad("time_mix", f"must be one of {', '.join(TIME_MIXES)}")
        for name, choices in (("tm_token_shift", TM_TOKEN_SHIFTS), ("tm_gate", TM_GATES), ("tm_init", TM_INITS)):
            if getattr(self, name) not in choices:
                bad(name, f"must be one of {', '.join(choices)}")
        if not isinstance(self.tm_value_residual, bool):
            bad("tm_value_residual", "must be true or false")
        # with no RWKV-7 time mix the wiring means nothing: any complete named wiring is accepted (the
        # default, or the one an older save holds), a switch set on its own is refused as a mistake
        if self.time_mix == "wkv4" or self.h_block == self.l_block == "attention":
            default = TIME_MIX_WIRINGS[DEFAULT_WIRING]
            if self.time_mix_wiring() is None:
                name = next(n for n, v in default.items() if getattr(self, n) != v)
                where = ("time_mix 'wkv4' has none" if self.time_mix == "wkv4" else
                         "both stacks are attention blocks")
                bad(name, f"rewires the RWKV-7 time mix; {where} (keep the default)")
        for name in ("h_block", "l_block"):
            if getattr(self, name) not in BLOCK_TYPES:
                bad(name, f"must be one of {', '.join(BLOCK_TYPES)}")
        if self.pos_encodings not in POS_ENCODINGS:
            bad("pos_encodings", f"must be one of {', '.join(POS_ENCODINGS)}")
        if self.pos_encodings == "rope" and self.head_size % 2:
            bad("head_size", "must be even for rotary positions (pos_encodings 'rope')")
        if isinstance(self.window_size, bool) or not isinstance(self.window_size, int) or self.window_size < 0:
            bad("window_size", "must be an integer >= 0 (0 = full causal attention)")
        for name in ("l_conv_atol", "ltm_write_threshold", "z_loss_weight", "commitment_threshold"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                bad(name, "must be a finite number >= 0")
        thresh = self.h_halt_thresh
        if not isinstance(thresh, (int, float)) or isinstance(thresh, bool) or not (0.0 < thresh <= 1.0):
            bad("h_halt_thresh", "must be in (0, 1]; 1.0 runs every pondering step")
        if self.halting not in HALTING_RULES:
            bad("halting", f"must be one of {', '.join(HALTING_RULES)}")
        prob = self.q_explore_prob
        if not isinstance(prob, (int, float)) or isinstance(prob, bool) or not (0.0 <= prob <= 1.0):
            bad("q_explore_prob", "must be in [0, 1]")
        for name in ("use_deepembed", "deepembed_per_block", "use_rosa"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be true or false")
        return self

    # ---- JSON ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps({"config_version": CONFIG_VERSION, **self.to_dict()}, indent=2, sort_keys=True)

    def time_mix_wiring(self) -> str | None:
        """The name of the complete wiring (TIME_MIX_WIRINGS) these fields spell, or None for a mix."""
        return next((name for name, fields in TIME_MIX_WIRINGS.items()
                     if all(getattr(self, k) == v for k, v in fields.items())), None)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "config") -> "ModelConfig":
        if not isinstance(data, dict):
            raise HierarchosError(f"{where}: expected a JSON object with model fields, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in data.items():
            name = FIELD_ALIASES.get(key, key)
            if name in known:
                values[name] = value
            elif key not in ("config_version", "version", "training_history", "model_type", "hierarchos_version", "memory_sources", "extra_keys"):
                raise HierarchosError(
                    f"{where}: unknown config field '{key}' (known fields: {', '.join(sorted(known))})")
        return cls(**values).validate()

    @classmethod
    def from_json(cls, text: str, *, where: str = "config") -> "ModelConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise HierarchosError(f"{where}: not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}") from None
        return cls.from_dict(data, where=where)

    @property
    def position_period(self) -> int:
        """The period of everything the parallel forward derives from a window's start position (plan
        points every h_stride tokens, memory chunk closes every ltm_chunk): a captured forward is valid
        at every start position congruent to its own modulo this (the trainer's and the prefill's graphs)."""
        return math.lcm(self.h_stride, self.ltm_chunk)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes).validate()


def tiny_config(**overrides: Any) -> ModelConfig:
    """A config small enough for CPU tests and the smoke demo (every feature on)."""
    base = dict(vocab_size=64, context_dim=16, h_hidden=16, l_hidden=16, h_layers=1, l_layers=1,
                head_size=8, persistent_dim=4, ltm_slots=8, ltm_key_dim=8, ltm_val_dim=8, ltm_topk=2,
                ltm_chunk=4, h_cycles=2, max_h_steps=2, max_l_steps=2, h_stride=2, wkv_chunk_size=4,
                rosa_window=64, max_length=64)
    base.update(overrides)
    return ModelConfig(**base).validate()
