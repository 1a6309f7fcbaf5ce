import json
import math
import os
import signal

import numpy as np
import paddle
import pytest
from train_helpers import SIZE, params_of

from paddlefsl.data import TaskSampler, fixed_tasks
from paddlefsl.metaopt import ANIL, MAML
from paddlefsl.models import Conv4
from paddlefsl.train import (
    CheckpointError,
    CheckpointManager,
    ConfigMismatchError,
    MetaTrainer,
    NonFiniteLossError,
    evaluate,
    load_checkpoint,
    read_metrics,
)
from paddlefsl.train.distributed import Group
from paddlefsl.train.evaluate import EvalResult


def test_short_run_learns_easy_classes(splits):
    train, val = splits
    paddle.seed(0)
    maml = MAML(Conv4(1, 5, hidden=8, pooling="max", image_size=SIZE), lr=0.4)
    opt = paddle.optimizer.Adam(3e-3, parameters=maml.parameters())
    tasks = fixed_tasks(val, 5, 1, 3, num_tasks=20)
    before = evaluate(maml, tasks, inner_steps=1).mean
    trainer = MetaTrainer(maml, opt, TaskSampler(train, 5, 1, 3), meta_batch_size=4, progress=False)
    result = trainer.fit(iterations=50)
    after = evaluate(maml, tasks, inner_steps=1).mean
    assert result.status == "completed" and result.iteration == 50
    assert after > 0.5, (before, after)  # chance is 0.2
    assert after > before + 0.15, (before, after)


@pytest.mark.slow
def test_longer_run_reaches_high_accuracy(splits):
    train, val = splits
    paddle.seed(0)
    maml = MAML(Conv4(1, 5, hidden=16, pooling="max", image_size=SIZE), lr=0.4)
    opt = paddle.optimizer.Adam(3e-3, parameters=maml.parameters())
    MetaTrainer(maml, opt, TaskSampler(train, 5, 1, 3), meta_batch_size=4, progress=False).fit(
        iterations=300
    )
    assert evaluate(maml, fixed_tasks(val, 5, 1, 3, num_tasks=50), inner_steps=3).mean > 0.9


def test_anil_and_fomaml_train(splits):
    train, _ = splits
    for first_order, anil in ((True, False), (False, True)):
        paddle.seed(0)
        net = Conv4(1, 3, hidden=4, pooling="max", image_size=SIZE)
        learner = (
            ANIL(net.features, net.head, lr=0.4)
            if anil
            else MAML(net, lr=0.4, first_order=first_order)
        )
        opt = paddle.optimizer.Adam(1e-2, parameters=learner.parameters())
        before = {n: p.numpy().copy() for n, p in net.named_parameters()}
        result = MetaTrainer(
            learner, opt, TaskSampler(train, 3, 1, 2), meta_batch_size=2, progress=False
        ).fit(3)
        assert result.status == "completed"
        changed = [n for n, p in net.named_parameters() if not np.array_equal(p.numpy(), before[n])]
        assert any(n.startswith("features") for n in changed)  # features get meta-gradients


@pytest.mark.parametrize("kind", ["classification", "regression"])
def test_resume_is_exact(factory, tmp_path, kind):
    make = getattr(factory, kind)
    extra = {"lr_schedule": True} if kind == "classification" else {"dropout": 0.3}
    common = dict(eval_every=2, checkpoint_every=3, log_every=1, **extra)
    full = make(output_dir=tmp_path / "full", **common)
    full.fit(6)

    first = make(output_dir=tmp_path / "split", **common)
    first.fit(3)
    # A fresh process would rebuild the model from scratch: other init, other param names.
    second = make(output_dir=tmp_path / "split", init_seed=123, **common)
    assert second.resume() == 3
    second.fit(6)

    a, b = params_of(full), params_of(second)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    opt_a, opt_b = full.optimizer.state_dict(), second.optimizer.state_dict()
    if kind == "classification":
        assert opt_a["LR_Scheduler"] == opt_b["LR_Scheduler"]
    rows = [(r["iteration"], r["split"]) for r in read_metrics(tmp_path / "split") if "split" in r]
    assert len(rows) == len(set(rows))  # the resumed run logged nothing twice
    train_rows = [
        (r["iteration"], r["loss"])
        for r in read_metrics(tmp_path / "split")
        if r.get("split") == "train"
    ]
    assert train_rows == [
        (r["iteration"], r["loss"])
        for r in read_metrics(tmp_path / "full")
        if r.get("split") == "train"
    ]


