"""Quantized model directories: write one from a model directory, find and load one for chat.

A quantized model directory (`quantize --out-dir DIR`) holds `model-QTYPE.gguf` (weights, config
and tokenizer: the file alone is enough) and `quantized.json` (which file, which format, made from
which model, bytes per storage format). `chat --model-path` takes the directory or the .gguf file.

Quantization mixes (as llama.cpp's): with the default mix `auto`, the tensors a trained model is most
sensitive to keep a higher-precision format than `--qtype` (MIX_RULES, from the measurements in
BENCHMARKS.md "Quantized model quality"); `pure` puts every quantized Linear in `--qtype`. With a
calibration text, each Linear's blocks are chosen by the importance-weighted search of calibration.py.
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


MIXES = ("auto", "pure")
# (qtype asked for, tensor-name test, format kept, why): the first matching rule wins. Measured on the
# trained model of bench/bench_quant_quality.py (BENCHMARKS.md): quantizing one tensor group at a time,
# the output head costs the most bits per byte of any single tensor in 4- and 2-bit formats.
MIX_RULES = (
    (("Q4_0", "INT4", "Q2_K"), lambda name: name == "lm_head.weight", "Q8_0",
     "output head: the logits of every token"),
)
DEFAULT_CALIBRATION_TOKENS = 32768


def mix_formats(tensors: dict, qtype: str, mix: str = "auto") -> dict[str, tuple[str, str]]:
    """name -> (format, reason) for the quantized tensors that `mix` keeps in another format than `qtype`."""
    from .gguf_io import QuantTensor

    if mix not in MIXES:
        raise HierarchosError(f"--mix {mix!r}: expected one of {', '.join(MIXES)}")
    if mix == "pure":
        return {}
    kept = {}
    for name, value in tensors.items():
        if not isinstance(value, QuantTensor) or value.qtype != qtype:
            continue  # tables (Q8_0 already), fallbacks and floats stay as they are
        for qtypes, matches, keep, why in MIX_RULES:
            if qtype in qtypes and matches(name):
                kept[name] = (keep, why)
                break
    return kept


def read_calibration_tokens(path: str | os.PathLike, tokenizer, max_tokens: int) -> list[int]:
    """The calibration text's token ids ([eos] first, as a document starts), at most max_tokens of them."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HierarchosError(f"--calibration {file}: file not found; pass a UTF-8 text file") from None
    except IsADirectoryError:
        raise HierarchosError(f"--calibration {file}: is a directory; pass a UTF-8 text file") from None
    except UnicodeDecodeError as exc:
        raise HierarchosError(f"--calibration {file}: not UTF-8 text (byte {exc.start}); convert it to UTF-8") from None
    ids = [tokenizer.eos_id, *tokenizer.encode(text)][:max_tokens]
    if len(ids) < 2:
        raise HierarchosError(f"--calibration {file}: no text to calibrate on; pass a text file of some pages")
    return ids


def quantize_model_dir(model_path: str | os.PathLike, out_dir: str | os.PathLike, qtype: str, *,
                       mix: str = "auto", calibration: str | os.PathLike | None = None,
                       calibration_tokens: int = DEFAULT_CALIBRATION_TOKENS) -> dict:
    """Quantize a full-precision model directory into `out_dir` (written atomically). Returns the info:
    sizes per storage format, `mix` (tensors kept in another format than qtype, with why) and
    `calibration` (the text and how many tensors its importance weighted) when given."""
    import torch

    from ..data.tokenizers import load_tokenizer
    from ..io import CONFIG_FILE, atomic_dir, load_model_dir
    from . import kernel
    from .calibration import WEIGHTED_QTYPES, collect_importance, quantize_weighted
    from .gguf_io import QuantTensor
    from .model import describe, pick_format, quantize_tensors

    if qtype not in formats.QTYPES:
        raise HierarchosError(f"--qtype {qtype!r}: expected one of {', '.join(formats.QTYPES)}")
    if mix not in MIXES:
        raise HierarchosError(f"--mix {mix!r}: expected one of {', '.join(MIXES)}")
    if calibration_tokens < 2:
        raise HierarchosError(f"--calibration-tokens {calibration_tokens}: must be >= 2")
    model_path, out_dir = Path(model_path), Path(out_dir)
    if out_dir.resolve() == model_path.resolve():
        raise HierarchosError(f"--out-dir {out_dir}: is the model directory itself; choose a new directory")
    model, meta = load_model_dir(model_path)
    tokenizer = load_tokenizer(str(model_path))
    config_json = (model_path / CONFIG_FILE).read_text(encoding="utf-8")
    tensors = quantize_tensors(model, qtype)
    kept = mix_formats(tensors, qtype, mix)
    importance = {}
    if calibration is not None:
        ids = read_calibration_tokens(calibration, tokenizer, calibration_tokens)
        importance = collect_importance(model, ids, names={n for n, v in tensors.items()
                                                           if isinstance(v, QuantTensor)})
    state = model.state_dict()
    weighted = 0
    for name, value in list(tensors.items()):
        if not isinstance(value, QuantTensor) or (name not in kept and name not in importance):
            continue
        kind = pick_format(kept[name][0], value.cols) if name in kept else value.qtype
        weight = state[name].detach().to("cpu", torch.float32).contiguous().numpy()
        if name in importance and kind in WEIGHTED_QTYPES:
            tensors[name] = QuantTensor(kind, quantize_weighted(weight, kind, importance[name]), value.cols)
            weighted += 1
        elif kind != value.qtype:
            tensors[name] = QuantTensor(kind, kernel.quantize(weight, kind), value.cols)
    summary = describe(tensors)
    info = {"format": INFO_FORMAT, "version": 1, "file": gguf_name(qtype), "qtype": qtype,
            "source_model": str(model_path.resolve()),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "parameters": model.num_parameters(), "fp32_bytes": 4 * model.num_parameters(),
            "storage": summary, "bytes": sum(v["bytes"] for v in summary.values()),
            "mix": {"name": mix, "kept": {name: {"format": tensors[name].qtype, "why": why}
                                          for name, (_, why) in kept.items()}}}
    if calibration is not None:
        info["calibration"] = {"file": str(calibration), "tokens": len(ids), "weighted_tensors": weighted}
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
