"""What several test modules check or start the same way: a command's one-line error, a `malhae serve` on
127.0.0.1 in this process, and a GGUF rewritten with some of its metadata or tensors changed."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
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


def copy_gguf(src: Path, dst: Path, *, fields: dict[str, object] | None = None,
              tensors: Callable[[str], bool] = lambda name: True,
              extra: Callable[[object], None] | None = None) -> Path:
    """A copy of `src` written with gguf-py: metadata `fields` replaced (same value type as before), only the
    `tensors` whose names pass, and `extra(writer)` for keys to add."""
    import gguf

    fields = fields or {}
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, arch=reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name == gguf.Keys.General.ARCHITECTURE:
            continue
        value = fields.get(f.name, f.contents())
        if value is None:
            continue
        writer.add_key_value(f.name, value, f.types[0],
                             sub_type=f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None)
    if extra is not None:
        extra(writer)
    for t in reader.tensors:
        if tensors(t.name):
            writer.add_tensor(t.name, t.data, raw_shape=list(reversed([int(d) for d in t.shape])),
                              raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst
