"""The small part of llama-cpp-python's low-level API that malhae uses, behind typed helpers.

The low-level API (llama_decode, native samplers, llama_token_to_piece) is used instead of `llama_cpp.Llama` because
the high-level streaming path keeps only about a third of llama.cpp's decode speed on a GPU. This module owns the
process-wide pieces: backend initialisation, llama.cpp's log output (silent unless asked for) and where its libraries
are; and the objects every caller needs: a Model, a Context on it, a Batch of tokens to decode.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import llama_cpp as lc
import numpy as np

from malhae.errors import UserError
from malhae.runtime import ggml, kv
from malhae.runtime.interrupts import Interrupts, abort_callback
from malhae.runtime.settings import LoadOptions, Lora, check

_backend_ready = False
_log_sink: Callable[[int, str], None] | None = None
_verbose = False


@lc.llama_log_callback
def _log_callback(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    """llama.cpp's log line, from inside whatever llama.cpp call is running: nothing may raise out of here (ctypes
    would print the exception and swallow it; a Ctrl-C swallowed here let `malhae convert` run on to the end)."""
    try:
        message = text.decode("utf-8", "replace") if text else ""
        if _log_sink is not None:
            _log_sink(level, message)
        if _verbose:
            sys.stderr.write(message)
    except BaseException as e:  # noqa: BLE001 - a log line is never worth failing llama.cpp's work for
        Interrupts.caught(e)


def init(verbose: bool | None = None) -> None:
    """Initialise llama.cpp once; its log goes to stderr only when `verbose` (else nowhere; None: as it was)."""
    global _backend_ready, _verbose
    if verbose is not None:
        _verbose = verbose
    if not _backend_ready:
        lc.llama_log_set(_log_callback, ctypes.c_void_p(0))
        lc.llama_backend_init()
        _backend_ready = True


@contextmanager
def log_to(sink: Callable[[int, str], None]) -> Iterator[None]:
    """Receive llama.cpp's log lines inside the block (to report progress or capture an error's reason); whoever was
    receiving them before gets them back afterwards."""
    global _log_sink
    init()
    previous, _log_sink = _log_sink, sink
    try:
        yield
    finally:
        _log_sink = previous


lib_dir = ggml.lib_dir  # where the llama.cpp and ggml shared libraries that llama-cpp-python loads are


def _cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return any(line.startswith("flags") and "amx_int8" in line.split() for line in f)
    except OSError:
        return False


def use_extra_buffer_types() -> bool:
    """Whether llama.cpp may repack weights into its extra CPU buffers (AMX, CPU_REPACK).

    On CPUs with AMX (Xeon Sapphire Rapids and later) the vendored llama.cpp's AMX matmul segfaults on any batch of
    more than one token with the types it repacks (Q8_0, Q4_0, Q4_K, Q5_K, Q6_K) — reproduced here with llama-cpp-python
    0.3.36, and reported upstream as ggml-org/llama.cpp#20824. Ollama dropped AMX for the same reason (and measured it
    slower on Sapphire Rapids). So extra buffers are off on AMX CPUs; MALHAE_EXTRA_BUFTS=1 or 0 overrides.
    """
    forced = os.environ.get("MALHAE_EXTRA_BUFTS")
    if forced in ("0", "1"):
        return forced == "1"
    return not _cpu_has_amx()


T = TypeVar("T", bound="Owned")


class Owned:
    """Holds memory llama.cpp allocated: freed by close(), at the end of a with-block, or by the garbage collector
    (close() must be safe to call twice and on a half-made object)."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: T) -> T:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


