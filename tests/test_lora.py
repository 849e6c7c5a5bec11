"""LoRA (hierarchos.lora, `finetune`, `merge-lora`): only adapters train, the merged model computes
base + adapter, adapters refuse a base of another shape, and train -> finetune -> merge-lora -> chat
works through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hierarchos.cli import main
from hierarchos.data.tokenizers import load_tokenizer
from hierarchos.errors import HierarchosError
from hierarchos.io import load_model_dir, save_model_dir
from hierarchos.lora import (LoraSettings, base_model, load_adapter, merge_adapter, resolve_targets, save_adapter,
                             wrap)
from hierarchos.model import HierarchosLM
from hierarchos.train.batches import TokenStreams
from hierarchos.train.trainer import TrainConfig, Trainer

from lora_models import randomise_adapters as _randomise_adapters
from lora_models import tiny_model as _model

REPO = Path(__file__).resolve().parents[1]


def test_default_targets_are_time_and_channel_mix_projections():
    names = resolve_targets(_model(), ["time_mix", "channel_mix"])
    assert names and all(".time_mix." in n or ".channel_mix." in n for n in names)
    # one manager + one worker block x (4 time-mix + 3 channel-mix): x070's gate is no Linear
    assert len(names) == 2 * 7
    assert "lm_head" not in names and not any("deepembed" in n for n in names)
    with pytest.raises(HierarchosError, match="tied"):
        resolve_targets(_model(), ["lm_head"])
    with pytest.raises(HierarchosError, match="matches no Linear"):
        resolve_targets(_model(), ["no_such_layer"])


def test_finetune_changes_only_adapter_weights():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = wrap(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    adapters_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}
    docs = [torch.randint(0, 256, (400,)).tolist()]
    streams = TokenStreams.from_documents(docs, 256, 2, 16)
    trainer = Trainer(peft_model, streams, TrainConfig(epochs=1, batch_size=2, starting_lr=1e-2,
                                                       warmup_steps=0, eval_every_epoch=0),
                      torch.device("cpu"), log=lambda line: None)
    trainer.run(stop_requested=lambda: trainer.opt_step >= 3)
    base = base_model(peft_model)  # the wrapped HierarchosLM
    for name, tensor in before.items():  # every base weight, bit for bit
        key = name
        if key not in base.state_dict():
            key = name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(base.state_dict()[key], tensor), name
    changed = [n for n, p in peft_model.named_parameters() if "lora_" in n and not torch.equal(p, adapters_before[n])]
    assert any("lora_B" in n for n in changed)


def test_merged_logits_equal_base_plus_adapter_and_round_trip(tmp_path):
    model = _model().double()
    tokens = torch.randint(0, 260, (2, 19))
    base_logits = model(tokens).logits
    settings = LoraSettings(r=4, alpha=8, dropout=0.0, targets=["time_mix", "channel_mix", "bridges"])
    peft_model = wrap(model, settings)
    _randomise_adapters(peft_model)
    adapted = peft_model(tokens).logits
    assert (adapted - base_logits).abs().max() > 1e-3  # the adapter does something
    save_adapter(tmp_path / "ad", peft_model, settings)
    merged = merge_adapter(peft_model)
    assert isinstance(merged, HierarchosLM) and not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(merged(tokens).logits, adapted, rtol=1e-9, atol=1e-9)
    # the saved adapter on a fresh copy of the base gives the same function
    reloaded = load_adapter(_model().double(), tmp_path / "ad")
    torch.testing.assert_close(reloaded(tokens).logits, adapted, rtol=1e-7, atol=1e-7)
    # ... and the step form of the merged model agrees with its parallel form
    state, steps = merged.init_state(2, dtype=torch.float64), []
    for t in range(tokens.shape[1]):
        out = merged.step(tokens[:, t], state)
        state = out.state
        steps.append(out.logits)
    torch.testing.assert_close(torch.stack(steps, 1), adapted, rtol=1e-8, atol=1e-8)


def test_adapter_for_another_architecture_is_a_clear_error(tmp_path):
    peft_model = wrap(_model(), LoraSettings(r=4))
    save_adapter(tmp_path / "ad", peft_model, LoraSettings(r=4))
    other = _model(context_dim=32, h_hidden=32, l_hidden=32)
    with pytest.raises(HierarchosError, match="another architecture or size: context_dim=16"):
        load_adapter(other, tmp_path / "ad")
    # without our metadata file (a foreign peft adapter) peft's shape error becomes one line too
    (tmp_path / "ad" / "hierarchos_adapter.json").unlink()
    with pytest.raises(HierarchosError, match="does not fit"):
        load_adapter(other, tmp_path / "ad")
    with pytest.raises(HierarchosError, match="not a LoRA adapter directory"):
        load_adapter(_model(), tmp_path)


def _cli_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS="1")
    return env


def _cli(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "hierarchos_cli.py", "--threads", "1", *map(str, args)], cwd=REPO,
                          env=_cli_env(), input=stdin, capture_output=True, text=True, timeout=300)


def test_cli_train_finetune_merge_chat(tmp_path):
    flags = ("--tiny", "--max_length", "16", "--batch_size", "2", "--epochs", "1", "--max-steps", "3",
             "--device", "cpu", "--log-every", "1")
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"Say {w}.", "input": "", "output": f"{w} {w}!"})
                              for w in "alpha beta gamma delta epsilon zeta eta theta".split() * 6), encoding="utf-8")
    base, adapter, merged = tmp_path / "base", tmp_path / "ad", tmp_path / "merged"
    run = _cli("train", *flags, "--tokenizer-path", "byte", "--out-dir", base)
    assert run.returncode == 0, run.stderr
    run = _cli("finetune", *flags, "--model-path", base, "--train", data, "--out-dir", adapter, "--lora_r", "4")
    assert run.returncode == 0, run.stderr
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    run = _cli("merge-lora", "--model-path", base, "--lora-adapter-path", adapter, "--out-dir", merged)
    assert run.returncode == 0, run.stderr
    model, meta = load_model_dir(merged)
    assert meta["prompt_template"] == "alpaca" and len(meta["training_history"]) == 2
    run = _cli("chat", "--model-path", merged, "--max-new-tokens", "8", "--temperature", "0", stdin="Say alpha.\n")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip()
    # ckpt-2-inf on the finetune's checkpoint merges too, to the same weights
    run = _cli("ckpt-2-inf", "--ckpt-input", adapter / "checkpoints", "--inf-output", tmp_path / "from_ckpt")
    assert run.returncode == 0, run.stderr
    again, _ = load_model_dir(tmp_path / "from_ckpt")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_cli_errors_are_one_line(tmp_path, capsys):
    tok = load_tokenizer("byte")
    save_model_dir(tmp_path / "small", _model(), tok)
    save_model_dir(tmp_path / "wide", _model(context_dim=32, h_hidden=32, l_hidden=32), tok)
    save_adapter(tmp_path / "ad", wrap(_model(), LoraSettings(r=2)), LoraSettings(r=2))
    cases = [
        (["finetune", "--tiny", "--out-dir", str(tmp_path / "x")], "finetune needs --model-path"),
        (["finetune", "--model-path", str(tmp_path / "small"), "--lora-target", "lm_head",
          "--tokenizer-path", "byte", "--out-dir", str(tmp_path / "x")], "tied to the token embedding"),
        (["finetune", "--model-path", str(tmp_path / "small"), "--lora_r", "0", "--out-dir", str(tmp_path / "x")],
         "--lora_r 0"),
        (["merge-lora", "--model-path", str(tmp_path / "wide"), "--lora-adapter-path", str(tmp_path / "ad"),
          "--out-dir", str(tmp_path / "m")], "another architecture or size"),
        (["merge-lora", "--model-path", str(tmp_path / "small"), "--lora-adapter-path", str(tmp_path / "nope"),
          "--out-dir", str(tmp_path / "m")], "adapter directory not found"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert err and err[-1].startswith("error: ") and message in err[-1], (argv, err)
    assert not (tmp_path / "m").exists()
