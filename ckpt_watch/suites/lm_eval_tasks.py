"""Building lm-evaluation-harness tasks for the `lm_eval` suite: names, YAML files, folders.

lm-eval's own TaskIndex / TaskFactory do the work; this module only decides what to index
(lm-eval's ~15k built-in YAMLs are indexed only when a task is given by a name no given
folder defines: that index costs seconds and is kept for the process), resolves relative
`dataset_kwargs.data_files` of a task YAML against the YAML's own folder, applies the
suite's per-task `overrides`, and reports a task that cannot be built (its data cannot be
loaded, its name is unknown) as `TaskLoadError` naming the task and the reason.

Imported only by the `lm_eval` suite: `lm_eval` is an optional dependency.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EXTRA_HINT = "pip install 'ckpt-watch[lm-eval]'"


class LmEvalMissing(RuntimeError):
    """lm-evaluation-harness is not installed."""


class TaskLoadError(ValueError):
    """A task (by its spec in `tasks`) could not be built: unknown name, bad YAML, data not loadable."""

    def __init__(self, spec: str, reason: str):
        super().__init__(f"task {spec!r}: {reason}")
        self.spec = spec
        self.reason = reason


def require_lm_eval() -> str:
    """lm-eval's version; LmEvalMissing naming the extra when it is not installed."""
    try:
        import lm_eval
    except ImportError as exc:
        raise LmEvalMissing(
            f"suite type lm_eval needs lm-evaluation-harness, which is not installed ({exc}): {EXTRA_HINT}"
        ) from None
    return str(lm_eval.__version__)


@dataclass
class BuiltTasks:
    """Top-level Task/Group objects, ready for `simple_evaluate(tasks=...)`, and what we know of them."""

    items: list[Any]
    leaves: dict[str, Any]  # leaf task name → Task
    n_docs: dict[str, int] = field(default_factory=dict)

    def output_types(self) -> dict[str, str]:
        return {name: str(task.get_config("output_type")) for name, task in self.leaves.items()}


@functools.cache
def _task_index(include_defaults: bool, folders: tuple[str, ...]) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=include_defaults, include_path=list(folders) or None)


def _folder_index(folder: Path) -> dict[str, Any]:
    from lm_eval.tasks._index import TaskIndex

    return TaskIndex().build([folder])


@functools.cache
def _builtin_folders(names: tuple[str, ...]) -> tuple[str, ...] | None:
    """Folders of lm-eval's built-in YAMLs that define these task / group names (a text scan,
    ~10x cheaper than indexing every YAML); None when a name is not found that way (a tag)."""
    import lm_eval

    root = Path(lm_eval.__file__).parent / "tasks"
    pats = {n: re.compile(rf"^\s*(?:task|group):\s*['\"]?{re.escape(n)}['\"]?\s*$", re.M) for n in names}
    found: dict[str, set[str]] = {}
    for path in root.rglob("*.yaml"):
        text = path.read_text(encoding="utf-8", errors="ignore")
        for name, pat in pats.items():
            if name in text and pat.search(text):
                found.setdefault(name, set()).add(str(path.parent))
    if set(found) != set(names):
        return None
    return tuple(sorted(set().union(*found.values())))


def _index_for(specs: list[str]) -> Any:
    """A TaskManager indexing the given folders, plus the built-in folders that define the
    named tasks (all of lm-eval's built-ins for a group or tag name)."""
    folders = tuple(str(Path(s).resolve()) for s in specs if Path(s).is_dir())
    names = [s for s in specs if not Path(s).exists()]
    local: set[str] = set()
    for folder in folders:
        local.update(_folder_index(Path(folder)))
    missing = tuple(sorted(n for n in names if n not in local))
    if not missing:
        return _task_index(False, folders)
    builtin = _builtin_folders(missing)
    if builtin is not None:
        from lm_eval.tasks._index import Kind

        narrow = _task_index(False, tuple(sorted(set(folders) | set(builtin))))
        # a task needs nothing else from the index; a group's children may live anywhere
        if all(n in narrow.task_index and narrow.task_index[n].kind in (Kind.TASK, Kind.PY_TASK) for n in missing):
            return narrow
    return _task_index(True, folders)


def _entries(spec: str, index: dict[str, Any]) -> list[Any]:
    from lm_eval.tasks._index import Kind, TaskIndex

    path = Path(spec)
    if path.is_file():
        entry = TaskIndex.entry_from_path(path)
        if entry is None:
            raise TaskLoadError(spec, "the YAML defines no `task` or `group`")
        return [entry]
    if path.is_dir():
        found = [e for e in _folder_index(path).values() if e.kind in (Kind.TASK, Kind.PY_TASK)]
        if not found:
            raise TaskLoadError(spec, "the folder defines no task")
        return sorted(found, key=lambda e: e.name)
    if spec not in index:
        raise TaskLoadError(spec, "not an lm-eval task, group or tag name, nor an existing YAML file or folder")
    return [index[spec]]