class Model(Owned):
    """A loaded GGUF model (or only its vocabulary); free it with close() or a with-block."""

    def __init__(self, path: Path, *, vocab_only: bool = False, n_gpu_layers: int = 0, use_mmap: bool = True,
                 devices: Sequence[int] | None = None, tensor_split: Sequence[float] | None = None):
        """`devices`: ggml device indices to offload to, in order (None: llama.cpp's default choice; (): none, not
        even for large batches); `tensor_split`: the layers each of them takes (app.runtime.offload.Plan.split)."""
        init()
        params = lc.llama_model_default_params()
        params.vocab_only = vocab_only
        params.n_gpu_layers = n_gpu_layers
        params.use_mmap = use_mmap
        params.use_extra_bufts = use_extra_buffer_types()
        if devices is not None:  # a NULL-terminated array of ggml_backend_dev_t; llama.cpp copies it at load
            chosen = (ctypes.c_void_p * (len(devices) + 1))(*(ggml.device_handle(i) for i in devices), None)
            params.devices = ctypes.cast(chosen, ctypes.c_void_p)
        if tensor_split:  # llama_max_devices() floats, copied by llama.cpp at load
            if len(tensor_split) > lc.llama_max_devices():
                raise UserError(f"this llama-cpp-python splits over at most {lc.llama_max_devices()} devices; "
                                "name fewer with --device")
            split = (ctypes.c_float * lc.llama_max_devices())(*tensor_split)
            params.tensor_split = split
            params.split_mode = lc.LLAMA_SPLIT_MODE_LAYER
        errors: list[str] = []
        with log_to(lambda level, msg: errors.append(msg) if level == 2 or "error" in msg.lower() else None):
            self.ptr = lc.llama_model_load_from_file(str(path).encode(), params)
        Interrupts.deliver()  # a Ctrl-C its log callback caught (the model is freed with this object)
        if not self.ptr:
            reason = errors[-1].strip() if errors else "llama.cpp could not load it"
            raise UserError(f"cannot load {path}: {reason}")
        self.path = path
        self.n_gpu_layers = n_gpu_layers
        self.adapters: dict[Path, object] = {}  # LoRA adapters loaded on this model, by file (see adapter())
        self.vocab = lc.llama_model_get_vocab(self.ptr)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)

    @classmethod
    def planned(cls, options: LoadOptions, plan) -> Model:
        """options.model loaded where an app.runtime.offload.Plan puts it (its layers, devices and split): the one
        place where a LoadOptions' model-level settings become llama.cpp's model parameters."""
        return cls(options.model, n_gpu_layers=plan.n_gpu_layers, devices=plan.load_devices, tensor_split=plan.split)

    def adapter(self, path: Path):
        """The LoRA adapter in `path`, loaded onto this model once (its tensors go where the layers they adapt are)
        and freed with the model; a file llama.cpp refuses is a UserError with its reason."""
        key = Path(path).resolve()
        if key not in self.adapters:
            errors: list[str] = []
            with log_to(lambda level, msg: errors.append(msg) if level == 2 else None):
                ptr = lc.llama_adapter_lora_init(self.ptr, str(path).encode())
            Interrupts.deliver()
            if not ptr:
                reason = errors[-1].strip().split(": ", 1)[-1] if errors else "llama.cpp could not load it"
                raise UserError(f"cannot apply the adapter {path}: {reason}")
            self.adapters[key] = ptr
        return self.adapters[key]

    def close(self) -> None:
        if getattr(self, "ptr", None):
            # before the model they belong to; a load interrupted in its log callback has none yet
            adapters, self.adapters = getattr(self, "adapters", {}), {}
            for adapter in adapters.values():
                lc.llama_adapter_lora_free(adapter)
            # cleared first: a Ctrl-C raised as the free returns would leave ptr set for __del__ to free again
            ptr, self.ptr = self.ptr, None
            lc.llama_model_free(ptr)


    @property
    def n_ctx_train(self) -> int:
        return lc.llama_model_n_ctx_train(self.ptr)

    @property
    def bos(self) -> int | None:
        """The beginning-of-sequence token when the vocabulary adds one to every text (GPT-NeoX does not), else None."""
        return lc.llama_vocab_bos(self.vocab) if lc.llama_vocab_get_add_bos(self.vocab) else None

    def is_eog(self, token: int) -> bool:
        return bool(lc.llama_vocab_is_eog(self.vocab, token))

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = lc.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        tokens = (lc.llama_token * cap)()
        n = lc.llama_tokenize(self.vocab, data, len(data), tokens, cap, add_special, parse_special)
        if n < 0:  # buffer too small: llama.cpp says how many it needs
            cap = -n
            tokens = (lc.llama_token * cap)()
            n = lc.llama_tokenize(self.vocab, data, len(data), tokens, cap, add_special, parse_special)
        return list(tokens[:n])

    def token_bytes(self, token: int, *, special: bool = True) -> bytes:
        buf = ctypes.create_string_buffer(256)
        n = lc.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = lc.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]