def test_resume_with_different_config_is_refused(factory, tmp_path):
    factory.classification(output_dir=tmp_path).fit(2)
    other = factory.classification(output_dir=tmp_path)
    other.config["ways"] = 3
    with pytest.raises(ConfigMismatchError, match="ways"):
        other.resume()


def test_warm_start_takes_weights_only_and_only_on_a_new_run(factory, tmp_path):
    source = factory.classification(output_dir=tmp_path / "source")
    source.fit(3)
    fresh = factory.classification(output_dir=tmp_path / "new")
    before = {k: v.numpy().copy() for k, v in fresh.model.state_dict().items()}
    assert fresh.warm_start(tmp_path / "source", which="last") == 3
    saved = CheckpointManager(tmp_path / "source").load("last").model_state
    after = fresh.model.state_dict()
    assert any(not np.array_equal(before[k], after[k].numpy()) for k in before)
    assert set(after) == set(saved)
    for name, value in after.items():
        np.testing.assert_array_equal(value.numpy(), saved[name].numpy())
    assert fresh.iteration == 0
    with pytest.raises(CheckpointError, match="starts a new run"):
        source.warm_start(tmp_path / "source")
    other = factory.classification(output_dir=tmp_path / "other")
    other.config["ways"] = 3
    with pytest.raises(ConfigMismatchError, match="cannot start from .*ways"):
        other.warm_start(tmp_path / "source", which="last")


def test_best_and_last_checkpoints(factory, tmp_path):
    trainer = factory.classification(output_dir=tmp_path, eval_every=2, checkpoint_every=4)
    result = trainer.fit(5)
    manager = CheckpointManager(tmp_path)
    assert manager.load("last").iteration == 5
    best = manager.load("best")
    assert best.iteration == result.best_iteration
    assert best.record["state"]["best_metric"] == pytest.approx(result.best_metric)
    assert json.loads((tmp_path / "config.json").read_text()) == trainer.config
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("iter-*"))
    wanted = {f"iter-{i:07d}.{ext}" for i in {5, best.iteration} for ext in ("pdparams", "pdopt")}
    assert set(kept) == wanted  # older binaries are pruned


def test_kept_checkpoints_stay_and_hold_that_iterations_weights(factory, tmp_path):
    trainer = factory.classification(
        output_dir=tmp_path, eval_every=0, checkpoint_every=3, keep_every=2, val_tasks=0
    )
    trainer.fit(5)
    manager = CheckpointManager(tmp_path)
    assert [p.name for p in manager.kept()] == ["kept-0000002.json", "kept-0000004.json"]
    assert manager.load("last").iteration == 5
    kept = {p.name for p in (tmp_path / "checkpoints").glob("iter-*.pdparams")}
    assert kept == {"iter-0000002.pdparams", "iter-0000004.pdparams", "iter-0000005.pdparams"}

    # A kept checkpoint is that iteration's model: the same as a run stopped there.
    short = factory.classification(val_tasks=0)
    short.fit(4)
    saved = load_checkpoint(tmp_path / "checkpoints" / "kept-0000004.json")
    assert saved.iteration == 4 and saved.record["tag"] == "kept-0000004"
    by_name = {name: value.numpy() for name, value in saved.model_state.items()}
    for name, value in short.model.state_dict().items():
        np.testing.assert_array_equal(by_name[name], value.numpy(), err_msg=name)
    with pytest.raises(CheckpointError, match="kept-0000003"):
        manager.load("kept-0000003")


def test_keep_every_must_not_be_negative(factory):
    with pytest.raises(ValueError, match="keep_every must be >= 0"):
        factory.classification(keep_every=-1)


class _PoisonedTasks:
    """Task source whose tasks from ``start`` on contain NaN inputs."""

    def __init__(self, source, start):
        self.source, self.start = source, start

    def sample(self, index):
        task = self.source.sample(index)
        if index >= self.start:
            task.support_x = np.full_like(task.support_x, np.nan)
        return task


