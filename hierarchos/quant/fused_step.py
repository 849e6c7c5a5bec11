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
(`_round_call` says when). And a quantized memory's read of a token that closes no chunk (no write) is
one call, `kernel.memory_read` (`FusedMemory`, kernels/memory_step.cpp). Where both apply, a generated
token is those two calls (`FusedTokenLM`, the model's class): the memory's goes on to the encoder, the
round's to the output norm and the head. At 125m Q4_0 the three took ~25-35% off a ~4.5 ms token
(BENCHMARKS.md, "The round, the memory's read, the encoder and the head in C++").

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
from ..model.rosa import rosa_hints
from ..model.rwkv import RWKVStack, TimeMix
from ..model.state import HierarchosState
from . import kernel
from .gguf_io import QuantTensor

ENV_SWITCH = "HIERARCHOS_FUSED_STEP"
ENV_LOWRANK = "HIERARCHOS_FUSED_LOWRANK"
LOWRANK_FORMATS = ("fp16", "fp32")
# the low-rank matrices of a block as RwkvStackStep names them
LOWRANK_NAMES = ("mix_down", "mix_up", "decay_down", "decay_up", "iclr_down", "iclr_up", "gate_down", "gate_up",
                 "vr_down", "vr_up")
FP16_MAX = 65504.0


def available() -> bool:
    """Whether the fused step can run at all (the C++ kernel built with RwkvStackStep)."""
    return getattr(kernel, "RwkvStackStep", None) is not None


def _quant_model():
    """hierarchos.quant.model, which imports this module (to attach the fused step to every quantized
    model it builds): imported on first use, then kept (an import statement per token cost ~2 us each)."""
    global _QUANT_MODEL
    if _QUANT_MODEL is None:
        from . import model

        _QUANT_MODEL = model
    return _QUANT_MODEL


_QUANT_MODEL = None


def _no_plan() -> None:
    return None


def _array(t: torch.Tensor) -> np.ndarray:
    # a view of the parameter's storage when it is contiguous float32 (checked by _layer_spec)
    return t.detach().contiguous().numpy()


def _quant(m) -> tuple:
    return (m.weight_q.data, m.weight_q.qtype, m.in_features)


def _bias_free_quantized(m) -> bool:
    """A quant.model.QuantLinear without bias, on the CPU (told by its blocks: that module imports
    this one, to attach the fused step to every quantized model it builds)."""
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
    """A long-term memory whose one-token read (a token that closes no chunk: no write) runs in one C++
    call, `kernel.memory_read` (kernels/memory_step.cpp); the class `attach_fused_steps` gives a
    memory whose query and target projections are quantized. Everything else runs `forward` as written."""

    def forward(self, e: torch.Tensor, state: dict, pos0: int):
        if not self._read_applies(e, state, pos0):
            return super().forward(e, state, pos0)
        read, new_state, _ = self._read_call(e, state)
        return read, new_state

    def _read_call(self, e, state, encoder=None, persistent=None):
        """The read in one call (`_read_applies` said it applies): (reads (B, 1, Dv), the new state, and with
        `encoder` (its spec) and `persistent` the encoder's gelu output u (B, 1, d), else None)."""
        B, D = e.shape[0], e.shape[2]
        read, surprise, input_sum, u = kernel.memory_read(
            e.reshape(B, D).numpy(), _quant(self.query), _quant(self.target), self.keys.detach().numpy(),
            self.slot_source.numpy(), self.topk, self.values.detach().numpy(), state["delta"].numpy(),
            state["surprise"].numpy(), state["input_sum"].numpy(), encoder, persistent)
        # as `forward` leaves a state no write touched: the same delta, momentum and write counts
        new_state = {"delta": state["delta"], "momentum": state["momentum"], "surprise": torch.from_numpy(surprise),
                     "input_sum": torch.from_numpy(input_sum), "writes": state["writes"]}
        return (torch.from_numpy(read).view(B, 1, self.val_dim), new_state,
                None if u is None else torch.from_numpy(u).view(B, 1, -1))

    def _read_applies(self, e, state, pos0) -> bool:
        if e.dim() != 3 or e.shape[1] != 1 or torch.is_grad_enabled():
            return False
        if e.shape[0] >= _quant_model().DENSE_FROM_ROWS:
            return False
        if (pos0 % self.chunk) + 1 == self.chunk or self._segment_call is not None or self.topk > self.slots:
            return False  # this token's write (or the compiled segment) takes the Python path
        tensors = [e, self.keys, self.values, state["delta"], state["surprise"], state["input_sum"]]
        if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
            return False
        if self.slot_source.device.type != "cpu":
            return False
        if not (_bias_free_quantized(self.query) and _bias_free_quantized(self.target)):
            return False
        if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
            return False
        return not any(m._forward_hooks or m._forward_pre_hooks for m in (self.query, self.target))


class FusedTokenLM(HierarchosLM):
    """A quantized HierarchosLM whose generated token, at the minimal depth (one manager cycle, no
    shadow pass, ACT), runs in two C++ calls: the memory's read with the encoder after it
    (`kernel.memory_read`), then the reasoner's round with the head after it (`RwkvStackStep.round`).
    The embedding and ROSA's hints stay in Python. A token the two calls do not cover (a prompt, a
    chunk's write, gradients, a hook, other depths) runs `forward` as written, module by module (the
    fused memory and round then still apply on their own). The class `attach_fused_steps` gives a model
    whose memory and reasoner take their fused calls."""

    def forward(self, tokens, state=None, *, rosa_hint_ids=None, last_logits_only=False, **caps):
        plan = None
        if state is not None and tokens.dim() == 2 and tokens.shape[1] == 1 and not torch.is_grad_enabled():
            e = self.embed(tokens)  # (no side effect: ROSA's automata are extended only once the call is taken)
            plan = self._token_plan(e, state, caps)
        if plan is None:
            return super().forward(tokens, state, rosa_hint_ids=rosa_hint_ids, last_logits_only=last_logits_only,
                                   **caps)
        encoder, head, n_ponder, thresh, round_specs = plan
        B = e.shape[0]
        rosa = state.rosa
        if self.rosa_embed is not None:
            if rosa_hint_ids is None:
                rosa_hint_ids, rosa = rosa_hints(tokens, rosa, self.cfg.rosa_window, self.cfg.rosa_none_id)
            e = e + self.rosa_embed(rosa_hint_ids)
        _, memory_state, u = self.memory._read_call(e, state.memory, encoder, self.persistent.detach().numpy())
        totals: dict = {}
        _, first, logits = self.reasoner._fused_round(u, tokens, state.rounds[0], None, n_ponder, thresh, totals,
                                                      *round_specs, head=head)
        rounds = [first] + [dict(r) for r in state.rounds[1:]]  # (a capped cycle count leaves the others)
        new_state = HierarchosState(pos=state.pos + 1, memory=memory_state, rounds=rounds, rosa=rosa)
        return ModelOutput(logits=logits.view(B, 1, -1), state=new_state, totals=totals)

    def _token_plan(self, e, state, caps):
        """(encoder spec, head spec, pondering passes, halting threshold, the round's specs) when this
        token can take the two calls, else None."""
        reasoner = self.reasoner
        if set(caps) - {"h_cycles", "max_h_steps", "max_l_steps", "h_halt_thresh"}:
            return None
        n_cycles, n_ponder, n_explore, thresh = reasoner.depth(**caps)
        if n_cycles != 1 or n_explore != 0 or not isinstance(reasoner, FusedShadowReasoner):
            return None
        if not isinstance(self.memory, FusedMemory) or not self.memory._read_applies(e, state.memory, state.pos):
            return None
        encoder, head_linear = _linear_spec(self.encoder), _linear_spec(self.lm_head)
        norm, persistent = self.out_norm, self.persistent
        if encoder is None or head_linear is None or type(norm) is not nn.LayerNorm or not norm.elementwise_affine:
            return None
        if norm._forward_hooks or norm._forward_pre_hooks or norm.bias is None:
            return None
        if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in (norm.weight, norm.bias, persistent)):
            return None
        if any(m._forward_hooks or m._forward_pre_hooks for m in (self.memory, reasoner)):
            return None  # (the two calls stand in for these modules' own calls)
        round_specs = reasoner._round_call(e, state.rounds[0], None, state.pos, n_ponder)
        if round_specs is None:
            return None
        head = (norm.weight.detach().numpy(), norm.bias.detach().numpy(), float(norm.eps), head_linear)
        return encoder, head, n_ponder, thresh, round_specs


