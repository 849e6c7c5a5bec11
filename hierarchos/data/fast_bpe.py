"""A native byte-level BPE encoder (C++, `hierarchos_kernels.BpeEncoder`) beside the `tokenizers` library.

The library encodes ~1-2 MB/s on a small machine; the native encoder gives the same ids many times
faster, for tokenizers of one kind only: no normalizer, the ByteLevel pre-tokenizer with GPT-2's
regex and no prefix space, a BPE model over the 256 byte symbols without dropout, prefixes or
suffixes, and no added tokens other than special ones (which hierarchos encodes as plain text). The
bundled tokenizer, byte, bpe:N and GPT-2-style hub tokenizers are of this kind. The reference stays
the library: `BatchEncoder` compares the two on the first MiB of every corpus and on a slice of
every later batch, and a single difference switches that corpus to the library with one line.
The regex's character classes start from Python's unicodedata and are settled by the library's own
pre-tokenizer for every code point a corpus uses, so a Unicode version newer than Python's is
followed, not guessed.
"""

from __future__ import annotations

import json
import os
import random
from typing import Callable

import numpy as np

from .tokenizers import Tokenizer, bytes_to_unicode

ENV_SWITCH = "HIERARCHOS_NATIVE_BPE"  # "0": always the library
FIRST_CHECK_CHARS = 1 << 20            # characters of each corpus checked against the library first
SLICE_CHARS = 2048                     # then one random slice of this many characters per batch
CLASS_OTHER, CLASS_LETTER, CLASS_NUMBER, CLASS_SPACE = 0, 1, 2, 3
_CODE_POINTS = 0x110000
_classes: bytes | None = None


class EncoderMismatch(Exception):
    """The native encoder and the library gave different ids (the caller redoes the work with the library)."""


def _kernels():
    try:
        from hierarchos import hierarchos_kernels
    except ImportError:
        return None
    encoder = getattr(hierarchos_kernels, "BpeEncoder", None)
    # a module built before the encoder existed, or from an older bpe.cpp: the library path
    return hierarchos_kernels if encoder is not None and hasattr(encoder, "take_new_code_points") else None


def _probe_split():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True).pre_tokenize_str


def probe_classes(code_points) -> np.ndarray:
    """The class of each code point as the library's ByteLevel pre-tokenizer sees it: c is a letter
    when "a" + c stays one pre-token, a number when "1" + c does, other when "!" + c does, and
    whitespace otherwise (the regex's four alternatives cover every character). Probes go 256 at a
    time, each behind a separator that forces a pre-token boundary right before its lead character."""
    split = _probe_split()
    points = [int(cp) for cp in code_points]
    classes = np.full(len(points), CLASS_SPACE, dtype=np.uint8)
    undecided = list(range(len(points)))
    for cls, sep, lead in ((CLASS_LETTER, "\x00", "a"), (CLASS_NUMBER, "\x00", "1"), (CLASS_OTHER, "a", "!")):
        remaining = []
        for start in range(0, len(undecided), 256):
            chunk = undecided[start:start + 256]
            ends = {begin: end for _, (begin, end) in split("".join(sep + lead + chr(points[i]) for i in chunk))}
            for k, i in enumerate(chunk):
                if ends.get(3 * k + 1) == 3 * k + 3:
                    classes[i] = cls
                else:
                    remaining.append(i)
        undecided = remaining
    return classes


def char_classes() -> bytes:
    """One byte per code point: 0 other, 1 letter (\\p{L}), 2 number (\\p{N}), 3 whitespace (\\s). ASCII
    as the library says (probed); the rest from Python's unicodedata, a first guess that NativeBPE
    checks against the library for every code point a text actually uses (Python's Unicode version
    may be older than the library's: 14.0 against 16.0 here)."""
    global _classes
    if _classes is None:
        import unicodedata

        table = np.zeros(_CODE_POINTS, dtype=np.uint8)
        kinds = {"L": CLASS_LETTER, "N": CLASS_NUMBER}
        for cp in range(0x80, 0x40000):  # letters and numbers live in planes 0-3; the rest is "other"
            kind = kinds.get(unicodedata.category(chr(cp))[0])
            if kind is not None:
                table[cp] = kind
        for cp in (0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F, 0x205F, 0x3000):
            table[cp] = CLASS_SPACE  # Unicode's White_Space property, what \\s means to the library
        table[:0x80] = probe_classes(range(0x80))
        _classes = table.tobytes()
    return _classes


