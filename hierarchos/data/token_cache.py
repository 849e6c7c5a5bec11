"""The token cache: a corpus tokenized once into a flat array of token ids, memory-mapped by training.

A cache directory holds `tokens.bin` (uint16 ids where the vocabulary fits, else uint32; every
document followed by EOS, as the trainer packs them), `doc_ends.bin` (int64: where each document's
EOS ends), `doc_bytes.bin` (int64: each document's UTF-8 bytes, for bits per byte), `index.json` (format, dtype, counts, checksums, the tokenizer's identity, the sources'
sizes/mtimes/sampled hashes) and, for tokenizers trained on the data (char, bpe:N), `tokenizer/`.
Pre-tokenized sources (--pre_chunked_dataset, --pre_pt_dataset: id lists, no text) are written into
the same format by `open_ids_cache` (their doc_bytes are 0: bits per byte come from decoding).
Byte-level BPE tokenizers are encoded by the native encoder (hierarchos.data.fast_bpe: the same
ids as the library, checked against it on every corpus), others by the library; the index names
which one built the cache, and either cache is valid for both, the ids being the same.
It is built in a temp directory renamed into place (hierarchos.io.atomic_dir), so a kill, an error
or a full disk leaves nothing a later run would trust. A run reuses it when the sources and the
tokenizer are unchanged and the files check out (size always, checksum of sampled blocks always,
the full checksum below 256 MiB); otherwise it says why and rebuilds it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import queue
import re
import sys
import threading
import time
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hierarchos.errors import HierarchosError

from .fast_bpe import BatchEncoder, EncoderMismatch
from .streaming import StreamSource
from .tokenizers import Tokenizer, load_tokenizer

FORMAT = "hierarchos-token-cache"
VERSION = 1
INDEX, TOKENS, DOC_ENDS, DOC_BYTES, TOKENIZER_DIR = "index.json", "tokens.bin", "doc_ends.bin", "doc_bytes.bin", "tokenizer"
BATCH_CHARS = 1 << 20     # characters per encode_batch call: its Encodings cost ~250 bytes a token
SAMPLE_BLOCKS, SAMPLE_BLOCK_BYTES = 64, 4096
FULL_CHECK_BYTES = 256 << 20


def default_root() -> Path:
    """$HIERARCHOS_TOKEN_CACHE, else $XDG_CACHE_HOME/hierarchos/token_cache, else ~/.cache/..."""
    if os.environ.get("HIERARCHOS_TOKEN_CACHE"):
        return Path(os.environ["HIERARCHOS_TOKEN_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hierarchos" / "token_cache"


def cache_dir(root: Path, source: StreamSource, tokenizer_key: str) -> Path:
    """One directory per (data, record format flags, tokenizer spec)."""
    spec = source.spec
    where = str(Path(source.where).resolve()) if isinstance(source.where, Path) else str(source.where)
    key = json.dumps({"where": where, "config": spec.hf_dataset_config, "split": spec.hf_dataset_split,
                      "text": spec.text_column, "prompt": spec.prompt_column,
                      "completion": spec.completion_column, "kayla": spec.kayla, "tokenizer": tokenizer_key},
                     sort_keys=True)
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", source.name)[:60] or "data"
    return Path(root) / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def ids_cache_dir(root: Path, path: Path, kind: str, tokenizer_key: str) -> Path:
    """One directory per (pre-tokenized dataset, its format, tokenizer spec)."""
    key = json.dumps({"where": str(Path(path).resolve()), "kind": kind, "tokenizer": tokenizer_key}, sort_keys=True)
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).name)[:60] or "data"
    return Path(root) / f"{name}-{kind}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def tokenizer_identity(tokenizer: Tokenizer) -> dict:
    """Name, kind, vocabulary size, EOS id and a hash of the tokenizer's full serialization."""
    backend = tokenizer.backend
    fast = backend if hasattr(backend, "to_str") else getattr(backend, "backend_tokenizer", None)
    text = fast.to_str() if fast is not None else json.dumps(sorted(backend.get_vocab().items()))
    return {"name": tokenizer.name, "kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id, "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}


