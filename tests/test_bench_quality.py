"""bench/bench_quality.py's building blocks (issue 19): the corpus builder is deterministic, keeps held-out
files apart and never splits identical content; its byte ids are the `byte` tokenizer's; the recall
task's answers are where and what the generator says; GPT-2's size rule and the rank correlation."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import bench_quality as bq  # noqa: E402


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**31)


def fake_tree(root: Path, seed: int, n: int = 120) -> None:
    """n random modules, and more until three of them are validation files (the split is 2%)."""
    rng = random.Random(seed)
    i, held_out = 0, 0
    while i < n or held_out < 3:
        path = root / f"pkg{i % 7}" / f"mod_{i}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [f"def f_{i}_{j}(x):\n    return x * {rng.randrange(1000)}\n" for j in range(rng.randrange(1, 30))]
        path.write_text("".join(lines), encoding="utf-8")
        held_out += bq.is_validation("".join(lines).encode())
        i += 1
    (root / "pkg0" / "dup_a.py").write_text("same = 1\n" * 50, encoding="utf-8")
    (root / "pkg1" / "dup_b.py").write_text("same = 1\n" * 50, encoding="utf-8")  # identical content
    (root / "pkg2" / "latin.py").write_bytes(b"x = '\xe9'\n")  # not UTF-8: skipped
    (root / "pkg3" / "notes.txt").write_text("not python\n", encoding="utf-8")
    (root / "__pycache__").mkdir(exist_ok=True)
    (root / "__pycache__" / "cached.py").write_text("skipped = True\n", encoding="utf-8")
    nested = root / "site"  # another root inside this one: walked only as itself
    nested.mkdir(exist_ok=True)
    (nested / "inner.py").write_text("inner = 1\n", encoding="utf-8")


def texts(path: Path) -> list[str]:
    return bq.read_texts(path)


def test_corpus_is_deterministic_held_out_by_file_and_prefix_stable(tmp_path):
    seed = fresh_seed()
    src = tmp_path / "src"
    fake_tree(src, seed)
    roots = [("lib", src), ("site", src / "site")]
    a = bq.build_corpus(tmp_path / "a", 4000, 600, roots, seed=3)
    b = bq.build_corpus(tmp_path / "b", 4000, 600, roots, seed=3)
    for split in ("train", "val"):
        assert a[split]["sha256"] == b[split]["sha256"], f"seed {seed}"
        assert (tmp_path / "a" / a[split]["file"]).read_bytes() == (tmp_path / "b" / b[split]["file"]).read_bytes()
    train, val = texts(tmp_path / "a" / a["train"]["file"]), texts(tmp_path / "a" / a["val"]["file"])
    assert a["train"]["bytes"] == sum(len(t.encode()) for t in train) <= 4000
    assert a["val"]["bytes"] == sum(len(t.encode()) for t in val) <= 600
    assert a["train"]["reached_budget"] and train and val
    # whole lines only, and no text on both sides (identical files land in one split, once)
    assert all(t.endswith("\n") for t in train + val)
    assert not set(train) & set(val)
    everything = train + val
    assert sum("same = 1" in t for t in everything) <= 1
    assert not any("skipped = True" in t or "not python" in t or "x = '" in t for t in everything)
    assert sum("inner = 1" in t for t in everything) <= 1  # the nested root is not walked twice
    # the split is a property of the content: every kept file's side is what is_validation says
    full_files = {p.read_bytes().decode("utf-8", "replace"): p for p in src.rglob("*.py")}
    for t in everything:
        if t in full_files:  # not cut at the budget
            assert bq.is_validation(t.encode()) == (t in val)
    # a larger training budget keeps the same order: the smaller corpus is its prefix (up to the cut line)
    big = bq.build_corpus(tmp_path / "a", 9000, 600, roots, seed=3)
    big_train = "".join(texts(tmp_path / "a" / big["train"]["file"]))
    assert big_train.startswith("".join(train[:-1])) and big["val"]["sha256"] == a["val"]["sha256"]
    # another seed, another order
    other = bq.build_corpus(tmp_path / "c", 4000, 600, roots, seed=4)
    assert other["train"]["sha256"] != a["train"]["sha256"]
    # the manifest is reused only when it describes the same build
    assert json.loads((tmp_path / "a" / "manifest-4000-600-s3.json").read_text())["train"]["sha256"] == a["train"]["sha256"]


def test_byte_ids_are_the_byte_tokenizers():
    from hierarchos.data.tokenizers import build_byte_tokenizer

    tok = build_byte_tokenizer()
    docs = ["def f():\n    return 'é€'\n", "x = 1\n"]
    want = [i for d in docs for i in tok.encode(d) + [tok.eos_id]]
    assert bq.byte_tokens(docs).tolist() == want
    assert tok.eos_id == bq.EOS_ID and tok.vocab_size == bq.BYTE_VOCAB


FILLER = "".join(f"line {i}: value = compute({i}, {i * 7 % 13})\n" for i in range(2000))


def test_recall_documents_hold_their_answers_far_from_the_facts():
    seed = fresh_seed()
    docs = bq.make_recall_docs(5, FILLER, n_facts=6, gap_bytes=3000, n_queries=4, seed=seed)
    again = bq.make_recall_docs(5, FILLER, n_facts=6, gap_bytes=3000, n_queries=4, seed=seed)
    assert [d["text"] for d in docs] == [d["text"] for d in again], f"seed {seed}"
    for doc in docs:
        text = doc["text"]
        assert text.isascii()
        facts = dict(line.split(" ", 1)[1].split(" = ") for line in text.splitlines() if line.startswith("fact "))
        assert len(facts) == 6
        queries = [line for line in text.splitlines() if line.startswith("query ")]
        assert len(queries) == len(doc["answers"]) == 4
        last_fact = text.rfind("fact ")
        for (offset, value), line in zip(doc["answers"], queries):
            key = line.split(" ")[1]
            assert text[offset:offset + 6] == value == facts[key], f"seed {seed}"
            assert text[offset - len(f"query {key} = "):offset] == f"query {key} = "
            assert text.count(f"{key} = ") == 2  # the fact and its query: the filler never names a key
            assert offset - last_fact >= 3000
        gap = text[text.find("\n", last_fact) + 1:text.find("query ")]
        assert 3000 <= len(gap) <= 3000 + bq.gap_slack(3000), f"seed {seed}"
        assert len({line.split(" ")[1] for line in queries}) == 4  # distinct facts queried


def test_recall_generator_refuses_impossible_requests():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="filler"):
        bq.make_recall_doc(rng, "short\n", 2, 100, 1)
    with pytest.raises(ValueError, match="n_queries"):
        bq.make_recall_doc(rng, FILLER, 2, 100, 3)
    # one very long line: every whole-line slice overshoots the gap's bound (the training corpus's long
    # lines once stretched 256-byte gaps to ~4.5 KB on average)
    with pytest.raises(ValueError, match="lines are too long"):
        bq.make_recall_doc(rng, "x" * 5000 + "\nshort\n", 2, 100, 1)


def test_gpt2_layer_rule_and_its_count():
    pytest.importorskip("transformers")
    width = 64
    for n_layer in (1, 3):
        _, non_emb = bq.gpt2_model(width, n_layer, 32)
        assert non_emb == n_layer * (12 * width * width + 13 * width) + 2 * width
        assert bq.gpt2_layers_for(non_emb, width) == n_layer


def test_rank_correlation_by_hand():
    x = np.array([1.0, 2.0, 2.0, 4.0])
    y = np.array([10.0, 30.0, 20.0, 40.0])
    assert bq._ranks(x).tolist() == [0.0, 1.5, 1.5, 3.0]
    c = bq.correlations(x, y)
    assert c["spearman"] == pytest.approx(np.corrcoef([0, 1.5, 1.5, 3], [0, 2, 1, 3])[0, 1])
    assert bq.correlations(np.ones(5), np.arange(5.0))["pearson"] is None


def _tiny_model(seed: int, calibrate_on: np.ndarray | None = None, **overrides):
    """A random tiny hierarchos over the byte vocabulary, in float64 (the forms compared below agree to
    rounding). With `calibrate_on` (token ids), its ACT halting head is scaled up and centred on those
    tokens' halting logits, so that plan points halt after different numbers of passes."""
    import torch

    from hierarchos.config import tiny_config
    from hierarchos.model.lm import HierarchosLM

    torch.manual_seed(seed)
    cfg = tiny_config(vocab_size=260, max_h_steps=4, h_stride=3, h_halt_thresh=0.6, **overrides)
    model = HierarchosLM(cfg).double().eval()
    halt = getattr(model.reasoner, "h_halt_proj", None)
    if halt is not None and calibrate_on is not None:
        with torch.no_grad():
            halt.weight.mul_(120)
            halt.bias.zero_()
            logits = []
            hook = halt.register_forward_hook(lambda module, args, out: logits.append(out.flatten()))
            model(torch.as_tensor(calibrate_on)[None])
            hook.remove()
            halt.bias.fill_(-torch.cat(logits).mean().item())
    return model


