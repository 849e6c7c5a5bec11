"""padded_linear (the aligned vocabulary head) computes F.linear, as a view of aligned rows."""

import torch
import torch.nn.functional as F

from hierarchos.config import tiny_config
from hierarchos.model import HierarchosLM
from hierarchos.ops.aligned import padded_linear


def test_padded_linear_matches_linear_in_values_and_gradients():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)  # 50: not a multiple of 64
    grad = torch.randn(3, 5, 50, dtype=torch.float64)
    got = padded_linear(x, w)
    assert got.shape == (3, 5, 50) and got.stride(-2) == 64  # rows of the padded result
    (gx, gw) = torch.autograd.grad(got, (x, w), grad)
    want = F.linear(x, w)
    (wx, ww) = torch.autograd.grad(want, (x, w), grad)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(gx, wx, rtol=0, atol=1e-12)
    torch.testing.assert_close(gw, ww, rtol=0, atol=1e-12)


def test_padded_linear_aligned_weight_is_plain_linear():
    x, w = torch.randn(4, 8), torch.randn(128, 8)
    got = padded_linear(x, w)
    assert got.is_contiguous() and torch.equal(got, F.linear(x, w))


def test_padded_linear_under_autocast_casts_the_weight_once():
    x, w = torch.randn(6, 32), torch.randn(100, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = padded_linear(x, w), F.linear(x, w)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0)


def test_model_head_pads_off_the_cpu_only():
    model = HierarchosLM(tiny_config(vocab_size=100))
    h = torch.randn(2, 3, model.cfg.context_dim)
    assert model.head(h).is_contiguous()  # CPU: the plain head
    meta = HierarchosLM(tiny_config(vocab_size=100)).to("meta")
    logits = meta.head(torch.empty(2, 3, model.cfg.context_dim, device="meta"))
    assert logits.shape == (2, 3, 100) and logits.stride(-2) == 128  # the padded, aligned rows
