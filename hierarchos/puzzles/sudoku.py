"""Sudoku: a bitmask solver, a deterministic generator of hard puzzles, symmetry augmentations, splits.

Guarantees: every generated puzzle has exactly one solution (proved by exhausting the search
tree); a 9x9 one is minimal (no given can go) and needs search (naked and hidden singles
cannot finish it; hill climbing then makes it harder); its difficulty is the solver's search
effort (the same for every augmented copy), the same seed gives the same puzzles
whatever the number of worker processes, and no puzzle of a test split is equivalent under
the augmentation group (digit relabelling, band/stack and row/column permutations,
transposition) to a training puzzle. Grids are (n*n,) uint8 row-major, 0 = blank; n = 9 or 4.
"""

from __future__ import annotations

import hashlib
import itertools
import multiprocessing
import random
import signal
from functools import lru_cache
from math import isqrt

import numpy as np

from ..errors import HierarchosError
from . import dataset
from .dataset import FORMAT_VERSION, SIZES, PuzzleSet, grids_valid

# Attempts one puzzle slot makes before it gives up on reaching min_difficulty.
MAX_ATTEMPTS = 400
GENERATOR = "minimal-dig-climb-v1"
# Symmetric copies whose mean effort is a puzzle's difficulty (see orbit_difficulty).
ORBIT_SAMPLES = 8
# Hill-climbing moves that harden each 9x9 puzzle by default (see default_climb_steps).
DEFAULT_CLIMB_STEPS = 20


# ---- geometry --------------------------------------------------------------------------------

class _Geometry:
    """Units and peers of an n x n grid with b x b boxes; digit d is candidate bit 1 << (d - 1)."""

    def __init__(self, size: int):
        box = isqrt(size)
        self.size, self.box, self.cells = size, box, size * size
        rows = [tuple(r * size + c for c in range(size)) for r in range(size)]
        cols = [tuple(r * size + c for r in range(size)) for c in range(size)]
        boxes = [tuple((br * box + i) * size + bc * box + j for i in range(box) for j in range(box))
                 for br in range(box) for bc in range(box)]
        self.units = rows + cols + boxes
        self.peers = [tuple(sorted({p for unit in self.units if c in unit for p in unit} - {c}))
                      for c in range(self.cells)]
        self.full = (1 << size) - 1
        self.popcount = [bin(m).count("1") for m in range(1 << size)]


@lru_cache(maxsize=None)
def _geometry(size: int) -> _Geometry:
    return _Geometry(size)


def _size_of(grid: np.ndarray) -> int:
    cells = int(grid.shape[-1])
    size = isqrt(cells)
    if size not in SIZES or size * size != cells:
        raise HierarchosError(f"a Sudoku grid has 81 (9x9) or 16 (4x4) cells, got {cells}")
    return size


# ---- solver ------------------------------------------------------------------------------------
#
# Candidates are Python ints (one bit per digit) in a list of n*n cells. Propagation applies
# naked singles (a cell with one candidate removes it from its peers) and hidden singles (a
# digit with one place left in a unit goes there) to a fixed point; search branches on a cell
# with the fewest candidates (MRV). Effort = guesses: the children the search visits, so a
# puzzle that propagation alone finishes has effort 0.

def _propagate(cand: list[int], geo: _Geometry, queue: list[int]) -> bool:
    """Apply singles to a fixed point in place; `queue` holds newly decided cells. False = contradiction."""
    peers, units, full = geo.peers, geo.units, geo.full
    while True:
        while queue:
            cell = queue.pop()
            value = cand[cell]
            for peer in peers[cell]:
                options = cand[peer]
                if options & value:
                    options &= ~value
                    if not options:
                        return False
                    cand[peer] = options
                    if not options & (options - 1):
                        queue.append(peer)
        for unit in units:
            once = twice = fixed = 0
            for cell in unit:
                options = cand[cell]
                twice |= once & options
                once |= options
                if not options & (options - 1):
                    fixed |= options
            if once != full:  # some digit has no place left in this unit
                return False
            singles = once & ~twice & ~fixed  # digits already placed need nothing
            if singles:
                for cell in unit:
                    options = cand[cell]
                    hidden = options & singles
                    if hidden and hidden != options:
                        if hidden & (hidden - 1):  # two digits each need this one cell
                            return False
                        cand[cell] = hidden
                        queue.append(cell)
                    elif hidden & (hidden - 1):
                        return False
        if not queue:
            return True


