"""hierarchos.io guarantees: model dirs and checkpoints round-trip exactly, errors are one line,
writes are atomic (an exception or a SIGKILL leaves the last complete directory loadable).

Random inputs come from a fresh seed each run; the seed is in every assertion message.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hierarchos import io as hio
from hierarchos.config import tiny_config
from hierarchos.errors import HierarchosError
from hierarchos.model import HierarchosLM

REPO = Path(__file__).resolve().parents[1]


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**31)


def build(seed: int, **overrides) -> HierarchosLM:
    torch.manual_seed(seed)
    return HierarchosLM(tiny_config(**overrides)).eval()


def tokens(seed: int, batch: int = 2, length: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 7, (batch, length), generator=g)


def logits(model: HierarchosLM, toks: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(toks).logits


def raises_one_line(fn, *patterns: str) -> str:
    with pytest.raises(HierarchosError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message, message
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in: {message}"
    return message


def no_hidden(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.startswith(".")]


# ---- model directory ----------------------------------------------------------------------

class DuckTokenizer:
    def save(self, directory):
        (Path(directory) / "hierarchos_tokenizer.json").write_text('{"kind": "bytes"}')


def test_model_dir_round_trip(tmp_path):
    seed = fresh_seed()
    model = build(seed)
    model.memory.source_names = ["docs.txt", "chat"]
    model.memory.slot_time[1] = 1.7e9 + 0.25
    model.memory.slot_count[1] = 3
    model.memory.slot_source[1] = 1
    toks = tokens(seed)
    history = {"datasets": [{"name": "tiny", "tokens": 1234, "steps": 5, "date": "2025-01-01"}]}
    out = hio.save_model_dir(tmp_path / "m", model, DuckTokenizer(), history=history,
                             extra={"prompt_template": "chatml"})
    assert sorted(p.name for p in out.iterdir()) == [
        "hierarchos_config.json", "hierarchos_tokenizer.json", "model.safetensors"], f"seed {seed}"
    assert no_hidden(tmp_path) == []

    loaded, meta = hio.load_model_dir(out)
    assert torch.equal(logits(model, toks), logits(loaded, toks)), f"seed {seed}"
    assert loaded.lm_head.weight is loaded.embed.weight
    assert loaded.cfg == model.cfg
    assert loaded.memory.source_names == ["docs.txt", "chat"]
    assert loaded.memory.slot_time.dtype == torch.float64
    assert loaded.memory.slot_time[1].item() == 1.7e9 + 0.25
    assert torch.equal(loaded.memory.slot_source, model.memory.slot_source)
    assert meta["training_history"] == history
    assert meta["prompt_template"] == "chatml"
    assert meta["memory_sources"] == ["docs.txt", "chat"]
    assert meta["hierarchos_version"] and meta["config_version"] >= 1
    assert "vocab_size" not in meta  # config fields live in model.cfg


def test_model_dir_overwrite_replaces_whole_dir(tmp_path):
    seed = fresh_seed()
    hio.save_model_dir(tmp_path / "m", build(seed), DuckTokenizer())
    model = build(seed + 1)
    hio.save_model_dir(tmp_path / "m", model)
    assert not (tmp_path / "m" / "hierarchos_tokenizer.json").exists()
    loaded, _ = hio.load_model_dir(tmp_path / "m")
    assert torch.equal(logits(loaded, tokens(seed)), logits(model, tokens(seed))), f"seed {seed}"
    assert no_hidden(tmp_path) == []


def test_model_dir_errors(tmp_path):
    seed = fresh_seed()
    raises_one_line(lambda: hio.load_model_dir(tmp_path / "nope"), "not found")
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("hi")
    raises_one_line(lambda: hio.load_model_dir(tmp_path / "stuff"), "not a hierarchos model directory", "notes.txt")
    (tmp_path / "stuff" / "latest.json").write_text("{}")
    raises_one_line(lambda: hio.load_model_dir(tmp_path / "stuff"), "ckpt-2-inf")

    good = hio.save_model_dir(tmp_path / "good", build(seed))
    config_text = (good / "hierarchos_config.json").read_text()

    def variant(name: str, config: str | None = None, weights: bytes | None = None, drop_weights=False) -> Path:
        path = tmp_path / name
        path.mkdir()
        (path / "hierarchos_config.json").write_text(config if config is not None else config_text)
        if not drop_weights:
            data = (good / "model.safetensors").read_bytes()
            (path / "model.safetensors").write_bytes(weights if weights is not None else data)
        return path

    bad_json = variant("badjson", config=config_text.replace('"h_cycles": 2,', '"h_cycles": 2'))
    raises_one_line(lambda: hio.load_model_dir(bad_json), r"not valid JSON \(line \d+, column \d+\)")
    missing = variant("noweights", drop_weights=True)
    raises_one_line(lambda: hio.load_model_dir(missing), "weights file missing", "hierarchos_config.json")
    data = (good / "model.safetensors").read_bytes()
    truncated = variant("truncated", weights=data[: len(data) // 2])
    raises_one_line(lambda: hio.load_model_dir(truncated), "truncated or corrupt")
    garbage = variant("garbage", weights=b"\xff" * 64)
    raises_one_line(lambda: hio.load_model_dir(garbage), "truncated or corrupt")
    wider = json.loads(config_text)
    wider["vocab_size"] = 72
    mismatch = variant("mismatch", config=json.dumps(wider))
    raises_one_line(lambda: hio.load_model_dir(mismatch), r"'embed\.weight' has shape \(64, 16\)",
                    r"expects \(72, 16\)", "config and the weights disagree")
    unknown = json.loads(config_text)
    unknown["h_cycels"] = 2
    typo = variant("typo", config=json.dumps(unknown))
    raises_one_line(lambda: hio.load_model_dir(typo), "unknown config field 'h_cycels'")
    newer = json.loads(config_text)
    newer["config_version"] = 99
    future = variant("future", config=json.dumps(newer))
    raises_one_line(lambda: hio.load_model_dir(future), "newer", "upgrade")


# ---- atomic writes ----------------------------------------------------------------------

def test_atomic_dir_exception_leaves_old_untouched(tmp_path):
    final = tmp_path / "d"
    with hio.atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with hio.atomic_dir(final) as tmp:
            (tmp / "a.txt").write_text("new")
            (tmp / "b.txt").write_text("new")
            raise RuntimeError("boom")
    assert sorted(p.name for p in final.iterdir()) == ["a.txt"]
    assert (final / "a.txt").read_text() == "old"
    assert no_hidden(tmp_path) == []


def test_crash_between_renames_recovers_new_dir(tmp_path, monkeypatch):
    final = tmp_path / "d"
    with hio.atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("old")
    real_replace, calls = os.replace, []

    def crash_on_second(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill between the renames")
        return real_replace(src, dst)

    monkeypatch.setattr(hio.os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        with hio.atomic_dir(final) as tmp:
            (tmp / "a.txt").write_text("new")
            (tmp / "b.txt").write_text("new")
    monkeypatch.setattr(hio.os, "replace", real_replace)
    assert not final.exists()
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == [".d.old", ".d.tmp"]

    assert hio.recover_interrupted(final) is True
    assert sorted(p.name for p in final.iterdir()) == ["a.txt", "b.txt"]  # rolled forward: complete new dir
    assert (final / "a.txt").read_text() == "new"
    assert no_hidden(tmp_path) == []


def test_recover_rolls_back_and_discards_uncommitted(tmp_path):
    final = tmp_path / "d"
    (tmp_path / ".d.old-abc").mkdir()
    (tmp_path / ".d.old-abc" / "a.txt").write_text("old")
    (tmp_path / ".d.tmp-xyz").mkdir()  # an unrelated, never-committed write
    assert hio.recover_interrupted(final) is True
    assert (final / "a.txt").read_text() == "old"
    assert no_hidden(tmp_path) == []
    (tmp_path / ".e.tmp-xyz").mkdir()
    assert hio.recover_interrupted(tmp_path / "e") is False
    assert not (tmp_path / "e").exists() and no_hidden(tmp_path) == []


def test_atomic_write_text(tmp_path):
    hio.atomic_write_text(tmp_path / "x.json", "one")
    hio.atomic_write_text(tmp_path / "x.json", "two")
    hio.atomic_write_bytes(tmp_path / "sub" / "y.bin", b"\x00\x01")
    assert (tmp_path / "x.json").read_text() == "two"
    assert (tmp_path / "sub" / "y.bin").read_bytes() == b"\x00\x01"
    assert no_hidden(tmp_path) == [] and no_hidden(tmp_path / "sub") == []


# ---- checkpoints --------------------------------------------------------------------------

def make_run(seed: int):
    model = build(seed).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return model, optimizer, scheduler


def train_step(model, optimizer, scheduler, toks):
    optimizer.zero_grad()
    out = model(toks)
    loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]),
                                             toks[:, 1:].reshape(-1))
    loss.backward()
    optimizer.step()
    scheduler.step()


def draw_random() -> tuple:
    return torch.rand(3).tolist(), random.random(), np.random.rand(2).tolist()


def test_checkpoint_round_trip(tmp_path):
    seed = fresh_seed()
    toks = tokens(seed)
    model, optimizer, scheduler = make_run(seed)
    for _ in range(3):
        train_step(model, optimizer, scheduler, toks)
    model.memory.source_names = ["chat"]
    state = {"epoch": 1, "data_position": 4567, "args": {"lr": 1e-2}}
    step_dir = hio.save_checkpoint(tmp_path / "ckpt", 3, model, optimizer, scheduler, state,
                                   extra_tensors={"stream_state.rounds.0": torch.arange(6.0).view(2, 3)})
    assert step_dir.name == "step-00000003"
    expected_random = draw_random()
    for name in ("optimizer.pt", "scheduler.pt"):  # plain containers only
        torch.load(step_dir / name, weights_only=True)

    other, other_opt, other_sched = make_run(seed + 1)
    loaded = hio.load_checkpoint(tmp_path / "ckpt", other, other_opt, other_sched)
    assert draw_random() == expected_random, f"seed {seed}: RNG not restored"
    assert {k: loaded[k] for k in ("epoch", "data_position", "args", "step")} == {**state, "step": 3}
    assert torch.equal(loaded["_stream_state"]["rounds.0"], torch.arange(6.0).view(2, 3))
    assert other.memory.source_names == ["chat"]
    assert other.lm_head.weight is other.embed.weight
    assert other_sched.state_dict()["last_epoch"] == 3 and other_sched.get_last_lr() == scheduler.get_last_lr()
    assert other_opt.state_dict()["param_groups"][0]["lr"] == optimizer.state_dict()["param_groups"][0]["lr"]

    train_step(model, optimizer, scheduler, toks)  # one more AdamW step must agree exactly
    train_step(other, other_opt, other_sched, toks)
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), f"seed {seed}: {name} differs after the resumed step"


def test_rotation_keeps_newest_and_best(tmp_path):
    seed = fresh_seed()
    model, optimizer, scheduler = make_run(seed)
    root = tmp_path / "ckpt"
    for step in range(1, 7):
        hio.save_checkpoint(root, step, model, optimizer, scheduler, {"epoch": 0}, keep=2, is_best=step == 2)
    assert sorted(p.name for p in root.iterdir()) == [
        "best.json", "latest.json", "step-00000002", "step-00000005", "step-00000006"]
    assert json.loads((root / "latest.json").read_text())["dir"] == "step-00000006"
    assert json.loads((root / "best.json").read_text())["dir"] == "step-00000002"
    assert hio.load_checkpoint(root / "step-00000002", model)["step"] == 2
    raises_one_line(lambda: hio.save_checkpoint(root, 7, model, optimizer, scheduler, {}, keep=0), "positive")


def test_checkpoint_resolution_and_errors(tmp_path):
    seed = fresh_seed()
    model, optimizer, scheduler = make_run(seed)
    root = tmp_path / "ckpt"
    raises_one_line(lambda: hio.load_checkpoint(root, model), "not found")
    root.mkdir()
    raises_one_line(lambda: hio.load_checkpoint(root, model), "no checkpoint here")
    for step in (1, 2):
        hio.save_checkpoint(root, step, model, optimizer, scheduler, {"epoch": 0}, keep=None)
    (root / "latest.json").unlink()  # killed before the pointer was written: newest step dir
    assert hio.load_checkpoint(root, model)["step"] == 2
    hio.atomic_write_text(root / "latest.json", json.dumps({"dir": "step-00000009"}))
    raises_one_line(lambda: hio.load_checkpoint(root, model), "step-00000009", "missing")

    step = root / "step-00000002"
    head_only = torch.optim.AdamW([model.embed.weight], lr=1e-2)  # a different parameter set
    raises_one_line(lambda: hio.load_checkpoint(step, model, head_only), "optimizer state does not fit this run")
    data = (step / "optimizer.pt").read_bytes()
    (step / "optimizer.pt").write_bytes(data[: len(data) // 3])
    raises_one_line(lambda: hio.load_checkpoint(step, model, optimizer), "optimizer state is truncated or corrupt")
    (step / "optimizer.pt").unlink()
    raises_one_line(lambda: hio.load_checkpoint(step, model, optimizer), "optimizer state missing")
    (step / "trainer_state.json").write_text('{"step": 2,')
    raises_one_line(lambda: hio.load_checkpoint(step, model), r"trainer state is not valid JSON \(line 1")
    weights = (root / "step-00000001" / "model.safetensors")
    weights.write_bytes(weights.read_bytes()[:100])
    raises_one_line(lambda: hio.load_checkpoint(root / "step-00000001", model), "truncated or corrupt")


def test_checkpoint_to_model_dir(tmp_path):
    seed = fresh_seed()
    model, optimizer, scheduler = make_run(seed)
    train_step(model, optimizer, scheduler, tokens(seed))
    model.memory.source_names = ["a"]
    hio.save_checkpoint(tmp_path / "ckpt", 1, model, optimizer, scheduler,
                        {"training_history": [{"dataset": "x", "tokens": 10}]})
    out = hio.checkpoint_to_model_dir(tmp_path / "ckpt", tmp_path / "inf", tokenizer=DuckTokenizer())
    assert sorted(p.name for p in out.iterdir()) == [
        "hierarchos_config.json", "hierarchos_tokenizer.json", "model.safetensors"]
    loaded, meta = hio.load_model_dir(out)
    assert torch.equal(logits(loaded, tokens(seed)), logits(model.eval(), tokens(seed))), f"seed {seed}"
    assert meta["training_history"] == [{"dataset": "x", "tokens": 10}] and meta["memory_sources"] == ["a"]


def test_only_weights_only_loading():
    source = Path(hio.__file__).read_text()
    assert not re.search(r"^\s*(import|from)\s+(c?pickle|dill)\b", source, re.M)
    assert "weights_only=False" not in source
    loads = re.findall(r"torch\.load\(([^)]*)\)", source)
    assert loads and all("weights_only=True" in args for args in loads), loads


# ---- a real kill ----------------------------------------------------------------------------

WRITER = """
import sys, torch
from hierarchos import io as hio
from hierarchos.config import tiny_config
from hierarchos.model import HierarchosLM
root, start = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
model = HierarchosLM(tiny_config())
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
step = start
while True:
    step += 1
    hio.save_checkpoint(root, step, model, opt, sched, {"epoch": 0, "data_position": step}, keep=2,
                        is_best=step % 3 == 0)
    print(step, flush=True)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")
