"""chat, ask, complete and eval against a server (`--endpoint`): `malhae serve` started here on 127.0.0.1 gives the
same answers and scores as the local engine on the same GGUF, and every failure a network brings is one line.

Real sockets throughout: a real `malhae serve`, a closed port, a port that never answers, and small HTTP servers
written here for what a healthy malhae serve never does (401 from a proxy, 500, HTML, a stream cut in the middle,
another kind of server), so the client's handling of each is exercised, not imagined.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from malhae.runtime.settings import LoadOptions

pytest.importorskip("uvicorn")

from helpers import one_error_line, serving  # noqa: E402

from malhae.errors import UserError  # noqa: E402
from malhae.eval.loglik import Scorer  # noqa: E402
from malhae.eval.remote import RemoteScorer  # noqa: E402
from malhae.runtime import remote  # noqa: E402
from malhae.runtime.endpoint import Endpoint  # noqa: E402
from malhae.runtime.llama import Model  # noqa: E402
from malhae.runtime.settings import Sampling  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BILL = ROOT / "models" / "data" / "ko-public-domain" / "bills" / "1809899.txt"
PROMPTS = ["대한민국의 주권은", "모든 국민은 법률이 정하는 바에 의하여", "국회는"]
QUESTIONS = ["대한민국의 수도는 어디인가요?", "국회의 권한은 무엇인가요?"]


@pytest.fixture(scope="module")
def demo(demo_path):
    with serving(demo_path, parallel=2, n_ctx=1024) as server:
        yield server


def url(server) -> str:
    return server.url + "/v1"


def malhae(*args: str, stdin: bytes | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("MALHAE_ENDPOINT", "MALHAE_API_KEY")}
    return subprocess.run([sys.executable, "-m", "malhae", *args], input=stdin, capture_output=True, cwd=ROOT,
                          timeout=120, env=clean | (env or {}))


def result(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr.decode()
    return json.loads(proc.stdout)


# --- the same answers --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, texts", [("complete", PROMPTS), ("ask", QUESTIONS)])
def test_greedy_answers_equal_the_local_engine(demo, demo_path, kind, texts):
    for text in texts:
        flags = (kind, text, "--temperature", "0", "-n", "48", "--json")
        here = result(malhae(*flags, "-m", str(demo_path)))
        there = result(malhae(*flags, "--endpoint", url(demo)))
        assert there["text"] == here["text"] and here["text"].strip()
        assert there["stats"]["generated_tokens"] == here["stats"]["generated_tokens"] > 0
        assert there["stats"]["prompt_tokens"] == here["stats"]["prompt_tokens"]
        assert there["stats"]["stop_reason"] == here["stats"]["stop_reason"]
        assert there["endpoint"] == url(demo) and there["template"] == here["template"]


def test_a_stop_string_ends_the_remote_answer_as_the_local_one(demo, demo_path):
    flags = ("complete", PROMPTS[0], "--temperature", "0", "-n", "48", "--stop", "모든", "--json")
    here = result(malhae(*flags, "-m", str(demo_path)))
    there = result(malhae(*flags, "--endpoint", url(demo)))
    assert "모든" not in there["text"] and there["text"] == here["text"]
    assert there["stats"]["stop_reason"] == here["stats"]["stop_reason"] == "stop"


def test_remote_chat_lets_the_server_frame_the_question(demo, demo_path):
    flags = ("ask", QUESTIONS[0], "--temperature", "0", "-n", "40", "--json")
    here = result(malhae(*flags, "-m", str(demo_path)))
    there = result(malhae(*flags, "--endpoint", url(demo), "--remote-chat"))
    assert there["text"] == here["text"]  # malhae serve frames it with the same template


def test_chat_over_an_endpoint_equals_the_local_chat(demo, demo_path):
    lines = "국회는 무엇을 하나요?\n대통령의 임기는?\n헌법 개정은 어떻게 하나요?\n".encode()
    here = malhae("chat", "--temperature", "0", "-m", str(demo_path), stdin=lines)
    there = malhae("chat", "--temperature", "0", "--endpoint", url(demo), stdin=lines)
    assert here.returncode == there.returncode == 0, there.stderr.decode()
    assert there.stdout == here.stdout and len(here.stdout.decode().strip().splitlines()) >= 3
    err = there.stderr.decode()
    assert f"malhae at {url(demo)}" in err and "template base" in err
    framed = malhae("chat", "--temperature", "0", "--endpoint", url(demo), "--remote-chat", stdin=lines)
    assert framed.stdout == here.stdout  # the server's template is the same one, applied to the messages


def test_chat_commands_on_an_endpoint(demo):
    lines = b"\xea\xb5\xad\xed\x9a\x8c\xeb\x8a\x94?\n/stats\n/model\n/set ctx 512\n/model nope\n/show\n"
    proc = malhae("chat", "--temperature", "0", "--endpoint", url(demo), stdin=lines)
    assert proc.returncode == 0
    out = proc.stdout.decode() + proc.stderr.decode()
    assert f"* {demo.options.model_id} (1024 tokens)" in out  # /model lists /v1/models
    assert "measured here, over the network" in out  # /stats
    assert "the context is the server's (1024 tokens)" in out
    assert f"has no model 'nope'; it serves: {demo.options.model_id}" in out
    assert f"{demo.options.model_id} — malhae at {url(demo)}" in out  # /show


def test_endpoint_from_the_environment_and_the_settings_file(demo, demo_path, tmp_path):
    flags = ("complete", PROMPTS[2], "--temperature", "0", "-n", "8", "--json")
    from_env = result(malhae(*flags, env={"MALHAE_ENDPOINT": url(demo)}))
    assert from_env["endpoint"] == url(demo)
    config = tmp_path / "config.toml"
    config.write_text(f'endpoint = "{demo.url}"\nendpoint_timeout = 30\n')  # no /v1: added
    from_file = result(malhae(*flags, env={"MALHAE_CONFIG": str(config)}))
    assert from_file["endpoint"] == url(demo) and from_file["text"] == from_env["text"]
    local = result(malhae(*flags, "--endpoint", "local", "-m", str(demo_path), env={"MALHAE_CONFIG": str(config)}))
    assert "endpoint" not in local and local["text"] == from_env["text"]


def test_local_only_flags_are_named_not_silently_dropped(demo):
    proc = malhae("complete", "x", "-n", "2", "--threads", "1", "--gpu-layers", "0", "--endpoint", url(demo))
    assert proc.returncode == 0
    assert "--threads and --gpu-layers apply to a local model" in proc.stderr.decode()


# --- scores ------------------------------------------------------------------------------------------------------

def test_eval_kobest_over_an_endpoint_equals_the_local_scores(demo, demo_path):
    flags = ("eval", "kobest", "--tasks", "copa,boolq", "--shots", "0,1", "--json")
    here = result(malhae(*flags, str(demo_path)))
    there = result(malhae(*flags, "--endpoint", url(demo)))
    for a, b in zip(here["results"], there["results"], strict=True):
        assert (a["task"], a["shots"], a["n"], a["f1"], a["acc"]) == (b["task"], b["shots"], b["n"], b["f1"], b["acc"])
    assert there["model"] == f"{demo.options.model_id} at {url(demo)}"


def test_remote_log_likelihoods_equal_local_ones_per_choice(demo, demo_path):
    backend = remote.RemoteBackend(Endpoint.parse(url(demo)))
    scorer = RemoteScorer(backend)
    with Model(demo_path) as model, Scorer(model, max_length=scorer.max_length) as local:
        pairs = [("대한민국의 주권은", [" 국민에게 있다.", " 대통령에게 있다.", " 국회에 있다."]),
                 ("모든 국민은", [" 인간으로서의 존엄과 가치를 가진다.", " 세금을 낸다."])]
        for context, choices in pairs:
            ctx_tokens = model.tokenize(context)
            assert scorer.tokenize(context) == ctx_tokens  # the server's tokens are the local ones
            conts = [model.tokenize(c) for c in choices]
            for a, b in zip(local.score(ctx_tokens, conts), scorer.score(ctx_tokens, conts), strict=True):
                assert b.loglik == pytest.approx(a.loglik, abs=2e-4) and b.greedy == a.greedy
        # the harness's left truncation: a context longer than the window is cut the same way on both sides
        long_context = model.tokenize("대한민국 헌법 " * 700)
        assert len(long_context) > scorer.max_length
        for a, b in zip(local.score(long_context, conts), scorer.score(long_context, conts), strict=True):
            # a thousand tokens of F16 K/V, evaluated in other batches on the two sides: rounding, 3e-5 measured
            assert b.loglik == pytest.approx(a.loglik, rel=2e-4)


def test_eval_ppl_over_an_endpoint_equals_the_local_perplexity(demo, demo_path):
    flags = ("eval", "ppl", "--text", str(BILL), "--ctx", "128", "--json")
    here = result(malhae(*flags, str(demo_path)))
    there = result(malhae(*flags, "--endpoint", url(demo)))
    assert there["tokens_scored"] == here["tokens_scored"] and there["windows"] == here["windows"]
    assert there["ppl"] == pytest.approx(here["ppl"], rel=1e-4)
    too_long = malhae("eval", "ppl", "--text", str(BILL), "--ctx", "1024", "--endpoint", url(demo))
    assert "does not fit the server's context of 1024 tokens" in one_error_line(too_long)


# --- sampling and stopping -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def endless(endless_path):
    with serving(endless_path, parallel=1, n_ctx=4096) as server:
        yield server


def _same_draws(engine, backend, prompt: str, base: Sampling, variants: dict) -> None:
    from dataclasses import replace

    def both(s: Sampling) -> str:
        here = "".join(engine.generate(prompt, s))
        there = "".join(backend.generate(prompt, s))
        assert there == here
        return there

    first = both(base)
    for key, value in variants.items():
        assert both(replace(base, **{key: value})) != first, key


def test_every_sampling_setting_reaches_the_server(endless, endless_path, demo, demo_path):
    """With the same seed, malhae serve draws the local engine's tokens; and changing any one setting changes what
    both draw, so each setting did arrive (an ignored one would leave the remote text as it was). Sampling is
    shown on a random-weight model (many likely tokens), the penalties on the demo model's greedy answer (it
    repeats the constitution's words)."""
    from malhae.runtime.engine import Engine

    sampled = Sampling(temperature=1.2, top_k=50, top_p=0.95, min_p=0.02, seed=11, max_tokens=40)
    with Engine(LoadOptions(model=endless_path, ctx=512, threads=2)) as engine:
        _same_draws(engine, remote.RemoteBackend(Endpoint.parse(url(endless))), "대한민국 헌법", sampled,
                    {"temperature": 0.6, "top_k": 5, "top_p": 0.5, "min_p": 0.9, "seed": 12})
    penalised = Sampling(temperature=0, repeat_penalty=1.5, repeat_last_n=64, max_tokens=80)
    with Engine(LoadOptions(model=demo_path, ctx=512, threads=2)) as engine:
        _same_draws(engine, remote.RemoteBackend(Endpoint.parse(url(demo))),
                    "대한민국 헌법 제1조 대한민국은 민주공화국이다. 대한민국의 주권은 국민에게 있고,", penalised,
                    {"repeat_penalty": 1.0, "repeat_last_n": 4, "frequency_penalty": 1.0, "presence_penalty": 1.0})