def _search(cand: list[int], geo: _Geometry, limit: int, found: list, effort: list[int],
            rng: random.Random | None = None) -> None:
    """Depth-first search from a propagated state; appends solutions to `found` up to `limit`."""
    popcount = geo.popcount
    best, best_count = -1, geo.size + 1
    for cell, options in enumerate(cand):
        count = popcount[options]
        if 1 < count < best_count:
            best, best_count = cell, count
            if count == 2:
                break
    if best < 0:
        found.append(cand)
        return
    options = cand[best]
    bits = []
    while options:
        bit = options & -options
        bits.append(bit)
        options ^= bit
    if rng is not None:
        rng.shuffle(bits)
    for bit in bits:
        effort[0] += 1
        child = cand[:]
        child[best] = bit
        if _propagate(child, geo, [best]):
            _search(child, geo, limit, found, effort, rng)
            if len(found) >= limit:
                return


def _candidates(clues, geo: _Geometry) -> tuple[list[int], list[int]]:
    cand, queue = [], []
    for cell, digit in enumerate(clues):
        if digit:
            cand.append(1 << (digit - 1))
            queue.append(cell)
        else:
            cand.append(geo.full)
    return cand, queue


def _solve_list(clues, geo: _Geometry, limit: int) -> tuple[list[list[int]], int]:
    cand, queue = _candidates(clues, geo)
    found: list = []
    effort = [0]
    if _propagate(cand, geo, queue):
        _search(cand, geo, limit, found, effort)
    return [[bit.bit_length() for bit in sol] for sol in found], effort[0]


def _check_grid(grid) -> tuple[np.ndarray, int]:
    array = np.asarray(grid)
    if array.ndim != 1:
        raise HierarchosError(f"a Sudoku grid is one row of cells, got shape {array.shape}")
    size = _size_of(array)
    if array.size and (array.min() < 0 or array.max() > size):
        raise HierarchosError(f"a {size}x{size} Sudoku cell holds 0 (blank) or 1..{size}, got {int(array.max())}")
    return array.astype(np.int64), size


def solve(grid: np.ndarray, *, limit: int = 2) -> tuple[list[np.ndarray], int]:
    """Up to `limit` solutions of `grid` ((n*n,) uint8, 0 = blank) and the search effort (guesses).

    With the default limit=2, one solution means the puzzle is unique; the effort is then the
    size of the whole search tree (every branch is exhausted), which does not depend on the
    order digits are tried in, so it is the same for relabelled copies of a puzzle."""
    array, size = _check_grid(grid)
    solutions, effort = _solve_list(array.tolist(), _geometry(size), limit)
    return [np.array(sol, dtype=np.uint8) for sol in solutions], effort


def propagate(grid: np.ndarray) -> np.ndarray | None:
    """The grid after naked + hidden singles alone (0 where undecided), or None on a contradiction."""
    array, size = _check_grid(grid)
    geo = _geometry(size)
    cand, queue = _candidates(array.tolist(), geo)
    if not _propagate(cand, geo, queue):
        return None
    return np.array([bit.bit_length() if not bit & (bit - 1) else 0 for bit in cand], dtype=np.uint8)


def needs_search(grid: np.ndarray) -> bool:
    """True when naked and hidden singles alone cannot finish the puzzle."""
    done = propagate(grid)
    return done is None or bool((done == 0).any())


