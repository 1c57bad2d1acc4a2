"""`malhae ps` and `malhae stop NAME` as a user runs them, against a real HTTP server on 127.0.0.1.

The server is a small stdlib http.server in a thread that answers /api/ps and /api/generate in the shapes `malhae
serve` sends (Ollama's, plus malhae's slots and state), records what it was sent, and can be told to fail."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from helpers import one_error_line

from malhae.errors import UserError
from malhae.serve import client, ps_view

MODELS = [
    {"name": "demo", "model": "demo", "size": 17684160, "size_vram": 0, "context_length": 2048,
     "details": {"format": "gguf", "family": "gptneox"}, "slots": 4, "slots_busy": 1, "state": "loaded"},
    {"name": "polyglot-ko-1.3b-q4_k_m", "model": "polyglot-ko-1.3b-q4_k_m", "size": 800_000_000,
     "size_vram": 520_000_000, "context_length": 4096, "expires_at": "0001-01-01T00:00:00Z", "details": {},
     "slots": 2, "slots_busy": 0, "state": "loaded"},
    {"name": "kullm-5.8b", "model": "kullm-5.8b", "size": 3_500_000_000, "size_vram": 3_500_000_000,
     "context_length": 2048, "expires_at": "2318-03-01T10:00:00.123456789+09:00", "details": {}, "slots": 1,
     "slots_busy": 1, "state": "loaded"},
    {"name": "koalpaca-12.8b", "model": "koalpaca-12.8b", "size": 7_000_000_000, "size_vram": 0,
     "expires_at": "2026-01-01T00:00:00Z", "slots": 4, "slots_busy": 0, "state": "loading"},  # no context yet
]


class Fake(ThreadingHTTPServer):
    """Answers with `answers[path]` = (status, body: bytes, content type); `seen` holds every request."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.answers: dict[str, tuple[int, bytes, str]] = {}
        self.seen: list[dict] = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def answer(self, path: str, status: int, body: object, kind: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.answers[path] = (status, data, kind)


class Handler(BaseHTTPRequestHandler):
    def _reply(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.server.seen.append({"method": self.command, "path": self.path, "headers": dict(self.headers),
                                 "body": self.rfile.read(length)})
        status, data, kind = self.server.answers.get(self.path, (404, b'{"error": "not found"}', "application/json"))
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _reply

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    srv = Fake()
    srv.answer("/api/ps", 200, {"models": []})
    srv.answer("/api/generate", 200, {"model": "demo", "created_at": "2026-12-07T17:35:00Z", "response": "",
                                      "done": True, "done_reason": "unload"})
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def malhae(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("MALHAE_ENDPOINT", "MALHAE_API_KEY")}
    return subprocess.run([sys.executable, "-m", "malhae", *args], capture_output=True, timeout=60,
                          env=clean | (env or {}))


def failed_line(proc: subprocess.CompletedProcess, code: int) -> str:
    """The one `malhae: error:` line of a command that failed with exit `code` (no traceback)."""
    if code == 2:
        return one_error_line(proc)
    err = proc.stderr.decode()
    assert proc.returncode == code and "Traceback" not in err, err
    [line] = [line for line in err.splitlines() if line.startswith("malhae: error:")]
    return line


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- ps -----------------------------------------------------------------------------------------------------------

def test_ps_shows_each_loaded_model_as_ollama_ps_does(server):
    soon = (datetime.now(timezone.utc) + timedelta(seconds=290)).isoformat().replace("+00:00", "Z")
    server.answer("/api/ps", 200, {"models": [MODELS[0] | {"expires_at": soon}, *MODELS[1:]]})
    proc = malhae("ps", "--url", server.url)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.decode().splitlines()
    assert lines[0].split() == ["NAME", "SIZE", "PROCESSOR", "CONTEXT", "SLOTS", "UNTIL"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert list(rows) == ["demo", "polyglot-ko-1.3b-q4_k_m", "kullm-5.8b", "koalpaca-12.8b"]
    for name, cells in {"demo": ["17.7 MB", "100% CPU", "2,048", "1/4 busy", "4 minutes from now"],
                        "polyglot-ko-1.3b-q4_k_m": ["0.80 GB", "35%/65% CPU/GPU", "4,096", "0/2 busy", "Forever"],
                        "kullm-5.8b": ["3.50 GB", "100% GPU", "1/1 busy", "Forever"],
                        "koalpaca-12.8b": ["7.00 GB", "100% CPU", " - ", "0/4 busy", "loading"]}.items():
        assert all(cell in rows[name] for cell in cells), (rows[name], cells)
    [request] = server.seen
    assert (request["method"], request["path"]) == ("GET", "/api/ps")
    assert "Authorization" not in request["headers"]  # no key set: none sent


def test_ps_json_is_the_servers_answer(server):
    server.answer("/api/ps", 200, {"models": MODELS})
    proc = malhae("ps", "--json", "--url", server.url + "/")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"models": MODELS}


def test_ps_with_nothing_loaded_says_so_in_one_line(server):
    proc = malhae("ps", "--url", server.url)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode() == f"no models loaded on {server.url}\n"
    proc = malhae("ps", "--url", server.url, "--json")
    assert json.loads(proc.stdout) == {"models": []}


def test_a_name_with_terminal_escapes_is_shown_without_them(server):
    server.answer("/api/ps", 200, {"models": [MODELS[0] | {"name": "evil\x1b]0;title\x07[red]x[/red]"}]})
    out = malhae("ps", "--url", server.url).stdout.decode()
    assert "\x1b" not in out and "\x07" not in out and "evil]0;title[red]x[/red]" in out


# --- stop ---------------------------------------------------------------------------------------------------------

def test_stop_sends_what_ollama_stop_sends(server):
    proc = malhae("stop", "demo", "--url", server.url)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode() == "stopped demo\n"
    [request] = server.seen
    assert (request["method"], request["path"]) == ("POST", "/api/generate")
    assert request["headers"]["Content-Type"] == "application/json"
    assert json.loads(request["body"]) == {"model": "demo", "keep_alive": 0}


def test_stop_of_a_model_not_loaded_shows_the_servers_404(server):
    server.answer("/api/generate", 404, {"error": "model 'nope' is not loaded"})
    line = failed_line(malhae("stop", "nope", "--url", server.url), 1)
    assert "stopping nope failed" in line and "404" in line and "model 'nope' is not loaded" in line


# --- where the server is, and its key -----------------------------------------------------------------------------

def test_malhae_endpoint_with_v1_is_the_servers_address(server):
    proc = malhae("ps", env={"MALHAE_ENDPOINT": server.url + "/v1/"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode() == f"no models loaded on {server.url}\n"
    assert [r["path"] for r in server.seen] == ["/api/ps"]
    dead = f"http://127.0.0.1:{free_port()}/v1"  # --url comes first
    assert malhae("stop", "demo", "--url", server.url, env={"MALHAE_ENDPOINT": dead}).returncode == 0
    assert malhae("ps", "--url", server.url.removeprefix("http://") + "/v1").returncode == 0  # host:port is http


def test_the_api_key_is_sent_and_a_refusal_names_malhae_api_key(server):
    assert malhae("ps", "--url", server.url, env={"MALHAE_API_KEY": "s3cret"}).returncode == 0
    assert malhae("stop", "demo", "--url", server.url, env={"MALHAE_API_KEY": "s3cret"}).returncode == 0
    assert [r["headers"].get("Authorization") for r in server.seen] == ["Bearer s3cret"] * 2
    server.answer("/api/ps", 401, {"error": {"message": "invalid API key", "type": "invalid_request_error"}})
    for env in ({}, {"MALHAE_API_KEY": "wrong"}):
        line = failed_line(malhae("ps", "--url", server.url, env=env), 2)
        assert "401" in line and "invalid API key" in line and "MALHAE_API_KEY" in line


# --- failures -----------------------------------------------------------------------------------------------------

def test_nothing_listening_is_one_line_that_says_how_to_start_one():
    url = f"http://127.0.0.1:{free_port()}"
    for args in (["ps"], ["stop", "demo"]):
        line = failed_line(malhae(*args, "--url", url), 2)
        assert f"no malhae server answers at {url}" in line and "malhae serve" in line and "--url" in line


def test_a_server_error_is_shown_without_its_control_characters(server):
    server.answer("/api/ps", 500, {"error": {"message": "boom\x1b[2J\x1b]0;pwned\x07\nsecond line\u202e"}})
    proc = malhae("ps", "--url", server.url)
    line = failed_line(proc, 1)
    assert "500" in line and "boom" in line and "second line" in line
    assert not any(c in proc.stderr.decode() for c in "\x1b\x07\u202e")
    with pytest.raises(UserError) as e:  # the client's own message, not only what the CLI's last line prints
        client.ps(server.url)
    assert "boom" in str(e.value) and not any(c in str(e.value) for c in "\x1b\x07\n\u202e")
    server.answer("/api/generate", 500, {"error": "unload\x1b[31m failed"})
    line = failed_line(malhae("stop", "demo", "--url", server.url), 1)
    assert "unload[31m failed" in line and "\x1b" not in line


def test_an_answer_that_is_not_a_malhae_servers_json_is_one_line(server):
    server.answer("/api/ps", 200, b"<html>welcome to nginx</html>", "text/html")
    line = failed_line(malhae("ps", "--url", server.url), 2)
    assert "did not answer like a malhae server" in line and "welcome to nginx" in line and "--url" in line
    server.answer("/api/ps", 200, {"models": "demo"})
    assert "did not answer like a malhae server" in failed_line(malhae("ps", "--url", server.url), 2)
    server.answer("/api/generate", 502, b"<html>Bad Gateway</html>", "text/html")
    line = failed_line(malhae("stop", "demo", "--url", server.url), 1)
    assert "502" in line and "Bad Gateway" in line and "malhae server" in line


def test_a_url_that_is_not_a_servers_address_is_one_line():
    for url in ("ftp://127.0.0.1:8080", "http://", "http://127.0.0.1:notaport", "http://127.0.0.1:8080/?x=1"):
        line = failed_line(malhae("ps", "--url", url), 2)
        assert "--url" in line and "e.g. --url http://127.0.0.1:8080" in line, url
    line = failed_line(malhae("ps", env={"MALHAE_ENDPOINT": "ftp://x"}), 2)
    assert "MALHAE_ENDPOINT" in line
    assert "give the name" in failed_line(malhae("stop", " ", "--url", "http://127.0.0.1:1"), 2)


def test_ps_and_stop_run_without_the_serve_extra(server):
    """They ask a server; they do not need the web stack that runs one (Starlette, uvicorn)."""
    server.answer("/api/ps", 200, {"models": MODELS[:1]})
    code = ("import sys; sys.modules.update(starlette=None, uvicorn=None); from malhae.cli.main import main; "
            f"sys.exit(main(['ps', '--url', {server.url!r}]) or main(['stop', 'demo', '--url', {server.url!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "demo" in proc.stdout and "stopped demo" in proc.stdout


def test_durations_read_as_ollamas():
    assert [ps_view.human_duration(s) for s in (0.5, 1, 59, 60, 299, 3599, 3600, 5400, 47 * 3600, 3 * 86400,
                                                20 * 86400, 90 * 86400, 800 * 86400)] == [
        "less than a second", "1 second", "59 seconds", "about a minute", "4 minutes", "59 minutes", "about an hour",
        "2 hours", "47 hours", "3 days", "2 weeks", "3 months", "2 years"]
    assert ps_view.processor(100, 0) == "100% CPU" and ps_view.processor(100, 100) == "100% GPU"
    assert ps_view.processor(100, 65) == "35%/65% CPU/GPU" and ps_view.processor(None, 0) == "-"
    now = datetime.now(timezone.utc)
    assert ps_view.until({"expires_at": (now - timedelta(seconds=1)).isoformat()}, now) == "stopping"  # past due
    assert ps_view.until({"expires_at": "soon"}, now) == ps_view.until({}, now) == "-"