def _busy(server) -> int:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return json.loads(data.split(b"\r\n\r\n", 1)[1])["slots_busy"]


def test_stopping_an_answer_tells_the_server(endless):
    """What Ctrl-C does in chat (the writer closes the generator): the connection closes and the server's slot is
    free again at once, not after 4,000 tokens."""
    backend = remote.RemoteBackend(Endpoint.parse(url(endless)))
    pieces = backend.generate("대한민국", Sampling(temperature=0, max_tokens=4000))
    got = [next(pieces) for _ in range(5)]
    assert all(got) and _busy(endless) == 1
    pieces.close()
    end = time.monotonic() + 10
    while _busy(endless) and time.monotonic() < end:
        time.sleep(0.05)
    assert _busy(endless) == 0
    assert backend.stats.stop_reason == "interrupted" and backend.stats.generated_tokens == 5


# --- what a network brings -----------------------------------------------------------------------------------

def test_a_closed_port_is_one_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connecting is refused
        line = one_error_line(malhae("ask", "질문", "--endpoint", f"http://127.0.0.1:{port}/v1"))
    assert f"cannot connect to http://127.0.0.1:{port}/v1: connection refused" in line


def test_a_host_that_does_not_exist_is_one_line():
    line = one_error_line(malhae("ask", "질문", "--endpoint", "http://no-such-host.invalid:8080/v1"))
    assert "cannot find host 'no-such-host.invalid'" in line


