"""The meta-training loop over the public learner API (``clone`` / ``adapt`` / call)."""

from __future__ import annotations

import functools
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paddle

from ..data import MetaBatchLoader
from .checkpoint import (
    CheckpointManager,
    atomic_write_json,
    checkpointed_layer,
    kept_tag,
    load_checkpoint,
)
from .config import CONFIG_FILE, MODEL_FIELDS, config_diff, runtime_fields
from .distributed import Group, current_group
from .errors import CheckpointError, ConfigMismatchError, NonFiniteLossError
from .evaluate import EvalResult, evaluate
from .metrics import MetricsLog
from .objectives import Objective, adapt, get_objective, infer_task_type
from .rng import forked_rng, restore_rng_state
from .runlock import RunLock

__all__ = ["FitResult", "MetaTrainer"]


@dataclass
class FitResult:
    """How :meth:`MetaTrainer.fit` ended.

    Attributes:
        status: ``"completed"`` or ``"interrupted"`` (SIGINT / SIGTERM).
        iteration: Completed meta-iterations.
        signal: The signal number that interrupted the run, if any.
        train: The last logged training row (mean loss and metric).
        val: The last validation result.
        best_metric: Best validation metric so far (``None`` without validation).
        best_iteration: Iteration of the best checkpoint.
        checkpoint: Path of the last checkpoint record written, if any.

    """

    status: str
    iteration: int
    signal: int | None = None
    train: dict[str, float] = field(default_factory=dict)
    val: EvalResult | None = None
    best_metric: float | None = None
    best_iteration: int | None = None
    checkpoint: str | None = None


