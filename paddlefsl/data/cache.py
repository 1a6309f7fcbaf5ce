"""Atomic, self-validating caches of decoded arrays (uint8 ``.npy``, memory-mapped).

A cache named ``<name>`` in a directory is a JSON header ``<name>.json`` plus one
``<name>.<array>.npy`` per array. The header records a format version, a *key*
(the decoding parameters and the size and mtime of every source file) and, for
each array, its shape, dtype, byte size and mtime. The header is written last, so
it only exists once all arrays are complete; any mismatch on load (another key,
truncated or replaced ``.npy``, unreadable JSON) makes the cache count as absent,
and the caller rebuilds it. Every file is written to a temporary name, flushed,
fsynced and then ``os.replace``-d into place, so a crash or Ctrl-C never leaves a
file that looks valid.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._filelock import lock_exclusive, open_lock_file
from .._fsync import fsync_path

__all__ = [
    "CACHE_FORMAT",
    "ArrayCache",
    "cache_directories",
    "cache_search_path",
    "default_cache_root",
    "describe_sources",
    "load_or_build",
]

logger = logging.getLogger(__name__)

#: Bump when the layout or the decoding of any dataset changes: old caches rebuild.
CACHE_FORMAT = 1

_UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}

_FILE_MODE = 0o644

Allocator = Callable[[str, Sequence[int], Any], np.ndarray]


def default_cache_root() -> Path:
    """``$PADDLEFSL_CACHE``, else ``$XDG_CACHE_HOME/paddlefsl``, else ``~/.cache/paddlefsl``.

    Example:
        >>> import os
        >>> os.environ["PADDLEFSL_CACHE"] = "/tmp/fsl-cache"
        >>> str(default_cache_root())
        '/tmp/fsl-cache'
        >>> del os.environ["PADDLEFSL_CACHE"]

    """
    if os.environ.get("PADDLEFSL_CACHE"):
        return Path(os.environ["PADDLEFSL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser() / "paddlefsl"


def _is_writable_dir(path: Path) -> bool:
    # os.access() says yes to root even for a chmod a-w tree (e.g. a shared,
    # read-only data directory), so the permission bits are checked as well: a
    # directory nobody may write to is treated as read-only.
    try:
        st = path.stat()
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode) or not os.access(path, os.W_OK | os.X_OK):
        return False
    if st.st_uid == os.geteuid():
        return bool(st.st_mode & stat.S_IWUSR)
    if st.st_gid in os.getgroups() or st.st_gid == os.getegid():
        return bool(st.st_mode & stat.S_IWGRP)
    return bool(st.st_mode & stat.S_IWOTH)


def cache_directories(
    root: str | os.PathLike, cache_dir: str | os.PathLike | None, dataset: str
) -> list[Path]:
    """Directories to look for (in order) and build (first that works) a cache in.

    An explicit ``cache_dir`` is used alone. Otherwise: ``<root>/paddlefsl-cache``
    if ``root`` is writable, then the user cache (:func:`default_cache_root`). Under
    a shared cache directory, a subfolder per dataset root keeps roots apart.

    Example:
        >>> cache_directories("/data/omniglot", "/tmp/c", "omniglot")[0].parent
        PosixPath('/tmp/c')

    """
    root = Path(root).expanduser().absolute()
    tag = f"{dataset}-{hashlib.sha1(str(root).encode()).hexdigest()[:10]}"
    if cache_dir is not None:
        return [Path(cache_dir).expanduser() / tag]
    dirs = [root / "paddlefsl-cache"] if _is_writable_dir(root) else []
    return dirs + [default_cache_root() / tag]


def cache_search_path(
    root: str | os.PathLike, cache_dir: str | os.PathLike | None, dataset: str
) -> tuple[list[Path], list[Path]]:
    """``(build, lookup)`` directories: where to build a cache, and where else to look.

    A valid cache is used wherever it already is -- next to the data (even if the
    data folder was made read-only after the cache was built), in the user cache,
    or in ``cache_dir`` -- so changing ``cache_dir`` never forces a rebuild.

    Example:
        >>> build, lookup = cache_search_path("/data/omniglot", "/tmp/c", "omniglot")
        >>> build[0].parent, lookup[0]
        (PosixPath('/tmp/c'), PosixPath('/data/omniglot/paddlefsl-cache'))

    """
    build = cache_directories(root, cache_dir, dataset)
    lookup = [Path(root).expanduser().absolute() / "paddlefsl-cache"]
    lookup += cache_directories(root, None, dataset)
    return build, [d for d in dict.fromkeys(lookup) if d not in build]


def describe_sources(root: str | os.PathLike, paths: Iterable[str | os.PathLike]) -> list[dict]:
    """Size and mtime of source files (a directory: file count, total size, newest mtime).

    Stored in a cache key, this makes a cache stale when its sources change.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp()); _ = (d / "a.zip").write_bytes(b"12")
        >>> describe_sources(d, [d / "a.zip"])[0]["size"]
        2

    """
    root = Path(root)
    out = []
    for p in paths:
        p = Path(p)
        rel = os.path.relpath(p, root)
        if p.is_dir():
            count = size = newest = 0
            for dirpath, _, files in os.walk(p):
                for f in files:
                    st = os.stat(os.path.join(dirpath, f))
                    count, size = count + 1, size + st.st_size
                    newest = max(newest, st.st_mtime_ns)
            out.append({"path": rel, "files": count, "size": size, "mtime_ns": newest})
        else:
            st = p.stat()
            out.append({"path": rel, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


class ArrayCache:
    """One named cache (a header plus ``.npy`` arrays) inside ``directory``.

    Args:
        directory: Where the cache files live (created on build).
        name: File name stem, e.g. ``"omniglot-28-nearest-inv"``.
        key: JSON-serialisable description of the sources and decoding parameters;
            a cache built with another key is stale.

    Example:
        >>> import tempfile
        >>> def fill(alloc):
        ...     alloc("x", (2, 3), "uint8")[:] = 7
        ...     return {"n": 2}
        >>> c = ArrayCache(tempfile.mkdtemp(), "demo", {"v": 1})
        >>> arrays, extra = c.build(fill)
        >>> c.load()[0]["x"].tolist(), c.load()[1]
        ([[7, 7, 7], [7, 7, 7]], {'n': 2})

    """

    def __init__(self, directory: str | os.PathLike, name: str, key: dict) -> None:
        self.directory = Path(directory)
        self.name = name
        self.key = json.loads(json.dumps(key))  # normalise (tuples -> lists) for comparison
        self.header_path = self.directory / f"{name}.json"

    def _array_path(self, array: str) -> Path:
        return self.directory / f"{self.name}.{array}.npy"

    def load(self) -> tuple[dict[str, np.ndarray], dict] | None:
        """Return ``(arrays, extra)`` memory-mapped read-only, or ``None`` if absent or stale."""
        try:
            header = json.loads(self.header_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            logger.info("cache header %s unreadable (%s); rebuilding", self.header_path, err)
            return None
        if header.get("format") != CACHE_FORMAT or header.get("key") != self.key:
            logger.info("cache %s is stale (sources or parameters changed)", self.header_path)
            return None
        arrays = {}
        try:
            for array, info in header["arrays"].items():
                path = self._array_path(array)
                st = path.stat()
                if st.st_size != info["size"] or st.st_mtime_ns != info["mtime_ns"]:
                    raise ValueError(f"{path.name} was truncated or replaced")
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
                if list(arr.shape) != info["shape"] or str(arr.dtype) != info["dtype"]:
                    raise ValueError(f"{path.name} has shape {arr.shape} {arr.dtype}")
                arrays[array] = arr
        except (OSError, ValueError, KeyError, TypeError) as err:
            logger.info("cache %s is invalid (%s); rebuilding", self.header_path, err)
            return None
        return arrays, header.get("extra") or {}

    def build(self, fill: Callable[[Allocator], dict | None]) -> tuple[dict[str, np.ndarray], dict]:
        """Create the cache atomically and return it as :meth:`load` would.

        ``fill(alloc)`` calls ``alloc(array_name, shape, dtype)`` to get writable
        memory-mapped arrays (backed by temporary files), fills them, and returns
        extra JSON-serialisable metadata to store in the header.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        temps: dict[str, tuple[str, np.ndarray]] = {}

        def alloc(array: str, shape: Sequence[int], dtype: Any) -> np.ndarray:
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{self.name}.{array}.")
            os.close(fd)
            os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600; a cache may be shared
            temps[array] = (tmp, None)  # type: ignore[assignment]  # registered for cleanup
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=tuple(shape))
            temps[array] = (tmp, arr)
            return arr

        header_tmp = None
        try:
            extra = fill(alloc) or {}
            header: dict[str, Any] = {"format": CACHE_FORMAT, "key": self.key, "arrays": {}}
            for array, (tmp, arr) in temps.items():
                shape, dtype = list(arr.shape), str(arr.dtype)
                arr.flush()
                del arr
                fsync_path(tmp)
                final = self._array_path(array)
                os.replace(tmp, final)
                st = final.stat()
                header["arrays"][array] = {
                    "shape": shape,
                    "dtype": dtype,
                    "size": st.st_size,
                    "mtime_ns": st.st_mtime_ns,
                }
            temps.clear()
            header["extra"] = extra
            fd, header_tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{self.name}.json.")
            os.chmod(header_tmp, _FILE_MODE)
            with os.fdopen(fd, "w") as f:
                json.dump(header, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(header_tmp, self.header_path)
            header_tmp = None
            fsync_path(self.directory, directory=True)
        finally:
            # Also runs on KeyboardInterrupt: leave no temporary files behind.
            for tmp, _ in temps.values():
                Path(tmp).unlink(missing_ok=True)
            if header_tmp is not None:
                Path(header_tmp).unlink(missing_ok=True)
        loaded = self.load()
        if loaded is None:
            raise OSError(f"cache {self.header_path} could not be read back after writing")
        return loaded


@contextlib.contextmanager
def _build_lock(directory: Path, name: str, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``<directory>/<name>.lock`` while a cache is built.

    Two processes started together (two runs, or the ranks of ``--nproc``) would
    otherwise both decode, and one's ``os.replace`` of an array would invalidate the
    header the other just wrote. Raises ``OSError`` if the directory is not writable.
    """
    directory.mkdir(parents=True, exist_ok=True)
    with open_lock_file(directory / f"{name}.lock") as lock:
        lock_exclusive(
            lock,
            on_wait=lambda: logger.warning(
                "waiting for another process decoding the %s into %s", what, directory
            ),
        )
        yield


def load_or_build(
    directories: Sequence[Path],
    name: str,
    key: dict,
    fill: Callable[[Allocator], dict | None],
    what: str = "dataset",
    lookup: Sequence[Path] = (),
) -> tuple[dict[str, np.ndarray], dict, Path]:
    """Load cache ``name`` from the first directory holding a valid one, else build it.

    ``directories`` and then ``lookup`` are searched for a valid cache. A build
    goes to the first of ``directories`` where writing works (a read-only
    location falls through to the next one).

    Returns:
        ``(arrays, extra, directory)``.

    Example:
        >>> import tempfile, pathlib
        >>> dirs = [pathlib.Path(tempfile.mkdtemp())]
        >>> def fill(alloc):
        ...     alloc("v", (4,), "uint8")[:] = 1
        >>> arrays, extra, where = load_or_build(dirs, "x", {"src": []}, fill)
        >>> arrays["v"].tolist(), where == dirs[0]
        ([1, 1, 1, 1], True)

    """
    for directory in [*directories, *lookup]:
        loaded = ArrayCache(directory, name, key).load()
        if loaded is not None:
            return loaded[0], loaded[1], Path(directory)
    errors = []
    for directory in directories:
        try:
            with _build_lock(Path(directory), name, what):
                # Another process may have built it while this one waited for the lock.
                cache = ArrayCache(directory, name, key)
                loaded = cache.load()
                if loaded is not None:
                    return loaded[0], loaded[1], Path(directory)
                logger.info("decoding %s into cache %s/%s (done once)", what, directory, name)
                arrays, extra = cache.build(fill)
            return arrays, extra, Path(directory)
        except OSError as err:
            # Only problems with the location itself move on to the next directory;
            # anything else (e.g. an unreadable source file) is the caller's error.
            if err.errno not in _UNWRITABLE:
                raise
            errors.append(f"{directory}: {err}")
    raise OSError(
        f"could not write the {what} cache in any of: {'; '.join(errors)}. "
        "Fix: pass cache_dir= pointing to a writable directory."
    )
