"""The two ends of an answer's text, everywhere it is shown: no broken character where generation was cut off, and a
chat answer that starts at its first character (not with the space the prompt format leaves before it).

The bundled demo model, greedy: `계엄은 비상계엄과` continued for 5 tokens is " 경비계엄으로 한다.\\n" and then the
first bytes of a Hangul syllable that the 5-token limit cut in two; a question to it in the base chat format
("…어시스턴트:") is answered with a space first.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from malhae.runtime import templates

pytest.importorskip("uvicorn")

from helpers import serving  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CUT = "계엄은 비상계엄과"  # 5 tokens of it end inside a character
CUT_TEXT = " 경비계엄으로 한다.\n"  # the whole characters of those 5 tokens: a continuation keeps its leading space
QUESTION = "대한민국의 수도는?"
ANSWER = "대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다."  # 10 tokens, after the format's space


@pytest.fixture(scope="module")
def demo(demo_path):
    with serving(demo_path, parallel=2) as server:
        yield server


def malhae(*args: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("MALHAE_ENDPOINT", "MALHAE_API_KEY")}
    proc = subprocess.run([sys.executable, "-m", "malhae", *args], capture_output=True, cwd=ROOT, timeout=120,
                          env=clean)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc


def post(server, path: str, body: dict) -> tuple[int, str]:
    """(status, body text) of one request; the body is read whole (NDJSON and SSE streams too)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    text = resp.read().decode("utf-8")  # strict: the server never sends bytes that are not UTF-8
    conn.close()
    return resp.status, text


def whole(server, path: str, body: dict) -> dict:
    status, text = post(server, path, body)
    assert status == 200, text
    return json.loads(text)


def sse(server, path: str, body: dict) -> list[dict]:
    status, text = post(server, path, body | {"stream": True})
    assert status == 200, text
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def ndjson(server, path: str, body: dict) -> list[dict]:
    status, text = post(server, path, body | {"stream": True})
    assert status == 200, text
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# --- 1. no broken character at the cut-off ------------------------------------------------------------------------

def test_complete_prints_no_broken_character_at_the_cut_off(demo_path):
    proc = malhae("complete", CUT, "-n", "5", "--temperature", "0", "-m", str(demo_path))
    assert proc.stdout.decode("utf-8") == CUT_TEXT
    out = json.loads(malhae("complete", CUT, "-n", "5", "--temperature", "0", "-m", str(demo_path), "--json").stdout)
    assert out["text"] == CUT_TEXT
    assert out["stats"]["generated_tokens"] == 5 and out["stats"]["stop_reason"] == "length"  # the real count


def test_server_completions_hold_back_the_broken_character(demo):
    body = {"model": "m", "prompt": CUT, "max_tokens": 5, "temperature": 0}
    out = whole(demo, "/v1/completions", body)
    assert [c["text"] for c in out["choices"]] == [CUT_TEXT]
    assert out["choices"][0]["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 5
    chunks = sse(demo, "/v1/completions", body | {"stream_options": {"include_usage": True}})
    assert "".join(c["text"] for e in chunks for c in e["choices"]) == CUT_TEXT
    assert chunks[-1]["usage"]["completion_tokens"] == 5
    two = whole(demo, "/v1/completions", body | {"n": 2})
    assert [c["text"] for c in two["choices"]] == [CUT_TEXT, CUT_TEXT]
    assert two["usage"]["completion_tokens"] == 10


def test_ollama_generate_holds_back_the_broken_character(demo):
    body = {"model": "m", "prompt": CUT, "raw": True, "options": {"temperature": 0, "num_predict": 5}}
    out = whole(demo, "/api/generate", body | {"stream": False})
    assert out["response"] == CUT_TEXT and out["eval_count"] == 5 and out["done_reason"] == "length"
    lines = ndjson(demo, "/api/generate", body)
    assert "".join(line["response"] for line in lines) == CUT_TEXT and lines[-1]["eval_count"] == 5


# --- 2. a chat answer starts at its first character ---------------------------------------------------------------

def test_chat_answers_on_the_server_start_at_their_first_character(demo):
    messages = [{"role": "user", "content": QUESTION}]
    chat = {"model": "m", "messages": messages, "max_tokens": 10, "temperature": 0}
    out = whole(demo, "/v1/chat/completions", chat)
    assert out["choices"][0]["message"]["content"] == ANSWER
    assert out["usage"]["completion_tokens"] == 10  # the space's token was generated: it is counted
    chunks = sse(demo, "/v1/chat/completions", chat)
    assert "".join(c["delta"].get("content") or "" for e in chunks for c in e["choices"]) == ANSWER
    ollama = {"model": "m", "messages": messages, "options": {"temperature": 0, "num_predict": 10}}
    assert whole(demo, "/api/chat", ollama | {"stream": False})["message"]["content"] == ANSWER
    lines = ndjson(demo, "/api/chat", ollama)
    assert "".join(line["message"]["content"] for line in lines) == ANSWER and lines[-1]["eval_count"] == 10
    framed = {"model": "m", "prompt": QUESTION, "options": {"temperature": 0, "num_predict": 10}}
    assert whole(demo, "/api/generate", framed | {"stream": False})["response"] == ANSWER  # framed like `ask`
    # the raw continuation of the same prompt keeps the space: it continues the text it was given
    prompt = templates.get("base").prompt([("user", QUESTION)])
    raw = whole(demo, "/v1/completions", {"model": "m", "prompt": prompt, "max_tokens": 10, "temperature": 0,
                                          "stop": list(templates.get("base").stop)})
    assert raw["choices"][0]["text"] == " " + ANSWER


def test_an_answer_replayed_as_history_gives_the_prompt_the_model_saw(demo):
    """What the model read and wrote (the prompt, then " " + the answer) is exactly where the next turn's prompt
    begins, token for token: dropping the space from the answer changes nothing the model sees."""
    tpl = templates.get("base")
    first = [{"role": "user", "content": QUESTION}]
    content = whole(demo, "/v1/chat/completions", {"model": "m", "messages": first, "max_tokens": 10,
                                                   "temperature": 0})["choices"][0]["message"]["content"]
    seen = tpl.prompt([("user", QUESTION)]) + " " + ANSWER  # the prompt and the tokens generated after it
    following = tpl.prompt([("user", QUESTION), ("assistant", content), ("user", "고마워요")])
    assert following.startswith(seen + tpl.assistant_end)
    tokens = whole(demo, "/tokenize", {"content": following})["tokens"]
    before = whole(demo, "/tokenize", {"content": seen})["tokens"]
    assert tokens[:len(before)] == before


def test_the_repl_and_ask_show_and_keep_the_answer_from_its_first_character(demo_path, demo, tmp_path):
    saved = tmp_path / "chat.json"
    proc = subprocess.run([sys.executable, "-m", "malhae", "chat", "-m", str(demo_path), "--threads", "1", "-n",
                           "10", "--temperature", "0"], input=f"{QUESTION}\n/save {saved}\n".encode(),
                          capture_output=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode() == ANSWER + "\n"  # shown
    turns = json.loads(saved.read_text(encoding="utf-8"))["turns"]
    assert turns == [{"role": "user", "text": QUESTION}, {"role": "assistant", "text": ANSWER}]  # kept
    local = json.loads(malhae("ask", QUESTION, "-n", "10", "--temperature", "0", "-m", str(demo_path),
                              "--json").stdout)
    there = json.loads(malhae("ask", QUESTION, "-n", "10", "--temperature", "0", "--endpoint",
                              demo.url + "/v1", "--json").stdout)  # the remote backend's completion-mode chat
    assert local["text"] == there["text"] == ANSWER