def _model_json(tokenizer: Tokenizer) -> dict | None:
    backend = tokenizer.backend
    fast = backend if hasattr(backend, "to_str") else getattr(backend, "backend_tokenizer", None)
    if fast is None:
        return None
    return json.loads(fast.to_str())


def why_not_native(spec: dict) -> str | None:
    """None when a tokenizer.json (parsed) is of the kind the native encoder reproduces, else why not."""
    if spec.get("normalizer") is not None:
        return "it has a normalizer"
    if spec.get("truncation") is not None or spec.get("padding") is not None:
        return "it truncates or pads"
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers") or []) == 1:
        pre = pre["pretokenizers"][0]
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex", True):
        return "its pre-tokenizer is not ByteLevel with GPT-2's regex and no prefix space"
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return "its model is not BPE"
    if model.get("dropout") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return "its BPE uses dropout, a subword prefix or a word suffix"
    if any(not token.get("special") for token in spec.get("added_tokens") or []):
        return "it has added tokens that are not special"
    vocab = model.get("vocab") or {}
    if any(ch not in vocab for ch in bytes_to_unicode().values()):
        return "its vocabulary lacks some of the 256 byte symbols"
    return None


class NativeBPE:
    """The C++ encoder built from one tokenizer.json; `encode_batch` gives the library's ids."""

    def __init__(self, spec: dict, threads: int = 0, classes: bytes | None = None):
        kernels = _kernels()
        if kernels is None:
            raise RuntimeError("hierarchos_kernels with BpeEncoder is not built")
        model = spec["model"]
        vocab: dict[str, int] = model["vocab"]
        byte_chars = bytes_to_unicode()
        char_bytes = {ch: b for b, ch in byte_chars.items()}
        byte_ids = [vocab[byte_chars[b]] for b in range(256)]
        merges = []
        for merge in model.get("merges") or []:
            left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
            # the library refuses a tokenizer whose merge tokens are not in the vocabulary
            merges.append((vocab[left], vocab[right], vocab[left + right]))
        ignore_merges = bool(model.get("ignore_merges"))
        whole_words = []
        if ignore_merges:
            for token, token_id in vocab.items():
                if all(ch in char_bytes for ch in token):
                    whole_words.append((bytes(char_bytes[ch] for ch in token), token_id))
        self.classes = char_classes() if classes is None else classes
        self.encoder = kernels.BpeEncoder(byte_ids, merges, self.classes, whole_words, ignore_merges)
        if threads <= 0:
            threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.threads = threads
        self.dtype = np.dtype(np.uint16 if self.encoder.max_id <= 0xFFFF else np.uint32)

    def encode_batch(self, texts: list[str], dtype=None) -> tuple[np.ndarray, np.ndarray]:
        """(every text's ids end to end, int64 ids per text). Code points met for the first time are
        classed by the library; when the table had one wrong, it is corrected and the batch redone."""
        dtype = np.dtype(dtype or self.dtype)
        texts = list(texts)
        ids, counts = self.encoder.encode_batch(texts, self.threads, dtype.name)
        fresh = self.encoder.take_new_code_points()
        if fresh:
            probed = probe_classes(fresh)
            guessed = np.frombuffer(self.classes, dtype=np.uint8)[np.asarray(fresh, dtype=np.int64)]
            wrong = np.flatnonzero(guessed != probed)
            if len(wrong):
                points = [int(fresh[i]) for i in wrong]
                self.encoder.set_classes(points, [int(probed[i]) for i in wrong])
                table = bytearray(self.classes)
                for i in wrong:
                    table[int(fresh[i])] = int(probed[i])
                self.classes = bytes(table)
                global _classes
                _classes = self.classes  # later encoders start from the corrected table
                ids, counts = self.encoder.encode_batch(texts, self.threads, dtype.name)
                self.encoder.take_new_code_points()
        return ids, counts

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text], np.uint32)[0].tolist()


