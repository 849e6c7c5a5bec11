"""Tokenize a dataset once and write it as fixed-length chunks for `train --pre_pt_dataset`
(safetensors chunk files + manifest.jsonl) or, with --jsonl, `--pre_chunked_dataset` (chunks.jsonl).

    python scripts/dataset_chunk_create.py --dataset data.jsonl --tokenizer-path byte \
        --output-dir my_chunks --max-length 1024 --overlap 128

Each record becomes its training text (plain, prompt/completion, Alpaca or Kayla, as `train`
reads it) + EOS, cut into windows of --max-length tokens sharing --overlap tokens. The tokenizer
is saved into the output directory. The last line printed is MAX_SEQ_LENGTH=<n>: the longest
chunk, to pass as `train --max_length`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from hierarchos.cli import OneLineParser  # noqa: E402
from hierarchos.data.chunked import JSONL_FILE, chunk_tokens, write_prechunked_jsonl, write_pt_chunks  # noqa: E402
from hierarchos.data.sources import DataSpec, load_texts  # noqa: E402
from hierarchos.data.tokenizers import load_tokenizer  # noqa: E402
from hierarchos.errors import HierarchosError  # noqa: E402
from hierarchos.io import atomic_dir  # noqa: E402

DEFAULT_OVERLAP = 1024
ENCODE_BATCH = 256


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True,
                        help="data file or folder (.json, .jsonl, .txt, .csv, .parquet) as `train --train` reads it")
    parser.add_argument("--tokenizer-path", default=None,
                        help="byte | char | bpe:N | tokenizer directory | hub name (default: as `train`: "
                             "openai-community/gpt2 if cached, else the bundled BPE)")
    parser.add_argument("--output-dir", default="train_Hierarchos_chunked_tensors")
    parser.add_argument("--max-length", type=int, default=1024, help="tokens per chunk (default 1024)")
    parser.add_argument("--overlap", type=int, default=None,
                        help=f"tokens shared by consecutive chunks of one record (default {DEFAULT_OVERLAP}, "
                             "capped at half of --max-length); must be smaller than --max-length")
    parser.add_argument("--chunks-per-file", type=int, default=1000, help="chunks per safetensors file")
    parser.add_argument("--jsonl", action="store_true",
                        help=f"write a pre-chunked JSONL ({JSONL_FILE}) for --pre_chunked_dataset instead")
    parser.add_argument("--text_column", default=None)
    parser.add_argument("--prompt_column", default=None)
    parser.add_argument("--completion_column", default=None)
    parser.add_argument("--kayla", action="store_true", help="records in Kayla format (with thought-process)")
    return parser.parse_args(argv)


def resolve_overlap(overlap: int | None, max_length: int) -> int:
    """The explicit --overlap, checked, or the default: 1024 capped at half of max_length (the
    summary line reports the value used)."""
    if max_length < 1:
        raise HierarchosError(f"--max-length {max_length}: must be a positive integer")
    if overlap is None:
        return min(DEFAULT_OVERLAP, max_length // 2)
    if not 0 <= overlap < max_length:
        raise HierarchosError(f"--overlap {overlap} must be at least 0 and smaller than --max-length "
                              f"{max_length}: lower --overlap or raise --max-length")
    return overlap


def iter_chunks(texts: list[str], tokenizer, max_length: int, overlap: int) -> Iterator[list[int]]:
    for start in range(0, len(texts), ENCODE_BATCH):
        for ids in tokenizer.encode_batch(texts[start:start + ENCODE_BATCH]):
            yield from chunk_tokens(list(ids) + [tokenizer.eos_id], max_length, overlap)


def main(argv=None) -> int:
    args = parse_args(argv)
    overlap = resolve_overlap(args.overlap, args.max_length)
    if args.chunks_per_file < 1:
        raise HierarchosError(f"--chunks-per-file {args.chunks_per_file}: must be a positive integer")
    loaded = load_texts(DataSpec(train=args.dataset, text_column=args.text_column, prompt_column=args.prompt_column,
                                 completion_column=args.completion_column, kayla=args.kayla))
    tokenizer = load_tokenizer(args.tokenizer_path, loaded.texts)
    chunks = iter_chunks(loaded.texts, tokenizer, args.max_length, overlap)
    out_dir = Path(args.output_dir)
    if args.jsonl:
        with atomic_dir(out_dir) as tmp:
            stats = write_prechunked_jsonl(chunks, tmp / JSONL_FILE)
            tokenizer.save(tmp)
        where = out_dir / JSONL_FILE
    else:
        stats = write_pt_chunks(chunks, out_dir, args.max_length, args.chunks_per_file, tokenizer.name,
                                tokenizer=tokenizer)
        where = out_dir
    files = "" if args.jsonl else f" in {stats['num_files']} files"
    print(f"{loaded.name}: {loaded.n_records} records -> {stats['num_chunks']} chunks{files}, "
          f"{stats['num_tokens']:,} tokens (max_length {args.max_length}, overlap {overlap}, "
          f"tokenizer {tokenizer.name}) -> {where}")
    print(f"MAX_SEQ_LENGTH={stats['max_seq_length']}")
    return 0


if __name__ == "__main__":
    from hierarchos.cli import script_entry

    script_entry(main)
