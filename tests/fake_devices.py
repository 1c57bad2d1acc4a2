"""Machines this CI runner is not: ggml's device list and the hardware facts replaced with what a CUDA, Metal,
ROCm or Vulkan build reports on such a machine, while llama.cpp itself stays real (this CPU build loads the model on
the CPU whatever it is asked to offload, so every load is recorded and then made without the fake devices)."""

from __future__ import annotations

from dataclasses import dataclass, field

from malhae.runtime import devices, hardware, llama
from malhae.runtime.devices import Device

GiB = 2**30
MiB = 2**20
RAM = 64 * GiB


def cpu(ram: int = RAM) -> Device:
    return Device(0, "CPU", "AMD Ryzen 9 7950X", "cpu", "CPU", ram, ram)


def cuda(i: int, free: int, total: int | None = None, description: str = "NVIDIA GeForce RTX 4090") -> Device:
    return Device(i + 1, f"CUDA{i}", description, "gpu", "CUDA", free, total or free)


def metal(working_set: int, allocated: int = 0) -> Device:
    """Apple Silicon: ggml-metal reports recommendedMaxWorkingSetSize as total and that less what is allocated as
    free (ggml-metal-device.m), as a GPU device."""
    return Device(0, "MTL0", "Apple M2 Pro", "gpu", "MTL", working_set - allocated, working_set)


def vulkan_igpu(heap: int, description: str = "AMD Radeon 780M Graphics (RADV PHOENIX)") -> Device:
    return Device(1, "Vulkan0", description, "igpu", "Vulkan", heap, heap)


def rocm(i: int, free: int, description: str = "AMD Radeon RX 7900 XTX") -> Device:
    return Device(i + 1, f"ROCm{i}", description, "gpu", "ROCm", free, free)


NO_GPU = hardware.Facts("Linux", "x86_64", False, (), False)


@dataclass
class Loads:
    """What each model load was asked for."""

    calls: list[dict] = field(default_factory=list)

    @property
    def layers(self) -> list[int]:
        return [c["n_gpu_layers"] for c in self.calls]


def install(monkeypatch, *listed: Device, facts: hardware.Facts = NO_GPU, ram: int | None = None) -> Loads:
    """ggml lists `listed` (add cpu() yourself, as ggml lists the CPU last or first), the machine is `facts`, and
    RAM is `ram` (default: the CPU device's). Returns the record of model loads."""
    from malhae.runtime import offload

    monkeypatch.setattr(devices, "listed", lambda: tuple(listed))
    monkeypatch.setattr(hardware, "facts", lambda: facts)
    if ram is not None:
        monkeypatch.setattr(hardware, "total_ram", lambda: ram)
    monkeypatch.setattr(offload, "_said", set())
    loads = Loads()
    real_init = llama.Model.__init__

    def recording(self, path, *, vocab_only=False, n_gpu_layers=0, use_mmap=True, devices=None, tensor_split=None):
        if not vocab_only:
            loads.calls.append({"n_gpu_layers": n_gpu_layers, "devices": devices,
                                "tensor_split": None if tensor_split is None else list(tensor_split)})
        real_init(self, path, vocab_only=vocab_only, n_gpu_layers=n_gpu_layers, use_mmap=use_mmap)

    monkeypatch.setattr(llama.Model, "__init__", recording)
    return loads
