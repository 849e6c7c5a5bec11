"""Evaluation: the lm-eval model's scores against sums of log-softmax taken straight from the model's
logits (state-carrying chunks, batched == unbatched, rolling == whole-text NLL), greedy generation
stopping at a stop string, lm-eval's simple_evaluate on every shipped local task offline, bits per
byte by hand, the `eval` CLI, the train-time hook, and the one-line errors. Random tiny byte-level
models on the CPU; the hub is never reached (HF_*_OFFLINE set)."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from hierarchos import evaluate
from hierarchos.cli import main
from hierarchos.config import tiny_config
from hierarchos.data.tokenizers import load_tokenizer
from hierarchos.errors import HierarchosError
from hierarchos.eval_tasks import local_task_config, local_task_names
from hierarchos.io import save_model_dir
from hierarchos.model import HierarchosLM

SEED = int(torch.randint(0, 2**31 - 1, ()).item())  # fresh per run, printed on failure
REQUESTS = [("hello", " world"), ("", "abc"), ("The king ", "is dead"), ("x" * 9, " y"), ("Who? ", "Puck")]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("byte")  # id == byte value: a text's tokens are its UTF-8 bytes


@pytest.fixture(scope="module")
def model64():
    torch.manual_seed(SEED)
    return HierarchosLM(tiny_config(vocab_size=260)).double().eval()


@pytest.fixture(scope="module")
def model32():
    torch.manual_seed(SEED + 1)
    return HierarchosLM(tiny_config(vocab_size=260)).eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model32, tokenizer):
    return save_model_dir(tmp_path_factory.mktemp("eval") / "model", model32, tokenizer)


def _instances(kind, args_list):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=args, idx=0) for args in args_list]


@torch.no_grad()
def _direct(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """log p(continuation | eos + context) from one full forward, and whether it is all argmax. As in
    lm-eval's own models, trailing spaces of the context are scored with the continuation."""
    ids = [tokenizer.eos_id, *(context + continuation).encode("utf-8")]
    n = len((context[len(context.rstrip(" ")):] + continuation).encode("utf-8"))
    logp = model(torch.tensor([ids[:-1]])).logits[0].double().log_softmax(-1)
    targets = torch.tensor(ids[1:])
    picked = logp.gather(-1, targets[:, None])[:, 0][-n:]
    return float(picked.sum()), bool((logp.argmax(-1) == targets)[-n:].all())


def test_loglikelihood_equals_logits_of_one_forward(model64, tokenizer):
    lm = evaluate.make_lm(model64, tokenizer, batch_size=3, chunk_size=4, progress=False)  # state carried 4 times
    got = lm.loglikelihood(_instances("loglikelihood", REQUESTS))
    for (context, continuation), (logprob, greedy) in zip(REQUESTS, got):
        want, want_greedy = _direct(model64, tokenizer, context, continuation)
        assert logprob == pytest.approx(want, rel=1e-9, abs=1e-9), (SEED, context, continuation)
        assert greedy == want_greedy
        assert logprob < 0


def test_batched_equals_unbatched(model64, tokenizer):
    requests = _instances("loglikelihood", REQUESTS)
    one = evaluate.make_lm(model64, tokenizer, batch_size=1, progress=False).loglikelihood(requests)
    many = evaluate.make_lm(model64, tokenizer, batch_size=4, chunk_size=7, progress=False).loglikelihood(requests)
    for (a, greedy_a), (b, greedy_b) in zip(one, many):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-9), SEED
        assert greedy_a == greedy_b


def test_rolling_equals_whole_text_nll(model64, tokenizer):
    texts = ["To be, or not to be?", "héllo → ✓"]
    lm = evaluate.make_lm(model64, tokenizer, batch_size=2, chunk_size=5, progress=False)
    got = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(t,) for t in texts]))
    for text, logprob in zip(texts, got):
        assert logprob == pytest.approx(_direct(model64, tokenizer, "", text)[0], rel=1e-9), SEED


