"""How much each quantized format costs a TRAINED model: bits per byte on held-out text (issue 22).

Rows: fp32, then per format (Q8_0, Q4_0, INT4, Q2_K; plus the mixed variants `quantize` writes by
default) the GGUF scored through `eval`'s own path (the C++ kernel, as `chat` runs it) and, beside
it, the same weights dequantized back to float and run in PyTorch: the difference between the two is
what the kernel path adds (8-bit activation blocks), the difference to fp32 what the format loses.
Also file size and CPU decode tokens/s at batch 1.

Data (--corpus bundled, the default): the bundled plays, split by this script: the last
--heldout-fraction of every play (cut at a line break) is held out and never trained on; the rest is
the training set; the bundled BPE tokenizer.
--corpus code: Python sources (bench_quality.build_corpus: held-out *files*, deterministic for one
file tree), --code-train-bytes of training text, the first --heldout-bytes of the validation files
held out, byte tokenizer; recipe --size code. The texts are written to WORK/heldout.txt and
WORK/calibration.txt; --texts-from DIR scores with the texts a run elsewhere wrote (a model trained
on the GPU machine and scored here: its site-packages differ, so the corpus is not rebuilt):
  python bench/bench_quant_quality.py --train --corpus code --size code --device cuda --no-table --work-dir W
  python bench/bench_quant_quality.py --model-path W/model-code --texts-from W --corpus code --json ...
  --train          trains the model through the real `train` CLI (recipe below, fixed seed and flags)
  --model-path DIR reuses an existing model directory (it must not have seen the held-out text)

Full recipe (trains, then scores; about 20 min of an idle 2-core CPU for --size small):
  python bench/bench_quant_quality.py --train --size small --sensitivity --json bench/records/quant_quality.json
This session's CPU figures (BENCHMARKS.md) ran that recipe in two pieces on a shared machine: the run was
killed after epoch 5 (step 270; that checkpoint's scores: bench/records/quant_quality_cpu_small_epoch5.json),
resumed to its end, and the final model scored:
  python hierarchos_cli.py train --resume-from-ckpt /tmp/hq/model-small/checkpoints/step-00000270 --out-dir /tmp/hq/model-small --threads 1
  python bench/bench_quant_quality.py --model-path /tmp/hq/model-small --work-dir /tmp/hq --sensitivity --json ...
A larger model on a GPU machine: --train --size base --device cuda (training only; scoring stays on
the CPU kernel, which is what the table is about).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Training recipes: architecture + optimisation flags handed to `hierarchos_cli.py train` as they are.
# Widths are multiples of 256 so every Linear fits Q2_K's 256-element super-blocks.
SIZES = {
    "small": dict(arch=["--context_dim", "256", "--h_hidden", "256", "--l_hidden", "256", "--head_size", "64",
                        "--h_layers", "2", "--l_layers", "2", "--h_cycles", "1", "--max_h_steps", "1",
                        "--max_l_steps", "0"],
                  optim=["--max_length", "256", "--batch_size", "8", "--starting-lr", "5e-4", "--min-lr", "5e-5",
                         "--warmup-steps", "40", "--epochs", "10"]),
    "base": dict(arch=["--context_dim", "512", "--h_hidden", "512", "--l_hidden", "512", "--head_size", "64",
                       "--h_layers", "4", "--l_layers", "4", "--h_cycles", "1", "--max_h_steps", "1",
                       "--max_l_steps", "0"],
                 optim=["--max_length", "512", "--batch_size", "16", "--starting-lr", "6e-4", "--min-lr", "6e-5",
                        "--warmup-steps", "100", "--epochs", "30"]),
    # ~11.7M parameters on Python sources, byte tokenizer, one pass over --code-train-bytes (GPU machine)
    "code": dict(arch=["--context_dim", "256", "--h_hidden", "256", "--l_hidden", "256", "--head_size", "64",
                       "--h_layers", "4", "--l_layers", "4", "--h_cycles", "1", "--max_h_steps", "1",
                       "--max_l_steps", "0"],
                 optim=["--max_length", "512", "--batch_size", "32", "--starting-lr", "1.5e-3", "--min-lr", "1.5e-4",
                        "--warmup-steps", "100", "--epochs", "1"]),
}
SEED = 1234


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def split_corpus(work: Path, heldout_fraction: float) -> tuple[Path, Path]:
    """Write work/train/<play>.txt (each play's head) and work/heldout.txt (every play's tail)."""
    from hierarchos.data import bundled_corpus_path

    train_dir = work / "train"
    train_dir.mkdir(parents=True, exist_ok=True)
    tails = []
    for play in sorted(Path(bundled_corpus_path()).glob("*.txt")):
        text = play.read_text(encoding="utf-8")
        cut = text.rfind("\n", 0, int(len(text) * (1 - heldout_fraction))) + 1  # at a line break
        (train_dir / play.name).write_text(text[:cut], encoding="utf-8")
        tails.append(text[cut:])
    heldout = work / "heldout.txt"
    heldout.write_text("\n".join(tails), encoding="utf-8")
    return train_dir, heldout


def code_corpus(work: Path, train_bytes: int, heldout_bytes: int) -> tuple[Path, Path, str]:
    """The Python-sources corpus of bench_quality: (train JSONL, held-out text file, calibration text)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_quality import build_corpus, read_texts

    corpus = build_corpus(work / "corpus", train_bytes, 4 * heldout_bytes)
    train = work / "corpus" / corpus["train"]["file"]
    heldout_text = "".join(read_texts(work / "corpus" / corpus["val"]["file"]))
    heldout_text = heldout_text[:heldout_text.rfind("\n", 0, heldout_bytes) + 1]
    heldout = work / "heldout.txt"
    heldout.write_text(heldout_text, encoding="utf-8")
    calibration = "".join(read_texts(train))[:200_000]
    return train, heldout, calibration


