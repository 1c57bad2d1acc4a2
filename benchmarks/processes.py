"""What the benchmark scripts share about the servers they start: stopping one for sure (SIGTERM, then SIGKILL)."""

from __future__ import annotations

import subprocess


def stop(proc: subprocess.Popen | None, grace: float = 15) -> None:
    """End a server started by a script, also one that ignores SIGTERM; nothing if it has ended already."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace)
