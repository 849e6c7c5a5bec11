"""Fuzzing every file hierarchos reads: real files made by the project, mutated byte by byte.

For each kind of file (model directory, checkpoint, quantized GGUF, LoRA adapter, memory delta,
tensor-chunk dataset and its manifest, tokenizer, data files) each mutation (truncation, flipped
bytes, a garbage splice, an empty file) must either load or fail with a `HierarchosError` (the
CLI's one-line error): never another exception, never a hang (each load runs under an alarm).
Hypothesis drives the config JSON and the manifest lines. Seeds are fixed: a failure replays.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hierarchos.config import ModelConfig, tiny_config
from hierarchos.data.chunked import iter_pt_chunks, write_pt_chunks
from hierarchos.data.sources import DataSpec, load_texts
from hierarchos.data.tokenizers import load_tokenizer
from hierarchos.errors import HierarchosError
from hierarchos.io import load_checkpoint, load_model_dir, save_checkpoint, save_model_dir
from hierarchos.model import HierarchosLM
from hierarchos.train.schedule import build_optimizer

MUTATIONS_PER_FILE = 6
LOAD_SECONDS = 30
# rounds of fresh random mutations per file (a deeper local search: HIERARCHOS_FUZZ_ROUNDS=50)
ROUNDS = int(os.environ.get("HIERARCHOS_FUZZ_ROUNDS", "1"))


@contextmanager
def alarm(seconds: int):
    """Fail instead of hanging: SIGALRM raises inside the load."""
    def on_alarm(signum, frame):  # noqa: ARG001
        raise TimeoutError(f"load did not finish in {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def mutations(data: bytes, rng: random.Random) -> list[tuple[str, bytes]]:
    out = [("empty", b"")]
    if len(data) > 1:
        out.append(("truncated", data[:rng.randrange(1, len(data))]))
        flipped = bytearray(data)
        for _ in range(max(1, len(data) // 200)):
            flipped[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        out.append(("flipped", bytes(flipped)))
        start = rng.randrange(len(data))
        out.append(("garbage", data[:start] + bytes(rng.randrange(256) for _ in range(64)) + data[start + 64:]))
        head = rng.randrange(min(len(data), 256))  # headers and lengths live near the start
        early = bytearray(data)
        early[head] = rng.randrange(256)
        out.append(("header byte", bytes(early)))
    return out[:MUTATIONS_PER_FILE]


def fuzz_directory(tmp_path: Path, good: Path, load, seed: int = 0) -> int:
    """Mutate each file of `good` in turn (in a copy) and call `load(copy)`; returns the number of
    loads tried. Only success or HierarchosError may come out."""
    rng = random.Random(seed)
    tried = 0
    files = sorted(p for p in good.rglob("*") if p.is_file())
    assert files, good
    for file, _ in [(f, r) for f in files for r in range(ROUNDS)]:
        data = file.read_bytes()
        for name, mutated in mutations(data, rng):
            copy = tmp_path / f"case{tried}"
            shutil.copytree(good, copy)
            (copy / file.relative_to(good)).write_bytes(mutated)
            try:
                with alarm(LOAD_SECONDS):
                    load(copy)
            except HierarchosError as exc:
                assert str(exc).strip() and "\n" not in str(exc).strip(), (file.name, name, str(exc))
            except Exception as exc:  # noqa: BLE001 - the point of the test
                pytest.fail(f"{file.relative_to(good)} ({name}): {type(exc).__name__}: {exc}")
            finally:
                shutil.rmtree(copy, ignore_errors=True)
            tried += 1
    return tried


def _model(seed=0) -> HierarchosLM:
    torch.manual_seed(seed)
    return HierarchosLM(tiny_config(vocab_size=260))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_model_dir(tmp_path_factory.mktemp("fuzz") / "model", _model(), load_tokenizer("byte"),
                          history=[{"dataset": "x", "tokens": 10}], extra={"prompt_template": "plain"})


def test_model_directory(tmp_path, model_dir):
    assert fuzz_directory(tmp_path, model_dir, load_model_dir) > 10


def test_checkpoint(tmp_path):
    model = _model()
    optimizer = build_optimizer(model, 1e-3, 0.0)
    model(torch.randint(0, 260, (1, 8))).logits.sum().backward()
    optimizer.step()
    root = tmp_path / "ckpts"
    save_checkpoint(root, 3, model, optimizer, None, {"micro_step": 3, "opt_step": 3},
                    extra_tensors={"stream_state.x": torch.zeros(2, 3)})
    step_dir = next(root.glob("step-*"))

    def load(path):
        fresh = _model(1)
        load_checkpoint(path, fresh, build_optimizer(fresh, 1e-3, 0.0), restore_rng=False)

    assert fuzz_directory(tmp_path, step_dir, load) > 10


def test_quantized_gguf(tmp_path, model_dir):
    from hierarchos.quant.quantized_dir import load_quantized, quantize_model_dir

    quantize_model_dir(model_dir, tmp_path / "q", "Q8_0")
    assert fuzz_directory(tmp_path, tmp_path / "q", load_quantized) >= 6


def test_lora_adapter(tmp_path):
    from hierarchos.lora import LoraSettings, load_adapter, save_adapter, wrap

    save_adapter(tmp_path / "ad", wrap(_model(), LoraSettings(r=2)), LoraSettings(r=2))
    shutil.rmtree(tmp_path / "ad" / "checkpoints", ignore_errors=True)
    assert fuzz_directory(tmp_path, tmp_path / "ad", lambda path: load_adapter(_model(), path)) > 10


def test_memory_delta(tmp_path, model_dir):
    from hierarchos.chat import ChatSession

    session = ChatSession(*_session_parts(model_dir), model_dir=model_dir, out=io.StringIO(), info=io.StringIO())
    session.save_delta(tmp_path / "delta" / "ltm_delta.safetensors")

    def load(path):
        session = ChatSession(*_session_parts(model_dir), model_dir=model_dir, out=io.StringIO(), info=io.StringIO())
        session.load_delta(path / "ltm_delta.safetensors")

    assert fuzz_directory(tmp_path, tmp_path / "delta", load) >= 4


def _session_parts(model_dir):
    model, _ = load_model_dir(model_dir)
    return model, load_tokenizer(str(model_dir))


def test_tensor_chunk_dataset(tmp_path):
    chunks = [[i % 250 for i in range(j, j + 20)] for j in range(30)]
    write_pt_chunks(chunks, tmp_path / "chunks", max_length=20, chunks_per_file=10, tokenizer_name="byte")
    assert fuzz_directory(tmp_path, tmp_path / "chunks", lambda path: list(iter_pt_chunks(path))) > 10


def test_tokenizer_directory(tmp_path, model_dir):
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    load_tokenizer("byte").save(tok_dir)
    assert fuzz_directory(tmp_path, tok_dir, lambda path: load_tokenizer(str(path))) >= 6


@pytest.mark.parametrize("name,content", [
    ("data.jsonl", "\n".join(json.dumps({"text": f"line {i} é"}) for i in range(20))),
    ("data.json", json.dumps([{"instruction": "a", "input": "", "output": "b"}] * 5)),
    ("data.csv", "text,other\n" + "\n".join(f"row {i},x" for i in range(20))),
    ("data.txt", "some text\nmore text é\n" * 20),
])
def test_data_files(tmp_path, name, content):
    good = tmp_path / "good"
    good.mkdir()
    (good / name).write_text(content, encoding="utf-8")
    assert fuzz_directory(tmp_path, good, lambda path: load_texts(DataSpec(train=str(path / name)))) >= 4


json_values = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats() | st.text(max_size=8),
                           lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8),
                                                                                          children, max_size=3),
                           max_leaves=6)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(sorted(ModelConfig().to_dict()) + ["bogus", "H_layers"]), json_values,
                       max_size=6))
def test_config_json_never_crashes(fields):
    try:
        ModelConfig.from_dict({**tiny_config().to_dict(), **fields})
    except HierarchosError as exc:
        assert "\n" not in str(exc)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(st.lists(json_values | st.text(max_size=30), min_size=1, max_size=4))
def test_manifest_lines_never_crash(tmp_path, lines):
    folder = tmp_path / "m"
    shutil.rmtree(folder, ignore_errors=True)
    write_pt_chunks([[1, 2, 3, 4]] * 4, folder, max_length=4, chunks_per_file=2, tokenizer_name="byte")
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(v if isinstance(v, str) else json.dumps(v) for v in lines), encoding="utf-8")
    try:
        list(iter_pt_chunks(folder))
    except HierarchosError as exc:
        assert "\n" not in str(exc)


def test_manifest_paths_cannot_escape(tmp_path):
    folder = tmp_path / "m"
    write_pt_chunks([[1, 2, 3, 4]] * 4, folder, max_length=4, chunks_per_file=2, tokenizer_name="byte")
    outside = tmp_path / "secret.safetensors"
    shutil.copy(next(folder.glob("*.safetensors")), outside)
    entry = json.loads((folder / "manifest.jsonl").read_text().splitlines()[0])
    for name in ("../secret.safetensors", str(outside)):
        (folder / "manifest.jsonl").write_text(json.dumps({**entry, "file": name}) + "\n", encoding="utf-8")
        with pytest.raises(HierarchosError, match="outside|escape|inside"):
            list(iter_pt_chunks(folder))
