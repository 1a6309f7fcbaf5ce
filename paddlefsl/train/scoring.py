"""Score saved checkpoints on the fixed evaluation tasks and write their reports.

``paddlefsl eval`` is a thin shell around this module: one checkpoint
(:func:`score_checkpoint`), or every checkpoint a run kept with ``--keep-every``
(:func:`score_kept`), whose reports together are the run's learning curve on the test
tasks. A report records the checkpoint's model checksum, so a kept checkpoint that was
already scored the same way is not scored again.

Example:
    >>> import tempfile
    >>> from paddlefsl.cli import main
    >>> run = tempfile.mkdtemp()
    >>> main(["train", "--dataset", "sinusoid", "--iterations", "4", "--keep-every", "2",
    ...       "--meta-batch-size", "2", "--output", run, "--no-progress"])
    ... # doctest: +ELLIPSIS
    done: 4 iterations; ...
    0
    >>> [s.iteration for s in score_kept(run, EvalOptions(eval_tasks=5))]
    [2, 4]
    >>> [s.reused for s in score_kept(run, EvalOptions(eval_tasks=5))]  # already scored
    [True, True]

"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .builders import build_learner, build_tasks, eval_seed
from .checkpoint import (
    CHECKPOINT_DIR,
    KEPT_PREFIX,
    Checkpoint,
    CheckpointManager,
    atomic_write_json,
    checkpointed_layer,
    load_checkpoint,
)
from .config import RUNTIME_FIELDS, TrainConfig, load_config
from .errors import CheckpointError, ConfigError
from .evaluate import evaluate
from .objectives import get_objective
from .presets import PRESETS

__all__ = [
    "EvalOptions",
    "KeptScore",
    "eval_config",
    "report_dir",
    "run_folder",
    "score_checkpoint",
    "score_kept",
    "task_fields",
]

#: The training configuration fields an evaluation report repeats (what it scored).
REPORT_CONFIG = ("algorithm", "dataset", "ways", "shots", "queries", "inner_lr", "preset")

#: Configuration fields that change neither the network nor the evaluation tasks.
_IRRELEVANT = RUNTIME_FIELDS - {"eval_tasks", "data_root"}


@dataclass(frozen=True)
class EvalOptions:
    """How to evaluate: the split and what may differ from the run's configuration.

    Attributes:
        split: ``"train"``, ``"val"`` or ``"test"``.
        eval_tasks: Number of fixed tasks (``None``: the run's, 600 by default).
        inner_steps_test: Adaptation steps (``None``: the run's).
        data_root: The dataset folder, if it moved since training.
        by_step: Also report the metric before adaptation and after every step.
        progress: Show a progress bar over the tasks.

    Example:
        >>> EvalOptions(eval_tasks=100).split
        'test'

    """

    split: str = "test"
    eval_tasks: int | None = None
    inner_steps_test: int | None = None
    data_root: str | None = None
    by_step: bool = False
    progress: bool = False


@dataclass(frozen=True)
class KeptScore:
    """The evaluation report of one kept checkpoint (see :func:`score_kept`).

    Attributes:
        iteration: The checkpoint's iteration.
        path: Where its report is (``<run>/kept-NNNNNNN/eval_<split>.json``).
        report: The report, as ``paddlefsl eval`` writes it.
        reused: Whether the report was already there (same model, tasks and steps).

    """

    iteration: int
    path: Path
    report: dict[str, Any]
    reused: bool


def eval_config(source: Checkpoint | str | os.PathLike, options: EvalOptions) -> TrainConfig:
    """A checkpoint's or a run's training configuration with the options' overrides.

    Args:
        source: A loaded checkpoint, a checkpoint record (``checkpoints/*.json``, read
            without its weights) or a run folder (its ``config.json``).
        options: The overrides (task count, test steps, data folder).

    Returns:
        The validated configuration the evaluation runs with.

    Raises:
        ConfigError: no configuration (not written by ``paddlefsl train``), or an
            override is invalid.

    Example:
        >>> import tempfile, paddle
        >>> from paddlefsl.train.config import build_config
        >>> config, _ = build_config(dataset="sinusoid", eval_tasks=5)
        >>> manager = CheckpointManager(tempfile.mkdtemp())
        >>> record = manager.save(["last"], paddle.nn.Linear(1, 1), None, 0, config.to_dict())
        >>> eval_config(record, EvalOptions()).eval_tasks
        5
        >>> eval_config(record, EvalOptions(eval_tasks=20)).eval_tasks
        20

    """
    if isinstance(source, Checkpoint):
        return _config_from(source.config, source.path, options)
    path = Path(source).expanduser()
    if path.suffix == ".json" and path.is_file():
        return _config_from(_read_record(path).get("config"), path, options)
    run = run_folder(path)
    return _config_from(load_config(run).to_dict(), run, options)


def _config_from(saved: Any, where: Path, options: EvalOptions) -> TrainConfig:
    if not saved:
        raise ConfigError(
            f"{where} has no saved configuration; it was not written by 'paddlefsl train'"
        )
    values = TrainConfig.from_dict(saved).to_dict()
    for name in ("eval_tasks", "inner_steps_test", "data_root"):
        if getattr(options, name) is not None:
            values[name] = getattr(options, name)
    return TrainConfig.from_dict(values).validate()


def task_fields(config: TrainConfig, split: str) -> dict[str, Any]:
    """The fields of an evaluation report that say which tasks it scored.

    Known before any scoring, so a comparison with another report (``eval --baseline``)
    can be refused at once when the two would not score the same tasks.

    Args:
        config: The evaluation's configuration (:func:`eval_config`).
        split: ``"train"``, ``"val"`` or ``"test"``.

    Returns:
        ``split``, ``task_seed``, ``num_tasks``, ``metric`` and the ``config`` subset that
        every report repeats.

    Example:
        >>> from paddlefsl.train.config import build_config
        >>> config, _ = build_config(dataset="sinusoid", eval_tasks=5)
        >>> fields = task_fields(config, "test")
        >>> fields["num_tasks"], fields["metric"], fields["config"]["dataset"]
        (5, 'mse', 'sinusoid')

    """
    values = config.to_dict()
    return {
        "split": split,
        "task_seed": eval_seed(split),
        "num_tasks": config.eval_tasks,
        "metric": get_objective(config.task_type).metric_name,
        "config": {k: values[k] for k in REPORT_CONFIG},
    }


def report_dir(ckpt: Checkpoint) -> Path:
    """Where a checkpoint's report goes by default.

    That is its run folder (an export's folder), or ``<run>/kept-NNNNNNN`` for a kept
    checkpoint, so that scoring one never overwrites the run's own report.
    """
    tag = ckpt.record.get("tag") or ""
    return ckpt.run_dir / tag if tag.startswith(KEPT_PREFIX) else ckpt.run_dir


def score_checkpoint(
    ckpt: Checkpoint,
    options: EvalOptions,
    learner: Any = None,
    tasks: Any = None,
) -> dict[str, Any]:
    """Evaluate one checkpoint on the fixed tasks of ``options.split``.

    Args:
        ckpt: A loaded checkpoint (:func:`~paddlefsl.train.load_checkpoint`).
        options: The split and overrides.
        learner: A learner built for this configuration, to reuse (its weights are
            replaced by the checkpoint's); built when ``None``.
        tasks: The fixed tasks, to reuse; built when ``None``.

    Returns:
        The evaluation report: the :class:`~paddlefsl.train.EvalResult` fields, the
        checkpoint, its iteration and model checksum, the task seed and the setting.

    Example:
        >>> import tempfile
        >>> from paddlefsl.cli import main
        >>> from paddlefsl.train import load_checkpoint
        >>> run = tempfile.mkdtemp()
        >>> main(["train", "--dataset", "sinusoid", "--iterations", "2", "--output", run,
        ...       "--meta-batch-size", "2", "--no-progress"])  # doctest: +ELLIPSIS
        done: 2 iterations; ...
        0
        >>> report = score_checkpoint(load_checkpoint(run), EvalOptions(eval_tasks=5))
        >>> report["iteration"], report["metric"], len(report["values"])
        (2, 'mse', 5)

    """
    config = eval_config(ckpt, options)
    learner = build_learner(config) if learner is None else learner
    ckpt.load_model(checkpointed_layer(learner))  # Meta-SGD: its learning rates too
    if tasks is None:
        tasks = build_tasks(config, options.split, num_tasks=config.eval_tasks)
    result = evaluate(
        learner,
        tasks,
        config.inner_steps_test,
        config.task_type,
        progress=options.progress,
        by_step=options.by_step,
    )
    preset = PRESETS.get(config.preset or "")
    fields = task_fields(config, options.split)
    return {
        "split": options.split,
        "checkpoint": str(ckpt.path),
        "checkpoint_tag": ckpt.record.get("tag"),
        "checkpoint_sha256": (ckpt.record.get("sha256") or {}).get("model"),
        "iteration": ckpt.iteration,
        "task_seed": fields["task_seed"],
        "config": fields["config"],
        "paper": preset.paper if preset else None,
        **result.to_dict(),
    }


def _scored_alike(
    report: Any, model_sum: str | None, config: TrainConfig, options: EvalOptions
) -> bool:
    """Whether ``report`` scored the model of checksum ``model_sum`` on the tasks asked for."""
    return (
        isinstance(report, dict)
        and model_sum is not None
        and report.get("checkpoint_sha256") == model_sum
        and report.get("split") == options.split
        and report.get("task_seed") == eval_seed(options.split)
        and report.get("num_tasks") == config.eval_tasks
        and report.get("inner_steps") == config.inner_steps_test
        and (bool(report.get("by_step")) or not options.by_step)
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # missing, or a report half-written by an older version: score again


def _read_record(path: Path) -> dict[str, Any]:
    """A checkpoint record's fields; empty when it is missing or not a JSON object."""
    record = _read_json(path)
    return record if isinstance(record, dict) else {}


def run_folder(run: str | os.PathLike) -> Path:
    """The run folder named by ``run`` (the folder itself or its ``checkpoints`` folder).

    Raises:
        CheckpointError: ``run`` is a file or does not exist.

    Example:
        >>> import tempfile
        >>> run = Path(tempfile.mkdtemp())
        >>> (run / "checkpoints").mkdir()
        >>> run_folder(run / "checkpoints") == run
        True

    """
    run_dir = Path(run).expanduser()
    if run_dir.name == CHECKPOINT_DIR and not (run_dir / CHECKPOINT_DIR).is_dir():
        run_dir = run_dir.parent
    if run_dir.is_file():
        raise CheckpointError(
            f"{run_dir} is a file; the kept checkpoints are found from the run folder that "
            "holds checkpoints/"
        )
    if not run_dir.is_dir():
        raise CheckpointError(f"run folder {run_dir} does not exist")
    return run_dir


def score_kept(
    run: str | os.PathLike,
    options: EvalOptions,
    output: str | os.PathLike | None = None,
    on_start: Callable[[int], None] | None = None,
) -> Iterator[KeptScore]:
    """Evaluate every kept checkpoint of a run (``train --keep-every``), oldest first.

    Each report is written to ``<output>/kept-NNNNNNN/eval_<split>.json`` (``output``
    defaults to the run folder) as soon as it is computed, so an interrupted call
    loses at most the checkpoint it was scoring. A report already there for the same
    model (checksum), split, task count and steps is reused, not recomputed.

    Args:
        run: The run folder, or its ``checkpoints`` folder.
        options: The split and overrides, as for :func:`score_checkpoint`.
        output: The folder that holds the ``kept-NNNNNNN`` report folders.
        on_start: Called with the iteration before a checkpoint is scored (not for a
            reused report), e.g. to show progress.

    Yields:
        A :class:`KeptScore` per kept checkpoint.

    Raises:
        CheckpointError: ``run`` is not a run folder or kept no checkpoint.

    """
    run_dir = run_folder(run)
    records = CheckpointManager(run_dir).kept()
    if not records:
        raise CheckpointError(
            f"{run_dir} has no kept checkpoints (checkpoints/{KEPT_PREFIX}*.json): train with "
            "--keep-every N to keep every N-th one (a resume may add it)"
        )
    root = Path(output) if output is not None else run_dir
    setting: dict[str, Any] | None = None
    learner: Any = None
    tasks: Any = None
    for record in records:
        # The record alone tells whether a report is still valid: a reused report reads
        # no weights (--follow passes over every kept checkpoint again and again).
        meta = _read_record(record)
        config = _config_from(meta.get("config"), record, options)
        path = root / record.stem / f"eval_{options.split}.json"
        existing = _read_json(path)
        model_sum = (meta.get("sha256") or {}).get("model")
        if _scored_alike(existing, model_sum, config, options):
            yield KeptScore(int(meta["iteration"]), path, existing, reused=True)
            continue
        ckpt = load_checkpoint(record)  # checks the record and the files' checksums
        if on_start is not None:
            on_start(ckpt.iteration)
        # A resume may change the runtime fields only, so the kept checkpoints of a run
        # share one learner and one task list (the dataset is read once); of those fields
        # the task count and the data folder decide the tasks.
        key = {k: v for k, v in config.to_dict().items() if k not in _IRRELEVANT}
        if key != setting:
            setting = key
            learner = build_learner(config)
            tasks = build_tasks(config, options.split, num_tasks=config.eval_tasks)
        report = score_checkpoint(ckpt, options, learner=learner, tasks=tasks)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, report)
        yield KeptScore(ckpt.iteration, path, report, reused=False)
