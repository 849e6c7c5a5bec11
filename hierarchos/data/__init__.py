"""Training data and tokenizers: sources (local files, folders, Hugging Face datasets), record
formats (plain, prompt/completion, Alpaca, Kayla), tokenizers, and the bundled demo data.

The bundled data (a few Shakespeare plays from Project Gutenberg, an Alpaca-format instruction
set built from them, and a byte-level BPE trained on them) ships inside the package, so training
and the default tokenizer work offline on a first run. `scripts/build_bundled_data.py` rebuilds it.
"""

from pathlib import Path

_BUNDLED = Path(__file__).resolve().parent / "bundled"


def bundled_corpus_path() -> str:
    """Folder of the bundled plays (one UTF-8 .txt per play): pass it to --train."""
    return str(_BUNDLED / "shakespeare")


def bundled_instructions_path() -> str:
    """The bundled Alpaca-format instruction set (JSONL: instruction, input, output)."""
    return str(_BUNDLED / "shakespeare_instructions.jsonl")


def bundled_tokenizer_path() -> str:
    """Directory of the bundled byte-level BPE tokenizer (tokenizer.json + hierarchos_tokenizer.json)."""
    return str(_BUNDLED / "tokenizer")


from hierarchos.data.tokenizers import Tokenizer, load_tokenizer  # noqa: E402
from hierarchos.data.sources import DataSpec, LoadedTexts, auto_max_length, load_texts  # noqa: E402

__all__ = ["Tokenizer", "load_tokenizer", "DataSpec", "LoadedTexts", "load_texts", "auto_max_length",
           "bundled_corpus_path", "bundled_instructions_path", "bundled_tokenizer_path"]
