"""A PEFT adapter, checked against the model it is for, written as llama.cpp's LoRA adapter GGUF.

llama.cpp applies an adapter at run time as W·x + scale · alpha/r · B·(A·x) for each `<tensor>.lora_a`/`.lora_b`
pair (`general.type = adapter`, `adapter.type = lora`, one `adapter.lora.alpha` for the file). PEFT's scale is
alpha/r per module, or alpha/√r under rslora, with per-module ranks and alphas: so the file's alpha is chosen as PEFT's
scale × rank for the usual module, and any module whose scale differs has it folded into its B. The result computes
what PEFT computes for every module (upstream's convert_lora_to_gguf.py writes lora_alpha as it is, which is off by
√r under rslora). The fused QKV's B gets the base converter's own head reorder (app: convert.tensors.reorder_qkv).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from malhae import files
from malhae.convert import tensors as T
from malhae.convert.config import read_config
from malhae.convert.lora import Adapter, AdapterError
from malhae.runtime.gguf_info import read_info
from malhae.runtime.lora import other_base, targets

ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPTNEOX]
TYPES = {"f32": np.float32, "f16": np.float16}  # what the adapter's tensors are written as (llama.cpp reads both)


@dataclass(frozen=True)
class Base:
    """What an adapter is checked and reordered against: the base model's heads and its 2-D tensors by GGUF name,
    in HF's (out, in) order."""

    where: str  # the file or folder, as messages name it
    n_head: int
    n_layer: int
    shapes: dict[str, tuple[int, ...]]
    name: str | None = None  # the base's own name (its GGUF's general.name), to compare with the adapter's base
    path: Path | None = None  # the GGUF, or the Hugging Face folder (`is_checkpoint`)
    is_checkpoint: bool = False

    @classmethod
    def from_gguf(cls, path: Path) -> Base:
        info = read_info(path)
        if info.metadata.get(gguf.Keys.General.TYPE) == "adapter":
            raise AdapterError(f"{path.name} is itself an adapter; give the model it adapts as the base")
        if info.architecture != ARCH:
            raise AdapterError(f"{path.name} is a {info.architecture or 'unknown'} model; malhae's adapters are for "
                               "GPT-NeoX (the Polyglot-Ko family)")
        shapes = {t.name: tuple(reversed(t.shape)) for t in info.tensors}
        return cls(path.name, info.arch_int(gguf.Keys.Attention.HEAD_COUNT) or 1,
                   info.arch_int(gguf.Keys.LLM.BLOCK_COUNT) or 0, shapes, info.name, path)

    @classmethod
    def from_checkpoint(cls, folder: Path) -> Base:
        cfg = read_config(folder)
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPTNEOX, cfg.n_layer)
        shapes = {names.get_name(hf, try_suffixes=(".weight", ".bias")): shape
                  for hf, shape in cfg.expected_shapes().items()}
        if cfg.tie_word_embeddings:
            shapes["output.weight"] = shapes["token_embd.weight"]
        return cls(folder.name, cfg.n_head, cfg.n_layer, shapes, cfg.name_or_path or folder.name, folder, True)


def gguf_name(hf_name: str, n_layer: int) -> str | None:
    """The GGUF tensor an HF parameter of GPT-NeoX becomes (None: none does)."""
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPTNEOX, n_layer).get_name(hf_name, try_suffixes=(".weight",
                                                                                                      ".bias"))


def check_fits(adapter: Adapter, base: Base) -> dict[str, str]:
    """HF name → GGUF name of every tensor the adapter changes, after checking each shape against the base: an
    adapter of another model is one line naming both, before anything is written."""
    names = {}
    for hf, pair in adapter.pairs.items():
        name = gguf_name(hf, base.n_layer)
        if name is None or name not in base.shapes:
            raise AdapterError(f"the adapter {adapter.name} changes {hf.removesuffix('.weight')}, which {base.where} "
                               "does not have: it was made for another model")
        out, inp = base.shapes[name]
        if pair.embedding:
            inp, out = out, inp  # an embedding's LoRA: A spans the vocabulary, B the width
        if pair.a.shape[1] != inp or pair.b.shape[0] != out:
            resized = pair.embedding or name in ("token_embd.weight", "output.weight")
            raise AdapterError(f"the adapter {adapter.name} does not fit {base.where}: "
                               f"{hf.removesuffix('.weight')} is {out}×{inp} there and {pair.b.shape[0]}×"
                               f"{pair.a.shape[1]} in the adapter" + (" (resized embeddings: a tokenizer with other "
                                                                      "tokens)" if resized else "")
                               + "; use the adapter with the model it was trained on")
        names[hf] = name
    for hf, shape in adapter.embeddings.items():
        name = gguf_name(hf, base.n_layer)
        if name in base.shapes and shape != base.shapes[name]:
            raise AdapterError(f"the adapter {adapter.name} was trained with {hf.removesuffix('.weight')} resized to "
                               f"{list(shape)} (new tokens), and {base.where} has {list(base.shapes[name])}: no "
                               "base of this tokenizer can take it")
    for hf, data in adapter.whole.items():
        name = gguf_name(hf, base.n_layer)
        if name is None or name not in base.shapes:
            raise AdapterError(f"the adapter {adapter.name} replaces {hf}, which {base.where} does not have")
        if data.shape != base.shapes[name]:
            why = " (resized embeddings: new tokens, which no base of this tokenizer can take)" \
                if name in ("token_embd.weight", "output.weight") else ""
            raise AdapterError(f"the adapter {adapter.name} replaces {hf} with shape {list(data.shape)}, but "
                               f"{base.where} has {list(base.shapes[name])}{why}; use it with its own base model")
        names[hf] = name
    return names


