"""hierarchos.io's rules pinned one by one, against expectations written out here: durability order
(every file fsynced before the rename that publishes it, the directory after), the recovery rule's
cases, atomic_files' rename order, what a weights file stores once (storage, offset, shape, stride
and dtype tell aliases apart), strict loading's one-line messages, the config payload, checkpoint
pointers, rotation leftovers, step-dir order and the extra-tensor groups. Tiny modules, CPU,
milliseconds each; random inputs from a fresh seed printed in every assertion."""

from __future__ import annotations

import json
import os
import random
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hierarchos import __version__
from hierarchos import io as hio
from hierarchos.config import CONFIG_VERSION, tiny_config
from hierarchos.errors import HierarchosError
from hierarchos.model import HierarchosLM


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**31)


def one_line(fn) -> str:
    with pytest.raises(HierarchosError) as info:
        fn()
    text = str(info.value)
    assert "\n" not in text, text
    return text


def hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


class Events:
    """Records fsyncs (by path, with the file's size on disk then) and renames, in order."""

    def __init__(self, monkeypatch):
        self.log: list[tuple] = []
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd):
            path = os.readlink(f"/proc/self/fd/{fd}")
            self.log.append(("fsync", Path(path).name, os.fstat(fd).st_size if os.path.isfile(path) else None))
            return real_fsync(fd)

        def replace(src, dst):
            self.log.append(("replace", Path(src).name, Path(dst).name))
            return real_replace(src, dst)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")


# ---- durability order ---------------------------------------------------------------------

@needs_proc
def test_atomic_write_bytes_fsyncs_the_whole_file_before_the_rename_then_the_directory(tmp_path, monkeypatch):
    (tmp_path / "f.bin").write_bytes(b"old")
    events = Events(monkeypatch)
    hio.atomic_write_bytes(tmp_path / "f.bin", b"new bytes")  # small: flushed from Python's buffer first
    (kind, tmp_name, size), replace, parent = events.log
    assert kind == "fsync" and tmp_name.startswith(".f.bin.tmp-") and size == len(b"new bytes"), events.log
    assert replace == ("replace", tmp_name, "f.bin"), events.log
    assert parent == ("fsync", tmp_path.name, None), events.log
    assert len(tmp_name) == len(".f.bin.tmp-") + 12
    assert (tmp_path / "f.bin").read_bytes() == b"new bytes" and hidden(tmp_path) == []


@needs_proc
def test_atomic_dir_fsyncs_every_file_and_the_temp_dir_before_renaming(tmp_path, monkeypatch):
    with hio.atomic_dir(tmp_path / "d") as tmp:
        (tmp / "old.txt").write_text("old")
    events = Events(monkeypatch)
    with hio.atomic_dir(tmp_path / "d") as tmp:
        token = tmp.name.split(".tmp-")[1]
        (tmp / "a.txt").write_text("aaaa")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("bb")
    assert tmp.name == f".d.tmp-{token}" and len(token) == 12
    files = sorted(events.log[:2])
    assert files == [("fsync", "a.txt", 4), ("fsync", "b.txt", 2)], events.log
    assert events.log[2:] == [("fsync", tmp.name, None), ("replace", "d", f".d.old-{token}"),
                              ("replace", tmp.name, "d"), ("fsync", tmp_path.name, None)], events.log
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["a.txt", "sub"] and hidden(tmp_path) == []
    events.log.clear()
    with hio.atomic_dir(tmp_path / "new") as tmp:  # no previous directory: one rename
        pass
    assert events.log == [("fsync", tmp.name, None), ("replace", tmp.name, "new"), ("fsync", tmp_path.name, None)]


@needs_proc
def test_atomic_files_order_first_then_by_name_then_last(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (tmp_path / ".out.tag-dead").mkdir()  # a killed save's staging dir (this tag): cleared
    (tmp_path / ".out.other-dead").mkdir()  # another tag's: not ours to touch
    events = Events(monkeypatch)
    with hio.atomic_files(out, "tag", first=("z.bin", "y.bin"), last=("n.json", "m.json")) as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".out.tag-")
        assert len(staging.name) == len(".out.tag-") + 12  # the same token length as atomic_dir's
        for name in ("m.json", "c.txt", "y.bin", "a.txt", "n.json", "z.bin"):
            (staging / name).write_text(name)
        (staging / "subdir").mkdir()  # only files are published
    renames = [e[2] for e in events.log if e[0] == "replace"]
    assert renames == ["z.bin", "y.bin", "a.txt", "c.txt", "n.json", "m.json"], events.log
    for name in renames:  # each file fsynced right before its rename; the directory last
        i = events.log.index(("replace", name, name))
        assert events.log[i - 1][:2] == ("fsync", name), events.log
    assert events.log[-1] == ("fsync", "out", None)
    assert sorted(p.name for p in out.iterdir()) == sorted(renames + ["keep.txt"])
    assert (out / "keep.txt").read_text() == "mine" and (out / "a.txt").read_text() == "a.txt"
    assert hidden(tmp_path) == [".out.other-dead"]
    with pytest.raises(RuntimeError, match="boom"):  # a failure publishes nothing and leaves no staging
        with hio.atomic_files(out, "tag") as staging:
            (staging / "a.txt").write_text("new")
            raise RuntimeError("boom")
    assert (out / "a.txt").read_text() == "a.txt" and hidden(tmp_path) == [".out.other-dead"]
    with hio.atomic_files(tmp_path / "fresh" / "deep", "t") as staging:  # the directory is created
        (staging / "x").write_text("x")
    assert (tmp_path / "fresh" / "deep" / "x").read_text() == "x"


def test_fsync_path_ignores_what_cannot_be_opened_or_synced(tmp_path, monkeypatch):
    hio.fsync_path(tmp_path / "missing")  # nothing to open: no error
    (tmp_path / "f").write_text("x")
    before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None

    def refuse(fd):
        raise OSError("fsync not supported")

    monkeypatch.setattr(os, "fsync", refuse)
    hio.fsync_path(tmp_path / "f")
    if before is not None:
        assert len(os.listdir("/proc/self/fd")) == before  # the descriptor is closed either way


def test_atomic_write_bytes_failure_removes_the_temp_file_and_keeps_the_old(tmp_path, monkeypatch):
    (tmp_path / "f.bin").write_bytes(b"old")

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        hio.atomic_write_bytes(tmp_path / "f.bin", b"new")
    assert (tmp_path / "f.bin").read_bytes() == b"old" and hidden(tmp_path) == []
    monkeypatch.undo()
    hio.atomic_write_text(tmp_path / "a" / "b" / "t.txt", "café")  # parents made, UTF-8
    assert (tmp_path / "a" / "b" / "t.txt").read_bytes() == "café".encode("utf-8")


# ---- recovery ---------------------------------------------------------------------------------