def _random_text(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice("abc def\n=0123") for _ in range(n))


@pytest.mark.parametrize("halting", ["act", "q"])
def test_parallel_ponder_and_loss_is_the_step_form(halting):
    """The act table's parallel form (halting steps from the reasoner's record, spread to the tokens
    each plan point leads) gives the step-by-step reference's arrays, over several windows."""
    import torch

    seed = fresh_seed()
    tokens = bq.byte_tokens([_random_text(seed, 200)])
    for attempt in range(20):  # ACT: a model whose plan points halt after different numbers of passes
        model = _tiny_model(seed + attempt, calibrate_on=tokens[:40], halting=halting)
        steps, losses = bq.ponder_and_loss(model, tokens, torch.device("cpu"), seq_len=48)
        if halting == "q" or len(np.unique(steps[~np.isnan(steps)])) > 1:
            break
    else:
        pytest.fail(f"seed {seed}: no model of 20 halted after different numbers of passes")
    ref_steps, ref_losses = bq.ponder_and_loss_reference(model, tokens, torch.device("cpu"))
    assert np.array_equal(np.isnan(steps), np.isnan(ref_steps)), seed
    live = ~np.isnan(ref_steps)
    assert live.sum() > 190 and np.isnan(ref_steps[:2]).all(), seed  # the first plan point is token 2
    np.testing.assert_allclose(steps[live], ref_steps[live], err_msg=str(seed))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6, err_msg=str(seed))  # both in float32
    assert model.reasoner.halting_record is None  # the recording is switched off again


