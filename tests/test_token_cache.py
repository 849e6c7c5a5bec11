"""The token cache (hierarchos.data.token_cache, data.streaming) and the streams read from it.

The oracle for the cache's contents is the tokenizer applied to each whole text, EOS after each,
independent of how the reader cut the files into pieces. Reuse, invalidation (a changed file, a
changed tokenizer), corruption (truncated, flipped bytes), an interrupted or disk-full build, and the
seeded window order (every window once per epoch, contiguous targets) are each checked directly.
"""

from __future__ import annotations

import errno
import json
import random

import numpy as np
import pytest
import torch

from hierarchos.data import bundled_tokenizer_path, streaming, token_cache
from hierarchos.data.sources import DataSpec
from hierarchos.data.tokenizers import load_tokenizer
from hierarchos.errors import HierarchosError
from hierarchos.train.batches import TokenStreams

WORDS = "the quick brown fox jumps over a lazy dog naïve café 東京 ü 🙂 thou art\tmore lovely".split(" ")


@pytest.fixture(scope="module")
def bpe():
    return load_tokenizer(bundled_tokenizer_path())


@pytest.fixture
def seed():
    value = random.randrange(2**31)
    print(f"seed {value}")
    return value


def random_text(rng: random.Random, n_words: int) -> str:
    seps = [" ", " ", " ", "\n", "\n\n", "  ", "\t", " \n"]
    return "".join(rng.choice(WORDS) + rng.choice(seps) for _ in range(n_words)).strip()


def expected_tokens(tokenizer, texts) -> np.ndarray:
    ids = []
    for text in texts:
        ids += tokenizer.encode(text) + [tokenizer.eos_id]
    return np.array(ids)


def build(tmp_path, spec_path, tokenizer, lines=None):
    source = streaming.open_source(DataSpec(train=str(spec_path)))
    directory = token_cache.cache_dir(tmp_path / "cache", source, "t")
    log = lines.append if lines is not None else (lambda line: None)
    return token_cache.open_cache(directory, source, tokenizer, log=log), directory


def test_cut_pieces_tokenize_like_the_whole_text(bpe, seed):
    rng = random.Random(seed)
    for _ in range(20):
        text = random_text(rng, rng.randrange(50, 400))
        parts = list(streaming.pieces(text, size=rng.randrange(8, 64)))
        assert "".join(parts) == text
        assert [t for p in parts for t in bpe.encode(p)] == bpe.encode(text)


def test_cache_holds_each_text_then_eos(tmp_path, bpe, seed, monkeypatch):
    # small reads and pieces, so files are cut many times (inside multi-byte characters too)
    monkeypatch.setattr(streaming, "READ_BYTES", 7)
    monkeypatch.setattr(streaming, "PIECE_CHARS", 40)
    monkeypatch.setattr(token_cache, "BATCH_CHARS", 100)
    rng = random.Random(seed)
    texts = [random_text(rng, rng.randrange(1, 80)) for _ in range(30)]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    cache, _ = build(tmp_path, jsonl, bpe)
    assert cache.tokens.dtype == np.uint16 and isinstance(cache.tokens, np.memmap)
    np.testing.assert_array_equal(np.asarray(cache.tokens), expected_tokens(bpe, texts))
    assert cache.index["records"] == 30 and cache.index["chars"] == sum(len(t) for t in texts)
    assert list(cache.doc_lengths()) == [len(bpe.encode(t)) + 1 for t in texts]

    folder = tmp_path / "plays"
    folder.mkdir()
    for i, text in enumerate(texts[:5]):
        (folder / f"{i}.txt").write_text(text * 3, encoding="utf-8")
    cache, _ = build(tmp_path, folder, bpe)
    np.testing.assert_array_equal(np.asarray(cache.tokens), expected_tokens(bpe, [t * 3 for t in texts[:5]]))


