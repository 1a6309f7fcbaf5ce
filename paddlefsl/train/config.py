"""The run configuration: defaults, presets, explicit options, validation, resume checks."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, ConfigMismatchError
from .presets import DATASET_DEFAULTS, get_preset, reference_meta_grad_clip

__all__ = [
    "ALGORITHMS",
    "CONV_PADDINGS",
    "DATASETS",
    "MODEL_FIELDS",
    "NETWORKS",
    "OMNIGLOT_ROTATIONS",
    "RUNTIME_FIELDS",
    "TrainConfig",
    "build_config",
    "check_resume",
    "config_diff",
    "load_config",
    "runtime_fields",
]

ALGORITHMS = ("maml", "fomaml", "anil", "metasgd")
DATASETS = ("omniglot", "miniimagenet", "sinusoid")

#: Fields that shape the network: a warm start needs the same values.
MODEL_FIELDS = ("dataset", "ways", "hidden", "pooling", "image_size", "network", "conv_padding")
#: Conv4 variants (``--network``): Paddle's defaults, or cbfinn/maml's details.
NETWORKS = ("default", "reference")
#: Conv4 padding (``--conv-padding``): 1 pixel on every side, or TensorFlow's SAME.
CONV_PADDINGS = ("symmetric", "same")
#: How Omniglot's rotations enter training (``--omniglot-rotations``).
OMNIGLOT_ROTATIONS = ("classes", "per-task")
#: Meta learning-rate schedules (``--meta-lr-schedule``).
META_LR_SCHEDULES = ("constant", "cosine")

#: Fields that may change when a run is resumed: they never change the weights.
RUNTIME_FIELDS = frozenset(
    {
        "iterations",
        "eval_every",
        "checkpoint_every",
        "keep_every",
        "log_every",
        "val_tasks",
        "eval_tasks",
        "num_workers",
        "data_root",
        "output",
        "preset",
        "nproc",
    }
)

CONFIG_FILE = "config.json"


def runtime_fields(saved: dict[str, Any]) -> frozenset[str]:
    """The fields a resume of the run configured as ``saved`` may change.

    :data:`RUNTIME_FIELDS`, except that a cosine meta-LR schedule ends at ``iterations``:
    there another ``iterations`` would change the learning rate of every later step.

    Example:
        >>> "iterations" in runtime_fields({"meta_lr_schedule": "cosine"})
        False

    """
    if saved.get("meta_lr_schedule", "constant") == "cosine":
        return RUNTIME_FIELDS - {"iterations"}
    return RUNTIME_FIELDS


@dataclass
class TrainConfig:
    """Everything that defines a meta-training run (saved as ``config.json``).

    Attributes:
        algorithm: ``"maml"``, ``"fomaml"`` (first-order MAML), ``"anil"`` or
            ``"metasgd"`` (a learned learning rate per weight, starting at ``inner_lr``).
        dataset: ``"omniglot"``, ``"miniimagenet"`` or ``"sinusoid"``.
        ways: Classes per task (1 for sinusoid).
        shots: Support examples per class (points per sinusoid task).
        queries: Query examples per class; ``None`` means the dataset default
            (15 for miniImageNet, ``shots`` otherwise, as in cbfinn/maml).
        meta_batch_size: Tasks per meta-update.
        inner_steps: Inner-loop steps during meta-training.
        inner_steps_test: Inner-loop steps for validation and evaluation.
        inner_lr: Inner-loop (adaptation) learning rate.
        meta_lr: Adam learning rate of the meta-update.
        meta_lr_schedule: ``"constant"`` (the papers') or ``"cosine"``: annealed from
            ``meta_lr`` to 0 over ``iterations`` (which a resume may then not change).
        meta_grad_clip: Clip every element of the meta-gradient to ``[-c, c]`` before
            the optimizer step; ``None`` or 0: no clipping. Unset on miniImageNet, it
            resolves to cbfinn/maml's clip (``[-10, 10]`` on its summed loss, which is
            ``ways * queries / shots`` times paddlefsl's mean loss):
            ``10 * shots / (ways * queries)``.
        iterations: Meta-updates in the whole run.
        seed: Seed of the model initialisation and of the training task stream.
        task_pool: Train on a fixed pool of this many tasks, cycled in order (as
            cbfinn/maml's 200,000-task list; see :class:`~paddlefsl.data.TaskPool`);
            ``None`` or 0: a fresh task every time.
        hidden: Conv4 channels, or the width of the two sinusoid MLP layers.
        pooling: Conv4 ``"max"`` (max-pool) or ``"stride"`` (strided convs).
        image_size: Image side in pixels.
        network: ``"default"`` (Conv4 with Paddle's BatchNorm and initialisation, every
            parameter adapted) or ``"reference"``, the details of cbfinn/maml: BatchNorm
            without scale and with epsilon 1e-3, whose offsets only the outer loop
            trains (the inner loop does not adapt them), Xavier-uniform convolutions
            and, with strided convolutions, a standard-normal head.
        conv_padding: ``"symmetric"`` (Conv4's convolutions pad 1 pixel on every side)
            or ``"same"``: TensorFlow's ``SAME``, as cbfinn/maml pads; with stride-2
            convolutions (Omniglot) it pads the odd pixel below and right only, so the
            network samples a grid one pixel off (see :class:`~paddlefsl.models.Conv4`).
        omniglot_scheme: Omniglot class split, ``"maml"`` or ``"vinyals"``.
        omniglot_antialias: Resize Omniglot's 1-bit originals in greyscale (smooth
            edges, as torchvision-based loaders such as learn2learn's do) instead of
            cbfinn/maml's binary nearest-neighbour images (see :class:`~paddlefsl.data.Omniglot`).
        omniglot_rotations: ``"classes"``: each character's 90/180/270-degree rotations
            are classes of their own (4 x 1,100 training classes; a task can hold one
            character twice); ``"per-task"``: training tasks draw distinct characters
            and turn each by its own random multiple of 90 degrees, drawn afresh for
            every task (cbfinn/maml; :class:`~paddlefsl.data.RandomClassRotation`).
            Validation and ``paddlefsl eval`` use the standard tasks either way.
        eval_every: Validate every N iterations (0: only at the end).
        checkpoint_every: Save the ``last`` checkpoint every N iterations (0: at the end).
        keep_every: Also keep every N-th iteration's checkpoint for good
            (``checkpoints/kept-NNNNNNN.json``; 0: none).
        log_every: Write a training row to ``metrics.jsonl`` every N iterations.
        val_tasks: Validation tasks (0 disables validation and the ``best`` checkpoint).
        eval_tasks: Test tasks of ``paddlefsl eval``.
        num_workers: Background threads loading tasks.
        nproc: Processes sharing each meta-batch (``paddle.distributed``; one per core on
            a CPU). Results match a one-process run up to float summation order.
        data_root: Dataset folder (unused for sinusoid).
        output: Run folder (config, metrics, checkpoints).
        preset: Name of the preset it started from, if any (informative).
        init_from: Weights to start from instead of a random initialisation: a run
            folder (its best checkpoint), an export folder (a model-zoo entry) or a
            checkpoint file. Only the weights: the optimizer starts afresh
            (see :meth:`~paddlefsl.train.MetaTrainer.warm_start`).

    Example:
        >>> cfg, _ = build_config(preset="maml-omniglot-5w1s", output="runs/x")
        >>> cfg.inner_lr, cfg.meta_batch_size, cfg.pooling
        (2.0, 32, 'stride')

    """

    algorithm: str = "maml"
    dataset: str = "omniglot"
    ways: int = 5
    shots: int = 1
    queries: int | None = None
    meta_batch_size: int = 32
    inner_steps: int = 1
    inner_steps_test: int = 3
    inner_lr: float = 2.0
    meta_lr: float = 1e-3
    meta_lr_schedule: str = "constant"
    meta_grad_clip: float | None = None
    iterations: int = 60000
    seed: int = 0
    task_pool: int | None = None
    hidden: int = 64
    pooling: str = "stride"
    image_size: int = 28
    network: str = "default"
    conv_padding: str = "symmetric"
    omniglot_scheme: str = "maml"
    omniglot_antialias: bool = False
    omniglot_rotations: str = "classes"
    eval_every: int = 500
    checkpoint_every: int = 500
    keep_every: int = 0
    log_every: int = 10
    val_tasks: int = 100
    eval_tasks: int = 600
    num_workers: int = 0
    nproc: int = 1
    data_root: str | None = None
    output: str | None = None
    preset: str | None = None
    init_from: str | None = None

    @classmethod
    def fields(cls) -> list[str]:
        """Names of all fields."""
        return [f.name for f in dataclasses.fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of all fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a dict; unknown keys are an error (a newer or foreign config)."""
        unknown = sorted(set(data) - set(cls.fields()))
        if unknown:
            raise ConfigError(f"unknown configuration fields {unknown}")
        return cls(**data)

    @property
    def first_order(self) -> bool:
        """Whether meta-training drops second-order terms (FOMAML)."""
        return self.algorithm == "fomaml"

    @property
    def task_type(self) -> str:
        """``"regression"`` for sinusoid, ``"classification"`` otherwise."""
        return "regression" if self.dataset == "sinusoid" else "classification"

    def validate(self) -> TrainConfig:
        """Check every field; raises :class:`ConfigError` naming the option. Returns self."""
        _choice("algorithm", self.algorithm, ALGORITHMS)
        _choice("dataset", self.dataset, DATASETS)
        _choice("pooling", self.pooling, ("max", "stride"))
        _choice("omniglot_scheme", self.omniglot_scheme, ("maml", "vinyals"))
        _choice("network", self.network, NETWORKS)
        _choice("conv_padding", self.conv_padding, CONV_PADDINGS)
        _choice("omniglot_rotations", self.omniglot_rotations, OMNIGLOT_ROTATIONS)
        if self.omniglot_rotations != "classes" and self.dataset != "omniglot":
            raise ConfigError(
                f"--omniglot-rotations applies to --dataset omniglot only (got "
                f"{self.dataset}); drop it"
            )
        _choice("meta_lr_schedule", self.meta_lr_schedule, META_LR_SCHEDULES)
        for name in (
            "ways",
            "shots",
            "queries",
            "meta_batch_size",
            "inner_steps",
            "inner_steps_test",
            "iterations",
            "hidden",
            "image_size",
            "log_every",
            "eval_tasks",
            "nproc",
        ):
            _integer(name, getattr(self, name), 1)
        for name in (
            "seed",
            "eval_every",
            "checkpoint_every",
            "keep_every",
            "val_tasks",
            "num_workers",
        ):
            _integer(name, getattr(self, name), 0)
        for name in ("inner_lr", "meta_lr"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ConfigError(f"{_flag(name)} must be a positive number (got {value!r})")
        if not isinstance(self.omniglot_antialias, bool):
            raise ConfigError(
                f"--omniglot-antialias must be true or false (got {self.omniglot_antialias!r})"
            )
        if self.omniglot_antialias and self.dataset != "omniglot":
            raise ConfigError(
                f"--omniglot-antialias applies to --dataset omniglot only (got "
                f"{self.dataset}); drop it"
            )
        if self.task_pool is not None:
            _integer("task_pool", self.task_pool, 0)
        clip = self.meta_grad_clip
        if clip is not None and (
            isinstance(clip, bool)
            or not isinstance(clip, (int, float))
            or not math.isfinite(clip)
            or clip < 0
        ):
            raise ConfigError(
                f"--meta-grad-clip must be a number >= 0 (0: no clipping; got {clip!r})"
            )
        if self.init_from is not None and (
            not isinstance(self.init_from, str) or not self.init_from.strip()
        ):
            raise ConfigError(
                f"--init-from must name a run folder, an export folder or a checkpoint "
                f"file (got {self.init_from!r})"
            )
        if self.dataset == "sinusoid" and self.ways != 1:
            raise ConfigError(
                f"--ways does not apply to --dataset sinusoid (got {self.ways}); drop it"
            )
        if self.dataset == "sinusoid" and self.network != "default":
            raise ConfigError(
                f"--network {self.network} describes the Conv4 of the image datasets; "
                "drop it for --dataset sinusoid"
            )
        if self.dataset == "sinusoid" and self.conv_padding != "symmetric":
            raise ConfigError(
                f"--conv-padding {self.conv_padding} describes the Conv4 of the image "
                "datasets; drop it for --dataset sinusoid"
            )
        if self.dataset != "sinusoid" and self.pooling == "max" and self.image_size < 16:
            raise ConfigError(
                f"--image-size {self.image_size} is too small for Conv4 with "
                "max-pooling (four 2x2 pools need at least 16 pixels)"
            )
        return self


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{_flag(name)} must be one of {', '.join(choices)} (got {value!r})")


def _integer(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{_flag(name)} must be an integer >= {minimum} (got {value!r})")


def build_config(preset: str | None = None, **options: Any) -> tuple[TrainConfig, set[str]]:
    """Merge defaults, the dataset's defaults, a preset and explicit options (in that order).

    Args:
        preset: Preset name (see :mod:`paddlefsl.train.presets`).
        **options: Explicit fields; they override the preset.

    Returns:
        The validated config and the set of fields that were specified (by the preset
        or explicitly), as opposed to defaulted.

    Raises:
        ConfigError: unknown preset or field, or an invalid value.

    Example:
        >>> cfg, given = build_config("maml-miniimagenet-5w1s", inner_lr=0.02)
        >>> cfg.inner_lr, cfg.inner_steps, "inner_lr" in given
        (0.02, 5, True)

    """
    unknown = sorted(set(options) - set(TrainConfig.fields()))
    if unknown:
        raise ConfigError(f"unknown configuration fields {unknown}")
    preset_values: dict[str, Any] = {}
    if preset is not None:
        try:
            preset_values = dict(get_preset(preset).values)
        except KeyError as err:
            raise ConfigError(err.args[0]) from None
    dataset = options.get("dataset", preset_values.get("dataset", TrainConfig.dataset))
    if dataset not in DATASETS:
        raise ConfigError(f"--dataset must be one of {', '.join(DATASETS)} (got {dataset!r})")
    values: dict[str, Any] = dict(DATASET_DEFAULTS[dataset])
    values.update(preset_values)
    values.update(options)
    values["preset"] = preset
    if values.get("queries") is None:
        values["queries"] = 15 if dataset == "miniimagenet" else values.get("shots", 1)
    if dataset == "miniimagenet" and values.get("meta_grad_clip") is None:
        values["meta_grad_clip"] = reference_meta_grad_clip(
            values.get("ways", TrainConfig.ways), values.get("shots", 1), values["queries"]
        )
    if values.get("algorithm") == "metasgd" and "inner_steps_test" not in {
        *preset_values,
        *options,
    }:
        # Learned per-weight rates fit the number of steps they were trained with (Li et
        # al., 2017, adapt "in just one step"); ten steps of one-step rates diverge on
        # sinusoids (docs/concepts.md).
        values["inner_steps_test"] = values.get("inner_steps", TrainConfig.inner_steps)
    config = TrainConfig(**values).validate()
    return config, set(preset_values) | set(options)


def config_diff(
    saved: dict[str, Any],
    given: dict[str, Any],
    only: set[str] | None = None,
    ignore: frozenset[str] | set[str] = RUNTIME_FIELDS,
) -> dict[str, tuple[Any, Any]]:
    """Fields whose values differ: ``{name: (saved, given)}``.

    Args:
        saved: The saved configuration.
        given: The new one.
        only: Compare only these fields (e.g. those given on the command line).
        ignore: Never compare these (by default the :data:`RUNTIME_FIELDS`).

    Example:
        >>> config_diff({"inner_lr": 0.4, "iterations": 10}, {"inner_lr": 0.1, "iterations": 20})
        {'inner_lr': (0.4, 0.1)}

    """
    names = set(saved) | set(given)
    if only is not None:
        names &= set(only)
    # A field missing from one side (a record written before the field existed) has its
    # default value there.
    defaults = TrainConfig().to_dict()
    out = {}
    for name in sorted(names - set(ignore)):
        a, b = saved.get(name, defaults.get(name)), given.get(name, defaults.get(name))
        same = a == b or (isinstance(a, float) and isinstance(b, float) and math.isclose(a, b))
        if not same:
            out[name] = (a, b)
    return out


def load_config(run_dir: str | os.PathLike) -> TrainConfig:
    """Read ``<run>/config.json``.

    Raises:
        ConfigError: missing or unreadable file.

    """
    path = Path(run_dir) / CONFIG_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no {CONFIG_FILE} in {run_dir}: is it a paddlefsl run folder?") from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read {path}: {err}") from err
    return TrainConfig.from_dict(data)


def check_resume(
    saved: dict[str, Any], given: dict[str, Any], only: set[str] | None = None
) -> None:
    """Raise :class:`ConfigMismatchError` if a weight-changing field differs.

    Runtime fields (:func:`runtime_fields` of ``saved``) may differ; with ``only``, just
    those fields are compared.

    Example:
        >>> check_resume({"seed": 0}, {"seed": 0})

    """
    diff = config_diff(saved, given, only=only, ignore=runtime_fields(saved))
    if diff:
        raise ConfigMismatchError(
            diff, "start a new run with another --output, or drop the differing options"
        )
