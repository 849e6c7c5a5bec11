"""Quantized inference: which tensors get which format, and a HierarchosLM that runs on the kernel.

`quantize_tensors(model, qtype)` decides per tensor (DESIGN.md section 4, issue 5):
- every nn.Linear weight with at least `MIN_ROWS` rows, and the output head, in `qtype`;
- the lookup tables (token embedding, ROSA hints, DeepEmbed gates) in Q8_0: they are only
  indexed, one row per token, so they cost memory, not bandwidth, and keep 8 bits;
- everything else (norms, biases, decays, the low-rank mixes, the long-term memory's keys and
  values and its metadata, tiny gate/halting heads) stays as it is in float.
A tensor whose row length is not a multiple of its format's block falls back to Q4_0 (Q2_K
needs 256), then Q8_0, then F16; the file records every tensor's format.

`build_quantized_model(cfg, tensors)` builds the ordinary HierarchosLM on the meta device and
swaps the quantized Linear/Embedding modules for `QuantLinear` / `QuantEmbedding` (quant/modules.py,
re-exported here), which call the kernel (a matvec per token in generation, a batched matmul in prefill). The parallel and the
step forms of the model are the same code as in full precision. `place_on_vulkan(model)` uploads
every QuantLinear's blocks to the Vulkan device once; from then on their matmuls run there
(hierarchos/quant/vulkan.py says what stays on the CPU).

`fuse_projections(model)` (done by build_quantized_model) groups the projections a layer computes
from one tensor (FUSED_PROJECTIONS) so that, in generation, the first of them to be called runs the
whole group in one kernel call (`kernel.matmul_many`) and hands the others their results when they
are called: fewer Python-to-kernel round trips and thread-pool hand-offs per token, bit-identical
results (every output row is the same dot product either way).

`fused_step.attach_fused_steps(model)` (also done by build_quantized_model) goes further in
generation: one C++ call per RWKV-7 stack pass for a one-token step (hierarchos/quant/fused_step.py).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from ..config import ModelConfig
from ..errors import HierarchosError
from . import formats, kernel, vulkan
from .fused_step import attach_fused_steps
from .gguf_io import QuantTensor
from .modules import (DENSE_FROM_ROWS, ProjectionGroup, QuantEmbedding, QuantLinear,  # noqa: F401  (re-exported)
                      activations_as_used, activations_as_used_reference)

if os.environ.get("HIERARCHOS_THREADS", "").isdigit():  # --threads (set by the CLI before loading)
    kernel.set_threads(int(os.environ["HIERARCHOS_THREADS"]))

TABLE_QTYPE = "Q8_0"
MIN_ROWS = 8  # gate and halting heads (3 and 1 rows) stay float: tiny, and decisions hinge on them


# Projections a layer computes from one tensor, per module class: (attribute, index), index None =
# the same input tensor as the others, an int = that slice of the first dimension of the tensor the
# input is a view of (TimeMix unbinds its six token-shifted mixes xr, xw, xk, xv, xa, xg). Whether a
# member's input really is that tensor is checked on every call (storage address, shape, strides,
# version, and the base held alive); when it is not, the member runs alone: a wrong entry here costs
# speed, never a result.
FUSED_PROJECTIONS = {"ChannelMix": (("gate", None), ("up", None)),
                     "TimeMix": (("receptance", 0), ("key", 2), ("value", 3), ("gate", 5))}


def _fits(qtype: str, cols: int) -> bool:
    return cols % formats.block_size(qtype) == 0


def pick_format(qtype: str, cols: int) -> str:
    """The format a matrix with rows of `cols` gets when `qtype` is asked for (fallbacks above)."""
    for candidate in (qtype, "Q4_0", "Q8_0"):
        if _fits(candidate, cols):
            return candidate
    return "F16"


def _encode(weight: torch.Tensor, qtype: str):
    w = weight.detach().to("cpu", torch.float32).contiguous().numpy()
    kind = pick_format(qtype, w.shape[1])
    if kind == "F16":
        return w.astype(np.float16)
    return QuantTensor(kind, kernel.quantize(w, kind), w.shape[1])


def _table_modules(model) -> dict[str, nn.Embedding]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Embedding)}


def quantize_tensors(model, qtype: str) -> dict:
    """name -> QuantTensor | np.ndarray for every tensor of the model's state dict (tied head split out)."""
    if qtype not in formats.QTYPES:
        raise HierarchosError(f"--qtype {qtype!r}: expected one of {', '.join(formats.QTYPES)}")
    linear = {f"{name}.weight" for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and m.out_features >= MIN_ROWS}
    tables = {f"{name}.weight" for name in _table_modules(model)}
    out = {}
    for name, tensor in model.state_dict().items():
        if name in linear:
            out[name] = _encode(tensor, qtype)
        elif name in tables:
            out[name] = _encode(tensor, TABLE_QTYPE)
        else:
            out[name] = tensor.detach().to("cpu").contiguous().numpy()
    return out


