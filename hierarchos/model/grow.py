"""Growing a trained HierarchosLM without changing what it computes.

Every function takes a model and returns a NEW model (new validated ModelConfig, same dtype and
device) whose logits equal the old model's on every token sequence, in the parallel and the
step form, up to float rounding; the input model is never modified. `expand(model, **fields)`
applies whichever growths the changed config fields ask for:

  grow_vocab   more tokens: old rows kept, new rows near the mean row; old-token logits unchanged
  grow_slots   more memory slots, dormant (never read) until `activate_slots` allocates them
  widen        context_dim / h_hidden / l_hidden times a whole number: every vector copied n times
  add_layers   more manager / worker blocks on top of each stack, each the identity at init
  enable_features  ROSA (zero table), DeepEmbed (ones tables), per-block DeepEmbed (copies)

Each construction, its exactness and what it does to training is in its docstring.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import torch

from ..config import FIELD_ALIASES, ModelConfig
from ..errors import HierarchosError
from .lm import HierarchosLM
from .memory import DORMANT_SOURCE
from .rwkv import N_MIX

WIDTHS = ("context_dim", "h_hidden", "l_hidden")
LAYERS = ("h_layers", "l_layers")
FEATURES = ("use_rosa", "use_deepembed", "deepembed_per_block")  # may be turned on
GROWABLE = ("vocab_size", "ltm_slots", *WIDTHS, *LAYERS)
# fields that fix parameter shapes without a growth construction here
FIXED = ("head_size", "ffn_mult", "time_mix", "persistent_dim", "ltm_key_dim", "ltm_val_dim",
         "tm_token_shift", "tm_gate", "tm_value_residual", "tm_init")
# std of the zero-sum noise between the copies of a widened weight, relative to its RMS (see widen)
SPLIT_NOISE = 0.1
# std of the noise added to the mean embedding row for each new token (see grow_vocab)
NEW_TOKEN_NOISE = 0.002

Tensors = dict[str, torch.Tensor]
GrowFn = Callable[[Tensors, Tensors, torch.Generator], Tensors]


# ---- shared machinery -----------------------------------------------------------------------

def _check_growable(model: HierarchosLM) -> None:
    if any(getattr(m, "quantized_numel", 0) for m in model.modules()):
        raise HierarchosError("cannot grow a quantized model: grow the full-precision model directory, "
                              "then quantize the result")


def _grown_config(cfg: ModelConfig, **changes) -> ModelConfig:
    """cfg with the given growable fields raised (None: unchanged); shrinking is an error."""
    changes = {name: value for name, value in changes.items() if value is not None}
    new_cfg = cfg.replace(**changes)  # validates: a non-integer or a bad width is a one-line error
    for name in changes:
        old, new = getattr(cfg, name), getattr(new_cfg, name)
        if new < old:
            raise HierarchosError(f"{name} {new} is smaller than the model's {old}: growing never removes "
                                  f"capacity; pass a value >= {old} or leave it out")
    return new_cfg


def _rebuild(model: HierarchosLM, cfg: ModelConfig, grow: GrowFn, seed: int) -> HierarchosLM:
    """A model of `cfg`: a fresh seeded init, then the tensors `grow(old, fresh, generator)`
    returns loaded over it (tensors it leaves out keep their fresh init)."""
    _check_growable(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        new = HierarchosLM(cfg)
    dtype, device = model.persistent.dtype, model.persistent.device
    # float32 tensors follow the model's precision; float64 metadata (slot_time) stays float64
    new._apply(lambda t: t.to(device=device, dtype=dtype) if t.dtype == torch.float32 else t.to(device))
    fresh = {name: t.detach().clone() for name, t in new.state_dict().items()}
    old = {name: t.detach() for name, t in model.state_dict().items()}
    updates = grow(old, fresh, torch.Generator().manual_seed(seed + 1))
    updates.pop("lm_head.weight", None)  # tied to embed.weight, set below
    for name, tensor in updates.items():
        if name not in fresh or tuple(tensor.shape) != tuple(fresh[name].shape):
            raise RuntimeError(f"growth produced {name} {tuple(tensor.shape)}, the new model expects "
                               f"{tuple(fresh[name].shape) if name in fresh else 'no such tensor'}")
        fresh[name] = tensor.to(dtype=fresh[name].dtype, device=fresh[name].device)
    fresh["lm_head.weight"] = fresh["embed.weight"]  # tied
    new.load_state_dict(fresh, strict=True)
    new.memory.source_names = list(model.memory.source_names)
    new.reasoner.manager.gradient_checkpointing = model.reasoner.manager.gradient_checkpointing
    new.reasoner.worker.gradient_checkpointing = model.reasoner.worker.gradient_checkpointing
    return new.train(model.training)


# ---- layers -----------------------------------------------------------------------------------

def add_layers(model: HierarchosLM, h_layers: int | None = None, l_layers: int | None = None, *,
               seed: int = 0) -> HierarchosLM:
    """More manager (h_layers) / worker (l_layers) blocks, appended on top of each stack.

    A block computes x + time_mix(...) + channel_mix(...); the new blocks' two exits
    (`time_mix.output` and `channel_mix.down`) are zero, so each new block is the identity and
    the logits and aux terms are unchanged (bit for bit in practice). Everything else in a new
    block has the fresh init of its depth, per-block DeepEmbed tables are ones, and its
    recurrent state entries are new zeros (a carried state of the old model does not fit).
    Training: the first backward gives the two exits a non-zero gradient (their inputs are
    not zero) and the rest of the new block a zero one; after the first update the exits are
    non-zero and every new parameter learns, except the value residual's `up` (x070's wiring),
    which follows one update later: its `down` starts at zero, as in a fresh model.
    """
    cfg = model.cfg
    new_cfg = _grown_config(cfg, h_layers=h_layers, l_layers=l_layers)

    def grow(old: Tensors, fresh: Tensors, gen) -> Tensors:
        out = dict(old)  # old blocks keep their names: the new ones come after them
        for stack, first, last in (("manager", cfg.h_layers, new_cfg.h_layers),
                                   ("worker", cfg.l_layers, new_cfg.l_layers)):
            for i in range(first, last):
                for exit_name in ("time_mix.output.weight", "channel_mix.down.weight"):
                    name = f"reasoner.{stack}.blocks.{i}.{exit_name}"
                    out[name] = torch.zeros_like(fresh[name])
        return out

    return _rebuild(model, new_cfg, grow, seed)


# ---- widths -----------------------------------------------------------------------------------

def _factor(name: str, old: int, new: int | None) -> int:
    if new is None or new == old:
        return 1
    if isinstance(new, int) and not isinstance(new, bool) and new > old and new % old:
        raise HierarchosError(
            f"{name} {new}: widening must multiply the width by a whole number ({old} -> {2 * old}, "
            f"{3 * old}, ...), because only whole copies of the vector keep LayerNorm (and every "
            f"head) exactly as it was; pick a multiple of {old}")
    return max(1, new // old) if isinstance(new, int) and not isinstance(new, bool) else 1


def _tile(t: torch.Tensor, dim: int, segments) -> torch.Tensor:
    """Output side: each segment (size, n) of `dim` repeated n times, in place."""
    parts = t.split([size for size, _ in segments], dim)
    return torch.cat([torch.cat([part] * n, dim) for part, (_, n) in zip(parts, segments)], dim)


def _split(t: torch.Tensor, dim: int, segments, noise: float, gen: torch.Generator) -> torch.Tensor:
    """Input side: a segment (size, n) becomes n copies that sum to the original weights (each
    1/n, plus noise that sums to zero over the copies), so it reads n equal copies of its input
    exactly as the original read one."""
    parts = t.split([size for size, _ in segments], dim)
    out = []
    for part, (_, n) in zip(parts, segments):
        copies = torch.stack([part / n] * n)  # (n, *part.shape)
        if n > 1 and noise > 0:
            scale = noise * float(part.double().pow(2).mean().sqrt()) / n
            jitter = torch.randn(copies.shape, generator=gen, dtype=torch.float64)
            copies = copies + ((jitter - jitter.mean(0, keepdim=True)) * scale).to(copies)
        out.append(torch.cat(copies.unbind(0), dim))
    return torch.cat(out, dim)


class _Widener:
    """The widening rule of every tensor of the model, by name."""

    VECTOR = ("ln_time.weight", "ln_time.bias", "ln_channel.weight", "ln_channel.bias",
              "time_mix.mix_base", "time_mix.decay_base", "time_mix.iclr_base", "time_mix.removal_scale",
              "time_mix.key_iclr_mix", "time_mix.norm.weight", "time_mix.norm.bias", "channel_mix.mix",
              "time_mix.value_residual_base")
    SQUARE = ("receptance", "key", "value", "gate", "output")
    UNCHANGED = ("persistent", "memory.keys", "memory.values", "memory.slot_time", "memory.slot_count",
                 "memory.slot_source", "memory.write_gates.bias", "reasoner.h_halt_proj.bias")

    def __init__(self, cfg: ModelConfig, n_d: int, n_h: int, n_l: int, noise: float, gen: torch.Generator):
        self.cfg, self.n_d, self.noise, self.gen = cfg, n_d, noise, gen
        self.stack_width = {"manager": (cfg.h_hidden, n_h), "worker": (cfg.l_hidden, n_l)}

    def lin(self, t, out_segments, in_segments):
        return _split(_tile(t, 0, out_segments), 1, in_segments, self.noise, self.gen)

    def __call__(self, name: str, t: torch.Tensor) -> torch.Tensor:
        cfg, n_d = self.cfg, self.n_d
        d = (cfg.context_dim, n_d)
        hh = (cfg.h_hidden, self.stack_width["manager"][1])
        lh = (cfg.l_hidden, self.stack_width["worker"][1])
        stack = re.fullmatch(r"reasoner\.(manager|worker)\.(.+)", name)
        if stack:
            return self.stack_tensor(stack.group(1), stack.group(2), t)
        if name in self.UNCHANGED:
            return t
        if name in ("embed.weight", "lm_head.weight", "rosa_embed.weight"):
            return _tile(t, 1, [d])  # producers of d-vectors: columns copied
        if name in ("out_norm.weight", "out_norm.bias"):
            # the tied head sums n copies: 1/n here keeps the logits
            return _tile(t, 0, [d]) / n_d
        if name == "encoder.weight":  # input [e ; m ; P]
            return self.lin(t, [d], [d, (cfg.ltm_val_dim, 1), (cfg.persistent_dim, 1)])
        if name in ("memory.query.weight", "memory.target.weight", "memory.write_gates.weight"):
            return _split(t, 1, [d], self.noise, self.gen)
        linears = {  # name -> (output segments, input segments)
            "encoder": ([d], None),
            "reasoner.h_input_proj": ([hh], [d]),
            "reasoner.l_feedback_proj": ([hh], [d]),
            "reasoner.h_halt_proj": ([(1, 1)], [hh]),
            "reasoner.h_to_context": ([d], [hh]),
            "reasoner.l_input_proj": ([lh], [d, d]),  # input [u ; ctx]
            "reasoner.l_drift_proj": ([d], [lh]),
            "reasoner.l_to_out": ([d], [lh]),
        }
        module, _, kind = name.rpartition(".")
        if module in linears:
            out_segments, in_segments = linears[module]
            return _tile(t, 0, out_segments) if kind == "bias" else self.lin(t, out_segments, in_segments)
        raise RuntimeError(f"widen: no rule for tensor {name}; add one in hierarchos/model/grow.py")

    def stack_tensor(self, stack: str, name: str, t: torch.Tensor) -> torch.Tensor:
        width, n = self.stack_width[stack]
        c, f = (width, n), (self.cfg.ffn_mult * width, n)
        if name.startswith("deepembed."):
            return _tile(t, 1, [f])  # one gate per hidden unit: columns follow the hidden copies
        block = re.fullmatch(r"blocks\.\d+\.(.+)", name)
        part = block.group(1) if block else name
        if part in self.VECTOR:
            return _tile(t, 0, [c])
        if part == "time_mix.mix":
            return _tile(t, 1, [c])
        if part in ("time_mix.mix_down", "time_mix.decay_down", "time_mix.iclr_down", "time_mix.gate_down",
                    "time_mix.value_residual_down"):
            return _split(t, 0, [c], self.noise, self.gen)  # x @ down: input on dim 0, rank kept
        if part == "time_mix.mix_up":
            return _tile(t, 2, [c])
        if part in ("time_mix.decay_up", "time_mix.iclr_up", "time_mix.gate_up", "time_mix.value_residual_up"):
            return _tile(t, 1, [c])
        if part == "time_mix.bonus":
            return _tile(t, 0, [(width // self.cfg.head_size, n)])  # whole heads copied
        if part in tuple(f"time_mix.{lin}.weight" for lin in self.SQUARE):
            return self.lin(t, [c], [c])
        if part in ("channel_mix.gate.weight", "channel_mix.up.weight"):
            return self.lin(t, [f], [c])
        if part == "channel_mix.down.weight":
            return self.lin(t, [c], [f])
        raise RuntimeError(f"widen: no rule for tensor reasoner.{stack}.{name}; add one in hierarchos/model/grow.py")


# The other low-rank matrices: what the extra rank starts from, and the dim that holds the rank. Linear
# paths (x @ down) @ up: the extra rank's zero `down` adds nothing, its fresh `up` gives that `down` a
# gradient. The gate's path is sigmoid(x @ down) @ up, where a zero `down` still adds 0.5 * up: there
# the extra rank gets a fresh `down` and a zero `up` (which then receives a gradient).
_RANK_PADDING = {"decay_down": ("zero", 1), "iclr_down": ("zero", 1), "value_residual_down": ("zero", 1),  # (C, R)
                 "decay_up": ("fresh", 0), "iclr_up": ("fresh", 0), "value_residual_up": ("fresh", 0),  # (R, C)
                 "mix_up": ("fresh", 1),                                                              # (6, R, C)
                 "gate_down": ("fresh", 1), "gate_up": ("zero", 0)}


def _fit_rank(name: str, widened: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
    """The low-rank mix paths have rank min(RANK, width): a width under RANK gains rank when
    widened. The extra rank gets a zero `down` (so it adds nothing) and a fresh `up` (so the
    zero `down` receives a gradient); the gate's the other way round (`_RANK_PADDING`)."""
    if widened.shape == fresh.shape:
        return widened
    if name.endswith("time_mix.mix_down"):  # (C, N_MIX * R): the mixes' rank-R blocks side by side
        rows, rank = widened.shape[0], widened.shape[1] // N_MIX
        padded = torch.zeros(rows, N_MIX, fresh.shape[1] // N_MIX, dtype=widened.dtype, device=widened.device)
        padded[:, :, :rank] = widened.view(rows, N_MIX, rank)
        return padded.view(rows, -1)
    for suffix, (start, dim) in _RANK_PADDING.items():
        if name.endswith("time_mix." + suffix):
            padded = torch.zeros_like(fresh) if start == "zero" else fresh.clone()
            padded.narrow(dim, 0, widened.shape[dim]).copy_(widened)
            return padded
    return widened  # a mismatch elsewhere is reported by _rebuild


def widen(model: HierarchosLM, context_dim: int | None = None, h_hidden: int | None = None,
          l_hidden: int | None = None, *, seed: int = 0, split_noise: float = SPLIT_NOISE) -> HierarchosLM:
    """Net2Net-style widening of context_dim, h_hidden and l_hidden, each by its own whole factor n.

    Construction: a width-C vector becomes n copies of itself, [x; x; ...]. LayerNorm of n copies
    is n copies of the LayerNorm (same mean and variance), heads are copied whole (per-head
    WKV state, head norm, kappa normalisation and bonus unchanged), so every tensor follows
    one of three rules: what produces a vector (Linear outputs, per-channel vectors, embedding
    columns, DeepEmbed columns) is copied n times; what reads one (Linear inputs, the low-rank
    `*_down` mix paths, memory query/target/write gates, the halting head) gets n copies of its
    weights that sum to the original (1/n each plus `split_noise` x RMS noise that sums to zero
    over the copies); concatenated inputs ([e; m; P] of the encoder, [u; ctx] of the worker
    input) are split segment by segment. The tied head reads n copies of out_norm's output, so
    out_norm's weight and bias are divided by n_d. Logits, ponder and step counts are exact
    up to float rounding (tests/test_grow.py measures it).

    The noise is what lets the copies become different units: with plain 1/n splits every copy
    gets the same gradient forever (Net2Net's symmetry problem); with zero-sum noise their
    gradients differ from the first step while the function stays exact.

    Aux terms: the worker commitment is a sum over the d channels of the drift, so it scales by
    n_d; `commitment_threshold` is multiplied by n_d, which makes the new commitment exactly
    n_d x the old one (divide the commitment loss weight by n_d to keep the same loss).
    Widths must be whole multiples: a LayerNorm over a vector that is not whole copies of the
    old one has another mean and variance, so no exact construction exists for that here.
    The low-rank mix paths keep their rank (min(32 or 64, width)); under width 64 the wider
    model's rank is larger, and the extra rank starts with a zero `down` matrix.
    """
    cfg = model.cfg
    n_d = _factor("context_dim", cfg.context_dim, context_dim)
    n_h = _factor("h_hidden", cfg.h_hidden, h_hidden)
    n_l = _factor("l_hidden", cfg.l_hidden, l_hidden)
    new_cfg = _grown_config(cfg, context_dim=context_dim, h_hidden=h_hidden, l_hidden=l_hidden)
    new_cfg = new_cfg.replace(commitment_threshold=cfg.commitment_threshold * n_d)

    def grow(old: Tensors, fresh: Tensors, gen) -> Tensors:
        widener = _Widener(cfg, n_d, n_h, n_l, split_noise, gen)
        return {name: _fit_rank(name, widener(name, t), fresh[name]) for name, t in old.items()}

    return _rebuild(model, new_cfg, grow, seed)


# ---- memory slots -----------------------------------------------------------------------------

def grow_slots(model: HierarchosLM, ltm_slots: int, *, seed: int = 0) -> HierarchosLM:
    """More long-term-memory slots, dormant until allocated.

    Reads take a hard top-k over q.K, so a new slot that can ever win a top-k place changes the
    output, and one that never can gets no gradient and no write (writes only reach slots that
    were read): under the current read and write rules a new slot is either not exact at init
    or never useful by itself. So the new slots are dormant: their `slot_source` is
    `DORMANT_SOURCE` and reads skip them, which keeps the function exactly unchanged (no new
    tensor, so every existing file still loads). They get fresh keys and values (the init of a
    new model) and metadata time 0, count 0. They become useful when something allocates them:
    `activate_slots(model)` makes them ordinary slots (this changes the function, like a bigger
    fresh memory; training then adapts), and an allocator (e.g. chat storing a new memory in a
    free slot) can activate them one at a time by setting their `slot_source`.
    """
    cfg = model.cfg
    new_cfg = _grown_config(cfg, ltm_slots=ltm_slots)
    added = new_cfg.ltm_slots - cfg.ltm_slots

    def grow(old: Tensors, fresh: Tensors, gen) -> Tensors:
        out = dict(old)
        for name in ("memory.keys", "memory.values"):
            out[name] = torch.cat([old[name], fresh[name][cfg.ltm_slots:]])
        for name, default in (("memory.slot_time", 0), ("memory.slot_count", 0),
                              ("memory.slot_source", DORMANT_SOURCE)):
            out[name] = torch.cat([old[name], torch.full((added,), default, dtype=old[name].dtype,
                                                         device=old[name].device)])
        return out

    return _rebuild(model, new_cfg, grow, seed)


def activate_slots(model: HierarchosLM, slots=None, *, seed: int = 0) -> HierarchosLM:
    """A copy of the model whose dormant slots (all, or the given indices) are ordinary slots
    again (source -1: none). This changes what the model computes: they now compete in reads."""
    source = model.memory.slot_source
    if slots is None:
        index = (source == DORMANT_SOURCE).nonzero().flatten()
    else:
        index = torch.as_tensor(list(slots), dtype=torch.int64, device=source.device)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= source.numel()):
            raise HierarchosError(f"activate_slots: slot indices must be in 0..{source.numel() - 1}")

    def grow(old: Tensors, fresh: Tensors, gen) -> Tensors:
        out = dict(old)
        sources = old["memory.slot_source"].clone()
        picked = sources[index]
        sources[index] = torch.where(picked == DORMANT_SOURCE, torch.full_like(picked, -1), picked)
        out["memory.slot_source"] = sources
        return out

    return _rebuild(model, model.cfg, grow, seed)