def test_remove_and_leftovers(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "x").write_text("x")
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    hio._remove(link)  # a link is unlinked, never followed
    assert not link.exists() and not link.is_symlink() and (target / "x").read_text() == "x"
    hio._remove(tmp_path / "missing")
    hio._remove(target / "x")
    assert not (target / "x").exists()
    (target / "deep").mkdir()
    (target / "deep" / "y").write_text("y")
    hio._remove(target)
    assert not target.exists()

    for name in (".d.tmp-abc", ".d.old-xyz", ".dd.tmp-q", "d.tmp-nodot", ".d.tmpx-1", ".e.tmp-1"):
        (tmp_path / name).mkdir()
    assert hio._leftovers(tmp_path / "d", "tmp") == {"abc": tmp_path / ".d.tmp-abc"}
    assert hio._leftovers(tmp_path / "d", "old") == {"xyz": tmp_path / ".d.old-xyz"}
    assert hio._leftovers(tmp_path / "nowhere" / "d", "tmp") == {}


def test_recover_interrupted_cases(tmp_path):
    def make(name, text):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text(text)

    # 1. the final dir exists: it is complete; leftovers of any token are garbage
    make("d", "final")
    make(".d.tmp-1", "new")
    make(".d.old-2", "old")
    assert hio.recover_interrupted(tmp_path / "d") is False
    assert (tmp_path / "d" / "f").read_text() == "final" and hidden(tmp_path) == []
    # 2. between the renames (old-T and tmp-T of one token): roll forward; another token's temp is garbage
    make(".e.old-5", "old")
    make(".e.tmp-5", "new")
    make(".e.tmp-4", "other")
    assert hio.recover_interrupted(tmp_path / "e") is True
    assert (tmp_path / "e" / "f").read_text() == "new" and hidden(tmp_path) == []
    # 3. only old dirs: roll back to the first by token, the rest deleted
    make(".g.old-b", "second")
    make(".g.old-a", "first")
    assert hio.recover_interrupted(tmp_path / "g") is True
    assert (tmp_path / "g" / "f").read_text() == "first" and hidden(tmp_path) == []
    # 4. only temps: nothing was committed
    make(".h.tmp-1", "new")
    assert hio.recover_interrupted(tmp_path / "h") is False
    assert not (tmp_path / "h").exists() and hidden(tmp_path) == []


def test_atomic_dir_refuses_a_file_and_makes_parents(tmp_path):
    (tmp_path / "f").write_text("x")
    assert one_line(lambda: hio.atomic_dir(tmp_path / "f").__enter__()) == \
        f"{tmp_path / 'f'}: exists and is not a directory; choose another path or remove it"
    (tmp_path / ".n.old-1").mkdir()  # a killed write of the same path is recovered first
    (tmp_path / ".n.old-1" / "f").write_text("old")
    with hio.atomic_dir(tmp_path / "a" / "b" / "c") as tmp:  # two missing levels
        (tmp / "x").write_text("x")
    assert (tmp_path / "a" / "b" / "c" / "x").read_text() == "x"
    with hio.atomic_dir(tmp_path / "n") as tmp:
        assert (tmp_path / "n" / "f").read_text() == "old" and hidden(tmp_path) == [tmp.name]
        (tmp / "g").write_text("new")
    assert sorted(p.name for p in (tmp_path / "n").iterdir()) == ["g"] and hidden(tmp_path) == []


def test_cleanup_never_replaces_the_error_that_caused_it(tmp_path):
    """The temp and staging dirs are removed best-effort: if the failing body already took its
    temp dir with it, the caller still sees the body's own error, not the cleanup's."""
    import shutil

    for enter in (lambda: hio.atomic_dir(tmp_path / "d"), lambda: hio.atomic_files(tmp_path / "f", "t")):
        with pytest.raises(ValueError, match="the body's error"):
            with enter() as tmp:
                shutil.rmtree(tmp)
                raise ValueError("the body's error")
    assert not (tmp_path / "d").exists() and hidden(tmp_path) == []


def test_a_committed_dir_stands_when_the_old_version_cannot_be_deleted(tmp_path, monkeypatch):
    """After the second rename the new directory is in place: a file of the old one that cannot be
    deleted (open on Windows, busy on NFS) leaves garbage for the next recovery, not a failed save."""
    with hio.atomic_dir(tmp_path / "d") as tmp:
        (tmp / "locked.txt").write_text("old")
    real_unlink = os.unlink

    def unlink(path, *args, **kwargs):
        if os.fspath(path).endswith("locked.txt"):
            raise PermissionError(13, "in use", os.fspath(path))
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    with hio.atomic_dir(tmp_path / "d") as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["new.txt"]
    assert [name.split("-")[0] for name in hidden(tmp_path)] == [".d.old"]
    monkeypatch.undo()
    hio.recover_interrupted(tmp_path / "d")
    assert hidden(tmp_path) == [] and (tmp_path / "d" / "new.txt").read_text() == "new"


# ---- weights ----------------------------------------------------------------------------------

