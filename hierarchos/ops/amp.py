"""What autocast is doing right now, asked without failing on device types autocast does not know."""

from __future__ import annotations

import contextlib

import torch


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype active for this device type, or None (also for types such as "meta")."""
    try:
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    except RuntimeError:  # "unknown device type for autocast"
        return None


def to_autocast_dtype(t: torch.Tensor) -> torch.Tensor:
    """A float32 tensor in the active autocast dtype (bf16/fp16), anything else as it is.

    For elementwise work between the matmuls: autocast runs norms in float32 and casts only the
    inputs of matmuls, so without this the token-shift mixes and gates of a block read and write
    float32 (B, T, C) tensors, twice the bytes of the bf16 ones the matmuls consume anyway."""
    amp = autocast_dtype(t.device.type)
    return t.to(amp) if amp is not None and t.dtype == torch.float32 else t


def autocast_in(device_type: str, dtype: torch.dtype | None, **options):
    """torch.autocast in `dtype` on this device type, or a no-op context when `dtype` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype, **options)


def autocast_off(device_type: str):
    """A context with autocast disabled on this device type (a no-op when it is not on): the
    recurrence's PyTorch paths must run their matmuls in float32, not in autocast's bf16."""
    if autocast_dtype(device_type) is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)
