"""A fast reader of a GGUF file's metadata and tensor table (no tensor data).

gguf-py's GGUFReader builds numpy views for every field, which takes about two seconds on a Polyglot-Ko file (30,080
tokens and their merges); the converter's summary, the offload planner and `malhae info` only need the scalar
metadata and each tensor's name, type and size, which this reads in milliseconds.

GGUFInfo is also the one reader of what the metadata means (name, file type, source, license), so that `malhae
models` and `malhae info` cannot tell two stories about one file.
"""

from __future__ import annotations

import collections
import math
import os
import re
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, Keys, LlamaFileType

from malhae import files
from malhae.errors import UserError
from malhae.ui import printable

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

    @property
    def head_dim(self) -> int | None:
        """Values per attention head (embedding length / heads): what a quantized K/V cache's blocks must divide."""
        n_embd, n_head = self.arch_int("embedding_length"), self.arch_int("attention.head_count")
        return n_embd // n_head if n_embd and n_head else None

    def text(self, key: str) -> str | None:
        """A one-line string value, with no control characters (app.ui.printable): whoever wrote the file chose it,
        and it is printed (`info`, `models`, notes) and matched on."""
        value = self.metadata.get(key)
        return printable(value) if isinstance(value, str) and value else None

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


_LAYER = re.compile(r"^blk\.(\d+)\.")


def check_shape(info: GGUFInfo) -> None:
    """The hyperparameters the planner and llama.cpp size memory by agree with the tensor table, or a one-line error.

    A header can be well-formed and still lie: gptneox.block_count = 2³¹ made `info` allocate until the kernel killed
    it and made llama.cpp abort with a core dump. The counts are checked against the tensors themselves."""
    if not info.architecture:
        return
    where = f"{info.path} is corrupt"
    layers = {int(m.group(1)) for t in info.tensors if (m := _LAYER.match(t.name))}
    n_layer = info.arch_int(Keys.LLM.BLOCK_COUNT)
    if layers and n_layer != max(layers) + 1:
        raise UserError(f"{where}: {info.architecture}.block_count says {n_layer} layers, its tensors have "
                        f"{max(layers) + 1}; convert or download it again")
    n_embd = info.arch_int(Keys.LLM.EMBEDDING_LENGTH)
    embed = next((t for t in info.tensors if t.name == "token_embd.weight"), None)
    if embed is not None and n_embd != embed.shape[0]:
        raise UserError(f"{where}: {info.architecture}.embedding_length says {n_embd}, token_embd.weight has rows "
                        f"of {embed.shape[0]}; convert or download it again")
    n_head = info.arch_int(Keys.Attention.HEAD_COUNT)
    if n_embd and (not n_head or n_head < 1 or n_embd % n_head):
        raise UserError(f"{where}: {info.architecture}.attention.head_count is {n_head}, which does not divide "
                        f"the embedding length {n_embd}; convert or download it again")


def _int(value: object) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class _Corrupt(Exception):
    """What is wrong in a header, said as the user's error message says it."""


MAX_DIMS = 4  # GGML_MAX_DIMS
# the fewest bytes each record can take, so a count read from the file is bounded by what the file can hold
_MIN_KV = 8 + 4 + 1  # key length, value type, a one-byte value
_MIN_TENSOR = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dimension, type, offset