def native_for(tokenizer: Tokenizer) -> tuple[NativeBPE | None, str]:
    """The native encoder for `tokenizer`, or None and why not (one phrase)."""
    if os.environ.get(ENV_SWITCH, "").strip() == "0":
        return None, f"{ENV_SWITCH}=0"
    if _kernels() is None:
        return None, "the C++ kernel (hierarchos_kernels) is not built or predates the encoder (python kernels/build.py)"
    spec = _model_json(tokenizer)
    if spec is None:
        return None, "the tokenizer has no tokenizer.json form"
    reason = why_not_native(spec)
    if reason is not None:
        return None, reason
    return NativeBPE(spec), ""


def library_batch(tokenizer: Tokenizer, texts: list[str], dtype) -> tuple[np.ndarray, np.ndarray]:
    """The reference: the library's batch encode, in the native encoder's (ids, counts) form."""
    encoded = tokenizer.encode_batch(texts) if texts else []
    counts = np.array([len(ids) for ids in encoded], dtype=np.int64)
    ids = np.fromiter((i for seq in encoded for i in seq), dtype=dtype, count=int(counts.sum()))
    return ids, counts


def first_difference(native: np.ndarray, reference: np.ndarray) -> str | None:
    """None when equal, else where the two id sequences first differ."""
    if len(native) == len(reference) and np.array_equal(native, reference):
        return None
    n = min(len(native), len(reference))
    at = int(np.argmax(native[:n] != reference[:n])) if n and (native[:n] != reference[:n]).any() else n
    return (f"id {at}: native {native[at] if at < len(native) else 'end'} vs tokenizers "
            f"{reference[at] if at < len(reference) else 'end'} ({len(native)} vs {len(reference)} ids)")


class BatchEncoder:
    """Encodes batches of texts for the token cache: natively when the tokenizer allows it and the
    library agrees, else with the library. `encode` returns (ids, counts) in `dtype`; a difference
    found after the first MiB raises EncoderMismatch (ids already handed out may be wrong: the caller
    starts over with `BatchEncoder(..., allow_native=False)`)."""

    def __init__(self, tokenizer: Tokenizer, dtype, *, allow_native: bool = True, log: Callable = print,
                 seed: int = 0):
        self.tokenizer, self.dtype, self.log = tokenizer, np.dtype(dtype), log
        self.native, why = native_for(tokenizer) if allow_native else (None, "")
        self.name = "native" if self.native is not None else "tokenizers"
        self.why = why
        self.checked_chars = 0
        self.random = random.Random(seed)

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if self.native is None:
            return library_batch(self.tokenizer, texts, self.dtype)
        try:
            ids, counts = self.native.encode_batch(texts, self.dtype)
        except UnicodeEncodeError:  # a lone surrogate: the library decides what happens to it
            return library_batch(self.tokenizer, texts, self.dtype)
        if self.checked_chars < FIRST_CHECK_CHARS:
            return self._check_all(texts, ids, counts)
        if texts:
            self._check_slice(texts)
        return ids, counts

    def _disagree(self, where: str, detail: str) -> None:
        self.log(f"tokenizer: the native BPE encoder disagrees with tokenizers on {where} ({detail}); "
                 "using the library for this corpus (slower, same ids)")
        self.native, self.name = None, "tokenizers"

    def _check_all(self, texts, ids, counts) -> tuple[np.ndarray, np.ndarray]:
        """The whole batch through both; the library's ids are returned when they differ."""
        ref_ids, ref_counts = library_batch(self.tokenizer, texts, self.dtype)
        detail = first_difference(ids, ref_ids)
        if detail is None and not np.array_equal(counts, ref_counts):
            detail = "the same ids split differently between texts"
        if detail is not None:
            first = self.checked_chars == 0
            self._disagree(f"the corpus's first {FIRST_CHECK_CHARS >> 20} MiB", detail)
            if not first:
                raise EncoderMismatch(detail)
            return ref_ids, ref_counts
        self.checked_chars += sum(len(t) for t in texts)
        return ids, counts

    def _check_slice(self, texts) -> None:
        text = texts[self.random.randrange(len(texts))]
        start = self.random.randrange(max(1, len(text) - SLICE_CHARS + 1))
        piece = text[start:start + SLICE_CHARS]
        native = self.native.encode_batch([piece], self.dtype)[0]
        reference = np.asarray(self.tokenizer.encode(piece), dtype=self.dtype)
        detail = first_difference(native, reference)
        if detail is not None:
            self._disagree(f"a sampled slice {piece[:40]!r}...", detail)
            raise EncoderMismatch(detail)
