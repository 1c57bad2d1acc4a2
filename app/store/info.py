"""What a GGUF file is and what running it would cost, for `malhae info`: facts only, no printing.

Everything comes from the header (metadata and tensor table), never from the weights, so describing a 25 GB file takes
milliseconds. The memory estimate is the engine's own: the same default context, the same offload rule, and
app/offload's model_sizes() and plan(), so that `info` shows exactly the numbers the engine plans with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

from gguf import Keys, TokenType

from malhae import units
from malhae.errors import UserError
from malhae.runtime import devices, kv, lora, offload, templates
from malhae.runtime.devices import Device
from malhae.runtime.gguf_info import GGUFInfo, check_shape, read_info
from malhae.runtime.llama import repeating_on_gpu
from malhae.runtime.settings import LoadOptions, context_size
from malhae.runtime.settings import gpu_layers as parse_gpu_layers

GiB = 2**30


@dataclass(frozen=True)
class TypeShare:
    type: str  # GGML tensor type, e.g. Q4_K
    tensors: int
    bytes: int


@dataclass(frozen=True)
class SpecialToken:
    role: str  # bos, eos, pad, unk, sep
    id: int
    text: str


@dataclass(frozen=True)
class Tokenizer:
    model: str | None  # tokenizer.ggml.model, e.g. gpt2 (byte-level BPE)
    pre: str | None  # llama.cpp's pre-tokenizer name
    vocab_size: int
    specials: list[SpecialToken]
    control_tokens: int
    add_bos: bool | None


@dataclass(frozen=True)
class ChatTemplate:
    kind: str  # "malhae" (one of ours), "custom" (foreign Jinja), "none"
    name: str | None  # our template's name when kind is "malhae"
    chars: int  # length of the Jinja text
    used: str  # the format `ask`/`chat` would use without --template


@dataclass(frozen=True)
class DeviceShare:
    name: str
    description: str
    platform: str
    layers: int  # of the plan's gpu_layers (the output layer counts on the last GPU)
    bytes: int  # estimated, context and compute buffer included
    free: int  # what the plan could fill there


@dataclass(frozen=True)
class Memory:
    n_ctx: int
    n_batch: int
    gpu_layers: int  # llama.cpp's number (n_layer + 1: everything, output layer included)
    n_layer: int
    mode: str  # "auto", "asked" (a number was given) or "what-if" (--vram)
    reason: str  # the planner's reason
    free_vram: int | None  # what the plan was made for (ggml's devices, or --vram); None: no GPU
    weights_gpu: int
    weights_cpu: int
    kv_gpu: int
    kv_cpu: int
    compute: int  # the planner's compute-buffer estimate: one on each GPU used, else one in RAM
    gpu_buffers: int  # how many GPUs hold a compute buffer (0: CPU only)
    device_context: int  # every GPU's context (driver, BLAS workspace), all together
    adapters: int = 0  # bytes of the --lora adapters' tensors, in the weights (planned with the layers they adapt)
    kv_cache_k: str = "f16"  # the KV cache's types the estimate counts (app.runtime.kv)
    kv_cache_v: str = "f16"
    where: str = "CPU"  # the plan in a few words (offload.Plan.where)
    split: tuple[DeviceShare, ...] = ()  # each GPU's part, in llama.cpp's order
    devices: tuple[Device, ...] = ()  # every device this llama-cpp-python has (ggml's list)
    note: str = ""

    @property
    def kv_types(self) -> str:
        """The cache's types as messages say them: "f16", or "K q8_0, V f16"."""
        return kv.describe(self.kv_cache_k, self.kv_cache_v)

    @property
    def vram(self) -> int:
        return self.weights_gpu + self.kv_gpu + self.compute * self.gpu_buffers + self.device_context

    @property
    def ram(self) -> int:
        return self.weights_cpu + self.kv_cpu + (0 if self.gpu_layers else self.compute)


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    file_size: int
    gguf_version: int
    architecture: str | None
    supported: bool  # malhae runs it (GPT-NeoX)
    name: str | None
    license: str | None
    source: str | None
    parameters: int  # sum of tensor elements (a tied output matrix stored twice counts twice, as in the file)
    context_length: int | None  # trained
    n_layer: int | None
    d_model: int | None
    n_head: int | None
    n_head_kv: int | None
    rotary_dims: int | None
    d_ff: int | None
    file_type: str | None  # general.file_type as the --type name, e.g. q4_k_m (as `malhae models` shows it)
    quantization: list[TypeShare]
    tensor_bytes: int
    tokenizer: Tokenizer
    chat_template: ChatTemplate
    memory: Memory | None
    imatrix: ImatrixUse | None = None  # the importance matrix it was quantized with (quantize.imatrix.*), if any

    @property
    def bits_per_weight(self) -> float:
        return self.tensor_bytes * 8 / self.parameters if self.parameters else 0.0

    def as_dict(self) -> dict:
        data = asdict(self)
        data["path"] = str(self.path)
        data["bits_per_weight"] = round(self.bits_per_weight, 3)
        if self.memory is not None:
            data["memory"] |= {"vram": self.memory.vram, "ram": self.memory.ram}
        return data


