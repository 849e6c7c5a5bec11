"""The data path on a large corpus (issue 18): peak memory, time to the first step, tokenization speed
against the `tokenizers` library's own batch encode, and the second run's start (cache reused).

The corpus is assembled from text already on the machine: every .py, .md, .rst and .txt file under
this Python's installation (the standard library and site-packages), one JSONL record per file,
the file list repeated (in a new seeded order each round after the first) until the corpus reaches
--mb megabytes. Then:
  1. tokenization speed on --compare-mb of it: the `tokenizers` library's `encode_batch_fast` and
     hierarchos' native BPE encoder (hierarchos.data.fast_bpe) on the same texts (batches of 4 MB,
     encode time only, all cores), and hierarchos' whole cache build; alternated, best of --tries;
  2. `hierarchos train` on the corpus (first run: builds the token cache), as a user would run it;
  3. the same command again (the cache is reused).
For each run: peak RSS (VmHWM of the process), seconds from launch to the first optimizer step
(the first metrics record's time less the step's own duration), and the cache build's MB/s. A table on stdout, JSON to --out.

    python bench/bench_data.py --mb 500 --compare-mb 50 --long-line-mb 50 --out bench/records/bench_data_500mb.json

--only-order times the shuffled window order alone (TokenStreams.order and the first batch) on a
token cache of --order-tokens ids (a sparse uint16 file: the order needs only its shape, the batches
read zero pages), the lazy EpochOrder against the eager construction it replaced (every window's
start listed up front, copied below as it was): seconds and tracemalloc peak of the set-up, and the
per-step cost of finding a step's windows.

    python bench/bench_data.py --only-order --order-tokens 2457068622 --out bench/records/bench_data_order.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def text_files() -> list[Path]:
    roots = {Path(sysconfig.get_paths()[key]) for key in ("stdlib", "purelib", "platlib")}
    files = set()
    for root in roots:
        for suffix in ("*.py", "*.md", "*.rst", "*.txt"):
            files.update(p for p in root.rglob(suffix) if p.is_file())
    return sorted(files)


def build_corpus(path: Path, target_bytes: int) -> dict:
    """JSONL of {"text": file contents}, repeating the machine's text files up to `target_bytes` of text."""
    if path.exists() and path.with_suffix(".json").exists():
        meta = json.loads(path.with_suffix(".json").read_text())
        if meta.get("target_bytes") == target_bytes and path.stat().st_size == meta["file_bytes"]:
            return meta
    files = text_files()
    text_bytes, records, rounds, unique_bytes = 0, 0, 0, 0
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        while text_bytes < target_bytes:
            rounds += 1
            order = list(files)
            if rounds > 1:  # not one block repeated: each later round in its own order
                random.Random(rounds).shuffle(order)
            for file in order:
                try:
                    text = file.read_text(encoding="utf-8")
                except (UnicodeDecodeError, OSError):
                    continue
                if not text.strip():
                    continue
                out.write(json.dumps({"text": text}) + "\n")
                size = len(text.encode("utf-8"))
                text_bytes += size
                unique_bytes += size if rounds == 1 else 0
                records += 1
                if text_bytes >= target_bytes:
                    break
    os.replace(tmp, path)
    meta = {"target_bytes": target_bytes, "text_bytes": text_bytes, "file_bytes": path.stat().st_size,
            "records": records, "source_files": len(files), "unique_text_bytes": unique_bytes, "rounds": rounds}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    return meta


def sample_corpus(corpus: Path, sample: Path, target_bytes: int) -> None:
    """The first records of `corpus` up to `target_bytes` of text (the tokenization comparison's text)."""
    if sample.exists():
        return
    size = 0
    tmp = sample.with_name(sample.name + ".tmp")
    with open(corpus, encoding="utf-8") as src, open(tmp, "w", encoding="utf-8") as out:
        for line in src:
            out.write(line)
            size += len(json.loads(line)["text"].encode("utf-8"))
            if size >= target_bytes:
                break
    os.replace(tmp, sample)


