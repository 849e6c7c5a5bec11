"""Quantized models: which tensor gets which format, the GGUF file (round trip, gguf's own reader,
damage), the quantized HierarchosLM against the float model on the same (dequantized) weights,
parallel == step on the kernel, the quantize CLI, quantized chat, and learning through the shadow."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from hierarchos.chat import ChatSession, LearnConfig
from hierarchos.config import tiny_config
from hierarchos.data.tokenizers import load_tokenizer
from hierarchos.generate import SamplingConfig
from hierarchos.io import load_model_dir, save_model_dir
from hierarchos.model import HierarchosLM
from hierarchos.quant import gguf_io, kernel
from hierarchos.quant import model as qmodel
from hierarchos.quant.quantized_dir import load_quantized, quantize_model_dir

REPO = Path(__file__).resolve().parents[1]
QTYPES = ("INT4", "Q4_0", "Q8_0", "Q2_K")


def small_config(**kw):
    # width 64 / ffn 256: every Linear fits the 32-blocks, the ffn down projection also Q2_K's 256
    base = dict(vocab_size=260, context_dim=64, h_hidden=64, l_hidden=64, head_size=32, persistent_dim=32,
                ltm_slots=16, ltm_key_dim=32, ltm_val_dim=32, ltm_topk=2, ltm_chunk=8, h_stride=2,
                max_h_steps=2, max_l_steps=2, wkv_chunk_size=8, rosa_window=64)
    base.update(kw)
    return tiny_config(**base)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("qmodel") / "model"
    save_model_dir(path, HierarchosLM(small_config()), load_tokenizer("byte"), extra={"prompt_template": "plain"})
    return path


def dequantized_twin(cfg, tensors):
    """The float model on exactly the weights the quantized model holds (head untied: it has its own format)."""
    model = HierarchosLM(cfg).eval()
    model.lm_head = nn.Linear(cfg.context_dim, cfg.vocab_size, bias=False)
    state = {}
    for name, value in tensors.items():
        if isinstance(value, gguf_io.QuantTensor):
            value = kernel.dequantize(value.data, value.qtype, value.cols)
        state[name] = torch.from_numpy(np.array(value, dtype=np.float32 if np.asarray(value).dtype == np.float16
                                                else None))
    model.load_state_dict(state, strict=True)
    return model


# ---- which tensor gets which format ------------------------------------------------------------
def test_pick_format_fallbacks():
    assert qmodel.pick_format("Q2_K", 512) == "Q2_K"
    assert qmodel.pick_format("Q2_K", 64) == "Q4_0"
    assert qmodel.pick_format("INT4", 96) == "INT4"
    assert qmodel.pick_format("Q8_0", 48) == "F16"


@pytest.mark.parametrize("qtype", QTYPES)
def test_quantize_tensors_assigns_formats(qtype):
    torch.manual_seed(0)
    model = HierarchosLM(small_config())
    tensors = qmodel.quantize_tensors(model, qtype)
    assert set(tensors) == set(model.state_dict())
    for name, module in model.named_modules():
        value = tensors.get(f"{name}.weight")
        if isinstance(module, nn.Embedding):
            assert isinstance(value, gguf_io.QuantTensor) and value.qtype == "Q8_0", name
        elif isinstance(module, nn.Linear) and module.out_features >= qmodel.MIN_ROWS:
            assert isinstance(value, gguf_io.QuantTensor), name
            assert value.qtype == qmodel.pick_format(qtype, module.in_features), name
        elif isinstance(module, nn.Linear):
            assert isinstance(value, np.ndarray) and value.dtype == np.float32, name  # halting / gate heads
    # memory, norms and the low-rank mixes stay float
    for name in ("memory.values", "memory.keys", "out_norm.weight",
                 "reasoner.manager.blocks.0.time_mix.decay_down"):
        assert isinstance(tensors[name], np.ndarray) and tensors[name].dtype == np.float32
    assert tensors["memory.slot_count"].dtype == np.int64


# ---- the GGUF file -------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", QTYPES)
def test_gguf_round_trip_and_gguf_reader(tmp_path, qtype):
    import gguf

    torch.manual_seed(1)
    tensors = qmodel.quantize_tensors(HierarchosLM(small_config()), qtype)
    files = {"tokenizer.json": '{"x": "ü"}', "hierarchos_tokenizer.json": "{}"}
    path = gguf_io.write_gguf(tmp_path / "m.gguf", tensors, config_json='{"a": 1}', qtype=qtype,
                              tokenizer_files=files)
    back = gguf_io.read_gguf(path)
    assert back.qtype == qtype and back.config == {"a": 1} and back.tokenizer_files == files
    assert set(back.tensors) == set(tensors)
    for name, value in tensors.items():
        got = back.tensors[name]
        if isinstance(value, gguf_io.QuantTensor):
            assert got.qtype == value.qtype and got.cols == value.cols
            assert np.array_equal(got.data, value.data), name
        else:
            assert got.dtype == value.dtype and np.array_equal(got, value), name
    # gguf's own reader and dequantizer see the ggml block types as the same floats
    reader = gguf.GGUFReader(str(path))
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "hierarchos"
    checked = 0
    for t in reader.tensors:
        if t.tensor_type.name in ("Q4_0", "Q8_0", "Q2_K"):
            ours = tensors[t.name]
            theirs = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
            assert np.array_equal(theirs.reshape(ours.rows, ours.cols), kernel.dequantize(ours.data, ours.qtype, ours.cols))
            checked += 1
    assert checked > 0
    if qtype == "INT4":
        assert any(t.name.endswith(gguf_io.INT4_QS) for t in reader.tensors)


def test_damaged_gguf_is_one_clear_error(tmp_path):
    from hierarchos.errors import HierarchosError

    tensors = qmodel.quantize_tensors(HierarchosLM(small_config()), "Q4_0")
    path = gguf_io.write_gguf(tmp_path / "m.gguf", tensors, config_json="{}", qtype="Q4_0", tokenizer_files={})
    raw = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    for name in ("cut.gguf", "junk.gguf", "missing.gguf"):
        with pytest.raises(HierarchosError, match=name):
            gguf_io.read_gguf(tmp_path / name)
    assert not list(tmp_path.glob(".*tmp*"))  # the writer left no temp file behind


# ---- the quantized model -----------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", QTYPES)
def test_quantized_model_matches_float_model_on_its_weights(qtype):
    torch.manual_seed(2)
    cfg = small_config()
    tensors = qmodel.quantize_tensors(HierarchosLM(cfg), qtype)
    quant = qmodel.build_quantized_model(cfg, tensors)
    twin = dequantized_twin(cfg, tensors)
    tokens = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        got, want = quant(tokens), twin(tokens)
    # the only difference left is the kernel's on-the-fly 8-bit activations
    rel = ((got.logits - want.logits).norm() / want.logits.norm()).item()
    assert rel < 0.05, rel
    assert got.logits.shape == want.logits.shape
    assert (got.logits.argmax(-1) == want.logits.argmax(-1)).float().mean() > 0.8


# Relative L2 error of the logits against the fp32 model itself (weights and activations quantized)
# on random width-256 models, where every Linear takes the format (no fallbacks), over 2 x 24
# random tokens: about 1.4x the largest of 8 seeds (Q8_0 0.030, INT4 0.364, Q4_0 0.366, Q2_K 0.692;
# means 0.021 / 0.267 / 0.233 / 0.625). The README states these bounds.
LOGIT_ERROR_BOUND = {"Q8_0": 0.06, "INT4": 0.5, "Q4_0": 0.5, "Q2_K": 0.9}


@pytest.mark.parametrize("qtype", QTYPES)
def test_quantized_logits_within_bound_of_fp32_model(qtype):
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    torch.manual_seed(seed)
    cfg = small_config(context_dim=256, h_hidden=256, l_hidden=256, head_size=64, persistent_dim=128,
                       ltm_key_dim=64, ltm_val_dim=128)
    full = HierarchosLM(cfg).eval()
    tensors = qmodel.quantize_tensors(full, qtype)
    linear = [v for k, v in tensors.items() if isinstance(v, gguf_io.QuantTensor) and "embed" not in k]
    assert len(linear) == 26 and all(v.qtype == qtype for v in linear)  # every Linear, no fallback
    quant = qmodel.build_quantized_model(cfg, tensors)
    tokens = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        got, want = quant(tokens).logits, full(tokens).logits
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < LOGIT_ERROR_BOUND[qtype], (seed, rel)


def test_quantized_parallel_equals_step():
    torch.manual_seed(3)
    cfg = small_config()
    quant = qmodel.build_quantized_model(cfg, qmodel.quantize_tensors(HierarchosLM(cfg), "Q4_0"))
    tokens = torch.randint(0, cfg.vocab_size, (1, 12))
    with torch.no_grad():
        parallel = quant(tokens).logits[0]
        state, rows = quant.init_state(1), []
        for t in range(tokens.shape[1]):
            out = quant.step(tokens[:, t], state)
            state = out.state
            rows.append(out.logits[0])
    stepped = torch.stack(rows)
    assert torch.allclose(parallel, stepped, rtol=1e-4, atol=1e-4), (parallel - stepped).abs().max()


def test_quantized_model_counts_and_refuses_gradients():
    from hierarchos.errors import HierarchosError

    torch.manual_seed(4)
    cfg = small_config()
    full = HierarchosLM(cfg)
    quant = qmodel.build_quantized_model(cfg, qmodel.quantize_tensors(full, "Q8_0"))
    assert quant.num_parameters() == full.num_parameters()
    assert quant.num_parameters(with_deepembed=False) == full.num_parameters(with_deepembed=False)
    assert qmodel.quantized_bytes(quant) < 0.6 * 4 * full.num_parameters()
    x = torch.randn(3, 64, requires_grad=True)
    layer = next(m for m in quant.modules() if isinstance(m, qmodel.QuantLinear))
    with pytest.raises(HierarchosError, match="cannot be trained"):
        layer(x)


# ---- files, CLI and chat ----------------------------------------------------------------------------
def _cli(*args, stdin=None, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(REPO / "hierarchos_cli.py"), *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def test_quantize_dir_loads_back_with_tokenizer_and_metadata(model_dir, tmp_path):
    info = quantize_model_dir(model_dir, tmp_path / "q", "Q4_0")
    assert info["bytes"] < info["fp32_bytes"] / 2
    stored = json.loads((tmp_path / "q" / "quantized.json").read_text())
    assert stored["file"] == "model-Q4_0.gguf" and stored["qtype"] == "Q4_0"
    model, meta, tokenizer, content = load_quantized(tmp_path / "q")
    assert meta["prompt_template"] == "plain" and content.qtype == "Q4_0"
    assert tokenizer.encode("héllo") == load_tokenizer(str(model_dir)).encode("héllo")
    full, _ = load_model_dir(model_dir)
    assert torch.equal(model.memory.values, full.memory.values)
    # the .gguf file alone is enough too
    model2, *_ = load_quantized(tmp_path / "q" / "model-Q4_0.gguf")
    assert model2.cfg == model.cfg


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    """A model trained for two steps through the CLI, wide enough (64) for every format's blocks."""
    out = tmp_path_factory.mktemp("trained") / "run"
    done = _cli("train", "--tiny", "--context_dim", "64", "--h_hidden", "64", "--l_hidden", "64", "--head_size", "32",
                "--persistent_dim", "32", "--ltm_key_dim", "32", "--ltm_val_dim", "32", "--epochs", "1",
                "--max-steps", "2", "--max_length", "32", "--batch_size", "2", "--tokenizer-path", "byte",
                "--out-dir", str(out))
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.parametrize("qtype", QTYPES)
def test_cli_train_quantize_then_piped_chat(trained_dir, tmp_path, qtype):
    out_dir = tmp_path / f"m-{qtype}"
    done = _cli("quantize", "--model-path", str(trained_dir), "--out-dir", str(out_dir), "--qtype", qtype.lower())
    assert done.returncode == 0, done.stderr
    assert "smaller than fp32" in done.stdout and (out_dir / f"model-{qtype}.gguf").is_file()
    info = json.loads((out_dir / "quantized.json").read_text())
    assert qtype in info["storage"] or qtype == "Q2_K" and "Q4_0" in info["storage"]
    chat = _cli("chat", "--model-path", str(out_dir), "--temperature", "0", "--max-new-tokens", "8",
                stdin="hello there\n/status\n")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.strip(), "no reply"
    assert f"format {qtype} GGUF" in chat.stderr and "unavailable: quantized weights do not learn" in chat.stderr


