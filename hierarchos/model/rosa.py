"""ROSA next-token hints: for each position, the token that followed the most recent
earlier occurrence of the longest repeated suffix (or `none_id`), from a suffix automaton.

Definition. For tokens x_0..x_{T-1} and position t, let L >= 1 be the largest length
such that the suffix x_{t-L+1..t} also ends at some earlier position j < t, and take
the largest such j. The hint is x_{j+1} (j + 1 <= t, so hints are causal); with no
such L it is `none_id`.

Bounded memory. An automaton holds at most 2*window tokens of history: right after
the push that brings the history to 2*window tokens, it is rebuilt from the last
`window` tokens (amortized O(1) per token). Matching only looks at the history held
when a token arrives, which after n tokens consumed starts at global index
`history_start(n, window) = max(0, (n // window - 1) * window)`. The schedule depends
only on n, so batch and incremental use agree by construction; for sequences shorter
than 2*window the hints are the plain definition.

Cost. Online suffix automaton construction (amortized O(1) transitions per token)
plus a walk up the suffix-link path of the new state to refresh each state's most
recent end position: O(path length) per token, a few states on natural or random
text, up to O(window) on degenerate input such as "aaaa...". Measured with
`PyRosaAutomaton(window).extend` on T=1024 random tokens (fresh automaton per
sequence), one CPU core, CPython 3.11: vocab 50k ~2.6M tokens/s (window 1024) /
~1.7M (window 256, rebuilds); vocab 4 ~1.3M / ~0.8M; constant "aaaa..." ~0.1M.

Backends. `RosaAutomaton` runs the C++ port in the `hierarchos_kernels` extension when
it is built (same hints, same rebuild schedule; tests/test_kernel.py checks them equal)
and this module's `PyRosaAutomaton`, the reference, otherwise. `backend="python"` or
`HIERARCHOS_ROSA=python` selects the reference; `"cpp"` requires the extension.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence

import numpy as np
import torch

from ..errors import HierarchosError

try:
    _kernels = importlib.import_module("hierarchos.hierarchos_kernels")
except ImportError:  # not built: the Python reference serves
    _kernels = None

ROSA_BACKENDS = ("auto", "cpp", "python")


def cpp_automaton_available() -> bool:
    """Whether the C++ automaton is built (else every ROSA automaton is the Python reference)."""
    return _kernels is not None


def history_start(num_consumed: int, window: int) -> int:
    """Global index of the first token held after `num_consumed` tokens (see module doc)."""
    return max(0, (num_consumed // window - 1) * window)


class PyRosaAutomaton:
    """Suffix automaton over a bounded token history that returns one hint per pushed token.

    States are parallel plain lists (transitions dict, suffix link, longest length,
    most recent end position); state 0 is the root. Positions are indices into the
    held history, which restarts at each rebuild.
    """

    def __init__(self, window: int, none_id: int):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = int(window)
        self.none_id = int(none_id)
        self.num_tokens = 0
        self._reset()

    def _reset(self) -> None:
        self._history: list[int] = []
        self._next: list[dict[int, int]] = [{}]
        self._link: list[int] = [-1]
        self._len: list[int] = [0]
        self._end: list[int] = [-1]  # most recent end position seen so far, per state
        self._last = 0  # state of the whole history

    @property
    def history_len(self) -> int:
        """Tokens currently held (always < 2*window between calls)."""
        return len(self._history)

    @property
    def num_states(self) -> int:
        return len(self._len)

    def push(self, token: int) -> int:
        """Append one token and return its hint."""
        return self.extend((token,))[0]

    def extend(self, tokens: Sequence[int]) -> list[int]:
        """Append tokens in order and return their hints."""
        tokens = list(tokens)
        hints: list[int] = []
        limit = 2 * self.window
        start = 0
        while start < len(tokens):
            chunk = tokens[start:start + limit - len(self._history)]
            self._feed(chunk, hints)
            start += len(chunk)
            self.num_tokens += len(chunk)
            if len(self._history) == limit:
                self._rebuild()
        return hints

    def copy(self) -> PyRosaAutomaton:
        """An independent deep copy."""
        other = PyRosaAutomaton.__new__(PyRosaAutomaton)
        other.window = self.window
        other.none_id = self.none_id
        other.num_tokens = self.num_tokens
        other._history = self._history.copy()
        other._next = [transitions.copy() for transitions in self._next]
        other._link = self._link.copy()
        other._len = self._len.copy()
        other._end = self._end.copy()
        other._last = self._last
        return other

    def _rebuild(self) -> None:
        kept = self._history[self.window:]
        self._reset()
        self._feed(kept, [])

    def _feed(self, tokens: list[int], hints: list[int]) -> None:
        """The automaton loop; the caller guarantees no rebuild is due inside `tokens`."""
        history, nexts, link, length, end = self._history, self._next, self._link, self._len, self._end
        none_id = self.none_id
        last = self._last
        append_hint = hints.append
        for token in tokens:
            pos = len(history)
            history.append(token)
            cur = len(length)
            nexts.append({})
            link.append(0)
            length.append(length[last] + 1)
            end.append(pos)
            p = last
            while p != -1 and token not in nexts[p]:
                nexts[p][token] = cur
                p = link[p]
            if p != -1:
                q = nexts[p][token]
                if length[p] + 1 == length[q]:
                    link[cur] = q
                else:
                    # Split q: the clone's end positions before this token equal q's.
                    clone = len(length)
                    nexts.append(nexts[q].copy())
                    link.append(link[q])
                    length.append(length[p] + 1)
                    end.append(end[q])
                    while p != -1 and nexts[p].get(token) == q:
                        nexts[p][token] = clone
                        p = link[p]
                    link[q] = clone
                    link[cur] = clone
            last = cur
            # The suffix-link parent is the longest suffix seen before; read its last end
            # position, then record `pos` as the newest end of every suffix state.
            state = link[cur]
            append_hint(history[end[state] + 1] if state > 0 else none_id)
            while state > 0:
                end[state] = pos
                state = link[state]
        self._last = last


class RosaAutomaton:
    """One stream's automaton, on the C++ port when built (see module doc), else the reference.

    The same interface as `PyRosaAutomaton`; copies with `copy()`, pickles either way (the
    C++ state pickles as its held history, from which it is rebuilt).
    """

    __slots__ = ("_impl",)

    def __init__(self, window: int, none_id: int, backend: str | None = None):
        backend = backend or os.environ.get("HIERARCHOS_ROSA") or "auto"
        if backend not in ROSA_BACKENDS:
            raise ValueError(f"ROSA backend must be one of {ROSA_BACKENDS}, got {backend!r}")
        if backend == "cpp" and _kernels is None:
            raise HierarchosError("ROSA backend 'cpp' needs the C++ kernel, which is not built; "
                                  "build it with `bash setup.sh`")
        if backend == "python" or _kernels is None:
            self._impl = PyRosaAutomaton(window, none_id)
        else:
            self._impl = _kernels.RosaAutomaton(int(window), int(none_id))

    @property
    def backend(self) -> str:
        return "python" if isinstance(self._impl, PyRosaAutomaton) else "cpp"

    @property
    def window(self) -> int:
        return self._impl.window

    @property
    def none_id(self) -> int:
        return self._impl.none_id

    @property
    def num_tokens(self) -> int:
        return self._impl.num_tokens

    @num_tokens.setter
    def num_tokens(self, value: int) -> None:
        self._impl.num_tokens = value

    @property
    def history_len(self) -> int:
        return self._impl.history_len

    @property
    def num_states(self) -> int:
        return self._impl.num_states

    def push(self, token: int) -> int:
        """Append one token and return its hint."""
        return int(self._impl.push(token))

    def extend(self, tokens: Sequence[int]) -> list[int]:
        """Append tokens in order and return their hints."""
        if isinstance(self._impl, PyRosaAutomaton):
            return self._impl.extend(tokens)
        return self._impl.extend(np.asarray(tokens, dtype=np.int64).reshape(-1)).tolist()

    def extend_array(self, tokens: np.ndarray) -> np.ndarray:
        """`extend` for an int64 array, returning an int64 array (no Python lists on the C++ path)."""
        if isinstance(self._impl, PyRosaAutomaton):
            return np.asarray(self._impl.extend(tokens.tolist()), dtype=np.int64)
        return self._impl.extend(np.ascontiguousarray(tokens, dtype=np.int64))

    def copy(self) -> RosaAutomaton:
        """An independent deep copy."""
        other = RosaAutomaton.__new__(RosaAutomaton)
        other._impl = self._impl.copy()
        return other

    def __getstate__(self):
        return self._impl

    def __setstate__(self, impl) -> None:
        self._impl = impl


def rosa_hints(
    tokens: torch.Tensor,
    automata: list[RosaAutomaton] | None,
    window: int,
    none_id: int,
) -> tuple[torch.Tensor, list[RosaAutomaton]]:
    """Hints for a (B, T) batch of token ids, continuing `automata` (one per row).

    `automata` is extended IN PLACE and returned (fresh ones are made when None), so
    calling again on the next chunk continues each row's stream. The tokens go to the
    CPU once; the hints come back as a LongTensor (B, T) on the tokens' device.
    """
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be (B, T), got shape {tuple(tokens.shape)}")
    hints, automata = rosa_hint_array(tokens.detach().to("cpu", torch.long).numpy(), automata, window, none_id)
    return torch.from_numpy(hints).to(tokens.device), automata


def rosa_hint_array(
    rows: np.ndarray,
    automata: list[RosaAutomaton] | None,
    window: int,
    none_id: int,
) -> tuple[np.ndarray, list[RosaAutomaton]]:
    """`rosa_hints` on the host: rows (B, T) int64 token ids -> hints (B, T) int64, `automata`
    extended in place (fresh ones made when None) and returned."""
    if automata is None:
        automata = [RosaAutomaton(window, none_id) for _ in rows]
    if len(automata) != len(rows):
        raise ValueError(f"{len(automata)} automata for a batch of {len(rows)} rows")
    hints = np.empty(rows.shape, dtype=np.int64)
    for index, (automaton, row) in enumerate(zip(automata, rows)):
        if isinstance(automaton, PyRosaAutomaton):
            hints[index] = automaton.extend(row.tolist())
        else:
            hints[index] = automaton.extend_array(row)
    return hints, automata


def rosa_hints_bruteforce(tokens: Sequence[int], none_id: int, window: int | None = None) -> list[int]:
    """Reference hints straight from the definition (O(T^2) pairs, each compared backwards).

    With `window`, token t only matches within the history held when it arrives,
    starting at `history_start(t, window)`, exactly as `RosaAutomaton` does.
    """
    tokens = list(tokens)
    hints = []
    for t in range(len(tokens)):
        first = 0 if window is None else history_start(t, window)
        best_len, best_end = 0, -1
        for j in range(first, t):
            match = 0
            while j - match >= first and tokens[j - match] == tokens[t - match]:
                match += 1
            if match > 0 and match >= best_len:  # ties go to the later j
                best_len, best_end = match, j
        hints.append(tokens[best_end + 1] if best_len > 0 else none_id)
    return hints