def cache_encode(corpus: Path, cache_root: Path) -> dict:
    """hierarchos' cache build of `corpus` (read, parse, cut, encode, write), in this process."""
    import shutil

    from hierarchos.data import bundled_tokenizer_path, streaming, token_cache
    from hierarchos.data.sources import DataSpec
    from hierarchos.data.tokenizers import load_tokenizer

    shutil.rmtree(cache_root, ignore_errors=True)
    tokenizer = load_tokenizer(bundled_tokenizer_path())
    source = streaming.open_source(DataSpec(train=str(corpus)))
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    cache = token_cache.open_cache(token_cache.cache_dir(cache_root, source, "bench"), source, tokenizer,
                                   log=lambda line: None)
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
    n_bytes = int(cache.index["text_bytes"])
    return {"seconds": seconds, "cpu_seconds": cpu, "text_bytes": n_bytes, "tokens": cache.n_tokens,
            "mb_s": n_bytes / 1e6 / seconds, "mb_per_cpu_s": n_bytes / 1e6 / cpu, "encoder": cache.index.get("encoder")}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime + usage.ru_stime


def read_batches(corpus: Path, batch_chars: int = 4 << 20) -> tuple[list[list[str]], int]:
    """The corpus's texts in batches of about `batch_chars` characters, and their UTF-8 bytes."""
    batches, batch, chars, n_bytes = [], [], 0, 0
    with open(corpus, encoding="utf-8") as handle:
        for line in handle:
            text = json.loads(line)["text"]
            n_bytes += len(text.encode("utf-8"))
            batch.append(text)
            chars += len(text)
            if chars >= batch_chars:
                batches.append(batch)
                batch, chars = [], 0
    if batch:
        batches.append(batch)
    return batches, n_bytes


def native_encode(batches: list[list[str]], n_bytes: int) -> dict:
    """hierarchos' native BPE encoder (all cores, GIL released) on the same batches: encode time only."""
    from hierarchos.data import bundled_tokenizer_path, fast_bpe
    from hierarchos.data.tokenizers import load_tokenizer

    encoder, why = fast_bpe.native_for(load_tokenizer(bundled_tokenizer_path()))
    if encoder is None:
        raise SystemExit(f"the native BPE encoder is not available: {why}")
    encoder.encode_batch(batches[0][:1])  # the code-point table and the first probe, outside the timing
    seconds, cpu, n_tokens = 0.0, 0.0, 0
    for batch in batches:
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        ids, _ = encoder.encode_batch(batch)
        seconds += time.perf_counter() - start
        cpu += _cpu_seconds() - cpu_start
        n_tokens += len(ids)
    return {"seconds": seconds, "cpu_seconds": cpu, "text_bytes": n_bytes, "tokens": n_tokens,
            "mb_s": n_bytes / 1e6 / seconds, "mb_per_cpu_s": n_bytes / 1e6 / cpu, "threads": encoder.threads}


def library_batches(batches: list[list[str]], n_bytes: int) -> dict:
    """The `tokenizers` library's own `encode_batch_fast` on the same batches (encode time only)."""
    from hierarchos.data import bundled_tokenizer_path
    from hierarchos.data.tokenizers import load_tokenizer

    backend = load_tokenizer(bundled_tokenizer_path()).backend
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    seconds, cpu, n_tokens = 0.0, 0.0, 0
    for batch in batches:
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        encoded = encode(batch, add_special_tokens=False)
        seconds += time.perf_counter() - start
        cpu += _cpu_seconds() - cpu_start
        n_tokens += sum(len(e.ids) for e in encoded)
    return {"seconds": seconds, "cpu_seconds": cpu, "text_bytes": n_bytes, "tokens": n_tokens,
            "mb_s": n_bytes / 1e6 / seconds, "mb_per_cpu_s": n_bytes / 1e6 / cpu}


