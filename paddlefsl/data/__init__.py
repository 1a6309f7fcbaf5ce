"""Few-shot data: task sampling, meta-batch loading and benchmark datasets.

Example:
    >>> import numpy as np
    >>> from paddlefsl.data import MetaBatchLoader, TaskSampler
    >>> images, labels = np.zeros((100, 28, 28), np.uint8), np.repeat(np.arange(20), 5)
    >>> sampler = TaskSampler((images, labels), ways=5, shots=1, queries=3, seed=0)
    >>> batch = next(iter(MetaBatchLoader(sampler, meta_batch_size=8)))
    >>> list(batch.support_x.shape), list(batch.query_y.shape)
    ([8, 5, 1, 28, 28], [8, 15])

"""

from .base import ClassDataset, DatasetAdapter, as_class_dataset
from .cache import ArrayCache, default_cache_root
from .download import RemoteFile, download_file, extract_zip, sha256_file
from .errors import ChecksumError, CorruptDataError, DatasetNotFoundError, TaskConfigError
from .miniimagenet import MiniImageNet
from .omniglot import OMNIGLOT_ARCHIVES, Omniglot
from .sampler import (
    DEFAULT_EVAL_SEED,
    FixedTasks,
    MetaBatchLoader,
    Task,
    TaskBatch,
    TaskSampler,
    TaskSource,
    fixed_tasks,
)
from .sinusoid import SinusoidTasks
from .task_sources import RandomClassRotation, TaskPool

__all__ = [
    "DEFAULT_EVAL_SEED",
    "OMNIGLOT_ARCHIVES",
    "ArrayCache",
    "ChecksumError",
    "ClassDataset",
    "CorruptDataError",
    "DatasetAdapter",
    "DatasetNotFoundError",
    "FixedTasks",
    "MetaBatchLoader",
    "MiniImageNet",
    "Omniglot",
    "RandomClassRotation",
    "RemoteFile",
    "SinusoidTasks",
    "Task",
    "TaskBatch",
    "TaskConfigError",
    "TaskPool",
    "TaskSampler",
    "TaskSource",
    "as_class_dataset",
    "default_cache_root",
    "download_file",
    "extract_zip",
    "fixed_tasks",
    "sha256_file",
]
