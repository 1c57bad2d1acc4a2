"""The devices this llama-cpp-python can run on, as ggml's own registry reports them: CUDA, ROCm, Metal, Vulkan, SYCL.

Why ggml and not NVML: NVML sees only NVIDIA GPUs, so on a Mac (Metal), an AMD card (ROCm or Vulkan) or an Intel GPU
malhae used to plan 0 layers and run on the CPU while llama.cpp itself could use the GPU. ggml lists exactly the
devices the installed build can offload to, with their type and free memory, whatever the backend.

`offload_targets` is llama.cpp's own default choice (llama_prepare_model_devices): every discrete GPU in ggml's order,
integrated GPUs only when there is no discrete one, never the CPU or an accelerator (those hold the CPU's share). The
planner (app.runtime.offload) passes its choice to llama.cpp explicitly, so what it planned for is what is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

from malhae.errors import UserError

GiB = 2**30
# Metal's working set and an integrated GPU's memory are the machine's RAM: keep this much of it for the system and
# the CPU's share of the model, whatever the device reports (a raised iogpu.wired_limit_mb can report nearly all RAM)
SYSTEM_RESERVE_FRACTION = 0.2
SYSTEM_RESERVE_MIN = 2 * GiB
PLATFORMS = {"CUDA": "CUDA", "ROCm": "ROCm (HIP)", "MUSA": "MUSA", "MTL": "Metal", "Metal": "Metal",
             "Vulkan": "Vulkan", "SYCL": "SYCL", "OpenCL": "OpenCL", "RPC": "RPC", "CPU": "CPU"}


@dataclass(frozen=True)
class Device:
    index: int  # ggml's device index (ggml_backend_dev_get); -1 for a device that exists only in a what-if
    name: str  # ggml's name: CUDA0, ROCm0, MTL0, Vulkan0, SYCL0, CPU
    description: str  # the hardware: "NVIDIA GeForce RTX 4090", "Apple M2 Pro", "AMD Radeon 780M"
    kind: str  # "gpu", "igpu" (integrated: shares the machine's RAM), "cpu", "accel"
    backend: str  # ggml's backend (registry) name: CUDA, ROCm, MTL, Vulkan, SYCL, RPC, CPU, BLAS …
    free: int  # bytes, now
    total: int

    @property
    def offloads(self) -> bool:
        """Whether layers can be put on it (a GPU of any kind, or an RPC server)."""
        return self.kind in ("gpu", "igpu")

    @property
    def unified(self) -> bool:
        """Whether its memory is the machine's RAM: Apple Silicon (Metal) and integrated GPUs."""
        return self.kind == "igpu" or self.backend in ("MTL", "Metal")

    @property
    def platform(self) -> str:
        return PLATFORMS.get(self.backend, self.backend or "?")

    @property
    def label(self) -> str:
        """`CUDA0 (NVIDIA GeForce RTX 4090)`, as messages name a device."""
        return f"{self.name} ({self.description})" if self.description and self.description != self.name \
            else self.name

    def as_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "type": self.kind, "backend": self.backend,
                "platform": self.platform, "unified_memory": self.unified, "free_bytes": self.free,
                "total_bytes": self.total}


def listed() -> tuple[Device, ...]:
    """Every device ggml has, in its order, with free memory as of now (asked anew each time: it changes)."""
    from malhae.runtime import ggml, llama

    llama.init()  # loads plug-in backends (GGML_BACKEND_DL builds) with llama.cpp's log kept quiet
    out = []
    for i in range(ggml.device_count()):
        name, description, kind, backend, free, total = ggml.device_facts(i)
        out.append(Device(i, name, description, kind, backend, free, total))
    return tuple(out)


def host_memory(devices: tuple[Device, ...]) -> int:
    """RAM as the CPU device reports it (else the OS's figure)."""
    from malhae.runtime import hardware

    cpu = next((d for d in devices if d.kind == "cpu" and d.total), None)
    return cpu.total if cpu else hardware.total_ram()


def usable(device: Device, ram: int) -> int:
    """Free bytes the planner may fill on `device`. A device that reports no memory (some drivers) gets the host's,
    as llama.cpp does; one whose memory is the machine's RAM keeps SYSTEM_RESERVE of that RAM for everything else."""
    free = device.free
    if device.free == 0 and device.total == 0:
        free = ram
    if device.unified:
        free = min(free, max(0, ram - max(SYSTEM_RESERVE_MIN, int(ram * SYSTEM_RESERVE_FRACTION))))
    return max(0, free)


def offload_targets(devices: tuple[Device, ...]) -> tuple[Device, ...]:
    """llama.cpp's default: the discrete GPUs (not RPC servers, which only an explicit --device uses), else the
    integrated ones."""
    gpus = tuple(d for d in devices if d.kind == "gpu" and d.backend != "RPC")
    return gpus or tuple(d for d in devices if d.kind == "igpu")


def select(spec: str | None, devices: tuple[Device, ...]) -> tuple[Device, ...] | None:
    """--device as typed: None or "auto" → None (the planner chooses), "cpu" → () (no offload), else one or more
    devices by ggml name (CUDA1, Vulkan0, MTL0; any case) or by number among the GPUs `malhae info` lists, comma
    separated for a split over several."""
    if spec is None or spec.strip().lower() in ("", "auto"):
        return None
    word = spec.strip()
    if word.lower() == "cpu":
        return ()
    gpus = tuple(d for d in devices if d.offloads)
    chosen: list[Device] = []
    for part in (p.strip() for p in word.split(",")):
        found = None
        if part.isdigit() and int(part) < len(gpus):
            found = gpus[int(part)]
        elif not part.isdigit():
            found = next((d for d in gpus if d.name.lower() == part.lower()), None)
        if found is None:
            raise UserError(f"device {part!r} (--device, or the settings file's device): {_no_such(gpus)}")
        if found in chosen:
            raise UserError(f"device {word!r} names {found.name} twice; name each device once")
        chosen.append(found)
    return tuple(chosen)


def _no_such(gpus: tuple[Device, ...]) -> str:
    if not gpus:
        return ("this llama-cpp-python has no GPU device (a CPU-only build); use --device cpu or auto, or install "
                "a GPU build (README: GPU)")
    names = ", ".join(f"{i} = {d.label}" for i, d in enumerate(gpus))
    return f"no such device; this llama-cpp-python has {names} (or cpu, auto)"