def _sampled_checksum(path: Path, size: int) -> str:
    """blake2b of SAMPLE_BLOCKS blocks spread evenly over the file (cheap at any size)."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for i in range(SAMPLE_BLOCKS):
            handle.seek(size * i // SAMPLE_BLOCKS)
            digest.update(handle.read(SAMPLE_BLOCK_BYTES))
    return digest.hexdigest()


def _full_checksum(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class TokenCache:
    directory: Path
    index: dict
    tokens: np.ndarray    # (n_tokens,) memory-mapped, read-only
    doc_ends: np.ndarray  # (n_docs,) memory-mapped: end offset (exclusive) of each document + EOS
    doc_bytes: np.ndarray  # (n_docs,) memory-mapped: UTF-8 bytes of each document's text

    @property
    def n_tokens(self) -> int:
        return int(self.index["n_tokens"])

    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.doc_ends, prepend=0)


def _read_index(directory: Path) -> dict | None:
    try:
        index = json.loads((directory / INDEX).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return index if isinstance(index, dict) else None


def why_stale(directory: Path, sources: list[dict], tokenizer_id: dict | None) -> str | None:
    """None when the cache in `directory` can be used as is, else the reason to (re)build it."""
    if not directory.exists():
        return "none yet"
    index = _read_index(directory)
    if index is None or index.get("format") != FORMAT:
        return f"{INDEX} is missing or unreadable"
    if index.get("version") != VERSION:
        return f"cache format {index.get('version')} (this version writes {VERSION})"
    old = {entry.get("path", entry.get("dataset")): entry for entry in index.get("sources", [])}
    new = {entry.get("path", entry.get("dataset")): entry for entry in sources}
    for name in sorted(set(old) | set(new)):
        if name not in old:
            return f"{name} was added"
        if name not in new:
            return f"{name} was removed"
        for key in ("size", "mtime_ns", "sample_blake2b", "fingerprint", "rows"):
            if old[name].get(key) != new[name].get(key):
                return f"{name} changed ({key} {old[name].get(key)} -> {new[name].get(key)})"
    if tokenizer_id is not None and index.get("tokenizer") != tokenizer_id:
        before, after = index.get("tokenizer") or {}, tokenizer_id
        what = next((k for k in ("name", "kind", "vocab_size", "eos_id", "sha256") if before.get(k) != after.get(k)),
                    "sha256")
        return f"the tokenizer changed ({what} {before.get(what)} -> {after.get(what)})"
    dtype = np.dtype(index.get("dtype", "uint16"))
    tokens = directory / TOKENS
    size = tokens.stat().st_size if tokens.is_file() else -1
    if size != int(index.get("n_tokens", -1)) * dtype.itemsize:
        return (f"{TOKENS} is truncated or corrupt ({size} bytes, the index says "
                f"{int(index.get('n_tokens', 0)) * dtype.itemsize})")
    for name in (DOC_ENDS, DOC_BYTES):
        path = directory / name
        if not path.is_file() or path.stat().st_size != int(index.get("n_docs", -1)) * 8:
            return f"{name} is truncated or corrupt"
    if _sampled_checksum(tokens, size) != index.get("tokens_sample_blake2b"):
        return f"{TOKENS} is corrupt (checksum of sampled blocks differs)"
    if size <= FULL_CHECK_BYTES and _full_checksum(tokens) != index.get("tokens_blake2b"):
        return f"{TOKENS} is corrupt (checksum differs)"
    return None


def load(directory: Path) -> TokenCache:
    index = _read_index(directory)
    tokens = np.memmap(directory / TOKENS, dtype=np.dtype(index["dtype"]), mode="r", shape=(index["n_tokens"],))
    per_doc = [np.memmap(directory / name, dtype=np.int64, mode="r", shape=(index["n_docs"],))
               for name in (DOC_ENDS, DOC_BYTES)]
    return TokenCache(directory, index, tokens, *per_doc)


def trained_tokenizer(directory: Path, source: StreamSource) -> Tokenizer | None:
    """The tokenizer an earlier build trained on this same data (char, bpe:N), if any."""
    if (directory / TOKENIZER_DIR).is_dir() and why_stale(directory, source.fingerprint(), None) is None:
        return load_tokenizer(str(directory / TOKENIZER_DIR))
    return None


def _disk_full(directory: Path, n_tokens: int) -> HierarchosError:
    return HierarchosError(f"token cache {directory}: the disk filled up while writing it ({n_tokens:,} tokens "
                           "written, nothing kept); free space or place the cache elsewhere with --token-cache DIR")


def open_cache(directory: Path, source: StreamSource, tokenizer: Tokenizer, *, save_tokenizer: bool = False,
               log=print) -> TokenCache:
    """The cache of `source` under `tokenizer` in `directory`: reused, or (re)built with a line saying why."""
    sources = source.fingerprint()
    return _reuse_or_build(directory, sources, tokenizer, log, lambda identity: build(
        directory, source, tokenizer, sources, identity, save_tokenizer=save_tokenizer, log=log))


def open_ids_cache(directory: Path, files: list[Path], documents, tokenizer: Tokenizer, *, where,
                   log=print) -> TokenCache:
    """The cache of a pre-tokenized source: `documents()` yields its id lists (each gets an EOS);
    reused while `files` and the tokenizer are unchanged, else (re)built with a line saying why."""
    from .streaming import file_fingerprint

    sources = [file_fingerprint(path) for path in files]
    return _reuse_or_build(directory, sources, tokenizer, log, lambda identity: _build_ids(
        directory, documents(), tokenizer, sources, identity, where, log))


def _reuse_or_build(directory: Path, sources, tokenizer: Tokenizer, log, build_with) -> TokenCache:
    """The cache in `directory` if it is current for `sources` and `tokenizer`, else `build_with(identity)`
    first, with a line saying which and why."""
    from hierarchos.io import path_lock

    identity = tokenizer_identity(tokenizer)
    # runs started together on one corpus take turns: the first builds, the others then reuse it
    with path_lock(directory, on_wait=lambda: log(f"token cache: waiting for another process writing {directory}")):
        reason = why_stale(directory, sources, identity)
        if reason is None:
            cache = load(directory)
            log(f"token cache: reusing {directory} ({cache.n_tokens:,} tokens)")
            return cache
        log(f"token cache: {'building' if reason == 'none yet' else 'rebuilding'} {directory}"
            + ("" if reason == "none yet" else f" ({reason})"))
        build_with(identity)
        return load(directory)


def _build_ids(directory: Path, documents, tokenizer: Tokenizer, sources: list[dict], identity: dict, where,
               log) -> None:
    from hierarchos.io import atomic_dir

    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)
    full = hashlib.blake2b(digest_size=16)
    doc_ends = array("q")
    n_tokens, parts, held = 0, [], 0
    started = time.perf_counter()
    eos = np.array([tokenizer.eos_id], dtype=dtype)

    def flush(handle):
        nonlocal parts, held
        if parts:
            data = np.concatenate(parts).tobytes()
            handle.write(data)
            full.update(data)
        parts, held = [], 0

    try:
        with atomic_dir(directory) as tmp:
            with open(tmp / TOKENS, "wb") as handle:
                for number, doc in enumerate(documents):
                    ids = np.asarray(doc, dtype=np.int64)
                    if len(ids) and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
                        bad = int(ids.min() if ids.min() < 0 else ids.max())
                        raise HierarchosError(
                            f"{where}: chunk {number} holds token id {bad}, outside the tokenizer's "
                            f"{tokenizer.vocab_size} ids; pass the tokenizer the chunks were made with "
                            "(--tokenizer-path) or re-create them with scripts/dataset_chunk_create.py")
                    parts += [ids.astype(dtype), eos]
                    n_tokens += len(ids) + 1
                    held += len(ids) + 1
                    doc_ends.append(n_tokens)
                    if held >= 1 << 20:
                        flush(handle)
                flush(handle)
            if not doc_ends:
                raise HierarchosError(f"{where}: no chunks in it: re-create it with scripts/dataset_chunk_create.py")
            (tmp / DOC_ENDS).write_bytes(doc_ends.tobytes())
            (tmp / DOC_BYTES).write_bytes(bytes(8 * len(doc_ends)))  # no text: 0 bytes each
            index = {"format": FORMAT, "version": VERSION, "dtype": dtype.name, "n_tokens": n_tokens,
                     "n_docs": len(doc_ends), "chars": 0, "text_bytes": 0, "name": Path(where).name,
                     "template": "pretokenized", "records": len(doc_ends), "skipped_records": 0,
                     "tokens_blake2b": full.hexdigest(),
                     "tokens_sample_blake2b": _sampled_checksum(tmp / TOKENS, n_tokens * dtype.itemsize),
                     "tokenizer": identity, "encoder": "pretokenized", "sources": sources,
                     "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            (tmp / INDEX).write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise _disk_full(directory, n_tokens) from None
        raise
    log(f"token cache: {n_tokens:,} tokens of {len(doc_ends):,} pre-tokenized chunks in "
        f"{time.perf_counter() - started:.1f} s, {dtype.name}")


def _batches(source: StreamSource, out: queue.Queue, stop: threading.Event) -> None:
    """Producer thread: groups of pieces of about BATCH_CHARS characters, with document ends and
    input bytes; reading and parsing overlap the encoder (which releases the GIL)."""
    try:
        group, ends, chars, consumed, doc_bytes, text_bytes = [], [], 0, 0, array("q"), 0
        for doc_pieces, ends_doc, nbytes in source.documents():
            if stop.is_set():
                return
            consumed += nbytes
            for i, piece in enumerate(doc_pieces):
                if chars >= BATCH_CHARS:  # also inside a long document: a batch stays ~BATCH_CHARS
                    out.put((group, ends, chars, 0, doc_bytes))
                    group, ends, chars, doc_bytes = [], [], 0, array("q")
                group.append(piece)
                ends.append(ends_doc and i == len(doc_pieces) - 1)
                chars += len(piece)
                text_bytes += len(piece.encode("utf-8"))
            if ends_doc and not doc_pieces:  # an empty document still ends (gets its EOS)
                group.append("")
                ends.append(True)
            if ends_doc:
                doc_bytes.append(text_bytes)
                text_bytes = 0
            if chars >= BATCH_CHARS:
                out.put((group, ends, chars, consumed, doc_bytes))
                group, ends, chars, consumed, doc_bytes = [], [], 0, 0, array("q")
        out.put((group, ends, chars, consumed, doc_bytes))
        out.put(None)
    except BaseException as exc:  # handed to the consumer, which raises it
        out.put(exc)


def build(directory: Path, source: StreamSource, tokenizer: Tokenizer, sources: list[dict], identity: dict,
          *, save_tokenizer: bool = False, log=print) -> None:
    """Tokenize `source` into `directory` (atomically: a temp dir renamed into place); when the
    native encoder is found to disagree with the library past the first MiB, start over with the
    library (nothing it wrote is kept)."""
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)
    try:
        _build(directory, source, tokenizer, sources, identity, BatchEncoder(tokenizer, dtype, log=log),
               save_tokenizer=save_tokenizer, log=log)
    except EncoderMismatch:
        source.template, source.n_records, source.n_skipped = None, 0, 0
        _build(directory, source, tokenizer, sources, identity,
               BatchEncoder(tokenizer, dtype, allow_native=False, log=log), save_tokenizer=save_tokenizer, log=log)


def _build(directory: Path, source: StreamSource, tokenizer: Tokenizer, sources: list[dict], identity: dict,
           encoder: BatchEncoder, *, save_tokenizer: bool, log) -> None:
    from tqdm import tqdm

    from hierarchos.io import atomic_dir

    dtype = encoder.dtype
    full, sample = hashlib.blake2b(digest_size=16), None
    doc_ends, doc_bytes = array("q"), array("q")
    n_tokens = n_chars = n_bytes = 0
    started = time.perf_counter()
    bar = tqdm(total=source.total_bytes(), unit="B", unit_scale=True, unit_divisor=1024, disable=None,
               desc="tokenizing", file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
    batches: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()
    producer = threading.Thread(target=_batches, args=(source, batches, stop), daemon=True)
    try:
        with atomic_dir(directory) as tmp:
            producer.start()
            with open(tmp / TOKENS, "wb") as handle:
                while True:
                    item = batches.get()
                    if item is None:
                        break
                    if isinstance(item, BaseException):
                        raise item
                    group, ends, chars, consumed, group_doc_bytes = item
                    doc_bytes.extend(group_doc_bytes)
                    if group:
                        ids, counts = encoder.encode(group)
                        # EOS after each text that ends a document: np.insert puts the j-th one before
                        # original index positions[j], so it lands at positions[j] + j
                        positions = np.cumsum(counts)[np.flatnonzero(ends)]
                        block = np.insert(ids, positions, tokenizer.eos_id)
                        doc_ends.extend((n_tokens + positions + np.arange(1, len(positions) + 1)).tolist())
                        n_tokens += len(block)
                        data = block.tobytes()
                        handle.write(data)
                        full.update(data)
                    n_chars += chars
                    n_bytes += consumed
                    bar.update(consumed)
                    elapsed = max(time.perf_counter() - started, 1e-9)
                    bar.set_postfix(tokens=f"{n_tokens:,}", tok_s=f"{n_tokens / elapsed:,.0f}", refresh=False)
            if n_tokens == 0 or not doc_ends:
                raise HierarchosError(f"{source.where}: no usable records (every text is empty)")
            (tmp / DOC_ENDS).write_bytes(doc_ends.tobytes())
            (tmp / DOC_BYTES).write_bytes(doc_bytes.tobytes())
            sample = _sampled_checksum(tmp / TOKENS, n_tokens * dtype.itemsize)
            if save_tokenizer:
                tokenizer.save(tmp / TOKENIZER_DIR)
            index = {"format": FORMAT, "version": VERSION, "dtype": dtype.name, "n_tokens": n_tokens,
                     "n_docs": len(doc_ends), "chars": n_chars, "text_bytes": int(sum(doc_bytes)),
                     "name": source.name, "template": source.template,
                     "records": source.n_records, "skipped_records": source.n_skipped,
                     "tokens_blake2b": full.hexdigest(), "tokens_sample_blake2b": sample,
                     "tokenizer": identity, "encoder": encoder.name, "sources": sources,
                     "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            (tmp / INDEX).write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise _disk_full(directory, n_tokens) from None
        raise
    finally:
        stop.set()
        while producer.is_alive():  # unblock a producer waiting on the full queue
            try:
                batches.get_nowait()
            except queue.Empty:
                producer.join(0.05)
        bar.close()
    elapsed = max(time.perf_counter() - started, 1e-9)
    mb = (n_bytes or n_chars) / 1e6
    how = "native BPE encoder" if encoder.name == "native" else (
        "tokenizers" + (f" (native BPE encoder not used: {encoder.why})" if encoder.why else ""))
    log(f"token cache: {n_tokens:,} tokens from {mb:,.1f} MB in {elapsed:.1f} s ({mb / elapsed:.1f} MB/s, "
        f"{n_tokens / elapsed:,.0f} tokens/s), {len(doc_ends):,} documents, {dtype.name}, {how}")
