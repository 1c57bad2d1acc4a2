"""How malhae writes sizes and counts, in every message and table: one formatter per kind of number.

Files and downloads in decimal units (GB = 10^9 bytes, as disks and the hub show them); GPU memory in binary units,
as it is sold and reported (a "24 GB" card has 24 GiB); parameter counts as models are named (1.3B).
"""

from __future__ import annotations

import math

from malhae.errors import UserError

MAX_GIB = 1 << 20  # --vram/--ram beyond a pebibyte is a typo


def size(n: int) -> str:
    """A file's size: 1.42 GB, or 8.6 MB below 0.1 GB."""
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def gb(n: int) -> str:
    """Bytes as a number of GB, for columns headed "GB"."""
    return f"{n / 1e9:.2f}"


def gib(n: int) -> str:
    """Memory in binary units: 7.50 GiB, 512.0 MiB, 12.0 KiB."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def params(n: int | None) -> str:
    """A parameter count: 1.33B, 8.6M, 512K; ? when unknown."""
    if not n:
        return "?"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def gib_bytes(flag: str, value: float) -> int:
    """A --vram or --ram value in GiB, as bytes: a finite number from 0 to MAX_GIB (nan and inf were internal
    errors, and -1 was accepted by one command and refused by another)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 <= value <= MAX_GIB:
        raise UserError(f"{flag} {value:g}: give a number of GiB from 0 to {MAX_GIB}")
    return int(value * 2**30)