def run_train(args: list[str], out_dir: Path, env: dict, window_tokens: int) -> dict:
    """Launch `hierarchos train`, poll its peak RSS, and time its first optimizer step."""
    command = [sys.executable, str(REPO / "hierarchos_cli.py"), "train", *args, "--out-dir", str(out_dir)]
    started_wall, started = time.time(), time.perf_counter()
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True)
    peak = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0}
    cpu_ticks, tick = 0, os.sysconf("SC_CLK_TCK")
    output = []
    import threading

    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in peak:
                    peak[key] = max(peak[key], int(value.split()[0]) * 1024)
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            cpu_ticks = int(fields[11]) + int(fields[12])  # utime + stime of all its threads
        except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
            pass
        time.sleep(0.05)
    reader.join()
    wall = time.perf_counter() - started
    text = "".join(output)
    if proc.returncode != 0:
        raise SystemExit(f"train failed ({proc.returncode}):\n{text[-3000:]}")
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    built = re.search(r"token cache: ([\d,]+) tokens from ([\d,.]+) MB in ([\d.]+) s \(([\d.]+) MB/s", text)
    first = records[0]
    step_s = window_tokens / first["tokens_per_s"]  # the trainer's clock: from its start to the step's end
    return {"first_step_s": first["time"] - step_s - started_wall, "first_step_end_s": first["time"] - started_wall,
            "step_s": step_s, "wall_s": wall, "cpu_seconds": cpu_ticks / tick, "peak_rss_bytes": peak["VmHWM"],
            "peak_rss_anon_bytes": peak["RssAnon"], "peak_rss_file_bytes": peak["RssFile"],
            "cache_line": " | ".join(line for line in text.splitlines() if line.startswith("token cache:")),
            "build_seconds": float(built.group(3)) if built else None,
            "tokens": int(built.group(1).replace(",", "")) if built else None}


def long_line(work: Path, opts) -> dict:
    """One JSONL record of `--long-line-mb` MB of text (the corpus's texts joined): peak RSS and time."""
    import shutil

    from hierarchos.data import bundled_tokenizer_path

    corpus = work / f"corpus_{int(opts.mb)}mb.jsonl"
    path = work / f"long_line_{int(opts.long_line_mb)}mb.jsonl"
    target = int(opts.long_line_mb * 1e6)
    if not path.exists():
        parts, size = [], 0
        with open(corpus, encoding="utf-8") as handle:
            for line in handle:
                text = json.loads(line)["text"]
                parts.append(text)
                size += len(text.encode("utf-8"))
                if size >= target:
                    break
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"text": "".join(parts)}) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        del parts
    cache = work / "token_cache_long_line"
    shutil.rmtree(cache, ignore_errors=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONUNBUFFERED="1")
    args = ["--train", str(path), "--tokenizer-path", bundled_tokenizer_path(), "--tiny", "--max_length", "64",
            "--batch_size", "4", "--max-steps", "1", "--device", "cpu", "--token-cache", str(cache),
            "--log-every", "1"]
    out_dir = work / "long_line_run"
    shutil.rmtree(out_dir, ignore_errors=True)
    result = {"file_bytes": path.stat().st_size, "command": ["hierarchos", "train", *args],
              **run_train(args, out_dir, env, window_tokens=4 * 64)}
    print(f"one {path.stat().st_size / 1e6:.0f} MB JSONL line: peak RSS {result['peak_rss_bytes'] / 1e6:,.0f} MB "
          f"(anon {result['peak_rss_anon_bytes'] / 1e6:,.0f} MB), first step at {result['first_step_s']:.1f} s "
          f"({result['cache_line']})", flush=True)
    return result


