"""Where malhae keeps its files, and how it writes any file: whole or not at all.

Where: `$MALHAE_HOME` (settings, store, history together, as tests and portable installs want), else the platform's
user folders (platformdirs). This is the only place that reads MALHAE_HOME.

How: every file malhae writes — a converted GGUF, a copy into the store, config.toml, a saved chat — is first written
to a hidden `.NAME.PID[.STEP].partial` file beside its target and renamed over it only when complete, so a reader sees
the old file or the new one, never half of one. Ctrl-C and SIGTERM remove the partial file, but `kill -9`, an
out-of-memory kill or a power cut cannot, and a GGUF is gigabytes; so the next write into the same folder removes the
leftovers whose process is gone (sweep). Two guards keep that from touching a write in progress: the PID in the name
must not be running, and the file must have been untouched for STALE_SECONDS (a live write updates it continuously) —
the second guard matters on a folder shared with other machines, where a PID says nothing.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PARTIAL = re.compile(r"^\..+\.(\d+)(?:\.[a-z]+)?\.partial$")
STALE_SECONDS = 600


# --- where -------------------------------------------------------------------------------------------------------

def home() -> Path | None:
    """$MALHAE_HOME, when set: one folder for everything malhae keeps."""
    value = os.environ.get("MALHAE_HOME")
    return Path(value).expanduser() if value else None


def data_dir() -> Path:
    """The store and the chat history: $MALHAE_HOME, else the user data folder (~/.local/share/malhae on Linux)."""
    import platformdirs

    return home() or Path(platformdirs.user_data_dir("malhae"))


def config_dir() -> Path:
    """config.toml: $MALHAE_HOME, else the user config folder (~/.config/malhae on Linux)."""
    import platformdirs

    return home() or Path(platformdirs.user_config_dir("malhae"))


# --- how ---------------------------------------------------------------------------------------------------------

def partial_path(target: Path, step: str | None = None) -> Path:
    """The hidden file `target` is written to first; `step` tells apart several for one target (a lowercase word)."""
    return target.parent / f".{target.name}.{os.getpid()}{'.' + step if step else ''}.partial"


@contextmanager
def partial(target: Path, step: str | None = None) -> Iterator[Path]:
    """A partial file for `target`, removed when the block ends whatever happens (rename it into place inside)."""
    path = partial_path(target, step)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically, creating its folder; OSError for the caller to explain."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep(path.parent)
    with partial(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def sweep(directory: Path, now: float | None = None) -> list[Path]:
    """Remove stale leftovers in `directory`; returns what was removed. Never raises: cleaning up is a courtesy."""
    try:
        candidates = list(directory.iterdir())
    except OSError:
        return []
    now = time.time() if now is None else now
    removed = []
    for path in candidates:
        m = PARTIAL.match(path.name)
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
