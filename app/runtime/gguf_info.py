"""A fast reader of a GGUF file's metadata and tensor table (no tensor data).

gguf-py's GGUFReader builds numpy views for every field, which takes about two seconds on a Polyglot-Ko file (30,080
tokens and their merges); the converter's summary, the offload planner and `malhae info` only need the scalar
metadata and each tensor's name, type and size, which this reads in milliseconds.

GGUFInfo is also the one reader of what the metadata means (name, file type, source, license), so that `malhae
models` and `malhae info` cannot tell two stories about one file.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, Keys, LlamaFileType

from app.errors import UserError

V = GGUFValueType
GGUF_MAGIC_BYTES = b"GGUF"
_SCALARS = {V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
            V.FLOAT32: "<f", V.BOOL: "<?", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d"}
STRING, ARRAY = V.STRING, V.ARRAY
# where a file says what it was converted from, most specific first: malhae's own key (the hub id or the folder's
# name), then what llama.cpp's converters write (the first is the legacy spelling of older files)
SOURCE_KEYS = ("malhae.source", "general.source.huggingface.repository", Keys.General.SOURCE_URL,
               Keys.General.SOURCE_REPO_URL)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: ne0 (row length) first
    type: GGMLQuantizationType
    offset: int  # from the start of the data section
    nbytes: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


@dataclass
class GGUFInfo:
    path: Path
    version: int
    metadata: dict[str, object]  # scalars and strings; arrays as their length, except those asked for
    tensors: list[TensorInfo] = field(default_factory=list)
    data_offset: int = 0
    file_size: int = 0

    @property
    def architecture(self) -> str | None:
        value = self.metadata.get(Keys.General.ARCHITECTURE)
        return value if isinstance(value, str) else None

    def arch_value(self, key: str) -> object:
        """An architecture's key: a gguf.Keys template ("{arch}.block_count") or its suffix ("block_count")."""
        key = key.format(arch=self.architecture) if "{arch}" in key else f"{self.architecture}.{key}"
        return self.metadata.get(key)

    def arch_int(self, key: str) -> int | None:
        return _int(self.arch_value(key))

    def text(self, key: str) -> str | None:
        value = self.metadata.get(key)
        return value if isinstance(value, str) and value else None

    @property
    def name(self) -> str | None:
        return self.text(Keys.General.NAME)

    @property
    def license(self) -> str | None:
        return self.text(Keys.General.LICENSE)

    @property
    def source(self) -> str | None:
        return next((v for k in SOURCE_KEYS if (v := self.text(k))), None)

    @property
    def file_type(self) -> str | None:
        """general.file_type as the --type name malhae and llama.cpp use (1 → f16, 15 → q4_k_m), None if unsaid."""
        value = _int(self.metadata.get(Keys.General.FILE_TYPE))
        if value is None:
            return None
        try:
            return LlamaFileType(value).name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()
        except ValueError:
            return f"type {value}"

    @property
    def n_params(self) -> int:
        """Sum of tensor elements (a tied output matrix stored twice counts twice, as in the file)."""
        return sum(t.n_elements for t in self.tensors)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def type_counts(self) -> dict[str, tuple[int, int]]:
        """GGML type name → (tensor count, bytes)."""
        out: dict[str, tuple[int, int]] = {}
        for t in self.tensors:
            n, b = out.get(t.type.name, (0, 0))
            out[t.type.name] = (n + 1, b + t.nbytes)
        return out


def _int(value: object) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class _Buffer:
    """Reads forward through the file in large chunks; the header of a GGUF is at most a few MB."""

    def __init__(self, f) -> None:
        self.f = f
        self.data = b""
        self.pos = 0
        self.base = 0  # file offset of data[0]

    def need(self, n: int) -> None:
        if self.pos + n > len(self.data):
            chunk = self.f.read(max(n, 4 << 20))
            self.base += self.pos
            self.data = self.data[self.pos:] + chunk
            self.pos = 0
            if n > len(self.data):
                raise EOFError

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        self.need(size)
        value = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        n = self.unpack("<Q")
        self.need(n)
        s = self.data[self.pos:self.pos + n].decode("utf-8", "replace")
        self.pos += n
        return s

    def skip_value(self, vtype: GGUFValueType):
        if vtype == STRING:
            n = self.unpack("<Q")
            self.need(n)
            self.pos += n
        elif vtype == ARRAY:
            self.skip_array()
        else:
            self.need(struct.calcsize(_SCALARS[vtype]))
            self.pos += struct.calcsize(_SCALARS[vtype])

    def skip_array(self) -> int:
        """Skip an array value (its type and count already next); return its length."""
        etype, count = GGUFValueType(self.unpack("<I")), self.unpack("<Q")
        if etype in _SCALARS:
            size = struct.calcsize(_SCALARS[etype]) * count
            self.need(size)
            self.pos += size
        else:
            for _ in range(count):
                self.skip_value(etype)
        return count

    def value(self, vtype: GGUFValueType):
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            etype, count = GGUFValueType(self.unpack("<I")), self.unpack("<Q")
            return [self.value(etype) for _ in range(count)]
        return self.unpack(_SCALARS[vtype])

    @property
    def offset(self) -> int:
        return self.base + self.pos


def read_info(path: Path, arrays: tuple[str, ...] = ()) -> GGUFInfo:
    """Metadata and tensor table of a GGUF; array values are kept only for the keys in `arrays`."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if f.read(4) != GGUF_MAGIC_BYTES:
                raise UserError(f"{path} is not a GGUF file")
            buf = _Buffer(f)
            buf.base = 4
            version, n_tensors, n_kv = buf.unpack("<I"), buf.unpack("<Q"), buf.unpack("<Q")
            if version < 2:
                raise UserError(f"{path} is a GGUF version {version} file, too old for llama.cpp")
            meta: dict[str, object] = {}
            for _ in range(n_kv):
                key, vtype = buf.string(), GGUFValueType(buf.unpack("<I"))
                if vtype == ARRAY and key not in arrays:
                    meta[key] = buf.skip_array()
                else:
                    meta[key] = buf.value(vtype)
            tensors = []
            for _ in range(n_tensors):
                name, n_dims = buf.string(), buf.unpack("<I")
                shape = tuple(buf.unpack("<Q") for _ in range(n_dims))
                ttype, offset = GGMLQuantizationType(buf.unpack("<I")), buf.unpack("<Q")
                block, type_size = GGML_QUANT_SIZES[ttype]
                tensors.append(TensorInfo(name, shape, ttype, offset, math.prod(shape) // block * type_size))
            alignment = int(meta.get(Keys.General.ALIGNMENT, 32))
            data_offset = -(-buf.offset // alignment) * alignment
    except (EOFError, struct.error, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a valid GGUF file (truncated or corrupt header: {e})") from e
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from e
    info = GGUFInfo(path, version, meta, tensors, data_offset, size)
    end = max((data_offset + t.offset + t.nbytes for t in tensors), default=0)  # a vocab-only file has no data
    if end > size:
        raise UserError(f"{path} is truncated: its tensors need {end} bytes but the file has {size}; "
                        "copy or convert it again")
    return info