def describe(tensors: dict) -> dict:
    """Bytes and tensor counts per storage format (for the quantize report and /status)."""
    summary: dict[str, list[int]] = {}
    for value in tensors.values():
        kind = value.qtype if isinstance(value, QuantTensor) else str(value.dtype)
        entry = summary.setdefault(kind, [0, 0])
        entry[0] += 1
        entry[1] += int(value.nbytes)
    return {kind: {"tensors": n, "bytes": b} for kind, (n, b) in sorted(summary.items())}


def fuse_projections(model, enabled: bool = True) -> int:
    """Group each layer's projections of one tensor (FUSED_PROJECTIONS) for one kernel call per group
    in generation; enabled=False removes the groups (every QuantLinear runs alone). Returns the
    number of groups."""
    groups = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.group = None
    if not enabled:
        return 0
    for module in model.modules():
        spec = FUSED_PROJECTIONS.get(type(module).__name__)
        if spec is None:
            continue
        members = [(getattr(module, name, None), index) for name, index in spec]
        members = [(m, i) for m, i in members if isinstance(m, QuantLinear)]
        if len(members) < 2 or len({m.in_features for m, _ in members}) != 1:
            continue
        group = ProjectionGroup(members)
        for m, _ in members:
            m.group = group
        groups += 1
    return groups


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def build_quantized_model(cfg: ModelConfig, tensors: dict, where: str = "quantized model"):
    """A HierarchosLM (CPU, eval) whose quantized tensors run through the kernel."""
    from ..model import HierarchosLM

    with torch.device("meta"):
        model = HierarchosLM(cfg)
    floats: dict[str, torch.Tensor] = {}
    used = set()
    for name, module in list(model.named_modules()):
        key = f"{name}.weight"
        value = tensors.get(key)
        if isinstance(module, nn.Linear) and isinstance(value, QuantTensor):
            bias = tensors.get(f"{name}.bias")
            _set_module(model, name, QuantLinear(value, None if bias is None else torch.from_numpy(np.array(bias))))
            used.update({key, f"{name}.bias"})
        elif isinstance(module, nn.Embedding) and isinstance(value, QuantTensor):
            _set_module(model, name, QuantEmbedding(value))
            used.add(key)
    expected = model.state_dict()
    for name, ref in expected.items():
        value = tensors.get(name)
        if value is None:
            raise HierarchosError(f"{where}: tensor {name!r} is missing; the file does not fit its own config, "
                                  "re-run `hierarchos quantize`")
        if isinstance(value, QuantTensor):
            raise HierarchosError(f"{where}: tensor {name!r} is quantized but its module cannot run quantized; "
                                  "re-run `hierarchos quantize` with this version")
        array = np.array(value)  # a writable copy: memory values and metadata change during chat
        if tuple(array.shape) != tuple(ref.shape):
            raise HierarchosError(f"{where}: tensor {name!r} has shape {tuple(array.shape)}, the config expects "
                                  f"{tuple(ref.shape)}; re-run `hierarchos quantize`")
        floats[name] = torch.from_numpy(array).to(ref.dtype)
        used.add(name)
    unexpected = sorted(set(tensors) - used)
    if unexpected:
        raise HierarchosError(f"{where}: unexpected tensors {', '.join(unexpected[:4])}; the file does not fit "
                              "its config, re-run `hierarchos quantize`")
    model.load_state_dict(floats, strict=True, assign=True)
    for p in model.parameters():
        p.requires_grad_(False)
    fuse_projections(model)
    attach_fused_steps(model)
    model.step_threads = 1  # the matmuls run on the kernel's pool; torch keeps one thread (ops/threads.py)
    return model.eval()


def place_on_vulkan(model, where: str = "--device vulkan") -> int:
    """Upload every QuantLinear's blocks to the Vulkan device (once); returns the bytes uploaded.
    A one-line HierarchosError when there is no Vulkan backend, device, or device memory."""
    vulkan.require_vulkan(where)
    attach_fused_steps(model, enabled=False)  # the fused stack step runs the CPU kernel; matmuls go to Vulkan now
    uploaded = 0
    for module in model.modules():
        if isinstance(module, QuantLinear) and module.vk_weight is None:
            q = module.weight_q
            module.vk_weight = vulkan.upload(q.data, q.qtype, q.cols, where)
            uploaded += q.nbytes
    return uploaded


def quantized_bytes(model) -> int:
    """Bytes of weights the quantized model holds (blocks plus float tensors)."""
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for module in model.modules():
        if isinstance(module, QuantLinear):
            total += module.weight_q.nbytes
        elif isinstance(module, QuantEmbedding):
            total += module.table.nbytes
    return total
