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
from hierarchos.quant import fused_step, gguf_io, kernel
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


# ---- the quantized model against an independent emulation -------------------------------------------
# What the quantized model computes, written from the formats' definitions with no code of ours:
# weights quantized and dequantized by independent references (the `gguf` package for Q4_0 / Q8_0,
# tests/q2k_reference.py for Q2_K, INT4's definition below), and every quantized Linear's input
# rounded to the kernel's 8-bit activation blocks (ggml's Q8_0, or Q8_K before a Q2_K matrix) in torch.
# The two agree to float32 summation order, which bounds the quantized model far more tightly than an
# error bound against the fp32 model could: a wrong scale, code, block layout or activation rounding
# anywhere moves the logits by a fraction of the quantization error itself.

def _reference_dequantized(qtype: str, w: np.ndarray) -> np.ndarray:
    import gguf.quants

    import q2k_reference

    if qtype == "INT4":  # symmetric: d = block amax / 7 (fp32), q = round(w / d) in [-7, 7], w ~ q d
        blocks = w.reshape(-1, 32).astype(np.float64)
        d = (np.abs(blocks).max(axis=1, keepdims=True) / 7).astype(np.float32).astype(np.float64)
        q = np.clip(np.trunc(np.abs(blocks) / np.where(d == 0, 1, d) + 0.5) * np.sign(blocks), -7, 7)
        return (q * d).astype(np.float32).reshape(w.shape)
    if qtype == "Q2_K":
        raw = np.frombuffer(b"".join(q2k_reference.quantize(w.tolist())), np.uint8).reshape(w.shape[0], -1)
    else:
        raw = gguf.quants.quantize(w, getattr(gguf.GGMLQuantizationType, qtype))
    return gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, qtype)).reshape(w.shape)


def _q8_activations(x: torch.Tensor, qtype: str) -> torch.Tensor:
    """x (N, cols) as the 8-bit blocks the kernel multiplies: ggml's Q8_0 (32 values: d = amax / 127 stored
    in fp16, codes round(x / d) half away from zero) or, before a Q2_K matrix, Q8_K (256 values: scale
    -127 / the signed extreme, codes rounded half to even, capped at 127, d = 1 / scale in float32)."""
    if qtype == "Q2_K":
        blocks = x.reshape(x.shape[0], -1, 256)
        extreme = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))
        iscale = torch.where(extreme == 0, torch.zeros_like(extreme), -127.0 / extreme)
        codes = torch.round(iscale * blocks).clamp(max=127)  # torch.round: ties to even
        d = torch.where(iscale == 0, torch.zeros_like(iscale), 1.0 / iscale)
    else:
        blocks = x.reshape(x.shape[0], -1, 32)
        d32 = blocks.abs().amax(-1, keepdim=True) / 127.0
        inverse = torch.where(d32 == 0, torch.zeros_like(d32), 1.0 / d32)
        scaled = blocks * inverse
        codes = torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)
        d = d32.half().float()
    return (codes * d).reshape(x.shape)


def _reference_emulation(cfg, full: HierarchosLM, tensors: dict) -> HierarchosLM:
    """`full` with every weight the quantized model quantized replaced by its reference dequantization,
    and each quantized Linear's input replaced by its 8-bit activation blocks (forward pre-hooks)."""
    twin = HierarchosLM(cfg).eval()
    twin.lm_head = nn.Linear(cfg.context_dim, cfg.vocab_size, bias=False)  # the head has its own format
    state = {name: value.detach().clone() for name, value in full.state_dict().items()}
    state["lm_head.weight"] = full.lm_head.weight.detach().clone()
    for name, value in tensors.items():
        if isinstance(value, gguf_io.QuantTensor):
            state[name] = torch.from_numpy(_reference_dequantized(value.qtype, state[name].numpy()))
    twin.load_state_dict(state, strict=True)
    for name, module in twin.named_modules():
        value = tensors.get(f"{name}.weight")
        if isinstance(module, nn.Linear) and isinstance(value, gguf_io.QuantTensor):
            module.register_forward_pre_hook(
                lambda _m, args, qtype=value.qtype: (_q8_activations(args[0].reshape(-1, args[0].shape[-1]), qtype)
                                                    .reshape(args[0].shape),))
    return twin


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("qtype", QTYPES)
def test_quantized_model_equals_reference_emulation(qtype):
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    torch.manual_seed(seed)
    cfg = small_config()
    full = HierarchosLM(cfg).eval()
    tensors = qmodel.quantize_tensors(full, qtype)
    assert {v.qtype for v in tensors.values() if isinstance(v, gguf_io.QuantTensor)} >= {qtype, "Q8_0"}
    quant = qmodel.build_quantized_model(cfg, tensors)
    twin = _reference_emulation(cfg, full, tensors)
    float_activations = _reference_emulation(cfg, full, tensors)  # the same weights, activations left float
    for module in float_activations.modules():
        module._forward_pre_hooks.clear()
    reference_weights = {name: torch.from_numpy(_reference_dequantized(value.qtype, full.state_dict()[
        name if name != "lm_head.weight" else "embed.weight"].numpy())).double()
        for name, value in tensors.items() if isinstance(value, gguf_io.QuantTensor)}
    calls = []  # (module name, qtype, input, output) of every quantized module in the real forward
    for name, module in quant.named_modules():
        if isinstance(module, (qmodel.QuantLinear, qmodel.QuantEmbedding)):
            module.register_forward_hook(lambda m, args, out, name=name: calls.append((name, m, args[0], out)))
    # 1 x 12 tokens: each Linear sees fewer than DENSE_FROM_ROWS rows (the kernel's integer matmul);
    # 2 x 16: at least as many in the large ones (dequantized GEMM on the activation blocks)
    for shape in ((1, 12), (2, 16)):
        tokens = torch.randint(0, cfg.vocab_size, shape)
        calls.clear()
        with torch.no_grad():
            got, want, loose = quant(tokens).logits, twin(tokens).logits, float_activations(tokens).logits
        # every quantized module, on the input it really received inside the model: the reference
        # function of that input, to float32 summation rounding
        assert len(calls) > 30
        for name, module, x, y in calls:
            w = reference_weights[f"{name}.weight"]
            if isinstance(module, qmodel.QuantEmbedding):
                assert torch.equal(y, w[x].float()), (seed, name)
                continue
            x_used = _q8_activations(x.reshape(-1, x.shape[-1]), module.weight_q.qtype).double()
            expected = x_used @ w.T + (0 if module.bias is None else module.bias.double())
            scale = x_used.abs() @ w.abs().T
            error = (y.reshape(expected.shape).double() - expected).abs()
            assert (error <= 2e-5 * scale + 1e-6).all(), (seed, shape, name, (error / (scale + 1e-6)).max().item())
        # End to end, errors compound: a float32 summation difference of 1e-7 now and then moves an
        # activation across a rounding boundary of its 8-bit block, and this random model amplifies it to
        # about what the activation rounding itself costs (measured over 80 draws: 0 in most, 7e-4 to
        # 1e-2 otherwise, at most 1.2x the rounding's own effect; one argmax in 8 flipped once). So the
        # whole-model check is looser than the per-module one above, which is the exact one.
        rel, rounding = _relative(got, want), _relative(loose, want)
        assert rel < 3 * rounding and rel < 0.03, (seed, shape, rel, rounding)
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.75, (seed, shape)


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


