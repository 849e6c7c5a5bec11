"""Rules of hierarchos.model.grow that tests/test_grow.py (each growth keeps the function) does not pin:
which slots `activate_slots` turns into ordinary ones, a new token's row (the mean row plus seeded
float64 noise), per-block DeepEmbed tables as copies of a trained shared table, a feature left off
on request, and the one-line errors. Tiny models, CPU."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from hierarchos.config import ModelConfig, tiny_config
from hierarchos.errors import HierarchosError
from hierarchos.model import HierarchosLM
from hierarchos.model.grow import (NEW_TOKEN_NOISE, _factor, _rebuild, _split, _tile, activate_slots, add_layers,
                                   enable_features, expand, grow_slots, grow_vocab, growth_summary, widen)
from hierarchos.model.memory import DORMANT_SOURCE

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def grown(slots=12):
    """A tiny model (8 slots, slot 3 and 5 holding memories from sources 4 and 0) grown to `slots`."""
    torch.manual_seed(0)
    model = HierarchosLM(tiny_config())
    with torch.no_grad():
        model.memory.slot_source[3], model.memory.slot_source[5] = 4, 0
    return grow_slots(model, slots)


def sources(model):
    return model.memory.slot_source.tolist()


def test_activate_slots_turns_only_the_given_dormant_slots_into_ordinary_ones():
    model = grown()
    before = sources(model)
    assert before == [-1, -1, -1, 4, -1, 0, -1, -1] + [DORMANT_SOURCE] * 4
    live = activate_slots(model, (s for s in (9, 11, 3, 0)))  # any iterable; non-dormant slots keep their source
    assert sources(live) == [-1, -1, -1, 4, -1, 0, -1, -1, DORMANT_SOURCE, -1, DORMANT_SOURCE, -1]
    assert sources(model) == before  # the input model is not modified
    assert sources(activate_slots(model, [])) == before
    assert sources(activate_slots(model)) == [-1, -1, -1, 4, -1, 0, -1, -1, -1, -1, -1, -1]
    for name, tensor in live.state_dict().items():  # nothing but the slot sources changes
        if name != "memory.slot_source":
            assert torch.equal(tensor, model.state_dict()[name]), name


@pytest.mark.parametrize("slots", [[-1], [12], [0, 12], [-3, 5]])
def test_activate_slots_outside_the_memory_is_one_line_error(slots):
    with pytest.raises(HierarchosError) as err:
        activate_slots(grown(), slots)
    assert str(err.value) == "activate_slots: slot indices must be in 0..11"


def test_activate_slots_takes_the_first_and_last_slot():
    assert sources(activate_slots(grown(), [0, 11]))[11] == -1


def test_a_new_tokens_row_is_the_mean_row_plus_noise_from_the_seed():
    """Rows past the old vocabulary: mean of the old rows + N(0, NEW_TOKEN_NOISE^2) drawn in float64
    from a generator seeded with seed + 1 (the same rows for the same seed, whatever the global RNG)."""
    torch.manual_seed(0)
    model = HierarchosLM(tiny_config(vocab_size=32))
    table = model.embed.weight.detach()
    for seed in (0, 5):
        torch.manual_seed(123 + seed)  # the global RNG must not matter
        new = grow_vocab(model, 35) if seed == 0 else grow_vocab(model, 35, seed=seed)
        noise = torch.randn(3, table.shape[1], generator=torch.Generator().manual_seed(seed + 1),
                            dtype=torch.float64) * NEW_TOKEN_NOISE
        assert torch.equal(new.embed.weight[:32], table)
        assert torch.equal(new.embed.weight[32:], table.mean(0, keepdim=True) + noise.to(table))


def test_per_block_deepembed_tables_start_as_copies_of_the_trained_shared_table():
    torch.manual_seed(0)
    shared = HierarchosLM(tiny_config(use_deepembed=True, l_layers=2))
    with torch.no_grad():
        for stack in (shared.reasoner.manager, shared.reasoner.worker):
            stack.deepembed[0].weight.uniform_(0.5, 1.5)  # trained: no longer the ones of a fresh table
    per_block = enable_features(shared, deepembed_per_block=True)
    for stack, old in ((per_block.reasoner.manager, shared.reasoner.manager),
                       (per_block.reasoner.worker, shared.reasoner.worker)):
        assert len(stack.deepembed) == len(stack.blocks)
        for table in stack.deepembed:
            assert torch.equal(table.weight, old.deepembed[0].weight)
    with torch.no_grad():  # already per block: every block keeps its own table
        per_block.reasoner.worker.deepembed[1].weight.mul_(2.0)
    again = enable_features(per_block, deepembed_per_block=True)
    for a, b in zip(again.reasoner.worker.deepembed, per_block.reasoner.worker.deepembed):
        assert torch.equal(a.weight, b.weight)


def test_a_feature_asked_off_that_is_off_is_no_change_and_off_from_on_is_one_line_error():
    torch.manual_seed(0)
    model = HierarchosLM(tiny_config(use_rosa=False, use_deepembed=False))
    same = enable_features(model, use_rosa=False, use_deepembed=False, deepembed_per_block=False)
    assert not same.cfg.use_rosa and not same.cfg.use_deepembed
    for name, tensor in same.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    with pytest.raises(HierarchosError) as err:
        enable_features(HierarchosLM(tiny_config(use_rosa=True)), use_rosa=False)
    assert str(err.value) == ("use_rosa: cannot turn a feature off by growing a model (it changes what the "
                              "model computes); train a new model without it")


def test_new_slots_get_the_fresh_init_of_the_seed_default_0():
    """The new slots' keys and values are those of a new model initialised under the seed (default 0):
    the same seed gives the same slots, another seed other ones; the old slots are kept as they are."""
    torch.manual_seed(0)
    model = HierarchosLM(tiny_config())
    default, zero, other = grow_slots(model, 12), grow_slots(model, 12, seed=0), grow_slots(model, 12, seed=1)
    assert torch.equal(default.memory.keys, zero.memory.keys) and torch.equal(default.memory.values, zero.memory.values)
    assert not torch.equal(default.memory.keys[8:], other.memory.keys[8:])
    assert torch.equal(default.memory.keys[:8], model.memory.keys)


# ---- widen's pieces, the rebuild, add_layers, expand --------------------------------------------------

def test_tile_repeats_each_segment_in_place():
    t = torch.arange(10.0).reshape(2, 5)  # columns: segment a (2 wide, x2), segment b (3 wide, x1)
    want = torch.tensor([[0., 1., 0., 1., 2., 3., 4.], [5., 6., 5., 6., 7., 8., 9.]])
    assert torch.equal(_tile(t, 1, [(2, 2), (3, 1)]), want)
    assert torch.equal(_tile(t, 0, [(2, 3)]), torch.cat([t, t, t]))


def test_split_copies_sum_to_the_original_with_zero_sum_noise_of_the_stated_size():
    """A segment (size, n) becomes n copies of part / n plus noise that sums to zero over the copies,
    of std `noise` x RMS(part) / n before centring (x sqrt((n - 1) / n) after); n = 1 is left alone."""
    gen = torch.Generator().manual_seed(0)
    part = torch.randn(3, 4000, generator=gen, dtype=torch.float64) * 2.0
    first = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    t = torch.cat([first, part], dim=1)
    for n in (2, 3):
        out = _split(t, 1, [(5, 1), (4000, n)], 0.1, torch.Generator().manual_seed(1))
        assert out.shape == (3, 5 + n * 4000) and out.dtype == torch.float64
        assert torch.equal(out[:, :5], first)  # n = 1: no copy, no noise
        copies = out[:, 5:].reshape(3, n, 4000).transpose(0, 1)  # (n, 3, 4000)
        torch.testing.assert_close(copies.sum(0), part, rtol=0, atol=1e-12)
        noise = copies - part / n
        rms = float(part.pow(2).mean().sqrt())
        want_std = 0.1 * rms / n * ((n - 1) / n) ** 0.5
        assert abs(float(noise.std()) / want_std - 1) < 0.05, (n, float(noise.std()), want_std)
    plain = _split(t, 1, [(5, 1), (4000, 2)], 0.0, torch.Generator().manual_seed(1))
    assert torch.equal(plain[:, 5:], torch.cat([part / 2, part / 2], dim=1))  # no noise asked: exact halves
    f32 = _split(t.float(), 1, [(5, 1), (4000, 2)], 0.1, torch.Generator().manual_seed(1))
    assert f32.dtype == torch.float32
    assert torch.equal(_split(t, 0, [(3, 1)], 0.1, torch.Generator().manual_seed(1)), t)


def _fresh(cfg, seed):
    """What the rebuild's seeded init gives for cfg: a new model under torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    return HierarchosLM(cfg).double()