def test_cli_quantized_errors(model_dir, tmp_path):
    out_dir = tmp_path / "m-Q4_0"
    assert _cli("quantize", "--model-path", str(model_dir), "--out-dir", str(out_dir), "--qtype", "Q4_0").returncode == 0
    cases = [
        (("quantize", "--model-path", str(tmp_path / "nope")), "model directory not found"),
        (("quantize", "--model-path", str(model_dir), "--out-dir", str(model_dir)), "is the model directory itself"),
        (("chat", "--model-path", str(out_dir), "--device", "cuda", "--prompt", "x"), "run on the CPU kernel"),
        (("chat", "--model-path", str(out_dir), "--enable-quantized-learning", "--prompt", "x"),
         "needs --shadow-model-path"),
        (("chat", "--model-path", str(model_dir), "--enable-quantized-learning", "--prompt", "x"),
         "apply to quantized models only"),
    ]
    for args, message in cases:
        done = _cli(*args)
        assert done.returncode == 2, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert lines[-1].startswith("error: ") and message in lines[-1], (args, done.stderr)
        assert "Traceback" not in done.stderr
    gguf_path = out_dir / "model-Q4_0.gguf"
    gguf_path.write_bytes(gguf_path.read_bytes()[:1000])
    done = _cli("chat", "--model-path", str(out_dir), "--prompt", "x")
    assert done.returncode == 2 and "not a readable GGUF file" in done.stderr and "Traceback" not in done.stderr
    bad = _cli("quantize", "--model-path", str(model_dir), "--qtype", "Q3_K")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_train_quantize_on_complete(tmp_path):
    done = _cli("train", "--tiny", "--epochs", "1", "--max-steps", "2", "--max_length", "32", "--batch_size", "2",
                "--tokenizer-path", "byte", "--out-dir", str(tmp_path / "run"), "--quantize-on-complete",
                "--qtype", "Q8_0")
    assert done.returncode == 0, done.stderr
    model, *_ = load_quantized(tmp_path / "run-Q8_0")
    assert model.cfg.context_dim == 16


