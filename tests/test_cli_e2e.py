"""End-to-end: drive the real CLI (`python hierarchos_cli.py ...`) on tiny data as a user would.

train -> checkpoint -> SIGKILL -> resume -> ckpt-2-inf; resume equivalence (N+M steps == N steps,
resume, M steps); every bad-input case of the data loader (exact `error:` line, exit code 2);
offline --hf_dataset on a saved dataset folder; Alpaca records; Ctrl+C (SIGINT) saves a
resumable checkpoint and exits 0. Every run is offline, on the CPU, with one torch thread.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hierarchos.data import sources

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex bold jumbos "
         "and thou art more lovely than a summer day").split()
# tiny model, byte tokenizer, 2 streams x 16-token windows: one optimizer step is ~0.1 s on a CPU
TRAIN_FLAGS = ("--tiny", "--tokenizer-path", "byte", "--max_length", "16", "--batch_size", "2",
               "--epochs", "1", "--starting-lr", "3e-3", "--log-every", "1", "--seed", "0", "--device", "cpu")


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_CACHE=str(tmp_path_factory.mktemp("hf_datasets_cache")),
               HIERARCHOS_TOKEN_CACHE=str(tmp_path_factory.mktemp("token_cache")),
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _command(args) -> list[str]:
    return [sys.executable, "hierarchos_cli.py", "--threads", "1", *map(str, args)]


def run_cli(env, *args, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(_command(args), cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def start_cli(env, log_dir: Path, *args) -> tuple[subprocess.Popen, Path, Path]:
    """Start the CLI in the background; stdout/stderr go to files (tqdm would fill a pipe)."""
    out, err = log_dir / "stdout.txt", log_dir / "stderr.txt"
    with open(out, "w") as out_handle, open(err, "w") as err_handle:
        proc = subprocess.Popen(_command(args), cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                stdout=out_handle, stderr=err_handle)
    return proc, out, err


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, \
        f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, result.stderr
    return result


def latest_step(ckpt_root: Path) -> int | None:
    try:
        return int(json.loads((ckpt_root / "latest.json").read_text())["step"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None  # not written yet (the file is replaced atomically, so never partial)


def wait_for_checkpoint(proc: subprocess.Popen, ckpt_root: Path, min_step: int, err: Path,
                        timeout: float = 180) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        step = latest_step(ckpt_root)
        if step is not None and step >= min_step:
            return step
        if proc.poll() is not None:
            pytest.fail(f"training exited ({proc.returncode}) before a checkpoint at step >= {min_step}:\n"
                        f"{err.read_text()[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no checkpoint at step >= {min_step} within {timeout} s")


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def sentences(n: int, words: int = 30, seed: int = 0) -> list[str]:
    import random
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


@pytest.fixture
def text_jsonl(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", [{"text": s} for s in sentences(60)])


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def read_config(model_dir: Path) -> dict:
    return json.loads((model_dir / "hierarchos_config.json").read_text())


def assert_model_dir(model_dir: Path) -> None:
    assert (model_dir / "model.safetensors").is_file()
    assert (model_dir / "hierarchos_config.json").is_file()
    assert (model_dir / "tokenizer.json").is_file() or (model_dir / "hierarchos_tokenizer.json").is_file(), \
        sorted(p.name for p in model_dir.iterdir())


# ---- 1. train -> checkpoint -> SIGKILL -> resume -> ckpt-2-inf -------------------------------------

def test_train_kill_resume_ckpt_2_inf(cli_env, tmp_path, text_jsonl):
    from hierarchos.io import load_model_dir

    out = tmp_path / "run"
    ckpt_root = out / "checkpoints"
    # one epoch is ~290 windows: far longer than we let it run
    proc, _, err = start_cli(cli_env, tmp_path, "train", *TRAIN_FLAGS, "--train", text_jsonl,
                             "--out-dir", out, "--save-every", "2")
    try:
        wait_for_checkpoint(proc, ckpt_root, 2, err)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "model.safetensors").exists()  # killed: no final model directory yet
    killed_at = latest_step(ckpt_root)
    assert killed_at is not None and killed_at >= 2

    resumed = ok(run_cli(cli_env, "train", *TRAIN_FLAGS, "--train", text_jsonl, "--out-dir", out,
                         "--save-every", "2", "--resume-from-ckpt", ckpt_root, "--max-steps", killed_at + 3))
    assert f"resumed from {ckpt_root} at step {killed_at}" in resumed.stdout, resumed.stdout
    assert "saved model directory" in resumed.stdout, resumed.stdout
    assert_model_dir(out)
    assert latest_step(ckpt_root) == killed_at + 3

    inf = tmp_path / "inf"
    converted = ok(run_cli(cli_env, "ckpt-2-inf", "--ckpt-input", ckpt_root, "--inf-output", inf))
    assert f"wrote model directory {inf}" in converted.stdout, converted.stdout
    assert "no tokenizer found" not in converted.stdout
    assert_model_dir(inf)
    assert not (inf / "optimizer.pt").exists() and not (inf / "checkpoints").exists()

    model, meta = load_model_dir(inf)
    model.eval()
    tokens = torch.tensor([list(b"the quick brown fox")])
    with torch.no_grad():
        logits = model(tokens).logits
    assert logits.shape[:2] == tokens.shape and logits.shape[-1] == model.cfg.vocab_size
    assert torch.isfinite(logits).all()
    # the latest checkpoint is the final step: its weights are the run's final weights
    final, converted_weights = load_file(str(out / "model.safetensors")), load_file(str(inf / "model.safetensors"))
    assert final.keys() == converted_weights.keys()
    for name in final:
        torch.testing.assert_close(converted_weights[name], final[name], rtol=0, atol=0, msg=name)

    metrics = read_metrics(out)
    assert metrics, "metrics.jsonl is empty"
    for record in metrics:
        for key in ("step", "loss", "lr", "tokens_per_s"):
            assert key in record, record
        assert record["loss"] > 0 and record["lr"] > 0 and record["tokens_per_s"] > 0
    assert max(r["step"] for r in metrics) == killed_at + 3

    history = read_config(out)["training_history"]
    assert history[-1]["dataset"] == text_jsonl.name
    assert history[-1]["tokens"] > 1000 and history[-1]["steps"] == killed_at + 3


# ---- 2. resume equivalence ---------------------------------------------------------------------------

def interrupted_copy(run: Path, dest: Path, step: int) -> Path:
    """A copy of the finished run `run` as it stood right after its checkpoint at `step` (later
    checkpoints, the final model and later metrics removed): a run interrupted there."""
    shutil.copytree(run, dest)
    ckpts = dest / "checkpoints"
    for directory in ckpts.glob("step-*"):
        if int(directory.name.split("-")[1]) > step:
            shutil.rmtree(directory)
    (ckpts / "latest.json").write_text(json.dumps({"dir": f"step-{step:08d}", "step": step}))
    for name in ("best.json", "model.safetensors", "hierarchos_config.json"):
        (dest / name).unlink(missing_ok=True)
        (ckpts / name).unlink(missing_ok=True)
    kept = [r for r in read_metrics(run) if r["step"] <= step]
    (dest / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    return dest


@pytest.fixture(scope="module")
def straight_run(cli_env, tmp_path_factory):
    """6 uninterrupted steps with a checkpoint at step 3 (kept)."""
    root = tmp_path_factory.mktemp("straight")
    data = write_jsonl(root / "train.jsonl", [{"text": s} for s in sentences(60)])
    out = root / "run"
    ok(run_cli(cli_env, "train", *TRAIN_FLAGS, "--train", data, "--out-dir", out, "--max-steps", "6",
               "--save-every", "3", "--keep-checkpoints", "5"))
    return out


def test_one_flag_resume_repeats_the_uninterrupted_run(cli_env, tmp_path, straight_run):
    split = interrupted_copy(straight_run, tmp_path / "split", 3)
    resumed = ok(run_cli(cli_env, "train", "--resume-from-ckpt", split / "checkpoints"))
    assert f"at step 3" in resumed.stdout, resumed.stdout
    assert_model_dir(split)  # OUT_DIR is the checkpoint's run directory

    a, b = load_file(str(straight_run / "model.safetensors")), load_file(str(split / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-7, msg=name)
    # the resumed run continues the same loss curve and schedule
    runs = [{r["step"]: r for r in read_metrics(out)} for out in (straight_run, split)]
    assert sorted(runs[0]) == sorted(runs[1]) == list(range(1, 7))
    for step in range(4, 7):
        assert runs[1][step]["loss"] == pytest.approx(runs[0][step]["loss"], rel=1e-5), step
        assert runs[1][step]["lr"] == pytest.approx(runs[0][step]["lr"], rel=1e-12), step
    history = read_config(split)["training_history"]
    assert len(history) == 1 and history[0]["steps"] == 6 and history[0]["dataset"] == "train.jsonl"


def test_resume_rejects_a_contradicting_architecture_flag(cli_env, tmp_path, straight_run):
    split = interrupted_copy(straight_run, tmp_path / "split", 3)
    saved = json.loads((split / "checkpoints" / "step-00000003" / "hierarchos_config.json").read_text())
    width = saved["config"]["context_dim"] if "config" in saved else saved["context_dim"]
    result = run_cli(cli_env, "train", "--resume-from-ckpt", split / "checkpoints", "--context_dim", width * 2)
    assert result.returncode == 2, result
    assert result.stderr.splitlines() == [
        f"error: --context-dim {width * 2} contradicts the checkpoint (context_dim = {width} in "
        f"{split / 'checkpoints' / 'step-00000003'}); drop the flag to resume, or start a new run without "
        "--resume-from-ckpt"], result.stderr
    result = run_cli(cli_env, "train", "--resume-from-ckpt", split / "checkpoints", "--batch_size", "3")
    assert result.returncode == 2 and "--batch-size 3 contradicts the checkpoint (the run used --batch-size 2" \
        in result.stderr, result.stderr


def test_resume_with_new_rates_needs_override_scheduling(cli_env, tmp_path, straight_run):
    from hierarchos.train.schedule import lr_at

    kept = interrupted_copy(straight_run, tmp_path / "kept", 3)
    ok(run_cli(cli_env, "train", "--resume-from-ckpt", kept / "checkpoints", "--starting-lr", "1e-3"))
    straight = {r["step"]: r["lr"] for r in read_metrics(straight_run)}
    # without --override-scheduling the checkpoint's schedule goes on (seed 001)
    assert {r["step"]: r["lr"] for r in read_metrics(kept)} == straight

    new = interrupted_copy(straight_run, tmp_path / "new", 3)
    ok(run_cli(cli_env, "train", "--resume-from-ckpt", new / "checkpoints", "--override-scheduling",
               "--starting-lr", "1e-3", "--min-lr", "1e-4", "--warmup-steps", "0"))
    rates = {r["step"]: r["lr"] for r in read_metrics(new)}
    for step in (4, 5, 6):  # a 6-step cosine from the new rates (the restored --max-steps), at steps 4..6
        assert rates[step] == pytest.approx(lr_at(step - 1, 6, 1e-3, 1e-4, 0), rel=1e-12), (step, rates)
    assert rates[6] == pytest.approx(1e-4)


# ---- 3. bad input: one `error:` line, exit code 2 ---------------------------------------------------

def _bad_cases(root: Path) -> dict[str, tuple[list, str]]:
    """name -> (train args, the exact message after 'error: ')."""
    good = write_jsonl(root / "good.jsonl", [{"text": s, "source": "gen"} for s in sentences(4)])
    missing = root / "missing.jsonl"
    empty = root / "empty.jsonl"
    empty.write_bytes(b"")
    blank = root / "blank.txt"
    blank.write_text("\n  \n\n", encoding="utf-8")
    latin1 = root / "latin1.jsonl"
    latin1_bytes = b'{"text": "fine"}\n{"text": "caf\xe9 au lait"}\n'
    latin1.write_bytes(latin1_bytes)
    try:
        latin1_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad_offset = exc.start
    malformed = root / "malformed.jsonl"
    bad_line = '{"text": "three", }'
    malformed.write_text(f'{{"text": "one"}}\n{{"text": "two"}}\n{bad_line}\n{{"text": "four"}}\n', encoding="utf-8")
    try:
        json.loads(bad_line)
    except json.JSONDecodeError as exc:
        detail = f"{exc.msg}: column {exc.colno}"
    return {
        "file_missing": (["--train", missing], sources.ERR_FILE_MISSING.format(path=missing)),
        "file_empty": (["--train", empty], sources.ERR_FILE_EMPTY.format(path=empty)),
        "file_blank": (["--train", blank], sources.ERR_FILE_EMPTY.format(path=blank)),
        "not_utf8": (["--train", latin1], sources.ERR_NOT_UTF8.format(path=latin1, offset=bad_offset)),
        "malformed_json": (["--train", malformed], sources.ERR_BAD_JSON.format(path=malformed, line=3, detail=detail)),
        "missing_column": (["--train", good, "--text_column", "nosuch"],
                           sources.ERR_MISSING_COLUMN.format(path=good, column="nosuch", columns="text, source")),
        "train_and_hf": (["--train", good, "--hf_dataset", "some/dataset"], sources.ERR_TRAIN_AND_HF),
        "text_and_prompt": (["--train", good, "--text_column", "text", "--prompt_column", "text",
                             "--completion_column", "source"], sources.ERR_TEXT_AND_PROMPT),
        "device_cuda": (["--train", good, "--device", "cuda"], None),
        "device_dml": (["--train", good, "--device", "dml"], None),
    }


BAD_CASES = ("file_missing", "file_empty", "file_blank", "not_utf8", "malformed_json", "missing_column",
             "train_and_hf", "text_and_prompt", "device_cuda", "device_dml")


@pytest.fixture(scope="module")
def bad_results(cli_env, tmp_path_factory):
    """Run every bad-input case at once (each is a few seconds of imports) and collect the results."""
    root = tmp_path_factory.mktemp("bad_input")
    cases = _bad_cases(root)
    assert set(cases) == set(BAD_CASES)
    procs = {}
    for name, (args, _) in cases.items():
        device = [] if "--device" in args else ["--device", "cpu"]
        procs[name] = subprocess.Popen(_command(["train", "--tiny", "--tokenizer-path", "byte", *device,
                                                 "--out-dir", root / f"out_{name}", *args]),
                                       cwd=REPO, env=cli_env, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=240)
        results[name] = (proc.returncode, stdout, stderr, cases[name][1])
    return results


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_error_line_exit_2(bad_results, case):
    code, stdout, stderr, expected = bad_results[case]
    assert code == 2, f"exit {code}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    error_lines = [line for line in lines if line.startswith("error: ")]
    assert len(error_lines) == 1, stderr
    assert lines == error_lines, f"stray stderr output besides the error line:\n{stderr}"
    message = error_lines[0][len("error: "):]
    if case == "device_cuda":
        assert message.startswith("--device cuda:") and "CUDA" in message, message
    elif case == "device_dml":
        assert message.startswith("--device dml") and "torch-directml" in message, message
    else:
        assert message == expected


# ---- 4. offline --hf_dataset on a saved dataset folder ----------------------------------------------

def test_hf_dataset_from_local_folder(cli_env, tmp_path):
    from datasets import Dataset

    folder = tmp_path / "saved_dataset"
    Dataset.from_dict({"text": sentences(30, seed=1), "id": list(range(30))}).save_to_disk(str(folder))
    out = tmp_path / "run"
    result = ok(run_cli(cli_env, "train", *TRAIN_FLAGS, "--hf_dataset", folder, "--out-dir", out,
                        "--max-steps", "2"))
    assert "(plain)" in result.stdout, result.stdout
    assert_model_dir(out)
    history = read_config(out)["training_history"][-1]
    assert history["dataset"] == f"{folder}[train]" and history["steps"] == 2 and history["tokens"] > 0


# ---- 5. Alpaca records -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def alpaca_run(cli_env, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("alpaca")
    rows = [{"instruction": f"Say something about item {i}.", "input": "" if i % 2 else f"item {i}: a fox",
             "output": s} for i, s in enumerate(sentences(20, words=12, seed=2))]
    data = write_jsonl(root / "alpaca.jsonl", rows)
    out = root / "run"
    result = run_cli(cli_env, "train", *TRAIN_FLAGS, "--train", data, "--out-dir", out, "--max-steps", "2")
    return out, result


def test_alpaca_jsonl_records_template(alpaca_run):
    out, result = alpaca_run
    ok(result)
    assert "(alpaca)" in result.stdout, result.stdout
    config = read_config(out)
    assert config["prompt_template"] == "alpaca"
    assert config["training_history"][-1]["template"] == "alpaca"
    assert config["training_history"][-1]["dataset"] == "alpaca.jsonl"


def test_ckpt_2_inf_keeps_template_and_history(cli_env, alpaca_run, tmp_path):
    out, result = alpaca_run
    ok(result)
    inf = tmp_path / "inf"
    ok(run_cli(cli_env, "ckpt-2-inf", "--ckpt-input", out / "checkpoints", "--inf-output", inf))
    config = read_config(inf)
    assert config.get("prompt_template") == "alpaca", config.get("prompt_template")
    history = config.get("training_history") or []
    assert history and history[-1]["dataset"] == "alpaca.jsonl" and history[-1]["tokens"] > 0, history


# ---- 6. Ctrl+C -----------------------------------------------------------------------------------------

def test_sigint_saves_resumable_checkpoint_and_exits_0(cli_env, tmp_path, text_jsonl):
    out = tmp_path / "run"
    ckpt_root = out / "checkpoints"
    flags = (*TRAIN_FLAGS, "--train", text_jsonl, "--out-dir", out, "--save-every", "2")
    proc, stdout_path, err = start_cli(cli_env, tmp_path, "train", *flags)
    try:
        wait_for_checkpoint(proc, ckpt_root, 2, err)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stdout, stderr = stdout_path.read_text(), err.read_text()
    assert code == 0, f"exit {code}\nstdout:\n{stdout}\nstderr:\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr
    match = re.search(r"stopped at step (\d+); resume with --resume-from-ckpt (\S+)", stdout)
    assert match, stdout
    stopped_at = int(match.group(1))
    assert Path(match.group(2)) == ckpt_root
    assert latest_step(ckpt_root) == stopped_at
    assert not (out / "model.safetensors").exists()  # stopped, not finished: no final model yet

    resumed = ok(run_cli(cli_env, "train", *flags, "--resume-from-ckpt", ckpt_root,
                         "--max-steps", stopped_at + 1))
    assert f"resumed from {ckpt_root} at step {stopped_at}" in resumed.stdout, resumed.stdout
    assert_model_dir(out)
    assert read_config(out)["training_history"][-1]["steps"] == stopped_at + 1


# ---- 7. --max-steps sets the schedule's length -----------------------------------------------------------

def test_lr_schedule_spans_max_steps():
    from hierarchos.train.schedule import lr_at
    # hand values: 2 warm-up steps (lr/2, lr), then a cosine over steps 2..6 whose midpoint (step 4)
    # is halfway between the rates and whose last step (index 6 = the 7th step) is min_lr exactly
    rates = [lr_at(step, 7, 1.0, 0.1, 2) for step in range(7)]
    assert rates[0] == 0.5 and rates[1] == 1.0 and rates[2] == 1.0
    assert rates[4] == pytest.approx(0.55, abs=1e-12)
    assert rates[6] == 0.1


def test_max_steps_run_ends_at_min_lr(cli_env, tmp_path, text_jsonl):
    out = tmp_path / "run"
    ok(run_cli(cli_env, "train", *TRAIN_FLAGS, "--train", text_jsonl, "--out-dir", out, "--epochs", "5",
               "--max-steps", "5", "--min-lr", "1e-5", "--warmup-steps", "1"))
    rates = [r["lr"] for r in read_metrics(out)]
    # one epoch is far longer than 5 steps: before, the cosine spanned 5 epochs and stayed near its peak
    assert len(rates) == 5 and rates[0] == pytest.approx(3e-3)
    assert rates[-1] == pytest.approx(1e-5, rel=1e-9)
    assert rates[1] == pytest.approx(3e-3) and all(a > b for a, b in zip(rates[1:], rates[2:])), rates


def test_train_validates_over_a_batch_of_rows(cli_env, tmp_path):
    """Validation reads the held-out text as --batch_size rows (a batch-1 pass over it was most of a short
    GPU run's time), and its bits per byte stay a rate over the whole text."""
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": s} for s in sentences(12)])
    out = tmp_path / "run"  # one epoch: validation runs at its end
    result = ok(run_cli(cli_env, "train", *TRAIN_FLAGS, "--train", data, "--out-dir", out, "--val-fraction", "0.2"))
    assert re.search(r"validation [\d,]+ tokens in 2 streams", result.stdout), result.stdout
    bpb = [r["val_bpb"] for r in read_metrics(out) if r.get("val_bpb") is not None]
    assert bpb and all(0 < b < 16 for b in bpb), bpb  # byte tokenizer: at most ~8 bits/byte untrained


# ---- 8. the token cache through the CLI ------------------------------------------------------------------

def test_train_reuses_the_token_cache_and_rebuilds_on_change(cli_env, tmp_path):
    data = write_jsonl(tmp_path / "small.jsonl", [{"text": s} for s in sentences(3, words=8)])
    flags = (*TRAIN_FLAGS, "--train", data, "--max-steps", "1", "--token-cache", tmp_path / "cache",
             "--val-fraction", "0.005")
    first = ok(run_cli(cli_env, "train", *flags, "--out-dir", tmp_path / "a", "--num_workers", "4"))
    built = re.search(r"token cache: building (\S+)\n", first.stdout)
    assert built and Path(built.group(1)).parent == tmp_path / "cache", first.stdout
    n_tokens = json.loads((Path(built.group(1)) / "index.json").read_text())["n_tokens"]
    assert f"--val-fraction 0.005 of {n_tokens:,} tokens is {int(n_tokens * 0.005)}, fewer than the 2" in first.stdout
    assert "--num_workers: deprecated and ignored" in first.stderr
    second = ok(run_cli(cli_env, "train", *flags, "--out-dir", tmp_path / "b"))
    assert f"token cache: reusing {built.group(1)} ({n_tokens:,} tokens)" in second.stdout, second.stdout
    write_jsonl(data, [{"text": s} for s in sentences(4, words=8)])
    third = ok(run_cli(cli_env, "train", *flags, "--out-dir", tmp_path / "c"))
    assert f"token cache: rebuilding {built.group(1)} ({data} changed (size" in third.stdout, third.stdout


def test_a_tokenizer_trained_on_the_data_is_kept_with_its_cache(cli_env, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": s} for s in sentences(20)])
    flags = [a for a in TRAIN_FLAGS if a != "byte"]
    flags[flags.index("--tokenizer-path")] = "--tokenizer-path"
    flags.insert(flags.index("--tokenizer-path") + 1, "bpe:300")
    flags += ["--train", data, "--max-steps", "1", "--token-cache", tmp_path / "cache"]
    first = ok(run_cli(cli_env, "train", *flags, "--out-dir", tmp_path / "a"))
    assert "tokenizer: training bpe:300 on d.jsonl" in first.stdout, first.stdout
    second = ok(run_cli(cli_env, "train", *flags, "--out-dir", tmp_path / "b"))
    assert "tokenizer: training" not in second.stdout and "token cache: reusing" in second.stdout, second.stdout
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
