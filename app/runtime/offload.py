"""How many layers to put on which GPUs: a pure function of the model's tensor sizes and the devices' free memory.

llama.cpp offloads the output layer first, then whole repeating layers (blk.N.*), the last ones first, so that
n_gpu_layers = n_layer + 1 is everything; the token embedding stays on the CPU (it is only indexed). Each offloaded
layer also brings its share of the KV cache. Every GPU used additionally needs a compute buffer (activations and
logits for one batch) and room for its context (driver, BLAS workspace), which this estimates conservatively; a load
that still fails is retried with fewer layers by the engine. Over several GPUs llama.cpp splits by layers,
consecutively in device order, in the proportions `tensor_split` gives; the plan says those proportions and the
engine passes them (and the devices) as is.

`choose` is the one place that turns `--gpu-layers auto|N|0` and `--device` into a plan, for every command that loads
a model (chat, ask, complete, bench, eval, serve, imatrix) and for `malhae info`'s estimate, so they all offload
alike. The devices come from ggml (app.runtime.devices): CUDA, Metal, ROCm, Vulkan and SYCL are planned the same way.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from gguf import Keys

from malhae import units
from malhae.errors import UserError
from malhae.runtime import devices, hardware, kv
from malhae.runtime.devices import Device
from malhae.runtime.gguf_info import GGUFInfo, read_info
from malhae.runtime.llama import repeating_on_gpu
from malhae.runtime.settings import DEFAULT_BATCH, LoadOptions, Lora
from malhae.runtime.settings import gpu_layers as parse_gpu_layers

# per device: driver + BLAS workspace, measured at 300-450 MB on recent CUDA; used for every backend (Metal, ROCm,
# Vulkan and SYCL are not measured here, and erring large only costs a layer)
DEVICE_CONTEXT_BYTES = 400 * 2**20
SAFETY_FRACTION = 0.05  # of the free memory, for fragmentation and other processes
_LAYER = re.compile(r"blk\.(\d+)\.")


@dataclass(frozen=True)
class ModelSizes:
    n_layer: int
    layer_bytes: list[int]  # weights of each repeating layer
    output_bytes: int  # output norm + output matrix (offloaded with the last "layer")
    kv_bytes_per_layer: int  # K and V for the chosen context, at the chosen types (app.runtime.kv)
    compute_bytes: int  # GPU scratch for one batch

    @property
    def total(self) -> int:
        return sum(self.layer_bytes) + self.output_bytes + self.kv_bytes_per_layer * self.n_layer + self.compute_bytes


@dataclass(frozen=True)
class Plan:
    n_gpu_layers: int  # llama.cpp's number: n_layer + 1 means "everything, output layer included"
    n_layer: int
    gpu_bytes: int  # what the offloaded part needs, estimated, all devices together
    free_bytes: int  # what the planner could fill, all devices together
    reason: str
    mode: str = "auto"  # "auto" (this machine's free memory), "asked" (a number was given), "what-if" (given memory)
    devices: tuple[Device, ...] = ()  # where the offloaded layers go, in llama.cpp's order (passed to it as is)
    layers: tuple[int, ...] = ()  # how many of n_gpu_layers each device takes; the output layer counts on the last
    device_bytes: tuple[int, ...] = ()  # each device's estimated share of gpu_bytes
    device_free: tuple[int, ...] = ()  # what the planner could fill on each (devices.usable, less any reserved)
    cpu_only: bool = False  # --device cpu: not even llama.cpp's offload of large batches to a GPU
    packed: bool = False  # over several GPUs: packed to fit each one, since the proportional split did not fit

    @property
    def load_devices(self) -> tuple[int, ...] | None:
        """llama_model_params.devices as ggml indices: the plan's GPUs, () for none at all, None for llama.cpp's
        default (a plan of 0 layers, where llama.cpp may still run large prompt batches on a GPU)."""
        if self.cpu_only:
            return ()
        return tuple(d.index for d in self.devices) if self.n_gpu_layers and self.devices else None

    @property
    def full(self) -> bool:
        return self.n_gpu_layers > self.n_layer

    @property
    def split(self) -> tuple[float, ...] | None:
        """llama_model_params.tensor_split: layers per device, for llama.cpp's layer split over several GPUs."""
        return tuple(float(n) for n in self.layers) if len(self.devices) > 1 else None

    @property
    def where(self) -> str:
        """Where the layers go, in a few words: "CPU", "all layers on CUDA0 (NVIDIA GeForce RTX 4090)", "30 of 40
        layers on CUDA0 + CUDA1 (20 + 10)"."""
        return self.describe(detail=True)

    def describe(self, detail: bool = True) -> str:
        """`where`, with the GPU's description (detail) or only its ggml name (the chat's banner)."""
        if not self.n_gpu_layers:
            return "CPU"
        count = "all layers" if self.full else f"{self.n_gpu_layers} of {self.n_layer + 1} layers"
        if not self.devices:
            return f"{count} on the GPU"
        if len(self.devices) == 1:
            return f"{count} on {self.devices[0].label if detail else self.devices[0].name}"
        names = " + ".join(d.name for d in self.devices)
        return f"{count} on {names} ({' + '.join(str(n) for n in self.layers)})" if detail else f"{count} on {names}"

    def used(self) -> dict[int, int]:
        """Bytes this plan takes on each device (by ggml index), for planning a second model of the same run."""
        return {d.index: b for d, b in zip(self.devices, self.device_bytes, strict=False)}

