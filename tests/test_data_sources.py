"""Data sources: every file kind, folders, local HF datasets, record formats, and each bad-data line."""

import json

import pytest

from hierarchos.data import bundled_corpus_path, bundled_instructions_path
from hierarchos.data import sources as S
from hierarchos.data.sources import DataSpec, auto_max_length, load_texts
from hierarchos.errors import HierarchosError

ROWS = [{"text": f"record {i}: Fair is foul, and foul is fair — ünïcode 😀"} for i in range(4)]
ALPACA = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
          {"instruction": "Say hello.", "input": "", "output": "Hello!"}]


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "hf_cache")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def load(cache, **kwargs):
    return load_texts(DataSpec(cache_dir=cache, **kwargs))


def expect_error(message, cache, **kwargs):
    with pytest.raises(HierarchosError) as info:
        load(cache, **kwargs)
    assert str(info.value) == message
    return info


# --- file kinds -----------------------------------------------------------------------------
def test_jsonl(tmp_path, cache):
    loaded = load(cache, train=str(write_jsonl(tmp_path / "d.jsonl", ROWS)))
    assert loaded.texts == [r["text"] for r in ROWS]
    assert (loaded.template, loaded.name, loaded.n_records, loaded.pairs) == ("plain", "d.jsonl", 4, None)


def test_json_list_and_object(tmp_path, cache):
    (tmp_path / "list.json").write_text(json.dumps(ROWS), encoding="utf-8")
    assert load(cache, train=str(tmp_path / "list.json")).texts == [r["text"] for r in ROWS]
    (tmp_path / "obj.json").write_text(json.dumps({"version": 1, "data": ROWS}), encoding="utf-8")
    assert load(cache, train=str(tmp_path / "obj.json")).texts == [r["text"] for r in ROWS]
    write_jsonl(tmp_path / "lines.json", ROWS)  # JSON Lines named .json
    assert load(cache, train=str(tmp_path / "lines.json")).texts == [r["text"] for r in ROWS]


def test_txt_is_one_document(tmp_path, cache):
    text = "ACT I.\n\nFirst paragraph.\n\nSecond — paragraph 😀.\n"
    (tmp_path / "play.txt").write_text(text, encoding="utf-8")
    loaded = load(cache, train=str(tmp_path / "play.txt"))
    assert loaded.texts == [text] and loaded.template == "plain"


def test_csv_and_parquet(tmp_path, cache):
    from datasets import Dataset
    Dataset.from_list(ROWS).to_csv(str(tmp_path / "d.csv"), index=False)
    Dataset.from_list(ROWS).to_parquet(str(tmp_path / "d.parquet"))
    assert load(cache, train=str(tmp_path / "d.csv")).texts == [r["text"] for r in ROWS]
    assert load(cache, train=str(tmp_path / "d.parquet")).texts == [r["text"] for r in ROWS]


def test_folder_of_files_and_mixed_kinds(tmp_path, cache):
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", ROWS[:2])
    write_jsonl(folder / "b.jsonl", ROWS[2:])
    (folder / "README.md").write_text("not data")
    loaded = load(cache, train=str(folder))
    assert sorted(loaded.texts) == sorted(r["text"] for r in ROWS) and loaded.name == "corpus"
    (folder / "c.csv").write_text("text\nhello\n")
    expect_error(S.ERR_MIXED_KINDS.format(path=folder, kinds="csv, json"), cache, train=str(folder))
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    expect_error(S.ERR_NO_FILES.format(path=empty), cache, train=str(empty))


def test_bundled_data_loads(cache):
    corpus = load(cache, train=bundled_corpus_path())
    assert corpus.n_records == 4 and all("public domain" in t[:1200] for t in corpus.texts)
    instructions = load(cache, train=bundled_instructions_path())
    assert instructions.template == "alpaca" and instructions.n_records >= 300


