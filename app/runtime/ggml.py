"""ggml's own C libraries (libggml-base and libggml, shipped inside llama-cpp-python), through ctypes: the few
functions and the one struct malhae needs that llama-cpp-python does not bind.

Why here: the converter quantizes rows with ggml_quantize_chunk, the importance matrix reads the tensors of
llama.cpp's compute graph as the scheduler evaluates them (the `cb_eval` callback hands over a `struct ggml_tensor *`),
and the offload planner asks ggml's device registry (libggml) which GPUs this build can use and how much memory they
have free, for CUDA, Metal, ROCm, Vulkan and SYCL alike.
The struct's layout is copied from the vendored ggml.h; `_check_layout` proves it on a real tensor at load, so a
llama-cpp-python with another layout fails with a clear message instead of reading garbage.
"""

from __future__ import annotations

import ctypes
import os
from functools import cache
from pathlib import Path

import numpy as np

MAX_DIMS = 4
MAX_SRC = 10
MAX_OP_PARAMS = 64
MAX_NAME = 64
TYPE_F32 = 0


class Tensor(ctypes.Structure):
    """struct ggml_tensor (ggml.h)."""


Tensor._fields_ = [
    ("type", ctypes.c_int),
    ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * MAX_DIMS),
    ("nb", ctypes.c_size_t * MAX_DIMS),
    ("op", ctypes.c_int),
    ("op_params", ctypes.c_int32 * (MAX_OP_PARAMS // 4)),
    ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(Tensor) * MAX_SRC),
    ("view_src", ctypes.POINTER(Tensor)),
    ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p),
    ("name", ctypes.c_char * MAX_NAME),
    ("extra", ctypes.c_void_p),
    ("padding", ctypes.c_char * 8),
]


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


@cache
def base() -> ctypes.CDLL:
    """libggml-base with the signatures malhae calls declared."""
    lib = _find("ggml-base")
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_op_name.argtypes = [ctypes.c_int]
    lib.ggml_op_name.restype = ctypes.c_char_p
    lib.ggml_nbytes.argtypes = [ctypes.POINTER(Tensor)]
    lib.ggml_nbytes.restype = ctypes.c_size_t
    lib.ggml_backend_buffer_is_host.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_buffer_is_host.restype = ctypes.c_bool
    lib.ggml_backend_tensor_get.argtypes = [ctypes.POINTER(Tensor), ctypes.c_void_p, ctypes.c_size_t,
                                            ctypes.c_size_t]
    lib.ggml_backend_tensor_get.restype = None
    lib.ggml_init.argtypes = [_InitParams]
    lib.ggml_init.restype = ctypes.c_void_p
    lib.ggml_free.argtypes = [ctypes.c_void_p]
    lib.ggml_new_tensor_2d.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    lib.ggml_new_tensor_2d.restype = ctypes.POINTER(Tensor)
    lib.ggml_set_name.argtypes = [ctypes.POINTER(Tensor), ctypes.c_char_p]
    lib.ggml_set_name.restype = ctypes.POINTER(Tensor)
    _check_layout(lib)
    return lib


def lib_dir() -> Path:
    """Where the llama.cpp and ggml shared libraries that llama-cpp-python loads are (found without importing
    llama_cpp, which loads them: this module sits below app.runtime.llama)."""
    explicit = os.environ.get("LLAMA_CPP_LIB_PATH")
    if explicit:
        return Path(explicit)
    from importlib.util import find_spec

    spec = find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise RuntimeError("llama-cpp-python is not installed; pip install llama-cpp-python")
    return Path(spec.origin).parent / "lib"


def _find(stem: str) -> ctypes.CDLL:
    directory = lib_dir()
    for name in (f"lib{stem}.so", f"lib{stem}.dylib", f"{stem}.dll"):
        if (directory / name).exists():
            return ctypes.CDLL(str(directory / name))
    raise RuntimeError(f"ggml's {stem} library is not in {directory}; reinstall llama-cpp-python")


@cache
def registry() -> ctypes.CDLL:
    """libggml (the backend registry) with the device functions declared. Call llama.init() first where llama.cpp's
    log should stay quiet: it loads the backends of builds that ship them as plug-ins (GGML_BACKEND_DL); this loads
    them itself otherwise."""
    lib = _find("ggml")
    lib.ggml_backend_dev_count.argtypes = []
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    lib.ggml_backend_dev_get.restype = ctypes.c_void_p
    for name in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
        getattr(lib, name).argtypes = [ctypes.c_void_p]
        getattr(lib, name).restype = ctypes.c_char_p
    lib.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_type.restype = ctypes.c_int
    lib.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                            ctypes.POINTER(ctypes.c_size_t)]
    lib.ggml_backend_dev_memory.restype = None
    lib.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
    lib.ggml_backend_reg_name.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_reg_name.restype = ctypes.c_char_p
    lib.ggml_backend_reg_count.argtypes = []
    lib.ggml_backend_reg_count.restype = ctypes.c_size_t
    if not lib.ggml_backend_reg_count():
        lib.ggml_backend_load_all()
    return lib


