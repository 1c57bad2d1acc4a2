"""What a GGUF file is and what running it would cost, for `malhae info`: facts only, no printing.

Everything comes from the header (metadata and tensor table), never from the weights, so describing a 25 GB file takes
milliseconds. The memory estimate is the engine's own: the same default context, the same offload rule, and
app/offload's model_sizes() and plan(), so that `info` shows exactly the numbers the engine plans with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

from app import hardware, offload, templates
from app.errors import UserError
from app.gguf_info import GGUFInfo, read_info

DEFAULT_MAX_CTX = 4096  # the engine's rule: the trained context, at most this (app.engine.DEFAULT_MAX_CTX)
DEFAULT_BATCH = 512  # the engine's n_batch before it is capped by the context
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
class Memory:
    n_ctx: int
    n_batch: int
    gpu_layers: int  # llama.cpp's number (n_layer + 1: everything, output layer included)
    n_layer: int
    mode: str  # "auto", "asked" (a number was given) or "what-if" (--vram)
    reason: str  # the planner's reason
    free_vram: int | None  # what the plan was made for (NVML, or --vram); None: no GPU
    weights_gpu: int
    weights_cpu: int
    kv_gpu: int
    kv_cpu: int
    compute: int  # the planner's compute-buffer estimate, on the GPU when any layer is there, else in RAM
    cuda_context: int
    note: str = ""

    @property
    def vram(self) -> int:
        return self.weights_gpu + self.kv_gpu + (self.compute + self.cuda_context if self.gpu_layers else 0)

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
    file_type: str | None  # general.file_type as llama.cpp names it, e.g. Q4_K_M
    quantization: list[TypeShare]
    tensor_bytes: int
    tokenizer: Tokenizer
    chat_template: ChatTemplate
    memory: Memory | None

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


def _int(value: object) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _file_type(value: object) -> str | None:
    import gguf

    if _int(value) is None:
        return None
    try:
        return gguf.LlamaFileType(int(value)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return f"type {value}"


def _tokenizer(info: GGUFInfo) -> Tokenizer:
    meta = info.metadata
    tokens = meta.get("tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type")
    tokens = tokens if isinstance(tokens, list) else []
    specials = []
    for role, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown"), ("sep", "seperator")):
        token = _int(meta.get(f"tokenizer.ggml.{key}_token_id"))
        if token is not None:
            specials.append(SpecialToken(role, token, tokens[token] if 0 <= token < len(tokens) else "?"))
    control = sum(1 for t in types if t == 3) if isinstance(types, list) else 0  # gguf TokenType.CONTROL
    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    return Tokenizer(model=meta.get("tokenizer.ggml.model"), pre=meta.get("tokenizer.ggml.pre"),
                     vocab_size=len(tokens), specials=specials, control_tokens=control,
                     add_bos=add_bos if isinstance(add_bos, bool) else None)


def _chat_template(info: GGUFInfo, name: str) -> ChatTemplate:
    source = info.metadata.get("tokenizer.chat_template")
    if isinstance(source, str) and source.strip():
        ours = templates.from_jinja(source)
        if ours is not None:
            return ChatTemplate("malhae", ours.name, len(source), ours.name)
        return ChatTemplate("custom", None, len(source), "the GGUF's own Jinja")
    known = templates.identify(name)
    used = f"{known.name} (from the model's name)" if known else f"{templates.for_model(name).name} (the default)"
    return ChatTemplate("none", None, 0, used)


def default_ctx(info: GGUFInfo) -> int:
    """The engine's default context: the trained one, at most DEFAULT_MAX_CTX."""
    return min(int(info.arch_value("context_length") or 2048), DEFAULT_MAX_CTX)


