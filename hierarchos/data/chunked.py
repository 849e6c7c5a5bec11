"""Pre-chunked training data: token windows written once by `scripts/dataset_chunk_create.py`.

Two formats, both read lazily (one line, or one chunk file, at a time):
  - pre-chunked JSONL (`--pre_chunked_dataset`): one JSON object per line with `input_ids`
    (or `tokens`), a list of token ids;
  - consolidated tensor chunks (`--pre_pt_dataset`): a directory with `manifest.jsonl`, one line
    per chunk file {"file", "num_chunks", "max_length", "tokenizer"}, and safetensors files each
    holding `input_ids`, int32 (num_chunks, max_length) padded with -1, plus `lengths`, int32
    (num_chunks,). Nothing is unpickled; manifest paths cannot leave the directory.
Bad files raise `HierarchosError` with one line naming the file (and line) and the fix.
"""

from __future__ import annotations

import bisect
import json
import os
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hierarchos.errors import HierarchosError
from hierarchos.io import atomic_dir

MANIFEST_FILE = "manifest.jsonl"
JSONL_FILE = "chunks.jsonl"  # the file name dataset_chunk_create.py --jsonl writes
CHUNK_FILE = "chunk_{index:05d}.safetensors"
PAD_ID = -1
ID_KEYS = ("input_ids", "tokens")

# --- one-line errors ------------------------------------------------------------------------
ERR_BAD_OVERLAP = ("overlap {overlap} must be at least 0 and smaller than max_length {max_length}: "
                   "lower --overlap or raise --max-length")
ERR_BAD_MAX_LENGTH = "max_length {max_length} must be a positive integer"
ERR_JSONL_MISSING = "pre-chunked dataset not found: {path}"
ERR_JSONL_BAD_JSON = "{path} line {line}: malformed JSON ({detail})"
ERR_JSONL_NOT_OBJECT = "{path} line {line}: expected a JSON object with 'input_ids', got {kind}"
ERR_JSONL_NO_KEY = "{path} line {line}: no 'input_ids' (or 'tokens') key; keys are: {keys}"
ERR_JSONL_BAD_IDS = ("{path} line {line}: '{key}' must be a list of non-negative integer token ids "
                     "({detail})")
ERR_JSONL_NOT_UTF8 = "{path} line {line}: not UTF-8 text: re-encode the file as UTF-8"
ERR_NO_CHUNKS = "{path}: no chunks in it: re-create it with scripts/dataset_chunk_create.py"
ERR_NOT_CHUNK_DIR = ("{path}: not a chunked tensor dataset (no manifest.jsonl; found: {found}): "
                     "create one with scripts/dataset_chunk_create.py")
ERR_MANIFEST_LINE = "{path} line {line}: {detail}; re-create the dataset with scripts/dataset_chunk_create.py"
ERR_ESCAPE = ("{path} line {line}: chunk file '{file}' is outside the dataset directory: "
              "manifest paths must be relative and stay inside it")
ERR_CHUNK_MISSING = "{path}: chunk file missing (named on {manifest} line {line}); re-create the dataset"
ERR_CHUNK_CORRUPT = "{path}: chunk file is truncated or corrupt ({detail}); re-create the dataset"
ERR_CHUNK_CONTENT = "{path}: {detail}; re-create the dataset with scripts/dataset_chunk_create.py"
ERR_CHUNK_TOO_LONG = ("chunk {index} has {n} tokens, more than max_length {max_length}: "
                      "chunk with chunk_tokens(..., max_length) first")


# --- windows -------------------------------------------------------------------------------
def _check_window(max_length: int, overlap: int) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise HierarchosError(ERR_BAD_MAX_LENGTH.format(max_length=max_length))
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < max_length:
        raise HierarchosError(ERR_BAD_OVERLAP.format(overlap=overlap, max_length=max_length))


def chunk_tokens(tokens: list[int], max_length: int, overlap: int) -> list[list[int]]:
    """Consecutive windows of at most `max_length` tokens, each starting `max_length - overlap`
    after the previous one (so neighbours share `overlap` tokens), until one reaches the end.
    Every token is in some window; only the last window may be shorter; [] gives []."""
    _check_window(max_length, overlap)
    tokens = list(tokens)
    stride = max_length - overlap
    windows = []
    start = 0
    while start < len(tokens):
        windows.append(tokens[start:start + max_length])
        if start + max_length >= len(tokens):
            break
        start += stride
    return windows


