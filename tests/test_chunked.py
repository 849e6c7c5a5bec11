"""Pre-chunked data: chunk windows, the tensor-chunk and JSONL round trips, lazy reading, each
bad-file line, and the two scripts (dataset_chunk_create.py, plot_metrics.py) run as a user would."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hierarchos.data import chunked as C
from hierarchos.data.chunked import (chunk_tokens, iter_prechunked_jsonl, iter_pt_chunks, write_prechunked_jsonl,
                                     write_pt_chunks)
from hierarchos.errors import HierarchosError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def rng(request):
    seed = random.randrange(2**31)
    print(f"{request.node.name}: seed {seed}")
    return random.Random(seed)


def random_chunks(rng, n, max_length):
    return [[rng.randrange(50000) for _ in range(rng.randint(1, max_length))] for _ in range(n)]


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(HierarchosError) as info:
        result = fn(*args, **kwargs)
        if hasattr(result, "__next__"):  # a lazy reader: errors surface while iterating
            list(result)
    return str(info.value)


# --- chunk_tokens ---------------------------------------------------------------------------
def test_chunk_tokens_windows():
    tokens = list(range(10))
    assert chunk_tokens(tokens, 4, 0) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert chunk_tokens(tokens, 4, 1) == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert chunk_tokens(tokens, 4, 3) == [[0, 1, 2, 3], [1, 2, 3, 4], [2, 3, 4, 5], [3, 4, 5, 6],
                                          [4, 5, 6, 7], [5, 6, 7, 8], [6, 7, 8, 9]]
    assert chunk_tokens(tokens, 16, 8) == [tokens]
    assert chunk_tokens([], 4, 1) == []


def test_chunk_tokens_properties(rng):
    for _ in range(200):
        tokens = [rng.randrange(100) for _ in range(rng.randint(1, 60))]
        max_length = rng.randint(1, 20)
        overlap = rng.randint(0, max_length - 1)
        windows = chunk_tokens(tokens, max_length, overlap)
        stride = max_length - overlap
        assert all(1 <= len(w) <= max_length for w in windows)
        assert all(len(w) == max_length for w in windows[:-1])
        for i, window in enumerate(windows):
            assert window == tokens[i * stride:i * stride + max_length]
        assert windows[-1][-1:] == tokens[-1:]  # reaches the end
        if len(windows) > 1:
            assert (len(windows) - 2) * stride + max_length < len(tokens)  # no window past the end


@pytest.mark.parametrize("max_length,overlap", [(4, 4), (4, 5), (4, -1)])
def test_chunk_tokens_bad_overlap(max_length, overlap):
    assert error_of(chunk_tokens, [1, 2, 3], max_length, overlap) == C.ERR_BAD_OVERLAP.format(
        overlap=overlap, max_length=max_length)


def test_chunk_tokens_bad_max_length():
    assert error_of(chunk_tokens, [1], 0, 0) == C.ERR_BAD_MAX_LENGTH.format(max_length=0)


# --- tensor chunks --------------------------------------------------------------------------
def test_pt_round_trip(tmp_path, rng):
    chunks = random_chunks(rng, 23, 12)
    stats = write_pt_chunks(iter(chunks), tmp_path / "ds", 12, 5, "byte")
    assert stats["num_chunks"] == 23 and stats["num_files"] == 5
    assert stats["num_tokens"] == sum(map(len, chunks))
    assert stats["max_seq_length"] == max(map(len, chunks))
    assert list(iter_pt_chunks(tmp_path / "ds")) == chunks
    manifest = [json.loads(line) for line in (tmp_path / "ds" / C.MANIFEST_FILE).read_text().splitlines()]
    assert [m["file"] for m in manifest] == [f"chunk_{i:05d}.safetensors" for i in range(5)]
    assert [m["num_chunks"] for m in manifest] == [5, 5, 5, 5, 3]
    assert {m["tokenizer"] for m in manifest} == {"byte"}
    dataset = C.PtChunkDataset(tmp_path / "ds", cache_files=2)
    assert len(dataset) == 23
    order = list(range(23))
    rng.shuffle(order)
    assert [dataset[i] for i in order] == [chunks[i] for i in order]
    assert len(dataset._cache) <= 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_pt_rewrite_replaces_atomically(tmp_path, rng):
    first, second = random_chunks(rng, 4, 8), random_chunks(rng, 3, 8)
    write_pt_chunks(first, tmp_path / "ds", 8, 2, "byte")

    def failing():
        yield from second
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_pt_chunks(failing(), tmp_path / "ds", 8, 2, "byte")
    assert list(iter_pt_chunks(tmp_path / "ds")) == first  # the old dataset is intact
    write_pt_chunks(second, tmp_path / "ds", 8, 2, "byte")
    assert list(iter_pt_chunks(tmp_path / "ds")) == second


def test_pt_too_long_chunk(tmp_path):
    assert error_of(write_pt_chunks, [[1, 2], [1, 2, 3, 4, 5]], tmp_path / "ds", 4, 10, "byte") == \
        C.ERR_CHUNK_TOO_LONG.format(index=1, n=5, max_length=4)
    assert not (tmp_path / "ds").exists()


def test_pt_without_lengths_tensor(tmp_path):
    (tmp_path / "ds").mkdir()
    ids = torch.tensor([[5, 6, 7], [8, -1, -1], [0, 9, -1]], dtype=torch.int32)
    save_file({"input_ids": ids}, str(tmp_path / "ds" / "a.safetensors"))
    (tmp_path / "ds" / C.MANIFEST_FILE).write_text(
        json.dumps({"file": "a.safetensors", "num_chunks": 3, "max_length": 3, "tokenizer": "x"}) + "\n")
    assert list(iter_pt_chunks(tmp_path / "ds")) == [[5, 6, 7], [8], [0, 9]]


def test_pt_loads_lazily(tmp_path, rng, monkeypatch):
    chunks = random_chunks(rng, 10, 6)
    write_pt_chunks(chunks, tmp_path / "ds", 6, 2, "byte")
    loaded = []
    real = C._load_chunk_file
    monkeypatch.setattr(C, "_load_chunk_file", lambda entry, manifest: loaded.append(entry.path.name)
                        or real(entry, manifest))
    iterator = iter_pt_chunks(tmp_path / "ds")
    assert loaded == []
    assert next(iterator) == chunks[0]
    assert loaded == ["chunk_00000.safetensors"]
    assert list(iterator) == chunks[1:]
    assert loaded == [f"chunk_{i:05d}.safetensors" for i in range(5)]  # each file read once


def write_manifest(directory: Path, entries):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / C.MANIFEST_FILE).write_text("".join(json.dumps(e) + "\n" for e in entries))


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors",
                                  "..\\x.safetensors", "C:\\x.safetensors"])
def test_manifest_path_escape(tmp_path, name):
    good = {"file": "ok.safetensors", "num_chunks": 1, "max_length": 1}
    write_manifest(tmp_path / "ds", [good, {"file": name, "num_chunks": 1, "max_length": 1}])
    manifest = tmp_path / "ds" / C.MANIFEST_FILE
    assert error_of(iter_pt_chunks, tmp_path / "ds") == C.ERR_ESCAPE.format(path=manifest, line=2, file=name)


def test_manifest_symlink_escape(tmp_path):
    (tmp_path / "outside.safetensors").write_bytes(b"")
    write_manifest(tmp_path / "ds", [{"file": "link.safetensors", "num_chunks": 1, "max_length": 1}])
    try:
        os.symlink(tmp_path / "outside.safetensors", tmp_path / "ds" / "link.safetensors")
    except OSError:
        pytest.skip("symlinks not permitted here")
    assert error_of(iter_pt_chunks, tmp_path / "ds") == C.ERR_ESCAPE.format(
        path=tmp_path / "ds" / C.MANIFEST_FILE, line=1, file="link.safetensors")


def test_manifest_errors(tmp_path):
    directory = tmp_path / "ds"
    directory.mkdir()
    (directory / "other.txt").write_text("x")
    assert error_of(iter_pt_chunks, directory) == C.ERR_NOT_CHUNK_DIR.format(path=directory, found="other.txt")
    manifest = directory / C.MANIFEST_FILE
    manifest.write_text('{"file": "a", "num_chunks": 1, "max_length": 2}\n{"file": \n')
    assert error_of(iter_pt_chunks, directory).startswith(f"{manifest} line 2: malformed JSON (")
    write_manifest(directory, [{"name": "a"}])
    assert error_of(iter_pt_chunks, directory) == C.ERR_MANIFEST_LINE.format(
        path=manifest, line=1, detail="expected an object with 'file', got 'name'")
    write_manifest(directory, [{"file": "a", "num_chunks": 0, "max_length": 2}])
    assert error_of(iter_pt_chunks, directory) == C.ERR_MANIFEST_LINE.format(
        path=manifest, line=1, detail="'num_chunks' must be a positive integer, got 0")
    manifest.write_text("\n")
    assert error_of(iter_pt_chunks, directory) == C.ERR_NO_CHUNKS.format(path=manifest)


def test_missing_and_corrupt_chunk_files(tmp_path, rng):
    chunks = random_chunks(rng, 6, 5)
    directory = tmp_path / "ds"
    write_pt_chunks(chunks, directory, 5, 3, "byte")
    manifest = directory / C.MANIFEST_FILE
    second = directory / "chunk_00001.safetensors"
    data = second.read_bytes()

    second.unlink()
    iterator = iter_pt_chunks(directory)
    assert [next(iterator) for _ in range(3)] == chunks[:3]  # the first file still reads
    with pytest.raises(HierarchosError) as info:
        next(iterator)
    assert str(info.value) == C.ERR_CHUNK_MISSING.format(path=second, manifest=manifest, line=2)

    second.write_bytes(data[: len(data) // 2])  # truncated
    message = error_of(iter_pt_chunks, directory)
    assert message.startswith(f"{second}: chunk file is truncated or corrupt (") and "\n" not in message

    second.write_bytes(b"\x00garbage" * 3)
    assert error_of(iter_pt_chunks, directory).startswith(f"{second}: chunk file is truncated or corrupt (")


def test_wrong_dtype_and_shape(tmp_path):
    directory = tmp_path / "ds"
    write_manifest(directory, [{"file": "a.safetensors", "num_chunks": 2, "max_length": 3}])
    path = directory / "a.safetensors"
    content = lambda detail: C.ERR_CHUNK_CONTENT.format(path=path, detail=detail)  # noqa: E731

    save_file({"input_ids": torch.zeros(2, 3, dtype=torch.float32)}, str(path))
    assert error_of(iter_pt_chunks, directory) == content("'input_ids' has dtype float32, expected int32")
    save_file({"input_ids": torch.zeros(2, 4, dtype=torch.int32)}, str(path))
    assert error_of(iter_pt_chunks, directory) == content("'input_ids' has shape (2, 4), the manifest says (2, 3)")
    save_file({"tokens": torch.zeros(2, 3, dtype=torch.int32)}, str(path))
    assert error_of(iter_pt_chunks, directory) == content("no 'input_ids' tensor (tensors: tokens)")
    save_file({"input_ids": torch.zeros(2, 3, dtype=torch.int32), "lengths": torch.tensor([3, 4])}, str(path))
    assert error_of(iter_pt_chunks, directory) == content("'lengths' outside 0..3")
    save_file({"input_ids": torch.tensor([[1, -5, 2], [1, 2, 3]], dtype=torch.int32)}, str(path))
    assert error_of(iter_pt_chunks, directory) == content("negative token ids inside a chunk")


# --- pre-chunked JSONL ----------------------------------------------------------------------
def test_jsonl_round_trip(tmp_path, rng):
    chunks = random_chunks(rng, 17, 9)
    stats = write_prechunked_jsonl(iter(chunks), tmp_path / "c.jsonl")
    assert stats == {"num_chunks": 17, "num_tokens": sum(map(len, chunks)), "max_seq_length": max(map(len, chunks))}
    assert list(iter_prechunked_jsonl(tmp_path / "c.jsonl")) == chunks
    (tmp_path / "t.jsonl").write_text('{"tokens": [1, 2]}\n\n{"input_ids": [3], "extra": 1}\n')
    assert list(iter_prechunked_jsonl(tmp_path / "t.jsonl")) == [[1, 2], [3]]


def test_jsonl_is_lazy(tmp_path, monkeypatch):
    path = tmp_path / "big.jsonl"
    line = json.dumps({"input_ids": list(range(64))}) + "\n"
    with open(path, "w") as handle:
        handle.write('{"input_ids": [7, 8, 9]}\n')
        handle.write(line * 20000)
        handle.write("{not json\n")  # only a full read would reach this
    decoded = []
    real_loads = json.loads
    monkeypatch.setattr(C.json, "loads", lambda text: decoded.append(1) or real_loads(text))
    iterator = iter_prechunked_jsonl(path)
    assert decoded == []
    assert next(iterator) == [7, 8, 9]
    assert len(decoded) == 1
    with pytest.raises(HierarchosError) as info:
        for _ in iterator:
            pass
    assert str(info.value).startswith(f"{path} line 20002: malformed JSON (")


IDS = "must be a list of non-negative integer token ids "


@pytest.mark.parametrize("content,line,message", [
    ('{"input_ids": [1]}\n{"input_ids": [1, 2\n', 2, "{path} line 2: malformed JSON (Expecting ',' delimiter)"),
    ('{"input_ids": [1]}\n\n{"text": "hi", "id": 3}\n', 3,
     "{path} line 3: no 'input_ids' (or 'tokens') key; keys are: text, id"),
    ('{"input_ids": [1, "2"]}\n', 1, "{path} line 1: 'input_ids' " + IDS + "(item 1 is '2')"),
    ('{"tokens": [1, 2.5]}\n', 1, "{path} line 1: 'tokens' " + IDS + "(item 1 is 2.5)"),
    ('{"input_ids": [true]}\n', 1, "{path} line 1: 'input_ids' " + IDS + "(item 0 is True)"),
    ('{"input_ids": [-1]}\n', 1, "{path} line 1: 'input_ids' " + IDS + "(item 0 is -1)"),
    ('{"input_ids": "1 2"}\n', 1, "{path} line 1: 'input_ids' " + IDS + "(got str)"),
    ('[1, 2]\n', 1, "{path} line 1: expected a JSON object with 'input_ids', got list"),
])
def test_jsonl_errors(tmp_path, content, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    assert error_of(iter_prechunked_jsonl, path) == message.format(path=path)


def test_jsonl_missing_empty_and_not_utf8(tmp_path):
    assert error_of(iter_prechunked_jsonl, tmp_path / "nope.jsonl") == C.ERR_JSONL_MISSING.format(
        path=tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    assert error_of(iter_prechunked_jsonl, tmp_path / "empty.jsonl") == C.ERR_NO_CHUNKS.format(
        path=tmp_path / "empty.jsonl")
    (tmp_path / "latin.jsonl").write_bytes(b'{"input_ids": [1]}\n{"x": "\xe9"}\n')
    assert error_of(iter_prechunked_jsonl, tmp_path / "latin.jsonl") == C.ERR_JSONL_NOT_UTF8.format(
        path=tmp_path / "latin.jsonl", line=2)


# --- scripts ----------------------------------------------------------------------------------
def run_script(name, *args, cwd, env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(cwd / "hf_cache"), **(env_extra or {})}
    return subprocess.run([sys.executable, str(REPO / "scripts" / name), *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def small_jsonl(tmp_path):
    rows = [{"text": "Fair is foul, and foul is fair. " * (1 + i % 4)} for i in range(7)]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def test_dataset_chunk_create_tensors(tmp_path, small_jsonl):
    from hierarchos.data.tokenizers import load_tokenizer

    path, rows = small_jsonl
    out = tmp_path / "chunks"
    result = run_script("dataset_chunk_create.py", "--dataset", path, "--tokenizer-path", "byte",
                        "--output-dir", out, "--max-length", 48, "--overlap", 8, "--chunks-per-file", 4,
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "MAX_SEQ_LENGTH=48"
    tokenizer = load_tokenizer(str(out))
    expected = [c for r in rows for c in chunk_tokens(tokenizer.encode(r["text"]) + [tokenizer.eos_id], 48, 8)]
    assert list(iter_pt_chunks(out)) == expected
    assert len(list(out.glob("chunk_*.safetensors"))) == -(-len(expected) // 4)


def test_dataset_chunk_create_jsonl_and_default_overlap(tmp_path, small_jsonl):
    path, rows = small_jsonl
    out = tmp_path / "jchunks"
    result = run_script("dataset_chunk_create.py", "--dataset", path, "--tokenizer-path", "byte",
                        "--output-dir", out, "--max-length", 64, "--jsonl", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "(max_length 64, overlap 32, tokenizer byte)" in result.stdout  # default 1024 capped at half
    chunks = list(iter_prechunked_jsonl(out / C.JSONL_FILE))
    assert chunks == list(iter_prechunked_jsonl(out))
    longest = max(len(r["text"].encode()) + 1 for r in rows)  # byte tokenizer: 1 token per byte + EOS
    assert result.stdout.strip().splitlines()[-1] == f"MAX_SEQ_LENGTH={min(64, longest)}"
    assert (out / "tokenizer.json").is_file()


def test_dataset_chunk_create_errors(tmp_path, small_jsonl):
    path, _ = small_jsonl
    result = run_script("dataset_chunk_create.py", "--dataset", path, "--tokenizer-path", "byte",
                        "--max-length", 16, "--overlap", 16, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: --overlap 16 must be at least 0 and smaller than --max-length 16: "
                                     "lower --overlap or raise --max-length")
    result = run_script("dataset_chunk_create.py", "--dataset", tmp_path / "missing.jsonl",
                        "--tokenizer-path", "byte", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: data file not found: {tmp_path / 'missing.jsonl'}"]


def test_plot_metrics(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib not installed (pip install matplotlib)")
    records = [{"step": s, "epoch": 1 + s // 10, "lr": 1e-3, "loss": 5.0 / s, "ponder": 1 + s % 3,
                "tokens_per_s": 1000.0, "skipped_steps": 0} for s in range(1, 21)]
    records[9].update(val_loss=0.6, val_bpb=1.2)
    records[19].update(val_loss=0.4, val_bpb=0.9)
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.parent.mkdir()
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "curves.png"
    result = run_script("plot_metrics.py", "--metrics", metrics, "--out", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "20 loss points, 2 val points, 20 ponder points" in result.stdout


def test_plot_metrics_errors(tmp_path):
    result = run_script("plot_metrics.py", "--metrics", tmp_path / "none.jsonl", "--out", tmp_path / "x.png",
                        cwd=tmp_path)
    missing = tmp_path / "none.jsonl"
    assert (result.returncode, result.stderr.strip()) == (2, f"error: metrics file not found: {missing}")
    (tmp_path / "m.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    blocker = tmp_path / "nomatplotlib"
    blocker.mkdir()
    (blocker / "matplotlib.py").write_text("raise ImportError('blocked for the test')\n")
    result = run_script("plot_metrics.py", "--metrics", tmp_path / "m.jsonl", "--out", tmp_path / "x.png",
                        cwd=tmp_path, env_extra={"PYTHONPATH": str(blocker)})
    assert (result.returncode, result.stderr.strip()) == (2, "error: " + _no_matplotlib())


def _no_matplotlib():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import plot_metrics
    finally:
        sys.path.pop(0)
    return plot_metrics.ERR_NO_MATPLOTLIB