def test_parallel_ponder_rows_are_independent_pieces():
    import torch

    seed = fresh_seed()
    model = _tiny_model(seed)
    tokens = bq.byte_tokens([_random_text(seed, 61)])  # 62 ids: two rows of 30, one id left over
    steps, losses = bq.ponder_and_loss(model, tokens, torch.device("cpu"), seq_len=8, rows=2)
    for r in range(2):
        part = tokens[r * 30:r * 30 + 31]
        ref_steps, ref_losses = bq.ponder_and_loss_reference(model, part, torch.device("cpu"))
        np.testing.assert_allclose(steps[r * 30:(r + 1) * 30], ref_steps, err_msg=str(seed))
        np.testing.assert_allclose(losses[r * 30:(r + 1) * 30], ref_losses, rtol=1e-6, err_msg=str(seed))


@pytest.mark.parametrize("context", [8, 24])
def test_batched_bits_per_byte_at_context_is_the_reference(context):
    """Segments read side by side (rows of 2, a shorter last segment alone) give the one-segment-at-a-
    time reference's bits per byte."""
    import torch

    seed = fresh_seed()
    model = _tiny_model(seed)
    text = _random_text(seed, 83)
    tokens = bq.byte_tokens([text])
    got = bq.hierarchos_bpb_at_context(model, tokens, len(text), 8, context, torch.device("cpu"), rows=2)
    want = bq.hierarchos_bpb_at_context_reference(model, tokens, len(text), 8, context, torch.device("cpu"))
    assert got == pytest.approx(want, rel=1e-6), seed  # losses summed in float32