# ---- vocabulary -----------------------------------------------------------------------------------

def grow_vocab(model: HierarchosLM, new_vocab_size: int, *, seed: int = 0,
               noise_std: float = NEW_TOKEN_NOISE) -> HierarchosLM:
    """More tokens (continual learning with an extended tokenizer).

    Old embedding rows (and so the tied head's rows) are kept; a new token's row is the mean of
    the old rows plus N(0, noise_std^2) noise (seeded): its logit starts at about the mean
    logit, which by Jensen is at most log(Z / V), so each new token starts with at most about
    1/V of the probability (Hewitt 2021) instead of an arbitrary share. For sequences of old
    tokens the old-token logits are unchanged exactly; the softmax over the larger vocabulary
    gives the new tokens that small mass. DeepEmbed tables get rows of ones (a neutral gate).
    ROSA: the table has one row per token plus the "no hint" row at index vocab_size, which
    moves with the id: the old none row goes to the new last index, so a sequence gets the
    same ROSA rows as before; the new tokens' ROSA rows get the fresh init.
    """
    cfg = model.cfg
    new_cfg = _grown_config(cfg, vocab_size=new_vocab_size)
    old_v, added = cfg.vocab_size, new_cfg.vocab_size - cfg.vocab_size

    def grow(old: Tensors, fresh: Tensors, gen) -> Tensors:
        out = dict(old)
        table = old["embed.weight"]
        noise = torch.randn(added, table.shape[1], generator=gen, dtype=torch.float64) * noise_std
        out["embed.weight"] = torch.cat([table, table.mean(0, keepdim=True) + noise.to(table)])
        if "rosa_embed.weight" in old:
            rosa = old["rosa_embed.weight"]
            out["rosa_embed.weight"] = torch.cat([rosa[:old_v], fresh["rosa_embed.weight"][old_v:-1],
                                                  rosa[old_v:]])
        for name, t in old.items():
            if ".deepembed." in name:
                out[name] = torch.cat([t, torch.ones(added, t.shape[1], dtype=t.dtype, device=t.device)])
        return out

    return _rebuild(model, new_cfg, grow, seed)


