"""The puzzle model: HierarchosLM reading a Sudoku or maze grid in segments, seed 003's deep supervision + ACT.

Our blocks are causal (RWKV recurrence, causal attention): in one pass the prediction for cell i
cannot see cells after i, yet its answer depends on the whole grid. So the model reads the puzzle
in *segments*, as HRM does:

* a segment is the sequence [PUZZLE] + the n*n cells (row-major cell tokens; Sudoku 0 = blank,
  1..n = given; maze 0 open, 1 wall, 2 start, 3 goal, the data file's token table); the
  PUZZLE token's input embedding gets the per-puzzle vector added (seed 003's per-puzzle
  embedding "injected at the start of the sequence"; id 0 = none, the zero vector), and every
  position a learned position vector (which row, column and box a cell is in);
* segment 1 starts from a fresh recurrent state; segment k > 1 reads the same sequence again
  starting from the state segment k-1 ended with (RWKV states, attention KV caches, memory,
  plans: the whole `HierarchosState`), so from segment 2 on every cell's prediction depends on
  the whole grid (tests/test_puzzle_train.py holds this);
* every segment predicts all n*n cells: the output at a cell's position is that cell's answer
  (Sudoku: its digit 1..n; maze: its solution token, PATH on the shortest path, the input elsewhere);
* after each segment a Q head on the carried state (the last position's output of the last
  round, the one place that has read the whole segment) gives halt and continue logits for the
  puzzle; the puzzle stops when halt > continue, or at `max_segments` (seed 003's Q-learning ACT;
  its training lives in hierarchos.train.puzzle_trainer).

Vocabulary (no tokenizer): the task's cell tokens, then the PUZZLE token. Sudoku: 0 blank, 1..n digits,
n+1 PUZZLE (n+2 ids; answers are 1..n). Maze: the data file's `num_tokens` cell tokens (5: open, wall,
start, goal, path), then PUZZLE (answers are every cell token). The model layer does not import
hierarchos.puzzles: the CLI copies the task and token count of the data file into PuzzleConfig. ROSA is off: its
automata are host objects extended in place, and the target of the Q continue loss needs a
side-effect-free extra forward. The language-model path is untouched: nothing here changes
HierarchosLM, the position and per-puzzle vectors reach it through a forward hook on its input
embedding that adds nothing outside a segment.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TIME_MIX_WIRINGS, ModelConfig
from ..errors import HierarchosError
from .lm import HierarchosLM, ModelOutput
from .losses import LossWeights, lm_loss
from .puzzle_embedding import PuzzleEmbedding
from .state import HierarchosState

IGNORE = -100  # targets of positions without a loss (the PUZZLE position, halted puzzles)


TASKS = ("sudoku", "maze")
SUDOKU_SIZES = (4, 9)
MIN_MAZE_SIZE = 4  # the smallest grid with a start, a goal and a path cell between them around a wall


def vocab_size(size: int) -> int:
    """Sudoku's vocabulary: blank + n digits + the PUZZLE token (`PuzzleConfig.vocab_size` for any task)."""
    return size + 2


@dataclass
class PuzzleConfig:
    """What the puzzle wrapper adds to a ModelConfig; saved as the `puzzle` key of hierarchos_config.json."""

    size: int = 9                   # n: grids are n x n
    num_puzzle_ids: int = 0         # P: learned rows of the per-puzzle table (0: no table)
    max_segments: int = 8           # M: most segments a puzzle may think for
    halt_explore_prob: float = 0.1  # training: a puzzle's minimum segments is random in [2, M] this often
    task: str = "sudoku"            # "sudoku" | "maze": what the cells and answers mean
    num_tokens: int | None = None   # distinct cell tokens (the data file's); None: Sudoku's n+1 (configs
    #                                 saved before mazes have no such field)

    def __post_init__(self):
        if self.num_tokens is None and self.task == "sudoku" and isinstance(self.size, int):
            self.num_tokens = self.size + 1

    @property
    def cells(self) -> int:
        return self.size * self.size

    @property
    def seq_len(self) -> int:
        return self.cells + 1

    @property
    def answer_offset(self) -> int:
        """The first token an answer can be: Sudoku's blank (0) is never an answer, a maze's open cell is."""
        return 1 if self.task == "sudoku" else 0

    @property
    def num_answers(self) -> int:
        """Classes a cell's output chooses among: Sudoku's n digits, every maze token."""
        return self.num_tokens - self.answer_offset

    @property
    def puzzle_token(self) -> int:
        return self.num_tokens

    @property
    def vocab_size(self) -> int:
        return self.num_tokens + 1

    def validate(self) -> "PuzzleConfig":
        def bad(name: str, why: str) -> None:
            raise HierarchosError(f"puzzle config field '{name}' = {getattr(self, name)!r}: {why}")

        if self.task not in TASKS:
            bad("task", f"must be one of {', '.join(TASKS)}")
        for name in ("size", "num_puzzle_ids", "max_segments"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "num_puzzle_ids" else 1):
                bad(name, "must be an integer >= 0" if name == "num_puzzle_ids" else "must be an integer >= 1")
        if self.task == "sudoku":
            if self.size not in SUDOKU_SIZES:
                bad("size", "a Sudoku model's grid must be 4 or 9")
            if self.num_tokens != self.size + 1:
                bad("num_tokens", f"a {self.size}x{self.size} Sudoku has {self.size + 1} cell tokens (blank + digits)")
        else:
            if self.size < MIN_MAZE_SIZE:
                bad("size", f"a maze model's grid must be {MIN_MAZE_SIZE} or more cells a side")
            tokens = self.num_tokens
            if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 2:
                bad("num_tokens", "a maze model needs its data file's cell token count (an integer >= 2)")
        prob = self.halt_explore_prob
        if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0.0 <= prob <= 1.0:
            bad("halt_explore_prob", "must be in [0, 1]")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data, where: str) -> "PuzzleConfig":
        if not isinstance(data, dict):
            raise HierarchosError(f"{where}: no puzzle settings (not a puzzle model); train one with "
                                  "`hierarchos puzzle train`")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise HierarchosError(f"{where}: unknown puzzle config fields {', '.join(unknown)}; "
                                  "re-train with this hierarchos")
        return cls(**data).validate()


