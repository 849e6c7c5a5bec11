"""The Vulkan backend (hierarchos/quant/vulkan.py, kernels/vulkan/) on whatever Vulkan device is
here (CI: Mesa's lavapipe): every format x shapes x batch sizes against the plain reference
(dequantized W times float x) and against the CPU kernel's matmul within its activation
rounding; weights uploaded once and reused; a quantized model on Vulkan against the same model
on the CPU kernel and against its float twin; chat --device vulkan through the CLI; the errors.

Skipped without the built module or a device, but FAILS then when HIERARCHOS_REQUIRE_VULKAN=1 (CI).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from test_quant_model import small_config  # the same small model the CPU-kernel tests use
from hierarchos.data.tokenizers import load_tokenizer
from hierarchos.errors import HierarchosError
from hierarchos.io import save_model_dir
from hierarchos.model import HierarchosLM
from hierarchos.quant import formats as F
from hierarchos.quant import kernel, vulkan
from hierarchos.quant import model as qmodel
from hierarchos.quant.quantized_dir import quantize_model_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vk():
    status = vulkan.vulkan_status()
    if status:
        if os.environ.get("HIERARCHOS_REQUIRE_VULKAN") == "1":
            pytest.fail(f"HIERARCHOS_REQUIRE_VULKAN=1 but the Vulkan backend is not usable: {status}")
        pytest.skip(status)
    return vulkan.device_info()


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**32)


def random_weights(rng, rows, cols):
    w = (rng.standard_normal((rows, cols)) * np.exp(rng.uniform(-4, 1, size=(rows, 1)))).astype(np.float32)
    if rows >= 3 and cols >= 64:  # an all-zero block, a constant run, an outlier
        w[0, :32] = 0.0
        w[1, 16:48] = -0.5
        w[2, 7] = 300.0
    return w


def summation_scale(x, w):
    """sum_j |x_nj| |w_rj|: what float32 rounding of the sums is relative to."""
    return np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64).T


def activation_rounding_bound(x, w, qtype):
    """How far the CPU kernel may sit from the exact product: it rounds each activation block to
    8 bits, |x - x_q| <= d / 2 with d = amax / 127 (Q8_0 also stores d as fp16: 0.6 d covers it)."""
    block = F.QK_K if qtype == "Q2_K" else 32
    n, cols = x.shape
    d = np.abs(x).reshape(n, cols // block, block).max(axis=2).astype(np.float64) / 127.0
    w_block = np.abs(w).astype(np.float64).reshape(w.shape[0], cols // block, block).sum(axis=2)
    return 0.6 * d @ w_block.T


SHAPES = [(1, 1), (7, 2), (33, 3), (130, 4)]  # (rows, blocks per row)
BATCHES = [1, 3, 8, 9, 20]  # across the shader's tiles of 8 activation rows


@pytest.mark.parametrize("qtype", F.QTYPES)
def test_matmul_every_format_shape_batch_matches_reference_and_cpu_kernel(vk, qtype):
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    for rows, blocks in SHAPES:
        cols = blocks * F.block_size(qtype)
        data = kernel.quantize(random_weights(rng, rows, cols), qtype)
        w = F.dequantize(data, qtype, cols)
        weight = vulkan.upload(data, qtype, cols)  # once, for every batch below
        assert (weight.qtype, weight.rows, weight.cols, weight.nbytes) == (qtype, rows, cols, data.nbytes)
        for n in BATCHES:
            x = rng.standard_normal((n, cols)).astype(np.float32)
            got = vulkan.vk_matmul(weight, x)
            assert got.shape == (n, rows) and got.dtype == np.float32
            where = f"seed={seed} {qtype} ({rows}, {cols}) batch {n}"
            scale = summation_scale(x, w)
            ref = vulkan.reference_matmul(data, qtype, cols, x)
            excess = np.abs(got - ref) - 1e-5 * scale
            assert excess.max() <= 1e-30, f"{where}: vs reference {np.abs(got - ref).max()}"
            cpu = kernel.matmul(data, qtype, cols, x)
            bound = activation_rounding_bound(x, w, qtype) + 2e-5 * scale
            assert (np.abs(got - cpu) <= bound).all(), f"{where}: vs CPU kernel {np.abs(got - cpu).max()}"


def test_weights_resident_and_results_repeat_bitwise(vk):
    rng = np.random.default_rng(fresh_seed())
    handles = {}
    for qtype in F.QTYPES:
        cols = 2 * F.block_size(qtype)
        data = kernel.quantize(random_weights(rng, 48, cols), qtype)
        handles[qtype] = (vulkan.upload(data, qtype, cols), data, cols)
    xs = {q: rng.standard_normal((5, cols)).astype(np.float32) for q, (_, _, cols) in handles.items()}
    first = {q: vulkan.vk_matmul(h, xs[q]) for q, (h, _, _) in handles.items()}
    data_copy = {q: d.copy() for q, (_, d, _) in handles.items()}
    for (_, d, _) in handles.values():
        d[:] = 0  # the device holds its own copy: host-side changes after upload do not reach it
    for _ in range(3):  # interleaved calls on different handles (and staging sizes) repeat exactly
        for qtype, (handle, _, _) in handles.items():
            assert np.array_equal(vulkan.vk_matmul(handle, xs[qtype]), first[qtype]), qtype
            one = vulkan.vk_matmul(handle, xs[qtype][2:3])
            assert np.allclose(one, first[qtype][2:3], rtol=1e-6, atol=1e-6), qtype
    for qtype, (handle, _, cols) in handles.items():
        ref = vulkan.reference_matmul(data_copy[qtype], qtype, cols, xs[qtype])
        assert np.allclose(first[qtype], ref, rtol=1e-4, atol=1e-3), qtype
    seconds = vulkan.last_dispatch_seconds()
    assert np.isnan(seconds) if not vk["timestamps"] else seconds > 0


def test_more_rows_than_one_dispatch_dimension(vk):
    rng = np.random.default_rng(fresh_seed())
    rows = 70_000  # past the 65535 workgroups of one dispatch dimension: the shader strides over rows
    data = kernel.quantize(rng.standard_normal((rows, 32)).astype(np.float32), "Q8_0")
    x = rng.standard_normal((2, 32)).astype(np.float32)
    got = vulkan.vk_matmul(vulkan.upload(data, "Q8_0", 32), x)
    assert np.allclose(got, vulkan.reference_matmul(data, "Q8_0", 32, x), rtol=1e-4, atol=1e-4)


_OTHER_SPLIT_CHECK = """
import numpy as np
from hierarchos.quant import formats as F, kernel, vulkan
assert vulkan.device_info()["rows_per"] == "{split}", vulkan.device_info()
rng = np.random.default_rng({seed})
for qtype in F.QTYPES:
    for rows, blocks, n in ((33, 2, 9), (5, 3, 1)):
        cols = blocks * F.block_size(qtype)
        data = kernel.quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype)
        x = rng.standard_normal((n, cols)).astype(np.float32)
        got = vulkan.vk_matmul(vulkan.upload(data, qtype, cols), x)
        ref = vulkan.reference_matmul(data, qtype, cols, x)
        assert np.allclose(got, ref, rtol=1e-5, atol=1e-4), (qtype, rows, cols, n, np.abs(got - ref).max())
