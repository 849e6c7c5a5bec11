"""Tokenizers: one `Tokenizer` interface over byte, char, trained BPE and Hugging Face tokenizers.

`load_tokenizer(spec)` never touches the network unless a hub name is not cached (and
HF_HUB_OFFLINE is not set); `Tokenizer.save(dir)` writes plain JSON (no pickle) that
`load_tokenizer(dir)` restores to the same ids. Special-token strings inside text are encoded
as plain text: specials enter a sequence only by id.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Iterable

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as _FastTokenizer

from hierarchos.errors import HierarchosError

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
SPECIAL_TOKENS = [PAD, EOS, BOS, UNK]
DEFAULT_HUB_TOKENIZER = "openai-community/gpt2"
META_FILE = "hierarchos_tokenizer.json"  # beside tokenizer.json: kind, name, special tokens
TOKENIZER_FILE = "tokenizer.json"

ERR_HUB_NOT_CACHED = ("tokenizer '{name}' is not in the local Hugging Face cache and the hub cannot be "
                      "reached; run once online, pass a local tokenizer directory, or use "
                      "--tokenizer-path byte|char|bpe:N")
ERR_NEEDS_TEXT = ("--tokenizer-path {spec} builds its vocabulary from the training text, "
                  "but no training text was given: pass --train or --hf_dataset")
ERR_BAD_BPE_SIZE = ("--tokenizer-path {spec}: N must be an integer of at least {minimum} "
                    "(256 bytes + {n_special} special tokens), e.g. bpe:4096")
ERR_NO_EOS = ("tokenizer '{name}' has no end-of-sequence token: pick a tokenizer with one, "
              "or use --tokenizer-path byte|char|bpe:N")
ERR_BAD_DIR = ("{path}: not a tokenizer directory (no tokenizer.json or files that "
               "transformers.AutoTokenizer can load): pass a Hugging Face tokenizer directory")
BUNDLED_NOTICE = ("tokenizer: openai-community/gpt2 not cached; using the bundled byte-level BPE "
                  "({n} tokens)")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet of byte-level BPE)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes = printable[:]
    shift = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + shift)
            shift += 1
    return dict(zip(printable, map(chr, codes)))


class StreamDecoder:
    """Incremental decoding: `push(id)` returns only newly completed text.

    Decodes a short window of recent ids and emits the growth of its text, holding back while
    the text ends in an incomplete UTF-8 sequence (U+FFFD), so a character split across tokens
    prints once, whole. `flush()` returns whatever is still held.
    """

    def __init__(self, tokenizer: "Tokenizer", skip_special: bool = True):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: context that makes decoding of the tail stable
        self.read_offset = 0    # ids before this are already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special=self.skip_special)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text):]


class Tokenizer:
    """One interface over a `tokenizers.Tokenizer` (ours) or a transformers tokenizer (hub/dir)."""

    def __init__(self, backend, *, kind: str, name: str, eos: str, pad: str | None = None,
                 bos: str | None = None, unk: str | None = None):
        self.backend = backend
        self.kind = kind  # "byte" | "char" | "bpe" | "hf"
        self.name = name
        self._is_fast = isinstance(backend, _FastTokenizer)
        if self._is_fast:
            backend.encode_special_tokens = True  # not serialized by tokenizers: set on every load
        self.eos_token, self.pad_token, self.bos_token, self.unk_token = eos, pad, bos, unk
        self.eos_id = self.token_to_id(eos)
        self.pad_id = self.token_to_id(pad) if pad is not None else self.eos_id
        self.bos_id = self.token_to_id(bos) if bos is not None else None
        self.unk_id = self.token_to_id(unk) if unk is not None else None
        if self.eos_id is None:
            raise HierarchosError(ERR_NO_EOS.format(name=name))
        vocab = backend.get_vocab()
        self.vocab_size = max(max(vocab.values()) + 1, len(vocab))

    # --- encode / decode -------------------------------------------------------------------
    def token_to_id(self, token: str) -> int | None:
        if self._is_fast:
            return self.backend.token_to_id(token)
        token_id = self.backend.convert_tokens_to_ids(token)
        unknown = token_id == self.backend.unk_token_id and token != self.backend.unk_token
        return None if token_id is None or unknown else token_id

    def id_to_token(self, token_id: int) -> str | None:
        if self._is_fast:
            return self.backend.id_to_token(int(token_id))
        return self.backend.convert_ids_to_tokens(int(token_id))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with no special tokens added."""
        if self._is_fast:
            return self.backend.encode(text, add_special_tokens=False).ids
        return self.backend.encode(text, add_special_tokens=False, split_special_tokens=True, verbose=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._is_fast:  # encode_batch_fast (tokenizers >= 0.21) skips the offsets we never read
            encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
            return [e.ids for e in encode(list(texts), add_special_tokens=False)]
        return self.backend(list(texts), add_special_tokens=False, split_special_tokens=True,
                            verbose=False)["input_ids"]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if self._is_fast:
            return self.backend.decode(ids, skip_special_tokens=skip_special)
        return self.backend.decode(ids, skip_special_tokens=skip_special,
                                   clean_up_tokenization_spaces=False)

    def decode_stream(self, skip_special: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special=skip_special)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, kind={self.kind!r}, vocab_size={self.vocab_size})"

    # --- save ------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.json (+ transformers files for hub tokenizers) and our small meta file."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self._is_fast:
            self.backend.save(str(directory / TOKENIZER_FILE))
        else:
            self.backend.save_pretrained(str(directory))
        meta = {"format": "hierarchos-tokenizer", "version": 1, "kind": self.kind, "name": self.name,
                "eos": self.eos_token, "pad": self.pad_token, "bos": self.bos_token, "unk": self.unk_token}
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


