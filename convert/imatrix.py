"""The importance-matrix file: llama.cpp's format, read and written so that malhae and upstream tools share files.

GGUF (what `llama-imatrix` writes since 2025): `general.type = imatrix`, `imatrix.datasets` (strings),
`imatrix.chunk_count`, `imatrix.chunk_size` (u32), and per weight `<name>.in_sum2` (f32, [n_mat, n_cols]: the sums of
squared input activations) and `<name>.counts` (f32, [n_mat]: the tokens summed). The older `.dat` format (what many
published imatrix files still are) is read too: per entry a name, a call count and values already averaged per call.

What the quantizer gets (`means`) is what llama-quantize computes from either: sums divided by counts, and 1 for a
matrix no token reached. Everything read is bounded and checked, since a file may come from anywhere: a truncated,
foreign or empty file is one line of error, and `check_model` refuses an imatrix made for another model before any
quantizing starts.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from malhae import files
from malhae.errors import UserError
from malhae.runtime.gguf_info import read_info

MAX_ENTRIES = 1 << 16  # tensors in one file: a 1000-layer model has ~7000
MAX_VALUES = 1 << 26  # values in one entry (64 Mi: 256 experts × 256 Ki columns)
MAX_NAME = 1 << 10
MAX_DATASETS = 1 << 12


@dataclass
class Imatrix:
    """Sums [n_mat, n_cols] and counts [n_mat] per weight name, and how they were made."""

    sums: dict[str, np.ndarray]
    counts: dict[str, np.ndarray]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False  # read from a .dat file: sums are per-call means, counts the number of calls

    def means(self) -> dict[str, np.ndarray]:
        """Per weight the flat float32 array llama_model_quantize wants, exactly as llama-quantize derives it."""
        out = {}
        for name, sums in self.sums.items():
            counts = self.counts[name].astype(np.float64)
            if self.legacy:
                mean = sums / counts[0] if counts[0] > 0 else sums
            else:
                mean = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], 1.0)
            out[name] = np.ascontiguousarray(mean, dtype=np.float32).reshape(-1)
        return out


def write(im: Imatrix, path: Path, *, force: bool = False) -> None:
    """Write as llama-imatrix does (GGUF, tensors sorted by name); nothing is left behind on failure."""
    files.check_target(path, force, replace_hint="add --force to overwrite it", other_hint="choose another -o")
    with files.partial(path, "imatrix") as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch="imatrix", endianess=gguf.GGUFEndian.LITTLE)
        writer.add_string("general.type", "imatrix")
        writer.add_array("imatrix.datasets", list(im.datasets))
        writer.add_uint32("imatrix.chunk_count", im.chunk_count)
        writer.add_uint32("imatrix.chunk_size", im.chunk_size)
        for name in sorted(im.sums):
            writer.add_tensor(f"{name}.in_sum2", np.asarray(im.sums[name], dtype=np.float32))
            writer.add_tensor(f"{name}.counts", np.asarray(im.counts[name], dtype=np.float32).reshape(-1, 1))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)


def _not_imatrix(path: Path, why: str) -> UserError:
    return UserError(f"{path} is not an importance matrix ({why}); make one with `malhae imatrix MODEL.gguf` or "
                     "llama-imatrix, or use --imatrix auto")


def read(path: Path) -> Imatrix:
    """An imatrix file in either format; every mistake is a one-line UserError."""
    if not path.exists():
        raise UserError(f"imatrix file {path} does not exist; make one with `malhae imatrix MODEL.gguf -o {path}`, "
                        "or use --imatrix auto")
    if not path.is_file():
        raise UserError(f"{path} is not a file; --imatrix takes a file made by `malhae imatrix` or llama-imatrix")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise files.cannot_read(e, path, "imatrix file") from None
    if magic == b"GGUF":
        return _read_gguf(path)
    return _read_legacy(path)


def _read_gguf(path: Path) -> Imatrix:
    """The GGUF format, through the project's own bounded header reader (app.runtime.gguf_info), data by memmap."""
    try:
        info = read_info(path, arrays=("imatrix.datasets",))
    except UserError:
        raise _not_imatrix(path, "a damaged or truncated GGUF") from None
    kind = info.text("general.type")
    if kind != "imatrix":
        raise _not_imatrix(path, f"a GGUF of type {kind!r}" if kind else "a GGUF without general.type = imatrix")
    if len(info.tensors) > 2 * MAX_ENTRIES:
        raise _not_imatrix(path, f"{len(info.tensors)} tensors")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in info.tensors:
        if t.type != gguf.GGMLQuantizationType.F32:
            raise _not_imatrix(path, f"{t.name} is {t.type.name}, not F32")
        if t.n_elements > MAX_VALUES:
            raise _not_imatrix(path, f"{t.name} has {t.n_elements} values")
        values = np.frombuffer(data, dtype="<f4", count=t.n_elements, offset=info.data_offset + t.offset)
        if t.name.endswith(".in_sum2"):
            sums[t.name.removesuffix(".in_sum2")] = values.reshape(-1, t.shape[0]).astype(np.float64)
        elif t.name.endswith(".counts"):
            counts[t.name.removesuffix(".counts")] = np.rint(values).astype(np.int64)
    if not sums:
        raise _not_imatrix(path, "no .in_sum2 tensors")
    unpaired = sorted(set(sums) ^ set(counts))
    if unpaired:
        raise _not_imatrix(path, f"sums and counts do not pair up for {unpaired[0]}")
    for name, s in sums.items():
        if counts[name].size != s.shape[0]:
            raise _not_imatrix(path, f"{name} has {s.shape[0]} matrices but {counts[name].size} counts")
        if not np.isfinite(s).all() or (s < 0).any() or (counts[name] < 0).any():
            raise _not_imatrix(path, f"{name} holds negative or non-finite values")
    datasets = info.metadata.get("imatrix.datasets")
    datasets = [d for d in datasets if isinstance(d, str)][:MAX_DATASETS] if isinstance(datasets, list) else []
    return Imatrix(sums, counts, datasets, _count(info.metadata.get("imatrix.chunk_count")),
                   _count(info.metadata.get("imatrix.chunk_size")))


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _read_legacy(path: Path) -> Imatrix:
    """llama-imatrix's .dat: int32 n_entries; per entry int32 len, name, int32 ncall, int32 nval, float32[nval];
    then optionally int32 chunk count, int32 len, dataset name."""
    data = files.read_user_bytes(path, "imatrix file", limit=1 << 34)
    pos = 0

    def take(fmt: str) -> tuple:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise _not_imatrix(path, "it ends in the middle of an entry: truncated, or another kind of file")
        out = struct.unpack_from(fmt, data, pos)
        pos += size
        return out

    (n_entries,) = take("<i")
    if not 1 <= n_entries <= MAX_ENTRIES:
        raise _not_imatrix(path, "neither GGUF nor a plausible .dat header")
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for _ in range(n_entries):
        (length,) = take("<i")
        if not 1 <= length <= MAX_NAME:
            raise _not_imatrix(path, f"an entry name of {length} bytes")
        name = take(f"<{length}s")[0].decode("utf-8", "replace")
        ncall, nval = take("<ii")
        if not 1 <= nval <= MAX_VALUES or ncall < 0:
            raise _not_imatrix(path, f"entry {name!r} claims {nval} values and {ncall} calls")
        values = np.frombuffer(data, dtype="<f4", count=nval, offset=pos) if pos + 4 * nval <= len(data) else None
        if values is None:
            raise _not_imatrix(path, "it ends in the middle of an entry: truncated, or another kind of file")
        pos += 4 * nval
        if not np.isfinite(values).all() or (values < 0).any():
            raise _not_imatrix(path, f"{name} holds negative or non-finite values")
        sums[name] = values.astype(np.float64).reshape(1, -1)
        counts[name] = np.array([ncall], dtype=np.int64)
    chunk_count, datasets = 0, []
    if pos + 4 <= len(data):
        (chunk_count,) = take("<i")
        if pos + 4 <= len(data):
            (length,) = take("<i")
            if 0 < length <= MAX_NAME and pos + length <= len(data):
                datasets = [take(f"<{length}s")[0].decode("utf-8", "replace")]
    return Imatrix(sums, counts, datasets, max(0, chunk_count), 0, legacy=True)