def compare(work: Path, corpus: Path, opts) -> dict:
    """The library's batch encode, the native encoder (both on the same texts, encode time only) and
    hierarchos' whole cache build, alternated, best of --tries each (the machine is shared: its load
    varies). The library is given at most --library-mb of the sample (it runs ~1 MB/s here)."""
    sample = work / f"sample_{int(opts.compare_mb)}mb.jsonl"
    sample_corpus(corpus, sample, int(opts.compare_mb * 1e6))
    batches, n_bytes = read_batches(sample)
    lib_batches, lib_bytes, size = [], 0, 0
    for batch in batches:  # the library's share: the first batches, whole
        if lib_batches and lib_bytes >= opts.library_mb * 1e6:
            break
        lib_batches.append(batch)
        lib_bytes += sum(len(t.encode("utf-8")) for t in batch)
    runs, results = {"library": [], "native": [], "native_same_text": [], "hierarchos_build": []}, {}
    for _ in range(opts.tries):
        runs["library"].append(library_batches(lib_batches, lib_bytes))
        runs["native_same_text"].append(native_encode(lib_batches, lib_bytes))
        runs["native"].append(native_encode(batches, n_bytes))
        runs["hierarchos_build"].append(cache_encode(sample, work / "token_cache_sample"))
    for name, tries in runs.items():
        results[name] = {**max(tries, key=lambda r: r["mb_s"]), "tries_mb_s": [r["mb_s"] for r in tries]}
    lib, same = results["library"], results["native_same_text"]
    assert lib["tokens"] == same["tokens"], "the native encoder and the library disagree on the token count"
    results["ratio_native_over_library"] = same["mb_s"] / lib["mb_s"]
    print(f"on {lib_bytes / 1e6:.1f} MB: tokenizers encode_batch_fast {lib['mb_s']:.2f} MB/s, native "
          f"{same['mb_s']:.1f} MB/s (ratio {results['ratio_native_over_library']:.1f}); on {n_bytes / 1e6:.0f} MB: "
          f"native {results['native']['mb_s']:.1f} MB/s, hierarchos cache build "
          f"{results['hierarchos_build']['mb_s']:.1f} MB/s ({results['hierarchos_build']['encoder']})", flush=True)
    return results