print("ok")
"""


def test_other_work_split_matches_reference(vk):
    """matmul.comp's two work splits (a workgroup or an invocation per row; the device type picks
    one): the one this device does not use, forced through HIERARCHOS_VULKAN_ROWS."""
    split = "invocation" if vk["rows_per"] == "workgroup" else "workgroup"
    seed = fresh_seed()
    done = subprocess.run([sys.executable, "-c", _OTHER_SPLIT_CHECK.format(split=split, seed=seed)],
                          capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "HIERARCHOS_VULKAN_ROWS": split})
    assert done.returncode == 0 and done.stdout.strip() == "ok", f"seed={seed}: {done.stderr[-2000:]}"


def test_argument_errors_match_reference(vk):
    data = kernel.quantize(np.ones((4, 64), np.float32), "Q4_0")
    with pytest.raises(ValueError, match="positive multiple of 32"):
        vulkan.upload(data, "Q4_0", 48)
    with pytest.raises(ValueError, match="take 36 bytes, got 72"):
        vulkan.upload(np.zeros((4, 72), np.uint8), "Q4_0", 64)
    with pytest.raises(ValueError, match="unknown qtype"):
        vulkan.upload(data, "Q5_K", 64)
    weight = vulkan.upload(data, "Q4_0", 64)
    with pytest.raises(ValueError, match=r"x must be \(N, 64\)"):
        vulkan.vk_matmul(weight, np.ones((2, 32), np.float32))
    assert vulkan.vk_matmul(weight, np.ones((0, 64), np.float32)).shape == (0, 4)


# ---- a quantized model on the device ---------------------------------------------------------
def float_twin(cfg, tensors):
    """The float model on exactly the quantized model's (dequantized) weights."""
    model = HierarchosLM(cfg).eval()
    model.lm_head = torch.nn.Linear(cfg.context_dim, cfg.vocab_size, bias=False)
    state = {name: torch.from_numpy(np.array(F.dequantize(v.data, v.qtype, v.cols) if hasattr(v, "qtype") else v,
                                             dtype=np.float32 if np.asarray(getattr(v, "data", v)).dtype == np.float16
                                             else None))
             for name, v in tensors.items()}
    model.load_state_dict(state, strict=True)
    return model


