"""The quantized model's fused generation step: one C++ call per RWKV-7 stack pass at T = 1.

At batch 1 the quantized step was bound by Python and small torch ops, not by its weights: each
of the ~66 block passes of a 125m token ran a few dozen tiny ops around its kernel calls
(BENCHMARKS.md, issue 17). `attach_fused_steps(model)` (done by build_quantized_model) turns every
RWKV-7 stack whose projections are all quantized into a `FusedRWKVStack`: a one-token call runs
the whole stack (every block's layer norms, token shift, low-rank mixes, projections, WKV-7
update, head norm, gates and SwiGLU) in `kernel.RwkvStackStep` (kernels/rwkv_step.cpp), on the
same integer matvecs the Python path calls. Everything else runs the ordinary Python forward,
which stays the reference (tests/test_quant_fused_step.py holds the two equal):
- prompts (T > 1), float64 or autocast, inputs that need gradients, Vulkan-placed weights;
- forward hooks or pre-hooks on any module of the stack (they observe module calls, which the fused
  call does not make: bench/bench_generate.py counts streamed bytes that way);
- stacks it does not cover (attention, `time_mix="wkv4"`, a projection left in float or with a
  bias, parameters not in float32), and every stack when the C++ kernel is not built.
`HIERARCHOS_FUSED_STEP=0` in the environment turns it off (for measuring against the Python step).

The worker's shadow passes go one step further (`FusedShadowReasoner`, given to the model's reasoner
when its worker stack is fused): at T = 1 the whole loop of `HierarchicalReasoner._explore` (per
pass: the input projection of [u, context + drift], the stack, the drift projection, tanh, the
freezing rule, the commitment) is one `RwkvStackStep.shadow` call instead of ~40 torch ops and four
kernel calls a pass. It applies where the worker's fused step does, with both projections quantized
(no bias other than a float one, no projection group, not on Vulkan, fewer rows than the dense path
takes) and no hooks on them; else `_explore` runs as written (tests/test_quant_fused_step.py holds
the two equal).

At the minimal depth (no shadow pass; ACT halting) the reasoner's whole round at T = 1 is one call,
`RwkvStackStep.round` (`FusedShadowReasoner._round`): the input projection (and the feedback's), the
manager's watch pass, the plans' LERP, at a plan point the pondering passes with their halting and
the plan's projection, the worker's input projection, commit pass and output projection; it applies
where both stacks take their fused step and every projection is quantized as the shadow call's are
(`_round_call` says when). And a quantized memory's one-token read is one call, `kernel.memory_read`
(`FusedMemory`, kernels/memory_step.cpp; a token that closes a chunk then writes it in a few torch ops,
`FusedMemory.close_chunk`). Where both apply, a generated
token is those two calls (`FusedTokenLM`, the model's class): the memory's goes on to the encoder, the
round's to the output norm and the head. At 125m Q4_0 the three took ~25-35% off a ~4.5 ms token
(BENCHMARKS.md, "The round, the memory's read, the encoder and the head in C++"). The two calls'
fixed arguments (specs, views of parameters, embedding readers) are made once and kept between tokens
(`_TokenProgram`, checked by identity each token): looking them up again cost ~0.2-0.3 ms a token,
Python working on caches the weights had just flushed. `generate` goes further with a `TokenDecoder`: the
model checked once, the state kept between tokens as the calls' arrays and built only when asked.

The low-rank paths' matrices (the token-shift, decay, in-context-rate, gate and value-residual
mixes: 7.1 MB of float32 per 125m stack pass, a quarter of what a pass streams) go to the C++ step
in fp16 by default (`lowrank="fp16"`, or HIERARCHOS_FUSED_LOWRANK=fp32 for float32): half their
bytes, each weight rounded once to its nearest fp16 (relative error <= 2^-11), the products still
in float32. A matrix with a value past fp16's range stays float32. The fused step with fp16 equals,
bit for bit, the float32 fused step on weights already rounded to fp16 (tests/test_quant_fused_step.py).

The C++ object reads the other parameters' own storage (no copies), the fp16 matrices are copies
made when the plan is built: in-place changes to the low-rank matrices are not seen, nor is a
parameter replaced by a new tensor, or a module swapped for another; call
`attach_fused_steps(model)` again after such a change (a deep copy of the model has no plan and
runs the Python step until then).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn
from torch.nn.modules import module as nn_module

from ..errors import HierarchosError
from ..model.hrm import HierarchicalReasoner, add_total, one_token_alpha
from ..model.lm import HierarchosLM, ModelOutput
from ..model.memory import LongTermMemory
from ..model.deepembed import DeepEmbedTables
from ..model.rosa import rosa_hint_array
from ..model.rwkv import RWKVStack, TimeMix
from ..model.state import HierarchosState
from . import kernel
from . import modules as quant_modules
from .gguf_io import QuantTensor
from .modules import QuantEmbedding, QuantLinear

ENV_SWITCH = "HIERARCHOS_FUSED_STEP"
ENV_LOWRANK = "HIERARCHOS_FUSED_LOWRANK"
ENV_DECODER = "HIERARCHOS_TOKEN_DECODER"
LOWRANK_FORMATS = ("fp16", "fp32")
# the low-rank matrices of a block as RwkvStackStep names them
LOWRANK_NAMES = ("mix_down", "mix_up", "decay_down", "decay_up", "iclr_down", "iclr_up", "gate_down", "gate_up",
                 "vr_down", "vr_up")
FP16_MAX = 65504.0


def available() -> bool:
    """Whether the fused step can run at all (the C++ kernel built with RwkvStackStep)."""
    return getattr(kernel, "RwkvStackStep", None) is not None


def _no_plan() -> None:
    return None


def _array(t: torch.Tensor) -> np.ndarray:
    # a view of the parameter's storage when it is contiguous float32 (checked by _layer_spec)
    return t.detach().contiguous().numpy()


def _float_cpu(t: torch.Tensor) -> bool:
    return t.dtype is torch.float32 and t.is_cpu


def _quant(m) -> tuple:
    return (m.weight_q.data, m.weight_q.qtype, m.in_features)


def _bias_free_quantized(m) -> bool:
    """A QuantLinear without bias, on the CPU (not placed on Vulkan)."""
    return (isinstance(getattr(m, "weight_q", None), QuantTensor) and getattr(m, "bias", None) is None
            and getattr(m, "vk_weight", None) is None)


def _why_not(stack) -> str | None:
    """Why this stack cannot take the fused step (None: it can)."""
    if not isinstance(stack, RWKVStack) or stack.time_mix != "rwkv7":
        return "not an RWKV-7 stack"
    if stack.head_size > 256:
        return "head size above 256"
    for block in stack.blocks:
        tm, cm = block.time_mix, block.channel_mix
        if not isinstance(tm, TimeMix):
            return "a block without the RWKV-7 time mix"
        linears = [tm.receptance, tm.key, tm.value, tm.output, cm.gate, cm.up, cm.down]
        if tm.wiring.gate == "sigmoid_full":
            linears.append(tm.gate)
        if any(not _bias_free_quantized(m) for m in linears):
            return "a projection that is not a bias-free quantized matrix on the CPU"
        if any(p.dtype != torch.float32 or p.device.type != "cpu" for p in block.parameters()):
            return "parameters not in float32 on the CPU"
        if not (block.ln_time.elementwise_affine and block.ln_channel.elementwise_affine):
            return "a layer norm without its affine"
    return None


def _half(a: np.ndarray) -> np.ndarray:
    """a in fp16 (round to nearest even), or a itself when a value is past fp16's range."""
    if not np.isfinite(a).all() or float(np.abs(a).max(initial=0.0)) > FP16_MAX:
        return a
    return a.astype(np.float16)