def test_a_server_that_stalls_times_out_with_the_url_and_the_timeout():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()  # the kernel accepts; nobody ever answers
        port = s.getsockname()[1]
        started = time.monotonic()
        line = one_error_line(malhae("complete", "x", "--endpoint", f"http://127.0.0.1:{port}/v1",
                                     "--timeout", "0.5"))
        assert time.monotonic() - started < 30
    assert f"no answer from http://127.0.0.1:{port}/v1/models within 0.5 s (timeout)" in line


def test_bad_urls_and_timeouts_are_refused():
    assert "give an http:// or https:// URL" in one_error_line(malhae("ask", "q", "--endpoint", "ftp://x/v1"))
    assert "without ?query" in one_error_line(malhae("ask", "q", "--endpoint", "http://x/v1?a=1"))
    assert "give seconds from 0.1" in one_error_line(malhae("ask", "q", "--endpoint", "http://x/v1",
                                                            "--timeout", "0"))
    assert "is for a remote model" in one_error_line(malhae("ask", "q", "--api-key", "k"))
    assert "is for a remote model" in one_error_line(malhae("ask", "q", "--remote-chat"))


def test_wrong_model_and_wrong_path_are_one_line(demo):
    line = one_error_line(malhae("ask", "q", "--endpoint", url(demo), "-m", "polyglot-ko-12.8b"))
    assert f"has no model 'polyglot-ko-12.8b'; it serves: {demo.options.model_id}" in line
    line = one_error_line(malhae("ask", "q", "--endpoint", demo.url + "/api/v2"))
    assert "/api/v2/models does not exist (404)" in line and "usually ends in /v1" in line


