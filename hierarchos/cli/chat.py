"""`chat`: talk to a trained model in the terminal, or script it through --prompt / piped stdin.

Interactive: `>>> ` prompt with readline history, streamed replies, Ctrl+C stops a reply,
Ctrl+D leaves. Scripted (--prompt, or stdin not a terminal): only reply text goes to stdout,
everything else to stderr. Maps flags onto `hierarchos.chat.ChatSession`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
from pathlib import Path

from ..errors import HierarchosError

HELP = "chat with a trained model (streaming REPL, reasoning modes, online learning into its memory)"


def resolve_cuda_graph(requested: bool | None, device, cfg) -> bool:
    """Whether chat steps through a CUDA graph: what the user asked, else on exactly where capture
    works (CUDA, and a state of fixed size: full attention grows its KV cache every token)."""
    if requested is not None:
        return requested
    fixed = not ("attention" in (cfg.h_block, cfg.l_block) and not cfg.window_size)
    return device.type == "cuda" and fixed


def resolve_tf32(requested: bool | None, device) -> bool:
    """Whether float32 matmuls on CUDA may use TF32 tensor cores: what the user asked, else on for CUDA
    (`train` trains with it on). On an H100 it took the default reasoning config's 1,024-token prefill
    from 105.5 to 70.7 ms (BENCHMARKS.md); asking for it off CUDA is a one-line error."""
    import torch

    on_cuda = torch.device(device).type == "cuda"
    if requested and not on_cuda:
        raise HierarchosError(f"--tf32 applies to CUDA matmuls (the model runs on {device}); drop the flag")
    return on_cuda if requested is None else requested


def _captured_with_triton(cuda_graph: bool, device) -> bool:
    """Whether the step is captured on CUDA and Triton can run there: where chat's fused kernels and
    compiled blocks are on by default."""
    import torch

    if not cuda_graph or torch.device(device).type != "cuda":
        return False
    from ..ops.wkv_triton import triton_unavailable_reason

    return not triton_unavailable_reason(device)


def resolve_fused_step(requested: bool | None, cuda_graph: bool, device) -> bool:
    """Whether the captured step runs each RWKV-7 block's one-token time mix as one Triton kernel: what
    the user asked, else on wherever the step is captured on CUDA and Triton can run there (on an
    H100, 1.34x tokens/s at 125m in the minimal reasoning config and 1.72x in the default one, with
    chat's greedy replies unchanged; BENCHMARKS.md). Blocks it does not cover step as before."""
    return requested if requested is not None else _captured_with_triton(cuda_graph, device)


def resolve_compile_step(requested: str | None, cuda_graph: bool, device) -> str:
    """The captured step's torch.compile mode: what the user asked, else "blocks" (each RWKV block compiled,
    the glue around it fused; on an H100 at 125m in the (2,5,5) config 182.6 against 133.3 tokens/s with the
    fused time mix alone, 12 s of compiling at load; BENCHMARKS.md) wherever the step is captured on CUDA
    and inductor's GPU backend (Triton) can run there, "off" elsewhere."""
    if requested is not None:
        return requested
    return "blocks" if _captured_with_triton(cuda_graph, device) else "off"


def resolve_compile_prefill(requested: bool | None, cuda_graph: bool, device) -> bool:
    """Whether the prompt's chunk graphs record compiled RWKV blocks: what the user asked, else on wherever
    the step is captured on CUDA and Triton can run there (on an H100 at 125m, (2,5,5), the prefill of a
    1,024-token prompt 60.9 -> 48.7 ms, paid for by 45-95 s of compiling at load, a few seconds at the
    minimal depth, measured before the compiled graphs went from 36 to 10; BENCHMARKS.md, "Compiled
    blocks in the prefill")."""
    return requested if requested is not None else _captured_with_triton(cuda_graph, device)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-path", "--model_path", required=True, metavar="DIR",
                   help="a model directory (from train), or a quantized one / .gguf file (from quantize)")
    p.add_argument("--device", default="auto",
                   help="auto | cpu | cuda | dml (default: auto); quantized models: auto | cpu | vulkan "
                        "(matmuls on a Vulkan device, built by setup.sh --vulkan)")
    p.add_argument("--prompt", default=None, metavar="TEXT", help="answer this one turn and exit (reply on stdout)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--cuda-graph", "--cuda_graph", action=argparse.BooleanOptionalAction, default=None,
                   help="CUDA: step through a captured CUDA graph (the sync-free step and sampling on the device, "
                        "replayed per token). Default: on for a full-precision model on CUDA whose state has a fixed "
                        "size (not full attention), off elsewhere")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=None,
                   help="CUDA: float32 matmuls on TF32 tensor cores (10 mantissa bits, as train uses). Default: on "
                        "on CUDA; --no-tf32 for full float32")
    p.add_argument("--compile-step", "--compile_step", choices=("off", "step", "blocks"), default=None,
                   help="with --cuda-graph: torch.compile the captured step (step: the whole step, blocks: each "
                        "RWKV block; compiled once at load, its seconds in the capture time). Default: blocks "
                        "wherever the step is captured on CUDA and Triton is installed (a block that fails to "
                        "compile runs eagerly), off elsewhere")
    p.add_argument("--fused-step", "--fused_step", action=argparse.BooleanOptionalAction, default=None,
                   help="with --cuda-graph: each RWKV-7 block's one-token time mix as one Triton kernel. "
                        "Default: on wherever the step is captured on CUDA and Triton is installed")
    p.add_argument("--compile-prefill", "--compile_prefill", action=argparse.BooleanOptionalAction, default=None,
                   help="with --cuda-graph: the prompt's chunk graphs record torch.compile'd RWKV blocks (dynamic "
                        "lengths, compiled once at load). Default: on wherever the step is captured on CUDA and "
                        "Triton is installed")
    sampling = p.add_argument_group("sampling")
    sampling.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default: 0.7)")
    sampling.add_argument("--top-k", "--top_k", type=int, default=40)
    sampling.add_argument("--top-p", "--top_p", type=float, default=0.9)
    sampling.add_argument("--repetition-penalty", "--repetition_penalty", type=float, default=1.2)
    sampling.add_argument("--max-new-tokens", "--max_new_tokens", type=int, default=512)
    sampling.add_argument("--h-halt-thresh", "--h_halt_thresh", type=float, default=None,
                          help="manager pondering early-exit threshold in normal mode (default: the model's, 0.9)")
    learning = p.add_argument_group("online learning into the long-term memory")
    learning.add_argument("--learn", action=argparse.BooleanOptionalAction, default=True,
                          help="update the memory after surprising exchanges (default: on)")
    learning.add_argument("--surprise-threshold", "--surprise_threshold", type=float, default=2.0, metavar="X",
                          help="update only when the exchange's loss (nats/token) exceeds X (default: 2.0)")
    learning.add_argument("--ltm_lr", "--ltm-lr", type=float, default=0.01, help="LTM learning rate (default: 0.01)")
    learning.add_argument("--ltm-schedule-steps", "--ltm_schedule_steps", type=int, default=100,
                          help="updates per cosine cycle of the LTM learning rate (default: 100)")
    learning.add_argument("--ltm-schedule-min-lr", "--ltm_schedule_min_lr", type=float, default=1e-5)
    learning.add_argument("--static-ltm-lr", "--static_ltm_lr", action="store_true",
                          help="keep the LTM learning rate constant")
    learning.add_argument("--enable-quantized-learning", "--enable_quantized_learning", action="store_true",
                          help="quantized models: learn into the memory of the full-precision shadow model "
                               "(--shadow-model-path) and write it back into the quantized file on /save")
    learning.add_argument("--shadow-model-path", "--shadow_model_path", metavar="DIR", default=None,
                          help="the full-precision model directory the quantized model was made from")
    learning.add_argument("--ltm-lora-path", "--ltm_lora_path", metavar="FILE", default=None,
                          help="memory delta file: loaded at start when it exists, written by /save and at exit "
                               "(default: DIR/ltm_delta.safetensors, written by /save only)")


