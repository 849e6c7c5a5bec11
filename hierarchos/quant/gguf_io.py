"""The quantized model file: one GGUF (architecture `hierarchos`) written and read with the `gguf` package.

Layout (DESIGN.md section 4):
- metadata: `general.architecture = hierarchos`, `general.name`, `hierarchos.config` (the same JSON
  payload as a model directory's hierarchos_config.json: ModelConfig, versions, training history,
  memory sources, prompt template), `hierarchos.qtype`, `hierarchos.tensor_formats` (JSON: which
  format each quantized tensor got, fallbacks included), `tokenizer.huggingface.json` (the tokenizer's
  tokenizer.json) and `hierarchos.tokenizer_files` (JSON of every other tokenizer file by name);
- tensors under their state-dict names. Q4_0 / Q8_0 / Q2_K use ggml's own block types, so any GGUF
  reader dequantizes them to the same floats. INT4 (ours) is stored as two plain tensors,
  `NAME.int4_qs` (the nibble bytes, typed I8 since ggml has no U8) and `NAME.int4_scale` (F32, one per 32 weights). Everything else
  is F32/F16/F64/I64 as it is in the model.

Reading memory-maps the file: quantized blocks are used in place, never copied or unpickled.
Writing goes to a temp file that is renamed into place.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import HierarchosError
from . import formats

ARCH = "hierarchos"
KEY_CONFIG = "hierarchos.config"
KEY_QTYPE = "hierarchos.qtype"
KEY_FORMATS = "hierarchos.tensor_formats"
KEY_TOKENIZER_JSON = "tokenizer.huggingface.json"
KEY_TOKENIZER_FILES = "hierarchos.tokenizer_files"
INT4_QS, INT4_SCALE = ".int4_qs", ".int4_scale"
MAX_NAME = 63  # ggml's tensor-name limit (GGML_MAX_NAME - 1)


@dataclass
class QuantTensor:
    """A quantized matrix: `data` uint8 (rows, row_bytes) of `qtype` blocks over `cols` columns."""
    qtype: str
    data: np.ndarray
    cols: int

    @property
    def rows(self) -> int:
        return self.data.shape[0]

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


def _ggml_type(qtype: str):
    import gguf
    return {"Q4_0": gguf.GGMLQuantizationType.Q4_0, "Q8_0": gguf.GGMLQuantizationType.Q8_0,
            "Q2_K": gguf.GGMLQuantizationType.Q2_K}[qtype]


def write_gguf(path: str | os.PathLike, tensors: dict, *, config_json: str, qtype: str,
               tokenizer_files: dict[str, str], name: str = "hierarchos") -> Path:
    """Write `tensors` (name -> QuantTensor or numpy array) and metadata to `path` atomically."""
    import gguf

    final = Path(path)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    formats_used = {}
    writer = gguf.GGUFWriter(str(tmp), ARCH)
    try:
        writer.add_name(name)
        writer.add_string(KEY_CONFIG, config_json)
        writer.add_string(KEY_QTYPE, qtype)
        files = dict(tokenizer_files)
        if "tokenizer.json" in files:
            writer.add_string(KEY_TOKENIZER_JSON, files.pop("tokenizer.json"))
        writer.add_string(KEY_TOKENIZER_FILES, json.dumps(files, ensure_ascii=False))
        for tname, value in tensors.items():
            if len(tname) + len(INT4_SCALE) > MAX_NAME:
                raise HierarchosError(f"tensor name {tname!r} is too long for GGUF ({MAX_NAME} characters)")
            if isinstance(value, QuantTensor):
                formats_used[tname] = value.qtype
                if value.qtype == "INT4":
                    nibbles, scales = formats.int4_split(np.ascontiguousarray(value.data))
                    # ggml has no U8 type: the nibble bytes travel as I8 and are viewed back on reading
                    writer.add_tensor(tname + INT4_QS, np.ascontiguousarray(nibbles).view(np.int8))
                    writer.add_tensor(tname + INT4_SCALE, np.ascontiguousarray(scales, dtype=np.float32))
                else:
                    writer.add_tensor(tname, np.ascontiguousarray(value.data), raw_dtype=_ggml_type(value.qtype))
            else:
                array = np.ascontiguousarray(value)
                if array.dtype == np.uint8:  # plain bytes would be taken for quantized blocks
                    raise HierarchosError(f"tensor {tname!r}: uint8 tensors are reserved for quantized blocks")
                writer.add_tensor(tname, array)
        writer.add_string(KEY_FORMATS, json.dumps(formats_used, sort_keys=True))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    except BaseException:
        try:
            writer.close()
        except Exception:  # noqa: BLE001  (closing a half-written file can fail; the temp file goes anyway)
            pass
        tmp.unlink(missing_ok=True)
        raise
    return final


def _field_string(reader, key: str) -> str | None:
    field = reader.fields.get(key)
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


@dataclass
class GGUFModel:
    """What a quantized model file holds, ready for `model.build_quantized_model`."""
    path: Path
    config: dict          # the hierarchos_config.json payload
    qtype: str
    tensors: dict         # name -> QuantTensor | np.ndarray (memory-mapped, read-only)
    tokenizer_files: dict[str, str]


def read_gguf(path: str | os.PathLike) -> GGUFModel:
    """Read a hierarchos GGUF; any damage or a foreign file is a one-line HierarchosError."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise HierarchosError(f"{path}: quantized model file not found; run `hierarchos quantize` first")
    try:
        reader = gguf.GGUFReader(str(path), "r")
    except Exception as exc:  # the reader raises ValueError/struct errors/IndexError on damaged files
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise HierarchosError(f"{path}: not a readable GGUF file ({reason}); re-run `hierarchos quantize`") from None
    try:
        arch = _field_string(reader, "general.architecture")
        if arch != ARCH:
            raise HierarchosError(f"{path}: GGUF architecture is {arch!r}, not {ARCH!r}; "
                                  "hierarchos reads only files written by `hierarchos quantize`")
        config = json.loads(_field_string(reader, KEY_CONFIG) or "null")
        qtype = _field_string(reader, KEY_QTYPE)
        formats_used = json.loads(_field_string(reader, KEY_FORMATS) or "{}")
        tokenizer_files = json.loads(_field_string(reader, KEY_TOKENIZER_FILES) or "{}")
        tokenizer_json = _field_string(reader, KEY_TOKENIZER_JSON)
    except HierarchosError:
        raise
    except Exception as exc:  # noqa: BLE001  (bad UTF-8 / JSON / field layout)
        raise HierarchosError(f"{path}: hierarchos metadata is damaged ({type(exc).__name__}); "
                              "re-run `hierarchos quantize`") from None
    if not isinstance(config, dict) or qtype not in formats.QTYPES:
        raise HierarchosError(f"{path}: hierarchos metadata is missing or damaged; re-run `hierarchos quantize`")
    if tokenizer_json is not None:
        tokenizer_files["tokenizer.json"] = tokenizer_json
    raw = {t.name: t for t in reader.tensors}
    tensors: dict = {}
    for name, t in raw.items():
        if name.endswith(INT4_SCALE):
            continue
        if name.endswith(INT4_QS):
            base = name[:-len(INT4_QS)]
            scale = raw.get(base + INT4_SCALE)
            if scale is None:
                raise HierarchosError(f"{path}: INT4 tensor {base!r} has no scales; the file is damaged")
            nibbles = np.asarray(t.data).view(np.uint8)
            tensors[base] = QuantTensor("INT4", formats.int4_join(nibbles, np.asarray(scale.data)),
                                        nibbles.shape[1] * 2)
            continue
        kind = formats_used.get(name)
        if kind is not None:
            data = np.asarray(t.data)
            cols = int(t.shape[0])  # ggml order: the row length comes first
            if data.ndim != 2 or data.dtype != np.uint8 or data.shape[1] != formats.row_bytes(kind, cols):
                raise HierarchosError(f"{path}: tensor {name!r} does not hold {kind} blocks of {cols} columns; "
                                      "the file is damaged")
            tensors[name] = QuantTensor(kind, data, cols)
        else:
            tensors[name] = np.asarray(t.data)
    return GGUFModel(path=path, config=config, qtype=qtype, tensors=tensors, tokenizer_files=tokenizer_files)
