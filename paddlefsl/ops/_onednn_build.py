"""Building the oneDNN convolution ops of :mod:`paddlefsl.ops.onednn` (once per machine).

The Paddle wheel contains ``libdnnl.so.3`` but not its C++ headers, so the library is
built from ``_onednn_conv.cc`` (with ``_cpu_kernels.cc``, plain OpenMP loops for the
memory-bound layers) the first time it is needed:

1. the oneDNN 3.6 headers come from ``PADDLEFSL_ONEDNN_INCLUDE`` (a folder holding
   ``oneapi/dnnl/dnnl.hpp``), else from an installed ``onednn-devel`` wheel
   (``pip install --no-deps onednn-devel==2025.0.1``), else that wheel is downloaded with
   ``pip download --no-deps`` (about 200 KB) and its sha256 checked;
2. the wheel's ``dnnl_config.h`` describes a SYCL/TBB build, so a copy is rewritten for
   the OpenMP, CPU-only build that Paddle ships (checked against ``dnnl_version()``);
3. ``paddle.utils.cpp_extension.load`` compiles and links the ops against Paddle's
   ``libdnnl.so.3`` and ``libiomp5.so`` in a child process, which also checks the result
   against ``paddle.nn.functional.conv2d`` and the other layers against Paddle's;
4. the library is moved atomically into ``$PADDLEFSL_CACHE/onednn/<hash>`` (default
   ``~/.cache/paddlefsl/onednn/<hash>``), the hash covering the sources, flags, headers
   and the Paddle installation, under a file lock so concurrent processes build it once.

:func:`library_path` returns the built library, building it if needed; every failure
is a :class:`BuildError` whose message says what failed and how to fix it.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile
from pathlib import Path

import paddle

from .._filelock import lock_exclusive, open_lock_file, try_lock_exclusive

__all__ = [
    "ONEDNN_DEVEL",
    "OPS",
    "CONV_OPS",
    "CPU_OPS",
    "BuildError",
    "library_path",
    "paddle_libs",
]

#: The PyPI distribution the headers come from (oneDNN 3.6.1 headers; the Paddle 3.3.1
#: wheel ships oneDNN 3.6.2, whose API is the same).
ONEDNN_DEVEL = "onednn-devel==2025.0.1"
_WHEEL_FILE = "onednn_devel-2025.0.1-py2.py3-none-manylinux_2_28_x86_64.whl"
_WHEEL_SHA256 = "6daea2b679ccc59bf0c3a174b97ff99270d04bff1c5cacd7f1bc9b8eee99c86f"
_WHEEL_INCLUDE = "onednn_devel-2025.0.1.data/data/include/"
# _headers_digest() of the wheel's oneapi/dnnl folder: the cache key of a build from the
# downloaded wheel then equals that of a build from the same headers installed by pip.
_WHEEL_HEADERS_DIGEST = "66551dbf59f81786d3c9247e3e72bde7c1bddb638e9a9f59dcf5cfd3a2d53cfa"
# Headers only: the platform tag merely has to match the file on PyPI, not this machine.
_PIP_ARGS = ["--no-deps", "--only-binary=:all:", "--platform", "manylinux_2_28_x86_64"]

# The oneDNN convolutions, and plain OpenMP loops for the memory-bound layers.
_SOURCES = tuple(Path(__file__).with_name(name) for name in ("_onednn_conv.cc", "_cpu_kernels.cc"))
_NAME = "paddlefsl_onednn_conv"
CONV_OPS = (
    "onednn_conv2d_forward",
    "onednn_conv2d_backward_data",
    "onednn_conv2d_backward_weight",
    "onednn_conv2d_forward_bias",
    "onednn_conv2d_backward_weight_bias",
)
CPU_OPS = (
    "pfsl_channel_bias_add",
    "pfsl_channel_sum",
    "pfsl_relu",
    "pfsl_relu_backward",
    "pfsl_batch_norm_train",
    "pfsl_batch_norm_backward",
    "pfsl_batch_norm_double_backward",
    "pfsl_max_pool2d",
    "pfsl_max_pool2d_backward",
)
OPS = CONV_OPS + CPU_OPS
# No -march=native: the cache may be shared between machines; oneDNN's jit code picks the
# instruction set at run time. -fopenmp compiles the loops of _cpu_kernels.cc against
# Paddle's libiomp5 (linked below; it provides the GOMP entry points GCC emits).
_CXXFLAGS = ["-O3", "-fopenmp"]
_BUILD_FORMAT = 1  # bump to rebuild every cached library
_BUILD_TIMEOUT = 1800.0
_DNNL_RUNTIME_OMP = 2  # DNNL_RUNTIME_OMP in dnnl_config.h

_ENV_INCLUDE = "PADDLEFSL_ONEDNN_INCLUDE"


class BuildError(Exception):
    """A build step failed; the message is the user-facing reason."""


def library_path() -> Path:
    """The built op library for this Paddle installation, building it if needed.

    Raises:
        BuildError: what failed (no compiler, no headers, a failed compile...) and the fix.

    Example:
        >>> from paddlefsl.ops import _onednn_build
        >>> try:  # doctest: +SKIP
        ...     print(_onednn_build.library_path().name)
        ... except _onednn_build.BuildError as error:
        ...     print(error)
        paddlefsl_onednn_conv.so

    """
    libs = _check_paddle()
    for source in _SOURCES:
        if not source.is_file():
            raise BuildError(
                f"{source} is missing from this paddlefsl installation (package data not "
                "installed); reinstall paddlefsl"
            )
    lib_version = _library_version(libs)
    headers = _find_headers(lib_version)
    final = _cache_root() / _cache_key(libs, lib_version, headers)
    so_path = final / f"{_NAME}.so"
    if not so_path.is_file():
        _build_locked(_cache_root(), final, libs, headers)
        prune_cache(_cache_root(), keep=final)
    _mark_used(final)
    return so_path


#: Cache entries kept besides the one in use: other Paddle installations sharing the cache
#: keep theirs, while each new source version (an upgrade) no longer adds 5-7 MB for good.
CACHE_ENTRIES_KEPT = 4
_USED = "last_used"


def _mark_used(entry: Path) -> None:
    try:
        (entry / _USED).touch()
    except OSError:  # a read-only shared cache: the entry is only less likely to be kept
        pass


def prune_cache(root: Path, keep: Path, entries: int = CACHE_ENTRIES_KEPT) -> list[Path]:
    """Delete all but the ``entries`` most recently used builds in ``root`` (and ``keep``).

    An entry being built or loaded elsewhere holds its lock and is left alone; deleting a
    library that a running process has loaded is harmless on Linux. Returns what was
    deleted. Never raises.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> root = Path(tempfile.mkdtemp())
        >>> prune_cache(root, keep=root / "current")
        []

    """

    def last_use(entry: Path) -> float:
        marker = entry / _USED
        return (marker if marker.exists() else entry).stat().st_mtime

    try:
        builds = [
            entry
            for entry in root.iterdir()
            if entry.is_dir() and not entry.name.startswith(".") and entry != keep
        ]
        builds.sort(key=last_use, reverse=True)
    except OSError:
        return []
    deleted = []
    for entry in builds[max(entries, 0) :]:
        lock_path = root / f"{entry.name}.lock"
        try:
            with open_lock_file(lock_path) as lock:
                if not try_lock_exclusive(lock):  # being built or loaded elsewhere
                    continue
                shutil.rmtree(entry)
                lock_path.unlink()
            deleted.append(entry)
        except OSError:
            continue
    return deleted


def paddle_libs() -> Path:
    """The folder of the libraries in the Paddle wheel (libdnnl.so.3, libiomp5.so)."""
    return Path(paddle.__file__).resolve().parent / "libs"


def _check_paddle() -> Path:
    if not sys.platform.startswith("linux"):
        raise BuildError(f"only supported on Linux (this is {sys.platform})")
    libs = paddle_libs()
    for name in ("libdnnl.so.3", "libiomp5.so"):
        if not (libs / name).is_file():
            raise BuildError(
                f"this Paddle build ships no oneDNN ({libs / name} is missing); "
                "install the CPU (x86-64) paddlepaddle wheel"
            )
    if not hasattr(paddle._C_ops, "_run_custom_op"):
        raise BuildError(f"Paddle {paddle.__version__} has no _C_ops._run_custom_op")
    return libs


class _DnnlVersion(ctypes.Structure):
    _fields_ = [  # dnnl_version_t of oneapi/dnnl/dnnl_common_types.h
        ("major", ctypes.c_int),
        ("minor", ctypes.c_int),
        ("patch", ctypes.c_int),
        ("hash", ctypes.c_char_p),
        ("cpu_runtime", ctypes.c_uint),
        ("gpu_runtime", ctypes.c_uint),
    ]


def _library_version(libs: Path) -> tuple[int, int, int, str]:
    """``(major, minor, patch, hash)`` of Paddle's oneDNN, which must use OpenMP."""
    try:
        dnnl = ctypes.CDLL(str(libs / "libdnnl.so.3"))
        dnnl.dnnl_version.restype = ctypes.POINTER(_DnnlVersion)
        v = dnnl.dnnl_version().contents
    except (OSError, AttributeError) as error:
        raise BuildError(f"cannot query {libs / 'libdnnl.so.3'}: {error}") from error
    version = (v.major, v.minor, v.patch, (v.hash or b"").decode(errors="replace"))
    if v.major != 3:
        raise BuildError(f"Paddle's oneDNN is {v.major}.{v.minor}; these ops need oneDNN 3")
    if v.cpu_runtime != _DNNL_RUNTIME_OMP:
        raise BuildError(
            f"Paddle's oneDNN uses CPU runtime {v.cpu_runtime}, not OpenMP "
            f"({_DNNL_RUNTIME_OMP}); these ops set OpenMP thread counts"
        )
    return version


