"""What `malhae cache` prints: the prompt cache's entries, and what `cache clear` removed."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from malhae import units
from malhae.ui import err, out, printable


def _ago(seconds: float) -> str:
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return "just now"


def entries(root: Path, found: list, cap_gib: float, enabled: bool, as_json: bool) -> None:
    """The entries, the most recently used first, then where they are and how much room is left."""
    found = sorted(found, key=lambda e: -e.last_used)
    total = sum(e.size for e in found)
    if as_json:
        data = {"dir": str(root), "enabled": enabled, "max_bytes": int(cap_gib * 2**30), "bytes": total,
                "entries": [{"model": e.model, "tokens": len(e.tokens), "bytes": e.size, "last_used": e.last_used,
                             "file": str(e.path)} for e in found]}
        sys.stdout.write(json.dumps(data, ensure_ascii=False) + "\n")
        return
    state = "" if enabled else " (off: prompt_cache = false in the settings file)"
    if not found:
        out.print(f"the prompt cache is empty{state} ({escape(str(root))})", markup=False, soft_wrap=True)
        return
    table = Table(title="malhae prompt cache")
    for col, justify in (("model", "left"), ("tokens", "right"), ("size", "right"), ("last used", "right")):
        table.add_column(col, justify=justify, overflow="fold")
    now = time.time()
    for e in found:
        table.add_row(escape(printable(e.model)),  # the file's own word: untrusted
                      f"{len(e.tokens):,}", units.size(e.size), _ago(now - e.last_used))
    out.print(table)
    err.print(f"[dim]{escape(str(root))} · {units.size(total)} of {cap_gib:g} GiB (prompt_cache_max){state} · "
              "`malhae cache clear [MODEL]` empties it[/dim]", soft_wrap=True)


def cleared(removed: list, model: str | None) -> None:
    which = f" of {model}" if model else ""
    size = sum(e.size for e in removed)
    out.print(f"removed {len(removed)} prompt-cache entr{'y' if len(removed) == 1 else 'ies'}{which} "
              f"({units.size(size)})", markup=False)