def eager_order_before(seed: int, epoch: int, rows: int, windows: int, chunk: int):
    """TokenStreams.order as it was before it became lazy (commit b7a08cd): every window's start for
    every stream, built from a list of segment arrays. Kept here to measure what it cost."""
    import numpy as np

    rng = np.random.default_rng([int(seed), int(epoch)])
    source_rows = rng.permutation(rows)
    seg = max(1, min(64, windows // 4))
    segments = [np.arange(s, min(s + seg, windows)) for s in range(0, windows, seg)]
    starts = np.stack([np.concatenate([segments[k] for k in rng.permutation(len(segments))])
                       for _ in range(rows)]) * chunk
    return source_rows, starts


def _timed_peak(fn):
    """(result, seconds, tracemalloc peak bytes) of fn() (numpy's arrays are traced too)."""
    import gc
    import tracemalloc

    gc.collect()
    tracemalloc.start()
    start = time.perf_counter()
    try:
        result = fn()
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return result, seconds, peak


def order_bench(work: Path, opts) -> dict:
    """The window order's set-up and per-step cost, lazy against the eager construction, on a sparse
    token file of --order-tokens uint16 ids, for each --order-batch (rows) at --order-chunk tokens."""
    import numpy as np

    from hierarchos.train import batches
    from hierarchos.train.batches import TokenStreams

    path = work / f"order_tokens_{opts.order_tokens}.bin"
    if not path.exists() or path.stat().st_size != 2 * opts.order_tokens:
        with open(path, "wb") as handle:
            handle.truncate(2 * opts.order_tokens)  # sparse: no disk blocks until written
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    results = {"tokens": opts.order_tokens, "chunk": opts.order_chunk, "load_average_start": os.getloadavg(),
               "token_file": str(path), "rows": []}
    table = []
    warm = TokenStreams.from_tokens(np.arange(10000, dtype=np.uint16), 2, opts.order_chunk, shuffle_seed=1)
    warm.batch(0, 0)  # numpy's and torch's one-time set-up (~1 MB on the first call), outside the timing
    for rows in opts.order_batch:
        streams = TokenStreams.from_tokens(tokens, rows, opts.order_chunk, shuffle_seed=1234)
        windows = len(streams)
        row = {"batch_size": rows, "windows_per_stream": windows, "load_average": os.getloadavg()}
        lazy = []
        for _ in range(opts.tries):  # a fresh order each try: set-up plus the first batch, as a run's first step
            streams._orders = {}
            _, seconds, peak = _timed_peak(lambda: (streams.order(0), streams.batch(0, 0)))
            lazy.append((seconds, peak))
        order = streams.order(0)
        permutation = "listed" if order.perms is not None else "feistel"
        steps = min(windows, opts.order_steps)
        start = time.perf_counter()
        for step in range(steps):
            order.step_windows(step)
        lazy_step = (time.perf_counter() - start) / steps
        start = time.perf_counter()
        for step in range(steps):
            streams.batch(step, 0)
        batch_step = (time.perf_counter() - start) / steps
        row.update(permutation=permutation, lazy_setup_seconds=min(s for s, _ in lazy),
                   lazy_setup_tries=[s for s, _ in lazy], lazy_peak_bytes=max(p for _, p in lazy),
                   lazy_step_windows_us=lazy_step * 1e6, lazy_batch_us=batch_step * 1e6, steps_timed=steps)
        if not opts.skip_eager:
            (source_rows, starts), seconds, peak = _timed_peak(
                lambda: eager_order_before(1234, 0, rows, windows, opts.order_chunk))
            start = time.perf_counter()
            for step in range(steps):
                starts[:, step]
            row.update(eager_setup_seconds=seconds, eager_peak_bytes=peak, eager_result_bytes=starts.nbytes,
                       eager_step_windows_us=(time.perf_counter() - start) / steps * 1e6)
            del source_rows, starts
        results["rows"].append(row)
        eager = (f"{row['eager_setup_seconds']:.2f} s, {row['eager_peak_bytes'] / 1e6:,.0f} MB"
                 if "eager_setup_seconds" in row else "skipped")
        table.append((rows, f"{windows:,}", eager,
                      f"{row['lazy_setup_seconds'] * 1e3:.2f} ms, {row['lazy_peak_bytes'] / 1e3:,.1f} kB ({permutation})",
                      f"{row.get('eager_step_windows_us', float('nan')):.1f} / {lazy_step * 1e6:.1f}",
                      f"{batch_step * 1e6:,.0f}"))
        print(f"batch {rows}: eager {eager}; lazy {table[-1][3]}", flush=True)
    results["load_average_end"] = os.getloadavg()
    head = ("batch", "windows/stream", "eager: set-up, peak", "lazy: set-up + first batch, peak",
            "a step's windows, us (eager / lazy)", "whole batch(), us")
    widths = [max(len(str(r[i])) for r in [head, *table]) for i in range(len(head))]
    print(f"{opts.order_tokens:,} tokens, chunk {opts.order_chunk}, load average "
          f"{results['load_average_start'][0]:.1f} -> {results['load_average_end'][0]:.1f}")
    for r in [head, *table]:
        print("  ".join(str(v).rjust(w) for v, w in zip(r, widths)))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=500, help="corpus size in MB of text (default 500)")
    parser.add_argument("--work", default="/tmp/hierarchos_bench_data", help="corpus, cache and run directories")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--skip-library", action="store_true", help="skip the tokenizers comparison")
    parser.add_argument("--compare-mb", type=float, default=50,
                        help="MB of the corpus's text on which hierarchos' cache build and the tokenizers "
                             "library's batch encode are timed back to back (default 50)")
    parser.add_argument("--library-mb", type=float, default=10,
                        help="MB of the comparison text given to the tokenizers library (default 10)")
    parser.add_argument("--tries", type=int, default=3, help="alternated tries of each, best kept (default 3)")
    parser.add_argument("--long-line-mb", type=float, default=50,
                        help="also train on one JSONL record of this many MB (0: skip)")
    parser.add_argument("--only-long-line", action="store_true", help="run only the one-long-line case")
    parser.add_argument("--only-reuse", metavar="KEY", default=None,
                        help="run only the cache-reusing train command (the cache must exist), with --extra flags, "
                             "into the --out JSON under KEY")
    parser.add_argument("--extra", default="", help="extra train flags for --only-reuse, e.g. '--no-shuffle'")
    parser.add_argument("--only-order", action="store_true",
                        help="time only the shuffled window order (lazy vs the former eager one) on a sparse token file")
    parser.add_argument("--order-tokens", type=int, default=2_457_068_622,
                        help="tokens in that file (default: the 5 GB corpus's 2,457,068,622)")
    parser.add_argument("--order-batch", type=int, nargs="+", default=[4, 64],
                        help="batch sizes (streams) to time (default 4 64)")
    parser.add_argument("--order-chunk", type=int, default=64, help="window length in tokens (default 64)")
    parser.add_argument("--order-steps", type=int, default=20000, help="steps timed per batch size (default 20000)")
    parser.add_argument("--skip-eager", action="store_true", help="time only the lazy order")
    parser.add_argument("--only-compare", action="store_true",
                        help="run only the tokenization comparison (on --compare-mb of the corpus)")
    opts = parser.parse_args()
    work = Path(opts.work)
    work.mkdir(parents=True, exist_ok=True)
    if opts.only_order:
        results = order_bench(work, opts)
        if opts.out:
            Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(opts.out).with_name(Path(opts.out).name + ".tmp")
            tmp.write_text(json.dumps(results, indent=1) + "\n")
            os.replace(tmp, opts.out)
        return
    if opts.only_long_line:  # rerun that case alone, into the --out JSON of an earlier full run
        result = long_line(work, opts)
        if opts.out and Path(opts.out).exists():
            results = json.loads(Path(opts.out).read_text())
            results["long_line"] = result
            tmp = Path(opts.out).with_name(Path(opts.out).name + ".tmp")
            tmp.write_text(json.dumps(results, indent=1) + "\n")
            os.replace(tmp, opts.out)
        return
    corpus = work / f"corpus_{int(opts.mb)}mb.jsonl"
    t0 = time.perf_counter()
    meta = build_corpus(corpus, int(opts.mb * 1e6))
    print(f"corpus {corpus}: {meta['text_bytes'] / 1e6:,.0f} MB of text in {meta['records']:,} records "
          f"({meta['file_bytes'] / 1e6:,.0f} MB JSONL; {meta['source_files']:,} files, "
          f"{meta['unique_text_bytes'] / 1e6:,.0f} MB unique, {meta['rounds']} round(s)) [{time.perf_counter() - t0:.0f} s]",
          flush=True)
    cache = work / "token_cache"
    import shutil

    if not opts.only_reuse:
        shutil.rmtree(cache, ignore_errors=True)
    from hierarchos.data import bundled_tokenizer_path

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONUNBUFFERED="1")
    train_args = ["--train", str(corpus), "--tokenizer-path", bundled_tokenizer_path(), "--tiny",
                  "--max_length", "64", "--batch_size", "4", "--max-steps", "1", "--device", "cpu",
                  "--token-cache", str(cache), "--log-every", "1"]
    results = {"corpus": {**meta, "path": str(corpus), "built_from": "the .py/.md/.rst/.txt files of this "
                          "Python installation (stdlib + site-packages), repeated"},
               "cpu_count": os.cpu_count(), "load_average_start": os.getloadavg(),
               "command": ["hierarchos", "train", *train_args]}
    if opts.only_reuse:  # one more reuse run (e.g. --no-shuffle), added to an earlier run's JSON
        out_dir = work / f"reuse_{opts.only_reuse}"
        shutil.rmtree(out_dir, ignore_errors=True)
        load_start = os.getloadavg()
        run = run_train(train_args + opts.extra.split(), out_dir, env, window_tokens=4 * 64)
        run.update(extra=opts.extra, load_average_start=load_start, load_average_end=os.getloadavg())
        print(f"{opts.only_reuse}: first step at {run['first_step_s']:.1f} s, peak RSS "
              f"{run['peak_rss_bytes'] / 1e6:,.0f} MB ({run['cache_line']})", flush=True)
        if opts.out and Path(opts.out).exists():
            results = json.loads(Path(opts.out).read_text())
            results[opts.only_reuse] = run
            tmp = Path(opts.out).with_name(Path(opts.out).name + ".tmp")
            tmp.write_text(json.dumps(results, indent=1) + "\n")
            os.replace(tmp, opts.out)
        return
    if opts.only_compare:
        results = {"corpus": str(corpus), "load_average_start": os.getloadavg(), **compare(work, corpus, opts),
                   "load_average_end": os.getloadavg()}
        if opts.out:
            Path(opts.out).write_text(json.dumps(results, indent=1) + "\n")
        return
    if not opts.skip_library:
        results.update(compare(work, corpus, opts))
    for name in ("first_run", "second_run"):
        out_dir = work / name
        shutil.rmtree(out_dir, ignore_errors=True)
        results[name] = run_train(train_args, out_dir, env, window_tokens=4 * 64)
        print(f"{name}: {results[name]['cache_line']}", flush=True)
    first = results["first_run"]
    if first["build_seconds"]:
        first["tokenize_mb_s"] = meta["text_bytes"] / 1e6 / first["build_seconds"]
    rows = [("corpus (MB of text)", f"{meta['text_bytes'] / 1e6:,.0f}"),
            ("tokens", f"{first['tokens']:,}" if first["tokens"] else "?"),
            ("first run: cache build (MB/s of text)", f"{first.get('tokenize_mb_s', 0):.2f}")]
    if "library" in results:
        lib, same, ours = results["library"], results["native_same_text"], results["hierarchos_build"]
        rows += [(f"on {lib['text_bytes'] / 1e6:.1f} MB: tokenizers encode_batch_fast (MB/s)", f"{lib['mb_s']:.2f}"),
                 (f"on {lib['text_bytes'] / 1e6:.1f} MB: native encoder (MB/s)", f"{same['mb_s']:.1f}"),
                 ("ratio (native / library)", f"{results['ratio_native_over_library']:.1f}"),
                 (f"on {ours['text_bytes'] / 1e6:.0f} MB: native encoder (MB/s)", f"{results['native']['mb_s']:.1f}"),
                 (f"on {ours['text_bytes'] / 1e6:.0f} MB: hierarchos cache build (MB/s)", f"{ours['mb_s']:.1f}")]
    for name in ("first_run", "second_run"):
        run = results[name]
        rows += [(f"{name}: seconds to the first step (its start; its end)",
                  f"{run['first_step_s']:.1f}; {run['first_step_end_s']:.1f}"),
                 (f"{name}: peak RSS (MB; anon + file-backed)",
                  f"{run['peak_rss_bytes'] / 1e6:,.0f} ({run['peak_rss_anon_bytes'] / 1e6:,.0f} + "
                  f"{run['peak_rss_file_bytes'] / 1e6:,.0f})")]
    rows.append(("first step - tokenization time (s)",
                 f"{first['first_step_s'] - (first['build_seconds'] or 0):.1f}"))
    if opts.long_line_mb:
        results["long_line"] = long_line(work, opts)
        rows += [(f"one {results['long_line']['file_bytes'] / 1e6:.0f} MB JSONL line: peak RSS (MB; anon)",
                  f"{results['long_line']['peak_rss_bytes'] / 1e6:,.0f}; {results['long_line']['peak_rss_anon_bytes'] / 1e6:,.0f}"),
                 ("one long line: seconds to the first step", f"{results['long_line']['first_step_s']:.1f}")]
    results["load_average_end"] = os.getloadavg()
    rows.append(("load average at the start; at the end", f"{results['load_average_start'][0]:.1f}; "
                                                          f"{results['load_average_end'][0]:.1f}"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    if opts.out:
        Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(opts.out).with_name(Path(opts.out).name + ".tmp")
        tmp.write_text(json.dumps(results, indent=1) + "\n")
        os.replace(tmp, opts.out)


if __name__ == "__main__":
    main()