def test_fused_projections_equal_one_call_each(monkeypatch):
    """fuse_projections: a generation step with each layer's projections of one tensor in one
    kernel.matmul_many call gives bit-identical logits and state to every QuantLinear on its own, in
    fewer kernel calls; a member called on another tensor runs alone."""
    torch.manual_seed(5)
    cfg = small_config(h_layers=2, l_layers=2)
    quant = qmodel.build_quantized_model(cfg, qmodel.quantize_tensors(HierarchosLM(cfg), "Q4_0"))
    fused_step.attach_fused_steps(quant, enabled=False)  # the Python step, whose projections are grouped
    groups = qmodel.fuse_projections(quant)
    # each RWKV block: the time mix's receptance/key/value(/gate) and the channel mix's gate/up
    assert groups == 2 * (cfg.h_layers + cfg.l_layers), groups
    calls = {"one": 0, "many": 0}
    one, many = kernel.matmul, kernel.matmul_many

    def count_one(*args):
        calls["one"] += 1
        return one(*args)

    def count_many(*args):
        calls["many"] += 1
        return many(*args)

    monkeypatch.setattr(kernel, "matmul", count_one)
    monkeypatch.setattr(kernel, "matmul_many", count_many)
    tokens = torch.randint(0, cfg.vocab_size, (1, 6))

    def generate():
        state, logits = quant.init_state(1), []
        with torch.no_grad():
            for t in range(tokens.shape[1]):
                out = quant.step(tokens[:, t], state)
                state = out.state
                logits.append(out.logits)
        return torch.cat(logits), state

    fused_logits, fused_state = generate()
    fused_calls = dict(calls)
    calls.update(one=0, many=0)
    qmodel.fuse_projections(quant, enabled=False)
    alone_logits, alone_state = generate()
    assert calls["many"] == 0 and fused_calls["many"] > 0
    assert fused_calls["one"] + fused_calls["many"] < calls["one"], (fused_calls, calls)
    assert torch.equal(fused_logits, alone_logits)

    # the time mix's group: its six token-shifted inputs are slices of one tensor; the first
    # projection called computes the others in the same kernel call
    qmodel.fuse_projections(quant)
    block_mix = next(m for m in quant.modules() if type(m).__name__ == "TimeMix")
    members = [name for name in ("receptance", "key", "value", "gate") if isinstance(getattr(block_mix, name, None),
                                                                                      qmodel.QuantLinear)]
    assert len(members) >= 3
    mixes = torch.randn(6, 1, 1, cfg.h_hidden)
    inputs = dict(zip(("receptance", "w", "key", "value", "a", "gate"), mixes.unbind(0)))
    calls.update(one=0, many=0)
    with torch.no_grad():
        outs = {name: getattr(block_mix, name)(inputs[name]) for name in members}
    assert calls == {"one": 0, "many": 1}, calls
    for name in members:
        layer = getattr(block_mix, name)
        expect = one(layer.weight_q.data, "Q4_0", cfg.h_hidden, inputs[name].reshape(1, -1).numpy())
        assert np.array_equal(outs[name].reshape(1, -1).numpy(), expect), name

    # a member whose input is not a slice of the tensor its group expects runs alone, correctly
    x = torch.randn(1, 1, cfg.h_hidden)
    calls.update(one=0, many=0)
    with torch.no_grad():
        got = block_mix.key(x)
    assert calls == {"one": 1, "many": 0}
    expect = one(block_mix.key.weight_q.data, "Q4_0", cfg.h_hidden, x.reshape(1, -1).numpy())
    assert np.array_equal(got.reshape(1, -1).numpy(), expect)


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
    # every other tensor is unchanged in the rewritten file (formats of the mix included)
    (tmp_path / "before.gguf").write_bytes(gguf_before)
    old = gguf_io.read_gguf(tmp_path / "q" / "model-Q4_0.gguf").tensors
    for name, value in gguf_io.read_gguf(tmp_path / "before.gguf").tensors.items():
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