def _check(args: argparse.Namespace) -> None:
    if args.temperature < 0:
        raise HierarchosError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k < 0:
        raise HierarchosError(f"--top-k must be >= 0, got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise HierarchosError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.repetition_penalty <= 0:
        raise HierarchosError(f"--repetition-penalty must be > 0, got {args.repetition_penalty}")
    if args.max_new_tokens < 1:
        raise HierarchosError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.h_halt_thresh is not None and not 0 < args.h_halt_thresh <= 1:
        raise HierarchosError(f"--h-halt-thresh must be in (0, 1], got {args.h_halt_thresh}")
    if args.ltm_lr < 0 or args.ltm_schedule_min_lr < 0 or args.ltm_schedule_steps < 1:
        raise HierarchosError("--ltm_lr and --ltm-schedule-min-lr must be >= 0 and --ltm-schedule-steps >= 1")


def _setup_readline():
    try:
        import readline
    except ImportError:  # Windows without pyreadline: input() still works
        return None
    history = Path(os.environ.get("HIERARCHOS_HISTORY", Path.home() / ".hierarchos_history"))
    try:
        readline.read_history_file(history)
    except OSError:
        pass
    readline.set_history_length(1000)
    return lambda: readline.write_history_file(history)


def run(args: argparse.Namespace) -> int:
    _check(args)
    from ..chat import ChatSession, LearnConfig
    from ..data.tokenizers import load_tokenizer
    from ..generate import SamplingConfig
    from ..io import load_model_dir
    from .train import pick_device

    from ..quant.quantized_dir import is_quantized_path

    quantized = is_quantized_path(args.model_path)
    if not quantized and not Path(args.model_path).is_dir():
        raise HierarchosError(f"--model-path {args.model_path}: not a directory; pass a model directory from train "
                              "or a quantized model (directory or .gguf file) from quantize")
    extra = {"model_dir": args.model_path}
    if quantized:
        if args.cuda_graph or args.tf32:  # an explicit --cuda-graph / --tf32; the default (None) is off here
            flag = "--cuda-graph" if args.cuda_graph else "--tf32"
            raise HierarchosError(f"{flag} applies to full-precision models on CUDA; quantized models run on "
                                  "the CPU kernel or Vulkan: drop the flag")
        args.cuda_graph = False
        device = _quantized_device(args.device)
        model, meta, tokenizer, extra = _load_quantized_session(args, on_vulkan=args.device == "vulkan")
        path = Path(args.model_path)
        extra.setdefault("model_dir", path if path.is_dir() else path.parent)
    else:
        if args.device == "vulkan":
            raise HierarchosError(f"--device vulkan runs quantized models only; {args.model_path} is full precision: "
                                  "quantize it (hierarchos quantize --model-path DIR --out-dir QDIR --qtype Q4_0) and "
                                  "chat with QDIR, or use --device cpu / cuda")
        if args.enable_quantized_learning or args.shadow_model_path:
            raise HierarchosError("--enable-quantized-learning / --shadow-model-path apply to quantized models only; "
                                  f"{args.model_path} is a full-precision model directory (it learns directly)")
        device = pick_device(args.device)
        if args.cuda_graph and device.type != "cuda":
            raise HierarchosError(f"--cuda-graph needs a CUDA device (the model runs on {device}); drop the flag")
        if resolve_tf32(args.tf32, device):
            import torch

            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        model, meta = load_model_dir(args.model_path, device=device)
        args.cuda_graph = resolve_cuda_graph(args.cuda_graph, device, model.cfg)
        tokenizer = load_tokenizer(args.model_path)
    if (args.compile_step not in (None, "off") or args.fused_step or args.compile_prefill) and not args.cuda_graph:
        raise HierarchosError("--compile-step / --fused-step / --compile-prefill apply to the captured step and "
                              "prefill: chat with --cuda-graph (CUDA, a full-precision model with a fixed-size state) "
                              "or drop them")
    compile_step = resolve_compile_step(args.compile_step, args.cuda_graph, device)
    compile_prefill = resolve_compile_prefill(args.compile_prefill, args.cuda_graph, device)
    if (args.compile_step is None and compile_step != "off") or (args.compile_prefill is None and compile_prefill):
        # the defaults: a block that fails to compile runs eagerly
        import torch._dynamo

        torch._dynamo.config.suppress_errors = True
    template = meta.get("prompt_template") or "plain"
    scripted = args.prompt is not None or not sys.stdin.isatty()
    session = ChatSession(
        model, tokenizer, template=template, device=device,
        sampling=SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
                                seed=args.seed),
        h_halt_thresh=args.h_halt_thresh,
        learn=LearnConfig(enabled=args.learn, surprise_threshold=args.surprise_threshold, lr=args.ltm_lr,
                          schedule_steps=args.ltm_schedule_steps, schedule_min_lr=args.ltm_schedule_min_lr,
                          static_lr=args.static_ltm_lr),
        delta_path=args.ltm_lora_path, cuda_graph=args.cuda_graph,
        step_options={"compile_step": False if compile_step == "off" else compile_step,
                      "fused_step": resolve_fused_step(args.fused_step, args.cuda_graph, device),
                      "compile_prefill": compile_prefill},
        **extra,
        out=sys.stdout, info=sys.stderr if scripted else sys.stdout, log=sys.stderr)
    if session.warmup_seconds is not None:
        print(f"CUDA graph of the step captured at load in {1000 * session.warmup_seconds:.0f} ms", file=sys.stderr)
    if session.delta_path is not None and session.delta_path.exists():
        session.load_delta(session.delta_path)
        print(f"loaded memory delta {session.delta_path}", file=sys.stderr)

    with _model_frozen_out_of_the_collector():
        if args.prompt is not None:
            session.turn(args.prompt)
        elif scripted:
            session.run_lines(sys.stdin)
        else:
            save_history = _setup_readline()
            print(f"hierarchos chat: {args.model_path} ({model.num_parameters():,} parameters, "
                  f"{extra.get('format_name', 'full precision')}, {template} template, device {device}); "
                  "/help for commands, Ctrl+D to leave", file=sys.stderr)
            try:
                session.run_interactive()
            finally:
                if save_history is not None:
                    try:
                        save_history()
                    except OSError:
                        pass
        if args.ltm_lora_path and session.updates:
            print(f"saved memory delta to {session.save_delta()}", file=sys.stderr)
            if session.on_save is not None:
                print(session.on_save(session), file=sys.stderr)
        return 0