def test_greedy_generate_until_stops_at_the_stop_string(tokenizer):
    torch.manual_seed(SEED + 1)
    model = HierarchosLM(tiny_config(vocab_size=260)).eval()
    # the special tokens (ids 256-259 of the byte tokenizer: EOS, padding, ...) decode to no text, and some
    # seeds' random models pick one greedily after every context; their (tied) rows to zero give them
    # logit 0, never the greedy pick over 256 random byte logits
    with torch.no_grad():
        model.embed.weight[256:].zero_()
    lm = evaluate.make_lm(model, tokenizer, progress=False)
    for context in ("Once", "The", "Thou", "Why", "A", "Hello"):  # a random model may still stop early: try another
        free = lm.generate(context, max_gen_toks=12)  # greedy: the same tokens on every call
        if len(free) >= 4:
            break
    else:
        pytest.fail(f"seed {SEED}: every greedy continuation ended within 3 characters")
    stop = free[len(free) // 2:len(free) // 2 + 2]
    expected = free[:free.find(stop)]
    (got,) = lm.generate_until(_instances("generate_until", [(context, {"until": [stop], "max_gen_toks": 12})]))
    assert got == expected and stop not in got, (SEED, free, stop, got)


def _task_docs(task: str, limit: int) -> list[dict]:
    from hierarchos.eval_tasks import TASKS_DIR

    data = {"shakespeare_ppl": "shakespeare_heldout.jsonl"}.get(task, f"{task}.jsonl")
    lines = (TASKS_DIR / data).read_text(encoding="utf-8").splitlines()[:limit]  # lm-eval's limit: the first N
    return [json.loads(line) for line in lines]


def _expected_metrics(model, tokenizer, task: str, limit: int) -> dict[str, float]:
    """The task's metrics computed by hand from the task's YAML and `_direct` log-likelihoods (one full
    forward each, no lm-eval, no evaluate.py): multiple choice picks the argmax of the choices' summed
    log-probabilities (acc_norm: divided by the choice's length in characters); bits per byte is the
    documents' summed NLL / ln 2 / their UTF-8 bytes."""
    docs = _task_docs(task, limit)
    if task == "shakespeare_ppl":  # loglikelihood_rolling of each document's text from EOS
        nll = -sum(_direct(model, tokenizer, "", doc["text"])[0] for doc in docs)
        return {"bits_per_byte": nll / math.log(2) / sum(len(doc["text"].encode("utf-8")) for doc in docs)}
    acc, acc_norm = [], []
    for doc in docs:
        if task == "shakespeare_who_speaks":  # one continuation after each speaker header (multiple input)
            pairs = [(header, "\n" + doc["line"]) for header in doc["headers"]]
            lengths = [len(header) for header in doc["headers"]]
        else:  # "{header}\n{context}" then "\n" + each candidate line
            pairs = [(f"{doc['header']}\n{doc['context']}", "\n" + choice) for choice in doc["choices"]]
            lengths = [len(choice) for choice in doc["choices"]]
        lls = [_direct(model, tokenizer, context, continuation)[0] for context, continuation in pairs]
        acc.append(float(max(range(len(lls)), key=lls.__getitem__) == doc["label"]))
        normed = [ll / n for ll, n in zip(lls, lengths)]
        acc_norm.append(float(max(range(len(normed)), key=normed.__getitem__) == doc["label"]))
    expected = {"acc": sum(acc) / len(acc)}
    if task == "shakespeare_next_line":
        expected["acc_norm"] = sum(acc_norm) / len(acc_norm)
    return expected


@pytest.mark.parametrize("task", local_task_names())
def test_simple_evaluate_on_each_local_task_offline(model64, tokenizer, task):
    # float64: the hand computation's log-likelihoods equal the batched ones to ~1e-12, so no argmax
    # between two choices can flip between the two (float32 could, on a near-tie)
    lm = evaluate.make_lm(model64, tokenizer, batch_size=4, progress=False)
    limit = 6
    outcome = evaluate.evaluate_tasks(lm, [task], limit=limit, env_info=False)
    metrics = outcome["metrics"][task]
    expected = {"shakespeare_ppl": {"word_perplexity", "byte_perplexity", "bits_per_byte"},
                "shakespeare_who_speaks": {"acc"}}.get(task, {"acc", "acc_norm"})
    assert expected <= set(metrics), metrics
    assert all(math.isfinite(metrics[name]) for name in expected)
    assert outcome["results"]["n-samples"][task]["effective"] == limit
    for name, value in _expected_metrics(model64, tokenizer, task, limit).items():
        assert metrics[name] == pytest.approx(value, rel=1e-9), (SEED, task, name)


def test_shipped_task_data_is_what_the_builder_makes():
    import importlib.util

    from hierarchos.eval_tasks import TASKS_DIR

    script = TASKS_DIR.parents[1] / "scripts" / "build_eval_tasks.py"
    spec = importlib.util.spec_from_file_location("build_eval_tasks", script)
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    for name, text in builder.build().items():
        assert (TASKS_DIR / name).read_text(encoding="utf-8") == text, f"{name} is stale: run {script}"


def test_registered_model_name_and_model_args(model_dir, model32):
    import lm_eval
    from lm_eval.tasks import TaskManager

    evaluate.lm_class()
    results = lm_eval.simple_evaluate(model="hierarchos", model_args=f"pretrained={model_dir},chunk_size=64",
                                      tasks=[local_task_config("shakespeare_who_speaks")], limit=2,
                                      batch_size=2, device="cpu", bootstrap_iters=0,
                                      task_manager=TaskManager(include_defaults=False))
    expected = _expected_metrics(model32, load_tokenizer("byte"), "shakespeare_who_speaks", 2)["acc"]
    assert results["results"]["shakespeare_who_speaks"]["acc,none"] == expected, SEED


def test_bits_per_byte_file_by_hand(model64, tokenizer, tmp_path):
    text = "Full fathom five;\ncoral — ✓\n"
    path = tmp_path / "text.txt"
    path.write_text(text, encoding="utf-8")
    got = evaluate.bits_per_byte_file(path, model64, tokenizer, chunk_size=8)
    nll = -_direct(model64, tokenizer, "", text)[0]
    n_bytes = len(text.encode("utf-8"))
    assert got["bytes"] == n_bytes > len(text)  # multibyte characters count as their bytes
    assert got["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-9), SEED
    assert got["tokens"] == n_bytes


def test_eval_cli_table_and_json(model_dir, tmp_path, capsys):
    text = tmp_path / "held.txt"
    text.write_text("Our revels now are ended.\n", encoding="utf-8")
    out = tmp_path / "report" / "eval.json"
    code = main(["eval", "--model-path", str(model_dir), "--tasks", "shakespeare_next_line,shakespeare_who_speaks",
                 "--limit", "2",
                 "--batch-size", "2", "--device", "cpu", "--bpb-file", str(text), "--output", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = captured.out.splitlines()
    assert lines[0].split() == ["task", "metric", "value", "stderr"]
    assert any(line.split()[:2] == ["shakespeare_next_line", "acc"] for line in lines)
    assert any(line.startswith("bpb:held.txt") and "bits_per_byte" in line for line in lines)
    report = json.loads(out.read_text())
    assert set(report["metrics"]["shakespeare_next_line"]) >= {"acc", "acc_norm"}
    assert "acc" in report["metrics"]["shakespeare_who_speaks"]  # "a,b" as lm-eval takes it
    assert report["bpb_file"]["bytes"] == len("Our revels now are ended.\n")
    assert not list(out.parent.glob(".*tmp*"))  # written atomically: no temp file left


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


def test_eval_cli_errors_are_one_line_exit_2(model_dir, tmp_path, capsys, monkeypatch):
    assert main(["eval", "--model-path", str(tmp_path / "nope"), "--tasks", "shakespeare_ppl"]) == 2
    assert "model directory not found" in _error_line(capsys)
    assert main(["eval", "--model-path", str(model_dir)]) == 2
    assert "nothing to evaluate" in _error_line(capsys)
    assert main(["eval", "--model-path", str(model_dir), "--bpb-file", str(tmp_path / "missing.txt")]) == 2
    assert "text file not found" in _error_line(capsys)
    (tmp_path / "step-00000001").mkdir()
    (tmp_path / "step-00000001" / "trainer_state.json").write_text("{}")
    assert main(["eval", "--model-path", str(tmp_path / "step-00000001"), "--tasks", "shakespeare_ppl"]) == 2
    assert "holds no tokenizer; pass --tokenizer-path" in _error_line(capsys)

    # an unknown name, and a hub task whose dataset is not cached while offline (an empty cache here)
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets_cache")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    assert main(["eval", "--model-path", str(model_dir), "--tasks", "no_such_task_xyz"]) == 2
    line = _error_line(capsys)
    assert "unknown task 'no_such_task_xyz'" in line and "shakespeare_ppl" in line, line
    assert main(["eval", "--model-path", str(model_dir), "--tasks", "hellaswag", "--limit", "1"]) == 2
    line = _error_line(capsys)
    assert "task 'hellaswag'" in line and "not in the local Hugging Face cache" in line, line


def test_lm_eval_is_imported_only_when_evaluating():
    import subprocess

    code = ("import sys, hierarchos, hierarchos.evaluate, hierarchos.cli; hierarchos.cli.build_parser(); "
            "print('lm_eval' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr


def test_missing_lm_eval_names_pip_install(monkeypatch):
    monkeypatch.setattr(evaluate, "_LM_CLASS", None)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    with pytest.raises(HierarchosError, match="pip install lm-eval"):
        evaluate.lm_class()


def test_train_hook_returns_metrics_and_restores_train_mode(model32, tokenizer):
    from types import SimpleNamespace

    hook = evaluate.make_train_hook(model32, tokenizer, ["shakespeare_who_speaks"], every_epoch=2,
                                    every_steps=0, batch_size=4, limit=2, log=lambda line: None)
    model32.train()
    rng = torch.get_rng_state()
    trainer = SimpleNamespace(micro_step=3, steps_per_epoch=3, opt_step=3)  # end of epoch 1: not due
    assert hook(trainer, True) == {}
    trainer.micro_step, trainer.opt_step = 6, 6  # end of epoch 2
    record = hook(trainer, True)
    assert set(record) == {"eval/shakespeare_who_speaks/acc"}  # no standard errors during training
    assert model32.training
    assert torch.equal(torch.get_rng_state(), rng)  # lm-eval's reseeding does not leak into training
    model32.eval()


def test_train_eval_tasks_flags_log_metrics(tmp_path, capsys):
    data = tmp_path / "train.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 20, encoding="utf-8")
    out = tmp_path / "run"
    code = main(["train", "--train", str(data), "--tiny", "--tokenizer-path", "byte", "--max_length", "16",
                 "--batch_size", "2", "--epochs", "1", "--log-every", "100", "--device", "cpu",
                 "--val-fraction", "0", "--out-dir", str(out), "--eval-tasks", "shakespeare_ppl",
                 "--eval-steps", "10", "--eval-limit", "1", "--eval-batch-size", "1"])
    assert code == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/shakespeare_ppl/bits_per_byte" in r]
    steps = [r["step"] for r in evals]
    last = records[-1]["step"]
    assert steps == sorted({*range(10, last + 1, 10), last}), (steps, last)  # every 10 steps and the epoch end
    assert all(6 < r["eval/shakespeare_ppl/bits_per_byte"] < 10 for r in evals)
    assert "eval at step 10: shakespeare_ppl/" in capsys.readouterr().err
    assert main(["train", "--train", str(data), "--tiny", "--tokenizer-path", "byte", "--device", "cpu",
                 "--out-dir", str(tmp_path / "never"), "--eval-tasks", "shakespeare_ppl",
                 "--eval-every-epoch", "0"]) == 2
    assert "--eval-tasks would never run" in _error_line(capsys)