def _layer_spec(block, lowrank: str = "fp32") -> dict:
    """What RwkvStackStep reads of one block (names as kernels/rwkv_step.cpp expects them); the
    low-rank matrices in fp16 when lowrank="fp16"."""
    tm, cm = block.time_mix, block.channel_mix
    spec = {"ln_time.weight": _array(block.ln_time.weight), "ln_time.bias": _array(block.ln_time.bias),
            "ln_time.eps": float(block.ln_time.eps),
            "ln_channel.weight": _array(block.ln_channel.weight), "ln_channel.bias": _array(block.ln_channel.bias),
            "ln_channel.eps": float(block.ln_channel.eps),
            "ddlerp": tm.wiring.token_shift == "ddlerp", "mix": _array(tm.mix),
            "decay_rank": tm.decay_down.shape[1], "decay_base": _array(tm.decay_base),
            "decay_down": _array(tm.decay_down), "decay_up": _array(tm.decay_up),
            "iclr_rank": tm.iclr_down.shape[1], "iclr_base": _array(tm.iclr_base),
            "iclr_down": _array(tm.iclr_down), "iclr_up": _array(tm.iclr_up),
            "removal_scale": _array(tm.removal_scale), "key_iclr_mix": _array(tm.key_iclr_mix),
            "bonus": _array(tm.bonus), "norm.weight": _array(tm.norm.weight), "norm.bias": _array(tm.norm.bias),
            "norm.eps": float(tm.norm.eps), "gate_full": tm.wiring.gate == "sigmoid_full",
            "value_first": tm.sets_v_first, "value_residual": tm.value_residual,
            "receptance": _quant(tm.receptance), "key": _quant(tm.key), "value": _quant(tm.value),
            "output": _quant(tm.output), "cm_mix": _array(cm.mix),
            "cm_gate": _quant(cm.gate), "cm_up": _quant(cm.up), "cm_down": _quant(cm.down)}
    if spec["ddlerp"]:
        spec.update(mix_rank=tm.mix_up.shape[1], mix_base=_array(tm.mix_base), mix_down=_array(tm.mix_down),
                    mix_up=_array(tm.mix_up))
    if spec["gate_full"]:
        spec["gate"] = _quant(tm.gate)
    else:
        spec.update(gate_rank=tm.gate_down.shape[1], gate_down=_array(tm.gate_down), gate_up=_array(tm.gate_up))
    if tm.value_residual:
        spec.update(vr_rank=tm.value_residual_down.shape[1], vr_base=_array(tm.value_residual_base),
                    vr_down=_array(tm.value_residual_down), vr_up=_array(tm.value_residual_up))
    if lowrank == "fp16":
        for name in LOWRANK_NAMES:
            if name in spec:
                spec[name] = _half(spec[name])
    return spec


class _Plan:
    """A stack's C++ step object, its modules (for the hook check) and the last DeepEmbed lookup."""

    def __init__(self, stack: RWKVStack, lowrank: str = "fp16"):
        ffn_dim = stack.blocks[0].channel_mix.up.out_features
        self.lowrank = lowrank
        self.step = kernel.RwkvStackStep(stack.dim, stack.head_size, ffn_dim,
                                         [_layer_spec(block, lowrank) for block in stack.blocks])
        # the hook dicts of every module of the stack (registering a hook fills one in place)
        self.hook_dicts = [d for m in stack.modules() if m is not stack for d in (m._forward_hooks, m._forward_pre_hooks)]
        self.gates_for: tuple | None = None  # (tokens, version, gates): the passes of one step share tokens

    def __deepcopy__(self, memo):  # a copied model has copied parameters: it builds its own plan
        return None

    def __reduce__(self):  # pickled models come back without a plan (the Python step) until attached again
        return (_no_plan, ())

    def observed(self) -> bool:
        """Whether a hook watches any module call of the stack (or every module's)."""
        if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
            return True
        return any(self.hook_dicts)

    def gates(self, stack: RWKVStack, tokens: torch.Tensor) -> list | None:
        if stack.deepembed is None:
            return None
        cached = self.gates_for
        if cached is not None and cached[0] is tokens and cached[1] == tokens._version:
            return cached[2]
        B = tokens.shape[0]
        gates, last, array = [], None, None
        for g in stack.deepembed.gates(tokens, len(stack.blocks)):
            if g is not last:  # a shared table yields one lookup for every block: converted once
                last, array = g, g.reshape(B, -1).to(torch.float32).contiguous().numpy()
            gates.append(array)
        self.gates_for = (tokens, tokens._version, gates)  # holds tokens: its id cannot be reused meanwhile
        return gates


class FusedRWKVStack(RWKVStack):
    """An RWKVStack whose one-token passes run in one C++ call (see the module doc); the class of
    the stacks `attach_fused_steps` converts (their parameters and state dict are unchanged)."""

    _fused_plan: _Plan | None = None

    def _fused_applies(self, x, state, frozen) -> bool:
        plan = self._fused_plan
        if plan is None or x.dim() != 3 or x.shape[1] != 1 or x.dtype != torch.float32 or x.device.type != "cpu":
            return False
        if x.requires_grad or torch.is_autocast_enabled("cpu"):
            return False
        if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in state.values()):
            return False
        if frozen is not None and (frozen.dtype != torch.bool or frozen.numel() != x.shape[0]):
            return False
        return not plan.observed()

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, state: dict, frozen: torch.Tensor | None = None):
        if not self._fused_applies(x, state, frozen):
            return super().forward(x, tokens, state, frozen)
        plan = self._fused_plan
        B, C = x.shape[0], x.shape[2]
        out = plan.step.step(x.detach().reshape(B, C).numpy(), state["tm_shift"].numpy(), state["wkv"].numpy(),
                             state["cm_shift"].numpy(), plan.gates(self, tokens),
                             None if frozen is None else frozen.reshape(B).numpy())
        y, tm, wkv, cm = (torch.from_numpy(a) for a in out)
        return y.view(B, 1, C), {"tm_shift": tm, "wkv": wkv, "cm_shift": cm}


