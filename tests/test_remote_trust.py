"""What a remote server says is checked, never trusted (issue 32): a server that streams past max_tokens or the
context is cut off at the client, an impossible or malformed answer is one line naming the server and the field, and
text from outside (a server's error, a model id) reaches the terminal without its control characters.

Small HTTP servers on 127.0.0.1 (tests/test_remote.py's Fake) play the misbehaving servers, and `python -m malhae`
runs in a subprocess, as a user runs it.
"""

from __future__ import annotations

import json
import re
import threading
import time

import pytest
from helpers import one_error_line
from test_remote import BILL, Fake, chunk, malhae, models_route, result, sse

from malhae import ui
from malhae.errors import UserError
from malhae.eval.remote import RemoteScorer
from malhae.runtime import remote
from malhae.runtime.endpoint import Endpoint
from malhae.runtime.settings import Sampling

ESCAPES = "\x1b]0;PWNED\x07\x1b[2J\x9b31m"  # retitle the window, clear the screen, a C1 CSI
CONTROL = {chr(c) for c in (*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F, *range(0x80, 0xA0))}  # all but \t \n


def clean(text: str) -> bool:
    return not set(text) & CONTROL


# --- a server that never stops -----------------------------------------------------------------------------------

class Endless:
    """A streamed answer that never ends: one numbered piece ("0 ", "1 ", …) every millisecond, max_tokens ignored,
    never a finish_reason. It gives up after `limit` pieces (so a client that never stops reading fails the test
    rather than hanging it) and records whether the client hung up before that."""

    def __init__(self, limit: int = 20_000) -> None:
        self.limit = limit
        self.dropped = threading.Event()
        self.sent = 0

    def __call__(self, handler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.end_headers()
        handler.close_connection = True
        try:
            for i in range(self.limit):
                handler.wfile.write(sse(chunk(f"{i} "), done=False))
                handler.wfile.flush()
                self.sent = i + 1
                time.sleep(0.001)
            handler.wfile.write(sse(chunk("", "stop")))
        except OSError:  # the client closed the connection
            self.dropped.set()


def test_ask_stops_reading_a_server_that_ignores_max_tokens():
    with Fake({"/v1/models": models_route(), "/v1/completions": Endless()}) as fake:
        out = result(malhae("ask", "x", "-n", "5", "--json", "--endpoint", fake.url))
        assert out["text"].split() == ["0", "1", "2", "3", "4"]
        assert out["stats"]["generated_tokens"] == 5 and out["stats"]["stop_reason"] == "length"
        proc = malhae("ask", "x", "-n", "5", "--endpoint", fake.url)
        assert proc.returncode == 0 and proc.stdout.decode() == "0 1 2 3 4 \n"


def test_the_chat_backend_stops_at_max_tokens_and_at_a_full_context_and_hangs_up():
    endless = Endless()
    with Fake({"/v1/models": models_route(ctx=64), "/v1/completions": endless}) as fake:
        backend = remote.RemoteBackend(Endpoint.parse(fake.url))
        assert "".join(backend.generate("a" * 50, Sampling(max_tokens=5))) == "0 1 2 3 4 "
        assert backend.stats.stop_reason == "length" and backend.stats.generated_tokens == 5
        assert endless.dropped.wait(10) and endless.sent < endless.limit  # hung up, not drained
        # 50 bytes of prompt (a server without /tokenize: a prompt counts as its bytes) in a context of 64
        assert "".join(backend.generate("a" * 50, Sampling(max_tokens=100))) == "".join(f"{i} " for i in range(14))
        assert backend.stats.stop_reason == "context" and backend.stats.generated_tokens == 14


def test_chat_against_a_server_that_never_stops_keeps_its_numbers_bounded():
    with Fake({"/v1/models": models_route(), "/v1/completions": Endless()}) as fake:
        proc = malhae("chat", "-n", "5", "--endpoint", fake.url, stdin="질문\n".encode())
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert proc.stdout.decode().split() == ["0", "1", "2", "3", "4"]
    status = re.search(r"(\d+) tokens · .* · context (\d+)/512 · stopped at max_tokens 5", err)
    assert status and status[1] == "5" and int(status[2]) <= 512, err


def test_usage_a_server_claims_beyond_what_it_sent_is_not_believed():
    final = chunk("", "length") | {"usage": {"completion_tokens": 10**12, "prompt_tokens": 10**12}}
    answer = (200, "text/event-stream", sse(chunk("가 "), chunk("나"), final))
    with Fake({"/v1/models": models_route(), "/v1/completions": answer}) as fake:
        out = result(malhae("complete", "x", "-n", "2", "--json", "--endpoint", fake.url))
    assert out["text"] == "가 나" and out["stats"]["stop_reason"] == "length"
    assert out["stats"]["generated_tokens"] == 2 and out["stats"]["prompt_tokens"] <= 512


# --- impossible and malformed answers ----------------------------------------------------------------------------

POSITION = object()


class Echo:
    """A vLLM-like server that echoes every prompt with `value` as each token's log-probability (and the likeliest
    token's, unless `top` says otherwise), written as Python's json writes NaN and Infinity; each choice's index is
    its position, or `index` (None: no index field)."""

    def __init__(self, value: object, index: object = POSITION) -> None:
        self.value, self.index, self.top = value, index, None
        tokens = (200, "application/json", json.dumps({"tokens": list(range(1, 201))}).encode())
        self.fake = Fake({"/v1/models": models_route("vllm"), "/tokenize": tokens, "/v1/completions": self.answer})

    def answer(self, handler) -> None:
        prompts = self.fake.bodies[-1][1]["prompt"]  # one request at a time (--concurrency 1)
        choices = [{"text": "", "finish_reason": "length",
                    "logprobs": {"token_logprobs": [None] + [self.value] * (len(p) - 1),
                                 "top_logprobs": [None] + [{"t": self.top or self.value}] * (len(p) - 1)}}
                   | ({"index": i} if self.index is POSITION else {} if self.index is None else {"index": self.index})
                   for i, p in enumerate(prompts)]
        data = json.dumps({"choices": choices}).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)


