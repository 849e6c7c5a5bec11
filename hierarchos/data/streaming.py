"""Training text as a stream of bounded pieces, for the token cache (hierarchos.data.token_cache).

`open_source(DataSpec)` checks the flags and the files without reading them whole. Local .txt and
.jsonl files are read by our own readers: a .txt file in 1 MiB reads, a JSONL file line by line,
and every text is cut into pieces of about 1 MiB, so no file is ever one Python string (a JSON line
is held once while it is parsed). Other sources (.json documents, .csv, .parquet, saved datasets,
hub names) go through Hugging Face `datasets`, whose Arrow files are memory-mapped, iterated in
batches; with --hf-streaming a --hf_dataset is read as datasets' IterableDataset instead (records
arrive over the network or from the files one batch at a time; nothing is converted to Arrow).
Records become texts by the same rules and with the same one-line errors as `load_texts`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from hierarchos.errors import HierarchosError

from . import sources as S

PIECE_CHARS = 1 << 16   # a text is cut into pieces of about this many characters
READ_BYTES = 1 << 20    # a .txt file is read this many bytes at a time
RECORD_BATCH = 512      # records formatted at once
SAMPLE_BYTES = 1 << 16  # a file's fingerprint hashes its first and last 64 KiB


def cut_point(text: str, lo: int) -> int:
    """The last index in text[lo:] where a whitespace character follows a non-whitespace one, or
    len(text) when there is none. Byte-level BPE (GPT-2's pre-tokenizer), byte and char tokenizers
    never join the characters on both sides of such a point into one pre-token, so tokenizing the
    pieces one by one gives the ids of the whole text."""
    best = -1
    for space in ("\n", " ", "\t"):
        pos = text.rfind(space, lo)
        while pos > lo and text[pos - 1].isspace():  # inside a run of whitespace: not a cut point
            pos = text.rfind(space, lo, pos)
        if pos > lo and pos > 0:
            best = max(best, pos)
    return best if best > 0 else len(text)


def pieces(text: str, size: int | None = None) -> Iterator[str]:
    """`text` in pieces of about `size` (default PIECE_CHARS) characters, cut where `cut_point` allows."""
    size = size or PIECE_CHARS
    start = 0
    while len(text) - start > size:
        window = text[start:start + size]
        cut = cut_point(window, size // 2)  # a long piece: look in the upper half first,
        if cut == len(window):
            cut = cut_point(window, 0)  # then anywhere; a hard cut only in a window without a cut point
        yield window[:cut]
        start += cut
    if start < len(text):
        yield text[start:]


@contextlib.contextmanager
def _reading(path: Path):
    """Open `path` for reading; an OS error while reading it (permissions, I/O) names the file."""
    try:
        with open(path, "rb") as handle:
            yield handle
    except OSError as exc:
        raise HierarchosError(f"{path}: cannot be read ({exc.strerror or exc}); fix it or move it out of the "
                              "data") from None


class _Columns:
    """A batch of records in the shape `sources._records_to_texts` reads (column_names, len, [name])."""

    def __init__(self, columns: dict[str, list], column_names: list[str], n: int):
        self._columns, self.column_names, self._n = columns, column_names, n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, name: str) -> list:
        return self._columns[name]


@dataclass
class StreamSource:
    spec: S.DataSpec
    where: Path | str          # for messages
    name: str                  # for the training history
    kind: str                  # "text" | "jsonl" | "datasets"
    files: list[Path] = field(default_factory=list)
    template: str | None = None  # known once records were read
    n_records: int = 0
    n_skipped: int = 0

    # --- identity ----------------------------------------------------------------------------
    def fingerprint(self) -> list[dict]:
        """What the cache compares to decide it is still the same data: per local file its path,
        size, mtime and a hash of its first and last 64 KiB; a hub dataset's `datasets` fingerprint."""
        if self.kind == "datasets" and not self.files and self.spec.streaming:
            # a stream cannot be fingerprinted without reading it: its name, config and split stand for it
            return [{"dataset": str(self.where), "streaming": True}]
        if self.kind == "datasets" and not self.files:
            dataset = S._load_dataset(self.spec)[0]
            return [{"dataset": str(self.where), "fingerprint": getattr(dataset, "_fingerprint", None),
                     "rows": len(dataset)}]
        return [file_fingerprint(path) for path in self.files]

    def total_bytes(self) -> int | None:
        return sum(path.stat().st_size for path in self.files) if self.files else None

    # --- reading -----------------------------------------------------------------------------
    def documents(self) -> Iterator[tuple[list[str], bool, int]]:
        """(pieces of text, whether they end a document, input bytes consumed with them): a long
        document arrives in several groups of pieces, the last one marked as its end."""
        if self.kind == "text":
            yield from self._text_documents()
        elif self.kind == "jsonl":
            yield from self._jsonl_documents()
        else:
            yield from self._dataset_documents()

    def texts(self) -> Iterator[str]:
        """Every piece of every document (for training a char or BPE tokenizer on the data)."""
        for group, _, _ in self.documents():
            yield from group

    def _text_documents(self):
        for path in self.files:
            doc, has_content, offset, held = [], False, 0, b""
            buffer = ""
            with _reading(path) as handle:
                while True:
                    raw = handle.read(READ_BYTES)
                    data = held + raw
                    if not raw:
                        keep = len(data)
                    else:  # hold back an incomplete UTF-8 sequence at the end for the next read
                        keep = len(data)
                        for back in range(1, min(4, len(data)) + 1):
                            byte = data[-back]
                            if byte & 0xC0 != 0x80:  # a lead byte (or ASCII): is its sequence complete?
                                need = 1 if byte < 0x80 else 2 if byte >> 5 == 6 else 3 if byte >> 4 == 14 else 4
                                keep = len(data) if need <= back else len(data) - back
                                break
                    try:
                        text = data[:keep].decode("utf-8")
                    except UnicodeDecodeError as exc:
                        raise HierarchosError(S.ERR_NOT_UTF8.format(path=path, offset=offset + exc.start)) from None
                    offset += keep
                    held = data[keep:]
                    has_content = has_content or bool(text.strip())
                    buffer += text
                    if len(buffer) > PIECE_CHARS or not raw:
                        parts = list(pieces(buffer))
                        if raw:  # the last part may grow with the next read
                            doc.extend(parts[:-1])
                            buffer = parts[-1]
                        else:
                            doc.extend(parts)
                            buffer = ""
                    if not raw:
                        break
                    if len(doc) >= 8:  # a long document leaves in groups of pieces (bounded memory)
                        yield doc, False, 0
                        doc = []
            if held:
                raise HierarchosError(S.ERR_NOT_UTF8.format(path=path, offset=offset))
            if not has_content:
                raise HierarchosError(S.ERR_FILE_EMPTY.format(path=path))
            self.template = "plain"
            self.n_records += 1
            yield doc, True, path.stat().st_size

    def _jsonl_documents(self):
        column_names = None
        for path in self.files:
            batch, offset, has_content, done_bytes = [], 0, False, 0
            with _reading(path) as handle:
                for line_no, raw in enumerate(handle, start=1):
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        raise HierarchosError(S.ERR_NOT_UTF8.format(path=path, offset=offset + exc.start)) from None
                    offset += len(raw)
                    if not line.strip():
                        continue
                    has_content = True
                    try:
                        record = json.loads(line.rstrip("\r\n"))
                    except json.JSONDecodeError as exc:
                        raise HierarchosError(S.ERR_BAD_JSON.format(
                            path=path, line=line_no, detail=f"{exc.msg}: column {exc.colno}")) from None
                    if not isinstance(record, dict):
                        raise HierarchosError(f"{path} line {line_no}: a JSON Lines record must be an object "
                                              f"({{\"text\": ...}}), not {type(record).__name__}")
                    if column_names is None:
                        column_names = list(record)
                    batch.append(record)
                    if len(batch) >= RECORD_BATCH:
                        yield from self._format(batch, column_names, path, offset - done_bytes)
                        batch, done_bytes = [], offset
            if not has_content:
                raise HierarchosError(S.ERR_FILE_EMPTY.format(path=path))
            if batch:
                yield from self._format(batch, column_names, path, offset - done_bytes)

    def _format(self, records: list[dict], column_names: list[str], where, consumed: int):
        columns = {name: [r.get(name) for r in records] for name in column_names}
        yield from self._format_columns(_Columns(columns, column_names, len(records)), where, consumed)

    def _format_columns(self, batch, where, consumed: int):
        template, texts, _ = S._records_to_texts(batch, self.spec, where)
        self.template = template
        for text in texts:
            if not text.strip():
                self.n_skipped += 1
                continue
            self.n_records += 1
            yield list(pieces(text)), True, consumed
            consumed = 0  # the batch's bytes count once, with its first kept record
        if consumed:
            yield [], False, consumed  # every record of the batch was empty

    def _dataset_documents(self):
        dataset, where, _ = S._load_dataset(self.spec)
        streamed = not hasattr(dataset, "__len__")  # an IterableDataset (--hf-streaming)
        if not streamed and len(dataset) == 0:
            raise HierarchosError(S.ERR_FILE_EMPTY.format(path=where))
        names = list(dataset.column_names) if dataset.column_names else None  # None: a stream of unknown columns
        batches, n_records = dataset.iter(batch_size=RECORD_BATCH), 0
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except Exception as exc:  # a stream fails while it is read (network, a bad file): say where
                what = f"--hf_dataset {where}" if self.spec.hf_dataset else str(where)
                raise HierarchosError(f"{what}: reading it failed ({S._one_line(exc)}); check the data (and the "
                                      "connection, for a hub dataset) and run again (nothing half-read is kept)") from None
            n = len(next(iter(batch.values()))) if batch else 0
            n_records += n
            yield from self._format_columns(_Columns(batch, names or list(batch), n), where, 0)
        if n_records == 0:
            raise HierarchosError(S.ERR_FILE_EMPTY.format(path=where))


def file_fingerprint(path: Path) -> dict:
    stat = path.stat()
    digest = hashlib.blake2b(digest_size=16)
    with _reading(path) as handle:
        digest.update(handle.read(SAMPLE_BYTES))
        if stat.st_size > SAMPLE_BYTES:
            handle.seek(max(SAMPLE_BYTES, stat.st_size - SAMPLE_BYTES))
            digest.update(handle.read(SAMPLE_BYTES))
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "sample_blake2b": digest.hexdigest()}


