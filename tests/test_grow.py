"""hierarchos.model.grow and scripts/expand_model.py: a grown model computes what the old one did.

Every growth is checked on random tiny models with every feature on (ROSA, DeepEmbed shared and
per block, memory writes every 4 tokens, two HRM rounds, ACT early exit, worker freezing): the
logits and aux terms of the parallel form and of the step form with carried state match the old
model's in float64, and the new parameters learn. Fresh seed per run, printed on failure.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch

from hierarchos.config import tiny_config
from hierarchos.data.tokenizers import load_tokenizer
from hierarchos.errors import HierarchosError
from hierarchos.io import load_model_dir, save_model_dir
from hierarchos.model import HierarchosLM
from hierarchos.model.grow import activate_slots, add_layers, enable_features, expand, grow_slots, grow_vocab, widen
from hierarchos.model.losses import LossWeights, lm_loss
from hierarchos.model.memory import DORMANT_SOURCE

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import expand_model  # noqa: E402

# ours' initial values (x070's wiring otherwise, the default): x070's init starts every block as the
# identity (zero output projection, zero low-rank `down`s), which would make a grown model's function
# check hold trivially and leave most parameters without a gradient at the first step
EARLY_EXIT = dict(h_halt_thresh=0.45, l_conv_atol=0.06, max_h_steps=3, tm_init="hierarchos")
T = 12


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**31)


def build(seed, dtype=torch.float64, **overrides):
    torch.manual_seed(seed)
    model = HierarchosLM(tiny_config(**{**EARLY_EXIT, **overrides})).to(dtype)
    with torch.no_grad():  # spread drift and halting so early exit really happens at init
        model.reasoner.l_drift_proj.weight.normal_(0, 0.3)
        model.reasoner.h_halt_proj.weight.normal_(0, 0.5)
        model.reasoner.h_halt_proj.bias.zero_()
    return model.eval()


def random_tokens(vocab, seed, batch=2, length=T):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, min(vocab, 7), (batch, length), generator=g)  # small alphabet: ROSA repeats


def run_steps(model, tokens):
    state = model.init_state(tokens.shape[0])
    logits, totals = [], {}
    for t in range(tokens.shape[1]):
        out = model.step(tokens[:, t], state)
        logits.append(out.logits)
        state = out.state
        for name, (total, count) in out.totals.items():
            s, c = totals.get(name, (0.0, 0.0))
            totals[name] = (s + total, c + count)
    return torch.stack(logits, 1), totals


def assert_same_function(old, new, tokens, msg, tol=1e-9, commitment_scale=1.0):
    """Old-token logits and aux totals, parallel and step form; returns the max abs logit difference."""
    vocab = old.cfg.vocab_size
    with torch.no_grad():
        par_old, par_new = old(tokens), new(tokens)
        step_old, totals_old = run_steps(old, tokens)
        step_new, totals_new = run_steps(new, tokens)
    worst = 0.0
    for form, a, b in (("parallel", par_old.logits, par_new.logits), ("step", step_old, step_new)):
        torch.testing.assert_close(b[..., :vocab], a, rtol=tol, atol=tol, msg=lambda m: f"{msg} {form}: {m}")
        worst = max(worst, float((b[..., :vocab] - a).abs().max()))
    for form, ta, tb in (("parallel", par_old.totals, par_new.totals), ("step", totals_old, totals_new)):
        assert ta.keys() == tb.keys(), msg
        for name, (total, count) in ta.items():
            scale = commitment_scale if name == "commitment" else 1.0
            assert tb[name][1] == count, f"{msg} {form} count of {name}"
            torch.testing.assert_close(torch.as_tensor(tb[name][0]), torch.as_tensor(total) * scale, rtol=tol,
                                       atol=tol, msg=lambda m: f"{msg} {form} {name}: {m}")
    return worst


def loss_of(model, tokens):
    out = model(tokens[:, :-1])
    return lm_loss(out, tokens[:, 1:], model.cfg.z_loss_weight, LossWeights())[0]


def snapshot(model):
    return {name: t.clone() for name, t in model.state_dict().items()}


# ---- layers ---------------------------------------------------------------------------------

@pytest.mark.parametrize("per_block", [False, True])
def test_add_layers_keeps_the_function(per_block):
    seed = fresh_seed()
    old = build(seed, deepembed_per_block=per_block)
    before = snapshot(old)
    new = add_layers(old, h_layers=2, l_layers=3, seed=seed)
    assert (new.cfg.h_layers, new.cfg.l_layers) == (2, 3)
    assert_same_function(old, new, random_tokens(64, seed), f"seed={seed}")
    assert all(torch.equal(t, before[n]) for n, t in old.state_dict().items()), "the input model changed"
    if per_block:
        assert new.reasoner.worker.deepembed[2].weight.eq(1).all()
    state = new.init_state(2)
    assert state.rounds[0]["commit"]["wkv"].shape[0] == 3 and not state.rounds[0]["commit"]["wkv"].any()


def test_add_layers_new_blocks_learn():
    """First backward: the zero exits get a gradient; after one update every new parameter does."""
    seed = fresh_seed()
    # h_halt_thresh 1: with the one-step gradient, a plan point that halts early sends none to the manager
    new = add_layers(build(seed, deepembed_per_block=True, h_halt_thresh=1.0), h_layers=2, l_layers=2,
                     seed=seed).train()
    fresh = [(name, p) for name, p in new.named_parameters()
             if ".blocks.1." in name or ".deepembed.1." in name]
    tokens = random_tokens(64, seed, length=T + 1)
    loss_of(new, tokens).backward()
    for name, p in fresh:
        assert p.grad is not None, f"seed={seed} {name} has no gradient"
        if name.endswith(("time_mix.output.weight", "channel_mix.down.weight")):
            assert p.grad.abs().sum() > 0, f"seed={seed} exit {name} got a zero gradient"
    sgd = torch.optim.SGD(new.parameters(), lr=0.5)
    for update in (1, 2):
        sgd.step()
        new.zero_grad()
        loss_of(new, tokens).backward()
        # the value residual's up path (x070's wiring) reads a zero-initialised down path: one update later
        silent = [name for name, p in fresh if not p.grad.abs().sum() > 0
                  and (update == 2 or not name.endswith("value_residual_up"))]
        assert not silent, f"seed={seed} new parameters without gradient after {update} update(s): {silent}"


# ---- widths ---------------------------------------------------------------------------------

@pytest.mark.parametrize("widths", [(32, 16, 16), (16, 32, 16), (16, 16, 48), (32, 32, 32)])
def test_widen_keeps_the_function(widths):
    seed = fresh_seed()
    old = build(seed, deepembed_per_block=widths == (32, 32, 32), l_layers=2)
    new = widen(old, *widths, seed=seed)
    n_d = widths[0] // 16
    assert new.cfg.commitment_threshold == pytest.approx(old.cfg.commitment_threshold * n_d)
    tokens = random_tokens(64, seed, length=16)
    assert_same_function(old, new, tokens, f"seed={seed} widths={widths}", commitment_scale=n_d)
    with torch.no_grad():
        out = old(tokens)
    # the comparison means something only if halting, freezing and memory writes happened
    assert float(out.state.memory["writes"].sum()) > 0, f"seed={seed} no memory write"
    assert float(out.aux["worker_steps"]) < old.cfg.max_l_steps * old.cfg.h_cycles, f"seed={seed} nothing froze"


def test_widen_copies_learn_apart_and_every_parameter_gets_a_gradient():
    seed = fresh_seed()
    new = widen(build(seed, h_halt_thresh=1.0), 32, 32, 32, seed=seed).train()
    loss_of(new, random_tokens(64, seed, length=T + 1)).backward()
    missing = [name for name, p in new.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"seed={seed} parameters without gradient: {missing}"
    # without the zero-sum split noise both copies would get the same gradient forever
    grad = new.reasoner.worker.blocks[0].time_mix.receptance.weight.grad
    assert not torch.allclose(grad[:16], grad[16:]), f"seed={seed} the copies get identical gradients"
    grad = new.embed.weight.grad
    assert not torch.allclose(grad[:, :16], grad[:, 16:]), f"seed={seed} embedding copies get identical gradients"


def test_widen_refuses_widths_that_are_not_whole_multiples():
    model = build(0)
    with pytest.raises(HierarchosError, match=r"context_dim 24: .*whole number .*16 -> 32"):
        widen(model, context_dim=24)
    with pytest.raises(HierarchosError, match="smaller than the model's 16"):
        widen(model, l_hidden=8)


# ---- memory slots ---------------------------------------------------------------------------------

def test_grow_slots_keeps_the_function_and_new_slots_stay_dormant():
    seed = fresh_seed()
    old = build(seed)
    new = grow_slots(old, 20, seed=seed)
    tokens = random_tokens(64, seed)
    assert_same_function(old, new, tokens, f"seed={seed}")
    memory = new.memory
    assert memory.keys.shape == (20, 8) and memory.slot_source[8:].eq(DORMANT_SOURCE).all()
    assert memory.slot_time[8:].eq(0).all() and memory.slot_count[8:].eq(0).all()
    assert torch.equal(memory.slot_source[:8], old.memory.slot_source)
    new = grow_slots(build(seed, h_halt_thresh=1.0), 20, seed=seed).train()
    memory = new.memory
    out = new(tokens)
    assert not out.state.memory["writes"][:, 8:].any(), f"seed={seed} a dormant slot was written"
    loss_of(new, random_tokens(64, seed, length=T + 1)).backward()
    assert not memory.values.grad[8:].any() and not memory.keys.grad[8:].any(), f"seed={seed} dormant slot read"
    # a grown model saves and loads as it is (no new tensor: slot_source marks dormant slots)
    live = activate_slots(new)
    assert live.memory.slot_source.eq(-1).all()
    queries = torch.randn(1, 64, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    _, idx = live.memory.address(queries)
    assert int(idx.max()) >= 8, f"seed={seed} activated slots are never read"


def test_grown_model_directory_round_trips(tmp_path):
    seed = fresh_seed()
    old = build(seed, dtype=torch.float32)  # a model directory loads as float32
    new = expand(old, ltm_slots=12, h_layers=2, seed=seed)
    save_model_dir(tmp_path / "grown", new)
    loaded, _ = load_model_dir(tmp_path / "grown")
    assert loaded.memory.slot_source[8:].eq(DORMANT_SOURCE).all()
    assert_same_function(old, loaded.eval(), random_tokens(64, seed), f"seed={seed}", tol=1e-5)


# ---- vocabulary ---------------------------------------------------------------------------------------

def test_grow_vocab_keeps_old_token_logits():
    seed = fresh_seed()
    old = build(seed, deepembed_per_block=True, l_layers=2)
    new = grow_vocab(old, 80, seed=seed)
    assert new.cfg.vocab_size == 80 and new.cfg.rosa_none_id == 80
    tokens = random_tokens(64, seed)
    assert_same_function(old, new, tokens, f"seed={seed}")
    assert torch.equal(new.rosa_embed.weight[80], old.rosa_embed.weight[64]), "the 'no hint' row did not move"
    assert torch.equal(new.rosa_embed.weight[:64], old.rosa_embed.weight[:64])
    for table in new.reasoner.worker.deepembed:
        assert table.weight[64:].eq(1).all()
    with torch.no_grad():
        probs = torch.softmax(new(tokens).logits, -1)
        new(torch.randint(0, 80, (2, 6)))  # new ids are valid inputs
    # rows at the mean embedding: each new token starts with about 1/V of the mass at most
    assert float(probs[..., 64:].sum(-1).max()) < 1.1 * 16 / 64, f"seed={seed}"


# ---- features -----------------------------------------------------------------------------------------

def test_turning_rosa_and_deepembed_on_keeps_the_function():
    seed = fresh_seed()
    plain = build(seed, use_rosa=False, use_deepembed=False, l_layers=2, h_halt_thresh=1.0)
    rich = expand(plain, use_rosa=True, use_deepembed=True, deepembed_per_block=True, seed=seed)
    assert_same_function(plain, rich, random_tokens(64, seed), f"seed={seed} plain -> all features")
    rich.train()
    loss_of(rich, random_tokens(64, seed, length=T + 1)).backward()
    for name, p in rich.named_parameters():
        if "rosa_embed" in name or "deepembed" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"seed={seed} {name} does not learn"
    shared = build(seed, l_layers=2)
    per_block = enable_features(shared, deepembed_per_block=True, seed=seed)
    assert len(per_block.reasoner.worker.deepembed) == 2
    assert_same_function(shared, per_block, random_tokens(64, seed), f"seed={seed} shared -> per block")
    with pytest.raises(HierarchosError, match="use_rosa: cannot turn a feature off"):
        expand(shared, use_rosa=False)


# ---- all at once, float32, errors -------------------------------------------------------------------------

def test_expand_everything_at_once_float64_and_float32():
    seed = fresh_seed()
    grow = dict(vocab_size=70, context_dim=32, h_hidden=32, l_hidden=48, h_layers=2, l_layers=2, ltm_slots=12)
    tokens = random_tokens(64, seed)
    old = build(seed)
    new = expand(old, seed=seed, **grow)
    assert all(getattr(new.cfg, k) == v for k, v in grow.items())
    worst64 = assert_same_function(old, new, tokens, f"seed={seed} float64", commitment_scale=2)
    old32 = build(seed, dtype=torch.float32)
    new32 = expand(old32, seed=seed, **grow)
    assert new32.embed.weight.dtype == torch.float32 and new32.memory.slot_time.dtype == torch.float64
    worst32 = assert_same_function(old32, new32, tokens, f"seed={seed} float32", tol=1e-4, commitment_scale=2)
    print(f"max abs logit difference: float64 {worst64:.2e}, float32 {worst32:.2e}")


def test_expand_copies_behaviour_fields_and_refuses_the_rest():
    model = build(0)
    new = expand(model, max_length=128, H_cycles=1, ltm_topk=3, h_layers=2)
    assert (new.cfg.max_length, new.cfg.h_cycles, new.cfg.ltm_topk, new.cfg.h_layers) == (128, 1, 3, 2)
    assert new.memory.topk == 3  # the modules were rebuilt from the new config
    with pytest.raises(HierarchosError, match="h_layers 1 is smaller than the model's 2"):
        expand(expand(model, h_layers=2), h_layers=1)
    with pytest.raises(HierarchosError, match="unknown config field 'widths'"):
        expand(model, widths=3)
    with pytest.raises(HierarchosError, match="head_size: cannot change 8 -> 4"):
        expand(model, head_size=4)


# ---- the script -------------------------------------------------------------------------------------------------

def run_script(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        from hierarchos.cli import script_entry
        script_entry(lambda: expand_model.main(argv))
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


@pytest.fixture
def model_dir(tmp_path):
    tokenizer = load_tokenizer("byte")
    torch.manual_seed(0)
    model = HierarchosLM(tiny_config(vocab_size=tokenizer.vocab_size)).eval()
    model.memory.source_names = ["chat:test"]
    model.memory.slot_source[0] = 0
    path = save_model_dir(tmp_path / "old", model, tokenizer, history=[{"dataset": "d", "steps": 2}],
                          extra={"prompt_template": "Q: {prompt}\nA:"})
    return path, model


def test_script_grows_a_model_directory(model_dir, tmp_path, capsys):
    old_dir, model = model_dir
    code, out, err = run_script(["--old-model-path", str(old_dir), "--output-path", str(tmp_path / "new"),
                                 "--context-dim", "32", "--h_layers", "2", "--ltm_slots", "16",
                                 "--vocab_size", "300", "--max-length", "128"], capsys)
    assert code == 0, err
    assert "context_dim 16 -> 32" in out
    grown, meta = load_model_dir(tmp_path / "new")
    assert (grown.cfg.context_dim, grown.cfg.h_layers, grown.cfg.ltm_slots, grown.cfg.vocab_size,
            grown.cfg.max_length) == (32, 2, 16, 300, 128)
    assert meta["prompt_template"] == "Q: {prompt}\nA:" and meta["memory_sources"] == ["chat:test"]
    assert int(grown.memory.slot_source[0]) == 0
    assert meta["training_history"][0] == {"dataset": "d", "steps": 2}
    assert meta["training_history"][-1]["growth"]["context_dim"] == [16, 32]
    assert load_tokenizer(str(tmp_path / "new")).vocab_size == 260
    tokens = torch.randint(0, 260, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(grown(tokens).logits[..., :260], model(tokens).logits, rtol=1e-4, atol=1e-5)


def _one_error_line(code, err):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_script_legacy_config_without_a_field(model_dir, tmp_path, capsys):
    old_dir, _ = model_dir
    config = old_dir / "hierarchos_config.json"
    data = json.loads(config.read_text())
    del data["vocab_size"], data["rosa_window"]
    config.write_text(json.dumps(data))
    code, _, err = run_script(["--old-model-path", str(old_dir), "--output-dir", str(tmp_path / "new"),
                               "--h_layers", "2"], capsys)
    line = _one_error_line(code, err)
    assert str(config) in line and "'vocab_size'" in line and "rosa_window" not in line and "add the field" in line


def test_script_legacy_weights_without_a_tensor(model_dir, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    old_dir, _ = model_dir
    weights = old_dir / "model.safetensors"
    with safe_open(str(weights), "pt") as handle:
        tensors, metadata = {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()
    del tensors["memory.write_gates.bias"]
    save_file(tensors, str(weights), metadata=metadata)
    code, _, err = run_script(["--old-model-path", str(old_dir), "--output-dir", str(tmp_path / "new"),
                               "--h_layers", "2"], capsys)
    line = _one_error_line(code, err)
    assert str(weights) in line and "memory.write_gates.bias" in line


@pytest.mark.parametrize("args, expected", [
    (["--context_dim", "24"], "whole number"),
    (["--h_layers", "1", "--l-layers", "1"], "nothing to grow"),
    ([], "nothing to grow"),
    (["--ffn_mult", "8"], "ffn_mult: cannot change"),
])
def test_script_bad_requests(model_dir, tmp_path, capsys, args, expected):
    old_dir, _ = model_dir
    code, _, err = run_script(["--old-model-path", str(old_dir), "--output-dir", str(tmp_path / "new"), *args], capsys)
    assert expected in _one_error_line(code, err)
    assert not (tmp_path / "new").exists()
