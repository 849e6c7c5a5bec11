"""Functional kernels with no nn.Module state; every fast path has a reference next to it.

`wkv7` runs RWKV-7 time mixing through the best implementation available (see `ops.wkv`).
"""

from .wkv import available_impls, wkv7

__all__ = ["available_impls", "wkv7"]
