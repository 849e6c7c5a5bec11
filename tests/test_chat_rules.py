"""Chat's rules pinned against expectations written out here: the LTM learning-rate schedule and
learning defaults, reply timing statistics, reasoning caps per mode, what a streamed reply holds back
(a tail that may start a stop string, and the newlines before it), turn separators and scripted
tokens, online learning's bookkeeping (slot metadata, the source, the copy into a generating model,
the threshold's edge), the memory delta file's metadata and every refusal, the slash commands'
bounds and one-line messages, /status per memory dtype and /memory's listing. A random tiny
byte-level model, CPU, well under a second each."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import hierarchos.chat as chat_mod
import hierarchos.generate as generate_mod
from hierarchos.chat import ChatSession, LearnConfig, ReplyStats, cosine_lr, parse_since, values_checksum
from hierarchos.config import tiny_config
from hierarchos.data.tokenizers import load_tokenizer
from hierarchos.errors import HierarchosError
from hierarchos.generate import SamplingConfig
from hierarchos.io import load_model_dir, save_model_dir
from hierarchos.model import HierarchosLM


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat_rules") / "model"
    torch.manual_seed(4321)
    save_model_dir(path, HierarchosLM(tiny_config(vocab_size=260)), load_tokenizer("byte"))
    return path


def session_of(path, *, template="plain", max_new=6, learn=False, threshold=2.0, **kw):
    model, _ = load_model_dir(path)
    kw.setdefault("model_dir", path)
    out, info = io.StringIO(), io.StringIO()
    session = ChatSession(model, load_tokenizer(str(path)), template=template,
                          sampling=SamplingConfig(temperature=0.0, max_new_tokens=max_new, seed=0),
                          learn=LearnConfig(enabled=learn, surprise_threshold=threshold), out=out, info=info,
                          **kw)
    return session, out, info


def script(monkeypatch, tokens):
    """The sampler returns these token ids in turn (then 'A')."""
    queue = list(tokens)
    monkeypatch.setattr(generate_mod, "sample_next", lambda *a, **k: queue.pop(0) if queue else 65)


# ---- pure rules -----------------------------------------------------------------------------

def test_learning_rate_schedule_and_defaults():
    base, low = 0.01, 1e-5
    for update, phase in ((0, 0.0), (25, 0.25), (60, 0.6), (125, 0.25)):
        assert cosine_lr(update, base, low, 100, False) == pytest.approx(
            low + 0.5 * (base - low) * (1 + math.cos(math.pi * phase)), rel=1e-12)
    assert cosine_lr(37, base, low, 0, False) == base and cosine_lr(37, base, low, -3, False) == base
    assert cosine_lr(37, base, low, 100, True) == base
    c = LearnConfig()
    assert (c.enabled, c.surprise_threshold, c.lr, c.schedule_steps, c.schedule_min_lr, c.static_lr) == (
        True, 2.0, 0.01, 100, 1e-5, False)


def test_since_and_checksum():
    assert parse_since("12.5") == 12.5
    assert parse_since("1970-01-02T00:00:00+00:00") == 86400.0
    with pytest.raises(HierarchosError) as info:
        parse_since("last week")
    assert str(info.value) == "since='last week': expected unix seconds or an ISO time like 2025-01-31T12:00"
    values = torch.arange(12, dtype=torch.float64).view(3, 4).t()  # float64 and not contiguous
    assert values_checksum(values) == hashlib.sha256(
        torch.arange(12, dtype=torch.float32).view(3, 4).t().contiguous().numpy().tobytes()).hexdigest()


def test_reply_stats_means_and_decode_rate():
    stats = ReplyStats()
    assert (stats.tokens, stats.seconds, stats.first_token_seconds, stats.totals) == (0, 0.0, None, {})
    assert stats.mean("x") is None and stats.decode_rate() is None
    stats = ReplyStats(tokens=5, seconds=2.25, first_token_seconds=0.25, totals={"a": [6.0, 4.0], "z": [1.0, 0.0]})
    assert stats.mean("a") == 1.5 and stats.mean("z") is None
    assert stats.decode_rate() == 2.0  # 4 tokens after the first, in 2 s
    assert ReplyStats(tokens=1, seconds=2.0, first_token_seconds=0.5).decode_rate() is None
    assert ReplyStats(tokens=2, seconds=2.0, first_token_seconds=1.0).decode_rate() == 1.0
    assert ReplyStats(tokens=3, seconds=0.5, first_token_seconds=0.5).decode_rate() is None


# ---- session ---------------------------------------------------------------------------------

def test_session_defaults_and_caps(model_dir, tmp_path):
    session, _, _ = session_of(model_dir, session_id="abc")
    assert session.source == "chat:abc" and session.delta_path == model_dir / "ltm_delta.safetensors"
    assert session.stop_strings == [] and session.mode == "normal" and session.turns == 0
    assert session.learner is session.model and session.base_sources == []
    assert session.base_checksum == values_checksum(session.model.memory.values)
    alone, _, _ = session_of(model_dir, model_dir=None)
    assert alone.delta_path is None and len(alone.session_id) == 8
    with pytest.raises(HierarchosError) as info:
        alone.save_delta()
    assert str(info.value) == "no delta path: pass --ltm-lora-path FILE or --model-path DIR"
    given, _, _ = session_of(model_dir, delta_path=str(tmp_path / "d.st"))
    assert given.delta_path == tmp_path / "d.st"
    off, _, _ = session_of(model_dir, learn=True, learn_unavailable="quantized")
    assert off.learn.enabled is False
    alpaca, _, _ = session_of(model_dir, template="alpaca")
    assert alpaca.stop_strings == ["### Instruction:"]
    cfg_thresh = session.model.cfg.h_halt_thresh
    assert session.caps() == {"h_halt_thresh": cfg_thresh}
    session.mode = "deep"
    assert session.caps() == {"h_halt_thresh": max(cfg_thresh, 0.99)}
    forced, _, _ = session_of(model_dir, h_halt_thresh=0.995)
    assert forced.caps() == {"h_halt_thresh": 0.995}
    forced.mode = "deep"
    assert forced.caps() == {"h_halt_thresh": 0.995}  # deep never lowers a threshold
    forced.mode = "extreme"
    assert forced.caps() == {"h_halt_thresh": 1.0}
    forced.mode = "fast"
    assert forced.caps() == {"h_cycles": 1, "max_h_steps": 1, "max_l_steps": 0}


def test_a_session_of_only_the_required_arguments_and_one_on_a_given_device(model_dir):
    """Without a template the session formats plain prompts; a device passed in is where the carried
    state lives (the meta device here, not the model's CPU), and without one it is the model's."""
    model, _ = load_model_dir(model_dir)
    tokenizer = load_tokenizer(str(model_dir))
    session = ChatSession(model, tokenizer, out=io.StringIO(), info=io.StringIO())
    assert session.template == "plain" and session.device == torch.device("cpu")
    assert {t.device.type for _, t in session.state.tensors()} == {"cpu"}
    meta = ChatSession(model, tokenizer, device=torch.device("meta"), out=io.StringIO(), info=io.StringIO())
    assert meta.device == torch.device("meta")
    assert {t.device.type for _, t in meta.state.tensors()} == {"meta"}


def test_an_unseeded_session_seeds_its_generator_from_torch_seed_modulo_2_63(monkeypatch, model_dir):
    """Without a sampling seed the generator takes torch's nondeterministic seed, cut to 63 bits."""
    model, _ = load_model_dir(model_dir)
    tokenizer = load_tokenizer(str(model_dir))
    monkeypatch.setattr(torch, "seed", lambda: 2**63 + 12345)
    session = ChatSession(model, tokenizer, sampling=SamplingConfig(seed=None), out=io.StringIO(), info=io.StringIO())
    assert session.generator.initial_seed() == 12345
    seeded = ChatSession(model, tokenizer, sampling=SamplingConfig(seed=7), out=io.StringIO(), info=io.StringIO())
    assert seeded.generator.initial_seed() == 7


def test_hold_back_is_a_possible_stop_string_start_and_the_newlines_before_it(model_dir):
    session, _, _ = session_of(model_dir, template="alpaca")
    cases = {"abc": 0, "abc#": 1, "abc###": 3, "abc\n\n###": 5, "ab\n": 1, "x### Instruction": 15,
             "#x": 0, "": 0, "### Instruction:": 16, "a\n#": 2}
    for text, held in cases.items():
        assert session._hold_back(text) == held, text
    plain, _, _ = session_of(model_dir)
    assert plain._hold_back("abc\n#") == 0  # no stop strings: nothing held


def test_turns_are_separated_by_eos_and_the_reply_streams(monkeypatch, model_dir):
    session, out, _ = session_of(model_dir, max_new=3)
    script(monkeypatch, [104, 105, 33])  # "hi!"
    text, exchange = session.reply("yo")
    assert (text, exchange) == ("hi!", [121, 111, 104, 105, 33]) and session.turns == 1
    script(monkeypatch, [65, session.tokenizer.eos_id])
    chunks = []
    text, exchange = session.reply("ok", on_text=chunks.append)
    assert exchange == [session.tokenizer.eos_id, 111, 107, 65, session.tokenizer.eos_id]  # EOS kept
    assert text == "A" and "".join(chunks) == "A" and session.turns == 2
    assert session.last.tokens == 1  # the EOS ends the reply: not a reply token
    session.tokenizer.eos_id = None
    script(monkeypatch, [66])
    assert session.reply("z")[1][:1] == [122]  # no EOS id: no separator
    assert session.reply("") == ("", [])
    # a turn without streaming writes the reply once, then a newline
    quiet, out, info = session_of(model_dir, max_new=2, stream=False)
    script(monkeypatch, [67, 68])
    assert quiet.turn("q") == "CD" and out.getvalue() == "CD\n" and "[stopped]" not in info.getvalue()
    # a streamed turn writes each piece as it comes and flushes it, then the newline
    loud, out, _ = session_of(model_dir, max_new=2)
    events = []
    out.write = lambda text: events.append(("write", text))
    out.flush = lambda: events.append(("flush",))
    script(monkeypatch, [67, 68])
    assert loud.turn("q") == "CD"
    assert events == [("write", "C"), ("flush",), ("write", "D"), ("flush",), ("write", "\n"), ("flush",)]


def test_a_line_loses_only_its_line_end(model_dir):
    session, _, _ = session_of(model_dir)
    seen = []
    session.turn = seen.append
    for line in ("say X \r\n", "\r\nX\n", "tabs\t\n"):
        session.handle(line)
    assert seen == ["say X ", "\r\nX", "tabs\t"]


def test_the_prompt_is_the_template_applied_to_the_user_text(monkeypatch, model_dir):
    session, _, _ = session_of(model_dir, template="alpaca", max_new=1)
    script(monkeypatch, [65])
    _, exchange = session.reply("hi")
    assert exchange == list(b"### Instruction:\nhi\n\n### Response:\n") + [65]


class ChunkTokenizer:
    """Bytes in, and each token id decodes to a whole chunk of text (a BPE token can hold a stop
    string, or two)."""

    eos_id = None

    def __init__(self, chunks):
        self.chunks = chunks

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode_stream(self):
        chunks = self.chunks

        class Stream:
            def push(self, token):
                return chunks[token]

            def flush(self):
                return "~"  # a tail the stream held back (read only when no stop string cut the reply)

        return Stream()


def test_the_reply_ends_at_the_first_stop_string_and_sums_the_steps_totals(monkeypatch, model_dir):
    model, _ = load_model_dir(model_dir)
    tokenizer = ChunkTokenizer({65: "one", 66: " two ### Instruction: three ### Instruction: four",
                                67: "### Instruction: again"})
    session = ChatSession(model, tokenizer, template="alpaca", out=io.StringIO(), info=io.StringIO(),
                          sampling=SamplingConfig(temperature=0.0, max_new_tokens=4, seed=0))
    seen, real = [], model.step

    def step(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append({name: (float(total), float(count)) for name, (total, count) in out.totals.items()})
        return out

    monkeypatch.setattr(model, "step", step)
    script(monkeypatch, [65, 66, 65])
    assert session.reply("q")[0] == "one two "
    script(monkeypatch, [67, 65])
    assert session.reply("q")[0] == "" and session.last.tokens == 1  # a stop string at the very start
    script(monkeypatch, [65, 66, 65])
    seen.clear()
    session.reply("q")
    assert len(seen) == 2 and "manager_steps" in seen[0] | seen[1]
    names = set(seen[0]) | set(seen[1])  # a step without a plan point reports no manager terms
    assert set(session.last.totals) == names
    for name in names:
        total, count = session.last.totals[name]
        assert total == pytest.approx(sum(s[name][0] for s in seen if name in s), rel=1e-6), name
        assert count == sum(s[name][1] for s in seen if name in s), name


def test_stop_string_split_across_tokens_and_trailing_newlines(monkeypatch, model_dir):
    session, _, _ = session_of(model_dir, template="alpaca", max_new=13)
    script(monkeypatch, list(b"one\n\n### Inst"))  # runs out of tokens inside a would-be stop string
    chunks = []
    text, _ = session.reply("q", on_text=chunks.append)
    assert text == "one\n\n### Inst" and "".join(chunks) == text  # flushed at the end: not a stop string
    assert "" not in chunks  # a token that only grew the held-back tail shows nothing
    session, _, _ = session_of(model_dir, template="alpaca", max_new=3)
    script(monkeypatch, list(b"ok\n"))
    chunks = []
    assert session.reply("q", on_text=chunks.append)[0] == "ok" and "".join(chunks) == "ok"
    for raw, kept in ((b"o \n", "o "), (b"oX\n", "oX")):  # only newlines are trimmed
        script(monkeypatch, list(raw))
        assert session.reply("q")[0] == kept


# ---- online learning -------------------------------------------------------------------------

def test_learning_bookkeeping_and_the_copy_into_a_generating_model(monkeypatch, model_dir):
    model, _ = load_model_dir(model_dir)
    learner = copy.deepcopy(model)
    out, info = io.StringIO(), io.StringIO()
    session = ChatSession(model, load_tokenizer(str(model_dir)), learner=learner, session_id="s1",
                          sampling=SamplingConfig(temperature=0.0, max_new_tokens=4, seed=0),
                          learn=LearnConfig(surprise_threshold=0.0, lr=0.5, static_lr=True), out=out, info=info)
    assert session.learner is learner and not learner.training
    monkeypatch.setattr(chat_mod.time, "time", lambda: 1234.5)
    exchange = session.tokenizer.encode("teach me something new")
    result = session.learn_from(exchange)
    changed = learner.memory.slot_count > 0
    assert result["updated"] == int(changed.sum()) > 0 and result["lr"] == 0.5 and session.updates == 1
    assert learner.memory.source_names == ["chat:s1"] and session.written_slots == set(changed.nonzero().flatten().tolist())
    assert (learner.memory.slot_time[changed] == 1234.5).all() and (learner.memory.slot_time[~changed] == 0).all()
    assert (learner.memory.slot_source[changed] == 0).all()
    assert (f"[ltm] surprise {result['surprise']:.3f} > 0: updated {result['updated']} slots (lr 5.00e-01, update 1)"
            in info.getvalue())
    for name in ("values", "slot_time", "slot_count", "slot_source"):  # the generating model follows
        assert torch.equal(getattr(model.memory, name), getattr(learner.memory, name)), name
    assert model.memory.source_names == learner.memory.source_names
    again = session.learn_from(exchange)  # the same source again: listed once, counts grow
    assert learner.memory.source_names == ["chat:s1"] and session.updates == 2
    assert again["lr"] == 0.5  # static: no schedule step
    assert int(learner.memory.slot_count.max()) == 2


def test_surprise_is_measured_under_the_sessions_reasoning_caps(model_dir):
    """The surprise is the mean next-token cross entropy of the exchange on a fresh state, computed
    with the caps of the session's mode (what its replies run with)."""
    session, _, _ = session_of(model_dir, learn=True, threshold=1e9)  # measured, never stepped
    exchange = session.tokenizer.encode("caps matter here")
    tokens = torch.tensor([exchange])
    seen = {}
    for mode in ("fast", "normal"):
        session.mode = mode
        with torch.no_grad():
            out = session.model(tokens[:, :-1], session.model.init_state(1), **session.caps())
        expected = float(torch.nn.functional.cross_entropy(out.logits[0], tokens[0, 1:]))
        seen[mode] = session.learn_from(exchange)["surprise"]
        assert seen[mode] == pytest.approx(expected, rel=1e-6, abs=0), mode
    assert abs(seen["fast"] - seen["normal"]) > 1e-4, seen  # the caps change the number here


def test_learning_marks_exactly_the_slots_whose_gradient_is_nonzero(tmp_path):
    """12 slots of 8 values (not square, so rows and columns cannot be confused): the rows the step
    changes, and only those, get the new time, count and source."""
    torch.manual_seed(11)
    save_model_dir(tmp_path / "m", HierarchosLM(tiny_config(vocab_size=260, ltm_slots=12)), load_tokenizer("byte"))
    session, _, _ = session_of(tmp_path / "m", learn=True, threshold=0.0)
    memory = session.model.memory
    exchange = session.tokenizer.encode("ab")
    before = memory.values.detach().clone()
    session.learn_from(exchange)
    moved = (memory.values.detach() != before).any(dim=1)
    assert 0 < int(moved.sum()) < 12, moved
    assert torch.equal(memory.slot_count > 0, moved) and torch.equal(memory.slot_time > 0, moved)


def test_surprise_equal_to_the_threshold_changes_nothing(model_dir):
    session, _, info = session_of(model_dir, learn=True, threshold=0.0)
    exchange = session.tokenizer.encode("exactly at the edge")
    first = session.learn_from(exchange)
    values = session.model.memory.values.detach().clone()
    edge, _, info = session_of(model_dir, learn=True)
    edge.learn.surprise_threshold = first["surprise"]
    result = edge.learn_from(exchange)
    assert result == {"surprise": first["surprise"], "updated": 0, "lr": 0.0}
    assert f"[ltm] surprise {first['surprise']:.3f} <= {first['surprise']:g}: no update" in info.getvalue()
    assert edge.updates == 0 and not torch.equal(values, edge.model.memory.values)  # untouched base values
    assert torch.equal(edge.model.memory.values, edge.base_values)


def test_a_turn_learns_only_when_enabled_and_the_exchange_has_two_tokens(monkeypatch, model_dir):
    session, _, _ = session_of(model_dir, learn=True, threshold=-1.0, max_new=1)
    calls = []
    monkeypatch.setattr(session, "learn_from", calls.append)
    script(monkeypatch, [65])
    session.turn("a")
    assert calls == [[97, 65]]
    session.learn.enabled = False
    session.turn("b")
    assert len(calls) == 1
    session.learn.enabled, session.sampling.max_new_tokens = True, 0
    session.reset_state()  # a first turn again: no EOS separator before the prompt
    session.turn("c")  # the exchange is the prompt's one token: nothing to predict, nothing learned
    assert len(calls) == 1


def test_ctrl_c_during_a_reply_stops_it_and_restores_the_handler(monkeypatch, model_dir):
    """Ctrl+C is the handler the turn installs (called here as the OS would, between two tokens):
    the reply ends there, '[stopped]' is logged, and the previous handler is back after the turn."""
    import signal

    session, out, info = session_of(model_dir, max_new=5)
    before = signal.getsignal(signal.SIGINT)
    handlers, queue = [], list(b"ABCDEFG")

    def sample(*args, **kwargs):
        handlers.append(signal.getsignal(signal.SIGINT))
        if len(handlers) == 2 and handlers[-1] is not before and callable(handlers[-1]):
            handlers[-1](signal.SIGINT, None)  # pressed while the second token is sampled
        return queue.pop(0)

    monkeypatch.setattr(generate_mod, "sample_next", sample)
    assert session.turn("hi") == "AB" and session.interrupted is True
    assert handlers[0] is not before and handlers[0] is handlers[1]
    assert signal.getsignal(signal.SIGINT) is before
    assert info.getvalue() == "[stopped]\n" and out.getvalue() == "AB\n"
    assert session.turn("again") == "CDEFG" and info.getvalue() == "[stopped]\n"  # the next reply is whole


def test_a_turn_off_the_main_thread_leaves_sigint_alone(monkeypatch, model_dir):
    """Only the main thread may set signal handlers: elsewhere (a server thread) the turn runs
    without one."""
    import signal
    import threading

    session, out, _ = session_of(model_dir, max_new=2)
    script(monkeypatch, [65, 66])
    seen, errors = [], []

    def run():
        try:
            seen.append(session.turn("hi"))
        except Exception as exc:  # noqa: BLE001 (re-raised below, in the test's thread)
            errors.append(exc)

    before = signal.getsignal(signal.SIGINT)
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert errors == [] and seen == ["AB"] and signal.getsignal(signal.SIGINT) is before


# ---- the delta file ----------------------------------------------------------------------------

def test_delta_file_metadata_and_refusals(model_dir, tmp_path):
    session, _, _ = session_of(model_dir, learn=True, threshold=0.0, session_id="d1")
    session.learn_from(session.tokenizer.encode("something to keep"))
    path = session.save_delta(tmp_path / "delta.safetensors")
    assert path == tmp_path / "delta.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    assert meta == {"format": "hierarchos-ltm-delta", "version": "1", "base_checksum": session.base_checksum,
                    "source_names": json.dumps(["chat:d1"])}
    tensors = load_file(str(path))
    memory = session.model.memory
    assert torch.equal(tensors["values_delta"], memory.values.detach() - session.base_values)
    for name in ("slot_time", "slot_count", "slot_source"):
        assert torch.equal(tensors[name], getattr(memory, name)), name

    def refused(fresh, file) -> str:
        with pytest.raises(HierarchosError) as info:
            fresh.load_delta(file)
        return str(info.value)

    fresh, _, _ = session_of(model_dir)
    foreign = tmp_path / "foreign.safetensors"
    save_file(tensors, str(foreign), metadata={**meta, "format": "other"})
    assert refused(fresh, foreign) == f"{foreign}: not a hierarchos memory delta file; pass the file /save wrote"
    no_meta = tmp_path / "nometa.safetensors"
    save_file(tensors, str(no_meta))
    assert "not a hierarchos memory delta file" in refused(fresh, no_meta)
    for name, bad in (("slot_count", tensors["slot_count"].float()), ("values_delta", tensors["values_delta"][:1]),
                      ("slot_time", None)):
        broken = {k: v for k, v in tensors.items() if k != name}
        if bad is not None:
            broken[name] = bad
        file = tmp_path / f"bad_{name}.safetensors"
        save_file(broken, str(file), metadata=meta)
        assert refused(fresh, file) == (f"{file}: memory delta tensor '{name}' is missing or has the wrong shape/dtype; "
                                        "the file does not fit this model")
    fresh.base_sources = ["docs"]
    assert refused(fresh, path) == (f"{path}: memory delta source names do not extend the model's; the file does "
                                    "not fit this model")
    file = tmp_path / "names.safetensors"
    save_file(tensors, str(file), metadata={**meta, "source_names": json.dumps({"a": 1})})
    fresh.base_sources = []
    assert "source names do not extend" in refused(fresh, file)
    file = tmp_path / "badjson.safetensors"
    save_file(tensors, str(file), metadata={**meta, "source_names": "[oops"})
    text = refused(fresh, file)
    assert text.startswith(f"{file}: memory delta is truncated or corrupt (") and text.endswith(
        "); delete it or restore a good copy")
    fresh.load_delta(path)  # and the good one applies: base + delta, the metadata, the names
    for name in ("values", "slot_time", "slot_count", "slot_source"):
        assert torch.equal(getattr(fresh.model.memory, name), getattr(memory, name)), name
    assert fresh.model.memory.source_names == ["chat:d1"]


# ---- commands ----------------------------------------------------------------------------------

def test_command_bounds_and_messages(model_dir):
    session, out, info = session_of(model_dir)
    said = []

    def run(line):
        info.seek(0)
        info.truncate()
        assert session.handle(line) is True
        said.append(info.getvalue())
        return info.getvalue().strip()

    assert run("/temp 0") == "temperature = 0.0" and run("/TEMP 0.7") == "temperature = 0.7"
    assert run("/temp inf") == "usage: /temp X (X >= 0; 0 = greedy)"
    assert run("/topk 0") == "top_k = 0" and run("/topk -1") == "usage: /topk N (N >= 0; 0 = off)"
    assert run("/topk 2.5") == "usage: /topk N (N >= 0; 0 = off)"
    assert run("/topp 1") == "top_p = 1.0" and run("/topp 0") == "usage: /topp X (0 < X <= 1)"
    assert run("/topp 1.5") == "usage: /topp X (0 < X <= 1)" and run("/penalty 0.5") == "repetition_penalty = 0.5"
    assert run("/penalty 0") == "usage: /penalty X (X > 0; 1 = off)" and run("/penalty inf").startswith("usage")
    assert run("/penalty 1.5") == "repetition_penalty = 1.5"
    assert (session.sampling.temperature, session.sampling.top_k, session.sampling.top_p,
            session.sampling.repetition_penalty) == (0.7, 0, 1.0, 1.5)
    assert run("/mode warp") == "usage: /mode fast|normal|deep|extreme (now normal)"
    assert run("/mode deep") == f"mode deep: caps {session.caps()}"
    assert run("/learn maybe") == "usage: /learn on|off (now off)"
    assert run("/learn on") == "learning on" and session.learn.enabled
    assert run("/learn x") == "usage: /learn on|off (now on)"
    assert run("/learn off") == "learning off" and not session.learn.enabled
    assert run("/nope arg") == "unknown command /nope; type /help for the list"
    assert run("/reset") == "conversation state reset (learned memory kept)"
    assert run("   ") == "" and run("\r\n") == ""
    assert run("/help") == chat_mod.HELP_TEXT
    assert out.getvalue() == ""
    locked, _, info = session_of(model_dir, learn_unavailable="the model is quantized")
    locked.handle("/learn on")
    assert info.getvalue().strip() == "learning is unavailable: the model is quantized" and not locked.learn.enabled
    assert locked.handle("/exit") is False and locked.done and locked.handle("more") is False


def test_save_command_reports_and_runs_the_hook(model_dir, tmp_path):
    session, _, info = session_of(model_dir, delta_path=tmp_path / "m.safetensors",
                                  on_save=lambda s: f"hook saw {s.updates}")
    session.handle("/save")
    assert info.getvalue().splitlines() == [
        f"saved memory delta to {tmp_path / 'm.safetensors'} (0 updates this session)", "hook saw 0"]


@pytest.mark.parametrize("dtype,name", [(torch.float16, "fp16"), (torch.bfloat16, "bf16"),
                                        (torch.float64, "torch.float64")])
def test_status_names_the_memory_dtype(model_dir, dtype, name):
    session, _, info = session_of(model_dir)
    session.model.memory.values.data = session.model.memory.values.data.to(dtype)
    session.handle("/status")
    assert f"format {name} safetensors, device cpu" in info.getvalue()
    named, _, info = session_of(model_dir, format_name="Q4_0 gguf", learn_unavailable="quantized")
    named.handle("/status")
    text = info.getvalue()
    assert "format Q4_0 gguf, device cpu" in text and "; unavailable: quantized" in text
    assert "manager steps/plan point n/a, worker passes/token n/a" in text and "CUDA graph" not in text


def test_status_lines(monkeypatch, model_dir):
    ticks = iter([0.0, 1.0, 3.0])
    session, _, info = session_of(model_dir, max_new=3, clock=lambda: next(ticks))
    script(monkeypatch, [65, 66, 67])
    session.handle("hi")
    session.last.totals = {"manager_steps": [3.0, 2.0], "worker_steps": [1.0, 4.0]}
    session.handle("/status")
    lines = info.getvalue().splitlines()
    model, cfg = session.model, session.model.cfg
    assert lines[-6] == (f"model: {model.num_parameters():,} parameters ({model.num_parameters(with_deepembed=False):,} "
                         "without DeepEmbed), format fp32 safetensors, device cpu")
    assert lines[-5] == (f"mode: normal {session.caps()} (config: {cfg.h_cycles} cycles, {cfg.max_h_steps} pondering "
                         f"steps, {cfg.max_l_steps} worker passes)")
    assert lines[-4].startswith("blocks: ") and lines[-4].endswith(f"carried state {session.state.nbytes() / 1024:.1f} KiB")
    s = session.sampling
    assert lines[-3] == (f"sampling: temperature 0.0, top-k {s.top_k}, top-p {s.top_p}, penalty "
                         f"{s.repetition_penalty}, max 3 tokens")
    assert lines[-2] == ("last reply: 3 tokens, 1.0 tokens/s; time to first token 1000.0 ms, then 1.0 tokens/s; "
                         "manager steps/plan point 1.50, worker passes/token 0.25")
    in_context = int((session.state.memory["writes"][0] > 0).sum())
    assert lines[-1] == (f"memory: 0 of {model.memory.slots} slots used, 0 written this session (0 updates), "
                         f"{in_context} written in context; learning off (surprise > 2)")


def test_status_speed_of_a_reply_under_a_second(monkeypatch, model_dir):
    ticks = iter([0.0, 0.1, 0.5])
    session, _, info = session_of(model_dir, max_new=3, clock=lambda: next(ticks))
    script(monkeypatch, [65, 66, 67])
    session.handle("hi")
    session.handle("/status")
    assert info.getvalue().splitlines()[-2].startswith(
        "last reply: 3 tokens, 6.0 tokens/s; time to first token 100.0 ms, then 5.0 tokens/s;")


def test_memory_command_lists_written_slots(monkeypatch, model_dir):
    session, _, info = session_of(model_dir, learn=True, threshold=0.0, session_id="m1")
    session.handle("/memory")
    assert info.getvalue().strip() == "no memory slots match"
    memory = session.model.memory
    with torch.no_grad():
        memory.slot_count[[1, 3]] = torch.tensor([2, 1], dtype=memory.slot_count.dtype)
        memory.slot_time[1], memory.slot_time[3] = 86400.0, 0.0
        memory.slot_source[[1, 3]] = torch.tensor([0, 5], dtype=memory.slot_source.dtype)
    memory.source_names = ["docs.txt", "notes"]
    info.seek(0)
    info.truncate()
    session.handle("/memory")
    assert info.getvalue().splitlines() == [
        f"{'slot':>6}  {'weight':>6}  {'written (UTC)':<20} {'count':>5}  source",
        f"{1:>6}  {'-':>6}  {'1970-01-02 00:00:00':<20} {2:>5}  docs.txt",
        f"{3:>6}  {'-':>6}  {'never':<20} {1:>5}  -"]
    info.seek(0)
    info.truncate()
    session.handle("/memory source=docs.txt")
    assert [line.split()[0] for line in info.getvalue().splitlines()[1:]] == ["1"]
    info.seek(0)
    info.truncate()
    session.handle("/memory since=1970-01-03T00:00:00+00:00")
    assert info.getvalue().strip() == "no memory slots match"
    info.seek(0)
    info.truncate()
    session.handle("/memory source=other")
    assert info.getvalue().strip() == "no memory source other; known sources: docs.txt, notes"
    memory.source_names = []
    info.seek(0)
    info.truncate()
    session.handle("/memory source=a source=b")
    assert info.getvalue().strip() == "no memory source a, b; known sources: none yet"


def test_interactive_loop_writes_a_newline_for_ctrl_c_and_ctrl_d(model_dir):
    session, out, info = session_of(model_dir)
    inputs = iter([KeyboardInterrupt, "/mode fast", EOFError, "never read"])

    def read(prompt):
        item = next(inputs)
        if isinstance(item, type):
            raise item
        return item

    session.run_interactive(read)
    assert out.getvalue() == "\n\n" and session.mode == "fast" and next(inputs) == "never read"
    lines = iter(["/quit", "/mode deep"])
    session.run_lines(lines)
    assert session.done and session.mode == "fast" and next(lines) == "/mode deep"  # nothing after /quit


def test_delta_read_errors_give_the_reason_on_one_line(model_dir, tmp_path, monkeypatch):
    import safetensors

    session, _, _ = session_of(model_dir)
    file = tmp_path / "d.safetensors"
    save_file({"x": torch.zeros(1)}, str(file), metadata={"format": "hierarchos-ltm-delta", "source_names": "[oops"})
    try:
        json.loads("[oops")
    except json.JSONDecodeError as exc:
        reason = str(exc)
    message = "{}: memory delta is truncated or corrupt ({}); delete it or restore a good copy"
    with pytest.raises(HierarchosError) as info:
        session.load_delta(file)
    assert str(info.value) == message.format(file, reason)
    for raised, reason in ((RuntimeError("bad\n header  " + "x " * 200), ("bad header " + "x " * 200)[:200]),
                           (RuntimeError(""), "RuntimeError")):
        def broken(*args, raised=raised, **kwargs):
            raise raised

        monkeypatch.setattr(safetensors, "safe_open", broken)
        with pytest.raises(HierarchosError) as info:
            session.load_delta(file)
        assert str(info.value) == message.format(file, reason)


def test_seeded_sampling_repeats_and_learning_needs_a_usable_gradient(monkeypatch, model_dir):
    replies = []
    for _ in range(2):
        session, _, _ = session_of(model_dir, max_new=8)
        session.sampling.temperature = 1.5
        replies.append(session.reply("seeded")[0])
    assert replies[0] == replies[1]  # the session's generator starts from the sampling seed

    session, _, info = session_of(model_dir, learn=True, threshold=1.0)
    values = session.model.memory.values.detach().clone()
    exchange = session.tokenizer.encode("no gradient reaches the memory")
    for scale, surprise in ((0.0, 5.0), (float("nan"), 5.0)):  # a zero gradient, then a NaN one
        def flat_loss(out, targets, z, *a, scale=scale, surprise=surprise):
            return out.logits.sum() * scale, {"ce": torch.tensor(surprise)}

        monkeypatch.setattr(chat_mod, "lm_loss", flat_loss)
        assert session.learn_from(exchange) == {"surprise": 5.0, "updated": 0, "lr": 0.0}
    assert info.getvalue().count("[ltm] surprise 5.000: no usable gradient, no update") == 2
    monkeypatch.setattr(chat_mod, "lm_loss", lambda out, *a: (out.logits.sum(), {"ce": torch.tensor(float("nan"))}))
    assert session.learn_from(exchange)["updated"] == 0
    assert "[ltm] surprise nan <= 1: no update" in info.getvalue()
    assert torch.equal(session.model.memory.values, values) and session.updates == 0


def test_memory_query_weights_and_long_listings(tmp_path, model_dir):
    session, _, info = session_of(model_dir)
    memory = session.model.memory
    with torch.no_grad():
        memory.slot_count.fill_(1)
    ids = session.tokenizer.encode("what do you know")
    with torch.no_grad():
        attn, idx = memory.query_slots(session.model.embed(torch.tensor([ids])))
    weights = torch.zeros(memory.slots)
    for slot, a in zip(idx.flatten().tolist(), attn.flatten().tolist()):
        weights[slot] += a / len(ids)  # each slot's attention, summed over the query's tokens, per token
    order = [s for s in sorted(range(memory.slots), key=lambda s: -float(weights[s])) if weights[s] > 0]
    session.handle("/memory what do you know")
    rows = info.getvalue().splitlines()[1:]
    assert [int(r.split()[0]) for r in rows] == order[:20]
    for row in rows:
        slot, weight = row.split()[:2]
        assert float(weight) == pytest.approx(float(weights[int(slot)]), abs=5e-4)
    monkeypatch_encode = session.tokenizer.encode
    session.tokenizer.encode = lambda text: []
    info.seek(0)
    info.truncate()
    session.handle("/memory zzz")
    assert info.getvalue().strip() == "the query text encodes to no tokens"
    session.tokenizer.encode = monkeypatch_encode

    torch.manual_seed(1)  # a memory of 64 slots: the listing stops at 50
    big_dir = tmp_path / "big"
    save_model_dir(big_dir, HierarchosLM(tiny_config(vocab_size=260, ltm_slots=64)), load_tokenizer("byte"))
    big, _, info = session_of(big_dir)
    with torch.no_grad():
        big.model.memory.slot_count.fill_(3)
    big.handle("/memory")
    lines = info.getvalue().splitlines()
    assert len(lines) == 1 + 50 + 1 and lines[-1] == "... 14 more"
    assert [int(line.split()[0]) for line in lines[1:-1]] == list(range(50))


def test_delta_of_another_model_is_refused_by_checksum(model_dir, tmp_path):
    session, _, _ = session_of(model_dir)
    path = session.save_delta(tmp_path / "d.safetensors")
    other, _, _ = session_of(model_dir)
    with torch.no_grad():
        other.model.memory.values.add_(1.0)  # another base: another checksum
    other = ChatSession(other.model, other.tokenizer, out=io.StringIO(), info=io.StringIO())
    with pytest.raises(HierarchosError) as info:
        other.load_delta(path)
    assert str(info.value) == (f"{path}: memory delta was made for another model (memory checksum differs); use it "
                               "with the model it was saved from")


def test_memory_filters_apply_to_listings_and_queries(tmp_path, model_dir):
    session, _, info = session_of(model_dir)
    memory = session.model.memory

    def said(line):
        info.seek(0)
        info.truncate()
        session.handle(line)
        return info.getvalue().splitlines()

    with torch.no_grad():
        memory.slot_count[[1, 3]] = torch.tensor([2, 1], dtype=memory.slot_count.dtype)
        memory.slot_time[[1, 3]] = torch.tensor([86400.0, 10.0], dtype=memory.slot_time.dtype)
        memory.slot_source[:] = 0
        memory.slot_source[[1, 3]] = torch.tensor([0, 1], dtype=memory.slot_source.dtype)
    memory.source_names = ["docs.txt", "notes"]
    assert [int(line.split()[0]) for line in said("/memory since=0")[1:]] == [1, 3]  # written slots only
    assert [int(line.split()[0]) for line in said("/memory since=20")[1:]] == [1]

    def weights_of(words, sources=None, since=None):
        ids = session.tokenizer.encode(" ".join(words))
        with torch.no_grad():
            attn, idx = memory.query_slots(session.model.embed(torch.tensor([ids])), sources, since)
        weights = torch.zeros(memory.slots)
        for slot, a in zip(idx.flatten().tolist(), attn.flatten().tolist()):
            weights[slot] += a / len(ids)
        return {s: float(w) for s, w in enumerate(weights) if w > 0}

    for line, sources, since in (("/memory source=notes ab", ["notes"], None), ("/memory since=20 ab", None, 20.0),
                                 ("/memory a", None, None)):
        expected = weights_of(["ab" if "ab" in line else "a"], sources, since)
        rows = said(line)[1:]
        assert {int(r.split()[0]) for r in rows} == set(expected), line  # only slots that were read
        for row in rows:
            assert float(row.split()[1]) == pytest.approx(expected[int(row.split()[0])], abs=5e-4), line
    assert len(said("/memory a")) - 1 == len(weights_of(["a"])) < memory.slots  # zero weights not listed

    torch.manual_seed(1)  # 64 slots and a long query: the 20 heaviest slots only
    big_dir = tmp_path / "big"
    save_model_dir(big_dir, HierarchosLM(tiny_config(vocab_size=260, ltm_slots=64)), load_tokenizer("byte"))
    big, _, info = session_of(big_dir)
    text = "the quick brown fox jumps over the lazy dog 0123456789"
    ids = big.tokenizer.encode(text)
    with torch.no_grad():
        _, idx = big.model.memory.query_slots(big.model.embed(torch.tensor([ids])))
    assert len(set(idx.flatten().tolist())) > 20
    big.handle(f"/memory {text}")
    assert len(info.getvalue().splitlines()) == 1 + 20


def test_memory_listing_times_are_utc_and_unknown_sources_a_dash(monkeypatch, model_dir):
    import time

    monkeypatch.setenv("TZ", "America/New_York")  # the listing says UTC whatever the local zone
    time.tzset()
    try:
        session, _, info = session_of(model_dir)
        memory = session.model.memory
        with torch.no_grad():
            memory.slot_count[[2, 3]] = 1
            memory.slot_time[[2, 3]] = torch.tensor([86400.0, 0.5], dtype=memory.slot_time.dtype)
            memory.slot_source[[2, 3]] = torch.tensor([1, 0], dtype=memory.slot_source.dtype)
        memory.source_names = ["docs.txt"]  # slot 2 names source 1: not a known one
        session.handle("/memory")
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert info.getvalue().splitlines()[1:] == [
        f"{2:>6}  {'-':>6}  {'1970-01-02 00:00:00':<20} {1:>5}  -",
        f"{3:>6}  {'-':>6}  {'1970-01-01 00:00:00':<20} {1:>5}  docs.txt"]


def test_memory_listing_cut_at_exactly_fifty(tmp_path):
    torch.manual_seed(2)
    save_model_dir(tmp_path / "big", HierarchosLM(tiny_config(vocab_size=260, ltm_slots=64)), load_tokenizer("byte"))
    for written, tail in ((50, None), (51, "... 1 more")):
        session, _, info = session_of(tmp_path / "big")
        with torch.no_grad():
            session.model.memory.slot_count[:written] = 1
        session.handle("/memory")
        lines = info.getvalue().splitlines()
        assert len(lines) == 1 + 50 + (tail is not None) and (tail is None or lines[-1] == tail), written


def test_cuda_graph_warm_up_generates_one_token_with_the_session_sampling(monkeypatch, model_dir):
    from dataclasses import replace

    seen = []
    monkeypatch.setattr(chat_mod, "generate_batch", lambda model, prompts, sampling, **kw: seen.append((prompts, sampling, kw)))
    session, _, _ = session_of(model_dir, cuda_graph=True, step_options={"compile_step": True})
    (prompts, sampling, kw), = seen
    assert prompts == [[session.tokenizer.eos_id]] and sampling == replace(session.sampling, max_new_tokens=1)
    assert kw["seeds"] == [0] and kw["cuda_graph"] is True and kw["steppers"] is session.steppers
    assert kw["compile_step"] is True  # the graph captured at load is the step the replies will use
    assert session.warmup_seconds >= 0
    seen.clear()
    model, _ = load_model_dir(model_dir)
    tokenizer = load_tokenizer(str(model_dir))
    tokenizer.eos_id = None  # no EOS id: the warm-up starts from token 0
    ChatSession(model, tokenizer, cuda_graph=True, out=io.StringIO(), info=io.StringIO())
    assert seen[0][0] == [[0]]


def test_status_counts_slots_and_sizes_and_times_the_warm_up(monkeypatch, tmp_path):
    """/status on a DeepEmbed model with two used memory slots, a reply that took no measurable time,
    a carried state of exactly 100 KiB and a CUDA-graph warm-up timed on the session's clock."""
    torch.manual_seed(5)
    model = HierarchosLM(tiny_config(vocab_size=260, use_deepembed=True))
    save_model_dir(tmp_path / "de", model, load_tokenizer("byte"))
    monkeypatch.setattr(chat_mod, "generate_batch", lambda *a, **k: None)
    ticks = iter([5.0, 7.5])
    session, _, info = session_of(tmp_path / "de", cuda_graph=True, clock=lambda: next(ticks))
    assert session.warmup_seconds == 2.5
    model = session.model
    assert model.num_parameters(with_deepembed=False) < model.num_parameters()
    with torch.no_grad():
        model.memory.slot_count.zero_()
        model.memory.slot_count[[0, 2]] = torch.tensor([3, 1], dtype=model.memory.slot_count.dtype)
    session.last = ReplyStats(tokens=4, seconds=0.0)
    session.state.nbytes = lambda: 100 * 1024
    session.handle("/status")
    text = info.getvalue()
    assert f"model: {model.num_parameters():,} parameters ({model.num_parameters(with_deepembed=False):,} " \
           "without DeepEmbed)" in text
    assert "carried state 100.0 KiB" in text
    assert "last reply: 4 tokens, n/a;" in text
    assert "(CUDA graph: 0 captured, the first at load in 2500 ms)" in text
    assert f"memory: 2 of {model.memory.slots} slots used" in text


def test_status_with_learning_on_and_a_warm_up_of_no_time(monkeypatch, model_dir):
    monkeypatch.setattr(chat_mod, "generate_batch", lambda *a, **k: None)
    session, _, info = session_of(model_dir, learn=True, threshold=1.5, cuda_graph=True, clock=lambda: 3.0)
    assert session.warmup_seconds == 0.0
    session.handle("/status")
    text = info.getvalue()
    assert "(CUDA graph: 0 captured, the first at load in 0 ms)" in text
    assert text.rstrip("\n").endswith("written in context; learning on (surprise > 1.5)")


def test_cuda_graph_path_stops_at_eos_and_a_greedy_reply_draws_no_seed(monkeypatch, model_dir):
    """The graph path (its capture left out on the CPU, as in test_chat) ends a reply at the EOS id
    like the plain path; a greedy reply, on either path, leaves the session's generator untouched."""
    real = chat_mod.generate_batch
    monkeypatch.setattr(chat_mod, "generate_batch", lambda *a, **k: real(*a, **{**k, "cuda_graph": False}))
    plain, _, _ = session_of(model_dir, max_new=6)
    prompt = list(b"hello")
    _, exchange = plain.reply("hello")
    new = exchange[len(prompt):]
    eos = new[1]  # pretend the model's second greedy token is EOS: the reply ends at its first sampling
    cut = new.index(eos)
    for cuda_graph in (False, True):
        session, _, _ = session_of(model_dir, max_new=6, cuda_graph=cuda_graph)
        session.tokenizer.eos_id = eos
        before = session.generator.get_state()
        text, exchange = session.reply("hello")
        assert exchange == prompt + new[:cut + 1] and session.last.tokens == cut, cuda_graph
        assert text == plain.tokenizer.decode(new[:cut]), cuda_graph
        assert torch.equal(session.generator.get_state(), before), cuda_graph


def test_cuda_graph_reply_stops_when_interrupted_and_uses_the_session_clock_and_step_options(monkeypatch, model_dir):
    """The graph path honours the Ctrl+C flag between tokens, times its first token on the session's
    clock (a frozen one here: exactly 0 s) and steps with the session's step options."""
    real, calls = chat_mod.generate_batch, []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **{**kwargs, "cuda_graph": False})

    monkeypatch.setattr(chat_mod, "generate_batch", spy)
    results = {}
    for cuda_graph in (False, True):
        session, _, _ = session_of(model_dir, max_new=6, cuda_graph=cuda_graph, clock=lambda: 5.0,
                                   step_options={"fused_step": False})
        pieces = []

        def on_text(piece):  # what the SIGINT handler does, after the first visible piece
            pieces.append(piece)
            session.interrupted = True

        results[cuda_graph] = session.reply("hello", on_text=on_text)
        assert len(pieces) == 1 and results[cuda_graph][0] == pieces[0], cuda_graph
    assert results[True] == results[False] and len(results[True][1]) < len(b"hello") + 6
    assert session.last.first_token_seconds == 0.0 and session.last.seconds == 0.0
    assert calls[-1]["fused_step"] is False and calls[-1]["clock"] is session.clock


def test_a_plain_reply_runs_under_the_modes_caps(monkeypatch, model_dir):
    real, calls = chat_mod.generate, []
    monkeypatch.setattr(chat_mod, "generate", lambda *a, **k: calls.append(k) or real(*a, **k))
    session, _, _ = session_of(model_dir, max_new=2)
    session.mode = "fast"
    session.reply("hi")
    assert {k: calls[-1][k] for k in ("h_cycles", "max_h_steps", "max_l_steps")} == session.caps()
