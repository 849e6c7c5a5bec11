"""LoRA's rules pinned by hand (hierarchos.lora): the settings' bounds and their one-line messages,
which Linear layers each target names (the expected names written out from the tiny model's
layout, not computed by the code under test), the peft config `wrap` builds, the adapter
directory's files, metadata and rename order, the refusal of a base of another shape, the one-line
errors of a damaged adapter directory, and `ckpt-2-inf` of a finetune checkpoint, in process.
Tiny models, CPU, well under a second each."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import peft  # noqa: F401  (imported once at collection: wrap and load_adapter import it lazily)
import pytest
import torch

from hierarchos import io as hio
from hierarchos import lora
from hierarchos.config import tiny_config
from hierarchos.errors import HierarchosError
from hierarchos.lora import LoraSettings

from lora_models import randomise_adapters as _randomise_adapters
from lora_models import tiny_model as _model


def _message(fn) -> str:
    with pytest.raises(HierarchosError) as info:
        fn()
    text = str(info.value)
    assert "\n" not in text, text
    return text


STACKS = ("reasoner.manager.blocks.0", "reasoner.worker.blocks.0")
# x070's wiring (the default): its output gate is a low-rank pair of parameters, not a Linear
TIME_MIX = [f"{s}.time_mix.{p}" for s in STACKS for p in ("receptance", "key", "value", "output")]
CHANNEL_MIX = [f"{s}.channel_mix.{p}" for s in STACKS for p in ("gate", "up", "down")]
BRIDGES = ["reasoner.h_input_proj", "reasoner.l_feedback_proj", "reasoner.h_to_context", "reasoner.l_input_proj",
           "reasoner.l_drift_proj", "reasoner.l_to_out"]
# the base config fields an adapter records (they fix the shapes of the layers it attaches to)
SHAPE_FIELDS = ["vocab_size", "context_dim", "h_hidden", "l_hidden", "h_layers", "l_layers", "head_size", "ffn_mult",
                "persistent_dim", "ltm_slots", "ltm_key_dim", "ltm_val_dim", "use_deepembed", "deepembed_per_block",
                "use_rosa", "tm_gate"]


# ---- settings ------------------------------------------------------------------------------

def test_settings_defaults_and_bounds_with_their_messages():
    default = LoraSettings()
    assert (default.r, default.alpha, default.dropout, default.targets) == (8, 16.0, 0.05, ["time_mix", "channel_mix"])
    assert LoraSettings().targets is not LoraSettings().targets  # a fresh list each time
    for ok in (LoraSettings(r=1, alpha=1e-6, dropout=0.0, targets=["encoder"]),
               LoraSettings(r=64, alpha=0.5, dropout=0.999)):
        assert ok.validate() is ok
    r_msg = "--lora_r {!r}: must be a positive integer (e.g. 8)"
    for r in (0, -1, True, 2.0, "4"):
        assert _message(lambda: LoraSettings(r=r).validate()) == r_msg.format(r)
    for alpha in (0, -1.0, float("nan")):
        assert _message(lambda: LoraSettings(alpha=alpha).validate()) == f"--lora_alpha {alpha!r}: must be > 0 (e.g. 16)"
    for dropout in (1.0, -0.01, 1.5):
        assert _message(lambda: LoraSettings(dropout=dropout).validate()) == \
            f"--lora-dropout {dropout!r}: must be in [0, 1)"
    assert _message(lambda: LoraSettings(targets=[]).validate()) == \
        "--lora-target: name at least one group or module (groups: time_mix, attention, channel_mix, memory, bridges, encoder)"


# ---- which layers ----------------------------------------------------------------------------

def test_linear_names_are_every_linear_but_the_tied_head():
    model = _model()
    names = lora.linear_names(model)
    assert "lm_head" not in names and isinstance(model.lm_head, torch.nn.Linear)
    assert names == [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and m is not model.lm_head]
    assert set(TIME_MIX + CHANNEL_MIX + BRIDGES) <= set(names) and "memory.write_gates" in names


def test_each_group_and_suffix_names_exactly_these_layers_in_model_order():
    model = _model()
    resolve = lambda *targets: lora.resolve_targets(model, list(targets))  # noqa: E731
    assert resolve("time_mix") == TIME_MIX
    assert resolve("channel_mix") == CHANNEL_MIX
    assert resolve("memory") == ["memory.query", "memory.target"]  # not write_gates
    assert resolve("bridges") == BRIDGES  # not the halting head h_halt_proj
    assert resolve("encoder") == ["encoder"]  # a top-level layer: the full name itself
    # model order whatever the order of the targets, each layer once
    manager, worker = TIME_MIX[:4] + CHANNEL_MIX[:3], TIME_MIX[4:] + CHANNEL_MIX[3:]
    assert resolve("channel_mix", "time_mix") == manager + worker
    assert resolve("time_mix", "time_mix.key", "channel_mix") == manager + worker
    # a suffix matches whole name parts only: "gate" is not "write_gates"
    assert resolve("gate") == [f"{s}.channel_mix.gate" for s in STACKS]
    ours = _model(tm_gate="sigmoid_full")  # hierarchos' full-rank gate is a Linear: a target like the others
    assert lora.resolve_targets(ours, ["gate"]) == [f"{s}.{m}.gate" for s in STACKS for m in ("time_mix", "channel_mix")]
    assert resolve("time_mix.key") == [f"{s}.time_mix.key" for s in STACKS]
    assert resolve("reasoner.h_halt_proj", "memory.query") == ["memory.query", "reasoner.h_halt_proj"]
    for suffix in ("ate", "_key", "write_gate", "blocks.0.time"):
        assert _message(lambda: resolve(suffix)) == (
            f"--lora-target {suffix!r} matches no Linear layer of this model; use a group (time_mix, attention, "
            "channel_mix, memory, bridges, encoder) or a module suffix such as time_mix.key or channel_mix.down")
    for head in ("lm_head", "head"):
        assert _message(lambda: resolve("time_mix", head)) == (
            "--lora-target lm_head: the output head is tied to the token embedding; LoRA cannot target it (pick "
            "from: time_mix, attention, channel_mix, memory, bridges, encoder)")


def test_attention_blocks_take_time_mix_and_attention_targets():
    model = _model(h_block="attention", l_block="attention")
    attention = [f"{s}.attention.{p}" for s in STACKS for p in ("query", "key", "value", "output")]
    assert lora.resolve_targets(model, ["time_mix"]) == attention
    assert lora.resolve_targets(model, ["attention"]) == attention


# ---- wrapping --------------------------------------------------------------------------------

def test_wrap_builds_the_peft_config_of_the_settings():
    model = _model()
    settings = LoraSettings(r=3, alpha=6.0, dropout=0.25, targets=["memory", "encoder"])
    peft_model = lora.wrap(model, settings)
    config = peft_model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout, config.bias) == (3, 6.0, 0.25, "none")
    assert set(config.target_modules) == {"memory.query", "memory.target", "encoder"}
    wrapped = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert sorted(wrapped) == ["encoder", "memory.query", "memory.target"]
    for layer in wrapped.values():
        assert layer.scaling["default"] == 2.0  # alpha / r
        assert layer.r["default"] == 3 and layer.lora_dropout["default"].p == 0.25
        assert layer.lora_A["default"].weight.shape[0] == 3
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0  # B = 0: the function is unchanged
    assert lora.base_model(peft_model) is model
    plain = _model()
    assert lora.base_model(plain) is plain
    # the settings are checked before peft sees them
    assert _message(lambda: lora.wrap(_model(), LoraSettings(dropout=1.0))) == "--lora-dropout 1.0: must be in [0, 1)"


def test_missing_peft_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    assert _message(lambda: lora.wrap(_model(), LoraSettings())) == "LoRA needs the peft package: pip install peft"
    assert _message(lambda: lora.load_adapter(_model(), tmp_path)) == "LoRA needs the peft package: pip install peft"


# ---- the adapter directory -------------------------------------------------------------------

def test_adapter_dir_files_metadata_and_rename_order(tmp_path, monkeypatch):
    model = _model()
    settings = LoraSettings(r=2, alpha=4.0, dropout=0.0, targets=["channel_mix"])
    peft_model = lora.wrap(model, settings)
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")  # a finetune's OUT_DIR holds other things: left alone
    leftover = tmp_path / ".out.adapter-files-0123abcd"  # a killed save's staging dir: cleared
    leftover.mkdir()
    (leftover / "adapter_model.safetensors").write_bytes(b"partial")
    renames, real_replace = [], os.replace

    def recording_replace(src, dst):
        renames.append(Path(dst).name)
        return real_replace(src, dst)

    monkeypatch.setattr(hio.os, "replace", recording_replace)
    assert lora.save_adapter(out, peft_model, settings, {"prompt_template": "alpaca"}) == out
    monkeypatch.setattr(hio.os, "replace", real_replace)
    # the weights first and our metadata last: a kill in between never pairs new metadata with old weights
    assert renames == ["adapter_model.safetensors", "adapter_config.json", "hierarchos_adapter.json"]
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "hierarchos_adapter.json", "metrics.jsonl"]
    assert (out / "metrics.jsonl").read_text() == "{}\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    expected = {"lora": {"r": 2, "alpha": 4.0, "dropout": 0.0, "targets": ["channel_mix"]},
                "base_config": {name: getattr(model.cfg, name) for name in SHAPE_FIELDS},
                "prompt_template": "alpaca"}
    assert expected["base_config"]["context_dim"] == 16 and expected["base_config"]["vocab_size"] == 260
    assert (out / "hierarchos_adapter.json").read_text(encoding="utf-8") == json.dumps(expected, indent=2, sort_keys=True)
    assert lora.read_adapter_meta(out) == expected
    assert lora.shape_config(model.cfg) == expected["base_config"]
    with open(out / "adapter_model.safetensors", "rb") as handle:  # safetensors, not a pickle
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    assert {n.split(".lora_")[0].removeprefix("base_model.model.") for n in header if n != "__metadata__"} == set(CHANNEL_MIX)
    # without meta the metadata holds the settings and the base config alone
    lora.save_adapter(tmp_path / "bare", peft_model, settings)
    assert lora.read_adapter_meta(tmp_path / "bare") == {k: expected[k] for k in ("lora", "base_config")}


def test_read_adapter_meta_errors_are_one_line(tmp_path):
    missing = tmp_path / "nope"
    assert _message(lambda: lora.read_adapter_meta(missing)) == \
        f"{missing}: LoRA adapter directory not found; pass the --out-dir of a finetune"
    (tmp_path / "file").write_text("x")
    assert "LoRA adapter directory not found" in _message(lambda: lora.read_adapter_meta(tmp_path / "file"))

    def not_adapter(directory: Path, found: str) -> str:
        return (f"{directory}: not a LoRA adapter directory (needs adapter_config.json and adapter_model.safetensors; "
                f"found: {found}); pass the --out-dir of a finished finetune")

    empty = tmp_path / "empty"
    empty.mkdir()
    assert _message(lambda: lora.read_adapter_meta(empty)) == not_adapter(empty, "nothing")
    for present in ("adapter_config.json", "adapter_model.safetensors"):
        half = tmp_path / f"only-{present}"
        half.mkdir()
        (half / present).write_text("{}")
        assert _message(lambda: lora.read_adapter_meta(half)) == not_adapter(half, present)
    crowded = tmp_path / "crowded"
    crowded.mkdir()
    names = [f"f{i:02d}.txt" for i in range(14)]
    for name in reversed(names):
        (crowded / name).write_text("x")
    assert _message(lambda: lora.read_adapter_meta(crowded)) == not_adapter(crowded, ", ".join(names[:12]))

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    assert lora.read_adapter_meta(adapter) == {}  # a foreign peft adapter: no metadata, nothing to check
    meta = adapter / "hierarchos_adapter.json"
    meta.write_text('{"lora": ', encoding="utf-8")
    text = _message(lambda: lora.read_adapter_meta(adapter))
    assert text.startswith(f"{meta}: not valid JSON (") and text.endswith("); re-run the finetune or delete the file")
    meta.write_bytes(b'{"a": "\xff"}')
    text = _message(lambda: lora.read_adapter_meta(adapter))
    assert text.startswith(f"{meta}: not valid JSON (") and "decode" in text
    meta.write_text("[1, 2]", encoding="utf-8")
    assert _message(lambda: lora.read_adapter_meta(adapter)) == f"{meta}: expected a JSON object; re-run the finetune"
    meta.write_text('{"note": 1}', encoding="utf-8")
    assert lora.read_adapter_meta(adapter) == {"note": 1}


def test_check_compatible_names_the_first_six_differing_fields():
    cfg = tiny_config(vocab_size=260)
    ours = {name: getattr(cfg, name) for name in SHAPE_FIELDS}
    lora.check_compatible(cfg, {}, "ad")  # no metadata (a foreign adapter): nothing to check
    lora.check_compatible(cfg, {"base_config": [1, 2]}, "ad")
    lora.check_compatible(cfg, {"base_config": dict(ours)}, "ad")
    lora.check_compatible(cfg, {"base_config": {"context_dim": ours["context_dim"]}}, "ad")  # fields absent: skipped
    lora.check_compatible(cfg, {"base_config": {**ours, "not_a_shape_field": 5}}, "ad")
    # an adapter of a model with hierarchos' full-rank gate (a Linear it may target) on x070's low-rank one
    assert _message(lambda: lora.check_compatible(cfg, {"base_config": {**ours, "tm_gate": "sigmoid_full"}}, "ad")) == (
        "ad: this LoRA adapter was trained for another architecture or size: tm_gate='sigmoid_full' (model has "
        "'lowrank'); use it with the base model it was trained on, not the model")
    one = {**ours, "context_dim": 32}
    assert _message(lambda: lora.check_compatible(cfg, {"base_config": one}, "ad")) == (
        "ad: this LoRA adapter was trained for another architecture or size: context_dim=32 (model has 16); use it "
        "with the base model it was trained on, not the model")
    seven = {**ours, **{name: ours[name] + 1 for name in SHAPE_FIELDS[:7]}}
    text = _message(lambda: lora.check_compatible(cfg, {"base_config": seven}, "ad", "models/base"))
    listed = ", ".join(f"{name}={ours[name] + 1!r} (model has {ours[name]!r})" for name in SHAPE_FIELDS[:6])
    assert text == (f"ad: this LoRA adapter was trained for another architecture or size: {listed}; use it with the "
                    "base model it was trained on, not models/base")


def test_load_adapter_is_frozen_and_peft_errors_are_one_line(tmp_path, monkeypatch):
    import peft

    settings = LoraSettings(r=2, dropout=0.0)
    peft_model = lora.wrap(_model(), settings)
    _randomise_adapters(peft_model)
    lora.save_adapter(tmp_path / "ad", peft_model, settings)
    loaded = lora.load_adapter(_model(), tmp_path / "ad")
    adapters = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert adapters and not any(p.requires_grad for p in adapters.values())  # loaded for inference
    saved = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert all(torch.equal(adapters[n], saved[n]) for n in saved)
    fit = "the LoRA adapter does not fit {} or is corrupt ({}); use it with the base model it was trained on, " \
          "or re-run the finetune"

    def failing(message):
        def from_pretrained(*args, **kwargs):
            raise RuntimeError(message)
        return from_pretrained

    monkeypatch.setattr(peft.PeftModel, "from_pretrained", failing("size\n mismatch  " + "x " * 300))
    reason = ("size mismatch " + "x " * 300)[:240]
    assert _message(lambda: lora.load_adapter(_model(), tmp_path / "ad", "models/base")) == \
        f"{tmp_path / 'ad'}: " + fit.format("models/base", reason)
    monkeypatch.setattr(peft.PeftModel, "from_pretrained", failing(""))
    assert _message(lambda: lora.load_adapter(_model(), tmp_path / "ad")) == \
        f"{tmp_path / 'ad'}: " + fit.format("the model", "RuntimeError")


# ---- ckpt-2-inf -------------------------------------------------------------------------------

class _Tokenizer:
    def save(self, directory):
        (Path(directory) / "hierarchos_tokenizer.json").write_text('{"kind": "bytes"}')


def test_finetune_checkpoint_to_model_dir_merges_the_adapters(tmp_path):
    settings = LoraSettings(r=2, alpha=4.0, dropout=0.0, targets=["channel_mix", "memory"])
    peft_model = lora.wrap(_model(), settings)
    _randomise_adapters(peft_model)
    lora.base_model(peft_model).memory.source_names = ["docs.txt"]
    tokens = torch.randint(0, 260, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        adapted = peft_model(tokens).logits
    history = [{"dataset": "qa", "steps": 1}]
    hio.save_checkpoint(tmp_path / "ckpt", 1, peft_model, None, None, {"training_history": history},
                        extra={"prompt_template": "alpaca", "lora": asdict(settings)})
    out = lora.checkpoint_to_model_dir(tmp_path / "ckpt", tmp_path / "inf", _Tokenizer())
    assert out == tmp_path / "inf"
    assert sorted(p.name for p in out.iterdir()) == ["hierarchos_config.json", "hierarchos_tokenizer.json",
                                                     "model.safetensors"]
    model, meta = hio.load_model_dir(out)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, adapted, rtol=1e-5, atol=1e-5)
    assert meta["prompt_template"] == "alpaca" and "lora" not in meta and meta["extra_keys"] == ["prompt_template"]
    assert meta["training_history"] == history and meta["memory_sources"] == ["docs.txt"]
    assert model.memory.source_names == ["docs.txt"]

    # a plain checkpoint takes io's path (no adapters to merge), the tokenizer too
    plain = _model(seed=5)
    hio.save_checkpoint(tmp_path / "plain", 1, plain, None, None, {}, extra={"prompt_template": "chatml"})
    out = lora.checkpoint_to_model_dir(tmp_path / "plain", tmp_path / "plain_inf", _Tokenizer())
    assert (out / "hierarchos_tokenizer.json").is_file()
    again, meta = hio.load_model_dir(out)
    assert meta["prompt_template"] == "chatml"
    with torch.no_grad():
        assert torch.equal(again(tokens).logits, plain(tokens).logits)


def test_load_adapter_checks_the_base_first_and_names_both_paths(tmp_path):
    settings = LoraSettings(r=2, dropout=0.0)
    lora.save_adapter(tmp_path / "ad", lora.wrap(_model(), settings), settings)
    wide = _model(context_dim=32, h_hidden=32, l_hidden=32)
    with pytest.raises(HierarchosError) as info:
        lora.load_adapter(wide, tmp_path / "ad", "models/wide")
    text = str(info.value)
    assert text.startswith(f"{tmp_path / 'ad'}: this LoRA adapter was trained for another architecture or size: "
                           "context_dim=16 (model has 32), ")
    assert text.endswith("; use it with the base model it was trained on, not models/wide")
