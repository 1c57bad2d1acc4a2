"""Plan and write the GGUF: metadata, the tensor list, then the tensors streamed one at a time.

The header of a GGUF lists every tensor's name, shape, type and offset before any data, so the whole plan is made
from the checkpoint's index (no tensor data read), and then each tensor is read, converted and written in turn.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

from malhae.convert import tensors as T
from malhae.convert.checkpoint import DTYPES, Checkpoint, CheckpointError
from malhae.convert.config import NeoXConfig
from malhae.convert.vocab import Vocab

ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPTNEOX]
# Buffers that old transformers versions saved with the weights: a causal mask, a scalar, the rotary frequencies.
ALIASES = {"lm_head.weight": "embed_out.weight"}
LEGACY_BUFFER = re.compile(r"gpt_neox\.layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)$")


@dataclass(frozen=True)
class PlannedTensor:
    gguf_name: str
    hf_name: str
    shape: tuple[int, ...]
    out_type: QT
    qkv: bool  # fused QKV weight or bias: reorder rows


@dataclass(frozen=True)
class Metadata:
    name: str
    source: str
    hub_id: str | None
    license: str | None
    chat_template: str | None = None  # Jinja for tokenizer.chat_template, when the prompt format is known


def plan(cfg: NeoXConfig, ckpt: Checkpoint, direct: QT) -> list[PlannedTensor]:
    """Map, check and order every tensor; `direct` is the type for 2-D weights (1-D ones stay f32)."""
    expected = cfg.expected_shapes()
    # canonical (published) name → what the files hold; transformers 5 saves embed_out as lm_head
    present = {ALIASES.get(n, n): r for n, r in ckpt.refs.items() if not LEGACY_BUFFER.match(n)}
    for name, ref in present.items():
        if name not in expected and not (name == "embed_out.weight" and cfg.tie_word_embeddings):
            raise CheckpointError(f"unexpected tensor {name} in {ref.file.name}: the weights do not match a "
                                  "GPT-NeoX model with this config.json")
        if name in expected and ref.shape != expected[name]:
            raise CheckpointError(f"tensor {name} has shape {list(ref.shape)} but config.json implies "
                                  f"{list(expected[name])}: config and weights do not belong together")
        if ref.dtype not in DTYPES:
            raise CheckpointError(f"tensor {name} is {ref.dtype}; malhae reads float16, bfloat16 and float32 weights")
    missing = [n for n in expected if n not in present]
    if missing:
        raise CheckpointError(f"the checkpoint lacks tensor {missing[0]} (and {len(missing) - 1} more)"
                              if len(missing) > 1 else f"the checkpoint lacks tensor {missing[0]}")

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPTNEOX, cfg.n_layer)
    out = []
    file_names = {present[n].name: n for n in expected}
    for hf_name in ckpt.order(list(file_names)):
        canonical = file_names[hf_name]
        shape = expected[canonical]
        gname = names.get_name(canonical, try_suffixes=(".weight", ".bias"))
        if gname is None:  # cannot happen for names from expected_shapes(); guards a gguf package change
            raise CheckpointError(f"no GGUF name for tensor {canonical}")
        ttype = direct if len(shape) == 2 else QT.F32
        if ttype == QT.Q8_0 and shape[-1] % 32:
            ttype = QT.F16
        out.append(PlannedTensor(gname, hf_name, shape, ttype, ".query_key_value." in canonical))
    if cfg.tie_word_embeddings and "embed_out.weight" not in present:
        # llama.cpp's gptneox needs output.weight: write the shared embedding a second time
        emb = next(t for t in out if t.gguf_name == "token_embd.weight")
        out.append(PlannedTensor("output.weight", emb.hf_name, emb.shape, emb.out_type, False))
    return out


def total_bytes(tensors: list[PlannedTensor]) -> int:
    return sum(T.nbytes(t.shape, t.out_type) for t in tensors)


def writer(cfg: NeoXConfig, vocab: Vocab, meta: Metadata, ftype: gguf.LlamaFileType) -> gguf.GGUFWriter:
    w = gguf.GGUFWriter(path=None, arch=ARCH)
    w.add_type("model")
    w.add_name(meta.name)
    if meta.license:
        w.add_license(meta.license)
    if meta.hub_id:
        w.add_source_url(f"https://huggingface.co/{meta.hub_id}")
        w.add_source_repo_url(f"https://huggingface.co/{meta.hub_id}")
    w.add_string("malhae.source", meta.source)
    w.add_file_type(int(ftype))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    w.add_context_length(cfg.n_ctx)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.n_ff)
    w.add_head_count(cfg.n_head)
    w.add_rope_dimension_count(cfg.n_rot)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_eps(cfg.layer_norm_eps)
    w.add_parallel_residual(cfg.parallel_residual)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
    for key, value in (("bos", vocab.bos_id), ("eos", vocab.eos_id), ("pad", vocab.pad_id), ("unk", vocab.unk_id)):
        if value is not None:
            getattr(w, f"add_{key}_token_id")(value)
    w.add_add_bos_token(vocab.add_bos)
    w.add_add_eos_token(vocab.add_eos)
    if meta.chat_template:
        w.add_chat_template(meta.chat_template)
    return w


def write_vocab_only(path: Path, cfg: NeoXConfig, vocab: Vocab, meta: Metadata) -> None:
    """A GGUF with the full metadata and no tensors: llama.cpp loads it with vocab_only to prove tokenization."""
    w = writer(cfg, vocab, meta, gguf.LlamaFileType.ALL_F32)
    w.write_header_to_file(path=path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()


def write_model(path: Path, cfg: NeoXConfig, vocab: Vocab, meta: Metadata, ckpt: Checkpoint,
                tensors: list[PlannedTensor], ftype: gguf.LlamaFileType,
                progress: Callable[[int, int], None] | None = None, merge=None) -> None:
    """`merge` (a convert.merge.Merge): adapters merged into the tensors they change, in HF's layout (before the QKV
    reorder, so that the reorder stays one rule in one place)."""
    w = writer(cfg, vocab, meta, ftype)
    if merge is not None:
        w.add_string("malhae.merged_lora", merge.describe())
    for t in tensors:
        n = T.nbytes(t.shape, t.out_type)
        if t.out_type == QT.Q8_0:
            w.add_tensor_info(t.gguf_name, (*t.shape[:-1], t.shape[-1] // 32 * 34), np.dtype(np.uint8), n, QT.Q8_0)
        elif t.out_type == QT.BF16:
            w.add_tensor_info(t.gguf_name, t.shape, np.dtype(np.uint16), n, QT.BF16)
        else:
            w.add_tensor_info(t.gguf_name, t.shape, np.dtype(np.float32 if t.out_type == QT.F32 else np.float16), n)
    w.write_header_to_file(path=path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()

    total, done = total_bytes(tensors), 0
    # A tied embedding is planned twice under one HF name: read it once per use, in plan order.
    pending = {t.gguf_name: t for t in tensors}
    by_hf: dict[str, list[PlannedTensor]] = {}
    for t in tensors:
        by_hf.setdefault(t.hf_name, []).append(t)
    written: dict[str, tuple[str, np.ndarray]] = {}
    order = [t.hf_name for t in tensors]
    unique_order = list(dict.fromkeys(order))
    reader = ckpt.read(unique_order)
    for t in tensors:
        if t.hf_name not in written:
            raw = next(reader)
            assert raw.name == t.hf_name, (raw.name, t.hf_name)
            data, dtype = raw.data.reshape(t.shape), raw.dtype
            canonical = ALIASES.get(t.hf_name, t.hf_name)
            if merge is not None and merge.touches(canonical):
                data, dtype = merge.apply(canonical, dtype, data), "F32"
            if t.qkv:
                data = T.reorder_qkv(data, cfg.n_head)
            written[t.hf_name] = (dtype, data)
        dtype, data = written[t.hf_name]
        out = T.convert(dtype, data, t.out_type)
        w.write_tensor_data(out)
        del pending[t.gguf_name]
        if not any(u.gguf_name in pending for u in by_hf[t.hf_name]):
            del written[t.hf_name]  # keep no tensor longer than needed
        done += out.nbytes
        if progress:
            progress(done, total)
    w.close()