def is_valid_solution(solution: np.ndarray, puzzle: np.ndarray | None = None) -> bool:
    """`solution` is a complete valid grid (every row, column and box a permutation of 1..n)
    and, when `puzzle` is given, agrees with each of its givens."""
    sol = np.asarray(solution)
    if sol.ndim != 1:
        return False
    try:
        size = _size_of(sol)
    except HierarchosError:
        return False
    if not bool(grids_valid(sol[None, :], size)[0]):
        return False
    if puzzle is not None:
        givens = np.asarray(puzzle)
        if givens.shape != sol.shape:
            return False
        return bool(((givens == 0) | (givens == sol)).all())
    return True


# ---- canonical form ----------------------------------------------------------------------------
#
# The lexicographically smallest grid over the whole augmentation group: for each geometric
# transform (transposition, band order, rows within bands, stack order, columns within stacks)
# relabel the digits in order of first appearance (the best relabelling for that transform)
# and keep the minimum. Rows are chosen one at a time and only the transforms whose prefix is
# the smallest so far survive, so the search stays small. The first row's column order is
# forced up to ties: the smallest pattern puts stacks with fewer givens first and blanks before
# givens inside a stack. When the row's given digits are distinct (every valid puzzle) its
# relabelled pattern only depends on where the givens fall, so one order stands for all of them;
# a row that repeats a digit (a grid that is no valid puzzle) is compared over every order.

def _first_row_column_orders(row: list[int], box: int) -> list[tuple[int, ...]]:
    stacks = [[c for c in range(s * box, (s + 1) * box)] for s in range(box)]
    counts = [sum(1 for c in stack if row[c]) for stack in stacks]
    groups = [[s for s in range(box) if counts[s] == k] for k in sorted(set(counts))]
    stack_orders = [sum(choice, ()) for choice in itertools.product(
        *[list(itertools.permutations(group)) for group in groups])]
    inside = []
    for stack in stacks:
        blanks = [c for c in stack if not row[c]]
        givens = [c for c in stack if row[c]]
        inside.append([b + g for b in itertools.permutations(blanks) for g in itertools.permutations(givens)])
    orders = []
    for stack_order in stack_orders:
        for parts in itertools.product(*[inside[s] for s in stack_order]):
            orders.append(sum(parts, ()))
    return orders


def _relabelled(row: list[int], order, labels: dict[int, int]) -> tuple[tuple[int, ...], dict[int, int]]:
    new = dict(labels)
    pattern = []
    for c in order:
        digit = row[c]
        if digit and digit not in new:
            new[digit] = len(new) + 1
        pattern.append(new.get(digit, 0))
    return tuple(pattern), new