@pytest.fixture(scope="module")
def keyed(demo_path):
    with serving(demo_path, parallel=1, n_ctx=1024, api_key="sesame") as server:
        yield server


def test_the_api_key_from_the_flag_the_environment_or_the_variable_config_names(keyed, tmp_path):
    flags = ("complete", "국회는", "-n", "4", "--temperature", "0", "--endpoint", url(keyed))
    assert "it needs an API key: give it with --api-key or MALHAE_API_KEY" in one_error_line(malhae(*flags))
    assert "(401)" in one_error_line(malhae(*flags, "--api-key", "wrong"))
    assert "give the right key" in one_error_line(malhae(*flags, "--api-key", "wrong"))
    assert malhae(*flags, "--api-key", "sesame").returncode == 0
    assert malhae(*flags, env={"MALHAE_API_KEY": "sesame"}).returncode == 0
    config = tmp_path / "config.toml"
    config.write_text('api_key_env = "TEAM_KEY"\n')
    assert malhae(*flags, env={"MALHAE_CONFIG": str(config), "TEAM_KEY": "sesame"}).returncode == 0
    config.write_text('api_key = "sesame"\n')
    line = one_error_line(malhae(*flags, env={"MALHAE_CONFIG": str(config)}))
    assert "must not hold an API key" in line and 'api_key_env = "MALHAE_API_KEY"' in line


