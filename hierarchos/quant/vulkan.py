"""The Vulkan backend of the quantized matmul (`hierarchos.hierarchos_vulkan`, built by
`setup.sh --vulkan`): a quantized matrix is uploaded to the device once, then y = x @ W.T
runs there per call with float32 activations (the CPU kernel rounds them to 8 bits; here
only W is quantized, so results differ from `kernel.matmul` by that rounding, ~1e-2 relative,
and match `reference_matmul` to float32 summation, ~1e-6).

    vulkan_available() -> bool; vulkan_status() -> '' or why not; vk_device_name() -> str
    require_vulkan(where) -> None, or a one-line HierarchosError saying what to install or build
    upload(data (rows, row_bytes) uint8, qtype, cols) -> weight handle resident on the device
    vk_matmul(weight, x (N, cols) f32) -> f32 (N, rows)
    reference_matmul(data, qtype, cols, x): the plain reference (dequantize, float64 product)

What runs where for a quantized model on `--device vulkan` (model.place_on_vulkan): every
QuantLinear (all projections and the output head: nearly all the weight bytes) on the device;
embedding lookups, norms, the WKV-7 step, ROSA, the long-term memory and sampling stay on the
CPU (torch and the C++ kernel). Per token only activations cross the bus.
`HIERARCHOS_VULKAN_DEVICE=N` picks the N-th device of `vulkaninfo --summary` (default: the
first discrete GPU, else integrated, virtual, then CPU drivers such as lavapipe).
"""

from __future__ import annotations

import importlib

import numpy as np

from ..errors import HierarchosError
from . import formats

try:
    _ext = importlib.import_module("hierarchos.hierarchos_vulkan")
    _load_error = None
except ImportError as error:  # not built (setup.sh without --vulkan), or for another Python
    _ext = None
    _load_error = error

BUILD_HINT = "build it with `bash setup.sh --vulkan` (setup.bat --vulkan on Windows)"


def vulkan_built() -> bool:
    return _ext is not None


def vulkan_status() -> str:
    """'' when a Vulkan device is ready, else why not, one line (the first call opens the device)."""
    if _ext is None:
        if isinstance(_load_error, ModuleNotFoundError):
            return f"the Vulkan backend is not built; {BUILD_HINT}"
        return f"the Vulkan backend failed to load ({_load_error}); {BUILD_HINT}"
    return _ext.init_status()


def vulkan_available() -> bool:
    return vulkan_status() == ""


def require_vulkan(where: str = "--device vulkan") -> None:
    status = vulkan_status()
    if status:
        raise HierarchosError(f"{where}: {status}")


def device_info() -> dict:
    require_vulkan("vulkan")
    return dict(_ext.device_info())


def vk_device_name() -> str:
    return device_info()["name"]


def upload(data: np.ndarray, qtype: str, cols: int, where: str = "vulkan"):
    """Copy the blocks to device memory once; the handle frees them when dropped."""
    require_vulkan(where)
    try:
        return _ext.upload(np.ascontiguousarray(data, dtype=np.uint8), qtype, cols)
    except RuntimeError as error:  # out of device memory, a buffer over the device's limit
        raise HierarchosError(f"{where}: {error}") from None


def vk_matmul(weight, x: np.ndarray) -> np.ndarray:
    try:
        return _ext.matmul(weight, x)
    except RuntimeError as error:  # device lost, batch too large for one dispatch
        raise HierarchosError(f"vulkan matmul ({weight!r}): {error}") from None


def last_dispatch_seconds() -> float:
    """Device time of the last vk_matmul's dispatch alone (timestamps; NaN without them)."""
    return _ext.last_dispatch_seconds() if _ext is not None else float("nan")


def reference_matmul(data: np.ndarray, qtype: str, cols: int, x: np.ndarray) -> np.ndarray:
    """What vk_matmul computes, plainly: the dequantized W times float x, in float64."""
    w = formats.dequantize(data, qtype, cols).astype(np.float64)
    return (np.asarray(x, dtype=np.float64) @ w.T).astype(np.float32)
