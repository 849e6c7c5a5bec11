"""ops/amp: which tensors follow autocast's dtype and when autocast is switched off."""

import torch

from hierarchos.ops.amp import autocast_dtype, autocast_off, to_autocast_dtype


def test_only_float32_follows_the_active_autocast_dtype():
    f32, f64, ints = torch.randn(3), torch.randn(3, dtype=torch.float64), torch.arange(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_dtype("cpu") == torch.bfloat16
        assert to_autocast_dtype(f32).dtype == torch.bfloat16
        assert torch.equal(to_autocast_dtype(f32), f32.to(torch.bfloat16))
        assert to_autocast_dtype(f64) is f64 and to_autocast_dtype(ints) is ints


def test_without_autocast_every_tensor_is_returned_as_it_is():
    assert autocast_dtype("cpu") is None
    for t in (torch.randn(3), torch.randn(3, dtype=torch.float64), torch.arange(3)):
        assert to_autocast_dtype(t) is t


def test_autocast_off_disables_it_inside_and_restores_it():
    with autocast_off("cpu"):  # not on: a no-op
        assert autocast_dtype("cpu") is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with autocast_off("cpu"):
            assert autocast_dtype("cpu") is None
            assert (torch.randn(2, 2) @ torch.randn(2, 2)).dtype == torch.float32
        assert autocast_dtype("cpu") == torch.bfloat16
