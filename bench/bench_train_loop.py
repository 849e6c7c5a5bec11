"""Training tokens/s of the `train` command itself against a byte-level GPT-2 of the same size trained by
a plain compiled loop on the same text, in one run (issue 16's ~30M target: >= 0.7x).

- ours: `hierarchos_cli.py train` as a subprocess, as a user runs it (byte tokenizer, width 512, 3 + 3
  layers, minimal reasoning depth, T=512, B=32 by default; its CUDA defaults: bf16 autocast, the
  window as a CUDA graph, fused AdamW), tokens/s from metrics.jsonl's wall-clock stamps over the
  --steps optimizer steps after --warmup (the first steps hold graph capture and allocator warm-up);
- GPT-2: a Hugging Face `GPT2LMHeadModel` fitted to our parameter count without the DeepEmbed tables
  (`bench/gpt2_baseline.fit_gpt2`, preferring our width: 10 x 512 at the default shape), the same
  byte tokenizer's ids of the same text, random windows of T tokens, B a step; the loop a GPT-2 user
  writes for speed: torch.compile, bf16 autocast, TF32, fused AdamW, gradient clipping to 1.0 (ours
  clips too), timed between two CUDA synchronisations over the same --steps after --warmup.
Both take T x B tokens a step. Ratio = ours / GPT-2. The text defaults to this repository's own
Python and Markdown sources repeated to --corpus-mb megabytes (nothing is downloaded).

Device:  bash bench/gpu.sh train-loop        (the default shape; see gpu.sh)
CPU smoke (seconds; float32, no compile):
    python bench/bench_train_loop.py --device cpu --width 64 --h-layers 1 --l-layers 1 --seq-len 32 \\
        --batch 2 --steps 2 --warmup 1 --corpus-mb 0.2 --json /tmp/train_loop.json
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))

from bench_original import machine_info, rate, run_train_command, timed_span, write_json  # noqa: E402
from gpt2_baseline import build_gpt2, fit_gpt2, gpt2_count  # noqa: E402

HEAD_SIZE = 64


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--h-layers", type=int, default=3)
    p.add_argument("--l-layers", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=60, help="timed optimizer steps per model")
    p.add_argument("--warmup", type=int, default=20, help="untimed optimizer steps first")
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--corpus", default=None, help="a .txt file (default: the repository's sources, repeated)")
    p.add_argument("--corpus-mb", type=float, default=11.0, help="size of the default text in megabytes")
    p.add_argument("--only", choices=("both", "ours", "gpt2"), default="both")
    p.add_argument("--gpt2-compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile GPT-2 (default: on for CUDA)")
    p.add_argument("--ours-args", default="", help="extra flags for our train command (one string; later flags win)")
    p.add_argument("--ours-variants", nargs="+", default=[""], metavar="FLAGS",
                   help="one row of ours per string of further flags, the first the one the ratio is quoted "
                        "for; start a string with a space, or argparse takes it for an option: '' ' --no-compile' "
                        "(as `train` runs by default, and with eager blocks)")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds allowed to our train process")
    p.add_argument("--work-dir", default=None, help="corpus, token cache and outputs (default: a temp dir)")
    p.add_argument("--json", default=None, metavar="OUT")
    return p.parse_args(argv)


def validate(args) -> None:
    """One-line HierarchosError for input the run cannot use."""
    from hierarchos.errors import HierarchosError
    positive = {"--width": args.width, "--h-layers": args.h_layers, "--l-layers": args.l_layers,
                "--seq-len": args.seq_len, "--batch": args.batch, "--steps": args.steps, "--warmup": args.warmup}
    for flag, value in positive.items():
        if value < 1:
            raise HierarchosError(f"{flag} {value}: must be at least 1")
    if args.width % HEAD_SIZE:
        raise HierarchosError(f"--width {args.width}: must be a multiple of {HEAD_SIZE} (the head size); "
                              f"try {max(HEAD_SIZE, round(args.width / HEAD_SIZE) * HEAD_SIZE)}")
    if args.seq_len < 2:
        raise HierarchosError(f"--seq-len {args.seq_len}: must be at least 2")
    if not args.lr > 0:
        raise HierarchosError(f"--lr {args.lr}: must be positive")
    if args.corpus is not None and not os.path.isfile(args.corpus):
        raise HierarchosError(f"--corpus {args.corpus}: no such file; give a .txt file or leave the flag out")
    if args.corpus is None and not args.corpus_mb > 0:
        raise HierarchosError(f"--corpus-mb {args.corpus_mb}: must be positive")
    if args.timeout <= 0:
        raise HierarchosError(f"--timeout {args.timeout}: must be positive")
    for flag, texts in (("--ours-args", [args.ours_args]), ("--ours-variants", args.ours_variants)):
        for text in texts:
            try:
                shlex.split(text)
            except ValueError as exc:
                raise HierarchosError(f"{flag} {text!r}: not a shell-quoted list of flags ({exc})") from None
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise HierarchosError(f"--json {args.json}: no directory {os.path.dirname(os.path.abspath(args.json))}; "
                              "create it first")
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise HierarchosError("--device cuda: no CUDA device here; use --device cpu")


def write_corpus(path: str, megabytes: float) -> int:
    """The repository's own .py and .md files, concatenated and repeated to `megabytes`; returns bytes."""
    try:  # the tracked files only (a device copy also holds carried caches)
        listed = subprocess.run(["git", "-C", REPO, "ls-files", "*.py", "*.md"], capture_output=True, text=True,
                                timeout=30, check=True).stdout.split()
        files = [os.path.join(REPO, f) for f in listed]
    except (OSError, subprocess.SubprocessError):
        files = sorted(glob.glob(os.path.join(REPO, "**", "*.py"), recursive=True) + glob.glob(os.path.join(REPO, "*.md")))
    once = b"".join(open(f, "rb").read() for f in files if os.path.isfile(f))
    target = max(1, int(megabytes * 1e6))
    data = (once * (target // max(1, len(once)) + 1))[:target]
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return len(data)


def ours_flags(args, variant: str = "") -> list[str]:
    """The train command's flags for the shape (minimal reasoning depth, the default, said explicitly),
    then --ours-args, then the variant's."""
    w = str(args.width)
    return ["--tokenizer-path", "byte", "--context_dim", w, "--h_hidden", w, "--l_hidden", w,
            "--h_layers", str(args.h_layers), "--l_layers", str(args.l_layers), "--head_size", str(HEAD_SIZE),
            "--h_cycles", "1", "--max_h_steps", "1", "--max_l_steps", "0",
            "--max_length", str(args.seq_len), "--batch_size", str(args.batch), "--starting-lr", str(args.lr),
            "--device", args.device] + shlex.split(args.ours_args) + shlex.split(variant)


def run_ours(args, corpus: str, work: str, variant: str = "") -> dict:
    log_every, max_steps = timed_span(args.warmup, args.steps)
    out_dir = os.path.join(work, "ours_out")
    argv = ["--train", corpus, "--out-dir", out_dir, "--token-cache", os.path.join(work, "token_cache"),
            *ours_flags(args, variant), "--epochs", "1", "--max-steps", str(max_steps), "--log-every", str(log_every),
            "--val-fraction", "0", "--save-every", "0", "--eval-every-epoch", "0"]
    log_name = "ours.log" if not variant else f"ours_{re.sub(r'[^A-Za-z0-9]+', '_', variant).strip('_')}.log"
    done, records, output = run_train_command(argv, out_dir, os.path.join(work, log_name), args.timeout)
    row = dict(model="hierarchos (train command)" + (f" {variant.strip()}" if variant.strip() else ""),
               variant=variant, argv=argv, **done)
    if records is None:
        return row
    stamps = {r["step"]: r["time"] for r in records if "time" in r and "step" in r}
    if args.warmup not in stamps or max_steps not in stamps:
        return dict(row, status=f"failed: metrics.jsonl has no rows at steps {args.warmup} and {max_steps} "
                               "(did an epoch end first? give a longer --corpus)")
    match = re.search(r"model: ([\d,]+) parameters \(([\d,]+) without DeepEmbed tables\)", output)
    setup = re.search(r"amp (\S+) \| cuda graphs (\w+)", output)
    return dict(row, status="ok", tok_s=rate(args.batch * args.seq_len, args.steps, stamps[args.warmup],
                                               stamps[max_steps]),
                step_s=(stamps[max_steps] - stamps[args.warmup]) / args.steps,
                params=int(match.group(2).replace(",", "")) if match else None,
                params_with_deepembed=int(match.group(1).replace(",", "")) if match else None,
                amp_dtype=setup.group(1) if setup else None, cuda_graphs=setup.group(2) if setup else None,
                final_loss=records[-1].get("loss"), peak_mib=records[-1].get("peak_mem_mib"))


def byte_ids(corpus: str, cache_root: str):
    """The corpus as our byte tokenizer's ids, read through the project's token cache (as `train` reads
    it: the text as one document and its end token), and the vocabulary size."""
    import numpy as np
    import torch
    from hierarchos.data import streaming, token_cache
    from hierarchos.data.sources import DataSpec
    from hierarchos.data.tokenizers import load_tokenizer
    tok = load_tokenizer("byte")
    source = streaming.open_source(DataSpec(train=corpus))
    cache = token_cache.open_cache(token_cache.cache_dir(Path(cache_root), source, "gpt2-byte"), source, tok,
                                   log=lambda line: None)
    return torch.from_numpy(np.asarray(cache.tokens, dtype=np.int64)), tok.vocab_size


def run_gpt2(args, corpus: str, work: str, params_target: int) -> dict:
    """The plain loop: random windows, forward + loss under autocast, backward, clip, fused AdamW."""
    import torch
    dev = torch.device(args.device)
    ids, vocab = byte_ids(corpus, os.path.join(work, "token_cache"))
    if ids.numel() <= args.seq_len + 1:
        return dict(model="GPT-2 (plain loop)", status=f"failed: the corpus has {ids.numel()} tokens, "
                                                          f"fewer than --seq-len + 2")
    L, d = fit_gpt2(params_target, vocab, args.seq_len, args.width)
    compiled = args.gpt2_compile if args.gpt2_compile is not None else dev.type == "cuda"
    row = dict(model="GPT-2 (plain loop)", config=f"L{L}-d{d}", params=gpt2_count(vocab, args.seq_len, L, d),
               compile=compiled, vocab_size=vocab)
    torch.manual_seed(0)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats()
    model = build_gpt2(vocab, args.seq_len, L, d).to(dev)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, fused=dev.type == "cuda")
    fwd = torch.compile(model) if compiled else model
    data = ids.to(dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    span = torch.arange(args.seq_len + 1, device=dev)
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext())

    def step():
        starts = torch.randint(0, data.numel() - args.seq_len - 1, (args.batch, 1), device=dev, generator=gen)
        window = data[starts + span]
        with amp:
            logits = fwd(input_ids=window[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), window[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync()
    row["warmup_s"] = round(time.perf_counter() - t0, 2)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    end = time.perf_counter()
    row.update(status="ok", tok_s=rate(args.batch * args.seq_len, args.steps, start, end),
               step_s=(end - start) / args.steps, final_loss=float(loss.detach()))
    if dev.type == "cuda":
        row["peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return row


def ratio(rows: list[dict], ours: dict | None = None) -> float | None:
    """An ours row's tokens/s over GPT-2's (the first ours row when none is named)."""
    done = [r for r in rows if r.get("status") == "ok"]
    gpt = next((r for r in done if r["model"].startswith("GPT-2")), None)
    ours = ours or next((r for r in rows if r["model"].startswith("hierarchos")), None)
    if gpt is None or ours is None or ours.get("status") != "ok" or not gpt["tok_s"] > 0:
        return None
    return ours["tok_s"] / gpt["tok_s"]


def format_table(rows: list[dict], shape: dict) -> str:
    head = (f"training tokens/s, byte tokenizer, T={shape['seq_len']}, B={shape['batch']} ({shape['device']}; "
            f"{shape['steps']} timed steps after {shape['warmup']})")
    lines = [head, f"{'model':<40} {'params':>12} {'tok/s':>12} {'ms/step':>9} {'ratio':>7} {'peak MiB':>9}  status"]
    for r in rows:
        ok = r.get("status") == "ok"
        params = f"{r['params']:,}" if r.get("params") else "-"
        name = r["model"] + (f" {r['config']}" if r.get("config") else "")
        x = ratio(rows, r) if r["model"].startswith("hierarchos") else (1.0 if ok else None)
        lines.append(f"{name:<40} {params:>12} " + (f"{r['tok_s']:>12,.0f} {r['step_s'] * 1e3:>9.1f}" if ok
                                                     else f"{'-':>12} {'-':>9}")
                     + (f" {x:>7.3f}" if x is not None else f" {'-':>7}")
                     + (f" {r['peak_mib']:>9,}" if r.get("peak_mib") is not None else f" {'-':>9}")
                     + f"  {r.get('status', '?')}")
    x = ratio(rows)
    lines.append(f"hierarchos / GPT-2: {x:.3f}x" if x is not None else "hierarchos / GPT-2: - (needs both rows)")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from hierarchos.errors import HierarchosError
    try:
        validate(args)
    except HierarchosError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    shape = dict(device=args.device, width=args.width, h_layers=args.h_layers, l_layers=args.l_layers,
                 seq_len=args.seq_len, batch=args.batch, steps=args.steps, warmup=args.warmup)
    rows = []
    with contextlib.ExitStack() as stack:
        work = args.work_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_train_loop_"))
        os.makedirs(work, exist_ok=True)
        corpus = args.corpus or os.path.join(work, "corpus.txt")
        if args.corpus is None:
            shape["corpus_bytes"] = write_corpus(corpus, args.corpus_mb)
        if args.only in ("both", "ours"):
            for variant in args.ours_variants:
                print(f"running the train command {variant} ...", flush=True)
                rows.append(run_ours(args, corpus, work, variant))
                print(f"  {rows[-1]['status']}" + (f", {rows[-1]['tok_s']:,.0f} tok/s" if rows[-1]["status"] == "ok"
                                                   else ""), flush=True)
        if args.only in ("both", "gpt2"):
            target = (next((r["params"] for r in rows if r.get("params")), None)
                      or 12 * args.width ** 2 * (args.h_layers + args.l_layers))
            print(f"running GPT-2 fitted to {target:,} parameters ...", flush=True)
            rows.append(run_gpt2(args, corpus, work, target))
            print(f"  {rows[-1]['status']}" + (f", {rows[-1]['tok_s']:,.0f} tok/s" if rows[-1]["status"] == "ok"
                                               else ""), flush=True)
    print(format_table(rows, shape))
    if args.json:
        write_json(args.json, dict(bench="bench_train_loop", argv=sys.argv if argv is None else list(argv),
                                   shape=shape, machine=machine_info(args.device), rows=rows, ratio=ratio(rows),
                                   ratios={r["model"]: ratio(rows, r) for r in rows if r["model"].startswith("hierarchos")},
                                   time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())))
        print(f"wrote {args.json}")
    return 0 if rows and all(r.get("status") == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
