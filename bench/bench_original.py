"""Training tokens/s of the original project (github.com/necat101/Hierarchos) against ours, at the same
shape, in one run (issue 16's ">= 1000x the original at its default shape").

Both models train in the loop their users run, each in its own process, one after the other:
- the original: its own CLI (`hierarchos_cli.py train`, its argument parser, defaults, tokenizer and
  JSONL data loader, its `train()` loop with its `train_step`: forward, loss, backward, clipping,
  AdamW) run in-process in a child whose `hierarchos` package is the original's. The only thing this
  script changes is the batch source handed to `train()`: the original's own loader, wrapped so that
  the time each batch is requested is recorded (after a CUDA synchronisation) and the run stops after
  --warmup + --steps steps (before its end-of-epoch checkpoint write);
- ours: `hierarchos_cli.py train` as a subprocess on the same corpus and tokenizer, `--log-every` on the
  warm-up boundary, tokens/s from metrics.jsonl's wall-clock stamps.
tokens/s = steps x batch x seq_len / seconds over the --steps steps after the --warmup steps (the first
steps hold torch.compile, CUDA-graph capture and allocator warm-up). The corpus is generated: documents
of seq_len random words `w<id>`, and a word-level tokenizer of exactly --vocab-size entries (its last
one the end-of-text token), so both models see every window full and the same vocabulary as GPT-2's
50257 by default. Nothing is downloaded at run time.

Obtaining the original (never vendored into this repository; keep it outside the tree, or in the
ignored .device_cache/ for a device run). The benchmarked snapshot is commit
10674eef73b2f3694c360806b4952b87af59abe8 (2026-07-17, "Add files via upload"):
    git clone https://github.com/necat101/Hierarchos /tmp/Hierarchos && \\
        git -C /tmp/Hierarchos checkout 10674eef73b2f3694c360806b4952b87af59abe8
  or from a bare mirror of it (the development machine has one):
    mkdir -p /tmp/orig_hierarchos && git -C MIRROR archive 10674eef73b2f3694c360806b4952b87af59abe8 \\
        | tar -x -C /tmp/orig_hierarchos && echo 10674eef73b2f3694c360806b4952b87af59abe8 \\
        > /tmp/orig_hierarchos/ORIGINAL_COMMIT
The commit recorded in the JSON is `git rev-parse HEAD` of DIR when it is a checkout, else the first
word of DIR/ORIGINAL_COMMIT, else "unknown"; a SHA-256 of the original's model and trainer sources is
recorded either way. Its Python needs: torch, transformers, tqdm, numpy (numba optional: its ROSA).

The issue's "default shape" (768 wide, B=16, T=128, 5 + 5 steps) is this script's default; the snapshot's own
CLI defaults are narrower and longer (--context_dim 448, --batch_size 64, --max_length 1024,
--training-chunk-size 256), so the script always passes the shape as flags.

Shape mapping (the original's flag -> ours; MAPPING below is the table the script prints):
  --context_dim W (h_hidden = l_hidden = W)  -> --context_dim W --h_hidden W --l_hidden W
  one RWKV-7 cell per stack (h_rnn, l_rnn)   -> --h_layers 1 --l_layers 1
  one manager/worker round per token         -> --h_cycles 1
  --max_h_steps, --max_l_steps, --h_stride   -> the same flags
  --batch_size B, --max_length T             -> --batch_size B --max_length T
  LTM 1024 slots, key/val 128, top-4; persistent 128; ROSA and DeepEmbed on: both defaults
  head size 64 (its auto choice for W % 64 == 0) -> ours' 64
What does not match (each model keeps its own design; these are the differences in work per token):
  - the original runs the sequence token by token in Python (manager, pondering, worker per token);
    ours runs each pass over the whole window in parallel (chunked WKV on the CPU, Triton on CUDA);
  - the original backpropagates through every pondering and worker pass; ours only through the last
    (grad_steps=1, HRM's one-step gradient), so our backward does less work by design;
  - the original's eager worker loop (the CPU) stops when the batch-mean drift change is under
    l_conv_atol (1e-4), its compiled one (CUDA) runs every pass masked; ours freezes tokens one by one
    under the same tolerance (every pass runs, masked);
  - the original truncates BPTT every 32 tokens inside a window; ours once per window;
  - the original updates its LTM by an inner gradient step after the backward; ours writes it per
    64-token chunk inside the forward;
  - on CUDA both run in their defaults: the original auto-enables bf16 autocast and torch.compile of
    its worker loop (no CUDA graphs), ours bf16 autocast and a CUDA graph of the whole window. On the
    CPU neither compiles and both run in float32.
--ours-args "--h_layers 4 --l_layers 4 --h_cycles 2" (flags given later win) times our 125m size's depth
instead, as the issue's earlier, unscripted comparison did.
Tokens counted: batch x seq_len per step for both (each window feeds T tokens; both predict T - 1 or
T targets from them).

CPU, reduced shape (a minute or two; on a shared 2-core machine --threads 1: with 2 threads under load
both models ran 5-15x slower, their OpenMP threads waiting for cores that other jobs held):
    python bench/bench_original.py --original /tmp/orig_hierarchos --width 256 --batch 4 --seq-len 32 \\
        --vocab-size 8192 --steps 3 --warmup 1 --threads 1 --json /tmp/original_cpu.json
Device: bash bench/gpu.sh original (the default shape: 768 wide, B=16, T=128, 5 + 5 steps).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import random
import re
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORIGINAL_COMMIT = "10674eef73b2f3694c360806b4952b87af59abe8"
ORIGINAL_URL = "https://github.com/necat101/Hierarchos"
ORIGINAL_SOURCES = ("hierarchos_cli.py", "hierarchos/models/core.py", "hierarchos/models/rwkv_cell.py",
                    "hierarchos/training/trainer.py")  # present in the snapshot; hashed into the JSON
HEAD_SIZE = 64
EOS = "<|endoftext|>"

# (what, the original's flags, ours, note): the printed mapping and the JSON's "mapping"
MAPPING = (
    ("width", "--context_dim W (h_hidden, l_hidden default to it)", "--context_dim W --h_hidden W --l_hidden W", ""),
    ("layers", "one RWKV cell per stack (fixed)", "--h_layers 1 --l_layers 1", ""),
    ("rounds", "one manager/worker round (fixed)", "--h_cycles 1", ""),
    ("pondering", "--max_h_steps H --h_stride S", "--max_h_steps H --h_stride S", "all passes run in training"),
    ("worker", "--max_l_steps L", "--max_l_steps L", "original: batch-mean early stop; ours: per-token freeze"),
    ("batch", "--batch_size B --max_length T", "--batch_size B --max_length T", "T <= its training_chunk_size 256"),
    ("memory", "LTM 1024 x 128/128 top-4, persistent 128", "the same (defaults)", ""),
    ("inputs", "ROSA + DeepEmbed on (defaults)", "ROSA + DeepEmbed on (defaults)", ""),
    ("gradient", "through every pass, BPTT cut every 32 tokens", "last pass only (grad_steps 1), one cut a window",
     "differs by design"),
    ("precision", "CUDA: bf16 autocast + torch.compile (its auto)", "CUDA: bf16 autocast + CUDA graph (ours' default)",
     "CPU: float32 eager for both"),
)


class _StopTimedRun(BaseException):
    """Raised from the original's batch source once the timed steps are done (BaseException, so no
    `except Exception` of the original's loop can swallow it)."""


