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
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

import llama_cpp as lc
import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from malhae.runtime import ggml, llama
from malhae.runtime.settings import check

ROWS_PER_TASK_ELEMENTS = 1 << 21  # 2 Mi values (8 MiB of f32) per task


def _in_threads(work: Callable[[int], None], starts: range) -> None:
    """`work(start)` for every start, on up to one thread per core, returning when all are done.

    A ThreadPoolExecutor's workers outlive an interrupt: they go on with every queued chunk, and Python's shutdown
    waits for them (a trial saw `malhae convert` hang after saying "interrupted"). Here a failure or an interrupt
    skips the chunks not yet begun and waits only for those under way (one chunk each: milliseconds), and the
    threads are daemons, so that even a second Ctrl-C while waiting lets the process go.
    """
    todo = iter(starts)
    lock = threading.Lock()
    stop = threading.Event()
    errors: list[BaseException] = []

    def worker() -> None:
        while not stop.is_set():
            with lock:
                start = next(todo, None)
            if start is None:
                return
            try:
                work(start)
            except BaseException as e:  # noqa: BLE001 - raised in the caller's thread below
                errors.append(e)
                stop.set()

    threads = [threading.Thread(target=worker, name="malhae-quant", daemon=True)
               for _ in range(min(len(starts), os.cpu_count() or 1))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        stop.set()
        for t in threads:
            if t.is_alive():
                t.join()
    if errors:
        raise errors[0]


def quantize_rows(rows_f32, qtype: QT, n_rows: int, n_per_row: int) -> np.ndarray:
    """Quantize `n_rows` rows; `rows_f32(start, stop)` returns those rows as contiguous float32."""
    block, type_size = GGML_QUANT_SIZES[qtype]
    if n_per_row % block:
        raise ValueError(f"rows of {n_per_row} values cannot be split into {qtype.name} blocks of {block}")
    lib = ggml.base()
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

    _in_threads(work, range(0, n_rows, step))
    return out


def quantize_file(src: Path, dst: Path, ftype: int, threads: int = 0, *, dry_run: bool = False,
                  imatrix: Mapping[str, np.ndarray] | None = None, kv: Mapping[str, str | int] | None = None) -> int:
    """llama_model_quantize from `src` to `dst` as file type `ftype`; returns its code (0: done). Its per-tensor log
    lines (progress, each tensor's chosen type, the reason of a failure) reach whoever listens (llama.log_to).

    `imatrix`: per weight name the float32 column importances (llama-quantize's sums / counts), handed over as
    llama_model_imatrix_data entries; `kv`: metadata written into the output (the quantize.imatrix.* keys), as
    llama-quantize passes them, through kv_overrides."""
    llama.init()
    params = lc.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = check("threads", threads) if threads else 0  # bounded wherever it came from
    params.dry_run = dry_run
    keep: list[object] = []  # everything llama.cpp reads through a pointer lives until the call returns
    if imatrix:
        entries = (lc.llama_model_imatrix_data * (len(imatrix) + 1))()  # zeroed: the last one ends the array
        for entry, (name, values) in zip(entries, imatrix.items(), strict=False):
            data = np.ascontiguousarray(values, dtype=np.float32)
            keep += [data, name.encode()]
            entry.name = keep[-1]
            entry.data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entry.size = data.size
        params.imatrix = entries
        keep.append(entries)
    if kv:
        overrides = (lc.llama_model_kv_override * (len(kv) + 1))()  # zeroed: an empty key ends the array
        for o, (key, value) in zip(overrides, kv.items(), strict=False):
            o.key = key.encode()[:127]
            if isinstance(value, int):
                o.tag = lc.LLAMA_KV_OVERRIDE_TYPE_INT
                o.value.val_i64 = value
            else:
                o.tag = lc.LLAMA_KV_OVERRIDE_TYPE_STR
                o.value.val_str = value.encode()[:127]
        params.kv_overrides = overrides
        keep.append(overrides)
    return lc.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
