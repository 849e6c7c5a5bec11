"""A stand-in for a Triton module's `_kernels` that records every launch (shared by the kernel rules tests)."""

from __future__ import annotations


class Launches:
    """Stands in for `_kernels`: hands out the interpreted (forward, backward) kernels wrapped so that every
    launch is recorded as (kernel name, grid, positional arguments, keywords) before it runs."""

    def __init__(self, kernels):
        self.kernels, self.calls = kernels, []

    def __call__(self, interpret):
        assert interpret is True  # CPU tensors: the interpreter, never the compiled kernels
        return tuple(self._spy(name, fn) for name, fn in zip(("fwd", "bwd"), self.kernels(True)))

    def _spy(self, name, fn):
        calls = self.calls

        class Spy:
            def __getitem__(self, grid):
                def launch(*args, **kw):
                    calls.append((name, grid, args, kw))
                    return fn[grid](*args, **kw)
                return launch
        return Spy()
