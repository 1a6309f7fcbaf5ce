"""Opt-in dataset download: sha256-verified and atomic.

A download goes to a temporary file next to its destination and is only renamed
into place after its sha256 matched; an archive is extracted into a temporary
directory that is renamed into place when extraction finished. An error or Ctrl-C
at any point leaves no partial file or folder behind under the final names.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ChecksumError, CorruptDataError

__all__ = ["RemoteFile", "download_file", "extract_zip", "sha256_file"]

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20


@dataclass(frozen=True)
class RemoteFile:
    """A downloadable file and the sha256 it must have.

    Attributes:
        url: Where to fetch it (``http(s)://`` or ``file://``).
        sha256: Expected hex digest; ``None`` skips verification (not recommended).
        filename: Name to store it under.
        source: Where the checksum comes from (shown in error messages).

    Example:
        >>> RemoteFile("https://example.org/a.zip", None, "a.zip").filename
        'a.zip'

    """

    url: str
    sha256: str | None
    filename: str
    source: str = ""


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "x"; _ = p.write_bytes(b"abc")
        >>> sha256_file(p)[:12]
        'ba7816bf8f01'

    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(remote: RemoteFile, directory: str | os.PathLike, timeout: float = 60.0) -> Path:
    """Download ``remote`` into ``directory`` atomically, verifying its sha256.

    Raises:
        ChecksumError: The downloaded bytes do not have ``remote.sha256``.
        OSError: The server could not be reached or the transfer broke off.

    Example:
        >>> import pathlib, tempfile
        >>> src = pathlib.Path(tempfile.mkdtemp()) / "a.txt"; _ = src.write_bytes(b"abc")
        >>> digest = sha256_file(src)
        >>> out = download_file(RemoteFile(src.as_uri(), digest, "b.txt"), src.parent)
        >>> out.read_bytes()
        b'abc'

    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dest = directory / remote.filename
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{remote.filename}.", suffix=".part")
    digest = hashlib.sha256()
    try:
        logger.info("downloading %s", remote.url)
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(remote.url, timeout=timeout) as response:
                    expected = response.headers.get("Content-Length")
                    received = 0
                    while chunk := response.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                        received += len(chunk)
                # read(n) reports a connection dropped mid-body as a normal end of data.
                if expected is not None and received != int(expected):
                    raise OSError(f"connection closed after {received} of {expected} bytes")
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
                raise OSError(
                    f"download of {remote.url} failed: {err}. Fix: check the network (or "
                    f"proxy) and retry, or fetch {remote.filename} by hand into {directory}."
                ) from err
            out.flush()
            os.fsync(out.fileno())
        actual = digest.hexdigest()
        if remote.sha256 is not None and actual != remote.sha256.lower():
            raise ChecksumError(
                f"sha256 mismatch for {remote.filename} from {remote.url}: got {actual}, "
                f"expected {remote.sha256}{f' ({remote.source})' if remote.source else ''}. "
                "The download is corrupt or the file changed upstream. Fix: retry; if the "
                "new file is trusted, override the expected checksum (see docs/data.md)."
            )
        os.replace(tmp, dest)
        tmp = ""
    finally:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
    return dest


def extract_zip(archive: str | os.PathLike, directory: str | os.PathLike, top: str) -> Path:
    """Extract folder ``top`` of a zip into ``directory/top`` atomically.

    Members are first extracted into a temporary directory beside the target,
    which is renamed to ``directory/top`` only when complete.

    Raises:
        CorruptDataError: The archive is unreadable, unsafe, or lacks ``top/``.

    Example:
        >>> import pathlib, tempfile, zipfile
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> with zipfile.ZipFile(d / "a.zip", "w") as z:
        ...     z.writestr("top/x.txt", "hi")
        >>> extract_zip(d / "a.zip", d, "top").joinpath("x.txt").read_text()
        'hi'

    """
    directory = Path(directory)
    final = directory / top
    staging = Path(tempfile.mkdtemp(dir=directory, prefix=f".{top}.extract-"))
    try:
        try:
            with zipfile.ZipFile(archive) as zf:
                for member in zf.namelist():
                    target = (staging / member).resolve()
                    if not target.is_relative_to(staging.resolve()):
                        raise CorruptDataError(
                            f"{archive}: member {member!r} would extract outside the target "
                            "folder; refusing. Fix: re-download the archive from its source."
                        )
                zf.extractall(staging)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as err:
            raise CorruptDataError(
                f"{archive} is not a valid zip archive ({err}). Fix: delete it and download "
                "it again."
            ) from err
        if not (staging / top).is_dir():
            raise CorruptDataError(
                f"{archive} has no top-level folder {top}/. Fix: use the official archive."
            )
        if final.exists():
            raise FileExistsError(f"{final} already exists; not overwriting it.")
        os.replace(staging / top, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final
