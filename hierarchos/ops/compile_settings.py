"""What torch.compile needs set before this project compiles anything (`before_compiling`, one place).

AOT autograd rebuilds a compiled region's outputs that alias its inputs or its intermediates (the time
mix's frame before the recurrence's graph break returns views of intermediates: the heads' (B, T, H, N)
views, the first layer's value) by replaying the views it recorded while tracing. Under dynamic shapes (a
stack runs over T tokens and over T/4 plan points, so the second length makes the frame dynamic) that
replay read garbage sizes in torch 2.11 on CUDA and 2.13 on the CPU: "invalid shape dimension
-4117939486354728099" or a segmentation fault, in 4 of 5 runs of `bench/profile_forward.py --device cpu
--size tiny --compile` and 2 of 3 of a two-layer stack compiled and run at four lengths (the test in
tests/test_compile_settings.py). Rebuilding them with as_strided instead, torch's own default inside
Meta's fbcode (`view_replay_for_aliased_outputs = not is_fbcode()`), ran clean every time.
"""

from __future__ import annotations


def before_compiling() -> None:
    """Rebuild aliased outputs of compiled regions by as_strided, not by view replay (see the module)."""
    import torch._functorch.config as aot_config

    aot_config.view_replay_for_aliased_outputs = False
