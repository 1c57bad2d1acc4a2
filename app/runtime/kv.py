"""The KV cache's element types and its size: one rule for the bytes K and V take, which every estimate uses.

Polyglot-Ko has no grouped-query attention, so every layer keeps full K and V: polyglot-ko-12.8b needs 0.78 MiB of f16
K/V per token. llama.cpp can store them quantized (q8_0: 34 bytes per 32 values, q4_0: 18), which is what lets a long
context or several server slots keep every layer on a small GPU. The offload planner, `malhae info`, `recommend`,
the RAM check before a context is made and the prompt cache's key all read the types and the sizes from here, so
that what they say equals what llama.cpp allocates (its log line `llama_kv_cache: size = …`, checked in the tests).

A quantized V cache needs flash attention (llama.cpp refuses the context otherwise); a quantized K does not. On a CPU
a smaller cache costs decode speed at depth (measured in docs/benchmarks.md): it saves memory, not time.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from malhae import units
from malhae.errors import UserError

# the types malhae offers for K and V, by the names llama.cpp's -ctk/-ctv and Ollama's OLLAMA_KV_CACHE_TYPE use
KV_TYPES: dict[str, GGMLQuantizationType] = {
    "f16": GGMLQuantizationType.F16,
    "q8_0": GGMLQuantizationType.Q8_0,
    "q4_0": GGMLQuantizationType.Q4_0,
}
F32 = GGMLQuantizationType.F32  # only for --precise parity runs (llama.Context(precise=True))
FLASH_ATTN = ("auto", "on", "off")  # auto: as llama.cpp decides for the device (on where it is supported)
CELL_ROUNDING = 256  # llama.cpp pads each sequence's context to a multiple of this many cells (llama-context.cpp)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many tokens two sequences share from the start: what a KV cache holding `a` can keep for `b`."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def quantized(name: str) -> bool:
    return name not in ("f16", "f32")


def ggml_type(name: str) -> int:
    """llama_context_params.type_k / type_v for a type name."""
    return int(F32 if name == "f32" else KV_TYPES[name])


def row_bytes(name: str, n: int) -> int:
    """Bytes of one row of `n` values stored as `name` (ggml_row_size): blocks of 32 for q8_0 and q4_0."""
    block, size = GGML_QUANT_SIZES[F32 if name == "f32" else KV_TYPES[name]]
    return n // block * size


def cells(n_tokens: int, n_seq: int = 1, *, unified: bool = False) -> int:
    """The cells llama.cpp's KV cache holds for `n_seq` sequences of `n_tokens` (a LoadOptions' ctx and parallel):
    each sequence's context padded to CELL_ROUNDING (one shared context of n_tokens with `unified`)."""
    pad = -(-n_tokens // CELL_ROUNDING) * CELL_ROUNDING
    return pad if unified else pad * n_seq


def layer_bytes(n_cells: int, n_embd_kv: int, k: str = "f16", v: str = "f16") -> int:
    """K and V of one layer for `n_cells` tokens: n_embd_kv values each (n_embd × n_head_kv / n_head)."""
    return n_cells * (row_bytes(k, n_embd_kv) + row_bytes(v, n_embd_kv))


def check_types(k: str, v: str, flash_attn: str, head_dim: int | None = None) -> None:
    """Refuse, before loading anything, what llama.cpp would refuse when it makes the context."""
    if quantized(v) and flash_attn == "off":
        raise UserError(f"a {v} V cache needs flash attention; use --flash-attn auto (or on), or --kv-cache-v f16")
    for which, name in (("K", k), ("V", v)):
        block = GGML_QUANT_SIZES[KV_TYPES[name]][0] if name in KV_TYPES else 1
        if head_dim and head_dim % block:
            raise UserError(f"a {name} {which} cache stores blocks of {block} values, which this model's attention "
                            f"heads of {head_dim} do not divide; use --kv-cache f16")


def describe(k: str, v: str) -> str:
    """The cache's types as messages say them: "f16", or "K q8_0, V f16" when they differ."""
    return k if k == v else f"K {k}, V {v}"


def summary(ctx) -> str:
    """A context's cache in a few words, "q8_0, 3.2 MiB": its types (f32 under --precise) and the size llama.cpp
    reported (`ctx`: an app.runtime.llama.Context), for chat's /show and serve's ready line."""
    mib = ctx.kv_report.mib if ctx.kv_report else None  # printed with two decimals: no KiB made up below 1 MiB
    size = "" if mib is None else f", {units.gib(int(mib * 2**20))}" if mib >= 1 else f", {mib:.2f} MiB"
    return describe(ctx.type_k, ctx.type_v) + size


_REPORT = re.compile(r"llama_kv_cache: size = +([\d.]+) MiB .*K \((\w+)\): +([\d.]+) MiB, V \((\w+)\): +([\d.]+) MiB")


@dataclass(frozen=True)
class Report:
    """What llama.cpp says it allocated for the KV cache when it made a context (MiB, to two decimals)."""

    mib: float
    k: str
    k_mib: float
    v: str
    v_mib: float

    @classmethod
    def parse(cls, line: str) -> Report | None:
        m = _REPORT.search(line)
        if m is None:
            return None
        total, k, k_mib, v, v_mib = m.groups()
        return cls(float(total), k, float(k_mib), v, float(v_mib))
