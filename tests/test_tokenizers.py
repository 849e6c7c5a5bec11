"""Tokenizers: every kind round-trips text, save/load keeps ids, streaming decodes split characters."""

import json
import random
import uuid

import pytest

from hierarchos.data import bundled_tokenizer_path, load_tokenizer
from hierarchos.data import tokenizers as tok_mod
from hierarchos.errors import HierarchosError

TEXT = "Fair is foul, and foul is fair:\nHéllo wörld — naïve café 😀🎭 你好 <eos> tabs\there.\n"
TRAINING = [TEXT, "Hover through the fog and filthy air.", "When shall we three meet again?"] * 3


@pytest.fixture(params=["byte", "char", "bpe:400", "bundled", "hf_dir"])
def tokenizer(request, tmp_path):
    if request.param == "bundled":
        return load_tokenizer(bundled_tokenizer_path())
    if request.param == "hf_dir":  # a transformers tokenizer directory, as save_pretrained writes it
        from transformers import PreTrainedTokenizerFast
        trained = tok_mod.train_bpe_tokenizer(TRAINING, 400)
        hf = PreTrainedTokenizerFast(tokenizer_object=trained.backend, eos_token="<eos>",
                                     pad_token="<pad>", bos_token="<bos>", unk_token="<unk>")
        hf.save_pretrained(tmp_path / "hf")
        assert not (tmp_path / "hf" / tok_mod.META_FILE).exists()
        return load_tokenizer(str(tmp_path / "hf"))
    return load_tokenizer(request.param, TRAINING)


def test_round_trip_and_ids(tokenizer):
    ids = tokenizer.encode(TEXT)
    assert tokenizer.decode(ids) == TEXT
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.eos_id is not None and tokenizer.pad_id is not None
    assert tokenizer.eos_id not in ids  # "<eos>" in text is plain text, not the special token
    assert tokenizer.decode(ids + [tokenizer.eos_id]) == TEXT  # specials skipped by default
    assert tokenizer.encode_batch([TEXT, "air"]) == [ids, tokenizer.encode("air")]
    assert isinstance(tokenizer.name, str) and tokenizer.name


def test_save_load_restores_ids(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "saved")
    assert not list((tmp_path / "saved").glob("*.pkl")) and not list((tmp_path / "saved").glob("*.bin"))
    restored = load_tokenizer(str(tmp_path / "saved"))
    assert restored.encode(TEXT) == tokenizer.encode(TEXT)
    assert (restored.vocab_size, restored.eos_id, restored.pad_id, restored.bos_id, restored.name) == (
        tokenizer.vocab_size, tokenizer.eos_id, tokenizer.pad_id, tokenizer.bos_id, tokenizer.name)


def test_stream_decoder_split_multibyte(tokenizer):
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    text = "".join(rng.choice(["😀", "é", "你", "a", " ", "\n", "🎭", "ß"]) for _ in range(60))
    ids = tokenizer.encode(text)
    if tokenizer.kind == "char":
        ids = tokenizer.encode(TEXT)
        text = TEXT
    stream = tokenizer.decode_stream()
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) + stream.flush() == text, f"seed {seed}"
    assert not any("\ufffd" in p for p in pieces), f"seed {seed}"


def test_byte_tokenizer_layout():
    byte = load_tokenizer("byte")
    assert byte.vocab_size == 260
    assert byte.encode("é😀") == list("é😀".encode("utf-8"))
    assert (byte.pad_id, byte.eos_id, byte.bos_id) == (256, 257, 258)
    stream = byte.decode_stream()
    assert [stream.push(b) for b in "😀".encode()] == ["", "", "", "😀"]


def test_char_unknown_maps_to_unk():
    char = load_tokenizer("char", ["abc"])
    ids = char.encode("abz")
    assert ids[-1] == char.unk_id
    assert char.decode(ids) == "ab"


def test_needs_training_text_and_bad_size():
    with pytest.raises(HierarchosError, match="builds its vocabulary from the training text"):
        load_tokenizer("char")
    with pytest.raises(HierarchosError, match="N must be an integer of at least 260"):
        load_tokenizer("bpe:100", TRAINING)


def test_hub_name_not_cached_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = f"no-such-user-{uuid.uuid4().hex[:8]}/no-such-tokenizer"
    with pytest.raises(HierarchosError) as info:
        load_tokenizer(name)
    assert str(info.value) == tok_mod.ERR_HUB_NOT_CACHED.format(name=name)
    assert "\n" not in str(info.value)


def test_default_falls_back_to_bundled(monkeypatch, capsys):
    def not_cached(name, allow_network=True):
        raise HierarchosError(tok_mod.ERR_HUB_NOT_CACHED.format(name=name))
    monkeypatch.setattr(tok_mod, "_load_hub", not_cached)
    tokenizer = load_tokenizer(None)
    assert tokenizer.name == "hierarchos-bundled-bpe-4096" and tokenizer.vocab_size == 4096
    assert capsys.readouterr().err.strip() == tok_mod.BUNDLED_NOTICE.format(n=4096)
    meta = json.loads((tok_mod.Path(bundled_tokenizer_path()) / tok_mod.META_FILE).read_text())
    assert meta["eos"] == "<eos>"


@pytest.mark.parametrize("failure,says", [
    (OSError("We couldn't connect to 'https://huggingface.co' to load this file, couldn't find it in the cached "
             "files"), "not cached"),
    (ValueError("This tokenizer cannot be instantiated. Please make sure you have `sentencepiece` installed"),
     "ValueError: This tokenizer cannot be instantiated"),
    (Exception("expected value at line 1 column 1"), "Exception: expected value at line 1 column 1"),
])
def test_hub_load_failure_says_what_happened(monkeypatch, failure, says):
    def broken(name, local_files_only):
        raise failure
    monkeypatch.setattr(tok_mod, "_auto_tokenizer", broken)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HierarchosError) as info:
        load_tokenizer("someone/some-tokenizer")
    message = str(info.value)
    if says == "not cached":
        assert message == tok_mod.ERR_HUB_NOT_CACHED.format(name="someone/some-tokenizer")
    else:
        assert message.startswith("tokenizer 'someone/some-tokenizer': its files were found but could not be "
                                  f"loaded ({says}") and "\n" not in message, message