def test_batched_recall_accuracy_is_the_reference():
    """Documents of different lengths read side by side (padded at their ends) are scored as the
    one-document-at-a-time reference scores them; a model that copies facts scores 1."""
    import torch

    seed = fresh_seed()
    model = _tiny_model(seed)
    # lines of varied lengths, so that the documents' lengths differ (with equal-length lines 149 of 3,000
    # seeds drew five documents of one length, and the precondition below failed)
    filler = "".join(f"line {i} of filler text{'.' * (i % 11)}\n" for i in range(200))
    docs = bq.make_recall_docs(5, filler, n_facts=3, gap_bytes=40 + seed % 30, n_queries=3, seed=seed)
    assert len({len(d["text"]) for d in docs}) > 1
    got = bq.recall_accuracy(model, docs, 16, torch.device("cpu"), rows=2)
    assert got == bq.recall_accuracy_reference(model, docs, 16, torch.device("cpu")), seed
    assert got["queries"] == 15

    class Oracle(torch.nn.Module):  # logits that put each document's next byte first
        def __init__(self, docs):
            super().__init__()
            self.next = {}
            for d in docs:
                ids = bq.byte_tokens([d["text"]])
                self.next[tuple(ids[:8].tolist())] = ids

        def forward(self, x, state=None):
            pos = 0 if state is None else state["pos"]
            rows = []
            for r in range(x.shape[0]):
                ids = state["ids"][r] if state is not None else self.next[tuple(x[r, :8].tolist())]
                rows.append(ids)
            logits = torch.full((x.shape[0], x.shape[1], 260), -1.0)
            for r, ids in enumerate(rows):
                for t in range(x.shape[1]):
                    if pos + t + 1 < len(ids):
                        logits[r, t, ids[pos + t + 1]] = 1.0
            return type("Out", (), dict(logits=logits, state={"pos": pos + x.shape[1], "ids": rows}))

    oracle = Oracle(docs)
    assert bq.recall_accuracy(oracle, docs, 16, torch.device("cpu"), rows=2)["query_accuracy"] == 1.0
    assert bq.recall_accuracy_reference(oracle, docs, 16, torch.device("cpu"))["query_accuracy"] == 1.0


def test_cached_run_is_trained_again_only_when_its_model_is_needed_and_missing(tmp_path):
    """Run records carried from another device call have no model directory here: a table that
    reads the model trains it again (the record stays as it was); a table that reads only the
    record does not."""
    from types import SimpleNamespace

    args = SimpleNamespace(work=str(tmp_path), fresh=False)
    (tmp_path / "runs").mkdir()
    calls = []

    def train():
        calls.append(1)
        model_dir = tmp_path / f"model{len(calls)}"
        model_dir.mkdir()
        (model_dir / "hierarchos_config.json").write_text("{}")
        return dict(val_bpb=1.5 + len(calls), model_dir=str(model_dir))

    spec = dict(kind="hierarchos", lr=1e-3)
    first = bq.cached(args, "row", spec, train)
    assert calls == [1] and first["val_bpb"] == 2.5
    record = next((tmp_path / "runs").glob("row-*.json"))
    (tmp_path / "half_written").mkdir()  # a run killed before its model was saved
    carried = {**json.loads(record.read_text()), "model_dir": str(tmp_path / "half_written")}
    record.write_text(json.dumps(carried))
    assert bq.cached(args, "other-name", spec, train)["val_bpb"] == 2.5 and calls == [1]
    again = bq.cached(args, "row", spec, train, need_model=True)
    assert calls == [1, 1] and Path(again["model_dir"]).is_dir() and again["recorded"]["val_bpb"] == 2.5
    assert json.loads(record.read_text()) == carried  # the table's figure is not replaced
    present = bq.cached(args, "row", {**spec, "lr": 2e-3}, train)
    assert bq.cached(args, "row", {**spec, "lr": 2e-3}, train, need_model=True) == present and len(calls) == 3


