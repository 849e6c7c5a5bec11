"""Quantized model directories: write one from a model directory, find and load one for chat.

A quantized model directory (`quantize --out-dir DIR`) holds `model-QTYPE.gguf` (weights, config
and tokenizer: the file alone is enough) and `quantized.json` (which file, which format, made from
which model, bytes per storage format). `chat --model-path` takes the directory or the .gguf file.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..errors import HierarchosError
from . import formats, gguf_io

INFO_FILE = "quantized.json"
INFO_FORMAT = "hierarchos-quantized"
B64 = "base64:"  # prefix of an embedded tokenizer file that is not UTF-8 text


def gguf_name(qtype: str) -> str:
    return f"model-{qtype}.gguf"


def is_quantized_path(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path.is_file() and path.suffix.lower() == ".gguf") or (path.is_dir() and (path / INFO_FILE).is_file())


def resolve_gguf(path: str | os.PathLike) -> Path:
    """The .gguf file a --model-path names (the file itself, or the one its directory records)."""
    path = Path(path)
    if path.is_file():
        return path
    info_path = path / INFO_FILE
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        file = path / info["file"]
    except (OSError, ValueError, KeyError, TypeError):
        raise HierarchosError(f"{info_path}: unreadable or damaged; re-run `hierarchos quantize`") from None
    if Path(info["file"]).name != info["file"]:  # a name inside this folder, nothing else
        raise HierarchosError(f"{info_path}: 'file' must be a file name inside {path}; re-run `hierarchos quantize`")
    return file


def _tokenizer_files(tokenizer) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(tmp)
        files = {}
        for file in sorted(Path(tmp).iterdir()):
            raw = file.read_bytes()
            try:
                files[file.name] = raw.decode("utf-8")
            except UnicodeDecodeError:
                files[file.name] = B64 + base64.b64encode(raw).decode("ascii")
        return files


def load_embedded_tokenizer(files: dict[str, str], where: str):
    from ..data.tokenizers import load_tokenizer

    if not files:
        raise HierarchosError(f"{where}: no tokenizer embedded; re-run `hierarchos quantize`")
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in files.items():
            if Path(name).name != name:
                raise HierarchosError(f"{where}: embedded tokenizer file name {name!r} is not a plain name")
            target = Path(tmp) / name
            if text.startswith(B64):
                target.write_bytes(base64.b64decode(text[len(B64):]))
            else:
                target.write_text(text, encoding="utf-8")
        return load_tokenizer(tmp)


def config_with_sources(config_json: str, sources: list[str]) -> str:
    data = json.loads(config_json)
    data["memory_sources"] = list(sources)
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False)


def quantize_model_dir(model_path: str | os.PathLike, out_dir: str | os.PathLike, qtype: str) -> dict:
    """Quantize a full-precision model directory into `out_dir` (written atomically). Returns the info."""
    from ..data.tokenizers import load_tokenizer
    from ..io import CONFIG_FILE, atomic_dir, load_model_dir
    from .model import describe, quantize_tensors

    if qtype not in formats.QTYPES:
        raise HierarchosError(f"--qtype {qtype!r}: expected one of {', '.join(formats.QTYPES)}")
    model_path, out_dir = Path(model_path), Path(out_dir)
    if out_dir.resolve() == model_path.resolve():
        raise HierarchosError(f"--out-dir {out_dir}: is the model directory itself; choose a new directory")
    model, meta = load_model_dir(model_path)
    tokenizer = load_tokenizer(str(model_path))
    config_json = (model_path / CONFIG_FILE).read_text(encoding="utf-8")
    tensors = quantize_tensors(model, qtype)
    summary = describe(tensors)
    info = {"format": INFO_FORMAT, "version": 1, "file": gguf_name(qtype), "qtype": qtype,
            "source_model": str(model_path.resolve()),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "parameters": model.num_parameters(), "fp32_bytes": 4 * model.num_parameters(),
            "storage": summary, "bytes": sum(v["bytes"] for v in summary.values())}
    with atomic_dir(out_dir) as tmp:
        gguf_io.write_gguf(tmp / info["file"], tensors, config_json=config_json, qtype=qtype,
                           tokenizer_files=_tokenizer_files(tokenizer), name=model_path.name)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2), encoding="utf-8")
    return info


def load_quantized(path: str | os.PathLike):
    """(model, meta, tokenizer, GGUFModel) from a quantized directory or .gguf file."""
    from ..config import ModelConfig
    from ..io import read_config_payload
    from .model import build_quantized_model

    file = resolve_gguf(path)
    content = gguf_io.read_gguf(file)
    cfg, meta = read_config_payload(content.config, where=str(file))
    model = build_quantized_model(cfg, content.tensors, where=str(file))
    model.memory.source_names = list(meta.get("memory_sources") or [])
    tokenizer = load_embedded_tokenizer(content.tokenizer_files, str(file))
    assert isinstance(cfg, ModelConfig)
    return model, meta, tokenizer, content


def rewrite_memory(content: gguf_io.GGUFModel, model) -> Path:
    """Write the quantized file again with the model's current long-term memory (values, metadata,
    source names): what chat learned through its full-precision shadow. Every other tensor is
    copied as it is (already quantized); the file is replaced atomically."""
    memory = model.memory
    tensors = dict(content.tensors)
    for name in ("values", "slot_time", "slot_count", "slot_source"):
        tensors[f"memory.{name}"] = np.ascontiguousarray(getattr(memory, name).detach().cpu().numpy())
    config_json = config_with_sources(json.dumps(content.config), memory.source_names)
    try:
        gguf_io.write_gguf(content.path, tensors, config_json=config_json, qtype=content.qtype,
                           tokenizer_files=content.tokenizer_files, name=content.path.stem)
    except PermissionError:  # Windows will not replace a file that is memory-mapped (this session reads it)
        raise HierarchosError(f"{content.path}: cannot be replaced while it is open; the learned memory is "
                              "saved in the shadow model's delta file, which the next session with "
                              "--enable-quantized-learning --shadow-model-path loads") from None
    content.config = json.loads(config_json)
    return content.path
