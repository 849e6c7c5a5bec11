"""Training text sources: local files and folders, Hugging Face datasets, and record formats.

`load_texts(DataSpec)` reads records through Hugging Face `datasets` (json / text / csv /
parquet builders, `load_from_disk`, hub names with config and split slices) and turns each
record into one training text: plain, prompt + completion, Alpaca or Kayla. Bad input raises
`HierarchosError` with one of the ERR_* lines below; nothing here prints a traceback.

A .txt file is one document (`sample_by="document"`): long documents are split into chunks
whose recurrent state is carried by the trainer, so paragraph boundaries are not cut here.
With `DataSpec.streaming` (--hf-streaming) a --hf_dataset is opened in datasets' streaming mode: an
IterableDataset read record by record, never downloaded or converted to Arrow whole.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from hierarchos.errors import HierarchosError

# --- prompt templates (chat reuses them; the trainer appends EOS after the completion) -------
ALPACA_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
KAYLA_TEMPLATE = "### Instruction:\n{instruction}\n\n### Thought Process:\n"
KAYLA_COMPLETION_TEMPLATE = "{thought_process}\n\n### Feelings:\n{feelings}\n\n### Response:\n{output}"
PROMPT_COMPLETION_TEMPLATE = "{prompt}\n"
INPUT_SEPARATOR = "\n\n"  # Alpaca/Kayla: instruction + INPUT_SEPARATOR + input when input is non-empty

# --- one-line errors ------------------------------------------------------------------------
ERR_FILE_MISSING = "data file not found: {path}"
ERR_FILE_EMPTY = "data file is empty: {path}"
ERR_NOT_UTF8 = "{path} is not UTF-8 text (byte {offset}): re-encode it as UTF-8"
ERR_BAD_JSON = "{path} line {line}: malformed JSON ({detail})"
ERR_MISSING_COLUMN = "{path}: no column '{column}'; columns are: {columns}"
ERR_NO_FORMAT = ("{path}: no 'text' column and no instruction/output columns: pass --text_column, "
                 "--prompt_column/--completion_column or --kayla; columns are: {columns}")
ERR_TRAIN_AND_HF = "--train and --hf_dataset are mutually exclusive: pass one"
ERR_TEXT_AND_PROMPT = "--text_column and --prompt_column/--completion_column are mutually exclusive"
ERR_PROMPT_WITHOUT_COMPLETION = "--prompt_column and --completion_column go together: pass both"
ERR_NO_SOURCE = "no training data: pass --train PATH or --hf_dataset NAME_OR_PATH"
ERR_UNSUPPORTED = "{path}: unsupported data file type '{suffix}': use .json, .jsonl, .txt, .csv or .parquet"
ERR_NO_FILES = "{path}: no data files (.json, .jsonl, .txt, .csv, .parquet) in this folder"
ERR_MIXED_KINDS = "{path}: folder mixes data file kinds ({kinds}): keep one kind per folder"
ERR_UNREADABLE = "{path}: could not read it as {kind} ({detail})"
ERR_JSON_NO_RECORDS = "{path}: a JSON object with no list of records inside: write a list of objects or JSON Lines"
ERR_NO_RECORDS = "{path}: no usable records (all {n} are empty)"
ERR_SPLIT_NOT_FOUND = "{path}: no split '{split}'; splits are: {splits}"
ERR_HF_LOAD = ("--hf_dataset {name}: could not load it ({detail}); check the name, --hf_dataset_config "
               "and --hf_dataset_split, or run once online so it is cached")

FILE_KINDS = {".json": "json", ".jsonl": "json", ".txt": "text", ".csv": "csv", ".parquet": "parquet"}
THOUGHT_COLUMNS = ("thought-process", "thought_process")


@dataclass
class DataSpec:
    """Where the training text comes from and how records map to text (the CLI's data flags)."""
    train: str | None = None
    hf_dataset: str | None = None
    hf_dataset_config: str | None = None
    hf_dataset_split: str = "train"
    text_column: str | None = None
    prompt_column: str | None = None
    completion_column: str | None = None
    kayla: bool = False
    cache_dir: str | None = None  # datasets' cache (default: HF_DATASETS_CACHE)
    streaming: bool = False       # --hf-streaming: the --hf_dataset as a datasets IterableDataset


@dataclass
class LoadedTexts:
    texts: list[str]  # one training text per record (prompt + completion for instruction formats)
    template: str     # "plain" | "prompt_completion" | "alpaca" | "kayla"
    name: str         # the dataset's name for the training history
    n_records: int    # records kept (== len(texts))
    pairs: list[tuple[str, str]] | None = None  # (prompt, completion) per text, instruction formats only
    n_skipped: int = 0  # records dropped because their text was empty
    columns: list[str] = field(default_factory=list)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# --- validating local files before datasets reads them --------------------------------------
def _scan_text_file(path: Path, jsonl: bool) -> None:
    """UTF-8 (byte offset of the first bad byte), non-empty, and for JSONL each line parses."""
    offset, has_content = 0, False
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise HierarchosError(ERR_NOT_UTF8.format(path=path, offset=offset + exc.start)) from None
            offset += len(raw)
            if not line.strip():
                continue
            has_content = True
            if jsonl:
                try:
                    json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as exc:
                    raise HierarchosError(ERR_BAD_JSON.format(
                        path=path, line=line_no, detail=f"{exc.msg}: column {exc.colno}")) from None
    if not has_content:
        raise HierarchosError(ERR_FILE_EMPTY.format(path=path))


def _json_field(path: Path) -> str | None:
    """A .json file is either JSON Lines or one document; returns datasets' `field` for {key: [..]}."""
    _scan_text_file(path, jsonl=False)
    text = path.read_text(encoding="utf-8")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as whole_error:
        first = next(line for line in text.splitlines() if line.strip())
        try:
            json.loads(first)
        except json.JSONDecodeError:  # not JSON Lines either: report the document's own error
            raise HierarchosError(ERR_BAD_JSON.format(
                path=path, line=whole_error.lineno,
                detail=f"{whole_error.msg}: column {whole_error.colno}")) from None
        _scan_text_file(path, jsonl=True)  # JSON Lines named .json: raises at a bad line
        return None
    if isinstance(document, dict):
        key = next((k for k, v in document.items() if isinstance(v, list)), None)
        if key is None:
            raise HierarchosError(ERR_JSON_NO_RECORDS.format(path=path))
        return key
    return None


def _check_file(path: Path) -> tuple[str, str | None]:
    """Validate one local data file; returns (datasets builder, json field)."""
    if not path.exists():
        raise HierarchosError(ERR_FILE_MISSING.format(path=path))
    kind = FILE_KINDS.get(path.suffix.lower())
    if kind is None:
        raise HierarchosError(ERR_UNSUPPORTED.format(path=path, suffix=path.suffix or path.name))
    if path.stat().st_size == 0:
        raise HierarchosError(ERR_FILE_EMPTY.format(path=path))
    if path.suffix.lower() == ".json":
        return kind, _json_field(path)
    if kind != "parquet":
        _scan_text_file(path, jsonl=path.suffix.lower() == ".jsonl")
    return kind, None


def _folder_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in FILE_KINDS
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise HierarchosError(ERR_NO_FILES.format(path=folder))
    kinds = sorted({FILE_KINDS[p.suffix.lower()] for p in files})
    if len(kinds) > 1:
        raise HierarchosError(ERR_MIXED_KINDS.format(path=folder, kinds=", ".join(kinds)))
    return files


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (
        (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file())


@contextlib.contextmanager
def _quiet_progress():
    from datasets.utils import logging as ds_logging
    was_enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            ds_logging.enable_progress_bar()


# --- loading --------------------------------------------------------------------------------
def _load_files(files: list[Path], where: Path, split: str, cache_dir: str | None, streaming: bool = False):
    from datasets import load_dataset
    checked = [_check_file(p) for p in files]
    kind, json_field = checked[0]
    kwargs = {"sample_by": "document"} if kind == "text" else {}
    if json_field is not None:
        kwargs["field"] = json_field
    if streaming:
        kwargs["streaming"] = True
    try:
        with _quiet_progress():
            return load_dataset(kind, data_files={"train": [str(p) for p in files]}, split=split,
                                cache_dir=cache_dir, **kwargs)
    except Exception as exc:
        if "corresponds to no data" in str(exc):  # datasets' way of saying: zero rows
            raise HierarchosError(ERR_FILE_EMPTY.format(path=where)) from None
        raise HierarchosError(ERR_UNREADABLE.format(path=where, kind=kind, detail=_one_line(exc))) from None


def _load_saved(folder: Path, split: str):
    from datasets import DatasetDict, ReadInstruction, load_from_disk
    with _quiet_progress():
        dataset = load_from_disk(str(folder))
    if isinstance(dataset, DatasetDict):
        base = split.split("[", 1)[0].strip()
        if base not in dataset:
            raise HierarchosError(ERR_SPLIT_NOT_FOUND.format(path=folder, split=base,
                                                             splits=", ".join(dataset.keys())))
        sizes = {name: len(part) for name, part in dataset.items()}
    else:
        base = split.split("[", 1)[0].strip()
        sizes = {base: len(dataset)}
        dataset = {base: dataset}
    if "[" not in split:
        return dataset[base]
    try:
        (instruction,) = ReadInstruction.from_spec(split).to_absolute(sizes)
    except Exception as exc:
        raise HierarchosError(ERR_SPLIT_NOT_FOUND.format(path=folder, split=split,
                                                         splits=", ".join(sizes))) from None
    return dataset[base].select(range(instruction.from_, instruction.to))


def _load_hub(spec: DataSpec):
    from datasets import load_dataset

    from hierarchos.data.tokenizers import hub_offline_mode, hub_reachable
    offline = contextlib.nullcontext() if hub_reachable() else hub_offline_mode()
    streaming = {"streaming": True} if spec.streaming else {}
    try:
        with _quiet_progress(), offline:
            return load_dataset(spec.hf_dataset, spec.hf_dataset_config, split=spec.hf_dataset_split,
                                cache_dir=spec.cache_dir, **streaming)
    except Exception as exc:
        raise HierarchosError(ERR_HF_LOAD.format(name=spec.hf_dataset, detail=_one_line(exc))) from None


def _require_datasets() -> None:
    """Every loader goes through Hugging Face `datasets`; say how to get it, not a traceback."""
    try:
        import datasets  # noqa: F401
    except ImportError as exc:
        raise HierarchosError(f"reading training data needs the `datasets` package ({_one_line(exc)}); "
                              "install it with `pip install datasets` (or run setup.sh)") from None


def _load_dataset(spec: DataSpec):
    """Returns (datasets.Dataset, where for messages, name for the history)."""
    _require_datasets()
    if spec.train and spec.hf_dataset:
        raise HierarchosError(ERR_TRAIN_AND_HF)
    if spec.train:
        path = Path(spec.train).expanduser()
        if path.is_dir():
            if _is_saved_dataset(path):
                return _load_saved(path, "train"), path, path.name
            return _load_files(_folder_files(path), path, "train", spec.cache_dir), path, path.name
        return _load_files([path], path, "train", spec.cache_dir), path, path.name
    if spec.hf_dataset:
        split = spec.hf_dataset_split or "train"
        name = spec.hf_dataset + (f":{spec.hf_dataset_config}" if spec.hf_dataset_config else "") + f"[{split}]"
        path = Path(spec.hf_dataset).expanduser()
        if path.is_dir():
            if _is_saved_dataset(path):
                return _load_saved(path, split), path, name
            for file in _folder_files(path):
                _check_file(file)
            from datasets import load_dataset
            streaming = {"streaming": True} if spec.streaming else {}
            try:
                with _quiet_progress():
                    dataset = load_dataset(str(path), spec.hf_dataset_config, split=split,
                                           cache_dir=spec.cache_dir, **streaming)
            except Exception as exc:
                if "corresponds to no data" in str(exc):
                    raise HierarchosError(ERR_FILE_EMPTY.format(path=path)) from None
                raise HierarchosError(ERR_HF_LOAD.format(name=spec.hf_dataset, detail=_one_line(exc))) from None
            return dataset, path, name
        if path.is_file():
            return _load_files([path], path, split, spec.cache_dir, spec.streaming), path, name
        return _load_hub(spec), spec.hf_dataset, name
    raise HierarchosError(ERR_NO_SOURCE)


# --- record formats -------------------------------------------------------------------------
def _field(value) -> str:
    return "" if value is None else str(value).strip()


def merge_instruction(instruction, input_text=None) -> str:
    """Alpaca's instruction and optional input as one instruction text."""
    instruction, input_text = _field(instruction), _field(input_text)
    return instruction + INPUT_SEPARATOR + input_text if input_text else instruction


def format_prompt(template: str, instruction: str, input_text: str | None = None) -> str:
    """The prompt a model trained on `template` expects for a user's instruction (chat uses it)."""
    merged = merge_instruction(instruction, input_text)
    if template == "alpaca":
        return ALPACA_TEMPLATE.format(instruction=merged)
    if template == "kayla":
        return KAYLA_TEMPLATE.format(instruction=merged)
    if template == "prompt_completion":
        return PROMPT_COMPLETION_TEMPLATE.format(prompt=merged)
    return merged


def _require(columns: list[str], wanted: Iterable[str], where) -> None:
    for column in wanted:
        if column not in columns:
            raise HierarchosError(ERR_MISSING_COLUMN.format(path=where, column=column,
                                                            columns=", ".join(columns)))


def _check_flags(spec: DataSpec) -> None:
    if spec.train and spec.hf_dataset:
        raise HierarchosError(ERR_TRAIN_AND_HF)
    if spec.text_column and (spec.prompt_column or spec.completion_column):
        raise HierarchosError(ERR_TEXT_AND_PROMPT)
    if bool(spec.prompt_column) != bool(spec.completion_column):
        raise HierarchosError(ERR_PROMPT_WITHOUT_COMPLETION)


def _records_to_texts(dataset, spec: DataSpec, where) -> tuple[str, list[str], list[tuple[str, str]] | None]:
    """Pick the format (explicit --text_column, --kayla, prompt/completion flags, Alpaca, 'text')."""
    columns = list(dataset.column_names)
    n = len(dataset)
    column = lambda name: dataset[name] if name in columns else [None] * n  # noqa: E731
    if spec.text_column or (not spec.kayla and not spec.prompt_column
                            and not {"instruction", "output"} <= set(columns) and "text" in columns):
        name = spec.text_column or "text"
        _require(columns, [name], where)
        return "plain", [_field(v) if not isinstance(v, str) else v for v in column(name)], None
    if spec.kayla:
        _require(columns, ["instruction", "output"], where)
        thought_name = next((c for c in THOUGHT_COLUMNS if c in columns), THOUGHT_COLUMNS[0])
        pairs = [(KAYLA_TEMPLATE.format(instruction=merge_instruction(ins, inp)),
                  KAYLA_COMPLETION_TEMPLATE.format(thought_process=_field(th), feelings=_field(fe),
                                                   output=_field(out)) if _field(out) else "")
                 for ins, inp, th, fe, out in zip(column("instruction"), column("input"),
                                                  column(thought_name), column("feelings"), column("output"))]
        template = "kayla"
    elif spec.prompt_column:
        _require(columns, [spec.prompt_column, spec.completion_column], where)
        pairs = [(PROMPT_COMPLETION_TEMPLATE.format(prompt=_field(p)), _field(c))
                 for p, c in zip(column(spec.prompt_column), column(spec.completion_column))]
        template = "prompt_completion"
    elif {"instruction", "output"} <= set(columns):
        pairs = [(ALPACA_TEMPLATE.format(instruction=merge_instruction(ins, inp)), _field(out))
                 for ins, inp, out in zip(column("instruction"), column("input"), column("output"))]
        template = "alpaca"
    else:
        raise HierarchosError(ERR_NO_FORMAT.format(path=where, columns=", ".join(columns)))
    return template, [p + c if c else "" for p, c in pairs], pairs


def load_texts(spec: DataSpec) -> LoadedTexts:
    """Load the records `spec` names and turn each into one training text (empty ones dropped)."""
    _check_flags(spec)
    dataset, where, name = _load_dataset(spec)
    if len(dataset) == 0:
        raise HierarchosError(ERR_FILE_EMPTY.format(path=where))
    template, texts, pairs = _records_to_texts(dataset, spec, where)
    keep = [i for i, text in enumerate(texts) if text.strip()]
    if not keep:
        raise HierarchosError(ERR_NO_RECORDS.format(path=where, n=len(texts)))
    return LoadedTexts(texts=[texts[i] for i in keep], template=template, name=name, n_records=len(keep),
                       pairs=[pairs[i] for i in keep] if pairs is not None else None,
                       n_skipped=len(texts) - len(keep), columns=list(dataset.column_names))


def auto_max_length(token_lengths: Iterable[int], cap: int | None = None, multiple: int = 16) -> int:
    """`--auto-max-length`: the longest record (in tokens, EOS included by the caller) rounded up
    to a multiple of `multiple` (16: friendly to chunked kernels and tensor cores), at least
    `multiple`, and at most `cap` when given."""
    longest = max(token_lengths, default=0)
    length = max(multiple, int(math.ceil(longest / multiple)) * multiple)
    return min(length, cap) if cap is not None else length