def model_sizes(info: GGUFInfo, n_cells: int, n_batch: int = DEFAULT_BATCH, kv_types: tuple[str, str] = ("f16", "f16"),
                loras: Sequence[Lora] = ()) -> ModelSizes:
    """The planner's figures for a GGUF with a KV cache of `n_cells` tokens (app.runtime.kv.cells) of `kv_types`,
    and the LoRA adapters `loras` counted with the layers they adapt (adapter_bytes)."""
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
    extra, extra_output = adapter_bytes(loras, n_layer)
    layers = [a + b for a, b in zip(layers, extra, strict=True)]
    output += extra_output
    return sizes_from_shape(layers, output, n_embd=n_embd, n_ff=n_ff, n_head=n_head, n_head_kv=n_head_kv,
                            n_vocab=n_vocab, n_cells=n_cells, n_batch=n_batch, kv_types=kv_types)


def adapter_bytes(loras: Sequence[Lora], n_layer: int) -> tuple[list[int], int]:
    """The bytes of the adapters' tensors in each repeating layer, and in the output layer. llama.cpp allocates an
    adapter's A and B in the buffer of the tensor they adapt (llama_adapter_lora_init), so an offloaded layer takes
    its adapters to the GPU and a layer left on the CPU keeps them there: they are planned as part of their layer.
    The token embedding's stay on the CPU with it."""
    layers, output = [0] * n_layer, 0
    for lora in loras:
        for t in read_info(lora.path).tensors:
            m = _LAYER.match(t.name)
            if m and int(m.group(1)) < n_layer:
                layers[int(m.group(1))] += t.nbytes
            elif t.name.startswith("output"):
                output += t.nbytes
    return layers, output