def test_widening_under_the_low_rank_width_adds_rank_with_zero_down_and_fresh_up():
    """At width 16 the mix paths have rank 16 (min(rank, width)); widened to 32 they have rank 32 (decay:
    min(64, 32)): the old rank's `down` rows are split over the copies, its `up` columns tiled; the extra
    rank gets a zero `down` and the fresh init's `up`."""
    from hierarchos.config import TIME_MIX_WIRINGS

    torch.manual_seed(0)
    old = HierarchosLM(tiny_config(h_hidden=16, **TIME_MIX_WIRINGS["hierarchos"])).double()  # (mix_down: ddlerp's)
    with torch.no_grad():  # values a float32 copy could not hold
        for p in old.parameters():
            p.add_(torch.randn(p.shape, dtype=torch.float64) * 1e-9)
    new = widen(old, h_hidden=32, seed=3)
    fresh = _fresh(new.cfg, 3)
    o, w = old.reasoner.manager.blocks[0].time_mix, new.reasoner.manager.blocks[0].time_mix
    f = fresh.reasoner.manager.blocks[0].time_mix
    down = w.mix_down.detach().view(32, 6, 32)
    assert torch.equal(down[:, :, 16:], torch.zeros(32, 6, 16))
    torch.testing.assert_close(down[:16, :, :16] + down[16:, :, :16], o.mix_down.detach().view(16, 6, 16))
    assert torch.equal(w.mix_up[:, :16, :16], o.mix_up) and torch.equal(w.mix_up[:, :16, 16:], o.mix_up)
    assert torch.equal(w.mix_up[:, 16:], f.mix_up[:, 16:])
    for name in ("decay", "iclr"):
        d_new, d_old = getattr(w, f"{name}_down").detach(), getattr(o, f"{name}_down").detach()
        assert d_new.shape == (32, 32)
        assert torch.equal(d_new[:, 16:], torch.zeros(32, 16)), name
        torch.testing.assert_close(d_new[:16, :16] + d_new[16:, :16], d_old)
        u_new, u_old, u_fresh = (getattr(m, f"{name}_up") for m in (w, o, f))
        assert torch.equal(u_new[:16], torch.cat([u_old, u_old], dim=1)), name
        assert torch.equal(u_new[16:], u_fresh[16:]), name
    # without split noise the copies are exact halves, in the model's float64 (nothing passes through float32)
    exact = widen(old, h_hidden=32, seed=3, split_noise=0.0).reasoner.manager.blocks[0].time_mix
    down = exact.mix_down.detach().view(32, 6, 32)
    half = o.mix_down.detach().view(16, 6, 16) / 2
    assert exact.mix_down.dtype == torch.float64
    assert torch.equal(down[:16, :, :16], half) and torch.equal(down[16:, :, :16], half)
    for name in ("decay", "iclr"):
        d_new, d_old = getattr(exact, f"{name}_down").detach(), getattr(o, f"{name}_down").detach()
        assert torch.equal(d_new[:16, :16], d_old / 2) and torch.equal(d_new[16:, :16], d_old / 2), name