# ---- features -------------------------------------------------------------------------------------

def enable_features(model: HierarchosLM, use_rosa: bool | None = None, use_deepembed: bool | None = None,
                    deepembed_per_block: bool | None = None, *, seed: int = 0) -> HierarchosLM:
    """Turn on ROSA and DeepEmbed in a model trained without them, exactly.

    ROSA adds R[hint] to the embedding: a zero table adds nothing, and its rows get the
    embedding's gradient from the first step. DeepEmbed multiplies the channel-mix hidden units
    by D[token]: tables of ones change nothing and learn from the first step. Per-block tables
    start as copies of the shared one. Features cannot be turned off this way (that would
    change the function).
    """
    cfg = model.cfg
    changes = {name: value for name, value in (("use_rosa", use_rosa), ("use_deepembed", use_deepembed),
                                                ("deepembed_per_block", deepembed_per_block)) if value is not None}
    for name, value in changes.items():
        if getattr(cfg, name) and not value:
            raise HierarchosError(f"{name}: cannot turn a feature off by growing a model (it changes what the "
                                  "model computes); train a new model without it")
    new_cfg = cfg.replace(**changes)

    def grow(old: Tensors, fresh: Tensors, gen) -> Tensors:
        out = dict(old)
        if new_cfg.use_rosa and not cfg.use_rosa:
            out["rosa_embed.weight"] = torch.zeros_like(fresh["rosa_embed.weight"])
        if cfg.use_deepembed and new_cfg.deepembed_per_block and not cfg.deepembed_per_block:
            for stack, layers in (("manager", cfg.h_layers), ("worker", cfg.l_layers)):
                shared = out.pop(f"reasoner.{stack}.deepembed.0.weight")
                out.update({f"reasoner.{stack}.deepembed.{i}.weight": shared.clone() for i in range(layers)})
        return out  # DeepEmbed turned on: the fresh tables are ones already

    return _rebuild(model, new_cfg, grow, seed)


