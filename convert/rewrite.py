"""Copy a GGUF with some metadata or tensors changed: test models with a foreign chat template or a renamed token,
and draft models cut from a bigger one (the first layers of the demo), without converting a checkpoint again."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf


def first_layers(src: Path, dst: Path, keep: int) -> Path:
    """`src` with only its first `keep` layers: the same tokenizer and a cheaper, worse model (a draft model)."""
    reader = gguf.GGUFReader(src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()

    def kept(name: str) -> bool:
        return not name.startswith("blk.") or int(name.split(".")[1]) < keep
    return copy_gguf(src, dst, fields={f"{arch}.block_count": keep}, tensors=kept)


def copy_gguf(src: Path, dst: Path, *, fields: dict[str, object] | None = None,
              tensors: Callable[[str], bool] = lambda name: True,
              extra: Callable[[object], None] | None = None) -> Path:
    """A copy of `src` written with gguf-py: metadata `fields` replaced (same value type as before), only the
    `tensors` whose names pass, and `extra(writer)` for keys to add."""
    fields = fields or {}
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, arch=reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name == gguf.Keys.General.ARCHITECTURE:
            continue
        value = fields.get(f.name, f.contents())
        if value is None:
            continue
        writer.add_key_value(f.name, value, f.types[0],
                             sub_type=f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None)
    if extra is not None:
        extra(writer)
    for t in reader.tensors:
        if tensors(t.name):
            writer.add_tensor(t.name, t.data, raw_shape=list(reversed([int(d) for d in t.shape])),
                              raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst
