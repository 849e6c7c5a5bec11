"""SIGKILL while writing: a model directory, a training run's model files, a quantized model, a LoRA
adapter and a memory delta. A child process rewrites the same path in a loop, each version stamping
its number into the weights and the metadata; it is killed after a random delay (so almost surely
mid-write), and what is on disk must then load, never a partial file: one complete version for the
atomic directories (model dir, quantized model) and the delta file; for the two that share a folder
with other things (a run's OUT_DIR model files, a finetune's adapter files, each file replaced
atomically, the metadata last) the weights may be one version ahead of the metadata. (Checkpoints: tests/test_io.py::test_sigkill_mid_save_leaves_latest_loadable and the CLI
kill -> resume test in tests/test_cli_e2e.py.)"""

from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

SETUP = """
import io, sys, torch
from hierarchos.config import tiny_config
from hierarchos.model import HierarchosLM
from hierarchos.data.tokenizers import load_tokenizer
from hierarchos import io as hio
target = sys.argv[1]
torch.manual_seed(0)
model = HierarchosLM(tiny_config(vocab_size=260))
tok = load_tokenizer("byte")
def stamp(v):
    with torch.no_grad():
        model.out_norm.bias.fill_(float(v))
"""

WRITERS = {
    "model_dir": SETUP + """
v = 0
while True:
    v += 1
    stamp(v)
    hio.save_model_dir(target, model, tok, history=[{"steps": v}])
    print(v, flush=True)
""",
    "model_files": SETUP + """
import os
os.makedirs(target, exist_ok=True)
open(os.path.join(target, "metrics.jsonl"), "w").write("{}")
v = 0
while True:
    v += 1
    stamp(v)
    hio.save_model_files(target, model, tok, history=[{"steps": v}])
    print(v, flush=True)
""",
    "quantized": SETUP + """
from hierarchos.quant.quantized_dir import quantize_model_dir
v = 0
while True:
    v += 1
    stamp(v)
    hio.save_model_dir(target + "-src", model, tok, history=[{"steps": v}])
    quantize_model_dir(target + "-src", target, "Q8_0")
    print(v, flush=True)
""",
    "lora": SETUP + """
from hierarchos.lora import LoraSettings, save_adapter, wrap
peft_model = wrap(model, LoraSettings(r=2, dropout=0.0))
v = 0
while True:
    v += 1
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.fill_(float(v))
    save_adapter(target, peft_model, LoraSettings(r=2, dropout=0.0), {"training_history": [{"steps": v}]})
    print(v, flush=True)
""",
    "memory_delta": SETUP + """
from hierarchos.chat import ChatSession
hio.save_model_dir(target + "-model", model, tok)
m, _ = hio.load_model_dir(target + "-model")
session = ChatSession(m, tok, model_dir=target + "-model", out=io.StringIO(), info=io.StringIO())
v = 0
while True:
    v += 1
    with torch.no_grad():
        m.memory.values.copy_(session.base_values + v)
        m.memory.slot_count.fill_(v)
    session.save_delta(target)
    print(v, flush=True)
""",
}


def _version(kind: str, target: Path) -> tuple[int, int]:
    """(version in the metadata, version in the weights) of what is on disk."""
    from hierarchos.data.tokenizers import load_tokenizer
    from hierarchos.io import load_model_dir

    if kind in ("model_dir", "model_files"):
        model, meta = load_model_dir(target)
        return meta["training_history"][-1]["steps"], int(model.out_norm.bias[0])
    if kind == "quantized":
        from hierarchos.quant.quantized_dir import load_quantized

        model, meta, _, _ = load_quantized(target)
        return meta["training_history"][-1]["steps"], int(model.out_norm.bias[0])
    if kind == "lora":
        from hierarchos.lora import load_adapter, read_adapter_meta
        from hierarchos.model import HierarchosLM

        base, _ = load_model_dir(target.parent / "base")
        loaded = load_adapter(base, target)
        b = next(p for n, p in loaded.named_parameters() if "lora_B" in n)
        return read_adapter_meta(target)["training_history"][-1]["steps"], int(b.flatten()[0])
    if kind == "memory_delta":
        from hierarchos.chat import ChatSession

        model, _ = load_model_dir(str(target) + "-model")
        session = ChatSession(model, load_tokenizer("byte"), model_dir=str(target) + "-model", out=io.StringIO(),
                              info=io.StringIO())
        session.load_delta(target)
        counts = model.memory.slot_count
        delta = (model.memory.values - session.base_values).mean()
        return int(counts[0]), int(round(float(delta)))
    raise AssertionError(kind)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")
@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_sigkill_mid_write_leaves_one_complete_version(tmp_path, kind):
    seed = random.SystemRandom().randrange(2**31)
    rng = random.Random(seed)
    target = tmp_path / ("delta.safetensors" if kind == "memory_delta" else "out")
    if kind == "lora":  # the loader needs the base the adapter was made for
        from hierarchos.config import tiny_config
        from hierarchos.data.tokenizers import load_tokenizer
        from hierarchos.io import save_model_dir
        from hierarchos.model import HierarchosLM

        torch.manual_seed(0)
        save_model_dir(tmp_path / "base", HierarchosLM(tiny_config(vocab_size=260)), load_tokenizer("byte"))
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    for round_index in range(2):  # the second round writes over the first one's leftovers
        proc = subprocess.Popen([sys.executable, "-c", WRITERS[kind], str(target)], stdout=subprocess.PIPE,
                                env=env, text=True)
        first = proc.stdout.readline()
        assert first.strip(), f"seed {seed}: the writer died before its first complete write"
        time.sleep(rng.uniform(0.0, 0.4))
        os.kill(proc.pid, signal.SIGKILL)
        printed = [int(first), *map(int, proc.stdout.read().split())]
        proc.wait()
        meta_version, weight_version = _version(kind, target)
        where = f"{kind} seed {seed} round {round_index}: printed {printed[-1]}, on disk {meta_version}/{weight_version}"
        # the last completed version, or the one being written when the kill came (if it got in whole)
        assert weight_version in (printed[-1], printed[-1] + 1), where
        if kind in ("model_files", "lora"):  # files replaced one by one, metadata last: weights may be one ahead
            assert weight_version - meta_version in (0, 1), where
        else:  # one atomic unit: metadata and weights of the same version
            assert meta_version == weight_version, where
