"""torch.compile's settings for this project (hierarchos/ops/compile_settings.py): every compile site makes
them (aliased outputs by as_strided, AOT autograd's cache off), and with them a stack compiled by inductor
over several lengths (dynamic shapes) runs and gives eager's values and gradients. Without them that run
failed in 2 of 3 tries on torch 2.13 (CPU) with a garbage view size or a segmentation fault, in AOT
autograd's rebuilding of aliased outputs."""

import torch
import torch._functorch.config as aot_config

import hierarchos.model.rwkv as rwkv
from hierarchos.generate import compile_step_function
from hierarchos.model.memory import LongTermMemory
from test_time_mix_wiring import X070, fresh_seed, stack


def test_every_compile_site_makes_the_settings(monkeypatch):
    for make in (lambda: rwkv.compile_blocks(stack(X070, 0, n_layers=1, dim=16, head=8), backend="eager"),
                 lambda: LongTermMemory(16, 8, 8, 8, 2, 4, 0.0).compile_segments(backend="eager"),
                 lambda: compile_step_function(lambda x: x + 1, backend="eager")):
        monkeypatch.setattr(aot_config, "view_replay_for_aliased_outputs", True)
        monkeypatch.setattr(aot_config, "enable_autograd_cache", True)
        make()
        assert aot_config.view_replay_for_aliased_outputs is False and aot_config.enable_autograd_cache is False


def test_an_inductor_compiled_stack_over_several_lengths_equals_eager(monkeypatch):
    monkeypatch.setattr(aot_config, "view_replay_for_aliased_outputs", True)  # torch's default: the sites set it
    torch._dynamo.reset()
    seed = fresh_seed()
    eager = stack(X070, seed, n_layers=2, dim=32, head=16).float()
    compiled = stack(X070, seed, n_layers=2, dim=32, head=16).float()
    rwkv.compile_blocks(compiled, backend="inductor")
    gen = torch.Generator().manual_seed(seed)
    for T in (32, 8, 32, 24):  # the second length makes the blocks' frames dynamic
        x = torch.randn(2, T, 32, generator=gen)
        tokens = torch.randint(0, 11, (2, T), generator=gen)
        outs = []
        for s in (eager, compiled):
            s.zero_grad()
            y, st = s(x, tokens, s.init_state(2, dtype=torch.float32))
            (y.square().sum() + st["wkv"].sum()).backward()
            outs.append((y.detach(), {n: p.grad.clone() for n, p in s.named_parameters()}))
        (ye, ge), (yc, gc) = outs
        torch.testing.assert_close(yc, ye, rtol=1e-4, atol=1e-4, msg=lambda m: f"seed={seed} T={T}: {m}")
        for n in ge:
            # float32 sums in another order differ by ~1e-6 of a gradient's scale, up to ~2e-5 where a seed's values
            # cancel (seed 871304932, T=8: key.weight off by 4.5e-4 on an element of 0.11, its largest 32; eager
            # itself is that far from the float64 gradient); a wrong graph is off by the scale itself
            scale = ge[n].abs().max().item()
            torch.testing.assert_close(gc[n], ge[n], rtol=1e-3, atol=1e-4 + 2e-4 * scale,
                                       msg=lambda m: f"seed={seed} T={T} {n}: {m}")
    torch._dynamo.reset()