def test_weights_store_each_storage_view_once_and_fill_the_aliases(tmp_path):
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(16, generator=g)
    state = {"a": base[0:4], "a_again": base[0:4], "other": torch.randn(4, generator=g)}  # one view twice
    hio._save_weights(None, tmp_path / "w.safetensors", state)
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as handle:
        stored = set(handle.keys())
        metadata = handle.metadata()
    assert stored == {"a", "other"}, f"seed {seed}: {stored}"
    assert metadata == {"format": "pt", "hierarchos_aliases": json.dumps({"a_again": "a"})}, f"seed {seed}"
    loaded = hio._read_weights(tmp_path / "w.safetensors")
    assert loaded.keys() == state.keys() and loaded["a_again"] is loaded["a"], f"seed {seed}"
    assert all(torch.equal(loaded[k], v) for k, v in state.items()), f"seed {seed}"
    # views of one storage that differ in offset, shape, stride or dtype are different tensors: never an
    # alias of each other (safetensors refuses to store shared memory twice, or each is stored whole)
    square = base[0:4].view(2, 2)
    for name, view in (("offset", base[4:8]), ("longer", base[0:5]), ("transposed", square.t()),
                       ("as_int", base[0:4].view(torch.int32))):
        pair = {"first": square if name == "transposed" else base[0:4], name: view}
        path = tmp_path / f"{name}.safetensors"
        try:
            hio._save_weights(None, path, pair)
        except RuntimeError as exc:
            assert "share memory" in str(exc), f"seed {seed}: {name}: {exc}"
            continue
        loaded = hio._read_weights(path)
        for key, tensor in pair.items():
            assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor), f"seed {seed}: {name}"
    # the tied head of a model: stored once, filled on load
    model = HierarchosLM(tiny_config())
    hio._save_weights(model, tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as handle:
        assert "lm_head.weight" not in handle.keys()
        assert json.loads(handle.metadata()["hierarchos_aliases"]) == {"lm_head.weight": "embed.weight"}


def test_read_weights_messages_and_foreign_files(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert one_line(lambda: hio._read_weights(empty / "w.safetensors")) == (
        f"{empty / 'w.safetensors'}: weights file missing (found: nothing); the save was incomplete, re-save or "
        "pick another directory")
    (empty / "b").write_text("")
    (empty / "a").write_text("")
    assert "(found: a, b)" in one_line(lambda: hio._read_weights(empty / "w.safetensors", "extra file"))
    assert "extra file missing" in one_line(lambda: hio._read_weights(empty / "w.safetensors", "extra file"))
    (empty / "bad.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"{}garbage")
    text = one_line(lambda: hio._read_weights(empty / "bad.safetensors"))
    assert text.startswith(f"{empty / 'bad.safetensors'}: weights file is truncated or corrupt (")
    assert text.endswith("); re-save it or restore it from a checkpoint")
    # a file from another tool: no metadata at all, or an alias naming a tensor that is not there
    save_file({"x": torch.ones(2)}, str(tmp_path / "plain.safetensors"))
    assert list(hio._read_weights(tmp_path / "plain.safetensors")) == ["x"]
    save_file({"x": torch.ones(2)}, str(tmp_path / "alias.safetensors"),
              metadata={"hierarchos_aliases": json.dumps({"y": "missing", "z": "x"})})
    loaded = hio._read_weights(tmp_path / "alias.safetensors")
    assert sorted(loaded) == ["x", "z"] and loaded["z"] is loaded["x"]


def test_load_weights_messages_name_at_most_five_and_apply_gets_the_tensors(tmp_path):
    model = torch.nn.Sequential(*[torch.nn.Linear(1, 1) for _ in range(4)])  # 8 tensors
    save_file({f"x{i}": torch.zeros(1) for i in range(6)}, str(tmp_path / "foreign.safetensors"))
    assert one_line(lambda: hio.load_weights(model, tmp_path / "foreign.safetensors")) == (
        f"{tmp_path / 'foreign.safetensors'}: tensors do not match the model (missing 0.weight, 0.bias, 1.weight, "
        "1.bias, 2.weight ...; unexpected x0, x1, x2, x3, x4 ...); the config and the weights disagree, keep "
        "hierarchos_config.json with its weights")
    full = {k: v.clone() for k, v in model.state_dict().items()}
    partial = {k: full[k] for k in list(full)[:3]}
    partial.update({f"x{i}": torch.zeros(1) for i in range(5)})
    save_file(partial, str(tmp_path / "partial.safetensors"))
    assert "(missing 1.bias, 2.weight, 2.bias, 3.weight, 3.bias; unexpected x0, x1, x2, x3, x4);" in \
        one_line(lambda: hio.load_weights(model, tmp_path / "partial.safetensors"))
    extra = {**full, "x0": torch.zeros(1)}
    save_file(extra, str(tmp_path / "extra.safetensors"))
    assert "(unexpected x0);" in one_line(lambda: hio.load_weights(model, tmp_path / "extra.safetensors"))
    wide = {**full, "2.weight": torch.zeros(1, 3)}
    save_file(wide, str(tmp_path / "wide.safetensors"))
    assert one_line(lambda: hio.load_weights(model, tmp_path / "wide.safetensors")) == (
        f"{tmp_path / 'wide.safetensors'}: tensor '2.weight' has shape (1, 3) but the config expects (1, 1); "
        "the config and the weights disagree, keep hierarchos_config.json with its weights")
    new = {k: torch.full_like(v, 7.0) for k, v in full.items()}
    save_file(new, str(tmp_path / "new.safetensors"))
    got = []
    hio.load_weights(model, tmp_path / "new.safetensors", apply=got.append)
    assert list(got[0]) == list(full) and all(torch.equal(got[0][k], new[k]) for k in full)
    assert all(torch.equal(v, full[k]) for k, v in model.state_dict().items())  # apply replaced the load
    hio.load_weights(model, tmp_path / "new.safetensors")
    assert all(torch.equal(v, new[k]) for k, v in model.state_dict().items())


# ---- model directory --------------------------------------------------------------------------

def test_config_payload_is_the_config_plus_metadata_and_refuses_clashes(tmp_path):
    model = HierarchosLM(tiny_config())
    model.memory.source_names = ["notes"]
    text = hio._config_payload(model, {"steps": 3}, {"zeta": "café", "alpha": [1]})
    expected = {"config_version": CONFIG_VERSION, "hierarchos_version": __version__, **model.cfg.to_dict(),
                "training_history": {"steps": 3}, "memory_sources": ["notes"], "extra_keys": ["alpha", "zeta"],
                "zeta": "café", "alpha": [1]}
    assert text == json.dumps(expected, indent=2, sort_keys=True, ensure_ascii=False)
    assert json.loads(hio._config_payload(model, None, None))["extra_keys"] == []
    for key in ("vocab_size", "hidden_size", "training_history", "extra_keys"):
        with pytest.raises(ValueError) as info:
            hio._config_payload(model, None, {key: 1, "fine": 2})
        assert str(info.value) == f"extra metadata keys clash with config/metadata keys: {[key]}"
    hio.save_model_dir(tmp_path / "m", model, extra={"zeta": "café"})
    assert (tmp_path / "m" / "hierarchos_config.json").read_bytes().decode("utf-8") == \
        hio._config_payload(model, None, {"zeta": "café"})


def test_config_files_are_utf8_whatever_the_locale(tmp_path, monkeypatch):
    """On a machine whose locale encoding is not UTF-8 (Windows' cp1252), every config JSON is still
    written as UTF-8: Python picks the locale's encoding through io.text_encoding when none is given."""
    import io as text_io

    real = text_io.text_encoding
    monkeypatch.setattr(text_io, "text_encoding", lambda encoding, *a: real(encoding, *a) if encoding else "cp1252")
    model = HierarchosLM(tiny_config())
    note = {"zeta": "café ☕"}  # ☕ has no cp1252 byte: a locale write would fail, é would be one byte
    written = [hio.save_model_dir(tmp_path / "dir", model, extra=note) / hio.CONFIG_FILE,
               hio.save_model_files(tmp_path / "files", model, extra=note) / hio.CONFIG_FILE,
               hio.save_checkpoint(tmp_path / "c", 1, model, None, None, {}, extra=note) / hio.CONFIG_FILE]
    for path in written:
        assert path.read_bytes().decode("utf-8") == hio._config_payload(model, None, note), path
    assert hio.load_model_dir(tmp_path / "dir")[1]["zeta"] == "café ☕"


def test_tokenizer_saving_by_kind(tmp_path):
    calls = []

    class Transformers:
        def save_pretrained(self, directory):
            calls.append(("save_pretrained", directory))

    class Plain:
        def save(self, directory):
            calls.append(("save", directory))

    Fast = type("Tokenizer", (), {"__module__": "tokenizers.implementations",
                                  "save": lambda self, path: calls.append(("tokenizers", path))})
    for tok in (Transformers(), Fast(), Plain()):
        hio._save_tokenizer(tok, tmp_path)
    assert calls == [("save_pretrained", str(tmp_path)), ("tokenizers", str(tmp_path / "tokenizer.json")),
                     ("save", tmp_path)]


def test_save_model_files_takes_a_gathered_state_and_the_tokenizer(tmp_path):
    model = HierarchosLM(tiny_config())
    state = {k: torch.full_like(v, 0.5) for k, v in model.state_dict().items()}

    class Tok:
        def save(self, directory):
            (Path(directory) / "tok.json").write_text("{}")

    (tmp_path / ".run.model-files-dead").mkdir()  # a killed save's staging dir: cleared by the next save
    assert hio.save_model_files(tmp_path / "run", model, Tok(), history={"s": 1}, extra={"prompt_template": "x"},
                                state=state) == tmp_path / "run"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["hierarchos_config.json", "model.safetensors",
                                                                     "tok.json"]
    loaded, meta = hio.load_model_dir(tmp_path / "run")
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items()) and meta["training_history"] == {"s": 1}
    assert meta["prompt_template"] == "x" and meta["extra_keys"] == ["prompt_template"] and hidden(tmp_path) == []


def test_json_and_config_reading_messages(tmp_path):
    path = tmp_path / "x.json"
    assert one_line(lambda: hio._read_json(path, "thing")) == \
        f"{path}: thing missing; the save was incomplete, pick another directory"
    path.write_bytes(b'{"a": "\xff"}')
    assert one_line(lambda: hio._read_json(path, "thing")) == \
        f"{path}: thing is not UTF-8 text; the file is corrupt, re-save it"
    path.write_text('{\n  "a": 1,\n}')
    assert one_line(lambda: hio._read_json(path, "thing")) == \
        f"{path}: thing is not valid JSON (line 3, column 1): Expecting property name enclosed in double quotes; fix or re-save it"
    assert one_line(lambda: hio.read_config_payload([1], "here")) == \
        "here: expected a JSON object, got list; fix or re-save it"
    cfg = tiny_config().to_dict()
    assert one_line(lambda: hio.read_config_payload({**cfg, "config_version": CONFIG_VERSION + 1}, "here")) == (
        f"here: config_version {CONFIG_VERSION + 1} is newer than this hierarchos understands ({CONFIG_VERSION}); "
        "upgrade hierarchos")
    for version in (CONFIG_VERSION, "99", None):  # the current version, or one that is not a number: read
        parsed, _ = hio.read_config_payload({**cfg, "config_version": version}, "here")
        assert parsed == tiny_config()
    data = {**cfg, "hidden_size": 16, "extra_keys": ["prompt_template"], "prompt_template": "alpaca", "puzzle": 1}
    del data["context_dim"]
    with pytest.raises(HierarchosError, match="unknown config field 'puzzle'"):
        hio.read_config_payload(data, "here")  # an extra not listed in extra_keys is a typo
    data["extra_keys"].append("puzzle")
    parsed, meta = hio.read_config_payload(data, "here")
    assert parsed == tiny_config()
    assert meta == {"extra_keys": ["prompt_template", "puzzle"], "prompt_template": "alpaca", "puzzle": 1}


def test_model_dir_check_messages(tmp_path):
    (tmp_path / "file").write_text("x")
    assert one_line(lambda: hio.load_model_dir(tmp_path / "file")) == (
        f"{tmp_path / 'file'}: is a file, not a model directory; pass the directory holding hierarchos_config.json")
    assert one_line(lambda: hio.load_model_dir(tmp_path / "nope")) == \
        f"{tmp_path / 'nope'}: model directory not found; check the path"
    crowded = tmp_path / "crowded"
    crowded.mkdir()
    names = [f"n{i:02d}" for i in range(13)]
    for name in names:
        (crowded / name).write_text("")
    assert one_line(lambda: hio.load_model_dir(crowded)) == (
        f"{crowded}: not a hierarchos model directory (no hierarchos_config.json; found: {', '.join(names[:12])}); "
        "pass a directory written by hierarchos (train --out-dir)")
    ckpts = tmp_path / "ckpts"
    (ckpts / "step-00000001").mkdir(parents=True)
    assert one_line(lambda: hio.load_model_dir(ckpts)).endswith(
        "(no hierarchos_config.json; found: step-00000001); this looks like a checkpoint folder: convert it with "
        "`hierarchos ckpt-2-inf`")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "found: nothing)" in one_line(lambda: hio.load_model_dir(empty))
    model = HierarchosLM(tiny_config())
    hio.save_model_dir(tmp_path / "puzzle", model, extra={"puzzle": {"task": "maze"}})
    assert one_line(lambda: hio.load_model_dir(tmp_path / "puzzle")) == (
        f"{tmp_path / 'puzzle'} is a puzzle model (task maze), not a language model; use `hierarchos puzzle eval "
        f"--model-path {tmp_path / 'puzzle'} --data PUZZLES`")
    hio.save_model_dir(tmp_path / "puzzle2", model, extra={"puzzle": {}})
    assert "(task sudoku)" in one_line(lambda: hio.load_model_dir(tmp_path / "puzzle2"))
    hio.save_model_dir(tmp_path / "plain", model, extra={"puzzle": "not a dict"})
    assert hio.load_model_dir(tmp_path / "plain")[1]["puzzle"] == "not a dict"


# ---- RNG and checkpoints ------------------------------------------------------------------------

def test_rng_parts_missing_are_skipped():
    import numpy as np

    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    state = hio.capture_rng_state()
    assert set(state) == {"torch", "python", "numpy"} or "cuda" in state
    expected = (torch.rand(2).tolist(), random.random(), np.random.rand())
    hio.restore_rng_state({"python": state["python"]})
    assert random.random() == expected[1]
    assert torch.rand(2).tolist() != expected[0]  # the torch stream was not rewound
    hio.restore_rng_state({"numpy": state["numpy"], "cuda": []})
    assert np.random.rand() == expected[2]
    hio.restore_rng_state({"torch": state["torch"]})
    assert torch.rand(2).tolist() == expected[0]
    hio.restore_rng_state({})


class FakeCuda:
    """torch.cuda on a machine of `count` devices, each generator's state recorded (the CPU tests
    run capture/restore's CUDA branch through it)."""

    def __init__(self, monkeypatch, count: int, available: bool = True, initialized: bool = True):
        self.set: list[tuple[list[int], int]] = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: initialized)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all",
                            lambda: [torch.tensor([index, 7], dtype=torch.uint8) for index in range(count)])
        monkeypatch.setattr(torch.cuda, "set_rng_state",
                            lambda state, device="cuda": self.set.append((state.tolist(), device)))