def attach_fused_steps(model: nn.Module, enabled: bool | None = None, lowrank: str | None = None) -> int:
    """Give every stack of `model` that can take it the fused one-token step (a fresh plan, built
    from the parameters as they are now); enabled=False (or HIERARCHOS_FUSED_STEP=0 when enabled is
    None) removes it. `lowrank`: "fp16" or "fp32", the low-rank matrices' format in the step (None:
    HIERARCHOS_FUSED_LOWRANK, else fp16; see the module doc). Returns the number of stacks that have it."""
    if enabled is None:
        enabled = os.environ.get(ENV_SWITCH, "1") != "0"
    if lowrank is None:
        lowrank = os.environ.get(ENV_LOWRANK, "fp16")
        where = f"{ENV_LOWRANK}={lowrank}"
    else:
        where = f"lowrank={lowrank!r}"
    if enabled and lowrank not in LOWRANK_FORMATS:
        raise HierarchosError(f"{where}: expected one of {', '.join(LOWRANK_FORMATS)}")
    count = 0
    for module in model.modules():
        if isinstance(module, FusedRWKVStack):
            module._fused_plan = None
            module.__class__ = RWKVStack
        if not isinstance(module, RWKVStack) or not enabled or not available() or _why_not(module) is not None:
            continue
        module.__class__ = FusedRWKVStack  # same layout: only forward differs
        module._fused_plan = _Plan(module, lowrank)
        count += 1
    for module in model.modules():  # the shadow loop goes with its worker's fused step
        if isinstance(module, HierarchicalReasoner):
            fused = isinstance(module.worker, FusedRWKVStack) and hasattr(kernel.RwkvStackStep, "shadow")
            module.__class__ = FusedShadowReasoner if fused else HierarchicalReasoner
        if isinstance(module, LongTermMemory):  # the memory's read where its projections are quantized
            fused = (enabled and getattr(kernel, "memory_read", None) is not None
                     and _bias_free_quantized(module.query) and _bias_free_quantized(module.target))
            module.__class__ = FusedMemory if fused else LongTermMemory
    if type(model) in (HierarchosLM, FusedTokenLM):  # the token's two calls, where memory and reasoner have theirs
        fused = isinstance(model.memory, FusedMemory) and isinstance(model.reasoner, FusedShadowReasoner)
        model.__class__ = FusedTokenLM if fused else HierarchosLM
    return count


class FusedMemory(LongTermMemory):
    """A long-term memory whose one-token read runs in one C++ call, `kernel.memory_read`
    (kernels/memory_step.cpp); the class `attach_fused_steps` gives a memory whose query and target
    projections are quantized. A token that closes a chunk then writes it (`close_chunk`: `_write` on the
    accumulators the read left, as `forward` writes). Everything else runs `forward` as written."""

    def forward(self, e: torch.Tensor, state: dict, pos0: int):
        if not self._read_applies(e, state, pos0):
            return super().forward(e, state, pos0)
        read, new_state, _ = self._read_call(e, state)
        if (pos0 % self.chunk) + 1 == self.chunk:
            new_state = self.close_chunk(new_state)
        return read, new_state

    def close_chunk(self, state: dict) -> dict:
        """The state after a chunk's write, from the state its last token's read left: `_segment`'s write
        (on learned + delta, the surprise and the input's mean over the chunk), the accumulators zeroed."""
        surprise, input_sum = state["surprise"], state["input_sum"]
        learned = self.values.to(surprise.dtype).unsqueeze(0)
        values, momentum, written = self._write(learned + state["delta"], state["momentum"], surprise,
                                                input_sum / self.chunk)
        return {"delta": values - learned, "momentum": momentum, "surprise": torch.zeros_like(surprise),
                "input_sum": torch.zeros_like(input_sum), "writes": state["writes"] + written.to(state["writes"].dtype)}

    def _read_call(self, e, state, encoder=None, persistent=None):
        """The read in one call (`_read_applies` said it applies): (reads (B, 1, Dv), the new state, and with
        `encoder` (its spec) and `persistent` the encoder's gelu output u (B, 1, d), else None)."""
        B, D = e.shape[0], e.shape[2]
        read, surprise, input_sum, u = kernel.memory_read(
            e.reshape(B, D).numpy(), *self._read_args(), state["delta"].numpy(), state["surprise"].numpy(),
            state["input_sum"].numpy(), encoder, persistent)
        return (torch.from_numpy(read).view(B, 1, self.val_dim), _read_state(state, surprise, input_sum),
                None if u is None else torch.from_numpy(u).view(B, 1, -1))

    def _read_args(self) -> tuple:
        """`kernel.memory_read`'s arguments that do not change from token to token (views, specs)."""
        return (_quant(self.query), _quant(self.target), self.keys.detach().numpy(), self.slot_source.numpy(),
                self.topk, self.values.detach().numpy())

    def _read_fits(self) -> bool:
        """Whether the memory itself can take the one-call read (whatever the token): no compiled segment,
        float32 CPU slots, quantized bias-free projections."""
        return (self._segment_call is None and self.topk <= self.slots and _float_cpu(self.keys)
                and _float_cpu(self.values) and self.slot_source.is_cpu
                and _bias_free_quantized(self.query) and _bias_free_quantized(self.target))

    def _read_applies(self, e, state, pos0) -> bool:
        if e.dim() != 3 or e.shape[1] != 1 or torch.is_grad_enabled():
            return False
        if e.shape[0] >= quant_modules.DENSE_FROM_ROWS:
            return False
        if not self._read_fits():
            return False  # (the compiled segment takes the Python path)
        if not all(_float_cpu(t) for t in (e, state["delta"], state["surprise"], state["input_sum"])):
            return False
        if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
            return False
        return not any(m._forward_hooks or m._forward_pre_hooks for m in (self.query, self.target))