def test_the_rebuild_keeps_what_is_not_a_tensor_and_leaves_the_rest_fresh():
    torch.manual_seed(0)
    model = HierarchosLM(tiny_config()).double()
    model.memory.source_names = ["chat:a", "chat:b"]
    model.set_gradient_checkpointing(True)
    model.reasoner.worker.gradient_checkpointing = False  # the two stacks apart
    rng = torch.get_rng_state()
    for training in (True, False):
        new = _rebuild(model.train(training), model.cfg, lambda old, fresh, gen: {}, seed=4)
        assert new.training is training
        assert new.memory.source_names == ["chat:a", "chat:b"] and new.memory.source_names is not model.memory.source_names
        assert (new.reasoner.manager.gradient_checkpointing, new.reasoner.worker.gradient_checkpointing) == (True, False)
    assert torch.equal(torch.get_rng_state(), rng)  # the seeded init does not move the caller's RNG
    fresh = _fresh(model.cfg, 4)
    for name, tensor in new.state_dict().items():  # nothing handed over: all fresh, in the model's dtype
        assert tensor.dtype == (torch.float64 if tensor.is_floating_point() else fresh.state_dict()[name].dtype), name
        assert torch.equal(tensor, fresh.state_dict()[name]), name
    assert new.lm_head.weight is new.embed.weight  # still tied
    # float32 tensors follow the model's precision; float64 metadata stays float64
    half = _rebuild(model.float(), model.cfg, lambda old, fresh, gen: dict(old), seed=0)
    assert half.embed.weight.dtype == torch.float32 and half.memory.slot_time.dtype == torch.float64
    # the grow function gets the model's tensors, fresh ones and a generator seeded with seed + 1
    seen = {}

    def grow(old, fresh_tensors, gen):
        seen["gen"] = torch.rand(3, generator=gen)
        seen["old"] = old["embed.weight"].clone()
        return {"embed.weight": old["embed.weight"] + 1}
    new = _rebuild(model, model.cfg, grow, seed=7)
    assert torch.equal(seen["gen"], torch.rand(3, generator=torch.Generator().manual_seed(8)))
    assert torch.equal(seen["old"], model.embed.weight)
    assert torch.equal(new.embed.weight, model.embed.weight + 1) and torch.equal(new.lm_head.weight, new.embed.weight)