def repeating_on_gpu(n_gpu_layers: int, n_layer: int) -> int:
    """How many repeating layers llama.cpp puts on the GPU for n_gpu_layers: it offloads the output layer first,
    then the last repeating layers (i_gpu_start = n_layer + 1 - n_gpu_layers in llama-model.cpp), so 1 means the
    output layer alone and n_layer + 1 everything."""
    return max(0, min(n_gpu_layers, n_layer + 1) - 1)


def _check_kv_fits(model: Model, n_cells: int, type_k: str, type_v: str) -> None:
    """Refuse a KV cache larger than this machine's RAM before llama.cpp allocates it.

    Linux overcommits: an allocation far beyond RAM may well succeed, and the process is killed later, mid-answer,
    when the pages are touched (the 1.3B model at --ctx 1048576 asks for 200 GB). Only the layers left on the CPU count
    (an offloaded layer keeps its cache on the GPU)."""
    from malhae import units
    from malhae.runtime import hardware

    n_layer = lc.llama_model_n_layer(model.ptr)
    host_layers = n_layer - repeating_on_gpu(model.n_gpu_layers, n_layer)
    need = host_layers * kv.layer_bytes(n_cells, _n_embd_kv(model), type_k, type_v)
    ram = hardware.total_ram()
    if need > ram:
        raise UserError(f"a context of {n_cells:,} tokens needs {units.gib(need)} of KV cache in RAM, more than this "
                        f"machine's {units.gib(ram)}; use a smaller --ctx (the model was trained with "
                        f"{lc.llama_model_n_ctx_train(model.ptr):,})")


def _n_embd_kv(model: Model) -> int:
    return lc.llama_model_n_embd(model.ptr) * lc.llama_model_n_head_kv(model.ptr) // max(
        1, lc.llama_model_n_head(model.ptr))


FLASH_ATTN_TYPES = {"auto": lc.LLAMA_FLASH_ATTN_TYPE_AUTO, "on": lc.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                    "off": lc.LLAMA_FLASH_ATTN_TYPE_DISABLED}