# ----------------------------------------------------------------------------- arguments
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--original", required=True, metavar="DIR",
                   help="the original project's snapshot (outside this repository; see the docstring)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--h-steps", type=int, default=5, help="max_h_steps (pondering passes per plan point)")
    p.add_argument("--l-steps", type=int, default=5, help="max_l_steps (worker passes per token)")
    p.add_argument("--h-stride", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=50257, help="the generated tokenizer's size (GPT-2's)")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per model")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of both")
    p.add_argument("--only", choices=("both", "original", "ours"), default="both")
    p.add_argument("--original-args", default="", help="extra flags for the original's CLI (one string)")
    p.add_argument("--ours-args", default="", help="extra flags for our train command (one string)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed to each model's process")
    p.add_argument("--eager-fallback", action="store_true",
                   help="when the original's run does not finish (on CUDA its default compiles the worker loop "
                        "with autotuning, which outlasted 210 s on an H100), run it again with --no-compile and "
                        "take the ratio against that row ('original-eager')")
    p.add_argument("--work-dir", default=None, help="corpus, tokenizer and outputs (default: a temp dir)")
    p.add_argument("--json", default=None, metavar="OUT")
    return p.parse_args(argv)


def validate(args) -> None:
    """One-line HierarchosError for input the run cannot use."""
    from hierarchos.errors import HierarchosError
    positive = {"--width": args.width, "--batch": args.batch, "--seq-len": args.seq_len, "--h-steps": args.h_steps,
                "--h-stride": args.h_stride, "--steps": args.steps, "--threads": args.threads}
    for flag, value in positive.items():
        if value < 1:
            raise HierarchosError(f"{flag} {value}: must be at least 1")
    if args.l_steps < 1:  # the original's worker runs at least one pass
        raise HierarchosError(f"--l-steps {args.l_steps}: must be at least 1 (the original has no worker-free mode)")
    if args.warmup < 1:
        raise HierarchosError(f"--warmup {args.warmup}: must be at least 1 (the first step holds compilation "
                              "and allocation)")
    if args.width % HEAD_SIZE:
        raise HierarchosError(f"--width {args.width}: must be a multiple of {HEAD_SIZE} (both models' head size); "
                              f"try {max(HEAD_SIZE, round(args.width / HEAD_SIZE) * HEAD_SIZE)}")
    if args.seq_len < 2 or args.seq_len > 256:
        raise HierarchosError(f"--seq-len {args.seq_len}: must be in 2..256 (one window of the original's default "
                              "training_chunk_size 256, so neither model splits it)")
    if args.vocab_size < 16:
        raise HierarchosError(f"--vocab-size {args.vocab_size}: must be at least 16")
    if args.timeout <= 0:
        raise HierarchosError(f"--timeout {args.timeout}: must be positive")
    if args.only != "ours":
        missing = [f for f in ("hierarchos_cli.py", "hierarchos/training/trainer.py")
                   if not os.path.isfile(os.path.join(args.original, f))]
        if missing:
            raise HierarchosError(f"--original {args.original}: no {missing[0]} there; get the snapshot with "
                                  f"`git clone {ORIGINAL_URL} DIR && git -C DIR checkout {ORIGINAL_COMMIT[:12]}` "
                                  "(outside this repository)")
        if os.path.realpath(args.original) == os.path.realpath(REPO):
            raise HierarchosError(f"--original {args.original}: that is this repository; give the original's snapshot")
    if args.json:
        parent = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(parent):
            raise HierarchosError(f"--json {args.json}: no directory {parent}; create it first")
    for flag, text in (("--original-args", args.original_args), ("--ours-args", args.ours_args)):
        try:
            shlex.split(text)
        except ValueError as exc:
            raise HierarchosError(f"{flag} {text!r}: not a shell-quoted list of flags ({exc})") from None
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise HierarchosError("--device cuda: no CUDA device here; use --device cpu")