class FusedTokenLM(HierarchosLM):
    """A quantized HierarchosLM whose generated token, at the minimal depth (one manager cycle, no
    shadow pass, ACT), runs in two C++ calls: the memory's read with the encoder after it
    (`kernel.memory_read`), then the reasoner's round with the head after it (`RwkvStackStep.round`).
    The embedding rows, ROSA's hints and the DeepEmbed gates are looked up around them in numpy, the
    calls' fixed arguments come from a `_TokenProgram` kept between tokens. A token the two calls do not
    cover (a prompt, gradients, a hook, other depths) runs `forward` as written, module by
    module (the fused memory and round then still apply on their own). The class `attach_fused_steps`
    gives a model whose memory and reasoner take their fused calls."""

    _token_program: "_TokenProgram | None" = None

    def token_decoder(self, state, **caps) -> "TokenDecoder | None":
        """A `TokenDecoder` from `state` at reasoning caps `caps`, or None where its calls do not apply
        (or HIERARCHOS_TOKEN_DECODER=0): how `generate` decodes this model's tokens."""
        if os.environ.get(ENV_DECODER, "1") == "0":
            return None
        return TokenDecoder.open(self, state, **caps)

    def forward(self, tokens, state=None, *, rosa_hint_ids=None, last_logits_only=False, **caps):
        out = None
        if state is not None and tokens.dim() == 2 and tokens.shape[1] == 1 and not torch.is_grad_enabled():
            program = self._token_program
            if program is None or not program.holds(self):
                program = self._token_program = _TokenProgram.build(self)
            if program is not None:
                out = program.run(self, tokens, state, rosa_hint_ids, caps)
        if out is None:
            return super().forward(tokens, state, rosa_hint_ids=rosa_hint_ids, last_logits_only=last_logits_only,
                                   **caps)
        return out


def _stack_arrays(s: dict) -> tuple | None:
    """A stack state's (tm_shift, wkv, cm_shift) as numpy views, None where the step cannot read it."""
    if len(s) != 3:
        return None
    tm, wkv, cm = s.get("tm_shift"), s.get("wkv"), s.get("cm_shift")
    if tm is None or wkv is None or cm is None:
        return None
    if not (_float_cpu(tm) and _float_cpu(wkv) and _float_cpu(cm)) or tm.requires_grad or wkv.requires_grad \
            or cm.requires_grad:
        return None
    return tm.numpy(), wkv.numpy(), cm.numpy()


def _stack_tensors(a: tuple) -> dict:
    return {"tm_shift": torch.from_numpy(a[0]), "wkv": torch.from_numpy(a[1]), "cm_shift": torch.from_numpy(a[2])}


def _round_state(rs: dict, outputs: tuple, is_plan: bool, B: int, totals: dict) -> tuple:
    """(y (B, d) tensor, the new round state, the logits (B, V) or None) from `RwkvStackStep.round`'s
    outputs for round state rs, the totals added as `_round` adds them."""
    y, watch, commit, ponder_new, plan_prev, plan_last, expected, halting, logits = outputs
    new = dict(rs)
    new["watch"], new["commit"] = _stack_tensors(watch), _stack_tensors(commit)
    y = torch.from_numpy(y)
    if is_plan:  # as `_ponder` reports it; a pass not run keeps its state
        old = rs["ponder"]
        new["ponder"] = [s if a is None else _stack_tensors(a) for s, a in zip(old, ponder_new)] + \
            list(old[len(ponder_new):])
        new["plan_prev"], new["plan_last"] = torch.from_numpy(plan_prev), torch.from_numpy(plan_last)
        add_total(totals, "ponder", torch.tensor(expected, dtype=y.dtype), float(B))
        add_total(totals, "manager_steps", torch.tensor(halting, dtype=y.dtype), float(B))
    add_total(totals, "worker_steps", y.new_zeros(()), float(B))  # `_explore` with no shadow pass
    dtype = rs["last_out"].dtype
    new["last_out"] = y if y.dtype == dtype else y.to(dtype)
    return y, new, None if logits is None else torch.from_numpy(logits)


def _read_state(state: dict, surprise: np.ndarray, input_sum: np.ndarray) -> dict:
    """The memory's state after a read without a write, as `forward` leaves it: the same delta, momentum
    and write counts, the read's surprise and input sum."""
    return {"delta": state["delta"], "momentum": state["momentum"], "surprise": torch.from_numpy(surprise),
            "input_sum": torch.from_numpy(input_sum), "writes": state["writes"]}


def _row_reader(module: nn.Module):
    """(rows(ids) -> float32 (n, dim) numpy rows of an embedding module, the tensors whose storage it
    views) for a quantized or a float32 CPU nn.Embedding table; None for anything else."""
    if type(module) is QuantEmbedding:
        table = module.table
        return (lambda ids: kernel.dequantize_rows(table.data, table.qtype, table.cols, ids)), []
    if type(module) is nn.Embedding and module.max_norm is None and _float_cpu(module.weight):
        weight = module.weight.detach().numpy()
        return (lambda ids: weight[ids]), [module.weight]
    return None


def _owner_slot(owner, name: str):
    """The dict of `owner` (an nn.Module's parameters, buffers, submodules or attributes) holding `name`."""
    for d in (getattr(owner, "_parameters", None), getattr(owner, "_buffers", None),
              getattr(owner, "_modules", None), owner.__dict__):
        if d is not None and name in d:
            return d
    raise KeyError(name)


