"""Child processes that die with malhae: the quantizer, llama-bench, llama-perplexity.

`kill -9` of `malhae convert` used to leave its quantizer running, re-parented to PID 1 and still writing a
multi-GB `.partial`. A SIGKILL cannot be caught, so the parent cannot clean up; the child has to notice by itself.
Two means, both used where they exist:

- Linux: `prctl(PR_SET_PDEATHSIG, SIGKILL)` in the child before it runs the program, so the kernel kills it when the
  parent dies, whatever the program is (llama-bench too). It fires when the *thread* that started the child ends, so
  children are started from long-lived threads only (the main thread everywhere today).
- Every POSIX system (macOS, BSDs, and as a second guard on Linux): a lifeline pipe. The parent keeps the write end
  and never writes; the kernel closes it when the parent process is gone, however it ended. A Python child started
  with `lifeline=True` watches the read end (`watch_parent`, called first thing in the child) and exits when it
  closes. (Windows has neither; there the child still ends on Ctrl-C and SIGTERM, through the caller.)

A program that cannot start (not executable, not a program for this machine) is a UserError naming it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence

from malhae.errors import UserError

LIFELINE_ENV = "MALHAE_LIFELINE_FD"
_PR_SET_PDEATHSIG = 1


def _die_with(parent: int) -> Callable[[], None] | None:
    """A preexec function that ties the child to `parent` on Linux; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:  # runs in the child between fork and exec: only async-signal-safe work
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def popen(cmd: Sequence[str], *, lifeline: bool = False, env: dict[str, str] | None = None,
          **kwargs) -> subprocess.Popen:
    """subprocess.Popen, with the child tied to this process (see the module's docstring)."""
    env = dict(os.environ if env is None else env)
    read_end = write_end = None
    if lifeline and os.name == "posix":  # Windows cannot pass a pipe by number; its children end with Ctrl-C only
        read_end, write_end = os.pipe()
        os.set_inheritable(read_end, True)
        env[LIFELINE_ENV] = str(read_end)
        kwargs["pass_fds"] = (*kwargs.get("pass_fds", ()), read_end)
    try:
        try:
            proc = subprocess.Popen(list(cmd), env=env, preexec_fn=_die_with(os.getpid()), **kwargs)
        except BaseException:
            if write_end is not None:
                os.close(write_end)
            raise
    except PermissionError:
        raise UserError(f"cannot run {cmd[0]}: it is not executable (chmod +x it, or give the right file)") from None
    except FileNotFoundError:
        raise UserError(f"cannot run {cmd[0]}: no such program") from None
    except OSError as e:
        raise UserError(f"cannot run {cmd[0]}: {e.strerror or e} (is it a program built for this machine?)"
                        ) from None
    finally:
        if read_end is not None:
            os.close(read_end)  # the child has its copy; the parent keeps only the write end
    if write_end is not None:
        _close_after(proc, write_end)
    return proc


def _close_after(proc: subprocess.Popen, fd: int) -> None:
    """Close the lifeline's write end once the child has been waited for (else one fd per child would leak)."""
    wait = proc.wait
    open_fd = [fd]

    def wait_and_close(timeout: float | None = None) -> int:
        code = wait(timeout)
        if open_fd:  # once: a second close could hit an fd reused since
            with contextlib.suppress(OSError):
                os.close(open_fd.pop())
        return code

    proc.wait = wait_and_close  # type: ignore[method-assign]


def run(cmd: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run's capture, through `popen`: the child is killed if this process is interrupted or dies."""
    input_ = kwargs.pop("input", None)
    with popen(cmd, **kwargs) as proc:
        try:
            stdout, stderr = proc.communicate(input_)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def watch_parent() -> None:
    """In a child started with `lifeline=True`: exit at once when the parent is gone (the pipe's write end closed).

    A daemon thread blocks on the read end; read returns b"" only when every write end is closed, i.e. the parent
    process has ended. os._exit, because the main thread may be deep inside llama.cpp and cannot be interrupted."""
    raw = os.environ.get(LIFELINE_ENV)
    if not raw:
        return
    fd = int(raw)

    def watch() -> None:
        with contextlib.suppress(OSError):
            while os.read(fd, 1):
                pass
        os._exit(1)

    threading.Thread(target=watch, name="malhae-lifeline", daemon=True).start()