def sizes_from_shape(layer_bytes: list[int], output_bytes: int, *, n_embd: int, n_ff: int, n_head: int,
                     n_head_kv: int, n_vocab: int, n_cells: int, n_batch: int = DEFAULT_BATCH,
                     kv_types: tuple[str, str] = ("f16", "f16")) -> ModelSizes:
    """The planner's figures from tensor sizes and the model's shape, for sizes known without a GGUF (the catalog)."""
    kv_layer = kv.layer_bytes(n_cells, n_embd * n_head_kv // n_head, *kv_types)
    compute = n_batch * (n_vocab + 4 * n_ff + 8 * n_embd) * 4 + 64 * 2**20
    return ModelSizes(len(layer_bytes), list(layer_bytes), output_bytes, kv_layer, compute)


def what_if(free_bytes: int) -> Device:
    """A GPU that exists only in the question (`malhae info --vram`, `recommend`, the catalog's columns)."""
    return Device(-1, "the GPU", "", "gpu", "", free_bytes, free_bytes)


def _units(sizes: ModelSizes, k: int) -> list[int]:
    """The bytes of each of the k pieces llama.cpp offloads for n_gpu_layers = k, in its order (which decides the
    device of each): the last k - 1 repeating layers, each with its KV cache, then the output layer."""
    n = sizes.n_layer
    repeating = repeating_on_gpu(k, n)
    return [b + sizes.kv_bytes_per_layer for b in sizes.layer_bytes[n - repeating:]] + [sizes.output_bytes]


def _shares(units_: list[int], counts: list[int]) -> list[int]:
    out, at = [], 0
    for c in counts:
        out.append(sum(units_[at:at + c]))
        at += c
    return out


def _proportional(n: int, weights: list[float]) -> list[int]:
    """n split in proportion to weights, whole numbers summing to n (largest remainders; ties to the first)."""
    total = sum(weights)
    if total <= 0:
        return [n] + [0] * (len(weights) - 1)
    raw = [n * w / total for w in weights]
    counts = [int(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: (counts[i] - raw[i], i))[:n - sum(counts)]:
        counts[i] += 1
    return counts


def _packed(units_: list[int], budgets: list[float]) -> list[int] | None:
    """Counts that fit each budget, filling the last device first (it takes the output layer), or None."""
    counts = [0] * len(budgets)
    j, used = len(budgets) - 1, 0.0
    for u in reversed(units_):
        while j >= 0 and used + u > budgets[j]:
            j, used = j - 1, 0.0
        if j < 0:
            return None
        counts[j] += 1
        used += u
    return counts


def plan(sizes: ModelSizes, gpus: int | None | Sequence[Device], *, reserved: Mapping[int, int] | None = None,
         ram: int | None = None) -> Plan:
    """The most layers that fit on `gpus` (devices, or an int: one GPU with that many bytes free; None or 0: no GPU).

    Each device needs its context and a compute buffer besides its layers; over several, the layers are split in
    proportion to what each has left after those (llama.cpp's own default splits by free memory), else packed to
    fit. `reserved` bytes per device index are taken already (another model of the same run); `ram` is the
    machine's, for devices whose memory is the RAM (devices.usable)."""
    one = gpus is None or isinstance(gpus, int)
    targets = ((what_if(gpus),) if gpus else ()) if one else tuple(gpus)
    if not targets or sizes.n_layer == 0:
        return Plan(0, sizes.n_layer, 0, 0, "no GPU")
    ram = ram if ram is not None else devices.host_memory(())
    reserved = reserved or {}
    frees = [max(0, devices.usable(d, ram) - reserved.get(d.index, 0)) if d.index >= 0 else d.free for d in targets]
    overhead = DEVICE_CONTEXT_BYTES + sizes.compute_bytes
    budgets = [f * (1 - SAFETY_FRACTION) - overhead for f in frees]
    free_total = sum(frees)
    for k in range(sizes.n_layer + 1, 0, -1):
        units_ = _units(sizes, k)
        counts = _proportional(len(units_), [max(0.0, b) for b in budgets])
        balanced = all(s <= b for s, b in zip(_shares(units_, counts), budgets, strict=True))
        if not balanced:
            counts = _packed(units_, budgets)
            if counts is None:
                continue
        keep = [i for i, c in enumerate(counts) if c]
        shares = _shares(units_, counts)
        used = tuple(targets[i] for i in keep)
        device_bytes = tuple(int(shares[i] + overhead) for i in keep)
        layers = tuple(counts[i] for i in keep)
        return Plan(k, sizes.n_layer, sum(device_bytes), free_total, _reason(k, sizes.n_layer, used, layers,
                    [frees[i] for i in keep], balanced), devices=used, layers=layers, device_bytes=device_bytes,
                    device_free=tuple(frees[i] for i in keep), packed=not balanced)
    return Plan(0, sizes.n_layer, 0, free_total, f"0 of {sizes.n_layer + 1} layers fit in {_free(frees)} free")


def _free(frees: list[int]) -> str:
    return " + ".join(units.gib(f) for f in frees)


def _reason(k: int, n_layer: int, used: tuple[Device, ...], layers: tuple[int, ...], frees: list[int],
            balanced: bool) -> str:
    fit = "all layers fit" if k > n_layer else f"{k} of {n_layer + 1} layers fit in {_free(frees)} free"
    if len(used) < 2:
        return fit
    how = "in proportion to free memory" if balanced else "to fit each one's memory"
    return f"{fit}; split {' + '.join(str(n) for n in layers)} over {len(used)} GPUs {how}"


def asked_plan(sizes: ModelSizes, n: int, targets: Sequence[Device], ram: int) -> Plan:
    """n layers as given (capped at everything) over `targets`, split in proportion to their free memory, whether
    it fits or not (the engine retries with fewer when it does not)."""
    n = min(n, sizes.n_layer + 1)
    if not targets or not n:
        return Plan(0, sizes.n_layer, 0, 0, "as asked", mode="asked")
    frees = [devices.usable(d, ram) for d in targets]
    counts = _proportional(n, [float(f) for f in frees])
    shares = _shares(_units(sizes, n), counts)
    keep = [i for i, c in enumerate(counts) if c]
    overhead = DEVICE_CONTEXT_BYTES + sizes.compute_bytes
    device_bytes = tuple(int(shares[i] + overhead) for i in keep)
    return Plan(n, sizes.n_layer, sum(device_bytes), sum(frees), "as asked", mode="asked",
                devices=tuple(targets[i] for i in keep), layers=tuple(counts[i] for i in keep),
                device_bytes=device_bytes, device_free=tuple(frees[i] for i in keep))


def fewer(p: Plan, n: int) -> Plan:
    """The same devices with n layers, split as before (the engine's retry after a failed load)."""
    if not n or not p.devices:
        return replace(p, n_gpu_layers=0, devices=(), layers=(), device_bytes=(), device_free=(), gpu_bytes=0)
    counts = _proportional(n, [float(c) for c in p.layers])
    keep = [i for i, c in enumerate(counts) if c]
    return replace(p, n_gpu_layers=n, devices=tuple(p.devices[i] for i in keep),
                   layers=tuple(counts[i] for i in keep), device_bytes=(), device_free=(), gpu_bytes=0)


_said: set[str] = set()


def _say_once(notify: Callable[[str], None] | None, message: str) -> None:
    """Hints are said once per process: a chat that loads another model, or a draft model, does not repeat them."""
    if notify and message not in _said:
        _said.add(message)
        notify(message)


def _said_split(p: Plan, notify: Callable[[str], None] | None) -> Plan:
    """Over several GPUs, say how the layers are shared (once): llama.cpp is given that split, not its own."""
    if len(p.devices) > 1:
        free = " + ".join(units.gib(f) for f in p.device_free)
        how = "packed to fit each one's memory" if p.packed else "in proportion to free memory"
        _say_once(notify, f"{p.where}: split over {len(p.devices)} GPUs {how} ({free} free)")
    return p


def choose(info: GGUFInfo, options: LoadOptions, *, notify: Callable[[str], None] | None = None,
           vram: int | None = None, reserved: Mapping[int, int] | None = None) -> Plan:
    """Where `options.gpu_layers` and `options.device` put a model run with options.kv_tokens tokens of KV cache
    (ctx × parallel, so ctx must be resolved; as llama.cpp pads it, app.runtime.kv.cells) of options' K/V types, in
    batches of options.batch, with options.lora's adapters in the layers they adapt.

    `gpu_layers`: a number as given (capped at everything), 0 for the CPU, or `auto`: the most that fits in the free
    memory of the devices ggml reports (app.runtime.devices), less `reserved` bytes per device that another model of
    the same run already takes. `device`: None/auto (llama.cpp's default: every discrete GPU, else the integrated
    ones), cpu, or names/numbers (devices.select). An integrated GPU chosen by auto is used only when the whole model
    fits: it shares the CPU's memory, so a partial offload only adds copies. `vram` plans for one GPU with that many
    free bytes instead (a what-if, for `malhae info --vram`). A build without any GPU device on a machine that has
    one says once how to install the right build (hardware.install_hint)."""
    n_layer = info.arch_int(Keys.LLM.BLOCK_COUNT) or 0
    asked = parse_gpu_layers(options.gpu_layers)
    device, n_batch = options.device, options.batch
    n_cells, kv_types = kv.cells(options.ctx, options.parallel), (options.kv_cache_k, options.kv_cache_v)
    if vram is not None:
        if asked != "auto":
            raise UserError("--vram plans the automatic offload (--gpu-layers auto); give either --vram or "
                            "--gpu-layers N")
        if device is not None and device.strip().lower() not in ("", "auto"):
            raise UserError("--vram plans for a GPU that is not here; leave out --device")
        return replace(plan(model_sizes(info, n_cells, n_batch, kv_types, options.lora), vram), mode="what-if")
    listed = devices.listed()
    chosen = devices.select(device, listed)
    mode = "asked" if isinstance(asked, int) else "auto"
    if asked == 0 or chosen == ():
        return Plan(0, n_layer, 0, 0, "as asked" if asked == 0 else "--device cpu", mode=mode, cpu_only=chosen == ())
    targets = chosen if chosen is not None else devices.offload_targets(listed)
    if not targets:
        hint = hardware.install_hint(hardware.facts())
        if hint:
            _say_once(notify, hint)
        elif asked != "auto":
            _say_once(notify, "this llama-cpp-python was built without GPU support; running on the CPU")
        return Plan(0, n_layer, 0, 0, "no GPU support" if asked != "auto" else "no GPU", mode=mode)
    sizes = model_sizes(info, n_cells, n_batch, kv_types, loras=options.lora)
    ram = devices.host_memory(listed)
    if isinstance(asked, int):
        return _said_split(asked_plan(sizes, asked, targets, ram), notify)
    p = _said_split(plan(sizes, targets, reserved=reserved, ram=ram), notify)
    if chosen is None and all(d.kind == "igpu" for d in targets) and not p.full:
        gpu = targets[0]
        cpu = Plan(0, n_layer, 0, p.free_bytes, f"the integrated GPU {gpu.label} has room for {p.n_gpu_layers} of "
                   f"{n_layer + 1} layers; it shares the CPU's memory, so a partial offload gains nothing and the CPU "
                   f"runs it (--device {gpu.name} offloads anyway)")
        _say_once(notify, cpu.reason)
        return cpu
    if chosen is None and all(d.kind == "igpu" for d in targets):
        return replace(p, reason=f"{p.reason} on the integrated GPU")
    return p
