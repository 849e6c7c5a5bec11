"""The C++ kernel against the numpy reference: bytes exactly, matmul for every format x
every ISA this CPU runs x batch sizes to float-summation rounding; threads, dispatch,
errors; the C++ ROSA automaton equal to the Python one; the NEON path under qemu.

Skipped without the built extension, but FAILS then when HIERARCHOS_REQUIRE_KERNEL=1 (CI).
"""

import importlib
import os
import pickle
import random
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from hierarchos.model.rosa import PyRosaAutomaton, RosaAutomaton, rosa_hints, rosa_hints_bruteforce
from hierarchos.quant import formats as F

ROOT = Path(__file__).resolve().parents[1]


def _load_extension():
    try:
        return importlib.import_module("hierarchos.hierarchos_kernels")
    except ImportError as error:
        if os.environ.get("HIERARCHOS_REQUIRE_KERNEL") == "1":
            pytest.fail(f"HIERARCHOS_REQUIRE_KERNEL=1 but the C++ kernel does not load: {error}")
        pytest.skip(f"C++ kernel not built ({error}); build it with `bash setup.sh`")


@pytest.fixture(scope="module")
def ext():
    module = _load_extension()
    yield module
    module.set_isa(module.default_isa())
    module.set_threads(0)


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**32)


def isa_names():
    try:
        return importlib.import_module("hierarchos.hierarchos_kernels").available_isas()
    except ImportError:
        return ["scalar"]  # the tests fail or skip in the fixture


def random_weights(rng, rows, cols):
    w = (rng.standard_normal((rows, cols)) * np.exp(rng.uniform(-5, 2, size=(rows, 1)))).astype(np.float32)
    if rows >= 3 and cols >= 64:
        w[0, :32] = 0.0
        w[1, 16:48] = -0.5
        w[2, 7] = 300.0
    return w


@pytest.mark.parametrize("qtype", F.QTYPES)
def test_quantize_and_dequantize_bytes_equal_reference(ext, qtype):
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    for _ in range(3):
        rows = int(rng.integers(1, 40))
        cols = F.block_size(qtype) * int(rng.integers(1, 7))
        w = random_weights(rng, rows, cols)
        ours = ext.quantize(w, qtype)
        ref = F.quantize(w, qtype)
        assert ours.shape == ref.shape and ours.dtype == np.uint8
        assert np.array_equal(ours, ref), f"seed={seed} {qtype} ({rows}, {cols}): {np.argwhere(ours != ref)[:3]}"
        assert np.array_equal(ext.dequantize(ours, qtype, cols), F.dequantize(ref, qtype, cols)), f"seed={seed}"
        ids = rng.integers(0, rows, size=5)
        assert np.array_equal(ext.dequantize_rows(ours, qtype, cols, ids), F.dequantize(ref, qtype, cols)[ids])



def test_q2_k_quantize_bytes_equal_independent_reference(ext):
    """The C++ Q2_K quantizer against tests/q2k_reference.py (ggml's rule written out element by
    element, sharing no code with the kernel or formats.py), including tie-heavy grid values where
    ggml's strict `<` in its search decides which fit is kept."""
    import q2k_reference

    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    w = random_weights(rng, 6, 512)
    w[3] = -np.abs(w[3])
    ties = np.random.default_rng(8)  # a fixed draw where equal trial errors change the bytes (see test_quant_formats)
    grid = ties.integers(0, 4, (2, 512)) * np.float32(0.5) - np.float32(0.25) * ties.integers(0, 3, (2, 1))
    w = np.concatenate([w, grid, ties.integers(-3, 4, (2, 512))]).astype(np.float32)
    expected = np.frombuffer(b"".join(q2k_reference.quantize(w.tolist())), np.uint8).reshape(w.shape[0], -1)
    got = ext.quantize(w, "Q2_K")
    assert np.array_equal(got, expected), f"seed={seed}: first differing byte {np.argwhere(got != expected)[:1]}"

