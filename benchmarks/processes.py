"""What the benchmark scripts share about the servers they start: where upstream llama-server is built, a free port,
and stopping one for sure (SIGTERM, then SIGKILL)."""

from __future__ import annotations

import importlib.metadata
import socket
import subprocess
from pathlib import Path


def default_llama_server() -> Path:
    """Where `build_llama_tools.py --server` puts llama-server for the installed llama-cpp-python's llama.cpp."""
    version = importlib.metadata.version("llama-cpp-python")
    return Path.home() / ".cache" / "malhae" / f"llama-tools-{version}" / "build" / "bin" / "llama-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
