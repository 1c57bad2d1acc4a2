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
    import dataclasses

    from malhae.runtime.settings import LoadOptions
    from malhae.serve.server import Options, Server  # needs the serve extra: import where a server is wanted

    fields = {f.name for f in dataclasses.fields(LoadOptions)}
    load = LoadOptions(model=path, threads=2, parallel=parallel, ctx=n_ctx,
                       **{k: options.pop(k) for k in list(options) if k in fields})
    opts = Options(load=load, model_id=path.stem, port=0, **options)
    with Server(opts) as server:
        yield server



@contextmanager
def serving_store(*, parallel: int = 2, n_ctx: int = 512, **options):
    """`malhae serve` without -m (the store of $MALHAE_HOME, by name) on a free port, 2 threads."""
    from malhae.runtime.settings import LoadOptions
    from malhae.serve.server import Options, Server
    from malhae.store.served import Served

    load = LoadOptions(threads=2, parallel=parallel, ctx=n_ctx)
    opts = Options(load=load, model_id=None, names=Served(load), port=0, **options)
    with Server(opts) as server:
        yield server