class _TokenProgram:
    """A FusedTokenLM's generated token as two C++ calls, with every argument that stays from token to
    token made once: the projections' specs, views of the norms, the memory's slots and the persistent
    tokens, the embedding tables' readers. Looking them up and checking them again for every token cost
    ~0.2 ms of a ~4 ms 125m token (BENCHMARKS.md, issue 17). The program holds while every module,
    parameter and quantized matrix it read is still the object it read, with the storage it viewed, and
    no hook watches a module (`holds`, a few microseconds); else the model builds another (or runs module
    by module). A parameter changed in place is seen (the program views it); `attach_fused_steps` drops it."""

    @classmethod
    def build(cls, model: "FusedTokenLM") -> "_TokenProgram | None":
        """The program of `model`'s token as it is now, or None when its modules cannot take the two calls."""
        reasoner, memory = model.reasoner, model.memory
        if type(reasoner) is not FusedShadowReasoner or type(memory) is not FusedMemory:
            return None
        manager, worker = reasoner.manager, reasoner.worker
        if not (isinstance(manager, FusedRWKVStack) and isinstance(worker, FusedRWKVStack)) \
                or manager._fused_plan is None or worker._fused_plan is None:
            return None
        projections = reasoner._round_projections()
        if projections is None or getattr(kernel, "memory_read", None) is None or not memory._read_fits():
            return None
        norm, persistent, halt = model.out_norm, model.persistent, projections[-1]
        if type(norm) is not nn.LayerNorm or not norm.elementwise_affine or norm.bias is None:
            return None
        floats = [norm.weight, norm.bias, persistent, halt.weight, halt.bias]
        if not all(_float_cpu(t) for t in floats):
            return None
        specs = [_linear_spec(model.encoder), _linear_spec(model.lm_head), *projections[:-1]]
        if specs[0] is None or specs[1] is None:
            return None
        tables = {"embed": model.embed, "rosa": model.rosa_embed}
        for name, stack in (("manager", manager), ("worker", worker)):
            if stack.deepembed is not None:
                if type(stack.deepembed).gates is not DeepEmbedTables.gates:
                    return None
                for i, table in enumerate(stack.deepembed):
                    tables[f"{name}.{i}"] = table
        readers, viewed = {}, list(floats) + [memory.keys, memory.values, memory.slot_source]
        for name, table in tables.items():
            if table is None:
                readers[name] = None
                continue
            reader = _row_reader(table)
            if reader is None:
                return None
            readers[name], more = reader
            viewed += more
        return cls(model, specs, readers, viewed)

    def __init__(self, model, specs, readers, viewed):
        reasoner, memory = model.reasoner, model.memory
        self.cfg, self.reasoner = model.cfg, reasoner
        self.manager, self.worker = reasoner.manager, reasoner.worker
        self.memory = memory
        encoder, lm_head, h_in, h_ctx, l_in, l_out = specs
        norm, halt = model.out_norm, reasoner.h_halt_proj
        self.encoder = encoder
        self.head = (norm.weight.detach().numpy(), norm.bias.detach().numpy(), float(norm.eps), lm_head)
        self.round_specs = (h_in, None, halt.weight.detach().reshape(-1).numpy())
        self.halt_bias = halt.bias.detach().numpy()
        self.round_linears = (h_ctx, l_in, l_out)
        self.persistent = model.persistent.detach().numpy()
        self.memory_args = memory._read_args()
        self.embed, self.rosa = readers["embed"], readers["rosa"]
        self.gate_readers = {}
        for stack_name, stack in (("manager", self.manager), ("worker", self.worker)):
            if stack.deepembed is not None:
                per = [readers[f"{stack_name}.{i}"] for i in range(len(stack.deepembed))]
                self.gate_readers[stack_name] = (per, len(stack.blocks))
        # the objects read above, each where it must still be found: (dict, key, object)
        idents = []
        for owner, names in ((model, ("reasoner", "memory", "encoder", "lm_head", "out_norm", "persistent", "embed",
                                      "rosa_embed")),
                             (reasoner, ("manager", "worker", "h_input_proj", "h_to_context", "l_input_proj",
                                         "l_to_out", "h_halt_proj", "halting_record")),
                             (memory, ("query", "target", "keys", "values", "slot_source", "topk", "_segment_call")),
                             (norm, ("weight", "bias", "eps")), (halt, ("weight", "bias")),
                             (self.manager, ("_fused_plan", "deepembed")), (self.worker, ("_fused_plan", "deepembed"))):
            for name in names:
                d = _owner_slot(owner, name)
                idents.append((d, name, d[name]))
        for linear in (model.encoder, model.lm_head, reasoner.h_input_proj, reasoner.h_to_context,
                       reasoner.l_input_proj, reasoner.l_to_out, memory.query, memory.target):
            for name in ("weight_q", "bias", "group", "vk_weight"):
                d = _owner_slot(linear, name)
                idents.append((d, name, d[name]))
            idents.append((linear.weight_q.__dict__, "data", linear.weight_q.data))
        for stack in (self.manager, self.worker):
            if stack.deepembed is not None:
                idents += [(stack.deepembed._modules, k, m) for k, m in stack.deepembed._modules.items()]
        for table in [model.embed, model.rosa_embed] + [t for s in (self.manager, self.worker)
                                                        for t in (s.deepembed or [])]:
            if table is not None and hasattr(table, "table"):
                idents.append((table.__dict__, "table", table.table))
                idents.append((table.table.__dict__, "data", table.table.data))
        self.idents = idents
        self.types = [(m, type(m)) for m in (model, reasoner, memory, self.manager, self.worker)]
        self.viewed = [(t, t.data_ptr()) for t in viewed]
        # (the model's own hooks run around `forward` itself; the stacks' plans check their own modules too)
        self.hook_dicts = [d for m in model.modules() if m is not model for d in (m._forward_hooks,
                                                                                  m._forward_pre_hooks)]

    def __deepcopy__(self, memo):  # its views would not alias the copy's parameters: the copy builds its own
        return None

    def __reduce__(self):  # pickled models come back without a program (built again on their first token)
        return (_no_plan, ())

    def holds(self, model) -> bool:
        """Whether the model is still what the program was built from (see the class doc)."""
        if model.reasoner is not self.reasoner:
            return False
        for m, cls in self.types:
            if type(m) is not cls:
                return False
        for d, key, obj in self.idents:
            if d.get(key, d) is not obj:
                return False
        for t, ptr in self.viewed:
            if t.data_ptr() != ptr:
                return False
        return True

    def depth(self, caps: dict) -> tuple | None:
        """(pondering passes, halting threshold) at the reasoning caps `caps` where the two calls take this
        model's tokens (one manager cycle, no shadow pass, no hook anywhere, no autocast), else None: what
        does not change from token to token."""
        if len(caps) and set(caps) - {"h_cycles", "max_h_steps", "max_l_steps", "h_halt_thresh"}:
            return None
        n_cycles, n_ponder, n_explore, thresh = self.reasoner.depth(**caps)
        if n_cycles != 1 or n_explore != 0:
            return None
        if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks or any(self.hook_dicts):
            return None
        if torch.is_autocast_enabled("cpu"):
            return None
        return n_ponder, float(thresh)

    def takes(self, pos0: int, B: int, n_ponder: int) -> bool:
        """Whether the two calls take a token at position `pos0` of `B` rows (a plan point needs a
        pondering pass)."""
        if B >= quant_modules.DENSE_FROM_ROWS:
            return False
        return n_ponder >= 1 or not self.is_plan(pos0)

    def closes(self, pos0: int) -> bool:
        """Whether the token at `pos0` closes the memory's chunk (after the calls, `FusedMemory.close_chunk`)."""
        return (pos0 % self.memory.chunk) + 1 == self.memory.chunk

    def is_plan(self, pos0: int) -> bool:
        s = self.cfg.h_stride
        return (s - 1 - pos0) % s == 0

    def calls(self, ids: np.ndarray, pos0: int, is_plan: bool, rosa, hint_ids, thresh: float, arrays: "_TokenArrays"):
        """The token's two calls on `ids` (B,) at `pos0` (a plan point or not) from the state's arrays: (the
        round's outputs, the memory's new surprise and input sum, the ROSA automata)."""
        B = ids.shape[0]
        e = self.embed(ids)
        if self.rosa is not None:  # (ROSA's automata are extended only now that the calls are taken)
            if hint_ids is None:
                hints, rosa = rosa_hint_array(ids.reshape(B, 1), rosa, self.cfg.rosa_window, self.cfg.rosa_none_id)
            else:
                hints = hint_ids.detach().to("cpu", torch.int64).numpy()
            e = e + self.rosa(hints.reshape(B))
        gates = {}
        for name, (per, n_blocks) in self.gate_readers.items():
            rows = [read(ids) for read in per]
            gates[name] = rows * n_blocks if len(rows) == 1 else rows
        a = arrays
        read, new_surprise, new_input_sum, u = kernel.memory_read(
            e, *self.memory_args, a.delta, a.surprise, a.input_sum, self.encoder, self.persistent)
        h_in, fb, halt_w = self.round_specs
        s = self.cfg.h_stride
        outputs = self.worker._fused_plan.step.round(
            self.manager._fused_plan.step, u.reshape(B, -1), None, a.watch, a.commit, a.ponder if is_plan else [],
            a.plan_prev, a.plan_last, one_token_alpha(pos0, s), is_plan, thresh, h_in, fb, halt_w,
            float(self.halt_bias[0]), *self.round_linears, gates.get("manager"), gates.get("worker"), self.head)
        return outputs, new_surprise, new_input_sum, rosa

    def run(self, model, tokens, state, hint_ids, caps):
        """The token's ModelOutput through the two calls, or None (nothing changed) where they do not apply."""
        depth = self.depth(caps)
        if depth is None or tokens.dtype is not torch.int64 or not tokens.is_cpu:
            return None
        n_ponder, thresh = depth
        B, pos0 = tokens.shape[0], state.pos
        if not self.takes(pos0, B, n_ponder):
            return None
        is_plan = self.is_plan(pos0)
        arrays = _TokenArrays.read(state, n_ponder if is_plan else 0)
        if arrays is None:
            return None
        outputs, new_surprise, new_input_sum, rosa = self.calls(tokens.numpy().reshape(B), pos0, is_plan, state.rosa,
                                                                hint_ids, thresh, arrays)
        rs = state.rounds[0]
        totals: dict = {}
        _, first, logits = _round_state(rs, outputs, is_plan, B, totals)
        rounds = [first] + [dict(r) for r in state.rounds[1:]]  # (a capped cycle count leaves the others)
        memory = _read_state(state.memory, new_surprise, new_input_sum)
        if self.closes(pos0):
            memory = self.memory.close_chunk(memory)
        new_state = HierarchosState(pos=pos0 + 1, memory=memory, rounds=rounds, rosa=rosa)
        return ModelOutput(logits=logits.view(B, 1, -1), state=new_state, totals=totals)