def test_the_rebuild_names_a_tensor_of_the_wrong_shape_or_name():
    torch.manual_seed(0)
    model = HierarchosLM(tiny_config())
    with pytest.raises(RuntimeError) as err:
        _rebuild(model, model.cfg, lambda old, fresh, gen: {"persistent": torch.zeros(3)}, seed=0)
    assert str(err.value) == f"growth produced persistent (3,), the new model expects {tuple(model.persistent.shape)}"
    with pytest.raises(RuntimeError) as err:
        _rebuild(model, model.cfg, lambda old, fresh, gen: {"nothing": torch.zeros(3)}, seed=0)
    assert str(err.value) == "growth produced nothing (3,), the new model expects no such tensor"


def test_a_quantized_model_does_not_grow():
    torch.manual_seed(0)
    model = HierarchosLM(tiny_config())
    model.encoder.quantized_numel = 0  # a zero count is not quantized
    assert growth_summary(model.cfg, add_layers(model, h_layers=2).cfg) == {"h_layers": [1, 2]}
    model.encoder.quantized_numel = 256
    with pytest.raises(HierarchosError) as err:
        add_layers(model, h_layers=2)
    assert str(err.value) == ("cannot grow a quantized model: grow the full-precision model directory, "
                              "then quantize the result")


def test_shrinking_and_widths_that_are_not_whole_multiples_are_one_line_errors():
    torch.manual_seed(0)
    model = HierarchosLM(tiny_config(h_layers=2))
    with pytest.raises(HierarchosError) as err:
        add_layers(model, h_layers=1)
    assert str(err.value) == ("h_layers 1 is smaller than the model's 2: growing never removes capacity; "
                              "pass a value >= 2 or leave it out")
    with pytest.raises(HierarchosError) as err:
        widen(model, l_hidden=40)
    assert str(err.value) == ("l_hidden 40: widening must multiply the width by a whole number (16 -> 32, 48, ...), "
                              "because only whole copies of the vector keep LayerNorm (and every head) exactly as it "
                              "was; pick a multiple of 16")
    with pytest.raises(HierarchosError, match="l_hidden 8 is smaller than the model's 16"):
        widen(model, l_hidden=8)  # under the width: the shrink error, not the multiple one
    assert _factor("x", 16, None) == _factor("x", 16, 16) == 1
    assert (_factor("x", 16, 32), _factor("x", 16, 48), _factor("x", 16, 12)) == (2, 3, 1)
    assert _factor("x", 1, True) == 1  # not a width: the config's validation names it
    for width in ("32", 32.0):  # neither is divided: the config's own one-line error, not a TypeError
        with pytest.raises(HierarchosError) as err:
            widen(model, context_dim=width)
        assert str(err.value) == f"config field 'context_dim' = {width!r}: must be a positive integer"
    same = add_layers(model)  # nothing asked: the same config
    assert same.cfg == model.cfg