def test_cuda_rng_states_go_to_their_devices_and_only_when_cuda_is_there(monkeypatch):
    cuda = FakeCuda(monkeypatch, count=2)
    state = hio.capture_rng_state()
    assert [hio._unb64(s).tolist() for s in state["cuda"]] == [[0, 7], [1, 7]]
    three = {"cuda": [*state["cuda"], hio._b64(torch.tensor([2, 7], dtype=torch.uint8))]}
    hio.restore_rng_state(three)  # saved on 3 devices, restored on 2: the first two, each to its index
    assert cuda.set == [([0, 7], 0), ([1, 7], 1)]
    FakeCuda(monkeypatch, count=2, initialized=False)  # CUDA never used: no CUDA state is saved
    assert "cuda" not in hio.capture_rng_state()
    cuda = FakeCuda(monkeypatch, count=2, available=False)
    hio.restore_rng_state(three)  # saved on a GPU machine, restored on a CPU one: skipped
    assert cuda.set == []
    cuda = FakeCuda(monkeypatch, count=2)
    hio.restore_rng_state({"cuda": []})
    hio.restore_rng_state({})  # saved where CUDA was never used
    assert cuda.set == []


def test_check_plain_names_the_first_bad_value():
    hio._check_plain({"a": [1, 2.0, "s", None, True, torch.zeros(1), torch.float16, torch.Size([2])],
                      3: ({"b": 1},)}, "state")

    class Thing:
        pass

    for value, where in (({"a": [0, Thing()]}, "optimizer state['a'][1]"), ({Thing(): 1}, "optimizer state key"),
                         ((Thing(),), "optimizer state[0]"), (Thing(), "optimizer state")):
        with pytest.raises(TypeError) as info:
            hio._check_plain(value, "optimizer state")
        assert str(info.value) == f"{where}: Thing cannot be saved for weights_only loading"


