"""Exception types raised by :mod:`paddlefsl.data`.

Each one subclasses the built-in exception a caller would expect
(``FileNotFoundError`` or ``ValueError``), so ``except ValueError`` keeps working,
while tests and callers can still tell the cases apart.
"""

from __future__ import annotations

__all__ = ["ChecksumError", "CorruptDataError", "DatasetNotFoundError", "TaskConfigError"]


class DatasetNotFoundError(FileNotFoundError):
    """The dataset files are not where they were expected.

    The message lists the files that were looked for and where to get them.

    Example:
        >>> try:
        ...     raise DatasetNotFoundError("no images_background.zip in /data")
        ... except FileNotFoundError as err:
        ...     print(err)
        no images_background.zip in /data

    """


class CorruptDataError(ValueError):
    """An archive, image, pickle or split file exists but cannot be read.

    Example:
        >>> isinstance(CorruptDataError("bad zip"), ValueError)
        True

    """


class ChecksumError(CorruptDataError):
    """A downloaded or local file does not have the expected sha256.

    Example:
        >>> isinstance(ChecksumError("sha256 mismatch"), CorruptDataError)
        True

    """


class TaskConfigError(ValueError):
    """A task cannot be drawn from a dataset (too many ways, shots or queries).

    Example:
        >>> isinstance(TaskConfigError("ways=10 > 5 classes"), ValueError)
        True

    """
