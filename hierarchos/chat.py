"""The chat REPL: one recurrent state across turns, slash commands, online learning into the LTM.

Each user turn is formatted with the model's prompt template, prefilled with one parallel
forward on the conversation's state, and answered token by token with `step` (no history is
re-run; the state's size never grows). After each exchange the memory values alone may take
one SGD step when the exchange's loss (surprise) exceeds a threshold; below it nothing changes.
What chat learned is saved as a separate delta file, never over `model.safetensors`.
"""

from __future__ import annotations

import hashlib
import json
import math
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, TextIO

import torch

from .data.sources import format_prompt
from .errors import HierarchosError
from .generate import SamplingConfig, draw_seed, generate, generate_batch
from .io import atomic_write_bytes
from .model.attention import blocks_summary
from .model.losses import lm_loss

DELTA_FILE = "ltm_delta.safetensors"
DELTA_FORMAT = "hierarchos-ltm-delta"
DELTA_VERSION = "1"
# the next header of the template ends a reply (the model starts a new turn on its own)
STOP_STRINGS = {"alpaca": ["### Instruction:"], "kayla": ["### Instruction:"]}
MODES = ("fast", "normal", "deep", "extreme")
HELP_TEXT = """commands:
  /help                          this list
  /mode fast|normal|deep|extreme reasoning caps (fast: 1 cycle, 1 pondering step, no worker passes)
  /temp X  /topk N  /topp X  /penalty X   sampling (temperature 0 = greedy)
  /status                        model, device, last reply's steps per token, speed and time to
                                 first token, memory use
  /memory [source=S] [since=T] [query text]  list memory slots, or the slots a text reads
  /learn on|off                  online learning into the long-term memory
  /save                          write the learned memory delta
  /reset                         fresh conversation state (learned memory is kept)
  /quit                          leave (also Ctrl+D)"""


