"""``gpt2-triton eval``: lm-evaluation-harness tasks through the ``gpt2-triton`` backend, lm-eval's table printed.

Tasks are built before the model loads, one at a time, so that a dataset that is neither cached nor reachable is
one error naming it (and how to get it) rather than a traceback from deep inside ``datasets``.
"""

from __future__ import annotations

import json
from pathlib import Path


class MissingDataset(ValueError):
    """A task's dataset is neither in the local cache nor downloadable from here."""


def how_to_get(path: str, name: str | None) -> str:
    """The one command that caches a Hugging Face dataset, to run where huggingface.co is reachable."""
    args = f"'{path}'" + (f", '{name}'" if name else "")
    return (
        f'download it once with network access (python -c "import datasets; datasets.load_dataset({args})") and '
        "copy ~/.cache/huggingface (or $HF_HOME) here; with HF_DATASETS_OFFLINE=1 the cache is used without trying "
        "the network"
    )


def _dataset_of(manager, task: str) -> tuple[str, str | None]:
    """The ``dataset_path`` / ``dataset_name`` a task's YAML names (a group or tag: what the error said)."""
    entry = manager.task_index.get(task)
    cfg = (entry.cfg or {}) if entry is not None else {}
    return str(cfg.get("dataset_path", "")), cfg.get("dataset_name")


def load_tasks(names: list[str], include_path: str | None = None) -> list:
    """lm-eval Task / Group objects for ``names`` (tasks, groups or tags), datasets loaded; ``ValueError`` for an
    unknown name, :class:`MissingDataset` for a dataset that cannot be had."""
    from lm_eval.tasks import TaskManager

    manager = None
    if include_path is not None:  # indexing lm-eval's own few thousand YAMLs takes ~10 s: only when needed
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if not all(n in manager.task_index for n in names):
            manager = None
    manager = manager or TaskManager(include_path=include_path)
    unknown = [n for n in names if n not in manager.task_index and not Path(n).is_file()]
    if unknown:
        raise ValueError(f"unknown task {unknown[0]!r} (lm-eval's task names, or --include-path for local YAMLs)")
    built = []
    for name in names:
        try:
            loaded = manager.load([name])
        except (OSError, ConnectionError) as e:  # datasets' not-found and offline errors are OSErrors
            path, config = _dataset_of(manager, name)
            what = f"dataset {path}" + (f" ({config})" if config else "") if path else "its dataset"
            reason = " ".join(str(e).split())[:200]
            advice = how_to_get(path or "...", config)
            raise MissingDataset(f"task {name}: {what} is not available ({reason}); {advice}") from None
        built += [loaded["groups"][name]] if name in loaded["groups"] else list(loaded["tasks"].values())
    return built


def run(tasks: list, model_args: dict, batch_size: int | None, limit: float | None, num_fewshot: int | None,
        seed: int) -> dict:  # fmt: skip
    """``lm_eval.simple_evaluate`` with the gpt2-triton backend on already loaded tasks."""
    import lm_eval

    import engine.evaluation  # noqa: F401 (registers gpt2-triton)

    return lm_eval.simple_evaluate(
        model="gpt2-triton",
        model_args=model_args,
        tasks=tasks,
        batch_size=batch_size,
        limit=limit,
        num_fewshot=num_fewshot,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )


def print_tables(results: dict) -> None:
    from lm_eval.utils import make_table

    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))


def write_results(results: dict, path: str) -> None:
    """Results, configs and versions as JSON (lm-eval's own conversion of what JSON cannot hold)."""
    from lm_eval.utils import handle_non_serializable

    keep = {k: v for k, v in results.items() if k != "samples"}
    Path(path).write_text(json.dumps(keep, indent=2, default=handle_non_serializable) + "\n", encoding="utf-8")
