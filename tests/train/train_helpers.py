"""Shared helpers of the paddlefsl.train tests."""

import numpy as np
import paddle

from paddlefsl.data import SinusoidTasks, TaskSampler, fixed_tasks
from paddlefsl.metaopt import MAML
from paddlefsl.models import Conv4
from paddlefsl.train import MetaTrainer

SIZE = 16

# `paddlefsl train` on tiny sinusoid tasks: 4 iterations, checkpoints and validation every 2.
SINUSOID_TRAIN = [
    "train",
    "--dataset",
    "sinusoid",
    "--iterations",
    "4",
    "--meta-batch-size",
    "2",
    "--eval-every",
    "2",
    "--checkpoint-every",
    "2",
    "--val-tasks",
    "2",
    "--hidden",
    "8",
    "--no-progress",
]


def cli_error(capsys, argv, code=2):
    """Run the CLI, expect exit ``code`` and exactly one line on stderr; return that line."""
    import pytest

    from paddlefsl.cli import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == code
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if "warn" not in line.lower()]
    assert len(lines) == 1 and "Traceback" not in err, err  # one line, no traceback
    return lines[0]


def synthetic_classes(num_classes=20, per_class=10, size=SIZE, noise=0.3, seed=0):
    """Easy in-memory classes: a random binary pattern per class plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    protos = (rng.random((num_classes, size, size)) > 0.5).astype(np.float32)
    noisy = protos[:, None] + rng.normal(0, noise, (num_classes, per_class, size, size))
    images = np.clip(noisy, 0, 1).astype(np.float32).reshape(-1, size, size)
    return images, np.repeat(np.arange(num_classes), per_class)


class Factory:
    """Builds small trainers; every call makes a fresh model (new parameter names)."""

    def __init__(self, splits):
        self.train, self.val = splits

    def classification(
        self,
        output_dir=None,
        init_seed=0,
        hidden=4,
        ways=5,
        meta_batch_size=2,
        val_tasks=4,
        lr_schedule=False,
        first_order=False,
        **kwargs,
    ):
        paddle.seed(init_seed)
        maml = MAML(
            Conv4(1, ways, hidden=hidden, pooling="max", image_size=SIZE),
            lr=0.4,
            first_order=first_order,
        )
        lr = paddle.optimizer.lr.StepDecay(3e-3, step_size=2, gamma=0.5) if lr_schedule else 3e-3
        opt = paddle.optimizer.Adam(learning_rate=lr, parameters=maml.parameters())
        val = fixed_tasks(self.val, ways, 1, 2, num_tasks=val_tasks) if val_tasks else None
        kwargs.setdefault("progress", False)
        return MetaTrainer(
            maml,
            opt,
            TaskSampler(self.train, ways, 1, 2, seed=0),
            meta_batch_size=meta_batch_size,
            val_tasks=val,
            output_dir=output_dir,
            config={"model": "conv4", "ways": ways},
            **kwargs,
        )

    def regression(self, output_dir=None, init_seed=0, dropout=0.0, **kwargs):
        paddle.seed(init_seed)
        net = paddle.nn.Sequential(
            paddle.nn.Linear(1, 16),
            paddle.nn.ReLU(),
            paddle.nn.Dropout(dropout),
            paddle.nn.Linear(16, 1),
        )
        maml = MAML(net, lr=0.01, first_order=True)
        opt = paddle.optimizer.Adam(learning_rate=1e-2, parameters=maml.parameters())
        kwargs.setdefault("progress", False)
        return MetaTrainer(
            maml,
            opt,
            SinusoidTasks(shots=5, queries=5, seed=0),
            meta_batch_size=3,
            output_dir=output_dir,
            val_tasks=[SinusoidTasks(5, 5, seed=9).sample(i) for i in range(3)],
            config={"model": "mlp"},
            **kwargs,
        )


def params_of(trainer):
    return {name: p.numpy().copy() for name, p in trainer.model.named_parameters()}


def count_binary_writes(monkeypatch):
    """Record the name of every checkpoint binary written from now on; returns that list.

    Records (``*.json``) are left out: each save rewrites them by design.
    """
    from paddlefsl.train import checkpoint as ckpt_module

    writes = []
    real_write = ckpt_module.atomic_write_bytes

    def counting_write(path, data):
        if not path.name.endswith(".json"):
            writes.append(path.name)
        real_write(path, data)

    monkeypatch.setattr(ckpt_module, "atomic_write_bytes", counting_write)
    return writes