def test_wiring_rows_are_the_minimal_depth_and_the_last_is_main_tables_minimal():
    """The x070 row is the main table's minimal configuration (x070's wiring is the default); the
    first row, ours, keeps the cache key the main table's minimal runs had before the switch (a key
    naming no wiring field means ours), so those runs are this row's."""
    from types import SimpleNamespace

    args = SimpleNamespace(width=512, seq_len=512, tiny=False)
    rows = bq.wiring_variants()
    main_minimal = bq.hierarchos_fields(args, **bq.REASONING["minimal"])
    assert bq.hierarchos_fields(args, **rows["x070"]) == main_minimal  # the same spec: its runs are reused
    before = {k: v for k, v in main_minimal.items() if not k.startswith("tm_")}  # the key of the old runs
    assert bq.run_spec_fields(bq.hierarchos_fields(args, **rows["hierarchos"])) == before
    assert bq.run_spec_fields(main_minimal) == main_minimal  # x070's fields differ from ours: all kept
    for label, overrides in rows.items():
        fields = bq.hierarchos_fields(args, **overrides)
        assert (fields["h_cycles"], fields["max_h_steps"], fields["max_l_steps"]) == (1, 1, 0), label
    assert len({tuple(sorted(bq.hierarchos_fields(args, **o).items())) for o in rows.values()}) == len(rows)


def test_the_quality_tables_default_row_is_the_2_5_5_reasoning_config_by_name():
    """bench_quality's "default" rows name the (2,5,5) depth in their fields (so in the run cache's
    keys): ModelConfig's default depth moved to minimal, and every cached "default" run still stands
    for (2,5,5); a minimal row keeps its own three fields."""
    from types import SimpleNamespace

    args = SimpleNamespace(width=512, seq_len=512, tiny=False)
    fields = bq.hierarchos_fields(args, **bq.REASONING["default"])
    assert {k: fields[k] for k in ("h_cycles", "max_h_steps", "max_l_steps")} == dict(h_cycles=2, max_h_steps=5,
                                                                                      max_l_steps=5)
    assert bq.run_spec_fields(fields)["max_l_steps"] == 5  # in the key, not left to the default
    minimal = bq.hierarchos_fields(args, **bq.REASONING["minimal"])
    assert {k: minimal[k] for k in ("h_cycles", "max_h_steps", "max_l_steps")} == dict(h_cycles=1, max_h_steps=1,
                                                                                       max_l_steps=0)


def test_equal_gpu_time_takes_a_solo_rate_and_trains_one_when_every_point_shared(monkeypatch):
    """The equal-time seconds come from a rate with the device to itself: the best point's when it ran
    alone, else the fastest lone point's, else the best LR trained again alone as a run of its own spec
    (a record from before runs noted `solo` counts as shared)."""
    def point(lr, bpb, rate, solo):
        r = dict(val_bpb=bpb, tokens_per_s=rate, spec=dict(lr=lr))
        if solo is not None:
            r["solo"] = solo
        return r

    calls = []

    def fake_train(args, corpus, fields, lr, name, rate_run=False, **_):
        calls.append((lr, name, rate_run))
        return dict(tokens_per_s=777.0)

    monkeypatch.setattr(bq, "train_hierarchos", fake_train)
    best_alone = point(1e-3, 1.4, 100.0, True)
    assert bq.solo_rate(None, None, "x", {}, dict(best=best_alone, points=[best_alone])) == (100.0, "best point")
    best_shared = point(1e-3, 1.4, 50.0, False)
    pts = [point(2.5e-4, 1.6, 120.0, True), point(5e-4, 1.5, 90.0, None), best_shared]
    assert bq.solo_rate(None, None, "x", {}, dict(best=best_shared, points=pts)) == (120.0, "fastest lone point")
    assert calls == []
    pts = [point(2.5e-4, 1.6, 300.0, False), point(5e-4, 1.5, 90.0, None), best_shared]
    rate, how = bq.solo_rate(None, None, "x", {}, dict(best=best_shared, points=pts))
    assert (rate, how) == (777.0, "best LR trained again alone") and calls == [(1e-3, "x-solo-lr0.001", True)]