def why_not_fused(model: nn.Module) -> dict[str, str | None]:
    """Each RWKV stack of `model` by name -> why it cannot take the fused step (None: it can)."""
    if not available():
        return {name: "the C++ kernel is not built" for name, m in model.named_modules() if isinstance(m, RWKVStack)}
    return {name: _why_not(m) for name, m in model.named_modules() if isinstance(m, RWKVStack)}


def _linear_spec(linear: nn.Module) -> tuple | None:
    """(data, qtype, cols, bias) of a QuantLinear the shadow call can run as QuantLinear.forward does;
    None when it cannot (not quantized, in a projection group, on Vulkan, or watched by a hook)."""
    if type(linear) is not _quant_model().QuantLinear or linear.group is not None or linear.vk_weight is not None:
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
        tensors = lambda a: {"tm_shift": torch.from_numpy(a[0]), "wkv": torch.from_numpy(a[1]),  # noqa: E731
                             "cm_shift": torch.from_numpy(a[2])}
        ponder = rs["ponder"][:n_ponder] if is_plan else []
        y, watch, commit, ponder_new, plan_prev, plan_last, expected, halting, logits = \
            self.worker._fused_plan.step.round(
                self.manager._fused_plan.step, u.reshape(B, d).numpy(),
                None if feedback is None else feedback.reshape(B, d).numpy(), arrays(rs["watch"]),
                arrays(rs["commit"]), [arrays(s) for s in ponder], rs["plan_prev"].numpy(), rs["plan_last"].numpy(),
                alpha, is_plan, float(thresh), *specs, self.manager._fused_plan.gates(self.manager, tokens),
                self.worker._fused_plan.gates(self.worker, tokens), head)
        new = dict(rs)
        new["watch"], new["commit"] = tensors(watch), tensors(commit)
        if is_plan:  # as `_ponder` reports it; a pass not run keeps its state
            new["ponder"] = [s if a is None else tensors(a) for s, a in zip(rs["ponder"], ponder_new)] + \
                list(rs["ponder"][len(ponder_new):])
            new["plan_prev"], new["plan_last"] = torch.from_numpy(plan_prev), torch.from_numpy(plan_last)
            add_total(totals, "ponder", torch.tensor(expected, dtype=u.dtype), float(B))
            add_total(totals, "manager_steps", torch.tensor(halting, dtype=u.dtype), float(B))
        add_total(totals, "worker_steps", u.new_zeros(()), float(B))  # `_explore` with no shadow pass
        y = torch.from_numpy(y).view(B, 1, d)
        new["last_out"] = y[:, -1].to(rs["last_out"].dtype)
        return y, new, None if logits is None else torch.from_numpy(logits)

    def _round_call(self, u, rs, feedback, pos0, n_ponder):
        """(the projections' specs, whether pos0 is a plan point, the plans' LERP weight) when this round
        can run in one C++ call (`_round` at T = 1 as `_plan_one` takes it, ACT, no shadow pass, both
        stacks fused, every projection quantized as `_linear_spec` takes it), else None."""
        cfg, manager, worker = self.cfg, self.manager, self.worker
        if not hasattr(kernel.RwkvStackStep, "round") or self.halting_record is not None or cfg.halting != "act":
            return None
        if not self._plan_one_applies(u):
            return None
        if not isinstance(manager, FusedRWKVStack) or u.shape[0] >= _quant_model().DENSE_FROM_ROWS:
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
        halt = self.h_halt_proj
        if (type(halt) is not nn.Linear or halt.bias is None or halt._forward_hooks or halt._forward_pre_hooks
                or halt.weight.dtype != torch.float32 or halt.weight.device.type != "cpu"):
            return None
        linears = [_linear_spec(m) for m in (self.h_input_proj, self.h_to_context, self.l_input_proj, self.l_to_out)]
        fb = _linear_spec(self.l_feedback_proj) if feedback is not None else None
        if any(spec is None for spec in linears) or (feedback is not None and fb is None):
            return None
        h_in, h_ctx, l_in, l_out = linears
        specs = (h_in, fb, halt.weight.detach().reshape(-1).numpy(), float(halt.bias.detach()[0]), h_ctx, l_in, l_out)
        return specs, is_plan, one_token_alpha(pos0, s)

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
        if not worker._fused_applies(u, {}, None) or u.shape[0] >= _quant_model().DENSE_FROM_ROWS:
            return None
        if context.dtype != torch.float32 or context.device.type != "cpu" or context.requires_grad:
            return None
        if any(set(s) != {"tm_shift", "wkv", "cm_shift"} or not worker._fused_applies(u, s, None) for s in states):
            return None
        lin_in, lin_drift = _linear_spec(self.l_input_proj), _linear_spec(self.l_drift_proj)
        if lin_in is None or lin_drift is None:
            return None
        return worker._fused_plan, lin_in, lin_drift