def _magnitude(data, qtype, cols, x):
    """|x| @ |W|.T, the scale against which float-summation differences are measured. Q2_K
    weights are d*scale*code - dmin*min and the kernels sum the two parts separately, as
    ggml does, so its scale counts both parts' magnitudes."""
    w_abs = np.abs(F.dequantize(data, qtype, cols)).astype(np.float64)
    if qtype == "Q2_K":
        raw = data.reshape(data.shape[0], -1, 84)
        dmin = raw[:, :, 82:84].copy().view(np.float16).astype(np.float64)  # (rows, blocks, 1)
        group_min = dmin * (raw[:, :, :16] >> 4)  # (rows, blocks, 16)
        w_abs = w_abs + 2 * np.repeat(group_min.reshape(data.shape[0], -1), 16, axis=1)
    return np.abs(x).astype(np.float64) @ w_abs.T


@pytest.mark.parametrize("isa", isa_names())
@pytest.mark.parametrize("qtype", F.QTYPES)
def test_matmul_every_isa_matches_reference(ext, isa, qtype):
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    ext.set_isa(isa)
    assert ext.get_isa() == isa
    bs = F.block_size(qtype)
    # block counts around the groups of 2 (AVX2) and 4 (AVX-512) 4-bit blocks, with and without a
    # natural-order tail; batch sizes around the tile of 4; batch 1 (four weight rows per step on
    # AVX2 and AVX-512) with row counts that leave remainder rows
    for blocks, n in ((1, 1), (3, 2), (4, 5), (2, 8), (5, 67), (7, 1), (9, 1), (8, 3), (4, 1)):
        rows = int(rng.integers(1, 50))
        cols = bs * blocks
        data = F.quantize(random_weights(rng, rows, cols), qtype)
        x = (rng.standard_normal((n, cols)) * rng.uniform(0.1, 10)).astype(np.float32)
        got = ext.matmul(data, qtype, cols, x)
        ref = F.matmul(data, qtype, cols, x)
        assert got.shape == (n, rows) and got.dtype == np.float32
        excess = np.abs(got - ref) - 1e-5 * _magnitude(data, qtype, cols, x) - 1e-30
        assert (excess <= 0).all(), f"seed={seed} isa={isa} {qtype} blocks={blocks} n={n}: worst {excess.max()}"