def canonical_form(grid: np.ndarray) -> bytes:
    """A key equal for two puzzles exactly when one is an augmentation of the other
    (the lexicographically smallest member of the grid's orbit, as n*n bytes)."""
    array, size = _check_grid(grid)
    box = isqrt(size)
    cells = array.tolist()
    views = [[cells[r * size:(r + 1) * size] for r in range(size)]]
    views.append([[cells[r * size + c] for r in range(size)] for c in range(size)])  # transposed
    # A state is (view, column order, chosen rows, digit relabelling). While every chosen row is
    # blank the column order is still free (None): enumerating it early would multiply the
    # states by up to (b!)^(b+1) for nothing.
    states = [(view, None, (), {}) for view in views]
    form: list[int] = []
    for slot in range(size):
        best_row, survivors = None, []
        for view, order, chosen, labels in states:
            if slot % box == 0:  # a new band: any row of a band not used yet
                used = {r // box for r in chosen}
                options = [r for r in range(size) if r // box not in used]
            else:  # the remaining rows of the current band
                band = chosen[-1] // box
                options = [r for r in range(band * box, (band + 1) * box) if r not in chosen]
            for r in options:
                row = view[r]
                if order is not None:
                    choices = [(order, *_relabelled(row, order, labels))]
                elif not any(row):
                    choices = [(None, (0,) * size, labels)]
                else:  # the first row with givens fixes the column order up to ties
                    orders = _first_row_column_orders(row, box)
                    givens = [d for d in row if d]
                    if len(set(givens)) == len(givens):  # every order gives one pattern: test one
                        pattern = _relabelled(row, orders[0], labels)[0]
                        if best_row is not None and pattern > best_row:
                            continue
                    choices = [(o, *_relabelled(row, o, labels)) for o in orders]
                for new_order, pattern, new_labels in choices:
                    if best_row is None or pattern < best_row:
                        best_row, survivors = pattern, []
                    if pattern == best_row:
                        survivors.append((view, new_order, chosen + (r,), new_labels))
        form.extend(best_row)
        states = survivors
    return bytes(form)


# ---- augmentation ------------------------------------------------------------------------------

def _random_line_order(batch: int, box: int, rng: np.random.Generator) -> np.ndarray:
    """(B, n) source line for each target line: a random band order and random lines within each band."""
    bands = np.argsort(rng.random((batch, box)), axis=1)                # (B, b)
    within = np.argsort(rng.random((batch, box, box)), axis=2)          # (B, b, b)
    return (bands[:, :, None] * box + within).reshape(batch, box * box)  # (B, n)


def augment(inputs: np.ndarray, solutions: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Apply one random symmetry per row of a batch ((B, n*n) each) to puzzle and solution alike:
    digit relabelling, band and row-within-band order, stack and column-within-stack order,
    transposition (each with probability 1/2). Validity, uniqueness and the puzzle/solution
    correspondence are preserved because the same map is applied to both."""
    inputs, solutions = np.asarray(inputs), np.asarray(solutions)
    if inputs.shape != solutions.shape or inputs.ndim != 2:
        raise HierarchosError(f"augment takes two (B, n*n) batches of one shape, "
                              f"got {inputs.shape} and {solutions.shape}")
    batch = inputs.shape[0]
    size = _size_of(inputs)
    box = isqrt(size)
    rows = _random_line_order(batch, box, rng)                           # (B, n)
    cols = _random_line_order(batch, box, rng)                           # (B, n)
    transpose = rng.random(batch) < 0.5                                   # (B,)
    source = rows[:, :, None] * size + cols[:, None, :]                   # (B, n, n) cell read for (r, c)
    source_t = cols[:, None, :] * size + rows[:, :, None]                 # the same after transposing
    source = np.where(transpose[:, None, None], source_t, source).reshape(batch, size * size)
    digits = np.argsort(rng.random((batch, size)), axis=1) + 1            # (B, n) new label of digit d
    relabel = np.concatenate([np.zeros((batch, 1), dtype=digits.dtype), digits], axis=1)  # 0 stays blank

    def apply(grids: np.ndarray) -> np.ndarray:
        moved = np.take_along_axis(grids.astype(np.int64), source, axis=1)
        return np.take_along_axis(relabel, moved, axis=1).astype(grids.dtype)

    return apply(inputs), apply(solutions)


def expand_with_augmentations(puzzles: PuzzleSet, copies: int, seed: int) -> PuzzleSet:
    """Each puzzle followed by `copies` augmented copies of it (same puzzle_id and difficulty)."""
    return dataset.expand_with_augmentations(puzzles, copies, augment, np.random.default_rng([int(seed), 0xA06]))


# ---- generator ---------------------------------------------------------------------------------

def default_min_difficulty(size: int) -> float:
    """9x9: 1 guess (the puzzle needs search: singles alone cannot finish it). 4x4: 0, since
    singles finish 4x4 puzzles (all 7,684 unique ones in a random sample of 20,000 tries)."""
    return 1.0 if size == 9 else 0.0


def default_climb_steps(size: int) -> int:
    """Hill-climbing moves per 9x9 puzzle: 20 move the median difficulty from about 7 to about 17
    guesses for about 10x the time (bench/bench_sudoku_generator.py). 0 for 4x4 (nothing to climb:
    singles finish every 4x4 puzzle)."""
    return DEFAULT_CLIMB_STEPS if size == 9 else 0


def _random_solution(geo: _Geometry, rng: random.Random) -> list[int]:
    cand = [geo.full] * geo.cells
    found: list = []
    _search(cand, geo, 1, found, [0], rng)
    return [bit.bit_length() for bit in found[0]]


def _dig(clues: list[int], geo: _Geometry, rng: random.Random) -> list[int]:
    """Remove givens in a random order while the puzzle stays unique: a minimal puzzle.
    Removing the given v at a cell keeps uniqueness iff no solution has another digit there,
    and a given that cannot go now never can later (fewer givens, more solutions)."""
    clues = list(clues)
    order = [cell for cell in range(geo.cells) if clues[cell]]
    rng.shuffle(order)
    for cell in order:
        digit = clues[cell]
        clues[cell] = 0
        cand, queue = _candidates(clues, geo)
        cand[cell] &= ~(1 << (digit - 1))
        found: list = []
        if _propagate(cand, geo, queue):
            _search(cand, geo, 1, found, [0])
        if found:
            clues[cell] = digit
    return clues


def _transposed(clues: list[int], size: int) -> list[int]:
    return [clues[c * size + r] for r in range(size) for c in range(size)]


def _climb_score(clues: list[int], geo: _Geometry) -> float:
    # The puzzle and its transpose: the search branches in cell order, so one orientation alone
    # rewards puzzles that are hard only the way round they happen to be written.
    return (_solve_list(clues, geo, 2)[1] + _solve_list(_transposed(clues, geo.size), geo, 2)[1]) / 2


def _climb(clues: list[int], solution: list[int], geo: _Geometry, rng: random.Random, steps: int) -> list[int]:
    """Hill-climb towards harder puzzles with the same solution. A move forgets 1-3 givens and
    reveals 0-2 other cells, restores uniqueness by revealing a cell where two solutions differ,
    and digs back to a minimal puzzle; the move is kept when the puzzle is at least as hard."""
    score = _climb_score(clues, geo)
    cells = geo.cells
    for _ in range(steps):
        new = list(clues)
        givens = [cell for cell in range(cells) if new[cell]]
        for cell in rng.sample(givens, min(len(givens), rng.randint(1, 3))):
            new[cell] = 0
        blanks = [cell for cell in range(cells) if not clues[cell]]
        for cell in rng.sample(blanks, min(len(blanks), rng.randint(0, 2))):
            new[cell] = solution[cell]
        while True:
            found, _ = _solve_list(new, geo, 2)
            if len(found) == 1:
                break
            first, second = found
            cell = rng.choice([c for c in range(cells) if first[c] != second[c]])
            new[cell] = solution[cell]
        new = _dig(new, geo, rng)
        new_score = _climb_score(new, geo)
        if new_score >= score:
            clues, score = new, new_score
    return clues


def _slot_rng(size: int, seed: int, split: str, slot: int) -> random.Random:
    # A string seed is hashed with SHA-512, so it is the same in every process and Python run.
    return random.Random(f"hierarchos-sudoku:{size}:{seed}:{split}:{slot}")


def orbit_difficulty(grid: np.ndarray, samples: int = ORBIT_SAMPLES) -> float:
    """Mean guesses to solve the puzzle and prove it unique, over its canonical form and
    `samples - 1` symmetric copies drawn with a seed taken from the canonical form.

    The effort on one grid depends on where the search happens to branch (the MRV tie-break
    follows cell order), so a transposed copy can cost 3x more or less; averaging over copies
    chosen from the orbit alone gives a measure that is the same for every augmentation of a
    puzzle and less noisy. 0 exactly when singles alone solve it (propagation is symmetric)."""
    return _orbit_difficulty(canonical_form(grid), samples)


def _orbit_difficulty(form: bytes, samples: int = ORBIT_SAMPLES) -> float:
    canon = np.frombuffer(form, dtype=np.uint8)
    geo = _geometry(_size_of(canon))
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(form).digest()[:8], "little"))
    copies = np.repeat(canon[None, :], samples, axis=0)
    if samples > 1:
        copies[1:] = augment(copies[1:], copies[1:], rng)[0]
    return float(np.mean([_solve_list(row, geo, 2)[1] for row in copies.tolist()]))


def _make_slot(job: tuple[int, int, str, int, float, int]):
    """One puzzle for one slot: (clues, solution, difficulty, canonical form, attempts), or None
    when MAX_ATTEMPTS puzzles all fell short of min_difficulty. Depends only on `job`."""
    size, seed, split, slot, min_difficulty, climb_steps = job
    geo = _geometry(size)
    rng = _slot_rng(size, seed, split, slot)
    for attempt in range(1, MAX_ATTEMPTS + 1):
        solution = _random_solution(geo, rng)
        clues = _dig(solution, geo, rng)
        if size == 4:
            # 4x4 has only a few dozen minimal puzzles up to symmetry: give some back for variety
            blanks = [cell for cell in range(geo.cells) if not clues[cell]]
            for cell in rng.sample(blanks, rng.randint(0, 4)):
                clues[cell] = solution[cell]
        if min_difficulty > 0 and _solve_list(clues, geo, 2)[1] == 0:
            continue  # singles finish it (on every symmetric copy too): not worth climbing from
        if climb_steps:
            clues = _climb(clues, solution, geo, rng, climb_steps)
        solutions, _ = _solve_list(clues, geo, 2)
        if len(solutions) != 1 or solutions[0] != solution:
            raise AssertionError(f"generator produced a non-unique puzzle (slot {slot})")  # a solver bug
        form = canonical_form(np.array(clues, dtype=np.uint8))
        difficulty = _orbit_difficulty(form)
        if difficulty >= min_difficulty:
            return bytes(clues), bytes(solution), difficulty, form, attempt
    return None


def _run_slots(jobs: list, workers: int, pool):
    if pool is None:
        for job in jobs:
            yield _make_slot(job)
    else:
        # imap keeps slot order; small chunks keep the workers balanced and the progress bar moving
        yield from pool.imap(_make_slot, jobs, chunksize=max(1, min(8, len(jobs) // (8 * workers))))


def generate(count: int, *, size: int = 9, seed: int, min_difficulty: float | None = None, workers: int = 1,
             split: str = "train", exclude: set[bytes] | frozenset = frozenset(), progress: bool = False,
             climb_steps: int | None = None) -> PuzzleSet:
    """`count` distinct puzzles (none equivalent to another, nor to a canonical form in `exclude`)
    whose difficulty (`orbit_difficulty`) is at least `min_difficulty` (default:
    `default_min_difficulty(size)`), each hardened by `climb_steps` hill-climbing moves
    (default: `default_climb_steps(size)`; 0 = random minimal puzzles).

    Slot k draws from its own random stream (seed, split, size, k) and the slots are taken in
    order, so the result depends on the arguments only, not on `workers`. Training puzzles get
    ids 1..count, test puzzles id 0."""
    return _generate(count, size=size, seed=seed, min_difficulty=min_difficulty, workers=workers,
                     split=split, exclude=exclude, progress=progress, climb_steps=climb_steps)[0]


def _generate(count: int, *, size: int, seed: int, min_difficulty: float | None, workers: int, split: str,
              exclude=frozenset(), progress: bool = False,
              climb_steps: int | None = None) -> tuple[PuzzleSet, list[bytes]]:
    if size not in SIZES:
        raise HierarchosError(f"puzzle size {size} is not supported; use 9 (9x9) or 4 (4x4)")
    if count < 1:
        raise HierarchosError(f"puzzle count must be at least 1, got {count}")
    if workers < 1:
        raise HierarchosError(f"workers must be at least 1, got {workers}")
    if split not in ("train", "test"):
        raise HierarchosError(f"split is 'train' or 'test', got {split!r}")
    floor = default_min_difficulty(size) if min_difficulty is None else float(min_difficulty)
    if not floor >= 0:
        raise HierarchosError(f"min difficulty must be 0 or more, got {min_difficulty}")
    steps = default_climb_steps(size) if climb_steps is None else int(climb_steps)
    if steps < 0:
        raise HierarchosError(f"climb steps must be 0 or more, got {climb_steps}")
    seen = set(exclude)
    kept: list[tuple] = []
    next_slot, duplicates, attempts = 0, 0, 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=count, desc=f"{split} {size}x{size}", unit="puzzle", dynamic_ncols=True)
    pool = None
    if workers > 1:
        # spawn: the parent may hold torch threads, which fork would copy in an unsafe state.
        # Workers ignore Ctrl-C: the parent gets it and terminates them (below), and the CLI prints
        # one line instead of a traceback per process.
        pool = multiprocessing.get_context("spawn").Pool(workers, initializer=signal.signal,
                                                         initargs=(signal.SIGINT, signal.SIG_IGN))
    try:
        while len(kept) < count:
            want = count - len(kept)
            # 4x4 has few distinct puzzles: ask for extra slots so duplicates do not mean many rounds
            batch = want if size == 9 else max(64, 2 * want)
            jobs = [(size, int(seed), split, slot, floor, steps) for slot in range(next_slot, next_slot + batch)]
            next_slot += batch
            for result in _run_slots(jobs, workers, pool):
                if result is None:
                    raise HierarchosError(
                        f"no {size}x{size} puzzle reached difficulty {floor:g} in {MAX_ATTEMPTS} attempts; "
                        "lower --min-difficulty")
                clues, solution, effort, form, tries = result
                attempts += tries
                if len(kept) >= count:
                    continue
                if form in seen:
                    duplicates += 1
                    continue
                seen.add(form)
                kept.append(result)
                if bar is not None:
                    bar.update(1)
            if duplicates > 20 * count + 1000:
                raise HierarchosError(
                    f"only {len(kept)} distinct {size}x{size} puzzles found after {next_slot} tries "
                    f"(the rest repeat a puzzle up to symmetry); ask for fewer puzzles or use --size 9")
    finally:
        if pool is not None:
            pool.terminate()  # every slot asked for has been read, or we are stopping early
            pool.join()
        if bar is not None:
            bar.close()
    inputs = np.frombuffer(b"".join(k[0] for k in kept), dtype=np.uint8).reshape(count, size * size).copy()
    solutions = np.frombuffer(b"".join(k[1] for k in kept), dtype=np.uint8).reshape(count, size * size).copy()
    difficulty = np.array([k[2] for k in kept], dtype=np.float32)
    ids = np.arange(1, count + 1, dtype=np.int32) if split == "train" else np.zeros(count, dtype=np.int32)
    meta = {"task": "sudoku", "size": size, "split": split, "seed": int(seed), "format_version": FORMAT_VERSION,
            "min_difficulty": floor, "generator": GENERATOR,
            "difficulty_unit": f"mean guesses over {ORBIT_SAMPLES} symmetric copies",
            "climb_steps": steps, "slots": next_slot, "attempts": attempts, "duplicates_skipped": duplicates}
    return PuzzleSet(inputs, solutions, ids, difficulty, meta), [k[3] for k in kept]


def make_splits(train: int, test: int, *, size: int = 9, seed: int, min_difficulty: float | None = None,
                workers: int = 1, progress: bool = False,
                climb_steps: int | None = None) -> tuple[PuzzleSet, PuzzleSet]:
    """A training and a test set with no puzzle in common, up to symmetry (canonical forms).

    The test set is drawn first from its own stream, so it is the same for a seed whatever
    the size of the training set; training puzzles equivalent to a test puzzle are skipped."""
    test_set, test_forms = _generate(test, size=size, seed=seed, min_difficulty=min_difficulty, workers=workers,
                                     split="test", progress=progress, climb_steps=climb_steps)
    train_set, _ = _generate(train, size=size, seed=seed, min_difficulty=min_difficulty, workers=workers,
                             split="train", exclude=frozenset(test_forms), progress=progress, climb_steps=climb_steps)
    return train_set, test_set
