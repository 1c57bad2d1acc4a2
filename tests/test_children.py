"""Children die with malhae (app/children.py): real processes, real SIGKILLs, no mocks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _alive(pid: int) -> bool:
    """Running (a zombie nobody has reaped yet counts as gone: it runs nothing and holds no file open)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def _parent(code: str) -> subprocess.Popen:
    script = textwrap.dedent("""
        import subprocess, sys, time
        from malhae import children
    """) + textwrap.dedent(code)
    return subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)


SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]
WATCHER = [sys.executable, "-c", "from app import children; import time; children.watch_parent(); time.sleep(120)"]

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to see processes")


def _kill_9_and_expect_gone(parent: subprocess.Popen, child: int) -> None:
    """SIGKILL the parent; the child must be gone within 10 s (and is killed here either way, to leave nothing)."""
    try:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert _gone_within(child, 10), "the child outlived its parent's SIGKILL"
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)


def _kill_parent_and_check_child(parent: subprocess.Popen) -> None:
    child = int(parent.stdout.readline())
    assert _alive(child)
    time.sleep(0.3)  # the child is past its start-up, doing its work
    _kill_9_and_expect_gone(parent, child)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_any_program_dies_with_a_killed_parent():
    """PR_SET_PDEATHSIG: works for programs malhae did not write (llama-bench, llama-perplexity)."""
    _kill_parent_and_check_child(_parent(f"""
        p = children.popen({SLEEPER!r}, start_new_session=True)
        print(p.pid, flush=True)
        time.sleep(120)
    """))


def test_a_python_child_watches_its_lifeline_where_there_is_no_pdeathsig():
    """The portable guard (macOS, BSD): with PDEATHSIG switched off, the pipe alone ends the child."""
    _kill_parent_and_check_child(_parent(f"""
        children._die_with = lambda parent: None
        p = children.popen({WATCHER!r}, start_new_session=True, lifeline=True)
        print(p.pid, flush=True)
        time.sleep(120)
    """))


def test_a_child_ends_normally_and_closes_its_lifeline():
    from malhae import children

    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        done = children.run([sys.executable, "-c", "from app import children; children.watch_parent(); print('ok')"],
                            stdout=subprocess.PIPE, text=True, lifeline=True, cwd=ROOT)
        assert done.returncode == 0 and done.stdout == "ok\n"
    assert len(os.listdir("/proc/self/fd")) == before  # no pipe end left open per child


def test_programs_that_cannot_start_are_one_line_errors(tmp_path):
    from malhae import children
    from malhae.errors import UserError

    not_executable = tmp_path / "llama-bench"
    not_executable.write_text("#!/bin/sh\necho hi\n")
    not_executable.chmod(0o644)
    garbage = tmp_path / "garbage"
    garbage.write_bytes(os.urandom(64))
    garbage.chmod(0o755)
    for exe, says in ((not_executable, "not executable"), (garbage, "for this machine"),
                      (tmp_path / "missing", "no such program")):
        with pytest.raises(UserError, match=says) as e:
            children.run([str(exe)], stdout=subprocess.PIPE)
        assert str(exe) in str(e.value) and "\n" not in str(e.value)


def _quantizer_of(parent: int) -> int | None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and b"malhae.convert.quantize" in cmdline:
            return int(entry.name)
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_kill_9_of_convert_takes_its_quantizer_along(k_quant_checkpoint, tmp_path):
    """The reported case: `kill -9` of convert left the quantizer re-parented to PID 1, writing on. The quantizer is
    caught and frozen (SIGSTOP) so that it cannot finish on its own first; then the parent is killed."""
    out = tmp_path / "m.gguf"
    for _attempt in range(5):  # the quantizer of a tiny model lives about a second: catch it
        convert = subprocess.Popen([sys.executable, "-m", "malhae", "convert", str(k_quant_checkpoint), "--type",
                                    "q4_k_m", "-o", str(out), "--force"], cwd=ROOT, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        child = None
        while convert.poll() is None and child is None:
            child = _quantizer_of(convert.pid)
            time.sleep(0.005)
        if child is None:
            continue
        os.kill(child, signal.SIGSTOP)
        _kill_9_and_expect_gone(convert, child)
        return
    pytest.fail("never caught the quantizer running")


def test_bench_with_a_llama_bench_that_cannot_run(tmp_path, capsys, monkeypatch):
    from malhae.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "llama-bench").write_text("#!/bin/sh\necho hi\n")
    (tmp_path / "llama-bench").chmod(0o644)
    for exe, says in (("./llama-bench", "not executable"), ("/bin/true", "did not answer as llama-bench does")):
        assert main(["bench", "-p", "8", "-n", "4", "--llama-bench", exe]) == 2
        err = capsys.readouterr().err
        assert err.count("malhae: error:") == 1 and says in err and "internal error" not in err
