"""Download tests against a local HTTP server on 127.0.0.1; never the internet."""

from __future__ import annotations

import functools
import http.server
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from data_factories import OMNI_DRAWINGS, OMNI_LAYOUT, write_omniglot_zip

from paddlefsl.data import (
    OMNIGLOT_ARCHIVES,
    ChecksumError,
    CorruptDataError,
    DatasetNotFoundError,
    MiniImageNet,
    Omniglot,
    RemoteFile,
    download_file,
    extract_zip,
    sha256_file,
)


class Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/truncated/"):
            # Promise more bytes than are sent, then hang up: a broken transfer.
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"PK\x03\x04" + b"x" * 500)
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """Serve a folder of generated archives on 127.0.0.1 (port chosen by the OS)."""
    served = tmp_path_factory.mktemp("served")
    for top, alphabets in OMNI_LAYOUT.items():
        write_omniglot_zip(served / f"{top}.zip", top, alphabets)
    handler = functools.partial(Handler, directory=str(served))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", served
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def local_archives(server, monkeypatch) -> dict[str, RemoteFile]:
    url, served = server
    table = {
        top: RemoteFile(f"{url}/{top}.zip", sha256_file(served / f"{top}.zip"), f"{top}.zip")
        for top in OMNI_LAYOUT
    }
    for top, remote in table.items():
        monkeypatch.setitem(OMNIGLOT_ARCHIVES, top, remote)
    return table


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_omniglot_download(local_archives, tmp_path):
    root = tmp_path / "omni"
    ds = Omniglot(
        root,
        split="test",
        scheme="maml",
        maml_sizes=(3, 2),
        download=True,
        cache_dir=tmp_path / "cache",
    )
    assert ds.num_classes == 12 and len(ds) == 12 * OMNI_DRAWINGS
    assert names(root) == [
        "images_background",
        "images_background.zip",
        "images_evaluation",
        "images_evaluation.zip",
    ]
    assert (root / "images_background" / "Alpha" / "character03").is_dir()
    # Present now: a second construction does not download again.
    for top in local_archives:
        OMNIGLOT_ARCHIVES[top] = RemoteFile("http://127.0.0.1:9/unreachable", None, "x.zip")
    Omniglot(
        root,
        split="test",
        scheme="maml",
        maml_sizes=(3, 2),
        download=True,
        cache_dir=tmp_path / "cache",
    )


def test_checksum_mismatch_leaves_nothing(local_archives, tmp_path, monkeypatch):
    good = local_archives["images_background"]
    monkeypatch.setitem(
        OMNIGLOT_ARCHIVES,
        "images_background",
        RemoteFile(good.url, "0" * 64, good.filename, "test table"),
    )
    root = tmp_path / "omni"
    with pytest.raises(ChecksumError) as err:
        Omniglot(root, download=True, cache_dir=tmp_path / "cache")
    msg = str(err.value)
    assert "sha256 mismatch for images_background.zip" in msg
    assert good.sha256 in msg and "0" * 64 in msg and "test table" in msg
    assert names(root) == [], "no partial archive or folder may remain"


def test_broken_transfer_leaves_nothing(server, tmp_path):
    url, _ = server
    remote = RemoteFile(f"{url}/truncated/a.zip", None, "a.zip")
    with pytest.raises(OSError, match=r"download of .*truncated/a.zip failed"):
        download_file(remote, tmp_path)
    assert names(tmp_path) == []


def test_http_error_message(server, tmp_path):
    url, _ = server
    with pytest.raises(OSError, match=r"404.*Fix: check the network"):
        download_file(RemoteFile(f"{url}/missing.zip", None, "m.zip"), tmp_path)
    assert names(tmp_path) == []


def test_extract_is_atomic_and_safe(tmp_path):
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("top/ok.txt", "fine")
        zf.writestr("top/../../escape.txt", "bad")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(CorruptDataError, match="outside the target folder"):
        extract_zip(evil, out, "top")
    assert names(out) == [] and not (tmp_path / "escape.txt").exists()

    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("elsewhere/x.txt", "x")
    with pytest.raises(CorruptDataError, match="no top-level folder top/"):
        extract_zip(other, out, "top")
    (tmp_path / "junk.zip").write_bytes(b"junk")
    with pytest.raises(CorruptDataError, match="not a valid zip archive"):
        extract_zip(tmp_path / "junk.zip", out, "top")
    assert names(out) == []


def test_miniimagenet_has_no_download(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        MiniImageNet(tmp_path, split="train", download=True)
    msg = str(err.value)
    assert "no official download" in msg and "mini-imagenet-cache" in msg
    assert "train.csv" in msg and "meta-learning-lstm" in msg
