"""llama.cpp's quantizers, for the converter: whole files (llama_model_quantize) and rows (ggml_quantize_chunk).

Files: the k-quants and other mixes are made by llama.cpp's own llama_model_quantize, so a file is bit for bit what
`llama-quantize` makes; its `dry_run` decides every tensor's type without reading the data (the catalog's sizes).
Rows: Q8_0 is written directly through ggml's C routine, byte-identical to llama.cpp by construction and at C speed (a
numpy re-implementation made the 1.3B conversion 1.24× slower than llama.cpp's converter). ctypes releases the GIL
during the call, so row chunks run in parallel threads.
"""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import llama_cpp as lc
import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from app.runtime import llama
from app.runtime.settings import check

ROWS_PER_TASK_ELEMENTS = 1 << 21  # 2 Mi values (8 MiB of f32) per task


@cache
def _lib() -> ctypes.CDLL:
    base = llama.lib_dir()
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        if (base / name).exists():
            lib = ctypes.CDLL(str(base / name))
            break
    else:
        raise RuntimeError(f"ggml's base library is not in {base}; reinstall llama-cpp-python")
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    return lib


@cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="malhae-quant")


def quantize_rows(rows_f32, qtype: QT, n_rows: int, n_per_row: int) -> np.ndarray:
    """Quantize `n_rows` rows; `rows_f32(start, stop)` returns those rows as contiguous float32."""
    block, type_size = GGML_QUANT_SIZES[qtype]
    if n_per_row % block:
        raise ValueError(f"rows of {n_per_row} values cannot be split into {qtype.name} blocks of {block}")
    lib = _lib()
    lib.ggml_quantize_init(int(qtype))
    row_bytes = n_per_row // block * type_size
    out = np.empty((n_rows, row_bytes), dtype=np.uint8)
    step = max(1, ROWS_PER_TASK_ELEMENTS // n_per_row)

    def work(start: int) -> None:
        stop = min(n_rows, start + step)
        src = np.ascontiguousarray(rows_f32(start, stop), dtype=np.float32)
        written = lib.ggml_quantize_chunk(int(qtype), src.ctypes.data, out[start:stop].ctypes.data, 0,
                                          stop - start, n_per_row, None)
        if written != (stop - start) * row_bytes:
            raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {(stop - start) * row_bytes}")

    for future in [_pool().submit(work, s) for s in range(0, n_rows, step)]:
        future.result()
    return out


def quantize_file(src: Path, dst: Path, ftype: int, threads: int = 0, *, dry_run: bool = False) -> int:
    """llama_model_quantize from `src` to `dst` as file type `ftype`; returns its code (0: done). Its per-tensor log
    lines (progress, each tensor's chosen type, the reason of a failure) reach whoever listens (llama.log_to)."""
    llama.init()
    params = lc.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = check("threads", threads) if threads else 0  # bounded wherever it came from
    params.dry_run = dry_run
    return lc.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
