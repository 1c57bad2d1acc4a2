"""How malhae writes sizes and counts, in every message and table: one formatter per kind of number.

Files and downloads in decimal units (GB = 10^9 bytes, as disks and the hub show them); GPU memory in binary units,
as it is sold and reported (a "24 GB" card has 24 GiB); parameter counts as models are named (1.3B).
"""

from __future__ import annotations


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
