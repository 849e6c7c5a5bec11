"""bench/bench_train_loop.py: one-line argument errors, our train flags for the shape, the fitted GPT-2,
the ratio and table, and both halves end to end on a tiny CPU shape (float32, no compile)."""

import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))

import bench_train_loop as btl  # noqa: E402
from hierarchos.errors import HierarchosError  # noqa: E402


@pytest.mark.parametrize("flags, needle", [
    (["--width", "100"], "--width 100"),
    (["--width", "0"], "--width 0"),
    (["--h-layers", "0"], "--h-layers 0"),
    (["--steps", "0"], "--steps 0"),
    (["--warmup", "0"], "--warmup 0"),
    (["--seq-len", "1"], "--seq-len 1"),
    (["--lr", "0"], "--lr 0"),
    (["--corpus", "/no/such/file.txt"], "--corpus"),
    (["--corpus-mb", "0"], "--corpus-mb 0"),
    (["--ours-args", "--flag 'unclosed"], "--ours-args"),
    (["--ours-variants", "", "--flag 'unclosed"], "--ours-variants"),
    (["--json", "/no/such/dir/out.json"], "--json"),
])
def test_bad_arguments_are_one_line_errors_naming_the_flag(flags, needle):
    with pytest.raises(HierarchosError) as info:
        btl.validate(btl.parse_args(["--device", "cpu", *flags]))
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_width_error_suggests_a_multiple_of_the_head_size():
    with pytest.raises(HierarchosError, match="try 128"):
        btl.validate(btl.parse_args(["--device", "cpu", "--width", "130"]))


def test_our_flags_hold_the_shape_and_the_minimal_depth_and_later_flags_win():
    args = btl.parse_args(["--device", "cpu", "--width", "256", "--h-layers", "2", "--l-layers", "5",
                           "--ours-args", "--max_l_steps 2"])
    flags = btl.ours_flags(args)
    pairs = dict(zip(flags[::2], flags[1::2]))
    assert pairs["--tokenizer-path"] == "byte" and pairs["--context_dim"] == "256"
    assert pairs["--h_layers"] == "2" and pairs["--l_layers"] == "5"
    assert pairs["--max_length"] == "512" and pairs["--batch_size"] == "32"
    assert flags.index("--max_l_steps") < len(flags) - 2 and flags[-2:] == ["--max_l_steps", "2"]


def test_a_variant_of_flags_passes_when_it_starts_with_a_space():
    """gpu.sh's train-loop suite passes '' ' --no-compile': the leading space keeps argparse from reading
    the string as an option, and the flags reach train without it."""
    args = btl.parse_args(["--device", "cpu", "--ours-variants", "", " --no-compile"])
    assert args.ours_variants == ["", " --no-compile"]
    assert btl.ours_flags(args, args.ours_variants[1])[-1] == "--no-compile"


def test_corpus_is_the_repository_text_cut_to_size(tmp_path):
    path = str(tmp_path / "c.txt")
    n = btl.write_corpus(path, 0.05)
    data = open(path, "rb").read()
    assert n == len(data) == 50_000
    assert b"hierarchos" in data and not os.path.exists(path + ".tmp")


def test_ratio_and_table_need_both_rows():
    ours = dict(model="hierarchos (train command)", status="ok", tok_s=300.0, step_s=0.1, params=1000)
    fast = dict(model="hierarchos (train command) --compile", status="ok", tok_s=500.0, step_s=0.06, params=1000)
    gpt = dict(model="GPT-2 (plain loop)", config="L2-d64", status="ok", tok_s=400.0, step_s=0.075, params=990)
    assert btl.ratio([ours, fast, gpt]) == pytest.approx(0.75)      # the first ours row by default
    assert btl.ratio([ours, fast, gpt], fast) == pytest.approx(1.25)
    assert btl.ratio([ours, dict(gpt, status="failed")]) is None
    assert btl.ratio([dict(ours, status="timeout"), fast, gpt]) is None
    table = btl.format_table([ours, fast, gpt], dict(device="cpu", seq_len=8, batch=2, steps=3, warmup=1))
    assert "0.750x" in table and "L2-d64" in table and "75.0" in table and "1.250" in table
    assert "3,271" in btl.format_table([ours, dict(gpt, peak_mib=3271)], dict(device="cpu", seq_len=8, batch=2,
                                                                               steps=3, warmup=1))


def test_both_halves_run_on_a_tiny_cpu_shape(tmp_path):
    out = tmp_path / "r.json"
    code = btl.main(["--device", "cpu", "--width", "64", "--h-layers", "1", "--l-layers", "1", "--seq-len", "16",
                     "--batch", "2", "--steps", "2", "--warmup", "1", "--corpus-mb", "0.05",
                     "--work-dir", str(tmp_path / "w"), "--json", str(out), "--ours-variants", "", "--max_l_steps 1"])
    assert code == 0
    payload = json.loads(out.read_text())
    ours, variant, gpt = payload["rows"]
    assert ours["status"] == variant["status"] == gpt["status"] == "ok"
    assert variant["model"] == "hierarchos (train command) --max_l_steps 1"
    at = variant["argv"].index("--epochs")  # the variant's flags come last, before the run's own
    assert variant["argv"][at - 2:at] == ["--max_l_steps", "1"] and variant["argv"][at - 4:at - 2] != ["--max_l_steps", "1"]
    assert (tmp_path / "w" / "ours_max_l_steps_1.log").is_file()
    assert ours["tok_s"] > 0 and gpt["tok_s"] > 0 and payload["ratio"] == pytest.approx(ours["tok_s"] / gpt["tok_s"])
    assert payload["ratios"][variant["model"]] == pytest.approx(variant["tok_s"] / gpt["tok_s"])
    # GPT-2 is fitted to our count without the DeepEmbed tables, within 10% at this size
    assert ours["params"] < ours["params_with_deepembed"]
    assert abs(gpt["params"] - ours["params"]) / ours["params"] < 0.1
    assert gpt["vocab_size"] >= 256 and gpt["compile"] is False