@pytest.mark.parametrize("isa", isa_names())
def test_matmul_many_equals_one_call_each(ext, isa):
    """One matmul_many call == one matmul call per weight, bit for bit, for mixed formats, shapes and
    batch sizes, on every ISA and thread count; and the numpy backend's loop agrees with the kernel."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    ext.set_isa(isa)
    weights, xs = [], []
    for qtype, rows, blocks, n in (("Q4_0", 70, 7, 1), ("Q8_0", 5, 3, 3), ("Q2_K", 9, 2, 1), ("INT4", 33, 4, 2),
                                   ("Q4_0", 300, 24, 1)):
        cols = F.block_size(qtype) * blocks
        weights.append((F.quantize(random_weights(rng, rows, cols), qtype), qtype, cols))
        xs.append(rng.standard_normal((n, cols)).astype(np.float32))
    try:
        for threads in (1, 2, 3):
            ext.set_threads(threads)
            many = ext.matmul_many(weights, xs)
            assert len(many) == len(weights)
            for (data, qtype, cols), x, y in zip(weights, xs, many):
                assert np.array_equal(y, ext.matmul(data, qtype, cols, x)), f"seed={seed} {isa} {qtype} threads={threads}"
    finally:
        ext.set_threads(0)
    reference = [F.matmul(data, qtype, cols, x) for (data, qtype, cols), x in zip(weights, xs)]
    for y, ref, (data, qtype, cols), x in zip(many, reference, weights, xs):
        excess = np.abs(y - ref) - 1e-5 * _magnitude(data, qtype, cols, x) - 1e-30
        assert (excess <= 0).all(), f"seed={seed} {isa} {qtype}"
    with pytest.raises(ValueError, match="2 weights but 1 activations"):
        ext.matmul_many(weights[:2], xs[:1])
    with pytest.raises(ValueError, match=r"activations 0 must be \(N, 224\)"):
        ext.matmul_many(weights[:1], [xs[1]])


def test_matmul_bitwise_independent_of_threads(ext):
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    data = F.quantize(rng.standard_normal((300, 512)).astype(np.float32), "Q4_0")
    x = rng.standard_normal((70, 512)).astype(np.float32)
    ext.set_threads(1)
    assert ext.get_threads() == 1
    one = ext.matmul(data, "Q4_0", 512, x)
    ext.set_threads(2)
    two = ext.matmul(data, "Q4_0", 512, x)
    ext.set_threads(0)
    assert np.array_equal(one, two), f"seed={seed}"
    assert np.array_equal(ext.matmul(data, "Q4_0", 512, x[:1]), one[:1])  # matvec == first row of the batch


def test_matmul_from_python_threads_releases_gil_safely(ext):
    rng = np.random.default_rng(fresh_seed())
    data = F.quantize(rng.standard_normal((64, 256)).astype(np.float32), "Q8_0")
    inputs = [rng.standard_normal((3, 256)).astype(np.float32) for _ in range(4)]
    expected = [ext.matmul(data, "Q8_0", 256, x) for x in inputs]
    results = [None] * 4

    def work(i):
        for _ in range(20):
            results[i] = ext.matmul(data, "Q8_0", 256, inputs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected):
        assert np.array_equal(got, want)


def test_errors_match_reference(ext):
    with pytest.raises(ValueError, match=r"Q2_K.*multiple of 256.*\(2, 300\)"):
        ext.quantize(np.zeros((2, 300), np.float32), "Q2_K")
    with pytest.raises(ValueError, match="unknown qtype"):
        ext.quantize(np.zeros((2, 32), np.float32), "Q3_K")
    data = ext.quantize(np.ones((2, 64), np.float32), "Q8_0")
    with pytest.raises(ValueError, match=r"x must be \(N, 64\)"):
        ext.matmul(data, "Q8_0", 64, np.zeros((1, 32), np.float32))
    with pytest.raises(ValueError, match="take 68 bytes"):
        ext.matmul(data[:, :60], "Q8_0", 64, np.zeros((1, 64), np.float32))
    with pytest.raises(IndexError):
        ext.dequantize_rows(data, "Q8_0", 64, np.array([2]))
    assert ext.matmul(data, "Q8_0", 64, np.zeros((0, 64), np.float32)).shape == (0, 2)


def test_isa_dispatch_and_forcing(ext):
    names = ext.available_isas()
    assert names[0] == "scalar" and ext.default_isa() == names[-1]
    with pytest.raises(ValueError, match="not available"):
        ext.set_isa("not-an-isa")
    assert ext.backend_name() == "cpp"
    missing = next(name for name in ("neon", "avx512", "avx2") if name not in names) if len(names) < 4 else "neon"
    env = dict(os.environ, HIERARCHOS_ISA=missing)
    result = subprocess.run([sys.executable, "-c", "import hierarchos.quant.kernel"], env=env,
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0 and f"ISA '{missing}' is not available" in result.stderr
    env["HIERARCHOS_ISA"] = "scalar"
    result = subprocess.run([sys.executable, "-c", "from hierarchos.quant import kernel; print(kernel.get_isa())"],
                            env=env, capture_output=True, text=True, cwd=ROOT)
    assert result.stdout.strip() == "scalar", result.stderr


def test_stream_read_checksum(ext):
    rng = np.random.default_rng(fresh_seed())
    buffer = rng.integers(0, 256, size=1 << 20, dtype=np.uint8)
    expected = int(buffer.view(np.uint64).sum(dtype=np.uint64))
    assert ext.stream_read(buffer, 1) == expected
    assert ext.stream_read(buffer, 2) == expected


# ---- ROSA ------------------------------------------------------------------------------

@pytest.mark.parametrize("vocab", [1, 2, 5, 1000])
@pytest.mark.parametrize("window", [1, 3, 16, 10_000])
def test_rosa_cpp_equals_python_batch_and_incremental(ext, vocab, window):
    seed = fresh_seed()
    rng = random.Random(seed)
    for _ in range(10):
        tokens = [rng.randrange(vocab) for _ in range(rng.randint(0, 6 * min(window, 50) + 10))]
        expected = PyRosaAutomaton(window, -1).extend(tokens)
        assert RosaAutomaton(window, -1, backend="cpp").extend(tokens) == expected, f"seed={seed}"
        automaton = RosaAutomaton(window, -1, backend="cpp")
        got, start = [], 0
        while start < len(tokens):  # random chunking, single pushes included
            size = rng.choice([1, 1, 2, 7, window, 2 * window + 1])
            chunk = tokens[start:start + size]
            got += [automaton.push(chunk[0])] if size == 1 else automaton.extend(chunk)
            start += len(chunk)
            assert automaton.history_len < 2 * window
        assert got == expected, f"seed={seed}"
        assert automaton.num_tokens == len(tokens)


def test_rosa_cpp_copy_and_pickle_continue_identically(ext):
    seed = fresh_seed()
    rng = random.Random(seed)
    prefix = [rng.randrange(7) for _ in range(150)]
    rest = [rng.randrange(7) for _ in range(150)]
    original = RosaAutomaton(40, -1, backend="cpp")
    reference = PyRosaAutomaton(40, -1)
    original.extend(prefix)
    reference.extend(prefix)
    clones = [original.copy(), pickle.loads(pickle.dumps(original))]
    expected = reference.extend(rest)
    assert original.extend(rest) == expected, f"seed={seed}"
    for clone in clones:
        assert clone.backend == "cpp" and clone.num_tokens == len(prefix)
        assert clone.extend(rest) == expected, f"seed={seed}"


def test_rosa_hints_same_on_both_backends(ext):
    seed = fresh_seed()
    rng = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 6, (3, 40), generator=rng)
    python = [RosaAutomaton(8, -1, backend="python") for _ in range(3)]
    cpp = [RosaAutomaton(8, -1, backend="cpp") for _ in range(3)]
    for chunk in tokens.split(13, dim=1):
        hints_py, _ = rosa_hints(chunk, python, 8, -1)
        hints_cpp, _ = rosa_hints(chunk, cpp, 8, -1)
        assert hints_cpp.dtype == torch.long and torch.equal(hints_py, hints_cpp), f"seed={seed}"
    # no automata given: fresh ones on the C++ backend (the default when built), equal to the
    # definition (brute force over the window) row by row, not only to the Python automaton
    default, made = rosa_hints(tokens, None, 8, -1)
    assert [automaton.backend for automaton in made] == ["cpp"] * 3
    for row, hints in zip(tokens.tolist(), default.tolist()):
        assert hints == rosa_hints_bruteforce(row, -1, window=8), f"seed={seed}"


# ---- NEON, cross-compiled and run under qemu-user -------------------------------------

def test_neon_kernels_under_qemu(tmp_path):
    """Arm's NEON/sdot path against the scalar path on the same random blocks (C++ only)."""
    cxx, qemu = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
    if not (cxx and qemu):
        pytest.skip("needs aarch64-linux-gnu-g++ and qemu-aarch64 (setup.sh --test installs them on Debian/Ubuntu as root)")
    kernels = ROOT / "kernels"
    binary = tmp_path / "isa_check"
    build = subprocess.run([cxx, "-std=c++17", "-O1", "-ffp-contract=off", "-static", "-DHK_BUILD_NEON",
                            "-march=armv8.2-a+dotprod", "-o", str(binary), str(kernels / "tests" / "isa_check.cpp"),
                            str(kernels / "ref.cpp"), str(kernels / "arm_neon.cpp")], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    run = subprocess.run([qemu, str(binary), "neon", str(fresh_seed() % 100000)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and " 0 failed" in run.stdout, run.stdout + run.stderr