def test_add_layers_appends_identity_blocks_with_the_fresh_init_of_the_seed():
    torch.manual_seed(0)
    old = HierarchosLM(tiny_config(l_layers=1, h_layers=1)).double()
    new = add_layers(old, l_layers=3, seed=5)
    assert (new.cfg.h_layers, new.cfg.l_layers) == (1, 3)
    default = add_layers(old, l_layers=3)  # the seed defaults to 0: the fresh init of seed 0
    for name, tensor in _fresh(new.cfg, 0).state_dict().items():
        if re.match(r"reasoner\.worker\.blocks\.[12]\.time_mix\.receptance", name):
            assert torch.equal(default.state_dict()[name], tensor), name
    fresh = _fresh(new.cfg, 5).state_dict()
    state, before = new.state_dict(), old.state_dict()
    for name, tensor in state.items():
        added = re.match(r"reasoner\.worker\.blocks\.[12]\.", name)
        if added and name.endswith(("time_mix.output.weight", "channel_mix.down.weight")):
            assert not tensor.any(), name  # the two exits: zero, so the block is the identity
        elif added:
            assert torch.equal(tensor, fresh[name]), name
        else:
            assert torch.equal(tensor, before[name]), name


def test_expand_applies_each_growth_once_and_copies_the_other_fields():
    torch.manual_seed(0)
    model = HierarchosLM(tiny_config(use_rosa=False)).double()
    assert growth_summary(model.cfg, expand(model, vocab_size=None, head_size=8, ltm_slots=8).cfg) == {}
    grown = expand(model, seed=2, use_rosa=True, vocab_size=70, ltm_slots=10, context_dim=32, l_layers=2,
                   commitment_threshold=0.3)
    assert growth_summary(model.cfg, grown.cfg) == {
        "use_rosa": [False, True], "vocab_size": [64, 70], "ltm_slots": [8, 10],
        "context_dim": [16, 32], "l_layers": [1, 2], "commitment_threshold": [0.05, 0.3]}
    # the same as each growth in turn (features, vocabulary, slots, widths, layers), with the same seed
    by_hand = add_layers(widen(grow_slots(grow_vocab(enable_features(model, use_rosa=True, seed=2), 70, seed=2),
                                          10, seed=2), context_dim=32, seed=2), l_layers=2, seed=2)
    for name, tensor in grown.state_dict().items():
        assert torch.equal(tensor, by_hand.state_dict()[name]), name
    # widen scales the commitment threshold when none is given
    assert expand(model, context_dim=32).cfg.commitment_threshold == pytest.approx(0.1)


def test_expand_refuses_fields_without_a_growth_and_unknown_fields_in_one_line():
    torch.manual_seed(0)
    model = HierarchosLM(tiny_config())
    with pytest.raises(HierarchosError) as err:
        expand(model, ffn_mult=2)
    assert str(err.value) == (f"ffn_mult: cannot change {model.cfg.ffn_mult!r} -> 2 by growing a model; only "
                              "vocab_size, ltm_slots, context_dim, h_hidden, l_hidden, h_layers, l_layers grow and "
                              "use_rosa, use_deepembed, deepembed_per_block turn on (train a new model for another "
                              "ffn_mult)")
    with pytest.raises(HierarchosError) as err:
        expand(model, widths=3)
    known = sorted(f.name for f in dataclasses.fields(ModelConfig))
    assert str(err.value) == f"unknown config field 'widths' (known fields: {', '.join(known)})"
    with pytest.raises(HierarchosError, match="ltm_slots 4 is smaller"):  # checked before any growth
        expand(model, vocab_size=70, ltm_slots=4)


def test_growth_summary_lists_the_fields_that_differ():
    a = tiny_config()
    assert growth_summary(a, a) == {}
    assert growth_summary(a, a.replace(h_layers=3, max_length=99)) == {"h_layers": [1, 3], "max_length": [64, 99]}