# --- builders ------------------------------------------------------------------------------
def _with_specials(backend: _FastTokenizer) -> _FastTokenizer:
    backend.add_special_tokens(SPECIAL_TOKENS)
    return backend


def build_byte_tokenizer() -> Tokenizer:
    """256 byte ids (id == byte value) then <pad>, <eos>, <bos>, <unk> at 256..259."""
    byte_chars = bytes_to_unicode()
    backend = _FastTokenizer(models.BPE(vocab={byte_chars[b]: b for b in range(256)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    _with_specials(backend)
    return Tokenizer(backend, kind="byte", name="byte", eos=EOS, pad=PAD, bos=BOS, unk=UNK)


def build_char_tokenizer(texts: Iterable[str]) -> Tokenizer:
    """Specials at 0..3, then every character of `texts` in sorted order; others map to <unk>."""
    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(chars):
        vocab.setdefault(ch, len(vocab))
    return _char_tokenizer(vocab)


def _char_tokenizer(vocab: dict[str, int]) -> Tokenizer:
    backend = _FastTokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    _with_specials(backend)
    return Tokenizer(backend, kind="char", name="char", eos=EOS, pad=PAD, bos=BOS, unk=UNK)


def extend_char_tokenizer(tokenizer: Tokenizer, texts: Iterable[str]) -> Tokenizer:
    """Continual learning (seed 002): the characters of `texts` that `tokenizer` (a char tokenizer)
    lacks are appended after its vocabulary, so every old id keeps its character. Returns the
    tokenizer itself when nothing is new."""
    if tokenizer.kind != "char":
        raise HierarchosError(f"cannot extend the {tokenizer.kind} tokenizer {tokenizer.name!r} with new "
                              "characters: only char tokenizers grow (byte and BPE ones cover any text)")
    vocab = dict(tokenizer.backend.get_vocab())
    new_chars = sorted({ch for text in texts for ch in text} - set(vocab))
    if not new_chars:
        return tokenizer
    for ch in new_chars:
        vocab[ch] = len(vocab)
    return _char_tokenizer(vocab)


def changed_ids(old: Tokenizer, new: Tokenizer, limit: int = 5) -> list[str]:
    """Ids below old.vocab_size whose token differs between two tokenizers (at most `limit`):
    a model can keep training on `new` only when this is empty."""
    changed = []
    for i in range(old.vocab_size):
        if old.id_to_token(i) != new.id_to_token(i):
            changed.append(f"{i}: {old.id_to_token(i)!r} -> {new.id_to_token(i)!r}")
            if len(changed) >= limit:
                break
    return changed


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, name: str | None = None) -> Tokenizer:
    """A byte-level BPE (GPT-2 style pre-tokenization) of at most `vocab_size` tokens, specials at 0..3."""
    backend = _FastTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(backend, kind="bpe", name=name or f"bpe:{vocab_size}", eos=EOS, pad=PAD, bos=BOS, unk=UNK)


# --- loading -------------------------------------------------------------------------------
def _load_saved(directory: Path) -> Tokenizer:
    meta_path = directory / META_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HierarchosError(f"{meta_path}: tokenizer metadata is corrupt ({' '.join(str(exc).split())}); "
                              "re-save the tokenizer or copy it from the training run's OUT_DIR") from None
    specials = {key: meta.get(key) for key in ("eos", "pad", "bos", "unk")} if isinstance(meta, dict) else {}
    if (not isinstance(meta, dict) or not isinstance(specials.get("eos"), str)
            or not all(v is None or isinstance(v, str) for v in specials.values())):
        raise HierarchosError(f"{meta_path}: tokenizer metadata is not an object of token strings; "
                              "re-save the tokenizer or copy it from the training run's OUT_DIR")
    try:
        if meta.get("kind") == "hf":
            backend = _auto_tokenizer(str(directory), local_files_only=True)
        else:
            backend = _FastTokenizer.from_file(str(directory / TOKENIZER_FILE))
    except Exception as exc:  # tokenizers raises a plain Exception for a bad file, transformers several types
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise HierarchosError(f"{directory}: the tokenizer files are missing or corrupt ({reason}); "
                              "re-save the tokenizer or copy it from the training run's OUT_DIR") from None
    return Tokenizer(backend, kind=str(meta.get("kind", "bpe")), name=str(meta.get("name", directory)), **specials)


def _auto_tokenizer(name_or_path: str, local_files_only: bool):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(name_or_path, local_files_only=local_files_only,
                                         trust_remote_code=False)


def _wrap_transformers(backend, name: str) -> Tokenizer:
    eos = backend.eos_token or getattr(backend, "sep_token", None)
    if eos is None:
        raise HierarchosError(ERR_NO_EOS.format(name=name))
    return Tokenizer(backend, kind="hf", name=name, eos=eos, pad=backend.pad_token or eos,
                     bos=backend.bos_token, unk=backend.unk_token)


def _load_directory(directory: Path) -> Tokenizer:
    if (directory / META_FILE).is_file():
        return _load_saved(directory)
    try:
        return _wrap_transformers(_auto_tokenizer(str(directory), local_files_only=True), str(directory))
    except HierarchosError:
        raise
    except Exception:
        pass
    if (directory / TOKENIZER_FILE).is_file():  # a bare tokenizers file: look for an eos-like token
        try:
            backend = _FastTokenizer.from_file(str(directory / TOKENIZER_FILE))
        except Exception as exc:  # tokenizers raises a plain Exception for a bad file
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise HierarchosError(f"{directory / TOKENIZER_FILE}: not a readable tokenizer file ({reason}); "
                                  "re-save it") from None
        vocab = backend.get_vocab()
        eos = next((t for t in (EOS, "<|endoftext|>", "</s>", "<eos>", "[SEP]") if t in vocab), None)
        if eos is None:
            raise HierarchosError(ERR_NO_EOS.format(name=str(directory)))
        pad = PAD if PAD in vocab else ("<|padding|>" if "<|padding|>" in vocab else None)
        return Tokenizer(backend, kind="hf", name=str(directory), eos=eos, pad=pad,
                         bos=BOS if BOS in vocab else None, unk=UNK if UNK in vocab else None)
    raise HierarchosError(ERR_BAD_DIR.format(path=directory))


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when HF_HUB_OFFLINE is set or the hub's host does not accept a TCP connection within
    `timeout` seconds (the hub clients would otherwise retry for most of a minute)."""
    if _hub_offline():
        return False
    import socket
    import threading
    from urllib.parse import urlparse

    from huggingface_hub import constants
    endpoint = urlparse(constants.ENDPOINT)
    address = (endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443))
    connected: list[bool] = []

    def probe():
        try:
            socket.create_connection(address, timeout=timeout).close()
            connected.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(connected)


@contextlib.contextmanager
def hub_offline_mode():
    """Make huggingface_hub / datasets read only their caches (they read HF_HUB_OFFLINE at import)."""
    import importlib
    patched = []
    for module_name, attribute in (("huggingface_hub.constants", "HF_HUB_OFFLINE"),
                                   ("datasets.config", "HF_HUB_OFFLINE")):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if hasattr(module, attribute):
            patched.append((module, attribute, getattr(module, attribute)))
            setattr(module, attribute, True)
    try:
        yield
    finally:
        for module, attribute, value in patched:
            setattr(module, attribute, value)


MISSING_PHRASES = ("couldn't find", "could not find", "not a valid model identifier", "local_files_only",
                   "couldn't connect", "does not appear to have a file", "can't load tokenizer", "offline mode")


def _files_missing(exc: BaseException) -> bool:
    """Whether a hub load failed because the files are not there (not cached, not on the hub),
    rather than because they are there and broken (corrupt JSON, a missing package, ...)."""
    try:
        from huggingface_hub import errors as hub_errors
        missing = tuple(getattr(hub_errors, name) for name in (
            "LocalEntryNotFoundError", "EntryNotFoundError", "RepositoryNotFoundError", "OfflineModeIsEnabled")
            if hasattr(hub_errors, name))
    except ImportError:
        missing = ()
    if missing and isinstance(exc, missing):
        return True
    return isinstance(exc, OSError) and any(phrase in str(exc).lower() for phrase in MISSING_PHRASES)


def _load_hub(name: str, allow_network: bool = True) -> Tokenizer:
    failure = None  # the first failure that was not "no such files"
    for local_only in (True, False):  # the local cache first; the hub only when it answers
        if not local_only and not (allow_network and hub_reachable()):
            break
        try:
            return _wrap_transformers(_auto_tokenizer(name, local_files_only=local_only), name)
        except HierarchosError:
            raise
        except Exception as exc:
            if failure is None and not _files_missing(exc):
                failure = exc
    if failure is not None:
        reason = " ".join(str(failure).split())[:200]
        raise HierarchosError(f"tokenizer '{name}': its files were found but could not be loaded "
                              f"({type(failure).__name__}: {reason}); fix or re-download them (delete the "
                              "cached copy), or pass another --tokenizer-path")
    raise HierarchosError(ERR_HUB_NOT_CACHED.format(name=name))


def load_bundled_tokenizer() -> Tokenizer:
    from hierarchos.data import bundled_tokenizer_path
    return _load_saved(Path(bundled_tokenizer_path()))


def load_tokenizer(spec: str | None, training_texts: Iterable[str] | None = None) -> Tokenizer:
    """Resolve `--tokenizer-path`: byte | char | bpe:N | a tokenizer directory | a hub name | None.

    None: openai-community/gpt2 from the local Hugging Face cache (never the network), else the
    bundled byte-level BPE, announced in one line on stderr.
    """
    if spec is None:
        try:
            return _load_hub(DEFAULT_HUB_TOKENIZER, allow_network=False)
        except HierarchosError:
            tokenizer = load_bundled_tokenizer()
            print(BUNDLED_NOTICE.format(n=tokenizer.vocab_size), file=sys.stderr)
            return tokenizer
    spec = str(spec).strip()
    if spec == "byte":
        return build_byte_tokenizer()
    if spec == "char" or spec.startswith("bpe:"):
        if training_texts is None:
            raise HierarchosError(ERR_NEEDS_TEXT.format(spec=spec))
        if spec == "char":
            return build_char_tokenizer(training_texts)
        minimum = 256 + len(SPECIAL_TOKENS)
        try:
            size = int(spec[4:])
        except ValueError:
            size = -1
        if size < minimum:
            raise HierarchosError(ERR_BAD_BPE_SIZE.format(spec=spec, minimum=minimum,
                                                          n_special=len(SPECIAL_TOKENS)))
        return train_bpe_tokenizer(training_texts, size)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_directory(path)
    if path.is_file() and path.name.endswith(".json"):  # a bare tokenizer.json file
        return _load_directory(path.parent)
    return _load_hub(spec)