@pytest.mark.parametrize("qtype", F.QTYPES)
def test_quantized_model_on_vulkan_matches_float_twin_and_cpu_kernel(vk, qtype):
    torch.manual_seed(5)
    cfg = small_config()
    tensors = qmodel.quantize_tensors(HierarchosLM(cfg), qtype)
    on_cpu = qmodel.build_quantized_model(cfg, tensors)
    on_vk = qmodel.build_quantized_model(cfg, tensors)
    uploaded = qmodel.place_on_vulkan(on_vk)
    linears = [m for m in on_vk.modules() if isinstance(m, qmodel.QuantLinear)]
    assert linears and all(m.vk_weight is not None for m in linears)
    assert uploaded == sum(m.weight_q.nbytes for m in linears)
    assert qmodel.place_on_vulkan(on_vk) == 0  # already resident: nothing is uploaded twice
    tokens = torch.randint(0, cfg.vocab_size, (2, 40))  # 80 rows: past the CPU path's dense-prefill switch
    with torch.no_grad():
        got, cpu, twin = on_vk(tokens).logits, on_cpu(tokens).logits, float_twin(cfg, tensors)(tokens).logits
    # float activations on the device: only float32 summation order separates it from the float twin
    assert ((got - twin).norm() / twin.norm()).item() < 1e-4
    assert ((got - cpu).norm() / cpu.norm()).item() < 0.05  # the CPU kernel's 8-bit activations
    with torch.no_grad():  # parallel == step on the device (the generation path: batch-1 matvecs)
        state, rows = on_vk.init_state(1), []
        for t in range(12):
            out = on_vk.step(tokens[:1, t], state)
            state = out.state
            rows.append(out.logits[0])
    assert torch.allclose(torch.stack(rows), got[0, :12], rtol=1e-4, atol=1e-4)