# ---- expand's choices (mutation survivors of expand, issue 15 fourth pass) -------------------------------------

def _same_tensors(a, b):
    return a.state_dict().keys() == b.state_dict().keys() and all(
        torch.equal(t, b.state_dict()[name]) for name, t in a.state_dict().items())


def test_expand_seeds_its_growths_with_the_seed_default_0():
    """New vocabulary rows and the split noise of a widening come from the seed: expand's default is 0."""
    torch.manual_seed(0)
    model = HierarchosLM(tiny_config()).double()
    default = expand(model, vocab_size=70, context_dim=32)
    assert _same_tensors(default, expand(model, vocab_size=70, context_dim=32, seed=0))
    assert not torch.equal(default.embed.weight, expand(model, vocab_size=70, context_dim=32, seed=1).embed.weight)


def test_expand_checks_every_size_before_any_growth():
    """A smaller size is reported before any growth runs, even when a growth earlier in the order (the
    features) would fail with its own error."""
    torch.manual_seed(0)
    model = HierarchosLM(tiny_config(use_rosa=True))
    with pytest.raises(HierarchosError) as err:
        expand(model, use_rosa=False, ltm_slots=4)
    assert str(err.value) == ("ltm_slots 4 is smaller than the model's 8: growing never removes capacity; "
                              "pass a value >= 8 or leave it out")


def test_expand_turns_all_three_features_on_at_once():
    torch.manual_seed(0)
    model = HierarchosLM(tiny_config(use_rosa=False, use_deepembed=False, deepembed_per_block=False)).double()
    on = dict(use_rosa=True, use_deepembed=True, deepembed_per_block=True)
    grown = expand(model, **on)
    assert growth_summary(model.cfg, grown.cfg) == {name: [False, True] for name in on}
    assert _same_tensors(grown, enable_features(model, **on))


def test_expand_without_a_width_change_only_adds_layers():
    """expand does not call widen (not even as a no-op) when no width changes."""
    from hierarchos.config import TIME_MIX_WIRINGS

    torch.manual_seed(0)
    model = HierarchosLM(tiny_config(**TIME_MIX_WIRINGS["hierarchos"])).double()
    grown = expand(model, h_layers=2, seed=3)
    assert growth_summary(model.cfg, grown.cfg) == {"h_layers": [1, 2]}
    assert _same_tensors(grown, add_layers(model, h_layers=2, seed=3))


def test_widen_is_a_function_of_the_model_and_its_seed_not_of_the_global_rng():
    """Every split (the Linear inputs and the low-rank `*_down` paths alike) draws its noise from the
    seeded generator: the same seed gives the same model whatever the global RNG holds."""
    torch.manual_seed(0)
    model = HierarchosLM(tiny_config()).double()
    torch.manual_seed(1)
    first = widen(model, 32, 32, 32, seed=3)
    torch.manual_seed(2)
    assert _same_tensors(first, widen(model, 32, 32, 32, seed=3))
    assert not _same_tensors(first, widen(model, 32, 32, 32, seed=4))


def test_a_tensor_without_a_widening_rule_is_named_in_the_error():
    from hierarchos.model.grow import _Widener

    widener = _Widener(tiny_config(), 2, 2, 2, 0.1, torch.Generator().manual_seed(0))
    for name in ("unknown.weight", "reasoner.worker.extra.weight", "reasoner.manager.blocks.0.time_mix.extra"):
        with pytest.raises(RuntimeError) as err:
            widener(name, torch.zeros(16))
        assert str(err.value) == f"widen: no rule for tensor {name}; add one in hierarchos/model/grow.py"


def test_widen_seed_defaults_to_0_and_its_one_line_errors():
    torch.manual_seed(0)
    model = HierarchosLM(tiny_config()).double()
    assert _same_tensors(widen(model, h_hidden=32), widen(model, h_hidden=32, seed=0))
    with pytest.raises(HierarchosError) as err:
        widen(model, h_hidden=24)
    assert str(err.value).startswith("h_hidden 24: widening must multiply the width by a whole number (16 -> 32, ")