def train_command(train_dir: Path, heldout: Path, out_dir: Path, size: str, device: str, threads: int,
                  max_steps: int | None, tokenizer: str | None = None) -> list[str]:
    from hierarchos.data import bundled_tokenizer_path

    recipe = SIZES[size]
    cmd = [sys.executable, str(ROOT / "hierarchos_cli.py"), "train", "--train", str(train_dir),
           "--val", str(heldout), "--tokenizer-path", tokenizer or bundled_tokenizer_path(), "--out-dir", str(out_dir),
           "--seed", str(SEED), "--device", device, "--threads", str(threads), "--log-every", "10", "--save-every", "0",
           "--keep-checkpoints", "1", *recipe["arch"], *recipe["optim"]]
    if max_steps:
        cmd += ["--max-steps", str(max_steps)]
    return cmd


# ---- scoring ---------------------------------------------------------------------------------------

# (label, qtype, mix, calibrated): the quantized variants scored; `auto` is what `quantize` writes by default
VARIANTS = [("Q8_0", "Q8_0", "pure", False),
            ("Q4_0 pure", "Q4_0", "pure", False), ("Q4_0", "Q4_0", "auto", False),
            ("Q4_0 +imatrix", "Q4_0", "auto", True),
            ("INT4 pure", "INT4", "pure", False), ("INT4", "INT4", "auto", False),
            ("INT4 +imatrix", "INT4", "auto", True),
            ("Q2_K pure", "Q2_K", "pure", False), ("Q2_K", "Q2_K", "auto", False),
            ("Q2_K +imatrix", "Q2_K", "auto", True)]


def bpb(model, tokenizer, text: str, chunk: int) -> float:
    from hierarchos import evaluate

    return evaluate.bits_per_byte(model, tokenizer, text, chunk_size=chunk)["bits_per_byte"]


def unigram_bpb(tokenizer, train_text: str, heldout_text: str) -> float:
    """The floor a model must beat: add-one unigram token frequencies of the training text."""
    import numpy as np

    counts = np.bincount(np.asarray(tokenizer.encode(train_text)), minlength=tokenizer.vocab_size) + 1.0
    logp = np.log2(counts / counts.sum())
    held = np.asarray([tokenizer.eos_id, *tokenizer.encode(heldout_text)])[1:]
    return float(-logp[held].sum() / len(heldout_text.encode("utf-8")))