class Context(Owned):
    """An inference context on a Model; precise=True keeps K/V in f32 and turns flash attention off (for parity).

    The one place where a LoadOptions' context settings become llama.cpp's parameters (their names differ there:
    ctx → n_ctx, batch → n_batch, parallel → n_seq_max, threads → n_threads)."""

    def __init__(self, model: Model, options: LoadOptions, *, precise: bool = False, n_ubatch: int | None = None,
                 unified_kv: bool = False, eval_callback: object | None = None,
                 abort: Callable[[], bool] | None = None):
        """`options.ctx` is each sequence's context, so the cache holds ctx × parallel tokens; with `unified_kv` the
        parallel sequences share one cache of ctx tokens, so that a shared prompt is stored once and its tokens
        carry several seq ids (a scorer's choices). `options.ctx` must be resolved (not None)."""
        n_ctx = options.ctx if unified_kv else options.kv_tokens
        n_batch = options.batch
        params = lc.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = min(n_ubatch or n_batch, n_batch)
        params.n_seq_max = options.parallel  # independent sequences in one batch (slots, perplexity windows)
        params.kv_unified = unified_kv
        params.no_perf = True
        if options.threads:
            params.n_threads = params.n_threads_batch = check("threads", options.threads)  # bounded wherever from
        type_k, type_v = ("f32", "f32") if precise else (options.kv_cache_k, options.kv_cache_v)
        flash_attn = "off" if precise else options.flash_attn
        kv.check_types(type_k, type_v, flash_attn, lc.llama_model_n_embd(model.ptr) // max(
            1, lc.llama_model_n_head(model.ptr)))
        params.type_k, params.type_v = kv.ggml_type(type_k), kv.ggml_type(type_v)
        params.flash_attn_type = FLASH_ATTN_TYPES[flash_attn]
        if eval_callback is not None:  # sees every node of the graph as it is computed (app.runtime.activations)
            params.cb_eval = eval_callback
            params.cb_eval_user_data = None
        self.eval_callback = eval_callback  # llama.cpp calls it for as long as the context lives
        self.model = model
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.type_k, self.type_v = type_k, type_v
        _check_kv_fits(model, kv.cells(options.ctx, options.parallel, unified=unified_kv), type_k, type_v)
        said: list[tuple[int, str]] = []
        with log_to(lambda level, msg: said.append((level, msg))):
            self.ptr = lc.llama_init_from_model(model.ptr, params)
        Interrupts.deliver()
        errors = [msg for level, msg in said if level == 2]  # GGML_LOG_LEVEL_ERROR
        # what llama.cpp says it allocated for K and V (MiB, by type), for info, serve and the tests
        self.kv_report = next((r for _, msg in said if (r := kv.Report.parse(msg))), None)
        if not self.ptr:
            why = errors[-1].split(": ", 1)[-1].strip() if errors else "out of memory? try a smaller --ctx"
            if "flash attention" in why.lower():  # auto found none for this device (a GPU backend without it)
                why += "; this device has no flash attention for it: use --kv-cache-v f16 (K may stay quantized)"
            raise UserError(f"llama.cpp could not create a context of {n_ctx} tokens for {model.path} ({why})")
        self.adapters: tuple[Lora, ...] = ()
        self.set_adapters(options.lora)
        self.abort = abort
        if abort is not None:  # asked between graph nodes (on the calling thread): True stops llama_decode
            self._abort_callback = abort_callback(abort)
            lc.llama_set_abort_callback(self.ptr, self._abort_callback, None)

    def close(self) -> None:
        if getattr(self, "ptr", None):
            ptr, self.ptr = self.ptr, None  # as Model.close: never freed twice
            lc.llama_free(ptr)


    def set_adapters(self, loras: tuple[Lora, ...]) -> None:
        """Apply these LoRA adapters (in order, each at its scale) from the next decode on; () applies none. What is
        in the KV cache was computed with the adapters before: a caller that changes them clears what it reuses."""
        if tuple(loras) == self.adapters:
            return
        n = len(loras)
        handles = (ctypes.c_void_p * max(1, n))(*(ctypes.cast(self.model.adapter(lora.path), ctypes.c_void_p).value
                                                   for lora in loras))
        scales = (ctypes.c_float * max(1, n))(*(lora.scale for lora in loras))
        array = ctypes.cast(handles, ctypes.POINTER(lc.llama_adapter_lora_p_ctypes))
        if lc.llama_set_adapters_lora(self.ptr, array if n else None, n, scales if n else None) != 0:
            raise UserError(f"llama.cpp could not apply the adapters {', '.join(map(str, loras))}")
        self.adapters = tuple(loras)

    def clear(self) -> None:
        lc.llama_memory_clear(lc.llama_get_memory(self.ptr), True)

    def seq_state_size(self, seq: int = 0) -> int:
        return lc.llama_state_seq_get_size(self.ptr, seq)

    def seq_state(self, seq: int = 0) -> memoryview:
        """Sequence `seq`'s state (the K/V of its cached tokens), copied out for the prompt cache."""
        size = lc.llama_state_seq_get_size(self.ptr, seq)
        buf = (ctypes.c_uint8 * size)()
        written = lc.llama_state_seq_get_data(self.ptr, buf, size, seq)
        return memoryview(buf).cast("B")[:written]

    def set_seq_state(self, state: bytearray, seq: int = 0) -> bool:
        """Replace sequence `seq`'s cache with a saved state; False (the sequence left empty) if llama.cpp refuses
        it (another model's, or more tokens than the context holds)."""
        mem = lc.llama_get_memory(self.ptr)
        lc.llama_memory_seq_rm(mem, seq, -1, -1)
        src = (ctypes.c_uint8 * len(state)).from_buffer(state)  # no copy of what may be gigabytes
        with log_to(lambda level, msg: None):  # a refused state is a miss, not an error to show
            read = lc.llama_state_seq_set_data(self.ptr, src, len(state), seq)
        if read != len(state):
            lc.llama_memory_seq_rm(mem, seq, -1, -1)
            return False
        return True

    def decode(self, batch: Batch, hint: str = "") -> None:
        """Evaluate `batch`; a failure is a UserError naming its size (`hint`: what the user can do about it)."""
        rc = lc.llama_decode(self.ptr, batch.ptr)
        Interrupts.deliver()
        if rc == 2 and self.abort is not None and self.abort():  # stopped by the abort callback: an interrupt
            raise KeyboardInterrupt
        if rc != 0:
            raise UserError(f"llama.cpp failed to evaluate a batch of {batch.n_tokens} tokens (llama_decode → {rc})"
                            + (f"; {hint}" if hint else ""))

    def output_logits(self, rows: int) -> np.ndarray:
        """The logits of the last decode's `rows` outputs, in batch order: a view [rows, n_vocab] (copy to keep)."""
        return np.ctypeslib.as_array(lc.llama_get_logits(self.ptr), shape=(rows, self.model.n_vocab))

    def logits(self, tokens: list[int]) -> np.ndarray:
        """Logits for every position of `tokens`, evaluated from an empty cache: shape [len(tokens), n_vocab]."""
        self.clear()
        out = np.empty((len(tokens), self.model.n_vocab), dtype=np.float32)
        with Batch(self.n_batch) as batch:
            for start in range(0, len(tokens), self.n_batch):
                chunk = tokens[start:start + self.n_batch]
                batch.fill(chunk, range(start, start + len(chunk)))
                self.decode(batch)
                out[start:start + len(chunk)] = self.output_logits(len(chunk))
        return out

    def greedy(self, prompt: list[int], n_new: int) -> list[int]:
        """Plain greedy continuation (argmax over the logits): the simplest proof that a file generates."""
        seq = list(prompt)
        for _ in range(n_new):
            seq.append(int(self.logits(seq)[-1].argmax()))
        return seq[len(prompt):]