def test_step_dirs_sorted_by_number_and_pointers(tmp_path):
    for name in ("step-100000000", "step-99999999", "step-00000002", "step-123", "stepx-00000001", "step-0000000a"):
        (tmp_path / name).mkdir()
    (tmp_path / "step-00000003").write_text("a file")
    assert hio._step_dirs(tmp_path) == [(2, tmp_path / "step-00000002"), (99999999, tmp_path / "step-99999999"),
                                        (100000000, tmp_path / "step-100000000")]
    assert hio._step_dirs(tmp_path / "missing") == []
    assert hio._pointer(tmp_path, "latest.json") is None
    (tmp_path / "latest.json").write_text('["step-00000002"]')
    assert hio._pointer(tmp_path, "latest.json") is None
    (tmp_path / "latest.json").write_text('{"dir": "step-00000002"}')
    assert hio._pointer(tmp_path, "latest.json") == "step-00000002"
    assert hio.resolve_checkpoint(tmp_path) == tmp_path / "step-00000002"
    (tmp_path / "latest.json").unlink()
    assert hio.resolve_checkpoint(tmp_path) == tmp_path / "step-100000000"  # the newest by number
    assert hio.resolve_checkpoint(tmp_path / "step-00000002") == tmp_path / "step-00000002"  # a step dir by name
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "trainer_state.json").write_text("{}")
    assert hio.resolve_checkpoint(tmp_path / "odd") == tmp_path / "odd"
    names = sorted(f"f{i:02d}" for i in range(13))
    (tmp_path / "none").mkdir()
    for name in names:
        (tmp_path / "none" / name).write_text("")
    assert one_line(lambda: hio.resolve_checkpoint(tmp_path / "none")) == (
        f"{tmp_path / 'none'}: no checkpoint here (no latest.json or step-* dirs; found: {', '.join(names[:12])}); "
        "pass a checkpoint root or step dir")
    (tmp_path / "none" / "latest.json").write_text('{"dir": "step-00000007"}')
    assert one_line(lambda: hio.resolve_checkpoint(tmp_path / "none")) == (
        f"{tmp_path / 'none' / 'latest.json'}: names 'step-00000007', which is missing; pass a step-* directory instead")
    (tmp_path / "none" / "latest.json").write_text('{"dir": ')  # a torn pointer names itself
    assert one_line(lambda: hio.resolve_checkpoint(tmp_path / "none")) == (
        f"{tmp_path / 'none' / 'latest.json'}: checkpoint pointer is not valid JSON (line 1, column 9): "
        "Expecting value; fix or re-save it")


def test_rotation_clears_leftovers_of_killed_saves(tmp_path):
    root = tmp_path / "ckpt"
    for step in (1, 2, 3):
        (root / f"step-0000000{step}").mkdir(parents=True)
    (root / ".step-00000002.trash-abc").mkdir()
    (root / ".step-00000004.tmp-t").mkdir()  # a killed save: never committed
    (root / ".step-00000005.old-t").mkdir()  # killed between renames with no new dir: rolled back
    (root / ".step-00000005.old-t" / "f").write_text("5")
    (root / ".latest.json.tmp-1").write_text("{")
    (root / ".best.json.tmp-2").write_text("{")
    (root / ".keep").write_text("not ours")
    hio.atomic_write_text(root / "best.json", json.dumps({"dir": "step-00000001"}))
    hio._rotate(root, None)  # keep=None: leftovers cleared, no step dir deleted
    assert sorted(p.name for p in root.iterdir()) == [".keep", "best.json", "step-00000001", "step-00000002",
                                                      "step-00000003", "step-00000005"]
    assert (root / "step-00000005" / "f").read_text() == "5"
    hio.atomic_write_text(root / "latest.json", json.dumps({"dir": "step-00000002"}))
    hio._rotate(root, 1)  # beyond the newest one, except what latest and best name
    assert sorted(p.name for p in root.iterdir()) == [".keep", "best.json", "latest.json", "step-00000001",
                                                      "step-00000002", "step-00000005"]
    hio._rotate(root, 2)
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step-")) == [
        "step-00000001", "step-00000002", "step-00000005"]


def _unlink_refuses(monkeypatch, name: str) -> None:
    """os.unlink raises PermissionError for files called `name` (open on Windows, busy on NFS)."""
    real_unlink = os.unlink

    def unlink(path, *args, **kwargs):
        if os.path.basename(os.fspath(path)) == name:
            raise PermissionError(13, "in use", os.fspath(path))
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)


def test_removing_a_leftover_is_best_effort(tmp_path, monkeypatch):
    """A leftover dir holding a file that cannot be deleted stays (for a later recovery) without
    failing the save or load that tried to clear it."""
    (tmp_path / "left").mkdir()
    (tmp_path / "left" / "held").write_text("x")
    _unlink_refuses(monkeypatch, "held")
    hio._remove(tmp_path / "left")
    assert (tmp_path / "left" / "held").exists()


