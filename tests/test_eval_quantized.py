"""`eval` on quantized models (issue 22): a quantized directory or the .gguf file alone, scored on the
same kernel path as `chat`. Bits per byte of the quantized model equal the sum of -log p that chat's
token-by-token step path gives the same text; fp32 and Q8_0 score close; the numpy fallback scores as
the C++ kernel; lm-eval tasks run on the quantized model; a damaged GGUF is one error line.
Tiny random byte-level models on the CPU; nothing is downloaded."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_quant_model import small_config  # the small model every quantized-model test uses
from hierarchos import evaluate
from hierarchos.cli import main
from hierarchos.data.tokenizers import load_tokenizer
from hierarchos.errors import HierarchosError
from hierarchos.io import save_model_dir
from hierarchos.model import HierarchosLM
from hierarchos.quant.quantized_dir import gguf_name, load_quantized, quantize_model_dir

REPO = Path(__file__).resolve().parents[1]
TEXT = "Full fathom five thy father lies;\nOf his bones are coral made. — ✓\n"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    torch.manual_seed(11)
    root = tmp_path_factory.mktemp("qeval")
    save_model_dir(root / "model", HierarchosLM(small_config()), load_tokenizer("byte"))
    for qtype in ("Q8_0", "Q4_0"):
        quantize_model_dir(root / "model", root / qtype, qtype)
    (root / "alone").mkdir()
    shutil.copy(root / "Q4_0" / gguf_name("Q4_0"), root / "alone" / "m.gguf")  # the file without its folder
    (root / "text.txt").write_text(TEXT, encoding="utf-8")
    return root


def _run_eval(capsys, model_path, text_path, out, *extra) -> dict:
    code = main(["eval", "--model-path", str(model_path), "--bpb-file", str(text_path), "--device", "cpu",
                 "--output", str(out), *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(out.read_text())


@torch.no_grad()
def _step_path_nll(model, tokenizer, text: str) -> float:
    """-sum log p(token | previous) in nats, one token at a time through model.step (chat's generation
    path): the end-of-sequence token first, as eval and training start a document."""
    ids = [tokenizer.eos_id, *tokenizer.encode(text)]
    state, nll = model.init_state(1), 0.0
    for current, following in zip(ids[:-1], ids[1:]):
        out = model.step(torch.tensor([current]), state)
        state = out.state
        nll -= float(out.logits[0].double().log_softmax(-1)[following])
    return nll


# the directory with chunks of 512 tokens (each Linear sees >= DENSE_FROM_ROWS rows: the dequantized GEMM
# on the kernel's activation blocks), the .gguf file alone with chunks of 16 (the integer kernel matmul,
# and the recurrent state carried across chunks)
@pytest.mark.parametrize("where, chunk", [("Q4_0", "512"), ("alone/m.gguf", "16")])
def test_quantized_bpb_equals_chat_step_path(dirs, tmp_path, capsys, where, chunk):
    report = _run_eval(capsys, dirs / where, dirs / "text.txt", tmp_path / "e.json", "--chunk-size", chunk)
    model, _, tokenizer, content = load_quantized(dirs / where)
    assert content.qtype == "Q4_0"
    n_bytes = len(TEXT.encode("utf-8"))
    expected = _step_path_nll(model, tokenizer, TEXT) / math.log(2) / n_bytes
    got = report["bpb_file"]
    assert got["bytes"] == n_bytes and got["tokens"] == n_bytes  # the byte tokenizer embedded in the GGUF
    # parallel chunks (eval) vs one token per step (chat): the same function, float32 summation order apart,
    # which now and then moves an activation across a rounding step of its 8-bit block (measured: 1e-5)
    assert got["bits_per_byte"] == pytest.approx(expected, rel=1e-4)


def test_fp32_and_q8_0_bits_per_byte_close(dirs, tmp_path, capsys):
    full = _run_eval(capsys, dirs / "model", dirs / "text.txt", tmp_path / "f.json")["bpb_file"]["bits_per_byte"]
    q8 = _run_eval(capsys, dirs / "Q8_0", dirs / "text.txt", tmp_path / "q.json")["bpb_file"]["bits_per_byte"]
    q4 = _run_eval(capsys, dirs / "Q4_0", dirs / "text.txt", tmp_path / "4.json")["bpb_file"]["bits_per_byte"]
    assert 6 < full < 10  # a random byte model: about log2(260) bits per byte
    assert abs(q8 - full) / full < 0.005, (full, q8)  # issue 22's target for Q8_0
    assert q4 != q8  # the quantized file really is what was scored


def test_numpy_fallback_scores_as_the_kernel(dirs, tmp_path):
    """The same eval with the C++ extension hidden: the numpy reference kernel, which says so once."""
    outs = {}
    for name, prelude in (("cpp", ""), ("numpy", "import sys; sys.modules['hierarchos.hierarchos_kernels'] = None\n")):
        out = tmp_path / f"{name}.json"
        code = (f"{prelude}import runpy, sys\nsys.argv = {['hierarchos_cli.py', 'eval', '--model-path', str(dirs / 'Q4_0'), '--bpb-file', str(dirs / 'text.txt'), '--device', 'cpu', '--output', str(out)]!r}\n"
                f"runpy.run_path({str(REPO / 'hierarchos_cli.py')!r}, run_name='__main__')")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
        assert done.returncode == 0, done.stderr
        outs[name] = (json.loads(out.read_text())["bpb_file"]["bits_per_byte"], done.stderr)
    hidden = "the C++ kernel is not built; using the slow numpy reference"
    assert hidden in outs["numpy"][1] and hidden not in outs["cpp"][1]
    assert "numpy-reference kernel" in outs["numpy"][1] and "numpy-reference kernel" not in outs["cpp"][1]
    assert outs["numpy"][0] == pytest.approx(outs["cpp"][0], rel=1e-5)


@torch.no_grad()
def _step_path_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | EOS + context) summed over the continuation's tokens, through model.step."""
    head = [tokenizer.eos_id, *tokenizer.encode(context)]
    ids = head + list(tokenizer.encode(continuation))
    state, total = model.init_state(1), 0.0
    for t in range(len(ids) - 1):
        out = model.step(torch.tensor([ids[t]]), state)
        state = out.state
        if t + 1 >= len(head):
            total += float(out.logits[0].double().log_softmax(-1)[ids[t + 1]])
    return total