@dataclass(frozen=True)
class ImatrixUse:
    file: str | None  # "auto" when malhae computed it during convert
    dataset: str | None
    entries: int | None
    chunks: int | None


def _imatrix(info: GGUFInfo) -> ImatrixUse | None:
    meta = info.metadata
    if not any(k.startswith("quantize.imatrix.") for k in meta):
        return None
    counts = [meta.get(f"quantize.imatrix.{k}") for k in ("entries_count", "chunks_count")]
    entries, chunks = (v if isinstance(v, int) and not isinstance(v, bool) else None for v in counts)
    return ImatrixUse(info.text("quantize.imatrix.file"), info.text("quantize.imatrix.dataset"), entries, chunks)


def _tokenizer(info: GGUFInfo) -> Tokenizer:
    meta = info.metadata
    tokens = meta.get(Keys.Tokenizer.LIST)
    types = meta.get(Keys.Tokenizer.TOKEN_TYPE)
    tokens = tokens if isinstance(tokens, list) else []
    specials = []
    for role, key in (("bos", Keys.Tokenizer.BOS_ID), ("eos", Keys.Tokenizer.EOS_ID), ("pad", Keys.Tokenizer.PAD_ID),
                      ("unk", Keys.Tokenizer.UNK_ID), ("sep", Keys.Tokenizer.SEP_ID)):
        token = meta.get(key)
        if isinstance(token, int) and not isinstance(token, bool):
            specials.append(SpecialToken(role, token, tokens[token] if 0 <= token < len(tokens) else "?"))
    control = sum(1 for t in types if t == TokenType.CONTROL) if isinstance(types, list) else 0
    add_bos = meta.get(Keys.Tokenizer.ADD_BOS)
    return Tokenizer(model=info.text(Keys.Tokenizer.MODEL), pre=info.text(Keys.Tokenizer.PRE),
                     vocab_size=len(tokens), specials=specials, control_tokens=control,
                     add_bos=add_bos if isinstance(add_bos, bool) else None)


def _chat_template(info: GGUFInfo, name: str) -> ChatTemplate:
    source = info.metadata.get(Keys.Tokenizer.CHAT_TEMPLATE)
    if isinstance(source, str) and source.strip():
        ours = templates.from_jinja(source)
        if ours is not None:
            return ChatTemplate("malhae", ours.name, len(source), ours.name)
        return ChatTemplate("custom", None, len(source), "the GGUF's own Jinja")
    known = templates.identify(name)
    used = f"{known.name} (from the model's name)" if known else f"{templates.for_model(name).name} (the default)"
    return ChatTemplate("none", None, 0, used)


