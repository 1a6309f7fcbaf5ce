"""Exclusive ``flock`` locks, shared by the dataset caches, the kernel build and run folders.

A lock lives as long as its open file: closing the file (or the end of the process,
however it ends) releases it. Without ``fcntl`` (not POSIX) locking does nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import IO

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]


def open_lock_file(path: str | os.PathLike) -> IO[str]:
    """Open (creating it) the file that carries a lock. Raises ``OSError`` if impossible."""
    return open(path, "a+")


def try_lock_exclusive(file: IO[str]) -> bool:
    """Take the exclusive lock on ``file`` without waiting; ``False`` if another holds it."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def is_locked(path: str | os.PathLike) -> bool:
    """Whether a process holds the lock of the existing file ``path`` (checked, not kept).

    Opens the file read-only and tries a shared lock without waiting: that fails only
    while someone holds the exclusive lock. Without ``fcntl`` it says ``False``.
    """
    if fcntl is None:
        return False
    with open(path) as file:
        try:
            fcntl.flock(file, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        return False  # closing the file drops the shared lock at once


def lock_exclusive(file: IO[str], on_wait: Callable[[], None] | None = None) -> None:
    """Take the exclusive lock on ``file``, waiting for it; ``on_wait()`` first if busy."""
    if try_lock_exclusive(file):
        return
    if on_wait is not None:
        on_wait()
    fcntl.flock(file, fcntl.LOCK_EX)
