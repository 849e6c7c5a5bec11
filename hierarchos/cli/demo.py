"""`demo`: a smoke run of an untrained tiny byte-level model.

Builds the model, runs the parallel forward over a fixed prompt, checks the token-by-token
form gives the same last-token logits, then greedily generates a few bytes and reports speed.
With --model-path it samples from a trained model; --samples N draws N continuations as one
batch (`generate_batch`: sample i is what seed + i gives alone).
"""

from __future__ import annotations

import argparse
import time

from ..errors import HierarchosError

HELP = ("generate from a trained model directory (--model-path), or smoke-test a tiny untrained "
        "model: parallel vs step check and greedy generation")

PROMPT = "Hierarchos plans slowly and acts quickly. "
PARITY_TOL = 1e-3  # float32, relative to the largest logit


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=32, metavar="N",
                        help="number of tokens to generate (default: 32)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for the weights (default: 0)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu",
                        help="where to run (default: cpu; auto = cuda when available)")
    parser.add_argument("--model-path", help="a trained model directory (from `train`) to generate from")
    parser.add_argument("--prompt", default=None, help="text to continue (default: a fixed line)")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=40)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--repetition-penalty", type=float, default=1.2)
    parser.add_argument("--samples", type=int, default=1, metavar="N",
                        help="with --model-path: N continuations generated as one batch, seeded seed..seed+N-1")


def _pick_device(name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise HierarchosError("--device cuda: no CUDA device is available to this torch "
                              f"({torch.__version__}); use --device cpu")
    return torch.device(name)


def _printable(text: str) -> str:
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..config import tiny_config

    if args.tokens < 0:
        raise HierarchosError(f"--tokens must be >= 0, got {args.tokens}")
    if args.samples < 1:
        raise HierarchosError(f"--samples must be >= 1, got {args.samples}")
    if args.samples > 1 and not args.model_path:
        raise HierarchosError("--samples applies to --model-path (the untrained smoke model generates greedily)")
    device = _pick_device(args.device)
    if args.model_path:
        return _generate_from(args, device)
    from ..model import HierarchosLM  # after the flag checks: a bad flag fails fast

    torch.manual_seed(args.seed)

    config = tiny_config(vocab_size=256)  # byte-level: token id = UTF-8 byte
    model = HierarchosLM(config).to(device).eval()
    n_params, n_core = model.num_parameters(), model.num_parameters(with_deepembed=False)
    print(f"model: tiny byte-level hierarchos, {n_params:,} parameters ({n_core:,} without DeepEmbed tables), "
          f"device {device}, torch {torch.__version__}")

    prompt = torch.tensor([list(PROMPT.encode("utf-8"))], dtype=torch.long, device=device)  # (1, T)
    with torch.no_grad():
        parallel = model(prompt, state=None)
        state = model.init_state(1, device=device)
        for t in range(prompt.shape[1]):
            stepped = model.step(prompt[:, t], state)
            state = stepped.state
        last = parallel.logits[0, -1]
        diff = (stepped.logits[0] - last).abs().max().item()
        scale = max(last.abs().max().item(), 1.0)
        print(f"parallel vs step, last-token logits: max abs diff {diff:.3e}")
        aux = ", ".join(f"{k}={float(v):.4g}" for k, v in sorted(parallel.aux.items()))
        if aux:
            print(f"aux: {aux}")

        generated: list[int] = []
        logits = stepped.logits
        start = time.perf_counter()
        for _ in range(args.tokens):
            token = logits.argmax(dim=-1)  # (1,)
            generated.append(int(token.item()))
            out = model.step(token, state)
            logits, state = out.logits, out.state
        elapsed = time.perf_counter() - start

    rate = f"{len(generated) / elapsed:.1f} tokens/s" if generated and elapsed > 0 else "n/a"
    text = bytes(b for b in generated if b < 256).decode("utf-8", errors="replace")
    print(f"greedy generation: {len(generated)} tokens, {rate}")
    print(f"output (untrained, so gibberish): {_printable(text)}")
    print("note: training and chat arrive with the `train` and `chat` subcommands.")

    if diff > PARITY_TOL * scale:
        print(f"FAIL: parallel and step forms disagree (max abs diff {diff:.3e} > {PARITY_TOL * scale:.3e})")
        return 1
    return 0


def _generate_from(args: argparse.Namespace, device) -> int:
    """Load a trained model directory and stream a sampled continuation of the prompt."""
    import sys

    from ..data.tokenizers import load_tokenizer
    from ..generate import SamplingConfig, generate
    from ..io import load_model_dir

    model, meta = load_model_dir(args.model_path, device=device)
    model.eval()
    tokenizer = load_tokenizer(args.model_path)
    prompt = args.prompt if args.prompt is not None else "ROMEO:\n"
    history = meta.get("training_history") or []
    trained = ", ".join(f"{h.get('dataset')} ({h.get('tokens'):,} tokens, {h.get('steps')} steps)"
                        for h in history if isinstance(h, dict)) or "unknown data"
    print(f"model: {args.model_path}, {model.num_parameters():,} parameters, trained on {trained}")
    print(f"prompt: {_printable(prompt)}")
    cfg = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         repetition_penalty=args.repetition_penalty, max_new_tokens=args.tokens, seed=args.seed)
    if args.samples > 1:
        return _samples(model, tokenizer, prompt, cfg, args)
    decoder = tokenizer.decode_stream()
    start = time.perf_counter()
    sys.stdout.write(prompt)
    def show(token, _step_output) -> None:
        sys.stdout.write(decoder.push(token))
        sys.stdout.flush()

    new, _ = generate(model, tokenizer.encode(prompt), cfg, eos_id=tokenizer.eos_id, on_token=show)
    sys.stdout.write(decoder.flush() + "\n")
    elapsed = time.perf_counter() - start
    print(f"[{len(new)} tokens, {len(new) / max(elapsed, 1e-9):.1f} tokens/s]")
    return 0


def _samples(model, tokenizer, prompt: str, cfg, args) -> int:
    """N continuations of the prompt in one batch, printed one after another when all are done."""
    from ..generate import generate_batch

    n = args.samples
    ids = tokenizer.encode(prompt)
    result = generate_batch(model, [ids] * n, cfg, eos_id=tokenizer.eos_id, seeds=[args.seed + i for i in range(n)])
    for i, tokens in enumerate(result.tokens):
        print(f"--- sample {i + 1} (seed {args.seed + i}) ---")
        print(prompt + tokenizer.decode(tokens))
    total = sum(len(t) for t in result.tokens)
    print(f"[{n} samples, {total} tokens in {result.seconds:.2f} s: {total / max(result.seconds, 1e-9):.1f} tokens/s "
          f"for the batch; first tokens after {result.first_token_seconds * 1000:.0f} ms]")
    return 0
