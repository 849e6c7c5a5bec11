"""bench/bench_original.py: argument checks (one-line errors), the shape mapping onto our train command,
the timing arithmetic, the generated tokenizer and corpus, the table and the JSON; our half of the
benchmark end to end; and, where HIERARCHOS_ORIGINAL_DIR names the original project's snapshot, both
halves on a tiny shape (skipped otherwise: the original is never part of this repository)."""

import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))

import bench_original as bo  # noqa: E402
from hierarchos.errors import HierarchosError  # noqa: E402


def fake_original(tmp_path):
    """A directory with the two files validate() looks for (nothing runs from it)."""
    root = tmp_path / "orig"
    (root / "hierarchos" / "training").mkdir(parents=True)
    (root / "hierarchos_cli.py").write_text("# stand-in\n")
    (root / "hierarchos" / "training" / "trainer.py").write_text("# stand-in\n")
    return root


def args_for(tmp_path, *extra):
    return bo.parse_args(["--original", str(fake_original(tmp_path)), *extra])


@pytest.mark.parametrize("flags, needle", [
    (["--width", "100"], "--width 100"),
    (["--width", "96"], "--width 96"),  # a multiple of 32, not of the head size
    (["--width", "0"], "--width 0"),
    (["--steps", "0"], "--steps 0"),
    (["--warmup", "0"], "--warmup 0"),
    (["--l-steps", "0"], "--l-steps 0"),
    (["--seq-len", "300"], "--seq-len 300"),
    (["--seq-len", "1"], "--seq-len 1"),
    (["--vocab-size", "8"], "--vocab-size 8"),
    (["--original-args", "--flag 'unclosed"], "--original-args"),
    (["--json", "/no/such/dir/out.json"], "--json"),
])
def test_bad_arguments_are_one_line_errors_naming_the_flag(tmp_path, flags, needle):
    with pytest.raises(HierarchosError) as info:
        bo.validate(args_for(tmp_path, *flags))
    message = str(info.value)
    assert needle in message and "\n" not in message


def test_width_error_suggests_a_multiple_of_the_head_size(tmp_path):
    with pytest.raises(HierarchosError, match="try 128"):
        bo.validate(args_for(tmp_path, "--width", "130"))


def test_a_directory_without_the_original_is_refused_with_how_to_get_it(tmp_path):
    (tmp_path / "empty").mkdir()
    args = bo.parse_args(["--original", str(tmp_path / "empty")])
    with pytest.raises(HierarchosError, match="git clone .*necat101/Hierarchos") as info:
        bo.validate(args)
    assert "\n" not in str(info.value)
    bo.validate(bo.parse_args(["--original", str(tmp_path / "empty"), "--only", "ours"]))  # ours needs no original


def test_this_repository_is_not_accepted_as_the_original():
    with pytest.raises(HierarchosError, match="this repository"):
        bo.validate(bo.parse_args(["--original", REPO]))


def test_defaults_are_the_issues_shape_and_pass(tmp_path):
    args = args_for(tmp_path)
    bo.validate(args)
    assert (args.width, args.batch, args.seq_len, args.h_steps, args.l_steps, args.vocab_size) == (
        768, 16, 128, 5, 5, 50257)


def flag_values(argv):
    return {flag: value for flag, value in zip(argv, argv[1:]) if flag.startswith("--")}


