"""`malhae serve` against what browsers and careless clients send: foreign pages (Origin), DNS rebinding (Host), paths
that must not leak, the access log, a client gone mid-body, the extension fields benchmark clients send, Ollama's
per-message images, models.retrieve, and a chat template that fails. Real HTTP on 127.0.0.1, the demo model."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import gguf
import pytest

pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from helpers import serving  # noqa: E402
from test_serve import request as call  # noqa: E402

from malhae.convert.rewrite import copy_gguf  # noqa: E402
from malhae.serve.guard import Hosts, origin_allowed  # noqa: E402
from malhae.store import models  # noqa: E402

DEMO = models.demo_model()
ASK = {"prompt": "a", "max_tokens": 2}
# greedy, the demo model ends this answer with its end token after 5 tokens (see test_ignore_eos_and_min_tokens)
EARLY_END = {"prompt": "대한민국은", "max_tokens": 20, "temperature": 0}


@pytest.fixture(scope="module")
def demo():
    with serving(DEMO, parallel=2) as server:
        yield server


def message(out: object) -> str:
    """The one-line error message of an OpenAI- or Ollama-shaped error body."""
    error = out["error"]
    text = error["message"] if isinstance(error, dict) else error
    assert isinstance(text, str) and text and "\n" not in text, out
    return text


# --- 1. web pages of other sites ------------------------------------------------------------------------------------

def test_a_foreign_page_is_refused_whatever_it_sends(demo):
    """A text/plain POST is a 'simple' request: a browser sends it from any page without a preflight."""
    evil = {"Origin": "http://evil.example", "Content-Type": "text/plain"}
    status, _, out = call(demo, "POST", "/v1/completions", ASK, evil)
    assert status == 403, out
    assert "http://evil.example" in message(out) and "--allow-origin" in message(out)
    assert out["error"]["code"] == "origin_not_allowed"
    assert call(demo, "GET", "/v1/models", headers=evil)[0] == 403
    assert call(demo, "GET", "/health", headers=evil)[0] == 403
    status, _, out = call(demo, "POST", "/api/generate", {"prompt": "a", "stream": False}, evil)
    assert status == 403 and "--allow-origin" in out["error"]  # Ollama's shape under /api/
    status, _, out = call(demo, "POST", "/v1/completions", ASK, {"Origin": "null"})  # a sandboxed page, a file
    assert status == 403 and message(out).endswith("--allow-origin * (any page: it names no site)"), out
    # no Origin (curl, SDKs) and the server's own origin pass
    assert call(demo, "POST", "/v1/completions", ASK)[0] == 200
    assert call(demo, "POST", "/v1/completions", ASK, {"Origin": f"http://127.0.0.1:{demo.port}"})[0] == 200


def test_allowed_origins_keep_cors_working():
    page = "http://localhost:3000"
    preflight = {"Origin": page, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers":
                 "content-type"}
    with serving(DEMO, parallel=1, allow_origins=(page,)) as server:
        status, headers, _ = call(server, "OPTIONS", "/v1/completions", headers=preflight)
        assert status == 200 and headers.get("access-control-allow-origin") == page
        status, headers, _ = call(server, "POST", "/v1/completions", ASK, {"Origin": page, "Content-Type":
                                                                             "text/plain"})
        assert status == 200 and headers.get("access-control-allow-origin") == page
        assert call(server, "POST", "/v1/completions", ASK, {"Origin": "http://localhost:4000"})[0] == 403
    with serving(DEMO, parallel=1, allow_origins=("*",)) as server:
        assert call(server, "POST", "/v1/completions", ASK, {"Origin": "http://anyone.example"})[0] == 200


def test_origin_rule():
    assert origin_allowed("http://127.0.0.1:8080", "127.0.0.1:8080", ())
    assert origin_allowed("HTTP://LocalHost:8080/", "localhost:8080", ())
    assert not origin_allowed("http://127.0.0.1:9999", "127.0.0.1:8080", ())
    assert not origin_allowed("http://evil.example", None, ())
    assert origin_allowed("https://app.example", "127.0.0.1:8080", ("https://app.example",))
    assert origin_allowed("chrome-extension://abc", "127.0.0.1:8080", ("*",))


# --- 2. DNS rebinding -----------------------------------------------------------------------------------------------

def test_a_rebound_host_is_refused_before_anything_else(demo):
    rebound = {"Host": f"attacker.example:{demo.port}"}
    status, _, out = call(demo, "POST", "/v1/completions", ASK, rebound)
    assert status == 403, out
    assert "attacker.example" in message(out) and "--allow-host attacker.example" in message(out)
    assert out["error"]["code"] == "host_not_allowed"
    assert call(demo, "GET", "/health", headers=rebound)[0] == 403
    status, _, out = call(demo, "GET", "/api/tags", headers=rebound)
    assert status == 403 and "--allow-host" in out["error"]
    for host in (f"localhost:{demo.port}", f"127.0.0.1:{demo.port}", f"[::1]:{demo.port}", "127.0.0.2",
                 f"LOCALHOST.:{demo.port}", "app.localhost"):
        assert call(demo, "GET", "/health", headers={"Host": host})[0] == 200, host


def test_the_host_check_runs_before_the_key_and_cors():
    with serving(DEMO, parallel=1, api_key="k", allow_origins=("*",), allow_hosts=("my-box.lan",)) as server:
        status, headers, out = call(server, "GET", "/v1/models", headers={"Host": "attacker.example",
                                                                         "Origin": "http://attacker.example"})
        assert status == 403 and out["error"]["code"] == "host_not_allowed"
        assert "access-control-allow-origin" not in headers
        key = {"Authorization": "Bearer k"}
        assert call(server, "GET", "/v1/models", headers={"Host": f"my-box.lan:{server.port}", **key})[0] == 200
        assert call(server, "GET", "/v1/models", headers={"Host": "my-box.lan"})[0] == 401  # then the key
    with serving(DEMO, parallel=1, allow_hosts=("*",)) as server:
        assert call(server, "GET", "/health", headers={"Host": "anything.example"})[0] == 200


def test_a_bad_allow_host_is_one_line():
    out = subprocess.run([sys.executable, "-m", "malhae", "serve", "--port", "0", "-m", str(DEMO), "--allow-host",
                          "http://my-box.lan:8080/"], capture_output=True, text=True, timeout=60)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].startswith("malhae: error: --allow-host 'http://my-box.lan:8080/': give a host name"), out.stderr


def test_host_rule_by_bound_address():
    loopback = Hosts("127.0.0.1")
    assert loopback.allows(None)  # HTTP/1.0 without Host: no browser
    assert not loopback.allows("192.168.1.5:8080")  # not this server's address
    assert not loopback.allows("attacker.example")
    assert loopback.allows("box.local") and loopback.allows("host.docker.internal")
    assert loopback.allows(socket.gethostname())
    assert loopback.allows("[::ffff:127.0.0.1]:80")
    everywhere = Hosts("0.0.0.0")
    assert everywhere.allows("192.168.1.5:8080") and everywhere.allows("[fe80::1]:8080")  # an address is not rebound
    assert not everywhere.allows("attacker.example:8080")
    one = Hosts("10.1.2.3", ("gpu.example.com",))
    assert one.allows("10.1.2.3:8080") and one.allows("GPU.example.com")
    assert not one.allows("10.1.2.4")


# --- 3. paths -------------------------------------------------------------------------------------------------------

def test_no_answer_reveals_where_the_model_lies(tmp_path):
    where = tmp_path / "secret-store-dir"
    where.mkdir()
    path = where / "m.gguf"
    shutil.copyfile(DEMO, path)
    with serving(path, parallel=1) as server:
        bodies = [call(server, "GET", "/v1/models")[2], call(server, "GET", "/v1/models/m")[2],
                  call(server, "POST", "/api/show", {"model": "m"})[2], call(server, "GET", "/api/tags")[2],
                  call(server, "GET", "/api/ps")[2]]
    for body in bodies:
        text = json.dumps(body, ensure_ascii=False)
        assert str(tmp_path) not in text and "secret-store-dir" not in text, text[:300]
    assert bodies[0]["data"][0]["meta"]["file"] == "m.gguf"
    assert bodies[2]["modelfile"] == "FROM m.gguf\n"


# --- 4. access log, 5. a client gone mid-body ----------------------------------------------------------------------

def _serve(*args: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "malhae", "serve", "--port", "0", "--parallel", "1", "--ctx", "256",
                             "--threads", "1", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ)
    port = None
    end = time.monotonic() + 60
    while time.monotonic() < end:
        line = proc.stderr.readline()
        found = re.search(r"serving on http://127\.0\.0\.1:(\d+)", line)
        port = int(found.group(1)) if found else port
        if "ready:" in line or not line:
            break
    assert port is not None, "the server did not start"
    return proc, port


def _stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=20)[1]
    finally:
        proc.kill()


LOG_LINE = re.compile(r'^\[malhae\] \d{4}/\d\d/\d\d - \d\d:\d\d:\d\d \| (\d{3}) \| +[\d.]+(ms|s) \| +127\.0\.0\.1 \| '
                      r'(\S+) "(.*)"$')


def test_access_log_one_line_per_request_and_quiet():
    proc, port = _serve()
    try:
        server = type("S", (), {"port": port})()
        call(server, "GET", "/health")
        call(server, "POST", "/v1/completions", ASK)
        call(server, "GET", "/v1/x%0A[malhae]%20forged%1b[31m")  # a path that tries to forge a line and colour it
        call(server, "GET", "/health", headers={"Host": "attacker.example"})
    finally:
        err = _stop(proc)
    lines = [m.groups() for m in map(LOG_LINE.match, err.splitlines()) if m]
    assert [(s, method, path) for s, _, method, path in lines] == [
        ("200", "GET", "/health"), ("200", "POST", "/v1/completions"),
        ("404", "GET", "/v1/x\\n[malhae] forged\\x1b[31m"), ("403", "GET", "/health")], err
    assert "\x1b" not in err and "Traceback" not in err
    proc, port = _serve("--quiet")
    try:
        call(type("S", (), {"port": port})(), "GET", "/health")
    finally:
        err = _stop(proc)
    assert "[malhae]" not in err and "/health" not in err


def test_a_client_gone_mid_body_is_one_log_line_and_leaks_nothing(capfd):
    with serving(DEMO, parallel=1, queue=0, access_log=True) as server:
        for path in ("/v1/completions", "/api/chat"):
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         "Content-Length: 1000\r\n\r\n".encode() + b'{"prompt":')
            time.sleep(0.1)
            sock.close()
        err, end = "", time.monotonic() + 10
        while err.count('| 499 |') < 2 and time.monotonic() < end:
            time.sleep(0.05)
            err += capfd.readouterr().err
        # the one slot and the queue of 0 are free: a request is answered at once
        assert call(server, "POST", "/v1/completions", ASK)[0] == 200
        assert call(server, "GET", "/health")[2]["slots_busy"] == 0
    err += capfd.readouterr().err
    assert err.count("| 499 |") == 2, err
    assert "Traceback" not in err and "ClientDisconnect" not in err, err


# --- 6. fields benchmark clients send -------------------------------------------------------------------------------

def test_ignore_eos_and_min_tokens(demo):
    def complete(**extra) -> dict:
        status, _, out = call(demo, "POST", "/v1/completions", EARLY_END | extra)
        assert status == 200, out
        return out["choices"][0] | {"tokens": out["usage"]["completion_tokens"]}

    plain = complete()
    assert plain["finish_reason"] == "stop" and plain["stop_reason"] is None and plain["tokens"] < 12  # end token
    on = complete(ignore_eos=True)
    assert on["finish_reason"] == "length" and on["tokens"] == 20 and on["text"].startswith(plain["text"])
    held = complete(min_tokens=12)
    assert held["tokens"] >= 12 and held["text"].startswith(plain["text"])
    assert complete(min_tokens=2) == plain  # past min_tokens the end token ends it again
    # a stop text inside the first min_tokens tokens does not end the answer; one after them does
    first_word = plain["text"].strip()[:2]
    assert complete(stop=[first_word])["tokens"] <= 2
    late = complete(stop=[first_word, "다"], min_tokens=3)
    assert late["tokens"] >= 3 and first_word in late["text"] and late["finish_reason"] == "stop"
    chat = {"messages": [{"role": "user", "content": "대한민국의 주권은 누구에게 있나요?"}], "max_tokens": 30,
            "temperature": 0}
    status, _, short = call(demo, "POST", "/v1/chat/completions", chat)
    assert status == 200 and short["choices"][0]["stop_reason"] is None  # ended by the end token
    status, _, longer = call(demo, "POST", "/v1/chat/completions", chat | {"ignore_eos": True})
    assert status == 200 and longer["usage"]["completion_tokens"] > short["usage"]["completion_tokens"]
    status, _, held = call(demo, "POST", "/v1/chat/completions", chat | {"min_tokens": 25})
    assert status == 200 and held["usage"]["completion_tokens"] >= 25


@pytest.mark.parametrize(("extra", "param"), [({"min_tokens": 21}, "min_tokens"), ({"min_tokens": -1}, "min_tokens"),
                                              ({"min_tokens": "3"}, "min_tokens"), ({"ignore_eos": "yes"},
                                                                                    "ignore_eos"),
                                              ({"max_new_tokens": 3}, "max_new_tokens")])
def test_extension_fields_are_checked(demo, extra, param):
    status, _, out = call(demo, "POST", "/v1/completions", EARLY_END | extra)
    assert status == 400 and out["error"]["param"] == param and param in message(out)


# --- 7. Ollama's per-message images ---------------------------------------------------------------------------------

def test_ollama_images_in_a_message_are_refused_as_at_the_top(demo):
    image = ["iVBORw0KGgo="]
    status, _, top = call(demo, "POST", "/api/generate", {"prompt": "x", "images": image, "stream": False})
    assert status == 400
    status, _, inner = call(demo, "POST", "/api/chat", {"messages": [{"role": "user", "content": "이게 뭐야?",
                                                                      "images": image}], "stream": False})
    assert status == 400 and message(inner) == message(top) and "images" in message(inner)
    status, _, out = call(demo, "POST", "/api/chat", {"messages": [{"role": "user", "content": "x", "images": []}],
                                                      "stream": False, "options": {"num_predict": 2}})
    assert status == 200, out  # an empty list changes nothing


# --- 8. models.retrieve ---------------------------------------------------------------------------------------------

def test_openai_models_retrieve(demo):
    client = openai.OpenAI(base_url=demo.url + "/v1", api_key="none", max_retries=0, timeout=60)
    got = client.models.retrieve(demo.options.model_id)
    assert got.id == demo.options.model_id and got.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    status, _, out = call(demo, "GET", "/v1/models/gpt-4o")
    assert status == 404 and out["error"]["code"] == "model_not_found" and "gpt-4o" in message(out)


# --- 9. a chat template that fails ----------------------------------------------------------------------------------

def test_a_failing_chat_template_is_a_500_with_its_line(tmp_path, capfd):
    path = copy_gguf(DEMO, tmp_path / "raises.gguf",
                     fields={gguf.Keys.Tokenizer.CHAT_TEMPLATE: '{{ raise_exception("boom") }}'})
    with serving(path, parallel=1) as server:
        status, _, out = call(server, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})
        assert status == 500 and "boom" in message(out) and out["error"]["code"] == "template_error"
        status, _, out = call(server, "POST", "/api/chat", {"messages": [{"role": "user", "content": "x"}],
                                                            "stream": False})
        assert status == 500 and "boom" in message(out)
        status, _, out = call(server, "POST", "/api/generate", {"prompt": "x", "stream": False})
        assert status == 500 and "boom" in message(out)
        assert call(server, "GET", "/health")[2]["status"] == "ok"
    assert "Traceback" not in capfd.readouterr().err
