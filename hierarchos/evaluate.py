"""Evaluation: an lm-eval model named `hierarchos`, running lm-eval tasks on it (the offline local ones
live in `hierarchos.eval_tasks`), a train-time hook, and bits per byte of a text file.

Scoring runs the parallel form: a context + continuation is one forward over `[eos] + tokens`
(documents start after an end-of-sequence token, as in training), fed in pieces of `chunk_size`
tokens that carry the recurrent state, so no input is truncated and memory stays bounded.
Batches are right-padded: the model is causal, so padding never changes a real position's
output, and batched scores equal unbatched ones. Generation goes through `hierarchos.generate`.
lm-eval is imported only when a function here needs it.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Callable

import torch

from .errors import HierarchosError
from .eval_tasks import flatten_results, load_tasks, require_lm_eval, task_manager

MODEL_NAME = "hierarchos"  # the name registered with lm-eval (`simple_evaluate(model="hierarchos")`)
DEFAULT_BATCH_SIZE = 8
DEFAULT_CHUNK_SIZE = 512
DEFAULT_MAX_GEN_TOKS = 256


# ---- scoring (no lm-eval needed) ---------------------------------------------------------------

def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _autocast(device: torch.device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def score_rows(model, rows: list[list[int]], starts: list[int], *, chunk_size: int = DEFAULT_CHUNK_SIZE,
               pad_id: int = 0, autocast_dtype=None) -> list[tuple[float, bool]]:
    """For each token row (first token = the conditioning prefix), the sum of log p(row[t] | row[:t])
    over t in [start, len(row)) in nats, and whether every one of those tokens is the argmax.

    The rows run as one right-padded batch, `chunk_size` tokens at a time with the state carried."""
    if not rows:
        return []
    if any(len(row) < 2 or not 1 <= start <= len(row) for row, start in zip(rows, starts)):
        raise ValueError("each row needs a prefix token and 1 <= start <= len(row)")
    device = _model_device(model)
    batch, width = len(rows), max(len(row) for row in rows) - 1
    inputs = torch.full((batch, width), pad_id, dtype=torch.long)
    targets = torch.full((batch, width), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        inputs[i, :len(row) - 1] = torch.tensor(row[:-1])
        targets[i, :len(row) - 1] = torch.tensor(row[1:])
    logprob = torch.zeros(batch, width, dtype=torch.float64)
    greedy = torch.zeros(batch, width, dtype=torch.bool)
    state = model.init_state(batch, device=device)
    for begin in range(0, width, chunk_size):
        x = inputs[:, begin:begin + chunk_size].to(device)
        y = targets[:, begin:begin + chunk_size].to(device)
        with _autocast(device, autocast_dtype):
            out = model(x, state)
        state = out.state
        logits = out.logits if out.logits.dtype in (torch.float32, torch.float64) else out.logits.float()
        logp = logits.log_softmax(-1)  # (B, t, V)
        logprob[:, begin:begin + x.shape[1]] = logp.gather(-1, y.unsqueeze(-1)).squeeze(-1).double().cpu()
        greedy[:, begin:begin + x.shape[1]] = (logp.argmax(-1) == y).cpu()
    results = []
    for i, (row, start) in enumerate(zip(rows, starts)):
        # target j predicts row[j + 1]: tokens start..len-1 are targets start-1..len-2
        scored = slice(start - 1, len(row) - 1)
        results.append((float(logprob[i, scored].sum()), bool(greedy[i, scored].all())))
    return results


def score_batched(model, rows: list[list[int]], starts: list[int], *, batch_size: int = DEFAULT_BATCH_SIZE,
                  progress: Callable[[int], None] | None = None, **kwargs) -> list[tuple[float, bool]]:
    """`score_rows` over batches of similar length (longest first, so memory peaks at once), in input order."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    results: list[tuple[float, bool] | None] = [None] * len(rows)
    for begin in range(0, len(order), batch_size):
        picked = order[begin:begin + batch_size]
        scores = score_rows(model, [rows[i] for i in picked], [starts[i] for i in picked], **kwargs)
        for i, score in zip(picked, scores):
            results[i] = score
        if progress is not None:
            progress(len(picked))
    return results