# ---- all at once -------------------------------------------------------------------------------------

def expand(model: HierarchosLM, *, seed: int = 0, **fields) -> HierarchosLM:
    """A grown copy of the model for the given config fields (aliases accepted; None: unchanged).

    use_rosa / use_deepembed / deepembed_per_block turn on, then vocab_size, ltm_slots, the
    widths and the layer counts grow, by the constructions above, so the logits stay the same.
    Fields that do not change parameter shapes (max_length, h_cycles, max_h_steps, max_l_steps,
    ltm_topk <= ltm_slots, thresholds...) are copied into the new config as given; the
    reasoning and memory ones change what the model computes, by design (a top-k larger than
    the live slots reads dormant ones with weight 0). An explicit commitment_threshold overrides widen's scaled
    one. Shrinking, turning a feature off, unknown fields and fields without a growth
    (head_size, ffn_mult, persistent_dim, ltm_key_dim, ltm_val_dim, time_mix) are one-line errors.
    """
    cfg = model.cfg
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    changes = {}
    for key, value in fields.items():
        name = FIELD_ALIASES.get(key, key)
        if name not in known:
            raise HierarchosError(f"unknown config field '{key}' (known fields: {', '.join(sorted(known))})")
        if value is not None:
            changes[name] = value
    for name in FIXED:
        if name in changes and changes[name] != getattr(cfg, name):
            raise HierarchosError(
                f"{name}: cannot change {getattr(cfg, name)!r} -> {changes[name]!r} by growing a model; only "
                f"{', '.join(GROWABLE)} grow and {', '.join(FEATURES)} turn on (train a new model for another {name})")
    _grown_config(cfg, **{name: changes[name] for name in GROWABLE if name in changes})  # shrink / bad value first

    grown = model
    if any(changes.get(name, getattr(cfg, name)) != getattr(cfg, name) for name in FEATURES):
        grown = enable_features(grown, **{name: changes.get(name) for name in FEATURES}, seed=seed)
    if changes.get("vocab_size", cfg.vocab_size) != cfg.vocab_size:
        grown = grow_vocab(grown, changes["vocab_size"], seed=seed)
    if changes.get("ltm_slots", cfg.ltm_slots) != cfg.ltm_slots:
        grown = grow_slots(grown, changes["ltm_slots"], seed=seed)
    if any(changes.get(name, getattr(cfg, name)) != getattr(cfg, name) for name in WIDTHS):
        grown = widen(grown, **{name: changes.get(name) for name in WIDTHS}, seed=seed)
    if any(changes.get(name, getattr(cfg, name)) != getattr(cfg, name) for name in LAYERS):
        grown = add_layers(grown, **{name: changes.get(name) for name in LAYERS}, seed=seed)
    final_cfg = grown.cfg.replace(**{k: v for k, v in changes.items() if k not in (*GROWABLE, *FEATURES)})
    return _rebuild(grown, final_cfg, lambda old, fresh, gen: dict(old), seed)


def growth_summary(old: ModelConfig, new: ModelConfig) -> dict:
    """The config fields that differ: name -> [old, new] (for the training history)."""
    before, after = old.to_dict(), new.to_dict()
    return {name: [before[name], after[name]] for name in before if before[name] != after[name]}