class _TokenArrays:
    """What the two calls read of a state, as the arrays they take: the first round's watch and commit
    stacks, its pondering stacks (those a plan point reads), its plans, the memory's delta and open-chunk
    accumulators."""

    __slots__ = ("watch", "commit", "ponder", "plan_prev", "plan_last", "delta", "surprise", "input_sum")

    @classmethod
    def read(cls, state: HierarchosState, n_ponder: int) -> "_TokenArrays | None":
        """The arrays of `state` (its first `n_ponder` pondering stacks), None where the calls cannot read it."""
        mem = state.memory
        delta, surprise, input_sum = mem["delta"], mem["surprise"], mem["input_sum"]
        if not (_float_cpu(delta) and _float_cpu(surprise) and _float_cpu(input_sum)):
            return None
        rs = state.rounds[0]
        watch, commit = _stack_arrays(rs["watch"]), _stack_arrays(rs["commit"])
        ponder = [_stack_arrays(p) for p in rs["ponder"][:n_ponder]]
        if watch is None or commit is None or any(p is None for p in ponder):
            return None
        plan_prev, plan_last = rs["plan_prev"], rs["plan_last"]
        if not (_float_cpu(plan_prev) and _float_cpu(plan_last)) or plan_prev.requires_grad or plan_last.requires_grad:
            return None
        a = cls()
        a.watch, a.commit, a.ponder = watch, commit, ponder
        a.plan_prev, a.plan_last = plan_prev.numpy(), plan_last.numpy()
        a.delta, a.surprise, a.input_sum = delta.numpy(), surprise.numpy(), input_sum.numpy()
        return a


class DecodedToken:
    """One token of a `TokenDecoder`: its logits (V,) (a tensor on the round call's array), its aux totals
    (name -> (sum, count), Python numbers) and, when asked, the state after it (`state`, made then from
    the arrays the token left, which no later token changes; ROSA's automata are shared and extended in
    place, as `step`'s states share them)."""

    __slots__ = ("logits", "totals", "_decoder", "_held")

    def __init__(self, logits, totals, decoder, held):
        self.logits, self.totals, self._decoder, self._held = logits, totals, decoder, held

    @property
    def state(self) -> HierarchosState:
        return self._decoder._state_of(self._held)