def test_reused_when_nothing_changed_rebuilt_when_a_file_changed(tmp_path, bpe, monkeypatch):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "one two three"}\n{"text": "four five"}\n', encoding="utf-8")
    lines = []
    first, directory = build(tmp_path, data, bpe, lines)
    assert lines[0] == f"token cache: building {directory}"

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt although nothing changed")

    with monkeypatch.context() as patch:
        patch.setattr(token_cache, "build", no_build)
        lines.clear()
        again, _ = build(tmp_path, data, bpe, lines)
    assert lines == [f"token cache: reusing {directory} ({first.n_tokens:,} tokens)"]
    np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(first.tokens))

    data.write_text('{"text": "one two three"}\n{"text": "four five six"}\n', encoding="utf-8")
    lines.clear()
    changed, _ = build(tmp_path, data, bpe, lines)
    assert lines[0].startswith(f"token cache: rebuilding {directory} ({data.resolve()} changed (size "), lines
    np.testing.assert_array_equal(np.asarray(changed.tokens), expected_tokens(bpe, ["one two three", "four five six"]))


def test_rebuilt_when_the_tokenizer_changed(tmp_path, bpe):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "one two three"}\n', encoding="utf-8")
    build(tmp_path, data, bpe)
    lines = []
    byte = load_tokenizer("byte")
    cache, directory = build(tmp_path, data, byte, lines)
    assert lines[0].startswith(f"token cache: rebuilding {directory} (the tokenizer changed (name "), lines
    np.testing.assert_array_equal(np.asarray(cache.tokens), list(b"one two three") + [byte.eos_id])


@pytest.mark.parametrize("damage", ["truncate", "flip_sampled", "flip_elsewhere", "index"])
def test_corrupt_cache_is_detected_and_rebuilt(tmp_path, bpe, damage, monkeypatch):
    monkeypatch.setattr(token_cache, "SAMPLE_BLOCKS", 4)  # blocks at 0, 1/4, 1/2, 3/4 of the file
    monkeypatch.setattr(token_cache, "SAMPLE_BLOCK_BYTES", 2)
    data = tmp_path / "d.jsonl"
    rng = random.Random(0)
    texts = [random_text(rng, 300) for _ in range(20)]
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    good, directory = build(tmp_path, data, bpe)
    reference = np.array(good.tokens)
    tokens = directory / token_cache.TOKENS
    raw = bytearray(tokens.read_bytes())
    if damage == "truncate":
        tokens.write_bytes(raw[:-6])
    elif damage == "index":
        (directory / token_cache.INDEX).write_text("{", encoding="utf-8")
    else:  # a byte inside a sampled block (offset 0), or one between them (only the full checksum sees it)
        raw[0 if damage == "flip_sampled" else len(raw) // 8] ^= 0xFF
        tokens.write_bytes(raw)
    lines = []
    rebuilt, _ = build(tmp_path, data, bpe, lines)
    expect = {"truncate": "tokens.bin is truncated or corrupt",
              "flip_sampled": "tokens.bin is corrupt (checksum of sampled blocks differs)",
              "flip_elsewhere": "tokens.bin is corrupt (checksum differs)",
              "index": "index.json is missing or unreadable"}[damage]
    assert lines[0].startswith(f"token cache: rebuilding {directory} ({expect}"), lines
    np.testing.assert_array_equal(np.asarray(rebuilt.tokens), reference)


def test_interrupted_or_disk_full_build_leaves_nothing(tmp_path, bpe, monkeypatch):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"record {i} " * 50}) + "\n" for i in range(200)), encoding="utf-8")
    monkeypatch.setattr(token_cache, "BATCH_CHARS", 500)
    calls = {"n": 0}
    real = type(bpe).encode_batch

    def fail_later(self, texts):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, texts)

    monkeypatch.setattr(type(bpe), "encode_batch", fail_later)
    source = streaming.open_source(DataSpec(train=str(data)))
    directory = token_cache.cache_dir(tmp_path / "cache", source, "t")
    with pytest.raises(KeyboardInterrupt):
        token_cache.open_cache(directory, source, bpe, log=lambda line: None)
    assert not directory.exists() and list((tmp_path / "cache").iterdir()) == []

    def disk_full(self, texts):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(bpe), "encode_batch", disk_full)
    with pytest.raises(HierarchosError, match=r"the disk filled up while writing it .*--token-cache DIR"):
        token_cache.open_cache(directory, source, bpe, log=lambda line: None)
    assert not directory.exists() and list((tmp_path / "cache").iterdir()) == []