def check_model(im: Imatrix, weights: Iterable[tuple[str, list[int]]], imatrix_name: str) -> None:
    """Refuse an imatrix made for another model: each 2-D+ `blk.*` weight (name, shape ne0 first) must have an entry
    with its number of input columns (× experts). `imatrix_name` names the file in the message."""
    weights = [(n, s) for n, s in weights if n.startswith("blk.") and len(s) >= 2]
    missing = [n for n, _ in weights if n not in im.sums]
    if weights and len(missing) == len(weights):
        sample = next(iter(sorted(im.sums)), "nothing")
        raise UserError(f"{imatrix_name} was made for another model: none of its tensors ({sample}, …) is in this "
                        f"one; make one for this model with `malhae imatrix` or use --imatrix auto")
    for name, shape in weights:
        if name not in im.sums:
            continue
        want = shape[0] * (shape[2] if len(shape) > 2 else 1)
        got = im.sums[name].size
        if got != want:
            raise UserError(f"{imatrix_name} was made for another model: {name} has {want} input columns here and "
                            f"{got} in the imatrix; make one for this model with `malhae imatrix` or use --imatrix "
                            "auto")
    if missing:
        raise UserError(f"{imatrix_name} has no entry for {missing[0]} (and {len(missing) - 1} more); it was made "
                        "for another model or cut short: make one for this model with `malhae imatrix`")
