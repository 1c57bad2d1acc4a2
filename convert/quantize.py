"""Run llama.cpp's own quantizer (llama_model_quantize) on a GGUF, with progress, in a child process.

A child process because llama_model_quantize cannot be interrupted from Python: on Ctrl-C the parent ends the child
and the caller removes the partial file, and a crash inside llama.cpp becomes an error message instead of a dead CLI.
The child is `python -m convert.quantize` (not multiprocessing, which re-imports the caller's __main__) in its own
session, so a terminal's Ctrl-C reaches only the parent; and it dies with the parent (app.children), so a
`kill -9` of convert does not leave it writing gigabytes into a partial file nobody will rename.
Progress comes from llama.cpp's per-tensor log line
"[  12/ 291] name - ...", passed up as "progress I N" lines on stdout.
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import IO

from malhae import children
from malhae.convert.imatrix import Imatrix
from malhae.errors import UserError
from malhae.runtime.interrupts import Interrupts

_PROGRESS = re.compile(r"\[\s*(\d+)\s*/\s*(\d+)\s*\]")
POLL_SECONDS = 0.1  # how often a held Ctrl-C is looked at while the child works on one tensor
MAX_STDERR_LINES = 200  # of the child's stderr, only the end is kept (its last line explains a crash)


def quantize(src: Path, dst: Path, ftype: int, threads: int | None,
             progress: Callable[[int, int], None] | None = None, *, imatrix: Path | None = None,
             imatrix_label: str | None = None) -> None:
    """Quantize `src` into `dst`; with `imatrix` (a file convert.imatrix reads, already checked against the model),
    its column importances guide the quantizer and the quantize.imatrix.* keys record it (`imatrix_label`: the
    name to record as quantize.imatrix.file, default the file's name, never its full path)."""
    import malhae

    root = str(Path(malhae.__file__).resolve().parent.parent)  # so the child imports this same copy of malhae
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "malhae.convert.quantize", str(src), str(dst), str(int(ftype)), str(threads or 0)]
    if imatrix is not None:
        cmd += [str(imatrix), imatrix_label or imatrix.name]
    proc = children.popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          start_new_session=True, lifeline=True)
    result: list[str] | None = None
    lines: queue.Queue[str | None] = queue.Queue()
    errors: deque[str] = deque(maxlen=MAX_STDERR_LINES)
    _pump(proc.stdout, lines.put, end=True)
    err_pump = _pump(proc.stderr, errors.append)
    try:
        # the child's lines arrive from threads, so that a Ctrl-C (held as a flag while llama.cpp may call back into
        # Python) is seen within POLL_SECONDS even while one large tensor takes the child minutes
        with Interrupts() as interrupted:
            while (line := _next(lines, interrupted)) is not None:
                parts = line.rstrip("\n").split(" ", 2)
                if parts[0] == "progress" and progress:
                    progress(int(parts[1]), int(parts[2]))
                elif parts[0] == "done":
                    result = parts
            proc.wait()
            err_pump.join(timeout=5)  # the child is gone: its stderr ends at once
        stderr = "".join(errors)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if result is None:
        tail = stderr.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        raise UserError(f"llama.cpp's quantizer stopped unexpectedly ({tail[0]}); run again with --debug")
    if result[1] != "0":
        raise UserError(f"llama.cpp's quantizer failed: {result[2] if len(result) > 2 else 'no reason given'}")


def _pump(stream: IO[str] | None, put: Callable[[str | None], object], *, end: bool = False) -> threading.Thread:
    """Hand each line of a child's pipe to `put` (and None after the last, with `end`) from a daemon thread: a
    blocking read cannot notice a held Ctrl-C, and a daemon never keeps the process alive."""

    def run() -> None:
        try:
            for line in stream or ():
                put(line)
        except (OSError, ValueError):  # the pipe went away with a killed child, or its bytes were not text
            pass
        finally:
            if end:
                put(None)

    thread = threading.Thread(target=run, name="malhae-quantize-pipe", daemon=True)
    thread.start()
    return thread


def _next(lines: queue.Queue[str | None], interrupted: Interrupts) -> str | None:
    """The child's next line (None after its last), looking at the interrupt flag every POLL_SECONDS meanwhile."""
    while True:
        interrupted.check()
        try:
            return lines.get(timeout=POLL_SECONDS)
        except queue.Empty:
            continue


def imatrix_keys(im: Imatrix, label: str) -> dict[str, str | int]:
    """The metadata llama-quantize records about the imatrix a file was quantized with (read by `malhae info`)."""
    keys: dict[str, str | int] = {"quantize.imatrix.file": label}
    if im.datasets:
        keys["quantize.imatrix.dataset"] = im.datasets[0]
    keys["quantize.imatrix.entries_count"] = len(im.sums)
    if im.chunk_count > 0:
        keys["quantize.imatrix.chunks_count"] = im.chunk_count
    return keys


def _child(src: str, dst: str, ftype: int, threads: int, imatrix: str | None = None, label: str = "") -> int:
    children.watch_parent()
    from malhae.convert.imatrix import read
    from malhae.runtime import llama, quant

    last_error: list[str] = []

    def sink(level: int, message: str) -> None:
        m = _PROGRESS.search(message)
        if m:
            print("progress", m.group(1), m.group(2), flush=True)
        elif level == 2 or "error" in message.lower() or "failed" in message.lower():
            last_error.append(message.strip())

    llama.init(verbose=False)
    means, keys = None, None
    if imatrix:
        im = read(Path(imatrix))
        means, keys = im.means(), imatrix_keys(im, label)
    with llama.log_to(sink):
        rc = quant.quantize_file(Path(src), Path(dst), ftype, threads, imatrix=means, kv=keys)
    reason = (last_error[-1] if last_error else "").replace("\n", " ")
    print("done", rc, reason, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), *sys.argv[5:7]))