def _cli(*args, stdin=None, env_extra=None, prelude=None, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8", "HF_HUB_OFFLINE": "1",
           **(env_extra or {})}
    if prelude is None:
        command = [sys.executable, str(REPO / "hierarchos_cli.py"), *args]
    else:  # run the CLI after `prelude` (e.g. hiding the built module) in the same interpreter
        code = (f"{prelude}\nimport runpy, sys\nsys.argv = {['hierarchos_cli.py', *args]!r}\n"
                f"runpy.run_path({str(REPO / 'hierarchos_cli.py')!r}, run_name='__main__')")
        command = [sys.executable, "-c", code]
    return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    torch.manual_seed(7)
    root = tmp_path_factory.mktemp("vkmodel")
    save_model_dir(root / "model", HierarchosLM(small_config()), load_tokenizer("byte"),
                   extra={"prompt_template": "plain"})
    quantize_model_dir(root / "model", root / "q4", "Q4_0")
    return root / "model", root / "q4"


# The Vulkan shaders multiply float activations by the dequantized blocks; the CPU kernel first rounds
# the activations to 8-bit blocks, so the two may pick different greedy tokens on a near-tie. This
# prelude makes the CPU path compute what the shader computes (float x times kernel.dequantize(W)):
# then only float32 summation order separates the two runs, and the whole reply must be the same.
_CPU_AS_SHADER = ("import numpy as np\n"
                  "from hierarchos.quant import kernel as K, modules as M\n"
                  "M.kernel.matmul = lambda data, qtype, cols, x: (x @ K.dequantize(data, qtype, cols).T)"
                  ".astype(np.float32)\n"
                  "M.activations_as_used = lambda x, qtype: x")


def test_cli_chat_device_vulkan_replies_like_cpu(vk, model_dirs):
    _, qdir = model_dirs
    replies = {}
    for device, prelude in (("vulkan", None), ("cpu", _CPU_AS_SHADER)):
        done = _cli("chat", "--model-path", str(qdir), "--device", device, "--temperature", "0",
                    "--max-new-tokens", "8", stdin="hello there\n", prelude=prelude)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip(), f"{device}: no reply"
        replies[device] = done.stdout
    assert f"matmuls on Vulkan {vk['name']}" in _cli(
        "chat", "--model-path", str(qdir), "--device", "vulkan", "--max-new-tokens", "1", stdin="/status\n").stderr
    assert replies["vulkan"] == replies["cpu"]  # the whole reply: every one of the 8 greedy tokens


def _assert_one_line_error(done, message):
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], done.stderr
    assert "Traceback" not in done.stderr


def test_cli_vulkan_errors(vk, model_dirs):
    full, qdir = model_dirs
    _assert_one_line_error(_cli("chat", "--model-path", str(full), "--device", "vulkan", "--prompt", "x"),
                           "--device vulkan runs quantized models only")
    # no device: the loader pointed at a driver manifest that does not exist
    missing = str(REPO / "no-such-icd.json")
    _assert_one_line_error(_cli("chat", "--model-path", str(qdir), "--device", "vulkan", "--prompt", "x",
                                env_extra={"VK_ICD_FILENAMES": missing, "VK_DRIVER_FILES": missing}),
                           "--device vulkan: no Vulkan driver found")
    # a build without the Vulkan module
    _assert_one_line_error(_cli("chat", "--model-path", str(qdir), "--device", "vulkan", "--prompt", "x",
                                prelude="import sys; sys.modules['hierarchos.hierarchos_vulkan'] = None"),
                           "the Vulkan backend is not built; build it with `bash setup.sh --vulkan`")
    _assert_one_line_error(_cli("chat", "--model-path", str(qdir), "--device", "vulkan", "--prompt", "x",
                                env_extra={"HIERARCHOS_VULKAN_DEVICE": "99"}), "HIERARCHOS_VULKAN_DEVICE=99")


def test_require_vulkan_is_one_line_error_without_module(monkeypatch):
    monkeypatch.setattr(vulkan, "_ext", None)
    monkeypatch.setattr(vulkan, "_load_error", ModuleNotFoundError("No module named 'hierarchos.hierarchos_vulkan'"))
    assert not vulkan.vulkan_available()
    with pytest.raises(HierarchosError, match=r"^--device vulkan: the Vulkan backend is not built; build it"):
        vulkan.require_vulkan()