@contextlib.contextmanager
def _model_frozen_out_of_the_collector():
    """The loaded model is ~180k objects the collector tracks (125m, fp32: modules, parameters, tables):
    a full collection walked them all, ~80 ms, a stall that can land mid-reply. Frozen after a collection,
    the collector walks only what the conversation makes (BENCHMARKS.md); unfrozen after, so a caller in
    the same process (a test) gets its collector back as it was."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _quantized_device(name: str):
    import torch

    if name in ("auto", "cpu"):
        return torch.device("cpu")
    if name == "vulkan":  # checked before the model loads; tensors stay on the CPU, QuantLinear goes to the device
        from ..quant.vulkan import require_vulkan

        require_vulkan("--device vulkan")
        return torch.device("cpu")
    raise HierarchosError(f"--device {name}: quantized models run on the CPU kernel or Vulkan; use --device cpu "
                          "or --device vulkan, or chat with the full-precision model directory on cuda/dml")


def _load_quantized_session(args: argparse.Namespace, on_vulkan: bool = False):
    """The quantized model, its metadata and tokenizer, and the ChatSession arguments for it:
    a format label, and either the shadow model that learns (--enable-quantized-learning) with
    the re-quantizing save hook, or the reason learning is off. on_vulkan: matmuls uploaded to the device."""
    import torch

    from ..io import load_model_dir
    from ..quant import kernel
    from ..quant.quantized_dir import load_quantized, rewrite_memory

    model, meta, tokenizer, content = load_quantized(args.model_path)
    cpu_side = f"{kernel.backend_name()} kernel, {kernel.get_isa()}, {kernel.get_threads()} threads"
    if on_vulkan:
        from ..quant.model import place_on_vulkan
        from ..quant.vulkan import vk_device_name

        place_on_vulkan(model)
        cpu_side = f"matmuls on Vulkan {vk_device_name()}, the rest on the {cpu_side}"
    extra = {"format_name": f"{content.qtype} GGUF ({cpu_side})"}
    if not args.enable_quantized_learning:
        if args.shadow_model_path:
            raise HierarchosError("--shadow-model-path needs --enable-quantized-learning")
        extra["learn_unavailable"] = ("quantized weights do not learn; add --enable-quantized-learning "
                                      "--shadow-model-path FULL_MODEL_DIR")
        return model, meta, tokenizer, extra
    if not args.shadow_model_path:
        raise HierarchosError("--enable-quantized-learning needs --shadow-model-path DIR (the full-precision model "
                              "this quantized model was made from)")
    shadow, _ = load_model_dir(args.shadow_model_path, device="cpu")
    if shadow.cfg.to_dict() != model.cfg.to_dict() or not torch.equal(shadow.memory.keys, model.memory.keys):
        raise HierarchosError(f"--shadow-model-path {args.shadow_model_path}: not the model {args.model_path} was "
                              "quantized from (config or memory keys differ); pass the matching model directory")
    # the shadow's memory is the truth: a delta of earlier sessions (default: in the shadow's directory)
    # applies to it, and the session copies it into the quantized model
    def requantize(session) -> str:
        path = rewrite_memory(content, session.model)
        return f"re-quantized {path} with the learned memory"

    extra.update(learner=shadow, on_save=requantize, model_dir=args.shadow_model_path)
    return model, meta, tokenizer, extra
