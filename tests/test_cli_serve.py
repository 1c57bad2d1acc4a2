"""`malhae serve` as a user starts it: a real process, its one-line errors, its warning, its shutdown."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from malhae.store import models

pytest.importorskip("uvicorn")


def start(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "malhae", "serve", "--port", "0", "--parallel", "1", "--ctx", "256",
                             "--threads", "1", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ | (env or {}))


def wait_for(proc: subprocess.Popen, pattern: str, timeout: float = 60) -> tuple[re.Match, str]:
    seen = ""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        line = proc.stderr.readline()
        if not line:
            break
        seen += line
        m = re.search(pattern, line)
        if m:
            return m, seen
    raise AssertionError(f"{pattern!r} not printed; got:\n{seen}")


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "malhae", "serve", *args], capture_output=True, text=True, timeout=60,
                          env=os.environ | (env or {}))


def test_serves_then_stops_on_sigterm():
    proc = start()
    try:
        m, _ = wait_for(proc, r"serving on http://127\.0\.0\.1:(\d+)")
        port = int(m.group(1))
        wait_for(proc, r"ready: \d+ models? \(GET /api/tags\), each kept 5m after its last request")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as resp:
            assert json.loads(resp.read())["models_loaded"] == 0  # the store: nothing loads before it is asked for
        body = json.dumps({"prompt": "대한민국은", "max_tokens": 3, "temperature": 0}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:  # no model named: the default (here the demo)
            answer = json.loads(resp.read())
            assert answer["choices"][0]["text"] and answer["model"] == "demo"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        proc.kill()


def test_open_host_without_key_warns_and_key_from_environment_is_required():
    proc = start("--host", "0.0.0.0")
    try:
        _, seen = wait_for(proc, r"serving on")
        assert "warning: serving on 0.0.0.0 without --api-key" in seen
    finally:
        proc.kill()
        proc.wait()
    proc = start("--host", "0.0.0.0", env={"MALHAE_API_KEY": "k3y"})
    try:
        m, seen = wait_for(proc, r"serving on http://0\.0\.0\.0:(\d+)")
        assert "warning" not in seen
        wait_for(proc, "ready")
        url = f"http://127.0.0.1:{m.group(1)}/v1/models"
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(url, timeout=10)
        assert caught.value.code == 401
        with urllib.request.urlopen(urllib.request.Request(url, headers={"Authorization": "Bearer k3y"}),
                                    timeout=10) as resp:
            assert json.loads(resp.read())["data"]
    finally:
        proc.kill()
        proc.wait()


def test_port_in_use_is_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = run("--port", str(port))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (f"malhae: error: cannot listen on 127.0.0.1:{port}: Address "
                                                   "already in use; choose another with --port")
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(("args", "says"), [
    (["--parallel", "0"], "--parallel 0: give 1 to 64 slots"),
    (["--parallel", "100000"], "--parallel 100000: give 1 to 64 slots"),
    (["--port", "70000"], "--port 70000: a port is a whole number from 0 to 65535"),
    (["--queue", "-1"], "--queue -1: give 0 to 4096"),
    (["--api-key", " "], "--api-key is empty"),
    (["--threads", "0"], "threads must be"),
    (["--ctx", "5"], "ctx must be"),
    (["--host", "no.such.host.invalid"], "cannot serve on host 'no.such.host.invalid'"),
    (["--template", "nope"], "unknown template 'nope'"),
    (["--allow-origin", "localhost:3000/app"], "--allow-origin 'localhost:3000/app': give a page's origin"),
    (["-m", "/nonexistent/m.gguf"], "model file /nonexistent/m.gguf does not exist"),
])
def test_bad_flags_are_one_line(args, says):
    model = [] if "-m" in args else ["-m", str(models.demo_model())]  # no note about the demo before the error
    out = run("--port", "0", *model, *args)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("malhae: error: ") and says in lines[0], out.stderr


def test_a_broken_model_file_is_one_line_before_serving(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 20)
    out = run("--port", "0", "-m", str(bad))
    assert out.returncode == 2 and "serving on" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("malhae: error: ")


def test_without_the_extra_says_what_to_install():
    code = ("import sys; sys.modules['uvicorn'] = None; from app.cli import main; "
            "sys.exit(main(['serve']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip() == ("malhae: error: `malhae serve` needs the server extra (uvicorn is missing): "
                                  "pip install 'malhae[serve]'")