class Batch(Owned):
    """A llama_batch of up to `capacity` tokens, each in up to `n_seq_max` sequences, with numpy views of its arrays
    so that callers fill thousands of positions without a Python loop per field."""

    def __init__(self, capacity: int, n_seq_max: int = 1) -> None:
        self.capacity = capacity
        self.ptr = lc.llama_batch_init(capacity, 0, n_seq_max)
        self.token = np.ctypeslib.as_array(self.ptr.token, shape=(capacity,))
        self.pos = np.ctypeslib.as_array(self.ptr.pos, shape=(capacity,))
        self.n_seq_id = np.ctypeslib.as_array(self.ptr.n_seq_id, shape=(capacity,))
        self.wants_logits = np.ctypeslib.as_array(self.ptr.logits, shape=(capacity,))

    @property
    def n_tokens(self) -> int:
        return self.ptr.n_tokens

    @n_tokens.setter
    def n_tokens(self, n: int) -> None:
        if n > self.capacity:
            raise ValueError(f"{n} tokens in a batch of {self.capacity}")
        self.ptr.n_tokens = n

    def set_seqs(self, i: int, seqs: Sequence[int]) -> None:
        """Position i of the batch belongs to these sequences (a shared prompt carries several)."""
        self.n_seq_id[i] = len(seqs)
        row = self.ptr.seq_id[i]
        for j, seq in enumerate(seqs):
            row[j] = seq

    def fill(self, tokens: Sequence[int], positions: Sequence[int], seq: int = 0) -> None:
        """One sequence's tokens at these positions, logits wanted everywhere."""
        n = len(tokens)
        self.n_tokens = n
        self.token[:n] = tokens
        self.pos[:n] = positions
        self.wants_logits[:n] = 1
        self.n_seq_id[:n] = 1
        for i in range(n):
            self.ptr.seq_id[i][0] = seq

    def close(self) -> None:
        if getattr(self, "ptr", None) is not None:
            ptr, self.ptr = self.ptr, None  # as Model.close: never freed twice
            lc.llama_batch_free(ptr)