def test_lm_eval_on_quantized_model(dirs, tmp_path, capsys):
    from lm_eval.api.instance import Instance

    from hierarchos.eval_tasks import TASKS_DIR

    gguf = dirs / "alone" / "m.gguf"
    model, _, tokenizer, _ = load_quantized(gguf)
    # the lm-eval model loads a .gguf given as pretrained= and scores as chat's step path does
    lm = evaluate.lm_class()(pretrained=str(gguf), batch_size=2, chunk_size=8, progress=False)
    requests = [("MACBETH.", "\nIs this a dagger"), ("Who? ", "Puck"), ("x", "yz")]
    got = lm.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=r, idx=0) for r in requests])
    for (context, continuation), (logprob, _) in zip(requests, got):
        stripped = context.rstrip(" ")  # trailing spaces are scored with the continuation (as lm-eval's models do)
        want = _step_path_logprob(model, tokenizer, stripped, context[len(stripped):] + continuation)
        assert logprob == pytest.approx(want, rel=1e-4), (context, continuation)
    # and a task through the CLI: accuracy as one whole forward per (header, line) picks the speakers
    out = tmp_path / "tasks.json"
    code = main(["eval", "--model-path", str(gguf), "--tasks", "shakespeare_who_speaks", "--limit", "3",
                 "--batch-size", "2", "--bootstrap-iters", "0", "--device", "cpu", "--output", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "Q4_0 GGUF" in captured.err
    docs = [json.loads(line) for line in
            (TASKS_DIR / "shakespeare_who_speaks.jsonl").read_text(encoding="utf-8").splitlines()[:3]]
    hits = 0
    for doc in docs:
        lls = []
        for header in doc["headers"]:
            head = [tokenizer.eos_id, *tokenizer.encode(header)]
            ids = head + list(tokenizer.encode("\n" + doc["line"]))
            with torch.no_grad():
                logp = model(torch.tensor([ids[:-1]])).logits[0].double().log_softmax(-1)
            lls.append(float(logp[torch.arange(len(head) - 1, len(ids) - 1), torch.tensor(ids[len(head):])].sum()))
        hits += max(range(len(lls)), key=lls.__getitem__) == doc["label"]
    assert json.loads(out.read_text())["metrics"]["shakespeare_who_speaks"]["acc"] == pytest.approx(hits / 3)


def _one_line_error(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    for needle in needles:
        assert needle in err[0], err


def test_damaged_gguf_and_bad_device_are_one_line_errors(dirs, tmp_path, capsys):
    raw = (dirs / "alone" / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "junk.gguf").write_bytes(b"GGUF but not really")
    for name in ("cut.gguf", "junk.gguf"):
        _one_line_error(capsys, ["eval", "--model-path", str(tmp_path / name), "--bpb-file", str(dirs / "text.txt")],
                        name)
    _one_line_error(capsys, ["eval", "--model-path", str(dirs / "Q4_0"), "--bpb-file", str(dirs / "text.txt"),
                             "--device", "cuda"], "--device cuda", "quantized models run on the CPU kernel or Vulkan")
    _one_line_error(capsys, ["eval", "--model-path", str(dirs / "model"), "--bpb-file", str(dirs / "text.txt"),
                             "--device", "vulkan"], "--device vulkan runs quantized models only")
    with pytest.raises(HierarchosError, match="cut.gguf"):
        evaluate.lm_class()(pretrained=str(tmp_path / "cut.gguf"))


def test_eval_device_vulkan_scores_as_the_shader_computes(dirs, tmp_path, capsys, monkeypatch):
    """--device vulkan: the matmuls on the Vulkan device (float activations times the dequantized blocks).
    The same eval on the CPU with the kernel's matmul replaced by exactly that function scores the same
    to float32 summation order."""
    import numpy as np

    from hierarchos.quant import kernel
    from hierarchos.quant import model as qmodel, modules as quant_modules
    from hierarchos.quant import vulkan

    status = vulkan.vulkan_status()
    if status:
        if os.environ.get("HIERARCHOS_REQUIRE_VULKAN") == "1":
            pytest.fail(f"HIERARCHOS_REQUIRE_VULKAN=1 but the Vulkan backend is not usable: {status}")
        pytest.skip(status)
    code = main(["eval", "--model-path", str(dirs / "Q4_0"), "--bpb-file", str(dirs / "text.txt"),
                 "--device", "vulkan", "--output", str(tmp_path / "vk.json")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"matmuls on Vulkan {vulkan.vk_device_name()}" in captured.err
    on_vulkan = json.loads((tmp_path / "vk.json").read_text())["bpb_file"]["bits_per_byte"]
    monkeypatch.setattr(qmodel.kernel, "matmul", lambda data, qtype, cols, x:
                        (x @ kernel.dequantize(data, qtype, cols).T).astype(np.float32))
    monkeypatch.setattr(quant_modules, "activations_as_used", lambda x, qtype: x)
    as_shader = _run_eval(capsys, dirs / "Q4_0", dirs / "text.txt", tmp_path / "cpu.json")["bpb_file"]["bits_per_byte"]
    assert on_vulkan == pytest.approx(as_shader, rel=1e-5)