class Fake:
    """A small HTTP server answering each path with what a test says: (status, content type, body bytes), or a
    function that writes the answer itself. It records every request body."""

    def __init__(self, routes: dict) -> None:
        self.routes = routes
        self.bodies: list[tuple[str, dict]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else {}
                fake.bodies.append((self.path, body))
                route = fake.routes.get(self.path, (404, "application/json", b'{"error": {"message": "no"}}'))
                if callable(route):
                    route(self)
                    return
                status, kind, data = route
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> Fake:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def models_route(owner: str = "somebody", ctx: int | None = 512):
    card = {"id": "m", "object": "model", "owned_by": owner} | ({"context_length": ctx} if ctx else {})
    return (200, "application/json", json.dumps({"object": "list", "data": [card]}).encode())


def sse(*events: dict, done: bool = True) -> bytes:
    out = b"".join(b"data: " + json.dumps(e, ensure_ascii=False).encode() + b"\n\n" for e in events)
    return out + (b"data: [DONE]\n\n" if done else b"")


def chunk(text: str, finish: str | None = None) -> dict:
    return {"object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": finish}]}


def test_a_server_error_and_a_non_openai_server_are_one_line():
    error = (500, "application/json", b'{"error": {"message": "CUDA out of memory", "type": "server_error"}}')
    with Fake({"/v1/models": error}) as fake:
        line = one_error_line(malhae("ask", "q", "--endpoint", fake.url))
    assert f"the server at {fake.url} failed (500): CUDA out of memory" in line
    html = (200, "text/html", b"<!DOCTYPE html><html><body>router login</body></html>")
    with Fake({"/v1/models": html}) as fake:
        line = one_error_line(malhae("ask", "q", "--endpoint", fake.url))
    assert "did not answer like an OpenAI-compatible API (got '<!DOCTYPE html>" in line
    proxy = (401, "text/plain", b"Unauthorized")
    with Fake({"/v1/models": proxy}) as fake:
        line = one_error_line(malhae("ask", "q", "--endpoint", fake.url))
    assert "refused the request (401): Unauthorized; it needs an API key" in line


def test_a_stream_cut_in_the_middle_keeps_what_was_shown_then_says_so():
    def cut(handler):  # two pieces, then the connection drops: no [DONE], no finish_reason
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.end_headers()
        handler.wfile.write(sse(chunk("대한민국은 "), chunk("민주공화국"), done=False))
        handler.wfile.flush()
        handler.close_connection = True

    with Fake({"/v1/models": models_route(), "/v1/completions": cut}) as fake:
        proc = malhae("complete", "헌법 제1조", "--endpoint", fake.url)
        assert proc.stdout.decode() == "대한민국은 민주공화국\n"
        assert "was cut off" in one_error_line(proc)
        saved = Path(os.environ["MALHAE_HOME"]) / "cut.json"
        chat = malhae("chat", "--endpoint", fake.url, stdin=f"질문\n/save {saved}\n".encode())
        assert chat.returncode == 0 and "대한민국은 민주공화국" in chat.stdout.decode()
        assert "was cut off" in chat.stderr.decode() and "what was shown is kept" in chat.stderr.decode()
        turns = json.loads(saved.read_text())["turns"]
        assert turns[1] == {"role": "assistant", "text": "대한민국은 민주공화국"}