def test_our_flags_parse_into_a_config_of_the_originals_shape(tmp_path):
    """Through our real train parser and ModelConfig: widths, one block per stack, one round, the
    reasoning steps and the window, as the original's single manager and worker cells."""
    from hierarchos.cli import build_parser
    from hierarchos.cli.train import ARCH_FLAGS
    from hierarchos.config import ModelConfig
    args = args_for(tmp_path, "--width", "192", "--batch", "3", "--seq-len", "40", "--h-steps", "4",
                    "--l-steps", "2", "--h-stride", "3")
    ns = build_parser().parse_args(["train", *bo.ours_flags(args)])
    cfg = ModelConfig(**{n: getattr(ns, n) for n in ARCH_FLAGS if getattr(ns, n) is not None}).validate()
    assert (cfg.context_dim, cfg.h_hidden, cfg.l_hidden) == (192, 192, 192)
    assert (cfg.h_layers, cfg.l_layers, cfg.h_cycles) == (1, 1, 1)
    assert (cfg.max_h_steps, cfg.max_l_steps, cfg.h_stride, cfg.head_size) == (4, 2, 3, 64)
    assert cfg.use_rosa and cfg.use_deepembed
    assert (cfg.ltm_slots, cfg.ltm_key_dim, cfg.ltm_val_dim, cfg.ltm_topk, cfg.persistent_dim) == (
        1024, 128, 128, 4, 128)  # the original's defaults, which its flags leave alone
    assert (ns.batch_size, ns.max_length) == (3, 40)


def test_the_originals_flags_carry_the_same_shape(tmp_path):
    args = args_for(tmp_path, "--width", "192", "--batch", "3", "--seq-len", "40", "--h-steps", "4",
                    "--l-steps", "2", "--h-stride", "3", "--device", "cpu", "--original-args", "--no-compile --x 1")
    theirs = flag_values(bo.original_flags(args))
    assert {k: theirs[k] for k in ("--context_dim", "--h_hidden", "--l_hidden", "--max_h_steps", "--max_l_steps",
                                   "--h_stride", "--batch_size", "--max_length", "--device")} == {
        "--context_dim": "192", "--h_hidden": "192", "--l_hidden": "192", "--max_h_steps": "4",
        "--max_l_steps": "2", "--h_stride": "3", "--batch_size": "3", "--max_length": "40", "--device": "cpu"}
    assert bo.original_flags(args)[-3:] == ["--no-compile", "--x", "1"]  # passed through last, as given


@pytest.mark.parametrize("warmup, steps", [(1, 1), (2, 5), (3, 6), (4, 10)])
def test_our_log_rows_land_on_both_ends_of_the_timed_span(warmup, steps):
    log_every, max_steps = bo.timed_span(warmup, steps)
    assert max_steps == warmup + steps
    assert warmup % log_every == 0 and max_steps % log_every == 0


def test_timed_bounds_pick_the_steps_after_warmup():
    # requests at 0, 1, 3, 6, 10: steps take 1, 2, 3, 4 s; steps 1 and 2 (after one warm-up) take 2 + 3 s
    times = [0.0, 1.0, 3.0, 6.0, 10.0]
    assert bo.timed_bounds(times, warmup=1, steps=2, ahead=0) == (1.0, 6.0)
    # with a prefetcher each request comes one step earlier: steps 1 and 2 are requests 2 .. 4
    assert bo.timed_bounds(times, warmup=1, steps=2, ahead=1) == (3.0, 10.0)
    with pytest.raises(ValueError):
        bo.timed_bounds(times, warmup=2, steps=2, ahead=1)


def test_rate_is_tokens_over_seconds():
    assert bo.rate(tokens_per_step=16 * 128, steps=4, t_start=10.0, t_end=12.0) == pytest.approx(4096.0)
    with pytest.raises(ValueError):
        bo.rate(10, 1, 5.0, 5.0)


def test_tokenizer_has_exactly_the_vocabulary_and_the_corpus_fills_windows(tmp_path):
    from transformers import AutoTokenizer
    bo.write_tokenizer(str(tmp_path / "tok"), 50)
    bo.write_corpus(str(tmp_path / "c.jsonl"), docs=3, words=7, vocab_size=50, seed=1)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"), local_files_only=True)
    assert len(tok) == 50 and tok.eos_token_id == 49
    lines = (tmp_path / "c.jsonl").read_text().splitlines()
    assert len(lines) == 3
    for line in lines:
        ids = tok.encode(json.loads(line)["text"])
        assert len(ids) == 7 and all(0 <= i < 49 for i in ids)  # one token a word, never end-of-text
    assert not (tmp_path / "c.jsonl.tmp").exists()