# ---------------------------------------------------------------------------- headers


def _header_version(include: Path) -> tuple[int, int, int] | None:
    text = (include / "oneapi" / "dnnl" / "dnnl_version.h").read_text(errors="replace")
    found = [
        re.search(rf"#define\s+DNNL_VERSION_{k}\s+(\d+)", text) for k in ("MAJOR", "MINOR", "PATCH")
    ]
    if not all(found):
        return None
    return tuple(int(m.group(1)) for m in found)  # type: ignore[union-attr,return-value]


def _headers_problem(include: Path, lib_version: tuple) -> str | None:
    """Why ``include`` cannot be used with Paddle's oneDNN, or ``None`` if it can."""
    dnnl = include / "oneapi" / "dnnl"
    needed = ("dnnl.hpp", "dnnl.h", "dnnl_config.h", "dnnl_version.h")
    absent = [name for name in needed if not (dnnl / name).is_file()]
    if absent:
        return f"{include} has no oneapi/dnnl/{absent[0]}"
    version = _header_version(include)
    if version is None:
        return f"cannot read the version in {dnnl / 'dnnl_version.h'}"
    # Headers older than the library are fine (oneDNN keeps its ABI within a major
    # version); newer ones may call functions the library lacks.
    if version[0] != lib_version[0] or version[:2] > tuple(lib_version[:2]):
        return (
            f"{include} holds oneDNN {'.'.join(map(str, version))} headers but Paddle's "
            f"library is {lib_version[0]}.{lib_version[1]}.{lib_version[2]}"
        )
    return None