# --- pre-chunked JSONL ---------------------------------------------------------------------
def _ids_of(record, path: Path, line: int) -> list[int]:
    if not isinstance(record, dict):
        raise HierarchosError(ERR_JSONL_NOT_OBJECT.format(path=path, line=line, kind=type(record).__name__))
    key = next((k for k in ID_KEYS if k in record), None)
    if key is None:
        raise HierarchosError(ERR_JSONL_NO_KEY.format(path=path, line=line,
                                                      keys=", ".join(map(str, record)) or "none"))
    ids = record[key]
    if not isinstance(ids, list):
        raise HierarchosError(ERR_JSONL_BAD_IDS.format(path=path, line=line, key=key,
                                                       detail=f"got {type(ids).__name__}"))
    for position, token in enumerate(ids):
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise HierarchosError(ERR_JSONL_BAD_IDS.format(path=path, line=line, key=key,
                                                           detail=f"item {position} is {token!r}"))
    return ids


def _jsonl_chunks(path: Path) -> Iterator[list[int]]:
    found = False
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise HierarchosError(ERR_JSONL_NOT_UTF8.format(path=path, line=line_no)) from None
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise HierarchosError(ERR_JSONL_BAD_JSON.format(path=path, line=line_no, detail=exc.msg)) from None
            ids = _ids_of(record, path, line_no)
            if ids:
                found = True
                yield ids
    if not found:
        raise HierarchosError(ERR_NO_CHUNKS.format(path=path))


def iter_prechunked_jsonl(path: str | os.PathLike) -> Iterator[list[int]]:
    """Token-id lists from a pre-chunked JSONL, read line by line (blank lines and empty lists
    skipped). A missing file fails here; bad lines fail when iteration reaches them."""
    path = Path(path)
    if path.is_dir() and (path / JSONL_FILE).is_file():
        path = path / JSONL_FILE  # the directory dataset_chunk_create.py --jsonl writes
    if not path.is_file():
        raise HierarchosError(ERR_JSONL_MISSING.format(path=path))
    return _jsonl_chunks(path)


