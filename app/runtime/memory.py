"""What a model will take in memory before it is loaded, whether it fits beside others, and giving memory back.

For a server that holds several models (app.serve.residency): the offload planner's figures (app.runtime.offload:
weights, KV cache at the model's context and slot count, compute buffers, adapters) decide where a model goes and
what it leaves in RAM; `room` is the one rule that says which idle models must go for a new one to fit.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from gguf import Keys

from malhae import units
from malhae.runtime.settings import LoadOptions, context_size


@dataclass(frozen=True)
class Need:
    """A model's memory as planned: `ram` bytes on the host, `vram` on GPUs, and `short`: the bytes a GPU could not
    take that it would with more free memory (0 when everything is offloaded, or no GPU is in play)."""

    ram: int
    vram: int
    short: int


def need(options: LoadOptions, notify=None) -> Need:
    """The Need of `options.model` loaded as `options` say, on this machine now (its GPUs' free memory)."""
    from malhae.runtime import kv, offload
    from malhae.runtime.engine import check_model_file

    info = check_model_file(options.model)  # a file that cannot be a model: its one-line error now
    ctx = context_size(options.ctx, info.arch_int(Keys.LLM.CONTEXT_LENGTH))
    resolved = replace(options, ctx=ctx, batch=max(min(options.batch, ctx), options.parallel))
    sizes = offload.model_sizes(info, kv.cells(ctx, options.parallel), resolved.batch,
                                (options.kv_cache_k, options.kv_cache_v), options.lora)
    plan = offload.choose(info, resolved, notify=notify)
    vram = plan.gpu_bytes if plan.n_gpu_layers else 0
    ram = max(0, sizes.total - vram)
    gpu_in_play = plan.mode == "auto" and (plan.n_gpu_layers > 0 or plan.free_bytes > 0)
    return Need(ram, vram, ram if gpu_in_play and not plan.full else 0)


def settled(planned: Need, plan) -> Need:
    """A model's Need once loaded, by the plan it was loaded with (app.runtime.offload.Plan): what was planned
    before idle models made room may have been a partial offload."""
    vram = plan.gpu_bytes if plan.n_gpu_layers else 0
    return Need(max(0, planned.ram + planned.vram - vram), vram, 0)


@dataclass
class Room:
    """`room`'s answer: unload `evict` (least recently used first) and load; or `wait` for a busy model; or
    `refused`, with the reason, when even an empty server could not hold it."""

    evict: list = field(default_factory=list)
    wait: bool = False
    refused: str = ""
    why: str = ""


def room(new: Need, loaded: Sequence[tuple[object, Need, bool, float]], max_loaded: int, max_memory: int) -> Room:
    """Which loaded models must go for `new` to load. `loaded`: (model, its Need, idle?, last used) for each model
    in memory or loading. Rules, in order: at most `max_loaded` models; at most `max_memory` bytes of RAM in all
    (by the planner's figures); and a model a GPU could not hold whole while idle models hold GPU memory gets that
    memory (Ollama's preference: a whole offload beats keeping an idle model). Busy models are never chosen: when
    only they stand in the way, wait."""
    if new.ram > max_memory:
        return Room(refused=f"it needs {units.gib(new.ram)} of RAM and this server may use {units.gib(max_memory)} "
                            "(--max-memory); give it more, or a smaller --ctx or --parallel")
    idle = sorted((entry for entry in loaded if entry[2]), key=lambda entry: entry[3])
    kept = list(loaded)
    evict: list = []
    reasons: list[str] = []
    freed_vram = 0

    def over() -> str:
        if len(kept) + 1 > max_loaded:
            return f"at most {max_loaded} model{'s' if max_loaded > 1 else ''} at once (--max-loaded)"
        if sum(n.ram for _, n, _, _ in kept) + new.ram > max_memory:
            return f"{units.gib(max_memory)} of RAM in all (--max-memory)"
        if new.short > freed_vram and any(n.vram for _, n, _, _ in idle):
            return "GPU memory for all of its layers"
        return ""

    while (reason := over()) and idle:
        gpu = reason.startswith("GPU")
        pick = next(entry for entry in idle if entry[1].vram) if gpu else idle[0]
        idle.remove(pick)
        kept = [entry for entry in kept if entry[0] is not pick[0]]
        evict.append(pick[0])
        freed_vram += pick[1].vram
        if reason not in reasons:
            reasons.append(reason)
    if len(kept) + 1 > max_loaded or sum(n.ram for _, n, _, _ in kept) + new.ram > max_memory:
        return Room(wait=True)
    return Room(evict=evict, why="; ".join(reasons))


def lower_priority(nice: int) -> None:
    """Lower this thread's CPU priority (Linux sets it per thread), so that a model loading does not slow the
    decodes of the models already serving; elsewhere, nothing."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


def return_free() -> None:
    """Hand memory freed by an unloaded model back to the OS. glibc keeps freed heap for reuse, and after a large
    free raises its threshold for using mmap, so the KV cache and buffers of a closed model could stay in this
    process's RSS; malloc_trim returns them. (No gc.collect: a closed model's memory is llama.cpp's, freed by
    close(), and a full collection holds the GIL long enough to stall the other models' streams.)"""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        pass
