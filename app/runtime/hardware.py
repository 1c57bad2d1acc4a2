"""What this machine has: physical CPU cores, NVIDIA GPUs and their free memory, whether llama.cpp can use them.

NVML (nvidia-ml-py) is optional: without it, or without a GPU, everything reports "no GPU" and malhae runs on the CPU.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from functools import cache


@cache
def physical_cores() -> int:
    """Physical cores (not hyper-threads): llama.cpp's decode is memory-bound and gains nothing from SMT siblings."""
    try:
        cores = set()
        physical = core = None
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("physical id"):
                    physical = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                elif not line.strip() and core is not None:
                    cores.add((physical, core))
                    physical = core = None
        if core is not None:
            cores.add((physical, core))
        available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        if cores:
            return max(1, min(len(cores), available))
        return max(1, available)
    except OSError:
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class GPU:
    index: int
    name: str
    total: int  # bytes
    free: int


@cache
def nvidia_gpus() -> tuple[GPU, ...]:
    try:
        import pynvml
    except ImportError:
        return ()
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver, no device: NVML raises its own error types
        return ()
    gpus = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            gpus.append(GPU(i, name.decode() if isinstance(name, bytes) else str(name), int(mem.total), int(mem.free)))
    except Exception:
        return tuple(gpus)
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
    return tuple(gpus)


def total_ram() -> int:
    """Physical memory in bytes (8 GiB where the platform cannot say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 << 30


def llama_supports_gpu() -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


CUDA_INSTALL_HINT = ('CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir llama-cpp-python')