def test_another_servers_fields_and_the_settings_it_cannot_take():
    """An OpenAI-shaped server that is none of malhae, llama.cpp or vLLM: no /tokenize (the prompt goes as text),
    no top_k/min_p/repeat_penalty (named once, not sent), and the answer streams as usual."""
    answer = (200, "text/event-stream", sse(chunk("국민에게 "), chunk("있다."), chunk("", "stop")))
    with Fake({"/v1/models": models_route(), "/v1/completions": answer}) as fake:
        proc = malhae("complete", "대한민국의 주권은", "--endpoint", fake.url, "--seed", "3", "--json")
        out = result(proc)
        assert out["text"] == "국민에게 있다." and out["stats"]["stop_reason"] == "eos"
        err = proc.stderr.decode()
        assert err.count("does not take top_k 40, min_p 0.05, repeat_penalty 1.1: not applied") == 1
        assert "has no /tokenize" in err
        sent = [body for path, body in fake.bodies if path == "/v1/completions"][0]
        assert sent["prompt"] == "대한민국의 주권은" and sent["seed"] == 3 and sent["stream"] is True
        assert not {"top_k", "min_p", "repeat_penalty", "repeat_last_n"} & set(sent)


def test_each_kind_of_server_gets_the_names_it_understands():
    s = Sampling(temperature=0.5, top_k=0, top_p=0.9, min_p=0.1, repeat_penalty=1.2, repeat_last_n=32, seed=4,
                 frequency_penalty=0.5)
    fields, untaken = remote.request_fields(remote.LLAMA_CPP, s)
    assert fields == {"temperature": 0.5, "top_p": 0.9, "seed": 4, "frequency_penalty": 0.5, "top_k": 0,
                      "min_p": 0.1, "repeat_penalty": 1.2, "repeat_last_n": 32} and untaken == []
    fields, untaken = remote.request_fields(remote.VLLM, s)
    assert fields == {"temperature": 0.5, "top_p": 0.9, "seed": 4, "frequency_penalty": 0.5, "top_k": -1,
                      "min_p": 0.1, "repetition_penalty": 1.2} and untaken == ["repeat_last_n 32"]
    fields, untaken = remote.request_fields(remote.OPENAI, s)
    assert fields == {"temperature": 0.5, "top_p": 0.9, "seed": 4, "frequency_penalty": 0.5}
    assert untaken == ["min_p 0.1", "repeat_penalty 1.2"]


def test_scoring_on_llama_server_is_refused_naming_the_servers_that_can():
    with Fake({"/v1/models": models_route("llamacpp"), "/props": (404, "text/plain", b"")}) as fake:
        line = one_error_line(malhae("eval", "ppl", "--text", str(BILL), "--ctx", "64", "--endpoint", fake.url))
    assert "llama-server does not return a prompt's log-probabilities (echo)" in line
    assert "malhae serve or vLLM" in line


def test_a_server_that_ignores_echo_is_refused_not_misread():
    no_echo = (200, "application/json", json.dumps({"choices": [{"index": 0, "text": "x", "logprobs": {
        "tokens": ["x"], "token_logprobs": [-1.0], "top_logprobs": [{"x": -1.0}]}, "finish_reason": "length"}]}
    ).encode())
    tokens = (200, "application/json", b'{"tokens": [1, 2, 3, 4, 5, 6, 7, 8]}')
    with Fake({"/v1/models": models_route("vllm"), "/tokenize": tokens, "/v1/completions": no_echo}) as fake:
        backend = remote.RemoteBackend(Endpoint.parse(fake.url))
        with pytest.raises(UserError, match=r"did not return the prompt's log-probabilities \(echo\)"):
            RemoteScorer(backend).score([1, 2, 3], [[4, 5]])


def test_endpoint_urls():
    assert Endpoint.parse("gpu-box:8000").url == "http://gpu-box:8000/v1"
    assert Endpoint.parse("https://h/v1/").url == "https://h/v1"
    assert Endpoint.parse("http://h:1/api/openai/v1").root == "http://h:1"
    with pytest.raises(UserError, match="not a URL"):
        Endpoint.parse("http://h:port/v1")
    assert re.search("spans lines", str(pytest.raises(UserError, Endpoint.parse, "http://h", "a\nb").value))