def puzzle_model_config(puzzle: PuzzleConfig, base: ModelConfig) -> ModelConfig:
    """The LM config of a puzzle model: `base`'s architecture with the puzzle vocabulary, no ROSA,
    and room for every segment's positions (learned attention positions index them)."""
    return base.replace(vocab_size=puzzle.vocab_size, use_rosa=False,
                        max_length=max(base.max_length, puzzle.seq_len * puzzle.max_segments))


@dataclass
class PuzzleOutput:
    logits: torch.Tensor       # (B, n*n, A): answer logits of every cell (index a = token a + answer_offset;
    #                            Sudoku: index d-1 = digit d; maze: index t = token t)
    q_halt: torch.Tensor       # (B,) halt logit of this segment
    q_continue: torch.Tensor   # (B,) continue logit
    state: object              # what the next segment starts from (not detached)
    lm_out: ModelOutput | None = None  # the LM's own output (its auxiliary terms), None for baselines


class PuzzleSolver(nn.Module):
    """HierarchosLM + per-puzzle embeddings + the segment Q head. `forward` runs one segment."""

    def __init__(self, lm_cfg: ModelConfig, puzzle: PuzzleConfig):
        super().__init__()
        self.puzzle_cfg = puzzle.validate()
        if lm_cfg.vocab_size != puzzle.vocab_size or lm_cfg.use_rosa:
            raise HierarchosError(f"puzzle model: the config has vocab_size {lm_cfg.vocab_size} and use_rosa "
                                  f"{lm_cfg.use_rosa}; a {puzzle.size}x{puzzle.size} {puzzle.task} model needs "
                                  f"{puzzle.vocab_size} and false (build it with puzzle_model_config)")
        self.lm = HierarchosLM(lm_cfg)
        d = lm_cfg.context_dim
        self.puzzle_embedding = PuzzleEmbedding(puzzle.num_puzzle_ids, d) if puzzle.num_puzzle_ids else None
        # seed 003's Q head: zero weights and bias -5, so halt == continue and no puzzle stops
        # before max_segments until the head has learned
        self.q_head = nn.Linear(d, 2)
        with torch.no_grad():
            self.q_head.weight.zero_()
            self.q_head.bias.fill_(-5.0)
        # a learned vector per position of the segment ([PUZZLE], cell 0, ..., cell n*n-1): the LM has
        # no positions (its recurrence orders tokens), but which row, column and box a cell lies in is
        # what the rules are about; counting 81 tokens through a recurrence is learnable yet slow
        self.cell_position = nn.Parameter(torch.randn(puzzle.seq_len, d) * 0.02)
        self.puzzle_token = puzzle.puzzle_token
        self._injected: torch.Tensor | None = None  # (B, T, d) added to the input embeddings while a segment runs
        self.lm.embed.register_forward_hook(self._inject)

    # io.save_checkpoint / save_model_files read these from the model they save
    @property
    def cfg(self) -> ModelConfig:
        return self.lm.cfg

    @property
    def memory(self):
        return self.lm.memory

    def _inject(self, module, args, output):
        """Add the segment's position vectors and per-puzzle vector (only while a segment runs)."""
        if self._injected is None:
            return None
        return output + self._injected.to(output.dtype)

    def init_state(self, batch_size: int, device=None, dtype=None) -> HierarchosState:
        return self.lm.init_state(batch_size, device=device, dtype=dtype)

    def tokens(self, inputs: torch.Tensor) -> torch.Tensor:
        """inputs (B, n*n) cells -> (B, 1 + n*n) ids: [PUZZLE] + cells."""
        lead = torch.full_like(inputs[:, :1], self.puzzle_token)
        return torch.cat([lead, inputs], dim=1).long()

    def forward(self, inputs: torch.Tensor, puzzle_ids: torch.Tensor, state: HierarchosState) -> PuzzleOutput:
        """One segment: inputs (B, n*n) cell tokens, puzzle_ids (B,), the state the previous segment
        ended with (or `init_state`). The caller detaches the state between segments."""
        n, cells = self.puzzle_cfg.size, self.puzzle_cfg.cells
        first, end = self.puzzle_cfg.answer_offset, self.puzzle_cfg.num_tokens  # answers: tokens first..end-1
        if inputs.shape[-1] != cells:
            raise HierarchosError(f"puzzle model for {n}x{n} grids got {inputs.shape[-1]} cells per puzzle")
        injected = self.cell_position.expand(inputs.shape[0], -1, -1)                  # (B, T, d)
        if self.puzzle_embedding is not None:  # the puzzle's vector at the start (the PUZZLE position)
            vector = self.puzzle_embedding(puzzle_ids)[:, None, :]                  # (B, 1, d)
            injected = torch.cat([injected[:, :1] + vector, injected[:, 1:]], dim=1)
        self._injected = injected
        try:
            out = self.lm(self.tokens(inputs), state)
        finally:
            self._injected = None
        carried = out.state.rounds[self.cfg.h_cycles - 1]["last_out"]            # (B, d): y at the last position
        q = self.q_head(self.lm.out_norm(carried)).float()
        return PuzzleOutput(logits=out.logits[:, 1:, first:end], q_halt=q[:, 0], q_continue=q[:, 1],
                            state=out.state, lm_out=out)

    def cell_loss(self, out: PuzzleOutput, solutions: torch.Tensor, active: torch.Tensor,
                  weights: LossWeights | None = None):
        """The LM's training objective (`lm_loss`: cross-entropy on every cell of the puzzles still
        thinking, z-loss, ponder, commitment, the manager's own Q terms) with the cells' solutions
        as targets; the PUZZLE position and halted puzzles have none. Returns (loss, parts)."""
        solutions = solutions.long()  # first: IGNORE in the data's uint8 would wrap to 156, a real target
        targets = torch.cat([torch.full_like(solutions[:, :1], IGNORE), solutions], dim=1)
        targets = torch.where(active[:, None], targets, torch.full_like(targets, IGNORE))
        return lm_loss(out.lm_out, targets, self.cfg.z_loss_weight, weights)


