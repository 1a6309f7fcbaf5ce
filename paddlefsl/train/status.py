"""Where a run stands: read from its folder, never written to (``paddlefsl status``)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .._filelock import is_locked
from .checkpoint import (
    CHECKPOINT_DIR,
    EXPORT_RECORD_FILE,
    KEPT_PREFIX,
    CheckpointManager,
)
from .config import CONFIG_FILE
from .errors import ConfigError
from .metrics import METRICS_FILE, read_metrics
from .runlock import LOCK_FILE

__all__ = ["RunStatus", "find_runs", "format_status", "kept_reports", "run_status"]

#: Training rows averaged for the "recent" loss and metric.
RECENT_ROWS = 10


@dataclass
class RunStatus:
    """What a run folder says about its run.

    Attributes:
        run: The run folder.
        state: ``"training"`` (a process holds the run's lock), ``"finished"`` (the last
            checkpoint reached the target), ``"stopped"`` (neither: resume it),
            ``"non-finite"`` (stopped on a NaN / inf loss), ``"exported"`` (a folder of
            ``paddlefsl export``), ``"stopped before its first checkpoint"`` or
            ``"not started"``.
        pid: The training process, when ``state`` is ``"training"``.
        iteration: Iteration of the last checkpoint (what a resume continues from).
        logged_iteration: Iteration of the last training row of ``metrics.jsonl``.
        target: The ``--iterations`` of the run.
        warm_start_from: Iterations of the weights a ``--init-from`` run started from.
        iters_per_sec: The rate of the last training row.
        seconds_left: ``(target - logged_iteration) / iters_per_sec`` while training.
        elapsed: Seconds of training so far (resumes included, pauses excluded).
        checkpoint_age: Seconds since the last checkpoint was written.
        metric: ``"accuracy"`` or ``"mse"``.
        recent: Mean ``loss`` and metric of the last training rows (up to
            :data:`RECENT_ROWS`), with ``rows`` and the iterations they span.
        last_val: The last validation row.
        best: ``{"iteration", "value"}`` of the best validation so far (the ``best``
            checkpoint).
        test: ``{"iteration", "metric", "mean", "ci95", "num_tasks"}`` of the
            ``eval_test.json`` that ``paddlefsl eval`` wrote into the run folder, if any.
        kept: Iterations of the checkpoints kept for good (``--keep-every``).
        kept_test: Test results of the kept checkpoints scored so far (``paddlefsl eval
            --which kept`` writes ``<run>/kept-NNNNNNN/eval_test.json``): ``scored``,
            and ``last`` and ``best`` as in ``test``.
        message: The error of a ``non_finite`` stop.

    """

    run: str
    state: str
    pid: int | None = None
    iteration: int | None = None
    logged_iteration: int | None = None
    target: int | None = None
    warm_start_from: int | None = None
    iters_per_sec: float | None = None
    seconds_left: float | None = None
    elapsed: float | None = None
    checkpoint_age: float | None = None
    metric: str | None = None
    recent: dict[str, Any] = field(default_factory=dict)
    last_val: dict[str, Any] | None = None
    best: dict[str, Any] | None = None
    test: dict[str, Any] | None = None
    kept: list[int] = field(default_factory=list)
    kept_test: dict[str, Any] | None = None
    message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The status as a JSON-ready dict."""
        return asdict(self)