def _read_text_file(path: str | os.PathLike) -> str:
    file = Path(path)
    if not file.is_file():
        raise HierarchosError(f"{file}: text file not found" if not file.exists()
                              else f"{file}: not a file; pass a UTF-8 text file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise HierarchosError(f"{file}: not UTF-8 text (byte {exc.start}); convert it to UTF-8") from None
    if not text:
        raise HierarchosError(f"{file}: the file is empty; bits per byte needs some text")
    return text


def bits_per_byte(model, tokenizer, text: str, *, chunk_size: int = 1024, autocast_dtype=None) -> dict:
    """Bits per byte of `text` as one document from the end-of-sequence token: the summed token NLL
    in nats / ln 2 / the text's UTF-8 byte count (tokenizer-independent, unlike perplexity)."""
    tokens = list(tokenizer.encode(text))
    n_bytes = len(text.encode("utf-8"))
    if not tokens or not n_bytes:
        raise HierarchosError("bits per byte needs non-empty text")
    was_training = model.training
    model.eval()
    try:
        ((logprob, _),) = score_rows(model, [[tokenizer.eos_id, *tokens]], [1], chunk_size=chunk_size,
                                     pad_id=tokenizer.pad_id, autocast_dtype=autocast_dtype)
    finally:
        model.train(was_training)
    nll = -logprob
    return {"bits_per_byte": nll / math.log(2) / n_bytes, "nll_nats": nll, "tokens": len(tokens),
            "bytes": n_bytes, "token_perplexity": math.exp(nll / len(tokens))}


def bits_per_byte_file(path: str | os.PathLike, model, tokenizer, **kwargs) -> dict:
    """`bits_per_byte` of a UTF-8 text file (the whole file as one document)."""
    return {"file": str(path), **bits_per_byte(model, tokenizer, _read_text_file(path), **kwargs)}


# ---- the lm-eval model ------------------------------------------------------------------------------

def resolve_device(name: str | None) -> torch.device:
    """auto (None) | cpu | cuda | cuda:N -> a torch.device this machine has."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "vulkan":  # torch knows a "vulkan" device type, but our Vulkan path is the quantized kernel's
        raise HierarchosError("--device vulkan runs quantized models only (quantize --out-dir DIR, then eval "
                              "--model-path DIR); evaluate a full-precision model on cpu or cuda")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise HierarchosError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HierarchosError(f"--device {name}: this torch ({torch.__version__}) sees no CUDA device; "
                              "use --device cpu or install a CUDA build of torch")
    return device


def load_model(path: str | os.PathLike, device: str | None = None, tokenizer_path: str | None = None):
    """(model in eval mode, tokenizer, description) for a model directory, or a quantized model directory
    or .gguf file (`quantize`). A quantized model runs as `chat` runs it: matmuls on the C++ kernel (the
    numpy reference when the kernel is not built) or, with device "vulkan", on the Vulkan device; its
    tokenizer is the one embedded in the GGUF file unless `tokenizer_path` names another."""
    from .data.tokenizers import load_tokenizer
    from .quant.quantized_dir import is_quantized_path

    if not is_quantized_path(path):
        from .io import load_model_dir

        model, _ = load_model_dir(path, device=resolve_device(device))
        tokenizer = load_tokenizer(str(tokenizer_path or path))
        return model.eval(), tokenizer, "full precision"
    from .quant import kernel
    from .quant.quantized_dir import load_quantized

    if device not in (None, "", "auto", "cpu", "vulkan"):
        raise HierarchosError(f"--device {device}: quantized models run on the CPU kernel or Vulkan; use --device "
                              "cpu or --device vulkan, or evaluate the full-precision model directory on cuda")
    if device == "vulkan":  # before the model loads: no device is one line, not a half-loaded model
        from .quant.vulkan import require_vulkan

        require_vulkan("--device vulkan")
    model, _, tokenizer, content = load_quantized(path)
    where = f"{kernel.backend_name()} kernel, {kernel.get_isa()}"
    if device == "vulkan":
        from .quant.model import place_on_vulkan
        from .quant.vulkan import vk_device_name

        place_on_vulkan(model)
        where = f"matmuls on Vulkan {vk_device_name()}, the rest on the {where}"
    if tokenizer_path:
        tokenizer = load_tokenizer(str(tokenizer_path))
    return model.eval(), tokenizer, f"{content.qtype} GGUF ({where})"


def _positive(value, what: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        raise HierarchosError(f"{what} {value!r}: expected a positive integer")
    return number


def _as_batch_size(value) -> int:
    if isinstance(value, str) and value.strip().lower().startswith("auto"):
        return DEFAULT_BATCH_SIZE  # lm-eval's "auto" probes memory by trial; a fixed size is predictable
    return _positive(value, "batch size")


class _HierarchosLMMethods:
    """The methods of the lm-eval model; `lm_class()` mixes them into `lm_eval.api.model.LM`."""

    def __init__(self, pretrained: str | None = None, *, model=None, tokenizer=None,
                 batch_size: int | str = DEFAULT_BATCH_SIZE, device: str | None = None,
                 chunk_size: int | str = DEFAULT_CHUNK_SIZE, max_gen_toks: int | str = DEFAULT_MAX_GEN_TOKS,
                 autocast_dtype=None, progress: bool | str = True, max_batch_size=None, **unknown):
        super().__init__()
        if unknown:
            raise HierarchosError(f"model_args {', '.join(sorted(unknown))}: not understood by the hierarchos "
                                  "model; it takes pretrained=DIR (a model directory, or a quantized directory "
                                  "or .gguf file), tokenizer, batch_size, device, chunk_size, max_gen_toks")
        from .data.tokenizers import load_tokenizer

        if model is None:
            if not pretrained:
                raise HierarchosError("the hierarchos lm-eval model needs pretrained=MODEL_DIR "
                                      "(a directory written by `hierarchos train`, or a quantized one)")
            model, tokenizer, _ = load_model(pretrained, device, tokenizer)
        elif tokenizer is None:
            raise HierarchosError("an in-memory hierarchos model needs its tokenizer too (tokenizer=...)")
        elif isinstance(tokenizer, str):
            tokenizer = load_tokenizer(tokenizer)
        if tokenizer.vocab_size > model.cfg.vocab_size:
            raise HierarchosError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                                  f"{model.cfg.vocab_size}; evaluate with the model's own tokenizer")
        self.model, self.tokenizer, self.name = model, tokenizer, str(pretrained or "in-memory")
        self.batch_size = _as_batch_size(batch_size)
        self.chunk_size = _positive(chunk_size, "chunk_size")
        self.max_gen_toks = _positive(max_gen_toks, "max_gen_toks")
        self.autocast_dtype = autocast_dtype
        self.progress = progress not in (False, "false", "False", "0", 0)
        self._device = _model_device(model)

    # -- helpers --
    def _encode_request(self, context: str, continuation: str) -> tuple[list[int], int]:
        """(tokens, start of the continuation). Trailing spaces of the context move to the continuation
        (" word" is one token for byte-level BPEs); the two parts are encoded separately so the scored
        tokens are exactly the continuation's."""
        stripped = context.rstrip(" ")
        continuation = context[len(stripped):] + continuation
        head = [self.tokenizer.eos_id, *self.tokenizer.encode(stripped)]
        return head + list(self.tokenizer.encode(continuation)), len(head)

    def _score(self, rows, starts, what: str) -> list[tuple[float, bool]]:
        from tqdm import tqdm

        bar = tqdm(total=len(rows), desc=f"hierarchos {what}", disable=not self.progress, leave=False)
        was_training = self.model.training
        self.model.eval()
        try:
            nonempty = [i for i, (row, start) in enumerate(zip(rows, starts)) if start < len(row)]
            scores = score_batched(self.model, [rows[i] for i in nonempty], [starts[i] for i in nonempty],
                                   batch_size=self.batch_size, chunk_size=self.chunk_size,
                                   pad_id=self.tokenizer.pad_id, autocast_dtype=self.autocast_dtype,
                                   progress=bar.update)
        finally:
            self.model.train(was_training)
            bar.close()
        results = [(0.0, True)] * len(rows)  # an empty continuation has probability 1
        for i, score in zip(nonempty, scores):
            results[i] = score
        return results

    # -- lm-eval API --
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        encoded = [self._encode_request(*request.args) for request in requests]
        results = self._score([tokens for tokens, _ in encoded], [start for _, start in encoded], "loglikelihood")
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        """The whole text from the end-of-sequence token, no window: the state carries the full history."""
        encoded = [self._encode_request("", request.args[0]) for request in requests]
        results = [logprob for logprob, _ in
                   self._score([tokens for tokens, _ in encoded], [start for _, start in encoded], "rolling")]
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, result)
        return results

    def generate_until(self, requests) -> list[str]:
        """Requests with equal generation arguments run `batch_size` at a time (`generate_batch`:
        every row as it would alone); results in the requests' order."""
        from tqdm import tqdm

        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(dict(request.args[1] or {}).items())), []).append(i)
        was_training = self.model.training
        self.model.eval()
        bar = tqdm(total=len(requests), desc="hierarchos generate_until", disable=not self.progress, leave=False)
        try:
            for picked in groups.values():
                for begin in range(0, len(picked), self.batch_size):
                    batch = picked[begin:begin + self.batch_size]
                    gen_kwargs = dict(requests[batch[0]].args[1] or {})
                    texts = self.generate_many([requests[i].args[0] for i in batch], **gen_kwargs)
                    for i, text in zip(batch, texts):
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                        results[i] = text
                    bar.update(len(batch))
        finally:
            self.model.train(was_training)
            bar.close()
        return results

    def generate(self, context: str, **gen_kwargs) -> str:
        """Continue `context` until a stop string, EOS or `max_gen_toks` (see `generate_many`)."""
        return self.generate_many([context], **gen_kwargs)[0]

    def generate_many(self, contexts: list[str], *, until=None, max_gen_toks=None, do_sample: bool = False,
                      temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = 1234,
                      **ignored) -> list[str]:
        """Continue each context until a stop string, EOS or `max_gen_toks`; greedy unless do_sample with
        temperature > 0 (every row seeded with `seed`, as alone). Returns the texts before the first
        stop string. One context runs `generate`; several run as one batch (`generate_batch`)."""
        from .generate import SamplingConfig, generate, generate_batch

        stops = [until] if isinstance(until, str) else [s for s in (until or []) if s]
        temperature = float(temperature) if do_sample else 0.0
        sampling = SamplingConfig(temperature=temperature, top_k=int(top_k or 0), top_p=float(top_p or 1.0),
                                  repetition_penalty=1.0, seed=seed,
                                  max_new_tokens=int(max_gen_toks or self.max_gen_toks))
        prompts = [[self.tokenizer.eos_id, *self.tokenizer.encode(context)] for context in contexts]
        states = [self._prefill(prompt[:-1]) for prompt in prompts]
        decoders = [self.tokenizer.decode_stream() for _ in prompts]
        texts, cuts = [""] * len(prompts), [-1] * len(prompts)

        def on_row_token(row: int, token: int) -> bool:
            texts[row] += decoders[row].push(token)
            cuts[row] = min((texts[row].find(s) for s in stops if s in texts[row]), default=-1)
            return cuts[row] >= 0

        if len(prompts) == 1:
            generate(self.model, prompts[0][-1:], sampling, state=states[0], eos_id=self.tokenizer.eos_id,
                     on_token=lambda token, _step: on_row_token(0, token))
        else:
            generate_batch(self.model, [prompt[-1:] for prompt in prompts], sampling, states=states,
                           eos_id=self.tokenizer.eos_id, seeds=None if seed is None else [seed] * len(prompts),
                           on_token=on_row_token)
        results = []
        for row, text in enumerate(texts):
            if cuts[row] < 0:
                text += decoders[row].flush()
                cuts[row] = min((text.find(s) for s in stops if s in text), default=-1)
            results.append(text[:cuts[row]] if cuts[row] >= 0 else text)
        return results

    @torch.no_grad()
    def _prefill(self, tokens: list[int]):
        """The state after `tokens`, fed `chunk_size` at a time (generate prefills the last token)."""
        state = self.model.init_state(1, device=self._device)
        for begin in range(0, len(tokens), self.chunk_size):
            piece = torch.tensor([tokens[begin:begin + self.chunk_size]], device=self._device)
            with _autocast(self._device, self.autocast_dtype):
                state = self.model(piece, state, last_logits_only=True).state  # (the state alone is kept)
        return state

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name

    def get_model_info(self) -> dict:
        return {"model_name": self.name, "model_num_parameters": self.model.num_parameters(),
                "model_dtype": str(next(self.model.parameters()).dtype), "tokenizer": self.tokenizer.name}


