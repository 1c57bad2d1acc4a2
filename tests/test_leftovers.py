"""Partial files of runs killed outright (kill -9) are removed by the next write into the folder, and only those."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from app import leftovers, store
from convert import pipeline


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _partial(directory, name: str, age: float):
    path = directory / name
    path.write_bytes(b"GGUF" + b"\0" * 100)
    then = time.time() - age
    os.utime(path, (then, then))
    return path


def test_only_old_files_of_finished_processes_are_removed(tmp_path):
    dead, alive = _dead_pid(), os.getppid()
    stale = _partial(tmp_path, f".m.gguf.{dead}.partial", 3600)
    staged = _partial(tmp_path, f".m-q4_k_m.gguf.{dead}.staged.partial", 3600)
    recent = _partial(tmp_path, f".n.gguf.{dead}.partial", 10)  # maybe another machine's write, still going
    running = _partial(tmp_path, f".o.gguf.{alive}.partial", 3600)
    mine = _partial(tmp_path, f".p.gguf.{os.getpid()}.partial", 3600)
    other = _partial(tmp_path, f"notes.{dead}.partial", 3600)  # not hidden: not one of malhae's
    assert sorted(leftovers.sweep(tmp_path)) == sorted([stale, staged])
    assert not stale.exists() and not staged.exists()
    assert all(p.exists() for p in (recent, running, mine, other))
    assert leftovers.sweep(tmp_path / "missing") == []


def test_a_store_import_and_a_conversion_clean_up_before_writing(tmp_path, checkpoints):
    models = tmp_path / "models"
    models.mkdir()
    killed_import = _partial(models, f".big.gguf.{_dead_pid()}.partial", 3600)
    gguf = pipeline.convert(checkpoints("tf4-st-f16"), "f16", tmp_path / "m.gguf").path
    store.open_store(models).add(gguf, "m")
    assert not killed_import.exists() and (models / "m.gguf").is_file()

    killed_convert = _partial(gguf.parent, f".m2.gguf.{_dead_pid()}.quantized.partial", 3600)
    pipeline.convert(checkpoints("tf4-st-f16"), "f16", gguf.parent / "m2.gguf")
    assert not killed_convert.exists()
