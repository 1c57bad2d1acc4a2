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

The picks count an f16 KV cache unless `recommend --kv-cache` says otherwise. For every GPU pick, `longest` also finds
the longest context that keeps every layer on the GPU with an f16, q8_0 and q4_0 cache (the same planner, bisected
over whole blocks of kv.CELL_ROUNDING cells): Polyglot-Ko has no grouped-query attention, so its cache is what a
long context or several server slots run out of first. A smaller cache saves memory, not time: on a CPU it decodes
slower at depth (CPU_DECODE_AT_DEPTH), which is why it is never the default.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

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
CONTEXT_CAP_FACTOR = 16  # `longest` tries contexts up to 16 × the trained one (32,768 tokens for the family's 2,048)
# decode tok/s at 1,536 tokens deep (llama-bench, 1.3b-shaped q4_k_m, 2 threads, flash attention; docs/benchmarks.md):
# a quantized cache is dequantized at every step, so on a CPU it costs speed where the context is long
CPU_DEPTH = 1536
CPU_DECODE_AT_DEPTH = {"f16": 14.8, "q8_0": 10.2}


@dataclass(frozen=True)
class Longest:
    """Per K/V type, the longest context (a multiple of kv.CELL_ROUNDING, at most `cap`) with which every layer of
    the `type` weights stays on the GPU; 0 where not even kv.CELL_ROUNDING tokens fit."""

    type: str
    tokens: dict[str, int]
    cap: int

    def as_dict(self) -> dict:
        return {"weights": self.type, "cap": self.cap, "tokens": dict(self.tokens)}


@dataclass(frozen=True)
class Pick:
    type: str | None  # None: nothing fits fully
    where: str  # "gpu" or "ram"
    needed: int  # bytes the pick needs there (0 when nothing fits)
    available: int  # bytes it was measured against (free VRAM, or RAM × RAM_FRACTION)
    partial: offload.Plan | None = None  # GPU only, when nothing fits fully: the planner's plan for PARTIAL_TYPE
    kv_cache: str = "f16"  # the K/V type the pick was made with
    longest: Longest | None = None  # GPU only (pick()): the longest full-offload context per K/V type

    @property
    def full(self) -> bool:
        return self.type is not None

    def as_dict(self) -> dict:
        data = {"type": self.type, "where": self.where, "fits": "full" if self.full else
                ("partial" if self.partial and self.partial.n_gpu_layers else "none"),
                "needed_bytes": self.needed, "available_bytes": self.available, "kv_cache": self.kv_cache,
                "longest_context": self.longest.as_dict() if self.longest else None}
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


def ram_needed(entry: Entry, type_name: str, n_ctx: int | None = None, kv_cache: str = "f16") -> int:
    sizes = planner_sizes(entry, type_name, n_ctx, (kv_cache, kv_cache))
    return entry.sizes[type_name].total + sizes.kv_bytes_per_layer * sizes.n_layer + sizes.compute_bytes


def pick_gpu(entry: Entry, gpus: int | Sequence[Device], kv_cache: str = "f16") -> Pick:
    """`gpus`: free bytes of one GPU, or this machine's GPUs (the planner then splits over them as it would)."""
    kv_types = (kv_cache, kv_cache)
    for type_name in QUALITY_ORDER:
        plan = offload.plan(planner_sizes(entry, type_name, kv_types=kv_types), gpus)
        if plan.full:
            return Pick(type_name, "gpu", plan.gpu_bytes, plan.free_bytes, kv_cache=kv_cache)
    partial = offload.plan(planner_sizes(entry, PARTIAL_TYPE, kv_types=kv_types), gpus)
    return Pick(None, "gpu", 0, partial.free_bytes, partial=partial, kv_cache=kv_cache)


def pick_ram(entry: Entry, ram_bytes: int, kv_cache: str = "f16") -> Pick:
    budget = int(ram_bytes * RAM_FRACTION)
    for type_name in QUALITY_ORDER[QUALITY_ORDER.index(RAM_CEILING):]:
        needed = ram_needed(entry, type_name, kv_cache=kv_cache)
        if needed <= budget:
            return Pick(type_name, "ram", needed, budget, kv_cache=kv_cache)
    return Pick(None, "ram", 0, budget, kv_cache=kv_cache)


def pick(entry: Entry, *, vram_bytes: int | None, ram_bytes: int, gpus: Sequence[Device] = (),
         kv_cache: str = "f16") -> Pick:
    """With a GPU: the best type that fits on it (or a partial offload), with the longest contexts it keeps fully
    there per K/V type; without one: the best up to RAM_CEILING that fits in RAM. `gpus`, when given, are this
    machine's (ggml's) and are planned for instead of `vram_bytes`; integrated ones only when a type fits entirely,
    as `--gpu-layers auto` uses them (offload.choose). `kv_cache`: the K/V type the pick counts (f16 by default)."""
    if gpus:
        p = pick_gpu(entry, gpus, kv_cache)
        if not p.full and all(d.kind == "igpu" for d in gpus):
            return pick_ram(entry, ram_bytes, kv_cache)
    elif vram_bytes:
        p = pick_gpu(entry, vram_bytes, kv_cache)
    else:
        return pick_ram(entry, ram_bytes, kv_cache)
    return replace(p, longest=longest(entry, p.type or PARTIAL_TYPE, gpus or vram_bytes))


def longest_context(entry: Entry, type_name: str, gpus: int | Sequence[Device], kv_cache: str, cap: int) -> int:
    """The longest context, in whole blocks of kv.CELL_ROUNDING tokens up to `cap`, at which offload.plan keeps
    every layer on `gpus` (0: none). Bisection: more context only ever needs more memory."""
    block = kv.CELL_ROUNDING

    def fits(blocks: int) -> bool:
        return offload.plan(planner_sizes(entry, type_name, blocks * block, (kv_cache, kv_cache)), gpus).full

    lo, hi = 0, cap // block  # lo fits (0 trivially); hi is the answer if it fits, else lo < answer < hi
    if fits(hi):
        return hi * block
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * block


def longest(entry: Entry, type_name: str, gpus: int | Sequence[Device]) -> Longest:
    """longest_context at each K/V type malhae offers, capped at CONTEXT_CAP_FACTOR × the trained context."""
    cap = CONTEXT_CAP_FACTOR * entry.context
    return Longest(type_name, {t: longest_context(entry, type_name, gpus, t, cap) for t in kv.KV_TYPES}, cap)


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