def values_checksum(values: torch.Tensor) -> str:
    """sha256 of the memory values as float32 bytes: identifies the base model of a delta."""
    return hashlib.sha256(values.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()


def parse_since(text: str) -> float:
    """Unix seconds, or an ISO date/time (local time when no zone is given)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise HierarchosError(f"since={text!r}: expected unix seconds or an ISO time like 2025-01-31T12:00") from None


def cosine_lr(update: int, base: float, minimum: float, steps: int, static: bool) -> float:
    """LTM learning rate of the `update`-th update: cosine from base to minimum, restarting every `steps`."""
    if static or steps <= 0:
        return base
    phase = (update % steps) / steps
    return minimum + 0.5 * (base - minimum) * (1.0 + math.cos(math.pi * phase))


@dataclass
class LearnConfig:
    enabled: bool = True
    surprise_threshold: float = 2.0
    lr: float = 0.01
    schedule_steps: int = 100
    schedule_min_lr: float = 1e-5
    static_lr: bool = False


@dataclass
class ReplyStats:
    tokens: int = 0
    seconds: float = 0.0                        # from the turn's start (prompt encoded) to the reply's end
    first_token_seconds: float | None = None    # from the turn's start to the first sampled token (prefill)
    totals: dict = field(default_factory=dict)  # name -> [sum, count] over the reply's steps

    def mean(self, name: str) -> float | None:
        total, count = self.totals.get(name, (0.0, 0.0))
        return total / count if count else None

    def decode_rate(self) -> float | None:
        """Tokens per second after the first token (the first one's time is the prefill's)."""
        if self.first_token_seconds is None or self.tokens < 2 or self.seconds <= self.first_token_seconds:
            return None
        return (self.tokens - 1) / (self.seconds - self.first_token_seconds)


class ChatSession:
    """The REPL logic without a terminal: `handle(line)` runs a command or a turn; output goes to
    `out` (replies) and `info` (status and command output; stderr when scripted)."""

    def __init__(self, model, tokenizer, *, template: str = "plain", model_dir: str | Path | None = None,
                 device=None, sampling: SamplingConfig | None = None, h_halt_thresh: float | None = None,
                 learn: LearnConfig | None = None, delta_path: str | Path | None = None,
                 session_id: str | None = None, out: TextIO, info: TextIO, log: TextIO | None = None,
                 stream: bool = True, learner=None, format_name: str | None = None,
                 learn_unavailable: str | None = None, on_save: Callable[["ChatSession"], str] | None = None,
                 cuda_graph: bool = False, clock: Callable[[], float] = time.perf_counter,
                 step_options: dict | None = None):
        # `learner`: the full-precision model whose memory learning updates (a quantized `model`
        # generates, its float shadow learns; the learner's memory is the truth, copied into
        # `model` after every change). `learn_unavailable`: why learning cannot be switched on.
        # `on_save`: runs after /save wrote the delta (re-quantization) and returns a line to show.
        # `cuda_graph`: replies step through a captured CUDA graph (generate_batch with one row);
        # `step_options`: generate_batch's compile_step / fused_step for that graph's step.
        # `clock`: seconds for /status's time to first token and speed (tests pass a fake one).
        self.model, self.tokenizer, self.template = model.eval(), tokenizer, template
        self.learner = learner.eval() if learner is not None else self.model
        self.format_name = format_name
        self.learn_unavailable = learn_unavailable
        self.on_save = on_save
        self.device = device if device is not None else next(model.parameters()).device
        self.sampling = sampling or SamplingConfig()
        self.h_halt_thresh = h_halt_thresh
        self.learn = learn or LearnConfig()
        if learn_unavailable is not None:
            self.learn.enabled = False
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.delta_path = Path(delta_path) if delta_path is not None else (
            self.model_dir / DELTA_FILE if self.model_dir is not None else None)
        self.session_id = session_id or uuid.uuid4().hex[:8]
        self.source = f"chat:{self.session_id}"
        self.out, self.info, self.log = out, info, log or info
        self.stream = stream
        self.cuda_graph, self.clock = cuda_graph, clock
        self.step_options = dict(step_options or {})
        self.steppers: dict = {}  # generate_batch's captured steppers, per caps and sampling (chat: B = 1)
        self.mode = "normal"
        self.stop_strings = STOP_STRINGS.get(template, [])
        self.generator = torch.Generator().manual_seed(
            self.sampling.seed if self.sampling.seed is not None else int(torch.seed() % 2**63))
        self.base_values = self.learner.memory.values.detach().clone()
        self.base_checksum = values_checksum(self.base_values)
        self.base_sources = list(self.learner.memory.source_names)
        self.updates = 0                      # LTM updates made this session (drives the schedule)
        self.written_slots: set[int] = set()  # slots this session's updates changed
        self.last = ReplyStats()
        self.interrupted = False
        self.done = False
        self.state = None
        self.turns = 0
        self.reset_state()
        self.warmup_seconds = self.warm_up() if cuda_graph else None

    def warm_up(self) -> float:
        """Capture the CUDA graph of the current caps and sampling now (at load), not in the first
        reply: one token generated on a scratch state. Returns the seconds it took."""
        start = self.clock()
        scratch = replace(self.sampling, max_new_tokens=1)
        generate_batch(self.model, [[self.tokenizer.eos_id or 0]], scratch, seeds=[0], cuda_graph=True,
                       steppers=self.steppers, **self.step_options, **self.caps())
        return self.clock() - start

    # ---- conversation -------------------------------------------------------------------
    def reset_state(self) -> None:
        self.state = self.model.init_state(1, device=self.device)
        self.turns = 0

    def caps(self) -> dict:
        if self.mode == "fast":
            return {"h_cycles": 1, "max_h_steps": 1, "max_l_steps": 0}
        thresh = self.h_halt_thresh if self.h_halt_thresh is not None else self.model.cfg.h_halt_thresh
        if self.mode == "deep":
            thresh = max(thresh, 0.99)
        elif self.mode == "extreme":
            thresh = 1.0
        return {"h_halt_thresh": thresh}

    def _hold_back(self, text: str) -> int:
        """Length of the longest tail of `text` that may start a stop string (not printed yet)."""
        if not self.stop_strings:
            return 0
        held = 0
        for n in range(min(len(text), max(len(s) for s in self.stop_strings)), 0, -1):
            if any(s.startswith(text[-n:]) for s in self.stop_strings):
                held = n
                break
        return len(text) - len(text[:len(text) - held].rstrip("\n"))  # and the newlines before it

    @torch.no_grad()
    def reply(self, user_text: str, on_text: Callable[[str], None] | None = None) -> tuple[str, list[int]]:
        """Answer one user turn on the conversation state. Returns (reply text, exchange token ids)."""
        prompt_ids = list(self.tokenizer.encode(format_prompt(self.template, user_text)))
        if self.turns > 0 and self.tokenizer.eos_id is not None:
            prompt_ids = [self.tokenizer.eos_id] + prompt_ids  # turns are separated like training docs
        if not prompt_ids:
            return "", []
        stats = ReplyStats()
        start = self.clock()
        self.turns += 1
        decoder = self.tokenizer.decode_stream()
        text, shown, cut = "", 0, -1
        self.interrupted = False

        def on_token(token, step) -> bool:
            nonlocal text, shown, cut
            text += decoder.push(token)
            cut = min((text.find(s) for s in self.stop_strings if s in text), default=-1)
            stats.tokens += 1
            for name, (total, count) in (step.totals.items() if step is not None else ()):
                acc = stats.totals.setdefault(name, [0.0, 0.0])
                acc[0] += float(total)
                acc[1] += float(count)
            if cut >= 0:
                text = text[:cut]
                return True
            visible = len(text) - self._hold_back(text)
            if on_text is not None and visible > shown:
                on_text(text[shown:visible])
                shown = visible
            return False

        def on_first_token(_token) -> None:
            stats.first_token_seconds = self.clock() - start

        if self.cuda_graph:  # the step on the device, replayed from a graph; aux totals summed there
            seed = draw_seed(self.sampling, self.generator) if self.sampling.temperature > 0 else 0
            result = generate_batch(self.model, [prompt_ids], self.sampling, states=[self.state],
                                    eos_id=self.tokenizer.eos_id, seeds=[seed],
                                    on_token=lambda _row, token: on_token(token, None),
                                    should_stop=lambda: self.interrupted, keep_eos=True, cuda_graph=True,
                                    steppers=self.steppers, clock=self.clock, **self.step_options, **self.caps())
            new_ids, self.state = result.tokens[0], result.state
            stats.first_token_seconds = result.first_token_seconds
            stats.totals = {name: [float(total), float(count)] for name, (total, count) in result.totals.items()}
        else:
            new_ids, self.state = generate(self.model, prompt_ids, self.sampling, state=self.state,
                                           eos_id=self.tokenizer.eos_id, on_token=on_token,
                                           should_stop=lambda: self.interrupted, generator=self.generator,
                                           keep_eos=True, on_first_token=on_first_token, **self.caps())
        if cut < 0:
            text += decoder.flush()
        if self.stop_strings:
            text = text.rstrip("\n")
        if on_text is not None and len(text) > shown:
            on_text(text[shown:])
        stats.seconds = self.clock() - start
        self.last = stats
        return text, prompt_ids + new_ids

    def turn(self, user_text: str) -> str:
        """A full exchange: reply (streamed to `out`), then online learning when enabled."""
        write = (lambda s: (self.out.write(s), self.out.flush())) if self.stream else None
        with self._catch_sigint():
            text, exchange = self.reply(user_text, on_text=write)
        if not self.stream:
            self.out.write(text)
        self.out.write("\n")
        self.out.flush()
        if self.interrupted:
            print("[stopped]", file=self.log)
        if self.learn.enabled and len(exchange) > 1:
            self.learn_from(exchange)
        return text

    def _catch_sigint(self):
        """Ctrl+C during a reply sets a flag the loop checks between tokens (the state stays whole)."""
        session = self

        class _Guard:
            def __enter__(self):
                self.old = None
                if threading.current_thread() is threading.main_thread():
                    self.old = signal.signal(signal.SIGINT, lambda *_: setattr(session, "interrupted", True))

            def __exit__(self, *exc):
                if self.old is not None:
                    signal.signal(signal.SIGINT, self.old)

        return _Guard()

    # ---- online learning ------------------------------------------------------------------
    def learn_from(self, exchange: list[int]) -> dict:
        """Surprise = LM loss (nats/token) of the exchange on a fresh state. Above the threshold: one
        SGD step on memory.values only, then metadata for the changed rows. Else nothing changes."""
        model, memory = self.learner, self.learner.memory
        tokens = torch.tensor([exchange], device=next(model.parameters()).device)
        flags = [(p, p.requires_grad) for p in model.parameters()]
        for p, _ in flags:
            p.requires_grad_(False)
        memory.values.requires_grad_(True)
        try:
            with torch.enable_grad():
                out = model(tokens[:, :-1], model.init_state(1, device=tokens.device), **self.caps())
                loss, parts = lm_loss(out, tokens[:, 1:], model.cfg.z_loss_weight)
                surprise = float(parts["ce"])
                result = {"surprise": surprise, "updated": 0, "lr": 0.0}
                if not math.isfinite(surprise) or surprise <= self.learn.surprise_threshold:
                    print(f"[ltm] surprise {surprise:.3f} <= {self.learn.surprise_threshold:g}: no update",
                          file=self.log)
                    return result
                (grad,) = torch.autograd.grad(loss, [memory.values])
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
        changed = grad.abs().amax(dim=-1) > 0
        if not torch.isfinite(grad).all() or not changed.any():
            print(f"[ltm] surprise {surprise:.3f}: no usable gradient, no update", file=self.log)
            return result
        lr = cosine_lr(self.updates, self.learn.lr, self.learn.schedule_min_lr, self.learn.schedule_steps,
                       self.learn.static_lr)
        with torch.no_grad():
            memory.values.sub_(lr * grad)
            if self.source not in memory.source_names:
                memory.source_names.append(self.source)
            memory.slot_time[changed] = time.time()
            memory.slot_count[changed] += 1
            memory.slot_source[changed] = memory.source_names.index(self.source)
        self.updates += 1
        self._sync_memory()
        rows = changed.nonzero().flatten().tolist()
        self.written_slots.update(rows)
        print(f"[ltm] surprise {surprise:.3f} > {self.learn.surprise_threshold:g}: updated {len(rows)} slots "
              f"(lr {lr:.2e}, update {self.updates})", file=self.log)
        return {"surprise": surprise, "updated": len(rows), "lr": lr}

    def _sync_memory(self) -> None:
        """Copy the learner's memory (values, metadata, source names) into the generating model."""
        if self.learner is self.model:
            return
        src, dst = self.learner.memory, self.model.memory
        with torch.no_grad():
            for name in ("values", "slot_time", "slot_count", "slot_source"):
                getattr(dst, name).copy_(getattr(src, name).to(getattr(dst, name).device))
        dst.source_names = list(src.source_names)

    # ---- memory delta file ------------------------------------------------------------------
    def save_delta(self, path: str | Path | None = None) -> Path:
        from safetensors.torch import save

        target = Path(path) if path is not None else self.delta_path
        if target is None:
            raise HierarchosError("no delta path: pass --ltm-lora-path FILE or --model-path DIR")
        memory = self.learner.memory
        tensors = {"values_delta": (memory.values.detach() - self.base_values).to("cpu").contiguous(),
                   "slot_time": memory.slot_time.to("cpu").contiguous(),
                   "slot_count": memory.slot_count.to("cpu").contiguous(),
                   "slot_source": memory.slot_source.to("cpu").contiguous()}
        metadata = {"format": DELTA_FORMAT, "version": DELTA_VERSION, "base_checksum": self.base_checksum,
                    "source_names": json.dumps(list(memory.source_names))}
        atomic_write_bytes(target, save(tensors, metadata=metadata))
        return target

    def load_delta(self, path: str | Path) -> None:
        """Apply a saved delta to the base memory; any mismatch or damage is a one-line error."""
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                meta = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
            names = json.loads(meta.get("source_names", "[]"))
        except Exception as exc:  # safetensors raises its own types for bad headers and sizes
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise HierarchosError(f"{path}: memory delta is truncated or corrupt ({reason}); "
                                  "delete it or restore a good copy") from None
        if meta.get("format") != DELTA_FORMAT:
            raise HierarchosError(f"{path}: not a hierarchos memory delta file; pass the file /save wrote")
        if meta.get("base_checksum") != self.base_checksum:
            raise HierarchosError(f"{path}: memory delta was made for another model (memory checksum differs); "
                                  "use it with the model it was saved from")
        memory = self.learner.memory
        expected = {"values_delta": memory.values, "slot_time": memory.slot_time,
                    "slot_count": memory.slot_count, "slot_source": memory.slot_source}
        for name, ref in expected.items():
            got = tensors.get(name)
            if got is None or tuple(got.shape) != tuple(ref.shape) or got.dtype != ref.dtype:
                raise HierarchosError(f"{path}: memory delta tensor '{name}' is missing or has the wrong "
                                      "shape/dtype; the file does not fit this model")
        if not isinstance(names, list) or names[:len(self.base_sources)] != self.base_sources:
            raise HierarchosError(f"{path}: memory delta source names do not extend the model's; "
                                  "the file does not fit this model")
        with torch.no_grad():
            memory.values.copy_(self.base_values + tensors["values_delta"].to(self.device))
            for name in ("slot_time", "slot_count", "slot_source"):
                getattr(memory, name).copy_(tensors[name])
        memory.source_names = list(names)
        self._sync_memory()

    # ---- commands ----------------------------------------------------------------------------
    def handle(self, line: str) -> bool:
        """One input line: a slash command or a user turn. Returns False once the user quits."""
        line = line.rstrip("\r\n")
        if not line.strip():
            return not self.done
        if line.startswith("/"):
            name, _, arg = line[1:].strip().partition(" ")
            handler = getattr(self, f"cmd_{name.lower()}", None)
            if handler is None:
                self._say(f"unknown command /{name}; type /help for the list")
            else:
                try:
                    handler(arg.strip())
                except HierarchosError as exc:
                    self._say(" ".join(str(exc).split()))
            return not self.done
        self.turn(line)
        return not self.done

    def _say(self, text: str) -> None:
        print(text, file=self.info)
        self.info.flush()

    def cmd_help(self, arg: str) -> None:
        self._say(HELP_TEXT)

    def cmd_quit(self, arg: str) -> None:
        self.done = True

    cmd_exit = cmd_quit

    def cmd_mode(self, arg: str) -> None:
        if arg not in MODES:
            raise HierarchosError(f"usage: /mode {'|'.join(MODES)} (now {self.mode})")
        self.mode = arg
        note = ""
        if arg in ("normal", "deep", "extreme") and self.model.cfg.max_h_steps <= 1:
            # the modes move the pondering's halting threshold: one pass has nothing to halt
            note = (" (this model ponders one pass, max_h_steps 1: the halting threshold changes nothing; "
                    "a model trained with --max_h_steps > 1 thinks longer in deep/extreme)")
        self._say(f"mode {arg}: caps {self.caps()}{note}")

    def _set_number(self, arg: str, attr: str, kind, check: Callable, usage: str) -> None:
        try:
            value = kind(arg)
        except ValueError:
            value = None
        if value is None or not check(value):
            raise HierarchosError(f"usage: {usage}")
        setattr(self.sampling, attr, value)
        self._say(f"{attr} = {value}")

    def cmd_temp(self, arg):
        self._set_number(arg, "temperature", float, lambda v: 0 <= v < math.inf, "/temp X (X >= 0; 0 = greedy)")

    def cmd_topk(self, arg):
        self._set_number(arg, "top_k", int, lambda v: v >= 0, "/topk N (N >= 0; 0 = off)")

    def cmd_topp(self, arg):
        self._set_number(arg, "top_p", float, lambda v: 0 < v <= 1, "/topp X (0 < X <= 1)")

    def cmd_penalty(self, arg):
        self._set_number(arg, "repetition_penalty", float, lambda v: 0 < v < math.inf, "/penalty X (X > 0; 1 = off)")

    def cmd_learn(self, arg: str) -> None:
        if arg not in ("on", "off"):
            raise HierarchosError(f"usage: /learn on|off (now {'on' if self.learn.enabled else 'off'})")
        if arg == "on" and self.learn_unavailable is not None:
            raise HierarchosError(f"learning is unavailable: {self.learn_unavailable}")
        self.learn.enabled = arg == "on"
        self._say(f"learning {arg}")

    def cmd_reset(self, arg: str) -> None:
        self.reset_state()
        self._say("conversation state reset (learned memory kept)")

    def cmd_save(self, arg: str) -> None:
        path = self.save_delta()
        self._say(f"saved memory delta to {path} ({self.updates} updates this session)")
        if self.on_save is not None:
            self._say(self.on_save(self))

    def _prefill_graphs(self) -> str:
        """/status: the prompt's chunk graphs (generate_batch keeps them beside the steps), if any."""
        prefills = [p for k, p in self.steppers.items() if k[0] == "prefill"]
        if not prefills:
            return ""
        prefill = prefills[0]
        compiled = ", compiled blocks" if prefill.block_calls is not None else ""
        if prefill.capture_error:
            return f"; prompts prefilled eagerly{compiled} (their capture failed: {prefill.capture_error})"
        if not prefill.graphs:
            return f"; prompts prefilled in chunks{compiled}"
        return f"; prompts through chunk graphs of {', '.join(map(str, prefill.sizes))} tokens{compiled}"

    def cmd_status(self, arg: str) -> None:
        model, memory, stats = self.learner, self.model.memory, self.last
        dtype = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(
            memory.values.dtype, str(memory.values.dtype))
        fmt_name = self.format_name or f"{dtype} safetensors"
        used = int((memory.slot_count > 0).sum())
        in_context = int((self.state.memory["writes"][0] > 0).sum())
        manager, worker = stats.mean("manager_steps"), stats.mean("worker_steps")
        rate = f"{stats.tokens / stats.seconds:.1f} tokens/s" if stats.tokens and stats.seconds > 0 else "n/a"
        first = "n/a" if stats.first_token_seconds is None else f"{stats.first_token_seconds * 1000:.1f} ms"
        decode = stats.decode_rate()
        decode = "n/a" if decode is None else f"{decode:.1f} tokens/s"
        fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
        cfg = model.cfg
        self._say("\n".join([
            f"model: {model.num_parameters():,} parameters ({model.num_parameters(with_deepembed=False):,} "
            f"without DeepEmbed), format {fmt_name}, device {self.device}",
            f"mode: {self.mode} {self.caps()} (config: {cfg.h_cycles} cycles, {cfg.max_h_steps} pondering "
            f"steps, {cfg.max_l_steps} worker passes)",
            f"blocks: {blocks_summary(cfg)}; carried state {self.state.nbytes() / 1024:.1f} KiB",
            f"sampling: temperature {self.sampling.temperature}, top-k {self.sampling.top_k}, top-p "
            f"{self.sampling.top_p}, penalty {self.sampling.repetition_penalty}, max {self.sampling.max_new_tokens} tokens",
            f"last reply: {stats.tokens} tokens, {rate}; time to first token {first}, then {decode}; "
            f"manager steps/plan point {fmt(manager)}, worker passes/token {fmt(worker)}"
            + (f" (CUDA graph: {sum(1 for k in self.steppers if k[0] != 'prefill')} captured, the first at load in "
               f"{1000 * (self.warmup_seconds or 0.0):.0f} ms{self._prefill_graphs()})" if self.cuda_graph else ""),
            f"memory: {used} of {memory.slots} slots used, {len(self.written_slots)} written this session "
            f"({self.updates} updates), {in_context} written in context; learning "
            f"{'on' if self.learn.enabled else 'off'} (surprise > {self.learn.surprise_threshold:g})"
            + (f"; unavailable: {self.learn_unavailable}" if self.learn_unavailable else ""),
        ]))

    def cmd_memory(self, arg: str) -> None:
        sources, since, words = None, None, []
        for part in arg.split():
            if part.startswith("source="):
                sources = (sources or []) + [part[len("source="):]]
            elif part.startswith("since="):
                since = parse_since(part[len("since="):])
            else:
                words.append(part)
        memory = self.model.memory
        if sources and not any(s in memory.source_names for s in sources):
            known = ", ".join(memory.source_names) or "none yet"
            raise HierarchosError(f"no memory source {', '.join(sources)}; known sources: {known}")
        mask = memory.slot_mask(sources, since)
        weights = None
        if words:
            ids = self.tokenizer.encode(" ".join(words))
            if not ids:
                raise HierarchosError("the query text encodes to no tokens")
            with torch.no_grad():
                e = self.model.embed(torch.tensor([ids], device=self.device))
                attn, idx = memory.query_slots(e, sources, since)
            weights = torch.zeros(memory.slots, device=self.device).index_add_(0, idx.flatten(), attn.flatten())
            weights = weights / len(ids)
            rows = [int(i) for i in weights.argsort(descending=True) if weights[i] > 0][:20]
        else:
            selected = (memory.slot_count > 0) if mask is None else (mask & (memory.slot_count > 0))
            rows = selected.nonzero().flatten().tolist()
        if not rows:
            self._say("no memory slots match")
            return
        lines = [f"{'slot':>6}  {'weight':>6}  {'written (UTC)':<20} {'count':>5}  source"]
        for row in rows[:50]:
            stamp = float(memory.slot_time[row])
            when = datetime.fromtimestamp(stamp, timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if stamp > 0 else "never"
            src = int(memory.slot_source[row])
            name = memory.source_names[src] if 0 <= src < len(memory.source_names) else "-"
            weight = f"{float(weights[row]):.3f}" if weights is not None else "-"
            lines.append(f"{row:>6}  {weight:>6}  {when:<20} {int(memory.slot_count[row]):>5}  {name}")
        if len(rows) > 50:
            lines.append(f"... {len(rows) - 50} more")
        self._say("\n".join(lines))

    # ---- loops ---------------------------------------------------------------------------------
    def run_lines(self, lines) -> None:
        """Scripted use: every line is a command or a user turn."""
        for line in lines:
            if not self.handle(line):
                break

    def run_interactive(self, read: Callable[[str], str] = input) -> None:
        """The terminal loop: `>>> ` prompt; Ctrl+C at the prompt clears the line, Ctrl+D leaves."""
        while not self.done:
            try:
                line = read(">>> ")
            except EOFError:
                self.out.write("\n")
                break
            except KeyboardInterrupt:
                self.out.write("\n")
                continue
            self.handle(line)
