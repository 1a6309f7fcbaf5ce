"""Meta-training, evaluation and checkpoints on top of :mod:`paddlefsl.metaopt`.

Example:
    >>> import numpy as np, paddle
    >>> from paddlefsl.data import TaskSampler, fixed_tasks
    >>> from paddlefsl.metaopt import MAML
    >>> from paddlefsl.models import Conv4
    >>> from paddlefsl.train import MetaTrainer, evaluate
    >>> data = (np.random.rand(60, 16, 16).astype(np.float32), np.repeat(np.arange(6), 10))
    >>> maml = MAML(Conv4(1, 3, hidden=4, image_size=16), lr=0.4)
    >>> opt = paddle.optimizer.Adam(1e-3, parameters=maml.parameters())
    >>> trainer = MetaTrainer(maml, opt, TaskSampler(data, 3, 1, 2), meta_batch_size=2,
    ...                       progress=False)
    >>> _ = trainer.fit(iterations=2)
    >>> evaluate(maml, fixed_tasks(data, 3, 1, 2, num_tasks=4), inner_steps=1).metric
    'accuracy'

"""

from .checkpoint import (
    Checkpoint,
    CheckpointManager,
    export_checkpoint,
    load_checkpoint,
    resolve_checkpoint,
)
from .config import TrainConfig, build_config, load_config
from .errors import (
    CheckpointError,
    ConfigError,
    ConfigMismatchError,
    NonFiniteLossError,
    RunInUseError,
)
from .evaluate import (
    EvalResult,
    PairedDifference,
    confidence_interval,
    evaluate,
    paired_difference,
    unpaired_fields,
)
from .metrics import MetricsLog, plot_learning_curve, read_metrics
from .objectives import CLASSIFICATION, REGRESSION, Objective
from .presets import PRESETS, Preset, get_preset
from .rng import capture_rng_state, restore_rng_state, seed_everything
from .scoring import EvalOptions, KeptScore, eval_config, score_checkpoint, score_kept, task_fields
from .status import RunStatus, format_status, run_status
from .trainer import FitResult, MetaTrainer

__all__ = [
    "CLASSIFICATION",
    "PRESETS",
    "REGRESSION",
    "Checkpoint",
    "CheckpointError",
    "CheckpointManager",
    "ConfigError",
    "ConfigMismatchError",
    "EvalOptions",
    "EvalResult",
    "FitResult",
    "KeptScore",
    "MetaTrainer",
    "MetricsLog",
    "NonFiniteLossError",
    "Objective",
    "PairedDifference",
    "Preset",
    "RunInUseError",
    "RunStatus",
    "TrainConfig",
    "build_config",
    "capture_rng_state",
    "confidence_interval",
    "eval_config",
    "evaluate",
    "export_checkpoint",
    "format_status",
    "get_preset",
    "load_checkpoint",
    "load_config",
    "paired_difference",
    "plot_learning_curve",
    "read_metrics",
    "resolve_checkpoint",
    "restore_rng_state",
    "run_status",
    "score_checkpoint",
    "score_kept",
    "seed_everything",
    "task_fields",
    "unpaired_fields",
]
