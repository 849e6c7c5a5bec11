"""Offline lm-eval tasks shipped with hierarchos, built from the bundled plays.

Each `*.yaml` here is an lm-eval task config whose `dataset_kwargs.data_files` name JSONL files
in this folder by relative path; `local_task_config(name)` returns the config as a dict with
those paths made absolute (lm-eval resolves data files against the working directory), ready for
`TaskManager.load` / `simple_evaluate(tasks=[...])`. `scripts/build_eval_tasks.py` rebuilds the data.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from ..errors import HierarchosError

TASKS_DIR = Path(__file__).resolve().parent


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
