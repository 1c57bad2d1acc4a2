"""`malhae ask --schema` / `complete --grammar` as a user runs them: the JSON alone on stdout (so `| jq` works), a
cut-off answer said in one line, every mistake in one line before a model is loaded, and a schema sent on to a
server with --endpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from helpers import one_error_line, serving

from malhae.errors import UserError
from malhae.runtime import grammar, remote
from malhae.runtime.settings import Sampling

ROOT = Path(__file__).resolve().parent.parent
# the demo never closes a free string of its own (it goes on quoting its dialogues): strings are bounded
REVIEW = {"type": "object", "required": ["감정", "이유", "점수"],
          "properties": {"감정": {"enum": ["긍정", "부정"]}, "이유": {"type": "string", "maxLength": 12},
                         "점수": {"type": "integer", "minimum": 1, "maximum": 5}}}


def malhae(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "malhae", *args], capture_output=True, cwd=ROOT, timeout=120,
                          stdin=subprocess.DEVNULL)


def test_ask_schema_prints_the_json_alone(demo_path):
    for seed in ("1", "2"):
        proc = malhae("ask", "이 리뷰의 감정은? 배송이 너무 늦어요", "-m", str(demo_path), "--seed", seed,
                      "--schema", json.dumps(REVIEW, ensure_ascii=False))
        assert proc.returncode == 0, proc.stderr.decode()
        answer = json.loads(proc.stdout.decode())  # nothing else on stdout
        jsonschema.validate(answer, REVIEW)
        assert answer["감정"] in proc.stdout.decode()  # the Korean word itself, not \\u escapes


def test_schema_from_a_file_and_from_concise_fields(demo_path, tmp_path):
    path = tmp_path / "review.schema.json"
    path.write_text(json.dumps(REVIEW), encoding="utf-8")
    proc = malhae("ask", "리뷰: 좋아요", "-m", str(demo_path), "--schema", str(path), "--temperature", "0")
    assert proc.returncode == 0, proc.stderr.decode()
    jsonschema.validate(json.loads(proc.stdout), REVIEW)
    # the concise syntax: the fields, with their types, all required (a bool and an int finish on their own)
    proc = malhae("ask", "헌법 제1조?", "-m", str(demo_path), "--schema", "조항 int, 중요 bool: 중요한가",
                  "--seed", "3")
    assert proc.returncode == 0, proc.stderr.decode()
    answer = json.loads(proc.stdout)
    assert set(answer) == {"조항", "중요"} and isinstance(answer["조항"], int) and isinstance(answer["중요"], bool)


def test_concise_syntax_is_llms():
    assert grammar.concise("name, age int, 요약: 한 문장 요약") == {
        "type": "object", "required": ["name", "age", "요약"],
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                       "요약": {"type": "string", "description": "한 문장 요약"}}}
    # newlines separate when there are any, so a description may hold commas
    assert grammar.concise("a float: x, y\nb")["properties"] == {"a": {"type": "number", "description": "x, y"},
                                                                  "b": {"type": "string"}}
    with pytest.raises(UserError, match="name \\[type\\]"):
        grammar.concise("a integer")


def test_complete_grammar_gives_only_its_words(demo_path, tmp_path):
    rules = tmp_path / "yes-no.gbnf"
    rules.write_text('root ::= (" 예" | " 아니요")\n', encoding="utf-8")
    seen = set()
    for seed in ("1", "2", "3", "4"):
        proc = malhae("complete", "질문: 헌법이 있나요? 답:", "-m", str(demo_path), "--grammar", str(rules),
                      "--temperature", "1.5", "--seed", seed)
        assert proc.returncode == 0, proc.stderr.decode()
        seen.add(proc.stdout.decode().rstrip("\n"))
    assert seen <= {" 예", " 아니요"} and seen


def test_an_answer_cut_off_says_so(demo_path):
    proc = malhae("ask", "리뷰: 좋아요", "-m", str(demo_path), "-n", "4", "--schema", json.dumps(REVIEW))
    line = one_error_line(proc).replace("malhae: error: ", "")
    assert "cut off at --max-tokens 4" in line and "raise --max-tokens" in line
    assert proc.stdout.decode().startswith("{")  # what there was, for whoever looks


@pytest.mark.parametrize(("args", "expected"), [
    (["--schema", "{}", "--grammar", "root ::= \"a\""], "give one of them"),
    (["--schema", '{"type": "object",'], "not valid JSON"),
    (["--schema", '["a"]'], "must be a JSON object"),
    (["--schema", '{"type": "array", "uniqueItems": true, "items": {"not": {}}}'], "not, uniqueItems"),
    (["--schema", '{"type": "object", "properties": {"me": {"$ref": "#"}}, "required": ["me"]}'], "recursive"),
    (["--schema", "a, b number"], "name [type]"),
    (["--schema", "missing.json"], "missing.json"),
    (["--grammar", "no-such.gbnf"], "no-such.gbnf"),
])
def test_schema_mistakes_are_one_line_before_loading(args, expected):
    # the model does not exist: these fail before it would be looked for
    line = one_error_line(malhae("ask", "x", "-m", "/nonexistent/model.gguf", *args))
    assert expected in line, line


def test_a_gbnf_syntax_error_is_llamas_reason_in_one_line(demo_path):
    proc = malhae("complete", "x", "-m", str(demo_path), "--grammar", 'root ::= ("예" | "아니요"')
    line = one_error_line(proc)
    assert "not valid GBNF" in line and "expecting ')'" in line
    assert "root ::=" not in proc.stderr.decode()  # llama.cpp's dump of the grammar is not passed on


def test_endpoint_sends_the_schema_on(demo_path):
    with serving(demo_path, parallel=2, n_ctx=512) as server:
        for extra in ([], ["--remote-chat"]):
            proc = malhae("ask", "리뷰: 좋아요", "--endpoint", server.url, "--seed", "5",
                          "--schema", json.dumps(REVIEW), *extra)
            assert proc.returncode == 0, proc.stderr.decode()
            jsonschema.validate(json.loads(proc.stdout), REVIEW)


def test_what_each_kind_of_server_is_sent():
    schema = grammar.from_schema(REVIEW)
    gbnf = grammar.from_gbnf('root ::= "예"')
    assert remote.constraint_fields(remote.LLAMA_CPP, Sampling(grammar=schema), chat=False) == {"json_schema": REVIEW}
    assert remote.constraint_fields(remote.MALHAE, Sampling(grammar=gbnf), chat=False) == {"grammar": gbnf.gbnf}
    for kind in (remote.VLLM, remote.OPENAI, remote.LLAMA_CPP):
        sent = remote.constraint_fields(kind, Sampling(grammar=schema), chat=True)
        assert sent["response_format"]["json_schema"]["schema"] == REVIEW
    with pytest.raises(UserError, match="--remote-chat"):
        remote.constraint_fields(remote.OPENAI, Sampling(grammar=schema), chat=False)
    with pytest.raises(UserError, match="--schema instead"):
        remote.constraint_fields(remote.VLLM, Sampling(grammar=gbnf), chat=False)
    assert remote.constraint_fields(remote.VLLM, Sampling(), chat=False) == {}


def test_a_grammar_llama_refuses_fails_its_job_alone(demo_path):
    """The server checks every grammar before queueing it; should one reach a slot all the same, that job ends with
    llama.cpp's reason and the job beside it runs to its end."""
    import threading

    from malhae.runtime.batching import Scheduler
    from malhae.runtime.engine import Engine
    from malhae.runtime.events import Done, Job
    from malhae.runtime.settings import LoadOptions

    with Engine(LoadOptions(model=demo_path, ctx=128, parallel=2, threads=1)) as engine:
        scheduler = Scheduler(engine)
        ends: dict[str, Done] = {}
        finished = threading.Semaphore(0)

        def job(name: str, s: Sampling) -> Job:
            def emit(event, name=name):
                if isinstance(event, Done):
                    ends[name] = event
                    finished.release()
            return Job(engine.tokenize("대한민국의 주권은"), s, 8, emit)

        try:
            scheduler.submit([job("bad", Sampling(grammar=grammar.Grammar('root ::= ("예"', "GBNF grammar"))),
                              job("good", Sampling(temperature=0))])
            assert finished.acquire(timeout=60) and finished.acquire(timeout=60)
        finally:
            scheduler.close()
    assert ends["bad"].reason == "error" and "expecting ')'" in ends["bad"].error
    assert ends["good"].reason == "length" and ends["good"].completion_tokens == 8


def test_chat_schema_holds_every_answer(demo_path):
    """`malhae chat --schema`, as `ollama run --format json`: every answer of the conversation is the schema's JSON
    (a turn marker quoted inside it no longer ends it), and /show says what holds them."""
    proc = subprocess.run([sys.executable, "-m", "malhae", "chat", "-m", str(demo_path), "--threads", "1", "--seed",
                           "4", "--schema", json.dumps(REVIEW, ensure_ascii=False)],
                          input="배송이 너무 늦어요\n좋아요\n/show\n".encode(), capture_output=True, cwd=ROOT,
                          timeout=120, env={**os.environ, "COLUMNS": "300"})
    assert proc.returncode == 0, proc.stderr.decode()
    answers = [line for line in proc.stdout.decode().splitlines() if line.strip()]
    assert len(answers) == 2, answers
    for answer in answers:
        jsonschema.validate(json.loads(answer), REVIEW)
    assert "answers held to --schema (JSON schema)" in proc.stderr.decode()