def dequantized_float_model(model_path: Path, tensors: dict):
    """The full-precision model with every quantized tensor replaced by its dequantized blocks, run in
    PyTorch (the head untied: it has its own format in the file)."""
    import numpy as np
    import torch
    from torch import nn

    from hierarchos.io import load_model_dir
    from hierarchos.quant import formats
    from hierarchos.quant.gguf_io import QuantTensor

    model, _ = load_model_dir(model_path)
    head = nn.Linear(model.cfg.context_dim, model.cfg.vocab_size, bias=False)
    head.weight.data.copy_(model.embed.weight.data)  # untied, starting from the tied weights
    model.lm_head = head
    state = model.state_dict()
    for name, value in tensors.items():
        if isinstance(value, QuantTensor):  # the numpy reference: the ground truth for the blocks' floats
            state[name] = torch.from_numpy(formats.dequantize(np.asarray(value.data), value.qtype, value.cols))
        elif name in state:
            state[name] = torch.from_numpy(np.array(value)).to(state[name].dtype)
    model.load_state_dict(state, strict=True)
    return model.eval()


def decode_tokens_per_s(model, steps: int, rounds: int = 3) -> float:
    """Batch-1 step() speed (chat's generation path), best of `rounds` after a warm-up."""
    import torch

    with torch.no_grad():
        state = model.init_state(1)
        token = torch.zeros(1, dtype=torch.long)
        for _ in range(4):
            state = model.step(token, state).state
        best = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(steps):
                out = model.step(token, state)
                state, token = out.state, out.logits.argmax(-1)
            best = min(best, (time.perf_counter() - start) / steps)
    return 1.0 / best


def role(name: str) -> str:
    """A Linear weight's role with block indices dropped: the unit of the sensitivity scan."""
    parts = [p for p in name.removesuffix(".weight").split(".") if not p.isdigit() and p != "blocks"]
    return ".".join(parts)


def sensitivity(model_path: Path, tokenizer, text: str, chunk: int, qtypes=("Q4_0", "Q2_K")) -> list[dict]:
    """bpb on `text` (training text, not the held-out) with ONE role's tensors quantized (dequantized
    back to float), everything else fp32: which tensors a mix should keep in a higher format."""
    import numpy as np
    import torch

    from hierarchos.io import load_model_dir
    from hierarchos.quant import formats
    from hierarchos.quant.gguf_io import QuantTensor
    from hierarchos.quant.model import quantize_tensors

    base, _ = load_model_dir(model_path)
    reference = bpb(base.eval(), tokenizer, text, chunk)
    rows = []
    for qtype in qtypes:
        quantized = {n: v for n, v in quantize_tensors(base, qtype).items()
                     if isinstance(v, QuantTensor) and v.qtype == qtype}
        roles: dict[str, list[str]] = {}
        for name in quantized:
            roles.setdefault(role(name), []).append(name)
        for group, names in sorted(roles.items()):
            model = dequantized_float_model(model_path, {})
            state = model.state_dict()
            for name in names:
                v = quantized[name]
                state[name] = torch.from_numpy(formats.dequantize(np.asarray(v.data), qtype, v.cols))
            model.load_state_dict(state)
            score = bpb(model, tokenizer, text, chunk)
            params = sum(quantized[n].rows * quantized[n].cols for n in names)
            rows.append({"qtype": qtype, "role": group, "tensors": len(names), "parameters": params,
                         "bpb": score, "delta_pct": 100 * (score / reference - 1)})
            log(f"sensitivity {qtype} {group:<28} {len(names)} tensors {params:>9,} params: "
                f"{rows[-1]['delta_pct']:+.3f}%")
    return [{"reference_bpb": reference}] + rows


