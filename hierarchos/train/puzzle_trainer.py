"""Puzzle training and evaluation: seed 003's deep supervision with Q-learning ACT over segments.

A training *step* takes one batch of puzzles (Sudoku or mazes; augmented on the fly: a random
symmetry of the task per puzzle, `hierarchos.puzzles.dataset.augmenter`) and runs its segments
(hierarchos.model.puzzle): every segment is one forward, one loss and **one optimizer update** (as
HRM does; not summed), then the carried state is detached and the next segment starts from it. A
puzzle stops thinking once its Q head says halt (halt > continue logit, after a random minimum of
2..M segments for `halt_explore_prob` of the puzzles) or at M segments; the step ends when every
puzzle of the batch has stopped. Halted puzzles still ride along in the batch (the recurrent state
has no uniform batch axis to compact) but have no loss.

Loss of a segment, over the puzzles still thinking:
  cell loss (cross-entropy on every cell: the givens too, as HRM does, and a maze's walls, start
  and goal; copying them is learned in the first few hundred steps and then costs nothing, and
  an exact solution needs them right)
  + q_weight * (BCE(halt logit, puzzle solved exactly now)
                + BCE(continue logit, sigmoid(max(halt', continue')) of the next segment, or
                  sigmoid(halt') when the next segment is the last)),
where the next segment's logits come from one extra forward without gradient (HRM's bootstrapped
target). Per-puzzle embedding rows move by SparseSignSGD; everything else by the project's
AdamW (+ LazyRowAdam for DeepEmbed tables), warm-up + cosine over the training steps, clipped
(the sign step needs no clipping). Evaluation runs each puzzle until its Q head halts or M; for
mazes it also checks that the cells the model marked as path are the maze's shortest path.

`train_batch` runs the fast form of a step (hierarchos.train.puzzle_segments: one host read per
segment and one per step, each segment a CUDA graph replay on CUDA); `train_batch_reference` is
the plain loop it is tested against, one flag away (`fast_step=False`, `--no-fast-step`).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import HierarchosError
from ..model.losses import LossWeights
from ..model.puzzle import cell_predictions
from .schedule import OptimizerSet, build_optimizer, lr_at
from .sign_sgd import SparseSignSGD


@dataclass
class PuzzleTrainConfig:
    epochs: int = 10
    batch_size: int = 64
    starting_lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int | None = None     # default: 5% of the steps
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    puzzle_emb_lr: float = 1e-3
    puzzle_emb_decay: float = 0.1
    q_weight: float = 0.5
    augment: bool = True
    max_steps: int | None = None        # stop after this many steps (batches); the schedule spans them
    log_every: int = 10
    save_every: int = 0                 # steps between checkpoints (0: at each epoch's end)
    keep_checkpoints: int = 3
    eval_every: int = 0                 # steps between evaluations on the validation set (0: epoch ends)
    eval_limit: int | None = None       # puzzles of the validation set used while training
    amp: bool | None = None             # None: bf16 autocast on CUDA
    seed: int = 0
    fast_step: bool = True              # no host reads inside a segment (False: the reference loop)
    cuda_graphs: bool | None = None     # replay each segment as a CUDA graph (None: on CUDA with fast_step)
    loss: LossWeights = field(default_factory=LossWeights)


def build_puzzle_optimizer(model, lr: float, weight_decay: float, emb_lr: float, emb_decay: float) -> OptimizerSet:
    """The project's optimizer for every dense weight and DeepEmbed table, plus SparseSignSGD for the
    per-puzzle table (AdamW cannot take its sparse gradient, and seed 003 steps it by sign)."""
    table = model.puzzle_embedding.table.weight if getattr(model, "puzzle_embedding", None) is not None else None
    dense_only = SimpleNamespace(named_parameters=lambda: ((name, p) for name, p in model.named_parameters()
                                                           if p is not table))
    dense = build_optimizer(dense_only, lr, weight_decay)
    if table is None:
        return dense
    return OptimizerSet(*dense.optimizers, SparseSignSGD([table], lr=emb_lr, weight_decay=emb_decay))


def q_losses(out, solved: torch.Tensor, active: torch.Tensor, following=None, next_is_last: bool = False):
    """Seed 003's Q-learning ACT loss of one segment, means over the active puzzles:
    halt: BCE(halt logit, solved exactly now); continue: BCE(continue logit, sigmoid of the next
    segment's best Q, max(halt', continue'), or of halt' alone when the next segment is the last
    (it cannot continue)); 0 without a next segment. `following` carries no gradient."""
    n_active = active.sum().clamp(min=1)
    halt = (F.binary_cross_entropy_with_logits(out.q_halt.float(), solved.float(), reduction="none")
            * active).sum() / n_active
    if following is None:
        return halt, torch.zeros_like(halt)
    best_next = following.q_halt if next_is_last else torch.maximum(following.q_halt, following.q_continue)
    target = torch.sigmoid(best_next.float()).detach()
    cont = (F.binary_cross_entropy_with_logits(out.q_continue.float(), target, reduction="none")
            * active).sum() / n_active
    return halt, cont


def rank_correlation(x, y) -> float | None:
    """Spearman's rank correlation (ties get their mean rank); None when either side is constant."""
    def ranks(values):
        values = np.asarray(values, dtype=np.float64)
        order = np.argsort(values, kind="stable")
        ranked = np.empty(len(values))
        ranked[order] = np.arange(len(values), dtype=np.float64)
        for value in np.unique(values):  # ties: the mean of their ranks
            tied = values == value
            ranked[tied] = ranked[tied].mean()
        return ranked

    if len(x) < 2:
        return None
    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def _autocast(device: torch.device, amp: bool | None):
    use = amp if amp is not None else device.type == "cuda"
    if use and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def check_fit(puzzle_cfg, puzzles, where: str, fix: str) -> None:
    """One HierarchosError line unless `puzzles` (a PuzzleSet) is what a model with `puzzle_cfg` solves:
    the same task, grid size and cell tokens."""
    if puzzles.task != puzzle_cfg.task:
        raise HierarchosError(f"{where}: holds {puzzles.task} puzzles but the model solves {puzzle_cfg.task}; {fix}")
    size = puzzle_cfg.size
    if puzzles.size != size:
        raise HierarchosError(f"{where}: holds {puzzles.size}x{puzzles.size} {puzzles.task} puzzles but the model "
                              f"solves {size}x{size}; {fix}")
    if puzzles.num_tokens != puzzle_cfg.num_tokens:
        raise HierarchosError(f"{where}: its cells have {puzzles.num_tokens} tokens but the model reads "
                              f"{puzzle_cfg.num_tokens}; {fix}")


