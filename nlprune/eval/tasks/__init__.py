"""Zero-shot tasks read from local files, as lm-evaluation-harness task configs.

``configs/`` holds one lm-eval task config per task, with lm-eval's own prompts, targets,
metrics, output types and splits for that task name; each reads its rows through
``local_dataset`` (a ``custom_dataset`` in lm-eval's terms) from a task data folder laid
out as the shared one (``DIR/boolq/val.jsonl.gz``, ...), never from the hub.

    from nlprune.eval.tasks import task_manager
    manager = task_manager("/work/shared/data/tasks")   # lm_eval.tasks.TaskManager
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from nlprune.eval.tasks import readers
from nlprune.eval.tasks.readers import Row, TaskDataError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DATA_DIR_ENV = "NLPRUNE_DATA_DIR"
# The task config's metadata key that carries the task data folder to ``local_dataset``.
DATA_DIR_KEY = "nlprune_task_data_dir"


@dataclasses.dataclass(frozen=True)
class LocalTask:
    name: str  # lm-eval's task name
    split: str  # the split lm-eval scores for this task
    reader: Callable[[Path], tuple[list[Row], list[Path]]]  # the task's folder -> (rows, files read)


LOCAL_TASKS: dict[str, LocalTask] = {
    t.name: t
    for t in (
        LocalTask("boolq", "validation", readers.read_boolq),
        LocalTask("rte", "validation", readers.read_rte),
        LocalTask("hellaswag", "validation", readers.read_hellaswag),
        LocalTask("winogrande", "validation", readers.read_winogrande),
        LocalTask("arc_easy", "test", readers.read_arc_easy),
        LocalTask("arc_challenge", "test", readers.read_arc_challenge),
        LocalTask("openbookqa", "test", readers.read_openbookqa),
        LocalTask("piqa", "validation", readers.read_piqa),
        LocalTask("lambada_openai", "test", readers.read_lambada_openai),
    )
}
# The zero-shot suite pruning papers (Wanda, SparseGPT) report.
DEFAULT_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "openbookqa", "piqa", "lambada_openai")


@dataclasses.dataclass
class TaskDocs:
    task: str
    split: str
    rows: list[Row]
    files: list[Path]


def resolve_task_data_dir(task_data_dir: str | os.PathLike[str] | None = None, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The task data folder: ``task_data_dir``, else ``data_dir/tasks``, else
    ``$NLPRUNE_DATA_DIR/tasks``. Tasks are read from local files only (no hub)."""
    if task_data_dir is not None and str(task_data_dir) != "":
        path, origin = Path(task_data_dir).expanduser(), "--task-data-dir"
    elif data_dir is not None and str(data_dir) != "":
        path, origin = Path(data_dir).expanduser() / "tasks", "--data-dir"
    elif os.environ.get(DATA_DIR_ENV, "").strip():
        path, origin = Path(os.environ[DATA_DIR_ENV].strip()).expanduser() / "tasks", f"${DATA_DIR_ENV}"
    else:
        raise TaskDataError(
            f"no task data folder: pass --task-data-dir DIR (laid out as DIR/boolq/val.jsonl.gz, ...) or set "
            f"{DATA_DIR_ENV} to a folder with a tasks/ subfolder; nlprune reads zero-shot tasks from local files only."
        )
    if not path.is_dir():
        raise TaskDataError(f"task data folder {path} (from {origin}) does not exist.")
    return path.resolve()


def parse_task_list(tasks: str | Sequence[str]) -> list[str]:
    """'boolq,rte' or a list of names -> names, in order, without repeats; unknown names fail."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks)]
    names = list(dict.fromkeys(t for t in names if t))
    if not names:
        raise TaskDataError("no task named: give --tasks a comma-separated list, e.g. boolq,rte.")
    return names


def check_known(name: str, data_dir: Path) -> LocalTask:
    if name not in LOCAL_TASKS:
        raise TaskDataError(
            f"nlprune has no local data for task {name!r} (it reads tasks from {data_dir}, never the hub); "
            f"tasks it knows: {', '.join(LOCAL_TASKS)}."
        )
    return LOCAL_TASKS[name]


_DOCS_CACHE: dict[tuple[str, str, tuple[tuple[str, int, int], ...]], TaskDocs] = {}


def load_task_docs(name: str, data_dir: str | os.PathLike[str]) -> TaskDocs:
    """The rows of task ``name`` from ``data_dir/<name>/``, as lm-eval's task expects them;
    cached by the files' paths, sizes and modification times."""
    data_dir = Path(data_dir)
    task = check_known(name, data_dir)
    folder = data_dir / task.name
    if not folder.is_dir():
        raise TaskDataError(
            f"task {name!r}: folder {folder} not found (the task data folder {data_dir} has no {task.name}/)."
        )
    stamp = tuple(
        (str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.is_file()
    )
    key = (name, str(folder.resolve()), stamp)
    if key not in _DOCS_CACHE:
        rows, files = task.reader(folder)
        _DOCS_CACHE[key] = TaskDocs(name, task.split, rows, files)
    return _DOCS_CACHE[key]


def local_dataset(local_task: str, **metadata: Any) -> dict[str, Any]:
    """lm-eval's ``custom_dataset`` hook: {split: datasets.Dataset} of a local task.

    lm-eval calls it with the task config's metadata (which carries the data folder under
    ``DATA_DIR_KEY``) and its ``dataset_kwargs`` (``local_task``)."""
    import datasets

    if DATA_DIR_KEY not in metadata:
        raise TaskDataError(f"task {local_task!r}: no task data folder; load tasks through nlprune.eval.tasks.task_manager.")
    docs = load_task_docs(local_task, metadata[DATA_DIR_KEY])
    return {docs.split: datasets.Dataset.from_list(docs.rows)}


def task_manager(data_dir: str | os.PathLike[str]):
    """An lm-eval TaskManager that knows only nlprune's local task configs, reading ``data_dir``."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(CONFIG_DIR), include_defaults=False, metadata={DATA_DIR_KEY: str(data_dir)})