def run_status(run_dir: str | os.PathLike, now: float | None = None) -> RunStatus:
    """Read where the run in ``run_dir`` stands; nothing in the folder is written.

    Args:
        run_dir: A folder written by ``paddlefsl train`` (or :class:`MetaTrainer` with an
            output folder).
        now: The current time (seconds since the epoch; default ``time.time()``).

    Raises:
        ConfigError: ``run_dir`` is not a run folder.

    Example:
        >>> import tempfile
        >>> from paddlefsl.train import MetricsLog
        >>> run = tempfile.mkdtemp()
        >>> MetricsLog(run).write({"iteration": 0, "event": "start", "target": 100})
        >>> run_status(run).state
        'not started'

    """
    run = Path(run_dir)
    metrics_path, config_path = run / METRICS_FILE, run / CONFIG_FILE
    if not run.is_dir() or not is_run_folder(run):
        raise ConfigError(
            f"{run} is not a run folder (no {METRICS_FILE} or {CONFIG_FILE}); give the "
            f"--output folder of 'paddlefsl train'"
        )
    now = time.time() if now is None else now
    rows = read_metrics(metrics_path)
    config = _read_json(config_path) or {}
    record = _read_json(run / CHECKPOINT_DIR / "last.json") or {}
    exported = False
    if not record:  # a folder of `paddlefsl export` holds its record at the top
        export = _read_json(run / EXPORT_RECORD_FILE) or {}
        exported = "exported_from" in export
        record = export if exported else {}
    status = RunStatus(run=str(run), state="not started")
    kept = (path.stem.removeprefix(KEPT_PREFIX) for path in CheckpointManager(run).kept())
    status.kept = [int(number) for number in kept if number.isdigit()]

    starts = [r for r in rows if r.get("event") == "start"]
    status.target = starts[-1].get("target") if starts else config.get("iterations")
    warm = next((r for r in rows if r.get("event") == "warm_start"), None)
    status.warm_start_from = warm.get("from_iteration") if warm else None
    if record:
        state = record.get("state") or {}
        status.iteration = int(record.get("iteration", 0))
        status.elapsed = state.get("elapsed")
        saved = _checkpoint_time(record.get("saved_at"))
        status.checkpoint_age = None if saved is None else max(0.0, now - saved)
        if state.get("best_iteration") is not None:
            status.best = {"iteration": state["best_iteration"], "value": state.get("best_metric")}

    train = [r for r in rows if r.get("split") == "train"]
    if train:
        last = train[-1]
        status.logged_iteration = int(last["iteration"])
        status.iters_per_sec = last.get("iters_per_sec")
        status.elapsed = max(status.elapsed or 0.0, float(last.get("elapsed", 0.0)))
        status.metric = next((k for k in ("accuracy", "mse") if k in last), None)
        recent = train[-RECENT_ROWS:]
        status.recent = {
            "rows": len(recent),
            "from_iteration": int(recent[0]["iteration"]),
            "loss": _mean(r.get("loss") for r in recent),
        }
        if status.metric:
            status.recent[status.metric] = _mean(r.get(status.metric) for r in recent)
    vals = [r for r in rows if r.get("split") == "val"]
    status.last_val = vals[-1] if vals else None
    status.test = _test_summary(_read_json(run / "eval_test.json"))
    scored = [_test_summary(report) for report in kept_reports(run)]
    if scored:
        lower_is_better = scored[-1]["metric"] == "mse"
        best = (min if lower_is_better else max)(scored, key=lambda t: t["mean"])
        status.kept_test = {"scored": len(scored), "last": scored[-1], "best": best}

    pid = _training_pid(run)
    events = [r for r in rows if "event" in r]
    if pid is not None:
        status.state, status.pid = "training", pid
        done = status.logged_iteration or status.iteration or 0
        if status.target and status.iters_per_sec:
            status.seconds_left = max(0, status.target - done) / status.iters_per_sec
    elif events and events[-1].get("event") == "non_finite":
        status.state, status.message = "non-finite", events[-1].get("message")
    elif exported:
        status.state = "exported"
    elif status.iteration is not None:
        finished = status.target is not None and status.iteration >= status.target
        status.state = "finished" if finished else "stopped"
    elif status.logged_iteration is not None:
        status.state = "stopped before its first checkpoint"
    return status