def memory(info: GGUFInfo, n_ctx: int | None = None, gpu_layers: str | int = "auto",
           vram_gib: float | None = None) -> Memory:
    """Where the weights, KV cache and buffers would go, by the engine's own planner (see Engine._plan_offload)."""
    n_ctx = int(n_ctx or default_ctx(info))
    if n_ctx < 16:
        raise UserError(f"--ctx {n_ctx} is too small; use at least 16 tokens")
    n_batch = min(DEFAULT_BATCH, n_ctx)
    # the planner expects arrays as their lengths, as read_info() gives them by default
    scalars = replace(info, metadata={k: len(v) if isinstance(v, list) else v for k, v in info.metadata.items()})
    sizes = offload.model_sizes(scalars, n_ctx, n_batch)
    n_layer = sizes.n_layer
    note = ""
    if vram_gib is not None and gpu_layers != "auto":
        raise UserError("--vram plans the automatic offload (--gpu-layers auto); give either --vram or --gpu-layers N")
    if isinstance(gpu_layers, str) and gpu_layers != "auto":
        try:
            gpu_layers = int(gpu_layers)
        except ValueError:
            raise UserError(f"--gpu-layers {gpu_layers!r}: use auto, 0 (CPU only) or a number of layers") from None
    if isinstance(gpu_layers, int):
        if gpu_layers < 0:
            raise UserError("--gpu-layers must be auto, 0 or a positive number")
        n = min(gpu_layers, n_layer + 1)
        mode, reason, free = "asked", "as asked", None
        if n and not hardware.llama_supports_gpu():
            note = "this llama-cpp-python has no CUDA support, so the engine would run everything on the CPU here"
    elif vram_gib is not None:
        if vram_gib < 0:
            raise UserError("--vram must be a number of GiB, 0 or more")
        free = int(vram_gib * GiB)
        p = offload.plan(sizes, free)
        n, mode, reason = p.n_gpu_layers, "what-if", p.reason
    else:
        gpus = hardware.nvidia_gpus() if hardware.llama_supports_gpu() else ()
        free = sum(g.free for g in gpus) if gpus else None
        p = offload.plan(sizes, free)
        n, mode, reason = p.n_gpu_layers, "auto", p.reason
    on_gpu = min(n, n_layer)
    weights = sum(t.nbytes for t in info.tensors)
    weights_gpu = sum(sizes.layer_bytes[:on_gpu]) + (sizes.output_bytes if n > n_layer else 0)
    kv_gpu = sizes.kv_bytes_per_layer * on_gpu
    return Memory(n_ctx=n_ctx, n_batch=n_batch, gpu_layers=n, n_layer=n_layer, mode=mode, reason=reason,
                  free_vram=free, weights_gpu=weights_gpu, weights_cpu=weights - weights_gpu, kv_gpu=kv_gpu,
                  kv_cpu=sizes.kv_bytes_per_layer * n_layer - kv_gpu, compute=sizes.compute_bytes,
                  cuda_context=offload.CUDA_CONTEXT_BYTES if n else 0, note=note)


def check_file(path: Path) -> None:
    if not path.exists():
        raise UserError(f"{path} does not exist; give a .gguf file or the name of a model in your store")
    if path.is_dir():
        raise UserError(f"{path} is a directory; give a .gguf file (convert a checkpoint folder with "
                        "`malhae convert`)")


def describe(path: Path, *, n_ctx: int | None = None, gpu_layers: str | int = "auto",
             vram_gib: float | None = None) -> ModelInfo:
    check_file(path)
    info = read_info(path, arrays=("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"))
    meta = info.metadata
    name = meta.get("general.name")
    name = name if isinstance(name, str) else None
    source = next((v for k in ("general.source.url", "general.source.repo_url", "malhae.source")
                   if isinstance(v := meta.get(k), str)), None)
    mix = [TypeShare(t, n, b) for t, (n, b) in sorted(info.type_counts().items(), key=lambda kv: -kv[1][1])]
    n_layer = _int(info.arch_value("block_count"))
    return ModelInfo(
        path=path, file_size=info.file_size, gguf_version=info.version, architecture=info.architecture,
        supported=info.architecture == "gptneox", name=name,
        license=meta.get("general.license") if isinstance(meta.get("general.license"), str) else None,
        source=source, parameters=sum(t.n_elements for t in info.tensors),
        context_length=_int(info.arch_value("context_length")), n_layer=n_layer,
        d_model=_int(info.arch_value("embedding_length")), n_head=_int(info.arch_value("attention.head_count")),
        n_head_kv=_int(info.arch_value("attention.head_count_kv")) or _int(info.arch_value("attention.head_count")),
        rotary_dims=_int(info.arch_value("rope.dimension_count")), d_ff=_int(info.arch_value("feed_forward_length")),
        file_type=_file_type(meta.get("general.file_type")), quantization=mix,
        tensor_bytes=sum(t.nbytes for t in info.tensors), tokenizer=_tokenizer(info),
        chat_template=_chat_template(info, name or path.stem),
        memory=memory(info, n_ctx, gpu_layers, vram_gib) if n_layer else None)
