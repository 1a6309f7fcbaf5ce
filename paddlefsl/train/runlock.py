"""An exclusive lock on a run folder while a trainer writes to it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO

from .._filelock import open_lock_file, try_lock_exclusive
from .errors import RunInUseError

__all__ = ["LOCK_FILE", "RunLock"]

#: The lock file in a run folder; it holds the pid of the process training there.
LOCK_FILE = ".lock"


class RunLock:
    """``flock`` on ``<run>/.lock``, so one process at a time writes a run folder.

    The operating system drops the lock when its process ends, however it ends, so a
    killed run never leaves the folder locked. Without ``fcntl`` (not POSIX) it does
    not lock.

    Args:
        directory: The run folder (created if missing).

    Example:
        >>> import tempfile
        >>> run = tempfile.mkdtemp()
        >>> lock = RunLock(run)
        >>> lock.acquire()
        >>> try:
        ...     RunLock(run).acquire()
        ... except RunInUseError as err:
        ...     print(f"pid {os.getpid()}" in str(err))
        True
        >>> lock.release()
        >>> RunLock(run).acquire()  # free again

    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self._file: IO[str] | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._file is not None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`RunInUseError` naming the holder's pid."""
        if self._file is not None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        file = open_lock_file(self.directory / LOCK_FILE)
        if not try_lock_exclusive(file):
            file.seek(0)
            holder = file.read().strip()
            file.close()
            who = f" (pid {holder})" if holder.isdigit() else ""
            stop = f"kill -TERM {holder}" if holder.isdigit() else "SIGTERM"
            raise RunInUseError(
                f"{self.directory} is in use by another training process{who}; wait for it "
                f"to end, or stop it ({stop} saves a checkpoint) and then resume"
            ) from None
        file.seek(0)
        file.truncate()
        file.write(f"{os.getpid()}\n")
        file.flush()
        self._file = file

    def release(self) -> None:
        """Drop the lock (closing the file releases it)."""
        if self._file is not None:
            self._file.close()
            self._file = None