def ppl(fake: Fake):
    return malhae("eval", "ppl", "--text", str(BILL), "--ctx", "64", "--concurrency", "1", "--json",
                  "--endpoint", fake.url)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 0.5])
def test_an_impossible_log_probability_is_refused_naming_the_server(value):
    with Echo(value).fake as fake:
        line = one_error_line(ppl(fake))
    assert f"the vLLM server at {fake.url} returned an impossible log-probability ({value!r})" in line


@pytest.mark.parametrize("value, expected", [(5e-5, 1.0), (-1.0, 2.718281828)])
def test_possible_log_probabilities_and_rounding_above_zero_are_taken(value, expected):
    with Echo(value, index=None).fake as fake:  # without index fields the choices come in order
        assert result(ppl(fake))["ppl"] == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("index", ["zero", True, 7])
def test_a_malformed_choice_index_is_one_line_naming_the_field(index):
    with Echo(-1.0, index=index).fake as fake:
        line = one_error_line(ppl(fake))
    assert f"{fake.url}/completions" in line and "'index'" in line


def test_scoring_refuses_an_impossible_value_among_the_likeliest_tokens_too():
    echo = Echo(-1.0)
    with echo.fake as fake:
        backend = remote.RemoteBackend(Endpoint.parse(fake.url))
        choices = RemoteScorer(backend).score([1, 2, 3], [[4, 5]])
        assert choices[0].loglik == pytest.approx(-2.0) and choices[0].greedy
        echo.top = -0.5  # a likelier token than the prompt's own: not greedy
        assert not RemoteScorer(backend).score([1, 2, 3], [[4, 5]])[0].greedy
        for top in (float("nan"), 2.0):
            echo.top = top
            with pytest.raises(UserError, match=rf"impossible log-probability \({top!r}\)"):
                RemoteScorer(backend).score([1, 2, 3], [[4, 5]])
        echo.top = "high"
        with pytest.raises(UserError, match=r"log-probability that is not a number \('high'\)"):
            RemoteScorer(backend).score([1, 2, 3], [[4, 5]])


@pytest.mark.parametrize("field, choice", [
    ("finish_reason", {"index": 0, "text": "가", "finish_reason": 5}),
    ("text", {"index": 0, "text": ["가"], "finish_reason": None}),
    ("delta", {"index": 0, "delta": "가", "finish_reason": None}),
    ("choices", "가"),
])
def test_a_malformed_stream_field_is_one_line_naming_it(field, choice):
    answer = (200, "text/event-stream", sse({"choices": [choice]}, chunk("", "stop")))
    with Fake({"/v1/models": models_route(), "/v1/completions": answer}) as fake:
        line = one_error_line(malhae("complete", "x", "-n", "4", "--endpoint", fake.url))
    assert f"{fake.url}/completions" in line and f"'{field}'" in line


def test_llama_servers_malformed_stop_type_is_one_line():
    final = chunk("", "stop") | {"__verbose": {"stop": True, "stop_type": ["eos"]}}
    answer = (200, "text/event-stream", sse(chunk("가"), final))
    props = (200, "application/json", b'{"default_generation_settings": {"n_ctx": 512}}')
    tokens = (200, "application/json", b'{"tokens": [1, 2]}')
    routes = {"/v1/models": models_route("llamacpp"), "/props": props, "/tokenize": tokens, "/v1/completions": answer}
    with Fake(routes) as fake:
        line = one_error_line(malhae("complete", "x", "-n", "4", "--endpoint", fake.url))
    assert f"{fake.url}/completions" in line and "'__verbose.stop_type'" in line


