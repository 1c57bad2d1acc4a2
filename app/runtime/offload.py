"""How many layers to put on the GPU: a pure function of the model's tensor sizes and the free VRAM.

llama.cpp offloads whole repeating layers (blk.N.*) plus, once all of them are on the GPU, the output layer; the
token embedding stays on the CPU (it is only indexed). Each offloaded layer also brings its share of the KV cache.
The GPU additionally needs a compute buffer (activations and logits for one batch) and room for the CUDA context,
which this estimates conservatively; a load that still fails is retried with fewer layers by the engine.

`choose` is the one place that turns `--gpu-layers auto|N|0` into a number of layers, for every command that loads a
model (chat, ask, complete, bench, eval) and for `malhae info`'s estimate, so they all offload alike.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace

from gguf import Keys

from app import units
from app.errors import UserError
from app.runtime import hardware
from app.runtime.gguf_info import GGUFInfo
from app.runtime.settings import DEFAULT_BATCH
from app.runtime.settings import gpu_layers as parse_gpu_layers

CUDA_CONTEXT_BYTES = 400 * 2**20  # driver + cuBLAS workspace, measured at 300-450 MB on recent CUDA
SAFETY_FRACTION = 0.05  # of the free memory, for fragmentation and other processes
_LAYER = re.compile(r"blk\.(\d+)\.")


@dataclass(frozen=True)
class ModelSizes:
    n_layer: int
    layer_bytes: list[int]  # weights of each repeating layer
    output_bytes: int  # output norm + output matrix (offloaded with the last "layer")
    kv_bytes_per_layer: int  # for the chosen context, f16 K and V
    compute_bytes: int  # GPU scratch for one batch

    @property
    def total(self) -> int:
        return sum(self.layer_bytes) + self.output_bytes + self.kv_bytes_per_layer * self.n_layer + self.compute_bytes


@dataclass(frozen=True)
class Plan:
    n_gpu_layers: int  # llama.cpp's number: n_layer + 1 means "everything, output layer included"
    n_layer: int
    gpu_bytes: int  # what the offloaded part needs, estimated
    free_bytes: int
    reason: str
    mode: str = "auto"  # "auto" (this machine's free memory), "asked" (a number was given), "what-if" (given memory)

    @property
    def full(self) -> bool:
        return self.n_gpu_layers > self.n_layer


def model_sizes(info: GGUFInfo, n_ctx: int, n_batch: int = DEFAULT_BATCH) -> ModelSizes:
    n_layer = info.arch_int(Keys.LLM.BLOCK_COUNT) or 0
    n_embd = info.arch_int(Keys.LLM.EMBEDDING_LENGTH) or 0
    n_ff = info.arch_int(Keys.LLM.FEED_FORWARD_LENGTH) or 4 * n_embd
    n_head = info.arch_int(Keys.Attention.HEAD_COUNT) or 1
    n_head_kv = info.arch_int(Keys.Attention.HEAD_COUNT_KV) or n_head
    n_vocab = int(info.metadata.get(Keys.Tokenizer.LIST) or 0)
    layers = [0] * n_layer
    output = 0
    for t in info.tensors:
        m = _LAYER.match(t.name)
        if m and int(m.group(1)) < n_layer:
            layers[int(m.group(1))] += t.nbytes
        elif t.name.startswith("output"):
            output += t.nbytes
    return sizes_from_shape(layers, output, n_embd=n_embd, n_ff=n_ff, n_head=n_head, n_head_kv=n_head_kv,
                            n_vocab=n_vocab, n_ctx=n_ctx, n_batch=n_batch)


def sizes_from_shape(layer_bytes: list[int], output_bytes: int, *, n_embd: int, n_ff: int, n_head: int,
                     n_head_kv: int, n_vocab: int, n_ctx: int, n_batch: int = DEFAULT_BATCH) -> ModelSizes:
    """The planner's figures from tensor sizes and the model's shape, for sizes known without a GGUF (the catalog)."""
    kv = 2 * n_ctx * (n_embd * n_head_kv // n_head) * 2  # K and V, f16
    compute = n_batch * (n_vocab + 4 * n_ff + 8 * n_embd) * 4 + 64 * 2**20
    return ModelSizes(len(layer_bytes), list(layer_bytes), output_bytes, kv, compute)


def plan(sizes: ModelSizes, free_bytes: int | None) -> Plan:
    """The most layers that fit in `free_bytes` (None: no usable GPU)."""
    if not free_bytes or sizes.n_layer == 0:
        return Plan(0, sizes.n_layer, 0, free_bytes or 0, "no GPU")
    budget = free_bytes * (1 - SAFETY_FRACTION) - CUDA_CONTEXT_BYTES - sizes.compute_bytes
    everything = sum(sizes.layer_bytes) + sizes.output_bytes + sizes.kv_bytes_per_layer * sizes.n_layer
    if everything <= budget:
        return Plan(sizes.n_layer + 1, sizes.n_layer, int(everything + sizes.compute_bytes + CUDA_CONTEXT_BYTES),
                    free_bytes, "all layers fit")
    used, n = 0, 0
    for layer in sizes.layer_bytes:
        if used + layer + sizes.kv_bytes_per_layer > budget:
            break
        used += layer + sizes.kv_bytes_per_layer
        n += 1
    reason = f"{n} of {sizes.n_layer} layers fit in {units.gib(free_bytes)} free"
    return Plan(n, sizes.n_layer, int(used + sizes.compute_bytes + CUDA_CONTEXT_BYTES) if n else 0, free_bytes, reason)


def choose(info: GGUFInfo, requested: str | int | None, *, n_ctx: int, n_batch: int = DEFAULT_BATCH,
           notify: Callable[[str], None] | None = None, vram: int | None = None, reserved: int = 0) -> Plan:
    """`--gpu-layers` for a model run with `n_ctx` tokens of KV cache in batches of `n_batch`: a number as given
    (capped at everything), 0 for the CPU, or for `auto` the most that fits in this machine's free VRAM (NVML), less
    `reserved` bytes that another model of the same run already takes. `vram` plans for that many free bytes instead
    (a what-if, for `malhae info --vram`). With an NVIDIA GPU but a CPU-only llama-cpp-python, says once per call how
    to install the CUDA build."""
    n_layer = info.arch_int(Keys.LLM.BLOCK_COUNT) or 0
    asked = parse_gpu_layers(requested)
    if vram is not None:
        if asked != "auto":
            raise UserError("--vram plans the automatic offload (--gpu-layers auto); give either --vram or "
                            "--gpu-layers N")
        return replace(plan(model_sizes(info, n_ctx, n_batch), vram), mode="what-if")
    supports = hardware.llama_supports_gpu()
    gpus = hardware.nvidia_gpus()
    if gpus and not supports and asked != 0 and notify:
        notify(f"an NVIDIA GPU ({gpus[0].name}) is present, but this llama-cpp-python was built without CUDA, so "
               f"malhae runs on the CPU. For GPU speed: {hardware.CUDA_INSTALL_HINT}")
    if isinstance(asked, int):
        if asked and not supports and not gpus and notify:
            notify("this llama-cpp-python was built without GPU support; running on the CPU")
        n = min(asked, n_layer + 1) if supports else 0
        return Plan(n, n_layer, 0, 0, "as asked" if supports else "no GPU support", mode="asked")
    if not supports or not gpus:
        return Plan(0, n_layer, 0, 0, "no GPU")
    return plan(model_sizes(info, n_ctx, n_batch), max(0, sum(g.free for g in gpus) - reserved))