def _local_kind(files: list[Path]) -> str:
    suffixes = {p.suffix.lower() for p in files}
    if suffixes == {".txt"}:
        return "text"
    if suffixes == {".jsonl"}:
        return "jsonl"
    return "datasets"


def open_source(spec: S.DataSpec) -> StreamSource:
    """Check `spec` (flags, paths, file kinds, sizes) without reading any file whole."""
    S._check_flags(spec)
    if spec.train and spec.hf_dataset:
        raise HierarchosError(S.ERR_TRAIN_AND_HF)
    if spec.streaming and not spec.hf_dataset:
        raise HierarchosError("--hf-streaming reads a --hf_dataset in datasets' streaming mode: pass --hf_dataset "
                              "NAME_OR_PATH (files given with --train are read as a stream already)")
    if spec.train:
        path = Path(spec.train).expanduser()
        if path.is_dir():
            if S._is_saved_dataset(path):
                files = sorted(p for p in path.rglob("*") if p.is_file())
                return StreamSource(spec, path, path.name, "datasets", files)
            files = S._folder_files(path)
        else:
            if not path.exists():
                raise HierarchosError(S.ERR_FILE_MISSING.format(path=path))
            files = [path]
        for file in files:
            if S.FILE_KINDS.get(file.suffix.lower()) is None:
                raise HierarchosError(S.ERR_UNSUPPORTED.format(path=file, suffix=file.suffix or file.name))
            if file.stat().st_size == 0:
                raise HierarchosError(S.ERR_FILE_EMPTY.format(path=file))
            if not os.access(file, os.R_OK):
                raise HierarchosError(f"{file}: cannot be read (permission denied); fix its permissions or "
                                      "move it out of the data folder")
        kind = _local_kind(files)
        if kind == "datasets":
            S._require_datasets()
            for file in files:
                S._check_file(file)
        return StreamSource(spec, path, path.name, kind, files)
    if spec.hf_dataset:
        S._require_datasets()
        split = spec.hf_dataset_split or "train"
        name = spec.hf_dataset + (f":{spec.hf_dataset_config}" if spec.hf_dataset_config else "") + f"[{split}]"
        path = Path(spec.hf_dataset).expanduser()
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else (
            [path] if path.is_file() else [])
        return StreamSource(spec, path if files else spec.hf_dataset, name, "datasets", files)
    raise HierarchosError(S.ERR_NO_SOURCE)