def test_bad_utf8_in_a_text_file_names_the_byte(tmp_path, bpe, monkeypatch):
    monkeypatch.setattr(streaming, "READ_BYTES", 5)
    bad = tmp_path / "bad.txt"
    bad.write_bytes("héllo wörld ".encode() * 3 + b"\xff tail")
    with pytest.raises(HierarchosError, match=rf"{bad} is not UTF-8 text \(byte {len('héllo wörld '.encode()) * 3}\)"):
        build(tmp_path, bad, bpe)


def test_shuffled_windows_cover_each_window_once_per_epoch(seed):
    # token i of the corpus is the number i, so every window says where it was read from
    rng = np.random.default_rng(seed)
    flat = np.arange(int(rng.integers(400, 3000)), dtype=np.uint16)
    B, T = int(rng.integers(1, 5)), int(rng.integers(2, 17))
    streams = TokenStreams.from_tokens(flat, B, T, shuffle_seed=seed)
    per_stream = len(flat) // B
    n = (per_stream - 1) // T
    assert len(streams) == n
    every_window = sorted(r * per_stream + k * T for r in range(B) for k in range(n))
    orders = []
    for epoch in range(3):
        starts = []
        for step in range(n):
            x, y = streams.batch(step, epoch)
            assert x.shape == (B, T) and x.dtype == torch.long
            for b in range(B):  # one contiguous slice of one stream, targets one token ahead
                first = int(x[b, 0])
                assert torch.equal(x[b], torch.arange(first, first + T)) and torch.equal(y[b], x[b] + 1)
                starts.append(first)
        assert sorted(starts) == every_window  # each full window of each stream exactly once per epoch
        orders.append(starts)
    again = TokenStreams.from_tokens(flat, B, T, shuffle_seed=seed)
    assert [int(again.batch(i, 2)[0][b, 0]) for i in range(n) for b in range(B)] == orders[2]  # seeded
    if n >= 8:  # the order changes with the epoch: a row has >= 4 segments (24+ orders), so two
        # epochs can match by chance (1 in 24 with one row); six epochs all equal happen ~1 in 8e6
        for epoch in range(3, 6):
            orders.append([int(streams.batch(i, epoch)[0][b, 0]) for i in range(n) for b in range(B)])
        assert len({tuple(order) for order in orders}) > 1
    # DDP: the ranks' rows (rank, rank + world, ...) are disjoint and together every row
    ranks = [streams.streams[r::2] for r in range(2)]
    assert sorted(int(row[0]) for part in ranks for row in part) == [r * per_stream for r in range(B)]


def test_prefix_is_what_the_streams_consumed(seed):
    rng = np.random.default_rng(seed)
    flat = rng.integers(0, 1000, size=600).astype(np.uint16)
    streams = TokenStreams.from_tokens(flat, 3, 8, shuffle_seed=seed)
    step = int(rng.integers(0, len(streams)))
    consumed = torch.cat([streams.batch(i, 1)[0] for i in range(step)], dim=1) if step else torch.zeros(3, 0)
    assert torch.equal(streams.prefix(step, 1), consumed.long())


def test_unshuffled_memmap_streams_match_the_tensor_streams(tmp_path, seed):
    rng = np.random.default_rng(seed)
    docs = [list(rng.integers(0, 250, size=int(rng.integers(1, 60)))) for _ in range(20)]
    flat = np.array([t for d in docs for t in d + [259]], dtype=np.uint16)
    path = tmp_path / "t.bin"
    flat.tofile(path)
    mapped = TokenStreams.from_tokens(np.memmap(path, dtype=np.uint16, mode="r"), 2, 7)
    tensor = TokenStreams.from_documents([[int(t) for t in d] for d in docs], 259, 2, 7)
    assert len(mapped) == len(tensor)
    for step in range(len(tensor)):
        for a, b in zip(mapped.batch(step), tensor.batch(step)):
            assert torch.equal(a, b)