def memory(info: GGUFInfo, options: LoadOptions | None = None, vram_gib: float | None = None) -> Memory:
    """Where the weights, KV cache and buffers would go if loaded as `options` say: the engine's own context rule
    and offload choice (app.runtime.offload.choose), so `info` shows what `chat` would do."""
    options = options or LoadOptions()
    kv.check_types(options.kv_cache_k, options.kv_cache_v, options.flash_attn, info.head_dim)  # as the engine would
    gpu_layers = options.gpu_layers
    n_ctx = context_size(options.ctx, info.arch_int(Keys.LLM.CONTEXT_LENGTH))
    n_batch = min(options.batch, n_ctx)
    # the planner expects arrays as their lengths, as read_info() gives them by default
    scalars = replace(info, metadata={k: len(v) if isinstance(v, list) else v for k, v in info.metadata.items()})
    lora.check(options.lora, info)  # an adapter of another model: refused as the engine refuses it
    sizes = offload.model_sizes(scalars, kv.cells(n_ctx, options.parallel), n_batch,
                                (options.kv_cache_k, options.kv_cache_v), options.lora)
    n_layer = sizes.n_layer
    said: list[str] = []  # the install hint, where the build cannot use this machine's GPU
    p = offload.choose(scalars, replace(options, ctx=n_ctx, batch=n_batch), notify=said.append,
                       vram=units.gib_bytes("--vram", vram_gib) if vram_gib is not None else None)
    n, mode, reason = p.n_gpu_layers, p.mode, p.reason
    free = p.free_bytes if mode == "what-if" or (mode == "auto" and p.free_bytes) else None
    note = " ".join(said)
    if mode == "asked" and reason == "no GPU support":  # show where N layers would go, and say they will not
        n = min(int(parse_gpu_layers(gpu_layers)), n_layer + 1)
        note = note or ("this llama-cpp-python has no GPU support, so the engine would run everything on the CPU "
                        "here" if n else "")
    on_gpu = repeating_on_gpu(n, n_layer)
    adapters = sum(t.nbytes for a in options.lora for t in read_info(a.path).tensors)
    weights = sum(t.nbytes for t in info.tensors) + adapters
    weights_gpu = sum(sizes.layer_bytes[n_layer - on_gpu:]) + (sizes.output_bytes if n else 0)
    kv_gpu = sizes.kv_bytes_per_layer * on_gpu
    gpus = max(1, len(p.devices)) if n else 0
    split = tuple(DeviceShare(d.name, d.description, d.platform, c, b, f)
                  for d, c, b, f in zip(p.devices, p.layers, p.device_bytes, p.device_free, strict=False))
    return Memory(n_ctx=n_ctx, n_batch=n_batch, gpu_layers=n, n_layer=n_layer, mode=mode, reason=reason,
                  free_vram=free, weights_gpu=weights_gpu, weights_cpu=weights - weights_gpu, kv_gpu=kv_gpu,
                  kv_cpu=sizes.kv_bytes_per_layer * n_layer - kv_gpu, compute=sizes.compute_bytes,
                  gpu_buffers=gpus, device_context=offload.DEVICE_CONTEXT_BYTES * gpus, adapters=adapters,
                  kv_cache_k=options.kv_cache_k, kv_cache_v=options.kv_cache_v,
                  where=p.where if n == p.n_gpu_layers else f"{n} layers on the GPU", split=split,
                  devices=devices.listed(), note=note)


def check_file(path: Path) -> None:
    if not path.exists():
        raise UserError(f"{path} does not exist; give a .gguf file or the name of a model in your store")
    if path.is_dir():
        raise UserError(f"{path} is a directory; give a .gguf file (convert a checkpoint folder with "
                        "`malhae convert`)")


