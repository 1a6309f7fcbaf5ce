"""Process-level settings that make Paddle meta-training faster on a CPU.

Meta-training allocates and frees the same large activation buffers every task. glibc
hands blocks above its mmap threshold back to the operating system on ``free``, so each
task pays page faults to get fresh, zeroed memory again (on the VMs measured here, about
15-20% of a Conv4 meta-iteration). :func:`tune_allocator` makes glibc keep and reuse them.

The CLI and the benchmarks call it; in your own training script, call it once at start.

Paddle's CPU kernels run on one thread. :func:`use_cores` lets the convolutions that run
on oneDNN (:mod:`paddlefsl.ops.onednn`) use this process's share of the cores instead.

On AMD CPUs, the MKL that ships with Paddle takes a slow generic path for matrix products;
:func:`unlock_mkl_on_amd` makes it take its AVX2 path (4x on a 2048x2048 product).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["tune_allocator", "unlock_mkl_on_amd", "use_cores"]

# mallopt() parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3


def tune_allocator(keep_bytes: int = 1 << 30) -> bool:
    """Let glibc's malloc reuse freed large blocks instead of returning them to the OS.

    Sets the mmap threshold to its maximum (32 MiB on 64-bit glibc), so activation buffers
    come from the heap, and the trim threshold to ``keep_bytes``, so freed memory up to that
    much stays mapped for the next task. Resident memory then stays near its peak instead
    of shrinking between tasks; the peak itself does not grow.

    Args:
        keep_bytes: freed memory glibc may keep mapped.

    Returns:
        ``True`` if the settings were applied (Linux with glibc), ``False`` otherwise.

    Example:
        >>> from paddlefsl.runtime import tune_allocator
        >>> tune_allocator() in (True, False)
        True

    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (e.g. musl): nothing to tune
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    keep = int(min(keep_bytes, (1 << 31) - 1))
    ok = bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20))
    ok &= bool(mallopt(_M_TRIM_THRESHOLD, keep))
    ok &= bool(mallopt(_M_TOP_PAD, 64 << 20))
    return ok


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def use_cores(processes: int = 1) -> int:
    """Give the oneDNN convolutions this process's share of the machine's cores.

    With ``processes`` training processes on one machine (``--nproc``), each gets
    ``cores // processes`` threads, so they never compete for a core. Only the oneDNN
    convolutions use them; Paddle's other kernels stay single-threaded. Nothing is built
    here: the kernels are built on first use, and without them this changes nothing.

    Args:
        processes: training processes sharing this machine.

    Returns:
        The thread count set.

    Example:
        >>> from paddlefsl.runtime import use_cores
        >>> use_cores(processes=1) >= 1
        True

    """
    from .ops import onednn

    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ValueError(f"use_cores: processes must be an int >= 1, got {processes!r}")
    threads = max(1, available_cores() // processes)
    onednn.set_threads(threads)
    return threads


def _cpu_vendor() -> str:
    """The CPU's vendor id (``GenuineIntel``, ``AuthenticAMD``, ...), or ``""`` if unknown."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def unlock_mkl_on_amd() -> bool:
    """Make the MKL bundled with Paddle use its AVX2 code on AMD CPUs.

    Paddle's CPU wheel ships an MKL (``libmklml_intel``) that picks its code path by CPU
    vendor: on AMD it runs generic SSE code. Its ``MKL_DEBUG_CPU_TYPE=5`` switch selects
    the AVX2 path, which every AMD CPU with AVX2 runs correctly. Measured on a 2-core AMD
    EPYC (Zen 3), one thread: ``paddle.matmul`` of 2048x2048 matrices 18.5 -> 73 GFLOP/s,
    a [80, 64] x [64, 5] product 24 -> 9 us (``benchmarks/bench_matmul.py``). It matters for
    models made of matrix products (MLPs, transformers) and for convolutions on Paddle's
    own kernels; paddlefsl's oneDNN convolutions do not use MKL.

    MKL reads the switch once, at its first matrix product in the process: call this at
    the start of your script (importing paddle first is fine). The ``paddlefsl`` command
    does. A value you set yourself is kept, and nothing changes on other CPUs.

    Returns:
        ``True`` if the switch is now set (this call or yours), ``False`` otherwise.

    Example:
        >>> from paddlefsl.runtime import unlock_mkl_on_amd
        >>> unlock_mkl_on_amd() in (True, False)
        True

    """
    if "MKL_DEBUG_CPU_TYPE" in os.environ:
        return True
    if _cpu_vendor() != "AuthenticAMD":
        return False
    os.environ["MKL_DEBUG_CPU_TYPE"] = "5"
    return True
