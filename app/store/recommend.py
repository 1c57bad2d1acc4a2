"""Which quantization of a catalog model to use for a given amount of GPU memory or RAM: pure arithmetic on sizes.

GPU: the best-quality type (app.store.catalog.QUALITY_ORDER) that the engine's own offload planner
(app/runtime/offload.py) would put entirely on the GPU at the model's full context (2048): every repeating layer and the
output layer, the f16 KV cache for the whole context, the compute buffer for one 512-token batch, the GPU context and a
5% safety margin, the very figures `--gpu-layers auto` uses, so a pick made here loads fully there. When no type fits,
the planner's partial offload of q4_k_m is reported instead: that many layers on the GPU, the rest on the CPU.

RAM only (no usable GPU): the best type no larger than RAM_CEILING whose weights, KV cache and compute buffer together
take at most RAM_FRACTION of the machine's RAM, leaving the rest to the system and other programs. The ceiling is
there because on a CPU decoding is bound by memory bandwidth: every token reads all the weights, so an f16 file decodes
about three times slower than q4_k_m (2.66 vs 0.86 GB per token for 1.3b) while q4_k_m is llama.cpp's usual
quality/speed balance. Anyone who prefers quality over speed can still pull a larger type by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from malhae import units
from malhae.runtime import kv, offload
from malhae.runtime.devices import Device
from malhae.store.catalog import QUALITY_ORDER, Entry

GiB = 2**30
VRAM_SIZES_GB = (4, 6, 8, 12, 16, 24)  # the catalog's columns; a "8 GB" card has 8 GiB
RAM_SIZES_GB = (8, 16, 32)
RAM_FRACTION = 0.75
RAM_CEILING = "q4_k_m"  # the largest type picked without a GPU (see above)
PARTIAL_TYPE = "q4_k_m"  # what to offload partly when nothing fits fully


@dataclass(frozen=True)
class Pick:
    type: str | None  # None: nothing fits fully
    where: str  # "gpu" or "ram"
    needed: int  # bytes the pick needs there (0 when nothing fits)
    available: int  # bytes it was measured against (free VRAM, or RAM × RAM_FRACTION)
    partial: offload.Plan | None = None  # GPU only, when nothing fits fully: the planner's plan for PARTIAL_TYPE

    @property
    def full(self) -> bool:
        return self.type is not None

    def as_dict(self) -> dict:
        data = {"type": self.type, "where": self.where, "fits": "full" if self.full else
                ("partial" if self.partial and self.partial.n_gpu_layers else "none"),
                "needed_bytes": self.needed, "available_bytes": self.available}
        if self.partial is not None:
            data |= {"partial_type": PARTIAL_TYPE, "gpu_layers": self.partial.n_gpu_layers,
                     "layers": self.partial.n_layer}
        return data


def planner_sizes(entry: Entry, type_name: str, n_ctx: int | None = None,
                  kv_types: tuple[str, str] = ("f16", "f16")) -> offload.ModelSizes:
    """What offload.model_sizes would read from the converted GGUF, from the catalog's computed sizes."""
    s = entry.sizes[type_name]
    return offload.sizes_from_shape(list(s.layers), s.output, n_embd=entry.d_model, n_ff=entry.d_ff,
                                    n_head=entry.heads, n_head_kv=entry.heads, n_vocab=entry.vocab_rows,
                                    n_cells=kv.cells(n_ctx or entry.context), kv_types=kv_types)


def ram_needed(entry: Entry, type_name: str, n_ctx: int | None = None) -> int:
    sizes = planner_sizes(entry, type_name, n_ctx)
    return entry.sizes[type_name].total + sizes.kv_bytes_per_layer * sizes.n_layer + sizes.compute_bytes


def pick_gpu(entry: Entry, gpus: int | Sequence[Device]) -> Pick:
    """`gpus`: free bytes of one GPU, or this machine's GPUs (the planner then splits over them as it would)."""
    for type_name in QUALITY_ORDER:
        plan = offload.plan(planner_sizes(entry, type_name), gpus)
        if plan.full:
            return Pick(type_name, "gpu", plan.gpu_bytes, plan.free_bytes)
    partial = offload.plan(planner_sizes(entry, PARTIAL_TYPE), gpus)
    return Pick(None, "gpu", 0, partial.free_bytes, partial=partial)


def pick_ram(entry: Entry, ram_bytes: int) -> Pick:
    budget = int(ram_bytes * RAM_FRACTION)
    for type_name in QUALITY_ORDER[QUALITY_ORDER.index(RAM_CEILING):]:
        needed = ram_needed(entry, type_name)
        if needed <= budget:
            return Pick(type_name, "ram", needed, budget)
    return Pick(None, "ram", 0, budget)


def pick(entry: Entry, *, vram_bytes: int | None, ram_bytes: int, gpus: Sequence[Device] = ()) -> Pick:
    """With a GPU: the best type that fits on it (or a partial offload); without one: the best up to RAM_CEILING
    that fits in RAM. `gpus`, when given, are this machine's (ggml's) and are planned for instead of `vram_bytes`;
    integrated ones only when a type fits entirely, as `--gpu-layers auto` uses them (offload.choose)."""
    if gpus:
        p = pick_gpu(entry, gpus)
        integrated = all(d.kind == "igpu" for d in gpus)
        return p if p.full or not integrated else pick_ram(entry, ram_bytes)
    return pick_gpu(entry, vram_bytes) if vram_bytes else pick_ram(entry, ram_bytes)


def table(entry: Entry) -> dict[str, str | None]:
    """The catalog's pick columns: "4G" … "24G" (VRAM) and "RAM 8G" … (RAM only); None where nothing fits."""
    out: dict[str, str | None] = {f"{g}G": pick_gpu(entry, g * GiB).type for g in VRAM_SIZES_GB}
    out |= {f"RAM {g}G": pick_ram(entry, g * GiB).type for g in RAM_SIZES_GB}
    return out


@dataclass(frozen=True)
class Machine:
    vram_bytes: int | None  # free GPU memory the planner may fill, all GPUs together; None: no GPU
    ram_bytes: int
    gpus: tuple[Device, ...]  # this machine's GPUs that --gpu-layers auto offloads to (none when --vram is given)
    vram_given: bool
    ram_given: bool
    hint: str | None = None  # a GPU llama.cpp cannot use with this build: how to install one that can

    @property
    def gpu_names(self) -> tuple[str, ...]:
        return tuple(d.label for d in self.gpus)


def machine(vram_gb: float | None = None, ram_gb: float | None = None) -> Machine:
    """This machine's figures (the GPUs ggml lists and what the planner may fill on them, total RAM), or the ones
    given (GiB)."""
    from malhae.runtime import devices, hardware

    given_vram = units.gib_bytes("--vram", vram_gb) if vram_gb is not None else None
    given_ram = units.gib_bytes("--ram", ram_gb) if ram_gb is not None else None
    gpus: tuple[Device, ...] = ()
    hint = None
    if given_vram is not None:
        vram = given_vram or None
    else:
        listed = devices.listed()
        ram = devices.host_memory(listed)
        gpus = devices.offload_targets(listed)
        vram = sum(devices.usable(d, ram) for d in gpus) or None
        if not any(d.offloads for d in listed):
            hint = hardware.install_hint(hardware.facts())
    ram = given_ram if given_ram is not None else hardware.total_ram()
    return Machine(vram, ram, gpus, vram_gb is not None, ram_gb is not None, hint)