_LM_CLASS = None


def lm_class():
    """The lm-eval model class (a subclass of `lm_eval.api.model.LM`), registered as "hierarchos"
    on first use: `lm_eval.simple_evaluate(model="hierarchos", model_args="pretrained=DIR")` works after it."""
    global _LM_CLASS
    if _LM_CLASS is None:
        lm_eval = require_lm_eval()
        cls = type("HierarchosEvalLM", (_HierarchosLMMethods, lm_eval.api.model.LM),
                   {"__module__": __name__, "__doc__": "lm-eval model over a HierarchosLM (see hierarchos.evaluate)."})
        lm_eval.api.registry.register_model(MODEL_NAME)(cls)
        _LM_CLASS = cls
    return _LM_CLASS


def __getattr__(name: str):
    if name == "HierarchosEvalLM":  # `from hierarchos.evaluate import HierarchosEvalLM` imports lm-eval then
        return lm_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- running tasks ---------------------------------------------------------------------------------

def _quiet_git_hash() -> str | None:
    import subprocess

    try:
        return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL,
                                       text=True).strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


@contextlib.contextmanager
def _run_report(evaluator, env_info: bool):
    """simple_evaluate ends by running `git describe` in the working directory (a "fatal: not a git
    repository" line on stderr outside one: made quiet here) and, unless `env_info`, by collecting
    torch's environment report (seconds of subprocesses: skipped for train-time evaluations)."""
    saved = {name: getattr(evaluator, name) for name in ("get_git_commit_hash", "add_env_info")
             if hasattr(evaluator, name)}
    if "get_git_commit_hash" in saved:
        evaluator.get_git_commit_hash = _quiet_git_hash
    if "add_env_info" in saved and not env_info:
        evaluator.add_env_info = lambda storage: None
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(evaluator, name, value)