def trained_elsewhere(adapter: Adapter, base: Base) -> str | None:
    """A note when the adapter says it was trained on a model other than `base` by name (app.runtime.lora's rule)."""
    if not other_base(adapter.config.base, [base.name, base.where]):
        return None
    return (f"the adapter {adapter.name} was trained on {adapter.config.base}, not {base.name}; their shapes fit, "
            "so it applies, but it only approximates what it learned there")


@dataclass(frozen=True)
class Written:
    path: Path
    size: int
    rank: int
    alpha: float  # as written: llama.cpp's alpha (PEFT's scale × rank)
    targets: tuple[str, ...]  # GGUF tensor kinds adapted: attn_qkv, attn_output, ffn_up, ffn_down, output
    modules: int


def file_alpha(adapter: Adapter) -> float:
    """adapter.lora.alpha: llama.cpp scales by alpha / (the tensor's rank), PEFT by its own scale; equal for the
    config's own rank."""
    return adapter.config.scaling("") * adapter.config.r


def write(adapter: Adapter, base: Base, out: Path, *, type_name: str = "f16", force: bool = False,
          name: str | None = None) -> Written:
    """Write `adapter` as llama.cpp's adapter GGUF at `out` (through a partial file: nothing is left on failure)."""
    problem = adapter.unmergeable_at_run_time()
    if problem:
        raise AdapterError(f"the adapter {adapter.name} has {problem}, which llama.cpp cannot apply at run time; "
                           f"merge it into its base instead: malhae convert BASE --merge-lora {adapter.folder}")
    if type_name not in TYPES:
        raise AdapterError(f"--type {type_name}: an adapter is written as {' or '.join(TYPES)}")
    names = check_fits(adapter, base)
    if out.resolve() in {f.resolve() for f in adapter.files()}:
        raise AdapterError(f"-o {out} is one of the adapter's own files; write the GGUF somewhere else")
    files.check_target(out, force, replace_hint="add --force to overwrite it", other_hint="choose another name with -o")
    alpha = file_alpha(adapter)
    w = gguf.GGUFWriter(path=None, arch=ARCH)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    w.add_name(name or adapter.name)
    w.add_string("malhae.source", adapter.name)
    if adapter.config.base:
        w.add_uint32(gguf.Keys.General.BASE_MODEL_COUNT, 1)
        w.add_string(gguf.Keys.General.BASE_MODEL_NAME.format(id=0), adapter.config.base)
    w.add_uint32("malhae.lora.rank", adapter.config.r)
    w.add_float32("malhae.lora.peft_alpha", adapter.config.alpha)
    w.add_bool("malhae.lora.rslora", adapter.config.rslora)
    dtype = TYPES[type_name]
    for hf, pair in sorted(adapter.pairs.items(), key=lambda kv: _order(names[kv[0]])):
        b = pair.b
        # a module whose own rank/alpha give another scale than the file's alpha / its rank: fold the difference in
        fold = pair.scaling * pair.rank / alpha if alpha else pair.scaling
        if not np.isclose(fold, 1.0, rtol=1e-6):
            b = b * np.float32(fold)
        if names[hf].endswith("attn_qkv.weight"):
            b = T.reorder_qkv(b, base.n_head)  # rows per head (q, k, v) → all q, all k, all v, as the base's
        w.add_tensor(names[hf] + ".lora_a", np.ascontiguousarray(pair.a.astype(dtype)))
        w.add_tensor(names[hf] + ".lora_b", np.ascontiguousarray(b.astype(dtype)))
    out = out.absolute()
    with files.partial(out, "adapter") as tmp:
        w.write_header_to_file(path=tmp)
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    kinds = targets(map(names.get, adapter.pairs))
    return Written(out, out.stat().st_size, adapter.config.r, alpha, kinds, len(adapter.pairs))


def _order(name: str) -> tuple[int, str]:
    parts = name.split(".")
    return (int(parts[1]), name) if parts[0] == "blk" else (-1 if name.startswith("token") else 1 << 20, name)