def _resolve_data_files(value: Any, base: Path) -> Any:
    """Relative local paths in `data_files` (str, list or split → str/list) against `base`."""
    if isinstance(value, dict):
        return {k: _resolve_data_files(v, base) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_data_files(v, base) for v in value]
    if isinstance(value, str) and "://" not in value and not Path(value).is_absolute():
        candidate = base / value
        if candidate.exists() or any(base.glob(value)):
            return str(candidate)
    return value


def _yaml_overrides(entry: Any) -> dict[str, Any]:
    """`dataset_kwargs` with relative data_files resolved against the task YAML's folder."""
    if entry.yaml_path is None:
        return {}
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(entry.yaml_path, resolve_func=False, recursive=True)
    kwargs = cfg.get("dataset_kwargs")
    if not isinstance(kwargs, dict) or "data_files" not in kwargs:
        return {}
    fixed = dict(kwargs, data_files=_resolve_data_files(kwargs["data_files"], Path(entry.yaml_path).parent))
    return {"dataset_kwargs": fixed} if fixed != kwargs else {}


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def build_tasks(specs: list[str], overrides: dict[str, dict[str, Any]] | None = None) -> BuiltTasks:
    """Build every task of `specs` (names, YAML paths, folders): its dataset is loaded here."""
    require_lm_eval()
    return _build(specs, overrides or {}, _index_for(specs))


def _build(specs: list[str], overrides: dict[str, dict[str, Any]], manager: Any) -> BuiltTasks:
    from lm_eval.api.group import Group
    from lm_eval.tasks._factory import TaskFactory

    index = manager.task_index
    factory = TaskFactory()
    items: list[Any] = []
    named: set[str] = set()
    for spec in specs:
        for entry in _entries(spec, index):
            named.add(entry.name)
            extra = {**_yaml_overrides(entry), **copy.deepcopy(overrides.get(entry.name, {}))}
            try:
                built = factory.build(entry, overrides=extra or None, registry=index)
            except Exception as exc:  # datasets, jinja, yaml and hub errors have many types
                raise TaskLoadError(spec if spec == entry.name else f"{spec} ({entry.name})", _reason(exc)) from exc
            items.extend(built if isinstance(built, list) else [built])
    leaves: dict[str, Any] = {}
    for item in items:
        for task in item.get_all_tasks() if isinstance(item, Group) else [item]:
            leaves[task.task_name] = task
    unknown = set(overrides) - named - set(leaves)
    if unknown:
        raise TaskLoadError(", ".join(sorted(unknown)), "named in overrides but not among the tasks")
    n_docs = {}
    for name, task in leaves.items():
        try:
            n_docs[name] = len(task.eval_docs)
        except Exception as exc:
            raise TaskLoadError(name, _reason(exc)) from exc
    return BuiltTasks(items, leaves, n_docs)


def subsample_ids(n_docs: dict[str, int], limit: int | None, seed: int) -> dict[str, list[int]] | None:
    """lm-eval `samples`: a fixed-seed subset of doc ids per task (in document order), as the
    arc_challenge suite draws its `n` questions; None when every task is evaluated whole."""
    if limit is None:
        return None
    picked = {name: sorted(random.Random(seed).sample(range(n), limit)) for name, n in n_docs.items() if limit < n}
    return picked or None


def _local_files(value: Any) -> list[Path]:
    if isinstance(value, dict):
        return [p for v in value.values() for p in _local_files(v)]
    if isinstance(value, list):
        return [p for v in value for p in _local_files(v)]
    if isinstance(value, str) and Path(value).is_file():
        return [Path(value)]
    return []


def task_fingerprint(built: BuiltTasks) -> str:
    """Hash of every task's full config (prompts, metrics, filters, data source) and of the
    content of its local data files: editing a task YAML or its data re-queues finished steps."""
    h = hashlib.sha256()
    for name in sorted(built.leaves):
        cfg = built.leaves[name].dump_config()
        meta = dict(cfg.get("metadata") or {})
        meta.pop("config_source", None)  # where lm-eval is installed is not what the task measures
        cfg["metadata"] = meta
        h.update(json.dumps({name: cfg}, sort_keys=True, default=str).encode())
        for path in _local_files((cfg.get("dataset_kwargs") or {}).get("data_files")):
            h.update(path.read_bytes())
    return h.hexdigest()[:12]