DEVICE_TYPES = ("cpu", "gpu", "igpu", "accel", "meta")  # enum ggml_backend_dev_type, in order (ggml-backend.h)
MAX_DEVICES = 64  # more than any machine has; a broken registry must not make malhae loop for ever


def device_count() -> int:
    return min(int(registry().ggml_backend_dev_count()), MAX_DEVICES)


def device_handle(index: int) -> int:
    """The ggml_backend_dev_t of device `index` (for llama_model_params.devices)."""
    handle = registry().ggml_backend_dev_get(index)
    if not handle:
        raise RuntimeError(f"ggml has no device {index}")
    return int(handle)


def device_facts(index: int) -> tuple[str, str, str, str, int, int]:
    """(name, description, type, backend, free bytes, total bytes) of device `index`, as ggml reports them now."""
    lib = registry()
    dev = device_handle(index)
    free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
    lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
    kind = lib.ggml_backend_dev_type(dev)
    reg = lib.ggml_backend_dev_backend_reg(dev)
    backend = lib.ggml_backend_reg_name(reg) if reg else None

    def text(raw: bytes | None) -> str:
        return raw.decode("utf-8", "replace") if raw else ""

    return (text(lib.ggml_backend_dev_name(dev)), text(lib.ggml_backend_dev_description(dev)),
            DEVICE_TYPES[kind] if 0 <= kind < len(DEVICE_TYPES) else "unknown", text(backend),
            int(free.value), int(total.value))


def _check_layout(lib: ctypes.CDLL) -> None:
    """Make a 2-D f32 tensor with ggml itself and read it back through `Tensor`: sizes, strides, name and data must
    be where the struct says, else this llama-cpp-python's ggml.h differs from the one the struct was copied from."""
    ctx = lib.ggml_init(_InitParams(1 << 16, None, False))
    try:
        t = lib.ggml_new_tensor_2d(ctx, TYPE_F32, 3, 5)
        lib.ggml_set_name(t, b"malhae.layout")
        c = t.contents
        ok = (c.type == TYPE_F32 and list(c.ne) == [3, 5, 1, 1] and list(c.nb)[:2] == [4, 12]
              and c.name == b"malhae.layout" and c.data and lib.ggml_nbytes(t) == 60)
    finally:
        lib.ggml_free(ctx)
    if not ok:
        raise RuntimeError("this llama-cpp-python's ggml_tensor has a layout malhae does not know; install the "
                           "llama-cpp-python version malhae was tested with (pip install -U malhae)")


@cache
def op(name: str) -> int:
    """The value of GGML_OP_<name> in this build (looked up by name, so a reordered enum cannot fool it)."""
    lib = base()
    for value in range(256):
        got = lib.ggml_op_name(value)
        if got is None:
            break
        if got.decode() == name:
            return value
        if got.decode() == "COUNT":
            break
    raise RuntimeError(f"ggml has no operation {name}")


def on_host(t: Tensor) -> bool:
    """Whether the tensor's data is in ordinary memory (a CPU buffer), readable without a copy."""
    return bool(t.buffer) and bool(base().ggml_backend_buffer_is_host(t.buffer))


def f32_rows(t: Tensor, copy: bool | None = None) -> np.ndarray:
    """The f32 tensor's values as an array [ne3, ne2, ne1, ne0] over its strides. From a GPU buffer (or when
    `copy`), ggml_backend_tensor_get copies them into host memory first; from a CPU buffer they are a view."""
    if t.type != TYPE_F32 or t.nb[0] != 4:
        raise ValueError(f"{t.name.decode(errors='replace')} is not a row-contiguous f32 tensor")
    shape = tuple(reversed(list(t.ne)))
    strides = tuple(reversed(list(t.nb)))
    extent = 4 + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))  # ggml_nbytes of an f32 tensor
    if copy or (copy is None and not on_host(t)):
        buf = np.empty(extent, dtype=np.uint8)
        base().ggml_backend_tensor_get(ctypes.byref(t), buf.ctypes.data, 0, extent)
        origin = buf
    else:
        origin = np.ctypeslib.as_array(ctypes.cast(t.data, ctypes.POINTER(ctypes.c_uint8)), shape=(extent,))
    return np.lib.stride_tricks.as_strided(origin.view(np.float32), shape=shape, strides=strides, writeable=False)