def cell_predictions(logits: torch.Tensor, answer_offset: int = 1) -> torch.Tensor:
    """(B, n*n, A) answer logits -> (B, n*n) cell tokens (Sudoku digits 1..n with the default offset)."""
    return logits.argmax(-1) + answer_offset


def plain_cell_loss(out: PuzzleOutput, solutions: torch.Tensor, active: torch.Tensor, answer_offset: int = 1):
    """Cross-entropy over the answers of every cell of the active puzzles (models without an LM loss)."""
    solutions = solutions.long()  # first: IGNORE in the data's uint8 would wrap to 156, a real target
    targets = torch.where(active[:, None], solutions - answer_offset, torch.full_like(solutions, IGNORE))
    ce = F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), targets.reshape(-1),
                         ignore_index=IGNORE)
    return ce, {"ce": ce.detach()}


def default_puzzle_base() -> ModelConfig:
    """The architecture `puzzle train` starts from (before the flags): a small model in the spirit of
    seed 003's Sudoku setup (a few blocks per level, two H-cycles), with a small memory. Its time mix
    keeps hierarchos' own wiring: the puzzle runs on record used it, and the benchmark that made x070's
    wiring the language model's default measured text, not puzzles."""
    return ModelConfig(vocab_size=vocab_size(9), context_dim=256, h_hidden=256, l_hidden=256, h_layers=2,
                       l_layers=2, head_size=64, h_cycles=2, max_h_steps=2, max_l_steps=2, h_stride=4,
                       persistent_dim=32, ltm_slots=64, ltm_key_dim=64, ltm_val_dim=64, ltm_topk=4,
                       ltm_chunk=16, use_rosa=False, **TIME_MIX_WIRINGS["hierarchos"]).validate()