def test_nan_stops_and_keeps_last_good_checkpoint(factory, tmp_path):
    trainer = factory.classification(output_dir=tmp_path, checkpoint_every=2, val_tasks=0)
    trainer.train_tasks = _PoisonedTasks(trainer.train_tasks, start=5 * 2)  # iteration 5
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit(8)
    message = str(info.value)
    assert "iteration 5" in message and "iteration 4" in message and "last.json" in message
    assert info.value.iteration == 5
    ckpt = CheckpointManager(tmp_path).load("last")
    assert ckpt.iteration == 4
    assert all(np.isfinite(v.numpy()).all() for v in ckpt.model_state.values())
    # The in-memory model never took the NaN step either.
    assert all(np.isfinite(p.numpy()).all() for p in trainer.model.parameters())
    events = [r.get("event") for r in read_metrics(tmp_path)]
    assert "non_finite" in events


class _SignalAt:
    """Task source that sends SIGTERM to this process when task ``index`` is drawn."""

    def __init__(self, source, index):
        self.source, self.index = source, index

    def sample(self, index):
        if index == self.index:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.source.sample(index)


def test_sigterm_saves_checkpoint_and_returns(factory, tmp_path):
    def fallback(signum, frame):  # only runs if the trainer failed to install its handler
        raise RuntimeError("trainer did not handle SIGTERM")

    previous = signal.signal(signal.SIGTERM, fallback)
    try:
        trainer = factory.classification(output_dir=tmp_path, checkpoint_every=0, val_tasks=0)
        trainer.train_tasks = _SignalAt(trainer.train_tasks, index=3 * 2)  # iteration 3
        result = trainer.fit(10)
        assert signal.getsignal(signal.SIGTERM) is fallback  # handlers restored
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.status == "interrupted" and result.signal == signal.SIGTERM
    assert result.iteration == 4  # the iteration in progress was finished
    assert CheckpointManager(tmp_path).load("last").iteration == 4


def test_regression_reports_mse(factory):
    trainer = factory.regression()
    result = trainer.fit(2)
    assert trainer.objective.metric_name == "mse"
    assert "mse" in result.train and result.val.metric == "mse"


class _RecordingTasks(list):
    """Validation tasks that remember which indices were read."""

    def __init__(self, tasks):
        super().__init__(tasks)
        self.read = []

    def __getitem__(self, i):
        self.read.append(i)
        return super().__getitem__(i)

    def __iter__(self):
        return (self[i] for i in range(len(self)))


class _TwoProcesses(Group):
    """Rank 1 of 2, whose partner evaluated the even tasks and returned these results."""

    def __init__(self, partner_values, partner_loss_sum):
        super().__init__(rank=1, world=2)
        self.partner = [*partner_values, partner_loss_sum]

    def sum(self, values):
        return [a + b for a, b in zip(values, self.partner)]


def test_validation_is_shared_among_processes(factory):
    """Each process adapts only its own validation tasks, then all see the whole result."""
    alone = factory.classification(val_tasks=5)
    full = alone.validate()
    tasks = _RecordingTasks(alone.val_tasks)
    even = [v if i % 2 == 0 else 0.0 for i, v in enumerate(full.values)]
    # The partner's share of the summed query loss: the full sum minus rank 1's tasks.
    steps = alone.inner_steps_test
    odd_losses = [evaluate(alone.learner, [tasks[i]], steps).loss for i in (1, 3)]
    partner_loss = full.loss * 5 - sum(odd_losses)
    tasks.read.clear()
    shared = factory.classification(val_tasks=5, group=_TwoProcesses(even, partner_loss))
    shared.val_tasks = tasks
    result = shared.validate()
    assert tasks.read == [1, 3]  # rank 1 of 2 never touched the even tasks
    np.testing.assert_allclose(result.values, full.values, rtol=1e-5, atol=1e-6)
    assert (result.num_tasks, result.metric) == (5, "accuracy")
    np.testing.assert_allclose(
        [result.mean, result.ci95, result.loss], [full.mean, full.ci95, full.loss], rtol=1e-4
    )


