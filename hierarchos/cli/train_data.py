"""The data of a `train` run: the source, the tokenizer, and the token arrays training reads.

Text sources go through the token cache (hierarchos.data.token_cache): tokenized once, memory-mapped,
reused while the files and the tokenizer are unchanged. Pre-tokenized sources (--pre_chunked_dataset,
--pre_pt_dataset) are written into a cache of the same format (their ids, each chunk followed by EOS)
and memory-mapped the same way. The validation tokens are a --val
file's cache or the tail of the training array (--val-fraction); they are never copied into Python.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import HierarchosError

NEEDS_TEXT = ("char", "bpe:")  # tokenizers trained on the data itself


@dataclass
class RunData:
    name: str
    template: str
    tokenizer: object
    train_tokens: np.ndarray          # flat ids, each document followed by EOS
    val_tokens: np.ndarray | None = None
    val_bytes: int = 0
    n_chars: int | None = None
    cache: object = None                # the TokenCache of a text source (documents' ends and bytes)
    identity: dict = field(default_factory=dict)  # kept in checkpoints: which data a position refers to


def _barrier(dist_info) -> None:
    if dist_info is not None and dist_info.enabled:
        import torch.distributed as dist

        dist.barrier()


def _is_main(dist_info) -> bool:
    return dist_info is None or not dist_info.enabled or dist_info.is_main


def _cache(directory: Path, source, tokenizer, dist_info, **kwargs):
    from ..data import token_cache

    return token_cache.open_cache(directory, source, tokenizer, **kwargs,
                                  log=print if _is_main(dist_info) else (lambda line: None))


def val_text_bytes(tokenizer, tokens: np.ndarray, piece: int = 1 << 20) -> int:
    """UTF-8 bytes of the text `tokens` decode to (specials skipped), decoded in bounded pieces."""
    return sum(len(tokenizer.decode(tokens[i:i + piece].tolist()).encode("utf-8"))
               for i in range(0, len(tokens), piece))


def tail_bytes(data: RunData, split: int) -> int:
    """UTF-8 bytes of the text of tokens[split:]: the documents wholly inside from the cache's
    per-document counts, the one cut by `split` decoded (only its part after `split`)."""
    if data.cache is None:
        return val_text_bytes(data.tokenizer, data.val_tokens)
    ends, sizes = data.cache.doc_ends, data.cache.doc_bytes
    cut = int(np.searchsorted(ends, split, side="right"))  # the first document that ends after `split`
    start = int(ends[cut - 1]) if cut else 0
    if start == split:
        return int(sizes[cut:].sum())
    partial = val_text_bytes(data.tokenizer, data.cache.tokens[split:int(ends[cut])])
    return partial + int(sizes[cut + 1:].sum())


def prepare(args: argparse.Namespace, spec, resume, dist_info, resumed_tokenizer) -> RunData:
    """Under torchrun, rank 0 trains the tokenizer and builds the caches first; the other ranks then
    find both and reuse them (never two writers of one cache)."""
    if not _is_main(dist_info):
        _barrier(dist_info)
    data = _prepare(args, spec, resume, dist_info, resumed_tokenizer)
    if _is_main(dist_info):
        _barrier(dist_info)
    return data


def _prepare(args: argparse.Namespace, spec, resume, dist_info, resumed_tokenizer) -> RunData:
    from ..data import token_cache
    from ..data.streaming import open_source
    from ..data.tokenizers import load_tokenizer

    root = Path(args.token_cache).expanduser() if getattr(args, "token_cache", None) else token_cache.default_root()
    if args.pre_chunked_dataset or args.pre_pt_dataset:
        from ..data import chunked

        tok_source = args.tokenizer_path or args.model_path or args.train
        tokenizer = resumed_tokenizer or load_tokenizer(tok_source)
        path = Path(args.train)
        if args.pre_chunked_dataset:
            kind, documents = "chunked-jsonl", (lambda: chunked.iter_prechunked_jsonl(path))
            file = path / chunked.JSONL_FILE if path.is_dir() and (path / chunked.JSONL_FILE).is_file() else path
            if not file.is_file():
                chunked.iter_prechunked_jsonl(path)  # raises its one-line error
            files = [file]
        else:  # the manifest and the chunk files it names (a missing one fails when the build reaches it)
            kind, documents = "chunked-pt", (lambda: chunked.iter_pt_chunks(path))
            files = [path / chunked.MANIFEST_FILE] + [entry.path for entry in chunked.read_manifest(path)
                                                      if entry.path.is_file()]
        directory = token_cache.ids_cache_dir(root, path, kind, token_cache.tokenizer_identity(tokenizer)["sha256"])
        cache = token_cache.open_ids_cache(directory, files, documents, tokenizer, where=path,
                                           log=print if _is_main(dist_info) else (lambda line: None))
        data = RunData(path.name, "pretokenized", tokenizer, cache.tokens,
                       identity={"tokens": cache.n_tokens, "blake2b": cache.index.get("tokens_blake2b")})
    else:
        source = open_source(spec)
        tok_key = args.tokenizer_path or (f"model:{args.model_path}" if args.model_path else "default")
        directory = token_cache.cache_dir(root, source, tok_key)
        tokenizer, trained = resumed_tokenizer, False
        if tokenizer is None and args.model_path:  # continual learning: the model's tokenizer, extended or checked
            from ..train.continual import continual_tokenizer

            tokenizer = continual_tokenizer(args.model_path, args.tokenizer_path, source.texts())
        elif tokenizer is None and str(args.tokenizer_path or "").startswith(NEEDS_TEXT):
            tokenizer = token_cache.trained_tokenizer(directory, source)
            if tokenizer is None:
                print(f"tokenizer: training {args.tokenizer_path} on {source.name}")
                tokenizer = load_tokenizer(args.tokenizer_path, source.texts())
            trained = True
        elif tokenizer is None:
            tokenizer = load_tokenizer(args.tokenizer_path)
        cache = _cache(directory, source, tokenizer, dist_info, save_tokenizer=trained)
        index = cache.index
        data = RunData(index.get("name") or source.name, index.get("template") or "plain", tokenizer, cache.tokens,
                       n_chars=int(index.get("chars", 0)) or None, cache=cache,
                       identity={"tokens": cache.n_tokens, "blake2b": index.get("tokens_blake2b")})
        if args.auto_max_length:
            from ..data.sources import auto_max_length

            args.max_length = auto_max_length([int(cache.doc_lengths().max())], cap=8192)
            print(f"--auto-max-length: max_length = {args.max_length}")
    if args.val:
        from ..data.sources import DataSpec

        val_source = open_source(DataSpec(train=args.val, text_column=args.text_column))
        val_dir = token_cache.cache_dir(root, val_source, f"val:{token_cache.tokenizer_identity(data.tokenizer)['sha256']}")
        val_cache = _cache(val_dir, val_source, data.tokenizer, dist_info)
        if val_cache.n_tokens < 2:
            raise HierarchosError(f"--val {args.val}: {val_cache.n_tokens} token(s) of validation text, a window "
                                  "needs at least 2; use a longer file or drop --val")
        data.val_tokens = val_cache.tokens
        data.val_bytes = int(val_cache.index["text_bytes"])
    elif args.val_fraction > 0:
        # hold out the tail of the token stream (not whole documents: a corpus may be a few long ones)
        n_val = int(len(data.train_tokens) * args.val_fraction)
        if n_val >= 2:
            data.val_tokens = data.train_tokens[-n_val:]
            data.train_tokens = data.train_tokens[:-n_val]
            data.val_bytes = tail_bytes(data, len(data.train_tokens))
        else:
            print(f"validation: none this run (--val-fraction {args.val_fraction} of {len(data.train_tokens):,} "
                  f"tokens is {n_val}, fewer than the 2 a window needs); pass --val PATH or a larger --val-fraction")
    return data
