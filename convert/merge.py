"""`convert --merge-lora`: PEFT adapters merged into the base's weights while they stream through the converter.

Each tensor an adapter changes is taken to f32 as it is read, gets W + scale · s · B·A row block by row block (the
delta of one block at a time: no second copy of the tensor), and goes on to be written in the output type and
quantized as any other: memory stays that of the converter's largest tensor. Merging can represent what llama.cpp's
run-time LoRA cannot, so it is the way for those adapters: DoRA (W' = m / ‖W + ΔW‖_row · (W + ΔW), as PEFT merges it),
a bias on lora_B, trained biases and whole saved modules (they replace the base's tensor), a LoRA on the embedding.
Several adapters are merged in the order given, each on the result of the ones before (PEFT's merge_and_unload).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from malhae.convert import tensors as T
from malhae.convert.lora import Adapter, AdapterError, read
from malhae.convert.lora_gguf import Base, check_fits
from malhae.runtime.lora import split_scale

ROWS_ELEMENTS = T.CHUNK_ELEMENTS  # values of one block of delta rows


@dataclass(frozen=True)
class Spec:
    """One --merge-lora value: a PEFT folder and its scale."""

    folder: Path
    scale: float = 1.0


def parse(value: str) -> Spec:
    """`FOLDER[:SCALE]` as typed (a folder named with a colon is taken whole when it exists)."""
    folder, scale = split_scale(value.strip(), "--merge-lora")
    return Spec(Path(folder).expanduser(), scale)


class Merge:
    """The adapters to merge into one checkpoint, read and checked against it before anything is written."""

    def __init__(self, specs: list[Spec], src: Path) -> None:
        base = Base.from_checkpoint(src)
        self.adapters: list[tuple[Adapter, float]] = []
        for spec in specs:
            adapter = read(spec.folder)
            check_fits(adapter, base)
            self.adapters.append((adapter, spec.scale))
        self.names = {name for a, _ in self.adapters for name in (*a.pairs, *a.whole, *_bias_names(a))}

    def touches(self, name: str) -> bool:
        return name in self.names

    def apply(self, name: str, dtype: str, data: np.ndarray) -> np.ndarray:
        """The merged f32 values of the HF parameter `name` (canonical: embed_out, not lm_head)."""
        w = np.array(T.as_f32(dtype, data), dtype=np.float32, order="C", copy=True)
        for adapter, scale in self.adapters:
            if name in adapter.whole:
                w = adapter.whole[name].astype(np.float32).copy()  # a saved module or a trained bias replaces
            pair = adapter.pairs.get(name)
            if pair is not None:
                _add(w, pair, scale)
            owner = adapter.pairs.get(name.removesuffix(".bias") + ".weight") if name.endswith(".bias") else None
            if owner is not None and owner.b_bias is not None:
                w += np.float32(scale * owner.scaling) * owner.b_bias
        return w

    def files(self) -> list[Path]:
        """The adapters' own files (never to be written over)."""
        return [f for a, _ in self.adapters for f in a.files()]

    def describe(self) -> str:
        return ", ".join(f"{a.name}" + (f":{s:g}" if s != 1 else "") for a, s in self.adapters)


def _bias_names(adapter: Adapter) -> list[str]:
    return [p.module.removesuffix(".weight") + ".bias" for p in adapter.pairs.values() if p.b_bias is not None]


def _add(w: np.ndarray, pair, scale: float) -> None:
    """w += scale · delta, in blocks of rows; DoRA rescales each row to its trained magnitude."""
    step = max(1, ROWS_ELEMENTS // max(1, w.shape[1]))
    for start in range(0, w.shape[0], step):
        rows = slice(start, min(start + step, w.shape[0]))
        block = w[rows]
        block += np.float32(scale) * pair.delta(rows).astype(np.float32)
        if pair.magnitude is not None:
            norms = np.linalg.norm(block, axis=1)
            if not np.all(norms > 0):
                raise AdapterError(f"DoRA on {pair.module}: a row of W + ΔW is all zeros; cannot rescale it")
            block *= (pair.magnitude[rows] / norms)[:, None].astype(np.float32)