# ----------------------------------------------------------------------------- shape -> flags
def original_flags(args) -> list[str]:
    """The original CLI's train flags for this shape (everything else stays its default)."""
    return ["--context_dim", str(args.width), "--h_hidden", str(args.width), "--l_hidden", str(args.width),
            "--max_h_steps", str(args.h_steps), "--max_l_steps", str(args.l_steps), "--h_stride", str(args.h_stride),
            "--batch_size", str(args.batch), "--max_length", str(args.seq_len), "--device", args.device,
            "--threads", str(args.threads), "--epochs", "1"] + shlex.split(args.original_args)


def ours_flags(args) -> list[str]:
    """Our train flags for the same shape: one block per stack and one round, as the original has."""
    return ["--context_dim", str(args.width), "--h_hidden", str(args.width), "--l_hidden", str(args.width),
            "--h_layers", "1", "--l_layers", "1", "--h_cycles", "1", "--max_h_steps", str(args.h_steps),
            "--max_l_steps", str(args.l_steps), "--h_stride", str(args.h_stride), "--head_size", str(HEAD_SIZE),
            "--batch_size", str(args.batch), "--max_length", str(args.seq_len), "--device", args.device,
            "--threads", str(args.threads)] + shlex.split(args.ours_args)


def timed_span(warmup: int, steps: int) -> tuple[int, int]:
    """Our --log-every g and --max-steps: rows land on step `warmup` and `warmup + steps`."""
    return math.gcd(warmup, steps), warmup + steps