def is_run_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a run (or an export): a metrics file or a configuration."""
    return (folder / METRICS_FILE).is_file() or (folder / CONFIG_FILE).is_file()


def find_runs(folder: str | os.PathLike) -> list[Path]:
    """``folder`` itself if it is a run folder, else the run folders below it, sorted.

    Folders inside a run folder (its ``evals/``, ``checkpoints/``) are not searched.

    Raises:
        ConfigError: ``folder`` is neither a run folder nor holds one.

    Example:
        >>> import tempfile
        >>> from paddlefsl.train import MetricsLog
        >>> root = Path(tempfile.mkdtemp())
        >>> MetricsLog(root / "b" / "run").write({"iteration": 0, "event": "start"})
        >>> [p.relative_to(root).as_posix() for p in find_runs(root)]
        ['b/run']

    """
    root = Path(folder)
    if root.is_dir() and is_run_folder(root):
        return [root]
    found: list[Path] = []
    if root.is_dir():
        for path, dirs, _ in os.walk(root):
            if is_run_folder(Path(path)):
                found.append(Path(path))
                dirs.clear()  # nothing of interest inside a run
            dirs.sort()
    if not found:
        raise ConfigError(
            f"{root} is not a run folder and holds none (no {METRICS_FILE} or {CONFIG_FILE} "
            f"in it or below); give the --output folder of 'paddlefsl train'"
        )
    return sorted(found)


def format_status(status: RunStatus) -> str:
    """A few human-readable lines for :func:`run_status`'s result.

    Example:
        >>> print(format_status(RunStatus(run="runs/x", state="not started", target=100)))
        runs/x: not started (target 100 iterations)

    """
    head = {
        "training": f"training (pid {status.pid})" if status.pid else "training",
        "stopped": "stopped; continue with: paddlefsl train --resume --output " + status.run,
        "non-finite": "stopped on a non-finite loss; the last good checkpoint is kept",
        "exported": "an export (weights only): evaluate it, or start a new run from it with "
        "--init-from",
        "stopped before its first checkpoint": "stopped before its first checkpoint: "
        "nothing to resume; start it again",
    }.get(status.state, status.state)
    if status.iteration is None and status.logged_iteration is None:
        target = f" (target {status.target:,} iterations)" if status.target else ""
        return f"{status.run}: {head}{target}"
    lines = [f"{status.run}: {head}"]
    # while training, the log is ahead of the last checkpoint; otherwise the checkpoint
    # is where a resume starts
    order = (status.logged_iteration, status.iteration)
    if status.state != "training":
        order = order[::-1]
    done = next(i for i in order if i is not None)
    progress = f"iteration {done:,}"
    if status.target:
        progress += f" of {status.target:,} ({100 * done / status.target:.0f}%)"
    if status.warm_start_from:
        progress += f", warm-started from {status.warm_start_from:,} iterations"
    if status.iters_per_sec:
        progress += f"; {status.iters_per_sec:.2f} it/s"
    if status.seconds_left is not None:
        progress += f", about {_duration(status.seconds_left)} to go"
    lines.append("  " + progress)
    if status.recent:
        r = status.recent
        text = f"  train (last {r['rows']} log rows, from iteration {r['from_iteration']:,}): "
        text += f"loss {_value('loss', r['loss'])}"
        if status.metric:
            text += f", {status.metric} {_value(status.metric, r[status.metric])}"
        lines.append(text)
    if status.last_val is not None:
        v = status.last_val
        metric = next((k for k in ("accuracy", "mse") if k in v), None)
        text = f"  validation at {v['iteration']:,}"
        if metric:
            text += f": {metric} {_value(metric, v[metric], v.get('ci95'))}"
        if status.best and status.best.get("value") is not None:
            text += f"; best {_value(metric, status.best['value'])} at {status.best['iteration']:,}"
        lines.append(text)
    if status.test is not None:
        t = status.test
        lines.append(
            f"  test ({t['num_tasks']} tasks, eval_test.json): {t['metric']} "
            f"{_value(t['metric'], t['mean'], t['ci95'])} at iteration {t['iteration']:,}"
        )
    if status.kept_test is not None:
        last, best = status.kept_test["last"], status.kept_test["best"]
        text = (
            f"  test of kept checkpoints ({status.kept_test['scored']} of {len(status.kept)} "
            f"scored, {last['num_tasks']} tasks): {last['metric']} "
            f"{_value(last['metric'], last['mean'], last['ci95'])} at {last['iteration']:,}"
        )
        if best is not last:
            text += f"; best {_value(best['metric'], best['mean'], best['ci95'])} at "
            text += f"{best['iteration']:,}"
        lines.append(text)
    saved = []
    if status.iteration is not None:
        saved.append(f"last checkpoint at iteration {status.iteration:,}")
        if status.checkpoint_age is not None:
            saved[-1] += f", written {_duration(status.checkpoint_age)} ago"
    if status.kept:
        first, last = status.kept[0], status.kept[-1]
        span = f"iteration {first:,}" if first == last else f"iterations {first:,}-{last:,}"
        saved.append(f"{len(status.kept)} kept ({span})")
    if status.elapsed:
        saved.append(f"{_duration(status.elapsed)} of training")
    if saved:
        lines.append("  " + "; ".join(saved))
    if status.message:
        lines.append(f"  {status.message}")
    return "\n".join(lines)


def _training_pid(run: Path) -> int | None:
    """The pid in ``<run>/.lock`` if a process holds the lock, else None."""
    lock = run / LOCK_FILE
    if not lock.is_file() or not is_locked(lock):
        return None
    text = lock.read_text().strip()
    return int(text) if text.isdigit() else 0  # held, by a process that wrote no pid


def kept_reports(run: str | os.PathLike, split: str = "test") -> list[dict[str, Any]]:
    """The evaluation reports written for a run's kept checkpoints so far, oldest first.

    ``paddlefsl eval --which kept`` writes them to ``<run>/kept-NNNNNNN/eval_<split>.json``;
    nothing is scored here (:func:`paddlefsl.train.score_kept` does that).

    Example:
        >>> kept_reports("runs/does-not-exist")
        []

    """
    run_dir = Path(run).expanduser()
    reports = []
    for record in CheckpointManager(run_dir).kept():
        report = _read_json(run_dir / record.stem / f"eval_{split}.json")
        if _test_summary(report) is not None:
            reports.append(report)
    return reports


def _test_summary(report: dict[str, Any] | None) -> dict[str, Any] | None:
    """The headline of an evaluation report (iteration, metric, mean, ci95, tasks)."""
    if not isinstance(report, dict) or not {"iteration", "metric", "mean", "ci95"} <= set(report):
        return None
    return {k: report.get(k) for k in ("iteration", "metric", "mean", "ci95", "num_tasks")}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _checkpoint_time(stamp: str | None) -> float | None:
    """Seconds since the epoch of a record's ``saved_at`` (``%Y-%m-%dT%H:%M:%S%z``)."""
    try:
        return datetime.strptime(stamp or "", "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except ValueError:
        return None


def _mean(values: Any) -> float | None:
    numbers = [float(v) for v in values if isinstance(v, (int, float))]
    return sum(numbers) / len(numbers) if numbers else None


def _value(metric: str | None, value: float | None, ci95: float | None = None) -> str:
    if value is None:
        return "—"
    if metric == "accuracy":
        text = f"{100 * value:.2f}%"
        return text if ci95 is None else f"{100 * value:.2f} ± {100 * ci95:.2f}%"
    text = f"{value:.4g}"
    return text if ci95 is None else f"{text} ± {ci95:.2g}"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
