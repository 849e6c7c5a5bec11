"""The native BPE encoder (hierarchos.data.fast_bpe, kernels/bpe.cpp) against its reference, the
`tokenizers` library: the same ids on random Unicode text, real text, edge cases and tokenizers of
each qualifying kind; the character classes it learns from the library; the fallback to the library
when the two disagree or the kernel is missing; and token caches built both ways, byte for byte.
"""

from __future__ import annotations

import json
import random
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from hierarchos.data import bundled_tokenizer_path, fast_bpe, streaming, token_cache
from hierarchos.data.sources import DataSpec
from hierarchos.data.tokenizers import Tokenizer, build_byte_tokenizer, load_tokenizer, train_bpe_tokenizer

pytestmark = pytest.mark.skipif(fast_bpe._kernels() is None, reason="hierarchos_kernels with BpeEncoder not built")

SHAKESPEARE = Path(bundled_tokenizer_path()).parent.parent / "shakespeare"
# characters by kind, so random strings hit every branch of the pre-tokenizer's regex
LETTERS = "abcxyzABCXYZéüßøñçÆœſ" "αβγΩЖжщЯ" "אבגعربي" "हिन्दी" "日本語中文한국어" "ᏣᎳᎩ" "𐐀𐐨" "ǅᾈ"
NUMBERS = "0123456789" "٠١٢" "०१" "½¾⅓" "Ⅻⅷ" "²³" "𝟘𝟙" "〇"
MARKS = "\u0301\u0308\u0327\u064b\u093f\u200d\ufe0f"  # combining marks, ZWJ, variation selector
OTHER = "!\"#$%&()*+,-./:;<=>?@[\\]^_`{|}~" "¡¿«»—–…•€£¥©®™" "🙂🎉👍🏽🧑‍💻🇫🇷" "\x00\x07\x1c\x1f\x7f\u200b\ufeff"
SPACES = [" ", " ", " ", "  ", "\n", "\r\n", "\t", " \t ", "\n\n", "   \n", "\u00a0", "\u3000", "\u2028", "\x0b", "\x85"]
CONTRACTIONS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "''", "'", " '", "'x", "n't", "’s"]


@pytest.fixture(scope="module")
def bpe():
    return load_tokenizer(bundled_tokenizer_path())


@pytest.fixture
def seed():
    value = random.randrange(2**31)
    print(f"seed {value}")
    return value


def random_unicode(rng: random.Random, n: int) -> str:
    parts = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.3:
            parts.append("".join(rng.choice(LETTERS) for _ in range(rng.randrange(1, 8))))
        elif kind < 0.4:
            parts.append("".join(rng.choice(NUMBERS) for _ in range(rng.randrange(1, 6))))
        elif kind < 0.5:
            parts.append(rng.choice(MARKS))
        elif kind < 0.62:
            parts.append("".join(rng.choice(OTHER) for _ in range(rng.randrange(1, 4))))
        elif kind < 0.85:
            parts.append(rng.choice(SPACES))
        elif kind < 0.95:
            parts.append(rng.choice(CONTRACTIONS))
        else:
            parts.append(chr(rng.randrange(0x80, 0x2FFFF)) if rng.random() < 0.5 else chr(rng.randrange(0xE000, 0x10FFFF)))
    text = "".join(parts)
    return "".join(ch for ch in text if not 0xD800 <= ord(ch) < 0xE000)


def assert_same(native: fast_bpe.NativeBPE, tokenizer: Tokenizer, texts: list[str]) -> None:
    ids, counts = native.encode_batch(texts, np.uint32)
    assert counts.tolist() == [len(tokenizer.encode(t)) for t in texts]
    ends = np.cumsum(counts)
    for text, end, count in zip(texts, ends, counts):
        assert ids[end - count:end].tolist() == tokenizer.encode(text), repr(text)[:300]


def native(tokenizer: Tokenizer, **kwargs) -> fast_bpe.NativeBPE:
    encoder, why = fast_bpe.native_for(tokenizer)
    assert encoder is not None, why
    return fast_bpe.NativeBPE(json.loads(tokenizer.backend.to_str()), **kwargs) if kwargs else encoder


