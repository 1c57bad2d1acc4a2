"""Bounded numbers as GBNF: the digit strings of the integers, or of the decimals, between two whole numbers.

Why here and not in the converter: llama-cpp-python's port of json-schema-to-grammar ignores `minimum`/`maximum`, and
a bound is a question about digit strings, answered once: the numbers from 95 to 1005 are 95-99 | 100-999 |
1000-1005, each a run of digit ranges. app.runtime.grammar writes these for `integer` and `number` schemas.
"""

from __future__ import annotations

from llama_cpp.llama_grammar import _build_repetition

DIGITS = 16  # the port's integers have at most 16 digits, its fractions at most 16 too
TOP = 10 ** DIGITS - 1
ANY_FRACTION = '("." ' + _build_repetition("[0-9]", 1, DIGITS - 1) + ")?"
ZERO_FRACTION = '("." ' + _build_repetition('"0"', 1, DIGITS - 1) + ")?"
# at least one digit that is not 0: the decimals just above a whole number
NONZERO_FRACTION = ('"." ' + _build_repetition('"0"', 0, DIGITS - 2) + " [1-9] "
                    + _build_repetition("[0-9]", 0, DIGITS - 2))


def integers(lo: int | None, hi: int | None) -> str:
    """GBNF for the integers from lo to hi (None: unbounded, as far as 16 digits go), written as digit ranges."""
    top = TOP
    lo = -top if lo is None else lo
    hi = top if hi is None else hi
    parts = []
    if lo < 0:
        parts.append('"-" ' + _naturals(max(1, -hi) if hi < 0 else 1, -lo))
    if hi >= 0:
        parts.append(_naturals(max(lo, 0), hi))
    return "(" + " | ".join(parts) + ")"


def _naturals(lo: int, hi: int) -> str:
    """GBNF for lo … hi (0 ≤ lo ≤ hi), no leading zeros: one alternative per number of digits."""
    alts = []
    for n in range(len(str(lo)), len(str(hi)) + 1):
        a = lo if n == len(str(lo)) else 10 ** (n - 1)
        b = hi if n == len(str(hi)) else 10 ** n - 1
        alts.append(_same_length(str(a), str(b)))
    return "(" + " | ".join(alts) + ")"


def _same_length(a: str, b: str) -> str:
    """GBNF for the digit strings from a to b, both of the same length."""
    if not a:
        return '""'
    if a == b:
        return f'"{a}"'
    if a.strip("0") == b.strip("9") == "":  # every digit string: written out, the two ends below doubled per digit
        return " ".join(["[0-9]"] * len(a))
    if a[0] == b[0]:
        return f'"{a[0]}" ' + _same_length(a[1:], b[1:])
    rest = len(a) - 1
    alts = [f'"{a[0]}" ' + _same_length(a[1:], "9" * rest) if rest else f'"{a[0]}"']
    if int(b[0]) - int(a[0]) > 1:
        alts.append(f"[{int(a[0]) + 1}-{int(b[0]) - 1}]" + " [0-9]" * rest)
    alts.append(f'"{b[0]}" ' + _same_length("0" * rest, b[1:]) if rest else f'"{b[0]}"')
    return "(" + " | ".join(alts) + ")"


def decimals(lo: int | None, lo_open: bool, hi: int | None, hi_open: bool) -> str:
    """GBNF for the numbers written without an exponent (`-12`, `0.5`, `3.000`) from lo to hi, each bound a whole
    number or None; `_open`: the bound itself is excluded (exclusiveMinimum / exclusiveMaximum). A ValueError when no
    number lies between them."""
    parts = []
    if hi is None or hi > 0 or hi == 0 and not hi_open:  # 0 and above
        start, start_open = (lo, lo_open) if lo is not None and lo >= 0 else (0, False)
        parts.append(_magnitudes(start, start_open, hi, hi_open))
    if lo is None or lo < 0:  # below 0, written as "-" and the magnitude: v in [lo, hi] is -v in [-hi, -lo]
        start, start_open = (-hi, hi_open) if hi is not None and hi < 0 else (0, True)  # 0 is not below 0
        part = _magnitudes(start, start_open, None if lo is None else -lo, lo_open)
        parts.append(part and '"-" ' + part)
    parts = [p for p in parts if p]
    if not parts:
        raise ValueError(f"no number lies between {lo} and {hi}")
    return "(" + " | ".join(parts) + ")"


def _magnitudes(a: int, a_open: bool, b: int | None, b_open: bool) -> str | None:
    """The non-negative decimals from a to b (b None: as far as 16 digits go), None when there are none."""
    if b is not None and (b < a or b == a and (a_open or b_open)):
        return None
    if b is not None and b == a:
        return f'"{a}" {ZERO_FRACTION}'
    alts = [f'"{a}" ' + (NONZERO_FRACTION if a_open else ANY_FRACTION)]  # a itself, or just above it
    last = TOP if b is None else b - 1
    if a + 1 <= last:
        alts.append(f"{_naturals(a + 1, last)} {ANY_FRACTION}")
    if b is not None and not b_open:
        alts.append(f'"{b}" {ZERO_FRACTION}')
    return "(" + " | ".join(alts) + ")"
