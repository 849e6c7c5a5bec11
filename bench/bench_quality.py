"""Learning quality (issue 19): hierarchos vs a Hugging Face GPT-2 of equal non-embedding size, ablations,
the time-mix wiring, and what the mechanisms do (long-range recall, ACT pondering, length).

One command per table (`--table main|ablations|wiring|blocks|recall|act|length|all`), each writing
WORK/<table>.json; every training run is cached under WORK/runs/ (a rerun of the same command
resumes where a 10-minute device call stopped; --fresh retrains).

Corpus (`build_corpus`, deterministic for one file tree): every `*.py` file under the roots (default:
this Python's stdlib, then its site-packages; a root never walks into another root, `__pycache__`
and symlinks are skipped), visited in the order of blake2b(seed, root label, POSIX relative path);
a file is kept when it decodes as UTF-8, is not empty and its content was not seen before (exact
duplicates, e.g. vendored copies, appear once). blake2b of the content picks the split: VAL_PERMILLE
per mille of the files are validation, the rest training -- held-out *files*, and identical content
can never be on both sides. Each split takes documents in visit order until its byte budget; the
last one is cut at a line end so the split holds at most the budget (a smaller budget is a prefix
of a larger one). Files: WORK/corpus/train-<bytes>.jsonl, val-<bytes>.jsonl ({"text": ...} per
file) and manifest-*.json (roots, Python version, counts, sha256 of each file). Tokenizer: bytes
(hierarchos' `byte`: id = byte value, EOS = 257 after each document), the same ids for both models.

Training: hierarchos through the real `train` command (a fresh model directory of the variant's
config, then `hierarchos_cli.py train --model-path ... --epochs 1`: one pass over unseen data,
validation at the epoch end on the held-out files); GPT-2 (`transformers.GPT2LMHeadModel`, SDPA,
dropout 0, n_embd = hierarchos' width, n_layer chosen so the non-embedding parameter counts match;
torch.compile and bf16 autocast on CUDA) in this process with the same optimizer (AdamW betas
0.9/0.95, weight decay 0.01 on matrices, fused on CUDA), warm-up (5%) + cosine to LR/10, clip 1.0,
batch, window and token budget. Every configuration gets the same 3-point LR sweep; tables report
the best point and all three. Validation bits per byte = summed NLL / ln 2 / UTF-8 bytes of the
validation text; hierarchos reads the validation text as --batch rows (as `train` does; ~31k tokens a
row at the defaults) with each row's state carried (its design), GPT-2 in windows of its training
length (at most T - 1 tokens of context). tokens/s is the steady rate
(the training loop's logged rate for hierarchos, after the first logged window; GPT-2's after 10
warm-up steps), so compilation and CUDA-graph capture are not counted; "equal GPU time" gives
GPT-2 the hierarchos run's steady training seconds at GPT-2's steady rate.

Device (one H200), each table alone (the 10-minute limit: rerun the same command to continue):
  python bench/bench_quality.py --table main --work /tmp/hq
  python bench/bench_quality.py --table ablations --work /tmp/hq
  ... wiring | recall | act | length
CPU smoke (end to end, tiny sizes):  python bench/bench_quality.py --device cpu --tiny --table all
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from hierarchos.config import (DEFAULT_WIRING, LEGACY_WIRING, MINIMAL_DEPTH, SEED_DEPTH, TIME_MIX_WIRINGS,  # noqa: E402
                               ModelConfig)
from hierarchos.io import atomic_write_text  # noqa: E402

CORPUS_VERSION = 1
VAL_PERMILLE = 20
EOS_ID = 257  # hierarchos' byte tokenizer: 256 byte ids, then <pad>, <eos>, <bos>, <unk>
BYTE_VOCAB = 260
TABLES = ("main", "ablations", "wiring", "blocks", "recall", "act", "length")
# memory "off": the config has no switch that removes the memory read; a write threshold no surprise
# reaches means no slot is ever written, so the read returns only the learned initial slots
MEMORY_OFF = dict(ltm_write_threshold=1e30)
# the "default" rows' reasoning depth, the seeds' (2,5,5), named in every run's fields (hierarchos_fields):
# the run cache's keys never depend on ModelConfig's default depth (minimal since these tables moved it)
DEPTH_255 = SEED_DEPTH

# ---- the corpus ---------------------------------------------------------------------------------------


def default_roots() -> list[tuple[str, Path]]:
    paths = sysconfig.get_paths()
    roots = [("stdlib", Path(paths["stdlib"]))]
    if Path(paths["purelib"]).is_dir():
        roots.append(("site-packages", Path(paths["purelib"])))
    return roots


def _digest(*parts: bytes, size: int = 16) -> bytes:
    h = hashlib.blake2b(digest_size=size)
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))  # length-prefixed: ("ab", "c") != ("a", "bc")
        h.update(part)
    return h.digest()


def list_sources(roots: list[tuple[str, Path]], seed: int) -> list[tuple[str, str, Path]]:
    """Every *.py file under the roots as (label, POSIX relative path, path), in the seeded hash order."""
    resolved = [r.resolve() for _, r in roots]
    found = []
    for label, root in roots:
        root = root.resolve()
        others = {r for r in resolved if r != root}
        for directory, dirs, files in os.walk(root):
            here = Path(directory)
            dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not (here / d).is_symlink()
                             and (here / d).resolve() not in others)
            for name in sorted(files):
                path = here / name
                if name.endswith(".py") and not path.is_symlink() and path.is_file():
                    found.append((label, path.relative_to(root).as_posix(), path))
    key = lambda item: _digest(str(seed).encode(), item[0].encode(), item[1].encode())  # noqa: E731
    return sorted(found, key=key)


def is_validation(content: bytes) -> bool:
    return int.from_bytes(_digest(b"split", content, size=8), "little") % 1000 < VAL_PERMILLE


def _cut(text: str, budget: int) -> str:
    """The longest prefix of whole lines whose UTF-8 encoding fits in `budget` bytes."""
    data = text.encode("utf-8")[:budget]
    end = data.rfind(b"\n")
    return data[:end + 1].decode("utf-8") if end >= 0 else ""


def build_corpus(out: Path, train_bytes: int, val_bytes: int, roots=None, seed: int = 0) -> dict:
    """Write train-<train_bytes>.jsonl and val-<val_bytes>.jsonl under `out` (see the module doc);
    returns the manifest (also written). Reuses files whose manifest matches."""
    roots = roots or default_roots()
    out.mkdir(parents=True, exist_ok=True)
    tag = f"{train_bytes}-{val_bytes}-s{seed}"
    manifest_path = out / f"manifest-{tag}.json"
    ident = dict(version=CORPUS_VERSION, roots=[[label, str(p)] for label, p in roots], seed=seed,
                 train_budget=train_bytes, val_budget=val_bytes, val_permille=VAL_PERMILLE,
                 python=platform.python_version())
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if {k: manifest.get(k) for k in ident} == ident and all(
                (out / manifest[s]["file"]).is_file() for s in ("train", "val")):
            return manifest
    splits = {"train": dict(budget=train_bytes, docs=[], bytes=0, full=False),
              "val": dict(budget=val_bytes, docs=[], bytes=0, full=False)}
    seen = set()
    for label, rel, path in list_sources(roots, seed):
        if all(s["full"] for s in splits.values()):
            break
        try:
            content = path.read_bytes()
            text = content.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        key = _digest(content)
        if not text or key in seen:
            continue
        seen.add(key)
        split = splits["val" if is_validation(content) else "train"]
        if split["full"]:
            continue
        room = split["budget"] - split["bytes"]
        if len(content) > room:
            text = _cut(text, room)
            split["full"] = True
            if not text:
                continue
        split["docs"].append((label, rel, text))
        split["bytes"] += len(text.encode("utf-8"))
    manifest = dict(ident)
    for name, split in splits.items():
        fname = f"{name}-{split['budget']}-s{seed}.jsonl"
        body = "".join(json.dumps({"text": text}) + "\n" for _, _, text in split["docs"])
        atomic_write_text(out / fname, body)
        manifest[name] = dict(file=fname, files=len(split["docs"]), bytes=split["bytes"],
                              reached_budget=split["full"], sha256=hashlib.sha256(body.encode()).hexdigest(),
                              first=[f"{label}:{rel}" for label, rel, _ in split["docs"][:3]])
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2))
    return manifest


def read_texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line]


def byte_tokens(texts: list[str]) -> np.ndarray:
    """The byte tokenizer's ids of the documents, EOS after each (what `train --tokenizer-path byte` reads)."""
    parts = []
    for text in texts:
        parts.append(np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64))
        parts.append(np.array([EOS_ID], dtype=np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


# ---- the long-range recall task -----------------------------------------------------------------------

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def make_recall_doc(rng: np.random.Generator, filler: str, n_facts: int, gap_bytes: int, n_queries: int,
                    ascii_filler: str | None = None) -> dict:
    """One document: `n_facts` lines "fact KEY = VALUE" (KEY 6 random letters, distinct; VALUE 6 random
    digits), then `gap_bytes` to `gap_bytes` + `gap_slack(gap_bytes)` bytes of filler text (a random slice
    of `filler`, whole lines, in which no key occurs: a slice whose last line runs past that bound is
    drawn again, so a file of very long lines cannot stretch the gap), then `n_queries` lines "query KEY = VALUE" for distinct facts in random order.
    Returns {"text", "answers": [(byte offset of VALUE in text, VALUE)]}. ASCII only: offsets are byte
    offsets. The answer to a query is only in its fact line, at least gap_bytes earlier. `ascii_filler`:
    filler's ASCII text when the caller made it already (`make_recall_docs`: once for all documents,
    not a whole-corpus copy per document)."""
    if n_queries > n_facts:
        raise ValueError("n_queries must be <= n_facts")
    keys: list[str] = []
    while len(keys) < n_facts:
        key = "".join(rng.choice(list(LETTERS), 6))
        if key not in keys:
            keys.append(key)
    values = ["".join(rng.choice(list("0123456789"), 6)) for _ in keys]
    facts = "".join(f"fact {k} = {v}\n" for k, v in zip(keys, values))
    clean = filler.encode("ascii", "ignore").decode("ascii") if ascii_filler is None else ascii_filler
    if len(clean) < gap_bytes + 1:
        raise ValueError(f"filler text too short ({len(clean)} ASCII bytes) for a {gap_bytes}-byte gap")
    longest = gap_bytes + gap_slack(gap_bytes)
    for _ in range(10_000):
        start = int(rng.integers(0, len(clean) - gap_bytes))
        start = clean.rfind("\n", 0, start) + 1
        end = clean.find("\n", start + gap_bytes)
        gap = clean[start:(end + 1 if end >= 0 else len(clean))]
        if gap_bytes <= len(gap) <= longest and not any(k in gap for k in keys):
            break
    else:
        raise ValueError(f"filler text has no slice of whole lines {gap_bytes}-{longest} bytes long without "
                         "the keys in 10,000 draws: its lines are too long for this gap")
    if not gap.endswith("\n"):
        gap += "\n"
    text, answers = facts + gap, []
    for i in rng.permutation(n_facts)[:n_queries]:
        line = f"query {keys[i]} = "
        answers.append((len(text) + len(line), values[i]))
        text += line + values[i] + "\n"
    return {"text": text, "answers": answers}


def gap_slack(gap_bytes: int) -> int:
    """How far past `gap_bytes` a recall document's filler may run (it ends at a line's end)."""
    return max(256, gap_bytes // 8)


def make_recall_docs(n_docs: int, filler: str, n_facts: int, gap_bytes: int, n_queries: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    clean = filler.encode("ascii", "ignore").decode("ascii")
    return [make_recall_doc(rng, filler, n_facts, gap_bytes, n_queries, clean) for _ in range(n_docs)]


# ---- models -------------------------------------------------------------------------------------------


def hierarchos_fields(args, **overrides) -> dict:
    """The model fields of a run: the scale's widths, byte vocabulary, training length, the default
    time-mix wiring by name (see `run_spec_fields`) and the (2,5,5) depth by value (the tables' "default"
    rows mean that depth whatever ModelConfig's default becomes); then overrides."""
    w = args.width
    fields = dict(vocab_size=BYTE_VOCAB, context_dim=w, h_hidden=w, l_hidden=w, head_size=min(64, w),
                  max_length=args.seq_len, **TIME_MIX_WIRINGS[DEFAULT_WIRING], **DEPTH_255)
    if args.tiny:  # smoke sizes; the reasoning caps too (2,2,2: "default" and "depth 2,2,2" coincide here)
        fields.update(h_layers=1, l_layers=1, persistent_dim=8, ltm_slots=32, ltm_key_dim=16, ltm_val_dim=16,
                      ltm_topk=2, ltm_chunk=16, wkv_chunk_size=16, rosa_window=256, max_h_steps=2, max_l_steps=2)
    fields.update(overrides)
    ModelConfig(**fields).validate()
    return fields


def run_spec_fields(fields: dict) -> dict:
    """The fields as a run's cache key holds them: a wiring field equal to hierarchos' own wiring is
    left out, as every run before the wiring fields existed (and before x070's became the default)
    left it out, so those runs keep their keys and a key naming no wiring field means ours."""
    legacy = TIME_MIX_WIRINGS[LEGACY_WIRING]
    return {k: v for k, v in fields.items() if not (k in legacy and legacy[k] == v)}


def non_embedding_params(model) -> int:
    """Parameters minus the lookup tables (token embedding, ROSA and DeepEmbed tables)."""
    total = model.num_parameters(with_deepembed=False)
    total -= model.embed.weight.numel()
    if model.rosa_embed is not None:
        total -= model.rosa_embed.weight.numel()
    return total


def gpt2_layers_for(target: int, width: int) -> int:
    """GPT-2 blocks whose non-embedding parameters come nearest `target`: 12 d^2 + 13 d a block
    (attention 4 d^2 + 4 d, MLP 8 d^2 + 5 d, two LayerNorms 4 d), plus the final LayerNorm (2 d)."""
    return max(1, round((target - 2 * width) / (12 * width * width + 13 * width)))


def gpt2_model(width: int, n_layer: int, seq_len: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=BYTE_VOCAB, n_positions=seq_len, n_embd=width, n_layer=n_layer,
                     n_head=max(1, width // 64), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=EOS_ID, eos_token_id=EOS_ID)
    cfg._attn_implementation = "sdpa"
    model = GPT2LMHeadModel(cfg)
    non_emb = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("transformer.wte",
                                                                                    "transformer.wpe")))
    return model, non_emb


# ---- runs (cached) ------------------------------------------------------------------------------------


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def cached(args, name: str, spec: dict, fn, need_model: bool = False) -> dict:
    """fn() once per spec: a run with the same spec under another name (the default configuration is a
    row of main, ablations and wiring) is found by the spec's hash and reused. With `need_model`, a
    cached run whose model directory is not on this machine (runs carried from another device call
    keep only their JSON) is trained again."""
    key = _key(spec)
    path = Path(args.work) / "runs" / f"{name}-{key}.json"
    same = sorted((Path(args.work) / "runs").glob(f"*-{key}.json"))
    if same and not args.fresh:
        found = json.loads(same[0].read_text())
        if not need_model or (Path(found.get("model_dir", "")) / "hierarchos_config.json").is_file():
            return found
        # the record stays the table's figure; the copy trained for its model is returned, not kept
        return {**fn(), "spec": spec, "retrained_for_model": True, "recorded": found}
    result = {**fn(), "spec": spec}
    atomic_write_text(path, json.dumps(result, indent=2, default=float))
    return result


def lr_schedule(step: int, total: int, lr: float) -> float:
    from hierarchos.train.schedule import lr_at

    return lr_at(step, total, lr, lr / 10, max(1, total // 20), False)


def train_hierarchos(args, corpus: dict, fields: dict, lr: float, name: str, train_file: str | None = None,
                     val_file: str | None = None, need_model: bool = False, rate_run: bool = False) -> dict:
    """Train through `hierarchos_cli.py train`; returns val_bpb, steady tokens/s, model dir, counts
    (`need_model`: see `cached`; `rate_run`: the same point again, alone, for its rate: see `solo_rate`)."""
    spec = dict(kind="hierarchos", fields=run_spec_fields(fields), lr=lr, batch=args.batch, seq_len=args.seq_len, seed=args.seed,
                train=train_file or corpus["train"]["file"], val=val_file or corpus["val"]["file"],
                train_sha=corpus["train"]["sha256"], device=args.device, compile=args.compile,
                validation="batch-rows")  # `train` validates over --batch_size rows (was one row)
    if rate_run:
        spec["rate_run"] = "solo"
    model_cfg = ModelConfig(**fields)
    if model_cfg.max_l_steps > 0:  # the worker's last shadow pass records a graph (hrm.py; was none)
        spec["shadow_gradient"] = "last-pass"
    if model_cfg.max_h_steps > 1:  # every pondering pass records a one-step graph (hrm.py; was the last only)
        spec["ponder_gradient"] = "every-pass"

    def run() -> dict:
        from hierarchos.data.tokenizers import build_byte_tokenizer
        from hierarchos.io import save_model_dir
        from hierarchos.model import HierarchosLM

        run_dir = Path(args.work) / "models" / f"{name}-{_key(spec)}"
        with _BUILD_LOCK:  # the global seed and the initial weights of one run at a time (--jobs)
            torch.manual_seed(args.seed)
            model = HierarchosLM(ModelConfig(**fields))
            save_model_dir(run_dir / "init", model, build_byte_tokenizer())
        out = run_dir / "out"
        cmd = [sys.executable, str(ROOT / "hierarchos_cli.py"), "train", "--model-path", str(run_dir / "init"),
               "--train", str(Path(args.corpus_dir) / spec["train"]), "--val", str(Path(args.corpus_dir) / spec["val"]),
               "--out-dir", str(out), "--epochs", "1", "--batch-size", str(args.batch), "--max-length",
               str(args.seq_len), "--starting-lr", str(lr), "--min-lr", str(lr / 10), "--seed", str(args.seed),
               "--device", args.device, "--token-cache", str(Path(args.work) / "token_cache"),
               "--log-every", str(args.log_every), "--keep-checkpoints", "1"]
        if args.device != "cpu":  # said either way: `train`'s own default compiles only under its CUDA graphs
            cmd.append("--compile" if args.compile else "--no-compile")
        run_id, sharing = DEVICE_RUNS.start()  # runs on the device now (itself included), any process's
        started = time.perf_counter()
        try:
            with open(run_dir / "train.log", "w") as log:
                proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                      env={**os.environ, "PYTHONPATH": str(ROOT)})
        finally:
            solo = DEVICE_RUNS.end(run_id, sharing)
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            tail = (run_dir / "train.log").read_text()[-2000:]
            raise SystemExit(f"{name}: train exited {proc.returncode}; log tail:\n{tail}")
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
        final = [r for r in records if r.get("val_bpb") is not None]
        rates = [r["tokens_per_s"] for r in records[1:]] or [r["tokens_per_s"] for r in records]
        steps = records[-1]["step"]
        tokens = steps * args.batch * args.seq_len
        rate = statistics.median(rates)
        return dict(val_bpb=final[-1]["val_bpb"] if final else None, val_loss=final[-1]["val_loss"] if final else None,
                    tokens_per_s=rate, train_tokens=tokens, steps=steps, steady_train_s=tokens / rate,
                    wall_s=wall, concurrent_runs_at_start=sharing, solo=solo, non_embedding_params=non_embedding_params(model),
                    params=model.num_parameters(), model_dir=str(out), final_train_loss=records[-1]["loss"])

    return cached(args, name, spec, run, need_model)


def _gpt2_val_bpb(model, tokens: np.ndarray, val_bytes: int, seq_len: int, device, autocast) -> float:
    model.eval()
    nll, windows = 0.0, []
    for start in range(0, len(tokens) - 1, seq_len):
        windows.append(tokens[start:start + seq_len + 1])
    with torch.no_grad():
        for i in range(0, len(windows), 16):
            group = windows[i:i + 16]
            width = max(len(w) for w in group)
            x = torch.full((len(group), width), EOS_ID, dtype=torch.long)
            y = torch.full((len(group), width), -100, dtype=torch.long)
            for j, w in enumerate(group):
                x[j, :len(w)] = torch.as_tensor(w)
                y[j, :len(w) - 1] = torch.as_tensor(w[1:])
            x, y = x[:, :-1].to(device), y[:, :-1].to(device)
            with autocast():
                logits = model(input_ids=x).logits
            nll += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum").item()
    model.train()
    return nll / math.log(2) / val_bytes


def train_gpt2(args, corpus: dict, n_layer: int, lr: float, name: str, train_file: str | None = None) -> dict:
    spec = dict(kind="gpt2", width=args.width, n_layer=n_layer, lr=lr, batch=args.batch, seq_len=args.seq_len,
                seed=args.seed, train=train_file or corpus["train"]["file"], val=corpus["val"]["file"],
                device=args.device, compile=args.compile)

    def run() -> dict:
        import contextlib

        device = torch.device(args.device)
        torch.manual_seed(args.seed)
        model, non_emb = gpt2_model(args.width, n_layer, args.seq_len)
        model.to(device)
        cuda = device.type == "cuda"
        autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
        forward = torch.compile(model) if (cuda and args.compile) else model
        decay, no_decay = [], []
        for pname, p in model.named_parameters():
            (no_decay if p.ndim < 2 or "wte" in pname or "wpe" in pname else decay).append(p)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=lr, betas=(0.9, 0.95), fused=True if cuda else None)
        train = byte_tokens(read_texts(Path(args.corpus_dir) / spec["train"]))
        val_texts = read_texts(Path(args.corpus_dir) / spec["val"])
        val_bytes = sum(len(t.encode("utf-8")) for t in val_texts)
        n_windows = (len(train) - 1) // args.seq_len
        order = np.random.default_rng(args.seed).permutation(n_windows)
        total = n_windows // args.batch
        if total < 1:
            raise SystemExit(f"{name}: too few training tokens for one batch")
        warm, t0, losses = min(10, total // 4), None, []
        for step in range(total):
            idx = order[step * args.batch:(step + 1) * args.batch]
            batch = torch.as_tensor(np.stack([train[i * args.seq_len:i * args.seq_len + args.seq_len + 1] for i in idx]))
            batch = batch.to(device, non_blocking=True)
            for group in opt.param_groups:
                group["lr"] = lr_schedule(step, total, lr)
            with autocast():
                logits = forward(input_ids=batch[:, :-1]).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if step % args.log_every == 0 or step == total - 1:
                losses.append(loss.item())
            if step + 1 == warm:
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
        if cuda:
            torch.cuda.synchronize()
        steady_tokens = (total - warm) * args.batch * args.seq_len
        rate = steady_tokens / max(time.perf_counter() - t0, 1e-9) if t0 is not None else float("nan")
        val_tokens = byte_tokens(val_texts)
        bpb = _gpt2_val_bpb(model, val_tokens, val_bytes, args.seq_len, device, autocast)
        tokens = total * args.batch * args.seq_len
        return dict(val_bpb=bpb, tokens_per_s=rate, train_tokens=tokens, steps=total, steady_train_s=tokens / rate,
                    non_embedding_params=non_emb, final_train_loss=losses[-1])

    return cached(args, name, spec, run)


_BUILD_LOCK = threading.Lock()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DeviceRuns:
    """Training runs on this machine's device across every bench_quality process and thread (two
    tables side by side share one GPU, and each table's --jobs runs share it too): one append-only
    file, a line per run's start and end. A run is solo when no other was running when it started
    and none started before it ended; a start whose process died (a table cut by its timeout) no
    longer counts as running."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def _events(self) -> list[tuple[str, str]]:
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [tuple(line.split()) for line in lines if len(line.split()) == 2]

    def _append(self, word: str, run_id: str) -> None:
        with open(self.path, "a") as f:  # O_APPEND: a short line lands whole, whoever else writes
            f.write(f"{word} {run_id}\n")

    def running(self) -> set[str]:
        events = self._events()
        ended = {r for w, r in events if w == "end"}
        return {r for w, r in events if w == "start" and r not in ended and _pid_alive(int(r.split(":")[0]))}

    def start(self) -> tuple[str, int]:
        """A new run's id and how many runs (itself included) are on the device now."""
        run_id = f"{os.getpid()}:{os.urandom(6).hex()}"
        self._append("start", run_id)
        return run_id, len(self.running())

    def end(self, run_id: str, sharing: int) -> bool:
        """Marks the run ended; whether it trained alone the whole time."""
        events = self._events()
        mine = events.index(("start", run_id)) if ("start", run_id) in events else len(events)
        others_started = any(w == "start" and r != run_id for w, r in events[mine + 1:])
        self._append("end", run_id)
        return sharing == 1 and not others_started


DEVICE_RUNS = DeviceRuns(Path(os.environ.get("HIERARCHOS_QUALITY_RUN_LOG",
                                             Path(tempfile.gettempdir()) / "hierarchos_quality_runs.log")))


def prefetch(args, corpus, configs: list[tuple[str, dict]]) -> None:
    """With --jobs N > 1, train every (configuration, LR) point of hierarchos `configs` ((label,
    fields) pairs) N at a time in concurrent `train` subprocesses, so the sequential sweeps that
    follow read them from the cache. A small model's training step is bound by kernel launches, so
    several runs share one GPU at a better total rate; their tokens/s are then rates under sharing
    (each run records `concurrent_runs_at_start`). The first run starts alone: the others start once
    it has built the validation token cache they share."""
    if args.jobs <= 1:
        return
    calls = [(fields, lr, f"{label}-lr{lr:g}") for label, fields in configs for lr in args.lrs]
    if not calls:
        return
    from hierarchos.data.token_cache import INDEX

    val_caches = Path(args.work) / "token_cache"
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(train_hierarchos, args, corpus, *calls[0])]
        # the others wait until the first has built the shared validation cache (renamed into place
        # whole, so its index existing means it is complete): two builders of one cache would race
        while not futures[0].done() and not any(val_caches.glob(f"val-*/{INDEX}")):
            time.sleep(0.5)
        futures += [pool.submit(train_hierarchos, args, corpus, *call) for call in calls[1:]]
        for future in futures:
            future.result()


def sweep(args, corpus, label: str, fields: dict | None = None, n_layer: int | None = None) -> dict:
    """The LR sweep of one configuration: every point and the best (lowest validation bits per byte)."""
    points = []
    for lr in args.lrs:
        if fields is not None:
            points.append(train_hierarchos(args, corpus, fields, lr, f"{label}-lr{lr:g}"))
        else:
            points.append(train_gpt2(args, corpus, n_layer, lr, f"{label}-lr{lr:g}"))
    # a diverged point (None or NaN bits per byte) never wins
    best = min(points, key=lambda r: r["val_bpb"] if r["val_bpb"] is not None and math.isfinite(r["val_bpb"])
               else float("inf"))
    return dict(label=label, best=best, points=points)


# ---- tables -------------------------------------------------------------------------------------------


def _row(sweep_result: dict) -> str:
    b = sweep_result["best"]
    pts = " ".join(f"{p['spec']['lr']:g}:{p['val_bpb']:.3f}" for p in sweep_result["points"])
    return (f"{sweep_result['label']:24s} {b['non_embedding_params']:>12,} {b['spec']['lr']:>8g} "
            f"{b['val_bpb']:>8.4f} {b['tokens_per_s']:>10,.0f}  [{pts}]")


HEADER = f"{'configuration':24s} {'non-emb par':>12s} {'best lr':>8s} {'val bpb':>8s} {'tokens/s':>10s}  [lr:bpb]"

REASONING = {"default": {}, "minimal": MINIMAL_DEPTH}  # "default": DEPTH_255, the seeds' depth


def solo_rate(args, corpus, label: str, fields: dict, swept: dict) -> tuple[float, str]:
    """A configuration's training rate with the device to itself, for the equal-GPU-time runs: its best
    point's if that run trained alone, else its fastest lone point's (sharing only slows a run), else
    its best LR trained again alone (a spec of its own, so the shared run stays the table's figure).
    Points reused from tables trained with --jobs shared the device; a record from before runs noted
    `solo` counts as shared."""
    best = swept["best"]
    if best.get("solo"):
        return best["tokens_per_s"], "best point"
    lone = [r for r in swept["points"] if r.get("solo")]
    if lone:
        return max(r["tokens_per_s"] for r in lone), "fastest lone point"
    again = train_hierarchos(args, corpus, fields, best["spec"]["lr"], f"{label}-solo-lr{best['spec']['lr']:g}",
                             rate_run=True)
    return again["tokens_per_s"], "best LR trained again alone"


def table_main(args, corpus) -> dict:
    out = {}  # no --jobs here: equal GPU time needs solo rates
    fields = {label: hierarchos_fields(args, **overrides) for label, overrides in REASONING.items()}
    for label in REASONING:
        out[f"hierarchos-{label}"] = sweep(args, corpus, f"hierarchos-{label}", fields[label])
    ref = out["hierarchos-default"]["best"]["non_embedding_params"]
    n_layer = gpt2_layers_for(ref, args.width)
    gpt = out["gpt2"] = sweep(args, corpus, "gpt2", n_layer=n_layer)
    # equal GPU time: GPT-2 at its best LR for the seconds each hierarchos configuration's best point
    # trains at its solo rate
    equal_time = {}
    for label in REASONING:
        h = out[f"hierarchos-{label}"]["best"]
        rate, rate_from = solo_rate(args, corpus, f"hierarchos-{label}", fields[label], out[f"hierarchos-{label}"])
        seconds = h["train_tokens"] / rate
        want = int(seconds * gpt["best"]["tokens_per_s"])
        big = build_corpus(Path(args.corpus_dir), want, args.val_bytes, args.roots, args.seed)
        r = train_gpt2(args, big, n_layer, gpt["best"]["spec"]["lr"], f"gpt2-time-of-{label}",
                       train_file=big["train"]["file"])
        equal_time[label] = dict(seconds=seconds, solo_tokens_per_s=rate, rate_from=rate_from,
                                 hierarchos_bpb=h["val_bpb"], hierarchos_tokens=h["train_tokens"], gpt2_bpb=r["val_bpb"],
                                 gpt2_tokens=r["train_tokens"], wanted_tokens=want,
                                 corpus_short=not big["train"]["reached_budget"])
    out["equal_gpu_time"] = equal_time
    print(HEADER)
    for key in ("hierarchos-default", "hierarchos-minimal", "gpt2"):
        print(_row(out[key]))
    print("equal GPU time (hierarchos' training seconds at its solo rate; GPT-2 at its best LR and steady rate):")
    for label, e in equal_time.items():
        print(f"  {label:10s} {e['seconds']:8.1f} s ({e['solo_tokens_per_s']:,.0f} tok/s, {e['rate_from']}): hierarchos "
              f"{e['hierarchos_bpb']:.4f} ({e['hierarchos_tokens']:,} tok)  GPT-2 {e['gpt2_bpb']:.4f} "
              f"({e['gpt2_tokens']:,} tok{', corpus too small' if e['corpus_short'] else ''})")
    return out


def ablation_variants() -> dict:
    """Each component switched off (or each knob moved) from the minimal depth, the depth every quality
    table so far favours (main: minimal at or below (2,5,5) at 2.4x less GPU time a token); the deeper
    reasoning depths are rows of their own. grad_steps only acts where a loop makes several passes, so
    its row is taken at (2,5,5)."""
    minimal = REASONING["minimal"]
    return {
        "minimal (1,1,0)": dict(minimal),
        "depth 2,2,2": dict(h_cycles=2, max_h_steps=2, max_l_steps=2),
        "depth 2,5,5": {},
        "memory writes off": dict(minimal, **MEMORY_OFF),
        "ROSA off": dict(minimal, use_rosa=False),
        "DeepEmbed off": dict(minimal, use_deepembed=False),
        "h_stride 2": dict(minimal, h_stride=2),
        "h_stride 8": dict(minimal, h_stride=8),  # h_stride 4 is the first row
        "depth 2,5,5 + grad_steps 2": dict(grad_steps=2),
    }


def table_variants(args, corpus, variants: dict, prefix: str) -> dict:
    out = {}
    slug = {label: "".join(c if c.isalnum() or c == "+" else "_" for c in label) for label in variants}
    wanted = set(args.only or ())
    chosen = [(prefix + slug[label], label, overrides) for label, overrides in variants.items()
              if not wanted or {label, slug[label]} & wanted]
    unknown = wanted - set(slug) - set(slug.values())
    if unknown:
        known = ", ".join(f"{label!r} ({slug[label]})" for label in variants)
        raise SystemExit(f"--only: {sorted(unknown)} are not rows of this table; rows (or their shell-safe "
                         f"names): {known}")
    prefetch(args, corpus, [(name, hierarchos_fields(args, **overrides)) for name, _, overrides in chosen])
    for name, label, overrides in chosen:
        out[label] = sweep(args, corpus, name, hierarchos_fields(args, **overrides))
    base = next(iter(out.values()))["best"]["val_bpb"] if out else None
    print(HEADER + "  delta vs first row")
    for label, s in out.items():
        print(_row(s) + f"  {s['best']['val_bpb'] - base:+.4f}")
    return out


def block_variants() -> dict:
    """The seeds' other cells and halting rule at the recommended (minimal) depth: the same width,
    sweep and tokens as every row (attention blocks have fewer parameters at equal width: the table
    prints each count)."""
    minimal = REASONING["minimal"]
    return {
        "RWKV-7 (ours)": dict(minimal),
        "attention, RoPE": dict(minimal, h_block="attention", l_block="attention"),
        "attention, RoPE, window 128": dict(minimal, h_block="attention", l_block="attention", window_size=128),
        "attention, sinusoidal": dict(minimal, h_block="attention", l_block="attention", pos_encodings="sinusoidal"),
        "WKV-4 time mix": dict(minimal, time_mix="wkv4"),
        "Q-learning halting (2,5,5)": dict(halting="q"),
        "ACT halting (2,5,5)": {},
    }


def wiring_variants() -> dict:
    """The time-mix wiring switches (bench_time_mix_wiring's rows) at the minimal depth, as the blocks
    table compares cells: the wiring is inside every stack pass, so depth only multiplies the cost (the
    default trains at 0.41x minimal's rate), and minimal is the depth the main table favours. Its first
    row, ours, was the main table's minimal configuration until x070's wiring became the default; its
    last row, x070, is that configuration now (the same specs: their runs are reused)."""
    from bench.bench_time_mix_wiring import VARIANTS

    return {label: dict(REASONING["minimal"], **overrides) for label, overrides in VARIANTS.items()}


def _load_model(model_dir: str, device):
    from hierarchos.io import load_model_dir

    model, _ = load_model_dir(model_dir, device=device)
    return model.eval()


def _score_recall(docs: list, preds: list) -> dict:
    """preds[i][p]: doc i's greedy guess for its token p + 1; a query counts when all 6 digits are right.
    A guess past the byte range (the tokenizer's special ids, EOS among them) is a wrong digit."""
    exact, digits, n = 0, 0, 0
    for doc, pred in zip(docs, preds):
        for offset, value in doc["answers"]:
            ids = [int(pred[offset + i - 1]) for i in range(len(value))]
            got = "".join(chr(t) if t < 256 else "\ufffd" for t in ids)  # (a byte's latin-1 character)
            right = sum(a == b for a, b in zip(got, value))
            digits += right
            exact += right == len(value)
            n += 1
    return dict(query_accuracy=exact / max(1, n), digit_accuracy=digits / max(1, 6 * n), queries=n,
                chance_digit=0.1)


def recall_accuracy_reference(model, docs: list, seq_len: int, device) -> dict:
    """Teacher-forced greedy accuracy of every query's 6 digits, one document at a time, read in
    windows of `seq_len` with the state carried (the reference of `recall_accuracy`)."""
    preds = []
    with torch.no_grad():
        for doc in docs:
            ids = byte_tokens([doc["text"]])[:-1]
            state, pred = None, []
            for start in range(0, len(ids), seq_len):
                out = model(torch.as_tensor(ids[start:start + seq_len])[None].to(device), state)
                state = out.state
                pred.append(out.logits[0].argmax(-1).cpu())
            preds.append(torch.cat(pred).numpy())
    return _score_recall(docs, preds)


def recall_accuracy(model, docs: list, seq_len: int, device, rows: int = 64) -> dict:
    """`recall_accuracy_reference` with up to `rows` documents read side by side (one row each, the
    shorter ones padded at their end: a causal model's guesses before the padding do not see it)."""
    preds = []
    with torch.no_grad():
        for first in range(0, len(docs), rows):
            ids = [byte_tokens([doc["text"]])[:-1] for doc in docs[first:first + rows]]
            length = max(len(i) for i in ids)
            batch = torch.full((len(ids), length), ord("\n"), dtype=torch.long)
            for r, i in enumerate(ids):
                batch[r, :len(i)] = torch.as_tensor(i)
            state, pred = None, []
            for start in range(0, length, seq_len):
                out = model(batch[:, start:start + seq_len].to(device), state)
                state = out.state
                pred.append(out.logits.argmax(-1).cpu())
            pred = torch.cat(pred, dim=1).numpy()
            preds += [pred[r, :len(i)] for r, i in enumerate(ids)]
    return _score_recall(docs, preds)


RECALL_ROWS = {"memory on": {}, "memory writes off": MEMORY_OFF,
               # ROSA's automaton looks back rosa_window tokens (4,096) and hands the model the token that
               # followed the longest earlier match, so a query's "key = " inside that window gets its value
               # from ROSA: these two rows ask what the state and the memory do without it
               "ROSA off": dict(use_rosa=False), "ROSA off + memory writes off": dict(MEMORY_OFF, use_rosa=False)}
RECALL_GAPS = {"memory_gap": ("memory on", "memory writes off"),
               "memory_gap_rosa_off": ("ROSA off", "ROSA off + memory writes off")}


def recall_docs_for(gap: int, tokens: int, facts: int) -> int:
    """Training documents for a gap so that each gap's runs train on about `tokens` tokens (a fact or
    query line is ~21 bytes; a gap runs up to gap_slack past its size, half of that on average)."""
    doc_bytes = gap + gap_slack(gap) // 2 + 2 * 21 * facts
    return max(1, tokens // doc_bytes)


def table_recall(args, corpus) -> dict:
    """For each gap, the memory on and its writes off, with ROSA and without it, at the minimal depth
    (the question is the memory's, and minimal is the default). A gap inside one training window is the
    control: the recurrent state alone can answer it, and gradients reach the fact from the query.
    Each finished row is written to recall.partial.json at once (a table cut by its timeout keeps them)."""
    filler = "".join(read_texts(Path(args.corpus_dir) / corpus["train"]["file"]))
    held_filler = "".join(read_texts(Path(args.corpus_dir) / corpus["val"]["file"]))
    wanted = set(args.only or ())
    unknown = wanted - set(RECALL_ROWS) - {label.replace(" ", "_") for label in RECALL_ROWS}
    if unknown:
        raise SystemExit(f"--only: {sorted(unknown)} are not rows of the recall table; rows: "
                         + ", ".join(f"'{label}' ({label.replace(' ', '_')})" for label in RECALL_ROWS))
    rows = {label: o for label, o in RECALL_ROWS.items() if not wanted or {label, label.replace(" ", "_")} & wanted}
    partial, partial_lock = {}, threading.Lock()
    lr = args.lrs[len(args.lrs) // 2]
    device = torch.device(args.device)
    cdir = Path(args.corpus_dir)

    def one_gap(gap: int) -> dict:
        n_docs = args.recall_docs or recall_docs_for(gap, args.recall_tokens, args.recall_facts)
        train_docs = make_recall_docs(n_docs, filler, args.recall_facts, gap, args.recall_facts, args.seed)
        test_docs = make_recall_docs(args.recall_test_docs, held_filler, args.recall_facts, gap, args.recall_facts,
                                     args.seed + 1)
        tag = f"{n_docs}-{args.recall_test_docs}-{args.recall_facts}-{gap}-s{args.seed}"
        train_file, val_file = f"recall-train-{tag}.jsonl", f"recall-val-{tag}.jsonl"
        for fname, docs in ((train_file, train_docs), (val_file, test_docs)):
            text = "".join(json.dumps({"text": d["text"]}) + "\n" for d in docs)
            if not (cdir / fname).is_file() or (cdir / fname).read_text() != text:  # (a rewrite would change
                atomic_write_text(cdir / fname, text)  # its mtime, and `train` would rebuild its token cache)
        sha = hashlib.sha256((cdir / train_file).read_bytes()).hexdigest()
        rcorpus = {"train": {"file": train_file, "sha256": sha}, "val": {"file": val_file}}
        out = dict(task=dict(facts=args.recall_facts, gap_bytes=gap, train_docs=n_docs, test_docs=args.recall_test_docs,
                             train_bytes=sum(len(d["text"]) for d in train_docs),
                             test_bytes=sum(len(d["text"]) for d in test_docs)))
        for label, overrides in rows.items():  # one after another: the two share their token caches
            fields = hierarchos_fields(args, **REASONING["minimal"], **overrides)
            r = train_hierarchos(args, rcorpus, fields, lr, "recall-" + label.replace(" ", "_"),
                                 train_file=train_file, val_file=val_file, need_model=True)
            acc = recall_accuracy(_load_model(r["model_dir"], device), test_docs, args.seq_len, device, args.eval_rows)
            out[label] = {**acc, "val_bpb": r["val_bpb"], "lr": lr, "train_tokens": r.get("train_tokens")}
            print(f"  gap {gap:>6,}  {label:28s} query accuracy {acc['query_accuracy']:.3f}  digit accuracy "
                  f"{acc['digit_accuracy']:.3f}  ({acc['queries']} queries)", flush=True)
            with partial_lock:
                partial.setdefault(str(gap), {})[label] = out[label]
                atomic_write_text(Path(args.work) / "recall.partial.json", json.dumps(partial, indent=1))
        for name, (on, off) in RECALL_GAPS.items():  # (--only one row: the gap is taken across two calls)
            if on in out and off in out:
                out[name] = out[on]["query_accuracy"] - out[off]["query_accuracy"]
        return out

    # --jobs: the gaps at once (each gap's rows in turn: they share its documents' token caches)
    with ThreadPoolExecutor(max_workers=max(1, min(args.jobs, len(args.recall_gap)))) as pool:
        results = dict(zip(args.recall_gap, pool.map(one_gap, args.recall_gap)))
    print(f"{'gap bytes':>10s}  {'windows':>7s}  " + "  ".join(f"{label:>28s}" for label in rows) + "   (query accuracy)")
    for gap, r in results.items():
        print(f"{gap:>10,}  {gap / args.seq_len:>7.1f}  " + "  ".join(f"{r[label]['query_accuracy']:>28.3f}" for label in rows))
    return {"gaps": {str(gap): r for gap, r in results.items()}, "seq_len": args.seq_len}


def _ranks(a: np.ndarray) -> np.ndarray:
    order = np.argsort(a, kind="stable")
    ranks = np.empty(len(a))
    ranks[order] = np.arange(len(a))
    for value in np.unique(a):  # ties share their mean rank
        tie = a == value
        ranks[tie] = ranks[tie].mean()
    return ranks


def correlations(x: np.ndarray, y: np.ndarray) -> dict:
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return dict(pearson=None, spearman=None, n=len(x))
    return dict(pearson=float(np.corrcoef(x, y)[0, 1]), spearman=float(np.corrcoef(_ranks(x), _ranks(y))[0, 1]),
                n=len(x))


def ponder_and_loss_reference(model, tokens: np.ndarray, device) -> tuple[np.ndarray, np.ndarray]:
    """Step form, one token at a time: each token's loss on the next token and the halting steps of the
    plan point that leads it (the latest plan point at or before it; averaged over the rounds)."""
    steps, losses, state, current = [], [], None, float("nan")
    with torch.no_grad():
        for t in range(len(tokens) - 1):
            out = model.step(torch.as_tensor(tokens[t:t + 1]).to(device), state)
            state = out.state
            total, count = out.totals.get("manager_steps", (0.0, 0.0))
            count = float(count)
            if count:
                current = float(total) / count
            losses.append(F.cross_entropy(out.logits.float(), torch.as_tensor(tokens[t + 1:t + 2]).to(device)).item())
            steps.append(current)
    return np.array(steps), np.array(losses)


def ponder_and_loss(model, tokens: np.ndarray, device, seq_len: int, rows: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """`ponder_and_loss_reference` in the parallel form: the tokens cut into `rows` equal pieces read
    side by side (each from a fresh state), in windows of `seq_len` with the state carried, the
    halting steps of every plan point taken from the reasoner's `halting_record` (averaged over the
    rounds) and spread to the tokens it leads. Returns the rows one after another; with rows=1 the
    reference's arrays (the parallel and step forms compute the same function)."""
    n = (len(tokens) - 1) // rows
    x_all = torch.as_tensor(np.stack([tokens[r * n:r * n + n] for r in range(rows)]))
    y_all = torch.as_tensor(np.stack([tokens[r * n + 1:r * n + n + 1] for r in range(rows)]))
    stride = model.cfg.h_stride
    steps, losses = np.full((rows, n), np.nan), np.empty((rows, n))
    current = np.full(rows, np.nan)  # the halting steps of the latest plan point read so far
    reasoner, state = model.reasoner, None
    reasoner.halting_record = []
    try:
        with torch.no_grad():
            for start in range(0, n, seq_len):
                x, y = x_all[:, start:start + seq_len].to(device), y_all[:, start:start + seq_len].to(device)
                T = x.shape[1]
                reasoner.halting_record.clear()
                out = model(x, state)
                state = out.state
                losses[:, start:start + T] = F.cross_entropy(out.logits.float().transpose(1, 2), y,
                                                             reduction="none").cpu().numpy()
                window = np.full((rows, T), np.nan)
                window[:, 0] = current
                if reasoner.halting_record:  # (rounds, rows, P): the plan points of this window
                    per_point = torch.stack(reasoner.halting_record).float().mean(0).cpu().numpy()
                    points = range((stride - 1 - start) % stride, T, stride)
                    for k, j in enumerate(points):
                        window[:, j] = per_point[:, k]
                for j in range(1, T):  # each token takes its latest plan point's steps
                    window[:, j] = np.where(np.isnan(window[:, j]), window[:, j - 1], window[:, j])
                steps[:, start:start + T] = window
                current = window[:, -1]
    finally:
        reasoner.halting_record = None
    return steps.reshape(-1), losses.reshape(-1)


def trained_best(args, corpus, label: str = "default") -> dict:
    """A main-table configuration's best sweep point (`REASONING[label]`), its model on this machine
    (trained again, same spec, when the sweep came from carried run records)."""
    fields = hierarchos_fields(args, **REASONING[label])
    best = sweep(args, corpus, f"hierarchos-{label}", fields)["best"]
    lr = best["spec"]["lr"]
    return train_hierarchos(args, corpus, fields, lr, f"hierarchos-{label}-lr{lr:g}", need_model=True)


def table_act(args, corpus) -> dict:
    """At the (2,5,5) depth: minimal's manager makes one pass (max_h_steps 1), so it has nothing to ponder."""
    best = trained_best(args, corpus, "default")
    device = torch.device(args.device)
    model = _load_model(best["model_dir"], device)
    tokens = byte_tokens(read_texts(Path(args.corpus_dir) / corpus["val"]["file"]))[:args.act_tokens + 1]
    steps, losses = ponder_and_loss(model, tokens, device, args.seq_len, rows=args.eval_rows)
    live = ~np.isnan(steps)
    out = dict(correlations(steps[live], losses[live]), mean_steps=float(steps[live].mean()),
               steps_histogram={str(int(k)): int(v) for k, v in zip(*np.unique(np.round(steps[live]), return_counts=True))},
               max_h_steps=model.cfg.max_h_steps, h_halt_thresh=model.cfg.h_halt_thresh, tokens=int(live.sum()))
    print(f"  ponder vs loss over {out['tokens']} held-out tokens: pearson {out['pearson']}, spearman {out['spearman']}"
          f"; mean halting steps {out['mean_steps']:.2f} of {out['max_h_steps']}")
    return out


def hierarchos_bpb_at_context_reference(model, tokens: np.ndarray, val_bytes: int, seq_len: int, context: int,
                                        device) -> float:
    """Bits per byte over the validation tokens with the state reset every `context` tokens (windows of
    `seq_len` inside each segment, the state carried between them), one segment at a time (the
    reference of `hierarchos_bpb_at_context`)."""
    nll = 0.0
    with torch.no_grad():
        for seg in range(0, len(tokens) - 1, context):
            piece = tokens[seg:seg + context + 1]
            state = None
            for start in range(0, len(piece) - 1, seq_len):
                w = piece[start:start + seq_len + 1]
                out = model(torch.as_tensor(w[:-1])[None].to(device), state)
                state = out.state
                nll += F.cross_entropy(out.logits[0].float(), torch.as_tensor(w[1:]).to(device), reduction="sum").item()
    return nll / math.log(2) / val_bytes


def hierarchos_bpb_at_context(model, tokens: np.ndarray, val_bytes: int, seq_len: int, context: int, device,
                              rows: int = 64) -> float:
    """`hierarchos_bpb_at_context_reference` with up to `rows` whole segments read side by side (every
    segment starts at position 0 from a fresh state, so they are independent rows); a last, shorter
    segment is read alone."""
    n_full = (len(tokens) - 1) // context
    segments = [tokens[i * context:i * context + context + 1] for i in range(n_full)]
    groups = [np.stack(segments[i:i + rows]) for i in range(0, n_full, rows)]
    if n_full * context < len(tokens) - 1:
        groups.append(tokens[n_full * context:][None])
    nll = 0.0
    with torch.no_grad():
        for group in groups:
            piece = torch.as_tensor(group)
            state = None
            for start in range(0, piece.shape[1] - 1, seq_len):
                w = piece[:, start:start + seq_len + 1].to(device)
                out = model(w[:, :-1], state)
                state = out.state
                nll += F.cross_entropy(out.logits.float().transpose(1, 2), w[:, 1:], reduction="sum").item()
    return nll / math.log(2) / val_bytes


def table_length(args, corpus) -> dict:
    """Both main-table depths (minimal, the default, and the seeds' (2,5,5)) at their best sweep points."""
    texts = read_texts(Path(args.corpus_dir) / corpus["val"]["file"])
    tokens, val_bytes = byte_tokens(texts), sum(len(t.encode("utf-8")) for t in texts)
    device = torch.device(args.device)
    out = {"gpt2": {"1x": "see main table (its validation is at 1x)", "4x": None, "16x": None},
           "gpt2_note": f"GPT-2 has {args.seq_len} learned positions (its training length) and cannot read "
                        "a longer context"}
    for label in REASONING:
        best = trained_best(args, corpus, label)
        model = _load_model(best["model_dir"], device)
        row = out[f"hierarchos-{label}"] = {"lr": best["spec"]["lr"], "carried_bpb": best["val_bpb"]}
        for factor in (1, 4, 16):
            row[f"{factor}x"] = hierarchos_bpb_at_context(model, tokens, val_bytes, args.seq_len,
                                                          factor * args.seq_len, device, args.eval_rows)
        print(f"  hierarchos {label}: bits/byte with the state reset every 1x / 4x / 16x the training length: "
              + ", ".join(f"{k} {row[f'{k}']:.4f}" for k in ("1x", "4x", "16x"))
              + f"; the whole row carried (main table) {best['val_bpb']:.4f}")
    return out


# ---- command line -------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", choices=(*TABLES, "all"), required=True)
    p.add_argument("--work", default="/tmp/hierarchos_quality", help="corpus, runs, models and tables go here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="smoke sizes (CPU, a minute or two)")
    p.add_argument("--width", type=int, default=None, help="hierarchos context/h/l width = GPT-2 n_embd")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--tokens", type=int, default=None, help="training tokens (bytes) at equal tokens")
    p.add_argument("--val-bytes", type=int, default=None)
    p.add_argument("--lrs", type=float, nargs="+", default=None,
                   help="the LR sweep (3 points; default 2.5e-4 5e-4 1e-3: on the H200 blocks table at 6M tokens "
                        "2e-3 diverged and the best point was the lowest of 5e-4 / 1e-3 / 2e-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-compile", dest="compile", action="store_false", help="eager GPT-2 and hierarchos on CUDA")
    p.add_argument("--only", nargs="+", default=None,
                   help="ablations/wiring/blocks/recall: these rows only, by label or shell-safe name (RWKV_7__ours_)")
    p.add_argument("--fresh", action="store_true", help="retrain cached runs")
    p.add_argument("--jobs", type=int, default=1,
                   help="hierarchos training runs at once on the device (a table's LR points and rows; 1 = one "
                        "after another, the only setting whose tokens/s is a solo rate)")
    p.add_argument("--log-every", type=int, default=None)
    p.add_argument("--recall-docs", type=int, default=None,
                   help="recall: training documents per gap (default: about --recall-tokens tokens of them)")
    p.add_argument("--recall-tokens", type=int, default=None, help="recall: training tokens per gap's runs")
    p.add_argument("--recall-test-docs", type=int, default=None)
    p.add_argument("--recall-facts", type=int, default=8)
    p.add_argument("--recall-gap", type=int, nargs="+", default=None,
                   help="recall: bytes (= tokens) between the facts and the queries, one row pair per gap (default "
                        "256, inside one training window, the control; 2048, four windows; 20000)")
    p.add_argument("--act-tokens", type=int, default=None, help="act: held-out tokens (all rows together)")
    p.add_argument("--eval-rows", type=int, default=None,
                   help="act, length, recall: rows a trained model reads side by side (recall documents, "
                        "length segments, act pieces)")
    args = p.parse_args(argv)
    sizes = (dict(width=32, seq_len=32, batch=2, tokens=1024, val_bytes=512, lrs=[2e-3], log_every=4,
                  recall_docs=2, recall_tokens=2048, recall_test_docs=1, recall_gap=[256], act_tokens=32, eval_rows=2) if args.tiny else
             dict(width=512, seq_len=512, batch=32, tokens=20_000_000, val_bytes=1_000_000, lrs=[2.5e-4, 5e-4, 1e-3],
                  log_every=20, recall_docs=0, recall_tokens=20_000_000, recall_test_docs=200,
                  recall_gap=[256, 2048, 20_000], act_tokens=262_144,
                  eval_rows=64))
    for name, value in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.tiny:
        args.recall_facts = min(args.recall_facts, 4)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    args.roots = default_roots() if not args.tiny else default_roots()[:1]
    args.corpus_dir = str(Path(args.work) / "corpus")
    corpus = build_corpus(Path(args.corpus_dir), args.tokens, args.val_bytes, args.roots, args.seed)
    print(f"corpus: train {corpus['train']['bytes']:,} bytes in {corpus['train']['files']} files, validation "
          f"{corpus['val']['bytes']:,} bytes in {corpus['val']['files']} other files (Python {corpus['python']})")
    tables = TABLES if args.table == "all" else (args.table,)
    run = {"main": table_main, "recall": table_recall, "act": table_act, "length": table_length,
           "ablations": lambda a, c: table_variants(a, c, ablation_variants(), "abl-"),
           "wiring": lambda a, c: table_variants(a, c, wiring_variants(), "wiring-"),
           "blocks": lambda a, c: table_variants(a, c, block_variants(), "blocks-")}
    for table in tables:
        print(f"\n== {table} ==")
        started = time.perf_counter()
        result = run[table](args, corpus)
        payload = dict(table=table, result=result, corpus=corpus, seconds=time.perf_counter() - started,
                       settings={k: v for k, v in vars(args).items() if k != "roots"} | {"roots": [[a, str(b)] for a, b in args.roots]},
                       machine=dict(platform=platform.platform(), torch=torch.__version__, loadavg=os.getloadavg(),
                                    gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None))
        path = Path(args.work) / f"{table}.json"
        atomic_write_text(path, json.dumps(payload, indent=2, default=str))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
