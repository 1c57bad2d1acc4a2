"""What `malhae ps` and `malhae stop` print: a server's loaded models as `ollama ps` shows them; one line per stop.

Everything in a row came from a server over the network: names go through ui.printable and rich's escape, and a
field that is missing (a model still loading has no context yet) or of the wrong type is shown as "-" rather than
failing the whole listing.
"""

from __future__ import annotations

import json
import math
import re
import sys
from datetime import datetime, timezone

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from malhae import units
from malhae.ui import out, printable

PIPE_WIDTH = 1000  # into a pipe or a file, a row stays one line (rich would assume 80 columns and wrap it)
FOREVER_YEAR = 2200  # Ollama writes "never expires" as a date centuries ahead; malhae as year 1 (Go's zero time)


def models(url: str, loaded: list[dict], as_json: bool) -> None:
    """The table (or /api/ps's own JSON shape), one row per model; one line when nothing is loaded."""
    if as_json:
        sys.stdout.write(json.dumps({"models": loaded}, ensure_ascii=False) + "\n")
        return
    if not loaded:
        out.print(f"no models loaded on {printable(url)}", markup=False, highlight=False, soft_wrap=True)
        return
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col, justify in (("NAME", "left"), ("SIZE", "right"), ("PROCESSOR", "left"), ("CONTEXT", "right"),
                         ("SLOTS", "left"), ("UNTIL", "left")):
        table.add_column(col, justify=justify, overflow="fold", no_wrap=col != "NAME")
    now = datetime.now(timezone.utc)
    for m in loaded:
        size = _int(m.get("size"))
        context = _int(m.get("context_length"))
        table.add_row(escape(printable(m["name"])), units.size(size) if size is not None else "-",
                      processor(size, _int(m.get("size_vram"))), f"{context:,}" if context is not None else "-",
                      slots(m), until(m, now))
    (out if out.is_terminal else Console(highlight=False, width=PIPE_WIDTH)).print(table)


def stopped(name: str, was_loaded: bool = True) -> None:
    out.print(f"stopped {printable(name)}" if was_loaded else f"{printable(name)} was not loaded; nothing to stop",
              markup=False, highlight=False)


def processor(size: int | None, vram: int | None) -> str:
    """Where the weights are, as `ollama ps` says it: 100% CPU, 100% GPU, or the split by bytes (35%/65% CPU/GPU)."""
    if size is None or vram is None:
        return "-"
    if vram == 0:
        return "100% CPU"
    if vram == size:
        return "100% GPU"
    if vram > size or size <= 0:
        return "unknown"
    cpu = round((size - vram) / size * 100)
    return f"{cpu}%/{100 - cpu}% CPU/GPU"


def slots(m: dict) -> str:
    total, busy = _int(m.get("slots")), _int(m.get("slots_busy"))
    return f"{busy}/{total} busy" if total is not None and busy is not None else "-"


def until(m: dict, now: datetime) -> str:
    """When the model unloads: "4 minutes from now", "Forever" (pinned), "loading", "stopping" (past due)."""
    if m.get("state") == "loading":
        return "loading"
    text = m.get("expires_at")
    year = re.match(r"(\d{4,})-", text) if isinstance(text, str) else None
    if year is None:
        return "-"
    if int(year.group(1)) in (1, 0) or int(year.group(1)) >= FOREVER_YEAR:
        return "Forever"
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return "-"
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    left = (when - now).total_seconds()
    return "stopping" if left <= 0 else f"{human_duration(left)} from now"


def human_duration(seconds: float) -> str:
    """Ollama's HumanDuration (format/time.go), so that `malhae ps` reads as `ollama ps` does."""
    whole = int(seconds)
    if whole < 1:
        return "less than a second"
    if whole < 60:
        return "1 second" if whole == 1 else f"{whole} seconds"
    minutes = whole // 60
    if minutes < 60:
        return "about a minute" if minutes == 1 else f"{minutes} minutes"
    hours = math.floor(seconds / 3600 + 0.5)  # Go's math.Round: halves away from zero
    if hours == 1:
        return "about an hour"
    for limit, size, unit in ((48, 1, "hours"), (24 * 14, 24, "days"), (24 * 60, 24 * 7, "weeks"),
                              (24 * 730, 24 * 30, "months")):
        if hours < limit:
            return f"{hours // size} {unit}"
    return f"{hours // (24 * 365)} years"


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None