def _batch_tensors(puzzles, rows: np.ndarray, device, rng: np.random.Generator | None):
    inputs, solutions = puzzles.inputs[rows], puzzles.solutions[rows]
    if rng is not None:
        from ..puzzles.dataset import augmenter  # numpy only; imported on first use

        inputs, solutions = augmenter(puzzles.task)(inputs, solutions, rng)
    as_tensor = lambda a, dtype: torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype)  # noqa: E731
    return (as_tensor(inputs, torch.long), as_tensor(solutions, torch.long),
            as_tensor(puzzles.puzzle_ids[rows], torch.long))


def _cell_loss(model, out, solutions, active, weights):
    if hasattr(model, "cell_loss"):
        return model.cell_loss(out, solutions, active, weights)
    from ..model.puzzle import plain_cell_loss

    return plain_cell_loss(out, solutions, active, model.puzzle_cfg.answer_offset)


def valid_paths(inputs: np.ndarray, answers: np.ndarray) -> np.ndarray:
    """(N,) bool: the cells each answer marks as PATH are exactly the unique shortest start-to-goal
    path of its maze (the maze checker's rule; what the model wrote elsewhere does not count), so a
    right path with a miscopied wall is valid but not exact. inputs, answers: (N, n*n) tokens."""
    from ..puzzles.maze import PATH, check

    ok = np.zeros(len(inputs), dtype=bool)
    for row in range(len(inputs)):
        puzzle = inputs[row:row + 1].astype(np.uint8)
        marked = np.where(answers[row:row + 1] == PATH, PATH, puzzle).astype(np.uint8)
        try:
            check(puzzle, marked, "prediction", "")
        except HierarchosError:  # the checker's verdict on one maze; its message is not needed here
            continue
        ok[row] = True
    return ok