# --- Hugging Face datasets, offline ---------------------------------------------------------
def test_saved_dataset_folder(tmp_path, cache):
    from datasets import Dataset, DatasetDict
    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    assert load(cache, train=str(tmp_path / "saved")).texts == [r["text"] for r in ROWS]
    assert load(cache, hf_dataset=str(tmp_path / "saved")).texts == [r["text"] for r in ROWS]
    DatasetDict({"train": Dataset.from_list(ROWS), "test": Dataset.from_list(ROWS[:1])}).save_to_disk(
        str(tmp_path / "dict"))
    half = load(cache, hf_dataset=str(tmp_path / "dict"), hf_dataset_split="train[:50%]")
    assert half.texts == [r["text"] for r in ROWS[:2]] and half.name.endswith("[train[:50%]]")
    assert load(cache, hf_dataset=str(tmp_path / "dict"), hf_dataset_split="test").n_records == 1
    expect_error(S.ERR_SPLIT_NOT_FOUND.format(path=tmp_path / "dict", split="validation", splits="train, test"),
                 cache, hf_dataset=str(tmp_path / "dict"), hf_dataset_split="validation")


def test_hf_dataset_on_folder_of_jsonl_with_slice(tmp_path, cache):
    folder = tmp_path / "hub_like"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", ROWS)
    write_jsonl(folder / "test.jsonl", ROWS[:1])
    assert load(cache, hf_dataset=str(folder)).texts == [r["text"] for r in ROWS]
    assert load(cache, hf_dataset=str(folder), hf_dataset_split="train[:50%]").texts == [
        r["text"] for r in ROWS[:2]]
    assert load(cache, hf_dataset=str(folder), hf_dataset_split="test").n_records == 1


