"""Model directories and training checkpoints on disk: safetensors + JSON, written atomically.

Nothing here unpickles: weights are safetensors, metadata is JSON, optimizer/scheduler state
is `torch.save`d plain containers read back with `torch.load(weights_only=True)`. Every
directory is built in a temp dir beside its final path and renamed into place, so a kill at
any moment leaves the previous complete directory (or the new one) recoverable.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import __version__
from .config import CONFIG_VERSION, FIELD_ALIASES, LEGACY_WIRING, TIME_MIX_WIRINGS, ModelConfig
from .errors import HierarchosError
from .model import HierarchosLM

CONFIG_FILE = "hierarchos_config.json"
WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
TRAINER_STATE_FILE = "trainer_state.json"
EXTRA_TENSORS_FILE = "extra_tensors.safetensors"
LATEST_FILE = "latest.json"
BEST_FILE = "best.json"
STEP_DIR = re.compile(r"^step-(\d{8,})$")
# Keys of hierarchos_config.json that are not ModelConfig fields (config.py ignores them too).
META_KEYS = ("config_version", "hierarchos_version", "training_history", "memory_sources", "extra_keys")


# ---- atomic files and directories ----------------------------------------------------------
#
# atomic_dir(final) writes into `.NAME.tmp-T` beside `final`. On success, with no previous
# directory, `.NAME.tmp-T` is renamed to `final`. With a previous one: `final` -> `.NAME.old-T`,
# then `.NAME.tmp-T` -> `final`, then `.NAME.old-T` is deleted. The temp dir is complete and
# fsynced before the first rename, so the recovery rule (`recover_interrupted`) is:
#   1. `final` exists: it is complete; leftover `.NAME.tmp-*` / `.NAME.old-*` are garbage.
#   2. `final` missing, `.NAME.old-T` and `.NAME.tmp-T` exist: the crash fell between the two
#      renames and the new dir is complete: roll forward (tmp-T -> final), delete old-T.
#   3. `final` missing, only `.NAME.old-T`: roll back (old-T -> final).
#   4. `final` missing, only `.NAME.tmp-*`: nothing was committed; delete them.
# One writer per path: do not recover a path while another process is writing it (`path_lock`
# makes writers of a shared path take turns).

def fsync_path(path: Path) -> None:
    """fsync a file, or a directory where the OS allows it (not on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _leftovers(final: Path, kind: str) -> dict[str, Path]:
    """Temp ('tmp') or old ('old') siblings of `final`, keyed by their token."""
    prefix = f".{final.name}.{kind}-"
    if not final.parent.is_dir():
        return {}
    return {p.name[len(prefix):]: p for p in final.parent.iterdir() if p.name.startswith(prefix)}


def recover_interrupted(path: str | os.PathLike) -> bool:
    """Complete or undo an `atomic_dir` that was killed; see the rule above. Loaders call this
    first. Returns True when it moved a directory back into place at `path`."""
    final = Path(path)
    temps, olds = _leftovers(final, "tmp"), _leftovers(final, "old")
    restored = False
    if not final.exists():
        for token, old in sorted(olds.items()):
            if token in temps:  # crash between the two renames: the new dir is complete
                os.replace(temps.pop(token), final)  # old-T stays in `olds` and is deleted below
            else:
                os.replace(olds.pop(token), final)
            restored = True
            break
    for leftover in [*temps.values(), *olds.values()]:
        _remove(leftover)
    return restored


@contextlib.contextmanager
def atomic_dir(final_path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp dir beside `final_path`; on success it replaces `final_path` atomically,
    on an exception it is deleted and the exception re-raised (the old dir stays untouched)."""
    final = Path(final_path)
    if final.exists() and not final.is_dir():
        raise HierarchosError(f"{final}: exists and is not a directory; choose another path or remove it")
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted(final)
    token = uuid.uuid4().hex[:12]
    tmp = final.parent / f".{final.name}.tmp-{token}"
    tmp.mkdir()
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                fsync_path(file)
        fsync_path(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.parent / f".{final.name}.old-{token}"
        os.replace(final, old)
        os.replace(tmp, final)
        fsync_path(final.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
        fsync_path(final.parent)


def _try_lock(handle) -> bool:
    try:
        if os.name == "nt":
            import msvcrt

            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError on POSIX, PermissionError on Windows: held elsewhere
        return False
    return True


def _unlock(handle) -> None:
    if os.name == "nt":
        import msvcrt

        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
    else:
        import fcntl

        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def path_lock(final_path: str | os.PathLike, on_wait=None, poll_s: float = 0.05) -> Iterator[None]:
    """Hold an exclusive lock between processes on `final_path` for the block: atomic_dir's
    one-writer rule for a path that several processes may build at once (the token cache of a
    corpus, by the runs of a sweep started together; the second one's `recover_interrupted` deleted
    the first one's temp dir mid-write). The lock is on `.NAME.lock` beside the path; the OS drops it
    when its process ends, killed or not. `on_wait()` is called once if another process holds it.

    The holder removes the lock file before letting go (nothing is left beside the path, where a
    directory listing would find it), so a waiter that then gets the lock may hold a removed file:
    it checks that its file is still the one at the path and starts over if not. (Windows cannot
    remove an open file: there the file stays.) Where no lock file can be made (a read-only
    directory, whose cache can be read but not built), the block runs unlocked."""
    final = Path(final_path)
    lock_path = final.parent / f".{final.name}.lock"
    waited = False
    while True:
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            handle = open(lock_path, "a+b")
        except OSError:
            yield
            return
        while not _try_lock(handle):
            if not waited and on_wait is not None:
                on_wait()
            waited = True
            time.sleep(poll_s)
        try:
            current = os.path.samestat(os.fstat(handle.fileno()), os.stat(lock_path))
        except FileNotFoundError:
            current = False
        if current:
            break
        _unlock(handle)  # the previous holder removed this file: lock the one at the path now
        handle.close()
    try:
        yield
    finally:
        if os.name != "nt":
            with contextlib.suppress(FileNotFoundError):
                lock_path.unlink()
        _unlock(handle)
        handle.close()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file so readers see the old or the new content, never a partial one."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_path(final.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_files(directory: str | os.PathLike, tag: str, first: tuple[str, ...] = (),
                 last: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a staging dir beside `directory` (which may hold other things, left alone); on
    success each file staged there replaces its namesake in `directory` by one atomic rename:
    the names in `first` first, then the rest by name, the names in `last` last. Each file is
    old or new, never partial; a kill between renames leaves the earlier names one version
    ahead of the later ones, so put the metadata that describes the others in `last`."""
    final = Path(directory)
    final.mkdir(parents=True, exist_ok=True)
    prefix = f".{final.name}.{tag}-"
    for leftover in final.parent.iterdir():  # a killed save's staging dir (one writer per directory)
        if leftover.name.startswith(prefix):
            _remove(leftover)
    staging = final.parent / f"{prefix}{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        yield staging
        rank = {name: index for index, name in enumerate(first)}
        rank.update({name: len(first) + 1 + index for index, name in enumerate(last)})
        files = sorted((p for p in staging.iterdir() if p.is_file()),
                       key=lambda p: (rank.get(p.name, len(first)), p.name))
        for file in files:
            fsync_path(file)
            os.replace(file, final / file.name)
        fsync_path(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---- weights ---------------------------------------------------------------------------------

def _save_weights(model: torch.nn.Module, path: Path, state: dict | None = None) -> None:
    """Save the state dict (or `state`, e.g. gathered from FSDP shards) once per storage: tied
    tensors (lm_head -> embed) are stored once and named in the file's metadata so the loader
    fills the alias."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in (model.state_dict() if state is None else state).items():
        ident = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
                 tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if ident in seen:
            aliases[name] = seen[ident]
            continue
        seen[ident] = name
        tensors[name] = tensor.detach().to("cpu").contiguous()
    save_file(tensors, str(path), metadata={"format": "pt", "hierarchos_aliases": json.dumps(aliases)})


def _read_weights(path: Path, what: str = "weights file") -> dict[str, torch.Tensor]:
    if not path.is_file():
        listing = ", ".join(sorted(p.name for p in path.parent.iterdir())) or "nothing"
        raise HierarchosError(f"{path}: {what} missing (found: {listing}); "
                              "the save was incomplete, re-save or pick another directory")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
            aliases = json.loads((handle.metadata() or {}).get("hierarchos_aliases", "{}"))
    except Exception as exc:  # safetensors raises its own error types for bad headers/sizes
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise HierarchosError(f"{path}: {what} is truncated or corrupt ({reason}); "
                              "re-save it or restore it from a checkpoint") from None
    for alias, target in aliases.items():
        if target in tensors:
            tensors[alias] = tensors[target]
    return tensors


def load_weights(model: torch.nn.Module, path: Path, apply=None) -> None:
    """Load strictly, with one-line errors for missing/unexpected tensors and shape mismatches.
    `apply(tensors)` replaces `model.load_state_dict` (FSDP re-shards full tensors)."""
    tensors = _read_weights(path)
    expected = model.state_dict()
    missing = [name for name in expected if name not in tensors]
    unexpected = [name for name in tensors if name not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else ""))
        raise HierarchosError(f"{path}: tensors do not match the model ({'; '.join(parts)}); "
                              f"the config and the weights disagree, keep {CONFIG_FILE} with its weights")
    for name, tensor in expected.items():
        if tuple(tensors[name].shape) != tuple(tensor.shape):
            raise HierarchosError(
                f"{path}: tensor '{name}' has shape {tuple(tensors[name].shape)} but the config expects "
                f"{tuple(tensor.shape)}; the config and the weights disagree, keep {CONFIG_FILE} with its weights")
    if apply is not None:
        apply({name: tensors[name] for name in expected})
    else:
        model.load_state_dict(tensors, strict=True)


# ---- model directory ----------------------------------------------------------------------

def _config_payload(model: HierarchosLM, history: dict | None, extra: dict | None) -> str:
    extra = dict(extra or {})
    config_fields = {f.name for f in dataclasses.fields(ModelConfig)} | set(FIELD_ALIASES)
    clash = sorted(set(extra) & (config_fields | set(META_KEYS)))
    if clash:
        raise ValueError(f"extra metadata keys clash with config/metadata keys: {clash}")
    payload = {
        "config_version": CONFIG_VERSION,
        "hierarchos_version": __version__,
        **model.cfg.to_dict(),
        "training_history": history,
        "memory_sources": list(model.memory.source_names),
        "extra_keys": sorted(extra),
        **extra,
    }
    return json.dumps(payload, indent=2, sort_keys=True, ensure_ascii=False)


def _save_tokenizer(tokenizer: Any, directory: Path) -> None:
    if hasattr(tokenizer, "save_pretrained"):  # transformers
        tokenizer.save_pretrained(str(directory))
    elif type(tokenizer).__module__.split(".")[0] == "tokenizers":  # tokenizers.Tokenizer saves a file
        tokenizer.save(str(directory / "tokenizer.json"))
    else:
        tokenizer.save(directory)


def save_model_dir(path: str | os.PathLike, model: HierarchosLM, tokenizer: Any = None,
                   history: dict | None = None, extra: dict | None = None) -> Path:
    """Write a self-describing model directory atomically: weights, config + metadata, tokenizer."""
    final = Path(path)
    payload = _config_payload(model, history, extra)
    with atomic_dir(final) as tmp:
        _save_weights(model, tmp / WEIGHTS_FILE)
        (tmp / CONFIG_FILE).write_text(payload, encoding="utf-8")
        if tokenizer is not None:
            _save_tokenizer(tokenizer, tmp)
    return final


def save_model_files(path: str | os.PathLike, model: HierarchosLM, tokenizer: Any = None,
                     history: dict | None = None, extra: dict | None = None, state: dict | None = None) -> Path:
    """Write the model-directory files into a directory that holds other things too (a training
    run's OUT_DIR with checkpoints/ and metrics.jsonl), leaving those alone. Each file is
    replaced atomically, weights first and the config last (`atomic_files`), so a kill in between
    leaves the previous model's config beside weights of the same architecture, never a partial file."""
    payload = _config_payload(model, history, extra)
    with atomic_files(path, "model-files", first=(WEIGHTS_FILE,), last=(CONFIG_FILE,)) as tmp:
        _save_weights(model, tmp / WEIGHTS_FILE, state)
        if tokenizer is not None:
            _save_tokenizer(tokenizer, tmp)
        (tmp / CONFIG_FILE).write_text(payload, encoding="utf-8")
    return Path(path)


def _read_json(path: Path, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HierarchosError(f"{path}: {what} missing; the save was incomplete, pick another directory") from None
    except UnicodeDecodeError:
        raise HierarchosError(f"{path}: {what} is not UTF-8 text; the file is corrupt, re-save it") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise HierarchosError(f"{path}: {what} is not valid JSON (line {exc.lineno}, column {exc.colno}): "
                              f"{exc.msg}; fix or re-save it") from None


def read_config_payload(data: Any, where: str) -> tuple[ModelConfig, dict]:
    """Split a hierarchos_config.json payload (also embedded in quantized GGUF files) into the
    ModelConfig and the metadata around it."""
    if not isinstance(data, dict):
        raise HierarchosError(f"{where}: expected a JSON object, got {type(data).__name__}; fix or re-save it")
    version = data.get("config_version", CONFIG_VERSION)
    if isinstance(version, int) and version > CONFIG_VERSION:
        raise HierarchosError(f"{where}: config_version {version} is newer than this hierarchos "
                              f"understands ({CONFIG_VERSION}); upgrade hierarchos")
    extra_keys = data.get("extra_keys") or []
    if not any(name in data for name in TIME_MIX_WIRINGS[LEGACY_WIRING]):  # saved before the wiring fields
        data = {**data, **TIME_MIX_WIRINGS[LEGACY_WIRING]}
    config_fields = {f.name for f in dataclasses.fields(ModelConfig)} | set(FIELD_ALIASES)
    cfg = ModelConfig.from_dict({k: v for k, v in data.items() if k not in extra_keys}, where=where)
    meta = {k: v for k, v in data.items() if k not in config_fields}
    return cfg, meta


def read_config(directory: Path) -> tuple[ModelConfig, dict]:
    config_path = directory / CONFIG_FILE
    return read_config_payload(_read_json(config_path, "config"), str(config_path))


def _check_model_dir(directory: Path) -> None:
    if not directory.exists():
        raise HierarchosError(f"{directory}: model directory not found; check the path")
    if not directory.is_dir():
        raise HierarchosError(f"{directory}: is a file, not a model directory; pass the directory holding {CONFIG_FILE}")
    if not (directory / CONFIG_FILE).is_file():
        names = sorted(p.name for p in directory.iterdir())
        hint = "pass a directory written by hierarchos (train --out-dir)"
        if (directory / LATEST_FILE).is_file() or any(STEP_DIR.match(n) for n in names):
            hint = "this looks like a checkpoint folder: convert it with `hierarchos ckpt-2-inf`"
        raise HierarchosError(f"{directory}: not a hierarchos model directory (no {CONFIG_FILE}; "
                              f"found: {', '.join(names[:12]) or 'nothing'}); {hint}")


def load_model_dir(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[HierarchosLM, dict]:
    """Build the model from a model directory. Returns (model, meta): meta holds every key of
    the config JSON that is not a ModelConfig field (versions, training_history,
    memory_sources, extras such as a prompt template)."""
    directory = Path(path)
    recover_interrupted(directory)
    _check_model_dir(directory)
    cfg, meta = read_config(directory)
    puzzle = meta.get("puzzle")
    if isinstance(puzzle, dict):  # `puzzle train`'s model: its weights are a PuzzleSolver's, not a language model's
        raise HierarchosError(f"{directory} is a puzzle model (task {puzzle.get('task', 'sudoku')}), not a language "
                              f"model; use `hierarchos puzzle eval --model-path {directory} --data PUZZLES`")
    model = HierarchosLM(cfg)
    load_weights(model, directory / WEIGHTS_FILE)
    model.memory.source_names = list(meta.get("memory_sources") or [])
    return model.to(device), meta


# ---- RNG state ------------------------------------------------------------------------------

def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def capture_rng_state() -> dict:
    """torch, CUDA, numpy and python RNG states in JSON-safe form."""
    state: dict[str, Any] = {"torch": _b64(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    version, internal, gauss = random.getstate()
    state["python"] = {"version": version, "state": list(internal), "gauss_next": gauss}
    try:
        import numpy as np
    except ImportError:
        return state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = {"kind": kind, "keys": [int(k) for k in keys], "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of `capture_rng_state`; parts missing from `state` (or devices absent) are skipped."""
    if "torch" in state:
        torch.set_rng_state(_unb64(state["torch"]))
    if state.get("cuda") and torch.cuda.is_available():
        for index, encoded in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(_unb64(encoded), index)
    if "python" in state:
        py = state["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    if "numpy" in state:
        import numpy as np
        npst = state["numpy"]
        np.random.set_state((npst["kind"], np.array(npst["keys"], dtype=np.uint32), npst["pos"],
                             npst["has_gauss"], npst["cached_gaussian"]))


# ---- training checkpoints ------------------------------------------------------------------

def _check_plain(obj: Any, where: str) -> None:
    """Optimizer/scheduler state must be tensors and plain containers (weights_only-loadable)."""
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor, torch.dtype, torch.Size)):
        return
    if isinstance(obj, (list, tuple)):
        for index, item in enumerate(obj):
            _check_plain(item, f"{where}[{index}]")
    elif isinstance(obj, dict):
        for key, item in obj.items():
            _check_plain(key, f"{where} key")
            _check_plain(item, f"{where}[{key!r}]")
    else:
        raise TypeError(f"{where}: {type(obj).__name__} cannot be saved for weights_only loading")


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def _pointer(root: Path, name: str) -> str | None:
    path = root / name
    if not path.is_file():
        return None
    data = _read_json(path, "checkpoint pointer")
    return data.get("dir") if isinstance(data, dict) else None


def _rotate(root: Path, keep: int | None) -> None:
    """Delete step dirs beyond the `keep` newest, never the ones latest/best name; also clear
    temp dirs of killed saves (one trainer writes a root at a time)."""
    for leftover in list(root.iterdir()):
        name = leftover.name
        if name.startswith(".step-") and ".trash-" in name:
            _remove(leftover)
        elif name.startswith(".step-") and (".tmp-" in name or ".old-" in name):
            recover_interrupted(root / name[1:].split(".")[0])
        elif name.startswith((f".{LATEST_FILE}.tmp-", f".{BEST_FILE}.tmp-")):
            _remove(leftover)
    if keep is None:
        return
    protected = {_pointer(root, LATEST_FILE), _pointer(root, BEST_FILE)}
    steps = _step_dirs(root)
    for _, path in steps[:max(len(steps) - keep, 0)]:
        if path.name not in protected:
            trash = root / f".{path.name}.trash-{uuid.uuid4().hex[:12]}"
            os.replace(path, trash)  # a kill mid-delete leaves only a hidden trash dir
            shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(ckpt_root: str | os.PathLike, step: int, model: HierarchosLM, optimizer, scheduler,
                    trainer_state: dict, keep: int | None = 3, is_best: bool = False,
                    extra_tensors: dict[str, torch.Tensor] | None = None, extra: dict | None = None,
                    model_state: dict | None = None, optimizer_state: dict | None = None) -> Path:
    """Write `ckpt_root/step-NNNNNNNN/` atomically, then point latest.json (and best.json) at it
    and rotate older step dirs beyond `keep` (None keeps all). RNG states are captured into
    trainer_state["rng"] unless the caller put them there. `extra_tensors` (e.g. the carried
    recurrent state, named "group.name") go to extra_tensors.safetensors; load_checkpoint
    returns them as trainer_state["_group"] = {"name": tensor}. `model_state` / `optimizer_state`
    replace the model's and optimizer's own state dicts (FSDP: gathered from the shards)."""
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise HierarchosError(f"keep-checkpoints = {keep!r}: must be a positive integer")
    root = Path(ckpt_root)
    state = {**trainer_state, "step": int(step)}
    state.setdefault("rng", capture_rng_state())
    state_text = json.dumps(state, indent=2, sort_keys=True)  # TypeError here is a caller bug
    if optimizer_state is None and optimizer is not None:
        optimizer_state = optimizer.state_dict()
    scheduler_state = scheduler.state_dict() if scheduler is not None else None
    _check_plain(optimizer_state, "optimizer state")
    _check_plain(scheduler_state, "scheduler state")
    config_text = _config_payload(model, trainer_state.get("training_history"), extra)

    name = f"step-{int(step):08d}"
    with atomic_dir(root / name) as tmp:
        _save_weights(model, tmp / WEIGHTS_FILE, model_state)
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
        if scheduler_state is not None:
            torch.save(scheduler_state, tmp / SCHEDULER_FILE)
        if extra_tensors:
            save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in extra_tensors.items()},
                      str(tmp / EXTRA_TENSORS_FILE))
        (tmp / TRAINER_STATE_FILE).write_text(state_text, encoding="utf-8")
        (tmp / CONFIG_FILE).write_text(config_text, encoding="utf-8")
    pointer = json.dumps({"dir": name, "step": int(step)})
    atomic_write_text(root / LATEST_FILE, pointer)
    if is_best:
        atomic_write_text(root / BEST_FILE, pointer)
    _rotate(root, keep)
    return root / name


def resolve_checkpoint(path_or_root: str | os.PathLike) -> Path:
    """A step dir as given, or the one a root's latest.json names (else its newest step dir)."""
    path = Path(path_or_root)
    recover_interrupted(path)
    if not path.exists():
        raise HierarchosError(f"{path}: checkpoint not found; check the path")
    if (path / TRAINER_STATE_FILE).is_file() or STEP_DIR.match(path.name):
        return path
    latest = _pointer(path, LATEST_FILE)
    if latest is not None:
        recover_interrupted(path / latest)
        if (path / latest).is_dir():
            return path / latest
        raise HierarchosError(f"{path / LATEST_FILE}: names '{latest}', which is missing; "
                              "pass a step-* directory instead")
    steps = _step_dirs(path)
    if steps:
        return steps[-1][1]
    names = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    raise HierarchosError(f"{path}: no checkpoint here (no {LATEST_FILE} or step-* dirs; "
                          f"found: {', '.join(names[:12]) or 'nothing'}); pass a checkpoint root or step dir")


def _torch_load(path: Path, what: str) -> Any:
    if not path.is_file():
        raise HierarchosError(f"{path}: {what} missing from the checkpoint; resume from another "
                              "checkpoint or start without one")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise HierarchosError(f"{path}: {what} is truncated or corrupt ({reason}); "
                              "resume from another checkpoint") from None


def load_checkpoint(path_or_root: str | os.PathLike, model: HierarchosLM, optimizer=None, scheduler=None,
                    *, restore_rng: bool = True, load_model=None, load_optimizer=None) -> dict:
    """Load a step dir (or a root's latest) into model/optimizer/scheduler; restores RNG
    states unless told not to. Returns the trainer_state dict (with "checkpoint_dir" added).
    `load_model(tensors)` / `load_optimizer(state)` replace the plain loads (FSDP re-shards)."""
    directory = resolve_checkpoint(path_or_root)
    state = _read_json(directory / TRAINER_STATE_FILE, "trainer state")
    if not isinstance(state, dict):
        raise HierarchosError(f"{directory / TRAINER_STATE_FILE}: expected a JSON object; the checkpoint is corrupt")
    load_weights(model, directory / WEIGHTS_FILE, load_model)
    if (directory / CONFIG_FILE).is_file():
        model.memory.source_names = list(read_config(directory)[1].get("memory_sources") or [])
    for target, file, what in ((optimizer, OPTIMIZER_FILE, "optimizer state"),
                               (scheduler, SCHEDULER_FILE, "scheduler state")):
        if target is None:
            continue
        loaded = _torch_load(directory / file, what)
        try:
            if target is optimizer and load_optimizer is not None:
                load_optimizer(loaded)
            else:
                target.load_state_dict(loaded)
        except (ValueError, KeyError, TypeError) as exc:
            raise HierarchosError(f"{directory / file}: {what} does not fit this run ({exc}); resume with "
                                  "the same model and optimizer settings") from None
    if (directory / EXTRA_TENSORS_FILE).is_file():
        for name, tensor in _read_weights(directory / EXTRA_TENSORS_FILE, "extra tensors file").items():
            group, _, key = name.partition(".") if "." in name else ("tensors", "", name)
            state.setdefault(f"_{group}", {})[key] = tensor
    if restore_rng and isinstance(state.get("rng"), dict):
        restore_rng_state(state["rng"])
    state["checkpoint_dir"] = str(directory)
    return state


def checkpoint_to_model_dir(ckpt_path: str | os.PathLike, out_dir: str | os.PathLike,
                            tokenizer: Any = None) -> Path:
    """`ckpt-2-inf` for a plain training checkpoint: a clean model directory from its weights and
    config only. A LoRA finetune's checkpoint needs its adapters merged: `lora.checkpoint_to_model_dir`."""
    directory = resolve_checkpoint(ckpt_path)
    _, meta = read_config(directory)
    if isinstance(meta.get("lora"), dict):  # a bug in the caller: the CLI routes these through lora
        raise ValueError(f"{directory}: a LoRA finetune's checkpoint; use hierarchos.lora.checkpoint_to_model_dir")
    model, meta = load_model_dir(directory)
    extra = {k: meta[k] for k in meta.get("extra_keys") or [] if k in meta}
    return save_model_dir(out_dir, model, tokenizer, history=meta.get("training_history"), extra=extra)