@pytest.mark.parametrize("rounds", [1, pytest.param(6, marks=pytest.mark.slow)])
def test_sigkill_mid_save_leaves_latest_loadable(tmp_path, rounds):
    """A writer saving ~100 checkpoints/s is SIGKILLed after a random delay (so almost surely
    mid-save); the root must still load its latest complete checkpoint, and a later save must
    clear the killed one's leftovers."""
    seed = fresh_seed()
    rng = random.Random(seed)
    root = tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = 0
    for round_index in range(rounds):  # later rounds write over a killed run's leftovers
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(start)], stdout=subprocess.PIPE,
                                env=env, text=True)
        first = proc.stdout.readline()  # one checkpoint is complete
        assert first.strip(), f"seed {seed}: writer died before its first save"
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(proc.pid, signal.SIGKILL)
        printed = [first, *proc.stdout.read().split()]
        proc.wait()
        model = build(seed)
        state = hio.load_checkpoint(root, model, restore_rng=False)
        where = f"seed {seed} round {round_index}"
        assert state["step"] >= int(printed[-1]), f"{where}: loaded {state['step']} < last reported {printed[-1]}"
        assert state["data_position"] == state["step"], where
        start = state["step"] + 100
    model, optimizer, scheduler = make_run(seed)
    hio.save_checkpoint(root, start, model, optimizer, scheduler, {}, keep=2)
    assert no_hidden(root) == [], f"seed {seed}"
    assert len([p for p in root.iterdir() if p.name.startswith("step-")]) <= 3, f"seed {seed}"


def test_io_imports_no_higher_layer():
    """io sits below lora, chat, the CLI and training: it imports none of them (lora uses io's
    atomic writes; a LoRA checkpoint's merge lives in lora.checkpoint_to_model_dir)."""
    import ast

    tree = ast.parse(Path(hio.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {f"{'.' * node.level}{node.module or ''}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {f"{'.' * node.level}{alias.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                 for alias in node.names}  # `from . import lora`
    higher = ("lora", "chat", "cli", "train", "evaluate", "generate", "quant")
    found = sorted(name for name in imported
                   if any(part in higher for part in name.lstrip(".").split(".")) and (name.startswith(".") or
                                                                                   name.startswith("hierarchos")))
    assert found == [], found


def test_plain_checkpoint_conversion_refuses_a_lora_checkpoint(tmp_path):
    model = build(1)
    hio.save_checkpoint(tmp_path / "ckpt", 1, model, None, None, {}, extra={"lora": {"r": 2}})
    with pytest.raises(ValueError, match="lora.checkpoint_to_model_dir"):
        hio.checkpoint_to_model_dir(tmp_path / "ckpt", tmp_path / "inf")
