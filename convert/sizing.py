"""Exact GGUF tensor bytes of a model shape for each output type, without its weights.

The catalog promises sizes "computed from the real tensor sizes". For the types malhae writes itself (f16, q8_0, …)
the tensor list is the converter's own plan (`gguf_out.plan`) on a checkpoint that has shapes but no data. For the
k-quant mixes, llama.cpp picks each tensor's type from its name, layer index, layer count and shape; rather than
re-implement those rules (they change between llama.cpp versions), this asks llama.cpp: it writes the staged f16 GGUF
the converter would quantize, with a sparse data region (the header is real, the data is a hole in the file, so a
12.8B shape costs a few MB of disk), and runs `llama_model_quantize` with `dry_run`, which decides every tensor's
type and logs it without reading any tensor data (llama-quant.cpp, 0.3.36). Bytes then follow from ggml's block
sizes (rows × ne0 / block size × block bytes), which is what the quantizer writes.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from malhae.convert import gguf_out
from malhae.convert import types as out_types
from malhae.convert.checkpoint import TensorRef
from malhae.convert.config import NeoXConfig
from malhae.convert.vocab import Vocab
from malhae.errors import UserError

ALIGNMENT = 32  # gguf's default; the staged file uses it
_TENSOR_LINE = re.compile(r"\[\s*\d+\s*/\s*\d+\s*\]\s+(\S+)\s+-\s+\[([^\]]*)\],\s+type\s*=\s*(\S+),\s+size\s*=\s*"
                          r"[\d.]+\s*MiB(?:\s*->\s*[\d.]+\s*MiB\s*\((\S+)\))?")


@dataclass(frozen=True)
class Shape:
    """What decides the tensor list of a GPT-NeoX model; the rest of config.json does not change sizes."""

    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_vocab: int = 30080
    n_ctx: int = 2048
    rotary_fraction: float = 0.5

    def config(self) -> NeoXConfig:
        return NeoXConfig(n_layer=self.n_layer, n_embd=self.n_embd, n_head=self.n_head, n_ff=self.n_ff,
                          n_vocab=self.n_vocab, n_ctx=self.n_ctx, rotary_fraction=self.rotary_fraction,
                          rope_theta=10000.0, layer_norm_eps=1e-5, parallel_residual=True,
                          tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=None,
                          name_or_path=None)

    @property
    def n_params(self) -> int:
        return sum(math.prod(s) for s in self.config().expected_shapes().values())


@dataclass(frozen=True)
class SizedTensor:
    name: str
    shape: tuple[int, ...]  # ggml order: row length (ne0) first
    type: QT

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.shape, self.type)


def tensor_bytes(shape: tuple[int, ...], qtype: QT) -> int:
    """Bytes of a tensor in `qtype`: ggml stores each row as whole blocks (ggml_row_size × rows)."""
    block, size = GGML_QUANT_SIZES[qtype]
    if shape[0] % block:
        raise ValueError(f"row length {shape[0]} is not a multiple of {qtype.name}'s block size {block}")
    return shape[0] // block * size * math.prod(shape[1:])


class _ShapeOnlyCheckpoint:
    """Stands in for convert.checkpoint.Checkpoint where only names, shapes and dtypes are read (gguf_out.plan)."""

    def __init__(self, cfg: NeoXConfig) -> None:
        self.refs = {name: TensorRef(name, shape, "F16", Path("shape-only")) for name, shape in
                     cfg.expected_shapes().items()}

    def order(self, names: list[str]) -> list[str]:
        return list(names)


def _placeholder_vocab(n_vocab: int) -> Vocab:
    """Token texts do not influence any tensor type; only the count (the embedding rows) matters."""
    return Vocab(tokens=[f"<t{i}>" for i in range(n_vocab)], types=[1] * n_vocab, merges=[], pre="gpt-2",
                 bos_id=0, eos_id=0, pad_id=None, unk_id=None, add_bos=False, add_eos=False, n_real=n_vocab)


def _planned(shape: Shape, qtype: QT) -> list[gguf_out.PlannedTensor]:
    cfg = shape.config()
    return gguf_out.plan(cfg, _ShapeOnlyCheckpoint(cfg), qtype)  # type: ignore[arg-type]


def write_sparse_staged(shape: Shape, path: Path) -> None:
    """The f16 GGUF the converter hands to llama.cpp's quantizer, with the real header and a hole for the data."""
    cfg = shape.config()
    meta = gguf_out.Metadata(name=f"shape-L{shape.n_layer}-d{shape.n_embd}", source="malhae sizing", hub_id=None,
                             license=None)
    w = gguf_out.writer(cfg, _placeholder_vocab(shape.n_vocab), meta, gguf.LlamaFileType.MOSTLY_F16)
    data = 0
    for t in _planned(shape, QT.F16):
        n = tensor_bytes(t.shape[::-1], t.out_type)
        dtype = np.dtype(np.float32 if t.out_type == QT.F32 else np.float16)
        w.add_tensor_info(t.gguf_name, t.shape, dtype, n)
        data += -(-n // ALIGNMENT) * ALIGNMENT
    w.write_header_to_file(path=path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    header = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(-(-header // ALIGNMENT) * ALIGNMENT + data)


def _dry_run(staged: Path, ftype: int) -> list[SizedTensor]:
    from malhae.runtime import llama, quant

    pending: list[str] = []
    lines: list[str] = []

    def sink(level: int, message: str) -> None:  # llama.cpp logs one tensor line in several pieces
        pending.append(message)
        if message.endswith("\n"):
            lines.append("".join(pending))
            pending.clear()

    with llama.log_to(sink), tempfile.TemporaryDirectory(prefix="malhae-sizing-") as tmp:
        rc = quant.quantize_file(staged, Path(tmp) / "unused.gguf", ftype, 1, dry_run=True)
    if rc != 0:
        raise UserError(f"llama.cpp's quantizer refused the dry run (code {rc}): {''.join(lines[-3:]).strip()}")
    out = []
    for line in lines:
        m = _TENSOR_LINE.search(line)
        if m:
            name, dims, current, new = m.groups()
            ne = tuple(int(d) for d in dims.replace(" ", "").split(",") if d)
            while len(ne) > 1 and ne[-1] == 1:
                ne = ne[:-1]
            out.append(SizedTensor(name, ne, QT[(new or current).upper()]))
    return out


def sized_tensors(shape: Shape, type_name: str) -> list[SizedTensor]:
    """Every tensor of `shape` converted to `type_name`, with the type it gets (and so its exact bytes)."""
    otype = out_types.get(type_name)
    if otype.direct is not None:
        return [SizedTensor(t.gguf_name, t.shape[::-1], t.out_type) for t in _planned(shape, otype.direct)]
    fd, name = tempfile.mkstemp(prefix="malhae-sizing-", suffix=".gguf")
    os.close(fd)
    staged = Path(name)
    try:
        write_sparse_staged(shape, staged)
        tensors = _dry_run(staged, int(otype.ftype))
    finally:
        staged.unlink(missing_ok=True)
    expected = len(_planned(shape, QT.F16))
    if len(tensors) != expected:
        raise RuntimeError(f"read {len(tensors)} tensor lines from llama.cpp's dry run, expected {expected}: "
                           "its log format changed; update convert/sizing.py")
    return tensors


def summarize(tensors: list[SizedTensor], n_layer: int) -> tuple[int, int, int, tuple[int, ...], dict[str, int]]:
    """(total, token_embd, output, per-layer bytes, tensors per type): the split the offload planner needs."""
    layers = [0] * n_layer
    token_embd = output = 0
    mix: dict[str, int] = {}
    for t in tensors:
        mix[t.type.name] = mix.get(t.type.name, 0) + 1
        m = re.match(r"blk\.(\d+)\.", t.name)
        if m:
            layers[int(m.group(1))] += t.nbytes
        elif t.name.startswith("token_embd"):
            token_embd += t.nbytes
        elif t.name.startswith("output"):
            output += t.nbytes
        else:
            raise RuntimeError(f"unexpected tensor {t.name} in a GPT-NeoX GGUF")
    return sum(t.nbytes for t in tensors), token_embd, output, tuple(layers), dict(sorted(mix.items()))

