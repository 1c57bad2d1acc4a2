"""What this machine has, whatever llama-cpp-python was built for: physical CPU cores, RAM, and which GPUs exist, for
the one-line hint that says how to install a build that can use them.

What the installed build can use is ggml's to say (app.runtime.devices); this module answers what ggml cannot: that
an NVIDIA or AMD GPU is in the machine although the build is CPU-only, or that a Mac's Python runs under Rosetta.
NVML (nvidia-ml-py) is optional; without it the PCI vendor ids in /sys/class/drm still tell an NVIDIA GPU on Linux.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path


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


_REINSTALL = "pip install --force-reinstall --no-cache-dir llama-cpp-python"
CUDA_INSTALL_HINT = f'CMAKE_ARGS="-DGGML_CUDA=on" {_REINSTALL}'
HIP_INSTALL_HINT = (f'CMAKE_ARGS="-DGGML_HIP=on" {_REINSTALL} (with ROCm installed), or CMAKE_ARGS="-DGGML_VULKAN=on" '
                    f'{_REINSTALL} (with the Vulkan SDK)')
METAL_INSTALL_HINT = f'CMAKE_ARGS="-DGGML_METAL=on" {_REINSTALL}'
VENDOR_NVIDIA = "0x10de"
VENDOR_AMD = "0x1002"
DRM = Path("/sys/class/drm")


@dataclass(frozen=True)
class Facts:
    """The machine as the install hint needs it (tests give their own)."""

    system: str  # platform.system(): Linux, Darwin, Windows
    machine: str  # platform.machine(): x86_64, arm64, AMD64 …
    rosetta: bool  # macOS: this Python is an x86_64 process translated on Apple Silicon
    nvidia: tuple[str, ...]  # NVIDIA GPUs seen (their names through NVML, else "NVIDIA GPU" per PCI device)
    amd: bool  # an AMD GPU: PCI vendor 0x1002 under /sys/class/drm, or rocm-smi on the PATH


def drm_vendors(root: Path | None = None) -> list[str]:
    """The PCI vendor id of each display device Linux lists under /sys/class/drm (card0, card1 …; not their
    connectors)."""
    vendors = []
    try:
        cards = sorted(p for p in (root or DRM).iterdir() if p.name.startswith("card") and "-" not in p.name)
    except OSError:
        return []
    for card in cards[:64]:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            vendors.append((card / "device" / "vendor").read_text(encoding="ascii")[:16].strip().lower())
    return vendors


def _rosetta() -> bool:
    try:
        out = subprocess.run(["sysctl", "-n", "sysctl.proc_translated"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.stdout.strip() == "1"


@cache
def facts() -> Facts:
    system = platform.system()
    vendors = drm_vendors() if system == "Linux" else []
    nvidia = tuple(g.name for g in nvidia_gpus()) or ("NVIDIA GPU",) * vendors.count(VENDOR_NVIDIA)
    amd = system == "Linux" and (VENDOR_AMD in vendors or shutil.which("rocm-smi") is not None)
    return Facts(system, platform.machine(), system == "Darwin" and _rosetta(), nvidia, amd)


def install_hint(f: Facts) -> str | None:
    """For a llama-cpp-python without any GPU device: what GPU the machine has and the one command that builds
    llama.cpp for it, in one line; None where there is nothing better to install."""
    cpu = "but this llama-cpp-python was built without {}, so malhae runs on the CPU. For GPU speed: {}"
    if f.nvidia:
        return f"an NVIDIA GPU ({f.nvidia[0]}) is present, " + cpu.format("CUDA", CUDA_INSTALL_HINT)
    if f.amd:
        return "an AMD GPU is present, " + cpu.format("ROCm or Vulkan", HIP_INSTALL_HINT)
    if f.system == "Darwin" and f.rosetta:
        return ("this Python runs under Rosetta (x86_64) on Apple Silicon, where llama.cpp has no Metal, so malhae "
                "runs on the CPU. For GPU speed: install an arm64 Python (python.org or `brew install python`), "
                "then malhae in it")
    if f.system == "Darwin" and f.machine == "arm64":
        return "this is Apple Silicon, " + cpu.format("Metal", METAL_INSTALL_HINT)
    return None
