"""A base model and a LoRA adapter for it, made the way users make them: a polyglot-shaped checkpoint (factory.py),
a random PEFT adapter on it (peft, init_lora_weights=False so that it changes the logits), both converted by malhae.

Shared by the tests of adapters in chat, the store, eval and bench (tests/test_lora_chat.py, test_lora_store.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import factory

TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


@dataclass(frozen=True)
class Pair:
    checkpoint: Path  # the HF folder (its name is the base's source in the GGUF)
    base: Path  # the base GGUF (f32)
    adapter: Path  # the adapter GGUF (f32)
    peft: Path  # the PEFT folder


def peft_adapter(src: Path, out: Path, *, rank: int = 4, alpha: int = 8, targets=TARGETS, seed: int = 0) -> Path:
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False)
    peft.get_peft_model(model, config).save_pretrained(out)
    return out


def adapter_gguf(peft_folder: Path, base_gguf: Path, out: Path) -> Path:
    from malhae.convert import lora, lora_gguf

    return lora_gguf.write(lora.read(peft_folder), lora_gguf.Base.from_gguf(base_gguf), out, type_name="f32").path


def build(root: Path, name: str = "lorabase", **spec) -> Pair:
    """A base (checkpoint folder `name`, converted to f32) and one adapter converted against it."""
    from malhae.convert import pipeline

    src = factory.build(root / name, factory.Spec(name, **spec))
    base = pipeline.convert(src, "f32", root / f"{name}-f32.gguf").path
    folder = peft_adapter(src, root / "peft")
    return Pair(src, base, adapter_gguf(folder, base, root / "adapter.gguf"), folder)