class TokenDecoder:
    """A batch-1 generation loop's tokens through a FusedTokenLM's two calls, the state kept between
    tokens as the arrays the calls return. `model.step` builds a HierarchosState of tensors and dicts for
    every token and checks the model and the state again: with its wrappers, the Python around a 125m Q4_0
    token's calls was 0.6-0.85 ms of ~3.5-4, run on caches the weights had just flushed; through a decoder
    0.3-0.45 (BENCHMARKS.md, "The state kept as the calls' arrays between tokens"). The model, its hooks and
    the caps are checked when the decoder opens (`TokenDecoder.open`; the model must not change while it is
    in use), a token costs the lookups and the two calls, and the state is made only when asked (`state()`,
    or a token's `DecodedToken.state`). A token that closes the memory's chunk writes it after the calls
    (`FusedMemory.close_chunk`). `generate` decodes through one wherever it opens
    (tests/test_quant_fused_step.py holds its tokens, logits, totals and states equal to `step`'s)."""

    def __init__(self, program, state, n_ponder, thresh):
        self.program, self.n_ponder, self.thresh = program, n_ponder, thresh
        arrays = _TokenArrays.read(state, n_ponder)
        if arrays is None:
            raise _Unreadable
        rs = state.rounds[0]
        self.pos, self.arrays, self.rosa, self.last_out = state.pos, arrays, state.rosa, rs["last_out"]
        self.memory, self.round, self.rest = state.memory, rs, state.rounds[1:]
        self.ponder_rest = list(rs["ponder"][n_ponder:])

    @classmethod
    def open(cls, model, state: HierarchosState, **caps) -> "TokenDecoder | None":
        """A decoder from `state` (batch 1, float32 CPU arrays) for `model` at reasoning caps `caps`, or
        None where its two calls do not apply (then decode with `model.step`)."""
        if type(model) is not FusedTokenLM or torch.is_grad_enabled() or state is None:
            return None
        program = model._token_program
        if program is None or not program.holds(model):
            program = model._token_program = _TokenProgram.build(model)
        if program is None or nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks \
                or model._forward_hooks or model._forward_pre_hooks:
            return None
        depth = program.depth(caps)
        if depth is None or depth[0] < 1 or state.memory["delta"].shape[0] != 1:
            return None  # (every plan point needs a pondering pass for the round call to take it)
        try:
            return cls(program, state, *depth)
        except _Unreadable:
            return None

    def step(self, token: int) -> DecodedToken:
        """Consume `token`: its logits and totals (and the state after it, when asked)."""
        pos0, program = self.pos, self.program
        ids = np.array([token], dtype=np.int64)
        a = self.arrays
        is_plan = program.is_plan(pos0)
        outputs, surprise, input_sum, self.rosa = program.calls(ids, pos0, is_plan, self.rosa, None, self.thresh, a)
        y, watch, commit, ponder_new, plan_prev, plan_last, expected, halting, logits = outputs
        n = _TokenArrays()
        n.watch, n.commit, n.delta, n.surprise, n.input_sum = watch, commit, a.delta, surprise, input_sum
        if is_plan:  # (as `_round_state` reports it; a pass not run keeps its state)
            n.ponder = [s if p is None else p for s, p in zip(a.ponder, ponder_new)] + list(a.ponder[len(ponder_new):])
            n.plan_prev, n.plan_last = plan_prev, plan_last
            f32 = np.float32
            totals = {"ponder": (float(f32(expected)), 1.0), "manager_steps": (float(f32(halting)), 1.0),
                      "worker_steps": (0.0, 1.0)}
        else:
            n.ponder, n.plan_prev, n.plan_last = a.ponder, a.plan_prev, a.plan_last
            totals = {"worker_steps": (0.0, 1.0)}
        if program.closes(pos0):  # the chunk's write (a few whole-table torch ops, once a chunk)
            memory = program.memory.close_chunk(_read_state(self.memory, surprise, input_sum))
            self.memory = memory
            n.delta, n.surprise, n.input_sum = (memory["delta"].numpy(), memory["surprise"].numpy(),
                                                memory["input_sum"].numpy())
        self.arrays, self.last_out, self.pos = n, y, pos0 + 1
        return DecodedToken(torch.from_numpy(logits[0]), totals, self, self._held())

    def _held(self) -> tuple:
        return self.pos, self.arrays, self.last_out, self.memory, self.round, self.rest, self.ponder_rest, self.rosa

    def state(self) -> HierarchosState:
        """The state after the last token, as `model.step` would have returned it."""
        return self._state_of(self._held())

    def _state_of(self, held: tuple) -> HierarchosState:
        pos, a, last_out, memory, rs, rest, ponder_rest, rosa = held
        new = dict(rs)
        new["watch"], new["commit"] = _stack_tensors(a.watch), _stack_tensors(a.commit)
        new["ponder"] = [_stack_tensors(p) for p in a.ponder] + ponder_rest
        new["plan_prev"], new["plan_last"] = torch.from_numpy(a.plan_prev), torch.from_numpy(a.plan_last)
        if isinstance(last_out, np.ndarray):
            dtype = rs["last_out"].dtype
            last_out = torch.from_numpy(last_out)
            last_out = last_out if last_out.dtype == dtype else last_out.to(dtype)
        new["last_out"] = last_out
        return HierarchosState(pos=pos, memory=_read_state(memory, a.surprise, a.input_sum),
                               rounds=[new] + [dict(r) for r in rest], rosa=rosa)


class _Unreadable(Exception):
    """A state the decoder's calls cannot read."""


def why_not_fused(model: nn.Module) -> dict[str, str | None]:
    """Each RWKV stack of `model` by name -> why it cannot take the fused step (None: it can)."""
    if not available():
        return {name: "the C++ kernel is not built" for name, m in model.named_modules() if isinstance(m, RWKVStack)}
    return {name: _why_not(m) for name, m in model.named_modules() if isinstance(m, RWKVStack)}


def _linear_spec(linear: nn.Module) -> tuple | None:
    """(data, qtype, cols, bias) of a QuantLinear the shadow call can run as QuantLinear.forward does;
    None when it cannot (not quantized, in a projection group, on Vulkan, or watched by a hook)."""
    if type(linear) is not QuantLinear or linear.group is not None or linear.vk_weight is not None:
        return None
    if linear._forward_hooks or linear._forward_pre_hooks:
        return None
    bias = linear.bias
    if bias is not None and (bias.dtype != torch.float32 or bias.device.type != "cpu"):
        return None
    w = linear.weight_q
    return (w.data, w.qtype, linear.in_features, None if bias is None else bias.detach().numpy())


