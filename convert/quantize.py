"""Run llama.cpp's own quantizer (llama_model_quantize) on a GGUF, with progress, in a child process.

A child process because llama_model_quantize cannot be interrupted from Python: on Ctrl-C the parent ends the child
and removes the partial file, and a crash inside llama.cpp becomes an error message instead of a dead CLI.
Progress comes from llama.cpp's own per-tensor log line "[  12/ 291] name - ...".
"""

from __future__ import annotations

import multiprocessing as mp
import re
from collections.abc import Callable
from pathlib import Path

from app.errors import UserError

_PROGRESS = re.compile(r"\[\s*(\d+)\s*/\s*(\d+)\s*\]")


def _child(src: str, dst: str, ftype: int, threads: int, conn) -> None:  # runs in the spawned process
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides what Ctrl-C means
    import llama_cpp as lc

    from app import llama

    last_error: list[str] = []

    def sink(level: int, message: str) -> None:
        m = _PROGRESS.search(message)
        if m:
            conn.send(("progress", int(m.group(1)), int(m.group(2))))
        elif level == 2 or "error" in message.lower() or "failed" in message.lower():
            last_error.append(message.strip())

    llama.init(verbose=False)
    llama.set_log_sink(sink)
    params = lc.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    rc = lc.llama_model_quantize(src.encode(), dst.encode(), params)
    conn.send(("done", rc, last_error[-1] if last_error else ""))
    conn.close()


def quantize(src: Path, dst: Path, ftype: int, threads: int | None,
             progress: Callable[[int, int], None] | None = None) -> None:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(str(src), str(dst), int(ftype), threads or 0, child), daemon=True)
    proc.start()
    child.close()
    result = None
    try:
        while result is None:
            if parent.poll(0.2):
                try:
                    msg = parent.recv()
                except EOFError:
                    break
                if msg[0] == "progress" and progress:
                    progress(msg[1], msg[2])
                elif msg[0] == "done":
                    result = msg
            elif not proc.is_alive():
                break
        proc.join()
    except BaseException:
        proc.terminate()
        proc.join()
        raise
    if result is None:
        raise UserError(f"llama.cpp's quantizer stopped unexpectedly (exit code {proc.exitcode}); "
                        "run again with --debug --verbose to see its output")
    if result[1] != 0:
        raise UserError(f"llama.cpp's quantizer failed: {result[2] or 'no reason given'}")
