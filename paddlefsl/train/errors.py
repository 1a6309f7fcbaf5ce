"""Exceptions of :mod:`paddlefsl.train`.

Each subclasses the built-in a caller would expect (``ValueError``,
``FloatingPointError``, ``RuntimeError``), so generic ``except`` clauses keep working
while the command line can map each kind to its exit code.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "ConfigError", "ConfigMismatchError", "NonFiniteLossError"]


class ConfigError(ValueError):
    """An option or option combination is invalid.

    Example:
        >>> isinstance(ConfigError("ways must be >= 1"), ValueError)
        True

    """


class ConfigMismatchError(ConfigError):
    """Resuming (or warm-starting) a run with a configuration that differs from the saved one.

    Attributes:
        fields: ``{name: (saved, given)}`` for every differing field.

    Example:
        >>> err = ConfigMismatchError({"inner_lr": (0.4, 0.1)})
        >>> "inner_lr" in str(err)
        True

    """

    def __init__(
        self, fields: dict[str, tuple[object, object]], hint: str = "", action: str = "resume"
    ) -> None:
        self.fields = dict(fields)
        listed = ", ".join(f"{k} (saved {s!r}, given {g!r})" for k, (s, g) in fields.items())
        message = f"cannot {action}: the configuration differs from the saved run in {listed}"
        super().__init__(message + (f"; {hint}" if hint else ""))


class NonFiniteLossError(FloatingPointError):
    """The meta-loss (or a meta-gradient) became NaN or infinite; training stopped.

    Attributes:
        iteration: The iteration (0-based) whose meta-batch produced it.
        checkpoint: Path of the last good checkpoint record, or ``None``.

    Example:
        >>> err = NonFiniteLossError("nan loss", iteration=7)
        >>> err.iteration
        7

    """

    def __init__(self, message: str, iteration: int = -1, checkpoint: str | None = None) -> None:
        super().__init__(message)
        self.iteration = iteration
        self.checkpoint = checkpoint


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged, or does not fit the model / optimizer.

    Example:
        >>> isinstance(CheckpointError("no checkpoint in runs/x"), RuntimeError)
        True

    """


class RunInUseError(RuntimeError):
    """Another process is training in the same run folder.

    Two trainers writing one folder would interleave their checkpoints and metrics, so
    the second one stops before writing anything.

    Example:
        >>> isinstance(RunInUseError("runs/x is in use"), RuntimeError)
        True

    """