def test_hub_name_not_cached_offline(monkeypatch, cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "no-such-user-3f9a/no-such-dataset"
    with pytest.raises(HierarchosError) as info:
        load(cache, hf_dataset=name)
    message = str(info.value)
    assert message.startswith(f"--hf_dataset {name}: could not load it (") and "\n" not in message
    assert message.endswith("or run once online so it is cached")


# --- record formats -------------------------------------------------------------------------
def test_alpaca_merges_instruction_and_input(tmp_path, cache):
    loaded = load(cache, train=str(write_jsonl(tmp_path / "a.jsonl", ALPACA)))
    assert loaded.template == "alpaca"
    first_prompt = S.ALPACA_TEMPLATE.format(instruction="Add the numbers.\n\n2 and 3")
    assert loaded.pairs == [(first_prompt, "5"), (S.ALPACA_TEMPLATE.format(instruction="Say hello."), "Hello!")]
    assert loaded.texts[0] == "### Instruction:\nAdd the numbers.\n\n2 and 3\n\n### Response:\n5"
    assert S.format_prompt("alpaca", "Add the numbers.", "2 and 3") == first_prompt


@pytest.mark.parametrize("thought_column", ["thought-process", "thought_process"])
def test_kayla_template(tmp_path, cache, thought_column):
    rows = [{"instruction": "Why?", "output": "Because.", thought_column: "Think first.", "feelings": "calm"}]
    loaded = load(cache, train=str(write_jsonl(tmp_path / "k.jsonl", rows)), kayla=True)
    assert loaded.template == "kayla"
    assert loaded.texts == ["### Instruction:\nWhy?\n\n### Thought Process:\nThink first.\n\n"
                            "### Feelings:\ncalm\n\n### Response:\nBecause."]
    assert loaded.pairs[0][0] == S.KAYLA_TEMPLATE.format(instruction="Why?")


def test_prompt_completion_and_text_column(tmp_path, cache):
    rows = [{"q": "Who?", "a": "Macbeth.", "body": "some body"}]
    path = str(write_jsonl(tmp_path / "pc.jsonl", rows))
    loaded = load(cache, train=path, prompt_column="q", completion_column="a")
    assert loaded.template == "prompt_completion"
    assert loaded.pairs == [("Who?\n", "Macbeth.")] and loaded.texts == ["Who?\nMacbeth."]
    assert load(cache, train=path, text_column="body").texts == ["some body"]


def test_empty_records_are_skipped(tmp_path, cache):
    loaded = load(cache, train=str(write_jsonl(tmp_path / "d.jsonl", ROWS[:2] + [{"text": "  "}, {"text": None}])))
    assert (loaded.n_records, loaded.n_skipped) == (2, 2)


# --- bad data: one exact line each -----------------------------------------------------------
def test_file_missing_and_empty(tmp_path, cache):
    missing = tmp_path / "nope.jsonl"
    expect_error(S.ERR_FILE_MISSING.format(path=missing), cache, train=str(missing))
    assert S.ERR_FILE_MISSING.format(path=missing) == f"data file not found: {missing}"
    for name, content in [("e.jsonl", ""), ("e.txt", "\n  \n"), ("e.csv", "text\n")]:
        (tmp_path / name).write_text(content)
        expect_error(f"data file is empty: {tmp_path / name}", cache, train=str(tmp_path / name))


def test_not_utf8(tmp_path, cache):
    path = tmp_path / "latin1.txt"
    path.write_bytes("line one\ncaf".encode() + "é".encode("latin-1") + b"\n")
    expect_error(f"{path} is not UTF-8 text (byte 12): re-encode it as UTF-8", cache, train=str(path))


def test_malformed_json_line_number(tmp_path, cache):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "fine"}\n{"text": "a" "b"}\n{"text": "broken\n')
    expect_error(f"{path} line 4: malformed JSON (Expecting ',' delimiter: column 14)", cache, train=str(path))
    assert S.ERR_BAD_JSON == "{path} line {line}: malformed JSON ({detail})"
    doc = tmp_path / "bad.json"
    doc.write_text('[\n  {"text": "a"},\n  {"text": "b",}\n]\n')
    with pytest.raises(HierarchosError, match=r"bad\.json line 3: malformed JSON \("):
        load(cache, train=str(doc))


def test_missing_column_and_no_format(tmp_path, cache):
    path = write_jsonl(tmp_path / "cols.jsonl", [{"a": "x", "b": "y", "c": "z"}])
    expect_error(f"{path}: no column 'body'; columns are: a, b, c", cache, train=str(path), text_column="body")
    expect_error(f"{path}: no column 'q'; columns are: a, b, c", cache, train=str(path),
                 prompt_column="q", completion_column="a")
    expect_error(f"{path}: no column 'instruction'; columns are: a, b, c", cache, train=str(path), kayla=True)
    expect_error(S.ERR_NO_FORMAT.format(path=path, columns="a, b, c"), cache, train=str(path))


def test_flag_conflicts(tmp_path, cache):
    path = str(write_jsonl(tmp_path / "d.jsonl", ROWS))
    expect_error("--train and --hf_dataset are mutually exclusive: pass one", cache, train=path, hf_dataset=path)
    expect_error("--text_column and --prompt_column/--completion_column are mutually exclusive", cache,
                 train=path, text_column="text", prompt_column="text")
    expect_error(S.ERR_PROMPT_WITHOUT_COMPLETION, cache, train=path, prompt_column="text")
    expect_error(S.ERR_PROMPT_WITHOUT_COMPLETION, cache, train=path, completion_column="text")
    expect_error(S.ERR_NO_SOURCE, cache)


def test_unsupported_extension(tmp_path, cache):
    (tmp_path / "d.xml").write_text("<a/>")
    expect_error(S.ERR_UNSUPPORTED.format(path=tmp_path / "d.xml", suffix=".xml"), cache,
                 train=str(tmp_path / "d.xml"))


def test_auto_max_length():
    assert auto_max_length([1, 17, 5]) == 32
    assert auto_max_length([32]) == 32
    assert auto_max_length([]) == 16
    assert auto_max_length([1000], cap=512) == 512


def test_missing_datasets_package_is_one_clear_line(tmp_path, cache, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(HierarchosError, match=r"needs the `datasets` package .*pip install datasets"):
        load(cache, train=str(write_jsonl(tmp_path / "d.jsonl", ROWS)))
