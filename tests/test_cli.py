"""CLI plumbing: usage errors exit 2, HierarchosError becomes one stderr line (exit 2), --debug
shows the traceback, Ctrl-C exits 130, global flags work before and after the subcommand."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hierarchos.cli.demo as demo
from hierarchos.cli import main
from hierarchos.errors import HierarchosError

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    """Run the real entry point (or `code`, a script ending in the same call) in a fresh process."""
    command = [sys.executable, "-c", code] if code else [sys.executable, "hierarchos_cli.py"]
    return subprocess.run([*command, *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("args", [["nosuchcmd"], ["demo", "--no-such-flag"], ["demo", "--tokens", "many"],
                                  ["--threads", "0", "demo"], ["demo", "--device", "tpu"]])
def test_usage_errors_exit_2(args):
    result = run_cli(*args)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: hierarchos") and "--help" in lines[0], lines


def test_no_command_prints_help_and_exits_2():
    result = run_cli()
    assert result.returncode == 2
    assert "demo" in result.stderr


def test_help_exits_0():
    result = run_cli("demo", "--help")
    assert result.returncode == 0
    assert "--tokens" in result.stdout


def _boom(args):
    raise HierarchosError("data file 'x.jsonl' not found;\n  check --train-data")


def test_user_error_is_one_line_exit_2(monkeypatch, capsys):
    monkeypatch.setattr(demo, "run", _boom)
    assert main(["demo"]) == 2
    captured = capsys.readouterr()
    assert captured.err == "error: data file 'x.jsonl' not found; check --train-data\n"
    assert captured.out == ""


@pytest.mark.parametrize("argv", [["--debug", "demo"], ["demo", "--debug"]])
def test_debug_reraises(monkeypatch, argv):
    monkeypatch.setattr(demo, "run", _boom)
    with pytest.raises(HierarchosError, match="not found"):
        main(argv)


BOOM_SCRIPT = """
import sys
import hierarchos.cli.demo as demo
from hierarchos.cli import main
from hierarchos.errors import HierarchosError
def boom(args):
    raise HierarchosError("something the user can fix")
demo.run = boom
raise SystemExit(main(sys.argv[1:]))
"""


def test_error_in_a_real_process():
    result = run_cli("demo", code=BOOM_SCRIPT)
    assert result.returncode == 2
    assert result.stderr == "error: something the user can fix\n"

    result = run_cli("--debug", "demo", code=BOOM_SCRIPT)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert "HierarchosError: something the user can fix" in result.stderr


def test_keyboard_interrupt_exits_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run", interrupted)
    assert main(["demo"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_bugs_still_raise(monkeypatch):
    def buggy(args):
        raise ValueError("a bug")

    monkeypatch.setattr(demo, "run", buggy)
    with pytest.raises(ValueError):
        main(["demo"])


@pytest.mark.parametrize("argv", [["--threads", "1", "demo"], ["demo", "--threads", "1"]])
def test_threads_flag_before_or_after_command(monkeypatch, argv):
    seen = {}

    def record(args):
        seen["threads"] = torch.get_num_threads()
        seen["debug"] = args.debug
        return 0

    before = torch.get_num_threads()
    monkeypatch.setattr(demo, "run", record)
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(before)
    assert seen == {"threads": 1, "debug": False}


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_demo_cuda_without_cuda_is_a_user_error(capsys):
    assert main(["demo", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device cuda: no CUDA device") and err.count("\n") == 1


def test_demo_negative_tokens_is_a_user_error(capsys):
    assert main(["demo", "--tokens", "-1"]) == 2
    assert "--tokens" in capsys.readouterr().err


def test_demo_runs_end_to_end(capsys):
    """The README's main command: a real tiny model, parity check and generation."""
    assert main(["demo", "--tokens", "3", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "parallel vs step" in out and "greedy generation: 3 tokens" in out



def test_seed_000_training_command_runs_with_its_own_flags(tmp_path):
    """Seed 000's example (`aios hrm-hf train-actv1 --dataset-file ... --steps 1 --batch-size 2 --h-layers 2
    --l-layers 4 --hidden-size ... --num-heads 8 --expansion 4 --halt-max-steps 1 --log-file ...`), with
    `train` for its trainer and a byte tokenizer for `--model gpt2`: its flags land on the fields they
    name, and the metrics go to the --log-file too."""
    import json

    data = tmp_path / "test_sample.txt"
    data.write_text("\n".join(f"line {i}: to be or not to be, that is the question" for i in range(300)))
    log_file = tmp_path / "artifacts" / "brains" / "actv1" / "metrics.jsonl"
    result = run_cli("train", "--tokenizer-path", "byte", "--dataset-file", str(data), "--steps", "1",
                     "--batch-size", "2", "--h-layers", "2", "--l-layers", "4", "--hidden-size", "32",
                     "--num-heads", "4", "--expansion", "3", "--pos-encodings", "none", "--halt-max-steps", "1",
                     "--l-cycles", "1", "--max_length", "64", "--log-file", str(log_file),
                     "--out-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-2000:]
    cfg = json.loads((tmp_path / "run" / "hierarchos_config.json").read_text())
    cfg = cfg.get("model", cfg)
    assert {k: cfg[k] for k in ("context_dim", "h_hidden", "l_hidden", "h_layers", "l_layers", "head_size",
                                "ffn_mult", "max_h_steps", "max_l_steps")} == dict(
        context_dim=32, h_hidden=32, l_hidden=32, h_layers=2, l_layers=4, head_size=8, ffn_mult=3,
        max_h_steps=1, max_l_steps=1)
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records == metrics and records[-1]["step"] == 1


@pytest.mark.parametrize("flags, says", [
    (["--pos-encodings", "rope"], "no position encodings"),
    (["--window-size", "256"], "no attention window"),
    (["--model", "gpt2"], "--tokenizer-path NAME"),
    (["--num-heads", "5", "--hidden-size", "32"], "must divide h_hidden 32"),
    (["--num-heads", "4", "--head-size", "8"], "give one"),
])
def test_seed_000_flags_that_do_not_apply_say_why(tmp_path, flags, says):
    result = run_cli("train", "--tokenizer-path", "byte", "--steps", "1", *flags, "--out-dir", str(tmp_path / "r"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in result.stderr, lines
    assert not (tmp_path / "r").exists()