def timed_bounds(request_times: list[float], warmup: int, steps: int, ahead: int) -> tuple[float, float]:
    """Start and end of steps warmup .. warmup + steps - 1 from the times batches were requested.
    Without a prefetcher request i comes when step i - 1 is done, so step i runs from request i to
    i + 1; a prefetcher (`ahead` = 1) asks for batch i + 1 just before step i, shifting both by one."""
    first = warmup + ahead
    if first + steps > len(request_times) - 1:
        raise ValueError(f"{len(request_times)} batch requests do not cover {warmup} + {steps} steps")
    return request_times[first], request_times[first + steps]


def rate(tokens_per_step: int, steps: int, t_start: float, t_end: float) -> float:
    if t_end <= t_start:
        raise ValueError(f"the timed span is empty ({t_start} -> {t_end})")
    return steps * tokens_per_step / (t_end - t_start)


# ----------------------------------------------------------------------------- corpus + tokenizer
def write_tokenizer(directory: str, vocab_size: int) -> None:
    """A word-level tokenizer of exactly `vocab_size` entries: w0 .. w<V-2>, then the end-of-text token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f"w{i}": i for i in range(vocab_size - 1)}
    vocab[EOS] = vocab_size - 1
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=EOS))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS).save_pretrained(directory)


def write_corpus(path: str, docs: int, words: int, vocab_size: int, seed: int = 0) -> None:
    """`docs` JSONL records {"text": ...} of `words` random words each (never the end-of-text token)."""
    rng = random.Random(seed)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for _ in range(docs):
            f.write(json.dumps({"text": " ".join(f"w{rng.randrange(vocab_size - 1)}" for _ in range(words))}) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- machine / versions
def machine_info(device: str) -> dict:
    import torch
    import transformers
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    info = dict(cpu=cpu, cpu_count=os.cpu_count(), python=platform.python_version(), torch=torch.__version__,
                transformers=transformers.__version__, device=device, hostname=platform.node())
    with contextlib.suppress(ImportError):
        import triton
        info["triton"] = triton.__version__
    if device == "cuda":
        info.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                    gpu_mem_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    return info


def original_identity(directory: str) -> dict:
    commit = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["git", "-C", directory, "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        top = subprocess.run(["git", "-C", directory, "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        if out.returncode == 0 and os.path.realpath(top) == os.path.realpath(directory):
            commit = out.stdout.strip()  # only DIR's own checkout, never a repository that merely contains DIR
    marker = os.path.join(directory, "ORIGINAL_COMMIT")
    if commit == "unknown" and os.path.isfile(marker):
        with open(marker, encoding="utf-8") as f:
            commit = (f.read().split() or ["unknown"])[0]
    digest = hashlib.sha256()
    for rel in ORIGINAL_SOURCES:
        with contextlib.suppress(OSError), open(os.path.join(directory, rel), "rb") as f:
            digest.update(rel.encode() + b"\0" + f.read())
    return dict(commit=commit, expected_commit=ORIGINAL_COMMIT, url=ORIGINAL_URL, sources_sha256=digest.hexdigest(),
                path=os.path.abspath(directory))


# ----------------------------------------------------------------------------- the original (child process)
def _original_child(spec_path: str) -> None:
    """Runs in a child whose `hierarchos` is the original's: its CLI's main() with its own loader,
    whose batches are timed. Writes the result JSON named in the spec."""
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    sys.path.insert(0, spec["original"])
    sys.argv = ["hierarchos_cli.py", "train", *spec["argv"]]  # its CLI reads sys.argv for explicit flags
    import torch
    import hierarchos
    import hierarchos.training.trainer as orig_trainer
    import hierarchos_cli as orig_cli
    if os.path.realpath(os.path.dirname(hierarchos.__file__)) != os.path.realpath(
            os.path.join(spec["original"], "hierarchos")):
        raise SystemExit(f"imported the wrong hierarchos package: {hierarchos.__file__}")
    warmup, steps = spec["warmup"], spec["steps"]
    result = dict(times=[], params=None)
    models = []
    real_core = orig_trainer.HierarchosCore

    def core(config):  # the model train() builds, kept for its parameter count
        model = real_core(config)
        models.append(model)
        return model
    orig_trainer.HierarchosCore = core
    real_train = orig_trainer.train

    class TimedBatches:
        """The original's loader, cycled; each request's time is recorded after the device is idle."""

        def __init__(self, loader, device, requests):
            self.loader, self.device, self.requests = loader, device, requests

        def __len__(self):
            return self.requests

        def __iter__(self):
            while True:
                for batch in self.loader:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    result["times"].append(time.perf_counter())
                    with open(spec["times_file"], "a", encoding="utf-8") as log:  # read back after a timeout
                        log.write(f"{result['times'][-1]}\n")
                    if len(result["times"]) > self.requests:
                        raise _StopTimedRun
                    yield batch

    def timed_train(args, device, tokenizer, dataloader, dataloader_len, **kw):
        # on CUDA its CUDABatchPrefetcher asks for batch k+1 just before step k runs: one request ahead
        result["ahead"] = ahead = int(device.type == "cuda" and bool(getattr(args, "cuda_prefetch", True)))
        requests = warmup + steps + ahead
        try:
            real_train(args, device, tokenizer, TimedBatches(dataloader, device, requests), requests, **kw)
        except _StopTimedRun:
            pass
        else:
            raise SystemExit("the original's train() returned before the timed steps were done")
        result["peak_mem_gib"] = round((torch.cuda.max_memory_allocated(device) if device.type == "cuda" else
                                        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30, 2)
        result.update(amp=bool(getattr(args, "amp", False)), amp_dtype=getattr(args, "amp_dtype", None),
                      compile=bool(getattr(args, "compile", False)), device=str(device),
                      torch_threads=torch.get_num_threads())
    orig_cli.train = timed_train
    orig_cli.main()
    result["t_start"], result["t_end"] = timed_bounds(result["times"], warmup, steps, result["ahead"])
    if models:
        result["params"] = sum(p.numel() for p in models[-1].parameters())
    with contextlib.suppress(ImportError):
        import numba
        result["numba"] = numba.__version__
    result["torch"] = torch.__version__
    tmp = spec["result"] + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f)
    os.replace(tmp, spec["result"])


# ----------------------------------------------------------------------------- the two runs (parent)
def _child_env(extra_path: str | None) -> dict:
    """The environment without any PYTHONPATH entry that would put this repository's package first."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    keep = [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
            if p and os.path.realpath(p) != os.path.realpath(REPO)]
    env["PYTHONPATH"] = os.pathsep.join(([extra_path] if extra_path else []) + keep)
    return env


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join(ln.strip() for ln in text.strip().splitlines()[-lines:])[-400:]


