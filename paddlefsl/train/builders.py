"""Turn a :class:`~paddlefsl.train.config.TrainConfig` into model, learner, optimizer, tasks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import paddle

from ..data import (
    DEFAULT_EVAL_SEED,
    FixedTasks,
    RandomClassRotation,
    SinusoidTasks,
    TaskPool,
    TaskSampler,
)
from ..metaopt import ANIL, MAML, BaseLearner, MetaSGD
from ..models import MLP, Conv4
from .config import TrainConfig
from .errors import ConfigError
from .trainer import MetaTrainer

__all__ = [
    "DOCS_DATA",
    "build_dataset",
    "build_learner",
    "build_model",
    "build_optimizer",
    "build_tasks",
    "build_trainer",
    "eval_seed",
]

DOCS_DATA = "docs/cli.md#data"
_CHANNELS = {"omniglot": 1, "miniimagenet": 3}
_EXPECTED = {
    "omniglot": "images_background.zip and images_evaluation.zip (or their extracted folders)",
    "miniimagenet": "images/*.jpg with train.csv/val.csv/test.csv, <split>/<wnid>/*.jpg "
    "folders, or mini-imagenet-cache-<split>.pkl",
}


def eval_seed(split: str) -> int:
    """Seed of the fixed evaluation tasks of a split (validation and test differ).

    Example:
        >>> eval_seed("test") != eval_seed("val")
        True

    """
    return DEFAULT_EVAL_SEED + (1 if split == "val" else 0)


def build_model(config: TrainConfig) -> paddle.nn.Layer:
    """The backbone: Conv4 for images, the 2-layer ReLU MLP for sinusoid.

    Example:
        >>> from paddlefsl.train.config import build_config
        >>> type(build_model(build_config(dataset="sinusoid")[0])).__name__
        'MLP'

    """
    if config.dataset == "sinusoid":
        return MLP(1, [config.hidden, config.hidden], 1)
    reference = config.network == "reference"
    # cbfinn/maml: tf.contrib.layers.batch_norm defaults (no scale, epsilon 1e-3) and
    # construct_conv_weights' initialisers.
    return Conv4(
        _CHANNELS[config.dataset],
        config.ways,
        hidden=config.hidden,
        pooling=config.pooling,
        image_size=config.image_size,
        norm_scale=not reference,
        norm_epsilon=1e-3 if reference else 1e-5,
        init="maml" if reference else "paddle",
        padding=config.conv_padding,
    )


def build_learner(config: TrainConfig, model: paddle.nn.Layer | None = None) -> BaseLearner:
    """MAML / FOMAML / ANIL / Meta-SGD around ``model`` (built from the config when ``None``).

    With ``network="reference"``, MAML's inner loop leaves the BatchNorm offsets alone
    (cbfinn/maml keeps them out of the adapted weights; the outer loop trains them).
    """
    model = build_model(config) if model is None else model
    if config.algorithm == "anil":
        return ANIL(model.features, model.head, lr=config.inner_lr)
    frozen = model.batch_norm_offsets() if config.network == "reference" else []
    if config.algorithm == "metasgd":
        return MetaSGD(model, lr=config.inner_lr, inner_frozen=frozen)
    return MAML(model, lr=config.inner_lr, first_order=config.first_order, inner_frozen=frozen)


def build_optimizer(config: TrainConfig, learner: BaseLearner) -> paddle.optimizer.Optimizer:
    """Adam over the learner's parameters (MAML's meta-optimizer), ``meta_lr`` as scheduled.

    With ``meta_lr_schedule="cosine"`` the learning rate is a
    ``paddle.optimizer.lr.CosineAnnealingDecay`` from ``meta_lr`` to 0 over
    ``iterations``; the trainer steps it once per meta-update and checkpoints it with
    the optimizer. With ``meta_grad_clip`` every element of the meta-gradient is clipped
    to ``[-meta_grad_clip, meta_grad_clip]`` first (after the processes' all-reduce).
    """
    lr: float | paddle.optimizer.lr.LRScheduler = config.meta_lr
    if config.meta_lr_schedule == "cosine":
        lr = paddle.optimizer.lr.CosineAnnealingDecay(config.meta_lr, T_max=config.iterations)
    clip = None
    if config.meta_grad_clip:
        clip = paddle.nn.ClipGradByValue(max=config.meta_grad_clip, min=-config.meta_grad_clip)
    return paddle.optimizer.Adam(learning_rate=lr, parameters=learner.parameters(), grad_clip=clip)


def _require_root(config: TrainConfig) -> Path:
    if not config.data_root:
        raise ConfigError(
            f"--data-root is required for --dataset {config.dataset}: a folder with "
            f"{_EXPECTED[config.dataset]} (see {DOCS_DATA})"
        )
    root = Path(config.data_root).expanduser()
    if not root.is_dir():
        raise ConfigError(
            f"--data-root {config.data_root} is not a folder; it should hold "
            f"{_EXPECTED[config.dataset]} (see {DOCS_DATA})"
        )
    return root


def build_dataset(config: TrainConfig, split: str, rotations: bool = True) -> Any:
    """The class dataset of one split (``train``, ``val`` or ``test``) of an image dataset.

    ``rotations=False`` leaves out Omniglot's rotated classes (for
    ``omniglot_rotations="per-task"``, which turns the training tasks instead).

    Raises:
        ConfigError: ``data_root`` missing or not a folder.
        FileNotFoundError: the dataset files are not there (message from the loader).

    """
    root = _require_root(config)
    if config.dataset == "omniglot":
        from ..data import Omniglot

        return Omniglot(
            root,
            split=split,
            scheme=config.omniglot_scheme,
            image_size=config.image_size,
            rotations=rotations,
            antialias=config.omniglot_antialias,
        )
    if config.dataset == "miniimagenet":
        from ..data import MiniImageNet

        return MiniImageNet(root, split=split, image_size=config.image_size)
    raise ConfigError(f"{config.dataset} has no class dataset")


def build_tasks(
    config: TrainConfig, split: str, num_tasks: int | None = None, seed: int | None = None
) -> Any:
    """A task source for ``split``; with ``num_tasks``, a fixed seeded list of tasks.

    Training tasks are seeded with ``config.seed``; fixed evaluation tasks with
    :func:`eval_seed`, so they are the same for every run and every model. The training
    stream (no ``num_tasks``) applies ``config.task_pool`` and
    ``config.omniglot_rotations``; fixed tasks are the standard ones whatever they say.

    Example:
        >>> from paddlefsl.train.config import build_config
        >>> cfg, _ = build_config(dataset="sinusoid")
        >>> len(build_tasks(cfg, "val", num_tasks=5))
        5

    """
    if seed is None:
        seed = config.seed if num_tasks is None else eval_seed(split)
    turn_tasks = num_tasks is None and config.omniglot_rotations == "per-task"
    if config.dataset == "sinusoid":
        source: Any = SinusoidTasks(shots=config.shots, queries=config.queries, seed=seed)
    else:
        dataset = build_dataset(config, split, rotations=not turn_tasks)
        source = TaskSampler(dataset, config.ways, config.shots, config.queries, seed=seed)
    if num_tasks is not None:
        return FixedTasks(source, num_tasks)
    if config.task_pool:
        source = TaskPool(source, config.task_pool)
    # After the pool: a pool's characters come back, turned afresh (cbfinn/maml).
    return RandomClassRotation(source, seed=seed) if turn_tasks else source


def build_trainer(
    config: TrainConfig, progress: bool = True, learner: BaseLearner | None = None
) -> MetaTrainer:
    """A :class:`MetaTrainer` for the whole configuration (data, model, optimizer).

    The model is initialised from ``paddle.seed(config.seed)``, so two runs with the same
    configuration start from the same weights.
    """
    paddle.seed(config.seed)
    learner = build_learner(config) if learner is None else learner
    optimizer = build_optimizer(config, learner)
    train_tasks = build_tasks(config, "train")
    val_tasks = build_tasks(config, "val", num_tasks=config.val_tasks) if config.val_tasks else None
    return MetaTrainer(
        learner,
        optimizer,
        train_tasks,
        meta_batch_size=config.meta_batch_size,
        inner_steps=config.inner_steps,
        inner_steps_test=config.inner_steps_test,
        val_tasks=val_tasks,
        task_type=config.task_type,
        output_dir=config.output,
        eval_every=config.eval_every,
        checkpoint_every=config.checkpoint_every,
        keep_every=config.keep_every,
        log_every=config.log_every,
        config=config.to_dict(),
        num_workers=config.num_workers,
        progress=progress,
    )