def test_random_unicode_gives_the_library_ids(bpe, seed):
    rng = random.Random(seed)
    texts = [random_unicode(rng, rng.randrange(0, 120)) for _ in range(400)]
    texts += [t + rng.choice(SPACES) * rng.randrange(1, 4) for t in texts[:50]]  # trailing whitespace runs
    assert_same(native(bpe), bpe, texts)


def test_the_same_ids_whatever_the_number_of_threads(bpe, seed):
    rng = random.Random(seed)
    texts = [random_unicode(rng, rng.randrange(0, 400)) for _ in range(300)]
    one, one_counts = native(bpe, threads=1).encode_batch(texts)
    four, four_counts = native(bpe, threads=4).encode_batch(texts)
    np.testing.assert_array_equal(one, four)
    np.testing.assert_array_equal(one_counts, four_counts)


def test_real_text_shakespeare_and_python_sources(bpe):
    texts = [path.read_text(encoding="utf-8") for path in sorted(SHAKESPEARE.glob("*.txt"))]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts += [path.read_text(encoding="utf-8") for path in sorted((stdlib / "json").glob("*.py"))]
    texts += [(stdlib / name).read_text(encoding="utf-8") for name in ("textwrap.py", "unicodedata.py")
              if (stdlib / name).is_file()]
    encoder = native(bpe)
    ids, counts = encoder.encode_batch(texts)
    reference = [i for t in texts for i in bpe.encode_batch([t])[0]]
    assert ids.dtype == np.uint16 and ids.tolist() == reference


def test_edge_cases_empty_texts_and_one_huge_line(bpe):
    encoder = native(bpe)
    ids, counts = encoder.encode_batch([])
    assert len(ids) == 0 and len(counts) == 0
    assert_same(encoder, bpe, ["", " ", "\n", "'", "'s", "a", "  a", " \n a", "x" * 3, "\t\t", "", "🙂"])
    rng = random.Random(0)
    huge = "".join(rng.choice("abcdefgh") for _ in range(300_000))  # one pre-token of 300k bytes
    line = " ".join(rng.choice(["word", "thou", "7", "42", "art", "naïve", "—"]) for _ in range(200_000))
    assert_same(encoder, bpe, [huge, line, " " * 100_000 + "x", "9" * 50_000])


def test_special_token_strings_are_plain_text_as_in_the_library(bpe):
    texts = ["<eos>", "a<eos>b", "<pad><bos> <unk>", "x <|endoftext|> y", "<eos"]
    assert_same(native(bpe), bpe, texts)
    assert bpe.eos_id not in native(bpe).encode("a<eos>b")


def test_a_transformers_fast_tokenizer_of_the_same_kind(bpe, seed):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as Fast

    backend = transformers.PreTrainedTokenizerFast(tokenizer_object=Fast.from_str(bpe.backend.to_str()),
                                                   eos_token="<eos>", pad_token="<pad>")
    hf = Tokenizer(backend, kind="hf", name="wrapped", eos="<eos>", pad="<pad>")
    rng = random.Random(seed)
    assert_same(native(hf), hf, ["hello <eos> world", *(random_unicode(rng, 60) for _ in range(40))])


def test_byte_tokenizer_and_a_trained_bpe(seed):
    rng = random.Random(seed)
    corpus = [random_unicode(rng, 60) for _ in range(200)]
    byte = build_byte_tokenizer()
    assert_same(native(byte), byte, corpus[:50])
    trained = train_bpe_tokenizer(corpus, 600)
    assert_same(native(trained), trained, [random_unicode(rng, 80) for _ in range(100)])