def test_rotation_that_cannot_delete_leaves_a_trash_dir_for_the_next(tmp_path, monkeypatch):
    """A step dir whose files cannot be deleted (open on Windows, busy on NFS) is moved aside as
    `.step-N.trash-<12 hex>` and the save goes on; the next rotation clears it."""
    root = tmp_path / "ckpt"
    for step in (1, 2):
        (root / f"step-0000000{step}").mkdir(parents=True)
        (root / f"step-0000000{step}" / f"held-{step}").write_text("x")
    _unlink_refuses(monkeypatch, "held-1")
    hio._rotate(root, 1)
    names = sorted(p.name for p in root.iterdir())
    assert names[1:] == ["step-00000002"] and names[0].startswith(".step-00000001.trash-"), names
    assert len(names[0]) == len(".step-00000001.trash-") + 12
    monkeypatch.undo()
    hio._rotate(root, 1)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002"]


def test_save_checkpoint_files_pointers_and_keep_bounds(tmp_path):
    model = HierarchosLM(tiny_config())
    for keep in (0, -1, True, 1.5, "3"):
        assert one_line(lambda: hio.save_checkpoint(tmp_path / "c", 1, model, None, None, {}, keep=keep)) == \
            f"keep-checkpoints = {keep!r}: must be a positive integer"
    assert not (tmp_path / "c").exists()
    path = hio.save_checkpoint(tmp_path / "c", 7, model, None, None, {"rng": {"mine": 1}, "epoch": 2}, keep=1)
    assert path == tmp_path / "c" / "step-00000007"
    assert sorted(p.name for p in path.iterdir()) == ["hierarchos_config.json", "model.safetensors",
                                                      "trainer_state.json"]
    assert json.loads((path / "trainer_state.json").read_text()) == {"rng": {"mine": 1}, "epoch": 2, "step": 7}
    assert (tmp_path / "c" / "latest.json").read_text() == json.dumps({"dir": "step-00000007", "step": 7})
    assert not (tmp_path / "c" / "best.json").exists()
    hio.save_checkpoint(tmp_path / "c", 8, model, None, None, {"epoch": 3}, keep=1, is_best=True)
    assert (tmp_path / "c" / "best.json").read_text() == json.dumps({"dir": "step-00000008", "step": 8})
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["best.json", "latest.json", "step-00000008"]
    state = json.loads((tmp_path / "c" / "step-00000008" / "trainer_state.json").read_text())
    assert set(state["rng"]) >= {"torch", "python"}  # captured when the caller did not put it there
    # a gathered optimizer state (FSDP) replaces the optimizer's own
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hio.save_checkpoint(tmp_path / "c", 9, model, opt, None, {}, optimizer_state={"state": {}, "param_groups": []})
    assert torch.load(tmp_path / "c" / "step-00000009" / "optimizer.pt", weights_only=True) == \
        {"state": {}, "param_groups": []}
    # and a gathered model state (FSDP) replaces the model's own weights
    gathered = {name: torch.full_like(t, 0.5) for name, t in model.state_dict().items()}
    path = hio.save_checkpoint(tmp_path / "c", 10, model, None, None, {}, model_state=gathered)
    stored = hio._read_weights(path / "model.safetensors")
    assert set(stored) == set(gathered) and all(torch.equal(stored[k], v) for k, v in gathered.items())


def test_load_checkpoint_groups_extra_tensors_and_takes_loaders(tmp_path):
    model = HierarchosLM(tiny_config())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.memory.source_names = ["a"]
    extra = {"plain": torch.ones(2), "stream.rounds.0": torch.zeros(3), "stream.h": torch.full((1,), 2.0)}
    hio.save_checkpoint(tmp_path / "c", 1, model, opt, None, {"epoch": 0}, extra_tensors=extra)
    other = HierarchosLM(tiny_config())
    loaded_model, loaded_opt = [], []
    state = hio.load_checkpoint(tmp_path / "c", other, opt, restore_rng=False, load_model=loaded_model.append,
                                load_optimizer=loaded_opt.append)
    assert sorted(loaded_model[0]) == sorted(model.state_dict()) and loaded_opt[0]["param_groups"][0]["lr"] == 0.1
    assert other.memory.source_names == ["a"]
    assert sorted(state["_tensors"]) == ["plain"] and sorted(state["_stream"]) == ["h", "rounds.0"]
    assert torch.equal(state["_stream"]["rounds.0"], torch.zeros(3)) and torch.equal(state["_tensors"]["plain"],
                                                                                     torch.ones(2))
    assert state["checkpoint_dir"] == str(tmp_path / "c" / "step-00000001") and state["epoch"] == 0
    (tmp_path / "c" / "step-00000001" / "hierarchos_config.json").unlink()  # an old checkpoint: names kept
    third = HierarchosLM(tiny_config())
    third.memory.source_names = ["kept"]
    hio.load_checkpoint(tmp_path / "c", third)
    assert third.memory.source_names == ["kept"]
    (tmp_path / "c" / "step-00000001" / "trainer_state.json").write_text("[1]")
    assert one_line(lambda: hio.load_checkpoint(tmp_path / "c", third)) == (
        f"{tmp_path / 'c' / 'step-00000001' / 'trainer_state.json'}: expected a JSON object; the checkpoint is corrupt")


def test_load_checkpoint_restores_rng_only_when_asked(tmp_path):
    model = HierarchosLM(tiny_config())
    torch.manual_seed(5)
    hio.save_checkpoint(tmp_path / "c", 1, model, None, None, {})
    expected = torch.rand(3)
    torch.manual_seed(6)
    hio.load_checkpoint(tmp_path / "c", model, restore_rng=False)
    assert not torch.equal(torch.rand(3), expected)
    hio.load_checkpoint(tmp_path / "c", model)
    assert torch.equal(torch.rand(3), expected)
    hio.save_checkpoint(tmp_path / "d", 1, model, None, None, {"rng": "not a dict"})
    hio.load_checkpoint(tmp_path / "d", model)  # nothing to restore


def test_checkpoint_to_model_dir_keeps_the_listed_extras(tmp_path):
    model = HierarchosLM(tiny_config())
    hio.save_checkpoint(tmp_path / "c", 1, model, None, None, {"training_history": [{"steps": 1}]},
                        extra={"prompt_template": "alpaca", "note": "n"})
    out = hio.checkpoint_to_model_dir(tmp_path / "c", tmp_path / "inf")
    _, meta = hio.load_model_dir(out)
    assert (meta["prompt_template"], meta["note"], meta["extra_keys"]) == ("alpaca", "n", ["note", "prompt_template"])
    assert meta["training_history"] == [{"steps": 1}]