class _Buffer:
    """Reads forward through the file in large chunks; the header of a GGUF is at most a few MB.

    Every count and length comes from the file, so each is checked against what is left of the file before anything
    is allocated or looped over: a corrupt header is a one-line message, never a MemoryError or a long hang."""

    def __init__(self, f, size: int) -> None:
        self.f = f
        self.size = size
        self.data = b""
        self.pos = 0
        self.base = 0  # file offset of data[0]

    @property
    def offset(self) -> int:
        return self.base + self.pos

    def left(self) -> int:
        return self.size - self.offset

    def need(self, n: int, what: str = "a value") -> None:
        if n > self.left():
            raise _Corrupt(f"{what} at byte {self.offset} needs {n} bytes but the file ends after {self.left()}")
        if self.pos + n > len(self.data):
            chunk = self.f.read(max(n, 4 << 20))
            self.base += self.pos
            self.data = self.data[self.pos:] + chunk
            self.pos = 0
            if n > len(self.data):
                raise _Corrupt(f"the file ends early, at byte {self.offset + len(self.data)}")

    def unpack(self, fmt: str, what: str = "a value"):
        size = struct.calcsize(fmt)
        self.need(size, what)
        value = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return value[0] if len(value) == 1 else value

    def count(self, what: str, smallest: int) -> int:
        """A count of records that take at least `smallest` bytes each: at most what the rest of the file holds."""
        at = self.offset
        n = self.unpack("<Q", what)
        if n * smallest > self.left():
            raise _Corrupt(f"{what} {n} at byte {at} is more than the file's {self.size} bytes can hold")
        return n

    def string(self, what: str = "a string") -> str:
        n = self.count(f"the length of {what}", 1)
        self.need(n, what)
        s = self.data[self.pos:self.pos + n].decode("utf-8", "replace")
        self.pos += n
        return s

    def vtype(self, key: str) -> GGUFValueType:
        at = self.offset
        raw = self.unpack("<I", f"the type of {key!r}")
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise _Corrupt(f"unknown value type {raw} for {key!r} at byte {at}") from None

    def array_head(self, key: str) -> tuple[GGUFValueType, int]:
        etype = self.vtype(key)
        smallest = struct.calcsize(_SCALARS[etype]) if etype in _SCALARS else 8 if etype == STRING else 12
        return etype, self.count(f"the length of {key!r}", smallest)

    def skip_value(self, vtype: GGUFValueType, key: str) -> None:
        if vtype == STRING:
            n = self.count(f"the length of {key!r}", 1)
            self.need(n, key)
            self.pos += n
        elif vtype == ARRAY:
            self.skip_array(key)
        else:
            self.need(struct.calcsize(_SCALARS[vtype]), key)
            self.pos += struct.calcsize(_SCALARS[vtype])

    def skip_array(self, key: str) -> int:
        """Skip an array value (its type and count next); return its length."""
        etype, count = self.array_head(key)
        if etype in _SCALARS:
            size = struct.calcsize(_SCALARS[etype]) * count
            self.need(size, key)
            self.pos += size
        else:
            for _ in range(count):
                self.skip_value(etype, key)
        return count

    def value(self, vtype: GGUFValueType, key: str):
        if vtype == STRING:
            return self.string(repr(key))
        if vtype == ARRAY:
            etype, count = self.array_head(key)
            return [self.value(etype, key) for _ in range(count)]
        return self.unpack(_SCALARS[vtype], key)

    def tensor(self) -> TensorInfo:
        at = self.offset
        name = self.string("a tensor name")
        n_dims = self.unpack("<I", f"the dimensions of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise _Corrupt(f"tensor {name!r} at byte {at} has {n_dims} dimensions (llama.cpp allows 1 to {MAX_DIMS})")
        shape = tuple(self.unpack("<Q", f"the shape of {name!r}") for _ in range(n_dims))
        raw, offset = self.unpack("<I", f"the type of {name!r}"), self.unpack("<Q", f"the offset of {name!r}")
        try:
            ttype = GGMLQuantizationType(raw)
            block, type_size = GGML_QUANT_SIZES[ttype]
        except (ValueError, KeyError):
            raise _Corrupt(f"tensor {name!r} has an unknown type {raw}") from None
        n = math.prod(shape)
        if n % block:
            raise _Corrupt(f"tensor {name!r} has {n} values, not a whole number of {ttype.name} blocks of {block}")
        return TensorInfo(name, shape, ttype, offset, n // block * type_size)


_CACHE: collections.OrderedDict = collections.OrderedDict()  # (path, file identity, arrays) → GGUFInfo
_CACHED = 32
_LOCK = threading.Lock()


def read_info(path: Path, arrays: tuple[str, ...] = ()) -> GGUFInfo:
    """Metadata and tensor table of a GGUF; array values are kept only for the keys in `arrays`.

    The last few files read are kept, by file identity (device, inode, size, modification time): a server of many
    models reads a header for every request's name and load, and a 30,000-token vocabulary takes a third of a second
    of Python to skip. A file replaced or changed in any way is read again. Callers must not change what they get."""
    try:
        st = os.stat(path)
        key = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, arrays)
    except OSError:
        key = None
    with _LOCK:
        found = _CACHE.get(key) if key is not None else None
        if found is not None:
            _CACHE.move_to_end(key)
            return found
    info = _read_info(path, arrays)
    if key is not None:
        with _LOCK:
            _CACHE[key] = info
            while len(_CACHE) > _CACHED:
                _CACHE.popitem(last=False)
    return info


def _read_info(path: Path, arrays: tuple[str, ...] = ()) -> GGUFInfo:
    kind = files.not_regular(path)
    if kind and kind != "a directory":  # a FIFO would block the read forever, /dev/zero would never end
        raise UserError(f"{path} is {kind}, not a GGUF file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if f.read(4) != GGUF_MAGIC_BYTES:
                raise UserError(f"{path} is not a GGUF file")
            buf = _Buffer(f, size)
            buf.base = 4
            version = buf.unpack("<I", "the version")
            if version < 2:
                raise UserError(f"{path} is a GGUF version {version} file, too old for llama.cpp")
            if version > 3:
                raise UserError(f"{path} says it is a GGUF version {version} file; llama.cpp reads versions 2 and 3 "
                                "(a corrupt file, or one written by a newer llama.cpp)")
            n_tensors = buf.count("the number of tensors", _MIN_TENSOR)
            n_kv = buf.count("the number of metadata keys", _MIN_KV)
            meta: dict[str, object] = {}
            for _ in range(n_kv):
                key = buf.string("a metadata key")
                vtype = buf.vtype(key)
                if vtype == ARRAY and key not in arrays:
                    meta[key] = buf.skip_array(key)
                else:
                    meta[key] = buf.value(vtype, key)
            tensors = [buf.tensor() for _ in range(n_tensors)]
            alignment = meta.get(Keys.General.ALIGNMENT, 32)
            if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 \
                    or alignment & (alignment - 1):
                raise _Corrupt(f"{Keys.General.ALIGNMENT} is {alignment!r}, not a power of two")
            data_offset = -(-buf.offset // alignment) * alignment
    except _Corrupt as e:
        raise UserError(f"{path} is not a valid GGUF file (corrupt header: {e}); convert or download it again"
                        ) from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory, not a GGUF file") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from e
    info = GGUFInfo(path, version, meta, tensors, data_offset, size)
    end = max((data_offset + t.offset + t.nbytes for t in tensors), default=0)  # a vocab-only file has no data
    if end > size:
        raise UserError(f"{path} is truncated: its tensors need {end} bytes but the file has {size}; "
                        "copy or convert it again")
    return info