def test_ignore_merges_tokenizer(bpe, seed):
    spec = json.loads(bpe.backend.to_str())
    spec["model"]["ignore_merges"] = True
    # a whole-word token no merge sequence would reach, so ignoring the merges is visible
    spec["model"]["vocab"]["zqzq"] = max(spec["model"]["vocab"].values()) + 1
    from tokenizers import Tokenizer as Fast

    tokenizer = Tokenizer(Fast.from_str(json.dumps(spec)), kind="bpe", name="ignore", eos="<eos>", pad="<pad>")
    assert tokenizer.encode("zqzq") == [spec["model"]["vocab"]["zqzq"]]
    rng = random.Random(seed)
    assert_same(native(tokenizer), tokenizer, ["zqzq the zqzq", *(random_unicode(rng, 50) for _ in range(50))])


def test_classes_of_hand_picked_code_points():
    # the oracle: GPT-2's regex classes, by hand (\s is Unicode's White_Space, not Python's isspace)
    cases = {"a": 1, "Z": 1, "é": 1, "日": 1, "ǅ": 1, "1": 2, "½": 2, "Ⅻ": 2, "٣": 2, " ": 3, "\t": 3, "\n": 3,
             "\x0b": 3, "\x85": 3, "\u00a0": 3, "\u3000": 3, "\u2028": 3, "!": 0, "'": 0, "\u0301": 0, "🙂": 0,
             "\x1c": 0, "\x1f": 0, "\u200b": 0, "\x00": 0}
    probed = fast_bpe.probe_classes([ord(c) for c in cases])
    assert dict(zip(cases, probed.tolist())) == cases
    table = fast_bpe.char_classes()
    assert {c: table[ord(c)] for c in cases} == cases


def test_a_wrong_class_table_is_corrected_by_the_library(bpe):
    table = bytearray(fast_bpe.char_classes())
    for ch, wrong in (("é", 0), ("\u3000", 1), ("٣", 3)):
        table[ord(ch)] = wrong
    encoder = native(bpe, classes=bytes(table))
    texts = ["café au lait", "a\u3000b  \u3000 c", "x٣٣ y ٣"]
    assert_same(encoder, bpe, texts)
    assert encoder.classes[ord("é")] == 1 and encoder.classes[ord("\u3000")] == 3 and encoder.classes[ord("٣")] == 2


def test_which_tokenizers_qualify(bpe):
    assert fast_bpe.native_for(build_byte_tokenizer())[0] is not None
    char = load_tokenizer("char", ["abc"])
    assert fast_bpe.native_for(char)[0] is None and "pre-tokenizer" in fast_bpe.native_for(char)[1]
    spec = json.loads(bpe.backend.to_str())
    assert fast_bpe.why_not_native(spec) is None
    assert "normalizer" in fast_bpe.why_not_native({**spec, "normalizer": {"type": "NFC"}})
    added = {**spec, "added_tokens": spec["added_tokens"] + [{"id": 9999, "content": "zz", "special": False}]}
    assert "added tokens" in fast_bpe.why_not_native(added)
    prefix = {**spec, "pre_tokenizer": {**spec["pre_tokenizer"], "add_prefix_space": True}}
    assert "prefix space" in fast_bpe.why_not_native(prefix)


def test_switch_and_missing_kernel_use_the_library(bpe, monkeypatch):
    monkeypatch.setenv(fast_bpe.ENV_SWITCH, "0")
    assert fast_bpe.native_for(bpe) == (None, f"{fast_bpe.ENV_SWITCH}=0")
    monkeypatch.delenv(fast_bpe.ENV_SWITCH)
    monkeypatch.setattr(fast_bpe, "_kernels", lambda: None)
    encoder = fast_bpe.BatchEncoder(bpe, np.uint16)
    assert encoder.name == "tokenizers" and "not built" in encoder.why
    ids, counts = encoder.encode(["to be, or not", "to be"])
    assert ids.tolist() == bpe.encode("to be, or not") + bpe.encode("to be") and counts.tolist() == [
        len(bpe.encode("to be, or not")), len(bpe.encode("to be"))]


class _Wrong:
    """A native encoder that is wrong on texts containing 'fox' (the forced mismatch)."""

    def __init__(self, real):
        self.real = real

    def encode_batch(self, texts, dtype=None):
        ids, counts = self.real.encode_batch(texts, dtype)
        if any("fox" in t for t in texts):
            ids = ids.copy()
            ids[0] ^= 1
        return ids, counts