@dataclass(frozen=True)
class AdapterFacts:
    """What `malhae info` says of a LoRA adapter GGUF, from its header: nothing is loaded."""

    path: Path
    name: str
    file_size: int
    tensor_type: str  # f16 or f32
    parameters: int
    rank: int
    alpha: float  # PEFT's lora_alpha (malhae.lora.peft_alpha), else the file's (llama.cpp's) alpha
    rslora: bool | None  # scaled by alpha/√r (malhae's adapters say; None: the file does not)
    scale: float  # what B·A is multiplied by at --lora NAME:1 (llama.cpp's alpha / rank)
    targets: tuple[str, ...]
    layers: int  # repeating layers adapted
    base: str | None  # as its adapter_config.json named it
    source: str | None
    bases_in_store: tuple[str, ...]  # the store's models it belongs to (app.store.adapters)

    def as_dict(self) -> dict:
        return asdict(self) | {"path": str(self.path), "kind": "adapter"}


def describe_adapter(info: GGUFInfo) -> AdapterFacts:
    """An adapter's facts from its header, and which store models it runs on (so the user need not guess a -m)."""
    from malhae.store import adapters
    from malhae.store.local import entry_for, open_store

    a = lora.AdapterInfo.of(info)
    meta = info.metadata
    peft_alpha, rslora = meta.get("malhae.lora.peft_alpha"), meta.get("malhae.lora.rslora")
    store = open_store()
    entry = entry_for(info.path.stem, info.path, info)
    bases = tuple(m.name for m in adapters.bases(entry, store.entries()))
    return AdapterFacts(info.path, a.name, info.file_size, entry.type, info.n_params, a.rank,
                        float(peft_alpha) if isinstance(peft_alpha, (int, float)) else a.alpha,
                        rslora if isinstance(rslora, bool) else None, a.alpha / a.rank if a.rank else 0.0, a.targets,
                        len({n.split(".")[1] for n in a.pairs if n.startswith("blk.")}), a.base, info.source, bases)


def describe(path: Path, options: LoadOptions | None = None, *,
             vram_gib: float | None = None) -> ModelInfo | AdapterFacts:
    """Everything `malhae info` says of the GGUF at `path`, its memory as if loaded as `options` say (a LoRA
    adapter: its own facts, AdapterFacts)."""
    check_file(path)
    info = read_info(path, arrays=(Keys.Tokenizer.LIST, Keys.Tokenizer.TOKEN_TYPE))
    if info.text(Keys.General.TYPE) == "adapter":
        return describe_adapter(info)
    if info.text("general.type") == "imatrix":
        raise UserError(f"{path.name} is an importance matrix ({len(info.tensors) // 2} matrices, "
                        f"{info.metadata.get('imatrix.chunk_count', '?')} chunks of "
                        f"{info.metadata.get('imatrix.chunk_size', '?')} tokens), not a model; quantize with it: "
                        f"malhae convert DIR --type iq3_xxs --imatrix {path.name}")
    check_shape(info)
    mix = [TypeShare(t, n, b) for t, (n, b) in sorted(info.type_counts().items(), key=lambda kv: -kv[1][1])]
    n_layer = info.arch_int(Keys.LLM.BLOCK_COUNT)
    n_head = info.arch_int(Keys.Attention.HEAD_COUNT)
    return ModelInfo(
        path=path, file_size=info.file_size, gguf_version=info.version, architecture=info.architecture,
        supported=info.architecture == "gptneox", name=info.name, license=info.license, source=info.source,
        parameters=info.n_params, context_length=info.arch_int(Keys.LLM.CONTEXT_LENGTH), n_layer=n_layer,
        d_model=info.arch_int(Keys.LLM.EMBEDDING_LENGTH), n_head=n_head,
        n_head_kv=info.arch_int(Keys.Attention.HEAD_COUNT_KV) or n_head,
        rotary_dims=info.arch_int(Keys.Rope.DIMENSION_COUNT), d_ff=info.arch_int(Keys.LLM.FEED_FORWARD_LENGTH),
        file_type=info.file_type, quantization=mix, tensor_bytes=info.tensor_bytes, tokenizer=_tokenizer(info),
        chat_template=_chat_template(info, info.name or path.stem),
        memory=memory(info, options, vram_gib) if n_layer else None, imatrix=_imatrix(info))
