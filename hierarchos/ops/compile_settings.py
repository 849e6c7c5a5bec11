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

AOT autograd's on-disk cache of compiled forward/backward pairs is off: its writer died with a segmentation
fault on H100s with torch 2.11, once with a Python stack (`autograd_cache.py _pickle_entry`, saving a
compiled backward, in the GPU tests) and twice without one (a 125m step with compiled blocks under a CUDA
graph, `bench_forward.py`); with TORCHINDUCTOR_AUTOGRAD_CACHE=0 the same tests and the same step ran clean
(BENCHMARKS.md). Inductor's own cache of generated kernels stays on, so a second run still skips most of
the code generation. The environment variable, where set, still decides (torch lets it override).
"""

from __future__ import annotations


def before_compiling() -> None:
    """Rebuild aliased outputs of compiled regions by as_strided, not by view replay, and keep AOT
    autograd's cache off (see the module)."""
    import torch._functorch.config as aot_config

    aot_config.view_replay_for_aliased_outputs = False
    aot_config.enable_autograd_cache = False
