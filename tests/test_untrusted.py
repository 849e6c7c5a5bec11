"""Untrusted input: nothing a user hands us is unpickled or executed.

A pickle payload (an object whose __reduce__ runs a command) placed where a checkpoint's optimizer
state, a chunk dataset's file or a LoRA adapter's weights go is refused with a one-line error, and
its command never runs. A source audit of the whole package: every torch.load passes
weights_only=True, nothing imports pickle/dill/marshal/shelve, nothing calls eval/exec, and
trust_remote_code is never turned on.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

from hierarchos.config import tiny_config
from hierarchos.data.chunked import iter_pt_chunks, write_pt_chunks
from hierarchos.errors import HierarchosError
from hierarchos.io import load_checkpoint, save_checkpoint
from hierarchos.model import HierarchosLM
from hierarchos.train.schedule import build_optimizer

PACKAGE = Path(__file__).resolve().parents[1] / "hierarchos"
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _write_payload(path: Path, marker: Path) -> None:
    with open(path, "wb") as handle:
        pickle.dump({"state": Payload(marker)}, handle)


def test_checkpoint_optimizer_pickle_never_runs(tmp_path):
    model = HierarchosLM(tiny_config())
    optimizer = build_optimizer(model, 1e-3, 0.0)
    save_checkpoint(tmp_path / "ck", 1, model, optimizer, None, {"micro_step": 1, "opt_step": 1})
    step = next((tmp_path / "ck").glob("step-*"))
    marker = tmp_path / "pwned"
    _write_payload(step / "optimizer.pt", marker)
    torch.save({"x": Payload(marker)}, step / "scheduler.pt")  # the torch.save zip flavour too
    with pytest.raises(HierarchosError, match="optimizer state is truncated or corrupt"):
        load_checkpoint(step, model, build_optimizer(model, 1e-3, 0.0), restore_rng=False)
    (step / "optimizer.pt").unlink()
    shutil.copy(step / "scheduler.pt", step / "optimizer.pt")
    with pytest.raises(HierarchosError):
        load_checkpoint(step, model, build_optimizer(model, 1e-3, 0.0), restore_rng=False)
    assert not marker.exists()


def test_chunk_dataset_with_a_pickle_file_never_runs(tmp_path):
    folder = tmp_path / "chunks"
    write_pt_chunks([[1, 2, 3, 4]] * 4, folder, max_length=4, chunks_per_file=4, tokenizer_name="byte")
    entry = json.loads((folder / "manifest.jsonl").read_text().splitlines()[0])
    marker = tmp_path / "pwned"
    torch.save({"input_ids": Payload(marker)}, folder / "evil.pt")
    (folder / "manifest.jsonl").write_text(json.dumps({**entry, "file": "evil.pt"}) + "\n")
    with pytest.raises(HierarchosError):
        list(iter_pt_chunks(folder))
    assert not marker.exists()


def test_lora_adapter_pickle_weights_never_run(tmp_path):
    from hierarchos.lora import LoraSettings, load_adapter, save_adapter, wrap

    save_adapter(tmp_path / "ad", wrap(HierarchosLM(tiny_config()), LoraSettings(r=2)), LoraSettings(r=2))
    marker = tmp_path / "pwned"
    (tmp_path / "ad" / "adapter_model.safetensors").unlink()
    torch.save({"x": Payload(marker)}, tmp_path / "ad" / "adapter_model.bin")  # peft would torch.load this
    with pytest.raises(HierarchosError, match="not a LoRA adapter directory"):
        load_adapter(HierarchosLM(tiny_config()), tmp_path / "ad")
    assert not marker.exists()


def _sources() -> list[Path]:
    return sorted([*PACKAGE.rglob("*.py"), *SCRIPTS.glob("*.py")])


def test_source_audit_no_unpickling_no_eval():
    banned_imports = {"pickle", "cPickle", "dill", "marshal", "shelve", "joblib"}
    problems = []
    for path in _sources():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(PACKAGE.parent)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Import):
                problems += [f"{where} imports {a.name}" for a in node.names if a.name.split(".")[0] in banned_imports]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in banned_imports:
                problems.append(f"{where} imports from {node.module}")
            elif isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if name in ("eval", "exec") and isinstance(func, ast.Name):
                    problems.append(f"{where} calls {name}()")
                if name == "load" and isinstance(func, ast.Attribute) and getattr(func.value, "id", "") == "torch":
                    safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                               for k in node.keywords)
                    if not safe:
                        problems.append(f"{where} torch.load without weights_only=True")
                for keyword in node.keywords:
                    if keyword.arg == "trust_remote_code" and not (
                            isinstance(keyword.value, ast.Constant) and keyword.value.value is False):
                        problems.append(f"{where} trust_remote_code is not False")
    assert problems == []


def test_hub_tokenizer_loading_never_trusts_remote_code():
    source = (PACKAGE / "data" / "tokenizers.py").read_text(encoding="utf-8")
    calls = re.findall(r"from_pretrained\(([^)]*)\)", source)
    assert calls and all("trust_remote_code=False" in args for args in calls), calls