class _Window:
    """Running means of loss and metric since the last log line."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss = self.metric = 0.0
        self.count = 0
        self.start = time.perf_counter()

    def add(self, loss: float, metric: float) -> None:
        self.loss += loss
        self.metric += metric
        self.count += 1

    def means(self) -> tuple[float, float, float]:
        n = max(self.count, 1)
        rate = self.count / max(time.perf_counter() - self.start, 1e-9)
        return self.loss / n, self.metric / n, rate


def _holding_run_folder(method: Any) -> Any:
    """Run a method that writes ``output_dir`` under the folder's :class:`RunLock`.

    Nested calls (``fit`` saving a checkpoint) keep the lock taken by the outer one.
    """

    @functools.wraps(method)
    def wrapper(self: MetaTrainer, *args: Any, **kwargs: Any) -> Any:
        lock = self._run_lock
        if lock is None or lock.held:
            return method(self, *args, **kwargs)
        lock.acquire()
        try:
            return method(self, *args, **kwargs)
        finally:
            lock.release()

    return wrapper


class MetaTrainer:
    """Meta-trains any learner on any task source with any paddle optimizer.

    Iteration ``k`` uses meta-batch ``k`` of ``train_tasks`` (tasks ``k*B ... k*B+B-1``
    through :class:`~paddlefsl.data.MetaBatchLoader`), so a run resumed at ``k`` sees
    exactly the tasks an uninterrupted run would. For each task: clone, ``adapt``
    ``inner_steps`` times on the support set, compute the query loss and backpropagate
    ``loss / B`` right away (memory stays that of one task); then one optimizer step
    (and one LR-scheduler step) per meta-batch.

    With ``output_dir``: training rows and validation results go to ``metrics.jsonl``;
    the ``last`` checkpoint is written every ``checkpoint_every`` iterations and at the
    end, the ``best`` one whenever validation improves, and with ``keep_every`` every
    N-th checkpoint is also kept for good (``checkpoints/kept-NNNNNNN.json``);
    SIGINT / SIGTERM finish the current iteration, save ``last`` and return. A NaN / inf
    loss or gradient raises :class:`NonFiniteLossError` before the optimizer step, so no
    checkpoint ever holds non-finite weights.

    Args:
        learner: A meta-learner (``MAML``, ``ANIL``, ``MetaSGD`` or any ``BaseLearner``).
            Checkpoints hold its model's state, or the learner's whole state when it has
            parameters of its own (MetaSGD's learning rates).
        optimizer: Any paddle optimizer over ``learner.parameters()``.
        train_tasks: Task source with ``sample(index) -> Task``.
        meta_batch_size: Tasks per meta-update (B).
        inner_steps: Adaptation steps during meta-training.
        inner_steps_test: Adaptation steps for validation (default ``inner_steps``).
        val_tasks: Fixed validation tasks (e.g. ``fixed_tasks(val_split, ...)``) or
            ``None``.
        task_type: ``"classification"`` (cross-entropy, accuracy) or ``"regression"``
            (MSE); inferred from the targets when ``None``.
        output_dir: Run folder for ``config.json``, ``metrics.jsonl``, checkpoints.
        eval_every: Validate every N iterations (0: only at the end).
        checkpoint_every: Save ``last`` every N iterations (0: only at the end).
        keep_every: Also keep the checkpoint of every N-th iteration for good, as
            ``checkpoints/kept-NNNNNNN.json`` (a learning curve to score on test tasks
            later; 0: keep none).
        log_every: Log a training row every N iterations.
        config: JSON-serialisable run configuration, saved with checkpoints and
            compared on resume.
        scheduler: LR scheduler stepped once per iteration; by default the optimizer's
            own if its learning rate is an ``LRScheduler``.
        num_workers: Background threads for task loading.
        progress: Show a tqdm progress bar.
        handle_signals: Catch SIGINT / SIGTERM (main thread only).
        group: Processes sharing each meta-batch (default: the ``paddle.distributed``
            group if one is initialised). Rank 0 alone writes files and logs; validation
            tasks are shared out among the processes.

    Example:
        >>> import numpy as np, paddle
        >>> from paddlefsl.data import TaskSampler
        >>> from paddlefsl.metaopt import MAML
        >>> from paddlefsl.models import Conv4
        >>> images = np.random.rand(60, 16, 16).astype(np.float32)
        >>> sampler = TaskSampler((images, np.repeat(np.arange(6), 10)), 3, 1, 2)
        >>> maml = MAML(Conv4(1, 3, hidden=4, image_size=16), lr=0.4)
        >>> opt = paddle.optimizer.Adam(1e-3, parameters=maml.parameters())
        >>> trainer = MetaTrainer(maml, opt, sampler, meta_batch_size=2, progress=False)
        >>> trainer.fit(iterations=2).status
        'completed'

    """

    def __init__(
        self,
        learner: Any,
        optimizer: paddle.optimizer.Optimizer,
        train_tasks: Any,
        *,
        meta_batch_size: int,
        inner_steps: int = 1,
        inner_steps_test: int | None = None,
        val_tasks: Sequence[Any] | None = None,
        task_type: str | None = None,
        output_dir: str | Path | None = None,
        eval_every: int = 0,
        checkpoint_every: int = 0,
        keep_every: int = 0,
        log_every: int = 10,
        config: dict[str, Any] | None = None,
        scheduler: Any = None,
        num_workers: int = 0,
        progress: bool = True,
        handle_signals: bool = True,
        group: Group | None = None,
    ) -> None:
        self.group = current_group() if group is None else group
        main = self.group.is_main
        self.learner = learner
        self.model = checkpointed_layer(learner)
        self.optimizer = optimizer
        self.train_tasks = train_tasks
        self.meta_batch_size = int(meta_batch_size)
        self.inner_steps = int(inner_steps)
        self.inner_steps_test = int(inner_steps if inner_steps_test is None else inner_steps_test)
        self.val_tasks = val_tasks
        self.objective: Objective | None = get_objective(task_type) if task_type else None
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.eval_every = int(eval_every)
        self.checkpoint_every = int(checkpoint_every)
        self.keep_every = int(keep_every)
        if self.checkpoint_every < 0 or self.keep_every < 0:
            raise ValueError(
                f"checkpoint_every and keep_every must be >= 0 (got {checkpoint_every}, "
                f"{keep_every}); 0 turns them off"
            )
        self.log_every = max(int(log_every), 1)
        self.config = dict(config or {})
        if scheduler is None:
            lr = getattr(optimizer, "_learning_rate", None)
            scheduler = lr if isinstance(lr, paddle.optimizer.lr.LRScheduler) else None
        self.scheduler = scheduler
        self.num_workers = int(num_workers)
        self.progress = progress and main
        self.handle_signals = handle_signals
        self.iteration = 0
        self.best_metric: float | None = None
        self.best_iteration: int | None = None
        self.checkpoints = CheckpointManager(self.output_dir) if self.output_dir else None
        # Held while this trainer writes the folder (resume, warm_start, fit, save).
        self._run_lock = RunLock(self.output_dir) if (self.output_dir and main) else None
        self.metrics = MetricsLog(self.output_dir) if (self.output_dir and main) else None
        self._stop_signal: int | None = None
        self._last_saved: int | None = None
        self._last_checkpoint: str | None = None
        self._validated_at: int | None = None
        self._warned_non_finite_val = False
        self._elapsed = 0.0

    # ------------------------------------------------------------------ resume
    @_holding_run_folder
    def resume(self, path: str | Path | None = None) -> int:
        """Continue from the ``last`` checkpoint of ``output_dir`` (or from ``path``).

        Restores the weights, the optimizer (and LR schedule) state, the random states
        and the best-so-far record; the next :meth:`fit` continues at the saved
        iteration with the same tasks.

        Returns:
            The iteration resumed from.

        Raises:
            CheckpointError: no checkpoint, or it does not fit the model.
            ConfigMismatchError: ``config`` differs from the saved one in a field that
                changes the weights (anything but :func:`~paddlefsl.train.config.runtime_fields`).

        """
        if path is None:
            if self.checkpoints is None:
                raise CheckpointError("resume() needs output_dir or a checkpoint path")
            ckpt = self.checkpoints.load("last")
        else:
            ckpt = load_checkpoint(path, which="last")
        if self.config and ckpt.config:
            diff = config_diff(ckpt.config, self.config, ignore=runtime_fields(ckpt.config))
            if diff:
                raise ConfigMismatchError(
                    diff,
                    "start a new run with another output folder, or use the saved configuration",
                )
        ckpt.load_model(self.model)
        ckpt.load_optimizer(self.optimizer, self.model)
        restore_rng_state(ckpt.record["rng"])
        state = ckpt.record.get("state", {})
        self.iteration = ckpt.iteration
        self.best_metric = state.get("best_metric")
        self.best_iteration = state.get("best_iteration")
        self._elapsed = float(state.get("elapsed", 0.0))
        if state.get("task_type"):
            self.objective = get_objective(state["task_type"])
        self._last_saved = self._validated_at = ckpt.iteration
        self._last_checkpoint = str(ckpt.path)
        if self.metrics is not None:
            self.metrics.truncate_after(ckpt.iteration)
            self.metrics.write({"iteration": ckpt.iteration, "event": "resume"})
        return ckpt.iteration

    # ------------------------------------------------------------------ warm start
    @_holding_run_folder
    def warm_start(self, path: str | Path, which: str = "best") -> int:
        """Start a new run from the weights of an earlier run or a model-zoo export.

        Only the weights and buffers (batch-norm statistics) are taken; the optimizer,
        the random states and the iteration count start afresh, so the run is a new one
        that begins where the other left its weights (Adam rebuilds its moment estimates
        within a few hundred steps). Use :meth:`resume` to continue a run exactly.

        Args:
            path: A run folder, an export folder, a record ``.json`` or a ``.pdparams``.
            which: For a run folder, its ``"best"`` or ``"last"`` checkpoint.

        Returns:
            The iteration the weights were saved at in their own run.

        Raises:
            CheckpointError: the trainer has already trained or resumed, the
                checkpoint is missing or damaged, or it does not fit the model.
            ConfigMismatchError: the checkpoint's saved configuration describes another
                network (dataset, ways, width, pooling or image size).

        Example:
            >>> import tempfile, paddle
            >>> from paddlefsl.data import SinusoidTasks
            >>> from paddlefsl.metaopt import MAML
            >>> from paddlefsl.models import MLP
            >>> from paddlefsl.train import MetaTrainer
            >>> def trainer(out):
            ...     maml = MAML(MLP(1, [8], 1), lr=0.01)
            ...     opt = paddle.optimizer.Adam(1e-3, parameters=maml.parameters())
            ...     return MetaTrainer(maml, opt, SinusoidTasks(shots=5, seed=0),
            ...                        meta_batch_size=2, output_dir=out, progress=False)
            >>> first, second = tempfile.mkdtemp(), tempfile.mkdtemp()
            >>> trainer(first).fit(iterations=2).status
            'completed'
            >>> trainer(second).warm_start(first, which="last")
            2

        """
        if self.iteration or self._last_checkpoint is not None:
            raise CheckpointError(
                f"warm_start() starts a new run, but this trainer is at iteration "
                f"{self.iteration}; use a fresh trainer (or resume() to continue a run)"
            )
        ckpt = load_checkpoint(path, which=which)
        if self.config and ckpt.config:
            diff = config_diff(ckpt.config, self.config, only=set(MODEL_FIELDS))
            if diff:
                raise ConfigMismatchError(
                    diff,
                    "start from a checkpoint of the same network, or change the options",
                    action=f"start from {ckpt.path}",
                )
        ckpt.load_model(self.model)
        if self.metrics is not None:
            self.metrics.write(
                {
                    "iteration": 0,
                    "event": "warm_start",
                    "from": str(ckpt.path),
                    "from_iteration": ckpt.iteration,
                    "sha256": ckpt.record["sha256"]["model"],
                }
            )
        return ckpt.iteration

    # ------------------------------------------------------------------ one step
    def meta_step(self, batch: Any) -> tuple[float, float]:
        """Accumulate the meta-gradient of one meta-batch; returns mean loss and metric.

        Does not step the optimizer. Raises :class:`NonFiniteLossError` (with the
        gradients cleared) on a NaN / inf query loss or meta-gradient.
        """
        size = len(batch)
        loss_sum = metric_sum = 0.0
        bad: str | None = None
        for b, (sx, sy, qx, qy) in enumerate(batch):
            if not self.group.owns(b):
                continue
            if self.objective is None:
                self.objective = get_objective(infer_task_type(sy))
            objective = self.objective
            clone = adapt(self.learner.clone(), objective, sx, sy, self.inner_steps)
            out = clone(qx)
            loss = objective.loss(out, qy)
            value = float(loss)
            if not math.isfinite(value):
                index = int(batch.indices[b]) if hasattr(batch, "indices") else b
                bad = f"non-finite meta-loss ({value}) at iteration {self.iteration} (task {index})"
                break
            (loss / size).backward()
            loss_sum += value
            metric_sum += objective.metric(out.detach(), qy)
            del clone, out, loss  # drop this task's graph before the next one
        params = getattr(self.optimizer, "_parameter_list", None) or self.learner.parameters()
        # Every process takes part in the same collectives, also when one of them failed.
        loss_sum, metric_sum, failures = self.group.sum([loss_sum, metric_sum, float(bool(bad))])
        if failures:
            self.optimizer.clear_grad()
            raise NonFiniteLossError(
                bad or f"non-finite meta-loss at iteration {self.iteration} (in another process)",
                iteration=self.iteration,
            )
        self.group.sum_gradients(params)
        for p in params:
            if p.grad is not None and not bool(paddle.isfinite(p.grad).all()):
                self.optimizer.clear_grad()
                raise NonFiniteLossError(
                    f"non-finite meta-gradient for {p.name} at iteration {self.iteration}",
                    iteration=self.iteration,
                )
        return loss_sum / size, metric_sum / size

    # ------------------------------------------------------------------ validation
    def validate(self) -> EvalResult | None:
        """Evaluate on ``val_tasks`` with ``inner_steps_test`` steps (random states untouched).

        With several processes each evaluates its share of the tasks (task ``i`` on rank
        ``i % world``) and they exchange the per-task results, so every process returns the
        same result and none waits alone: a process idle in a gloo collective for more
        than its 30-second timeout would fail the run.
        """
        if not self.val_tasks:
            return None
        task_type = self.objective.task_type if self.objective else None
        with forked_rng():
            if self.group.world == 1 or len(self.val_tasks) < self.group.world:
                result = evaluate(self.learner, self.val_tasks, self.inner_steps_test, task_type)
            else:
                result = self._validate_shared(task_type)
        self.objective = get_objective(
            "classification" if result.metric == "accuracy" else "regression"
        )
        self._validated_at = self.iteration
        if not math.isfinite(result.mean) and not self._warned_non_finite_val:
            # Training goes on (its own loss is finite), but no "best" checkpoint can be
            # chosen; say why once rather than leave a silent NaN in metrics.jsonl.
            self._warned_non_finite_val = True
            if self.group.is_main:
                print(
                    f"warning: validation {result.metric} is {result.mean} at iteration "
                    f"{self.iteration} with {result.inner_steps} inner steps: the adapted "
                    "models diverge at test time. Fewer test steps (--inner-steps-test) or a "
                    "smaller inner learning rate would avoid it; no best checkpoint is chosen "
                    "while it lasts.",
                    file=sys.stderr,
                )
        if self.metrics is not None:
            self.metrics.write(
                {
                    "iteration": self.iteration,
                    "split": "val",
                    "loss": result.loss,
                    result.metric: result.mean,
                    "ci95": result.ci95,
                    "tasks": result.num_tasks,
                    "inner_steps": result.inner_steps,
                }
            )
        return result

    def _validate_shared(self, task_type: str | None) -> EvalResult:
        """Validate on this process's share of the tasks, combined with the others' shares."""
        count = len(self.val_tasks)
        owned = [i for i in range(count) if self.group.owns(i)]
        mine = evaluate(
            self.learner,
            (self.val_tasks[i] for i in owned),  # one task in memory at a time
            self.inner_steps_test,
            task_type,
        )
        values = [0.0] * count
        for i, value in zip(owned, mine.values):
            values[i] = value
        gathered = self.group.sum([*values, mine.loss * len(owned)])
        return EvalResult.from_values(
            mine.metric, gathered[:count], gathered[count] / count, self.inner_steps_test
        )

    def _validate_checkpointed(self, checkpoint_first: bool) -> tuple[EvalResult | None, list[str]]:
        """Validate, and the checkpoint tags it earns (``["best"]`` or none).

        With ``checkpoint_first`` the iteration's ``last`` checkpoint is written before
        validating, so that a validation that fails loses nothing.
        """
        if checkpoint_first and self._last_saved != self.iteration:
            self.save(["last"])
        val = self.validate()
        return val, self._best_tags(val)

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict[str, Any]:
        return {
            "best_metric": self.best_metric,
            "best_iteration": self.best_iteration,
            "task_type": self.objective.task_type if self.objective else None,
            "metric": self.objective.metric_name if self.objective else None,
            "elapsed": self._elapsed,
        }

    @_holding_run_folder
    def save(self, tags: Sequence[str] = ("last",)) -> str | None:
        """Write a checkpoint for the current iteration under ``tags``; returns its record."""
        if self.checkpoints is None or not self.group.is_main:
            return None
        path = self.checkpoints.save(
            list(tags), self.model, self.optimizer, self.iteration, self.config, self._state()
        )
        if "last" in tags:
            self._last_saved = self.iteration
            self._last_checkpoint = str(path)
        if self.metrics is not None:
            self.metrics.write(
                {"iteration": self.iteration, "event": "checkpoint", "tags": list(tags)}
            )
        return str(path)

    # ------------------------------------------------------------------ signals
    @contextmanager
    def _signals(self) -> Iterator[None]:
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
            yield
            return
        previous: dict[int, Any] = {}

        def handler(signum: int, frame: Any) -> None:
            if self._stop_signal is not None:  # a second signal: stop right now
                signal.signal(signum, previous.get(signum, signal.SIG_DFL))
                raise KeyboardInterrupt
            self._stop_signal = signum
            print(
                f"\n{signal.Signals(signum).name}: finishing iteration {self.iteration + 1}"
                " and saving a checkpoint (send it again to stop at once)",
                file=sys.stderr,
            )

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    # ------------------------------------------------------------------ the loop
    @_holding_run_folder
    def fit(self, iterations: int) -> FitResult:
        """Meta-train until ``iterations`` meta-updates have been done in total.

        Returns:
            A :class:`FitResult`; ``status`` is ``"interrupted"`` after SIGINT / SIGTERM.

        Raises:
            NonFiniteLossError: NaN / inf loss or gradient (the last good checkpoint is
                kept and named in the message).
            RunInUseError: another process is training in ``output_dir``.

        """
        self._stop_signal = None
        self._prepare_output(iterations)
        self.optimizer.clear_grad()
        result = FitResult("completed", self.iteration)
        val: EvalResult | None = None
        window = _Window()
        bar = self._progress_bar(iterations)
        started = time.perf_counter() - self._elapsed
        loader = MetaBatchLoader(
            self.train_tasks,
            self.meta_batch_size,
            num_batches=max(iterations - self.iteration, 0),
            start=self.iteration,
            num_workers=self.num_workers,
        )
        batches = iter(loader)
        try:
            with self._signals():
                for batch in batches:
                    loss, metric = self.meta_step(batch)
                    self.optimizer.step()
                    self.optimizer.clear_grad()
                    if self.scheduler is not None:
                        self.scheduler.step()
                    self.iteration += 1
                    self._elapsed = time.perf_counter() - started
                    window.add(loss, metric)
                    self._update_bar(bar, loss, metric)
                    if self.iteration % self.log_every == 0:
                        result.train = self._log_train(window)
                    tags = []
                    keep = bool(self.keep_every) and self.iteration % self.keep_every == 0
                    due = keep or (
                        bool(self.checkpoint_every) and self.iteration % self.checkpoint_every == 0
                    )
                    if self.eval_every and self.iteration % self.eval_every == 0:
                        val, tags = self._validate_checkpointed(checkpoint_first=due)
                    stop = self._stop_signal is not None
                    if self.group.world > 1:  # stop together, or the others would hang
                        stop = self.group.sum([float(stop)])[0] > 0
                        self._stop_signal = self._stop_signal or (signal.SIGTERM if stop else None)
                    # Saved again when best: the "last" record then holds the new best metric.
                    if stop or (due and (self._last_saved != self.iteration or tags)):
                        tags.append("last")
                    if keep:
                        tags.append(kept_tag(self.iteration))
                    if tags:
                        self.save(tags)
                    if stop:
                        result.status, result.signal = "interrupted", self._stop_signal
                        break
        except NonFiniteLossError as err:
            if self.metrics is not None:
                self.metrics.write(
                    {"iteration": self.iteration, "event": "non_finite", "message": str(err)}
                )
            kept = (
                f"the last good checkpoint (iteration {self._last_saved}) is kept at "
                f"{self._last_checkpoint}"
                if self._last_checkpoint
                else "no checkpoint had been written yet"
            )
            raise NonFiniteLossError(
                f"{err}; training stopped, {kept}. Lower --meta-lr or --inner-lr, or check "
                "the data",
                iteration=err.iteration,
                checkpoint=self._last_checkpoint,
            ) from None
        finally:
            batches.close()
            if bar is not None:
                bar.close()
        if result.status == "completed":
            if window.count and self.iteration % self.log_every:
                result.train = self._log_train(window)
            tags = []
            if self.val_tasks and self._validated_at != self.iteration:
                val, tags = self._validate_checkpointed(checkpoint_first=True)
            if tags or self._last_saved != self.iteration:
                tags.append("last")
            if tags:
                self.save(tags)
            if self.metrics is not None:
                self.metrics.write({"iteration": self.iteration, "event": "end"})
        result.iteration = self.iteration
        result.val = val
        result.best_metric, result.best_iteration = self.best_metric, self.best_iteration
        result.checkpoint = self._last_checkpoint
        return result

    # ------------------------------------------------------------------ helpers
    def _prepare_output(self, iterations: int) -> None:
        if self.output_dir is None or not self.group.is_main:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.config:
            atomic_write_json(self.output_dir / CONFIG_FILE, self.config)
        if self.metrics is not None:
            # nproc per segment: a resume may change it, and CPU-hours depend on it
            self.metrics.write(
                {
                    "iteration": self.iteration,
                    "event": "start",
                    "target": int(iterations),
                    "nproc": self.group.world,
                }
            )

    def _best_tags(self, val: EvalResult | None) -> list[str]:
        if val is None or self.objective is None:
            return []
        if not math.isfinite(val.mean) or not self.objective.better(val.mean, self.best_metric):
            return []
        self.best_metric, self.best_iteration = val.mean, self.iteration
        return ["best"]

    def _log_train(self, window: _Window) -> dict[str, float]:
        loss, metric, rate = window.means()
        window.reset()
        name = self.objective.metric_name if self.objective else "metric"
        row = {
            "iteration": self.iteration,
            "split": "train",
            "loss": loss,
            name: metric,
            "iters_per_sec": rate,
            "elapsed": round(self._elapsed, 3),
        }
        if self.scheduler is not None:  # the rate the next meta-update will use
            row["meta_lr"] = float(self.optimizer.get_lr())
        if self.metrics is not None:
            self.metrics.write(row)
        return row

    def _progress_bar(self, iterations: int) -> Any:
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(
            total=iterations,
            initial=self.iteration,
            unit="it",
            dynamic_ncols=True,
            desc="meta-train",
        )

    def _update_bar(self, bar: Any, loss: float, metric: float) -> None:
        if bar is None:
            return
        bar.update(1)
        name = "acc" if self.objective and self.objective.metric_name == "accuracy" else "mse"
        postfix = {"loss": f"{loss:.3f}", name: f"{metric:.3f}"}
        if self.best_metric is not None:
            postfix["best_val"] = f"{self.best_metric:.3f}"
        bar.set_postfix(postfix, refresh=False)