def test_our_tokenizer_loader_reads_the_generated_tokenizer(tmp_path):
    from hierarchos.data.tokenizers import load_tokenizer
    bo.write_tokenizer(str(tmp_path / "tok"), 300)
    tok = load_tokenizer(str(tmp_path / "tok"))
    assert tok.vocab_size == 300


def rows_ok():
    return [dict(model="original", status="ok", tok_s=25.0, step_s=81.92, params=390_123_456),
            dict(model="ours", status="ok", tok_s=30_000.0, step_s=0.068, params=400_000_000)]


SHAPE = dict(device="cpu", width=768, batch=16, seq_len=128, h_steps=5, l_steps=5, vocab_size=50257, steps=3,
             warmup=1)


def test_table_shows_both_rates_and_their_ratio():
    table = bo.format_table(rows_ok(), SHAPE)
    assert "25.0" in table and "30,000.0" in table and "390,123,456" in table
    assert "1,200.0x" in table
    assert bo.ratio(rows_ok()) == pytest.approx(1200.0)


def test_table_with_a_failed_row_has_no_ratio():
    rows = rows_ok()
    rows[0] = dict(model="original", status="timeout after 60 s")
    table = bo.format_table(rows, SHAPE)
    assert "timeout after 60 s" in table and "needs both rows finished" in table
    assert bo.ratio(rows) is None