def evaluate_tasks(lm, tasks: list, *, limit: int | float | None = None, num_fewshot: int | None = None,
                   bootstrap_iters: int = 0, reseed: bool = True, log_samples: bool = False,
                   env_info: bool = True) -> dict:
    """Run lm-eval's `simple_evaluate` on `lm` (a `lm_class()` instance) over names or built tasks.
    Returns {"metrics": {task: {metric: value}}, "results": lm-eval's results (without samples)}.
    `reseed=False` keeps the global RNGs as they are (lm-eval seeds python, numpy and torch by default);
    `env_info=False` leaves out lm-eval's environment report (pip/torch/GPU details; seconds to collect)."""
    import logging

    require_lm_eval()
    import lm_eval.evaluator
    if all(isinstance(task, str) for task in tasks):
        built = load_tasks(tasks)
    elif any(isinstance(task, str) for task in tasks):
        raise TypeError("pass task names or built tasks (load_tasks), not a mix")
    else:
        built = list(tasks)
    seeds = {} if reseed else {"random_seed": None, "numpy_random_seed": None, "torch_random_seed": None}
    level = logging.getLogger("lm_eval").level
    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # lm-eval logs every request type at INFO
    try:
        with _run_report(lm_eval.evaluator, env_info):
            results = lm_eval.simple_evaluate(model=lm, tasks=built, limit=limit, num_fewshot=num_fewshot,
                                              bootstrap_iters=bootstrap_iters, log_samples=log_samples,
                                              task_manager=task_manager(with_lm_eval_tasks=False), **seeds)
    finally:
        logging.getLogger("lm_eval").setLevel(level)
    return {"metrics": flatten_results(results), "results": results}


