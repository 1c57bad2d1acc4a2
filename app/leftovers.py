"""Leftovers of interrupted writes: the hidden `.NAME.PID[.STEP].partial` files a killed malhae could not remove.

Every GGUF malhae writes (conversions, store imports) goes to such a temporary file first and is renamed only when
complete. Ctrl-C and SIGTERM remove it, but `kill -9`, an out-of-memory kill or a power cut cannot, and the file is
gigabytes. So the next write into the same folder removes the leftovers whose process is gone. Two guards keep that
from touching a write in progress: the PID in the name must not be running, and the file must have been untouched
for STALE_SECONDS (a live write updates it continuously) — the second guard matters on a folder shared with other
machines, where a PID says nothing.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

PATTERN = re.compile(r"^\..+\.(\d+)(?:\.[a-z]+)?\.partial$")
STALE_SECONDS = 600


def sweep(directory: Path, now: float | None = None) -> list[Path]:
    """Remove stale leftovers in `directory`; returns what was removed. Never raises: cleaning up is a courtesy."""
    try:
        candidates = list(directory.iterdir())
    except OSError:
        return []
    now = time.time() if now is None else now
    removed = []
    for path in candidates:
        m = PATTERN.match(path.name)
        if not m or _running(int(m.group(1))):
            continue
        try:
            if now - path.stat().st_mtime < STALE_SECONDS or not path.is_file():
                continue
            path.unlink()
        except OSError:
            continue
        removed.append(path)
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else, or the platform cannot tell: leave the file alone
        return True
    return True