def write_prechunked_jsonl(chunks: Iterable[list[int]], path: str | os.PathLike) -> dict:
    """Stream chunks into a JSONL file ({"input_ids": [...]} per line), replaced atomically."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:12]}"
    stats = {"num_chunks": 0, "num_tokens": 0, "max_seq_length": 0}
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            for chunk in chunks:
                ids = [int(t) for t in chunk]
                if not ids:
                    continue
                handle.write(json.dumps({"input_ids": ids}) + "\n")
                stats["num_chunks"] += 1
                stats["num_tokens"] += len(ids)
                stats["max_seq_length"] = max(stats["max_seq_length"], len(ids))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return stats


# --- consolidated tensor chunks ------------------------------------------------------------
@dataclass(frozen=True)
class ChunkFile:
    """One manifest line: where the file is and what it must hold."""
    path: Path
    num_chunks: int
    max_length: int
    line: int


def _inside(directory: Path, name, manifest: Path, line: int) -> Path:
    """`directory / name`, refusing absolute names and anything that resolves outside it."""
    if not isinstance(name, str) or not name.strip():
        raise HierarchosError(ERR_MANIFEST_LINE.format(path=manifest, line=line,
                                                       detail=f"'file' must be a file name, got {name!r}"))
    escape = ERR_ESCAPE.format(path=manifest, line=line, file=name)
    for flavour in (PurePosixPath(name), PureWindowsPath(name)):
        if flavour.is_absolute() or flavour.drive or flavour.root or ".." in flavour.parts:
            raise HierarchosError(escape)
    target = directory / name
    try:
        target.resolve().relative_to(directory.resolve())
    except ValueError:  # a symlink pointing out of the directory
        raise HierarchosError(escape) from None
    return target


def _positive_int(entry: dict, key: str, manifest: Path, line: int) -> int:
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HierarchosError(ERR_MANIFEST_LINE.format(
            path=manifest, line=line, detail=f"'{key}' must be a positive integer, got {value!r}"))
    return value


def read_manifest(directory: str | os.PathLike) -> list[ChunkFile]:
    """Parse and check `manifest.jsonl` (not the chunk files themselves)."""
    directory = Path(directory)
    manifest = directory / MANIFEST_FILE
    if not directory.is_dir():
        raise HierarchosError(f"{directory}: chunked tensor dataset directory not found; check the path")
    if not manifest.is_file():
        found = ", ".join(sorted(p.name for p in directory.iterdir())[:12]) or "nothing"
        raise HierarchosError(ERR_NOT_CHUNK_DIR.format(path=directory, found=found))
    files = []
    try:
        lines = manifest.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise HierarchosError(f"{manifest}: not UTF-8 text; re-create the dataset") from None
    for line_no, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            entry = json.loads(text)
        except json.JSONDecodeError as exc:
            raise HierarchosError(ERR_MANIFEST_LINE.format(path=manifest, line=line_no,
                                                           detail=f"malformed JSON ({exc.msg})")) from None
        if not isinstance(entry, dict) or "file" not in entry:
            # repr: a key may hold a newline, and the error must stay one line
            keys = ", ".join(map(repr, entry)) if isinstance(entry, dict) else type(entry).__name__
            raise HierarchosError(ERR_MANIFEST_LINE.format(
                path=manifest, line=line_no, detail=f"expected an object with 'file', got {keys or 'no keys'}"))
        files.append(ChunkFile(path=_inside(directory, entry["file"], manifest, line_no),
                               num_chunks=_positive_int(entry, "num_chunks", manifest, line_no),
                               max_length=_positive_int(entry, "max_length", manifest, line_no),
                               line=line_no))
    if not files:
        raise HierarchosError(ERR_NO_CHUNKS.format(path=manifest))
    return files


def _load_chunk_file(entry: ChunkFile, manifest: Path) -> list[list[int]]:
    """Read one chunk file into token-id lists, checking dtype, shape and padding."""
    path = entry.path
    if not path.is_file():
        raise HierarchosError(ERR_CHUNK_MISSING.format(path=path, manifest=manifest, line=entry.line))
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types for bad headers/sizes
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise HierarchosError(ERR_CHUNK_CORRUPT.format(path=path, detail=detail)) from None

    def bad(detail: str):
        return HierarchosError(ERR_CHUNK_CONTENT.format(path=path, detail=detail))

    ids = tensors.get("input_ids")
    if ids is None:
        raise bad(f"no 'input_ids' tensor (tensors: {', '.join(sorted(tensors)) or 'none'})")
    if ids.dtype not in (torch.int32, torch.int64):
        raise bad(f"'input_ids' has dtype {str(ids.dtype).removeprefix('torch.')}, expected int32")
    expected = (entry.num_chunks, entry.max_length)
    if tuple(ids.shape) != expected:
        raise bad(f"'input_ids' has shape {tuple(ids.shape)}, the manifest says {expected}")
    lengths = tensors.get("lengths")
    if lengths is None:  # no lengths: padding is the run of PAD_ID at the end of each row
        not_pad = ids != PAD_ID
        positions = torch.arange(1, ids.shape[1] + 1)
        lengths = (not_pad * positions).amax(dim=1)
    elif lengths.dtype not in (torch.int32, torch.int64) or tuple(lengths.shape) != (entry.num_chunks,):
        raise bad(f"'lengths' must be int32 of shape ({entry.num_chunks},), got "
                  f"{str(lengths.dtype).removeprefix('torch.')} {tuple(lengths.shape)}")
    if bool(((lengths < 0) | (lengths > entry.max_length)).any()):
        raise bad(f"'lengths' outside 0..{entry.max_length}")
    valid = torch.arange(ids.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)  # (K, L)
    if bool((ids[valid] < 0).any()):
        raise bad("negative token ids inside a chunk")
    rows = ids.tolist()
    return [row[:n] for row, n in zip(rows, lengths.tolist())]


class PtChunkDataset:
    """Random access over a chunked tensor directory: `len()` and `[i]` (a list of ids), keeping
    at most `cache_files` decoded chunk files in memory (least recently used evicted)."""

    def __init__(self, directory: str | os.PathLike, cache_files: int = 2):
        self.directory = Path(directory)
        self.manifest = self.directory / MANIFEST_FILE
        self.files = read_manifest(self.directory)
        self.cache_files = max(1, int(cache_files))
        self._cache: OrderedDict[int, list[list[int]]] = OrderedDict()
        self._starts = []
        total = 0
        for entry in self.files:
            self._starts.append(total)
            total += entry.num_chunks
        self._total = total
        self.max_length = max(entry.max_length for entry in self.files)

    def file_chunks(self, index: int) -> list[list[int]]:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        chunks = _load_chunk_file(self.files[index], self.manifest)
        self._cache[index] = chunks
        while len(self._cache) > self.cache_files:
            self._cache.popitem(last=False)
        return chunks

    def __len__(self) -> int:
        return self._total

    def __getitem__(self, index: int) -> list[int]:
        if not -self._total <= index < self._total:
            raise IndexError(index)
        index %= self._total
        file_index = bisect.bisect_right(self._starts, index) - 1
        chunks = self.file_chunks(file_index)
        return chunks[index - self._starts[file_index]]

    def __iter__(self) -> Iterator[list[int]]:
        for file_index in range(len(self.files)):
            yield from (chunk for chunk in self.file_chunks(file_index) if chunk)


def iter_pt_chunks(directory: str | os.PathLike) -> Iterator[list[int]]:
    """Token-id lists from a chunked tensor directory, one chunk file loaded at a time. The
    manifest is checked here; a chunk file's problems surface when iteration reaches it."""
    return iter(PtChunkDataset(directory, cache_files=1))


