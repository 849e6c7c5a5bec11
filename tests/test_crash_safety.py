"""Crash safety of every write: model directories, a training run's model files, checkpoints, LoRA
adapters, single files, a quantized model and a memory delta.

Deterministic part: `WriteSteps` makes the write order observable. It counts every step that
changes the disk (a mkdir, a file opened for writing, a write, an fsync, a rename, an unlink, a
tree removal, a whole-file save by safetensors / torch.save / pathlib) and, for each k, crashes a
fresh copy of the same write at step k: the disk is copied as it stands at that moment (before step
k runs, or with step k half done: half of its bytes written, half of its tree removed) and what a
reader then loads from that copy must be the old complete version or the new complete one, never a
partial one, never a temp file that the loader trusts. (Copying at the crash point, not after the
exception, matters: the cleanup an exception triggers would not run under a kill.)

SIGKILL part, on top: a child process rewrites the same path in a loop, each version stamping its
number into the weights and the metadata; it is killed after a random delay (so almost surely
mid-write), and what is on disk must then load, never a partial file: one complete version for the
atomic directories (model dir, quantized model) and the delta file; for the two that share a folder
with other things (a run's OUT_DIR model files, a finetune's adapter files, each file replaced
atomically, the metadata last) the weights may be one version ahead of the metadata. (Checkpoints: tests/test_io.py::test_sigkill_mid_save_leaves_latest_loadable and the CLI
kill -> resume test in tests/test_cli_e2e.py.)"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import random
import shutil
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
        return int(counts[0]), round(delta.item())
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


# ---- deterministic crashes: every step of every write ---------------------------------------

class SimulatedCrash(BaseException):
    """A kill at a chosen step (a BaseException, so that no `except Exception` can swallow it)."""


class WriteSteps:
    """Counts the disk-changing steps of a write; with `crash_at=k` copies `disk` to `snapshot` at
    step k (before it runs, or `torn`: with it half done) and raises SimulatedCrash."""

    def __init__(self, disk: Path, snapshot: Path | None = None, crash_at: int | None = None, torn: bool = False):
        self.disk, self.snapshot, self.crash_at, self.torn = disk, snapshot, crash_at, torn
        self.labels: list[tuple[str, bool]] = []  # (what the step does, whether it can be torn)
        self.counting = True

    def step(self, label: str, run, tear=None):
        if not self.counting:
            return run()
        self.labels.append((label, tear is not None))
        if len(self.labels) == self.crash_at:
            self.counting = False  # the copy and any cleanup after the crash are not steps
            if self.torn:
                tear()
            shutil.copytree(self.disk, self.snapshot, symlinks=True)
            raise SimulatedCrash(f"step {self.crash_at}: {label}")
        self.counting = False  # a step's own inner calls (rmtree's unlinks, save_file's open) are one step
        try:
            return run()
        finally:
            self.counting = True


def _truncate_to_half(path) -> None:
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _remove_half(path) -> None:
    files = sorted(Path(root) / name for root, _, names in os.walk(path) for name in names)
    for file in files[:(len(files) + 1) // 2]:
        file.unlink()


class _TornableFile:
    """A file opened for writing whose every write is a step that can be torn."""

    def __init__(self, handle, steps: WriteSteps, path):
        self._handle, self._steps, self._path = handle, steps, path

    def write(self, data):
        def tear():
            self._handle.write(data[:len(data) // 2])
            self._handle.flush()
        return self._steps.step(f"write {len(data)} bytes to {Path(self._path).name}",
                                lambda: self._handle.write(data), tear)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._handle.__exit__(*exc)


@contextlib.contextmanager
def observed(steps: WriteSteps):
    """Route the disk-changing calls of hierarchos.io (and what it calls) through `steps`."""
    from hierarchos import io as hio

    def plain(name, real):
        def call(*a, **k):
            paths = [Path(x).name for x in a[:2] if isinstance(x, (str, os.PathLike))]
            return steps.step(f"{name} {' -> '.join(paths)}".strip(), lambda: real(*a, **k))
        return call

    def whole_file(name, real, path_arg):
        def call(*a, **k):
            path = a[path_arg]
            run = lambda: real(*a, **k)  # noqa: E731
            tear = (lambda: (run(), _truncate_to_half(path))) if isinstance(path, (str, os.PathLike)) else None
            return steps.step(f"{name} {Path(str(path)).name}", run, tear)
        return call

    def rmtree(path, *a, **k):
        return steps.step(f"rmtree {Path(path).name}", lambda: real_rmtree(path, *a, **k),
                          lambda: _remove_half(path) if os.path.isdir(path) else None)

    def open_(file, mode="r", *a, **k):
        if not any(c in mode for c in "wax+"):
            return real_open(file, mode, *a, **k)
        handle = steps.step(f"open {Path(str(file)).name} for writing", lambda: real_open(file, mode, *a, **k))
        return _TornableFile(handle, steps, file)

    real_rmtree, real_open = shutil.rmtree, open
    with pytest.MonkeyPatch.context() as mp:
        for name in ("replace", "rename", "fsync", "mkdir", "unlink", "remove", "rmdir"):
            mp.setattr(os, name, plain(name, getattr(os, name)))
        mp.setattr(shutil, "rmtree", rmtree)
        mp.setattr(hio, "open", open_, raising=False)  # io's builtin open (atomic_write_bytes)
        mp.setattr(hio, "save_file", whole_file("save_file", hio.save_file, 1))
        mp.setattr(torch, "save", whole_file("torch.save", torch.save, 1))
        mp.setattr(Path, "write_text", whole_file("write_text", Path.write_text, 0))
        mp.setattr(Path, "write_bytes", whole_file("write_bytes", Path.write_bytes, 0))
        yield steps


def crash_at_every_step(tmp_path: Path, prepare, write, check) -> list[str]:
    """prepare(disk) lays down the old state; write(disk) makes the new one; check(disk, where)
    is a reader. The write runs once whole, then once per step k crashed before k (and torn
    within k where k writes or removes something), each on a fresh copy of the old state."""
    template = tmp_path / "template"
    template.mkdir()
    prepare(template)
    whole = tmp_path / "whole"
    shutil.copytree(template, whole, symlinks=True)
    with observed(WriteSteps(whole)) as counted:
        write(whole)
    labels = counted.labels
    check(whole, "no crash")
    for k, (label, tearable) in enumerate(labels, 1):
        for torn in (False, True) if tearable else (False,):
            disk, snapshot = tmp_path / f"disk-{k}-{torn:d}", tmp_path / f"crash-{k}-{torn:d}"
            shutil.copytree(template, disk, symlinks=True)
            with observed(WriteSteps(disk, snapshot, crash_at=k, torn=torn)):
                with pytest.raises(SimulatedCrash):
                    write(disk)
            shutil.rmtree(disk)
            check(snapshot, f"crash {'within' if torn else 'before'} step {k}/{len(labels)} ({label})")
            shutil.rmtree(snapshot)
    return [label for label, _ in labels]


_PROTOTYPE = []


def _stamped_model(version: int):
    """The same tiny model each time, its output-norm bias stamped with `version`."""
    if not _PROTOTYPE:
        from hierarchos.config import tiny_config
        from hierarchos.model import HierarchosLM

        torch.manual_seed(0)
        _PROTOTYPE.append(HierarchosLM(tiny_config(vocab_size=260)))
    model = copy.deepcopy(_PROTOTYPE[0])
    with torch.no_grad():
        model.out_norm.bias.fill_(float(version))
    return model


OLD_BYTES = bytes(range(256)) * 64           # 16 KiB, so half of either is neither
NEW_BYTES = bytes(reversed(range(256))) * 80


@pytest.mark.parametrize("existing", [True, False])
def test_atomic_write_bytes_crash_at_every_step(tmp_path, existing):
    from hierarchos import io as hio

    def prepare(disk):
        (disk / "other.txt").write_text("untouched")
        if existing:
            (disk / "f.bin").write_bytes(OLD_BYTES)

    def check(disk, where):
        target = disk / "f.bin"
        seen = target.read_bytes() if target.exists() else None
        whole = seen in ((OLD_BYTES if existing else None), NEW_BYTES)
        assert whole, f"{where}: a reader sees {None if seen is None else len(seen)} bytes, neither old nor new"
        assert (disk / "other.txt").read_text() == "untouched", where

    labels = crash_at_every_step(tmp_path, prepare, lambda disk: hio.atomic_write_bytes(disk / "f.bin", NEW_BYTES),
                                 check)
    assert any(label.startswith("write") for label in labels) and any("replace" in label for label in labels), labels


def test_atomic_write_text_crash_at_every_step(tmp_path):
    from hierarchos import io as hio

    old, new = "old " * 4000, "nouveau " * 3000

    def check(disk, where):
        seen = (disk / "f.json").read_text(encoding="utf-8")
        assert seen in (old, new), f"{where}: a reader sees {len(seen)} characters, neither old nor new"

    crash_at_every_step(tmp_path, lambda disk: (disk / "f.json").write_text(old),
                        lambda disk: hio.atomic_write_text(disk / "f.json", new), check)


def _tree(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): p.read_text() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("existing", [True, False])
def test_atomic_dir_crash_at_every_step(tmp_path, existing):
    from hierarchos import io as hio

    old_tree = {"a.txt": "old a" * 500, "sub/b.txt": "old b" * 500}
    new_tree = {"a.txt": "new a" * 700, "c.txt": "new c" * 700}

    def write_tree(directory, tree):
        for name, text in tree.items():
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            (directory / name).write_text(text)

    def prepare(disk):
        if existing:
            with hio.atomic_dir(disk / "d") as tmp:
                write_tree(tmp, old_tree)

    def write(disk):
        with hio.atomic_dir(disk / "d") as tmp:
            write_tree(tmp, new_tree)

    def check(disk, where):
        hio.recover_interrupted(disk / "d")  # what every loader does first
        seen = _tree(disk / "d") if (disk / "d").exists() else None
        assert seen in ((old_tree if existing else None), new_tree), f"{where}: a reader sees {seen}"
        assert [p.name for p in disk.iterdir() if p.name.startswith(".d.")] == [], \
            f"{where}: leftovers survive recovery"
        write(disk)  # and the next write over what the crash left works
        assert _tree(disk / "d") == new_tree, where

    labels = crash_at_every_step(tmp_path, prepare, write, check)
    assert sum("replace" in label for label in labels) == (2 if existing else 1), labels


def test_save_model_dir_crash_at_every_step(tmp_path):
    from hierarchos import io as hio
    from hierarchos.data.tokenizers import load_tokenizer

    tok = load_tokenizer("byte")

    def check(disk, where):
        model, meta = hio.load_model_dir(disk / "model")
        versions = (meta["training_history"][-1]["steps"], int(model.out_norm.bias[0]))
        assert versions in ((1, 1), (2, 2)), f"{where}: (config, weights) versions {versions}"
        assert (disk / "model" / "tokenizer.json").is_file(), where

    crash_at_every_step(tmp_path, lambda disk: hio.save_model_dir(disk / "model", _stamped_model(1), tok,
                                                                  history=[{"steps": 1}]),
                        lambda disk: hio.save_model_dir(disk / "model", _stamped_model(2), tok,
                                                        history=[{"steps": 2}]), check)


def test_save_model_files_crash_at_every_step_config_last(tmp_path):
    """A run's OUT_DIR: files replaced one by one, weights first and the config last, so the config
    never describes weights newer than... the ones beside it (config new => weights new)."""
    from hierarchos import io as hio
    from hierarchos.data.tokenizers import load_tokenizer

    tok = load_tokenizer("byte")

    def prepare(disk):
        (disk / "out").mkdir()
        (disk / "out" / "metrics.jsonl").write_text('{"step": 1}\n')
        hio.save_model_files(disk / "out", _stamped_model(1), tok, history=[{"steps": 1}])

    def check(disk, where):
        model, meta = hio.load_model_dir(disk / "out")
        config_version, weight_version = meta["training_history"][-1]["steps"], int(model.out_norm.bias[0])
        assert (config_version, weight_version) in ((1, 1), (1, 2), (2, 2)), \
            f"{where}: (config, weights) versions {(config_version, weight_version)}"
        assert (disk / "out" / "metrics.jsonl").read_text() == '{"step": 1}\n', where
        hio.save_model_files(disk / "out", _stamped_model(3), tok, history=[{"steps": 3}])  # over the leftovers
        model, meta = hio.load_model_dir(disk / "out")
        assert (meta["training_history"][-1]["steps"], int(model.out_norm.bias[0])) == (3, 3), where
        assert [p.name for p in disk.iterdir() if p.name.startswith(".")] == [], f"{where}: staging left behind"

    labels = crash_at_every_step(tmp_path, prepare, lambda disk: hio.save_model_files(
        disk / "out", _stamped_model(2), tok, history=[{"steps": 2}]), check)
    renames = [label for label in labels if label.startswith("replace")]
    assert renames[0].endswith(hio.WEIGHTS_FILE) and renames[-1].endswith(hio.CONFIG_FILE), renames


def test_save_checkpoint_crash_at_every_step(tmp_path):
    """Save step 2 over a root holding step 1 (latest and best), keeping one: whatever the crash,
    latest and best each name a complete checkpoint whose trainer state matches its weights."""
    from hierarchos import io as hio

    def save(disk, step):
        model = _stamped_model(step)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for param in model.parameters():
            param.grad = torch.ones_like(param)
        optimizer.step()  # so the optimizer file holds moments
        hio.save_checkpoint(disk / "ckpt", step, model, optimizer, None, {"micro_step": step}, keep=1,
                            is_best=True, extra_tensors={"stream.h": torch.full((2, 3), float(step))})

    def check(disk, where):
        for pointer in (hio.LATEST_FILE, hio.BEST_FILE):
            name = json.loads((disk / "ckpt" / pointer).read_text())["dir"]
            model = _stamped_model(0)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            state = hio.load_checkpoint(disk / "ckpt" / name, model, optimizer, restore_rng=False)
            weights = round(model.out_norm.bias[0].item())  # the optimizer step moved it by ~lr
            assert state["step"] == state["micro_step"] == weights == int(state["_stream"]["h"][0, 0]) \
                and weights in (1, 2), f"{where}: {pointer} -> {name}: step {state['step']}, weights {weights}"
            assert optimizer.state, f"{where}: {pointer} -> {name}: no optimizer moments"
        latest = hio.load_checkpoint(disk / "ckpt", _stamped_model(0), restore_rng=False)
        assert latest["step"] in (1, 2), where

    crash_at_every_step(tmp_path, lambda disk: save(disk, 1), lambda disk: save(disk, 2), check)


def test_save_adapter_crash_at_every_step_metadata_last(tmp_path):
    """A finetune's OUT_DIR: adapter files replaced one by one, the weights first and
    hierarchos_adapter.json last: the metadata is never newer than the weights beside it."""
    from hierarchos import io as hio
    from hierarchos.data.tokenizers import load_tokenizer
    from hierarchos.lora import ADAPTER_META_FILE, PEFT_WEIGHTS_FILE, LoraSettings, load_adapter, read_adapter_meta, wrap

    settings = LoraSettings(r=2, dropout=0.0)
    hio.save_model_dir(tmp_path / "base", _stamped_model(0), load_tokenizer("byte"))

    def save(disk, version):
        peft_model = wrap(_stamped_model(0), settings)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.fill_(float(version))
        from hierarchos.lora import save_adapter
        save_adapter(disk / "out", peft_model, settings, {"training_history": [{"steps": version}]})

    def prepare(disk):
        (disk / "out").mkdir()
        (disk / "out" / "metrics.jsonl").write_text("{}\n")
        save(disk, 1)

    def check(disk, where):
        base, _ = hio.load_model_dir(tmp_path / "base")
        loaded = load_adapter(base, disk / "out")
        weights = {int(p.flatten()[0]) for n, p in loaded.named_parameters() if "lora_B" in n}
        meta = read_adapter_meta(disk / "out")["training_history"][-1]["steps"]
        assert len(weights) == 1, f"{where}: adapter tensors of several versions {weights}"
        assert (meta, *weights) in ((1, 1), (1, 2), (2, 2)), f"{where}: (metadata, weights) versions {(meta, *weights)}"
        assert (disk / "out" / "metrics.jsonl").read_text() == "{}\n", where
        save(disk, 3)  # over the leftovers
        assert read_adapter_meta(disk / "out")["training_history"][-1]["steps"] == 3, where
        assert [p.name for p in disk.iterdir() if p.name.startswith(".")] == [], f"{where}: staging left behind"

    labels = crash_at_every_step(tmp_path, prepare, lambda disk: save(disk, 2), check)
    renames = [label for label in labels if label.startswith("replace")]
    assert renames[0].endswith(PEFT_WEIGHTS_FILE) and renames[-1].endswith(ADAPTER_META_FILE), renames