def test_an_absurd_context_size_is_one_line():
    with Fake({"/v1/models": models_route(ctx=10**15)}) as fake:
        line = one_error_line(malhae("complete", "x", "-n", "4", "--endpoint", fake.url))
    assert f"{fake.url}/models" in line and "'context_length'" in line


# --- text from outside on the terminal ---------------------------------------------------------------------------

def test_printable_drops_control_characters_and_keeps_lines_only_where_asked():
    assert ui.printable("가\x1b[2J\x07나\t다\n라\r\n마") == "가[2J나 다 라  마"
    assert ui.printable("가\x1b[2J\x07나\t다\n라\r\n마", multiline=True) == "가[2J나\t다\n라\n마"
    every = "".join(sorted(CONTROL))
    assert clean(ui.printable(every)) and clean(ui.printable(every, multiline=True))
    assert ui.printable("plain, 한국어 — ok") == "plain, 한국어 — ok"
    # a right-to-left override shows "evil.exe" as "exe.live"; isolates and embeddings reorder text as well
    assert ui.printable("file\u202eexe.live\u2066x\u2069\u202a.gguf") == "fileexe.livex.gguf"
    assert ui.printable("가\u2028나\u2029다") == "가 나 다"


@pytest.mark.parametrize("status, kind, body", [
    (500, "application/json", json.dumps({"error": {"message": f"boom{ESCAPES}done"}}).encode()),
    (401, "text/plain", f"no{ESCAPES}key".encode()),
])
def test_a_servers_error_text_reaches_stderr_without_escapes(status, kind, body):
    with Fake({"/v1/models": (status, kind, body)}) as fake:
        proc = malhae("ask", "q", "--endpoint", fake.url)
    line = one_error_line(proc)
    err = proc.stderr.decode()
    assert clean(err) and err.count("\n") == 1
    assert fake.url in line and "]0;PWNED" in line  # the text is shown, without what would act on the terminal


def test_an_error_in_the_middle_of_a_stream_and_a_model_id_are_cleaned_too():
    failing = (200, "text/event-stream", sse(chunk("가"), {"error": {"message": f"late{ESCAPES}"}}))
    card = {"id": f"evil{ESCAPES}", "owned_by": "x", "context_length": 512}
    listing = (200, "application/json", json.dumps({"data": [card]}).encode())
    with Fake({"/v1/models": models_route(), "/v1/completions": failing}) as fake:
        proc = malhae("complete", "x", "--endpoint", fake.url)
        assert "late" in one_error_line(proc) and clean(proc.stderr.decode())
        chat = malhae("chat", "--endpoint", fake.url, stdin="질문\n".encode())
        assert "late" in chat.stderr.decode() and clean(chat.stderr.decode())
    with Fake({"/v1/models": listing}) as fake:
        proc = malhae("ask", "q", "--endpoint", fake.url, "-m", "other")
        assert "it serves: evil]0;PWNED" in one_error_line(proc) and clean(proc.stderr.decode())


def test_a_note_is_printed_without_control_characters(capsys):
    ui.note(f"the server said{ESCAPES}")
    err = capsys.readouterr().err
    assert "the server said]0;PWNED" in err and clean(err)


def test_an_answer_with_escapes_reaches_a_terminal_without_them_and_a_pipe_as_sent():
    """A model (here a remote server) can write escape sequences into its answer: on a terminal `complete` leaves the
    control characters out, as chat does; through a pipe the text is the model's, byte for byte."""
    import os
    import pty
    import subprocess
    import sys

    from test_remote import ROOT

    answer = (200, "text/event-stream", sse(chunk(f"가{ESCAPES}나"), chunk("", "stop")))
    with Fake({"/v1/models": models_route(), "/v1/completions": answer}) as fake:
        piped = malhae("complete", "x", "--endpoint", fake.url)
        assert piped.returncode == 0 and piped.stdout.decode() == f"가{ESCAPES}나\n"
        main, side = pty.openpty()
        env = {k: v for k, v in os.environ.items() if k not in ("MALHAE_ENDPOINT", "MALHAE_API_KEY")}
        proc = subprocess.Popen([sys.executable, "-m", "malhae", "complete", "x", "--endpoint", fake.url],
                                stdout=side, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, cwd=ROOT, env=env)
        os.close(side)
        seen = b""
        while True:
            try:
                data = os.read(main, 4096)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            seen += data
        os.close(main)
        assert proc.wait(timeout=60) == 0
    shown = seen.decode().replace("\r\n", "\n")
    assert shown == "가]0;PWNED[2J31m나\n" and clean(shown)
