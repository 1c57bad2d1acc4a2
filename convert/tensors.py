"""Numeric conversions of one tensor: precision changes, the QKV reorder, and Q8_0 blocks (through ggml).

Everything works on bounded row chunks so that the largest tensor of a 12.8B model (the 30080×5120 embedding) never
needs more than a few tens of MB of scratch memory beyond its own bytes.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as QT

from malhae.runtime import quant

CHUNK_ELEMENTS = 1 << 22  # 4 Mi values (16 MiB of f32) per step


def reorder_qkv(data: np.ndarray, n_head: int) -> np.ndarray:
    """HF stores fused QKV rows per head as (q, k, v); llama.cpp wants all q rows, then all k, then all v."""
    head_dim = data.shape[0] // (3 * n_head)
    rest = data.shape[1:]
    return np.ascontiguousarray(data.reshape(n_head, 3, head_dim, *rest).swapaxes(0, 1).reshape(data.shape))


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round to nearest even, as ggml's fp32→bf16 does; NaNs stay quiet NaNs."""
    bits = x.astype(np.float32, copy=False).view(np.uint32)
    rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 64).astype(np.uint16)
    return rounded


def as_f32(dtype: str, data: np.ndarray) -> np.ndarray:
    if dtype == "BF16":
        return bf16_to_f32(data)
    return data.astype(np.float32, copy=False)


def _rows_per_chunk(row_len: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, row_len))


def convert(dtype: str, data: np.ndarray, target: QT) -> np.ndarray:
    """Return `data` (on-disk `dtype`) in GGML type `target` as the array to write (bytes for block types)."""
    if target == QT.F32:
        return as_f32(dtype, data)
    if target == QT.F16:
        if dtype == "F16":
            return data
        return as_f32(dtype, data).astype(np.float16)
    if target == QT.BF16:
        if dtype == "BF16":
            return data
        return _chunked(data, lambda rows: f32_to_bf16(as_f32(dtype, rows)), np.uint16, data.shape[-1])
    if target == QT.Q8_0:
        rows = data.reshape(-1, data.shape[-1])
        out = quant.quantize_rows(lambda a, b: as_f32(dtype, rows[a:b]), QT.Q8_0, rows.shape[0], rows.shape[1])
        return out.reshape(*data.shape[:-1], out.shape[-1])
    raise ValueError(f"unsupported direct output type {target.name}")


def _chunked(data: np.ndarray, fn, out_dtype, out_row_len: int) -> np.ndarray:
    rows = data.reshape(-1, data.shape[-1])
    out = np.empty((rows.shape[0], out_row_len), dtype=out_dtype)
    step = _rows_per_chunk(rows.shape[1])
    for start in range(0, rows.shape[0], step):
        out[start:start + step] = fn(rows[start:start + step])
    return out.reshape(*data.shape[:-1], out_row_len)


def nbytes(shape: tuple[int, ...], target: QT) -> int:
    n = int(np.prod(shape, dtype=np.int64))
    if target == QT.Q8_0:
        return n // 32 * 34
    return n * {QT.F32: 4, QT.F16: 2, QT.BF16: 2}[target]
