"""padded_linear (the aligned vocabulary head) computes F.linear, as a view of aligned rows."""

import torch
import torch.nn.functional as F

from hierarchos.config import tiny_config
from hierarchos.model import HierarchosLM
from hierarchos.ops.aligned import PAD_MIN_ROWS, padded_linear


def test_padded_linear_matches_linear_in_values_and_gradients():
    torch.manual_seed(0)
    x = torch.randn(4, PAD_MIN_ROWS // 4, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)  # 50: not a multiple of 64
    grad = torch.randn(4, PAD_MIN_ROWS // 4, 50, dtype=torch.float64)
    got = padded_linear(x, w)
    assert got.shape == (4, PAD_MIN_ROWS // 4, 50) and got.stride(-2) == 64  # rows of the padded result
    (gx, gw) = torch.autograd.grad(got, (x, w), grad)
    want = F.linear(x, w)
    (wx, ww) = torch.autograd.grad(want, (x, w), grad)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(gx, wx, rtol=0, atol=1e-12)
    torch.testing.assert_close(gw, ww, rtol=0, atol=1e-12)


def test_padded_linear_few_rows_skip_the_weight_copy(monkeypatch):
    """A token or a small batch: copying the V x d table would cost more than the aligned kernel saves."""
    padded = []
    real_pad = F.pad
    monkeypatch.setattr(F, "pad", lambda *a, **k: padded.append(a[0].shape) or real_pad(*a, **k))
    x, w = torch.randn(PAD_MIN_ROWS - 1, 16), torch.randn(50, 16)
    got = padded_linear(x, w)
    assert padded == [] and got.is_contiguous() and torch.equal(got, F.linear(x, w))
    padded_linear(torch.randn(PAD_MIN_ROWS, 16), w)
    assert padded == [(50, 16)]  # from PAD_MIN_ROWS rows on, the padded weight


def test_padded_linear_aligned_weight_is_plain_linear(monkeypatch):
    padded = []
    real_pad = F.pad
    monkeypatch.setattr(F, "pad", lambda *a, **k: padded.append(a[0].shape) or real_pad(*a, **k))
    x, w = torch.randn(PAD_MIN_ROWS, 8), torch.randn(128, 8)
    got = padded_linear(x, w)
    assert padded == [] and got.is_contiguous() and torch.equal(got, F.linear(x, w))
    got = padded_linear(x, torch.randn(127, 8))  # one row short of aligned: padded by one
    assert padded == [(127, 8)] and got.stride(-2) == 128


def test_padded_linear_under_autocast_casts_the_weight_once(monkeypatch):
    padded = []
    real_pad = F.pad
    monkeypatch.setattr(F, "pad", lambda *a, **k: padded.append(a[0].dtype) or real_pad(*a, **k))
    x, w = torch.randn(PAD_MIN_ROWS, 32), torch.randn(100, 32)
    padded_linear(x, w)
    assert padded == [torch.float32]  # no autocast: the weight as it is
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = padded_linear(x, w), F.linear(x, w)
    assert padded[1:] == [torch.bfloat16]  # cast before padding: the copy is the bf16 one
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0)


def test_model_head_pads_off_the_cpu_only():
    model = HierarchosLM(tiny_config(vocab_size=100))
    h = torch.randn(2, 3, model.cfg.context_dim)
    assert model.head(h).is_contiguous()  # CPU: the plain head
    meta = HierarchosLM(tiny_config(vocab_size=100)).to("meta")
    logits = meta.head(torch.empty(2, PAD_MIN_ROWS, model.cfg.context_dim, device="meta"))
    assert logits.shape == (2, PAD_MIN_ROWS, 100) and logits.stride(-2) == 128  # the padded, aligned rows
