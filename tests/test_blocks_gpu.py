"""The seeds' other cells on CUDA: attention blocks (full and sliding window, each position scheme)
and the WKV-4 time mix compute on the GPU what they compute on the CPU, and their parallel form
equals the token-by-token step there too (the CPU tests pin the algorithms against oracles; these
pin the CUDA kernels PyTorch picks for them: SDPA's flash/efficient paths, the WKV-4 scan).
Device agreement and parallel == step run in float64 (exact to rounding, so no halting decision can
flip); the float32 kernels (SDPA's efficient path, TF32 off) are held to float64 on the same device;
bf16 autocast training stays finite and learns. Run by `bench/gpu.sh tests`.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

from hierarchos.config import tiny_config
from hierarchos.model import HierarchosLM
from hierarchos.model.losses import LossWeights, lm_loss

from early_exit import calibrated, model_tokens

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

VARIANTS = {
    "attention-rope": dict(h_block="attention", l_block="attention"),
    "attention-window": dict(h_block="attention", l_block="attention", window_size=5),
    "attention-sinusoidal": dict(h_block="attention", l_block="attention", pos_encodings="sinusoidal"),
    "attention-learned-window": dict(h_block="attention", l_block="attention", pos_encodings="learned",
                                     window_size=4),
    "mixed-rwkv7-manager": dict(l_block="attention", window_size=6),
    "wkv4": dict(time_mix="wkv4"),
}


STEADY = dict(h_halt_thresh=1.0, l_conv_atol=0.0)  # no halting or freezing decision for rounding to flip


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**31)


@pytest.fixture(autouse=True)
def no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def loss_of(model, tokens):
    out = model(tokens[:, :-1])
    loss, _ = lm_loss(out, tokens[:, 1:], model.cfg.z_loss_weight, LossWeights())
    return out, loss


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cuda_equals_cpu_forward_and_gradients(variant):
    seed = fresh_seed()
    cpu = calibrated(seed, torch.float64, **VARIANTS[variant]).train()
    gpu = calibrated(seed, torch.float64, **VARIANTS[variant]).train().cuda()
    tokens = model_tokens(seed, 2, 24)
    out_cpu, loss_cpu = loss_of(cpu, tokens)
    out_gpu, loss_gpu = loss_of(gpu, tokens.cuda())
    loss_cpu.backward()
    loss_gpu.backward()
    msg = f"seed={seed} variant={variant}"
    assert rel(out_gpu.logits.cpu(), out_cpu.logits) < 1e-9, msg
    for (name, p_cpu), (_, p_gpu) in zip(cpu.named_parameters(), gpu.named_parameters()):
        if p_cpu.grad is None:
            assert p_gpu.grad is None or not p_gpu.grad.any(), f"{msg}: {name} has a gradient on CUDA only"
            continue
        if p_cpu.grad.norm() > 1e-6:
            assert rel(p_gpu.grad.cpu(), p_cpu.grad) < 1e-7, f"{msg}: gradient of {name}"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cuda_parallel_equals_step(variant):
    seed = fresh_seed()
    model = calibrated(seed, torch.float64, **VARIANTS[variant]).cuda().eval()
    tokens = model_tokens(seed, 2, 19).cuda()
    with torch.no_grad():
        whole = model(tokens).logits
        state, steps = model.init_state(2, device="cuda"), []
        for t in range(tokens.shape[1]):
            out = model.step(tokens[:, t], state)
            state, steps = out.state, steps + [out.logits]
    assert rel(torch.stack(steps, 1), whole) < 1e-9, f"seed={seed} variant={variant}"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cuda_float32_tracks_float64(variant):
    first = fresh_seed()
    for seed in range(first, first + 4):  # a step count moved by float32 rounding changes the function: next seed
        wide = calibrated(seed, torch.float64, **VARIANTS[variant], **STEADY).cuda().eval()
        narrow = copy.deepcopy(wide).float()  # the same weights, rounded once
        tokens = model_tokens(seed, 2, 24).cuda()
        with torch.no_grad():
            want, got = wide(tokens), narrow(tokens)
        if all(abs(float(want.aux[k]) - float(got.aux[k])) < 1e-4 for k in want.aux if k.endswith("_steps")):
            break
    else:
        raise AssertionError(f"seeds {first}..{seed}: float32 moved a step count every time")
    assert rel(got.logits, want.logits) < 1e-4, f"seed={seed} variant={variant}: {rel(got.logits, want.logits)}"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_bf16_autocast_step_is_finite_and_learns(variant):
    seed = fresh_seed()
    torch.manual_seed(seed)
    model = HierarchosLM(tiny_config(**VARIANTS[variant])).train().cuda()
    tokens = model_tokens(seed, 4, 32).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):  # the same batch eight times: the loss must fall
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = loss_of(model, tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert all(map(torch.isfinite, map(torch.tensor, losses))), f"seed={seed} variant={variant}: {losses}"
    assert losses[-1] < losses[0], f"seed={seed} variant={variant}: {losses}"
