"""The sinusoid regression task distribution of the MAML paper (Finn et al., 2017)."""

from __future__ import annotations

import math

import numpy as np

from .sampler import Task

__all__ = ["SinusoidTasks"]


def _range(name: str, value: tuple[float, float]) -> tuple[float, float]:
    low, high = (float(v) for v in value)
    if not low <= high:
        raise ValueError(f"{name} must be (low, high) with low <= high, got {value!r}.")
    return low, high


class SinusoidTasks:
    """Regression tasks ``y = A * sin(x - phase)`` with random amplitude and phase.

    Defaults follow the MAML paper and its reference code (cbfinn/maml
    ``data_generator.py``, ``generate_sinusoid_batch`` at commit a7f45f1): amplitude
    ``U[0.1, 5]``, phase ``U[0, pi]``, inputs ``x ~ U[-5, 5]`` and the target
    ``amp * sin(x - phase)``. Task ``index`` is a pure function of ``(seed, index)``,
    so it works with :class:`~paddlefsl.data.MetaBatchLoader` and
    :class:`~paddlefsl.data.FixedTasks` like the image samplers.

    Args:
        shots: Support points per task (K).
        queries: Query points per task (Q).
        seed: Non-negative integer seed of the task stream.
        amplitude: ``(low, high)`` of the uniform amplitude.
        phase: ``(low, high)`` of the uniform phase.
        x_range: ``(low, high)`` of the uniform inputs.

    Example:
        >>> tasks = SinusoidTasks(shots=10, queries=10, seed=0)
        >>> t = tasks.sample(3)
        >>> t.support_x.shape, t.support_y.dtype, sorted(t.info)
        ((10, 1), dtype('float32'), ['amplitude', 'phase'])

    """

    def __init__(
        self,
        shots: int = 10,
        queries: int = 10,
        seed: int = 0,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
    ) -> None:
        for name, value, low in (("shots", shots, 1), ("queries", queries, 0), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
        self.shots, self.queries, self.seed = int(shots), int(queries), int(seed)
        self.amplitude = _range("amplitude", amplitude)
        self.phase = _range("phase", phase)
        self.x_range = _range("x_range", x_range)

    def sample(self, index: int) -> Task:
        """Return task number ``index``: x and y as float32 ``[K, 1]`` / ``[Q, 1]``."""
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
            raise ValueError(f"index must be an integer >= 0, got {index!r}.")
        rng = np.random.default_rng([self.seed, int(index)])
        amp = rng.uniform(*self.amplitude)
        phase = rng.uniform(*self.phase)
        x = rng.uniform(*self.x_range, size=(self.shots + self.queries, 1))
        y = amp * np.sin(x - phase)
        x, y = x.astype(np.float32), y.astype(np.float32)
        k = self.shots
        return Task(
            support_x=x[:k],
            support_y=y[:k],
            query_x=x[k:],
            query_y=y[k:],
            index=int(index),
            info={"amplitude": float(amp), "phase": float(phase)},
        )

    def __call__(self, x: np.ndarray, index: int) -> np.ndarray:
        """Evaluate task ``index``'s function at ``x`` (e.g. a dense grid for plots).

        Example:
            >>> import numpy as np
            >>> tasks = SinusoidTasks()
            >>> t = tasks.sample(0)
            >>> bool(np.allclose(tasks(t.query_x, 0), t.query_y, atol=1e-5))
            True

        """
        info = self.sample(index).info
        assert info is not None
        return (info["amplitude"] * np.sin(np.asarray(x) - info["phase"])).astype(np.float32)