def test_json_is_written_whole_and_replaces_the_old_file(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")
    bo.write_json(str(path), dict(rows=rows_ok(), ratio=1200.0))
    assert json.loads(path.read_text())["ratio"] == 1200.0
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_original_identity_reads_the_marker_and_hashes_the_sources(tmp_path):
    root = fake_original(tmp_path)
    (root / "ORIGINAL_COMMIT").write_text(bo.ORIGINAL_COMMIT + "\n")
    first = bo.original_identity(str(root))
    assert first["commit"] == bo.ORIGINAL_COMMIT and first["url"].endswith("necat101/Hierarchos")
    (root / "hierarchos" / "training" / "trainer.py").write_text("# changed\n")
    assert bo.original_identity(str(root))["sources_sha256"] != first["sources_sha256"]
    (root / "ORIGINAL_COMMIT").unlink()
    assert bo.original_identity(str(root))["commit"] == "unknown"  # tmp_path is no checkout


def test_the_original_childs_environment_never_puts_this_repository_first(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([REPO, "/opt/site"]))
    env = bo._child_env(None)
    assert env["PYTHONPATH"] == "/opt/site"
    assert bo._child_env(REPO)["PYTHONPATH"].split(os.pathsep) == [REPO, "/opt/site"]


def tiny(tmp_path, original, *extra):
    out = tmp_path / "result.json"
    argv = ["--original", str(original), "--width", "64", "--batch", "1", "--seq-len", "8", "--vocab-size", "64",
            "--h-steps", "2", "--l-steps", "1", "--steps", "1", "--warmup", "1", "--threads", "1",
            "--timeout", "300", "--json", str(out), *extra]
    return bo.main(argv), out


def test_our_half_runs_end_to_end_and_reports_a_rate(tmp_path, capsys):
    code, out = tiny(tmp_path, tmp_path / "absent", "--only", "ours")
    assert code == 0, capsys.readouterr()
    payload = json.loads(out.read_text())
    (row,) = payload["rows"]
    assert row["model"] == "ours" and row["status"] == "ok"
    assert row["tok_s"] == pytest.approx(8 / row["step_s"])  # 1 x 8 tokens a step
    assert row["params"] > 0 and payload["shape"]["width"] == 64 and payload["original"] is None
    assert payload["machine"]["torch"]


ORIGINAL_DIR = os.environ.get("HIERARCHOS_ORIGINAL_DIR", "")


@pytest.mark.skipif(not ORIGINAL_DIR or not os.path.isfile(os.path.join(ORIGINAL_DIR, "hierarchos_cli.py")),
                    reason="HIERARCHOS_ORIGINAL_DIR does not name the original project's snapshot "
                           "(see bench/bench_original.py's docstring for how to get it)")
def test_both_models_train_on_a_tiny_shape(tmp_path, capsys):
    code, out = tiny(tmp_path, ORIGINAL_DIR)
    assert code == 0, capsys.readouterr()
    payload = json.loads(out.read_text())
    rows = {r["model"]: r for r in payload["rows"]}
    assert rows["original"]["status"] == "ok" and rows["ours"]["status"] == "ok"
    assert rows["original"]["params"] > 0 and rows["original"]["amp"] is False  # float32 on the CPU
    assert payload["ratio"] == pytest.approx(rows["ours"]["tok_s"] / rows["original"]["tok_s"])
    assert payload["original"]["sources_sha256"]


def test_a_child_past_its_timeout_is_stopped_and_its_output_kept(tmp_path):
    code, output = bo._run_logged([sys.executable, "-c", "print('started', flush=True); import time; time.sleep(30)"],
                                  str(tmp_path), dict(os.environ), 2.0, str(tmp_path / "child.log"))
    assert code is None and "started" in output
    code, output = bo._run_logged([sys.executable, "-c", "import sys; print('bye'); sys.exit(3)"],
                                  str(tmp_path), dict(os.environ), 30.0, str(tmp_path / "child.log"))
    assert code == 3 and output.strip() == "bye"


def test_eager_fallback_reruns_the_original_with_no_compile_and_takes_the_ratio_from_it(tmp_path, monkeypatch):
    """--eager-fallback: a default run of the original that does not finish is followed by one with
    --no-compile (row 'original-eager'), and the ratio is taken against it; not where --no-compile was given."""
    seen = []

    def fake_run_original(args, corpus, tokenizer_dir, work):
        seen.append(args.original_args)
        if "--no-compile" in args.original_args:
            return dict(model="original", status="ok", tok_s=200.0, step_s=10.24, params=7)
        return dict(model="original", status="timeout after 210 s (1 step(s) done)")

    monkeypatch.setattr(bo, "run_original", fake_run_original)
    monkeypatch.setattr(bo, "run_ours",
                        lambda *a: dict(model="ours", status="ok", tok_s=60000.0, step_s=0.03, params=9))
    out = tmp_path / "r.json"
    argv = ["--original", str(fake_original(tmp_path)), "--work-dir", str(tmp_path / "w"), "--json", str(out),
            "--eager-fallback", "--original-args=--threads 2"]
    assert bo.main(argv) == 0
    payload = json.loads(out.read_text())
    assert seen == ["--threads 2", "--threads 2 --no-compile"]
    assert [r["model"] for r in payload["rows"]] == ["original", "original-eager", "ours"]
    assert payload["ratio"] == pytest.approx(300.0)
    seen.clear()
    assert bo.main([*argv[:-1], "--original-args=--no-compile"]) == 0  # already eager: no second run
    assert seen == ["--no-compile"]
    assert bo.eager_fallback(bo.parse_args(["--original", "x", "--original-args=--no-compile"])) is None


def test_without_the_fallback_a_timed_out_original_leaves_no_ratio_and_exit_1(tmp_path, monkeypatch):
    monkeypatch.setattr(bo, "run_original", lambda *a: dict(model="original", status="timeout after 5 s"))
    monkeypatch.setattr(bo, "run_ours", lambda *a: dict(model="ours", status="ok", tok_s=1.0, step_s=1.0, params=1))
    assert bo.main(["--original", str(fake_original(tmp_path)), "--work-dir", str(tmp_path / "w")]) == 1
