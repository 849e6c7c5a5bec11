"""Offline lm-eval tasks shipped with hierarchos, built from the bundled plays.

Each `*.yaml` here is an lm-eval task config whose `dataset_kwargs.data_files` name JSONL files
in this folder by relative path; `local_task_config(name)` returns the config as a dict with
those paths made absolute (lm-eval resolves data files against the working directory), ready for
`TaskManager.load` / `simple_evaluate(tasks=[...])`. `scripts/build_eval_tasks.py` rebuilds the data.
`load_tasks(names)` builds these and lm-eval's own tasks (hub datasets) by name, with one-line errors.
"""

from __future__ import annotations

import contextlib
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

from ..errors import HierarchosError

TASKS_DIR = Path(__file__).resolve().parent
ERR_NO_LM_EVAL = ("evaluation needs the lm-eval package, which is not installed: pip install lm-eval "
                  "(or reinstall hierarchos: pip install -e .)")


@lru_cache(maxsize=None)
def _configs() -> dict[str, Path]:
    """task name -> its YAML file (the name is the file's stem, checked when the config is read)."""
    return {path.stem: path for path in sorted(TASKS_DIR.glob("*.yaml"))}


def local_task_names() -> list[str]:
    return list(_configs())


def is_local_task(name: str) -> bool:
    return name in _configs()


def local_task_config(name: str) -> dict:
    """The lm-eval config dict of a local task, data_files resolved to absolute paths."""
    import yaml  # PyYAML comes with lm-eval; imported here so `import hierarchos` never needs it

    path = _configs().get(name)
    if path is None:
        raise HierarchosError(f"unknown local task {name!r}; local tasks: {', '.join(local_task_names())}")
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    if config.get("task") != name:
        raise ValueError(f"{path}: task name {config.get('task')!r} differs from the file name")  # a packaging bug
    data_files = config.get("dataset_kwargs", {}).get("data_files", {})
    for split, file_name in data_files.items():
        data_file = TASKS_DIR / file_name
        if not data_file.is_file():
            raise HierarchosError(f"{data_file}: data of local task {name!r} is missing; reinstall hierarchos "
                                  "or rebuild it with scripts/build_eval_tasks.py")
        data_files[split] = str(data_file)
    return config


# ---- loading tasks (lm-eval imported here only) ----------------------------------------------

_TASK_MANAGERS: dict[bool, Any] = {}


def require_lm_eval():
    """The lm_eval package (with its model API), or one line saying how to install it."""
    try:
        import lm_eval
        import lm_eval.api.model
        import lm_eval.api.registry
    except ImportError:
        raise HierarchosError(ERR_NO_LM_EVAL) from None
    return lm_eval


def task_manager(with_lm_eval_tasks: bool):
    """lm-eval's TaskManager; indexing lm-eval's own task folders takes seconds, so only when asked."""
    if with_lm_eval_tasks not in _TASK_MANAGERS:
        require_lm_eval()
        from lm_eval.tasks import TaskManager

        _TASK_MANAGERS[with_lm_eval_tasks] = TaskManager(include_defaults=with_lm_eval_tasks)
    return _TASK_MANAGERS[with_lm_eval_tasks]


def _offline_reason(exc: Exception) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


def load_tasks(names: Iterable[str]) -> list:
    """Build lm-eval Task/Group objects: hierarchos local tasks (offline, from the package) by name, other
    names from lm-eval's registry (hub datasets: the local cache first, the hub when it answers).
    A name that is unknown, or whose dataset cannot be had, is one HierarchosError."""
    from ..data.tokenizers import hub_offline_mode, hub_reachable

    # lm-eval's own CLI takes "a,b": accept that beside separate names
    names = list(dict.fromkeys(part.strip() for name in names for part in name.split(",") if part.strip()))
    if not names:
        raise HierarchosError("no evaluation tasks given: pass --tasks NAME ... (local tasks: "
                              f"{', '.join(local_task_names())})")
    hub_names = [name for name in names if not is_local_task(name)]
    manager = task_manager(with_lm_eval_tasks=bool(hub_names))
    online = bool(hub_names) and hub_reachable()
    known = set(manager.all_tasks)
    for name in hub_names:
        if name not in known and not Path(name).is_file():  # lm-eval also loads a task YAML by path
            raise HierarchosError(f"unknown task {name!r}: not a hierarchos local task "
                                  f"({', '.join(local_task_names())}) nor an lm-eval task; "
                                  "list lm-eval's tasks with `lm-eval ls tasks`")
    built = []
    for name in names:
        spec = local_task_config(name) if is_local_task(name) else name
        try:
            # local tasks never need the hub; hub tasks read only the cache when it cannot be reached
            # (the clients would otherwise retry for most of a minute)
            with hub_offline_mode() if (not online or is_local_task(name)) else contextlib.nullcontext():
                loaded = manager.load([spec])
        except HierarchosError:
            raise
        except Exception as exc:  # datasets/hub errors come in many types; all mean "no data for this task"
            if online:
                raise HierarchosError(f"task {name!r}: its dataset could not be loaded ({_offline_reason(exc)}); "
                                      "check the task's dataset on the hub, or use a local task "
                                      f"({', '.join(local_task_names())})") from None
            raise HierarchosError(f"task {name!r}: its dataset is not in the local Hugging Face cache and the hub "
                                  f"cannot be reached ({_offline_reason(exc)}); run once with network access "
                                  f"to cache it, or use a local task ({', '.join(local_task_names())})") from None
        if name in loaded["groups"]:
            built.append(loaded["groups"][name])
        else:
            built.extend(loaded["tasks"].values())
    return built


def flatten_results(results: dict) -> dict[str, dict[str, float]]:
    """lm-eval's results -> {task: {metric: value}}: "acc,none" becomes "acc", other filters stay as
    "metric,filter"; stderr values that were not computed ("N/A") are dropped."""
    table: dict[str, dict[str, float]] = {}
    for task, metrics in (results.get("results") or {}).items():
        row = {}
        for key, value in metrics.items():
            if key == "alias" or "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, _, filter_name = key.partition(",")
            row[metric if filter_name == "none" else key] = float(value)
        table[task] = row
    return table