class FusedShadowReasoner(HierarchicalReasoner):
    """A reasoner whose worker's shadow passes at T = 1 run in one C++ call, and at the minimal depth
    its whole round (see the module doc); the class `attach_fused_steps` gives a reasoner whose worker
    stack is fused."""

    def _round(self, u, tokens, rs, feedback, pos0, n_ponder, n_explore, thresh, totals, q_halt=None,
               row_pos=None, plan_rows=True):
        fused = None
        if row_pos is None and q_halt is None and n_explore == 0 and not torch.is_grad_enabled():
            fused = self._round_call(u, rs, feedback, pos0, n_ponder)
        if fused is None:
            return super()._round(u, tokens, rs, feedback, pos0, n_ponder, n_explore, thresh, totals, q_halt=q_halt,
                                  row_pos=row_pos, plan_rows=plan_rows)
        y, new, _ = self._fused_round(u, tokens, rs, feedback, n_ponder, thresh, totals, *fused)
        return y, new

    def _fused_round(self, u, tokens, rs, feedback, n_ponder, thresh, totals, specs, is_plan, alpha, head=None):
        """`_round` in one C++ call (`_round_call` said it applies): (y, the new round state, the logits
        (B, V) of `head`'s (norm weight, norm bias, eps, linear spec) or None without one)."""
        B, d = u.shape[0], u.shape[2]
        arrays = lambda s: (s["tm_shift"].numpy(), s["wkv"].numpy(), s["cm_shift"].numpy())  # noqa: E731
        ponder = rs["ponder"][:n_ponder] if is_plan else []
        outputs = self.worker._fused_plan.step.round(
            self.manager._fused_plan.step, u.reshape(B, d).numpy(),
            None if feedback is None else feedback.reshape(B, d).numpy(), arrays(rs["watch"]),
            arrays(rs["commit"]), [arrays(s) for s in ponder], rs["plan_prev"].numpy(), rs["plan_last"].numpy(),
            alpha, is_plan, float(thresh), *specs, self.manager._fused_plan.gates(self.manager, tokens),
            self.worker._fused_plan.gates(self.worker, tokens), head)
        y, new, logits = _round_state(rs, outputs, is_plan, B, totals)
        return y.view(B, 1, d), new, logits

    def _round_call(self, u, rs, feedback, pos0, n_ponder):
        """(the projections' specs, whether pos0 is a plan point, the plans' LERP weight) when this round
        can run in one C++ call (`_round` at T = 1 as `_plan_one` takes it, ACT, no shadow pass, both
        stacks fused, every projection quantized as `_linear_spec` takes it), else None."""
        cfg, manager, worker = self.cfg, self.manager, self.worker
        projections = self._round_projections()
        if projections is None or not self._plan_one_applies(u) or u.shape[0] >= quant_modules.DENSE_FROM_ROWS:
            return None
        s = cfg.h_stride
        is_plan = (s - 1 - pos0) % s == 0
        states = [rs["watch"]] + (list(rs["ponder"][:n_ponder]) if is_plan else [])
        if is_plan and n_ponder < 1:
            return None
        if not all(set(st) == {"tm_shift", "wkv", "cm_shift"} and manager._fused_applies(u, st, None) for st in states):
            return None
        if not worker._fused_applies(u, rs["commit"], None) or set(rs["commit"]) != {"tm_shift", "wkv", "cm_shift"}:
            return None
        plans = (rs["plan_prev"], rs["plan_last"]) + (() if feedback is None else (feedback,))
        if any(t.dtype != torch.float32 or t.device.type != "cpu" or t.requires_grad for t in plans):
            return None
        fb = _linear_spec(self.l_feedback_proj) if feedback is not None else None
        if feedback is not None and fb is None:
            return None
        h_in, h_ctx, l_in, l_out, halt = projections
        specs = (h_in, fb, halt.weight.detach().reshape(-1).numpy(), float(halt.bias.detach()[0]), h_ctx, l_in, l_out)
        return specs, is_plan, one_token_alpha(pos0, s)

    def _round_projections(self) -> tuple | None:
        """(the specs of h_input_proj, h_to_context, l_input_proj, l_to_out, and the halting head) when the
        reasoner itself can take the one-call round, whatever the token (the C++ round built, ACT with no
        record, the manager fused, a float32 CPU halting Linear with bias and no hook, every projection
        quantized as `_linear_spec` takes it), else None."""
        if not hasattr(kernel.RwkvStackStep, "round") or self.halting_record is not None or self.cfg.halting != "act":
            return None
        if not isinstance(self.manager, FusedRWKVStack):
            return None
        halt = self.h_halt_proj
        if (type(halt) is not nn.Linear or halt.bias is None or halt._forward_hooks or halt._forward_pre_hooks
                or halt.weight.dtype != torch.float32 or halt.weight.device.type != "cpu"):
            return None
        linears = [_linear_spec(m) for m in (self.h_input_proj, self.h_to_context, self.l_input_proj, self.l_to_out)]
        return None if any(spec is None for spec in linears) else (*linears, halt)

    def _explore(self, u, context, tokens, states, n_explore, grad_on, sync_free, totals):
        # no shadow pass (the minimal depth): nothing for the C++ loop to do, and the Python one only
        # returns a zero drift
        fused = None if sync_free or grad_on or n_explore == 0 else self._shadow_call(u, context, states)
        if fused is None:
            return super()._explore(u, context, tokens, states, n_explore, grad_on, sync_free, totals)
        B, T, d = u.shape
        plan, lin_in, lin_drift = fused
        drift, new_states, rows_run, commitment = plan.step.shadow(
            u.reshape(B, d).numpy(), context.reshape(B, d).numpy(),
            [(s["tm_shift"].numpy(), s["wkv"].numpy(), s["cm_shift"].numpy()) for s in states[:n_explore]],
            lin_in, lin_drift, float(self.cfg.l_conv_atol), float(self.cfg.commitment_threshold),
            plan.gates(self.worker, tokens))
        explore = list(states)
        for p, new in enumerate(new_states):
            if new is not None:  # (a skipped pass keeps its state)
                explore[p] = {"tm_shift": torch.from_numpy(new[0]), "wkv": torch.from_numpy(new[1]),
                              "cm_shift": torch.from_numpy(new[2])}
        if n_explore:
            add_total(totals, "commitment", torch.tensor(commitment, dtype=u.dtype), n_explore * B * T)
        add_total(totals, "worker_steps", torch.tensor(float(rows_run), dtype=u.dtype), float(B * T))
        return torch.from_numpy(drift).view(B, T, d), explore

    def _shadow_call(self, u, context, states):
        """(plan, lin_in, lin_drift) when the shadow loop can run fused here, else None."""
        worker = self.worker
        # the worker's own rule for its fused step (a plan, u one float32 CPU token per row without a
        # graph, float32 CPU states, no autocast, no hooks), for u and every shadow state
        if not worker._fused_applies(u, {}, None) or u.shape[0] >= quant_modules.DENSE_FROM_ROWS:
            return None
        if context.dtype != torch.float32 or context.device.type != "cpu" or context.requires_grad:
            return None
        if any(set(s) != {"tm_shift", "wkv", "cm_shift"} or not worker._fused_applies(u, s, None) for s in states):
            return None
        lin_in, lin_drift = _linear_spec(self.l_input_proj), _linear_spec(self.l_drift_proj)
        if lin_in is None or lin_drift is None:
            return None
        return worker._fused_plan, lin_in, lin_drift