@torch.no_grad()
def evaluate_puzzles(model, puzzles, device, *, batch_size: int = 256, limit: int | None = None,
                     all_segments: bool = False, amp: bool | None = None, progress=None) -> dict:
    """Run each puzzle until its Q head halts (or max_segments) and score the answer it halted with.

    Returns exact (share of puzzles with every cell right), cells (share of the cells the puzzle leaves
    open right: token 0, Sudoku's blanks and a maze's open cells; a maze's walls, start and goal are
    copied, and scoring only its path cells would reward marking every open cell as path),
    mean_segments, segments_histogram, spearman_segments_difficulty (None when constant), and with
    `all_segments` (every puzzle runs all M segments; the halting answer is still the one scored)
    exact_by_segment[k-1]: exact accuracy had every puzzle stopped after k segments. Also returns
    the per-puzzle arrays `segments` and `solved` (lists) for plots and benchmarks. For mazes also
    path_cells (share of the cells the solution changes, the path, marked right) and valid_path
    (share of mazes whose marked cells are their unique shortest path, `valid_paths`)."""
    puzzle_cfg = model.puzzle_cfg
    check_fit(puzzle_cfg, puzzles, "evaluate_puzzles", "score puzzles of the model's task and size")
    maze = puzzle_cfg.task == "maze"
    n_total = len(puzzles.inputs) if limit is None else min(limit, len(puzzles.inputs))
    max_segments = model.puzzle_cfg.max_segments
    was_training = model.training
    model.eval()
    segments = np.zeros(n_total, dtype=np.int64)
    solved = np.zeros(n_total, dtype=bool)
    valid = np.zeros(n_total, dtype=bool)
    blank_right = blank_total = changed_right = changed_total = 0
    by_segment = np.zeros(max_segments, dtype=np.int64)
    dtype = next(model.parameters()).dtype
    try:
        for start in range(0, n_total, batch_size):
            rows = np.arange(start, min(n_total, start + batch_size))
            inputs, solutions, ids = _batch_tensors(puzzles, rows, device, None)
            B = inputs.shape[0]
            state = model.init_state(B, device=device, dtype=dtype)
            halted = torch.zeros(B, dtype=torch.bool, device=device)
            answer = torch.zeros_like(solutions)
            used = torch.zeros(B, dtype=torch.long, device=device)
            for k in range(1, max_segments + 1):
                with _autocast(device, amp):
                    out = model(inputs, ids, state)
                state = out.state
                pred = cell_predictions(out.logits, puzzle_cfg.answer_offset)
                if all_segments:
                    by_segment[k - 1] += int((pred == solutions).all(-1).sum())
                stop = ~halted & ((out.q_halt > out.q_continue) | (k == max_segments))
                answer = torch.where(stop[:, None], pred, answer)
                used = torch.where(stop, torch.full_like(used, k), used)
                halted = halted | stop
                if bool(halted.all()) and not all_segments:
                    break
            right = answer == solutions
            blanks = inputs == 0  # the cells to decide: Sudoku's blank and a maze's open cell are both token 0
            solved[rows] = right.all(-1).cpu().numpy()
            segments[rows] = used.cpu().numpy()
            blank_right += int((right & blanks).sum())
            blank_total += int(blanks.sum())
            if maze:
                changed = solutions != inputs
                changed_right += int((right & changed).sum())
                changed_total += int(changed.sum())
                valid[rows] = valid_paths(inputs.cpu().numpy(), answer.cpu().numpy())
            if progress is not None:
                progress(B)
    finally:
        model.train(was_training)
    difficulty = puzzles.difficulty[:n_total]
    result = {
        "task": puzzle_cfg.task,
        "puzzles": int(n_total),
        "exact": float(solved.mean()) if n_total else 0.0,
        "cells": blank_right / blank_total if blank_total else 1.0,
        "mean_segments": float(segments.mean()) if n_total else 0.0,
        "max_segments": max_segments,
        "segments_histogram": {str(k): int((segments == k).sum()) for k in range(1, max_segments + 1)},
        "spearman_segments_difficulty": rank_correlation(segments, difficulty),
        "mean_difficulty": float(np.mean(difficulty)) if n_total else 0.0,
        "segments": segments.tolist(),
        "solved": solved.tolist(),
    }
    if maze:
        result["path_cells"] = changed_right / changed_total if changed_total else 1.0
        result["valid_path"] = float(valid.mean()) if n_total else 0.0
    if all_segments:
        result["exact_by_segment"] = (by_segment / max(1, n_total)).tolist()
    return result


