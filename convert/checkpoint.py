"""Find a checkpoint's tensors on disk and read them one at a time.

Published Polyglot-Ko repositories hold sharded PyTorch pickles; others hold safetensors. Both are read lazily so a
12.8B model converts in the memory of its largest tensor. Safetensors are parsed here rather than through the
`safetensors` package because numpy has no bfloat16 and because a truncated file must be caught before writing
anything. Pickles are only ever opened with `torch.load(weights_only=True)`, which refuses anything but tensors.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np

from malhae.errors import UserError
from malhae.files import cannot_read, parse_json, read_user_bytes

MAX_INDEX = 1 << 26  # a shard index lists every tensor's file: a few hundred KB for the largest models


class CheckpointError(UserError):
    pass


# Raw dtypes as read from disk. bfloat16 travels as uint16 (its bit pattern) because numpy cannot hold it.
DTYPES = {"F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "BF16": np.dtype("<u2")}


@dataclass(frozen=True)
class TensorRef:
    name: str
    shape: tuple[int, ...]
    dtype: str  # one of DTYPES
    file: Path
    offset: int = 0  # safetensors only: absolute byte offset of the data
    nbytes: int = 0


@dataclass(frozen=True)
class RawTensor:
    """A tensor's values in their on-disk precision; `dtype == "BF16"` means `data` holds bf16 bit patterns."""

    name: str
    dtype: str
    data: np.ndarray


def _leaves_folder(name: str) -> bool:
    """A shard name that is absolute or climbs out (../other/model.safetensors): judged on the name, not on where
    it resolves, since a Hugging Face cache snapshot links every file to ../../blobs/ and that is fine."""
    pure = PurePosixPath(name.replace("\\", "/"))
    return pure.is_absolute() or ".." in pure.parts or PureWindowsPath(name).drive != ""


def find_weight_files(model_dir: Path) -> tuple[str, list[Path]]:
    """Return the weight format ("safetensors" or "pickle") and the files, preferring safetensors."""
    for fmt, index_name, single_name in (
        ("safetensors", "model.safetensors.index.json", "model.safetensors"),
        ("pickle", "pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = model_dir / index_name
        if index.is_file():
            try:
                raw = read_user_bytes(index, "", limit=MAX_INDEX, fix="download it again")
                weight_map = parse_json(raw, str(index), "download it again")["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{index} is unreadable or has no weight_map ({e}); download it again") from e
            outside = [s for s in shards if not isinstance(s, str) or _leaves_folder(s)]
            if outside:
                raise CheckpointError(f"{index.name} names the shard {outside[0]!r}, outside {model_dir}; a "
                                      "checkpoint's shards are files in its own folder: download the index again")
            missing = [s for s in shards if not (model_dir / s).is_file()]
            if missing:
                raise CheckpointError(f"shard {missing[0]} named in {index.name} is missing from {model_dir}; "
                                      "download it again")
            return fmt, [model_dir / s for s in shards]
        if (model_dir / single_name).is_file():
            return fmt, [model_dir / single_name]
    raise CheckpointError(f"no weights in {model_dir}: expected model.safetensors, pytorch_model.bin or a sharded "
                          "index (*.index.json) beside config.json")


# --- safetensors -----------------------------------------------------------------------------------------------

_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
             "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}

def _scan_safetensors(path: Path) -> list[TensorRef]:
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path.name} is truncated ({size} bytes); download it again")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8 or header_len > 100 * 2**20:
                raise CheckpointError(f"{path.name} is truncated or not a safetensors file "
                                      f"(header of {header_len} bytes in a {size}-byte file); download it again")
            raw = f.read(header_len)
    except OSError as e:
        raise cannot_read(e, path) from e
    header = parse_json(raw, f"the header of {path.name}", "download it again")
    base = 8 + header_len
    refs = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        if base + end > size:
            raise CheckpointError(f"{path.name} is truncated: tensor {name} ends at byte {base + end} but the file "
                                  f"has {size}; download it again")
        itemsize = _ITEMSIZE.get(dtype)  # other dtypes (a bool mask among the legacy buffers) are listed, not read
        if itemsize and end - begin != int(np.prod(shape, dtype=np.int64)) * itemsize:
            raise CheckpointError(f"{path.name} is corrupt: tensor {name}'s byte range does not match its shape")
        refs.append(TensorRef(name, shape, dtype, path, base + begin, end - begin))
    return refs


def _read_safetensors(ref: TensorRef) -> np.ndarray:
    """A read-only view on a memory map of just this tensor's bytes.

    No copy: an f16 tensor goes from the page cache straight to the output file (copying into a buffer first made
    the 1.3B conversion 1.2× slower than llama.cpp's). The map is closed when the array is dropped, so only the tensor
    being converted counts toward memory.
    """
    if ref.nbytes == 0:
        return np.empty(ref.shape, dtype=DTYPES[ref.dtype])
    start = ref.offset - ref.offset % mmap.ALLOCATIONGRANULARITY
    with open(ref.file, "rb") as f:
        mapped = mmap.mmap(f.fileno(), ref.offset + ref.nbytes - start, offset=start, access=mmap.ACCESS_READ)
    if hasattr(mapped, "madvise"):
        mapped.madvise(mmap.MADV_SEQUENTIAL)
    count = ref.nbytes // DTYPES[ref.dtype].itemsize
    return np.frombuffer(mapped, dtype=DTYPES[ref.dtype], count=count, offset=ref.offset - start).reshape(ref.shape)


# --- PyTorch pickles -------------------------------------------------------------------------------------------

def _torch():
    try:
        import torch
    except ImportError as e:
        raise CheckpointError("this checkpoint is in PyTorch .bin (pickle) format, which needs torch to read: "
                              "pip install 'malhae[torch]' (or give a safetensors copy of the model)") from e
    return torch


def _load_pickle(path: Path) -> dict:
    torch = _torch()
    import pickle
    import warnings
    import zipfile

    try:
        # torch warns about pickle protocols as it refuses a file; malhae's one-line error says all of it
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except (RuntimeError, ValueError) as e:
                if "mmap" not in str(e) and "zip" not in str(e):  # old non-zip pickles cannot be memory-mapped
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path.name} holds pickled objects other than tensors, which could run code when "
                              "loaded; malhae refuses it (use a safetensors copy of the model)") from e
    except (EOFError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path.name} is truncated or corrupt ({e}); download it again") from e
    except RuntimeError as e:
        raise CheckpointError(f"{path.name} cannot be read ({str(e).splitlines()[0]}); download it again") from e
    except OSError as e:
        raise cannot_read(e, path) from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path.name} is not a state dict of tensors; malhae reads Hugging Face checkpoints")
    return state