def _installed_includes() -> list[Path]:
    """Include folders where ``pip install onednn-devel`` puts the headers."""
    folders = []
    for scheme in (None, f"{os.name}_user"):
        try:
            paths = sysconfig.get_paths() if scheme is None else sysconfig.get_paths(scheme)
        except KeyError:
            continue
        folders.append(Path(paths["data"]) / "include")
    return folders


def _find_headers(lib_version: tuple) -> tuple[str, Path | None]:
    """``(kind, folder)``: ``("env"|"installed", include folder)`` or ``("download", None)``."""
    value = os.environ.get(_ENV_INCLUDE, "").strip()
    if value:
        candidates = [Path(value).expanduser(), Path(value).expanduser() / "include"]
        problems = []
        for include in candidates:
            problem = _headers_problem(include, lib_version)
            if problem is None:
                return "env", include
            problems.append(problem)
        raise BuildError(
            f"{_ENV_INCLUDE}={value} is not usable: {problems[0]}; point it at a folder "
            f"holding oneapi/dnnl/dnnl.hpp of oneDNN {lib_version[0]}.{lib_version[1]} "
            f"(the include folder of {ONEDNN_DEVEL}) or unset it"
        )
    for include in _installed_includes():
        if (include / "oneapi" / "dnnl" / "dnnl.hpp").is_file():
            if _headers_problem(include, lib_version) is None:
                return "installed", include
    return "download", None