class PuzzleTrainer:
    """Steps over batches of `train_set` (a PuzzleSet) in a seeded order per epoch; every random draw
    of the data (order, augmentation) is a function of (seed, epoch, batch), and the model's own draws
    (exploration) come from torch's RNG, which checkpoints save: a resumed run continues exactly."""

    def __init__(self, model, train_set, cfg: PuzzleTrainConfig, device: torch.device, val_set=None, log=print):
        self.model, self.train_set, self.cfg, self.device, self.val_set, self.log = (
            model, train_set, cfg, device, val_set, log)
        if len(train_set.inputs) < 1:
            raise HierarchosError("puzzle training set holds no puzzles")
        for name, puzzles in (("training set", train_set), ("validation set", val_set)):
            if puzzles is not None:
                check_fit(model.puzzle_cfg, puzzles, f"puzzle {name}", "train on puzzles of the model's task and size")
        self.batches_per_epoch = -(-len(train_set.inputs) // cfg.batch_size)
        full = cfg.epochs * self.batches_per_epoch
        self.total_steps = min(full, cfg.max_steps) if cfg.max_steps else full
        self.warmup_steps = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, self.total_steps // 20)
        self.optimizer = build_puzzle_optimizer(model, cfg.starting_lr, cfg.weight_decay, cfg.puzzle_emb_lr,
                                                cfg.puzzle_emb_decay)
        table = model.puzzle_embedding.table.weight if getattr(model, "puzzle_embedding", None) is not None else None
        self.dense_params = [p for p in model.parameters() if p is not table]  # clipped (the sign step needs none)
        self.step = 0                 # training steps (batches) done
        self.updates = 0              # optimizer updates done (one per segment)
        self.best_exact = -1.0
        self.last_metrics: dict = {}
        self.segments = None          # hierarchos.train.puzzle_segments.SegmentRunner, built on first use
        self.graph_recorder = None    # None: record_cuda_graph; tests put record_eagerly here

    # ---- one batch ---------------------------------------------------------------------
    def _set_lr(self) -> float:
        lr = lr_at(self.step, self.total_steps, self.cfg.starting_lr, self.cfg.min_lr, self.warmup_steps)
        scale = lr / self.cfg.starting_lr  # the per-puzzle rate follows the same warm-up and decay
        for opt in self.optimizer.optimizers:
            for group in opt.param_groups:
                group["lr"] = self.cfg.puzzle_emb_lr * scale if isinstance(opt, SparseSignSGD) else lr
        return lr

    def _min_segments(self, B: int) -> torch.Tensor:
        """Seed 003's exploration: with probability halt_explore_prob a puzzle may not halt before a
        random number of segments in [2, M]; otherwise after 1."""
        M, prob = self.model.puzzle_cfg.max_segments, self.model.puzzle_cfg.halt_explore_prob
        if M < 2 or prob <= 0:
            return torch.ones(B, dtype=torch.long, device=self.device)
        explore = torch.rand(B, device=self.device) < prob
        draw = torch.randint(2, M + 1, (B,), device=self.device)
        return torch.where(explore, draw, torch.ones_like(draw))

    def train_batch(self, inputs, solutions, ids) -> dict:
        """Deep supervision over the segments of one batch; returns the step's metrics. The fast
        form (hierarchos.train.puzzle_segments): one host read per segment, one per step, and
        with `cuda_graphs` each segment replayed as a CUDA graph; `fast_step=False` runs
        `train_batch_reference`, which computes the same."""
        if not self.cfg.fast_step:
            return self.train_batch_reference(inputs, solutions, ids)
        runner = self.segment_runner()
        record, segments, skipped = runner.train_batch(inputs, solutions, ids, self._min_segments(inputs.shape[0]))
        for k in skipped:
            self.log(f"warning: non-finite loss at step {self.step} segment {k}: update skipped")
        self.updates += segments - len(skipped)
        return record

    def segment_runner(self):
        if self.segments is None:
            from .puzzle_segments import SegmentRunner

            capture = self.cfg.cuda_graphs if self.cfg.cuda_graphs is not None else self.device.type == "cuda"
            self.segments = SegmentRunner(self.model, self.cfg, self.device, self.optimizer, capture=capture,
                                          autocast=lambda: _autocast(self.device, self.cfg.amp),
                                          cell_loss=_cell_loss, q_losses=q_losses, recorder=self.graph_recorder,
                                          log=lambda line: self.log(line))
        return self.segments

    def train_batch_reference(self, inputs, solutions, ids) -> dict:
        """The plain loop, kept as the reference of `train_batch`: it reads the host about ten times a
        segment (the metrics as floats, the finiteness test, the halting test, the optimizers' row lists)."""
        model, cfg = self.model, self.cfg
        M = model.puzzle_cfg.max_segments
        B = inputs.shape[0]
        dtype = next(model.parameters()).dtype
        state = model.init_state(B, device=self.device, dtype=dtype)
        halted = torch.zeros(B, dtype=torch.bool, device=self.device)
        min_segments = self._min_segments(B)
        used = torch.zeros(B, dtype=torch.long, device=self.device)
        solved_at_halt = torch.zeros(B, dtype=torch.bool, device=self.device)
        sums = {"loss": 0.0, "cell_loss": 0.0, "q_halt": 0.0, "q_continue": 0.0, "cell_acc": 0.0}
        k = 0
        for k in range(1, M + 1):
            active = ~halted
            with _autocast(self.device, cfg.amp):
                out = model(inputs, ids, state)
                cell_loss, _ = _cell_loss(model, out, solutions, active, cfg.loss)
            pred = cell_predictions(out.logits.detach(), model.puzzle_cfg.answer_offset)
            right = pred == solutions
            solved = right.all(-1)
            n_active = active.sum().clamp(min=1)
            following = None
            if k < M:  # the next segment's Q values, no gradient: the continue logit's target (seed 003)
                with torch.no_grad(), _autocast(self.device, cfg.amp):
                    following = model(inputs, ids, out.state.detach())
            q_halt, q_continue = q_losses(out, solved, active, following, next_is_last=k + 1 == M)
            loss = cell_loss + cfg.q_weight * (q_halt + q_continue)
            if not torch.isfinite(loss):
                self.log(f"warning: non-finite loss at step {self.step} segment {k}: update skipped")
            else:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.dense_params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
                self.optimizer.step()
                self.updates += 1
            self.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                sums["loss"] += float(loss)
                sums["cell_loss"] += float(cell_loss)
                sums["q_halt"] += float(q_halt)
                sums["q_continue"] += float(q_continue)
                sums["cell_acc"] += float((right.float().mean(-1) * active).sum() / n_active)
                stop = active & (((out.q_halt > out.q_continue) & (k >= min_segments)) | (k == M))
                used = torch.where(stop, torch.full_like(used, k), used)
                solved_at_halt = torch.where(stop, solved, solved_at_halt)
                halted = halted | stop
            state = out.state.detach()
            if bool(halted.all()):
                break
        record = {name: value / k for name, value in sums.items()}
        record.update(segments=float(used.float().mean()), exact=float(solved_at_halt.float().mean()), puzzles=B)
        return record

    # ---- the loop ------------------------------------------------------------------------
    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(inputs, solutions, puzzle ids, epoch) of training step `step`, augmented when configured."""
        rows, epoch = self.batch_rows(step)
        rng = np.random.default_rng([self.cfg.seed, epoch, step, 1]) if self.cfg.augment else None
        return (*_batch_tensors(self.train_set, rows, self.device, rng), epoch)

    def batch_rows(self, step: int) -> tuple[np.ndarray, int]:
        """(rows of the training set, epoch) of training step `step`: a seeded permutation per epoch."""
        epoch, index = divmod(step, self.batches_per_epoch)
        order = np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.train_set.inputs))
        return order[index * self.cfg.batch_size:(index + 1) * self.cfg.batch_size], epoch

    def run(self, on_checkpoint=None, progress=None, stop_requested=lambda: False) -> dict:
        """Train until total_steps; `on_checkpoint(trainer, is_best, reason)` saves ('step', 'epoch',
        'interrupt'), `progress(record_or_None)` after each step, `stop_requested()` checked per step."""
        cfg = self.cfg
        self.model.train()
        window, started = [], time.perf_counter()
        while self.step < self.total_steps:
            inputs, solutions, ids, epoch = self.batch(self.step)
            lr = self._set_lr()
            record = self.train_batch(inputs, solutions, ids)
            self.step += 1
            window.append(record)
            end_of_epoch = self.step % self.batches_per_epoch == 0
            last = self.step == self.total_steps
            evals = {}
            due_eval = (cfg.eval_every and self.step % cfg.eval_every == 0) or (not cfg.eval_every and end_of_epoch)
            if self.val_set is not None and (due_eval or last):
                result = evaluate_puzzles(self.model, self.val_set, self.device, limit=cfg.eval_limit,
                                          batch_size=max(cfg.batch_size, 64), amp=cfg.amp)
                evals = {f"val_{key}": result[key] for key in ("exact", "cells", "mean_segments",
                                                                "spearman_segments_difficulty", "valid_path")
                         if key in result}
            logged = None
            if self.step % cfg.log_every == 0 or end_of_epoch or last or evals:
                elapsed = time.perf_counter() - started
                logged = {"step": self.step, "epoch": epoch + 1, "updates": self.updates, "lr": lr,
                          **{key: sum(r[key] for r in window) / len(window) for key in window[0] if key != "puzzles"},
                          "puzzles_per_s": sum(r["puzzles"] for r in window) / max(elapsed, 1e-9), **evals}
                self.log_metrics(logged)
                window, started = [], time.perf_counter()
            if progress is not None:
                progress(logged)
            save_now = end_of_epoch or last or (cfg.save_every and self.step % cfg.save_every == 0)
            stopping = stop_requested()
            if save_now and on_checkpoint is not None:
                exact = evals.get("val_exact")
                is_best = exact is not None and exact > self.best_exact
                if is_best:
                    self.best_exact = exact
                on_checkpoint(self, is_best, "epoch" if end_of_epoch else "step")
            if stopping:
                if on_checkpoint is not None and not save_now:
                    on_checkpoint(self, False, "interrupt")
                return {"stopped": True, "step": self.step}
        return {"stopped": False, "step": self.step}

    def log_metrics(self, record: dict) -> None:
        """Replaced by the CLI (metrics.jsonl, the progress bar)."""
        self.last_metrics = record

    # ---- resume ---------------------------------------------------------------------------
    def trainer_state(self) -> dict:
        return {"step": self.step, "updates": self.updates, "best_exact": self.best_exact,
                "batches_per_epoch": self.batches_per_epoch, "total_steps": self.total_steps,
                "train_config": json.loads(json.dumps(asdict(self.cfg), default=str))}

    def load_trainer_state(self, state: dict, where: str) -> None:
        saved = state.get("train_config") or {}
        for name in ("batch_size", "seed"):  # what a position in the data means
            if name in saved and saved[name] != getattr(self.cfg, name):
                raise HierarchosError(f"{where}: the checkpoint's run used --{name.replace('_', '-')} "
                                      f"{saved[name]}, this one {getattr(self.cfg, name)}; resume with the same value")
        if state.get("batches_per_epoch") not in (None, self.batches_per_epoch):
            raise HierarchosError(f"{where}: the checkpoint's run had {state['batches_per_epoch']} batches per "
                                  f"epoch, this one {self.batches_per_epoch}; resume with the same --data")
        self.step, self.updates = int(state["step"]), int(state.get("updates", 0))
        self.best_exact = float(state.get("best_exact", -1.0))
        if not math.isfinite(self.best_exact):
            self.best_exact = -1.0


# ---- files -------------------------------------------------------------------------------------

def load_puzzle_model(path, device="cpu"):
    """A puzzle model directory (`puzzle train --out-dir`, or a checkpoint step dir) -> PuzzleSolver."""
    from pathlib import Path

    from ..io import CONFIG_FILE, WEIGHTS_FILE, load_weights, read_config, recover_interrupted
    from ..model.puzzle import PuzzleConfig, PuzzleSolver

    directory = Path(path)
    recover_interrupted(directory)
    if not directory.is_dir():
        raise HierarchosError(f"{directory}: puzzle model directory not found; pass the --out-dir of "
                              "`hierarchos puzzle train`")
    if not (directory / CONFIG_FILE).is_file():
        raise HierarchosError(f"{directory}: no {CONFIG_FILE} here, not a model directory; pass the --out-dir of "
                              "`hierarchos puzzle train` (or one of its checkpoints/step-* directories)")
    cfg, meta = read_config(directory)
    puzzle = PuzzleConfig.from_dict(meta.get("puzzle"), str(directory / CONFIG_FILE))
    model = PuzzleSolver(cfg, puzzle)
    load_weights(model, directory / WEIGHTS_FILE)
    return model.to(device), meta
