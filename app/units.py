"""How malhae writes sizes and counts, in every message and table: one formatter per kind of number.

Files and downloads in decimal units (GB = 10^9 bytes, as disks and the hub show them); GPU memory in binary units,
as it is sold and reported (a "24 GB" card has 24 GiB); parameter counts as models are named (1.3B).
"""

from __future__ import annotations

import math
import re

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


MAX_DURATION = 10 * 365 * 24 * 3600.0  # seconds: a keep_alive beyond ten years is a typo (-1 keeps for ever)
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration(value: object, where: str) -> float | None:
    """A keep_alive as Ollama reads it: a number of seconds, or Go's duration text ("5m", "1h30m", "90s", "0");
    a plain number as text is seconds too, and "forever" what it says. None: for ever (any negative value, or
    "forever"); 0: unload once idle. `where` names the field or flag for the one-line error."""
    usage = f'{where} must be a duration such as "5m", "1h", "30s" or a number of seconds (0: unload at once, -1: ' \
            "keep loaded)"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UserError(usage)
    if isinstance(value, str):
        text = value.strip().lower()
        if not text or len(text) > 32:
            raise UserError(usage)
        if text == "forever":  # as duration_text writes it, so that what malhae shows can be typed back
            return None
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        try:
            seconds = float(body)
        except ValueError:
            parts = _DURATION_PART.findall(body)
            if not parts or "".join(n + u for n, u in parts) != body:
                raise UserError(f"{usage}, not {value.strip()[:32]!r}") from None
            seconds = sum(float(n) * _DURATION_UNIT[u] for n, u in parts)
        value = sign * seconds
    if not math.isfinite(value) or abs(value) > MAX_DURATION:
        raise UserError(f"{usage}; at most ten years (-1 keeps it loaded)")
    return None if value < 0 else float(value)


def duration_text(seconds: float | None) -> str:
    """A keep_alive as messages say it: "forever", "0s", "90s", "5m", "1h30m"."""
    if seconds is None:
        return "forever"
    whole = round(seconds)
    if whole < 120 and whole % 60:
        return f"{seconds:g}s"
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return "".join(f"{n}{u}" for n, u in ((hours, "h"), (minutes, "m"), (secs, "s")) if n) or "0s"