def _headers_digest(include: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted((include / "oneapi" / "dnnl").glob("*.h*")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _download_headers(workdir: Path, include: Path) -> None:
    """Download the pinned onednn-devel wheel, check its sha256, extract oneapi/dnnl."""
    how = (
        f"set {_ENV_INCLUDE} to a folder with oneDNN 3.6 headers, or run "
        f"'pip install --no-deps {ONEDNN_DEVEL}'"
    )
    command = [sys.executable, "-m", "pip", "download", *_PIP_ARGS, ONEDNN_DEVEL]
    command += ["--retries", "2", "--timeout", "30", "-d", str(workdir)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise BuildError(f"could not download {ONEDNN_DEVEL}: {error} ({how})") from error
    wheel = workdir / _WHEEL_FILE
    if done.returncode != 0 or not wheel.is_file():
        raise BuildError(f"could not download {ONEDNN_DEVEL}: {_pip_error(done)} ({how})")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != _WHEEL_SHA256:
        raise BuildError(
            f"{_WHEEL_FILE} has sha256 {digest}, expected {_WHEEL_SHA256} "
            f"(a tampered or replaced file; {how})"
        )
    prefix = _WHEEL_INCLUDE + "oneapi/dnnl/"
    target = include / "oneapi" / "dnnl"
    target.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.namelist():
            name = member[len(prefix) :]
            # Flat file names only: nothing from the archive can land outside `target`.
            if member.startswith(prefix) and name and "/" not in name and name != "..":
                (target / name).write_bytes(archive.read(member))


def _pip_error(done: subprocess.CompletedProcess) -> str:
    """The gist of a failed ``pip download``: its first ERROR line and any network error."""
    lines = [line.strip() for line in (done.stderr + "\n" + done.stdout).splitlines()]
    errors = [line for line in lines if line.startswith("ERROR")]
    detail = errors[0] if errors else next((x for x in reversed(lines) if x), "")
    network = re.search(r"\[Errno [^\]]*\][^'\")]*", done.stderr)
    if network:
        detail += f" (network: {network.group(0).strip()})"
    return detail or f"pip exited with {done.returncode}"


def _copy_headers(source: Path, include: Path) -> None:
    target = include / "oneapi" / "dnnl"
    target.mkdir(parents=True, exist_ok=True)
    for path in (source / "oneapi" / "dnnl").iterdir():
        if path.is_file() and path.suffix in {".h", ".hpp"}:
            shutil.copyfile(path, target / path.name)


# The wheel's dnnl_config.h is generated for Intel's SYCL + TBB build; Paddle's library
# is OpenMP, CPU only. Each define must be found exactly once.
_CONFIG_DEFINES = {
    "DNNL_CPU_THREADING_RUNTIME": "DNNL_RUNTIME_OMP",
    "DNNL_CPU_RUNTIME": "DNNL_RUNTIME_OMP",
    "DNNL_GPU_RUNTIME": "DNNL_RUNTIME_NONE",
    "DNNL_GPU_VENDOR": "DNNL_VENDOR_NONE",
}
# Build options of Intel's package that Paddle's build does not have (the experimental
# ones change enums and struct layouts, so they must match the library: off).
_CONFIG_DROP = re.compile(
    r"^[ \t]*#[ \t]*define[ \t]+(DNNL_WITH_SYCL|DNNL_WITH_LEVEL_ZERO|DNNL_SYCL_\w+"
    r"|DNNL_USE_RT_OBJECTS_IN_PRIMITIVE_CACHE|DNNL_EXPERIMENTAL\w*)\b[^\n]*$",
    re.MULTILINE,
)


def _write_config(include: Path) -> None:
    """Rewrite ``oneapi/dnnl/dnnl_config.h`` for Paddle's OpenMP, CPU-only oneDNN."""
    path = include / "oneapi" / "dnnl" / "dnnl_config.h"
    text = path.read_text()
    for name, value in _CONFIG_DEFINES.items():
        pattern = re.compile(rf"^([ \t]*#[ \t]*define[ \t]+{name}[ \t]+)\S+", re.MULTILINE)
        text, count = pattern.subn(rf"\g<1>{value}", text)
        if count != 1:
            raise BuildError(
                f"unexpected {path.name} ({name} defined {count} times); "
                f"use the headers of {ONEDNN_DEVEL}"
            )
    text = _CONFIG_DROP.sub("", text)
    path.write_text("// Rewritten by paddlefsl for Paddle's OpenMP, CPU-only oneDNN.\n" + text)


# ------------------------------------------------------------------------------ build


def _cache_root() -> Path:
    # The same root as paddlefsl's dataset caches (paddlefsl.data.cache).
    if os.environ.get("PADDLEFSL_CACHE"):
        base = Path(os.environ["PADDLEFSL_CACHE"]).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
        base = Path(xdg).expanduser() / "paddlefsl"
    return base / "onednn"


def _ldflags(libs: Path) -> list[str]:
    # Link Paddle's own libdnnl.so.3 and its OpenMP runtime (no -fopenmp: GCC's libgomp
    # would be a second OpenMP runtime in the process) and find them at run time.
    return [f"-L{libs}", "-l:libdnnl.so.3", "-liomp5", f"-Wl,-rpath,{libs}"]


def _cache_key(libs: Path, lib_version: tuple, headers: tuple[str, Path | None]) -> str:
    include = headers[1]
    parts = {
        "format": _BUILD_FORMAT,
        "source": [hashlib.sha256(path.read_bytes()).hexdigest() for path in _SOURCES],
        # What shapes the build besides the source (not the whole of this file, so that
        # editing a docstring does not cost a rebuild).
        "config": [_CONFIG_DEFINES, _CONFIG_DROP.pattern, _CHILD],
        "cxxflags": _CXXFLAGS,
        "ldflags": _ldflags(libs),
        "paddle": [paddle.__version__, getattr(paddle.version, "commit", ""), str(libs)],
        "python": sys.version,
        "onednn": list(lib_version),
        # The same headers give the same library wherever they came from.
        "headers": _WHEEL_HEADERS_DIGEST if include is None else _headers_digest(include),
    }
    blob = json.dumps(parts, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def _check_compiler() -> None:
    cc = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
    fix = "install g++ (e.g. apt-get install g++) or set CC to a C++ compiler"
    if not cc or shutil.which(cc[0]) is None:
        raise BuildError(f"no C++ compiler ({cc[0] if cc else 'CC'} not found; {fix})")
    try:
        done = subprocess.run(
            [*cc, "-x", "c++", "-fsyntax-only", "-"],
            input=b"#include <vector>\nint main() { return 0; }\n",
            capture_output=True,
            timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise BuildError(f"no C++ compiler ({cc[0]}: {error}; {fix})") from error
    if done.returncode != 0:
        detail = done.stderr.decode(errors="replace").strip().splitlines()
        raise BuildError(
            f"no C++ compiler ({cc[0]} cannot compile C++: "
            f"{detail[-1] if detail else done.returncode}; {fix})"
        )


def _build_locked(root: Path, final: Path, libs: Path, headers: tuple) -> None:
    """Build into ``final`` unless another process does (or did) it first."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock_file = open_lock_file(root / f"{final.name}.lock")
    except OSError as error:
        raise BuildError(
            f"cannot write the build cache {root}: {error} (set PADDLEFSL_CACHE to a "
            "writable folder)"
        ) from error
    with lock_file:  # closing it releases the lock
        lock_exclusive(
            lock_file,
            on_wait=lambda: print(
                f"paddlefsl: waiting for another process building the oneDNN kernels in {final}",
                file=sys.stderr,
                flush=True,
            ),
        )
        if not (final / f"{_NAME}.so").is_file():
            # Leftovers of an interrupted build or a damaged cache entry: we hold the
            # lock, so no other process is writing them.
            shutil.rmtree(final, ignore_errors=True)
            for stale in root.glob(f".{final.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            _build(root, final, libs, headers)


# Runs in a child process: compiles with Paddle's JIT loader, then checks the three ops
# against Paddle's conv2d, so a header/library mismatch never reaches the user.
_CHILD = r"""
import json, sys
import numpy as np
import paddle
from paddle.utils.cpp_extension import load

a = json.loads(sys.argv[1])
ops = load(name=a["name"], sources=a["sources"], extra_include_paths=a["include"],
           extra_cxx_cflags=a["cxxflags"], extra_ldflags=a["ldflags"],
           build_directory=a["build_dir"], verbose=True)
paddle.seed(0)
x = paddle.randn([3, 16, 9, 9]); w = paddle.randn([8, 16, 3, 3])
x.stop_gradient = False; w.stop_gradient = False
y = paddle.nn.functional.conv2d(x, w, stride=2, padding=1)
dy = paddle.randn(y.shape)
dx, dw = paddle.grad([y], [x, w], [dy])
x, w = x.detach(), w.detach()
bias = paddle.randn([8])
got = [ops.onednn_conv2d_forward(x, w, [2, 2], [1, 1], 0, 1),
       ops.onednn_conv2d_backward_data(dy, w, [2, 2], [1, 1], [9, 9], 1),
       ops.onednn_conv2d_backward_weight(x, dy, [2, 2], [1, 1], [3, 3], 1),
       ops.onednn_conv2d_forward_bias(x, w, bias, [2, 2], [1, 1], 1, 1)]
got += ops.onednn_conv2d_backward_weight_bias(x, dy, [2, 2], [1, 1], [3, 3], 1)
want = [y, dx, dw, y + bias.reshape([1, 8, 1, 1]), dw, dy.sum([0, 2, 3])]
# The memory-bound layers against Paddle's own kernels.
F = paddle.nn.functional
x = paddle.randn([4, 8, 6, 6]); b = paddle.rand([8]) + 0.5
got += [ops.pfsl_channel_bias_add(x, b, 2), ops.pfsl_channel_sum(x, 2), ops.pfsl_relu(x, 2),
        ops.pfsl_batch_norm_train(x, b, b, paddle.zeros([8]), paddle.ones([8]), 0.9, 1e-5, 2)[0],
        ops.pfsl_max_pool2d(x, [2, 2], [2, 2], [0, 0], 2)[0]]
want += [x + b.reshape([1, 8, 1, 1]), x.sum([0, 2, 3]), F.relu(x),
         F.batch_norm(x, paddle.zeros([8]), paddle.ones([8]), b, b, training=True),
         F.max_pool2d(x, 2, 2)]
names = ("forward", "backward_data", "backward_weight", "forward_bias", "filter_of_bias",
         "bias_gradient", "channel_bias_add", "channel_sum", "relu", "batch_norm_train",
         "max_pool2d")
for name, a_, b_ in zip(names, got, want):
    a_, b_ = a_.numpy(), b_.numpy()
    err = float(np.abs(a_ - b_).max() / np.abs(b_).max())
    if a_.shape != b_.shape or not err < 1e-4:
        sys.exit(f"SMOKE TEST FAILED: {name} shape {a_.shape} vs {b_.shape}, error {err}")
print("PADDLEFSL_ONEDNN_SMOKE_OK")
"""


def _log_excerpt(log: str) -> str:
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for marker in ("SMOKE TEST FAILED", "error:", "Error", "undefined"):
        hits = [line for line in lines if marker in line]
        if hits:
            return hits[0][:300]
    return lines[-1][:300] if lines else "no output"


def _build(root: Path, final: Path, libs: Path, headers: tuple) -> None:
    kind, source_include = headers
    _check_compiler()
    print(
        f"paddlefsl: building the oneDNN convolution kernels once (~20 s) into {final}",
        file=sys.stderr,
        flush=True,
    )
    start = time.perf_counter()
    # Paddle's loader runs `cd <dir> && python setup.py build` through a shell, so the
    # build happens in a fresh temporary folder (no spaces, nothing stale) and only the
    # finished library is moved into the cache.
    with tempfile.TemporaryDirectory(prefix="paddlefsl-onednn-") as tmp:
        work = Path(tmp)
        include = work / "include"
        if source_include is None:
            (work / "download").mkdir()
            _download_headers(work / "download", include)
        else:
            _copy_headers(source_include, include)
        _write_config(include)
        sources = [work / path.name for path in _SOURCES]
        for path, copy in zip(_SOURCES, sources):
            shutil.copyfile(path, copy)
        (work / "build").mkdir()
        args = {
            "name": _NAME,
            "sources": [str(source) for source in sources],
            "include": [str(include)],
            "cxxflags": _CXXFLAGS,
            "ldflags": _ldflags(libs),
            "build_dir": str(work / "build"),
        }
        env = dict(os.environ, OMP_NUM_THREADS="1")
        log_path = root / f"{final.name}.build.log"
        try:
            done = subprocess.run(
                [sys.executable, "-c", _CHILD, json.dumps(args)],
                cwd=work,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=_BUILD_TIMEOUT,
            )
            log, code = done.stdout, done.returncode
        except subprocess.TimeoutExpired as error:
            log, code = f"{error}\n{error.output or ''}", -1
        built = work / "build" / _NAME / f"{_NAME}.so"
        if code != 0 or "PADDLEFSL_ONEDNN_SMOKE_OK" not in log or not built.is_file():
            log_path.write_text(log)
            excerpt = _log_excerpt(log)
            if "cc1plus" in log:
                raise BuildError(f"no C++ compiler (install g++): {excerpt}")
            raise BuildError(f"building the ops failed: {excerpt} (full log: {log_path})")
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
        try:
            staging.chmod(0o755)  # mkdtemp's 0o700 would hide a shared cache from others
            shutil.copyfile(built, staging / built.name)
            shutil.copyfile(
                include / "oneapi" / "dnnl" / "dnnl_config.h", staging / "dnnl_config.h"
            )
            (staging / "build.log").write_text(log)
            info = {
                "headers": kind if source_include is None else f"{kind}: {source_include}",
                "paddle": paddle.__version__,
                "seconds": round(time.perf_counter() - start, 1),
            }
            (staging / "build.json").write_text(json.dumps(info, indent=1) + "\n")
            os.rename(staging, final)  # atomic: `final` is complete or absent
        except OSError:
            if not (final / f"{_NAME}.so").is_file():
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log_path.unlink(missing_ok=True)
