"""The recurrent state HierarchosLM carries between calls.

All tensors have sizes fixed by the config and the batch size, never by the number of
tokens consumed; ROSA's automaton is the one growing piece and it is bounded by
`rosa_window`. Forward extends the ROSA automata in place: clone() a state to branch it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch


def _map(tree: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: _map(v, fn) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_map(v, fn) for v in tree]
    return tree


def _leaves(tree: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, f"{prefix}.{k}" if prefix else k)
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _leaves(v, f"{prefix}.{i}")


def leaf_layout(tree: Any) -> Any:
    """`tree` (dicts and lists of tensors) with each tensor replaced by its index in leaf order (the
    order of `_leaves`): the layout that static buffers (a CUDA graph's) are put back into a tree by."""
    counter = iter(range(10 ** 9))
    return _map(tree, lambda _: next(counter))


def fill_layout(layout: Any, leaves: list[torch.Tensor]) -> Any:
    """The tree of `leaf_layout` with the indices replaced by `leaves` (plain ints and containers only:
    torch.compile traces it into nothing)."""
    if isinstance(layout, int):
        return leaves[layout]
    if isinstance(layout, dict):
        return {k: fill_layout(v, leaves) for k, v in layout.items()}
    if isinstance(layout, list):
        return [fill_layout(v, leaves) for v in layout]
    return layout


@dataclass
class HierarchosState:
    pos: int                 # tokens consumed so far (global position of the next token)
    memory: dict             # LTM values, momentum, open-chunk accumulators, write counts
    rounds: list             # per HRM round: manager watch/pondering states, plans, worker states
    rosa: list | None        # one RosaAutomaton per batch row (or None without ROSA)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from _leaves({"memory": self.memory, "rounds": self.rounds})

    def with_leaves(self, leaves: list[torch.Tensor], pos: int, rosa) -> "HierarchosState":
        """A state of this one's layout holding `leaves` (in `tensors()` order), at `pos`, with `rosa`."""
        it = iter(leaves)
        shaped = self.map(lambda _: next(it))
        return HierarchosState(pos, shaped.memory, shaped.rounds, rosa)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor], *, copy_rosa: bool = False) -> "HierarchosState":
        rosa = [a.copy() for a in self.rosa] if (copy_rosa and self.rosa is not None) else self.rosa
        return HierarchosState(self.pos, _map(self.memory, fn), _map(self.rounds, fn), rosa)

    def detach(self) -> "HierarchosState":
        """Cut the gradient history (truncated BPTT); shares ROSA automata."""
        return self.map(lambda t: t.detach())

    def clone(self) -> "HierarchosState":
        """An independent copy (tensors and ROSA automata)."""
        return self.map(lambda t: t.clone(), copy_rosa=True)

    def to(self, device) -> "HierarchosState":
        return self.map(lambda t: t.to(device))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, t in self.tensors())

    def shapes(self) -> dict[str, tuple]:
        return {name: tuple(t.shape) for name, t in self.tensors()}
