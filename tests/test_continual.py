"""Continual learning (hierarchos.train.continual, `train --model-path` on new data): the char
tokenizer grows with old ids kept, the vocabulary grows with old-token logits unchanged, layers
grow with `--grow-every-chars`, each run's characters and growth land in the history, and a
tokenizer that renumbers old tokens is a one-line error."""

from __future__ import annotations

import json

import pytest
import torch

from hierarchos.cli import main
from hierarchos.config import tiny_config
from hierarchos.data.tokenizers import build_char_tokenizer, changed_ids, extend_char_tokenizer
from hierarchos.errors import HierarchosError
from hierarchos.io import load_model_dir, save_model_dir
from hierarchos.model import HierarchosLM
from hierarchos.train.continual import continual_tokenizer, grow_for_data

OLD_TEXT = "alice was beginning to get very tired of sitting by her sister on the bank\n" * 30
NEW_TEXT = "To be, or not to be: that is the Question! Whether 'tis nobler; in the MIND?\n" * 30


@pytest.fixture
def char_model_dir(tmp_path):
    torch.manual_seed(0)
    tokenizer = build_char_tokenizer([OLD_TEXT])
    model = HierarchosLM(tiny_config(vocab_size=tokenizer.vocab_size))
    history = [{"dataset": "alice", "chars": len(OLD_TEXT), "tokens": len(OLD_TEXT), "steps": 1}]
    return save_model_dir(tmp_path / "m1", model, tokenizer, history=history), tokenizer, model


def test_char_tokenizer_extension_keeps_old_ids():
    old = build_char_tokenizer([OLD_TEXT])
    new = extend_char_tokenizer(old, [NEW_TEXT])
    assert new.vocab_size > old.vocab_size and changed_ids(old, new) == []
    assert new.encode(OLD_TEXT[:40]) == old.encode(OLD_TEXT[:40])
    assert new.decode(new.encode(NEW_TEXT[:60])) == NEW_TEXT[:60]
    assert extend_char_tokenizer(old, [OLD_TEXT]) is old  # nothing new: the same tokenizer


def test_vocabulary_growth_keeps_old_token_logits(char_model_dir):
    path, old_tok, old_model = char_model_dir
    tokenizer = continual_tokenizer(str(path), None, [NEW_TEXT])
    assert tokenizer.vocab_size > old_tok.vocab_size
    grown, record = grow_for_data(old_model, tokenizer.vocab_size, [], None, None, log=lambda line: None)
    assert record == {"vocab_growth": [old_tok.vocab_size, tokenizer.vocab_size]}
    tokens = torch.tensor([old_tok.encode(OLD_TEXT[:50])])
    old_logits = old_model(tokens).logits
    new_logits = grown(tokens).logits
    assert new_logits.shape[-1] == tokenizer.vocab_size
    torch.testing.assert_close(new_logits[..., :old_tok.vocab_size], old_logits, rtol=1e-5, atol=1e-6)


def test_grow_every_chars_counts_the_history():
    torch.manual_seed(0)
    model = HierarchosLM(tiny_config())
    history = [{"chars": 2500}, {"chars": 1000, "layer_growths": 1}]
    grown, record = grow_for_data(model, 64, history, 1600, 1000, log=lambda line: None)  # 5100 chars: 5 due, 1 done
    assert record == {"layer_growths": 4}
    assert (grown.cfg.h_layers, grown.cfg.l_layers) == (model.cfg.h_layers + 4, model.cfg.l_layers + 4)
    tokens = torch.randint(0, 64, (2, 11))
    torch.testing.assert_close(grown(tokens).logits, model(tokens).logits, rtol=1e-5, atol=1e-6)
    same, record = grow_for_data(model, 64, [{"chars": 1500, "layer_growths": 1}], 400, 1000,
                                 log=lambda line: None)  # 1900 chars: 1 due, 1 done
    assert same is model and record == {}
    with pytest.raises(HierarchosError, match="LoRA finetune cannot grow the vocabulary"):
        grow_for_data(model, 80, [], None, None, allow_growth=False)


def test_train_model_path_grows_and_records_history(char_model_dir, tmp_path):
    path, old_tok, _ = char_model_dir
    data = tmp_path / "new.txt"
    data.write_text(NEW_TEXT, encoding="utf-8")
    out = tmp_path / "m2"
    assert main(["train", "--train", str(data), "--model-path", str(path), "--max_length", "32", "--batch_size", "2",
                 "--epochs", "1", "--max-steps", "2", "--device", "cpu", "--grow-every-chars", "3000",
                 "--out-dir", str(out)]) == 0
    model, meta = load_model_dir(out)
    history = meta["training_history"]
    assert [entry.get("dataset") for entry in history] == ["alice", "new.txt"]
    assert history[-1]["chars"] == len(NEW_TEXT) and history[-1]["tokens"] > 0
    assert history[-1]["vocab_growth"][0] == old_tok.vocab_size == history[-1]["vocab_growth"][1] - 14
    assert history[-1]["layer_growths"] == 1 and model.cfg.h_layers == 2
    saved = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    assert all(saved[token] == i for token, i in old_tok.backend.get_vocab().items())


def test_renumbering_tokenizer_is_a_one_line_error(char_model_dir, tmp_path, capsys):
    path, _, _ = char_model_dir
    data = tmp_path / "new.txt"
    data.write_text(NEW_TEXT, encoding="utf-8")
    assert main(["train", "--train", str(data), "--model-path", str(path), "--tokenizer-path", "byte",
                 "--max_length", "32", "--batch_size", "2", "--out-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --tokenizer-path byte: it gives old token ids other tokens")
    assert main(["finetune", "--train", str(data), "--model-path", str(path), "--max_length", "32",
                 "--batch_size", "2", "--out-dir", str(tmp_path / "y")]) == 2
    assert "cannot grow the vocabulary" in capsys.readouterr().err