def test_ablation_rows_start_from_the_minimal_depth_and_grad_steps_from_2_5_5():
    from types import SimpleNamespace

    args = SimpleNamespace(width=512, seq_len=512, tiny=False)
    rows = {label: bq.hierarchos_fields(args, **o) for label, o in bq.ablation_variants().items()}
    first = next(iter(rows.values()))
    assert first == bq.hierarchos_fields(args, **bq.REASONING["minimal"])  # the main table's minimal runs
    assert rows["depth 2,5,5"] == bq.hierarchos_fields(args, **bq.REASONING["default"])
    depth = ("h_cycles", "max_h_steps", "max_l_steps")
    for label, fields in rows.items():
        want = {"depth 2,2,2": (2, 2, 2), "depth 2,5,5": (2, 5, 5), "depth 2,5,5 + grad_steps 2": (2, 5, 5)}
        assert tuple(fields[k] for k in depth) == want.get(label, (1, 1, 0)), label
        changed = {k for k in fields.keys() | first.keys() if fields.get(k) != first.get(k)} - set(depth)
        assert len(changed) <= 1, (label, changed)  # one switch a row
    assert rows["depth 2,5,5 + grad_steps 2"]["grad_steps"] == 2


def test_recall_scoring_counts_special_token_guesses_as_wrong_digits():
    """A model may guess a special id (EOS is 256 or above in the byte vocabulary) where a digit
    belongs: a wrong digit, not a crash (a fresh-seed run of the test above found it)."""
    doc = {"answers": [(3, "123456")], "text": ""}
    pred = np.array([0, 0, ord("1"), ord("2"), 258, ord("4"), ord("5"), ord("6"), 0])
    got = bq._score_recall([doc], [pred])
    assert got["queries"] == 1 and got["query_accuracy"] == 0.0 and got["digit_accuracy"] == 5 / 6
    pred[4] = ord("3")
    assert bq._score_recall([doc], [pred])["query_accuracy"] == 1.0


def test_recall_runs_of_every_gap_train_on_about_the_same_tokens():
    """One command gives the whole recall table (gaps inside a window, a few windows, 20K): each gap's
    document count is chosen for about --recall-tokens of training text, whatever the gap."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    for gap in (256, 2048, 20_000):
        n = bq.recall_docs_for(gap, 2_000_000, 8)
        docs = [bq.make_recall_doc(rng, FILLER * 8, 8, gap, 8) for _ in range(3)]
        mean = sum(len(d["text"]) for d in docs) / len(docs)
        assert 0.8 < n * mean / 2_000_000 < 1.2, (seed, gap, n, mean)
    assert bq.recall_docs_for(20_000, 100, 8) == 1  # never zero documents


def test_device_runs_count_every_process_and_forget_dead_ones(tmp_path):
    """Two tables side by side (two processes, one run log) see each other's runs: a run is solo only
    when nothing else ran at its start and nothing started before its end; a start left by a process
    that died no longer counts."""
    log = tmp_path / "runs.log"
    table_a, table_b = bq.DeviceRuns(log), bq.DeviceRuns(log)

    run, sharing = table_a.start()
    assert sharing == 1 and table_a.end(run, sharing)

    first, sharing_first = table_a.start()
    second, sharing_second = table_b.start()  # another table starts while the first trains
    assert (sharing_first, sharing_second) == (1, 2)
    assert not table_b.end(second, sharing_second)
    assert not table_a.end(first, sharing_first)  # alone at its start, but another started before its end

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with open(log, "a") as f:  # a table killed by its timeout mid-run: a start with no end
        f.write(f"start {dead.pid}:abc\n")
    run, sharing = table_a.start()
    assert sharing == 1 and table_a.end(run, sharing)
    assert table_a.running() == set()


def test_recall_documents_come_out_the_same_from_the_once_made_ascii_filler():
    """make_recall_docs makes the filler's ASCII text once for all documents (it was a whole-corpus copy
    per document: minutes for a 20 MB corpus); the documents are the ones each call alone makes."""
    seed = fresh_seed()
    filler = FILLER + "caf\u00e9 = 1\n" * 40 + FILLER  # non-ASCII bytes the filler drops
    docs = bq.make_recall_docs(6, filler, n_facts=4, gap_bytes=300, n_queries=3, seed=seed)
    rng = np.random.default_rng(seed)
    alone = [bq.make_recall_doc(rng, filler, 4, 300, 3) for _ in range(6)]
    assert docs == alone, seed
    assert all(d["text"].isascii() for d in docs)
