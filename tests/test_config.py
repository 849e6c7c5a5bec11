"""ModelConfig: JSON round trip, validation errors that name the field, aliases, unknown fields."""

import dataclasses
import json
import math
import random

import pytest

from hierarchos.config import FIELD_ALIASES, MINIMAL_DEPTH, SEED_DEPTH, ModelConfig, tiny_config
from hierarchos.errors import HierarchosError

FIELD_NAMES = sorted(f.name for f in dataclasses.fields(ModelConfig))


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**32)


def test_tiny_config_validates():
    cfg = tiny_config()
    assert cfg.validate() is cfg
    assert tiny_config(vocab_size=256).vocab_size == 256  # the demo's byte-level model
    assert cfg.rosa_vocab == cfg.vocab_size + 1
    assert cfg.rosa_none_id == cfg.vocab_size


def test_default_config_validates():
    ModelConfig().validate()


def test_default_depth_is_minimal_and_the_seeds_depth_is_three_flags_away():
    """Issue 19's evidence made minimal the default depth; the seeds' (2,5,5) stays selectable, and a
    saved config names its depth (a model trained at (2,5,5) reloads at (2,5,5))."""
    import argparse

    from hierarchos.cli import train

    cfg = ModelConfig()
    assert {k: getattr(cfg, k) for k in MINIMAL_DEPTH} == MINIMAL_DEPTH == dict(h_cycles=1, max_h_steps=1, max_l_steps=0)
    p = argparse.ArgumentParser()
    train.add_arguments(p)
    args = p.parse_args(["--h_cycles", "2", "--max_h_steps", "5", "--max-l-steps", "5"])
    seeds = ModelConfig(**train.arch_overrides(args, train.ARCH_FLAGS)).validate()
    assert {k: getattr(seeds, k) for k in SEED_DEPTH} == SEED_DEPTH
    assert ModelConfig.from_json(seeds.to_json()).max_l_steps == 5


@pytest.mark.parametrize("cfg", [ModelConfig(), tiny_config(), tiny_config(use_rosa=False, use_deepembed=False,
                                                                          max_l_steps=0, h_halt_thresh=1.0)],
                         ids=["default", "tiny", "tiny-plain"])
def test_json_round_trip(cfg):
    text = cfg.to_json()
    assert json.loads(text)["config_version"] >= 1
    back = ModelConfig.from_json(text)
    assert back == cfg
    assert back.to_json() == text


def test_json_round_trip_random_valid_configs():
    seed = fresh_seed()
    rng = random.Random(seed)
    for _ in range(20):
        head = rng.choice([4, 8, 16])
        cfg = tiny_config(head_size=head, context_dim=head * rng.randint(1, 4), h_hidden=head * rng.randint(1, 4),
                          l_hidden=head * rng.randint(1, 4), h_cycles=rng.randint(1, 3),
                          max_l_steps=rng.randint(0, 3), h_halt_thresh=rng.uniform(0.01, 1.0),
                          l_conv_atol=rng.uniform(0, 1e-2), use_rosa=rng.random() < 0.5)
        assert ModelConfig.from_json(cfg.to_json()) == cfg, f"seed={seed} cfg={cfg}"


BAD_VALUES = [
    ("vocab_size", 0), ("vocab_size", -5), ("vocab_size", 2.5), ("vocab_size", True), ("vocab_size", "64"),
    ("context_dim", 20),           # not a multiple of head_size=8
    ("h_hidden", 12), ("l_hidden", 0),
    ("h_layers", 0), ("l_layers", -1), ("head_size", 0), ("ffn_mult", 0),
    ("wkv_chunk_size", 0), ("ltm_slots", 0), ("ltm_chunk", -1),
    ("ltm_topk", 9),               # more than ltm_slots=8
    ("h_cycles", 0), ("max_h_steps", 0), ("h_stride", 0), ("grad_steps", 0),
    ("max_l_steps", -1), ("max_l_steps", 1.0),
    ("time_mix", "gpt2"),
    ("l_conv_atol", -1e-3), ("l_conv_atol", math.nan), ("ltm_write_threshold", -1.0),
    ("z_loss_weight", math.inf), ("z_loss_weight", "small"),
    ("h_halt_thresh", 0.0), ("h_halt_thresh", 1.5), ("h_halt_thresh", -0.1), ("h_halt_thresh", True),
    ("use_rosa", "yes"), ("use_deepembed", 1), ("deepembed_per_block", None),
    ("rosa_window", 0), ("max_length", "1024"),
]


@pytest.mark.parametrize("name,value", BAD_VALUES, ids=[f"{n}={v!r}" for n, v in BAD_VALUES])
def test_validation_error_names_the_field(name, value):
    for make in (lambda: tiny_config(**{name: value}),
                 lambda: ModelConfig.from_dict({**tiny_config().to_dict(), name: value}),
                 lambda: tiny_config().replace(**{name: value})):
        with pytest.raises(HierarchosError) as info:
            make()
        message = str(info.value)
        assert f"'{name}'" in message, message
        assert "\n" not in message  # the CLI prints it as one line


def test_max_l_steps_zero_is_allowed():
    assert tiny_config(max_l_steps=0).max_l_steps == 0


ALIAS_VALUES = {"context_dim": 32, "h_layers": 2, "l_layers": 3, "h_cycles": 3, "max_h_steps": 4, "max_l_steps": 1,
                "ffn_mult": 3}


@pytest.mark.parametrize("alias,name", sorted(FIELD_ALIASES.items()))
def test_alias_maps_to_field(alias, name):
    data = tiny_config().to_dict()
    del data[name]
    data[alias] = ALIAS_VALUES[name]
    cfg = ModelConfig.from_dict(data)
    assert getattr(cfg, name) == ALIAS_VALUES[name]
    assert alias not in cfg.to_dict()  # saved under the canonical name


def test_unknown_field_lists_known_fields():
    with pytest.raises(HierarchosError) as info:
        ModelConfig.from_dict({"vocab_size": 64, "hidden_sise": 32}, where="model/hierarchos_config.json")
    message = str(info.value)
    assert "'hidden_sise'" in message
    assert message.startswith("model/hierarchos_config.json")
    for name in FIELD_NAMES:
        assert name in message


def test_metadata_keys_are_ignored():
    data = {**tiny_config().to_dict(), "config_version": 1, "version": "0.1.0",
            "training_history": [{"dataset": "x", "tokens": 10}], "model_type": "hierarchos"}
    assert ModelConfig.from_dict(data) == tiny_config()


def test_bad_json_is_a_user_error():
    with pytest.raises(HierarchosError) as info:
        ModelConfig.from_json('{"vocab_size": 64,', where="cfg.json")
    assert "cfg.json" in str(info.value) and "line 1" in str(info.value)


@pytest.mark.parametrize("data", [[1, 2], "vocab_size", 3, None])
def test_non_object_json_is_a_user_error(data):
    with pytest.raises(HierarchosError, match="JSON object"):
        ModelConfig.from_json(json.dumps(data))