def _write_file(rows: list[list[int]], path: Path) -> int:
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.int32)  # (K, L)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.int32)
    lengths = torch.tensor([len(row) for row in rows], dtype=torch.int32)
    save_file({"input_ids": ids, "lengths": lengths}, str(path), metadata={"format": "hierarchos-chunks"})
    return width


def write_pt_chunks(chunks: Iterable[list[int]], out_dir: str | os.PathLike, max_length: int,
                    chunks_per_file: int, tokenizer_name: str, *, tokenizer=None) -> dict:
    """Write chunks as safetensors files of `chunks_per_file` rows plus manifest.jsonl, into a
    temp dir renamed onto `out_dir` (a previous dataset there is replaced only on success).
    Each file is padded to its longest chunk. `tokenizer` (optional) is saved beside them.
    Returns {"num_chunks", "num_files", "num_tokens", "max_seq_length", "output_dir"}."""
    _check_window(max_length, 0)
    if isinstance(chunks_per_file, bool) or not isinstance(chunks_per_file, int) or chunks_per_file < 1:
        raise HierarchosError(f"chunks_per_file {chunks_per_file!r} must be a positive integer")
    stats = {"num_chunks": 0, "num_files": 0, "num_tokens": 0, "max_seq_length": 0}
    manifest_lines = []
    with atomic_dir(out_dir) as tmp:
        rows: list[list[int]] = []

        def flush():
            name = CHUNK_FILE.format(index=stats["num_files"])
            width = _write_file(rows, tmp / name)
            manifest_lines.append(json.dumps({"file": name, "num_chunks": len(rows), "max_length": width,
                                              "tokenizer": tokenizer_name}))
            stats["num_files"] += 1
            stats["max_seq_length"] = max(stats["max_seq_length"], width)
            rows.clear()

        for chunk in chunks:
            ids = [int(t) for t in chunk]
            if not ids:
                continue
            if len(ids) > max_length:
                raise HierarchosError(ERR_CHUNK_TOO_LONG.format(index=stats["num_chunks"], n=len(ids),
                                                                max_length=max_length))
            if min(ids) < 0:
                raise HierarchosError(f"chunk {stats['num_chunks']} has a negative token id {min(ids)}")
            rows.append(ids)
            stats["num_chunks"] += 1
            stats["num_tokens"] += len(ids)
            if len(rows) == chunks_per_file:
                flush()
        if rows:
            flush()
        if not stats["num_chunks"]:
            raise HierarchosError(f"{out_dir}: no chunks to write (the input had no tokens)")
        (tmp / MANIFEST_FILE).write_text("\n".join(manifest_lines) + "\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save(tmp)
    stats["output_dir"] = str(out_dir)
    return stats