def make_lm(model, tokenizer, **kwargs):
    """The lm-eval model over an in-memory (model, tokenizer) pair."""
    return lm_class()(model=model, tokenizer=tokenizer, **kwargs)


def make_train_hook(model, tokenizer, task_names: list[str], *, every_epoch: int = 1, every_steps: int = 0,
                    batch_size: int = DEFAULT_BATCH_SIZE, limit=None, autocast_dtype=None, log=print):
    """A Trainer `on_eval(trainer, epoch_end) -> metrics` hook: runs the tasks on the in-memory model
    every `every_epoch` epochs and every `every_steps` optimizer steps (0: off) and returns
    {"eval/<task>/<metric>": value}. Tasks are built now, so a bad name fails before training."""
    tasks = load_tasks(task_names)
    lm = make_lm(model, tokenizer, batch_size=batch_size, autocast_dtype=autocast_dtype, progress=False)

    def on_eval(trainer, epoch_end: bool) -> dict:
        epoch = (trainer.micro_step - 1) // trainer.steps_per_epoch + 1
        due = (epoch_end and every_epoch and epoch % every_epoch == 0) or \
              (every_steps and trainer.opt_step % every_steps == 0)
        if not due:
            return {}
        from .io import capture_rng_state, restore_rng_state

        rng = capture_rng_state()  # whatever lm-eval or a task draws, training's random streams stay put
        try:
            metrics = evaluate_tasks(lm, tasks, limit=limit, reseed=False, env_info=False)["metrics"]
        finally:
            restore_rng_state(rng)
        record = {f"eval/{task}/{metric}": value for task, row in metrics.items() for metric, value in row.items()}
        log(f"eval at step {trainer.opt_step}: " + ", ".join(f"{k[5:]} {v:.4f}" for k, v in record.items()))
        return record

    return on_eval