def test_failed_validation_keeps_the_iterations_checkpoint(factory, tmp_path):
    trainer = factory.classification(output_dir=tmp_path, eval_every=2, checkpoint_every=2)

    def broken():
        raise RuntimeError("validation failed")

    trainer.fit(2)
    trainer.validate = broken
    with pytest.raises(RuntimeError, match="validation failed"):
        trainer.fit(4)
    last = CheckpointManager(tmp_path).load("last")
    assert last.iteration == 4  # written before the validation that failed
    assert CheckpointManager(tmp_path).load("best").iteration == 2
    # The same for the validation that ends a run between checkpoints.
    with pytest.raises(RuntimeError, match="validation failed"):
        trainer.fit(5)
    assert CheckpointManager(tmp_path).load("last").iteration == 5


def test_last_record_carries_the_best_metric_of_its_iteration(factory, tmp_path):
    trainer = factory.classification(output_dir=tmp_path, eval_every=2, checkpoint_every=2)

    def improving():  # every validation a new best
        return EvalResult.from_values("accuracy", [trainer.iteration / 10], 1.0, 1)

    trainer.validate = improving
    trainer.fit(4)
    state = CheckpointManager(tmp_path).load("last").record["state"]
    assert (state["best_metric"], state["best_iteration"]) == (0.4, 4)
    assert CheckpointManager(tmp_path).load("best").iteration == 4


def test_a_run_folder_in_use_is_refused_before_anything_is_written(factory, tmp_path):
    from paddlefsl.train import RunInUseError
    from paddlefsl.train.runlock import RunLock

    factory.classification(output_dir=tmp_path).fit(2)
    before = {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    other = RunLock(tmp_path)  # another process training there (flock: per open file)
    other.acquire()
    try:
        trainer = factory.classification(output_dir=tmp_path)
        with pytest.raises(RunInUseError, match=rf"in use .*pid {os.getpid()}.*kill -TERM"):
            trainer.resume()
        with pytest.raises(RunInUseError):
            trainer.fit(4)
        after = {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
        assert after == before  # nothing touched: metrics, checkpoints, config
    finally:
        other.release()
    trainer = factory.classification(output_dir=tmp_path)
    assert trainer.resume() == 2 and trainer.fit(4).iteration == 4  # free again
    assert not trainer._run_lock.held  # released after fit, so a later trainer may write


def test_metasgd_learning_rates_are_checkpointed_and_resumed_exactly(splits, tmp_path):
    from paddlefsl.metaopt import MetaSGD

    train, _ = splits

    def make(out, seed=0):
        paddle.seed(seed)
        learner = MetaSGD(Conv4(1, 3, hidden=4, pooling="max", image_size=SIZE), lr=0.3)
        opt = paddle.optimizer.Adam(1e-2, parameters=learner.parameters())
        sampler = TaskSampler(train, 3, 1, 2, seed=0)
        return MetaTrainer(learner, opt, sampler, meta_batch_size=2, output_dir=out, progress=False)

    full = make(tmp_path / "full")
    full.fit(4)
    rates = [r.numpy() for r in full.learner.lrs]
    assert not all(np.allclose(r, 0.3) for r in rates)  # the rates did train
    make(tmp_path / "split").fit(2)
    second = make(tmp_path / "split", seed=123)  # fresh weights and rates, as a new process
    assert second.resume() == 2
    second.fit(4)
    a, b = params_of(full), params_of(second)
    assert any(name.startswith("lrs.") for name in a) and a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_non_finite_validation_is_reported_once(factory, monkeypatch, capsys):
    import paddlefsl.train.trainer as trainer_module

    def diverged(learner, tasks, inner_steps, task_type=None, **kwargs):
        return EvalResult("mse", float("nan"), float("nan"), float("nan"), 2, float("nan"), 10)

    monkeypatch.setattr(trainer_module, "evaluate", diverged)
    trainer = factory.regression()
    for _ in range(2):
        assert math.isnan(trainer.validate().mean)
    err = capsys.readouterr().err
    assert err.count("warning: validation mse is nan") == 1, err
    assert "--inner-steps-test" in err