def test_llama_server_end_tokens_and_its_chatml_fallback():
    """llama-server (as its source answers, common/chat.cpp and server-task.cpp): it counts the end token in
    completion_tokens and says how an answer ended only in `__verbose.stop_type` (asked with "verbose": true); and
    without a template in the GGUF, /props reports its chatml fallback, which is not the model's own."""
    final = chunk("", "stop") | {"usage": {"completion_tokens": 3, "prompt_tokens": 4},
                                 "__verbose": {"stop": True, "stop_type": "eos", "stopping_word": ""}}
    answer = (200, "text/event-stream", sse(chunk("국민에게 "), chunk("있다."), final))
    props = (200, "application/json", json.dumps({"chat_template": remote.LLAMA_CPP_FALLBACK, "bos_token": "",
                                                  "eos_token": "<|endoftext|>"}).encode())
    tokens = (200, "application/json", b'{"tokens": [11, 12, 13, 14]}')
    routes = {"/v1/models": models_route("llamacpp"), "/props": props, "/tokenize": tokens, "/v1/completions": answer}
    with Fake(routes) as fake:
        out = result(malhae("ask", "대한민국의 주권은?", "--endpoint", fake.url, "--json"))
        assert out["template"] == "base"  # by the model's name, not llama.cpp's chatml
        assert out["stats"]["stop_reason"] == "eos" and out["stats"]["generated_tokens"] == 2
        sent = [body for path, body in fake.bodies if path == "/v1/completions"][0]
        assert sent["verbose"] is True and sent["prompt"] == [11, 12, 13, 14]
        assert sent["repeat_penalty"] == 1.1 and sent["repeat_last_n"] == 64 and sent["top_k"] == 40
        tokenized = [body for path, body in fake.bodies if path == "/tokenize"][0]
        assert tokenized == {"content": tokenized["content"], "add_special": True, "parse_special": True}
        final["__verbose"] |= {"stop_type": "word", "stopping_word": "\n사용자:"}
        routes["/v1/completions"] = (200, "text/event-stream", sse(chunk("국민에게 "), chunk("있다."), final))
        out = result(malhae("ask", "대한민국의 주권은?", "--endpoint", fake.url, "--json"))
        assert out["stats"]["stop_reason"] == "stop" and out["stats"]["generated_tokens"] == 3


def test_requests_in_flight_keep_their_order_and_a_failure_stops_the_rest():
    from malhae.eval.remote import ordered_map

    started: list[int] = []

    def slow_square(x: int) -> int:
        started.append(x)
        time.sleep(0.05 * (x % 3))  # later items often finish first
        if x == 7:
            raise UserError("the server failed (500)")
        return x * x

    assert list(ordered_map(slow_square, range(7), 4)) == [x * x for x in range(7)]
    started.clear()
    with pytest.raises(UserError, match="500"):
        list(ordered_map(slow_square, range(40), 4))
    time.sleep(1.0)  # time enough for all 40 to start, were the workers not stopped
    assert len(started) < 20  # nothing new starts once the failure has been seen


def test_eval_concurrency_is_bounded_and_only_for_an_endpoint(demo):
    line = one_error_line(malhae("eval", "kobest", "--tasks", "copa", "--shots", "0", "--concurrency", "2"))
    assert "--concurrency is for a server's model" in line
    line = one_error_line(malhae("eval", "ppl", "--text", str(BILL), "--endpoint", url(demo), "--concurrency", "65"))
    assert "--concurrency 65: give 1 to 64" in line
    one = result(malhae("eval", "ppl", "--text", str(BILL), "--ctx", "128", "--json", "--endpoint", url(demo),
                        "--concurrency", "1"))
    many = result(malhae("eval", "ppl", "--text", str(BILL), "--ctx", "128", "--json", "--endpoint", url(demo),
                         "--concurrency", "8"))
    assert many["tokens_scored"] == one["tokens_scored"] and many["ppl"] == pytest.approx(one["ppl"], rel=1e-5)