def test_a_mismatch_in_the_first_mib_falls_back_at_once(bpe):
    lines = []
    encoder = fast_bpe.BatchEncoder(bpe, np.uint16, log=lines.append)
    encoder.native = _Wrong(encoder.native)
    ids, _ = encoder.encode(["the fox", "jumps"])
    assert ids.tolist() == bpe.encode("the fox") + bpe.encode("jumps")  # the library's ids, not the wrong ones
    assert encoder.name == "tokenizers" and len(lines) == 1 and "disagrees with tokenizers" in lines[0]


def _cache(tmp_path, name, texts, tokenizer, monkeypatch=None, lines=None):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    source = streaming.open_source(DataSpec(train=str(path)))
    directory = tmp_path / f"cache-{name}"
    return token_cache.open_cache(directory, source, tokenizer, log=(lines.append if lines is not None else
                                                                      (lambda line: None))), directory


def test_a_later_mismatch_rebuilds_the_cache_with_the_library(tmp_path, bpe, monkeypatch):
    monkeypatch.setattr(token_cache, "BATCH_CHARS", 64)
    monkeypatch.setattr(fast_bpe, "FIRST_CHECK_CHARS", 100)
    monkeypatch.setattr(fast_bpe, "SLICE_CHARS", 10_000)  # the slice is the whole text: the fox is found
    real_native_for = fast_bpe.native_for
    monkeypatch.setattr(fast_bpe, "native_for", lambda tok: (_Wrong(real_native_for(tok)[0]), ""))
    texts = [f"line {i} of a text that is long enough to fill a batch" for i in range(20)] + ["the fox"] * 3
    lines = []
    cache, directory = _cache(tmp_path, "fox", texts, bpe, lines=lines)
    expected = [i for t in texts for i in bpe.encode(t) + [bpe.eos_id]]
    assert np.asarray(cache.tokens).tolist() == expected
    assert cache.index["encoder"] == "tokenizers"
    assert any("disagrees with tokenizers" in line for line in lines)
    assert cache.index["records"] == len(texts)  # the restarted build counted each record once


def test_native_and_library_caches_are_identical(tmp_path, bpe, seed, monkeypatch):
    monkeypatch.setattr(streaming, "PIECE_CHARS", 300)
    monkeypatch.setattr(token_cache, "BATCH_CHARS", 2000)
    rng = random.Random(seed)
    texts = [random_unicode(rng, rng.randrange(1, 200)) for _ in range(150)]
    texts = [t for t in texts if t.strip()]
    native_cache, native_dir = _cache(tmp_path, "a", texts, bpe)
    monkeypatch.setenv(fast_bpe.ENV_SWITCH, "0")
    library_cache, library_dir = _cache(tmp_path, "b", texts, bpe)
    assert native_cache.index["encoder"] == "native" and library_cache.index["encoder"] == "tokenizers"
    for name in (token_cache.TOKENS, token_cache.DOC_ENDS, token_cache.DOC_BYTES):
        assert (native_dir / name).read_bytes() == (library_dir / name).read_bytes(), name
    assert native_cache.index["tokens_blake2b"] == library_cache.index["tokens_blake2b"]


def test_without_the_kernel_the_cache_is_built_by_the_library(tmp_path, bpe, monkeypatch):
    texts = ["to be, or not to be", "that is the question"]
    native_cache, _ = _cache(tmp_path, "n", texts, bpe)
    monkeypatch.setattr(fast_bpe, "_kernels", lambda: None)  # as on an install where the C++ build failed
    lines = []
    library_cache, _ = _cache(tmp_path, "l", texts, bpe, lines=lines)
    assert library_cache.index["encoder"] == "tokenizers" and native_cache.index["encoder"] == "native"
    assert "native BPE encoder not used: the C++ kernel (hierarchos_kernels) is not built" in lines[-1]
    assert np.asarray(library_cache.tokens).tolist() == np.asarray(native_cache.tokens).tolist()
