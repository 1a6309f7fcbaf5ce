from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest

from paddlefsl.data.cache import ArrayCache, cache_directories, describe_sources, load_or_build


def fill_arange(alloc):
    alloc("a", (4, 3), np.uint8)[:] = np.arange(12, dtype=np.uint8).reshape(4, 3)
    alloc("b", (4,), np.int64)[:] = [3, 2, 1, 0]
    return {"note": "hi"}


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_roundtrip_memmapped(tmp_path):
    cache = ArrayCache(tmp_path, "demo", {"v": 1, "t": (1, 2)})
    assert cache.load() is None
    arrays, extra = cache.build(fill_arange)
    assert extra == {"note": "hi"} and isinstance(arrays["a"], np.memmap)
    assert files(tmp_path) == ["demo.a.npy", "demo.b.npy", "demo.json"]
    loaded, _ = ArrayCache(tmp_path, "demo", {"v": 1, "t": [1, 2]}).load()
    assert loaded["b"].tolist() == [3, 2, 1, 0] and not loaded["a"].flags.writeable


def test_key_change_makes_cache_stale(tmp_path):
    ArrayCache(tmp_path, "demo", {"v": 1}).build(fill_arange)
    assert ArrayCache(tmp_path, "demo", {"v": 2}).load() is None


@pytest.mark.parametrize("damage", ["truncate", "replace", "header", "no-header"])
def test_damaged_cache_is_invalid(tmp_path, damage):
    ArrayCache(tmp_path, "demo", {"v": 1}).build(fill_arange)
    npy, header = tmp_path / "demo.a.npy", tmp_path / "demo.json"
    if damage == "truncate":
        with open(npy, "r+b") as f:
            f.truncate(npy.stat().st_size - 1)
    elif damage == "replace":  # same size, written later (e.g. by another build)
        np.save(npy, np.zeros((4, 3), np.uint8))
    elif damage == "header":
        header.write_text(header.read_text()[:20])
    else:
        header.unlink()
    assert ArrayCache(tmp_path, "demo", {"v": 1}).load() is None
    arrays, _, _ = load_or_build([tmp_path], "demo", {"v": 1}, fill_arange)
    assert arrays["a"][3].tolist() == [9, 10, 11]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failed_build_leaves_no_files(tmp_path, error):
    def fill(alloc):
        alloc("a", (100,), np.uint8)[:] = 1
        raise error("stop")

    with pytest.raises(error):
        ArrayCache(tmp_path, "demo", {}).build(fill)
    assert files(tmp_path) == []


def test_rebuild_over_old_cache_is_atomic(tmp_path):
    ArrayCache(tmp_path, "demo", {"v": 1}).build(fill_arange)

    def failing(alloc):
        alloc("a", (4, 3), np.uint8)[:] = 0
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError):
        ArrayCache(tmp_path, "demo", {"v": 2}).build(failing)
    # the old, complete cache is untouched and still valid for its key
    arrays, _ = ArrayCache(tmp_path, "demo", {"v": 1}).load()
    assert arrays["a"][1].tolist() == [3, 4, 5]


def test_unwritable_directory_falls_through(tmp_path, monkeypatch):
    first, second = tmp_path / "first", tmp_path / "second"
    real_build = ArrayCache.build

    def build(self, fill):
        if self.directory == first:  # as on a read-only mount, even for root
            raise OSError(errno.EROFS, "Read-only file system", str(first))
        return real_build(self, fill)

    monkeypatch.setattr(ArrayCache, "build", build)
    arrays, _, where = load_or_build([first, second], "demo", {}, fill_arange)
    assert where == second and arrays["b"].tolist() == [3, 2, 1, 0]
    with pytest.raises(OSError, match=r"could not write the dataset cache .*pass cache_dir="):
        load_or_build([first], "other", {}, fill_arange)

    def broken_source(alloc):
        raise FileNotFoundError(errno.ENOENT, "source vanished")

    with pytest.raises(FileNotFoundError, match="source vanished"):
        load_or_build([second], "third", {}, broken_source)


def test_cache_directories(tmp_path, monkeypatch):
    monkeypatch.setenv("PADDLEFSL_CACHE", str(tmp_path / "user"))
    data = tmp_path / "data"
    data.mkdir()
    assert cache_directories(data, None, "x")[0] == data / "paddlefsl-cache"
    data.chmod(0o555)
    try:
        dirs = cache_directories(data, None, "x")
    finally:
        data.chmod(0o755)
    assert len(dirs) == 1 and dirs[0].parent == tmp_path / "user"
    explicit = cache_directories(data, tmp_path / "mine", "x")
    assert len(explicit) == 1 and explicit[0].parent == tmp_path / "mine"
    other = cache_directories(tmp_path / "other", tmp_path / "mine", "x")
    assert other[0] != explicit[0], "different data roots need different cache folders"


def test_describe_sources_sees_changes(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f.png").write_bytes(b"1")
    before = describe_sources(tmp_path, [tmp_path / "d"])
    (tmp_path / "d" / "g.png").write_bytes(b"22")
    after = describe_sources(tmp_path, [tmp_path / "d"])
    assert before[0]["files"] == 1 and after[0]["files"] == 2 and after[0]["size"] == 3
    assert json.loads(json.dumps(after)) == after


_CONCURRENT_BUILD = """
import sys, time
from pathlib import Path
import numpy as np
from paddlefsl.data.cache import load_or_build

directory, builds = Path(sys.argv[1]), Path(sys.argv[2])
start = float(sys.argv[3])
time.sleep(max(0.0, start - time.time()))  # both processes reach the build together

def fill(alloc):
    with open(builds, "a") as f:
        f.write("build\\n")
    time.sleep(1.0)  # a slow decode: the other process arrives while this one writes
    alloc("v", (64,), np.uint8)[:] = 7
    return {}

arrays, _, _ = load_or_build([directory], "shared", {"k": 1}, fill)
assert arrays["v"].tolist() == [7] * 64
"""


def test_concurrent_builds_decode_once(tmp_path):
    # Two runs started together used to both decode, and one failed with "could not be
    # read back after writing" when the other replaced an array under its header.
    import subprocess
    import sys
    import time

    builds = tmp_path / "builds.txt"
    start = time.time() + 3.0
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CONCURRENT_BUILD, str(tmp_path / "c"), str(builds), str(start)],
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
    assert builds.read_text().count("build") == 1
