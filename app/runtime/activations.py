"""What each weight matrix sees: per input column, the sum of squared activations over every token evaluated.

This is the importance matrix's raw material, collected the way llama.cpp's `llama-imatrix` collects it (its
tools/imatrix/imatrix.cpp, IMatrixCollector::collect_imatrix), so that a file malhae writes is the file upstream would:
llama.cpp's scheduler calls `cb_eval` for every node of the compute graph; asked first whether a node interests us, we
say yes to each matrix multiplication whose weight is a `blk.*` tensor (the output head only on request) and whose
input is f32 with at least 16 token rows; then, after the scheduler has computed that node, we add the squares of its
input's columns and count its rows. A node on a GPU is copied to host memory first (ggml_backend_tensor_get).

Nothing here may raise into llama.cpp: an exception inside a ctypes callback would be printed and swallowed, so it is
kept and raised by `check()` after the decode.
"""

from __future__ import annotations

import ctypes

import llama_cpp as lc
import numpy as np

from malhae.errors import UserError
from malhae.runtime import ggml

MIN_ROWS = 16  # llama-imatrix ignores smaller batches (single-token decodes would dominate the counts)


def weight_name(name: str) -> str:
    """The model tensor behind a graph name: a copy for another backend is called "CUDA0#blk.0.attn_qkv.weight#0"."""
    if "#" in name:
        return name.split("#")[1]
    return name


class SquareSums:
    """Per weight: sums [n_mat, n_cols] (float64) and counts [n_mat] (tokens), as llama-imatrix keeps them."""

    def __init__(self, *, output: bool = False, copy: bool | None = None) -> None:
        self.output = output  # also collect for output.weight (llama-imatrix --process-output)
        self.copy = copy  # force (True) or forbid (False) the copy through ggml_backend_tensor_get; None: as needed
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, np.ndarray] = {}
        self.error: BaseException | None = None
        self._mul_mat = ggml.op("MUL_MAT")
        self._mul_mat_id = ggml.op("MUL_MAT_ID")
        self.callback = lc.ggml_backend_sched_eval_callback(self._on_node)  # kept alive as long as this object

    def _wanted(self, t: ggml.Tensor) -> bool:
        if t.op == self._mul_mat_id:
            return True  # refused in _add: the sums of a mixture of experts are kept per expert
        if t.op != self._mul_mat or not t.src[0] or not t.src[1]:
            return False
        src1 = t.src[1].contents
        if src1.ne[1] < MIN_ROWS or src1.type != ggml.TYPE_F32:
            return False
        name = weight_name(t.src[0].contents.name.decode("utf-8", "replace"))
        return name.startswith("blk.") or (self.output and name == "output.weight")

    def _on_node(self, tensor: int, ask: bool, _user: int) -> bool:
        try:
            t = ctypes.cast(tensor, ctypes.POINTER(ggml.Tensor)).contents
            if ask:
                return self.error is None and self._wanted(t)
            self._add(t)
        except BaseException as e:  # noqa: BLE001 - re-raised by check() once llama.cpp has returned
            self.error = self.error or e
        return True

    def _add(self, t: ggml.Tensor) -> None:
        if t.op == self._mul_mat_id:
            raise UserError("this model routes tokens to experts (a mixture of experts); malhae computes importance "
                            "matrices of dense models only: use llama.cpp's llama-imatrix for it")
        w, src1 = t.src[0].contents, t.src[1].contents
        name = weight_name(w.name.decode("utf-8", "replace"))
        x = ggml.f32_rows(src1, self.copy)  # [ne3, ne2, ne1, ne0]
        n_cols = x.shape[-1]
        w_ne2, w_ne3 = int(w.ne[2]), int(w.ne[3])
        n_mat = w_ne2 * w_ne3
        sums = self.sums.get(name)
        if sums is None:
            sums = self.sums[name] = np.zeros((n_mat, n_cols), dtype=np.float64)
            self.counts[name] = np.zeros(n_mat, dtype=np.int64)
        elif sums.shape != (n_mat, n_cols):
            raise UserError(f"{name} was multiplied with inputs of {n_cols} columns after {sums.shape[1]}; the "
                            "model file is inconsistent")
        for i3 in range(x.shape[0]):
            for i2 in range(x.shape[1]):
                rows = x[i3, i2]
                # float32 products summed per column, as llama-imatrix does, then kept in float64 across batches
                sums[(i3 % w_ne3) * w_ne2 + (i2 % w_ne2)] += np.einsum("ij,ij->j", rows, rows)
        self.counts[name] += x.shape[0] * x.shape[1] * x.shape[2] // n_mat
        if not np.isfinite(sums).all():
            raise UserError(f"the activations reaching {name} are not finite (inf or NaN); the model file is broken "
                            "or its weights overflow in this precision")

    def check(self) -> None:
        """Raise what went wrong inside the callback, if anything did."""
        if self.error is not None:
            error, self.error = self.error, None
            raise error
