"""What several test modules check or start the same way: a command's one-line error, and a `malhae serve` on
127.0.0.1 in this process. (A GGUF copied with changes: convert.rewrite.copy_gguf.)"""

from __future__ import annotations

import subprocess
from contextlib import contextmanager
from pathlib import Path


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The single `malhae: error:` line of a command that failed as a user mistake (exit 2, no traceback)."""
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("malhae: error:")]
    assert len(lines) == 1, err
    return lines[0]


@contextmanager
def serving(path: Path, *, parallel: int = 4, n_ctx: int = 512, **options):
    """`malhae serve` on a free port, 2 threads, the model named after its file; stopped when the block ends."""
    from app.serve.server import Options, Server  # needs the serve extra: import where a server is wanted

    opts = Options(path=path, model_id=path.stem, port=0, threads=2, parallel=parallel, n_ctx=n_ctx, **options)
    with Server(opts) as server:
        yield server

