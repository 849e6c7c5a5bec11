"""Chat: scripted CLI use, greedy parity of step vs parallel, fixed state size, every slash command,
online learning that touches only the memory (and nothing below the surprise threshold), the
memory delta file round trip and its errors. A random tiny byte-level model, CPU, seconds."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hierarchos.chat as chat_mod
import hierarchos.generate as generate_mod
from hierarchos.chat import ChatSession, LearnConfig, cosine_lr, parse_since
from hierarchos.config import tiny_config
from hierarchos.data.tokenizers import load_tokenizer
from hierarchos.errors import HierarchosError
from hierarchos.generate import SamplingConfig
from hierarchos.io import load_model_dir, save_model_dir
from hierarchos.model.losses import lm_loss
from hierarchos.model import HierarchosLM

REPO = Path(__file__).resolve().parents[1]
MEMORY_KEYS = {"memory.values", "memory.slot_time", "memory.slot_count", "memory.slot_source"}


def _make_dir(path: Path, seed: int, template: str = "plain") -> Path:
    torch.manual_seed(seed)
    model = HierarchosLM(tiny_config(vocab_size=260))  # byte tokenizer: 256 bytes + 4 specials
    save_model_dir(path, model, load_tokenizer("byte"), extra={"prompt_template": template})
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _make_dir(tmp_path_factory.mktemp("chat") / "model", seed=1234)


def _session(model_dir, *, temperature=0.0, penalty=1.0, max_new=12, learn=False, threshold=2.0,
             template=None, **kw):
    model, meta = load_model_dir(model_dir)
    out, info = io.StringIO(), io.StringIO()
    session = ChatSession(
        model, load_tokenizer(str(model_dir)), template=template or meta.get("prompt_template", "plain"),
        model_dir=model_dir,
        sampling=SamplingConfig(temperature=temperature, repetition_penalty=penalty, max_new_tokens=max_new, seed=0),
        learn=LearnConfig(enabled=learn, surprise_threshold=threshold), out=out, info=info, log=info, **kw)
    return session, out, info


def _snapshot(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bytes(a.contiguous().view(torch.uint8).flatten().tolist()) \
        == bytes(b.contiguous().view(torch.uint8).flatten().tolist())


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8", "HF_HUB_OFFLINE": "1"}


def test_piped_stdin_prints_only_the_reply(model_dir):
    session, _, _ = _session(model_dir, max_new=8)
    expected, _ = session.reply("hello")
    proc = subprocess.run([sys.executable, str(REPO / "hierarchos_cli.py"), "chat", "--model-path", str(model_dir),
                           "--device", "cpu", "--temperature", "0", "--repetition-penalty", "1", "--max-new-tokens",
                           "8", "--surprise-threshold", "1e9"],
                          input="hello\n".encode(), capture_output=True, env=_env(), cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode("utf-8") == expected + "\n"
    assert expected  # a random model still says something in 8 greedy tokens
    assert "[ltm]" in proc.stderr.decode()  # status lines go to stderr


def test_greedy_ids_equal_torch_argmax():
    """The numpy argmax of greedy decoding gives torch's argmax: one row, a batch, a (V,) row, ties (the
    first of equal maxima), a NaN (counted as the maximum), -inf rows, and other dtypes through torch."""
    g = torch.Generator().manual_seed(0)
    cases = [torch.randn(1, 50257, generator=g), torch.randn(3, 1000, generator=g), torch.randn(1000, generator=g),
             torch.tensor([[1.0, 3.0, 3.0, 2.0]]), torch.tensor([0.0, float("nan"), 5.0, float("nan")]),
             torch.full((2, 7), float("-inf")), torch.randn(2, 9, generator=g).double(),
             torch.randn(2, 9, generator=g).to(torch.bfloat16), torch.randn(4, 6, generator=g)[:, ::2]]
    for logits in cases:
        got = generate_mod.greedy_ids(logits)
        assert got.dtype == torch.int64 and torch.equal(got, logits.argmax(-1)), logits


def test_greedy_step_equals_argmax_of_parallel_forward(model_dir):
    session, _, _ = _session(model_dir, max_new=10)
    session.tokenizer.eos_id = None  # generate all 10 tokens
    text, exchange = session.reply("The plan")
    prompt_len = len(session.tokenizer.encode("The plan"))
    assert len(exchange) == prompt_len + 10
    with torch.no_grad():
        for t in range(prompt_len, len(exchange)):
            logits = session.model(torch.tensor([exchange[:t]]), None).logits[0, -1]
            assert int(logits.argmax()) == exchange[t], f"token {t - prompt_len}"


def test_state_size_fixed_over_200_tokens(model_dir):
    session, _, _ = _session(model_dir, temperature=0.8, penalty=1.2, max_new=100)
    session.tokenizer.eos_id = None
    before = session.state.shapes()
    session.reply("one")
    session.reply("two")
    assert session.state.pos >= 200
    assert session.state.shapes() == before
    assert session.last.tokens == 100


def test_stop_string_ends_reply_and_is_never_streamed(model_dir, monkeypatch):
    script = list("Sure.\n### Instruction:\nmore".encode())
    monkeypatch.setattr(generate_mod, "sample_next", lambda *a, **k: script.pop(0))
    session, _, _ = _session(model_dir, template="alpaca", max_new=64)
    chunks = []
    text, _ = session.reply("hi", on_text=chunks.append)
    assert text == "Sure."
    assert "".join(chunks) == "Sure."  # neither the stop string nor the newline before it is streamed


def test_ctrl_c_stops_the_reply_and_keeps_the_session(model_dir, monkeypatch):
    calls = []

    def fake_sample(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)
        return 65  # "A"

    monkeypatch.setattr(generate_mod, "sample_next", fake_sample)
    session, out, info = _session(model_dir, max_new=50)
    session.turn("hi")
    assert out.getvalue() == "AAA\n"
    assert "[stopped]" in info.getvalue()
    assert session.state.pos == len(session.tokenizer.encode("hi")) + 3
    # the Ctrl+C handler is restored after the reply
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_slash_commands(model_dir):
    session, out, info = _session(model_dir, learn=True, threshold=0.0, max_new=4)
    session.run_lines(["/help", "/mode fast", "/temp 0.5", "/topk 7", "/topp 0.8", "/penalty 1.3", "hello",
                       "/status", "/memory", "/memory the query", "/learn off", "/save", "/reset"])
    text = info.getvalue()
    assert "/mode fast|normal|deep|extreme" in text
    assert session.mode == "fast" and session.caps() == {"h_cycles": 1, "max_h_steps": 1, "max_l_steps": 0}
    s = session.sampling
    assert (s.temperature, s.top_k, s.top_p, s.repetition_penalty) == (0.5, 7, 0.8, 1.3)
    assert "format fp32 safetensors" in text and "tokens/s" in text and "slots used" in text
    assert "worker passes/token" in text
    assert session.source in text  # /memory lists the slots this session wrote
    assert "weight" in text
    assert session.learn.enabled is False
    assert (model_dir / chat_mod.DELTA_FILE).is_file()
    assert session.state.pos == 0
    for mode, thresh in (("deep", 0.99), ("extreme", 1.0), ("normal", 0.9)):
        session.handle(f"/mode {mode}")
        assert session.caps() == {"h_halt_thresh": thresh}
    # a model that ponders one pass says the threshold changes nothing; one that ponders more does not
    assert session.model.cfg.max_h_steps > 1 and "changes nothing" not in info.getvalue()
    saved = session.model.cfg.max_h_steps
    session.model.cfg.max_h_steps = 1
    session.handle("/mode extreme")
    assert "ponders one pass" in info.getvalue().splitlines()[-1]
    session.model.cfg.max_h_steps = saved
    session.handle("/mode normal")
    session.handle(f"/memory source={session.source} since=2000-01-01")
    assert session.handle("/quit") is False and session.done
    (model_dir / chat_mod.DELTA_FILE).unlink()


def test_status_shows_time_to_first_token_and_speed_of_the_last_reply(model_dir, monkeypatch):
    """A fake clock: the turn starts at 10 s, the first token is sampled at 10.25 s, the reply ends at
    12.25 s with 5 tokens: 250 ms to the first token, then 4 tokens in 2 s, 5 in 2.25 s overall."""
    monkeypatch.setattr(generate_mod, "sample_next", lambda *a, **k: 65)  # "A", never EOS
    ticks = iter([10.0, 10.25, 12.25])
    session, _, info = _session(model_dir, max_new=5, clock=lambda: next(ticks))
    session.handle("/status")
    assert "last reply: 0 tokens, n/a; time to first token n/a, then n/a;" in info.getvalue()
    session.handle("hi")
    session.handle("/status")
    assert session.last.tokens == 5 and session.last.first_token_seconds == 0.25 and session.last.seconds == 2.25
    assert "last reply: 5 tokens, 2.2 tokens/s; time to first token 250.0 ms, then 2.0 tokens/s;" in info.getvalue()


def test_reply_times_are_measured_on_the_real_clock(model_dir):
    session, _, _ = _session(model_dir, max_new=6, temperature=0.8)
    session.reply("hello there")
    last = session.last
    assert last.tokens >= 1 and 0 < last.first_token_seconds <= last.seconds < 120
    assert last.tokens < 2 or 0 < last.decode_rate() < 1e6


def test_cuda_graph_replies_equal_plain_replies(model_dir, monkeypatch):
    """Chat's CUDA-graph path with the capture left out (no GPU here: the stepper's body runs eagerly):
    two sampled turns give the replies, state and step statistics of the plain path; the stepper is
    made at load (warm-up) and reused by both turns."""
    real = chat_mod.generate_batch
    monkeypatch.setattr(chat_mod, "generate_batch", lambda *a, **k: real(*a, **{**k, "cuda_graph": False}))
    plain, _, _ = _session(model_dir, temperature=0.9, max_new=10)
    graphed, _, info = _session(model_dir, temperature=0.9, max_new=10, cuda_graph=True)
    assert len(graphed.steppers) == 1 and graphed.warmup_seconds > 0
    stepper = next(iter(graphed.steppers.values()))
    for turn in ("hello there", "and again"):
        assert graphed.reply(turn) == plain.reply(turn), turn
        assert graphed.state.pos == plain.state.pos
        for (name, a), (_, b) in zip(plain.state.tensors(), graphed.state.tensors()):
            assert torch.equal(a, b), f"{turn}: {name}"
        assert graphed.last.tokens == plain.last.tokens
        for name, (total, count) in plain.last.totals.items():
            assert graphed.last.totals[name] == pytest.approx([total, count]), name
    assert list(graphed.steppers.values()) == [stepper] and stepper.loads == 2
    graphed.handle("/status")
    assert "(CUDA graph: 1 captured, the first at load in" in info.getvalue()


def test_cuda_graph_flag_off_cuda_is_one_line_exit_2(model_dir, capsys):
    from hierarchos.cli import main

    assert main(["chat", "--model-path", str(model_dir), "--device", "cpu", "--cuda-graph", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--cuda-graph needs a CUDA device" in err[0], err


@pytest.mark.parametrize("line", ["/bogus", "/mode warp", "/temp abc", "/temp -1", "/topk -2", "/topp 2",
                                  "/penalty x", "/learn maybe", "/memory since=yesterday", "/memory source=nope"])
def test_bad_command_prints_one_line_hint(model_dir, line):
    session, out, info = _session(model_dir)
    assert session.handle(line) is True
    lines = info.getvalue().splitlines()
    assert len(lines) == 1 and lines[0], lines
    assert out.getvalue() == ""


def test_interactive_loop_ctrl_c_at_prompt_and_ctrl_d(model_dir):
    session, out, info = _session(model_dir, max_new=3)
    inputs = iter(["/mode deep", KeyboardInterrupt, "hi", EOFError])

    def read(prompt):
        assert prompt == ">>> "
        item = next(inputs)
        if isinstance(item, type) and issubclass(item, BaseException):
            raise item
        return item

    session.run_interactive(read)
    assert session.mode == "deep" and session.turns == 1


def test_learning_changes_only_memory(model_dir):
    session, _, info = _session(model_dir, learn=True, threshold=0.0)
    before = _snapshot(session.model)
    flags = {n: p.requires_grad for n, p in session.model.named_parameters()}
    session.turn("learn this")
    after = session.model.state_dict()
    assert "updated" in info.getvalue()
    for name, tensor in before.items():
        if name not in MEMORY_KEYS:
            assert _same_bytes(tensor, after[name]), name
    assert not torch.equal(before["memory.values"], after["memory.values"])
    changed = (before["memory.values"] != after["memory.values"]).any(-1)
    assert torch.equal(changed, after["memory.slot_count"] > 0)
    assert (after["memory.slot_time"][changed] > 0).all()
    assert session.model.memory.source_names[-1] == session.source
    assert {n: p.requires_grad for n, p in session.model.named_parameters()} == flags


def test_learning_is_one_sgd_step_down_the_gradient_and_lowers_the_surprise(model_dir):
    """The rule, checked on the numbers: the update is V <- V - lr * dloss/dV (gradient computed here
    by autograd on the same exchange), and the surprise of the same exchange falls by lr * <g_loss, g_ce>
    to first order. A step up the gradient, a wrong rate or a stale gradient fails."""
    session, _, _ = _session(model_dir, learn=True, threshold=0.0)
    session.model.double()  # the first-order prediction needs more digits than float32 gives
    session.learn.lr, session.learn.static_lr = 1.0, True
    model, values = session.model, session.model.memory.values
    exchange = session.tokenizer.encode("ROMEO: But soft, what light through yonder window breaks?")
    tokens = torch.tensor([exchange])
    with torch.enable_grad():
        values.requires_grad_(True)
        out = model(tokens[:, :-1], model.init_state(1), **session.caps())
        loss, _ = lm_loss(out, tokens[:, 1:], model.cfg.z_loss_weight)
        (g_loss,) = torch.autograd.grad(loss, values, retain_graph=True)
        (g_ce,) = torch.autograd.grad(torch.nn.functional.cross_entropy(out.logits[0], tokens[0, 1:]), values)
    before = values.detach().clone()
    first = session.learn_from(exchange)
    assert first["updated"] > 0 and first["lr"] == 1.0
    torch.testing.assert_close(values.detach(), before - g_loss, rtol=0, atol=1e-12)
    second = session.learn_from(exchange)
    fall = first["surprise"] - second["surprise"]
    predicted = float((g_loss * g_ce).sum())
    assert predicted > 0
    assert fall == pytest.approx(predicted, rel=0.05), (fall, predicted)


def test_below_threshold_changes_nothing(model_dir):
    session, _, info = _session(model_dir, learn=True, threshold=1e9, temperature=0.8, penalty=1.2)
    before = _snapshot(session.model)
    sources = list(session.model.memory.source_names)
    for line in ("first turn", "second turn", "third"):
        session.turn(line)
    assert info.getvalue().count("no update") == 3
    after = session.model.state_dict()
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert _same_bytes(tensor, after[name]), name
    assert session.model.memory.source_names == sources and session.updates == 0


def test_cosine_schedule_and_since():
    assert cosine_lr(0, 0.01, 1e-5, 100, False) == pytest.approx(0.01)
    assert cosine_lr(50, 0.01, 1e-5, 100, False) == pytest.approx((0.01 + 1e-5) / 2)
    assert cosine_lr(100, 0.01, 1e-5, 100, False) == pytest.approx(0.01)  # restarts
    assert cosine_lr(99, 0.01, 1e-5, 100, True) == 0.01
    assert parse_since("1700000000") == 1700000000.0
    assert parse_since("2024-01-01T00:00:00+00:00") == 1704067200.0
    with pytest.raises(HierarchosError):
        parse_since("soon")


def test_delta_round_trip_and_errors(model_dir, tmp_path):
    weights = (model_dir / "model.safetensors").read_bytes()
    delta = tmp_path / "mem.safetensors"
    first, _, _ = _session(model_dir, learn=True, threshold=0.0, delta_path=delta)
    first.turn("remember the tempest")
    first.turn("and macbeth")
    first.handle("/save")
    assert delta.is_file() and first.updates == 2
    assert (model_dir / "model.safetensors").read_bytes() == weights  # base weights never rewritten

    second, _, _ = _session(model_dir, delta_path=delta)
    assert not torch.equal(second.model.memory.values, first.model.memory.values)
    second.load_delta(delta)
    for name in ("values", "slot_time", "slot_count", "slot_source"):
        assert torch.equal(getattr(second.model.memory, name), getattr(first.model.memory, name)), name
    assert second.model.memory.source_names == first.model.memory.source_names

    other = _make_dir(tmp_path / "other", seed=99)
    third, _, _ = _session(other)
    with pytest.raises(HierarchosError, match="another model"):
        third.load_delta(delta)

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(delta.read_bytes()[: delta.stat().st_size // 2])
    with pytest.raises(HierarchosError, match="truncated or corrupt"):
        second.load_delta(truncated)
    proc = subprocess.run([sys.executable, str(REPO / "hierarchos_cli.py"), "chat", "--model-path", str(model_dir),
                           "--device", "cpu", "--ltm-lora-path", str(truncated), "--prompt", "hi"],
                          capture_output=True, text=True, env=_env(), cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "truncated or corrupt" in lines[0], proc.stderr


def test_the_chat_command_converses_with_the_loaded_model_frozen_out_of_the_collector(model_dir, monkeypatch, capsys):
    # a full collection walking the model's objects is a stall mid-reply (~80 ms at 125m); the command
    # freezes what it loaded for the conversation and gives the collector back after it
    import gc

    from hierarchos.chat import ChatSession
    from hierarchos.cli import main

    seen = []
    original = ChatSession.turn

    def turn(self, text):
        seen.append(gc.get_freeze_count())
        return original(self, text)

    monkeypatch.setattr(ChatSession, "turn", turn)
    before = gc.get_freeze_count()
    assert main(["chat", "--model-path", str(model_dir), "--device", "cpu", "--max-new-tokens", "3",
                 "--prompt", "hi"]) == 0
    assert len(seen) == 1 and seen[0] > before + 100  # the model's modules and tensors at least
    assert gc.get_freeze_count() == 0
    assert capsys.readouterr().out.strip()