def _run_logged(cmd: list[str], cwd: str, env: dict, timeout: float, log_path: str) -> tuple[int | None, str]:
    """Run `cmd` with its output going to `log_path` as it comes (kept after a timeout); return the
    exit code (None after a timeout) and the output."""
    with open(log_path, "w", encoding="utf-8") as log:
        try:
            code = subprocess.run(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = None
    with open(log_path, encoding="utf-8", errors="replace") as log:
        return code, log.read()


def run_original(args, corpus: str, tokenizer_dir: str, work: str) -> dict:
    spec = dict(original=os.path.abspath(args.original), warmup=args.warmup, steps=args.steps,
                result=os.path.join(work, "original_result.json"), times_file=os.path.join(work, "original_times.txt"),
                argv=["--train", corpus, "--tokenizer-path", tokenizer_dir, "--out-dir",
                      os.path.join(work, "original_out"), *original_flags(args)])
    spec_path = os.path.join(work, "original_spec.json")
    with open(spec_path, "w", encoding="utf-8") as f:
        json.dump(spec, f)
    row = dict(model="original", argv=spec["argv"])
    for stale in (spec["result"], spec["times_file"]):
        with contextlib.suppress(FileNotFoundError):
            os.remove(stale)
    start = time.perf_counter()
    code, output = _run_logged([sys.executable, os.path.abspath(__file__), "--original-child", spec_path], work,
                               _child_env(None), args.timeout, os.path.join(work, "original.log"))
    row["process_s"] = round(time.perf_counter() - start, 1)
    if code is None:
        with contextlib.suppress(FileNotFoundError), open(spec["times_file"], encoding="utf-8") as f:
            times = [float(line) for line in f if line.strip()]
            row["step_times"] = [b - a for a, b in zip(times, times[1:])]
        return dict(row, status=f"timeout after {args.timeout:.0f} s ({len(row.get('step_times', []))} step(s) done)")
    if code != 0 or not os.path.isfile(spec["result"]):
        return dict(row, status=f"failed (exit {code}): {_tail(output)}")
    with open(spec["result"], encoding="utf-8") as f:
        res = json.load(f)
    tok_s = rate(args.batch * args.seq_len, args.steps, res["t_start"], res["t_end"])
    return dict(row, status="ok", tok_s=tok_s, step_s=(res["t_end"] - res["t_start"]) / args.steps,
                params=res["params"], amp=res["amp"], amp_dtype=res["amp_dtype"], compile=res["compile"],
                torch_threads=res["torch_threads"], numba=res.get("numba"), peak_mem_gib=res.get("peak_mem_gib"),
                step_times=[b - a for a, b in zip(res["times"], res["times"][1:])])


def run_train_command(argv: list[str], out_dir: str, log_path: str, timeout: float) -> tuple[dict, list | None, str]:
    """Our `hierarchos_cli.py train ARGV` (writing to out_dir, cleared first: no stale metrics.jsonl rows
    from a reused work dir) as a subprocess, its output in log_path. Returns (row fields: process_s, and
    a status when it timed out or failed; metrics.jsonl's records, None when there are none; the output)."""
    shutil.rmtree(out_dir, ignore_errors=True)
    start = time.perf_counter()
    code, output = _run_logged([sys.executable, os.path.join(REPO, "hierarchos_cli.py"), "train", *argv], REPO,
                               _child_env(REPO), timeout, log_path)
    row = dict(process_s=round(time.perf_counter() - start, 1))
    if code is None:
        return dict(row, status=f"timeout after {timeout:.0f} s"), None, output
    metrics = os.path.join(out_dir, "metrics.jsonl")
    if code != 0 or not os.path.isfile(metrics):
        return dict(row, status=f"failed (exit {code}): {_tail(output)}"), None, output
    with open(metrics, encoding="utf-8") as f:
        return row, [json.loads(line) for line in f if line.strip()], output


def run_ours(args, corpus: str, tokenizer_dir: str, work: str) -> dict:
    log_every, max_steps = timed_span(args.warmup, args.steps)
    out_dir = os.path.join(work, "ours_out")
    argv = ["--train", corpus, "--tokenizer-path", tokenizer_dir, "--out-dir", out_dir,
            "--token-cache", os.path.join(work, "token_cache"), *ours_flags(args), "--epochs", "1",
            "--max-steps", str(max_steps), "--log-every", str(log_every), "--val-fraction", "0", "--save-every", "0",
            "--eval-every-epoch", "0"]
    done, records, output = run_train_command(argv, out_dir, os.path.join(work, "ours.log"), args.timeout)
    row = dict(model="ours", argv=argv, **done)
    if records is None:
        return row
    stamps = {r["step"]: r["time"] for r in records if "time" in r and "step" in r}
    if args.warmup not in stamps or max_steps not in stamps:
        return dict(row, status=f"failed: metrics.jsonl has no rows at steps {args.warmup} and {max_steps}")
    tok_s = rate(args.batch * args.seq_len, args.steps, stamps[args.warmup], stamps[max_steps])
    match = re.search(r"model: ([\d,]+) parameters .*?amp (\S+) \| cuda graphs (\w+)", output)
    return dict(row, status="ok", tok_s=tok_s, step_s=(stamps[max_steps] - stamps[args.warmup]) / args.steps,
                params=int(match.group(1).replace(",", "")) if match else None,
                amp_dtype=match.group(2) if match else None, cuda_graphs=match.group(3) if match else None)


# ----------------------------------------------------------------------------- report
def ratio(rows: list[dict]) -> float | None:
    """ours / the original: its default run where it finished, else its eager fallback."""
    by = {r["model"]: r for r in rows if r.get("status") == "ok"}
    theirs = by.get("original") or by.get("original-eager")
    if "ours" in by and theirs is not None and theirs["tok_s"] > 0:
        return by["ours"]["tok_s"] / theirs["tok_s"]
    return None


def eager_fallback(args) -> argparse.Namespace | None:
    """The arguments of the original's eager run after its default one did not finish, or None where the
    default already was eager (--no-compile given)."""
    if "--no-compile" in shlex.split(args.original_args):
        return None
    return argparse.Namespace(**{**vars(args), "original_args": f"{args.original_args} --no-compile".strip()})


def format_table(rows: list[dict], shape: dict) -> str:
    head = (f"training tokens/s at width {shape['width']}, B={shape['batch']}, T={shape['seq_len']}, "
            f"max_h_steps={shape['h_steps']}, max_l_steps={shape['l_steps']}, vocab {shape['vocab_size']} "
            f"({shape['device']}; {shape['steps']} timed steps after {shape['warmup']})")
    lines = [head, f"{'model':<14} {'params':>13} {'tok/s':>12} {'s/step':>9}  status"]
    for r in rows:
        ok = r.get("status") == "ok"
        params = f"{r['params']:,}" if r.get("params") else "-"
        lines.append(f"{r['model']:<14} {params:>13} {r['tok_s'] if ok else 0:>12,.1f} "
                     f"{r['step_s'] if ok else 0:>9.3f}  {r.get('status', '?')}" if ok else
                     f"{r['model']:<14} {params:>13} {'-':>12} {'-':>9}  {r.get('status', '?')}")
    x = ratio(rows)
    lines.append(f"ours / original: {x:,.1f}x" if x is not None else "ours / original: - (needs both rows finished)")
    return "\n".join(lines)


def write_json(path: str, payload: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, REPO)
    from hierarchos.errors import HierarchosError
    try:
        validate(args)
    except HierarchosError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    shape = dict(device=args.device, width=args.width, batch=args.batch, seq_len=args.seq_len, h_steps=args.h_steps,
                 l_steps=args.l_steps, h_stride=args.h_stride, vocab_size=args.vocab_size, steps=args.steps,
                 warmup=args.warmup, threads=args.threads)
    with contextlib.ExitStack() as stack:
        work = args.work_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_original_"))
        os.makedirs(work, exist_ok=True)
        tokenizer_dir, corpus = os.path.join(work, "tokenizer"), os.path.join(work, "corpus.jsonl")
        write_tokenizer(tokenizer_dir, args.vocab_size)
        # enough whole windows that neither run reaches an epoch end inside the timed steps
        write_corpus(corpus, docs=args.batch * (args.warmup + args.steps + 2) * 2, words=args.seq_len,
                     vocab_size=args.vocab_size)
        print("mapping (what: original -> ours [note])")
        for what, theirs, ours, note in MAPPING:
            print(f"  {what}: {theirs} -> {ours}" + (f" [{note}]" if note else ""))
        rows = []
        for name, fn in (("original", run_original), ("ours", run_ours)):
            if args.only in ("both", name):
                print(f"running {name} ...", flush=True)
                rows.append(fn(args, corpus, tokenizer_dir, work))
                print(f"  {name}: {rows[-1]['status']}" + (f", {rows[-1]['tok_s']:,.1f} tok/s"
                                                          if rows[-1]["status"] == "ok" else ""), flush=True)
                eager = eager_fallback(args) if name == "original" and args.eager_fallback else None
                if eager is not None and rows[-1]["status"] != "ok":
                    print("running original-eager (its default did not finish) ...", flush=True)
                    with contextlib.suppress(FileNotFoundError):  # keep the default run's log beside the eager one's
                        os.replace(os.path.join(work, "original.log"), os.path.join(work, "original_default.log"))
                    rows.append(dict(run_original(eager, corpus, tokenizer_dir, work), model="original-eager"))
                    print(f"  original-eager: {rows[-1]['status']}" + (f", {rows[-1]['tok_s']:,.1f} tok/s"
                                                                      if rows[-1]["status"] == "ok" else ""), flush=True)
    print(format_table(rows, shape))
    if args.json:
        payload = dict(bench="bench_original", argv=sys.argv if argv is None else list(argv), shape=shape,
                       machine=machine_info(args.device), mapping=[dict(zip(("what", "original", "ours", "note"), m))
                                                                   for m in MAPPING],
                       original=original_identity(args.original) if args.only != "ours" else None,
                       rows=rows, ratio=ratio(rows), time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        write_json(args.json, payload)
        print(f"wrote {args.json}")
    return 0 if all(r.get("status") == "ok" for r in rows) or ratio(rows) is not None else 1


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--original-child":
        _original_child(sys.argv[2])
    else:
        sys.exit(main())
