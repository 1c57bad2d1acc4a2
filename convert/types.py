"""The output types `malhae convert --type` accepts, and how each one is made.

f32, f16, bf16 and q8_0 are written directly (no second pass); the k-quants and the other block formats go through
llama.cpp's own quantizer from a temporary f16 file, so they are bit-for-bit what `llama-quantize` would make.
The types llama.cpp quantizes only with an importance matrix (its tensor_requires_imatrix: IQ1, IQ2, IQ3_XXS and the
mixes made of them, Q2_K_S) say so (`needs_imatrix`), and are refused without `--imatrix` before any work starts;
tests/test_imatrix.py holds this table to llama.cpp's own refusals.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGMLQuantizationType as QT
from gguf import LlamaFileType as FT

from malhae.errors import UserError


@dataclass(frozen=True)
class OutType:
    name: str
    ftype: FT
    direct: QT | None  # the 2-D tensor type when written directly; None when llama.cpp's quantizer makes it
    bpw: float  # typical bits per weight, for the free-space estimate only
    about: str
    needs_imatrix: bool = False  # llama.cpp refuses to make it without an importance matrix


TYPES: dict[str, OutType] = {t.name: t for t in (
    OutType("f32", FT.ALL_F32, QT.F32, 32.0, "full precision; for verification"),
    OutType("f16", FT.MOSTLY_F16, QT.F16, 16.0, "the published precision; lossless for fp16 checkpoints"),
    OutType("bf16", FT.MOSTLY_BF16, QT.BF16, 16.0, "lossless for bf16 checkpoints"),
    OutType("q8_0", FT.MOSTLY_Q8_0, QT.Q8_0, 8.5, "near-lossless, half of f16"),
    OutType("q6_k", FT.MOSTLY_Q6_K, None, 6.6, "very small loss"),
    OutType("q5_k_m", FT.MOSTLY_Q5_K_M, None, 5.7, "small loss"),
    OutType("q5_k_s", FT.MOSTLY_Q5_K_S, None, 5.6, "small loss"),
    OutType("q5_1", FT.MOSTLY_Q5_1, None, 6.0, "legacy 5-bit"),
    OutType("q5_0", FT.MOSTLY_Q5_0, None, 5.5, "legacy 5-bit"),
    OutType("q4_k_m", FT.MOSTLY_Q4_K_M, None, 4.9, "recommended balance of size and quality"),
    OutType("q4_k_s", FT.MOSTLY_Q4_K_S, None, 4.6, "smaller 4-bit"),
    OutType("q4_1", FT.MOSTLY_Q4_1, None, 5.0, "legacy 4-bit"),
    OutType("q4_0", FT.MOSTLY_Q4_0, None, 4.5, "legacy 4-bit, fast on some CPUs"),
    OutType("iq4_nl", FT.MOSTLY_IQ4_NL, None, 4.5, "non-linear 4-bit"),
    OutType("iq4_xs", FT.MOSTLY_IQ4_XS, None, 4.3, "non-linear 4-bit, smaller"),
    OutType("q3_k_l", FT.MOSTLY_Q3_K_L, None, 4.3, "3-bit, noticeable loss"),
    OutType("q3_k_m", FT.MOSTLY_Q3_K_M, None, 3.9, "3-bit, noticeable loss"),
    OutType("q3_k_s", FT.MOSTLY_Q3_K_S, None, 3.5, "3-bit, large loss"),
    OutType("iq3_m", FT.MOSTLY_IQ3_M, None, 3.7, "3-bit lattice mix; best with an imatrix"),
    OutType("iq3_s", FT.MOSTLY_IQ3_S, None, 3.5, "3-bit lattice; best with an imatrix"),
    OutType("iq3_xs", FT.MOSTLY_IQ3_XS, None, 3.3, "3-bit lattice, smaller", True),
    OutType("iq3_xxs", FT.MOSTLY_IQ3_XXS, None, 3.1, "3-bit lattice, smallest", True),
    OutType("q2_k", FT.MOSTLY_Q2_K, None, 3.4, "2-bit, large loss; a last resort"),
    OutType("q2_k_s", FT.MOSTLY_Q2_K_S, None, 3.0, "2-bit, smaller", True),
    OutType("iq2_m", FT.MOSTLY_IQ2_M, None, 2.7, "2-bit lattice mix", True),
    OutType("iq2_s", FT.MOSTLY_IQ2_S, None, 2.5, "2-bit lattice", True),
    OutType("iq2_xs", FT.MOSTLY_IQ2_XS, None, 2.3, "2-bit lattice, smaller", True),
    OutType("iq2_xxs", FT.MOSTLY_IQ2_XXS, None, 2.1, "2-bit lattice, smallest", True),
    OutType("iq1_m", FT.MOSTLY_IQ1_M, None, 1.8, "1.75-bit; for the largest models only", True),
    OutType("iq1_s", FT.MOSTLY_IQ1_S, None, 1.6, "1.56-bit; for the largest models only", True),
)}


def get(name: str) -> OutType:
    key = name.strip().lower()
    if key not in TYPES:
        raise UserError(f"unknown --type {name!r}; choose one of: {', '.join(TYPES)}")
    return TYPES[key]
