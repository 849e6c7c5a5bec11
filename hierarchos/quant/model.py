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
swaps the quantized Linear/Embedding modules for `QuantLinear` / `QuantEmbedding`, which call
the kernel (a matvec per token in generation, a batched matmul in prefill). The parallel and the
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

if os.environ.get("HIERARCHOS_THREADS", "").isdigit():  # --threads (set by the CLI before loading)
    kernel.set_threads(int(os.environ["HIERARCHOS_THREADS"]))

TABLE_QTYPE = "Q8_0"
# From this many rows on (prompt prefill), QuantLinear dequantizes W once per call and runs a float
# GEMM on the activations the kernel would have used: the same function to float rounding, and
# the BLAS GEMM beats the integer kernel there (bench/bench_kernels.py: batch 64 is 0.5-1.1x torch).
DENSE_FROM_ROWS = 32
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


def activations_as_used(x: np.ndarray, qtype: str) -> np.ndarray:
    """The float values of the 8-bit activation blocks the kernel's integer dot products use for x:
    the C++ kernel's own quantizer when it is built (the same bits as the reference below, tested;
    the numpy one took ~20% of a quantized prefill), else `activations_as_used_reference`."""
    fast = kernel.activations_as_used
    return fast(x, qtype) if fast is not None else activations_as_used_reference(x, qtype)


def activations_as_used_reference(x: np.ndarray, qtype: str) -> np.ndarray:
    """`activations_as_used` in numpy, from the formats' definitions (formats.py)."""
    if qtype == "Q2_K":
        codes, d, _ = formats.quantize_q8_k_activations(x)
        block = formats.QK_K
    else:
        codes, d = formats.quantize_q8_0_activations(x)
        block = 32
    n, cols = x.shape
    return (codes.reshape(n, cols // block, block).astype(np.float32) * d[:, :, None]).reshape(n, cols)


class QuantLinear(nn.Module):
    """y = x @ W.T (+ b) with W in quantized blocks; activations are quantized on the fly by the kernel."""

    def __init__(self, weight: QuantTensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight_q = weight
        self.in_features, self.out_features = weight.cols, weight.rows
        self.quantized_numel = weight.rows * weight.cols
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.vk_weight = None  # the blocks on the Vulkan device, once place_on_vulkan ran
        self.group: ProjectionGroup | None = None  # set by fuse_projections

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:
            raise HierarchosError("quantized weights cannot be trained; learn with the full-precision model "
                                  "(chat --enable-quantized-learning --shadow-model-path DIR)")
        if self.group is not None:
            fused = self.group.take(self, x)
            if fused is not None:
                y = torch.from_numpy(fused)
                y = (y if y.dtype == x.dtype else y.to(x.dtype)).reshape(*x.shape[:-1], self.out_features)
                return y + self.bias if self.bias is not None else y
        shape = x.shape
        flat = x.detach().reshape(-1, self.in_features)
        if flat.dtype != torch.float32 or flat.device.type != "cpu":  # (skip the no-op .to: it costs per token)
            flat = flat.to("cpu", torch.float32)
        flat = flat.contiguous().numpy()
        if self.vk_weight is not None:  # every batch size: the shader tiles rows itself
            y = torch.from_numpy(vulkan.vk_matmul(self.vk_weight, flat))
        elif flat.shape[0] >= DENSE_FROM_ROWS:
            y = self.dense_matmul(flat)
        else:
            y = torch.from_numpy(kernel.matmul(self.weight_q.data, self.weight_q.qtype, self.in_features, flat))
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        y = y.reshape(*shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y

    def dense_matmul(self, flat: np.ndarray) -> torch.Tensor:
        """kernel.matmul's function through a float GEMM: x rounded to the kernel's 8-bit activation
        blocks (Q8_0, or Q8_K for Q2_K) and W dequantized; only the order of float sums differs."""
        w = torch.from_numpy(kernel.dequantize(self.weight_q.data, self.weight_q.qtype, self.in_features))
        x = torch.from_numpy(activations_as_used(flat, self.weight_q.qtype))
        return x @ w.T

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.weight_q.qtype}" + (
            ", vulkan" if self.vk_weight is not None else "")


def _input_key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), t._version, tuple(t.shape), t.stride(), t.dtype, t.device)


class ProjectionGroup:
    """QuantLinears that read one tensor (or slices of one), run by one kernel.matmul_many call.

    The first member called computes every member's output from the tensor its own input comes from
    and keeps the others' results, each with the key of the input it used (holding that input, so its
    storage cannot be reused meanwhile); a member whose input has that key takes its result, any other
    call runs the group again (or the member alone when the inputs cannot be derived). Only the
    kernel's small-batch CPU path is fused (not Vulkan, not the dense prefill path)."""

    def __init__(self, members: list[tuple[QuantLinear, int | None]]):
        self.members = members
        self.pending: dict[int, tuple[tuple, torch.Tensor, np.ndarray]] = {}
        self.weights = [(m.weight_q.data, m.weight_q.qtype, m.in_features) for m, _ in members]

    def _inputs(self, member: QuantLinear, x: torch.Tensor) -> list[torch.Tensor] | None:
        index = next(i for m, i in self.members if m is member)
        if index is None:
            return [x] * len(self.members)
        base = x._base
        if base is None or base.dim() < 2 or not 0 <= index < base.shape[0] or _input_key(base[index]) != _input_key(x):
            return None
        if any(not 0 <= i < base.shape[0] for _, i in self.members):
            return None
        return [base[i] for _, i in self.members]

    def take(self, member: QuantLinear, x: torch.Tensor) -> np.ndarray | None:
        """member's output for x (rows, out_features) from the group's one call, or None: run alone."""
        hit = self.pending.pop(id(member), None)
        key = _input_key(x)
        if hit is not None and hit[0] == key:
            return hit[2]
        rows = x.numel() // max(1, x.shape[-1])
        if (x.device.type != "cpu" or x.dtype != torch.float32 or rows >= DENSE_FROM_ROWS
                or any(m.vk_weight is not None for m, _ in self.members)):
            return None
        inputs = self._inputs(member, x)
        if inputs is None:
            return None
        flats = [t.detach().reshape(-1, m.in_features).contiguous().numpy() for (m, _), t in zip(self.members, inputs)]
        outputs = kernel.matmul_many(self.weights, flats)
        self.pending.clear()
        own = None
        for (m, _), t, y in zip(self.members, inputs, outputs):
            if m is member:
                own = y
            else:
                self.pending[id(m)] = (_input_key(t), t, y)
        return own


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


class QuantEmbedding(nn.Module):
    """Row lookups from a quantized table: only the rows asked for are dequantized."""

    def __init__(self, table: QuantTensor):
        super().__init__()
        self.table = table
        self.num_embeddings, self.embedding_dim = table.rows, table.cols
        self.quantized_numel = table.rows * table.cols

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.detach().reshape(-1).to("cpu", torch.int64).numpy()
        rows = kernel.dequantize_rows(self.table.data, self.table.qtype, self.table.cols, flat)
        return torch.from_numpy(rows).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.table.qtype}"


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