def evaluate_all(model_path: Path, work: Path, heldout_text: str, train_text: str, calibration: Path,
                 args) -> dict:
    import torch

    from hierarchos import evaluate
    from hierarchos.cli.quantize import report
    from hierarchos.data.tokenizers import load_tokenizer
    from hierarchos.quant import kernel
    from hierarchos.quant.gguf_io import read_gguf
    from hierarchos.quant.quantized_dir import gguf_name, quantize_model_dir

    tokenizer = load_tokenizer(str(model_path))
    fp32, _, _ = evaluate.load_model(model_path, "cpu")
    fp32_bytes = (model_path / "model.safetensors").stat().st_size
    rows = [{"format": "unigram (train counts)", "bpb": unigram_bpb(tokenizer, train_text, heldout_text)},
            {"format": "fp32", "path": "PyTorch", "bpb": bpb(fp32, tokenizer, heldout_text, args.chunk),
             "file_bytes": fp32_bytes, "decode_tok_s": decode_tokens_per_s(fp32, args.decode_steps)}]
    log(f"fp32 bpb {rows[-1]['bpb']:.4f}, unigram {rows[0]['bpb']:.4f}")
    del fp32
    for label, qtype, mix, calibrated in VARIANTS:
        if (args.only and qtype not in args.only) or (args.default_mixes and (calibrated or mix != "auto")
                                                       and qtype != "Q8_0"):
            continue
        out = work / f"q-{label.replace(' ', '_').replace('+', '')}"
        info = quantize_model_dir(model_path, out, qtype, mix=mix,
                                  calibration=calibration if calibrated else None)
        log(report(info, out))
        file = out / gguf_name(qtype)
        model, tok, kind = evaluate.load_model(out, "cpu")  # eval's own loader: chat's kernel path
        kernel_bpb = bpb(model, tok, heldout_text, args.chunk)
        tok_s = decode_tokens_per_s(model, args.decode_steps)
        del model
        float_bpb = bpb(dequantized_float_model(model_path, read_gguf(file).tensors), tokenizer, heldout_text,
                        args.chunk)
        ref = rows[1]["bpb"]
        rows.append({"format": label, "qtype": qtype, "mix": mix, "calibrated": calibrated, "path": kind,
                     "bpb": kernel_bpb, "bpb_dequantized_pytorch": float_bpb,
                     "format_loss_pct": 100 * (float_bpb / ref - 1), "kernel_loss_pct": 100 * (kernel_bpb / ref - 1),
                     "file_bytes": file.stat().st_size, "decode_tok_s": tok_s,
                     "kept": info["mix"]["kept"], "storage": info["storage"]})
        log(f"{label}: kernel {kernel_bpb:.4f} ({rows[-1]['kernel_loss_pct']:+.2f}%), dequantized PyTorch "
            f"{float_bpb:.4f} ({rows[-1]['format_loss_pct']:+.2f}%), {file.stat().st_size / 2**20:.2f} MiB, "
            f"{tok_s:.1f} tok/s")
    return {"rows": rows, "kernel": f"{kernel.backend_name()} {kernel.get_isa()}", "threads": torch.get_num_threads()}


