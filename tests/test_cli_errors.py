"""Every flag of every command: a value that cannot work is one `error:` line naming the flag and
what it must be, exit code 2, no traceback, and nothing written; `--debug` shows the traceback."""

from __future__ import annotations

import pytest

from hierarchos.cli import main
from hierarchos.config import tiny_config
from hierarchos.data.tokenizers import load_tokenizer
from hierarchos.errors import HierarchosError
from hierarchos.io import save_model_dir
from hierarchos.model import HierarchosLM

TRAIN = ["train", "--tiny", "--tokenizer-path", "byte", "--max_length", "16", "--batch_size", "2"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(save_model_dir(tmp_path_factory.mktemp("cli") / "m", HierarchosLM(tiny_config(vocab_size=260)),
                              load_tokenizer("byte")))


CASES = [
    (TRAIN + ["--starting-lr", "-1"], "--starting-lr -1.0: must be a finite number > 0"),
    (TRAIN + ["--starting-lr", "nan"], "--starting-lr nan: must be a finite number > 0"),
    (TRAIN + ["--min-lr", "5"], "--min-lr 5.0 is above --starting-lr"),
    (TRAIN + ["--val-fraction", "1.5"], "--val-fraction 1.5: must be in [0, 0.5)"),
    (TRAIN + ["--max_length", "0"], "--max-length 0: must be >= 2 tokens"),
    (TRAIN + ["--warmup-steps", "-3"], "--warmup-steps -3: must be >= 0"),
    (TRAIN + ["--grad-clip", "inf"], "--grad-clip inf: must be a finite number >= 0"),
    (TRAIN + ["--activation-budget", "0"], "--activation-budget 0.0: must be in (0, 1]"),
    (TRAIN + ["--activation-budget", "0.5", "--no-compile"], "--activation-budget 0.5: only compiled blocks recompute"),
    (TRAIN + ["--detach-every-n-steps", "0"], "--detach-every-n-steps 0: must be >= 1 token"),
    (TRAIN + ["--save-every", "-1"], "--save-every -1: must be >= 0"),
    (TRAIN + ["--ponder-loss-weight", "inf"], "--ponder-loss-weight inf: must be a finite number >= 0"),
    (TRAIN + ["--epochs", "0"], "--epochs 0: must be >= 1"),
    (TRAIN + ["--accumulation-steps", "0"], "--accumulation-steps 0: must be >= 1"),
    (TRAIN + ["--grow-every-chars", "0"], "--grow-every-chars 0: must be >= 1 character"),
    (TRAIN + ["--eval-tasks", "shakespeare_ppl", "--eval-batch-size", "0"], "--eval-batch-size 0: must be >= 1"),
    (TRAIN + ["--h_stride", "0"], "config field 'h_stride' = 0: must be a positive integer"),
    (TRAIN + ["--device", "tpu"], "--device 'tpu': expected auto, cpu, cuda or dml"),
    (TRAIN + ["--seed", "x"], "argument --seed: invalid int value: 'x'"),
    (TRAIN + ["--pre_chunked_dataset", "--pre_pt_dataset", "--train", "x"], "mutually exclusive"),
    (["train", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["bogus"], "invalid choice: 'bogus'"),
    (["quantize", "--model-path", "{m}", "--qtype", "Q5"], "argument --qtype: invalid choice: 'Q5'"),
    (["quantize", "--model-path", "{m}/nope"], "model directory not found"),
    (["chat", "--model-path", "{m}", "--temperature", "-1", "--prompt", "a"], "--temperature must be >= 0"),
    (["chat", "--model-path", "{m}", "--top-p", "1.5", "--prompt", "a"], "--top-p must be in (0, 1]"),
    (["chat", "--model-path", "{m}", "--top-k", "-2", "--prompt", "a"], "--top-k must be >= 0"),
    (["chat", "--model-path", "{m}", "--max-new-tokens", "0", "--prompt", "a"], "--max-new-tokens must be >= 1"),
    (["chat", "--model-path", "{m}", "--repetition-penalty", "0", "--prompt", "a"], "--repetition-penalty must be > 0"),
    (["chat", "--model-path", "{m}", "--device", "vulkan", "--prompt", "a"], "--device vulkan runs quantized models only"),
    (["chat", "--model-path", "{m}/nope", "--prompt", "a"], "not a directory"),
    (["finetune", "--model-path", "{m}", "--lora_alpha", "-1"], "--lora_alpha -1.0: must be > 0"),
    (["finetune", "--model-path", "{m}", "--lora-dropout", "1.0"], "--lora-dropout 1.0: must be in [0, 1)"),
    (["merge-lora", "--model-path", "{m}", "--lora-adapter-path", "{m}", "--out-dir", "{m}-x"],
     "not a LoRA adapter directory"),
    (["ckpt-2-inf", "--ckpt-input", "{m}", "--inf-output", "{m}-x"], "no checkpoint here"),
    (["eval", "--model-path", "{m}", "--tasks", "shakespeare_ppl", "--limit", "-1"], "argument --limit"),
    (["demo", "--tokens", "-5"], "--tokens must be >= 0"),
]


@pytest.mark.parametrize("argv,message", CASES, ids=[" ".join(c[0][:1] + c[0][-2:]) for c in CASES])
def test_bad_flag_is_one_line_exit_2(model_dir, tmp_path, capsys, argv, message):
    argv = [a.replace("{m}", model_dir) for a in argv]
    if argv[0] in ("train", "finetune"):
        argv += ["--out-dir", str(tmp_path / "out")]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip() and not line.startswith("hierarchos: the C++")]
    assert lines and lines[-1].startswith("error: ") and message in lines[-1], lines
    assert "Traceback" not in captured.err
    assert not (tmp_path / "out").exists()


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(HierarchosError, match="--starting-lr"):
        main(["--debug", *TRAIN, "--starting-lr", "-1", "--out-dir", str(tmp_path / "out")])