def _quant_session(qdir, shadow_dir, *, threshold):
    from hierarchos.cli.chat import _load_quantized_session
    from argparse import Namespace

    model, meta, tokenizer, extra = _load_quantized_session(Namespace(
        model_path=str(qdir), enable_quantized_learning=True, shadow_model_path=str(shadow_dir)))
    out, info = io.StringIO(), io.StringIO()
    session = ChatSession(model, tokenizer, template="plain",
                          sampling=SamplingConfig(temperature=0.0, max_new_tokens=6, seed=0),
                          learn=LearnConfig(enabled=True, surprise_threshold=threshold), out=out, info=info,
                          log=info, **extra)
    return session, info


def test_quantized_learning_through_shadow_and_requantize(model_dir, tmp_path):
    import shutil

    shadow = tmp_path / "shadow"
    shutil.copytree(model_dir, shadow)
    qdir = tmp_path / "q"
    quantize_model_dir(shadow, qdir, "Q4_0")
    weights_before = (shadow / "model.safetensors").read_bytes()
    gguf_before = (qdir / "model-Q4_0.gguf").read_bytes()

    # below the threshold: nothing changes anywhere
    session, info = _quant_session(qdir, shadow, threshold=1e9)
    values = session.model.memory.values.clone()
    session.turn("To be, or not to be")
    assert "no update" in info.getvalue()
    assert torch.equal(session.model.memory.values, values) and torch.equal(session.learner.memory.values, values)

    # above: the shadow learns, the quantized model follows, /save re-quantizes and writes the delta
    session, info = _quant_session(qdir, shadow, threshold=0.0)
    session.turn("To be, or not to be")
    assert "updated" in info.getvalue()
    learned = session.learner.memory.values.clone()
    assert not torch.equal(learned, values)
    assert torch.equal(session.model.memory.values, learned)
    session.handle("/save")
    assert "re-quantized" in info.getvalue()
    assert (shadow / "ltm_delta.safetensors").is_file()
    assert (shadow / "model.safetensors").read_bytes() == weights_before  # the base model is never written
    assert (qdir / "model-Q4_0.gguf").read_bytes() != gguf_before
    reloaded, meta, *_ = load_quantized(qdir)
    assert torch.equal(reloaded.memory.values, learned)
    assert session.source in reloaded.memory.source_names
    # every other tensor is unchanged in the rewritten file
    old = gguf_io.read_gguf(tmp_path / "q" / "model-Q4_0.gguf").tensors
    for name, value in qmodel.quantize_tensors(load_model_dir(shadow)[0], "Q4_0").items():
        if name.startswith("memory.") and name.split(".")[1] in ("values", "slot_time", "slot_count", "slot_source"):
            continue
        got = old[name]
        assert np.array_equal(got.data if isinstance(got, gguf_io.QuantTensor) else got,
                              value.data if isinstance(value, gguf_io.QuantTensor) else value), name

    # a later session starts from the shadow + its delta, equal to what the file now holds
    again, _ = _quant_session(qdir, shadow, threshold=1e9)
    again.load_delta(again.delta_path)
    assert torch.equal(again.model.memory.values, learned)


@pytest.mark.parametrize("qtype", QTYPES)
def test_dense_prefill_path_equals_kernel_matmul(qtype):
    rng = np.random.default_rng()
    cols = 512
    w = rng.standard_normal((48, cols)).astype(np.float32)
    x = rng.standard_normal((qmodel.DENSE_FROM_ROWS + 5, cols)).astype(np.float32)
    layer = qmodel.QuantLinear(gguf_io.QuantTensor(qtype, kernel.quantize(w, qtype), cols))
    dense = layer.dense_matmul(x).numpy()
    exact = kernel.matmul(layer.weight_q.data, qtype, cols, x)
    assert np.allclose(dense, exact, rtol=1e-4, atol=1e-4 * np.abs(exact).max()), np.abs(dense - exact).max()
    # the layer picks the path by the number of rows; both give the same rows
    with torch.no_grad():
        big = layer(torch.from_numpy(x)).numpy()
        small = np.concatenate([layer(torch.from_numpy(x[i:i + 4])).numpy() for i in range(0, len(x), 4)])
    assert np.allclose(big, small, rtol=1e-4, atol=1e-4 * np.abs(small).max())