_TORCH_DTYPES = {"torch.float16": "F16", "torch.float32": "F32", "torch.bfloat16": "BF16"}


def _torch_to_raw(tensor) -> tuple[str, np.ndarray]:
    torch = _torch()
    dtype = _TORCH_DTYPES.get(str(tensor.dtype))
    if dtype is None:
        raise CheckpointError(f"a tensor is {tensor.dtype}; malhae reads float16, bfloat16 and float32 weights")
    if dtype == "BF16":
        return dtype, tensor.contiguous().view(torch.int16).numpy().view(np.uint16)
    return dtype, tensor.contiguous().numpy()


def _scan_pickle(path: Path) -> list[TensorRef]:
    refs = []
    for name, tensor in _load_pickle(path).items():
        if not hasattr(tensor, "dtype") or not hasattr(tensor, "shape"):
            raise CheckpointError(f"{path.name}: entry {name} is not a tensor")
        dtype = _TORCH_DTYPES.get(str(tensor.dtype), str(tensor.dtype))
        refs.append(TensorRef(name, tuple(tensor.shape), dtype, path))
    return refs


# --- the public face -------------------------------------------------------------------------------------------

class Checkpoint:
    """All tensors of a model directory, listed up front (for the GGUF header) and read one at a time."""

    def __init__(self, model_dir: Path, progress: Callable[[int, int], None] | None = None) -> None:
        self.dir = model_dir
        self.format, self.files = find_weight_files(model_dir)
        scan = _scan_safetensors if self.format == "safetensors" else _scan_pickle
        self.refs: dict[str, TensorRef] = {}
        for done, file in enumerate(self.files, 1):
            for ref in scan(file):
                self.refs[ref.name] = ref
            if progress:
                progress(done, len(self.files))

    def read(self, names: list[str]) -> Iterator[RawTensor]:
        """Yield the named tensors, visiting each shard once; the order is by shard, then as given."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.refs[name].file, []).append(name)
        for file, file_names in by_file.items():
            if self.format == "safetensors":
                for name in file_names:
                    ref = self.refs[name]
                    yield RawTensor(name, ref.dtype, _read_safetensors(ref))
            else:
                state = _load_pickle(file)
                for name in file_names:
                    dtype, data = _torch_to_raw(state[name])
                    yield RawTensor(name, dtype, data)
                del state

    def order(self, names: list[str]) -> list[str]:
        """The order in which `read` will yield `names`."""
        files = {f: i for i, f in enumerate(self.files)}
        return sorted(names, key=lambda n: files[self.refs[n].file])


def read_file(path: Path) -> dict[str, RawTensor]:
    """Every tensor of one safetensors or .bin file (a PEFT adapter's: tens of MB), pickles as safely as above."""
    if path.suffix == ".safetensors":
        refs = _scan_safetensors(path)
        odd = next((r for r in refs if r.dtype not in DTYPES), None)
        if odd is not None:
            raise CheckpointError(f"{path.name}: tensor {odd.name} is {odd.dtype}; malhae reads float16, bfloat16 "
                                  "and float32 weights")
        return {r.name: RawTensor(r.name, r.dtype, _read_safetensors(r)) for r in refs}
    out = {}
    for name, tensor in _load_pickle(path).items():
        if not hasattr(tensor, "dtype") or not hasattr(tensor, "shape"):
            raise CheckpointError(f"{path.name}: entry {name} is not a tensor")
        dtype, data = _torch_to_raw(tensor)
        out[name] = RawTensor(name, dtype, data)
    return out
