"""Checking a fast kernel once per device before it is used (the sampler's noise kernel, the
chunk-parallel WKV-7 forward, the one-token products): it must build there and agree with its reference.
The check reads its result on the host, so it never runs inside a CUDA graph capture or a torch.compile
trace: an unchecked device is answered False there (the caller captures or traces its reference path)
and checked at the next call outside one. A failure -- a compiler or driver that cannot build the
kernel, or other results -- is reported once and the device keeps the reference path."""

from __future__ import annotations

import warnings
from typing import Callable

import torch


def checked_once(cache: dict, device: torch.device | str, check: Callable[[torch.device], tuple[bool, str]],
                 what: str, otherwise: str) -> bool:
    """Whether `check(device)` -> (ok, why) passed on `device`, asked once per device (`cache` holds the
    answers); a failure, or an exception from `check`, warns "`what` failed its check on DEVICE (why);
    `otherwise`" once."""
    device = torch.device(device)
    if device in cache:
        return cache[device]
    if torch.compiler.is_compiling() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return False  # never inside a trace or a capture (the caller checks before compiling or capturing)
    try:
        ok, why = check(device)
    except Exception as exc:  # noqa: BLE001 (a kernel that cannot build here: the reference path still works)
        ok, why = False, f"{type(exc).__name__}: {exc}"
    if not ok:
        warnings.warn(f"{what} failed its check on {device} ({why}); {otherwise}", RuntimeWarning, stacklevel=3)
    cache[device] = ok
    return ok