def test_torch_load_is_weights_only_whatever_the_environment_says(tmp_path, monkeypatch):
    class Payload:
        def __reduce__(self):
            return (print, ("unpickled",))

    torch.save({"state": Payload()}, tmp_path / "evil.pt")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # flips torch's default, not an explicit True
    text = one_line(lambda: hio._torch_load(tmp_path / "evil.pt", "optimizer state"))
    with pytest.raises(Exception) as refused:
        torch.load(tmp_path / "evil.pt", map_location="cpu", weights_only=True)
    reason = " ".join(str(refused.value).split())
    assert len(reason) > 200 and text == (f"{tmp_path / 'evil.pt'}: optimizer state is truncated or corrupt "
                                          f"({reason[:200]}); resume from another checkpoint")
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    assert one_line(lambda: hio._torch_load(tmp_path / "missing.pt", "scheduler state")) == (
        f"{tmp_path / 'missing.pt'}: scheduler state missing from the checkpoint; resume from another checkpoint or "
        "start without one")
    torch.save({"a": torch.arange(100)}, tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:len(data) // 2])
    try:
        torch.load(tmp_path / "cut.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # the reason: torch's own message on one line, at most 200 characters
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
    assert reason
    assert one_line(lambda: hio._torch_load(tmp_path / "cut.pt", "optimizer state")) == (
        f"{tmp_path / 'cut.pt'}: optimizer state is truncated or corrupt ({reason}); resume from another checkpoint")
    assert torch.equal(hio._torch_load(tmp_path / "ok.pt", "x")["a"], torch.arange(100))


def test_save_checkpoint_state_text_and_what_it_refuses(tmp_path):
    model = HierarchosLM(tiny_config())
    path = hio.save_checkpoint(tmp_path / "c", 3, model, None, None, {"rng": {}, "b": 1, "a": [1, 2]},
                               extra_tensors={"s.t": torch.arange(6.0).view(2, 3).t()})  # not contiguous
    assert (path / "trainer_state.json").read_text() == json.dumps({"a": [1, 2], "b": 1, "rng": {}, "step": 3},
                                                                   indent=2, sort_keys=True)
    assert torch.equal(hio._read_weights(path / "extra_tensors.safetensors")["s.t"], torch.arange(6.0).view(2, 3).t())

    class Odd:
        pass

    class Holder:
        def __init__(self, state):
            self.state = state

        def state_dict(self):
            return self.state

    for optimizer, scheduler, where in ((Holder({"x": Odd()}), None, "optimizer state['x']"),
                                        (None, Holder([Odd()]), "scheduler state[0]")):
        with pytest.raises(TypeError) as info:
            hio.save_checkpoint(tmp_path / "d", 1, model, optimizer, scheduler, {})
        assert str(info.value) == f"{where}: Odd cannot be saved for weights_only loading"
    assert not (tmp_path / "d").exists()


def test_torch_load_names_an_exception_without_a_message_by_its_type(tmp_path, monkeypatch):
    (tmp_path / "x.pt").write_bytes(b"\x00")

    def empty(*args, **kwargs):
        raise RuntimeError()

    monkeypatch.setattr(torch, "load", empty)
    assert one_line(lambda: hio._torch_load(tmp_path / "x.pt", "scheduler state")) == (
        f"{tmp_path / 'x.pt'}: scheduler state is truncated or corrupt (RuntimeError); resume from another checkpoint")


def test_load_checkpoint_scheduler_without_optimizer_and_its_messages(tmp_path):
    model = HierarchosLM(tiny_config())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    for _ in range(3):
        opt.step()
        sched.step()
    hio.save_checkpoint(tmp_path / "c", 1, model, opt, sched, {})
    fresh_opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fresh = torch.optim.lr_scheduler.LambdaLR(fresh_opt, lambda step: 0.5 ** step)
    hio.load_checkpoint(tmp_path / "c", model, None, fresh, restore_rng=False)  # no optimizer: the scheduler still
    assert fresh.state_dict()["last_epoch"] == 3
    step = tmp_path / "c" / "step-00000001"
    (step / "scheduler.pt").unlink()
    assert one_line(lambda: hio.load_checkpoint(step, model, None, fresh)) == (
        f"{step / 'scheduler.pt'}: scheduler state missing from the checkpoint; resume from another checkpoint or "
        "start without one")
    other = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)  # another parameter set
    with pytest.raises(HierarchosError) as info:
        hio.load_checkpoint(step, model, other)
    text = str(info.value)
    assert text.startswith(f"{step / 'optimizer.pt'}: optimizer state does not fit this run (")
    assert text.endswith("); resume with the same model and optimizer settings")


def test_a_corrupt_extra_tensors_file_is_named(tmp_path):
    model = HierarchosLM(tiny_config())
    step = hio.save_checkpoint(tmp_path / "c", 1, model, None, None, {}, extra_tensors={"s.h": torch.ones(2)})
    (step / "extra_tensors.safetensors").write_bytes(b"\x01")
    text = one_line(lambda: hio.load_checkpoint(step, model))
    assert text.startswith(f"{step / 'extra_tensors.safetensors'}: extra tensors file is truncated or corrupt (")


def test_resolve_checkpoint_of_a_file_lists_nothing(tmp_path):
    (tmp_path / "f").write_text("x")
    assert one_line(lambda: hio.resolve_checkpoint(tmp_path / "f")) == (
        f"{tmp_path / 'f'}: no checkpoint here (no latest.json or step-* dirs; found: nothing); pass a checkpoint "
        "root or step dir")


def test_save_checkpoint_keeps_three_by_default(tmp_path):
    model = HierarchosLM(tiny_config())
    for step in range(1, 6):
        hio.save_checkpoint(tmp_path / "c", step, model, None, None, {})
    assert sorted(p.name for p in (tmp_path / "c").iterdir() if p.name.startswith("step-")) == [
        "step-00000003", "step-00000004", "step-00000005"]


def gpu_saved(path: Path, obj) -> None:
    """`torch.save(obj)` as a CUDA machine writes it: each storage tagged 'cuda:0' (the tag is the only
    difference in the file), so this CPU-only machine can make one."""
    import io as bytes_io
    import zipfile

    buffer = bytes_io.BytesIO()
    torch.save(obj, buffer)
    with zipfile.ZipFile(bytes_io.BytesIO(buffer.getvalue())) as zin, zipfile.ZipFile(path, "w") as zout:
        for name in zin.namelist():
            data = zin.read(name)
            if name.endswith("data.pkl"):
                assert b"X\x03\x00\x00\x00cpu" in data
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            zout.writestr(name, data)


def test_torch_load_maps_a_gpu_saved_state_onto_the_cpu(tmp_path):
    """A run checkpointed on a GPU resumes on a CPU-only machine (and on a GPU machine the state is
    still loaded to the CPU first, where load_state_dict moves it)."""
    gpu_saved(tmp_path / "optimizer.pt", {"state": {0: {"exp_avg": torch.arange(4.0)}}})
    if not torch.cuda.is_available():  # the file really names a CUDA device: a plain load refuses it here
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(tmp_path / "optimizer.pt", weights_only=True)
    loaded = hio._torch_load(tmp_path / "optimizer.pt", "optimizer state")["state"][0]["exp_avg"]
    assert loaded.device.type == "cpu" and torch.equal(loaded, torch.arange(4.0))


# ---- the helpers every save and load calls (mutation survivors, issue 15 fourth pass) ---------------------------

def test_load_weights_lists_six_missing_names_as_five_and_dots(tmp_path):
    model = torch.nn.Sequential(*[torch.nn.Linear(1, 1) for _ in range(3)])  # 6 tensors, none in the file
    save_file({"x0": torch.zeros(1)}, str(tmp_path / "w.safetensors"))
    assert "(missing 0.weight, 0.bias, 1.weight, 1.bias, 2.weight ...; unexpected x0);" in \
        one_line(lambda: hio.load_weights(model, tmp_path / "w.safetensors"))


def test_load_model_dir_moves_the_model_to_the_device_asked(tmp_path):
    """The meta device stands in for a GPU here: every parameter and buffer goes where `device` says."""
    hio.save_model_dir(tmp_path / "m", HierarchosLM(tiny_config()))
    for device, kind in (("meta", "meta"), (torch.device("meta"), "meta"), ("cpu", "cpu")):
        model, _ = hio.load_model_dir(tmp_path / "m", device=device)
        assert {t.device.type for t in (*model.parameters(), *model.buffers())} == {kind}, device
    assert {p.device.type for p in hio.load_model_dir(tmp_path / "m")[0].parameters()} == {"cpu"}


def test_read_config_names_the_config_file_in_its_errors(tmp_path):
    path = tmp_path / hio.CONFIG_FILE
    path.write_text("[1]")
    assert one_line(lambda: hio.read_config(tmp_path)) == f"{path}: expected a JSON object, got list; fix or re-save it"
    path.write_text("{")
    assert one_line(lambda: hio.read_config(tmp_path)).startswith(f"{path}: config is not valid JSON (line 1, column 2)")
    path.write_bytes(b'{"a": "\xff"}')
    assert one_line(lambda: hio.load_model_dir(tmp_path)) == \
        f"{path}: config is not UTF-8 text; the file is corrupt, re-save it"


def test_a_corrupt_weights_file_error_gives_the_reason_on_one_line_or_its_type(tmp_path, monkeypatch):
    (tmp_path / "w.safetensors").write_bytes(b"x")

    class Silent(Exception):
        pass

    for exc, reason in ((ValueError("bad\n  header  size"), "bad header size"), (Silent(), "Silent")):
        def refuse(*args, exc=exc, **kwargs):
            raise exc
        monkeypatch.setattr(hio, "safe_open", refuse)
        assert one_line(lambda: hio._read_weights(tmp_path / "w.safetensors")) == (
            f"{tmp_path / 'w.safetensors'}: weights file is truncated or corrupt ({reason}); "
            "re-save it or restore it from a checkpoint")


def test_a_config_payload_error_names_where_it_was_read():
    with pytest.raises(HierarchosError) as err:
        hio.read_config_payload({**tiny_config().to_dict(), "typo": 1}, "here")
    assert str(err.value).startswith("here: unknown config field 'typo' (known fields: ")


@pytest.mark.parametrize("parts", [("cache", "x"), ("a", "b", "cache")])
def test_path_lock_makes_a_second_writer_wait(tmp_path, parts):
    """io.path_lock: a second holder (another open file, as another process would have) waits, says so
    once, and gets the lock when the first lets go; a root two levels missing is made first (without
    it the lock file could not be made and both would run unlocked). The lock file goes with its last
    holder."""
    from hierarchos.io import path_lock

    target, events = tmp_path.joinpath(*parts), []

    def second():
        with path_lock(target, on_wait=lambda: events.append("waiting"), poll_s=0.01):
            events.append("got it")

    with path_lock(target):
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.3)
        assert events == ["waiting"]  # still held by the first
    thread.join(timeout=10)
    assert events == ["waiting", "got it"]
    assert list(target.parent.iterdir()) == []


