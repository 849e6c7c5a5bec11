"""chat --compile-step / --fused-step: the captured step's options reach generate_batch, at load and
in every reply, and asking for them without the captured step is a one-line error (exit 2).

No GPU here: the session's CUDA-graph path runs with the capture left out (as tests/test_chat.py does),
and the compiled step traces with the "aot_eager" backend; the replies equal the plain path's.
"""

from __future__ import annotations

import pytest
import torch

import hierarchos.chat as chat_mod
import hierarchos.generate as generate_mod

from test_chat import _session, model_dir  # noqa: F401  (the module-scoped fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_step_options_reach_every_generate_batch_call_and_replies_stay_the_same(model_dir, monkeypatch):  # noqa: F811
    real, seen = chat_mod.generate_batch, []

    def spy(*a, **k):
        seen.append({name: k.get(name) for name in ("compile_step", "fused_step", "compile_prefill")})
        return real(*a, **{**k, "cuda_graph": False})

    original = generate_mod.GraphedStepper.__init__

    def traced(self, *a, **k):  # trace the compiled step without generating code (seconds, not minutes)
        original(self, *a, **{**k, "compile_backend": "aot_eager"})

    monkeypatch.setattr(chat_mod, "generate_batch", spy)
    monkeypatch.setattr(generate_mod.GraphedStepper, "__init__", traced)
    plain, _, _ = _session(model_dir, temperature=0.9, max_new=6)
    compiled, _, _ = _session(model_dir, temperature=0.9, max_new=6, cuda_graph=True,
                              step_options={"compile_step": "step", "fused_step": False, "compile_prefill": False})
    assert compiled.reply("hello there") == plain.reply("hello there")
    for (name, a), (_, b) in zip(plain.state.tensors(), compiled.state.tensors()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=name)
    # the warm-up at load and the reply
    assert seen == [{"compile_step": "step", "fused_step": False, "compile_prefill": False}] * 2
    (stepper,) = compiled.steppers.values()
    assert stepper.compile_step == "step" and stepper.compile_seconds is not None


@pytest.mark.parametrize("flags", [["--compile-step", "step"], ["--fused-step"], ["--compile-step", "blocks"],
                                   ["--compile-prefill"]])
def test_the_flags_without_the_captured_step_are_one_line_exit_2(model_dir, capsys, flags):  # noqa: F811
    from hierarchos.cli import main

    assert main(["chat", "--model-path", str(model_dir), "--device", "cpu", *flags, "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "--compile-step / --fused-step / --compile-prefill apply to the captured step" in err[0], err


def test_a_bad_mode_is_refused_by_the_parser(model_dir, capsys):  # noqa: F811
    from hierarchos.cli import main

    assert main(["chat", "--model-path", str(model_dir), "--compile-step", "fast", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--compile-step" in err[0] and "invalid choice: 'fast'" in err[0], err