def print_table(rows: list[dict]) -> None:
    fp32 = next(r for r in rows if r["format"] == "fp32")
    print("| format | bpb (kernel, as eval/chat) | vs fp32 | bpb (dequantized, PyTorch) | vs fp32 | file MiB | decode tok/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "file_bytes" not in r:
            print(f"| {r['format']} | {r['bpb']:.4f} | {100 * (r['bpb'] / fp32['bpb'] - 1):+.2f}% | | | | |")
        elif r["format"] == "fp32":
            print(f"| fp32 | {r['bpb']:.4f} | | | | {r['file_bytes'] / 2**20:.2f} | {r['decode_tok_s']:.1f} |")
        else:
            print(f"| {r['format']} | {r['bpb']:.4f} | {r['kernel_loss_pct']:+.2f}% | {r['bpb_dequantized_pytorch']:.4f} "
                  f"| {r['format_loss_pct']:+.2f}% | {r['file_bytes'] / 2**20:.2f} | {r['decode_tok_s']:.1f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", action="store_true", help="train the model first (recipe --size)")
    ap.add_argument("--model-path", help="an existing model directory instead of --train")
    ap.add_argument("--size", choices=SIZES, default="small")
    ap.add_argument("--device", default="cpu", help="training device (scoring runs on the CPU)")
    ap.add_argument("--max-steps", type=int, default=None, help="cap the training steps (smoke runs)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads for training and scoring (1: robust on a shared machine; decode tok/s is per thread)")
    ap.add_argument("--work-dir", default="/tmp/hierarchos_quant_quality")
    ap.add_argument("--heldout-fraction", type=float, default=0.08)
    ap.add_argument("--corpus", choices=("bundled", "code"), default="bundled")
    ap.add_argument("--code-train-bytes", type=int, default=40_000_000)
    ap.add_argument("--heldout-bytes", type=int, default=100_000, help="--corpus code: held-out text scored")
    ap.add_argument("--texts-from", help="read heldout.txt and calibration.txt from this directory (no corpus build)")
    ap.add_argument("--chunk", type=int, default=512, help="tokens per forward when scoring (eval's default)")
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--only", nargs="+", choices=("Q8_0", "Q4_0", "INT4", "Q2_K"), help="score only these formats")
    ap.add_argument("--default-mixes", action="store_true",
                    help="score only what `quantize --qtype Q` writes by default (Q8_0, and the auto mixes)")
    ap.add_argument("--sensitivity", action="store_true",
                    help="also quantize one tensor role at a time (Q4_0, Q2_K) and score it on training text")
    ap.add_argument("--no-table", action="store_true", help="skip the table (with --sensitivity: the scan alone)")
    ap.add_argument("--note", default="", help="free text kept in the JSON record (how the model was made)")
    ap.add_argument("--json", help="write the raw records here")
    args = ap.parse_args(argv)

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    tokenizer, train_text = None, None
    if args.texts_from:
        train_dir, heldout = None, Path(args.texts_from) / "heldout.txt"
        train_text = (Path(args.texts_from) / "calibration.txt").read_text(encoding="utf-8")
    elif args.corpus == "code":
        train_dir, heldout, train_text = code_corpus(work, args.code_train_bytes, args.heldout_bytes)
    else:
        train_dir, heldout = split_corpus(work, args.heldout_fraction)
    if args.corpus == "code":
        tokenizer = "byte"
    model_path = Path(args.model_path) if args.model_path else work / f"model-{args.size}"
    train_cmd = train_command(train_dir, heldout, model_path, args.size, args.device, args.threads, args.max_steps,
                              tokenizer) if train_dir else ["(trained elsewhere; texts from " + args.texts_from + ")"]
    if args.train:
        if not train_dir:
            raise SystemExit("--train with --texts-from: train where the corpus is built")
        log("train:", " ".join(train_cmd))
        start = time.time()
        subprocess.run(train_cmd, check=True)
        log(f"trained in {time.time() - start:.0f} s")
    if not (model_path / "model.safetensors").is_file():
        raise SystemExit(f"{model_path}: no model; pass --train or --model-path DIR")

    import torch

    torch.set_num_threads(args.threads)
    os.environ["HIERARCHOS_THREADS"] = str(args.threads)
    from hierarchos.quant import kernel

    kernel.set_threads(args.threads)
    if train_text is None:
        train_text = "".join(p.read_text(encoding="utf-8") for p in sorted(train_dir.glob("*.txt")))
    heldout_text = heldout.read_text(encoding="utf-8")
    # calibration and the sensitivity scan read training text only: nothing is tuned on the held-out text
    calibration = work / "calibration.txt"
    calibration.write_text(train_text, encoding="utf-8")
    record = {"command": " ".join([sys.executable, *sys.argv]), "train_command": train_cmd,
              "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "uptime_before": os.getloadavg(),
              "heldout_bytes": len(heldout_text.encode("utf-8")), "model_path": str(model_path), "note": args.note}
    if args.sensitivity:
        from hierarchos.data.tokenizers import load_tokenizer

        record["sensitivity"] = sensitivity(model_path, load_tokenizer(str(model_path)), train_text[:20000],
                                            args.chunk)
    if not args.no_table:
        record.update(evaluate_all(model_path, work, heldout_text, train_text, calibration, args))
        print_table(record["rows"])
    record["uptime_after"] = os.getloadavg()
    print(f"load average before / after: {record['uptime_before']} / {record['uptime_after']}")
    if args.json:
        from hierarchos.io import atomic_write_text

        atomic_write_text(args.json, json.dumps(record, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