def test_path_lock_runs_unlocked_where_no_lock_file_can_be_made(tmp_path):
    """A read-only directory (here a parent that is a file: the same OSError for root too): the block
    runs unlocked instead of failing."""
    from hierarchos.io import path_lock

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    ran = []
    with path_lock(blocker / "cache"):
        ran.append(True)
    assert ran == [True]

def test_path_lock_a_waiter_left_with_a_removed_file_locks_the_new_one(tmp_path):
    """The holder removes the lock file before letting go, so the waiter that was blocked on it then
    holds a lock on a file no longer at the path: it must start over on the file at the path, or a
    third process (which makes a new file) would get in beside it."""
    from hierarchos.io import path_lock

    target = tmp_path / "cache"
    inside, release, third_waited = threading.Event(), threading.Event(), []

    def second():
        with path_lock(target, poll_s=0.01):
            inside.set()
            release.wait(10)

    with path_lock(target):
        waiter = threading.Thread(target=second)
        waiter.start()
        time.sleep(0.3)  # the second has opened the lock file and waits on it
    assert inside.wait(10)

    def third():
        with path_lock(target, on_wait=lambda: third_waited.append(True), poll_s=0.01):
            pass

    late = threading.Thread(target=third)
    late.start()
    time.sleep(0.3)
    assert third_waited == [True], "the third got in beside the second"
    release.set()
    waiter.join(timeout=10)
    late.join(timeout=10)
    assert not target.parent.joinpath(".cache.lock").exists()


def test_a_model_dir_saved_before_the_wiring_fields_loads_with_hierarchos_wiring(tmp_path):
    """x070's wiring became the default after model directories were saved without any tm_* field:
    such a directory was trained with hierarchos' own wiring and must load as that model, weights and
    logits alike; one that names its wiring keeps it."""
    from hierarchos.config import TIME_MIX_WIRINGS

    torch.manual_seed(0)
    ours = HierarchosLM(tiny_config(vocab_size=260, **TIME_MIX_WIRINGS["hierarchos"])).eval()
    directory = tmp_path / "old"
    hio.save_model_dir(directory, ours)
    path = directory / hio.CONFIG_FILE
    saved = json.loads(path.read_text())
    for name in TIME_MIX_WIRINGS["hierarchos"]:
        del saved[name]
    path.write_text(json.dumps(saved))
    loaded, _ = hio.load_model_dir(directory)
    assert loaded.cfg.time_mix_wiring() == "hierarchos" and loaded.cfg == ours.cfg
    tokens = torch.randint(0, 260, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(tokens).logits, ours(tokens).logits, rtol=0, atol=0)
    x070 = HierarchosLM(tiny_config(vocab_size=260))
    hio.save_model_dir(tmp_path / "new", x070)
    assert hio.load_model_dir(tmp_path / "new")[0].cfg.time_mix_wiring() == "x070"