def test_held_out_tail_bytes_equal_the_decoded_text(tmp_path, bpe, seed):
    from hierarchos.cli.train_data import RunData, tail_bytes

    rng = random.Random(seed)
    texts = [random_text(rng, rng.randrange(1, 60)) for _ in range(25)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    cache, _ = build(tmp_path, data, bpe)
    assert cache.index["text_bytes"] == sum(len(t.encode()) for t in texts)
    ends = [0] + [int(e) for e in cache.doc_ends]
    for split in [rng.randrange(1, cache.n_tokens) for _ in range(10)] + ends[1:4]:
        run = RunData("d", "plain", bpe, cache.tokens[:split], val_tokens=cache.tokens[split:], cache=cache)
        decoded = len(bpe.decode(cache.tokens[split:].tolist()).encode("utf-8"))
        assert tail_bytes(run, split) == decoded, split


def test_a_file_that_fails_to_read_is_named(tmp_path, bpe, monkeypatch):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("fine text", encoding="utf-8")
    (folder / "b.txt").write_text("more text", encoding="utf-8")
    real_open = open

    def failing_open(file, mode="r", *args, **kwargs):
        if str(file).endswith("b.txt") and "b" in mode:
            raise PermissionError(13, "Permission denied")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", failing_open)
    with pytest.raises(HierarchosError, match=rf"^{folder / 'b.txt'}: cannot be read \(Permission denied\)"):
        build(tmp_path, folder, bpe)
    assert list((tmp_path / "cache").glob("*")) == []  # nothing half-built is left


# --- --hf-streaming: datasets' streaming mode through the same reader, tokenizer and cache -------------
def stream_build(tmp_path, spec, tokenizer, lines=None):
    source = streaming.open_source(spec)
    directory = token_cache.cache_dir(tmp_path / "cache", source, "t")
    log = lines.append if lines is not None else (lambda line: None)
    return token_cache.open_cache(directory, source, tokenizer, log=log), directory


@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_hf_streaming_local_files_give_the_same_cache(tmp_path, bpe, seed, suffix):
    rng = random.Random(seed)
    texts = [random_text(rng, rng.randrange(1, 60)) for _ in range(12)]
    data = tmp_path / f"d{suffix}"
    if suffix == ".jsonl":
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    else:  # a .txt file is one document
        data.write_text("\n\n".join(texts), encoding="utf-8")
        texts = ["\n\n".join(texts)]
    cache, directory = stream_build(tmp_path, DataSpec(hf_dataset=str(data), streaming=True), bpe)
    np.testing.assert_array_equal(np.asarray(cache.tokens), expected_tokens(bpe, texts))
    assert cache.index["sources"][0]["path"] == str(data.resolve())  # local files: fingerprinted as usual
    lines = []
    stream_build(tmp_path, DataSpec(hf_dataset=str(data), streaming=True), bpe, lines)
    assert lines[0].startswith("token cache: reusing"), lines


def _iterable(records):
    from datasets import IterableDataset

    def generate():
        for record in records:
            if isinstance(record, Exception):
                raise record
            yield record

    return IterableDataset.from_generator(generate)


def test_hf_streaming_a_hub_dataset_is_read_as_a_stream(tmp_path, bpe, monkeypatch):
    from hierarchos.data import sources

    texts = ["first record", "", "second record, longer"]
    opened = []

    def fake_hub(spec):
        assert spec.streaming and spec.hf_dataset == "someone/corpus"
        opened.append(spec.hf_dataset_split)
        return _iterable([{"text": t} for t in texts])

    monkeypatch.setattr(sources, "_load_hub", fake_hub)
    spec = DataSpec(hf_dataset="someone/corpus", streaming=True)
    cache, directory = stream_build(tmp_path, spec, bpe)
    np.testing.assert_array_equal(np.asarray(cache.tokens), expected_tokens(bpe, [texts[0], texts[2]]))
    assert cache.index["sources"] == [{"dataset": "someone/corpus", "streaming": True}]
    assert cache.index["skipped_records"] == 1 and opened == ["train"]
    lines = []
    stream_build(tmp_path, spec, bpe, lines)  # reused without opening the stream again
    assert lines[0].startswith("token cache: reusing") and opened == ["train"]


def test_hf_streaming_a_failing_stream_is_one_line_and_leaves_nothing(tmp_path, bpe, monkeypatch):
    from hierarchos.data import sources

    records = [{"text": f"record {i}"} for i in range(1000)] + [ConnectionError("connection reset by peer")]
    monkeypatch.setattr(sources, "_load_hub", lambda spec: _iterable(records))
    spec = DataSpec(hf_dataset="someone/corpus", streaming=True)
    source = streaming.open_source(spec)
    directory = token_cache.cache_dir(tmp_path / "cache", source, "t")
    with pytest.raises(HierarchosError, match=r"--hf_dataset someone/corpus: reading it failed \(.*connection reset"):
        token_cache.open_cache(directory, source, bpe, log=lambda line: None)
    assert not directory.exists() and list((tmp_path / "cache").iterdir()) == []
    monkeypatch.setattr(sources, "_load_hub", lambda spec: _iterable([]))
    with pytest.raises(HierarchosError, match="data file is empty: someone/corpus"):
        token_cache.open_cache(directory, streaming.open_source(spec), bpe, log=lambda line: None)


def test_hf_streaming_needs_an_hf_dataset(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "x"}\n', encoding="utf-8")
    with pytest.raises(HierarchosError, match="--hf-streaming reads a --hf_dataset"):
        streaming.open_source(DataSpec(train=str(data), streaming=True))


# --- pre-tokenized sources (--pre_chunked_dataset, --pre_pt_dataset) through the same cache ----------------
def _args(tmp_path, train, **flags):
    import argparse

    defaults = dict(train=str(train), pre_chunked_dataset=False, pre_pt_dataset=False, tokenizer_path=None,
                    model_path=None, token_cache=str(tmp_path / "cache"), val=None, val_fraction=0.0,
                    auto_max_length=False, text_column=None)
    return argparse.Namespace(**{**defaults, **flags})


@pytest.mark.parametrize("kind", ["jsonl", "pt"])
def test_pre_tokenized_chunks_are_cached_and_memory_mapped(tmp_path, bpe, seed, kind):
    from hierarchos.cli import train_data
    from hierarchos.data import chunked

    rng = np.random.default_rng(seed)
    chunks = [rng.integers(4, bpe.vocab_size, size=int(rng.integers(1, 40))).tolist() for _ in range(25)]
    if kind == "jsonl":
        path = tmp_path / "chunks.jsonl"
        chunked.write_prechunked_jsonl(chunks, path)
        flags = {"pre_chunked_dataset": True}
    else:
        path = tmp_path / "pt"
        chunked.write_pt_chunks(chunks, path, max_length=40, chunks_per_file=7, tokenizer_name="bundled")
        flags = {"pre_pt_dataset": True}
    args = _args(tmp_path, path, tokenizer_path=bundled_tokenizer_path(), **flags)
    data = train_data.prepare(args, None, None, None, bpe)
    expected = [i for chunk in chunks for i in chunk + [bpe.eos_id]]  # the old in-memory packing
    assert isinstance(data.train_tokens, np.memmap) and np.asarray(data.train_tokens).tolist() == expected
    assert data.cache is None and data.template == "pretokenized" and data.identity["tokens"] == len(expected)
    directory = next((tmp_path / "cache").iterdir())
    index = json.loads((directory / token_cache.INDEX).read_text())
    assert index["encoder"] == "pretokenized" and index["n_docs"] == len(chunks)
    # reused while nothing changed; a changed file rebuilds it
    lines = []
    files = [path] if kind == "jsonl" else [path / chunked.MANIFEST_FILE, *sorted(path.glob("*.safetensors"))]
    documents = (lambda: chunked.iter_prechunked_jsonl(path)) if kind == "jsonl" else (
        lambda: chunked.iter_pt_chunks(path))
    token_cache.open_ids_cache(directory, files, documents, bpe, where=path, log=lines.append)
    assert lines[0].startswith("token cache: reusing"), lines
    if kind == "jsonl":
        chunked.write_prechunked_jsonl(chunks[:-1], path)
        lines.clear()
        again = token_cache.open_ids_cache(directory, files, documents, bpe, where=path, log=lines.append)
        assert lines[0].startswith(f"token cache: rebuilding {directory} ({path.resolve()} changed"), lines
        assert again.n_tokens == len(expected) - len(chunks[-1]) - 1


def test_pre_tokenized_ids_outside_the_vocabulary_are_one_line(tmp_path, bpe):
    from hierarchos.cli import train_data
    from hierarchos.data import chunked

    path = tmp_path / "chunks.jsonl"
    chunked.write_prechunked_jsonl([[5, 6, 7], [8, bpe.vocab_size + 3]], path)
    args = _args(tmp_path, path, pre_chunked_dataset=True)
    with pytest.raises(HierarchosError, match=rf"chunks.jsonl: chunk 1 holds token id {bpe.vocab_size + 3}, outside "
                                              rf"the tokenizer's {bpe.vocab_size} ids"):
        train_data.prepare(args, None, None, None, bpe)
    assert list((tmp_path / "cache").iterdir()) == []  # nothing half-built is left


@pytest.mark.slow
def test_cli_trains_from_an_hf_stream_and_from_pre_chunked_data(tmp_path):
    """`hierarchos train` as a user runs it: --hf-streaming on a local JSONL, then pre-chunked JSONL."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from hierarchos.data import chunked

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "hf"),
               HIERARCHOS_TOKEN_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    flags = ["--tiny", "--tokenizer-path", "byte", "--max_length", "16", "--batch_size", "2", "--max-steps", "2",
             "--device", "cpu", "--val-fraction", "0"]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"record {i} of the streamed set"}) + "\n" for i in range(40)),
                    encoding="utf-8")
    chunks = tmp_path / "chunks.jsonl"
    chunked.write_prechunked_jsonl([list(range(5, 40)) for _ in range(10)], chunks)
    for data_flags in (["--hf_dataset", data, "--hf-streaming"], ["--train", chunks, "--pre_chunked_dataset"]):
        out = tmp_path / f"out-{data_flags[-1].lstrip('-')}"
        result = subprocess.run([sys.executable, "hierarchos_cli.py", "--threads", "1", "train", *map(str, data_flags),
                                 *flags, "--out-dir", str(out)], cwd=repo, env=env, stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        assert "token cache: building" in result.stdout
        assert len((out / "metrics.jsonl").read_text().splitlines()) >= 1


def test_two_processes_opening_one_cache_at_once_both_succeed(tmp_path, bpe):
    """Two runs started together on one corpus (a sweep): before the lock, the second one's recovery of
    interrupted writes deleted the first one's temp dir mid-build (FileNotFoundError, a traceback).
    Now one builds and the other reuses what it built; both read the same tokens."""
    import subprocess
    import sys

    rng = random.Random(0)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(random_text(rng, 400) for _ in range(400)), encoding="utf-8")
    script = (
        "import sys\n"
        "from hierarchos.data import bundled_tokenizer_path, streaming, token_cache\n"
        "from hierarchos.data.sources import DataSpec\n"
        "from hierarchos.data.tokenizers import load_tokenizer\n"
        "source = streaming.open_source(DataSpec(train=sys.argv[1]))\n"
        "directory = token_cache.cache_dir(__import__('pathlib').Path(sys.argv[2]), source, 't')\n"
        "cache = token_cache.open_cache(directory, source, load_tokenizer(bundled_tokenizer_path()))\n"
        "print('tokens', cache.n_tokens)\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(corpus), str(tmp_path / "cache")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (out, err) in zip(procs, outs):
        assert proc.returncode == 0 and "Traceback" not in err, err
    counts = {line for out, _ in outs for line in out.splitlines() if line.startswith("tokens")}
    assert len(counts) == 1, outs
    said = "".join(out for out, _ in outs)
    assert said.count("token cache: building") == 1 and said.count("token cache: reusing") == 1, said
    _, directory = build(tmp_path, corpus, bpe)
    assert token_cache.why_stale(directory, streaming.open_source(DataSpec(train=str(corpus))).fingerprint(),
                                 token_cache.tokenizer_identity(bpe)) is None
