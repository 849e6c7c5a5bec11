"""The quantized-kernel API, one backend chosen at import: the C++ extension
`hierarchos.hierarchos_kernels` when it is built, else the numpy reference in `formats`
(slow, exact), announced by one line on stderr. Both take and return numpy arrays.

    quantize(w (rows, cols) f32, qtype) -> uint8 (rows, row_bytes)
    dequantize(data, qtype, cols) -> f32 (rows, cols)
    dequantize_rows(data, qtype, cols, row_ids) -> f32 (n, cols)
    matmul(data, qtype, cols, x (N, cols) f32) -> f32 (N, rows)      # y = x @ W.T
    matmul_many([(data, qtype, cols), ...], [x, ...]) -> [y, ...]    # several in one call, same results
    RwkvStackStep(dim, head_size, ffn_dim, layers).step(...)         # C++ only (None without it): fused_step.py
    memory_read(e, query, target, keys, slot_source, k, ...)         # C++ only (None without it): fused_step.py
    activations_as_used(x (N, cols) f32, qtype) -> f32 (N, cols)      # C++ only (None without it): quant/modules.py
    set_threads(n) / get_threads(); set_isa(name) / get_isa(); available_isas(); backend_name()

`HIERARCHOS_ISA=scalar|avx2|avx512|neon` forces an ISA of the C++ backend (an ISA this
CPU or build lacks is a HierarchosError naming the available ones).
"""

from __future__ import annotations

import importlib
import os
import sys

import numpy as np

from ..errors import HierarchosError
from . import formats
from .formats import QTYPES, check_cols, int4_join, int4_split, row_bytes  # noqa: F401  (re-exported)

try:
    _ext = importlib.import_module("hierarchos.hierarchos_kernels")
    _load_error = None
except ImportError as error:  # not built, or built for another Python / platform
    _ext = None
    _load_error = error

BUILD_HINT = "build it with `bash setup.sh`, or setup.bat on Windows"


def _announce_reference() -> None:
    reason = "is not built" if isinstance(_load_error, ModuleNotFoundError) else f"failed to load ({_load_error})"
    print(f"hierarchos: the C++ kernel {reason}; using the slow numpy reference ({BUILD_HINT})", file=sys.stderr)


def backend_name() -> str:
    return "cpp" if _ext is not None else "numpy-reference"


def block_size(qtype: str) -> int:
    return formats.block_size(qtype)


def block_bytes(qtype: str) -> int:
    return formats.block_bytes(qtype)


if _ext is not None:
    quantize = _ext.quantize
    dequantize = _ext.dequantize
    dequantize_rows = _ext.dequantize_rows
    matmul = _ext.matmul
    matmul_many = _ext.matmul_many
    set_threads = _ext.set_threads
    get_threads = _ext.get_threads
    get_isa = _ext.get_isa
    available_isas = _ext.available_isas
    stream_read = _ext.stream_read
    # one token through a whole quantized RWKV-7 stack (fused_step.py); None in a kernel built before it
    RwkvStackStep = getattr(_ext, "RwkvStackStep", None)
    # one token's long-term-memory read (fused_step.py); None in a kernel built before it
    memory_read = getattr(_ext, "memory_read", None)
    # the 8-bit activation blocks as floats (the dense prefill path); None in a kernel built before it
    activations_as_used = getattr(_ext, "activations_as_used", None)

    def set_isa(name: str) -> None:
        """Force one ISA path (see available_isas()); raises HierarchosError when unavailable."""
        try:
            _ext.set_isa(name)
        except ValueError as error:
            raise HierarchosError(f"HIERARCHOS_ISA / set_isa: {error}") from None

    def cpu_features() -> dict:
        return dict(_ext.cpu_features())

    if os.environ.get("HIERARCHOS_ISA"):
        set_isa(os.environ["HIERARCHOS_ISA"])
else:
    _announce_reference()
    RwkvStackStep = None  # the fused stack step has no numpy version: fused_step.py runs the Python step
    memory_read = None  # nor the fused memory read
    activations_as_used = None  # quant/modules.py has the numpy version
    quantize = formats.quantize
    dequantize = formats.dequantize
    dequantize_rows = formats.dequantize_rows
    matmul = formats.matmul

    def matmul_many(weights, xs):
        """One matmul per (data, qtype, cols) and activations: the reference is the plain loop."""
        if len(weights) != len(xs):
            raise HierarchosError(f"matmul_many: {len(weights)} weights but {len(xs)} activations")
        return [formats.matmul(data, qtype, cols, x) for (data, qtype, cols), x in zip(weights, xs)]

    _threads = [os.cpu_count() or 1]

    def set_threads(n: int) -> None:
        """Recorded only: the numpy reference runs on numpy's own threads."""
        _threads[0] = n if n > 0 else (os.cpu_count() or 1)

    def get_threads() -> int:
        return _threads[0]

    def available_isas() -> list[str]:
        return ["reference"]

    def get_isa() -> str:
        return "reference"

    def set_isa(name: str) -> None:
        if name != "reference":
            raise HierarchosError(f"ISA {name!r} needs the C++ kernel, which is not built; {BUILD_HINT}")

    def cpu_features() -> dict:
        return {}

    def stream_read(buffer: np.ndarray, threads: int = 0) -> int:
        return int(np.asarray(buffer, dtype=np.uint8).view(np.uint8).sum(dtype=np.uint64))
